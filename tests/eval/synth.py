"""Tiny benchmark folders in their real on-disk layouts (DAVIS 2017 val, YouTube-VOS valid) for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.evaluate import DAVIS_PALETTE


def _video(rng: np.random.Generator, t: int, h: int, w: int, n: int, late: dict[int, int] | None = None):
    """Textured background with n moving coloured rectangles; object k is absent before frame late[k]."""
    late = late or {}
    bg = (rng.random((h, w, 3)) * 80 + 40).astype(np.uint8)
    boxes = []
    for _ in range(n):
        bh, bw = int(rng.integers(h // 6, h // 3)), int(rng.integers(w // 6, w // 3))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        vy, vx = rng.integers(-2, 3, 2)
        boxes.append((y, x, bh, bw, int(vy), int(vx), rng.integers(120, 255, 3)))
    images, masks = [], []
    for i in range(t):
        img = bg.copy()
        m = np.zeros((h, w), np.uint8)
        for k, (y, x, bh, bw, vy, vx, col) in enumerate(boxes, start=1):
            if i < late.get(k, 0):
                continue
            yy = int(np.clip(y + vy * i, 0, h - bh))
            xx = int(np.clip(x + vx * i, 0, w - bw))
            img[yy:yy + bh, xx:xx + bw] = col
            m[yy:yy + bh, xx:xx + bw] = k
        images.append(img)
        masks.append(m)
    return images, masks


def _png(path: Path, m: np.ndarray, palette: bytes = DAVIS_PALETTE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(m, mode="P")
    im.putpalette(palette)
    im.save(path)


def make_davis(root: Path, n_seq: int = 2, t: int = 6, h: int = 64, w: int = 96, seed: int = 0,
               full_resolution: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    names = [f"seq{i}" for i in range(n_seq)]
    for s, name in enumerate(names):
        images, masks = _video(rng, t, h, w, 1 + s % 3)
        for i, (img, m) in enumerate(zip(images, masks, strict=True)):
            f = f"{i:05d}"
            (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{f}.jpg", quality=95)
            _png(root / "Annotations" / "480p" / name / f"{f}.png", m)
            if full_resolution:  # DAVIS's Full-Resolution copy (here 2x), read by the 600/720 settings
                (root / "JPEGImages" / "Full-Resolution" / name).mkdir(parents=True, exist_ok=True)
                big = np.repeat(np.repeat(img, 2, 0), 2, 1)
                Image.fromarray(big).save(root / "JPEGImages" / "Full-Resolution" / name / f"{f}.jpg", quality=95)
                _png(root / "Annotations" / "Full-Resolution" / name / f"{f}.png", np.repeat(np.repeat(m, 2, 0), 2, 1))
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return root


def make_youtubevos(root: Path, t: int = 10, h: int = 64, w: int = 96, seed: int = 1, all_frames: bool = True) -> Path:
    """One video, object 1 from frame 0, object 2 appearing at frame 00025; first-appearance masks only, as in
    YouTube-VOS valid. valid/JPEGImages holds every 5th frame (00000, 00005, ...); with all_frames, the
    all_frames/valid_all_frames/JPEGImages release holds every frame, the ones in between included."""
    rng = np.random.default_rng(seed)
    base = root / "valid"
    n_all = 5 * (t - 1) + 1
    images, masks = _video(rng, n_all, h, w, 2, late={2: 25})
    for i, img in enumerate(images):
        name = f"{i:05d}"
        if i % 5 == 0:
            (base / "JPEGImages" / "vid0").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(base / "JPEGImages" / "vid0" / f"{name}.jpg", quality=95)
        if all_frames:
            folder = root / "all_frames" / "valid_all_frames" / "JPEGImages" / "vid0"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{name}.jpg", quality=95)
    names = [f"{i * 5:05d}" for i in range(t)]
    _png(base / "Annotations" / "vid0" / f"{names[0]}.png", np.where(masks[0] == 1, 1, 0).astype(np.uint8))
    _png(base / "Annotations" / "vid0" / f"{names[5]}.png", np.where(masks[25] == 2, 2, 0).astype(np.uint8))
    meta = {"videos": {"vid0": {"objects": {
        "1": {"category": "box", "frames": names[0::2]},
        "2": {"category": "box", "frames": [names[5], names[7], names[9]]}}}}}
    (base / "meta.json").write_text(json.dumps(meta))
    return root
