"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, so it runs on CPU.

Each query predicts, per head, level and point, a 2-D offset from its reference point and a weight; the
output is the weighted sum of the values bilinearly sampled (`F.grid_sample`) at those locations. No
custom CUDA op is needed; on GPU the same code runs, only with more memory traffic than the fused kernel.

Precision: the sampling offsets, attention weights, sampling locations and the bilinear sampling always run in
fp32, also inside `torch.autocast(bf16)` and with bf16 weights (as the release, whose MSDeformAttn op casts its
inputs to fp32). A bf16 location has 8 bits of mantissa: at a 60-cell grid it is off by up to ~0.1 cell, and the
sampled features with it (tests/model/test_numerics.py case, 16×16 value grid, CPU autocast: max error vs fp32
0.098 with bf16 sampling, 0.008 with the fp32 island; the issue measured 0.87 vs 0.012).
The value and output projections follow the surrounding autocast; the island's result is cast back to the
query's dtype.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sample(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted bilinear sampling of multi-level values.

    value: (B, S, heads, D), the levels' tokens concatenated (S = Σ h·w, row-major per level);
    sampling_locations: (B, Q, heads, levels, points, 2) as (x, y) in [0, 1] of each level's extent;
    attention_weights: (B, Q, heads, levels, points), already normalised over levels × points.
    Returns (B, Q, heads·D). Locations outside [0, 1] read zeros.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {levels} sampling levels")
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, h·w, heads, D) → (B·heads, D, h, w)
        level_value = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        # (B, Q, heads, points, 2) → (B·heads, Q, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(
                level_value,
                level_grid.to(level_value.dtype),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )  # (B·heads, D, Q, points)
    # (B·heads, D, Q, levels·points); one level (S3's case) needs no copy
    stacked = sampled[0] if levels == 1 else torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights.to(stacked.dtype)).sum(-1)  # (B·heads, D, Q)
    return out.reshape(batch, heads * head_dim, queries).transpose(1, 2)


def fp32_island(x: torch.Tensor):
    """A region that leaves any autocast of `x`'s device (callers cast their inputs to float themselves)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class MultiScaleDeformableAttention(nn.Module):
    """Queries read `points` sampled locations per head and level around their reference points.

    `fp32_sampling` (default True) keeps offsets, weights, locations and sampling in fp32 (module docstring);
    False lets them follow autocast / the weights' dtype (only for measuring what the island buys)."""

    fp32_sampling: bool = True

    def __init__(self, dim: int, heads: int, levels: int = 1, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention: dim {dim} not divisible by heads {heads}")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions, one per head, growing per point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        offsets = directions.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        offsets = offsets * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B,Q,C); reference_points (B or 1, Q, levels, 2) as (x, y) in [0,1]; value (B,S,C)."""
        batch, queries, _ = query.shape
        head_dim = self.dim // self.heads
        value = self.value_proj(value).view(batch, value.shape[1], self.heads, head_dim)
        if not self.fp32_sampling:
            out = self._sample(query, reference_points, value, spatial_shapes, self.sampling_offsets.weight,
                               self.sampling_offsets.bias, self.attention_weights.weight,
                               self.attention_weights.bias)
            return self.output_proj(out)
        with fp32_island(query):
            out = self._sample(query.float(), reference_points.float(), value.float(), spatial_shapes,
                               self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float(),
                               self.attention_weights.weight.float(), self.attention_weights.bias.float())
        return self.output_proj(out.to(query.dtype))

    def _sample(self, query, reference_points, value, spatial_shapes, off_w, off_b, att_w, att_b) -> torch.Tensor:
        batch, queries, _ = query.shape
        offsets = F.linear(query, off_w, off_b).view(batch, queries, self.heads, self.levels, self.points, 2)
        weights = F.linear(query, att_w, att_b).view(batch, queries, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(batch, queries, self.heads, self.levels, self.points)
        # offsets are in units of each level's cells: (w, h) normalise x and y
        extent = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :].to(offsets.dtype) + (
            offsets / extent[None, None, None, :, None, :])
        return deformable_sample(value, spatial_shapes, locations, weights)


def grid_reference_points(
    shapes: list[tuple[int, int]], levels: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Cell centres of each query grid in `shapes`, concatenated: (1, Σ h·w, levels, 2) as (x, y) in [0,1].

    All grids cover the same image, so a query's normalised centre is the same point in every level.
    """
    points = []
    for height, width in shapes:
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1))
    ref = torch.cat(points, dim=0)[None, :, None, :]
    return ref.expand(1, ref.shape[1], levels, 2)
