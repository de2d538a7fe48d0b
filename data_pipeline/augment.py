"""Per-clip training augmentation as Cutie trains (docs/architecture.md section 3, s3-model-spec.md section 4).

Everything works on numpy arrays with OpenCV: frames (T, H, W, 3) uint8 RGB, masks (T, H, W) uint8 object ids.
All randomness comes from the `numpy.random.Generator` passed in, so a clip's augmentation is a pure function of
its seed. One geometric transform (flip ∘ affine ∘ random-resized-crop) is composed into a single 2×3 matrix and
applied to every frame (bilinear) and every mask (nearest), so image and mask always move together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .readers.base import ids_present

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


def warp_image(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=IM_MEAN)


def geometric(rng: np.random.Generator, frames: np.ndarray, masks: np.ndarray, p: AugmentParams,
              objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shared transform for all frames; redrawn up to `crop_tries` times until frame 0 keeps one of `objects`
    (default: any non-zero id). Raises NoObjectError when no draw does."""
    t, h, w = masks.shape
    for _ in range(p.crop_tries):
        m = draw_geometry(rng, h, w, p)
        m0 = warp_mask(masks[0], m, p.crop_size)
        keep = np.isin(m0, objects) if objects is not None else m0 > 0
        if keep.any():
            out_masks = np.empty((t, p.crop_size, p.crop_size), np.uint8)
            out_masks[0] = m0
            out_frames = np.empty((t, p.crop_size, p.crop_size, 3), np.uint8)
            for i in range(t):
                if i:
                    out_masks[i] = warp_mask(masks[i], m, p.crop_size)
                out_frames[i] = warp_image(frames[i], m, p.crop_size)
            return out_frames, out_masks
    raise NoObjectError(f"no object left in frame 0 after {p.crop_tries} crop tries")


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


def colour(rng: np.random.Generator, frames_u8: np.ndarray, p: AugmentParams) -> np.ndarray:
    """uint8 (T, H, W, 3) → float32 (T, 3, H, W) (channels first, as the batch) in [0, 1]: per-clip and per-frame colour jitter (composed into one
    affine colour map per frame, run by OpenCV on uint8) and per-clip random grayscale."""
    t = frames_u8.shape[0]

    def factors(spread: tuple[float, float, float], n: int) -> np.ndarray:
        return np.stack([rng.uniform(1 - a, 1 + a, size=n) if a > 0 else np.ones(n) for a in spread], axis=1)

    clip = factors(p.clip_jitter, 1)[0]
    per_frame = factors(p.frame_jitter, t)
    gray = rng.random() < p.grayscale_probability
    n, h, w, _ = frames_u8.shape
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(t):
        f = frames_u8[i]
        b, c, s = clip * per_frame[i]
        if (b, c, s) != (1.0, 1.0, 1.0):
            mean_rgb = np.array(cv2.mean(f)[:3])
            f = cv2.transform(f, colour_matrix(b, c, s, mean_rgb))
        if gray:
            f = cv2.cvtColor(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        np.multiply(f.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=out[i], casting="unsafe")
    return out


# ----------------------------------------------------------------------------------------------- merge


def merge(frames: np.ndarray, masks: np.ndarray, frames2: np.ndarray, masks2: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Paste clip 2's objects over clip 1 through a Gaussian-blurred (5×5, σ 1) alpha; returns the merged clip and
    {old id in clip 2: new id} (Cutie's `(l2 + 10) % 255`, bumped until unique)."""
    used = {0, *ids_present(masks)}
    mapping: dict[int, int] = {}
    for old in ids_present(masks2):
        new = (old + 10) % 255
        while new == 0 or new in used:
            new = (new + 1) % 255
        used.add(new)
        mapping[old] = new
    lut = np.zeros(256, np.uint8)
    for old, new in mapping.items():
        lut[old] = new
    out_f = frames.copy()
    out_m = masks.copy()
    h, w = masks.shape[1:]
    for i in range(frames.shape[0]):
        fg = masks2[i] > 0
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        if not len(rows):
            continue
        # blend only the objects' bounding box grown by the blur radius: alpha is 0 elsewhere
        y0, y1 = max(0, rows[0] - 2), min(h, rows[-1] + 3)
        x0, x1 = max(0, cols[0] - 2), min(w, cols[-1] + 3)
        alpha = cv2.GaussianBlur(fg.astype(np.float32), (5, 5), 1.0)[y0:y1, x0:x1, None]
        a, b = frames[i, y0:y1, x0:x1], frames2[i, y0:y1, x0:x1]
        out_f[i, y0:y1, x0:x1] = (a * (1.0 - alpha) + b * alpha + 0.5).astype(np.uint8)
        out_m[i][fg] = lut[masks2[i][fg]]
    return out_f, out_m, mapping


# ----------------------------------------------------------------------------------------------- a clip


def choose_objects(rng: np.random.Generator, first_mask: np.ndarray, num_objects: int) -> list[int]:
    present = ids_present(first_mask)
    if len(present) > num_objects:
        present = [present[i] for i in rng.choice(len(present), num_objects, replace=False)]
    else:
        present = [present[i] for i in rng.permutation(len(present))]
    return present


def maybe_reverse(rng: np.random.Generator, frames: np.ndarray, masks: np.ndarray, p: AugmentParams):
    """Time reversal with probability p; kept forward when the reversed first frame has no object."""
    if rng.random() < p.reverse_probability and masks[-1].any():
        return frames[::-1], masks[::-1], True
    return frames, masks, False


def slot_maps(masks: np.ndarray, objects: list[int]) -> np.ndarray:
    """(T, H, W) object ids → (T, H, W) uint8 slot ids 1..N for the chosen objects, 0 elsewhere."""
    lut = np.zeros(256, np.uint8)
    for k, obj in enumerate(objects, start=1):
        lut[obj] = k
    return lut[masks]
