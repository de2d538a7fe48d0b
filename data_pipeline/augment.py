"""Per-clip training augmentation as Cutie trains (docs/architecture.md section 3, s3-model-spec.md section 4).

Everything works on numpy arrays with OpenCV: frames (T, H, W, 3) uint8 RGB, masks (T, H, W) uint8 object ids.
All randomness comes from the `numpy.random.Generator` passed in, so a clip's augmentation is a pure function of
its seed. One geometric transform (flip ∘ affine ∘ random-resized-crop) is composed into a single 2×3 matrix and
applied to every frame (bilinear) and every mask (nearest), so image and mask always move together.

The transform is drawn from the masks alone (`draw_clip_geometry`), so a loader can decide what to decode after
the draw: `decode_reduction` says by how much a frame may be decoded smaller (JPEG DCT scaling) without the warp
upsampling it, and `reduced_matrix` maps the reduced frame onto the same output. `paste_boxes` / `paste` merge a
second clip given only its warped pixels inside its objects' boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

IM_MEAN = (124, 116, 104)  # Cutie's fill colour for pixels the affine brings in from outside the frame


@dataclass(frozen=True)
class AugmentParams:
    crop_size: int = 480
    num_objects: int = 3
    reverse_probability: float = 0.5
    merge_probability: float = 0.5
    hflip_probability: float = 0.5
    rotation: float = 25.0  # degrees, uniform in (-rotation, rotation)
    shear: float = 20.0  # degrees, x-shear uniform in (-shear, shear)
    scale: tuple[float, float] = (0.36, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_tries: int = 5  # geometric draws until frame 0 keeps an object
    clip_jitter: tuple[float, float, float] = (0.1, 0.03, 0.03)  # brightness, contrast, saturation, per clip
    frame_jitter: tuple[float, float, float] = (0.1, 0.05, 0.05)  # the same, per frame
    grayscale_probability: float = 0.05

    def __post_init__(self):
        for name in ("reverse_probability", "merge_probability", "hflip_probability", "grayscale_probability"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augmentation '{name}' must be in [0, 1], got {v!r}")
        if self.crop_size < 8:
            raise ValueError(f"augmentation 'crop_size' must be >= 8, got {self.crop_size!r}")
        if self.num_objects < 1:
            raise ValueError(f"augmentation 'num_objects' must be >= 1, got {self.num_objects!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augmentation 'scale' must satisfy 0 < lo <= hi <= 1, got {self.scale!r}")
        if self.crop_tries < 1:
            raise ValueError(f"augmentation 'crop_tries' must be >= 1, got {self.crop_tries!r}")


class NoObjectError(ValueError):
    """No geometric draw kept an object in frame 0 (or frame 0 has none to begin with)."""


def ids_in(mask: np.ndarray) -> list[int]:
    """Sorted non-zero ids of a uint8 id map of any shape (a 256-bin histogram; faster than np.bincount)."""
    mask = np.ascontiguousarray(mask)
    if mask.dtype != np.uint8 or mask.size == 0:
        return [int(v) for v in np.unique(mask) if v]
    flat = mask.reshape(-1, mask.shape[-1]) if mask.ndim > 1 else mask.reshape(1, -1)
    hist = cv2.calcHist([flat], [0], None, [256], [0, 256]).ravel()
    return [int(v) for v in np.flatnonzero(hist[1:]) + 1]


# ----------------------------------------------------------------------------------------------- geometry


def _resized_crop_box(rng: np.random.Generator, h: int, w: int, p: AugmentParams) -> tuple[float, float, float, float]:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width)."""
    area = h * w
    log_lo, log_hi = math.log(p.ratio[0]), math.log(p.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(p.scale[0], p.scale[1])
        ar = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    side = min(h, w)  # fallback: central square
    return (h - side) // 2, (w - side) // 2, side, side


def draw_geometry(rng: np.random.Generator, h: int, w: int, p: AugmentParams) -> np.ndarray:
    """One 2×3 matrix mapping source pixels (h, w) to the (crop, crop) output: hflip, affine, resized crop."""
    flip = np.eye(3)
    if rng.random() < p.hflip_probability:
        flip = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    angle = math.radians(rng.uniform(-p.rotation, p.rotation))
    shear = math.radians(rng.uniform(-p.shear, p.shear))
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    centre = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    uncentre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    rot = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1.0]])
    shr = np.array([[1.0, math.tan(shear), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    affine = centre @ rot @ shr @ uncentre
    top, left, ch, cw = _resized_crop_box(rng, h, w, p)
    sx, sy = p.crop_size / cw, p.crop_size / ch
    crop = np.array([[sx, 0.0, -left * sx], [0.0, sy, -top * sy], [0.0, 0.0, 1.0]])
    return (crop @ affine @ flip)[:2]


def warp_mask(mask: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def warp_image(img: np.ndarray, m: np.ndarray, size: int | tuple[int, int], out: np.ndarray | None = None
               ) -> np.ndarray:
    """Bilinear warp to (size, size), or to (width, height) when `size` is a pair; into `out` when given."""
    dsize = size if isinstance(size, tuple) else (size, size)
    return cv2.warpAffine(img, m, dsize, dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=IM_MEAN)


def decode_reduction(m: np.ndarray, h: int, w: int, limit: int = 8) -> int:
    """Largest r in {1, 2, 4, 8} (<= limit) such that a frame decoded at 1/r of its (h, w) still holds at least one
    pixel per output pixel in every direction (the warp never upsamples it): then warping the reduced frame with
    `reduced_matrix(m, r)` equals warping the full one up to resampling error. r also keeps the reduced frame >= 8 px."""
    smax = float(np.linalg.svd(np.asarray(m, np.float64)[:, :2], compute_uv=False)[0])  # output px per source px
    r = 1
    while 2 * r <= limit and smax * 2 * r <= 1.0 and min(h, w) >= 16 * r:
        r *= 2
    return r


def reduced_matrix(m: np.ndarray, r: int) -> np.ndarray:
    """`m` for a frame decoded at 1/r by JPEG DCT scaling: reduced pixel j covers source pixels [r j, r j + r), its
    centre is source r j + (r - 1) / 2."""
    if r == 1:
        return m
    up = np.array([[r, 0.0, (r - 1) / 2.0], [0.0, r, (r - 1) / 2.0], [0.0, 0.0, 1.0]])
    return np.asarray(m, np.float64) @ up


def draw_clip_geometry(rng: np.random.Generator, masks: np.ndarray, p: AugmentParams,
                       objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The clip's shared transform, drawn from its masks alone: (2×3 matrix, warped masks (T, crop, crop)). Redrawn
    up to `crop_tries` times until frame 0 keeps one of `objects` (default: any non-zero id). Raises
    NoObjectError when no draw does."""
    t, h, w = masks.shape
    for _ in range(p.crop_tries):
        m = draw_geometry(rng, h, w, p)
        m0 = warp_mask(masks[0], m, p.crop_size)
        keep = np.isin(m0, objects) if objects is not None else m0.any()
        if np.any(keep):
            out_masks = np.empty((t, p.crop_size, p.crop_size), np.uint8)
            out_masks[0] = m0
            for i in range(1, t):
                out_masks[i] = warp_mask(masks[i], m, p.crop_size)
            return m, out_masks
    raise NoObjectError(f"no object left in frame 0 after {p.crop_tries} crop tries")


def warp_frames(frames, m: np.ndarray, size: int) -> np.ndarray:
    """Every frame (T, H, W, 3) through the one transform `m`: (T, size, size, 3) uint8."""
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, f in enumerate(frames):
        warp_image(f, m, size, out=out[i])
    return out


def geometric(rng: np.random.Generator, frames: np.ndarray, masks: np.ndarray, p: AugmentParams,
              objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shared transform for all frames; redrawn up to `crop_tries` times until frame 0 keeps one of `objects`
    (default: any non-zero id). Raises NoObjectError when no draw does."""
    m, out_masks = draw_clip_geometry(rng, masks, p, objects)
    return warp_frames(frames, m, p.crop_size), out_masks


# ----------------------------------------------------------------------------------------------- colour


_GRAY_W = np.array([0.299, 0.587, 0.114], np.float64)


def colour_matrix(b: float, c: float, s: float, mean_rgb: np.ndarray) -> np.ndarray:
    """Brightness b, contrast c, saturation s (torchvision ColorJitter factors, applied in that order) as one
    3×4 affine colour map x ↦ M x + o, exact up to the clamping torchvision does between steps (here: once, at the
    end, by uint8 saturation). Contrast pivots on the mean grey level of the brightened frame, as torchvision."""
    sat = s * np.eye(3) + (1.0 - s) * np.outer(np.ones(3), _GRAY_W)
    m = sat * (c * b)
    grey_mean = b * float(_GRAY_W @ mean_rgb)
    offset = (1.0 - c) * grey_mean * np.ones(3)  # sat @ 1 = 1
    return np.concatenate([m, offset[:, None]], axis=1)


def colour_draw(rng: np.random.Generator, t: int, p: AugmentParams) -> tuple[np.ndarray, bool]:
    """The colour jitter of a clip of t frames: per-frame (brightness, contrast, saturation) factors (T, 3) float64
    (per-clip factors times per-frame ones) and whether the clip goes grey. The only draws `colour` makes, in its
    order, so a loader can ship the factors and apply them elsewhere (`data_pipeline.loader.finish_batch`)."""

    def factors(spread: tuple[float, float, float], n: int) -> np.ndarray:
        return np.stack([rng.uniform(1 - a, 1 + a, size=n) if a > 0 else np.ones(n) for a in spread], axis=1)

    clip = factors(p.clip_jitter, 1)[0]
    per_frame = factors(p.frame_jitter, t)
    gray = rng.random() < p.grayscale_probability
    return clip[None, :] * per_frame, bool(gray)


def apply_colour(frames_u8: np.ndarray, jitter: np.ndarray, gray: bool, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """uint8 (T, H, W, 3) → float32 (T, 3, H, W) (channels first, as the batch) in [0, 1]: frame i through the
    affine colour map of its factors `jitter[i]`, computed by OpenCV in float32 (its uint8 transform would quantise
    the matrix to 10 bits), rounded once and saturated; then OpenCV's grey when `gray`. `out`: where to write.
    The CPU backend of `data_pipeline.loader.finish_batch`."""
    n, h, w, _ = frames_u8.shape
    if out is None:
        out = np.empty((n, 3, h, w), np.float32)
    scale = np.float32(1.0 / 255.0)
    # scratch reused by every frame (fresh outputs per frame cost more than the arithmetic)
    ff = np.empty((h, w, 3), np.float32)
    planes = [np.empty((h, w), np.float32) for _ in range(3)]
    y8 = np.empty((h, w, 3), np.uint8)
    g8 = np.empty((h, w), np.uint8)
    for i in range(n):
        f = np.ascontiguousarray(frames_u8[i])
        b, c, s = (float(v) for v in jitter[i])
        m = colour_matrix(b, c, s, np.array(cv2.mean(f)[:3])).astype(np.float32)
        np.copyto(ff, f, casting="unsafe")
        y = cv2.transform(ff, m)
        np.rint(y, out=y)
        np.clip(y, 0.0, 255.0, out=y)
        if gray:
            np.copyto(y8, y, casting="unsafe")  # rounded and saturated: exact in uint8
            cv2.cvtColor(y8, cv2.COLOR_RGB2GRAY, dst=g8)
            np.multiply(g8, scale, out=out[i, 0], casting="unsafe")
            out[i, 1] = out[i, 0]
            out[i, 2] = out[i, 0]
            continue
        for ch, plane in enumerate(cv2.split(y, planes)):  # contiguous planes: a strided transpose is slower
            np.multiply(plane, scale, out=out[i, ch])
    return out


def colour(rng: np.random.Generator, frames_u8: np.ndarray, p: AugmentParams, out: np.ndarray | None = None
           ) -> np.ndarray:
    """uint8 (T, H, W, 3) → float32 (T, 3, H, W) in [0, 1]: per-clip and per-frame colour jitter (torchvision
    ColorJitter factors composed into one affine colour map per frame) and per-clip random grayscale:
    `colour_draw` then `apply_colour`."""
    jitter, gray = colour_draw(rng, frames_u8.shape[0], p)
    return apply_colour(frames_u8, jitter, gray, out)


# ----------------------------------------------------------------------------------------------- merge


BLUR_RADIUS = 2  # the alpha's 5×5 Gaussian


def paste_boxes(masks2: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Per frame of clip 2's (warped) masks: the box (y0, y1, x0, x1) of its objects grown by the blur radius, the
    only pixels a paste changes; None where the frame has no object (nothing of clip 2 is needed there)."""
    h, w = masks2.shape[1:]
    boxes: list[tuple[int, int, int, int] | None] = []
    for m in masks2:
        rows = np.flatnonzero(m.any(axis=1))
        if not len(rows):
            boxes.append(None)
            continue
        cols = np.flatnonzero(m[rows[0]:rows[-1] + 1].any(axis=0))
        boxes.append((max(0, int(rows[0]) - BLUR_RADIUS), min(h, int(rows[-1]) + BLUR_RADIUS + 1),
                      max(0, int(cols[0]) - BLUR_RADIUS), min(w, int(cols[-1]) + BLUR_RADIUS + 1)))
    return boxes


def paste(frames: np.ndarray, masks: np.ndarray, masks2: np.ndarray, patches: list[np.ndarray | None],
          boxes: list[tuple[int, int, int, int] | None]) -> dict[int, int]:
    """In place: paste clip 2's objects over clip 1 through a Gaussian-blurred (5×5, σ 1) alpha. `patches[i]` is
    clip 2's warped frame i inside `boxes[i]` (from `paste_boxes(masks2)`). Returns {old id in clip 2: new id}
    (Cutie's `(l2 + 10) % 255`, bumped until unique)."""
    h, w = masks.shape[1:]
    ids2: set[int] = set()
    for m2, box in zip(masks2, boxes, strict=True):
        if box is not None:
            ids2.update(ids_in(m2[box[0]:box[1], box[2]:box[3]]))
    if not ids2:
        return {}
    known: dict[int, bool] = {0: True}  # id -> taken (in clip 1 or given out here); clip 1 is asked id by id

    def taken(v: int) -> bool:
        if v not in known:
            known[v] = bool((masks == v).any())  # a compare is ~30x cheaper than histogramming the clip
        return known[v]

    mapping: dict[int, int] = {}
    for old in sorted(ids2):
        new = (old + 10) % 255
        while taken(new):
            new = (new + 1) % 255
        known[new] = True
        mapping[old] = new
    lut = np.zeros(256, np.uint8)
    for old, new in mapping.items():
        lut[old] = new
    r2 = 2 * BLUR_RADIUS
    for i, box in enumerate(boxes):
        if box is None:
            continue
        y0, y1, x0, x1 = box
        # the blur of the whole frame, computed on the box grown by the kernel radius (same border handling)
        oy0, oy1, ox0, ox1 = max(0, y0 - BLUR_RADIUS), min(h, y1 + BLUR_RADIUS), max(0, x0 - BLUR_RADIUS), \
            min(w, x1 + BLUR_RADIUS)
        if oy1 - oy0 <= r2 or ox1 - ox0 <= r2:  # too thin for the sub-image blur to match: blur the frame
            oy0, oy1, ox0, ox1 = 0, h, 0, w
        fg = (masks2[i, oy0:oy1, ox0:ox1] > 0).astype(np.float32)
        alpha = cv2.GaussianBlur(fg, (5, 5), 1.0)[y0 - oy0:y1 - oy0, x0 - ox0:x1 - ox0]
        a = frames[i, y0:y1, x0:x1]
        blended = cv2.blendLinear(a, np.ascontiguousarray(patches[i]), np.ascontiguousarray(1.0 - alpha),
                                  np.ascontiguousarray(alpha))
        a[...] = blended
        m2 = masks2[i, y0:y1, x0:x1]
        fgb = m2 > 0
        masks[i, y0:y1, x0:x1][fgb] = lut[m2[fgb]]
    return mapping


def merge(frames: np.ndarray, masks: np.ndarray, frames2: np.ndarray, masks2: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Paste clip 2's objects over clip 1 through a Gaussian-blurred (5×5, σ 1) alpha; returns the merged clip and
    {old id in clip 2: new id} (Cutie's `(l2 + 10) % 255`, bumped until unique). Inputs are not modified."""
    out_f, out_m = frames.copy(), masks.copy()
    boxes = paste_boxes(masks2)
    patches = [None if b is None else frames2[i, b[0]:b[1], b[2]:b[3]] for i, b in enumerate(boxes)]
    mapping = paste(out_f, out_m, masks2, patches, boxes)
    return out_f, out_m, mapping


# ----------------------------------------------------------------------------------------------- a clip


def choose_objects(rng: np.random.Generator, first_mask: np.ndarray, num_objects: int,
                   present: list[int] | None = None) -> list[int]:
    """Up to `num_objects` of frame 0's ids, in random order. `present`: those ids when already known."""
    present = ids_in(first_mask) if present is None else list(present)
    if len(present) > num_objects:
        present = [present[i] for i in rng.choice(len(present), num_objects, replace=False)]
    else:
        present = [present[i] for i in rng.permutation(len(present))]
    return present


def maybe_reverse(rng: np.random.Generator, frames, masks: np.ndarray, p: AugmentParams):
    """Time reversal with probability p; kept forward when the reversed first frame has no object. `frames` may be
    any sequence (the decoded frames, or the order in which to decode them)."""
    if rng.random() < p.reverse_probability and masks[-1].any():
        return frames[::-1], masks[::-1], True
    return frames, masks, False


def slot_maps(masks: np.ndarray, objects: list[int], out: np.ndarray | None = None) -> np.ndarray:
    """(T, H, W) object ids → (T, H, W) uint8 slot ids 1..N for the chosen objects, 0 elsewhere."""
    lut = np.zeros(256, np.uint8)
    for k, obj in enumerate(objects, start=1):
        lut[obj] = k
    src = np.ascontiguousarray(masks)
    res = cv2.LUT(src.reshape(-1, src.shape[-1]), lut,
                  dst=out.reshape(-1, src.shape[-1]) if out is not None and out.flags.c_contiguous else None)
    if out is None:
        return res.reshape(src.shape)
    if not np.shares_memory(res, out):
        out[...] = res.reshape(src.shape)
    return out
