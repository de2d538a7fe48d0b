"""Evaluation speed against peers, printed as ratios (one run, same machine, same cores).

1. J&F scoring: training.evaluate.score_predictions vs vos_benchmark.benchmark on the same synthetic DAVIS-sized
   prediction folders (480x854), same number of processes. Also checks that the two agree on J&F.
2. CPU inference FPS at 480p, random weights, the same frames: our `cutie_base` (model.build_network + our
   InferenceCore) vs Cutie-base from the rf-cutie package (its own network + InferenceCore); then our `s3`, giving
   S3/Cutie. On a CUDA machine the same runs happen on the GPU (bf16 autocast for ours), with and without flip.

    python benchmarks/bench_eval.py [--sequences 6 --frames 30 --workers 2 --fps-frames 8 --skip-fps]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import evaluate  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # rf-cutie's torch.cuda.amp calls


def make_folders(root: Path, n_seq: int, t: int, h: int = 480, w: int = 854, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gt_root, pred_root = root / "DAVIS", root / "pred"
    names = []
    for s in range(n_seq):
        name = f"seq{s:02d}"
        names.append(name)
        n_obj = 1 + s % 3
        params = [(rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(40, 120), rng.uniform(60, 200),
                   *rng.normal(0, 3, 2)) for _ in range(n_obj)]
        for i in range(t):
            gt = np.zeros((h, w), np.uint8)
            pred = np.zeros((h, w), np.uint8)
            for k, (cy, cx, ry, rx, vy, vx) in enumerate(params, start=1):  # later ids drawn on top
                y, x = np.clip(cy + vy * i, ry, h - ry), np.clip(cx + vx * i, rx, w - rx)  # stays in view
                gt[((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1] = k
                jy, jx = rng.normal(0, 6, 2)
                pred[((yy - y - jy) / (ry * 1.1)) ** 2 + ((xx - x - jx) / rx) ** 2 <= 1] = k
            evaluate.write_png(gt_root / "Annotations" / "480p" / name / f"{i:05d}.png", gt)
            evaluate.write_png(pred_root / name / f"{i:05d}.png", pred)
            (gt_root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(gt_root / "JPEGImages" / "480p" / name / f"{i:05d}.jpg")
    (gt_root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (gt_root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names))
    return gt_root, pred_root


def bench_scoring(args) -> None:
    from vos_benchmark.benchmark import benchmark

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        gt_root, pred_root = make_folders(tmp, args.sequences, args.frames)
        t = time.perf_counter()
        ours = evaluate.score_predictions(pred_root, gt_root, workers=args.workers, progress=False)
        t_ours = time.perf_counter() - t
        peer_pred = tmp / "pred_peer"
        shutil.copytree(pred_root, peer_pred)  # vos-benchmark writes results.csv into the prediction folder
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            peer = benchmark([str(gt_root / "Annotations" / "480p")], [str(peer_pred)], num_processes=args.workers,
                             verbose=False)
        t_peer = time.perf_counter() - t
        peer_jf = peer[0][0] if isinstance(peer, tuple) and isinstance(peer[0], list) else None
        frames = args.sequences * args.frames
        print(f"[scoring] {args.sequences} sequences x {args.frames} frames 480x854, {args.workers} processes")
        print(f"  ours          {t_ours:7.2f} s  J&F {100 * ours['J&F-Mean']:.2f}  ({frames / t_ours:.1f} frames/s)")
        print(f"  vos-benchmark {t_peer:7.2f} s  J&F {peer_jf if peer_jf is None else round(float(peer_jf), 2)}"
              f"  ({frames / t_peer:.1f} frames/s)")
        print(f"  speed ratio ours/vos-benchmark: {t_peer / t_ours:.2f}x")
        peer_objects = peer[3][0] if isinstance(peer, tuple) and len(peer) > 3 else {}
        same = [abs(100 * r["J-Mean"] - peer_objects[r["sequence"]][0][r["object"]]) < 1e-4
                and abs(100 * r["F-Mean"] - peer_objects[r["sequence"]][1][r["object"]]) < 1e-4
                for r in ours["per_object"] if r["sequence"] in peer_objects]
        print(f"  per-object J and F equal (1e-6) for {sum(same)} of {len(same)} objects; the others are fully occluded"
              " in the first frames: the official DAVIS evaluator (and ours) scores those frames, vos-benchmark"
              " starts an object at its first appearance, so the global J&F differs by that definition only")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rf_cutie_base():
    """Cutie-base (ResNet-50) from the rf-cutie package with random weights (its ImageNet download is skipped)."""
    from cutie.model import big_modules
    from cutie.model.utils import resnet as cres
    from omegaconf import OmegaConf

    cfg_dir = Path(big_modules.__file__).resolve().parents[1] / "config"
    cfg = OmegaConf.load(cfg_dir / "eval_config.yaml")
    cfg.pop("defaults", None)
    cfg.model = OmegaConf.load(cfg_dir / "model" / "base.yaml")
    r18, r50 = cres.resnet18, cres.resnet50
    big_modules.resnet.resnet18 = lambda pretrained=True, **k: r18(False, **k)
    big_modules.resnet.resnet50 = lambda pretrained=True, **k: r50(False, **k)
    from cutie.model.cutie import CUTIE

    return CUTIE(cfg).eval(), cfg


def _frames(n: int, h: int = 480, w: int = 854, seed: int = 0):
    rng = np.random.default_rng(seed)
    imgs = [torch.from_numpy(rng.random((3, h, w), dtype=np.float32)) for _ in range(n)]
    mask = np.zeros((h, w), np.int64)
    mask[100:250, 200:400] = 1
    mask[260:400, 450:700] = 2
    return imgs, mask


def _run(step, imgs, mask, device) -> float:
    step(imgs[0].to(device), mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for img in imgs[1:]:
        step(img.to(device), None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (len(imgs) - 1) / (time.perf_counter() - t)


def fps_ours(name: str, imgs, mask, device, flip: bool) -> float:
    import model
    from model.config import load_model_config
    from model.inference import InferenceConfig, InferenceCore

    torch.manual_seed(0)
    # random weights, like the peer's
    random_init = {"pixel_encoder": {"init": "random", "weights": None}, "mask_encoder": {"weights": None}}
    net = model.build_network(load_model_config(name, random_init)).to(device).eval()
    core = InferenceCore(net, InferenceConfig(size=480, flip=flip))
    return _run(lambda im, m: core.step(im, m), imgs, mask, device)


def fps_peer(imgs, mask, device, flip: bool) -> float:
    from cutie.inference.inference_core import InferenceCore as CutieCore

    torch.manual_seed(0)
    net, cfg = rf_cutie_base()
    net = net.to(device)
    cfg.flip_aug = flip
    cfg.mem_every, cfg.use_long_term = 5, False  # the d17-val settings (the top-level keys are null overrides)
    core = CutieCore(net, cfg)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(im, m):
        with torch.inference_mode(), amp:
            mm = torch.from_numpy(m).to(device) if m is not None else None
            return core.step(im, mm, [1, 2] if m is not None else None)

    return _run(step, imgs, mask, device)


def fps_our_engine_on_peer(imgs, mask, device, flip: bool) -> float:
    """Our InferenceCore driving rf-cutie's network: isolates the engine's overhead from the network's speed."""
    from model.inference import InferenceConfig, InferenceCore

    torch.manual_seed(0)
    net, _ = rf_cutie_base()
    core = InferenceCore(net.to(device), InferenceConfig(size=480, flip=flip, pad_to=16))
    return _run(lambda im, m: core.step(im, m), imgs, mask, device)


