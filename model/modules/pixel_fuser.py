"""Pixel fuser (Cutie): memory readout + compressed sensory memory (with the last mask), fused with pix_feat."""

from __future__ import annotations

import torch
from torch import nn

from model.modules.group import GroupConv2d, GroupFusionBlock


class PixelFuser(nn.Module):
    def __init__(self, pixel_dim: int, value_dim: int, sensory_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.sensory_compress = GroupConv2d(sensory_dim + 2, value_dim, kernel_size=1)
        self.fuser = GroupFusionBlock(pixel_dim, value_dim, embed_dim)

    def forward(self, pix_feat: torch.Tensor, readout: torch.Tensor, sensory: torch.Tensor,
                last_mask: torch.Tensor, last_others: torch.Tensor, *, chunk_size: int = -1) -> torch.Tensor:
        """pix_feat (B,C,h,w); readout (B,N,CV,h,w); sensory (B,N,S,h,w); last_mask/others (B,N,h,w)."""
        n = readout.shape[1]
        chunk = n if chunk_size < 1 else chunk_size
        dtype = readout.dtype
        outs = []
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            extra = torch.stack([last_mask[:, sl], last_others[:, sl]], 2).to(dtype)
            compressed = self.sensory_compress(torch.cat([sensory[:, sl].to(dtype), extra], 2))
            outs.append(self.fuser(pix_feat, readout[:, sl] + compressed))
        return torch.cat(outs, 1)
