"""Load the ViT weights of a Depth-Anything (V1 or V2), DINOv2 or timm checkpoint into our stride-16 ViT.

Key mapping (spec section 7): Depth-Anything stores the ViT under `pretrained.` next to a `depth_head.*`
DPT head; DINOv2 / timm dicts store it at the top level. All other names already match timm's
`VisionTransformer`. We drop `mask_token` (unused by a ViT run without masking) and `depth_head.*`,
resize the 14×14 patch kernel to 16×16 (bilinear, align_corners=True, magnitude unchanged, as S3 does)
and keep the 37×37 `pos_embed` as it is (it is interpolated at run time).

Every ViT parameter must be present: a missing key raises instead of leaving random weights behind.
Unexpected keys raise too unless the caller allows them; either way the report lists them.
No download ever happens here; a missing file raises FileNotFoundError naming it.

`init_from_checkpoint` / `format_init_report` (the training config's `model.init_from=FILE`): start training from
a Cutie, S3-release or our checkpoint, loading every tensor whose name and shape match. FILE is a Cutie checkpoint,
an S3-release checkpoint or one of ours (a consolidated state dict, plain or under `weights` / `network` / `model`
/ `state_dict` / `module`). The layout is told from the names (`model.layouts.detect_layout`) and the official
names are renamed to ours with the layout's table; the layout's known-unused keys (e.g. DINOv2's `mask_token`)
are reported as unused. Unlike `model.convert`, nothing has to match completely: a Cutie-base file initialises
the memory network of an S3 network (its ResNet-50 pixel encoder finds no counterpart), and a network with
another object-transformer size keeps its own init there (reported as skipped shapes). It refuses (naming the
file) when the file is absent, unreadable, of no known layout, or when not a single tensor matches.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model.encoders.vit_backbone import interpolate_pos_embed
from model.layouts import OURS, detect_layout, get_layout

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("weights", "network", "model", "state_dict", "module")
DROPPED_KEYS = ("mask_token",)
DROPPED_PREFIXES = ("depth_head.",)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 with block_chunks > 0


@dataclass
class LoadReport:
    path: str
    layout: str  # "depth_anything" (V1 and V2 share it) or "vit" (plain DINOv2 / timm)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.path} ({self.layout} layout): loaded {len(self.loaded)} ViT tensors, "
            f"dropped {len(self.dropped)} non-ViT keys, resized {self.resized}, "
            f"missing {self.missing}, unexpected {self.unexpected}"
        )


def unwrap_state_dict(obj, where: str = "<state>") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the object itself, or under `weights` / `network` / `model` /
    `state_dict` / `module` (nested wrappers too; Cutie's trainer saves {"weights": ...}); a `module.` prefix on
    every key (DDP) is removed. ValueError naming `where` when no dict of named tensors is found."""
    state = obj
    while isinstance(state, Mapping) and not (state and all(torch.is_tensor(v) for v in state.values())):
        inner = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = state[inner]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{where}: expected a non-empty state dict (or one under {list(WRAPPER_KEYS)}), "
                         f"got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{where}: entries that are not named tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) a checkpoint and unwrap it (`unwrap_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (no download happens at run time; put the checkpoint there "
            f"or set `init: random` for a randomly initialised model)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise ValueError(f"{path}: cannot read as a PyTorch state dict ({err})") from err
    return unwrap_state_dict(state, str(path))


def find_vit(network_or_vit: nn.Module) -> VisionTransformer:
    """The single timm VisionTransformer inside a network, encoder, or the ViT itself."""
    if isinstance(network_or_vit, VisionTransformer):
        return network_or_vit
    found = [m for m in network_or_vit.modules() if isinstance(m, VisionTransformer)]
    if len(found) != 1:
        raise ValueError(f"{type(network_or_vit).__name__} holds {len(found)} ViTs; expected exactly one")
    return found[0]


