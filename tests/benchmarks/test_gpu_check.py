"""benchmarks/gpu_check.sh in --smoke mode (CPU, toy sizes), so the one-GPU check never rots; and the shard configs
that the training configs name exist and load."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for heading in ("training step", "deformable attention", "inference FPS", "projection: 190000 iterations"):
        assert heading in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    assert r["mode"] == "smoke" and r["device"] == "cpu"

    assert set(r["train"]) == {"s3", "cutie_base"}
    for label, t in r["train"].items():
        for k in ("s_per_it", "clips_per_s", "peak_memory_gib", "trainable_params_m", "grad_bytes_fp32"):
            assert _positive(t[k]), (label, k, t[k])
        assert t["per_gpu_batch"] == 2 and t["timed_iters"] >= 1
        assert t["clips_per_s"] == pytest.approx(2 / t["s_per_it"])

    d = r["deformable"]
    assert d["modules"] > 0 and d["ranges"] == d["modules"] and d["backward_nodes"] > 0
    for k in ("share", "activation_share", "peak_share"):
        assert 0 < d[k] <= 1, (k, d[k])
    for k in ("forward_s", "backward_s", "total_s", "saved_bytes_deformable", "saved_bytes_all"):
        assert _positive(d[k]), (k, d[k])

    cases = {"fp32_noflip", "fp32_flip"}
    assert set(r["fps"]) == {"s3", "cutie_base", "rf_cutie_base"}
    for label, f in r["fps"].items():
        assert cases <= set(f), (label, f)
        for c in cases:
            assert _positive(f[c]["fps"]) and f[c]["frames"] >= 1, (label, c, f[c])

    p = r["projection"]
    assert p["iterations"] == 190_000 and p["gpus"] == 8 and p["global_batch"] == 16 and p["accumulation"] == 1
    assert "assumption" in p
    for label in ("s3", "cutie_base"):
        q = p[label]
        assert _positive(q["hours_ideal"]) and q["hours_with_allreduce"] >= q["hours_ideal"]
        assert q["hours_ideal"] == pytest.approx(190_000 * r["train"][label]["s_per_it"] / 3600)


def test_gpu_check_full_mode_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------- shard configs
SHARD_CMD = re.compile(r"python -m data_pipeline\.shard --config (\S+?\.yaml)")


def test_ytvos_davis_shard_config_loads(tmp_path):
    from data_pipeline.readers import READERS
    from data_pipeline.shard import load_config

    cfg = load_config(ROOT / "data_pipeline" / "configs" / "ytvos_davis.yaml", data_root=tmp_path)
    assert set(cfg["datasets"]) == {"youtubevos", "davis"}
    assert set(cfg["datasets"]) <= set(READERS)
    assert set(cfg["reader_options"]) <= set(cfg["datasets"])
    assert cfg["out"] == "/shared/shards/ytvos_davis"
    mega = load_config(ROOT / "data_pipeline" / "configs" / "mega.yaml", data_root=tmp_path)
    same = {k for k in mega if k not in ("datasets", "reader_options", "out", "data_root", "clips_per_level")}
    assert {k: cfg[k] for k in same} == {k: mega[k] for k in same}  # the dataset list and clip counts differ
    # clip counts follow each paper schedule's draws per level: every stored clip is drawn about 5 times
    from data_pipeline.shard import training_draws

    for shard_cfg, train_cfg in ((mega, "s3_mega.yaml"), (cfg, "s3_ytvos_davis.yaml")):
        draws = training_draws(ROOT / "training" / "configs" / train_cfg, shard_cfg["levels"])["draws"]
        reuse = {lv: draws[lv] / n for lv, n in shard_cfg["clips_per_level"].items()}
        assert all(4.5 <= r <= 5.5 for r in reuse.values()), (train_cfg, reuse)


def test_shard_configs_named_by_training_configs_exist(tmp_path):
    from data_pipeline.shard import load_config

    named = []
    for path in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        for ref in SHARD_CMD.findall(path.read_text()):
            named.append((path.name, ref))
            assert (ROOT / ref).is_file(), f"{path.name} names {ref}, which does not exist"
            load_config(ROOT / ref, data_root=tmp_path)
    assert {ref for _, ref in named} >= {"data_pipeline/configs/mega.yaml", "data_pipeline/configs/ytvos_davis.yaml"}
