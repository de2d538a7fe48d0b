"""Unit checks of data_pipeline.augment against the definitions it implements."""

from __future__ import annotations

import cv2
import numpy as np

from data_pipeline import augment as A


def _torchvision_order(x: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """ColorJitter's brightness → contrast → saturation as torchvision defines them (float, clamped per step)."""
    gray = lambda y: y @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    x = np.clip(x * b, 0, 255)
    x = np.clip(c * x + (1 - c) * gray(x).mean(), 0, 255)
    return np.clip(s * x + (1 - s) * gray(x)[..., None], 0, 255)


def test_colour_matrix_matches_sequential_jitter():
    rng = np.random.default_rng(0)
    x = rng.integers(60, 190, (30, 40, 3), dtype=np.uint8)  # mid-range: no clamping between steps
    for b, c, s in [(1.08, 0.97, 1.03), (0.9, 1.05, 0.95), (1.0, 1.0, 1.0)]:
        ref = _torchvision_order(x.astype(np.float64), b, c, s)
        got = cv2.transform(x, A.colour_matrix(b, c, s, np.array(cv2.mean(x)[:3])))
        assert np.abs(ref - got).max() <= 1.0


def test_colour_output_range_and_grayscale():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    out = A.colour(rng, x, A.AugmentParams(crop_size=16, grayscale_probability=1.0))
    assert out.dtype == np.float32 and out.shape == (8, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert np.allclose(out[:, 0], out[:, 1]) and np.allclose(out[:, 1], out[:, 2])
    plain = A.colour(rng, x, A.AugmentParams(crop_size=16, clip_jitter=(0, 0, 0), frame_jitter=(0, 0, 0),
                                             grayscale_probability=0.0))
    assert np.allclose(plain, x.transpose(0, 3, 1, 2).astype(np.float32) / 255, atol=1e-6)


def test_geometric_keeps_an_object_in_frame_zero_or_raises():
    rng = np.random.default_rng(2)
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    masks = np.zeros((8, 64, 64), np.uint8)
    masks[0, 30:34, 30:34] = 5  # a tiny object: some crops lose it, the retry finds one that keeps it
    p = A.AugmentParams(crop_size=32, crop_tries=50)
    for _ in range(20):
        _, m = A.geometric(rng, frames, masks, p)
        assert (m[0] == 5).any()
    masks[0] = 0
    try:
        A.geometric(rng, frames, masks, p)
    except A.NoObjectError:
        pass
    else:
        raise AssertionError("an empty frame 0 must raise NoObjectError")


def test_merge_gives_fresh_ids():
    f1 = np.zeros((2, 16, 16, 3), np.uint8)
    m1 = np.zeros((2, 16, 16), np.uint8)
    m1[:, :4, :4] = 17
    f2 = np.full((2, 16, 16, 3), 200, np.uint8)
    m2 = np.zeros((2, 16, 16), np.uint8)
    m2[:, 8:, 8:] = 7  # (7 + 10) % 255 = 17 is taken: bumped to 18
    f, m, mapping = A.merge(f1, m1, f2, m2)
    assert mapping == {7: 18}
    assert set(np.unique(m)) == {0, 17, 18}
    assert f[0, 12, 12, 0] == 200 and f[0, 0, 0, 0] == 0
