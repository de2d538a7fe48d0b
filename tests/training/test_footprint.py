"""Bounded footprint over a long schedule: the real trainer (tiny network, 1 rank) over the 190k-iteration recipe
scaled down (checkpoints every 2 iterations, validation every 4, as 5k/10k in s3_mega.yaml) keeps at most k
checkpoints and k consolidated weight files on disk, stores one weight copy per MLflow logged model, and a logged
model loads in a fresh process whose working directory is outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import demo

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
ITERATIONS, CKPT_EVERY, VAL_EVERY, K = 16, 2, 4, 2
pytestmark = [pytest.mark.slow]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):  # the tracker's own defaults
        env.pop(name, None)
    return env


@pytest.mark.timeout(600)
def test_long_schedule_keeps_a_bounded_footprint(tmp_path, demo_data):
    data = demo_data
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    args = [f"output_dir={out}", f"data.shards={data / 'shards'}", f"validation.root={data / 'data' / 'DAVIS'}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=footprint", f"train.iterations={ITERATIONS}",
            f"checkpoint.every={CKPT_EVERY}", f"checkpoint.keep_last={K}", f"checkpoint.keep_weights={K}",
            f"validation.every={VAL_EVERY}", "validation.max_sequences=1", "validation.size=64",
            "validation.overlays=1", "tracking.log_every=4", "tracking.system_metrics=false", "data.num_workers=0",
            "train.global_batch=2", *demo.SMALL_TRAIN]
    proc = subprocess.run([sys.executable, "training/train.py", "--config", str(CONFIG), *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=500)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]

    # Disk: at most k complete checkpoints, k consolidated weight files (+ sidecars), nothing staged or left over.
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("iter_*"))
    assert ckpts == [f"iter_{i:07d}" for i in (ITERATIONS - CKPT_EVERY, ITERATIONS)]
    assert all((out / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    weights = sorted(p.name for p in (out / "weights").iterdir())
    assert weights == [f"iter_{i:07d}{s}" for i in (ITERATIONS - VAL_EVERY, ITERATIONS)
                       for s in (".model.yaml", ".pt")], weights
    assert not any((out / "uploads").iterdir()) if (out / "uploads").is_dir() else True

    # MLflow: one READY logged model per validation, each storing the weights once.
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("footprint")
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert sorted(int(m.tags["iteration"]) for m in models) == list(range(VAL_EVERY, ITERATIONS + 1, VAL_EVERY))
    state_bytes = (out / "weights" / f"iter_{ITERATIONS:07d}.pt").stat().st_size
    for m in models:
        assert m.status.name == "READY" and any(x.key == "val/JF" for x in m.metrics)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{m.model_id}",
                                                         dst_path=str(tmp_path / "dl" / m.model_id)))
        files = [p for p in local.rglob("*") if p.is_file()]
        pts = [p for p in files if p.suffix == ".pt"]
        assert len(pts) == 1, files
        assert abs(pts[0].stat().st_size - state_bytes) < 0.01 * state_bytes
        assert sum(p.stat().st_size for p in files) < 1.05 * state_bytes  # no second (pickled) copy
    logged = [json.loads(line) for line in (out / "logged_models.jsonl").read_text().splitlines()]
    assert sorted(r["iteration"] for r in logged if r["status"] == "READY") == [4, 8, 12, 16]

    # Quiet logs: no pickle warning, no per-artifact progress bar.
    assert "pickle" not in logs.lower() and "Downloading artifacts" not in logs

    # The newest logged model loads in a fresh process started outside the repository (the package only).
    newest = next(r for r in logged if r["iteration"] == ITERATIONS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys, torch\nfrom training.logged_model import load_logged_model\n"
              "torch.save(load_logged_model(sys.argv[1], tracking_uri=sys.argv[2]).state_dict(), 'net.pt')\n")
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    load = subprocess.run([sys.executable, "-c", script, newest["model_uri"], uri], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    import torch

    got = torch.load(elsewhere / "net.pt", weights_only=True)
    want = torch.load(out / "weights" / f"iter_{ITERATIONS:07d}.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
