"""Shapes, freezing, gradients and the pieces of the spatial-semantic encoder."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from model.encoders import build_pixel_encoder
from model.encoders.deformable import MultiScaleDeformableAttention, deformable_sample, grid_reference_points
from model.encoders.spatial_semantic import SemanticInjection, SpatialDependencyBlock
from model.encoders.vit_backbone import interpolate_pos_embed
from tests.encoders.helpers import tiny

VIT_KINDS = ["vit", "vit_spatial", "vit_spatial_semantic"]


@pytest.mark.parametrize("kind", VIT_KINDS)
def test_vit_encoders_give_three_strides(kind):
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny(kind), drop_path=0.1).eval()
    assert encoder.ms_dims == (96, 96, 96)
    with torch.no_grad():
        f16, f8, f4 = encoder(torch.randn(2, 3, 64, 96))
    assert f16.shape == (2, 96, 4, 6)
    assert f8.shape == (2, 96, 8, 12)
    assert f4.shape == (2, 96, 16, 24)
    assert all(torch.isfinite(f).all() for f in (f16, f8, f4))


@pytest.mark.parametrize(("kind", "dims"), [("resnet18", (256, 128, 64)), ("resnet50", (1024, 512, 256))])
def test_resnet_encoders(kind, dims):
    encoder = build_pixel_encoder({"type": kind, "init": "random"}, drop_path=0.0).eval()
    assert encoder.ms_dims == dims
    with torch.no_grad():
        feats = encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(dims[0], 4, 6), (dims[1], 8, 12), (dims[2], 16, 24)]


def test_input_must_be_padded_to_32():
    encoder = build_pixel_encoder(tiny(), 0.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(torch.randn(1, 3, 64, 80))


def test_bad_drop_path_rejected():
    with pytest.raises(ValueError, match="drop_path"):
        build_pixel_encoder(tiny(), drop_path=1.5)


@pytest.mark.parametrize("kind", ["vit_spatial", "vit_spatial_semantic"])
def test_frozen_vit_gets_no_gradient_and_every_trainable_one_does(kind):
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny(kind), drop_path=0.0).train()
    assert not encoder.vit.training, "a frozen ViT stays in eval mode inside train()"
    assert all(not p.requires_grad for p in encoder.vit.parameters())
    feats = encoder(torch.randn(2, 3, 64, 64))
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    for name, param in encoder.named_parameters():
        if name.startswith("vit."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            # Deformable-DETR init zeroes the offset/weight projections, so the query LayerNorm is
            # structurally zero-gradient at step 0; every other branch must already receive signal.
            if ".query_norm." not in name:
                assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_unfrozen_vit_trains_except_its_unused_final_norm():
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny(freeze_vit=False), drop_path=0.0).train()
    assert encoder.vit.training
    feats = encoder(torch.randn(1, 3, 64, 64))
    sum(f.square().mean() for f in feats).backward()
    for name, param in encoder.vit.named_parameters():
        if name.startswith("norm."):
            assert not param.requires_grad and param.grad is None
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_semantic_injection_only_in_the_semantic_variant():
    spatial = build_pixel_encoder(tiny("vit_spatial"), 0.0)
    full = build_pixel_encoder(tiny("vit_spatial_semantic"), 0.0)
    assert all(stage.semantic is None for stage in spatial.stages)
    assert all(isinstance(stage.semantic, SemanticInjection) for stage in full.stages)
    # the last stage holds 1 + extra_blocks spatial blocks, the others one each
    assert [len(stage.spatial) for stage in full.stages] == [1, 1, 1, 3]


def test_semantic_injection_reads_cls_and_mean_token():
    torch.manual_seed(0)
    block = SemanticInjection(dim=32, heads=4, drop_path=0.0).eval()
    c = torch.randn(2, 10, 32)
    cls_token, patches = torch.randn(2, 1, 32), torch.randn(2, 6, 32)
    out = block(c, cls_token, patches)
    # permuting the patches leaves their mean, hence the output, unchanged
    assert torch.allclose(out, block(c, cls_token, patches[:, torch.randperm(6)]), atol=1e-6)
    # a different CLS token changes it; the residual is on the normed features
    assert not torch.allclose(out, block(c, torch.randn(2, 1, 32), patches))
    normed = block.norm(c)
    assert torch.allclose(
        out
        - block.attn(normed, *(2 * [torch.cat([cls_token, patches.mean(1, True)], 1)]), need_weights=False)[
            0
        ],
        normed,
        atol=1e-5,
    )


def test_drop_path_linear_over_the_spatial_blocks():
    encoder = build_pixel_encoder(tiny(), drop_path=0.15)
    rates = [
        block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
        for stage in encoder.stages
        for block in stage.spatial
    ]
    assert rates == pytest.approx([0.0, 0.03, 0.06, 0.09, 0.12, 0.15])
    semantic = [s.semantic.drop_path for s in encoder.stages]
    assert [getattr(d, "drop_prob", 0.0) for d in semantic] == pytest.approx([0.0, 0.03, 0.06, 0.09])


def test_pos_embed_interpolation():
    table = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(table, 37, 37) is table
    out = interpolate_pos_embed(table, 30, 54)
    assert out.shape == (1, 1 + 30 * 54, 8)
    assert torch.equal(out[:, 0], table[:, 0])  # CLS position untouched
    constant = torch.ones(1, 1 + 37 * 37, 4) * 3.0
    assert torch.allclose(
        interpolate_pos_embed(constant, 30, 54), torch.full((1, 1 + 30 * 54, 4), 3.0), atol=1e-5
    )


def _naive_bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map (D, h, w); (x, y) in [0,1] of the extent, zero outside — the align_corners=False convention."""
    dim, height, width = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(dim)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * value_map[:, yy, xx]
    return out


