"""Convert official Cutie / S3-release checkpoints to our consolidated state dict and back.

    python -m model.convert --from cutie|s3-release --config cutie_base|s3 IN OUT
        IN: an official file; OUT: our state dict (.pt) plus the sidecar OUT with suffix .model.yaml (the model
        config as JSON, as training/validation.py writes it, with no pretrained-weights file named).
    python -m model.convert --to cutie|s3-release --config cutie_base|s3 IN OUT
        IN: our state dict; OUT: a plain state dict in the official names.

The renames live in `model.layouts`. Every source tensor is mapped or listed as known-unused; an unknown key,
a shape mismatch or a missing key fails naming the key (exit code 2, one line), as does a missing IN or an OUT
that cannot be written; a full disk while writing OUT is exit 4 (model.cli; --debug adds the traceback).
`--config` defaults to the layout's own config (cutie → cutie_base, s3-release → s3).

`load_network_from_checkpoint(path)` builds our network from any of the three layouts without reading any
ImageNet / Depth-Anything file: the checkpoint holds every weight, so the encoders are built randomly
initialised and then loaded strictly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import cli, weights
from model.layouts import LAYOUTS, OURS, Layout, detect_layout, get_layout

# A consolidated checkpoint holds every weight: build the network without reading any pretrained file.
OFFLINE_OVERRIDES: dict[str, Any] = {"pixel_encoder": {"init": "random", "weights": None},
                                     "mask_encoder": {"weights": None}}


class ConversionError(ValueError):
    """A user error: a bad file, an unknown / missing key, a shape mismatch, the wrong layout."""


@dataclass
class ConversionReport:
    source: str  # layout of the input
    target: str  # layout of the output
    model_config: str
    mapped: int = 0
    renamed: int = 0
    unused: list[str] = field(default_factory=list)  # source keys dropped as known-unused
    omitted: list[str] = field(default_factory=list)  # their known-unused keys absent from a --to output
    cast: list[str] = field(default_factory=list)  # floating tensors cast to the network's dtype

    def text(self, src: str = "", dst: str = "") -> str:
        """One paragraph for the console."""
        head = (f"Converted {self.source} checkpoint {src} to {self.target} names (model config "
                f"{self.model_config})" + (f", written to {dst}" if dst else "") + ": ")
        body = f"{self.mapped} tensors mapped ({self.renamed} renamed, {self.mapped - self.renamed} same name)"
        if self.target == OURS:
            body += f", {len(self.unused)} known-unused source keys dropped"
            body += f" ({', '.join(self.unused)})." if self.unused else "."
        else:
            body += (f"; {len(self.omitted)} known-unused keys of the {self.target} layout not written (the "
                     f"reference code recomputes or never reads them: {', '.join(self.omitted)}).")
        if self.cast:
            body += f" {len(self.cast)} tensors cast to the network's dtype (e.g. {self.cast[0]})."
        return head + body

    def info(self) -> dict[str, Any]:
        return {"layout": self.source if self.target == OURS else self.target, "model_config": self.model_config,
                "mapped": self.mapped, "renamed": self.renamed, "unused": list(self.unused)}


# ------------------------------------------------------------------------------------------------ reading
def unwrap_state_dict(obj: Any, where: str = "<state>") -> dict[str, torch.Tensor]:
    """`model.weights.unwrap_state_dict`, its errors as ConversionError."""
    try:
        return weights.unwrap_state_dict(obj, where)
    except ValueError as err:
        raise ConversionError(str(err)) from err


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """`model.weights.read_state_dict` (torch.load with weights_only=True, unwrapped), errors as ConversionError."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    try:
        return weights.read_state_dict(path)
    except ValueError as err:
        raise ConversionError(str(err)) from err


# ------------------------------------------------------------------------------------------------ networks
def offline_model_config(name_or_path: str | Path):
    """`load_model_config(name_or_path)` overridden to read no pretrained file: pixel encoder
    `init: random, weights: null` and `mask_encoder.weights: null` (for a checkpoint holding every weight)."""
    from model.config import load_model_config

    return load_model_config(name_or_path, OFFLINE_OVERRIDES)


