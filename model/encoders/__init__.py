"""Pixel encoders: image → [f16, f8, f4] feature maps at strides 16, 8 and 4.

`build_pixel_encoder(cfg, drop_path)` takes the `pixel_encoder:` mapping of a model YAML (keys in
`model.encoders.config`) and returns an `nn.Module` with `ms_dims` (channels of f16, f8, f4) whose
`forward(image)` takes an ImageNet-normalised (B,3,H,W) batch, H and W multiples of 32.

    resnet50 / resnet18     Cutie's ResNet (layers 1-3)
    vit                     frozen ViT block-group features, upsampled ("+ViT")
    vit_spatial             + spatial prior and deformable spatial-dependency blocks ("+spatial")
    vit_spatial_semantic    + semantic injection from CLS and the mean token (full S3)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from model.encoders.config import PixelEncoderConfig, parse_pixel_encoder_config
from model.encoders.resnet import ResNetEncoder, load_resnet_weights
from model.encoders.spatial_semantic import SpatialSemanticEncoder
from model.encoders.vit_features import ViTFeatureEncoder

__all__ = [
    "PixelEncoderConfig",
    "ResNetEncoder",
    "SpatialSemanticEncoder",
    "ViTFeatureEncoder",
    "build_pixel_encoder",
    "check_pixel_encoder_file",
    "check_weights_file",
    "parse_pixel_encoder_config",
]


PIXEL_ENCODER_FILES = {
    "resnet50": "torchvision's ImageNet resnet50 state dict (torchvision.models.resnet50(weights='IMAGENET1K_V1')"
                ".state_dict(), or timm's resnet50 state dict)",
    "resnet18": "torchvision's ImageNet resnet18 state dict (torchvision.models.resnet18(weights='IMAGENET1K_V1')"
                ".state_dict(), or timm's resnet18.tv_in1k)",
    "vit": "the Depth-Anything ViT-B/14 checkpoint (depth_anything_vitb14.pth; V2, DINOv2 or timm ViT-B/14 load too)",
    "vit_spatial": "the Depth-Anything ViT-B/14 checkpoint (depth_anything_vitb14.pth; V2, DINOv2 or timm ViT-B/14 "
                   "load too)",
    "vit_spatial_semantic": "the Depth-Anything ViT-B/14 checkpoint (depth_anything_vitb14.pth; V2, DINOv2 or timm "
                            "ViT-B/14 load too)",
}


def check_weights_file(key: str, path: str | Path, what: str, alternative: str) -> None:
    """FileNotFoundError naming the config key, the file, what to put there and how to do without it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} not found (relative paths are read from the working directory "
                                f"{Path.cwd()}); download {what} to that path, or {alternative}. No download "
                                "happens at run time.")


def check_pixel_encoder_file(cfg: Mapping[str, Any] | PixelEncoderConfig, set_prefix: str = "") -> None:
    """For `init: file`, the weights file exists (FileNotFoundError naming `pixel_encoder.weights`); `set_prefix` is
    where the user sets the key (e.g. `model.overrides.` from a training config), for the hint."""
    parsed = parse_pixel_encoder_config(cfg)
    if parsed.init == "file":
        check_weights_file("pixel_encoder.weights", parsed.weights, PIXEL_ENCODER_FILES.get(parsed.type, ""),
                           f"set {set_prefix}pixel_encoder.init=random and {set_prefix}pixel_encoder.weights=null "
                           "for a random init")


def build_pixel_encoder(cfg: Mapping[str, Any] | PixelEncoderConfig, drop_path: float = 0.0) -> nn.Module:
    """Build the encoder the config names and, for `init: file`, load its weights (errors name the file)."""
    if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path={drop_path!r}: expected a rate in [0, 1)")
    parsed = parse_pixel_encoder_config(cfg)
    check_pixel_encoder_file(parsed)  # before building: fail fast, naming the key
    if parsed.type in ("resnet50", "resnet18"):
        encoder: nn.Module = ResNetEncoder(parsed)
    elif parsed.type == "vit":
        encoder = ViTFeatureEncoder(parsed)
    else:
        encoder = SpatialSemanticEncoder(parsed, drop_path=float(drop_path))
    encoder.config = parsed
    if parsed.init == "file":
        if parsed.is_vit:
            from model.weights import load_backbone_weights

            load_backbone_weights(encoder, parsed.weights)
        else:
            load_resnet_weights(encoder, parsed.weights)
    return encoder
