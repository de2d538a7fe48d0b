"""Where a run's starting weights came from, as MLflow tags: stage 0 (static images) → main training.

The release trains in two stages: pre-training on static images turned into pseudo-videos (data.kind=static,
training/configs/s3_pretrain_static.yaml), then main training on the video sets started from stage 0's final
weights (`model.init_from=`). Every run gets `s3vos.stage`; a main-training run also says what it started from:

    s3vos.stage                  static-pretraining | main-training
    s3vos.stage0                 run <run id>, iteration <N>      (main training from stage 0's weights)
                                 skipped (no model.init_from)     (main training from the backbone's weights only)
                                 not used (model.init_from is not a stage-0 output: ...)
    s3vos.init_from              the file's absolute path
    s3vos.init_from.sha256       its sha256
    s3vos.init_from.run_id       the MLflow run that wrote it, where known
    s3vos.init_from.model_uri    the logged model holding the same weights (models:/<id>), where known
    s3vos.init_from.iteration    the iteration it was taken at, where known

A file is known when it is one of ours: OUTPUT/weights/iter_NNNNNNN.pt of a run (OUTPUT/run_info.json names its
MLflow run, OUTPUT/config.yaml its data.kind, OUTPUT/logged_models.jsonl the logged model of that iteration), or
a logged model downloaded with `training.logged_model --download` (its MLmodel file names the run and the model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

STAGE = "s3vos.stage"
STAGE0 = "s3vos.stage0"
PREFIX = "s3vos.init_from"
STATIC, MAIN = "static-pretraining", "main-training"
_ITER = re.compile(r"iter_(\d+)")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _from_run_output(weights: Path) -> dict[str, Any]:
    """OUTPUT/weights/iter_N.pt of one of our runs: its run id, data kind, iteration and logged model."""
    out_dir = weights.parent.parent
    info = _read_json(out_dir / "run_info.json")
    if weights.parent.name != "weights" or info is None:
        return {}
    found: dict[str, Any] = {"run_id": info.get("mlflow_run_id"), "source": str(out_dir)}
    m = _ITER.fullmatch(weights.stem)
    if m:
        found["iteration"] = int(m.group(1))
    try:
        cfg = yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
        found["data_kind"] = (cfg.get("data") or {}).get("kind", "video")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    logged = out_dir / "logged_models.jsonl"
    if logged.is_file() and "iteration" in found:
        for line in logged.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("iteration") == found["iteration"] and rec.get("model_uri"):
                found["model_uri"] = rec["model_uri"]
    return found


def _from_logged_model(weights: Path) -> dict[str, Any]:
    """A downloaded logged model: the MLmodel file above the weights names its run and model id."""
    for folder in list(weights.parents)[:4]:
        mlmodel = folder / "MLmodel"
        if not mlmodel.is_file():
            continue
        try:
            meta = yaml.safe_load(mlmodel.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        found: dict[str, Any] = {"run_id": meta.get("run_id"), "source": str(folder)}
        if meta.get("model_id"):
            found["model_uri"] = f"models:/{meta['model_id']}"
        m = _ITER.fullmatch(weights.stem)
        if m:
            found["iteration"] = int(m.group(1))
        return found
    return {}


def source_of(init_from: str | Path) -> dict[str, Any]:
    """What is known of a `model.init_from` file: path, sha256, and where one of our runs wrote it, its run id,
    iteration, data kind and logged model."""
    from data_pipeline.loader import file_sha256

    path = Path(init_from).resolve()
    found = _from_run_output(path) or _from_logged_model(path)
    return {"path": str(path), "sha256": file_sha256(path), **{k: v for k, v in found.items() if v is not None}}


def source_kind(source: dict[str, Any], tracking=None) -> str | None:
    """The data.kind of the run that wrote the file: from its output folder, else from that run's s3vos.stage tag
    (`tracking`: an MlflowClient of the same server), else None."""
    if source.get("data_kind"):
        return source["data_kind"]
    if tracking is not None and source.get("run_id"):
        try:
            stage = tracking.get_run(source["run_id"]).data.tags.get(STAGE)
        except Exception:  # noqa: BLE001 - another server, a deleted run: unknown, said so in the tag
            return None
        return {STATIC: "static", MAIN: "video"}.get(stage)
    return None


def run_tags(cfg, tracking=None) -> dict[str, str]:
    """The lineage tags of a run of `cfg` (see the module docstring)."""
    if cfg.data.kind == "static":
        tags = {STAGE: STATIC}
    else:
        tags = {STAGE: MAIN}
    if not cfg.model.init_from:
        if cfg.data.kind != "static":
            tags[STAGE0] = "skipped (no model.init_from)"
        return tags
    src = source_of(cfg.model.init_from)
    tags[PREFIX] = src["path"]
    tags[f"{PREFIX}.sha256"] = src["sha256"]
    for key in ("run_id", "model_uri", "iteration"):
        if key in src:
            tags[f"{PREFIX}.{key}"] = str(src[key])
    if cfg.data.kind != "static":
        kind = source_kind(src, tracking)
        if kind == "static":
            where = f", iteration {src['iteration']}" if "iteration" in src else ""
            tags[STAGE0] = f"run {src.get('run_id')}{where}"
        elif kind is None and not src.get("run_id"):
            tags[STAGE0] = f"not used (model.init_from is not a stage-0 output of this project: {src['path']})"
        elif kind is None:
            tags[STAGE0] = f"unknown (model.init_from comes from run {src['run_id']}, whose stage is not known here)"
        else:
            tags[STAGE0] = f"not used (model.init_from comes from run {src.get('run_id')}, a {kind} run)"
    return tags