def to_vit_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Map checkpoint keys to timm ViT names → (mapped, dropped keys, layout name)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped: list[str] = []
    if any(k.startswith("pretrained.") for k in state):
        layout = "depth_anything"
        mapped = {}
        for key, value in state.items():
            if key.startswith("pretrained."):
                mapped[key.removeprefix("pretrained.")] = value
            elif key.startswith(DROPPED_PREFIXES):
                dropped.append(key)
            else:
                mapped[key] = value  # reported as unexpected below
    else:
        layout = "vit"
        mapped = dict(state)
    for key in list(mapped):
        if key in DROPPED_KEYS:
            dropped.append(key if layout == "vit" else f"pretrained.{key}")
            del mapped[key]
    renamed = {}
    for key, value in mapped.items():
        renamed[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    return renamed, sorted(dropped), layout


def resize_patch_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, 3, 14, 14) → (C, 3, 16, 16), bilinear with align_corners=True, magnitude not rescaled."""
    resized = F.interpolate(weight.float(), size=size, mode="bilinear", align_corners=True)
    return resized.to(weight.dtype)


def load_backbone_state_dict(
    network_or_vit: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "<state dict>",
    allow_unexpected: bool = False,
) -> LoadReport:
    """Load an in-memory checkpoint dict (any supported layout) into the ViT; see the module docstring."""
    vit = find_vit(network_or_vit)
    mapped, dropped, layout = to_vit_keys(state)
    report = LoadReport(path=source, layout=layout, dropped=dropped)
    target = vit.state_dict()
    report.missing = sorted(k for k in target if k not in mapped)
    report.unexpected = sorted(k for k in mapped if k not in target)
    if report.missing:
        raise ValueError(
            f"{source}: {len(report.missing)} ViT weights missing from the checkpoint "
            f"(refusing a partial load): {report.missing[:20]}"
        )
    if report.unexpected and not allow_unexpected:
        raise ValueError(f"{source}: {len(report.unexpected)} unexpected keys: {report.unexpected[:20]}")

    to_load = {}
    for key, want in target.items():
        value = mapped[key]
        if (
            key == "patch_embed.proj.weight"
            and value.shape[:2] == want.shape[:2]
            and value.shape != want.shape
        ):
            value = resize_patch_kernel(value, tuple(want.shape[-2:]))
            report.resized.append(f"{key} {tuple(mapped[key].shape[-2:])}->{tuple(want.shape[-2:])}")
        elif key == "pos_embed" and value.shape[-1] == want.shape[-1] and value.shape != want.shape:
            side = int(round((want.shape[1] - 1) ** 0.5))
            value = interpolate_pos_embed(value, side, side)
            report.resized.append(f"{key} {tuple(mapped[key].shape)}->{tuple(want.shape)}")
        if value.shape != want.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model wants {tuple(want.shape)} "
                f"(a different ViT size?)"
            )
        to_load[key] = value
    vit.load_state_dict(to_load, strict=True)
    report.loaded = sorted(to_load)
    if report.unexpected:
        log.warning("%s: ignored unexpected keys %s", source, report.unexpected)
    log.info("%s", report.summary())
    return report


def load_backbone_weights(
    network_or_vit: nn.Module, path: str | Path, allow_unexpected: bool = False
) -> LoadReport:
    """Read `path` (Depth-Anything V1/V2, DINOv2 or timm ViT) and load it into the network's ViT."""
    state = read_state_dict(path)
    return load_backbone_state_dict(
        network_or_vit, state, source=str(path), allow_unexpected=allow_unexpected
    )


# ------------------------------------------------------------------------------------------------ init_from
def init_from_checkpoint(network: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load every tensor of `path` whose (renamed) name and shape match `network`'s state dict, in place.

    Returns {"path", "layout", "loaded": [our keys], "skipped_shape": [(our key, file shape, network shape)],
    "missing": [network keys not loaded and not shape-skipped], "unused": [file keys (as in the file) with no
    counterpart]}. Floating tensors are cast to the network's dtype. Raises FileNotFoundError / ValueError naming
    the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: checkpoint {path} not found")
    try:
        state = read_state_dict(path)
        layout = detect_layout(state)
    except ValueError as err:
        raise ValueError(f"model.init_from: {path}: {err}") from err
    rename, known_unused = (lambda k: k), ()
    if layout != OURS:
        lay = get_layout(layout)
        rename, known_unused = lay.to_ours, lay.unused

    own = network.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    unused: list[str] = []
    for key, tensor in state.items():
        ours = None if key in known_unused else rename(key)
        target = own.get(ours) if ours is not None else None
        if target is None or ours in to_load:
            unused.append(key)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            skipped.append((ours, tuple(tensor.shape), tuple(target.shape)))
            continue
        if tensor.dtype != target.dtype:
            if not (tensor.is_floating_point() and target.is_floating_point()):
                skipped.append((ours, tuple(tensor.shape), tuple(target.shape)))
                continue
            tensor = tensor.to(target.dtype)
        to_load[ours] = tensor
    if not to_load:
        raise ValueError(f"model.init_from: {path} ({layout} layout, {len(state)} tensors): not one tensor matches "
                         f"the network's names and shapes (first keys: {list(state)[:3]}); wrong file or model?")
    result = network.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen: every key was taken from the network's own state dict
        raise RuntimeError(f"model.init_from: unexpected keys {result.unexpected_keys[:5]}")
    shape_keys = {k for k, _, _ in skipped}
    missing = [k for k in own if k not in to_load and k not in shape_keys]
    return {"path": str(path), "layout": layout, "loaded": sorted(to_load), "skipped_shape": skipped,
            "missing": missing, "unused": unused, "total": len(own)}


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def format_init_report(report: dict[str, Any]) -> str:
    """One paragraph: per top-level module of the network, loaded/total tensors, with the shape-skipped and
    missing counts; then the checkpoint keys left unused and the first shape mismatches."""
    per: OrderedDict[str, list[int]] = OrderedDict()  # module -> [loaded, shape, missing]
    for key in report["loaded"]:
        per.setdefault(_top(key), [0, 0, 0])[0] += 1
    for key, _, _ in report["skipped_shape"]:
        per.setdefault(_top(key), [0, 0, 0])[1] += 1
    for key in report["missing"]:
        per.setdefault(_top(key), [0, 0, 0])[2] += 1
    parts = []
    for name, (loaded, shape, missing) in per.items():
        notes = [f"{shape} shape" for _ in [0] if shape] + [f"{missing} missing" for _ in [0] if missing]
        parts.append(f"{name} {loaded}/{loaded + shape + missing}" + (f" ({', '.join(notes)})" if notes else ""))
    total = len(report["loaded"]) + len(report["skipped_shape"]) + len(report["missing"])
    text = (f"init_from {report['path']} ({report['layout']} layout): loaded {len(report['loaded'])}/{total} "
            f"network tensors: {', '.join(parts)}; {len(report['unused'])} checkpoint tensors unused")
    if report["unused"]:
        text += f" (e.g. {', '.join(report['unused'][:3])})"
    if report["skipped_shape"]:
        examples = "; ".join(f"{k} file {list(a)} vs network {list(b)}" for k, a, b in report["skipped_shape"][:3])
        text += f"; shape mismatches kept their init, e.g. {examples}"
    return text + "."
