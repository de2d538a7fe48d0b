"""Run by test_untrusted_files.py in a process of its own (one rank, gloo): `save DIR` writes a real ZeRO-1
checkpoint at iterations 1 and 2 through training.checkpoint.save (`save DIR STAGE [bf16]`: another ZeRO stage,
bf16 training), and the module's state dict after each as DIR/expected_module_{1,2}.pt; `load DIR TAG UNIVERSAL ...` builds a fresh engine for each
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
    def __init__(self, norm: bool = True):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        # buffers, an integer one among them (not under bf16: DeepSpeed casts them, CPU batch_norm then refuses)
        self.norm = torch.nn.BatchNorm1d(8) if norm else torch.nn.Identity()
        self.b = torch.nn.Linear(8, 2)
        self.frozen = torch.nn.Linear(2, 2)  # left out of ZeRO's optimizer files
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.b(torch.relu(self.norm(self.a(x))))).pow(2).mean()


def engine(universal: bool, stage: int = 1, bf16: bool = False):
    torch.manual_seed(0)
    net = Net(norm=not bf16)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config={
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal}, "bf16": {"enabled": bf16}})
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
        bf16 = sys.argv[4:5] == ["bf16"]
        eng = engine(False, int(sys.argv[3]) if len(sys.argv) > 3 else 1, bf16)
        g = torch.Generator().manual_seed(0)
        for it in (1, 2):
            x = torch.randn(4, 6, generator=g)
            loss = eng(x.bfloat16() if bf16 else x)
            eng.backward(loss)
            eng.step()
            checkpoint.save(eng, Path(sys.argv[2]), it, {"iteration": it}, keep_last=2)
            torch.save(eng.module.state_dict(), Path(sys.argv[2]) / f"expected_module_{it}.pt")
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