def bench_fps(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    imgs, mask = _frames(args.fps_frames)
    print(f"[fps] {device.type}, {args.fps_frames - 1} timed frames at 480x854, 2 objects, random weights, "
          f"torch threads {torch.get_num_threads()}")
    for flip in ([False, True] if device.type == "cuda" else [False]):
        peer = fps_peer(imgs, mask, device, flip)
        engine = fps_our_engine_on_peer(imgs, mask, device, flip)
        print(f"  flip={flip}: rf-cutie network + rf-cutie engine {peer:.3f} FPS | + our engine {engine:.3f} FPS "
              f"(ratio {engine / peer:.2f})", flush=True)
        base = fps_ours("cutie_base", imgs, mask, device, flip)
        s3 = fps_ours("s3", imgs, mask, device, flip)
        print(f"  flip={flip}: rf-cutie Cutie-base {peer:.3f} FPS | ours cutie_base {base:.3f} FPS "
              f"(ratio {base / peer:.2f}) | ours s3 {s3:.3f} FPS (S3/Cutie {s3 / base:.2f}, S3/rf-cutie {s3 / peer:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=6)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--fps-frames", type=int, default=6)
    p.add_argument("--skip-fps", action="store_true")
    p.add_argument("--skip-scoring", action="store_true")
    args = p.parse_args()
    if not args.skip_scoring:
        bench_scoring(args)
    if not args.skip_fps:
        bench_fps(args)


if __name__ == "__main__":
    main()
