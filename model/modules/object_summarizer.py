"""Object summarizer (Cutie): per object, Q summaries = masked, sigmoid-weighted poolings of the mask values.

The first Q/2 summaries pool over the object's (soft) foreground, the last Q/2 over its background. Each summary
is (sum of weighted features ‖ total weight); the memory sums these over frames and divides at read time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.modules.mask_encoder import full_precision
from model.modules.positional_encoding import SinePositionalEncoding


class ObjectSummarizer(nn.Module):
    def __init__(self, value_dim: int, embed_dim: int, num_summaries: int, add_pe: bool, pe_scale: float,
                 pe_temperature: float) -> None:
        super().__init__()
        self.num_summaries = num_summaries
        self.pos_enc = SinePositionalEncoding(embed_dim, pe_scale, pe_temperature) if add_pe else None
        self.input_proj = nn.Linear(value_dim, embed_dim)
        self.feature_pred = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True),
                                          nn.Linear(embed_dim, embed_dim))
        self.weights_pred = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True),
                                          nn.Linear(embed_dim, num_summaries))

    def forward(self, masks: torch.Tensor, value: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """masks (B, N, H, W) at image resolution; value (B, N, CV, h, w) → summaries (B, N, Q, C + 1)."""
        h, w = value.shape[-2:]
        masks = F.interpolate(masks.float(), size=(h, w), mode="area").unsqueeze(-1)  # B, N, h, w, 1
        half = self.num_summaries // 2
        allowed = torch.cat([masks.expand(-1, -1, -1, -1, half), (1 - masks).expand(-1, -1, -1, -1, half)], -1)
        feats = self.input_proj(value.permute(0, 1, 3, 4, 2))  # B, N, h, w, C
        if self.pos_enc is not None:
            feats = feats + self.pos_enc(h, w, feats.device, feats.dtype)
        with full_precision(feats):
            dtype = self.feature_pred[0].weight.dtype
            feats = feats.to(dtype)
            feature = self.feature_pred(feats)
            logits = self.weights_pred(feats)
            weights = logits.sigmoid() * allowed.to(dtype)
            sums = torch.einsum("bnhwq,bnhwc->bnqc", weights, feature)
            area = weights.flatten(2, 3).sum(2).unsqueeze(-1)
        return torch.cat([sums, area], -1), (logits if need_weights else None)
