"""Cutie's object transformer (query transformer), with S3's discriminative query read in every block.

Each block: queries read the pixels (discriminative-query argmax read in S3, masked softmax cross-attention in
Cutie) → query self-attention → FFN → pixels read the queries (cross-attention) → pixel FFN. Before the blocks and
after each one a 1×1 head predicts per-object mask logits (auxiliary outputs); they also build the next block's
foreground/background attention masks.
"""

from __future__ import annotations

import torch
from torch import nn

from model.modules.attention import (
    DiscriminativeQueryAttention,
    FeedForward,
    PixelFeedForward,
    PixelQueryCrossAttention,
    QuerySelfAttention,
)
from model.modules.group import GroupConv2d, soft_aggregate
from model.modules.positional_encoding import SinePositionalEncoding


class ObjectTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, discriminative_query: bool) -> None:
        super().__init__()
        if discriminative_query:
            self.read_from_pixel: nn.Module = DiscriminativeQueryAttention(dim, heads)
        else:
            self.read_from_pixel = PixelQueryCrossAttention(dim, heads, norm=True)
        self.self_attn = QuerySelfAttention(dim, heads)
        self.ffn = FeedForward(dim, ff_dim)
        self.read_from_query = PixelQueryCrossAttention(dim, heads, norm=False)
        self.pixel_ffn = PixelFeedForward(dim)

    def forward(self, query: torch.Tensor, pixel: torch.Tensor, query_pe: torch.Tensor, pixel_pe: torch.Tensor,
                attn_mask: torch.Tensor, need_weights: bool = False):
        b, n, _, h, w = pixel.shape
        pixel_flat = pixel.flatten(3, 4).flatten(0, 1).transpose(1, 2).contiguous()  # BN, HW, C
        query, q_weights = self.read_from_pixel(query, pixel_flat, query_pe, pixel_pe, attn_mask,
                                                need_weights=need_weights)
        query = self.ffn(self.self_attn(query, query_pe))
        pixel_flat, p_weights = self.read_from_query(pixel_flat, query, pixel_pe, query_pe,
                                                     need_weights=need_weights)
        return query, self.pixel_ffn(pixel_flat, b, n, h, w), q_weights, p_weights


class ObjectTransformer(nn.Module):
    def __init__(self, embed_dim: int, num_queries: int, num_heads: int, ff_dim: int, num_blocks: int,
                 discriminative_query: bool, pe_scale: float, pe_temperature: float) -> None:
        super().__init__()
        self.embed_dim, self.num_queries, self.num_heads = embed_dim, num_queries, num_heads
        self.query_init = nn.Embedding(num_queries, embed_dim)
        self.query_emb = nn.Embedding(num_queries, embed_dim)
        self.summary_to_query_init = nn.Linear(embed_dim, embed_dim)
        self.summary_to_query_emb = nn.Linear(embed_dim, embed_dim)
        self.pixel_init_proj = GroupConv2d(embed_dim, embed_dim, kernel_size=1)
        self.pixel_emb_proj = GroupConv2d(embed_dim, embed_dim, kernel_size=1)
        self.spatial_pe = SinePositionalEncoding(embed_dim, pe_scale, pe_temperature)
        self.blocks = nn.ModuleList(
            ObjectTransformerBlock(embed_dim, num_heads, ff_dim, discriminative_query) for _ in range(num_blocks))
        self.mask_pred = nn.ModuleList(
            nn.Sequential(nn.ReLU(), GroupConv2d(embed_dim, 1, kernel_size=1)) for _ in range(num_blocks + 1))

    def forward(self, pixel: torch.Tensor, obj_summaries: torch.Tensor | None,
                selector: torch.Tensor | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, dict[str, object]]:
        """pixel (B, N, C, h, w); obj_summaries (B, N, T, Q, C + 1) (summed over T here; None = no memory);
        selector (B, N, 1, 1) → (pixel readout (B, N, C, h, w), {"logits": [aux (B, N, h, w)] × (blocks + 1),
        "attn_mask": (B, N, Q, h, w) of the first head, "q_weights", "p_weights" of the last block})."""
        b, n, _, h, w = pixel.shape
        if obj_summaries is None:
            obj_values = pixel.new_zeros(b * n, self.num_queries, self.embed_dim)
        else:
            s = obj_summaries.reshape(b * n, obj_summaries.shape[2], self.num_queries, self.embed_dim + 1)
            obj_values = (s[..., :-1].sum(1) / (s[..., -1:].sum(1) + 1e-4)).to(pixel.dtype)
        query = self.query_init.weight.unsqueeze(0) + self.summary_to_query_init(obj_values)
        query_pe = self.query_emb.weight.unsqueeze(0) + self.summary_to_query_emb(obj_values)

        pixel_emb = self.pixel_emb_proj(pixel).flatten(3, 4).flatten(0, 1).transpose(1, 2)  # BN, HW, C
        pe = self.spatial_pe(h, w, pixel.device, pixel.dtype).flatten(0, 1).unsqueeze(0)  # 1, HW, C
        pixel_pe = pe + pixel_emb
        pixel = self.pixel_init_proj(pixel)

        logits = self.mask_pred[0](pixel).squeeze(2)
        attn_mask = self.attention_mask(logits, selector)
        aux: dict[str, object] = {"logits": [logits]}
        q_weights = p_weights = None
        for i, block in enumerate(self.blocks):
            query, pixel, q_weights, p_weights = block(query, pixel, query_pe, pixel_pe, attn_mask, need_weights)
            logits = self.mask_pred[i + 1](pixel).squeeze(2)
            attn_mask = self.attention_mask(logits, selector)
            aux["logits"].append(logits)  # type: ignore[union-attr]
        aux["q_weights"], aux["p_weights"] = q_weights, p_weights
        aux["attn_mask"] = attn_mask.view(b, n, self.num_heads, self.num_queries, h, w)[:, :, 0]
        return pixel, aux

    def attention_mask(self, logits: torch.Tensor, selector: torch.Tensor | None) -> torch.Tensor:
        """(B, N, h, w) aux logits → (B·N·heads, Q, h·w) bool, True = blocked. An object's foreground is where it
        wins the soft-aggregated argmax; the first Q/2 queries see only it, the last Q/2 only its complement.
        A fully blocked row is unblocked."""
        prob = logits.float().sigmoid()
        if selector is not None:
            prob = prob * selector.float()
        agg = soft_aggregate(prob, dim=1)
        foreground = (agg[:, 1:] >= agg.max(dim=1, keepdim=True)[0]).flatten(2)  # B, N, HW
        half = self.num_queries // 2
        fg_rows = (~foreground)[:, :, None, None].expand(-1, -1, self.num_heads, half, -1)
        bg_rows = foreground[:, :, None, None].expand(-1, -1, self.num_heads, half, -1)
        mask = torch.cat([fg_rows, bg_rows], 3).flatten(0, 2).clone()  # B·N·heads, Q, HW
        mask[mask.all(dim=-1)] = False
        return mask
