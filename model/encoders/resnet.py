"""Cutie's pixel encoder: a timm ResNet up to layer3 (stride 16), features of layers 1-3.

resnet50 → f16 1024, f8 512, f4 256 channels; resnet18 → 256, 128, 64. `layer4` and the classifier are
not built. Weights (`init: file`) are an ImageNet ResNet state dict with timm or torchvision key names
(they agree); `layer4.*` and `fc.*` are dropped, any other mismatch is an error.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from model.encoders.config import PixelEncoderConfig

RESNET_DIMS = {"resnet50": (1024, 512, 256), "resnet18": (256, 128, 64)}
UNUSED_PREFIXES = ("layer4.", "fc.")


class ResNetEncoder(nn.Module):
    def __init__(self, cfg: PixelEncoderConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        del drop_path  # Cutie's ResNet has no drop path
        net = timm.create_model(cfg.type, pretrained=False)
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.ms_dims = RESNET_DIMS[cfg.type]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.act1(self.bn1(self.conv1(image))))
        f4 = self.layer1(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return [f16, f8, f4]


def load_resnet_weights(encoder: ResNetEncoder, path: str) -> None:
    """Load an ImageNet ResNet state dict; raise on any missing or unexpected key (layer4/fc dropped)."""
    from model.weights import read_state_dict  # local: weights.py imports the encoders

    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: not a {type(encoder).__name__} ResNet checkpoint: missing {result.missing_keys[:10]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:10]} "
            f"({len(result.unexpected_keys)})"
        )
