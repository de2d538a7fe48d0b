"""Typed training configuration: YAML file + `key=value` overrides, validated before any heavy work starts.

Every section is a dataclass; a YAML key that no field declares, a value of the wrong type, a negative
learning rate, a missing data path or a global batch the world size cannot split stops the job at start-up
with a `ConfigError` that names the key and the reason (issue 9, "bad configuration").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline import storage


class ConfigError(ValueError):
    """A configuration problem, raised at start-up with the offending key in the message."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"config key '{key}': {reason}")
        self.key = key
        self.reason = reason


# Keys that say where and how a run is kept, not what it trains: a resume may change them without
# --allow-config-change, and they are left out of TrainConfig.hash().
OPERATIONAL_KEYS = ("output_dir", "train.stop_after", "checkpoint.dir", "checkpoint.load_universal",
                    "checkpoint.keep_last", "checkpoint.keep_weights", "checkpoint.every",
                    "validation.time_limit_minutes", "validation.overlays", "tracking.tracking_uri",
                    "tracking.log_every", "tracking.system_metrics", "tracking.system_metrics_interval",
                    "tracking.upload_retries", "tracking.run_name", "data.verify_shards", "data.loader.shard_cache")
# Keys added after runs were already written, with the value their absence meant: at that value they are left out
# of TrainConfig.hash() and a checkpoint's config without them reads as having it, so an earlier run resumes.
LATER_KEYS = {"data.kind": "video"}


@dataclass
class ModelSection:
    name: str = "s3"  # a YAML in model/configs/ or a path to one
    overrides: dict[str, Any] = field(default_factory=dict)  # passed to model.config.load_model_config
    init_from: str = ""  # a converted Cutie/S3 checkpoint: matching modules are loaded before training (reported)
    sync_batchnorm: bool = True  # BatchNorm statistics over all ranks when the world size is above 1 (as the release)


@dataclass
class DataSection:
    shards: str = ""  # root written by data_pipeline.shard (holds manifest.json, skip05/, skip10/, skip15/)
    kind: str = "video"  # "video" (main training) or "static" (stage 0: static-image shards in static/, pseudo-videos)
    num_frames: int = 8
    num_ref_frames: int = 3
    num_objects: int = 3
    crop_size: int = 480
    max_skip: list[int] = field(default_factory=lambda: [5, 10, 15, 5])
    max_skip_until: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.8, 1.0])
    num_workers: int = 2
    verify_shards: bool = False  # check each shard's sha256 (recorded in its stats.json) before the loader reads it
    loader: dict[str, Any] = field(default_factory=dict)  # extra knobs handed to the loader as they are


@dataclass
class OptimSection:
    lr: float = 5e-5  # paper; Cutie and the S3 release also use 5e-5
    weight_decay: float = 0.05  # paper; the S3 release used 0.001 (override optim.weight_decay=0.001)
    encoder_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad_norm: float = 3.0
    lr_milestones: list[float] = field(default_factory=lambda: [0.8, 0.92])  # fractions of train.iterations
    lr_gamma: float = 0.1
    scale_lr_with_batch: bool = False  # linear rule: lr × global_batch / 16 when the batch grows past 16


@dataclass
class TrainSection:
    iterations: int = 190_000
    global_batch: int = 16
    micro_batch: int = 0  # per rank per micro-step; 0 = as large as possible (per-rank share, capped)
    max_micro_batch: int = 4  # cap used when micro_batch is 0
    zero_stage: int = 2
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    seed: int = 42
    max_nonfinite_in_a_row: int = 20
    stop_after: int = 0  # >0: stop (as if preempted) after this iteration; for tests and manual splits


@dataclass
class CheckpointSection:
    every: int = 5000
    keep_last: int = 3
    dir: str = ""  # default OUTPUT/checkpoints
    load_universal: bool = False  # resume a universal checkpoint (cluster/deepspeed/to_universal.sh): any world size
    keep_weights: int = 3  # consolidated OUTPUT/weights/iter_*.pt kept on disk (the MLflow models keep their own)


@dataclass
class ValidationSection:
    every: int = 10_000  # 0 = never
    root: str = ""  # a DAVIS-format root (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)
    split: str = "val"
    size: int = 480
    max_sequences: int = 0  # 0 = all
    overlays: int = 4  # mask overlays of this many validation frames logged as images
    at_end: bool = True
    time_limit_minutes: float = 60.0  # a validation past this warns and is skipped (the job goes on); 0 = no limit


