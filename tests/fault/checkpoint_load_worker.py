"""Run by test_untrusted_files.py in a process of its own (one rank, gloo): `save DIR` writes a real ZeRO-1
checkpoint through training.checkpoint.save (`save DIR 0`: ZeRO stage 0), and the module's state dict next to it
as DIR/expected_module.pt; `load DIR TAG UNIVERSAL ...` builds a fresh engine for each
(DIR, TAG, UNIVERSAL) triple, calls training.checkpoint.load on it and prints one JSON line per load: the error's
type and message, or the iteration loaded and a digest of the Adam moments."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from training import checkpoint


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.norm = torch.nn.BatchNorm1d(8)  # buffers, an integer one among them
        self.b = torch.nn.Linear(8, 2)
        self.frozen = torch.nn.Linear(2, 2)  # left out of ZeRO's optimizer files
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.b(torch.relu(self.norm(self.a(x))))).pow(2).mean()


def engine(universal: bool, stage: int = 1):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config={
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal}})
    return eng


def moments(eng) -> float:
    """Sum of |exp_avg| + |exp_avg_sq| over the optimizer's state: 0 for a fresh optimizer."""
    total = 0.0
    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)  # ZeRO wraps the optimizer; stage 0 does not
    for state in inner.state.values():
        total += float(state["exp_avg"].abs().sum() + state["exp_avg_sq"].abs().sum())
    return total


def main() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    mode = sys.argv[1]
    if mode == "save":
        eng = engine(False, int(sys.argv[3]) if len(sys.argv) > 3 else 1)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            loss = eng(torch.randn(4, 6, generator=g))
            eng.backward(loss)
            eng.step()
        checkpoint.save(eng, Path(sys.argv[2]), 2, {"iteration": 2}, keep_last=1)
        torch.save(eng.module.state_dict(), Path(sys.argv[2]) / "expected_module.pt")
        print(json.dumps({"saved": 2, "moments": moments(eng)}), flush=True)
    else:
        args = sys.argv[2:]
        for root, tag, universal in zip(args[::3], args[1::3], args[2::3], strict=True):
            eng = engine(universal == "1")
            ref = checkpoint.CheckpointRef(Path(root), tag, int(tag.split("_")[1]))
            try:
                client = checkpoint.load(eng, ref)
                print(json.dumps({"loaded": client.get("iteration"), "moments": moments(eng)}), flush=True)
            except Exception as e:  # noqa: BLE001 - reported to the test, which asserts its type
                print(json.dumps({"error": type(e).__name__, "message": str(e)[:2000]}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
