"""Forward+backward time and peak memory of the S3 pixel encoder, as a ratio to Cutie's ResNet-50 encoder.

    python benchmarks/pixel_encoders.py [--batch 2] [--size 480] [--repeats 3] [--bf16]

Runs on CUDA when available (peak memory from torch.cuda), otherwise on CPU (peak memory not reported).
Both encoders are randomly initialised; only their cost is measured. Prints one JSON line per encoder
and the ratios; no assertion, since a timing is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import model  # noqa: F401  (torchvision shim before timm)
from model.encoders import build_pixel_encoder

ENCODERS = {
    "cutie_resnet50": {"type": "resnet50", "init": "random"},
    "s3_vit_spatial_semantic": {"type": "vit_spatial_semantic", "init": "random"},
}


def measure(name: str, cfg: dict, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    encoder = build_pixel_encoder(cfg, drop_path=0.15).to(device).train()
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
            feats = encoder(image)
        sum(f.float().mean() for f in feats).backward()
        encoder.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    result = {
        "encoder": name,
        "device": str(device),
        "batch": args.batch,
        "size": args.size,
        "bf16": args.bf16,
        "fwd_bwd_s": round(seconds, 4),
        "trainable_M": round(sum(p.numel() for p in encoder.parameters() if p.requires_grad) / 1e6, 3),
    }
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {name: measure(name, cfg, args, device) for name, cfg in ENCODERS.items()}
    peer, s3 = results["cutie_resnet50"], results["s3_vit_spatial_semantic"]
    ratios = {"time_ratio_s3_over_resnet50": round(s3["fwd_bwd_s"] / peer["fwd_bwd_s"], 2)}
    if "peak_mem_GiB" in peer:
        ratios["mem_ratio_s3_over_resnet50"] = round(s3["peak_mem_GiB"] / peer["peak_mem_GiB"], 2)
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
