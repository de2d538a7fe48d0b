"""DAVIS J&F, computed exactly as the official `davis2017-evaluation` does, vectorised over frames and objects.

- Region J: IoU per frame; 1 when prediction and ground truth are both empty (`db_eval_iou`).
- Boundary F: `_seg2bmap` (one-pixel east/south/south-east shifts, boundary offset half a pixel towards the origin),
  dilation with a disk of radius ceil(0.008 * ||(H, W)||) through `cv2.dilate`, precision/recall with the official
  edge cases (no predicted boundary: P=1, R=0; no GT boundary: P=0, R=1; neither: F=1).
- A sequence's objects are the ids 1..max(first GT frame) (255 = void becomes background, as the official GT reader
  does; the void mask is not used in semi-supervised evaluation). The first and last frames are skipped.
- Statistics per object (`db_statistics`): mean, recall = mean(v > 0.5), decay = mean(first quarter) - mean(last
  quarter) with bins that share their boundary frame.
  **Difference from the official code:** the official casts the bin indices to uint8, which wraps for sequences with
  more than 256 evaluated frames (300 frames give ids [0, 75, 150, 224, 43] and a NaN decay). Here the indices are
  int64, so long videos (LVOS, MOSE) get a real decay. Up to 256 evaluated frames both agree bit for bit.
- Global numbers pool objects over all sequences (mean over objects, not over sequences).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import cv2
import numpy as np

VOID = 255
BOUND_TH = 0.008
GLOBAL_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def _disk(radius: int) -> np.ndarray:
    """The structuring element of skimage.morphology.disk(radius): x^2 + y^2 <= r^2 on a (2r+1)^2 grid."""
    r = int(radius)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y <= r * r).astype(np.uint8)


def bound_pixels(shape: Sequence[int], bound_th: float = BOUND_TH) -> int:
    h, w = shape[-2], shape[-1]
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * np.linalg.norm((h, w))))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Boundary map of binary masks (..., H, W), identical to the official `_seg2bmap` at native size:
    b = seg^east | seg^south | seg^south-east inside, seg^east on the last row, seg^south on the last column, and
    the bottom-right pixel 0 (written region by region, without the three shifted copies)."""
    seg = seg.astype(bool, copy=False)
    b = np.empty(seg.shape, dtype=bool)
    c = seg[..., :-1, :-1]
    inner = b[..., :-1, :-1]
    np.not_equal(c, seg[..., :-1, 1:], out=inner)
    inner |= c ^ seg[..., 1:, :-1]
    inner |= c ^ seg[..., 1:, 1:]
    np.not_equal(seg[..., -1, :-1], seg[..., -1, 1:], out=b[..., -1, :-1])
    np.not_equal(seg[..., :-1, -1], seg[..., 1:, -1], out=b[..., :-1, -1])
    b[..., -1, -1] = False
    return b


