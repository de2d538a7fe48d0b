"""Key projection (XMem/Cutie): stride-16 features → key, shrinkage and selection for the memory read."""

from __future__ import annotations

import torch
from torch import nn


class KeyProjection(nn.Module):
    """f16 (B, C16, H, W) → key (B, CK, H, W), shrinkage (B, 1, H, W) = d² + 1, selection (B, CK, H, W) in (0,1).

    The shrinkage scales a memory key's similarities (sharper or flatter softmax); the selection weights the
    key channels of a query (anisotropic L2)."""

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
        x = self.pix_feat_proj(f16)
        shrinkage = self.shrinkage_proj(x) ** 2 + 1 if need_shrinkage else None
        selection = torch.sigmoid(self.selection_proj(x)) if need_selection else None
        return self.key_proj(x), shrinkage, selection
