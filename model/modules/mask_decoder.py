"""Mask decoder (Cutie): upsample the per-object readout with skip connections from f8 and f4 to stride-4 logits,
and update the sensory memory with a GRU fed by all three scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.modules.group import GroupConv2d, GroupResBlock, gru_update, resize_groups
from model.modules.mask_encoder import full_precision


class MaskUpsampleBlock(nn.Module):
    """×2 upsample the per-object map, add the (projected) skip feature, then a group residual block."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_conv = GroupResBlock(in_dim, out_dim)

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = resize_groups(g, scale=2, mode="bilinear")
        return self.out_conv(g + skip.unsqueeze(1))


class SensoryUpdater(nn.Module):
    """GRU over the sensory memory from the decoder's stride-16/8/4 maps (the last with the logits appended)."""

    def __init__(self, dims: tuple[int, int, int], mid_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.g16_conv = GroupConv2d(dims[0], mid_dim, kernel_size=1)
        self.g8_conv = GroupConv2d(dims[1], mid_dim, kernel_size=1)
        self.g4_conv = GroupConv2d(dims[2], mid_dim, kernel_size=1)
        self.transform = GroupConv2d(mid_dim + sensory_dim, sensory_dim * 3, kernel_size=3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, p16: torch.Tensor, p8: torch.Tensor, p4: torch.Tensor, sensory: torch.Tensor) -> torch.Tensor:
        g = (self.g16_conv(p16) + self.g8_conv(resize_groups(p8, scale=0.5, mode="area"))
             + self.g4_conv(resize_groups(p4, scale=0.25, mode="area")))
        with full_precision(g):
            dtype = self.transform.weight.dtype
            g, sensory = g.to(dtype), sensory.to(dtype)
            return gru_update(sensory, self.transform(torch.cat([g, sensory], 2)))


class MaskDecoder(nn.Module):
    def __init__(self, ms_dims: tuple[int, int, int], up_dims: list[int], sensory_dim: int) -> None:
        super().__init__()
        self.f8_proj = nn.Conv2d(ms_dims[1], up_dims[0], kernel_size=1)
        self.f4_proj = nn.Conv2d(ms_dims[2], up_dims[1], kernel_size=1)
        self.up_16_8 = MaskUpsampleBlock(up_dims[0], up_dims[1])
        self.up_8_4 = MaskUpsampleBlock(up_dims[1], up_dims[2])
        self.pred = nn.Conv2d(up_dims[2], 1, kernel_size=3, padding=1)
        self.sensory_update = SensoryUpdater((up_dims[0], up_dims[1], up_dims[2] + 1), sensory_dim, sensory_dim)

    def forward(self, ms_feat: list[torch.Tensor], readout: torch.Tensor, sensory: torch.Tensor, *,
                chunk_size: int = -1, update_sensory: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """ms_feat [f16, f8, f4]; readout (B, N, C, h, w) → (sensory (B, N, S, h, w), logits (B, N, 4h, 4w))."""
        b, n = readout.shape[:2]
        f8, f4 = self.f8_proj(ms_feat[1]), self.f4_proj(ms_feat[2])
        chunk = n if chunk_size < 1 else chunk_size
        all_logits, all_sensory = [], []
        for i in range(0, n, chunk):
            p16 = readout[:, i:i + chunk]
            k = p16.shape[1]
            p8 = self.up_16_8(p16, f8)
            p4 = self.up_8_4(p8, f4)
            with full_precision(p4):
                logits = self.pred(F.relu(p4.flatten(0, 1).to(self.pred.weight.dtype)))
            logits = logits.view(b, k, *logits.shape[-2:])
            s = sensory[:, i:i + chunk]
            if update_sensory:
                p4 = torch.cat([p4, logits.unsqueeze(2).to(p4.dtype)], 2)
                s = self.sensory_update(p16, p8, p4, s).to(s.dtype)
            all_logits.append(logits)
            all_sensory.append(s)
        return torch.cat(all_sensory, 1), torch.cat(all_logits, 1)


class SensoryAuxHead(nn.Module):
    """Auxiliary head: per-object logits from the sensory memory as a dynamic linear classifier on pix_feat."""

    def __init__(self, sensory_dim: int, pixel_dim: int) -> None:
        super().__init__()
        self.projection = GroupConv2d(sensory_dim, pixel_dim + 1, kernel_size=1)

    def forward(self, pix_feat: torch.Tensor, sensory: torch.Tensor) -> torch.Tensor:
        x = self.projection(sensory.to(pix_feat.dtype))  # B, N, C + 1, h, w
        return (pix_feat.unsqueeze(1) * x[:, :, :-1]).sum(2) + x[:, :, -1]
