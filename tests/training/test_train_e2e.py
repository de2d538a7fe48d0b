"""End to end on CPU with every real component: synthetic datasets → Ray shard job → WebDataset loader → the
`tiny` S3 network in a DeepSpeed ZeRO-2 engine on 2 gloo ranks through the `deepspeed` launcher → checkpoints →
validation through the inference engine → MLflow (SQLite) → training.select.

One module-scoped uninterrupted 2-rank run serves three checks (MLflow contents + champion, resume equality's
reference, the global batch); a stopped-and-relaunched run and a 1-rank run are the only other launches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training import demo

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
ITERATIONS, STOP_AT = 6, 3
pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def data(demo_data):
    """Small synthetic datasets in their native layouts, sharded by the real Ray job (local Ray; once per session)."""
    return demo_data


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.shards={data / 'shards'}", f"validation.root={data / 'data' / 'DAVIS'}",
            f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", "tracking.experiment=e2e",
            f"train.iterations={ITERATIONS}", "checkpoint.every=3", "checkpoint.keep_last=2",
            "validation.every=3", "validation.max_sequences=2", "validation.size=64", "validation.overlays=1",
            "tracking.log_every=1", "tracking.system_metrics_interval=1.0", "data.num_workers=0",
            "train.global_batch=4", *demo.SMALL_TRAIN, *extra]


def launch(ranks: int, args: list[str], launcher: str = "deepspeed") -> subprocess.CompletedProcess:
    if launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), "training/train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_free_port()), "training/train.py"]
    proc = subprocess.run([*cmd, "--config", str(CONFIG), *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc


def losses(out: Path) -> dict[int, dict]:
    from training.train import read_loss_log

    return {r["iteration"]: r for r in read_loss_log(out)}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full2")
    launch(2, overrides(data, out))
    return out


@pytest.mark.timeout(600)
def test_two_rank_zero2_run_is_one_mlflow_run_with_logged_checkpoints(full_run):
    import mlflow
    from mlflow import MlflowClient

    from training.select import select

    info = json.loads((full_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 2 and info["bf16"] is False
    assert info["engine_train_batch_size"] == 4 == info["micro_batch"] * info["accumulation"] * 2
    uri = f"sqlite:///{full_run / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # rank 0 only, however many ranks
    run = runs[0]
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.name"] == "tiny"
    assert float(run.data.params["optim.lr"]) > 0 and "config_hash" in run.data.params
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, ITERATIONS + 1))
    for key in ("train/lr", "train/grad_norm", "train/clips_per_s", "train/data_wait_s", "train/memory_mb",
                "train/mask_ce"):
        assert key in run.data.metrics, key
    assert any(k.startswith("system/") for k in run.data.metrics)  # MLflow system metrics
    assert any(a.path == "config" for a in client.list_artifacts(run.info.run_id))
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    by_step = {}
    for m in models:
        for metric in m.metrics or []:
            if metric.key == "val/JF":
                by_step[metric.step] = metric.value
        assert m.source_run_id == run.info.run_id
    assert sorted(by_step) == [3, 6] and all(0 <= v <= 1 for v in by_step.values())
    # Old checkpoints are purged (keep_last=2), every kept one is complete.
    kept = sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000003", "iter_0000006"]
    assert all((full_run / "checkpoints" / k / "COMPLETE").is_file() for k in kept)

    champ = select("e2e", "val/J&F", tracking_uri=uri)
    assert champ.score == pytest.approx(max(by_step.values()))
    version = client.get_model_version_by_alias(champ.registered_name, "champion")
    assert str(version.version) == champ.version


@pytest.mark.timeout(600)
def test_resume_reproduces_the_uninterrupted_losses(data, full_run, tmp_path):
    out = tmp_path / "stopped"
    launch(2, overrides(data, out, f"train.stop_after={STOP_AT}"))
    assert max(losses(out)) == STOP_AT
    proc = launch(2, overrides(data, out), launcher="torchrun")  # the relaunch resumes (any launcher)
    assert f"resumed from {out / 'checkpoints' / 'iter_0000003'}" in proc.stdout + proc.stderr
    ref, resumed = losses(full_run), losses(out)
    assert sorted(resumed) == list(range(1, ITERATIONS + 1))
    for it in range(STOP_AT + 1, ITERATIONS + 1):
        for key in ref[it]:
            if key.startswith("loss/") or key == "total_loss":
                assert resumed[it][key] == pytest.approx(ref[it][key], abs=1e-5), (it, key)
    runs = json.loads((out / "run_info.json").read_text())
    assert runs["resumed_from"].endswith("iter_0000003")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])  # the same run continued
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))


@pytest.mark.timeout(600)
def test_global_batch_is_the_same_with_one_and_two_ranks(data, full_run, tmp_path):
    out = tmp_path / "one"
    launch(1, overrides(data, out, "train.iterations=2", "validation.every=0"), launcher="torchrun")
    one = json.loads((out / "run_info.json").read_text())
    two = json.loads((full_run / "run_info.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["engine_train_batch_size"] == two["engine_train_batch_size"] == 4
    assert one["micro_batch"] * one["accumulation"] == 4 and two["micro_batch"] * two["accumulation"] == 2
    assert all(r["clips"] == 4 for r in losses(out).values())  # clips actually consumed per optimizer step
    assert all(r["clips"] == 4 for r in losses(full_run).values())