def build_offline_network(model_cfg) -> torch.nn.Module:
    import model

    return model.build_network(model_cfg)


def network_shapes(model_cfg) -> dict[str, torch.Tensor]:
    """Our network's state dict for `model_cfg` as meta tensors (names, shapes, dtypes; no data)."""
    return dict(_network_shapes(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _network_shapes(cfg_json: str) -> tuple[tuple[str, torch.Tensor], ...]:
    import model
    from model.config import model_config_from_dict

    model_cfg = model_config_from_dict(json.loads(cfg_json))
    try:
        with torch.device("meta"):
            state = model.build_network(model_cfg).state_dict()
    except (NotImplementedError, RuntimeError):  # an init that needs real data: build on the CPU
        state = build_offline_network(model_cfg).state_dict()
    return tuple((k, torch.empty(v.shape, dtype=v.dtype, device="meta")) for k, v in state.items())


def _convert(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], rename, name_of: str,
             unused: Sequence[str], where: str, target_for_missing) -> tuple[dict[str, torch.Tensor], dict]:
    """Rename `state` into the names of `expected`, checking shapes; collects every problem, fails once."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped, unknown, mismatch, clash, cast = [], [], [], [], []
    for key, tensor in state.items():
        if key in unused:
            dropped.append(key)
            continue
        new = rename(key)
        ref = expected.get(new)
        label = key if new == key else f"{key} (= {name_of} {new})"
        if ref is None:
            unknown.append(label)
            continue
        if tuple(tensor.shape) != tuple(ref.shape):
            mismatch.append(f"{label}: checkpoint {tuple(tensor.shape)} vs network {tuple(ref.shape)}")
            continue
        if new in origin:
            clash.append(f"{origin[new]} and {key} -> {new}")
            continue
        if tensor.dtype != ref.dtype:
            if not (tensor.is_floating_point() and ref.is_floating_point()):
                mismatch.append(f"{label}: dtype {tensor.dtype} vs network {ref.dtype}")
                continue
            tensor = tensor.to(ref.dtype)
            cast.append(key)
        out[new] = tensor
        origin[new] = key
    missing = [target_for_missing(k) for k in expected if k not in out]
    problems = []
    for what, items in (("unknown key(s)", unknown), ("shape mismatch(es)", mismatch),
                        ("key(s) mapped twice", clash), ("missing key(s)", missing)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {what}: {'; '.join(items[:5])}{more}")
    if problems:
        hint = " (does --config / the layout match the checkpoint?)" if unknown and missing else ""
        raise ConversionError(f"{where}: " + " | ".join(problems) + hint)
    renamed = sum(1 for new, key in origin.items() if new != key)
    return out, {"dropped": dropped, "renamed": renamed, "cast": cast}


def to_ours(state: Mapping[str, torch.Tensor], layout: str | Layout, expected: Mapping[str, torch.Tensor],
            model_config: str = "?", where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An official state dict (`layout`) → our names, checked against `expected` (our network's state dict)."""
    lay = get_layout(layout) if isinstance(layout, str) else layout

    def missing(ours: str) -> str:
        return f"{lay.to_theirs(ours)} (= ours {ours})" if lay.to_theirs(ours) != ours else ours

    out, stats = _convert(state, expected, lay.to_ours, "ours", lay.unused, where, missing)
    report = ConversionReport(lay.name, OURS, model_config, len(out), stats["renamed"], stats["dropped"],
                              cast=stats["cast"])
    return out, report


def from_ours(state: Mapping[str, torch.Tensor], layout: str | Layout, expected: Mapping[str, torch.Tensor],
              model_config: str = "?", where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict → the official names of `layout`, checked against `expected` (our network's state dict).
    The layout's known-unused keys are not written (the reference code recomputes or never reads them)."""
    lay = get_layout(layout) if isinstance(layout, str) else layout
    checked, report = check_ours(state, expected, model_config, where)
    out = {lay.to_theirs(k): v for k, v in checked.items()}
    if len(out) != len(checked):  # a table bug: two of our names map to one of theirs
        raise ValueError(f"layout {lay.name}: our names do not map one to one")
    report.target, report.omitted = lay.name, list(lay.unused)
    report.renamed = sum(1 for k in checked if lay.to_theirs(k) != k)
    return out, report


def check_ours(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model_config: str = "?",
               where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict checked against `expected` (same keys and shapes)."""
    out, stats = _convert(state, expected, lambda k: k, "ours", (), where, lambda k: k)
    return out, ConversionReport(OURS, OURS, model_config, len(out), 0, cast=stats["cast"])


def _check_layout(state: Mapping[str, Any], wanted: str, where: str) -> None:
    try:
        found = detect_layout(state)
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None
    if found != wanted:
        raise ConversionError(f"{where}: its names are of the {found} layout, not {wanted}")


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where our model-config sidecar of a consolidated checkpoint lives (as training/validation.py)."""
    return Path(checkpoint).with_suffix(".model.yaml")


def write_sidecar(checkpoint: str | Path, model_cfg) -> Path:
    path = sidecar_path(checkpoint)
    path.write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    return path


# ------------------------------------------------------------------------------------------------ loading
def load_network_from_checkpoint(path: str | Path, model_config: str | None = None
                                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our network (eval mode) from our consolidated state dict, a Cutie file or an S3-release file.

    The layout is detected from the names. The model config is `model_config` (a name or a YAML/JSON path),
    else our checkpoint's `<stem>.model.yaml` sidecar, else the layout's own config (cutie → cutie_base,
    s3-release → s3). No pretrained file is read: every weight comes from the checkpoint, loaded strictly.
    Returns (network, {"layout", "model_config", "mapped", "renamed", "unused"}).
    Raises FileNotFoundError (no file, no sidecar) or ValueError (ConversionError) naming the file and key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = read_checkpoint(path)
    try:
        layout = detect_layout(state)
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from None
    if model_config is None:
        if layout == OURS:
            sidecar = sidecar_path(path)
            if not sidecar.is_file():
                raise FileNotFoundError(f"no model config given and no sidecar config {sidecar} next to {path}")
            model_config = str(sidecar)
        else:
            model_config = LAYOUTS[layout].model_config
    cfg = offline_model_config(model_config)
    network = build_offline_network(cfg)
    expected = network.state_dict()
    if layout == OURS:
        ours, report = check_ours(state, expected, model_config, str(path))
    else:
        ours, report = to_ours(state, layout, expected, model_config, str(path))
    network.load_state_dict(ours, strict=True)
    return network.eval(), report.info()


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", choices=sorted(LAYOUTS), help="IN is an official file of this layout")
    way.add_argument("--to", dest="dst", choices=sorted(LAYOUTS), help="write OUT in this official layout")
    p.add_argument("--config", help="our model config (name or YAML); default: the layout's own")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    return cli.add_debug_flag(p)


def run(args: argparse.Namespace) -> ConversionReport:
    layout = get_layout(args.src or args.dst)
    config = args.config or layout.model_config
    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise ConversionError(f"OUT {dst} is the input file")
    try:
        model_cfg = offline_model_config(config)
    except (ValueError, FileNotFoundError) as err:
        raise ConversionError(f"--config {config}: {err}") from None
    state = read_checkpoint(src)
    expected = network_shapes(model_cfg)
    if args.src:
        _check_layout(state, layout.name, str(src))
        out, report = to_ours(state, layout, expected, config, str(src))
    else:
        _check_layout(state, OURS, str(src))
        out, report = from_ours(state, layout, expected, config, str(src))
    written = []
    try:
        with cli.about("OUT", dst, "cannot write"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            written.append(dst)
            torch.save(out, dst)
            if args.src:
                written.append(sidecar_path(dst))
                write_sidecar(dst, model_cfg)
    except BaseException:
        for path in written:  # no half-written file is left to be mistaken for a converted one
            path.unlink(missing_ok=True)
        raise
    print(report.text(str(src), str(dst) + (f" (+ {sidecar_path(dst).name})" if args.src else "")))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def convert() -> int:
        run(args)
        return 0

    return cli.run_cli(convert, debug=args.debug, user_errors=(ConversionError,), disk=[Path(args.output).parent])


if __name__ == "__main__":
    sys.exit(main())
