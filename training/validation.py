"""Validation of one checkpoint (rank 0): consolidate the ZeRO shards into fp32 weights, load them into a fresh
network with weights_only=True, score it on the DAVIS-format val split through training.evaluate, and log it to
MLflow as a LoggedModel carrying its val J&F, J and F, with a few mask overlays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import checkpoint

log = logging.getLogger(__name__)
PALETTE = np.array([[0, 0, 0], [220, 40, 40], [40, 200, 60], [40, 90, 230], [230, 200, 30], [200, 60, 200]],
                   dtype=np.uint8)


def strip_wrapper_prefix(state: dict[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The engine wraps the network in the training wrapper: map 'network.x' (or similar) back to 'x'."""
    wanted = set(network.state_dict())
    probe = next(iter(sorted(wanted)))
    prefixes = [""] + sorted({k[: -len(probe)] for k in state if k.endswith("." + probe)}, key=len)
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= set(stripped):
            return {k: stripped[k] for k in wanted}
    missing = sorted(wanted - set(state))[:5]
    raise KeyError(f"consolidated checkpoint does not hold the network's weights (e.g. {missing})")


def weights_file_for(cfg, ref: checkpoint.CheckpointRef) -> Path:
    return Path(cfg.output_dir) / "weights" / f"{ref.tag}.pt"


def consolidated_network(model_cfg, ref: checkpoint.CheckpointRef, weights_file: Path) -> torch.nn.Module:
    """Build the network and load the checkpoint's consolidated fp32 weights (written once, then reused)."""
    import model

    network = model.build_network(model_cfg)
    if not weights_file.is_file():
        raw_file = weights_file.with_suffix(".raw.pt")
        checkpoint.consolidate(ref, raw_file)
        state = torch.load(raw_file, map_location="cpu", weights_only=True)
        state = strip_wrapper_prefix(state, network)
        tmp = weights_file.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(weights_file)
        raw_file.unlink()
    checkpoint.load_weights(network, weights_file)
    return network.eval()


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.astype(np.uint8)


def make_overlays(val_root: str, pred_dir: Path, count: int) -> dict[str, np.ndarray]:
    """Overlay predicted masks on the middle frame of the first `count` sequences."""
    import cv2

    images: dict[str, np.ndarray] = {}
    if not pred_dir.is_dir():
        return images
    for seq in sorted(p for p in pred_dir.iterdir() if p.is_dir())[:count]:
        frames = sorted(seq.glob("*.png"))
        if not frames:
            continue
        f = frames[len(frames) // 2]
        jpg = Path(val_root) / "JPEGImages" / "480p" / seq.name / (f.stem + ".jpg")
        img = cv2.imread(str(jpg), cv2.IMREAD_COLOR)
        pred = np.array(__import__("PIL.Image", fromlist=["Image"]).open(f))
        if img is None or pred.shape != img.shape[:2]:
            continue
        images[f"{seq.name}_{f.stem}"] = overlay(img[:, :, ::-1], pred)
    return images


def score(network: torch.nn.Module, cfg, out_dir: Path | None) -> dict[str, Any]:
    from training.evaluate import evaluate_network

    v = cfg.validation
    return evaluate_network(network, v.root, split=v.split, size=v.size, out_dir=out_dir,
                            max_sequences=v.max_sequences or None, overwrite=True)


def validate_checkpoint(cfg, model_cfg, ref: checkpoint.CheckpointRef, tracker) -> dict[str, Any]:
    weights = weights_file_for(cfg, ref)
    network = consolidated_network(model_cfg, ref, weights)
    pred_dir = Path(cfg.output_dir) / "val" / ref.tag
    result = score(network, cfg, pred_dir)
    scores = {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    config_file = weights.with_suffix(".model.yaml")
    config_file.write_text(json.dumps(_model_cfg_dict(model_cfg), indent=1))
    uri = tracker.log_checkpoint(network, ref.iteration, scores, [str(weights), str(config_file)],
                                 make_overlays(cfg.validation.root, pred_dir / "Annotations",
                                               cfg.validation.overlays))
    record = {"iteration": ref.iteration, "tag": ref.tag, "weights": str(weights), "model_uri": uri, **scores}
    with open(Path(cfg.output_dir) / "validation.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("validated %s: J&F %.4f (model %s)", ref.tag, scores.get("J&F-Mean", float("nan")), uri)
    return record


def _model_cfg_dict(model_cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(vars(model_cfg))