@dataclass
class TrackingSection:
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db
    experiment: str = "s3"
    run_name: str = ""
    log_every: int = 50
    system_metrics: bool = True
    system_metrics_interval: float = 10.0
    upload_retries: int = 3  # logged-model uploads (off the training path) retried this often before giving up


@dataclass
class TrainConfig:
    output_dir: str = "output/s3"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Hash of everything that defines what the run trains (not OPERATIONAL_KEYS): resumes check it."""
        d = {k: v for k, v in self.flat().items()
             if k not in OPERATIONAL_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------- parsing


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` where lossless (int → float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {tp}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(key, f"unsupported field type {tp}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{prefix}{k}", f"unknown key (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", raw[name], tp)
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, "an override must look like key=value (e.g. optim.lr=1e-4)")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "5e-5" as a string; users mean the number
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "is not a section")
    node[parts[-1]] = value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c.isdigit() for c in s)


def _normalise_numbers(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _normalise_numbers(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_normalise_numbers(v) for v in raw]
    if isinstance(raw, str) and _looks_numeric(raw) and any(c in raw for c in "eE"):
        return float(raw)
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, check_paths: bool = True
                ) -> TrainConfig:
    """Read the YAML, apply `key=value` overrides, type-check every key. Does not check the world size;
    `check_paths=False` leaves out the checks of files and folders (for reading a schedule only)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{p} is not valid YAML: {e}") from e
    raw = _normalise_numbers(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(TrainConfig, raw, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Value checks that types alone cannot express."""
    o, t, d, c, v = cfg.optim, cfg.train, cfg.data, cfg.checkpoint, cfg.validation
    if o.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.clip_grad_norm < 0:
        raise ConfigError("optim.clip_grad_norm", f"must be >= 0 (0 = off), got {o.clip_grad_norm}")
    if not 0 < o.lr_gamma <= 1:
        raise ConfigError("optim.lr_gamma", f"must be in (0, 1], got {o.lr_gamma}")
    if sorted(o.lr_milestones) != o.lr_milestones or any(not 0 < m < 1 for m in o.lr_milestones):
        raise ConfigError("optim.lr_milestones", f"must be increasing fractions in (0, 1), got {o.lr_milestones}")
    if len(o.betas) != 2 or any(not 0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    for key, val in (("train.iterations", t.iterations), ("train.global_batch", t.global_batch),
                     ("train.max_micro_batch", t.max_micro_batch), ("train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row),
                     ("checkpoint.every", c.every), ("checkpoint.keep_last", c.keep_last),
                     ("checkpoint.keep_weights", c.keep_weights),
                     ("tracking.log_every", cfg.tracking.log_every), ("data.num_frames", d.num_frames),
                     ("data.num_objects", d.num_objects), ("data.crop_size", d.crop_size)):
        if val <= 0:
            raise ConfigError(key, f"must be positive, got {val}")
    for key, val in (("train.micro_batch", t.micro_batch), ("train.stop_after", t.stop_after),
                     ("validation.every", v.every), ("data.num_workers", d.num_workers),
                     ("validation.time_limit_minutes", v.time_limit_minutes),
                     ("tracking.upload_retries", cfg.tracking.upload_retries)):
        if val < 0:
            raise ConfigError(key, f"must be >= 0, got {val}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError("train.precision", f"must be auto, bf16 or fp32, got {t.precision!r}")
    if len(d.max_skip) != len(d.max_skip_until) or not d.max_skip:
        raise ConfigError("data.max_skip_until", "needs one fraction per data.max_skip entry")
    if sorted(d.max_skip_until) != d.max_skip_until or d.max_skip_until[-1] != 1.0:
        raise ConfigError("data.max_skip_until", f"must increase and end at 1.0, got {d.max_skip_until}")
    if not 1 <= d.num_ref_frames < d.num_frames:
        raise ConfigError("data.num_ref_frames", f"must be in [1, num_frames), got {d.num_ref_frames}")
    if d.kind not in ("video", "static"):
        raise ConfigError("data.kind", f"must be video or static, got {d.kind!r}")
    if d.kind == "static" and d.num_objects != 1:
        raise ConfigError("data.num_objects", f"a static-image pseudo-video holds one object (Cutie's stage 0): set "
                                              f"data.num_objects=1, got {d.num_objects}")
    if not cfg.output_dir:
        raise ConfigError("output_dir", "must be set")
    if check_paths:
        if not d.shards:
            raise ConfigError("data.shards", "must point at the folder (or s3://, gs://, https://, pipe: root) "
                                             "written by data_pipeline.shard")
        levels = ["static"] if d.kind == "static" else [f"skip{skip:02d}" for skip in sorted(set(d.max_skip))]
        if storage.is_remote(d.shards):
            _check_remote_shards(d.shards, d.kind, levels)
        elif not Path(d.shards).is_dir():
            raise ConfigError("data.shards", f"folder not found: {d.shards}")
        # the loader's level folders (data_pipeline.loader.LoaderConfig.level_dir)
        for name in levels if not storage.is_remote(d.shards) else []:
            level = Path(d.shards) / name
            if d.kind == "video" and (Path(d.shards) / "static").is_dir() and not level.is_dir():
                raise ConfigError("data.shards", f"{d.shards} holds static-image shards (static/): set data.kind=static "
                                  "for stage 0, or point data.shards at the video shards")
            if not level.is_dir() or not any(level.glob("*.tar")):
                what = "is missing" if not level.is_dir() else "holds no .tar shard"
                why = "data.kind is static" if d.kind == "static" else f"data.max_skip has {int(name[4:])}"
                raise ConfigError("data.shards", f"{level} {what} ({why}); write the shards "
                                  "with `python -m data_pipeline.shard` first")
        if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
            raise ConfigError("model.init_from", f"file not found: {cfg.model.init_from}")
        if v.every and not v.root:
            raise ConfigError("validation.root", "must be set when validation.every > 0 (or set validation.every=0)")
        if v.every and not Path(v.root).is_dir():
            raise ConfigError("validation.root", f"folder not found: {v.root}")


def _check_remote_shards(url: str, kind: str, levels: list[str]) -> None:
    """A remote data.shards (s3://, gs://, http(s)://, pipe:) at start-up: its manifest.json is readable and lists
    shards in every level the curriculum reads (the loader lists a remote root by its manifest, never a bucket)."""
    try:
        store = storage.Store(url)
        manifest = store.read_json("manifest.json")
    except (OSError, ValueError) as e:  # FileNotFoundError, StorageError (a missing s3fs names the extra)
        raise ConfigError("data.shards", f"cannot read the shard manifest: {e} (a remote shard root is read "
                                         "through the manifest.json the shard job writes last)") from e
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, dict):
        raise ConfigError("data.shards", f"{store.url('manifest.json')} has no 'shards' table: rerun "
                                         "data_pipeline.shard")
    have = {r.split("/")[0] for r in shards if r.endswith(".tar")}
    for name in levels:
        if name not in have:
            if kind == "video" and "static" in have:
                raise ConfigError("data.shards", f"{url} holds static-image shards (static/): set data.kind=static "
                                  "for stage 0, or point data.shards at the video shards")
            why = "data.kind is static" if kind == "static" else f"data.max_skip has {int(name[4:])}"
            raise ConfigError("data.shards", f"{store.url('manifest.json')} lists no shard in {name}/ ({why}; "
                                             f"levels there: {sorted(have)})")


# ------------------------------------------------------------------------------------------ batch split


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int


def split_global_batch(cfg: TrainConfig, world_size: int) -> BatchSplit:
    """global_batch = micro_batch × accumulation × world_size, or a ConfigError saying what to change.

    Past 16 ranks the paper's batch of 16 cannot be split (each rank needs at least one clip): set
    train.global_batch to a multiple of the world size and, with optim.scale_lr_with_batch=true, the
    learning rate follows the linear rule lr × global_batch / 16.
    """
    g, t = cfg.train.global_batch, cfg.train
    if g % world_size:
        hint = (f"with {world_size} ranks set train.global_batch to a multiple of {world_size} "
                f"(e.g. {world_size * max(1, -(-g // world_size))}) and consider optim.scale_lr_with_batch=true")
        raise ConfigError("train.global_batch", f"{g} cannot be split over {world_size} ranks; {hint}")
    per_rank = g // world_size
    micro = t.micro_batch or max(m for m in range(1, min(per_rank, t.max_micro_batch) + 1) if per_rank % m == 0)
    if per_rank % micro:
        raise ConfigError("train.micro_batch", f"{micro} does not divide the per-rank batch {per_rank} "
                          f"(= global_batch {g} / {world_size} ranks)")
    return BatchSplit(g, micro, per_rank // micro, world_size)


def effective_lr(cfg: TrainConfig) -> float:
    if cfg.optim.scale_lr_with_batch:
        return cfg.optim.lr * cfg.train.global_batch / 16
    return cfg.optim.lr
