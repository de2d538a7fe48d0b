"""`model.visualize`: feature maps of every stage rendered as PNGs through forward hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.encoders import build_pixel_encoder
from model.visualize import capture_feature_maps, pca_rgb, read_frame, render_feature_maps
from tests.encoders.helpers import tiny


def _frame(tmp_path, h=70, w=100):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)  # a flat left half
    path = tmp_path / "frame.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def test_pca_separates_two_regions():
    feature = torch.zeros(8, 4, 6)
    feature[:, :, :3] = torch.randn(8, 1, 1)
    feature[:, :, 3:] = torch.randn(8, 1, 1)
    picture = pca_rgb(feature)
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    assert (picture[:, :3] == picture[0, 0]).all() and (picture[:, 3:] == picture[0, 5]).all()
    assert not np.array_equal(picture[0, 0], picture[0, 5])


def test_capture_every_stage_and_crop_to_the_image(tmp_path):
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny(), drop_path=0.0).train()
    rgb = read_frame(_frame(tmp_path), short_side=None)  # 70×100 → padded to 96×128
    maps = capture_feature_maps(encoder, rgb)
    assert encoder.training, "the encoder's mode is restored"
    expected = {
        "output_f16",
        "output_f8",
        "output_f4",
        "stage0_spatial_prior_s4",
        "stage0_spatial_prior_s8",
        "stage0_spatial_prior_s16",
    }
    for stage in range(1, 5):
        expected |= {
            f"stage{stage}_vit_s16",
            f"stage{stage}_spatial_semantic_s8",
            f"stage{stage}_spatial_semantic_s16",
        }
    assert set(maps) == expected
    assert maps["output_f16"].shape == (96, 5, 7)  # ceil(70/16), ceil(100/16)
    assert maps["stage2_spatial_semantic_s8"].shape == (96, 9, 13)
    assert maps["output_f4"].shape == (96, 18, 25)
    # hooks are gone afterwards
    assert not any(m._forward_hooks for m in encoder.modules())


def test_render_writes_pngs(tmp_path):
    torch.manual_seed(0)
    encoder = build_pixel_encoder(tiny("vit_spatial"), drop_path=0.0)
    rgb = read_frame(_frame(tmp_path), short_side=64)
    out = tmp_path / "viz"
    written = render_feature_maps(encoder, rgb, out)
    index = json.loads((out / "index.json").read_text())
    assert index["image_size"] == [64, 91]
    assert len(index["maps"]) == 18
    for path in written:
        assert path.is_file(), path
    for entry in index["maps"].values():
        for kind in ("pca", "norm"):
            picture = cv2.imread(str(out / entry[kind]))
            assert picture.shape == (64, 91, 3)
    stage_vit = cv2.imread(str(out / index["maps"]["stage4_vit_s16"]["pca"]))
    assert stage_vit.std() > 0, "a rendered map is not flat"
    assert cv2.imread(str(out / "overview.png")) is not None


def _core_landed() -> bool:
    root = Path(__file__).resolve().parents[2]
    return (root / "model" / "config.py").is_file() and (root / "model" / "configs" / "tiny.yaml").is_file()


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _core_landed(), reason="model.config / configs/tiny.yaml not in the tree yet")
def test_cli_on_tiny_config_with_a_depth_anything_file(tmp_path, monkeypatch):
    """`--weights` with a Depth-Anything file: the encoder the command renders holds the file's ViT tensors (the
    `pretrained.` keys, the 14x14 patch kernel resized to 16x16) and nothing else changes; so, from the same seed,
    the ViT maps differ from a run without `--weights` while everything outside the ViT is the same."""
    from model import build_network, visualize
    from model.config import load_model_config
    from model.weights import find_vit, resize_patch_kernel

    network = build_network(load_model_config("tiny", {"pixel_encoder": {"init": "random", "weights": None}}))
    vit_state = find_vit(network).state_dict()
    torch.manual_seed(1)
    state = {f"pretrained.{k}": torch.randn_like(v) for k, v in vit_state.items()}
    kernel = state["pretrained.patch_embed.proj.weight"]
    state["pretrained.patch_embed.proj.weight"] = torch.randn(*kernel.shape[:2], 14, 14)
    state["pretrained.mask_token"] = torch.zeros(1, kernel.shape[0])
    state["depth_head.scratch.output_conv2.2.weight"] = torch.zeros(1, 4, 1, 1)
    weights = tmp_path / "depth_anything_tiny.pth"
    torch.save(state, weights)
    image = _frame(tmp_path)

    # The command line (in-process: its entry point is `main`, `python -m` runs in the test below), with a spy on
    # what it renders: the encoder it built and the maps of that encoder.
    rendered: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
    real_render = visualize.render_feature_maps

    def spy(encoder, rgb, out_dir):
        rendered[Path(out_dir).name] = (encoder, capture_feature_maps(encoder, rgb))
        return real_render(encoder, rgb, out_dir)

    monkeypatch.setattr(visualize, "render_feature_maps", spy)
    common = ["--config", "tiny", "--image", str(image), "--size", "64"]
    torch.manual_seed(0)
    assert visualize.main([*common, "--weights", str(weights), "--out", str(tmp_path / "viz")]) == 0
    torch.manual_seed(0)  # the same random init: the file is the only difference
    assert visualize.main([*common, "--out", str(tmp_path / "plain")]) == 0

    encoder, maps = rendered["viz"]
    plain_encoder, plain_maps = rendered["plain"]
    vit = find_vit(encoder).state_dict()
    assert torch.equal(vit["blocks.0.attn.qkv.weight"], state["pretrained.blocks.0.attn.qkv.weight"]), \
        "--weights: the rendered encoder's ViT does not hold the file's blocks.0.attn.qkv.weight"
    for key, value in vit.items():
        want = state[f"pretrained.{key}"]
        if key == "patch_embed.proj.weight":
            assert value.shape[-2:] == (16, 16)
            want = resize_patch_kernel(want, (16, 16))
        assert torch.equal(value, want), f"--weights: ViT tensor {key} is not the file's pretrained.{key}"
    vit_keys = {f"vit.{k}" for k in vit}
    own, plain = encoder.state_dict(), plain_encoder.state_dict()
    assert vit_keys <= set(own) and own.keys() == plain.keys()
    changed = sorted(k for k in own if not torch.equal(own[k], plain[k]))
    assert set(changed) <= vit_keys, f"--weights changed tensors outside the ViT: {changed[:5]}"
    for stage in range(1, 5):
        name = f"stage{stage}_vit_s16"
        assert maps[name].shape == plain_maps[name].shape
        assert not torch.allclose(maps[name], plain_maps[name]), f"{name}: the same map with and without --weights"

    out = tmp_path / "viz"
    index = json.loads((out / "index.json").read_text())
    assert index["image_size"] == [64, 91]
    assert {"output_f16", "output_f8", "output_f4"} <= set(index["maps"])
    for entry in index["maps"].values():
        assert cv2.imread(str(out / entry["pca"])).shape == (64, 91, 3)


@pytest.mark.timeout(60)
def test_cli_missing_image_is_a_clear_error(tmp_path):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.visualize",
            "--config",
            "tiny",
            "--image",
            str(tmp_path / "nope.jpg"),
            "--out",
            str(tmp_path / "viz"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "nope.jpg" in done.stderr
