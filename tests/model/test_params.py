"""param_groups: frozen ViT excluded, trainable encoder at 0.1× LR, no weight decay on embeddings/norms/biases."""

from __future__ import annotations

import pytest
import torch

from model import build_network, load_model_config, param_groups


@pytest.fixture(scope="module")
def net():
    return build_network(load_model_config("tiny"))


def test_groups_cover_every_trainable_parameter_once(net):
    groups = param_groups(net, base_lr=1e-4, weight_decay=0.05, encoder_lr_ratio=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    frozen = {id(p) for p in net.parameters() if not p.requires_grad}
    assert frozen and not frozen & set(ids)  # the frozen ViT is left out
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder_decay", "encoder_no_decay", "memory_network_decay", "memory_network_no_decay"}
    assert by_name["encoder_decay"]["lr"] == pytest.approx(1e-5)
    assert by_name["memory_network_decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["encoder_no_decay"]["weight_decay"] == 0 and by_name["memory_network_decay"]["weight_decay"] == 0.05
    torch.optim.AdamW(groups, lr=1e-4)  # accepted by an optimizer as they are


def test_what_gets_no_weight_decay(net):
    groups = param_groups(net, 1e-4, 0.05, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(net.named_parameters())
    for name in ("object_transformer.query_init.weight", "object_transformer.query_emb.weight",
                 "object_transformer.blocks.0.read_from_pixel.alpha", "object_transformer.blocks.0.ffn.norm.weight",
                 "object_transformer.blocks.0.ffn.linear1.bias", "mask_encoder.bn1.weight"):
        assert id(named[name]) in no_decay, name
    for name in ("object_transformer.blocks.0.ffn.linear1.weight", "mask_decoder.pred.weight",
                 "key_proj.key_proj.weight"):
        assert id(named[name]) not in no_decay, name


def test_unfrozen_vit_joins_the_encoder_group():
    net = build_network(load_model_config("tiny", {"pixel_encoder": {"freeze_vit": False}}))
    groups = param_groups(net, 1e-4, 0.05, 0.1)
    encoder = {id(p) for g in groups if g["name"].startswith("encoder") for p in g["params"]}
    vit = {id(p) for n, p in net.pixel_encoder.vit.named_parameters() if not n.startswith("norm.")}  # final norm unused
    assert vit <= encoder
