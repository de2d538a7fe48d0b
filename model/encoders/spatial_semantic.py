"""S3's spatial-semantic encoder: a trainable conv branch that reads a frozen ViT (spec section 2.1).

Data flow for an input of H×W (h = H/16, w = W/16), C = ViT width:

    image ─► SpatialPriorModule ─► c1 (B,C,4h,4w) map, c = [c2 (stride 8) ; c3 (stride 16)] tokens
    image ─► ViT tokens x
    for each of 4 stages (ViT block groups, e.g. [0-2] [3-5] [6-8] [9-11]):
        x ← ViT blocks of the group (frozen, no grad)
        c ← SemanticInjection(c, CLS, mean patch token)       # "semantic embedding"
        c ← SpatialDependencyBlock(c, x)  (+2 extra in stage 4) # deformable attention + ConvFFN
    f4 = BN(ConvT(c2) + c1 + up4(x after stage 1))
    f8 = BN(c2 + up2(x after stage 2))
    f16 = BN(c3 + x after stage 3)

The ViT tokens are never modified by the trainable branch, so the ViT can stay frozen and gradient-free.
`type: vit_spatial` is the same without the semantic injection (the Table 3 "+spatial" row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from model.encoders.config import PixelEncoderConfig
from model.encoders.deformable import MultiScaleDeformableAttention, grid_reference_points
from model.encoders.vit_backbone import ViTEncoderBase, tokens_to_map


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """A small conv stem giving the base features at strides 4, 8 and 16, projected to the ViT width.

    BatchNorm layers are trainable (not frozen as in Cutie's ResNet); multi-rank training converts them (and the
    encoder's output norms) with `model.sync_batchnorm`, as the release does with SyncBatchNorm.
    """

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, width, 2),
            *_conv_bn_relu(width, width, 1),
            *_conv_bn_relu(width, width, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(width, 2 * width, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * width, 4 * width, 2))
        self.fc1 = nn.Conv2d(width, dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * width, dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * width, dim, kernel_size=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ c1 map (B,C,H/4,W/4), c2 tokens (B, H/8·W/8, C), c3 tokens (B, H/16·W/16, C)."""
        s4 = self.stem(image)
        s8 = self.conv2(s4)
        s16 = self.conv3(s8)
        c1 = self.fc1(s4)
        c2 = self.fc2(s8).flatten(2).transpose(1, 2)
        c3 = self.fc3(s16).flatten(2).transpose(1, 2)
        return c1, c2, c3


class SemanticInjection(nn.Module):
    """The base features attend to the ViT's global semantics: [CLS token ; mean patch token].

    Pre-norm multi-head attention with the residual taken on the *normed* features, as the release does
    (Cutie's CrossAttention style): c ← LN(c) + DropPath(MHA(LN(c), kv, kv)). No FFN.
    """

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the release's read_from_cls
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: torch.Tensor, cls_token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        semantic = torch.cat([cls_token, patches.mean(dim=1, keepdim=True)], dim=1)  # (B, 2, C)
        c = self.norm(c)
        attended, _ = self.attn(c, semantic, semantic, need_weights=False)
        return c + self.drop_path(attended)


class DepthwiseConvTwoScales(nn.Module):
    """A depthwise 3×3 conv shared by the stride-8 and stride-16 parts of the token sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        batch, _, dim = tokens.shape
        n8 = 4 * grid_h * grid_w
        s8 = tokens[:, :n8].transpose(1, 2).reshape(batch, dim, 2 * grid_h, 2 * grid_w)
        s16 = tokens[:, n8:].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        s8 = self.conv(s8).flatten(2)
        s16 = self.conv(s16).flatten(2)
        return torch.cat([s8, s16], dim=2).transpose(1, 2)


class ConvFFN(nn.Module):
    """Linear → depthwise 3×3 conv → GELU → Linear (768 → 192 → 768 for S3)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConvTwoScales(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), grid_h, grid_w)))


class SpatialDependencyBlock(nn.Module):
    """The base features read the ViT tokens by deformable attention, then a ConvFFN (both residual)."""

    def __init__(self, dim: int, heads: int, points: int, ffn_hidden: int, drop_path: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.value_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleDeformableAttention(dim, heads=heads, levels=1, points=points)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, ffn_hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, c: torch.Tensor, reference_points: torch.Tensor, patches: torch.Tensor, grid_h: int, grid_w: int
    ) -> torch.Tensor:
        read = self.attn(self.query_norm(c), reference_points, self.value_norm(patches), [(grid_h, grid_w)])
        c = c + self.drop_path(read)
        return c + self.drop_path(self.ffn(self.ffn_norm(c), grid_h, grid_w))


