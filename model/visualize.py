"""Render the pixel encoder's feature maps for one frame as PNGs (the paper's Figure 1).

    python -m model.visualize --config tiny --image frame.jpg --out viz/ [--weights FILE] [--size 480]

For each stage of the spatial-semantic block it writes the base features (stride 8 and 16) next to the
ViT's tokens after the same block group, plus the spatial prior and the final f16/f8/f4 maps, so one can
see what the block adds to the ViT. Each map is drawn twice: `*_pca.png` (the first three principal
components of the channels as RGB) and `*_norm.png` (the per-pixel channel L2 norm as a heat map).
`overview.png` tiles the PCA images with their names; `index.json` lists every file.

Maps are captured with forward hooks, so the encoder's code is not changed for the sake of plotting.
`--weights` takes either a whole-network state dict (a trained checkpoint) or a backbone checkpoint
(Depth-Anything / DINOv2 / timm ViT); without it the config's own `pixel_encoder.init` applies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import cli

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILE = 256  # overview tile height in pixels


def read_frame(path: str | Path, short_side: int | None) -> np.ndarray:
    """RGB uint8 (H, W, 3), resized so its short side is `short_side` (None: keep the size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if short_side:
        h, w = rgb.shape[:2]
        scale = short_side / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return rgb


def to_encoder_input(rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """ImageNet-normalised (1,3,H',W') padded (reflect) to multiples of 32, and the unpadded (H, W)."""
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)[None]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = (image - mean) / std
    h, w = rgb.shape[:2]
    pad_h, pad_w = (-h) % 32, (-w) % 32
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > 32 else "replicate")
    return image, (h, w)


def pca_rgb(feature: torch.Tensor) -> np.ndarray:
    """(C, h, w) → uint8 (h, w, 3): top-3 principal components, each stretched to its 1st-99th percentile."""
    channels, h, w = feature.shape
    x = feature.float().reshape(channels, h * w).T
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, channels)
    _, eigvecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    proj = x @ eigvecs[:, -k:].flip(-1)  # (hw, k), strongest first
    if k < 3:
        proj = torch.cat([proj, proj[:, :1].expand(-1, 3 - k)], dim=1)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (proj.reshape(h, w, 3).numpy() * 255).astype(np.uint8)


def norm_heatmap(feature: torch.Tensor) -> np.ndarray:
    """(C, h, w) → uint8 RGB heat map of the channel L2 norm."""
    norm = feature.float().norm(dim=0)
    lo, hi = norm.min(), norm.max()
    gray = ((norm - lo) / (hi - lo).clamp_min(1e-8) * 255).byte().numpy()
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


