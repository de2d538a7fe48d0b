"""ClipTrainer on the tiny config: the 2-clip, 8-frame forward and backward of spec section 3."""

from __future__ import annotations

import pytest
import torch

from model import build_network, load_model_config
from model.train_wrapper import ClipTrainer
from tests.model.helpers import make_batch

LOSS_KEYS = ("total_loss", "loss/mask_ce", "loss/mask_dice", "loss/aux_sensory", "loss/aux_query")


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    return ClipTrainer(build_network(cfg), cfg).train()


def test_two_clip_eight_frame_forward_backward(trainer):
    batch = make_batch(b=2, t=8, h=192, w=192, objects=(2, 1))  # second clip: one object + a padded slot
    trainer.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = trainer(batch)
    for key in LOSS_KEYS:
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
        assert out[key] > 0, key
    parts = sum(out[k] for k in LOSS_KEYS[1:])
    assert torch.allclose(out["total_loss"], parts)
    assert out["logits"].shape == (2, 7, 3, 192, 192) and out["masks"].shape == (2, 7, 3, 192, 192)
    assert torch.allclose(out["masks"].sum(2), torch.ones(2, 7, 192, 192), atol=1e-4)
    # the padded slot of clip 1 gets (almost) no probability
    assert out["masks"][1, :, 2].max() < 1e-3
    out["total_loss"].backward()
    net = trainer.network
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("pixel_encoder.vit.") for n, _ in frozen)  # the frozen ViT
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    # The deformable attention's offset and weight heads start at zero (Deformable DETR's init), so the norm
    # feeding them gets a zero gradient on the very first step; every other parameter must get a signal.
    zero = [n for n, p in trainable if p.grad.abs().sum() == 0 and ".query_norm." not in n]
    assert not zero, f"all-zero gradients: {zero}"
    assert all(p.grad is None for _, p in frozen)


def test_seeded_forward_reproduces_and_seeds_differ(trainer):
    batch = make_batch(b=1, t=6, h=64, w=64, objects=(2,))
    with torch.no_grad():
        torch.manual_seed(5)
        a = trainer(batch)["total_loss"]
        torch.manual_seed(5)
        b = trainer(batch)["total_loss"]
        torch.manual_seed(6)
        c = trainer(batch)["total_loss"]
    assert a == b
    assert a != c  # other reference frames / deep updates / loss points


def test_state_dict_keys_are_the_networks(trainer):
    assert list(trainer.state_dict()) == list(trainer.network.state_dict())
    assert {id(p) for p in trainer.parameters()} == {id(p) for p in trainer.network.parameters()}


def test_input_size_not_a_multiple_of_32_is_padded_and_cropped(trainer):
    batch = make_batch(b=1, t=3, h=72, w=100, objects=(1,))
    with torch.no_grad():
        out = trainer(batch)
    assert out["logits"].shape == (1, 2, 2, 72, 100)
    assert torch.isfinite(out["total_loss"])


def test_bf16_parameters_and_inputs():
    """DeepSpeed bf16 casts the module and the float inputs to bf16: the clip forward must still run."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny", {"num_frames": 3})
    trainer = ClipTrainer(build_network(cfg), cfg).train().to(torch.bfloat16)
    batch = make_batch(b=1, t=3, h=64, w=64, objects=(2,))
    batch = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in batch.items()}
    out = trainer(batch)
    assert torch.isfinite(out["total_loss"])
    out["total_loss"].backward()
    assert all(p.grad is not None for p in trainer.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda b: b.pop("selector"), "selector"),
        (lambda b: b.__setitem__("rgb", b["rgb"][:, :, :2]), "rgb"),
        (lambda b: b.__setitem__("cls_gt", b["cls_gt"][:, :2]), "cls_gt"),
        (lambda b: b.__setitem__("selector", torch.tensor([[0.0, 1.0]])), "selector"),
        (lambda b: b["cls_gt"].__setitem__((0, 1, 0, 0, 0), 7), "cls_gt holds labels"),
    ],
)
def test_bad_batches_fail_clearly(trainer, change, match):
    batch = make_batch(b=1, t=3, h=64, w=64, objects=(2,))
    change(batch)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        trainer(batch)


def test_autocast_bf16_and_a_single_object(trainer):
    """Mixed precision as on a GPU (here CPU autocast): memory read, GRUs and losses stay in fp32 and finite."""
    batch = make_batch(b=1, t=4, h=64, w=64, objects=(1,))
    trainer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trainer(batch)
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (1, 3, 2, 64, 64)
    assert torch.isfinite(out["total_loss"])
    out["total_loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in trainer.parameters() if p.grad is not None)
