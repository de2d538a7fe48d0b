"""The `pixel_encoder:` block fails at start-up with the bad key named."""

from __future__ import annotations

import pytest

from model.encoders.config import default_block_groups, parse_pixel_encoder_config
from tests.encoders.helpers import tiny


def test_defaults_are_the_s3_vit_b():
    cfg = parse_pixel_encoder_config({"type": "vit_spatial_semantic", "init": "random"})
    assert (cfg.vit.embed_dim, cfg.vit.depth, cfg.vit.num_heads) == (768, 12, 12)
    assert cfg.block_groups == ((0, 2), (3, 5), (6, 8), (9, 11))
    assert (cfg.deform.heads, cfg.deform.points, cfg.spatial_dim, cfg.extra_blocks) == (12, 4, 64, 2)
    assert cfg.freeze_vit and cfg.semantic_heads == 12 and cfg.has_semantic and cfg.has_spatial


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({**tiny(), "bogus": 1}, "bogus"),
        ({**tiny(), "vit": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4, "x": 1}}, "'x'"),
        ({**tiny(), "deform": {"heads": 3, "levels": 2}}, "levels"),
        ({**tiny("vit"), "spatial_dim": 16}, "spatial_dim"),
        ({"type": "resnet50", "init": "random", "freeze_vit": True}, "freeze_vit"),
        ({**tiny("vit_spatial"), "semantic_heads": 3}, "semantic_heads"),
        ({"type": "resnet34", "init": "random"}, "pixel_encoder.type"),
        ({"init": "random"}, "pixel_encoder.type"),
        ({"type": "resnet50", "init": "file"}, "pixel_encoder.weights"),
        ({"type": "resnet50", "init": "random", "weights": "x.pth"}, "pixel_encoder.weights"),
        ({"type": "resnet50", "init": "pretrained"}, "pixel_encoder.init"),
        ({**tiny(), "block_groups": [[0, 0], [1, 1], [2, 3]]}, "block_groups"),
        ({**tiny(), "block_groups": [[0, 0], [2, 2], [1, 1], [3, 3]]}, "block_groups"),
        ({**tiny(), "block_groups": [[0, 0], [1, 1], [2, 2], [3, 4]]}, "block_groups"),
        ({**tiny(), "deform": {"heads": 5}}, "deform.heads"),
        ({**tiny(), "vit": {"embed_dim": 96, "depth": 4, "num_heads": 5, "mlp_ratio": 4}}, "vit.num_heads"),
        ({**tiny(), "vit": {"embed_dim": 96, "depth": 4}}, "missing"),
        ({**tiny(), "freeze_vit": "yes"}, "freeze_vit"),
        ({**tiny(), "extra_blocks": -1}, "extra_blocks"),
        ({**tiny(), "spatial_dim": 0}, "spatial_dim"),
    ],
)
def test_bad_config_names_the_key(raw, named):
    with pytest.raises(ValueError, match=named):
        parse_pixel_encoder_config(raw)


def test_block_groups_default_needs_multiple_of_four():
    assert default_block_groups(4) == ((0, 0), (1, 1), (2, 2), (3, 3))
    raw = tiny(vit={"embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4})
    del raw["block_groups"]
    with pytest.raises(ValueError, match="vit.depth"):
        parse_pixel_encoder_config(raw)
