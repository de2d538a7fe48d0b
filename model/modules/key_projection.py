"""Key projection (XMem/Cutie): stride-16 features → key, shrinkage and selection for the memory read.

It always runs in fp32 (inside `torch.autocast` too; bf16 weights are used as fp32 copies): the keys feed the
anisotropic L2 similarity and its softmax over every memory pixel, where bf16's 8-bit mantissa shows directly in
the affinities (Cutie computes keys outside autocast for the same reason). Outputs are fp32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _no_autocast(x: torch.Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _conv_fp32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv2d(x, conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class KeyProjection(nn.Module):
    """f16 (B, C16, H, W) → key (B, CK, H, W), shrinkage (B, 1, H, W) = d² + 1, selection (B, CK, H, W) in (0,1).

    The shrinkage scales a memory key's similarities (sharper or flatter softmax); the selection weights the
    key channels of a query (anisotropic L2). All three are fp32 whatever the input's or weights' dtype."""

    def __init__(self, in_dim: int, mid_dim: int, key_dim: int) -> None:
        super().__init__()
        self.pix_feat_proj = nn.Conv2d(in_dim, mid_dim, kernel_size=1)
        self.key_proj = nn.Conv2d(mid_dim, key_dim, kernel_size=3, padding=1)
        self.shrinkage_proj = nn.Conv2d(mid_dim, 1, kernel_size=3, padding=1)
        self.selection_proj = nn.Conv2d(mid_dim, key_dim, kernel_size=3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias)

    def forward(self, f16: torch.Tensor, *, need_shrinkage: bool = True, need_selection: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        with _no_autocast(f16):
            x = _conv_fp32(self.pix_feat_proj, f16.float())
            shrinkage = _conv_fp32(self.shrinkage_proj, x) ** 2 + 1 if need_shrinkage else None
            selection = torch.sigmoid(_conv_fp32(self.selection_proj, x)) if need_selection else None
            return _conv_fp32(self.key_proj, x), shrinkage, selection