def test_deformable_sample_matches_a_naive_loop():
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    batch, heads, dim, queries, points = 2, 2, 3, 5, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.2 - 0.1  # some outside
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    out = deformable_sample(value, shapes, locations, weights)
    assert out.shape == (batch, queries, heads * dim)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                expected = torch.zeros(dim)
                for level, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[level] : starts[level] + h * w, m].T.reshape(dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected += weights[b, q, m, level, p] * _naive_bilinear(vmap, x, y)
                assert torch.allclose(out[b, q, m * dim : (m + 1) * dim], expected, atol=1e-5)


def test_deformable_attention_at_cell_centres_reads_that_cell():
    """Zero offsets, one point: a query at cell (i, j) reads exactly the projected value of cell (i, j)."""
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(dim=8, heads=2, levels=1, points=1)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    h, w = 3, 5
    value = torch.randn(1, h * w, 8)
    ref = grid_reference_points([(h, w)], levels=1, device=torch.device("cpu"))
    out = attn(torch.randn(1, h * w, 8), ref, value, [(h, w)])
    assert torch.allclose(out, attn.output_proj(attn.value_proj(value)), atol=1e-5)


def test_reference_points_are_cell_centres():
    ref = grid_reference_points([(4, 4), (2, 2)], levels=1, device=torch.device("cpu"))
    assert ref.shape == (1, 20, 1, 2)
    assert torch.allclose(ref[0, 0, 0], torch.tensor([0.125, 0.125]))
    assert torch.allclose(ref[0, 16, 0], torch.tensor([0.25, 0.25]))  # first stride-16 cell = 2×2 block


def test_spatial_block_convffn_mixes_neighbours_at_both_scales():
    torch.manual_seed(0)
    block = SpatialDependencyBlock(dim=12, heads=3, points=2, ffn_hidden=4, drop_path=0.0).eval()
    gh, gw = 2, 3
    tokens = torch.zeros(1, 5 * gh * gw, 12)
    out_ffn = block.ffn(tokens, gh, gw)
    poked = tokens.clone()
    poked[0, 0] = 1.0  # top-left stride-8 cell
    delta = (block.ffn(poked, gh, gw) - out_ffn).abs().sum(-1)[0]
    n8 = 4 * gh * gw
    assert delta[0] > 0 and delta[1] > 0 and delta[2 * gw] > 0  # right and lower neighbours
    assert delta[n8:].sum() == 0  # stride-16 tokens are a separate image


@pytest.mark.slow
def test_full_s3_encoder_counts_and_davis_shape():
    """Spec 2.1: 22.18 M trainable, 86.72 M frozen ViT (±2%); a padded DAVIS frame 480×864."""
    torch.manual_seed(0)
    encoder = build_pixel_encoder({"type": "vit_spatial_semantic", "init": "random"}, drop_path=0.15)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in encoder.parameters() if not p.requires_grad)
    print(f"S3 encoder: trainable {trainable / 1e6:.3f} M, frozen {frozen / 1e6:.3f} M")
    assert trainable == pytest.approx(22.18e6, rel=0.02)
    assert frozen == pytest.approx(86.72e6, rel=0.02)
    assert encoder.ms_dims == (768, 768, 768)
    assert encoder.vit.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert encoder.vit.pos_embed.shape == (1, 1370, 768)
    encoder.eval()
    with torch.no_grad():
        f16, f8, f4 = encoder(torch.randn(1, 3, 480, 864))
    assert (f16.shape, f8.shape, f4.shape) == ((1, 768, 30, 54), (1, 768, 60, 108), (1, 768, 120, 216))


def test_bf16_autocast_forward_backward_is_finite():
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny(), drop_path=0.15).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = encoder(torch.randn(2, 3, 64, 64))
    sum(f.float().square().mean() for f in feats).backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
