"""`make demo`: the whole pipeline on the embedded defaults, on one machine.

    DEMO_DIR=demo_out python -m training.demo

synthesize the five datasets and the six static image sets → shard them with the Ray job on a local Ray → stage 0:
pre-train `demo_cpu_static.yaml` on 3-frame pseudo-videos of the static images → main training: `demo_cpu.yaml`
started from stage 0's final weights, both with the `deepspeed` launcher on 2 CPU ranks (ZeRO-2), validating
checkpoints into MLflow → select the champion → score it on the synthetic DAVIS val split next to the
copy-the-first-mask baseline and the same model untrained → print a summary (with the `mlflow ui` command) and write
DEMO_DIR/summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import model  # noqa: F401  (torchvision shim before anything imports timm)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
STATIC_CONFIG = ROOT / "training" / "configs" / "demo_cpu_static.yaml"
SHARD_CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"
STATIC_SHARD_CONFIG = ROOT / "data_pipeline" / "configs" / "static_demo.yaml"
EXPERIMENT = "s3-demo"
STATIC_EXPERIMENT = "s3-demo-static"


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo keeps its MLflow database inside DEMO_DIR
    return env


def count_clips(shards: Path) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    for key in ("clips_written", "total_clips", "clips"):
        if isinstance(manifest.get(key), int):
            return manifest[key]
    return sum(json.loads(p.read_text()).get("clips", 0) for p in shards.glob("skip*/*.stats.json"))


def train_overrides(demo: Path) -> list[str]:
    return [f"output_dir={demo / 'train'}", f"data.shards={demo / 'shards'}",
            f"validation.root={demo / 'data' / 'DAVIS'}", f"tracking.tracking_uri=sqlite:///{demo / 'mlflow.db'}",
            f"tracking.experiment={EXPERIMENT}"]


def static_overrides(demo: Path) -> list[str]:
    return [f"output_dir={demo / 'train_static'}", f"data.shards={demo / 'static_shards'}",
            f"validation.root={demo / 'data' / 'DAVIS'}", f"tracking.tracking_uri=sqlite:///{demo / 'mlflow.db'}",
            f"tracking.experiment={STATIC_EXPERIMENT}"]


def stage0_weights(demo: Path) -> Path:
    """The consolidated weights of stage 0's last iteration (its validation at the end writes them)."""
    from training.config import load_config

    iterations = load_config(STATIC_CONFIG, static_overrides(demo), check_paths=False).train.iterations
    return demo / "train_static" / "weights" / f"iter_{iterations:07d}.pt"


def run_training(demo: Path, env: dict[str, str], extra: list[str] | None = None, static: bool = False) -> None:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    config, overrides = (STATIC_CONFIG, static_overrides(demo)) if static else (CONFIG, train_overrides(demo))
    _run([deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "training/train.py",
          "--config", str(config), *overrides, *(extra or [])], env=env)


