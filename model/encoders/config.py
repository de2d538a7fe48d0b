"""The `pixel_encoder:` block of a model YAML, parsed and checked before anything is built.

A wrong key or value fails here, at start-up, with the key named; nothing downstream re-checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENCODER_TYPES = ("resnet50", "resnet18", "vit", "vit_spatial", "vit_spatial_semantic")
VIT_TYPES = ("vit", "vit_spatial", "vit_spatial_semantic")
SPATIAL_TYPES = ("vit_spatial", "vit_spatial_semantic")

# Which keys each encoder type accepts; anything else is a config error.
_COMMON_KEYS = {"type", "init", "weights"}
_VIT_KEYS = _COMMON_KEYS | {"vit", "block_groups", "freeze_vit"}
_SPATIAL_KEYS = _VIT_KEYS | {"spatial_dim", "deform", "ffn_ratio", "extra_blocks"}
ALLOWED_KEYS = {
    "resnet50": _COMMON_KEYS,
    "resnet18": _COMMON_KEYS,
    "vit": _VIT_KEYS,
    "vit_spatial": _SPATIAL_KEYS,
    "vit_spatial_semantic": _SPATIAL_KEYS | {"semantic_heads"},
}
_VIT_SUBKEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio")
_DEFORM_SUBKEYS = ("heads", "points")


@dataclass(frozen=True)
class ViTShape:
    """Size of the ViT. Defaults: DINOv2 / Depth-Anything ViT-B/14."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DeformableAttentionShape:
    """Multi-scale deformable attention from the base features into the ViT tokens (one level)."""

    heads: int = 12
    points: int = 4


@dataclass(frozen=True)
class PixelEncoderConfig:
    type: str
    init: str
    weights: str | None = None
    vit: ViTShape = field(default_factory=ViTShape)
    block_groups: tuple[tuple[int, int], ...] = ()
    freeze_vit: bool = True
    spatial_dim: int = 64
    deform: DeformableAttentionShape = field(default_factory=DeformableAttentionShape)
    ffn_ratio: float = 0.25
    extra_blocks: int = 2
    semantic_heads: int | None = None

    @property
    def is_vit(self) -> bool:
        return self.type in VIT_TYPES

    @property
    def has_spatial(self) -> bool:
        return self.type in SPATIAL_TYPES

    @property
    def has_semantic(self) -> bool:
        return self.type == "vit_spatial_semantic"


def _fail(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"pixel_encoder.{key}={value!r}: {why}")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(key, value, "expected a positive integer")
    return value


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(key, value, "expected a positive number")
    return float(value)


