"""Small encoder configs shared by the encoder tests."""

from __future__ import annotations

import copy

TINY_SPATIAL_SEMANTIC = {
    "type": "vit_spatial_semantic",
    "init": "random",
    "weights": None,
    "vit": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0},
    "block_groups": [[0, 0], [1, 1], [2, 2], [3, 3]],
    "freeze_vit": True,
    "spatial_dim": 16,
    "deform": {"heads": 3, "points": 4},
    "ffn_ratio": 0.25,
    "extra_blocks": 2,
}


def tiny(kind: str = "vit_spatial_semantic", **changes) -> dict:
    cfg = copy.deepcopy(TINY_SPATIAL_SEMANTIC)
    cfg["type"] = kind
    if kind == "vit_spatial":
        pass
    elif kind == "vit":
        for key in ("spatial_dim", "deform", "ffn_ratio", "extra_blocks"):
            cfg.pop(key)
    cfg.update(changes)
    return cfg
