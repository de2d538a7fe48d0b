"""Model configuration: one YAML per row of the paper (`model/configs/<name>.yaml`), typed and checked.

    cfg = load_model_config("s3", {"num_objects": 2, "pixel_encoder": {"init": "random", "weights": None}})

Every key is checked at load time: an unknown key or a value of the wrong type raises `ValueError` naming the
key (e.g. `object_transformer.num_blocks`). The `pixel_encoder:` mapping is passed through to
`model.encoders.build_pixel_encoder` and validated there (also at load time). Overrides are merged key by key
into nested mappings (`{"pixel_encoder": {"init": "random"}}` changes only `init`). The dataclass round-trips:
`load_model_config(path_of(yaml.dump(dataclasses.asdict(cfg))))` gives back an equal config.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_NAMES = ("s3", "cutie_base", "cutie_dq", "cutie_dq_vit", "cutie_dq_vit_spatial", "tiny")


@dataclass
class MaskEncoderConfig:
    """Cutie's mask encoder: a ResNet-18 (layers 1-3) on [image, mask, other objects] (5 channels)."""

    type: str = "resnet18"
    # ImageNet ResNet-18 state dict (timm / torchvision names) for the RGB part of conv1 and layers 1-3; the two
    # extra input channels are initialised orthogonally, as Cutie does. None = random initialisation.
    weights: str | None = None


@dataclass
class ObjectTransformerConfig:
    num_blocks: int = 3
    num_queries: int = 16
    num_heads: int = 8
    ff_dim: int = 2048
    # S3's discriminative query (spec 2.3): the queries read the argmax pixel instead of a softmax average.
    discriminative_query: bool = False


