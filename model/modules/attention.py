"""Attention layers of the object transformer.

Queries q: (B·N, Q, C); pixels x: (B·N, HW, C); masks (B·N·heads, Q, HW) with True = blocked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.modules.group import ChannelAttentionResBlock


class PixelQueryCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention, residual taken on the normed input (Cutie's CrossAttention).

    Positional embeddings are added to the query and key, not the value. With `norm=False` no LayerNorm."""

    def __init__(self, dim: int, heads: int, norm: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor, mem: torch.Tensor, x_pe: torch.Tensor, mem_pe: torch.Tensor,
                attn_mask: torch.Tensor | None = None, *, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.norm(x)
        out, weights = self.attn(x + x_pe, mem + mem_pe, mem, attn_mask=attn_mask, need_weights=need_weights,
                                 average_attn_weights=False)
        return x + out, weights


class QuerySelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        qk = x + pe
        return x + self.attn(qk, qk, x, need_weights=False)[0]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(F.relu(self.linear1(self.norm(x))))


class PixelFeedForward(nn.Module):
    """The pixel branch's "FFN": a channel-attention residual conv block on the (B, N, C, H, W) map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = ChannelAttentionResBlock(dim, dim)

    def forward(self, pixel_flat: torch.Tensor, b: int, n: int, h: int, w: int) -> torch.Tensor:
        x = pixel_flat.view(b * n, h, w, -1).permute(0, 3, 1, 2).contiguous()
        x = self.conv(x)
        return x.view(b, n, -1, h, w)


class DiscriminativeQueryAttention(nn.Module):
    """S3's discriminative query (spec 2.3): each query, per head, reads the single pixel most cosine-similar to it
    among the pixels its mask allows (the first Q/2 queries: the object's foreground; the last Q/2: background),
    instead of a softmax-weighted average.

        q ← LN(q)
        x̂ = l2norm(x + x_pe),  q̂ = l2norm(q + q_pe)                (over all C channels)
        sim[b, h, n, k] = <x̂[b, n, head h], q̂[b, k, head h]>,  −inf where blocked
        proto[b, k, head h] = x̂[b, argmax_n sim[b, h, n, k], head h]
        out = final(l2norm(proj(proto ⊙ q̂), over the query axis) · alpha + proto)
        return q + out

    No value projection and no softmax: the pixels get gradient only through the gathered entries.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def similarity(self, q: torch.Tensor, x: torch.Tensor, q_pe: torch.Tensor, x_pe: torch.Tensor,
                   attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (x̂ (BN, HW, C), q̂ (BN, Q, C), masked similarity (BN, heads, HW, Q))."""
        bn, hw, c = x.shape
        nq = q.shape[1]
        d = c // self.heads
        xn = F.normalize(x + x_pe, dim=-1)
        qn = F.normalize(q + q_pe, dim=-1)
        sim = torch.einsum("bnhd,bqhd->bhnq", xn.view(bn, hw, self.heads, d), qn.view(bn, nq, self.heads, d))
        if attn_mask is not None:
            blocked = attn_mask.view(bn, self.heads, nq, hw).transpose(2, 3)
            sim = sim.masked_fill(blocked, float("-inf"))
        return xn, qn, sim

    def forward(self, q: torch.Tensor, x: torch.Tensor, q_pe: torch.Tensor, x_pe: torch.Tensor,
                attn_mask: torch.Tensor | None = None, *, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.norm(q)
        xn, qn, sim = self.similarity(q, x, q_pe, x_pe, attn_mask)
        bn, hw, c = xn.shape
        nq, d = q.shape[1], c // self.heads
        idx = sim.argmax(dim=2)  # (BN, heads, Q): the chosen pixel per query and head
        per_head = xn.view(bn, hw, self.heads, d).permute(0, 2, 1, 3)  # BN, heads, HW, d
        proto = torch.gather(per_head, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))  # BN, heads, Q, d
        proto = proto.permute(0, 2, 1, 3).reshape(bn, nq, c)
        out = F.normalize(self.proj(proto * qn), dim=1) * self.alpha + proto
        out = self.final(out)
        weights = None
        if need_weights:  # one-hot "attention" on the chosen pixels, (BN, heads, Q, HW)
            weights = torch.zeros(bn, self.heads, nq, hw, device=q.device, dtype=q.dtype)
            weights.scatter_(3, idx.unsqueeze(-1), 1.0)
        return q + out, weights
