"""The Ray shard job against a plain single-process loop doing the same work, at realistic frame sizes.

    python benchmarks/bench_shard.py [--clips 1000] [--height 720 --width 1280] [--scaling 250,500]

Synthesises the five datasets at 720p (the MEGA sets are 720p-1080p) into `--workdir` (kept, so a second run
starts at once), then, in one run on the same machine:
  (a) a plain loop: list, plan and write every shard in this process (`shard_task`, no Ray);
  (b) the Ray job (`python -m data_pipeline.shard`) with num_cpus=1, and (c) with num_cpus=2;
  (d) the Ray job with num_cpus=2 at the `--scaling` clip counts, next to (c), with a least-squares line
      seconds = start-up + per-clip cost x clips and each point's deviation from it.
Every run writes into a fresh folder; the Ray timings include Ray's start-up, as a user sees it. Prints clips/s,
the ratios (b)/(a) and (c)/(b), and writes the figures as JSON to `--json` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.sampling import plan_clips  # noqa: E402
from data_pipeline.shard import clip_item, list_videos, load_config, shard_task  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402

BASE_CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"


def write_config(path: Path, clips: int, per_shard: int, short: int) -> Path:
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    levels = cfg["levels"]
    cfg.update(clips_per_level=-(-clips // len(levels)), clips_per_shard=per_shard, short_side=short)
    path.write_text(yaml.safe_dump(cfg))
    return path


def plain_loop(config: Path, data: Path, out: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    cfg = load_config(config, data_root=data, out=out)
    videos, specs, _ = list_videos(cfg)
    plans = plan_clips(videos, cfg["clips_per_level"], cfg["levels"], cfg["seed"])
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    clips = 0
    for level, ps in sorted(plans.items()):
        (out / level).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(ps), cfg["clips_per_shard"]):
            items = [clip_item(specs[p.dataset], by_id[(p.dataset, p.video)], p) for p in ps[s:s + cfg["clips_per_shard"]]]
            st = shard_task(str(out), f"{level}/shard-{s // cfg['clips_per_shard']:06d}.tar", items,
                            cfg["short_side"], cfg["jpeg_quality"])
            clips += st["clips"]
    return clips, time.perf_counter() - t0


def ray_job(config: Path, data: Path, out: Path, cpus: int) -> tuple[int, float, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(config), "--data-root",
                           str(data), "--out", str(out), f"num_cpus={cpus}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"shard job failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    nodes = {s["node_id"] for s in (json.loads(p.read_text()) for p in out.rglob("*.stats.json"))}
    return manifest["num_clips"], secs, {"nodes": len(nodes), "shards": manifest["num_shards"]}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-12)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000, help="clips of the main comparison (about; split over 3 levels)")
    ap.add_argument("--scaling", default="250,500", help="further clip counts for the Ray job with 2 CPUs")
    ap.add_argument("--videos", type=int, default=3, help="videos per dataset")
    ap.add_argument("--frames", type=int, default=40, help="frames per video")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--short-side", type=int, default=480, help="stored short side (mega.yaml: 480)")
    ap.add_argument("--clips-per-shard", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-shard"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)
    data = a.workdir / f"data-{a.videos}x{a.frames}-{a.width}x{a.height}"
    if not (data / ".complete").is_file():
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        print(f"synthesising 5 datasets x {a.videos} videos x {a.frames} frames at {a.width}x{a.height} into {data}",
              flush=True)
        synthesize(data, seed=0, videos=a.videos, size=(a.frames, a.height, a.width))
        (data / ".complete").write_text("")
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    runs = a.workdir / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    config = write_config(runs / f"bench-{a.clips}.yaml", a.clips, a.clips_per_shard, a.short_side)
    res: dict = {"frame_size": [a.height, a.width], "short_side": a.short_side, "clips_per_shard": a.clips_per_shard,
                 "cpu_count": os.cpu_count()}
    print(f"{a.clips} clips, frames {a.width}x{a.height} stored at short side {a.short_side}, "
          f"{a.clips_per_shard} clips per shard, {os.cpu_count()} cores", flush=True)

    n0, s0 = plain_loop(config, data, runs / "plain")
    res["plain"] = {"clips": n0, "seconds": s0}
    print(f"(a) plain loop, 1 process : {n0} clips in {s0:7.1f} s = {n0 / s0:6.2f} clips/s", flush=True)
    for cpus in (1, 2):
        n, s, extra = ray_job(config, data, runs / f"ray{cpus}", cpus)
        if n != n0:
            raise SystemExit(f"the Ray job wrote {n} clips, the plain loop {n0}")
        res[f"ray{cpus}"] = {"clips": n, "seconds": s, **extra}
        print(f"({'bc'[cpus - 1]}) Ray job, num_cpus={cpus}   : {n} clips in {s:7.1f} s = {n / s:6.2f} clips/s",
              flush=True)
    res["ray1_vs_plain"] = s0 / res["ray1"]["seconds"]
    res["ray2_vs_ray1"] = res["ray1"]["seconds"] / res["ray2"]["seconds"]
    print(f"Ray 1 CPU / plain loop = {res['ray1_vs_plain']:.2f}x   Ray 2 CPUs / Ray 1 CPU = {res['ray2_vs_ray1']:.2f}x",
          flush=True)

    points = [(n0, res["ray2"]["seconds"])]
    for clips in (int(c) for c in a.scaling.split(",") if c):
        cfg = write_config(runs / f"bench-{clips}.yaml", clips, a.clips_per_shard, a.short_side)
        n, s, _ = ray_job(cfg, data, runs / f"scale{clips}", 2)
        points.append((n, s))
    points.sort()
    start, per_clip = fit_line(points)
    res["scaling"] = [{"clips": n, "seconds": s, "line": start + per_clip * n} for n, s in points]
    res["scaling_fit"] = {"startup_seconds": start, "seconds_per_clip": per_clip}
    print(f"(d) Ray job, num_cpus=2, cost against clips: line = {start:.1f} s + {1000 * per_clip:.1f} ms x clips",
          flush=True)
    for r in res["scaling"]:
        print(f"    {r['clips']:6d} clips: {r['seconds']:7.1f} s  (line {r['line']:7.1f} s, "
              f"{100 * (r['seconds'] / r['line'] - 1):+.1f}%)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