def _sub_mapping(key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(key, value, f"expected a mapping with keys {list(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"pixel_encoder.{key}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return dict(value)


def default_block_groups(depth: int) -> tuple[tuple[int, int], ...]:
    """Split `depth` blocks into 4 contiguous groups of equal size ([[0,2],[3,5],[6,8],[9,11]] for 12)."""
    if depth % 4:
        raise _fail("vit.depth", depth, "must be a multiple of 4 unless block_groups is given")
    size = depth // 4
    return tuple((i * size, (i + 1) * size - 1) for i in range(4))


def _parse_block_groups(value: Any, depth: int) -> tuple[tuple[int, int], ...]:
    groups = []
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _fail("block_groups", value, "expected 4 [first, last] block ranges")
    for group in value:
        if (
            not isinstance(group, (list, tuple))
            or len(group) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in group)
        ):
            raise _fail("block_groups", value, f"group {group!r} is not a [first, last] pair of ints")
        groups.append((group[0], group[1]))
    expected_first = 0
    for first, last in groups:
        if first != expected_first or last < first:
            raise _fail("block_groups", value, "groups must be contiguous, non-empty and start at block 0")
        expected_first = last + 1
    if expected_first != depth:
        raise _fail("block_groups", value, f"groups must cover blocks 0..{depth - 1} (vit.depth={depth})")
    return tuple(groups)


def parse_pixel_encoder_config(raw: Mapping[str, Any] | PixelEncoderConfig) -> PixelEncoderConfig:
    """Check the `pixel_encoder:` mapping and return it typed. Raises ValueError naming the bad key."""
    if isinstance(raw, PixelEncoderConfig):
        return raw
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, Mapping):
        raise ValueError(f"pixel_encoder: expected a mapping, got {type(raw).__name__}")
    if "type" not in raw:
        raise ValueError(f"pixel_encoder.type is required (one of {list(ENCODER_TYPES)})")
    kind = raw["type"]
    if kind not in ENCODER_TYPES:
        raise _fail("type", kind, f"expected one of {list(ENCODER_TYPES)}")
    unknown = sorted(set(raw) - ALLOWED_KEYS[kind])
    if unknown:
        raise ValueError(
            f"pixel_encoder: unknown key(s) {unknown} for type {kind!r}; allowed: {sorted(ALLOWED_KEYS[kind])}"
        )

    init = raw.get("init")
    if init not in ("file", "random"):
        raise _fail("init", init, "expected 'file' (load `weights`) or 'random' (tests and demo only)")
    weights = raw.get("weights")
    if init == "file" and (not isinstance(weights, str) or not weights):
        raise _fail("weights", weights, "init: file needs a weights path")
    if init == "random" and weights is not None:
        raise _fail("weights", weights, "init: random must not name a weights file (use init: file)")

    values: dict[str, Any] = {"type": kind, "init": init, "weights": weights}
    if kind in VIT_TYPES:
        vit = ViTShape()
        if "vit" in raw:
            sub = _sub_mapping("vit", raw["vit"], _VIT_SUBKEYS)
            missing = [k for k in _VIT_SUBKEYS if k not in sub]
            if missing:
                raise ValueError(f"pixel_encoder.vit: missing key(s) {missing}")
            vit = ViTShape(
                embed_dim=_positive_int("vit.embed_dim", sub["embed_dim"]),
                depth=_positive_int("vit.depth", sub["depth"]),
                num_heads=_positive_int("vit.num_heads", sub["num_heads"]),
                mlp_ratio=_positive_float("vit.mlp_ratio", sub["mlp_ratio"]),
            )
        if vit.embed_dim % vit.num_heads:
            raise _fail("vit.num_heads", vit.num_heads, f"must divide vit.embed_dim={vit.embed_dim}")
        values["vit"] = vit
        if "block_groups" in raw:
            values["block_groups"] = _parse_block_groups(raw["block_groups"], vit.depth)
        else:
            values["block_groups"] = default_block_groups(vit.depth)
        freeze = raw.get("freeze_vit", True)
        if not isinstance(freeze, bool):
            raise _fail("freeze_vit", freeze, "expected true or false")
        values["freeze_vit"] = freeze

    if kind in SPATIAL_TYPES:
        values["spatial_dim"] = _positive_int("spatial_dim", raw.get("spatial_dim", 64))
        deform = DeformableAttentionShape()
        if "deform" in raw:
            sub = _sub_mapping("deform", raw["deform"], _DEFORM_SUBKEYS)
            deform = DeformableAttentionShape(
                heads=_positive_int("deform.heads", sub.get("heads", deform.heads)),
                points=_positive_int("deform.points", sub.get("points", deform.points)),
            )
        if values["vit"].embed_dim % deform.heads:
            raise _fail("deform.heads", deform.heads, f"must divide vit.embed_dim={values['vit'].embed_dim}")
        values["deform"] = deform
        ratio = _positive_float("ffn_ratio", raw.get("ffn_ratio", 0.25))
        if int(values["vit"].embed_dim * ratio) < 1:
            raise _fail("ffn_ratio", ratio, "gives an empty ConvFFN hidden layer")
        values["ffn_ratio"] = ratio
        extra = raw.get("extra_blocks", 2)
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise _fail("extra_blocks", extra, "expected an integer >= 0")
        values["extra_blocks"] = extra

    if kind == "vit_spatial_semantic":
        heads = raw.get("semantic_heads")
        heads = values["vit"].num_heads if heads is None else _positive_int("semantic_heads", heads)
        if values["vit"].embed_dim % heads:
            raise _fail("semantic_heads", heads, f"must divide vit.embed_dim={values['vit'].embed_dim}")
        values["semantic_heads"] = heads
    return PixelEncoderConfig(**values)
