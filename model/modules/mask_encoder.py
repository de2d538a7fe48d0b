"""Cutie's mask encoder: a ResNet-18 (timm, 5 input channels) on [image, object mask, other objects],
fused with the frame's pixel features into per-object mask values, plus the sensory "deep update" GRU."""

from __future__ import annotations

import contextlib

import timm
import torch
from torch import nn

from model.modules.group import GroupConv2d, GroupFusionBlock, gru_update

MASK_ENCODER_DIMS = {"resnet18": 256}  # channels after layer3 (stride 16)


def full_precision(x: torch.Tensor):
    """Leave any autocast region (the GRUs run in the weights' own precision, fp32 under AMP)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class SensoryDeepUpdater(nn.Module):
    """GRU over the sensory memory driven by the new mask values (Cutie's deep update)."""

    def __init__(self, value_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.transform = GroupConv2d(value_dim + sensory_dim, sensory_dim * 3, kernel_size=3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, value: torch.Tensor, sensory: torch.Tensor) -> torch.Tensor:
        with full_precision(value):
            dtype = self.transform.weight.dtype
            value, sensory = value.to(dtype), sensory.to(dtype)
            return gru_update(sensory, self.transform(torch.cat([value, sensory], dim=2)))


class MaskEncoder(nn.Module):
    """(image (B,3,H,W) normalised, pix_feat (B,C,H/16,W/16), sensory (B,N,S,h,w), masks/others (B,N,H,W))
    → mask values (B, N, value_dim, h, w) and the sensory memory (deep-updated or passed through).

    BatchNorm statistics stay frozen (eval mode) as in Cutie; their affine parameters train."""

    def __init__(self, kind: str, pixel_dim: int, value_dim: int, sensory_dim: int) -> None:
        super().__init__()
        if kind not in MASK_ENCODER_DIMS:
            raise ValueError(f"mask_encoder.type={kind!r}: expected one of {sorted(MASK_ENCODER_DIMS)}")
        net = timm.create_model(kind, pretrained=False, in_chans=5, zero_init_last=False)  # BN γ = 1 as Cutie
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.fuser = GroupFusionBlock(pixel_dim, MASK_ENCODER_DIMS[kind], value_dim)
        self.sensory_update = SensoryDeepUpdater(value_dim, sensory_dim)

    def train(self, mode: bool = True) -> MaskEncoder:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # frozen statistics, as Cutie
        return self

    def load_imagenet_weights(self, path: str) -> None:
        """An ImageNet ResNet-18 state dict: conv1's 3 RGB channels are copied, the 2 mask channels get an
        orthogonal init (Cutie); layer4/fc are dropped; any other mismatch raises naming the file."""
        from model.weights import read_state_dict

        state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        state = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("conv1.", "bn1.", "layer"))}
        if "conv1.weight" in state and state["conv1.weight"].shape[1] == 3:
            w = state["conv1.weight"]
            pad = torch.empty(w.shape[0], 2, *w.shape[2:])
            nn.init.orthogonal_(pad)
            state["conv1.weight"] = torch.cat([w, pad], 1)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or bad_shape:
            raise ValueError(f"{path}: not an ImageNet resnet18 state dict: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}, wrong shapes {bad_shape[:8]}")
        self.load_state_dict(state, strict=False)

    def forward(self, image: torch.Tensor, pix_feat: torch.Tensor, sensory: torch.Tensor, masks: torch.Tensor,
                others: torch.Tensor, *, deep_update: bool = True, chunk_size: int = -1
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = masks.shape[:2]
        chunk = n if chunk_size < 1 else chunk_size
        values, sensories = [], []
        for start in range(0, n, chunk):
            m = masks[:, start:start + chunk].to(image.dtype)
            o = others[:, start:start + chunk].to(image.dtype)
            k = m.shape[1]
            g = torch.cat([image.unsqueeze(1).expand(-1, k, -1, -1, -1), m.unsqueeze(2), o.unsqueeze(2)], 2)
            g = g.flatten(0, 1)
            g = self.act1(self.maxpool(self.bn1(self.conv1(g))))
            g = self.layer3(self.layer2(self.layer1(g)))
            g = self.fuser(pix_feat, g.view(b, k, *g.shape[1:]))
            values.append(g)
            s = sensory[:, start:start + chunk]
            sensories.append(self.sensory_update(g, s).to(s.dtype) if deep_update else s)
        return torch.cat(values, 1), torch.cat(sensories, 1)