class InteractionStage(nn.Module):
    """What the trainable branch does after one ViT block group: semantic injection (optional), then the
    spatial dependency block(s).

    forward(c, tokens, grid, reference_points) → c, with `tokens` the [CLS; patches] output of the
    group's ViT blocks. A forward hook on a stage sees those tokens in its inputs and the updated base
    features `c` ([stride-8 ; stride-16] tokens) as its output (used by `model.visualize`).
    """

    def __init__(self, semantic: SemanticInjection | None, spatial: list[SpatialDependencyBlock]) -> None:
        super().__init__()
        self.semantic = semantic
        self.spatial = nn.ModuleList(spatial)

    def forward(
        self,
        c: torch.Tensor,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        reference_points: torch.Tensor,
    ) -> torch.Tensor:
        cls_token, patches = tokens[:, :1], tokens[:, 1:]
        if self.semantic is not None:
            c = self.semantic(c, cls_token, patches)
        for block in self.spatial:
            c = block(c, reference_points, patches, *grid)
        return c


class SpatialSemanticEncoder(ViTEncoderBase):
    """`type: vit_spatial_semantic` (full S3) or `type: vit_spatial` (no semantic injection)."""

    def __init__(self, cfg: PixelEncoderConfig, drop_path: float) -> None:
        super().__init__()
        self._init_vit(cfg)
        dim = cfg.vit.embed_dim
        self.ms_dims = (dim, dim, dim)
        self.spatial_prior = SpatialPriorModule(cfg.spatial_dim, dim)
        self.level_embed = nn.Parameter(torch.zeros(2, dim))  # stride 8, stride 16

        n_spatial = len(cfg.block_groups) + cfg.extra_blocks
        rates = torch.linspace(0.0, float(drop_path), n_spatial).tolist() if n_spatial > 1 else [drop_path]
        hidden = int(dim * cfg.ffn_ratio)

        def spatial_block(index: int) -> SpatialDependencyBlock:
            return SpatialDependencyBlock(dim, cfg.deform.heads, cfg.deform.points, hidden, rates[index])

        stages = []
        last = len(cfg.block_groups) - 1
        for group in range(len(cfg.block_groups)):
            semantic = SemanticInjection(dim, cfg.semantic_heads, rates[group]) if cfg.has_semantic else None
            blocks = [spatial_block(group)]
            if group == last:
                blocks += [spatial_block(last + 1 + k) for k in range(cfg.extra_blocks)]
            stages.append(InteractionStage(semantic, blocks))
        self.stages = nn.ModuleList(stages)

        self.up_s8_to_s4 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.norm_f4 = nn.BatchNorm2d(dim)
        self.norm_f8 = nn.BatchNorm2d(dim)
        self.norm_f16 = nn.BatchNorm2d(dim)
        self._init_trainable()

    def _init_trainable(self) -> None:
        """ViT-Adapter-style init for everything outside the ViT."""
        for name, module in self.named_modules():
            if name == "vit" or name.startswith("vit."):
                continue
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Normalised image (B,3,H,W), H and W multiples of 32 → [f16, f8, f4]."""
        height, width = image.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"pixel encoder input {height}×{width}: pad H and W to multiples of 32")
        c1, c2, c3 = self.spatial_prior(image)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1]], dim=1)
        tokens, (grid_h, grid_w) = self.vit_tokens(image)
        reference_points = grid_reference_points(
            [(2 * grid_h, 2 * grid_w), (grid_h, grid_w)], levels=1, device=image.device, dtype=torch.float32
        )  # fp32 whatever the weights' dtype: the deformable sampling runs in fp32
        vit_maps = []
        for group, stage in enumerate(self.stages):
            tokens = self.run_block_group(tokens, group)
            c = stage(c, tokens, (grid_h, grid_w), reference_points)
            vit_maps.append(tokens_to_map(tokens[:, 1:], grid_h, grid_w))

        n8 = 4 * grid_h * grid_w
        c2 = tokens_to_map(c[:, :n8], 2 * grid_h, 2 * grid_w)
        c3 = tokens_to_map(c[:, n8:], grid_h, grid_w)
        c1 = c1 + self.up_s8_to_s4(c2)
        # ViT features of stages 1-3 added at strides 4, 8, 16 (the last stage's are not used)
        c1 = c1 + F.interpolate(vit_maps[0], scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(vit_maps[1], scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + vit_maps[2]
        return [self.norm_f16(c3), self.norm_f8(c2), self.norm_f4(c1)]
