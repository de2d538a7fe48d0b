"""Cutie's stage-0 pseudo-videos: one static image and its binary mask → a clip of T frames (numpy/OpenCV).

Cutie pre-trains on static images by making each one a sequence of T (= 3) frames with torchvision/PIL
transforms; this module reproduces them with OpenCV matrices, with all randomness from the
`numpy.random.Generator` passed in (a pseudo-video is a pure function of the RNG state):

* per sequence (drawn once): an isotropic scale s ~ U(sequence_scale) about the image centre into a canvas of
  the image's own (h, w) (content leaving it is lost, uncovered pixels are IM_MEAN, 0 in the mask; Cutie's
  RandomAffine(degrees=0, scale=(0.5, 2))), then a horizontal flip with probability `hflip_probability`;
* per frame: RandomAffine(degrees=rotation, scale=frame_scale, shear=shear) about the canvas centre (rotation
  and x-shear uniform in ±degrees, scale uniform, no translation) into the (h, w) canvas again, Resize of the
  short side to `crop_size` (torchvision: the long side becomes int(crop * long / short)), a RandomCrop of
  crop × crop (uniform top/left); then, with probability `tps_probability`, a thin-plate-spline warp
  (`tps_maps`: `tps_points` control points at distinct random rows and distinct random columns, moved by
  N(0, tps_sigma) in normalised [0, 1] coordinates);
* colour (per-sequence and per-frame ColorJitter, random grayscale) is not applied here: the fields
  `clip_jitter`, `frame_jitter` and `grayscale_probability` carry the names of `augment.AugmentParams`, so
  `augment.colour_draw(rng, T, params)` draws it from a `PseudoVideoParams` as from clip parameters.

Geometry. Matrices follow `augment.draw_geometry`: 3×3 homogeneous, pixel i at coordinate i (centres),
forward (source → output) 2×3 matrices as `cv2.warpAffine` takes them. A pseudo-video is two stages of warps,
because the canvas clips content between them: `sequence` maps the source (h, w) into the canvas (h, w); each
frame's affine, resize and crop are composed into ONE 2×3 matrix canvas → crop (exact: the crop lies inside
the resized canvas, so the intermediate canvas' clipping never shows), followed by the frame's TPS remap where
drawn. The image goes through them bilinear (border IM_MEAN), the mask nearest (border 0), through the same
matrices and maps, so image and mask always move together.

Draw order (fixed; the only draws made, so the geometry is a pure function of the RNG state). One try:
  1. sequence: scale `uniform(*sequence_scale)`, flip `random() < hflip_probability`;
  2. frame 0: angle `uniform(-rotation, rotation)`, scale `uniform(*frame_scale)`,
     shear `uniform(-shear, shear)`, crop top `integers(0, H' - crop + 1)`, crop left
     `integers(0, W' - crop + 1)` (H', W': the resized canvas), TPS flag `random() < tps_probability`
     and, when set, `tps_maps`' draws: rows `choice(crop, n, replace=False)`, columns
     `choice(crop, n, replace=False)`, noise `normal(0, tps_sigma, (n, 2))`;
  3. if frame 0's warped mask has no object pixel, the try is dropped and the next try starts at 1 (at most
     `crop_tries` tries, then `augment.NoObjectError`); otherwise frames 1 .. T-1 are drawn as frame 0 was.
A loader draws the colour (`augment.colour_draw`) after these, from the same RNG.

Differences from the torchvision/PIL original: OpenCV bilinear resampling throughout (a frame's affine and
resize are one resampling, not two; no antialiasing where a warp shrinks, as PIL's Resize would do); the TPS
grid puts output pixel j at j / (size - 1) (so zero noise is exactly the identity) and fills IM_MEAN where it
samples outside the crop; the mask takes nearest-neighbour steps through each stage, so along the object's
edge it may stray from the bilinear image by about a pixel (more where a stage magnifies).

`draw_pseudo_video` works from the mask alone (a loader decodes the JPEG only once the geometry is known);
`warp_pseudo_video` then warps the decoded image (RGB, or RGBX: OpenCV's 4-channel warps are SIMD) into the
output, with no float copy of the image: one uint8 canvas of the source's size and one crop-sized scratch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from data_pipeline.augment import IM_MEAN, NoObjectError, warp_mask


@dataclass(frozen=True)
class PseudoVideoParams:
    crop_size: int = 384
    sequence_scale: tuple[float, float] = (0.5, 2.0)  # per sequence, uniform, about the image centre
    hflip_probability: float = 0.5  # per sequence
    rotation: float = 20.0  # per frame, degrees, uniform in (-rotation, rotation)
    shear: float = 10.0  # per frame, degrees, x-shear uniform in (-shear, shear)
    frame_scale: tuple[float, float] = (0.5, 2.0)  # per frame, uniform, about the canvas centre
    tps_probability: float = 0.33  # per frame
    tps_points: int = 12
    tps_sigma: float = 0.02  # control point noise, normalised [0, 1] coordinates
    crop_tries: int = 5  # redraws of the whole geometry until frame 0 keeps object pixels
    clip_jitter: tuple[float, float, float] = (0.1, 0.05, 0.05)  # brightness, contrast, saturation, per clip
    frame_jitter: tuple[float, float, float] = (0.1, 0.05, 0.05)  # the same, per frame
    grayscale_probability: float = 0.05
    num_objects: int = 1

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise ValueError(f"pseudo-video '{name}' must {rule}, got {getattr(self, name)!r}")

        for name in ("hflip_probability", "tps_probability", "grayscale_probability"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(name, "be in [0, 1]")
        for name in ("sequence_scale", "frame_scale"):
            v = getattr(self, name)
            if len(v) != 2 or not 0 < v[0] <= v[1] or not math.isfinite(v[1]):
                bad(name, "be a pair (lo, hi) with 0 < lo <= hi")
        if not 0.0 <= self.rotation <= 180.0:
            bad("rotation", "be in [0, 180] degrees")
        if not 0.0 <= self.shear < 90.0:
            bad("shear", "be in [0, 90) degrees")
        if self.crop_size < 8:
            bad("crop_size", "be >= 8")
        if not 3 <= self.tps_points <= self.crop_size:
            bad("tps_points", "be >= 3 and <= crop_size")
        if not 0.0 <= self.tps_sigma < math.inf:
            bad("tps_sigma", "be >= 0")
        if self.crop_tries < 1:
            bad("crop_tries", "be >= 1")
        for name in ("clip_jitter", "frame_jitter"):
            v = getattr(self, name)
            if len(v) != 3 or not all(0.0 <= a <= 1.0 for a in v):
                bad(name, "be three factors (brightness, contrast, saturation) in [0, 1]")
        if self.num_objects != 1:
            bad("num_objects", "be 1 (a pseudo-video has one object)")


@dataclass
class PseudoVideoGeometry:
    sequence: np.ndarray  # 2x3 float64: source image (h, w) -> canvas (h, w) (scale about centre, then flip)
    frames: list[np.ndarray]  # per frame 2x3 float64: canvas (h, w) -> (crop, crop) (affine, resize, crop)
    tps: list[tuple[np.ndarray, np.ndarray] | None]  # per frame: (map_x, map_y) float32 (crop, crop), or None
    size: tuple[int, int]  # (h, w) of the source
    crop_size: int


# ----------------------------------------------------------------------------------------------- TPS


_TPS_ROWS = 16  # grid rows per block of the kernel evaluation (2 x 12 x 16 x 384 float32: 0.6 MB of scratch)


def _kernel(r2: np.ndarray) -> np.ndarray:
    """The TPS kernel U(r) = r² log r from squared distances, 0 at r = 0."""
    return 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))


def _tps_coefficients(ctrl: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The thin-plate spline through `values` (n, 2) at `ctrl` (n, 2) (x, y): kernel weights (n, 2) and
    affine part (3, 2) (constant, x, y rows), from the standard bordered system in float64. lstsq: collinear
    points (possible with few of them) leave the system singular; its least-norm solution still fits."""
    n = len(ctrl)
    d2 = ((ctrl[:, None, :] - ctrl[None, :, :]) ** 2).sum(axis=-1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _kernel(d2)
    system[:n, n] = 1.0
    system[:n, n + 1:] = ctrl
    system[n, :n] = 1.0
    system[n + 1:, :n] = ctrl.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = values
    coef = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return coef[:n], coef[n:]


def tps_maps(rng: np.random.Generator, size: int, points: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """A random thin-plate-spline warp as `cv2.remap` maps (map_x, map_y) float32 (size, size) over a
    (size, size) output. Draws, in order: `points` distinct rows and `points` distinct columns
    (`choice(size, points, replace=False)` each; control points at row/size, column/size in normalised [0, 1]
    coordinates), then the destination noise `normal(0, sigma, (points, 2))` (x, y). The spline (kernel
    U(r) = r² log r plus an affine part) is fitted from the destination points to the source points (output
    pixel → where to sample) as displacements, so sigma = 0 gives the identity exactly; output pixel j sits at
    j / (size - 1) in the normalised frame. Solved in float64, evaluated over the grid in float32, a block of
    rows at a time (~2-3 ms for 384² and 12 points, one thread)."""
    rows = rng.choice(size, points, replace=False)
    cols = rng.choice(size, points, replace=False)
    src = np.stack([cols, rows], axis=1).astype(np.float64) / size
    dst = src + rng.normal(0.0, sigma, (points, 2))
    weights, affine = _tps_coefficients(dst, src - dst)
    span = float(size - 1)
    weights = weights * (0.5 * span)  # pixels; 0.5: r² log r = 0.5 r² log r², the grid's kernel below
    affine = affine * span
    grid = np.linspace(0.0, 1.0, size)  # normalised position of pixel j
    pix = np.arange(size, dtype=np.float64)
    map_x = np.empty((size, size), np.float32)
    map_y = np.empty((size, size), np.float32)
    # affine part (+ the identity), separable in x and y
    np.add((affine[0, 0] + affine[2, 0] * grid)[:, None], (pix + affine[1, 0] * grid)[None, :], out=map_x,
           casting="same_kind")
    np.add((pix + affine[0, 1] + affine[2, 1] * grid)[:, None], (affine[1, 1] * grid)[None, :], out=map_y,
           casting="same_kind")
    # kernel part, _TPS_ROWS rows at a time: r² = dx² + dy² for every control point, r² log r², then one
    # float32 matrix product with the weights (fewer passes over memory than accumulating point by point)
    dx2 = ((grid[None, :] - dst[:, :1]) ** 2).astype(np.float32)  # (points, size)
    dy2 = ((grid[None, :] - dst[:, 1:]) ** 2 + 1e-30).astype(np.float32)  # + 1e-30: r² log r² → 0 at r = 0
    wt = np.ascontiguousarray(weights.T, np.float32)  # (2, points)
    block = min(size, _TPS_ROWS)
    r2 = np.empty((points, block, size), np.float32)
    term = np.empty((points, block, size), np.float32)
    for r0 in range(0, size, block):
        r1 = min(size, r0 + block)
        a, b = r2[:, :r1 - r0], term[:, :r1 - r0]
        np.add(dy2[:, r0:r1, None], dx2[:, None, :], out=a)
        np.log(a, out=b)
        np.multiply(b, a, out=b)
        disp = wt @ b.reshape(points, -1)
        map_x[r0:r1] += disp[0].reshape(r1 - r0, size)
        map_y[r0:r1] += disp[1].reshape(r1 - r0, size)
    return map_x, map_y


def remap_mask(mask: np.ndarray, maps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return cv2.remap(mask, maps[0], maps[1], interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0)


# ----------------------------------------------------------------------------------------------- geometry


def _centred(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """The linear 3×3 `m` about the centre of an (h, w) image (pixel centres)."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    centre = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    uncentre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return centre @ m @ uncentre


def _draw_sequence(rng: np.random.Generator, h: int, w: int, p: PseudoVideoParams) -> np.ndarray:
    s = rng.uniform(*p.sequence_scale)
    m = _centred(np.diag([s, s, 1.0]), h, w)
    if rng.random() < p.hflip_probability:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m[:2]


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision Resize(short) of an (h, w) image: the short side becomes `short`, the long one
    int(short * long / short_side)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def _draw_frame(rng: np.random.Generator, h: int, w: int, p: PseudoVideoParams
                ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """One frame's canvas → crop 2×3 matrix and TPS maps (or None)."""
    angle = math.radians(rng.uniform(-p.rotation, p.rotation))
    scale = rng.uniform(*p.frame_scale)
    shear = math.radians(rng.uniform(-p.shear, p.shear))
    ca, sa = math.cos(angle), math.sin(angle)
    rot = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    shr = np.array([[1.0, math.tan(shear), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    affine = _centred(rot @ shr @ np.diag([scale, scale, 1.0]), h, w)
    size = p.crop_size
    rh, rw = resized_size(h, w, size)
    sx, sy = rw / w, rh / h  # cv2.resize's pixel-centre mapping: x' = sx (x + 0.5) - 0.5
    resize = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    # RandomCrop; a canvas smaller than the crop (impossible after the resize) would be padded with the fill
    top = int(rng.integers(0, rh - size + 1)) if rh >= size else -int(rng.integers(0, size - rh + 1))
    left = int(rng.integers(0, rw - size + 1)) if rw >= size else -int(rng.integers(0, size - rw + 1))
    crop = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]])
    tps = tps_maps(rng, size, p.tps_points, p.tps_sigma) if rng.random() < p.tps_probability else None
    return (crop @ resize @ affine)[:2], tps


def _frame_mask(canvas: np.ndarray, m: np.ndarray, tps, size: int) -> np.ndarray:
    out = warp_mask(canvas, m, size)
    return out if tps is None else remap_mask(out, tps)


def draw_pseudo_video(rng: np.random.Generator, mask: np.ndarray, num_frames: int, p: PseudoVideoParams
                      ) -> tuple[PseudoVideoGeometry, np.ndarray]:
    """From the mask (h, w) alone (non-zero = the object), so a loader decodes the JPEG only after: the
    geometry and the warped masks (T, crop, crop) uint8 0/1. The whole geometry is redrawn up to `crop_tries`
    times until frame 0 keeps at least one object pixel (draw order: the module docstring); raises
    `augment.NoObjectError` when no try does, or at once (no draws) when the mask is empty."""
    if mask.ndim != 2:
        raise ValueError(f"pseudo-video mask must be (h, w), got shape {mask.shape}")
    if num_frames < 1:
        raise ValueError(f"pseudo-video num_frames must be >= 1, got {num_frames!r}")
    h, w = mask.shape
    binary = np.ascontiguousarray(mask != 0).view(np.uint8)
    if not binary.any():
        raise NoObjectError("the pseudo-video's mask has no object pixel")
    size = p.crop_size
    for _ in range(p.crop_tries):
        seq = _draw_sequence(rng, h, w, p)
        canvas = cv2.warpAffine(binary, seq, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
        m0, tps0 = _draw_frame(rng, h, w, p)
        first = _frame_mask(canvas, m0, tps0, size)
        if not first.any():
            continue
        masks = np.empty((num_frames, size, size), np.uint8)
        masks[0] = first
        frames, tps = [m0], [tps0]
        for i in range(1, num_frames):
            m, t = _draw_frame(rng, h, w, p)
            masks[i] = _frame_mask(canvas, m, t, size)
            frames.append(m)
            tps.append(t)
        return PseudoVideoGeometry(seq, frames, tps, (h, w), size), masks
    raise NoObjectError(f"no object left in the pseudo-video's frame 0 after {p.crop_tries} tries")


def warp_pseudo_video(image: np.ndarray, g: PseudoVideoGeometry, out: np.ndarray) -> np.ndarray:
    """image (h, w, C) uint8, C 3 (RGB) or 4 (RGBX: OpenCV's 4-channel warps are SIMD) → `out`
    (T, crop, crop, C) uint8, returned: the sequence warp once into an (h, w) canvas (bilinear, border
    IM_MEAN, 255 in an X channel), then per frame its warp (bilinear, same border) and its TPS remap where
    drawn (bilinear, same border): the geometry the masks got from `draw_pseudo_video`."""
    h, w = g.size
    size = g.crop_size
    if image.ndim != 3 or image.shape[:2] != (h, w) or image.shape[2] not in (3, 4) \
            or image.dtype != np.uint8:
        raise ValueError(f"pseudo-video image must be ({h}, {w}, 3 or 4) uint8, "
                         f"got {image.shape} {image.dtype}")
    c = image.shape[2]
    # C-contiguous: OpenCV writes into out[i] only when it is one contiguous image (else into a new array)
    if out.shape != (len(g.frames), size, size, c) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"pseudo-video out must be C-contiguous ({len(g.frames)}, {size}, {size}, {c}) "
                         f"uint8, got {out.shape} {out.dtype}")
    fill = IM_MEAN if c == 3 else (*IM_MEAN, 255)
    border = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": fill}
    canvas = cv2.warpAffine(image, g.sequence, (w, h), flags=cv2.INTER_LINEAR, **border)
    scratch = None
    for i, (m, tps) in enumerate(zip(g.frames, g.tps, strict=True)):
        if tps is None:
            cv2.warpAffine(canvas, m, (size, size), dst=out[i], flags=cv2.INTER_LINEAR, **border)
            continue
        if scratch is None:
            scratch = np.empty((size, size, c), np.uint8)
        cv2.warpAffine(canvas, m, (size, size), dst=scratch, flags=cv2.INTER_LINEAR, **border)
        cv2.remap(scratch, tps[0], tps[1], dst=out[i], interpolation=cv2.INTER_LINEAR, **border)
    return out
