"""Validation helpers: the training wrapper's prefix is stripped from consolidated weights, overlays are drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.validation import overlay, strip_wrapper_prefix


class Wrapper(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.network = net
        self.loss_weight = torch.nn.Parameter(torch.ones(1))  # wrapper-only state is dropped


def test_strip_wrapper_prefix():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    wrapped = Wrapper(net).state_dict()
    stripped = strip_wrapper_prefix(wrapped, net)
    assert set(stripped) == set(net.state_dict())
    assert torch.equal(stripped["0.weight"], net[0].weight)
    assert strip_wrapper_prefix(net.state_dict(), net).keys() == net.state_dict().keys()  # already plain
    with pytest.raises(KeyError, match="does not hold the network's weights"):
        strip_wrapper_prefix({"other.weight": torch.zeros(1)}, net)


def test_overlay_colours_only_the_objects():
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0], mask[1, 1] = 1, 2
    out = overlay(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[2:, 2:] == 100).all()
    assert not np.array_equal(out[0, 0], out[1, 1]) and not (out[0, 0] == 100).all()
