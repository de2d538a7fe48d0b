"""Synthetic versions of the five training datasets in their native on-disk layouts (for tests and the demo).

`python -m data_pipeline.synth --out DIR [--seed N] [--videos N] [--small]` writes DIR/YouTubeVOS, DIR/DAVIS,
DIR/OVIS, DIR/MOSE and DIR/BURST. Content is learnable: a smooth textured background and 1-3 coloured, textured
ellipses moving smoothly and keeping their appearance. Corner cases: an object appearing late and one vanishing, an
empty frame, a BURST track missing in a frame, OVIS and MOSE sharing a video id, YouTube-VOS numbering starting
above 00000 in steps of 5, OVIS null per-frame entries and both RLE flavours.

It also writes DIR/static: the static image sets of Cutie's stage-0 pre-training (readers/static.py), each
image a textured background with one salient object and its 8-bit grey 0/255 mask with anti-aliased edges:
fss/<class>/<N>, DUTS-TR, ecssd, BIG_small and HRSOD_small as name.jpg + name.png pairs (Cutie's layout),
DUTS-TE in DUTS's own layout (DUTS-TE-Image/, DUTS-TE-Mask/). Sizes vary by +-10% within a set, BIG and HRSOD
are 1.5x larger, and every set has a portrait image (the second; FSS: of its first class).
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

from .readers.static import STATIC_FOLDERS


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


def make_static_image(rng: np.random.Generator, h: int, w: int, shape: str, colour: np.ndarray):
    """One static image (RGB uint8 (h, w, 3)) and its grey mask (uint8, 0 background, 255 object,
    anti-aliased edge values between): a smooth textured background and one striped `shape` ("ellipse" or
    "polygon") object."""
    small = rng.random((max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    bg = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * 120 + 40
    bg += rng.normal(0, 8, (h, w, 3))
    s = 4  # drawn at 4x, then area-averaged down: the edge pixels get intermediate grey values
    big = np.zeros((h * s, w * s), np.uint8)
    r = rng.uniform(0.22, 0.38) * min(h, w) * s
    cy, cx = rng.uniform(r, h * s - r), rng.uniform(r, w * s - r)
    if shape == "ellipse":
        axes = (int(r), int(r * rng.uniform(0.55, 0.95)))
        cv2.ellipse(big, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    else:
        n = int(rng.integers(5, 9))
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        ang += rng.uniform(-0.4, 0.4, n) * np.pi / n  # evenly spread vertices, jittered: no slivers
        rad = r * rng.uniform(0.6, 1.0, n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(big, [pts], 255)
    mask = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = 0.75 + 0.25 * np.sin((xx + yy) * rng.uniform(0.2, 0.6))[..., None]
    alpha = (mask.astype(np.float32) / 255)[..., None]
    img = bg * (1 - alpha) + (colour * tex) * alpha
    return np.clip(img, 0, 255).astype(np.uint8), mask


FSS_CLASSES = ("apple", "kite", "zebra")  # one shape and hue per class


def _fss_per_class(images: int) -> int:
    return max(1, images // len(FSS_CLASSES))


def synth_static(root: Path, rng, images: int, h: int, w: int) -> None:
    """`images` images per static set (FSS: that many split over its classes) of about h x w under `root`."""
    def write(jpg: Path, png: Path, portrait: bool, scale: float, shape: str, colour: np.ndarray) -> None:
        f = scale * rng.uniform(0.9, 1.1)
        hh, ww = round(h * f), round(w * f)
        if portrait:
            hh, ww = ww, hh
        img, mask = make_static_image(rng, hh, ww, shape, colour)
        _jpg(jpg, img)
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(png)  # mode 'L'

    def colour() -> np.ndarray:
        return rng.uniform(60, 255, 3)

    def portrait(k: int, n: int) -> bool:  # the second image of a set (its only one when alone) is portrait
        return k == min(1, n - 1)

    base = root / "static"
    per_class = _fss_per_class(images)
    for c, cls in enumerate(FSS_CLASSES):
        tint = colour()
        for k in range(per_class):
            d = base / STATIC_FOLDERS["fss"] / cls
            write(d / f"{k + 1}.jpg", d / f"{k + 1}.png", c == 0 and portrait(k, per_class), 1.0,
                  ("ellipse", "polygon")[c % 2], np.clip(tint + rng.normal(0, 15, 3), 0, 255))
    names = {"duts_tr": "ILSVRC2012_test_{:08d}", "duts_te": "ILSVRC2012_test_{:08d}", "ecssd": "{:04d}",
             "big": "big_{:03d}", "hrsod": "hrsod_{:03d}"}
    for ds, pattern in names.items():
        d = base / STATIC_FOLDERS[ds]
        scale = 1.5 if ds in ("big", "hrsod") else 1.0
        for k in range(images):
            stem = pattern.format(k + 1)
            if ds == "duts_te":  # DUTS's own layout, to exercise both
                jpg, png = d / f"{d.name}-Image" / f"{stem}.jpg", d / f"{d.name}-Mask" / f"{stem}.png"
            else:
                jpg, png = d / f"{stem}.jpg", d / f"{stem}.png"
            write(jpg, png, portrait(k, images), scale, ("ellipse", "polygon")[k % 2], colour())


DATASETS = ("YouTubeVOS", "DAVIS", "OVIS", "MOSE", "BURST")
SMALL_VIDEOS = 3
DEFAULT_VIDEOS = 4
SMALL_STATIC = 6
DEFAULT_STATIC = 12


def synthesize(out: Path, seed: int = 0, videos: int | None = None, small: bool = False,
               size: tuple[int, int, int] | None = None, static: bool = True) -> Path:
    """Write `videos` videos per dataset (default 3 with `small`, else 4), and with `static` out/static:
    `videos` images per static set (default 6 with `small`, else 12).

    `small` makes 20 frames of 160x120 (else 24 of 256x192; static images about the same size); `size`
    (frames, height, width) overrides either for the videos only (benchmarks synthesise 720p).
    """
    t, h, w = (20, 120, 160) if small else (24, 192, 256)
    if size is not None:
        t, h, w = size
    videos_arg = videos
    if videos is None:
        videos = SMALL_VIDEOS if small else DEFAULT_VIDEOS
    if videos < 1:
        raise ValueError(f"--videos must be at least 1, got {videos}")
    for k, fn in enumerate((synth_youtubevos, synth_davis, synth_ovis, synth_mose, synth_burst)):
        fn(out, np.random.default_rng([seed, k]), videos, t, h, w)
    if static:
        sh, sw = static_size(small)
        synth_static(out, np.random.default_rng([seed, 99]), static_images(videos_arg, small), sh, sw)
    return out


def static_size(small: bool) -> tuple[int, int]:
    """(height, width) of the static images before their +-10% jitter (BIG and HRSOD: 1.5x that)."""
    return (120, 160) if small else (192, 256)


def static_images(videos: int | None, small: bool) -> int:
    """Images per static set: `videos` when given, else 6 with `small`, else 12."""
    return videos if videos is not None else (SMALL_STATIC if small else DEFAULT_STATIC)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--videos", type=int, default=None,
                    help=f"videos per dataset (default {DEFAULT_VIDEOS}, or {SMALL_VIDEOS} with --small)")
    ap.add_argument("--small", action="store_true", help="20 frames of 160x120 per video (default 24 of 256x192)")
    ap.add_argument("--only-static", action="store_true",
                    help="write only OUT/static (the stage-0 image sets), e.g. next to video sets written earlier")
    a = ap.parse_args(argv)
    if a.videos is not None and a.videos < 1:
        ap.error(f"--videos must be at least 1, got {a.videos}")
    names = ("static",) if a.only_static else (*DATASETS, "static")
    taken = [d for d in names if (a.out / d).is_dir() and any((a.out / d).iterdir())]
    if taken:  # a second run into the same folder would mix two data sets under one name
        print(f"error: {a.out} already holds {', '.join(taken)}: give an empty --out", file=sys.stderr)
        return 2
    k, (sh, sw) = static_images(a.videos, a.small), static_size(a.small)
    if a.only_static:
        synth_static(a.out, np.random.default_rng([a.seed, 99]), k, sh, sw)  # the same images synthesize writes
    else:
        synthesize(a.out, a.seed, a.videos, a.small)
        t, h, w = (20, 120, 160) if a.small else (24, 192, 256)
        n = a.videos if a.videos is not None else (SMALL_VIDEOS if a.small else DEFAULT_VIDEOS)
        per = ", ".join(f"{d} {n}" + (f" train + {max(2, n // 2)} val" if d == "DAVIS" else "") for d in DATASETS)
        print(f"wrote {per} videos of {t} frames at {w}x{h} (seed {a.seed}) into {a.out}")
    sets = [f"fss {len(FSS_CLASSES) * _fss_per_class(k)} ({len(FSS_CLASSES)} classes)"]
    sets += [f"{STATIC_FOLDERS[d]} {k}" + (" (DUTS layout)" if d == "duts_te" else "")
             for d in ("duts_tr", "duts_te", "ecssd", "big", "hrsod")]
    print(f"wrote static images {', '.join(sets)} of about {sw}x{sh} ({int(sw * 1.5)}x{int(sh * 1.5)} for "
          f"BIG_small and HRSOD_small) into {a.out / 'static'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
