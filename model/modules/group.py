"""Building blocks on per-object ("group") tensors of shape (B, N, C, H, W).

Shared image features x are (B, C, H, W); per-object features g carry an extra object axis N. A group layer
folds N into the batch, runs the ordinary layer and unfolds again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resize_groups(g: torch.Tensor, *, scale: float | None = None, size: tuple[int, int] | None = None,
                  mode: str = "bilinear") -> torch.Tensor:
    b, n = g.shape[:2]
    flat = g.flatten(0, 1)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, scale_factor=scale, size=size, mode=mode, **kwargs)
    return out.view(b, n, *out.shape[1:])


class GroupConv2d(nn.Conv2d):
    """A Conv2d applied to every object of a (B, N, C, H, W) tensor."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n = g.shape[:2]
        out = super().forward(g.flatten(0, 1))
        return out.view(b, n, *out.shape[1:])


class GroupResBlock(nn.Module):
    """Two 3×3 convs with pre-activation ReLU and a (1×1 when the width changes) skip, per object."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = GroupConv2d(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv2 = GroupConv2d(out_dim, out_dim, kernel_size=3, padding=1)
        self.skip = nn.Identity() if in_dim == out_dim else GroupConv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(g))))
        return out + self.skip(g)


class ChannelAttentionResBlock(nn.Module):
    """Residual block of two 3×3 convs whose output channels are re-weighted by ECA-style channel attention
    (global average pool, a 1-D conv across channels with an adaptive odd kernel, sigmoid)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1)
        t = int((abs(math.log2(out_dim)) + 1) // 2)
        k = t if t % 2 else t + 1
        self.channel_conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.skip = nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        b, c = out.shape[:2]
        weight = self.channel_conv(out.mean(dim=(2, 3)).view(b, 1, c)).view(b, c, 1, 1).sigmoid()
        return self.skip(x) + out * weight


class GroupFusionBlock(nn.Module):
    """Fuse shared features x (B, Cx, H, W) into per-object features g (B, N, Cg, H, W):
    1×1-project both to `out_dim`, add (x broadcast over objects), then two channel-attention residual blocks."""

    def __init__(self, x_dim: int, g_dim: int, out_dim: int) -> None:
        super().__init__()
        self.x_proj = nn.Conv2d(x_dim, out_dim, kernel_size=1)
        self.g_proj = GroupConv2d(g_dim, out_dim, kernel_size=1)
        self.block1 = ChannelAttentionResBlock(out_dim, out_dim)
        self.block2 = ChannelAttentionResBlock(out_dim, out_dim)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        b, n = g.shape[:2]
        fused = (self.x_proj(x).unsqueeze(1) + self.g_proj(g)).flatten(0, 1)
        fused = self.block2(self.block1(fused))
        return fused.view(b, n, *fused.shape[1:])


def gru_update(hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Cutie's convolutional GRU step: gates (B, N, 3C, H, W) = [forget, update, candidate] pre-activations."""
    c = gates.shape[2] // 3
    forget = torch.sigmoid(gates[:, :, :c])
    update = torch.sigmoid(gates[:, :, c:2 * c])
    candidate = torch.tanh(gates[:, :, 2 * c:])
    return forget * hidden * (1 - update) + update * candidate


def soft_aggregate(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-object foreground probabilities (…, N, …) → logits over [background, objects] (…, N + 1, …).

    The background is the probability that no object is present, prod(1 - p); the result is the logit of each
    clamped probability, so a softmax over the N + 1 channels normalises them (Cutie's `aggregate`). fp32.
    """
    prob = prob.float()
    with_bg = torch.cat([torch.prod(1 - prob, dim=dim, keepdim=True), prob], dim).clamp(1e-7, 1 - 1e-7)
    return torch.log(with_bg / (1 - with_bg))


def others_of(masks: torch.Tensor) -> torch.Tensor:
    """For every object, the union (clamped sum) of the masks of the other objects. masks: (B, N, H, W)."""
    return (masks.sum(dim=1, keepdim=True) - masks).clamp(0, 1)
