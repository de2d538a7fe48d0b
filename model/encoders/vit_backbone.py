"""The Depth-Anything / DINOv2 ViT run at stride 16, built with timm.

The checkpoint is a ViT-B/14 trained at 518² (a 37×37 position grid). S3 runs it with a 16×16 patch
kernel (the 14×14 kernel bilinearly resized when loading, see `model.weights`) so that its tokens sit on
the stride-16 grid of the Cutie decoder. The model is created with img_size 37·16 = 592, so `pos_embed`
keeps the checkpoint's (1, 1 + 37², C) shape; at run time the 37×37 grid is interpolated bicubically to
the input's grid with DINOv2's +0.1 offset.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model.encoders.config import PixelEncoderConfig

PATCH_SIZE = 16
PRETRAIN_GRID = 37  # DINOv2 / Depth-Anything: 518 / 14
LAYER_SCALE_INIT = 1e-5  # timm's DINOv2 value; overwritten by any checkpoint


def build_vit(cfg: PixelEncoderConfig) -> VisionTransformer:
    """A timm ViT with the DINOv2 layout (CLS token, LayerScale, qkv bias, LayerNorm eps 1e-6), no head."""
    shape = cfg.vit
    return VisionTransformer(
        img_size=PRETRAIN_GRID * PATCH_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_ratio=shape.mlp_ratio,
        qkv_bias=True,
        init_values=LAYER_SCALE_INIT,
        num_classes=0,
        global_pool="token",
        class_token=True,
        dynamic_img_size=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=0.0,
    )


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + M², C) position table → (1, 1 + grid_h·grid_w, C), DINOv2's bicubic with a +0.1 offset.

    The offset makes `F.interpolate` map coordinates with scale (grid+0.1)/M, as DINOv2 does, which is
    slightly different from timm's `resample_abs_pos_embed`.
    """
    n_patches = pos_embed.shape[1] - 1
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise ValueError(f"pos_embed holds {n_patches} patch positions, not a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
        mode="bicubic",
        align_corners=False,
    )
    if grid.shape[-2:] != (grid_h, grid_w):  # float rounding in the scale factor
        raise RuntimeError(
            f"position grid interpolated to {tuple(grid.shape[-2:])}, wanted {(grid_h, grid_w)}"
        )
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class ViTEncoderBase(nn.Module):
    """Shared by the ViT-based encoders: owns `self.vit`, freezing, tokenising and block groups.

    When frozen (`freeze_vit: true`, the default) the ViT has requires_grad False, stays in eval mode
    even inside `network.train()`, and runs under `torch.no_grad()`. Its final `norm` is never used by
    any encoder, so it is frozen in every case (an unfrozen but unused parameter would get no gradient).
    """

    def _init_vit(self, cfg: PixelEncoderConfig) -> None:
        self.vit = build_vit(cfg)
        self.block_groups = cfg.block_groups
        self.freeze_vit = cfg.freeze_vit
        if self.freeze_vit:
            self.vit.requires_grad_(False)
            self.vit.eval()
        self.vit.norm.requires_grad_(False)

    def train(self, mode: bool = True):  # noqa: D102 - keeps a frozen ViT in eval mode
        super().train(mode)
        if self.freeze_vit:
            self.vit.eval()
        return self

    def vit_tokens(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised image (B,3,H,W) → [CLS; patches] tokens (B, 1 + h·w, C) and the grid (h, w)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vit):
            patches = self.vit.patch_embed.proj(image)  # (B, C, H/16, W/16)
            grid_h, grid_w = patches.shape[-2:]
            patches = patches.flatten(2).transpose(1, 2)
            pos = interpolate_pos_embed(self.vit.pos_embed, grid_h, grid_w)
            cls = self.vit.cls_token.expand(patches.shape[0], -1, -1)
            tokens = torch.cat([cls, patches], dim=1) + pos
            tokens = self.vit.norm_pre(self.vit.pos_drop(tokens))
        return tokens, (grid_h, grid_w)

    def run_block_group(self, tokens: torch.Tensor, group: int) -> torch.Tensor:
        """Apply ViT blocks `block_groups[group]` (inclusive range) to [CLS; patches] tokens."""
        first, last = self.block_groups[group]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vit):
            for index in range(first, last + 1):
                tokens = self.vit.blocks[index](tokens)
        return tokens


def tokens_to_map(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Patch tokens (B, h·w, C) → map (B, C, h, w)."""
    batch, _, dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
