"""Each row of Table 3 builds at full size and runs one training step (forward, backward, optimizer step) on a
small clip; the frozen ViT gets no gradient."""

from __future__ import annotations

import pytest
import torch

from model import build_network, load_model_config, param_groups
from model.config import CONFIG_NAMES
from model.summary import RANDOM_ENCODER
from model.train_wrapper import ClipTrainer
from tests.model.helpers import make_batch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if n != "tiny"])
def test_one_training_step(name):
    torch.manual_seed(0)
    cfg = load_model_config(name, {**RANDOM_ENCODER, "num_frames": 3, "num_ref_frames": 1,
                                   "loss": {"num_points": 512}})
    net = build_network(cfg)
    trainer = ClipTrainer(net, cfg).train()
    opt = torch.optim.AdamW(param_groups(net, 1e-4, 0.001, 0.1), lr=1e-4)
    batch = make_batch(b=1, t=3, h=64, w=64, objects=(2,))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = trainer(batch)
    assert all(torch.isfinite(out[k]) for k in out if k.startswith("loss/") or k == "total_loss")
    out["total_loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "object_transformer.blocks.0.ffn.linear1.weight" in changed
    assert any(n.startswith("pixel_encoder.") for n in changed)
    assert not any(n.startswith("pixel_encoder.vit.") for n in changed)
