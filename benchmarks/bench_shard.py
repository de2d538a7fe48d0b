"""Clips per second of the Ray shard job with 1 and 2 CPUs against a plain single-process loop doing the same work.

    python benchmarks/bench_shard.py [--videos 4]

Synthesizes the five datasets into a temp folder, then times (a) a plain loop over the same shard plan calling the
shard writer in this process, (b) the Ray job (`python -m data_pipeline.shard`, demo config) with num_cpus=1 and
(c) with num_cpus=2, each into a fresh output folder. Prints clips/s and the ratios against the plain loop (the
Ray timings include Ray's start-up, as a user sees it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.sampling import plan_clips  # noqa: E402
from data_pipeline.shard import list_videos, load_config, shard_task  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402

CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"


def plain_loop(data: Path, out: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    cfg = load_config(CONFIG, data_root=data, out=out)
    videos, specs, _ = list_videos(cfg)
    plans = plan_clips(videos, cfg["clips_per_level"], cfg["levels"], cfg["seed"])
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    clips = 0
    for level, ps in sorted(plans.items()):
        (out / level).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(ps), cfg["clips_per_shard"]):
            items = [(specs[p.dataset], by_id[(p.dataset, p.video)], p) for p in ps[s:s + cfg["clips_per_shard"]]]
            st = shard_task(str(out / level / f"shard-{s // cfg['clips_per_shard']:06d}.tar"), items,
                            cfg["short_side"], cfg["jpeg_quality"])
            clips += st["clips"]
    return clips, time.perf_counter() - t0


def ray_job(data: Path, out: Path, cpus: int) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(CONFIG), "--data-root", str(data),
                    "--out", str(out), f"num_cpus={cpus}"], cwd=ROOT, env=env, check=True, capture_output=True)
    secs = time.perf_counter() - t0
    return json.loads((out / "manifest.json").read_text())["num_clips"], secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        data = synthesize(Path(tmp) / "data", seed=0, videos=a.videos)
        base_clips, base_s = plain_loop(data, Path(tmp) / "plain")
        print(f"plain loop, 1 process : {base_clips} clips in {base_s:.2f} s = {base_clips / base_s:.1f} clips/s")
        for cpus in (1, 2):
            clips, secs = ray_job(data, Path(tmp) / f"ray{cpus}", cpus)
            assert clips == base_clips, (clips, base_clips)
            print(f"Ray job, num_cpus={cpus}   : {clips} clips in {secs:.2f} s = {clips / secs:.1f} clips/s, "
                  f"ratio vs plain loop {base_s / secs:.2f}x")


if __name__ == "__main__":
    main()
