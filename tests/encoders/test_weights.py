"""Round trips through `model.weights`: Depth-Anything V1/V2, DINOv2 and timm layouts; no partial loads."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from model.encoders import build_pixel_encoder, parse_pixel_encoder_config
from model.encoders.vit_backbone import build_vit
from model.weights import load_backbone_state_dict, load_backbone_weights
from tests.encoders.helpers import tiny

DIM, DEPTH, HEADS = 96, 4, 3

# Depth-Anything DPT head keys (spec section 7); only their prefix matters, they must be dropped.
V1_HEAD = [
    "depth_head.projects.0.weight",
    "depth_head.resize_layers.0.weight",
    "depth_head.scratch.layer1_rn.weight",
    "depth_head.scratch.refinenet1.out_conv.weight",
    "depth_head.scratch.output_conv1.weight",
    "depth_head.scratch.output_conv2.0.weight",
]
V2_HEAD = V1_HEAD + [
    "depth_head.scratch.output_conv2.2.weight",
    "depth_head.scratch.refinenet4.resConfUnit2.conv1.bias",
]


def dinov2_source_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DINOv2-layout ViT/14 at 518² (37×37 grid), tiny width, with a mask token."""
    torch.manual_seed(seed)
    source = VisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1.0,
        num_classes=0,
    )
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for key in state:  # make every tensor distinctive (LayerScale/LN start constant)
        state[key] = torch.randn_like(state[key])
    state["mask_token"] = torch.randn(1, DIM)
    return state


def depth_anything_state(version: int) -> dict[str, torch.Tensor]:
    state = {f"pretrained.{k}": v for k, v in dinov2_source_state(seed=version).items()}
    for key in V1_HEAD if version == 1 else V2_HEAD:
        state[key] = torch.randn(4, 4)
    return state


def tiny_encoder():
    return build_pixel_encoder(tiny(), drop_path=0.0)


def check_every_weight_arrived(encoder, source: dict[str, torch.Tensor], prefix: str) -> None:
    vit_state = encoder.vit.state_dict()
    for key, value in vit_state.items():
        original = source[prefix + key]
        if key == "patch_embed.proj.weight":
            assert original.shape[-2:] == (14, 14) and value.shape[-2:] == (16, 16)
            expected = F.interpolate(original, size=(16, 16), mode="bilinear", align_corners=True)
            assert torch.allclose(value, expected)
            # align_corners=True keeps the four corner taps exactly
            assert torch.equal(value[..., 0, 0], original[..., 0, 0])
            assert torch.equal(value[..., -1, -1], original[..., -1, -1])
        else:
            assert torch.equal(value, original), key
    assert torch.equal(encoder.vit.pos_embed, source[prefix + "pos_embed"])  # 37×37 grid kept intact


@pytest.mark.parametrize("version", [1, 2])
def test_depth_anything_round_trip(tmp_path, version):
    state = depth_anything_state(version)
    path = tmp_path / f"depth_anything_v{version}_vitb.pth"
    torch.save(state, path)
    encoder = tiny_encoder()
    report = load_backbone_weights(encoder, path)
    assert report.layout == "depth_anything"
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == sorted(encoder.vit.state_dict())
    assert report.dropped == sorted(["pretrained.mask_token", *(V1_HEAD if version == 1 else V2_HEAD)])
    assert report.resized == ["patch_embed.proj.weight (14, 14)->(16, 16)"]
    check_every_weight_arrived(encoder, state, "pretrained.")
    assert all(not p.requires_grad for p in encoder.vit.parameters()), "loading must not unfreeze the ViT"


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_plain_dinov2_and_timm_layouts(tmp_path, wrapper):
    state = dinov2_source_state()
    timm_state = {k: v for k, v in state.items() if k != "mask_token"}  # timm's converter pops it
    for name, payload in (("dinov2", state), ("timm", timm_state)):
        path = tmp_path / f"{name}.pth"
        torch.save(payload if wrapper is None else {wrapper: payload, "epoch": 3}, path)
        encoder = tiny_encoder()
        report = load_backbone_weights(encoder, path)
        assert report.layout == "vit"
        assert report.dropped == (["mask_token"] if name == "dinov2" else [])
        check_every_weight_arrived(encoder, state, "")


def test_chunked_dinov2_blocks_are_renamed():
    state = dinov2_source_state()
    chunked = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // 2}.{index}.", 1)
        chunked[key] = value
    encoder = tiny_encoder()
    load_backbone_state_dict(encoder, chunked)
    check_every_weight_arrived(encoder, state, "")


def test_missing_key_refuses_a_partial_load():
    state = depth_anything_state(1)
    del state["pretrained.blocks.2.ls1.gamma"]
    encoder = tiny_encoder()
    before = encoder.vit.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(ValueError, match=r"missing.*blocks\.2\.ls1\.gamma"):
        load_backbone_state_dict(encoder, state, source="ckpt.pth")
    assert torch.equal(encoder.vit.blocks[0].attn.qkv.weight, before), "nothing may be loaded on failure"


