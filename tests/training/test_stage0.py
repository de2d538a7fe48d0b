"""Stage 0 → main training, end to end on CPU with the real components: the synthetic static image sets → the Ray
shard job (kind: static) → the pseudo-video loader → a few stage-0 iterations (DeepSpeed, MLflow, a validated
checkpoint with its logged model) → main training on the video shards started from stage 0's consolidated weights.

Checked: the main run's MLflow tags name the stage-0 run, its iteration and its logged model; the weights the
main run's first iteration sees equal stage 0's final weights for every tensor (and differ from what the same seed
gives without `model.init_from`); a main run without stage 0 says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import demo

ROOT = Path(__file__).resolve().parents[2]
STATIC_CONFIG = ROOT / "training" / "configs" / "demo_cpu_static.yaml"
MAIN_CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
PROBE = ROOT / "tests" / "training" / "init_probe.py"
STAGE0_ITERATIONS = 3
pytestmark = [pytest.mark.slow]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc


def _common(data: Path, out: Path, db: Path) -> list[str]:
    return [f"output_dir={out}", f"validation.root={data / 'data' / 'DAVIS'}", f"tracking.tracking_uri=sqlite:///{db}",
            "data.num_workers=0", "data.crop_size=64", "train.global_batch=2", "tracking.log_every=1",
            "tracking.system_metrics=false", "validation.max_sequences=1", "validation.size=64",
            "validation.overlays=1"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, demo_data):
    """Data for both stages, stage 0 run to its end, then main training from its weights through the probe."""
    root = tmp_path_factory.mktemp("stage0")
    (root / "data").symlink_to(demo_data / "data")  # the session's synthetic sets (static ones included), read-only
    (root / "shards").symlink_to(demo_data / "shards")
    demo.make_static_shards(root, env=_env())
    db = root / "mlflow.db"
    s0 = root / "stage0"
    _run([sys.executable, "training/train.py", "--config", str(STATIC_CONFIG), *_common(root, s0, db),
          f"data.shards={root / 'static_shards'}", f"train.iterations={STAGE0_ITERATIONS}",
          f"validation.every={STAGE0_ITERATIONS}", f"checkpoint.every={STAGE0_ITERATIONS}"])
    weights = s0 / "weights" / f"iter_{STAGE0_ITERATIONS:07d}.pt"
    main = root / "main"
    first = root / "first_iteration.pt"
    _run([sys.executable, str(PROBE), str(first), "--config", str(MAIN_CONFIG), *_common(root, main, db),
          f"data.shards={root / 'shards'}", f"model.init_from={weights}", "train.iterations=2",
          "validation.every=0", "checkpoint.every=2"])
    return {"root": root, "db": db, "stage0": s0, "weights": weights, "main": main, "first": first}


def _run_of(db: Path, out: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = json.loads((out / "run_info.json").read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


def test_stage0_trains_on_pseudo_videos_and_logs_a_model(stages):
    from training.train import read_loss_log

    losses = read_loss_log(stages["stage0"])
    assert [r["iteration"] for r in losses] == list(range(1, STAGE0_ITERATIONS + 1))
    assert stages["weights"].is_file()
    client, run = _run_of(stages["db"], stages["stage0"])
    assert run.data.tags["s3vos.stage"] == "static-pretraining"
    assert run.data.params["data.kind"] == "static"
    assert run.data.params["data.num_frames"] == "3" and run.data.params["data.num_ref_frames"] == "2"
    manifest = json.loads((stages["root"] / "static_shards" / "manifest.json").read_text())
    assert run.data.params["data/num_clips"] == str(manifest["num_clips"])
    logged = [json.loads(x) for x in (stages["stage0"] / "logged_models.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [STAGE0_ITERATIONS] and logged[0]["model_uri"].startswith("models:/")


def test_main_run_names_the_stage0_run_and_model(stages):
    _, s0 = _run_of(stages["db"], stages["stage0"])
    _, main = _run_of(stages["db"], stages["main"])
    tags = main.data.tags
    logged = json.loads((stages["stage0"] / "logged_models.jsonl").read_text().splitlines()[0])
    assert tags["s3vos.stage"] == "main-training"
    assert tags["s3vos.stage0"] == f"run {s0.info.run_id}, iteration {STAGE0_ITERATIONS}"
    assert tags["s3vos.init_from.run_id"] == s0.info.run_id
    assert tags["s3vos.init_from.model_uri"] == logged["model_uri"]
    assert tags["s3vos.init_from.iteration"] == str(STAGE0_ITERATIONS)
    assert tags["s3vos.init_from"] == str(stages["weights"].resolve())
    import hashlib

    assert tags["s3vos.init_from.sha256"] == hashlib.sha256(stages["weights"].read_bytes()).hexdigest()
    from training.train import read_loss_log

    assert [r["iteration"] for r in read_loss_log(stages["main"])] == [1, 2]  # and main training went on


def test_first_iteration_weights_are_stage0_final_weights(stages):
    final = torch.load(stages["weights"], map_location="cpu", weights_only=True)
    first = torch.load(stages["first"], map_location="cpu", weights_only=True)
    assert set(final) == set(first)  # the same network: every module is shared
    for k, v in final.items():
        assert torch.equal(first[k], v), k
    # and the check has teeth: the same seed without model.init_from gives other weights
    import model as m
    from model.config import load_model_config
    from training.config import load_config

    cfg = load_config(MAIN_CONFIG, [f"data.shards={stages['root'] / 'shards'}",
                                    f"validation.root={stages['root'] / 'data' / 'DAVIS'}"])
    d = cfg.data
    torch.manual_seed(cfg.train.seed)
    net = m.build_network(load_model_config(cfg.model.name, {"num_frames": d.num_frames, "num_ref_frames":
                                                             d.num_ref_frames, "num_objects": d.num_objects}))
    fresh = net.state_dict()
    differ = [k for k, v in final.items() if v.is_floating_point() and not torch.equal(fresh[k], v)]
    assert len(differ) > len(final) // 2


def test_main_run_without_stage0_says_it_was_skipped(stages, tmp_path):
    from training.config import load_config
    from training.lineage import run_tags

    root = stages["root"]
    cfg = load_config(MAIN_CONFIG, [f"data.shards={root / 'shards'}", f"validation.root={root / 'data' / 'DAVIS'}"])
    assert run_tags(cfg) == {"s3vos.stage": "main-training", "s3vos.stage0": "skipped (no model.init_from)"}
    # a file that is not a stage-0 output (no run folder around it): said so, with its hash
    other = tmp_path / "cutie.pth"
    other.write_bytes(stages["weights"].read_bytes())
    cfg = load_config(MAIN_CONFIG, [f"data.shards={root / 'shards'}", f"validation.root={root / 'data' / 'DAVIS'}",
                                    f"model.init_from={other}"])
    tags = run_tags(cfg)
    assert tags["s3vos.stage0"].startswith("not used (model.init_from is not a stage-0 output")
    assert "s3vos.init_from.run_id" not in tags
    # a main-training run's weights as init_from: named, and not called stage 0
    main_weights = stages["main"] / "weights"
    main_weights.mkdir(exist_ok=True)
    (main_weights / "iter_0000002.pt").write_bytes(stages["weights"].read_bytes())
    cfg = load_config(MAIN_CONFIG, [f"data.shards={root / 'shards'}", f"validation.root={root / 'data' / 'DAVIS'}",
                                    f"model.init_from={main_weights / 'iter_0000002.pt'}"])
    tags = run_tags(cfg)
    _, main = _run_of(stages["db"], stages["main"])
    assert tags["s3vos.stage0"] == f"not used (model.init_from comes from run {main.info.run_id}, a video run)"
