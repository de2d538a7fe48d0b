"""2-D sinusoidal positional encoding over a normalised grid (x then y halves; sin/cos interleaved)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionalEncoding(nn.Module):
    """`forward(h, w, device, dtype)` → (h, w, dim) table; coordinates normalised to [0, scale]."""

    def __init__(self, dim: int, scale: float = 2 * math.pi, temperature: float = 10000.0) -> None:
        super().__init__()
        half = int(math.ceil(dim / 4) * 2)  # channels per axis
        self.dim, self.half, self.scale = dim, half, scale
        self.register_buffer("inv_freq", 1.0 / (temperature ** (torch.arange(0, half, 2).float() / half)),
                             persistent=False)
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (h, w, str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        inv = self.inv_freq.to(device=device, dtype=torch.float32)
        ys = torch.arange(h, device=device, dtype=torch.float32)
        xs = torch.arange(w, device=device, dtype=torch.float32)
        ys = ys / (ys[-1] + 1e-6) * self.scale
        xs = xs / (xs[-1] + 1e-6) * self.scale

        def emb(pos: torch.Tensor) -> torch.Tensor:
            arg = pos[:, None] * inv[None]
            return torch.stack([arg.sin(), arg.cos()], dim=-1).flatten(-2)  # (L, half)

        table = torch.zeros(h, w, 2 * self.half, device=device)
        table[:, :, :self.half] = emb(xs)[None]
        table[:, :, self.half:] = emb(ys)[:, None]
        table = table[:, :, :self.dim].to(dtype)
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = table
        return table