def champion_weights(alias_uri: str, tracking_uri: str, dest: Path) -> Path:
    """Download the champion LoggedModel and return the consolidated weights file stored with it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=alias_uri, dst_path=str(dest)))
    found = sorted(local.rglob("iter_*.pt"))
    if not found:
        raise FileNotFoundError(f"no consolidated weights (iter_*.pt) in the artifacts of {alias_uri}")
    return found[0]


def score_network(weights: Path | None, demo: Path, name: str) -> dict:
    """J&F on the synthetic DAVIS val split of the tiny model: trained (weights) or untrained (None)."""
    import torch

    from model.config import load_model_config
    from training.checkpoint import load_weights
    from training.config import load_config
    from training.evaluate import evaluate_network

    cfg = load_config(CONFIG, train_overrides(demo))
    d = cfg.data
    overrides = {"num_frames": d.num_frames, "num_ref_frames": d.num_ref_frames, "num_objects": d.num_objects}
    overrides.update(cfg.model.overrides)
    torch.manual_seed(cfg.train.seed)  # the very initial weights the training run started from
    network = model.build_network(load_model_config(cfg.model.name, overrides))
    if weights is not None:
        load_weights(network, weights)
    network.eval()
    return evaluate_network(network, str(demo / "data" / "DAVIS"), split="val", size=cfg.validation.size,
                            out_dir=demo / "eval" / name, overwrite=True)


# Test-sized training (tests/training): the same demo config, a smaller crop, so a launch takes seconds.
SMALL_TRAIN = ["data.crop_size=64"]


def make_data(root: Path, small: bool = False, env: dict[str, str] | None = None) -> int:
    """Synthesize the five datasets under root/data, shard them with the Ray job into root/shards; clip count.

    Both steps are resumable: a rerun keeps finished datasets and shards.
    """
    env = env or _env()
    if not (root / "data" / "DAVIS").is_dir():
        cmd = [sys.executable, "-m", "data_pipeline.synth", "--out", str(root / "data"), "--seed", "0"]
        _run(cmd + (["--small"] if small else []), env=env)
    _run([sys.executable, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root",
          str(root / "data"), "--out", str(root / "shards")], env=env)
    return count_clips(root / "shards")


def make_static_shards(root: Path, env: dict[str, str] | None = None) -> int:
    """Shard the synthetic static image sets (root/data/static, written by synth) into root/static_shards with the
    Ray job (kind: static); the number of samples. Resumable like make_data."""
    env = env or _env()
    if not (root / "data" / "static").is_dir():
        _run([sys.executable, "-m", "data_pipeline.synth", "--out", str(root / "data"), "--seed", "0",
              "--only-static"], env=env)
    _run([sys.executable, "-m", "data_pipeline.shard", "--config", str(STATIC_SHARD_CONFIG), "--data-root",
          str(root / "data" / "static"), "--out", str(root / "static_shards")], env=env)
    return json.loads((root / "static_shards" / "manifest.json").read_text())["num_clips"]


def main() -> int:
    demo = Path(os.environ.get("DEMO_DIR", "demo_out")).resolve()
    demo.mkdir(parents=True, exist_ok=True)
    env = _env()
    t_all = time.time()
    times: dict[str, float] = {}

    t = _step("1-2/6 synthesize the five datasets and the static image sets in their native layouts, shard them "
              "with the Ray job")
    clips = make_data(demo, env=env)
    static_samples = make_static_shards(demo, env=env)
    times["data_s"] = time.time() - t

    t = _step("3/6 stage 0: pre-train demo_cpu_static.yaml on 3-frame pseudo-videos of the static images")
    run_training(demo, env, static=True)  # a rerun resumes (or returns at once when done)
    times["stage0_s"] = time.time() - t

    t = _step("4/6 main training: demo_cpu.yaml from stage 0's weights; deepspeed, 2 CPU ranks, ZeRO-2, validation "
              "into MLflow")
    init = stage0_weights(demo)
    run_training(demo, env, [f"model.init_from={init}"])  # a rerun resumes from the last complete checkpoint
    times["train_s"] = time.time() - t

    t = _step("5/6 select the champion checkpoint in MLflow")
    from training.select import select

    tracking_uri = f"sqlite:///{demo / 'mlflow.db'}"
    champ = select(EXPERIMENT, "val/J&F", tracking_uri=tracking_uri)
    print(f"champion: {champ.alias_uri} = {champ.logged_model_uri} (iteration {champ.iteration}, "
          f"val/J&F {champ.score:.4f})")
    times["select_s"] = time.time() - t

    t = _step("6/6 evaluate the champion, the untrained model and the copy-first-mask baseline")
    dl = demo / "eval" / "champion_download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    weights = champion_weights(champ.alias_uri, tracking_uri, dl)
    trained = score_network(weights, demo, "champion")
    untrained = score_network(None, demo, "untrained")
    from training.evaluate import copy_first_mask_baseline

    baseline = copy_first_mask_baseline(demo / "data" / "DAVIS", demo / "eval" / "copy_first_mask")
    times["evaluate_s"] = time.time() - t

    from training.train import read_loss_log

    losses = read_loss_log(demo / "train")
    stage0 = read_loss_log(demo / "train_static")
    stage0_val = _last_validation(demo / "train_static")
    lineage = json.loads((demo / "train" / "run_info.json").read_text()).get("lineage", {})
    summary = {
        "demo_dir": str(demo),
        "clips_written": clips,
        "static_samples_written": static_samples,
        "stage0_iterations": stage0[-1]["iteration"] if stage0 else 0,
        "stage0_first_loss": stage0[0]["total_loss"] if stage0 else None,
        "stage0_last_loss": stage0[-1]["total_loss"] if stage0 else None,
        "stage0_val_JF": stage0_val.get("J&F-Mean"),
        "stage0_weights": str(init),
        "main_training_started_from": lineage.get("s3vos.stage0"),
        "iterations_trained": losses[-1]["iteration"] if losses else 0,
        "first_loss": losses[0]["total_loss"] if losses else None,
        "last_loss": losses[-1]["total_loss"] if losses else None,
        "champion_model_uri": champ.alias_uri,
        "champion_logged_model_uri": champ.logged_model_uri,
        "champion_iteration": champ.iteration,
        "champion_val_JF_logged": champ.score,
        "champion_val_JF": trained["J&F-Mean"],
        "champion_val_J": trained["J-Mean"],
        "champion_val_F": trained["F-Mean"],
        "untrained_val_JF": untrained["J&F-Mean"],
        "baseline_copy_first_mask_val_JF": baseline["J&F-Mean"],
        "champion_beats_baseline": trained["J&F-Mean"] > baseline["J&F-Mean"],
        "champion_beats_untrained": trained["J&F-Mean"] > untrained["J&F-Mean"],
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{demo / 'mlflow.db'} --host 127.0.0.1 --port 5000",
        "wall_seconds": round(time.time() - t_all, 1),
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
    }
    (demo / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== summary (" + str(demo / "summary.json") + ")")
    print(f"clips written        {summary['clips_written']} video clips, {static_samples} static-image samples")
    if stage0:
        print(f"stage 0              {summary['stage0_iterations']} iterations on pseudo-videos  (loss "
              f"{stage0[0]['total_loss']:.3f} → {stage0[-1]['total_loss']:.3f}; val J&F "
              f"{summary['stage0_val_JF'] if summary['stage0_val_JF'] is None else format(summary['stage0_val_JF'], '.4f')})")
    print(f"main training from   stage 0: {summary['main_training_started_from']}")
    if losses:
        print(f"iterations trained   {summary['iterations_trained']}  (loss {losses[0]['total_loss']:.3f} → "
              f"{losses[-1]['total_loss']:.3f})")
    print(f"champion             {champ.alias_uri}  (iteration {champ.iteration})")
    print(f"val J&F  champion (stage 0 + main) {trained['J&F-Mean']:.4f} | untrained {untrained['J&F-Mean']:.4f} | "
          f"copy-first-mask {baseline['J&F-Mean']:.4f}")
    print(f"wall time            {summary['wall_seconds']:.0f} s")
    print(f"browse the run:      .venv/bin/{summary['mlflow_ui']}")
    print("then open            http://127.0.0.1:5000/#/experiments?workflowType=machine_learning  (the sidebar's "
          "Model training view; README section 3)")
    return 0 if summary["champion_beats_baseline"] and summary["champion_beats_untrained"] else 1


def _last_validation(out: Path) -> dict:
    """The last scored validation record of a run (OUTPUT/validation.jsonl), {} when there is none."""
    path = out / "validation.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    scored = [r for r in records if "J&F-Mean" in r]
    return scored[-1] if scored else {}


if __name__ == "__main__":
    sys.exit(main())
