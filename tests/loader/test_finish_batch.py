"""finish_batch (the colour jitter and dtype conversion, run on the device) against the definitions: the exact
colour map in float64, OpenCV's grey, the numpy/OpenCV implementation (augment.apply_colour, the CPU backend), and the
layout ClipTrainer takes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from data_pipeline import augment as A
from data_pipeline.loader import finish_batch, loader_batch


def _exact(frames: np.ndarray, jitter: np.ndarray, grey: bool) -> np.ndarray:
    """float64 reference: colour_matrix applied to each frame, rounded once, clipped; OpenCV's grey; / 255."""
    out = []
    for f, (b, c, s) in zip(frames, jitter, strict=True):
        m = A.colour_matrix(b, c, s, np.array(cv2.mean(f)[:3]))
        y = np.clip(np.round(f.astype(np.float64) @ m[:, :3].T + m[:, 3]), 0, 255)
        if grey:
            y = np.repeat(cv2.cvtColor(y.astype(np.uint8), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=-1)
        out.append(y.transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def _case(seed: int, size: int, grey_p: float, rgbx: bool):
    rng = np.random.default_rng(seed)
    b, t = 3, 8
    frames = rng.integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)
    frames[:, :, : size // 3] = rng.integers(0, 256, 3, dtype=np.uint8)  # flat areas: rounding ties are common
    p = A.AugmentParams(crop_size=size, grayscale_probability=grey_p, clip_jitter=(0.3, 0.3, 0.3))
    draws = [A.colour_draw(rng, t, p) for _ in range(b)]
    jitter = np.stack([d[0] for d in draws])
    jitter[0, 0] = 1.0  # an untouched frame
    grey = np.array([d[1] for d in draws])
    cls = rng.integers(0, 3, (b, t, size, size), dtype=np.uint8)
    wire = np.concatenate([frames, np.full((b, t, size, size, 1), 255, np.uint8)], -1) if rgbx else frames
    batch = loader_batch(wire.copy(), cls, [[4, 9], [4], [1, 2]], jitter, grey, [{"key": str(i)} for i in range(b)])
    return frames, cls, jitter, grey, batch


@pytest.mark.parametrize("backend", ["cv2", "torch"])
@pytest.mark.parametrize("seed,grey_p,rgbx", [(0, 0.0, True), (1, 1.0, True), (2, 0.5, False)])
def test_colour_equals_the_exact_map_and_opencv_within_one_level(seed, grey_p, rgbx, backend):
    frames, _, jitter, grey, batch = _case(seed, 40, grey_p, rgbx)
    rgb = finish_batch(batch, backend)["rgb"].numpy()
    assert rgb.dtype == np.float32 and rgb.flags.c_contiguous
    exact = np.stack([_exact(frames[i], jitter[i], bool(grey[i])) for i in range(len(frames))])
    diff = np.abs(rgb - exact)
    # float32 against float64: a level apart only where the map lands within float32 rounding of a .5 tie
    assert (diff > 1e-6).mean() < 1e-4 and diff.max() <= 1 / 255 + 1e-6
    assert np.array_equal(rgb[0, 0], frames[0, 0].transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)) \
        or grey[0]  # identity jitter: the frame itself
    cv = np.stack([A.apply_colour(frames[i], jitter[i], bool(grey[i])) for i in range(len(frames))])
    assert np.abs(rgb - cv).max() <= 1 / 255 + 1e-6  # the two float32 implementations differ only at ties
    if grey.any():
        g = rgb[grey]
        assert np.array_equal(g[:, :, 0], g[:, :, 1]) and np.array_equal(g[:, :, 1], g[:, :, 2])


@pytest.mark.parametrize("backend", ["cv2", "torch"])
def test_a_wrong_colour_map_is_caught(backend):
    """The reference above can fail: a batch whose contrast factors were lost misses it."""
    frames, _, jitter, grey, batch = _case(3, 24, 0.0, True)
    exact = np.stack([_exact(frames[i], jitter[i], False) for i in range(len(frames))])
    wrong = jitter.copy()
    wrong[..., 1] = 1.0  # no contrast change
    rgb = finish_batch(dict(batch, jitter=torch.from_numpy(wrong)), backend)["rgb"].numpy()
    assert np.abs(rgb - exact).max() > 2 / 255
    with pytest.raises(ValueError, match="backend"):
        finish_batch(batch, "numpy")


def test_labels_and_layout():
    frames, cls, _, _, batch = _case(4, 16, 0.5, True)
    out = finish_batch(batch)
    b, t, s = cls.shape[:3]
    assert out["rgb"].shape == (b, t, 3, s, s) and out["rgb"].dtype == torch.float32 and out["rgb"].is_contiguous()
    assert out["cls_gt"].dtype == torch.int64 and torch.equal(out["cls_gt"][:, :, 0], torch.from_numpy(cls).long())
    assert out["selector"].tolist() == [[1, 1], [1, 0], [1, 1]]
    first = out["first_frame_gt"]
    assert first.shape == (b, 1, 2, s, s) and first.dtype == torch.float32
    for i in range(b):
        for k in range(2):
            assert torch.equal(first[i, 0, k], torch.from_numpy(cls[i, 0] == k + 1).float())
    assert out["info"] == batch["info"] and set(out) == {"rgb", "cls_gt", "first_frame_gt", "selector", "info"}
    assert finish_batch(out) is out  # a model batch passes through


def test_training_moves_then_finishes_then_casts():
    from training.train import _to_device

    _, _, _, _, batch = _case(5, 16, 0.0, True)
    out = _to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert out["rgb"].dtype == torch.bfloat16 and out["first_frame_gt"].dtype == torch.bfloat16
    assert out["cls_gt"].dtype == torch.int64
    ref = finish_batch(batch)["rgb"].to(torch.bfloat16)  # jitter applied in float32 (float64 factors) first
    assert torch.equal(out["rgb"], ref)
