"""Training-step cost of the full S3 network vs Cutie-base: ClipTrainer forward + backward on B clips × T frames.

    python benchmarks/bench_model.py [--batch 4] [--frames 8] [--size 480] [--repeats 3] [--bf16]

The issue's GPU figure is `--batch 4 --frames 8 --size 480 --bf16` on one GPU. On CUDA peak memory comes from
torch.cuda; on CPU it is not reported (use a small size, e.g. `--batch 1 --frames 3 --size 128`). Both networks
are randomly initialised (no checkpoint needed); only their cost is measured. Prints one JSON line per network
and the S3 / Cutie-base ratios; no assertion, since a timing is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model import build_network, load_model_config
from model.summary import RANDOM_ENCODER
from model.train_wrapper import ClipTrainer

NETWORKS = ("cutie_base", "s3")


def synthetic_batch(b: int, t: int, size: int, n: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    cls_gt = torch.zeros(b, t, 1, size, size, dtype=torch.long)
    for k in range(1, n + 1):
        y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        cls_gt[:, :, :, y:y + size // 3, x:x + size // 3] = k
    first = torch.stack([(cls_gt[:, 0, 0] == k).float() for k in range(1, n + 1)], 1).unsqueeze(1)
    batch = {"rgb": torch.rand(b, t, 3, size, size, generator=g), "cls_gt": cls_gt, "first_frame_gt": first,
             "selector": torch.ones(b, n)}
    return {k: v.to(device) for k, v in batch.items()}


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = load_model_config(name, {**RANDOM_ENCODER, "num_frames": args.frames})
    trainer = ClipTrainer(build_network(cfg), cfg).to(device).train()
    batch = synthetic_batch(args.batch, args.frames, args.size, args.objects, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = trainer(batch)
        out["total_loss"].backward()
        trainer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {"network": name, "device": str(device), "batch": args.batch, "frames": args.frames,
              "size": args.size, "bf16": args.bf16, "seconds_per_step": min(times),
              "params_m": sum(p.numel() for p in trainer.parameters()) / 1e6}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {name: measure(name, args, device) for name in NETWORKS}
    for r in results.values():
        print(json.dumps(r))
    base, s3 = results["cutie_base"], results["s3"]
    ratios = {"time_ratio_s3_over_cutie_base": s3["seconds_per_step"] / base["seconds_per_step"]}
    if "peak_memory_gib" in s3:
        ratios["memory_ratio_s3_over_cutie_base"] = s3["peak_memory_gib"] / base["peak_memory_gib"]
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
