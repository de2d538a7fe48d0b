"""Parameter counts of the paper's rows against the reference builds (spec section 2.2), within 2%."""

from __future__ import annotations

import pytest

from model import build_network, load_model_config
from model.summary import RANDOM_ENCODER, count_parameters

# name → (total, trainable, frozen) in millions, from the spec's CPU build of the release (Cutie for cutie_base)
REFERENCE = {
    "s3": (140.8, 54.0, 86.7),
    "cutie_base": (35.0, 35.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_counts_match_the_reference_build(name):
    net = build_network(load_model_config(name, RANDOM_ENCODER))
    counts = count_parameters(net)
    total, trainable, frozen = (counts[k] / 1e6 for k in ("total", "trainable", "frozen"))
    print(f"{name}: total {total:.2f} M, trainable {trainable:.2f} M, frozen {frozen:.2f} M")
    ref_total, ref_trainable, ref_frozen = REFERENCE[name]
    assert total == pytest.approx(ref_total, rel=0.02)
    assert trainable == pytest.approx(ref_trainable, rel=0.02)
    assert frozen == pytest.approx(ref_frozen, rel=0.02, abs=1e-6)
    if name == "s3":
        encoder = count_parameters(net.pixel_encoder)
        print(f"s3 spatial-semantic encoder: {encoder['trainable'] / 1e6:.2f} M trainable")
        assert encoder["trainable"] / 1e6 == pytest.approx(22.2, rel=0.02)
        blocks = count_parameters(net.object_transformer.blocks)["total"] / 5 / 1e6
        assert blocks == pytest.approx(2.89, rel=0.02)  # per object-transformer block
