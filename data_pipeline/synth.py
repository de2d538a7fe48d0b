"""Synthetic versions of the five training datasets in their native on-disk layouts (for tests and the demo).

`python -m data_pipeline.synth --out DIR [--seed N] [--videos N] [--small]` writes DIR/YouTubeVOS, DIR/DAVIS,
DIR/OVIS, DIR/MOSE and DIR/BURST. Content is learnable: a smooth textured background and 1-3 coloured, textured
ellipses moving smoothly and keeping their appearance. Corner cases: an object appearing late and one vanishing, an
empty frame, a BURST track missing in a frame, OVIS and MOSE sharing a video id, YouTube-VOS numbering starting
above 00000 in steps of 5, OVIS null per-frame entries and both RLE flavours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def palette() -> list[int]:
    """The DAVIS colour palette (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


PALETTE = palette()


def make_video(rng: np.random.Generator, t: int, h: int, w: int, n: int, late: dict[int, int] | None = None,
               gone: dict[int, int] | None = None, empty: tuple[int, ...] = ()):
    """Frames (RGB uint8) and id maps of one video. Object k is absent before late[k] and from gone[k] on; the
    frames in `empty` have no object at all."""
    late, gone = late or {}, gone or {}
    small = rng.random((max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    bg = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * 120 + 40
    bg += rng.normal(0, 8, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    objs = []
    for _ in range(n):
        ry, rx = rng.uniform(h / 10, h / 5), rng.uniform(w / 10, w / 5)
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        amp = rng.uniform(0.1, 0.3, 2) * (h, w)
        freq, phase = rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi)
        colour = rng.uniform(60, 255, 3)
        stripes = rng.uniform(0.2, 0.6)
        objs.append((ry, rx, cy, cx, amp, freq, phase, colour, stripes))
    images, masks = [], []
    for i in range(t):
        img = bg.copy()
        m = np.zeros((h, w), np.uint8)
        for k, (ry, rx, cy, cx, amp, freq, phase, colour, stripes) in enumerate(objs, start=1):
            if i < late.get(k, 0) or i >= gone.get(k, t + 1) or i in empty:
                continue
            y = np.clip(cy + amp[0] * np.sin(freq * i + phase), ry, h - ry)
            x = np.clip(cx + amp[1] * np.cos(freq * i + phase), rx, w - rx)
            inside = ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
            tex = 0.75 + 0.25 * np.sin((xx - x) * stripes)[..., None]  # texture moves with the object
            img[inside] = (colour * tex)[inside]
            m[inside] = k
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(m)
    return images, masks


def _jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=92)


def _png(path: Path, m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(m, mode="P")
    im.putpalette(PALETTE)
    im.save(path)


def _case(rng, i: int, t: int, h: int, w: int):
    """Video i: the first carries the corner cases (late object, vanishing object, empty frame)."""
    n = 1 + i % 3
    if i == 0:
        return make_video(rng, t, h, w, 3, late={2: t // 3}, gone={3: 2 * t // 3}, empty=(t - 2,))
    return make_video(rng, t, h, w, n)


def synth_youtubevos(root: Path, rng, videos: int, t: int, h: int, w: int) -> None:
    base = root / "YouTubeVOS" / "train"
    meta = {"videos": {}}
    for i in range(videos):
        vid = f"yt{i:04d}ab"
        images, masks = _case(rng, i, t, h, w)
        start = 10 if i == 0 else 0  # numbering above 00000, steps of 5
        names = [f"{start + 5 * j:05d}" for j in range(t)]
        objects: dict[str, dict] = {}
        for name, img, m in zip(names, images, masks, strict=True):
            _jpg(base / "JPEGImages" / vid / f"{name}.jpg", img)
            _png(base / "Annotations" / vid / f"{name}.png", m)
            for k in np.unique(m)[1:]:
                objects.setdefault(str(int(k)), {"category": "blob", "frames": []})["frames"].append(name)
        meta["videos"][vid] = {"objects": objects}
    (base / "meta.json").write_text(json.dumps(meta))


def synth_davis(root: Path, rng, videos: int, t: int, h: int, w: int) -> None:
    base = root / "DAVIS"
    train = [f"dtrain{i:02d}" for i in range(videos)]
    val = [f"dval{i:02d}" for i in range(max(2, videos // 2))]
    for i, seq in enumerate(train + val):
        images, masks = _case(rng, i if seq in train else i + 1, t, h, w)
        for j, (img, m) in enumerate(zip(images, masks, strict=True)):
            _jpg(base / "JPEGImages" / "480p" / seq / f"{j:05d}.jpg", img)
            _png(base / "Annotations" / "480p" / seq / f"{j:05d}.png", m)
    sets = base / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")


SHARED_ID = "0a1b2c3d4e"  # a video id used by both OVIS and MOSE


def synth_ovis(root: Path, rng, videos: int, t: int, h: int, w: int) -> None:
    base = root / "OVIS"
    data = {"info": {}, "licenses": [], "categories": [{"id": 1, "name": "blob"}], "videos": [], "annotations": []}
    ann_id = 1
    for i in range(videos):
        vid = SHARED_ID if i == 0 else f"ovis{i:04d}"
        images, masks = _case(rng, i, t, h, w)
        names = [f"{vid}/img_{j + 1:07d}.jpg" for j in range(t)]
        for name, img in zip(names, images, strict=True):
            _jpg(base / "train" / name, img)
        data["videos"].append({"id": i + 1, "file_names": names, "height": h, "width": w, "length": t})
        for k in sorted(set(np.unique(np.stack(masks))) - {0}):
            segs, areas = [], []
            for j, m in enumerate(masks):
                obj = np.asfortranarray((m == k).astype(np.uint8))
                if not obj.any():
                    segs.append(None)
                    areas.append(None)
                    continue
                if (j + int(k)) % 2:  # compressed string RLE
                    rle = mask_utils.encode(obj)
                    segs.append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
                else:  # uncompressed count list (column-major runs, starting with zeros)
                    flat = obj.flatten(order="F")
                    change = np.flatnonzero(np.diff(flat)) + 1
                    bounds = np.concatenate([[0], change, [flat.size]])
                    counts = np.diff(bounds).tolist()
                    if flat[0] == 1:
                        counts = [0] + counts
                    segs.append({"size": [h, w], "counts": counts})
                areas.append(int(obj.sum()))
            data["annotations"].append({"id": ann_id, "video_id": i + 1, "category_id": 1, "iscrowd": 0,
                                        "segmentations": segs, "areas": areas, "bboxes": [None] * t,
                                        "height": h, "width": w, "length": t})
            ann_id += 1
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "annotations_train.json").write_text(json.dumps(data))


def synth_mose(root: Path, rng, videos: int, t: int, h: int, w: int) -> None:
    base = root / "MOSE" / "train"
    for i in range(videos):
        vid = SHARED_ID if i == 0 else f"mose{i:04d}"
        images, masks = _case(rng, i, t, h, w)
        for j, (img, m) in enumerate(zip(images, masks, strict=True)):
            _jpg(base / "JPEGImages" / vid / f"{j:05d}.jpg", img)
            _png(base / "Annotations" / vid / f"{j:05d}.png", m)


def synth_burst(root: Path, rng, videos: int, t: int, h: int, w: int) -> None:
    base = root / "BURST"
    seqs = []
    for i in range(videos):
        ds, seq = ("YFCC100M", f"v_{i:04d}") if i % 2 else ("LaSOT", f"bear-{i}")
        images, masks = _case(rng, i, t, h, w)
        names = [f"frame{j:04d}.jpg" for j in range(t)]
        for name, img in zip(names, images, strict=True):
            _jpg(base / "frames" / "train" / ds / seq / name, img)
        annotated = list(range(0, t, 1 if i == 0 else 2))
        track_ids = {k: 100 + 37 * k for k in range(1, 4)}  # large track ids: remapped to uint8 by the reader
        segs = []
        for j in annotated:
            frame = {}
            for k in np.unique(masks[j])[1:]:
                if i == 0 and j == 3 and k == 1:
                    continue  # a track missing in one annotated frame
                rle = mask_utils.encode(np.asfortranarray((masks[j] == k).astype(np.uint8)))
                frame[str(track_ids[int(k)])] = {"rle": rle["counts"].decode("ascii"), "is_gt": True}
            segs.append(frame)
        seqs.append({"dataset": ds, "seq_name": seq, "fps": 30, "width": w, "height": h, "id": i,
                     "annotated_image_paths": [names[j] for j in annotated], "all_image_paths": names,
                     "segmentations": segs, "track_category_ids": {str(v): 1 for v in track_ids.values()}})
    (base / "train").mkdir(parents=True, exist_ok=True)
    (base / "train" / "all_classes.json").write_text(json.dumps({"split": "train", "sequences": seqs}))


DATASETS = ("YouTubeVOS", "DAVIS", "OVIS", "MOSE", "BURST")
SMALL_VIDEOS = 3
DEFAULT_VIDEOS = 4


def synthesize(out: Path, seed: int = 0, videos: int | None = None, small: bool = False,
               size: tuple[int, int, int] | None = None) -> Path:
    """Write `videos` videos per dataset (default 3 with `small`, else 4).

    `small` makes 20 frames of 160x120 (else 24 of 256x192); `size` (frames, height, width) overrides either
    (benchmarks synthesise 720p).
    """
    t, h, w = (20, 120, 160) if small else (24, 192, 256)
    if size is not None:
        t, h, w = size
    if videos is None:
        videos = SMALL_VIDEOS if small else DEFAULT_VIDEOS
    if videos < 1:
        raise ValueError(f"--videos must be at least 1, got {videos}")
    for k, fn in enumerate((synth_youtubevos, synth_davis, synth_ovis, synth_mose, synth_burst)):
        fn(out, np.random.default_rng([seed, k]), videos, t, h, w)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--videos", type=int, default=None,
                    help=f"videos per dataset (default {DEFAULT_VIDEOS}, or {SMALL_VIDEOS} with --small)")
    ap.add_argument("--small", action="store_true", help="20 frames of 160x120 per video (default 24 of 256x192)")
    a = ap.parse_args(argv)
    if a.videos is not None and a.videos < 1:
        ap.error(f"--videos must be at least 1, got {a.videos}")
    taken = [d for d in DATASETS if (a.out / d).is_dir() and any((a.out / d).iterdir())]
    if taken:  # a second run into the same folder would mix two data sets under one name
        print(f"error: {a.out} already holds {', '.join(taken)}: give an empty --out", file=sys.stderr)
        return 2
    synthesize(a.out, a.seed, a.videos, a.small)
    t, h, w = (20, 120, 160) if a.small else (24, 192, 256)
    n = a.videos if a.videos is not None else (SMALL_VIDEOS if a.small else DEFAULT_VIDEOS)
    per = ", ".join(f"{d} {n}" + (f" train + {max(2, n // 2)} val" if d == "DAVIS" else "") for d in DATASETS)
    print(f"wrote {per} videos of {t} frames at {w}x{h} (seed {a.seed}) into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
