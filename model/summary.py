"""Parameter counts of a model config, as JSON.

    python -m model.summary --config s3

prints total, trainable and frozen counts and the same per top-level module of the network (and per
part of the pixel encoder). Counts do not depend on weights, so the network is built with a randomly
initialised pixel encoder: no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from torch import nn

from model import cli

# random initialisation of both encoders: no pretrained file is read (tests, benchmarks, summaries)
RANDOM_ENCODER = {"pixel_encoder": {"init": "random", "weights": None}, "mask_encoder": {"weights": None}}


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = trainable = 0
    for param in module.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def _direct_parameters(module: nn.Module) -> dict[str, int]:
    counts = {"total": 0, "trainable": 0, "frozen": 0}
    for param in module.parameters(recurse=False):
        counts["total"] += param.numel()
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def summarize(network: nn.Module) -> dict[str, Any]:
    """{total, trainable, frozen, modules: {child: counts}, pixel_encoder_parts: {child: counts}}."""
    summary: dict[str, Any] = count_parameters(network)
    summary["modules"] = {name: count_parameters(child) for name, child in network.named_children()}
    direct = _direct_parameters(network)
    if direct["total"]:
        summary["modules"]["(network itself)"] = direct
    encoder = getattr(network, "pixel_encoder", None)
    if isinstance(encoder, nn.Module):
        parts = {name: count_parameters(child) for name, child in encoder.named_children()}
        direct = _direct_parameters(encoder)
        if direct["total"]:
            parts["(encoder itself)"] = direct
        summary["pixel_encoder_parts"] = parts
    return summary


def build_network_for_counting(config: str) -> tuple[Any, nn.Module]:
    from model import build_network
    from model.config import load_model_config

    cfg = load_model_config(config, RANDOM_ENCODER)
    return cfg, build_network(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="model config name (model/configs/NAME.yaml) or path")
    parser.add_argument("--indent", type=int, default=2)
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    # an unknown config name, a missing or invalid YAML: one line naming it, exit 2 (model.cli)
    return cli.run_cli(lambda: _run(args), debug=args.debug, user_errors=(ValueError,))


def _run(args: argparse.Namespace) -> int:
    _, network = build_network_for_counting(args.config)
    summary = {"config": args.config, **summarize(network)}
    json.dump(summary, sys.stdout, indent=args.indent)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
