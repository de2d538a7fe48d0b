"""`type: vit`: the frozen ViT's block-group features without the spatial-semantic block (Table 3 "+ViT").

Design choice (the paper's text for this row could not be read): keep S3's output head and remove only
the trainable branch. The ViT runs all its blocks; the block-group outputs become the three scales by
bilinear upsampling followed by a BatchNorm each (as S3's output norms):

    f16 = BN(x after the last group)            (the ViT's final features, stride 16)
    f8  = BN(up2(x after group 2))
    f4  = BN(up4(x after group 1))

f16 takes the last group rather than group 3 (S3's tap) because without the spatial blocks nothing
else consumes the last group, and a ViT used as a plain backbone gives its final features. The
shallower groups feed the finer strides, as in S3. Cutie's own 1×1 projections (pix_feat_proj, key
projection, decoder feature processors) do the channel projection, so none is added here. The only
trainable parameters are the three BatchNorms (plus the ViT when `freeze_vit: false`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.config import PixelEncoderConfig
from model.encoders.vit_backbone import ViTEncoderBase, tokens_to_map


class ViTFeatureEncoder(ViTEncoderBase):
    def __init__(self, cfg: PixelEncoderConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        del drop_path  # no trainable residual branch to drop
        self._init_vit(cfg)
        dim = cfg.vit.embed_dim
        self.ms_dims = (dim, dim, dim)
        self.norm_f4 = nn.BatchNorm2d(dim)
        self.norm_f8 = nn.BatchNorm2d(dim)
        self.norm_f16 = nn.BatchNorm2d(dim)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"pixel encoder input {height}×{width}: pad H and W to multiples of 32")
        tokens, (grid_h, grid_w) = self.vit_tokens(image)
        maps = []
        for group in range(len(self.block_groups)):
            tokens = self.run_block_group(tokens, group)
            maps.append(tokens_to_map(tokens[:, 1:], grid_h, grid_w))
        f4 = F.interpolate(maps[0], scale_factor=4, mode="bilinear", align_corners=False)
        f8 = F.interpolate(maps[1], scale_factor=2, mode="bilinear", align_corners=False)
        return [self.norm_f16(maps[-1]), self.norm_f8(f8), self.norm_f4(f4)]