def test_unexpected_key_is_an_error_unless_allowed():
    state = depth_anything_state(2)
    state["pretrained.register_tokens"] = torch.randn(1, 4, DIM)
    with pytest.raises(ValueError, match="register_tokens"):
        load_backbone_state_dict(tiny_encoder(), state)
    report = load_backbone_state_dict(tiny_encoder(), state, allow_unexpected=True)
    assert report.unexpected == ["register_tokens"]


def test_wrong_vit_size_names_the_key():
    state = depth_anything_state(1)
    encoder = build_pixel_encoder(
        tiny(
            vit={"embed_dim": 48, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0},
            deform={"heads": 3, "points": 4},
        ),
        0.0,
    )
    with pytest.raises(ValueError, match="shape"):
        load_backbone_state_dict(encoder, state)


def test_absent_and_unreadable_files(tmp_path):
    missing = tmp_path / "depth_anything_vitb14.pth"
    with pytest.raises(FileNotFoundError, match="depth_anything_vitb14.pth"):
        load_backbone_weights(tiny_encoder(), missing)
    with pytest.raises(FileNotFoundError, match="depth_anything_vitb14.pth"):
        build_pixel_encoder(tiny(init="file", weights=str(missing)), 0.0)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_backbone_weights(tiny_encoder(), garbage)


def test_init_file_loads_at_build_time(tmp_path):
    state = depth_anything_state(1)
    path = tmp_path / "da.pth"
    torch.save(state, path)
    encoder = build_pixel_encoder(tiny(init="file", weights=str(path)), 0.0)
    check_every_weight_arrived(encoder, state, "pretrained.")


def test_resnet_init_file(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", pretrained=False)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in imagenet.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    encoder = build_pixel_encoder({"type": "resnet18", "init": "file", "weights": str(path)})
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet18.pth.*layer2\.0\.conv1\.weight"):
        build_pixel_encoder({"type": "resnet18", "init": "file", "weights": str(path)})


def _depth_anything_vitb_keys() -> set[str]:
    """The ViT keys of depth_anything_vitb14.pth as listed in spec section 7 (written out by hand)."""
    keys = {
        "pretrained.cls_token",
        "pretrained.pos_embed",
        "pretrained.mask_token",
        "pretrained.patch_embed.proj.weight",
        "pretrained.patch_embed.proj.bias",
        "pretrained.norm.weight",
        "pretrained.norm.bias",
    }
    per_block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    ]
    keys |= {f"pretrained.blocks.{i}.{name}" for i in range(12) for name in per_block}
    return keys


def test_real_size_key_names_match_depth_anything_and_timm_dinov2():
    """Full ViT-B: our names = the Depth-Anything list and timm's vit_base_patch14_dinov2 (meta, no memory)."""
    vit = build_vit(parse_pixel_encoder_config({"type": "vit_spatial_semantic", "init": "random"}))
    ours = vit.state_dict()
    assert {f"pretrained.{k}" for k in ours} | {"pretrained.mask_token"} == _depth_anything_vitb_keys()
    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch14_dinov2", pretrained=False).state_dict()
    assert set(reference) == set(ours)
    for key, value in reference.items():
        if key == "patch_embed.proj.weight":
            assert value.shape == (768, 3, 14, 14) and ours[key].shape == (768, 3, 16, 16)
        else:
            assert value.shape == ours[key].shape, key
    # a V1-layout dict sharing our tensors (no second copy of the 86.7 M weights), 14×14 kernel
    source = {f"pretrained.{k}": v for k, v in ours.items()}
    source["pretrained.patch_embed.proj.weight"] = torch.randn(768, 3, 14, 14)
    source["pretrained.mask_token"] = torch.zeros(1, 768)
    source["depth_head.scratch.output_conv2.2.weight"] = torch.zeros(1, 32, 1, 1)
    report = load_backbone_state_dict(vit, source, source="depth_anything_vitb14 (in memory)")
    assert len(report.loaded) == len(ours) == 4 + 2 + 12 * 14
    assert report.resized == ["patch_embed.proj.weight (14, 14)->(16, 16)"]
    assert vit.pos_embed.shape == (1, 1370, 768)


def test_loader_finds_the_vit_inside_a_network():
    network = torch.nn.Module()
    network.pixel_encoder = tiny_encoder()
    network.mask_encoder = timm.create_model("resnet18", pretrained=False)
    state = depth_anything_state(1)
    load_backbone_state_dict(network, state)
    check_every_weight_arrived(network.pixel_encoder, state, "pretrained.")
    network.second = tiny_encoder()
    with pytest.raises(ValueError, match="2 ViTs"):
        load_backbone_state_dict(network, state)
