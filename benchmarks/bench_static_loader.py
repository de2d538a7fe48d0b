"""The stage-0 loader (data.kind=static: 3-frame pseudo-videos of single images) next to the video loader (8-frame
clips), in one process, same crop, batch and seed, on the shards `make demo` writes.

    .venv/bin/python benchmarks/bench_static_loader.py [--static demo_out/static_shards] [--video demo_out/shards]

Prints clips/s and frames/s of each and their ratio (one OpenCV thread, no DataLoader workers).
"""

from __future__ import annotations

import argparse
import time

import cv2

from data_pipeline.loader import build_train_loader


def rate(root: str, kind: str, frames: int, crop: int, clips: int) -> float:
    """Clips per second of one loader over `clips` clips (batches of 4), after one warm-up batch."""
    loader = build_train_loader(root, batch_size=4, rank=0, world_size=1, total_iterations=1000, num_frames=frames,
                                num_objects=1 if kind == "static" else 3, crop_size=crop, num_workers=0, seed=1,
                                kind=kind)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(clips // 4):
        next(it)
    return clips / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--static", default="demo_out/static_shards")
    ap.add_argument("--video", default="demo_out/shards")
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--clips", type=int, default=60)
    a = ap.parse_args(argv)
    cv2.setNumThreads(1)
    s = rate(a.static, "static", 3, a.crop, a.clips)
    v = rate(a.video, "video", 8, a.crop, a.clips)
    print(f"crop {a.crop}: static T=3 {s:.1f} clips/s ({3 * s:.0f} frames/s); video T=8 {v:.1f} clips/s "
          f"({8 * v:.0f} frames/s); static/video clips {s / v:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