class FeatureRecorder:
    """Forward hooks on the ViT blocks that end each group and on the spatial-semantic stages."""

    def __init__(self, encoder: nn.Module) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.handles = []
        self._grid: tuple[int, int] | None = None
        vit = getattr(encoder, "vit", None)
        groups = getattr(encoder, "block_groups", ())
        if vit is not None:
            for index, (_, last) in enumerate(groups):
                self.handles.append(vit.blocks[last].register_forward_hook(self._vit_hook(index + 1)))
        prior = getattr(encoder, "spatial_prior", None)
        if prior is not None:
            self.handles.append(prior.register_forward_hook(self._prior_hook))
        for index, stage in enumerate(getattr(encoder, "stages", ())):
            self.handles.append(stage.register_forward_hook(self._stage_hook(index + 1)))

    def set_grid(self, grid: tuple[int, int]) -> None:
        self._grid = grid

    def _vit_hook(self, stage: int):
        def hook(_module, _inputs, output):
            h, w = self._grid
            self.maps[f"stage{stage}_vit_s16"] = output[0, 1:].T.reshape(-1, h, w).detach()

        return hook

    def _prior_hook(self, _module, _inputs, output):
        c1, c2, c3 = output
        h, w = self._grid
        self.maps["stage0_spatial_prior_s4"] = c1[0].detach()
        self.maps["stage0_spatial_prior_s8"] = c2[0].T.reshape(-1, 2 * h, 2 * w).detach()
        self.maps["stage0_spatial_prior_s16"] = c3[0].T.reshape(-1, h, w).detach()

    def _stage_hook(self, stage: int):
        def hook(_module, inputs, output):
            h, w = inputs[2]
            n8 = 4 * h * w
            self.maps[f"stage{stage}_spatial_semantic_s8"] = (
                output[0, :n8].T.reshape(-1, 2 * h, 2 * w).detach()
            )
            self.maps[f"stage{stage}_spatial_semantic_s16"] = output[0, n8:].T.reshape(-1, h, w).detach()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def capture_feature_maps(encoder: nn.Module, rgb: np.ndarray) -> dict[str, torch.Tensor]:
    """Run the encoder on one RGB frame; maps (C, h, w) cropped to the unpadded image, by name."""
    image, (height, width) = to_encoder_input(rgb)
    recorder = FeatureRecorder(encoder)
    recorder.set_grid((image.shape[-2] // 16, image.shape[-1] // 16))
    was_training = encoder.training
    encoder.eval()
    try:
        f16, f8, f4 = encoder(image)
    finally:
        recorder.remove()
        encoder.train(was_training)
    maps = dict(recorder.maps)
    maps.update({"output_f16": f16[0], "output_f8": f8[0], "output_f4": f4[0]})
    cropped = {}
    for name, fmap in maps.items():
        stride = image.shape[-1] // fmap.shape[-1]
        cropped[name] = fmap[:, : -(-height // stride), : -(-width // stride)]
    return dict(sorted(cropped.items()))


class ImageWriteError(OSError):
    """cv2.imwrite failed; OpenCV gives no reason."""


def _imwrite(path: Path, image: np.ndarray) -> None:
    """cv2.imwrite, which returns False instead of raising (a full disk, a read-only folder): raise, naming it."""
    if not cv2.imwrite(str(path), image):
        raise ImageWriteError(f"cannot write {path}: OpenCV gives no reason (a folder that is not writable, or a "
                              f"full disk: {cli.free_space(path.parent) or 'free space unknown'})")


def render_feature_maps(encoder: nn.Module, rgb: np.ndarray, out_dir: str | Path) -> list[Path]:
    """Write `<name>_pca.png`, `<name>_norm.png`, `input.png`, `overview.png` and `index.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = rgb.shape[:2]
    written = [out_dir / "input.png"]
    _imwrite(written[0], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    index: dict[str, Any] = {"image_size": [height, width], "maps": {}}
    tiles = {"input": _tile("input", rgb)}
    for name, fmap in capture_feature_maps(encoder, rgb).items():
        entry = {"channels": fmap.shape[0], "size": list(fmap.shape[1:])}
        for kind, picture in (("pca", pca_rgb(fmap)), ("norm", norm_heatmap(fmap))):
            big = cv2.resize(picture, (width, height), interpolation=cv2.INTER_NEAREST)
            path = out_dir / f"{name}_{kind}.png"
            _imwrite(path, cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
            written.append(path)
            entry[kind] = path.name
            if kind == "pca":
                tiles[name] = _tile(name, big)
        index["maps"][name] = entry
    overview = out_dir / "overview.png"
    _imwrite(overview, cv2.cvtColor(_overview(tiles), cv2.COLOR_RGB2BGR))
    (out_dir / "index.json").write_text(json.dumps(index, indent=2))
    return [*written, overview, out_dir / "index.json"]


def _overview(tiles: dict[str, np.ndarray]) -> np.ndarray:
    """One row per stage: [ViT, base features s16, s8]; the input and spatial prior first, outputs last."""
    rows = [["input", "stage0_spatial_prior_s16", "stage0_spatial_prior_s8", "stage0_spatial_prior_s4"]]
    stages = sorted({int(n.split("_")[0][5:]) for n in tiles if n.startswith("stage") and n[5] != "0"})
    rows += [
        [f"stage{i}_vit_s16", f"stage{i}_spatial_semantic_s16", f"stage{i}_spatial_semantic_s8"]
        for i in stages
    ]
    rows.append(["", "output_f16", "output_f8", "output_f4"])
    blank = np.zeros_like(tiles["input"])
    width = max(t.shape[1] for t in tiles.values())
    lines = []
    for row in rows:
        if not any(name in tiles for name in row):
            continue
        cells = [tiles.get(name, blank) for name in row] + [blank] * (4 - len(row))
        cells = [np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0))) for c in cells]
        lines.append(np.concatenate(cells, axis=1))
    return np.concatenate(lines, axis=0)


def _tile(label: str, picture: np.ndarray) -> np.ndarray:
    h, w = picture.shape[:2]
    tile = cv2.resize(picture, (max(1, round(w * TILE / h)), TILE), interpolation=cv2.INTER_NEAREST)
    tile = np.ascontiguousarray(tile)
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 18), (0, 0, 0), thickness=-1)
    cv2.putText(tile, label, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def load_network(config: str, weights: str | None) -> nn.Module:
    """Build the network of `config`; `weights` is a whole-network or a backbone checkpoint."""
    from model import build_network
    from model.config import load_model_config
    from model.weights import load_backbone_weights, read_state_dict

    if weights is None:
        return build_network(load_model_config(config, None))
    network = build_network(load_model_config(config, {"pixel_encoder": {"init": "random", "weights": None},
                                                     "mask_encoder": {"weights": None}}))
    state = {k.removeprefix("module."): v for k, v in read_state_dict(weights).items()}
    own = network.state_dict()
    if sum(k in own for k in state) > len(own) // 2:  # a checkpoint of this network
        result = network.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{weights}: does not match config {config!r}: missing {result.missing_keys[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
    else:
        load_backbone_weights(network, weights)
    return network


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="model config name (model/configs/NAME.yaml) or path")
    parser.add_argument(
        "--weights", default=None, help="whole-network or backbone (Depth-Anything) checkpoint"
    )
    parser.add_argument("--image", required=True, help="an RGB frame (jpg/png)")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    parser.add_argument("--size", type=int, default=480, help="resize the short side to this (0: keep)")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    # a missing image or weights file, an unknown config, a weights file of another network, an --out that
    # cannot be written: one line naming it, exit 2; a full disk: exit 4 (model.cli)
    return cli.run_cli(lambda: _run(args), debug=args.debug, user_errors=(ValueError, ImageWriteError),
                       disk=[args.out])


def _run(args: argparse.Namespace) -> int:
    if args.weights is not None and not Path(args.weights).is_file():  # before the network is built
        raise cli.CliError(f"weights file not found: {args.weights}")
    rgb = read_frame(args.image, args.size or None)
    network = load_network(args.config, args.weights)
    with cli.about("--out", args.out, "cannot write the feature maps"):
        written = render_feature_maps(network.pixel_encoder, rgb, args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