def _dilate(b: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.dilate of every (H, W) slice of the boolean stack b (N, H, W) (bool viewed as uint8, no copies)."""
    out = np.empty(b.shape, dtype=bool)
    src = np.ascontiguousarray(b).view(np.uint8)
    dst = out.view(np.uint8)
    for i in range(b.shape[0]):
        cv2.dilate(src[i], kernel, dst=dst[i])
    return out


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None) -> np.ndarray:
    """Region J over the last two axes of boolean masks (..., H, W); 1 where the union is empty."""
    ann = annotation.astype(bool)
    seg = segmentation.astype(bool)
    if void_pixels is not None:
        keep = ~void_pixels.astype(bool)
        ann, seg = ann & keep, seg & keep
    inters = np.count_nonzero(seg & ann, axis=(-2, -1))
    union = np.count_nonzero(seg | ann, axis=(-2, -1))
    j = inters / np.maximum(union, 1)
    return np.where(np.isclose(union, 0), 1.0, j)


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None,
                     bound_th: float = BOUND_TH) -> np.ndarray:
    """Boundary F over the last two axes of boolean masks (..., H, W)."""
    gt = annotation.astype(bool)
    fg = segmentation.astype(bool)
    if void_pixels is not None:
        keep = ~void_pixels.astype(bool)
        gt, fg = gt & keep, fg & keep
    return _boundary_f(gt, fg, _disk(bound_pixels(gt.shape, bound_th)))


def _boundary_f(gt: np.ndarray, fg: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    lead = gt.shape[:-2]
    h, w = gt.shape[-2:]
    gt = gt.reshape(-1, h, w)
    fg = fg.reshape(-1, h, w)
    fg_b = seg2bmap(fg)
    gt_b = seg2bmap(gt)
    fg_dil = _dilate(fg_b, kernel)
    gt_dil = _dilate(gt_b, kernel)
    n_fg = np.count_nonzero(fg_b, axis=(-2, -1)).astype(np.float64)
    n_gt = np.count_nonzero(gt_b, axis=(-2, -1)).astype(np.float64)
    fg_match = np.count_nonzero(fg_b & gt_dil, axis=(-2, -1))
    gt_match = np.count_nonzero(gt_b & fg_dil, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_fg > 0, fg_match / np.maximum(n_fg, 1), 1.0)
        recall = np.where(n_gt > 0, gt_match / np.maximum(n_gt, 1), 1.0)
        # the official edge cases: exactly one side empty gives (P, R) = (1, 0) or (0, 1)
        precision = np.where((n_fg > 0) & (n_gt == 0), 0.0, precision)
        recall = np.where((n_fg == 0) & (n_gt > 0), 0.0, recall)
        denom = precision + recall
        f = np.where(denom == 0, 0.0, 2 * precision * recall / np.where(denom == 0, 1.0, denom))
    return f.reshape(lead)


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame values; integer bin indices (see the module docstring)."""
    v = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        m = np.nanmean(v)
        o = np.nanmean(v > 0.5)
        ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
        d = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(m), float(o), float(d)


def _frame_chunks(t: int, h: int, w: int, budget: int = 4*2**20) -> int:
    return max(1, min(t, budget // max(1, h * w)))


def evaluate_sequence(gt: np.ndarray, pred: np.ndarray, num_objects: int | None = None,
                      skip_first_last: bool = True, name: str = "sequence") -> dict[str, np.ndarray]:
    """Per-object per-frame J and F of one sequence.

    gt, pred: (T, H, W) integer id maps (0 = background, 255 in gt = void -> background). The objects are 1..N with
    N = max id of the first GT frame unless `num_objects` is given. Returns {"J": (N, T'), "F": (N, T'),
    "objects": [1..N]} where T' = T - 2 when the first and last frames are skipped.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"{name}: GT {gt.shape} and prediction {pred.shape} must both be (T, H, W) and equal")
    gt = np.where(gt == VOID, 0, gt)
    n = int(gt[0].max()) if num_objects is None else int(num_objects)
    pmax = int(pred.max()) if pred.size else 0
    if pmax > n:
        raise ValueError(f"{name}: the prediction has object id {pmax} but the ground truth only {n} objects "
                         f"(the official evaluator refuses this too)")
    if skip_first_last:
        gt, pred = gt[1:-1], pred[1:-1]
    t, h, w = gt.shape
    objects = list(range(1, n + 1))
    j = np.zeros((n, t))
    f = np.zeros((n, t))
    step = _frame_chunks(t, h, w)
    kernel = _disk(bound_pixels((h, w)))
    for k, obj in enumerate(objects):
        for s in range(0, t, step):
            g = gt[s:s + step] == obj
            p = pred[s:s + step] == obj
            # Crop to the union's bounding box plus a 2-pixel margin: exact, since boundaries and their
            # intersections lie inside it, and pixels outside it are background in both masks.
            u = g | p
            rows, cols = np.flatnonzero(u.any(axis=(0, 2))), np.flatnonzero(u.any(axis=(0, 1)))
            if rows.size == 0:  # both empty on every frame of the chunk
                j[k, s:s + step] = 1.0
                f[k, s:s + step] = 1.0
                continue
            y0, y1 = max(rows[0] - 2, 0), min(rows[-1] + 3, h)
            x0, x1 = max(cols[0] - 2, 0), min(cols[-1] + 3, w)
            g, p = g[:, y0:y1, x0:x1], p[:, y0:y1, x0:x1]
            j[k, s:s + step] = db_eval_iou(g, p)
            f[k, s:s + step] = _boundary_f(g, p, kernel)
    return {"J": j, "F": f, "objects": objects}


def object_statistics(seq_name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per object: name `<seq>_<id>` as the official CSV, with J/F mean, recall and decay."""
    rows = []
    for k, obj in enumerate(result["objects"]):
        jm, jr, jd = db_statistics(result["J"][k])
        fm, fr, fd = db_statistics(result["F"][k])
        rows.append({"Sequence": f"{seq_name}_{obj}", "sequence": seq_name, "object": obj,
                     "J-Mean": jm, "J-Recall": jr, "J-Decay": jd, "F-Mean": fm, "F-Recall": fr, "F-Decay": fd})
    return rows


def summarize(object_rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Global numbers, objects pooled over all sequences (the official evaluation_method.py)."""
    rows = list(object_rows)
    if not rows:
        raise ValueError("no objects to summarize")
    out = {}
    for key in ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        out[key] = float(np.mean([r[key] for r in rows]))
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return {k: out[k] for k in GLOBAL_KEYS}


def _evaluate_pair(args: tuple[str, np.ndarray, np.ndarray, int | None]) -> tuple[str, list[dict[str, Any]]]:
    name, gt, pred, n = args
    return name, object_statistics(name, evaluate_sequence(gt, pred, n, name=name))


def evaluate_many(items: Iterable[tuple[str, Any, Any]], workers: int = 0) -> list[dict[str, Any]]:
    """Per-object rows of many sequences. items: (name, gt, pred) with arrays, or callables returning them
    (for lazy loading in the workers). workers > 1 spreads the sequences over a process pool."""
    jobs = [(name, gt, pred, None) for name, gt, pred in items]
    if workers and workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_evaluate_pair, jobs))
    else:
        results = [_evaluate_pair(j) for j in jobs]
    return [row for _, rows in results for row in rows]
