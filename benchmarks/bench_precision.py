"""bf16 training: torch autocast over fp32 parameters vs DeepSpeed-style bf16 parameters, each against fp32.

    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py [--config tiny] [--batch 2] [--frames 8] [--size 64]
                                                         [--device cpu|cuda] [--lr 5e-5] [--bf16-sampling]

One ClipTrainer forward + backward of the same synthetic batch from the same weights and seed in
  (a) fp32 (the reference),
  (b) torch.autocast(bf16) with fp32 parameters and fp32 inputs (training.optim.forward_context),
  (c) bf16 parameters and bf16 inputs (network.to(bfloat16): what DeepSpeed's "bf16" mode runs the forward in).
Printed: the loss's relative error and the gradients' relative error (global norm of the difference / norm of the
fp32 gradients) of (b) and (c); then one AdamW step (lr --lr) from each mode's gradients: the relative difference of
the fp32 (master) update and of the update the next forward actually sees vs the fp32 run's, and the fraction of
parameter entries whose update is lost (for (c) the forward sees bf16(master weight), so an update below half a
bf16 ulp vanishes). Adam's first step is about lr·sign(g), so gradient entries near zero flip the sign of their
update: the master-update error is large for any gradient noise and is the same for (b) and (c).
Loss points are drawn uniformly (importance_sample_ratio 0) and drop path is off, so the three runs supervise the
same pixels and differ only by arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_network, load_model_config  # noqa: E402
from model.summary import RANDOM_ENCODER  # noqa: E402
from model.train_wrapper import ClipTrainer  # noqa: E402


def synthetic_batch(b: int, t: int, size: int, objects: int = 2, seed: int = 0) -> dict:
    """Moving coloured squares on noise, in the loader's format (docs/architecture.md section 3)."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, t, 3, size, size, generator=g) * 0.3
    cls_gt = torch.zeros(b, t, 1, size, size, dtype=torch.long)
    side = size // 4
    for bi in range(b):
        for k in range(1, objects + 1):
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            for ti in range(t):
                y, x = min(y0 + 2 * ti, size - side), min(x0 + ti, size - side)
                cls_gt[bi, ti, 0, y:y + side, x:x + side] = k
                rgb[bi, ti, k % 3, y:y + side, x:x + side] += 0.6
    first = torch.stack([(cls_gt[:, 0, 0] == k).float() for k in range(1, objects + 1)], 1).unsqueeze(1)
    return {"rgb": rgb.clamp(0, 1), "cls_gt": cls_gt, "first_frame_gt": first, "selector": torch.ones(b, objects)}


def one_step(trainer: ClipTrainer, state: dict, batch: dict, mode: str, device: torch.device, seed: int):
    """→ (loss, {name: fp32 gradient}) of one forward + backward in `mode` (fp32 | autocast | bf16)."""
    net = trainer.network
    net.float().load_state_dict(state)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    net.to(dtype)
    trainer.zero_grad(set_to_none=True)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    torch.manual_seed(seed)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast")
    with ctx:
        out = trainer(inputs)
    out["total_loss"].backward()
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(out["total_loss"].detach().float()), grads


def global_rel(diff: dict, ref: dict) -> float:
    num = sum(float((diff[k] - ref[k]).double().square().sum()) for k in ref)
    den = sum(float(ref[k].double().square().sum()) for k in ref)
    return (num / den) ** 0.5


def adamw_update(params: dict, grads: dict, lr: float, weight_decay: float) -> dict:
    """The fp32 update of one AdamW step from `grads` (the optimizer / DeepSpeed's fp32 master copy)."""
    masters = {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(list(masters.values()), lr=lr, weight_decay=weight_decay)
    for k, p in masters.items():
        p.grad = grads[k].clone()
    opt.step()
    return {k: masters[k].detach() - params[k].float() for k in params}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16-sampling", action="store_true",
                   help="turn the deformable attention's fp32 sampling island off (to measure what it buys)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    overrides = {"num_frames": args.frames, "drop_path": 0.0, "loss": {"importance_sample_ratio": 0.0}}
    if args.config != "tiny":
        overrides.update(RANDOM_ENCODER)
    cfg = load_model_config(args.config, overrides)
    trainer = ClipTrainer(build_network(cfg), cfg).to(device).train()
    if args.bf16_sampling:
        from model.encoders.deformable import MultiScaleDeformableAttention

        for m in trainer.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.fp32_sampling = False
    state = copy.deepcopy(trainer.network.state_dict())
    batch = synthetic_batch(args.batch, args.frames, args.size, seed=args.seed)

    losses, grads = {}, {}
    for mode in ("fp32", "autocast", "bf16"):
        losses[mode], grads[mode] = one_step(trainer, state, batch, mode, device, args.seed)
    ref_loss, ref_grads = losses["fp32"], grads["fp32"]
    params = {n: state[n].to(device) for n in ref_grads}
    ref_update = adamw_update(params, ref_grads, args.lr, args.weight_decay)
    result = {"config": args.config, "fp32_sampling": not args.bf16_sampling, "batch": args.batch, "frames": args.frames, "size": args.size,
              "device": str(device), "loss_fp32": ref_loss, "trainable_entries": sum(v.numel() for v in params.values())}
    for mode in ("autocast", "bf16"):
        missing = set(ref_grads) - set(grads[mode])
        if missing:
            raise RuntimeError(f"{mode}: no gradient for {sorted(missing)[:5]}")
        update = adamw_update(params, grads[mode], args.lr, args.weight_decay)
        master_rel = global_rel(update, ref_update)  # the fp32 (master) update, before any rounding
        if mode == "bf16":  # the forward sees bf16(master): what the rounding leaves of the update
            update = {k: (params[k] + update[k]).bfloat16().float() - params[k].bfloat16().float() for k in params}
        nonzero = sum(int((ref_update[k] != 0).sum()) for k in params)
        lost = sum(int(((update[k] == 0) & (ref_update[k] != 0)).sum()) for k in params)
        result[mode] = {
            "loss": losses[mode],
            "loss_rel_err": abs(losses[mode] - ref_loss) / abs(ref_loss),
            "grad_rel_err": global_rel(grads[mode], ref_grads),
            "master_update_rel_err": master_rel,
            "update_rel_err": global_rel(update, ref_update),
            "update_lost_fraction": lost / max(nonzero, 1),
        }
    names = {"autocast": "(b) autocast bf16, fp32 params", "bf16": "(c) bf16 params (DeepSpeed bf16)"}
    print(f"{args.config}{' (bf16 deformable sampling)' if args.bf16_sampling else ''}: batch {args.batch} x {args.frames} frames at {args.size}², {device}; "
          f"fp32 loss {ref_loss:.6f}; {result['trainable_entries']} trainable entries; AdamW lr {args.lr}")
    for mode, name in names.items():
        r = result[mode]
        print(f"{name:36s} loss rel err {r['loss_rel_err']:.2e}  grad rel err {r['grad_rel_err']:.2e}  "
              f"master update rel err {r['master_update_rel_err']:.2e}  seen update rel err {r['update_rel_err']:.2e}  "
              f"updates lost {100 * r['update_lost_fraction']:.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
