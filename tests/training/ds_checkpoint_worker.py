"""Run under torchrun by test_checkpoint_engine.py: a real DeepSpeed engine on a small module, saved through
training.checkpoint (collective save, marker, keep-last-k), consolidated to fp32 and loaded back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from training import checkpoint


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.norm = torch.nn.BatchNorm1d(16)  # an integer buffer (num_batches_tracked) must survive as is
        self.b = torch.nn.Linear(16, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.b(torch.relu(self.norm(self.a(x))))).pow(2).mean()


def engine(stage: int):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config={
        "train_batch_size": 4 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9})
    return eng


def main() -> None:
    root, stage = Path(sys.argv[1]), int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    eng = engine(stage)
    g = torch.Generator().manual_seed(rank)
    for it in (1, 2, 3):
        loss = eng(torch.randn(4, 6, generator=g))
        eng.backward(loss)
        eng.step()
        per_rank = checkpoint.gather_per_rank({"rank": rank, "it": it})
        checkpoint.save(eng, root, it, {"iteration": it, "loader": per_rank[rank], "loader_per_rank": per_rank,
                                        "mlflow_run_id": "r", "config_hash": "h", "nonfinite_in_a_row": 0},
                        keep_last=2)
    ref = checkpoint.latest_complete(root)
    expected = {k: v.detach().clone() for k, v in eng.module.state_dict().items()}
    if stage == 3:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(eng.module.parameters())):
            expected = {k: v.detach().clone() for k, v in eng.module.state_dict().items()}
    report = {"kept": [r.iteration for r in checkpoint.list_checkpoints(root, complete_only=False)],
              "latest": ref.iteration}
    if rank == 0:
        out = checkpoint.consolidate(ref, root / "weights.pt")
        state = torch.load(out, weights_only=True)
        report["consolidated_keys_match"] = sorted(state) == sorted(expected)
        report["consolidated_equal"] = all(torch.equal(state[k], expected[k]) for k in expected)
        report["int_buffer_dtype"] = str(state["norm.num_batches_tracked"].dtype)
    # A fresh engine (different init) loads the checkpoint: weights, optimizer and client state come back.
    torch.manual_seed(123)
    eng2 = engine(stage)
    client = checkpoint.load(eng2, ref)
    report["client_iteration"] = client["iteration"]
    report["client_loader"] = checkpoint.this_ranks(client["loader_per_rank"])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    l1, l2 = eng(x), eng2(x)
    report["same_loss_after_load"] = float(l1) == float(l2)
    eng.backward(l1)
    eng.step()
    eng2.backward(l2)
    eng2.step()
    report["same_loss_after_step"] = float(eng(x)) == float(eng2(x))  # optimizer state came back too
    # The trainer sets the LR on the torch optimizer's groups each step (training.optim.set_lr): check that the
    # ZeRO optimizer steps with those groups (LR 0 and weight decay → no change at all).
    for group in eng2.optimizer.optimizer.param_groups if hasattr(eng2.optimizer, "optimizer") else []:
        group["lr"] = 0.0
    before = float(eng2(x))
    eng2.backward(eng2(x))
    eng2.step()
    report["lr_zero_freezes_weights"] = float(eng2(x)) == before
    (root / f"report{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