@dataclass
class LossConfig:
    """Point-sampled CE + soft Dice (PointRend uncertainty sampling) and the auxiliary loss weights."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    aux_sensory_weight: float = 0.01
    aux_query_weight: float = 0.01


@dataclass
class ModelConfig:
    name: str
    pixel_encoder: dict[str, Any]
    drop_path: float = 0.0  # on the trainable residual branches of the spatial-semantic encoder
    pixel_dim: int = 256
    key_dim: int = 64
    value_dim: int = 256
    sensory_dim: int = 256
    embed_dim: int = 256
    pixel_pe_scale: float = 32.0
    pixel_pe_temperature: float = 128.0
    mask_encoder: MaskEncoderConfig = field(default_factory=MaskEncoderConfig)
    object_transformer: ObjectTransformerConfig = field(default_factory=ObjectTransformerConfig)
    summarizer_add_pe: bool = True
    decoder_up_dims: list[int] = field(default_factory=lambda: [256, 128, 128])
    loss: LossConfig = field(default_factory=LossConfig)
    # the 8-frame clip forward (spec section 3)
    num_frames: int = 8
    num_ref_frames: int = 3
    num_objects: int = 3
    deep_update_prob: float = 0.2
    pad_to: int = 32  # inputs are padded to a multiple of this (the spatial-semantic encoder needs 32, ResNets 16)
    # settings handed to model.inference.InferenceConfig (checked there); empty = its defaults
    inference: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_type(self) -> str:
        return str(self.pixel_encoder["type"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ checking
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        return copy.deepcopy(dict(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a bug in this file, not in a config


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in raw if k not in names)
    if unknown:
        raise ValueError(f"unknown model config key(s) {[prefix + k for k in unknown]}; allowed: {names}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _check_value(prefix + f.name, raw[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"model config key {prefix + f.name} is required")
    return cls(**values)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"model config {key}={value!r}: {why}")


def validate(cfg: ModelConfig) -> None:
    """Cross-field checks (shapes that must agree). Raises ValueError naming the key."""
    for key in ("pixel_dim", "key_dim", "value_dim", "sensory_dim", "embed_dim", "num_frames", "num_objects",
                "pad_to"):
        _require(getattr(cfg, key) > 0, key, getattr(cfg, key), "must be positive")
    _require(cfg.num_frames >= 2, "num_frames", cfg.num_frames, "a clip needs at least 2 frames")
    _require(cfg.num_ref_frames >= 1, "num_ref_frames", cfg.num_ref_frames, "must be >= 1")
    _require(0.0 <= cfg.drop_path < 1.0, "drop_path", cfg.drop_path, "expected a rate in [0, 1)")
    _require(0.0 <= cfg.deep_update_prob <= 1.0, "deep_update_prob", cfg.deep_update_prob, "expected [0, 1]")
    need = 16 if cfg.encoder_type.startswith("resnet") else 32
    _require(cfg.pad_to % need == 0, "pad_to", cfg.pad_to,
             f"must be a multiple of {need} (the {cfg.encoder_type} encoder's coarsest grid)")
    _require(cfg.mask_encoder.type == "resnet18", "mask_encoder.type", cfg.mask_encoder.type,
             "only resnet18 (Cutie's mask encoder) is implemented")
    ot = cfg.object_transformer
    _require(ot.num_blocks >= 1, "object_transformer.num_blocks", ot.num_blocks, "must be >= 1")
    _require(ot.num_queries >= 2 and ot.num_queries % 2 == 0, "object_transformer.num_queries", ot.num_queries,
             "must be even (half foreground, half background queries)")
    _require(ot.num_heads >= 1 and cfg.embed_dim % ot.num_heads == 0, "object_transformer.num_heads",
             ot.num_heads, f"must divide embed_dim={cfg.embed_dim}")
    _require(ot.ff_dim > 0, "object_transformer.ff_dim", ot.ff_dim, "must be positive")
    _require(cfg.pixel_dim == cfg.embed_dim, "pixel_dim", cfg.pixel_dim,
             f"must equal embed_dim={cfg.embed_dim} (the sensory aux head projects onto the pixel features)")
    _require(len(cfg.decoder_up_dims) == 3 and all(d > 0 for d in cfg.decoder_up_dims), "decoder_up_dims",
             cfg.decoder_up_dims, "expected 3 positive channel counts (strides 16, 8, 4)")
    _require(cfg.decoder_up_dims[0] == cfg.embed_dim, "decoder_up_dims", cfg.decoder_up_dims,
             f"the first entry must equal embed_dim={cfg.embed_dim}")
    loss = cfg.loss
    _require(loss.num_points > 0, "loss.num_points", loss.num_points, "must be positive")
    _require(loss.oversample_ratio >= 1, "loss.oversample_ratio", loss.oversample_ratio, "must be >= 1")
    _require(0 <= loss.importance_sample_ratio <= 1, "loss.importance_sample_ratio", loss.importance_sample_ratio,
             "expected [0, 1]")
    for key in ("aux_sensory_weight", "aux_query_weight"):
        _require(getattr(loss, key) >= 0, f"loss.{key}", getattr(loss, key), "must be >= 0")

    from model.encoders.config import parse_pixel_encoder_config

    parse_pixel_encoder_config(cfg.pixel_encoder)  # raises ValueError naming pixel_encoder.<key>
    if cfg.inference:
        from model.inference.config import InferenceConfig

        InferenceConfig.from_any({"inference": cfg.inference})


# ------------------------------------------------------------------------------------------------ loading
def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"model config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model config {str(name_or_path)!r}: expected one of {names} or a YAML path")
    return candidate


def model_config_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                           source: str = "<dict>") -> ModelConfig:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: a model config must be a mapping, got {type(raw).__name__}")
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ValueError(f"model config overrides must be a mapping, got {type(overrides).__name__}")
        raw = _merge(dict(raw), overrides)
    try:
        cfg = _build(ModelConfig, raw)
        validate(cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


def load_model_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Read `model/configs/<name>.yaml` (or a YAML/JSON path), apply `overrides` (nested merge), check it."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if isinstance(raw, Mapping) and "name" not in raw:
        raw = {"name": path.stem, **raw}
    return model_config_from_dict(raw, overrides, source=str(path))
