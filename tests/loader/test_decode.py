"""JPEG decoding for the loader: simplejpeg (cv2 without it), reduced-size decoding that the warp cannot tell
from a full decode, clear BadSample errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_pipeline import augment as A
from data_pipeline import loader as L


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Natural-looking content: smooth colour fields plus detail at a few pixels' scale."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    detail = cv2.resize(rng.integers(-40, 40, (h // 3, w // 3, 3)).astype(np.float32), (w, h))
    return np.clip(base + detail, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def test_decode_reduction_only_where_the_warp_downsamples_enough():
    p = A.AugmentParams(crop_size=480)
    assert A.decode_reduction(np.array([[1.0, 0, 0], [0, 1.0, 0]]), 480, 854) == 1
    assert A.decode_reduction(np.array([[0.5, 0, 0], [0, 0.5, 0]]), 480, 854) == 2
    assert A.decode_reduction(np.array([[0.5, 0, 0], [0, 0.51, 0]]), 480, 854) == 1  # one direction is enough
    assert A.decode_reduction(np.array([[0.2, 0, 0], [0, 0.2, 0]]), 480, 854) == 4
    assert A.decode_reduction(np.array([[0.01, 0, 0], [0, 0.01, 0]]), 480, 854) == 8
    assert A.decode_reduction(np.array([[0.01, 0, 0], [0, 0.01, 0]]), 40, 64) == 4  # keeps >= 8 px reduced
    assert A.decode_reduction(np.array([[0.01, 0, 0], [0, 0.01, 0]]), 12, 64) == 1
    c, s = np.cos(0.4) * 0.3, np.sin(0.4) * 0.3  # rotation does not change the scale
    assert A.decode_reduction(np.array([[c, -s, 0], [s, c, 0]]), 480, 854) == 2
    rng = np.random.default_rng(0)  # Cutie's geometry at crop 480 from 480p frames never allows it
    assert {A.decode_reduction(A.draw_geometry(rng, 480, 854, p), 480, 854) for _ in range(200)} == {1}


@pytest.mark.parametrize("r", [2, 4])
def test_reduced_decode_equals_full_decode_up_to_resampling(r):
    """Warping the 1/r DCT-scaled decode with reduced_matrix gives the full decode's warp up to resampling error
    (about as close as an area-filtered downsample is), and clearly closer than without the half-pixel term."""
    h, w, out = 480, 640, 48
    data = _jpeg(_texture(h, w))
    full = L.decode_jpeg(data, "f.jpg", (h, w))
    small = L.decode_jpeg(data, "f.jpg", (h, w), reduce=r)
    assert small.shape == (h // r, w // r, 3)
    area = cv2.resize(full, (w // r, h // r), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(r)
    errs, area_errs, naive_errs = [], [], []
    for _ in range(20):
        angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.7, 1.0) / r  # downsamples by >= r everywhere
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = np.array([rng.uniform(200, w - 200), rng.uniform(200, h - 200)])
        m = np.hstack([rot, (out / 2 - rot @ centre)[:, None]])
        assert A.decode_reduction(m, h, w) >= r
        ref = A.warp_image(full, m, out).astype(float)
        got = A.warp_image(small, A.reduced_matrix(m, r), out).astype(float)
        via_area = A.warp_image(area, A.reduced_matrix(m, r), out).astype(float)
        naive = A.warp_image(small, m @ np.diag([r, r, 1.0]), out).astype(float)  # pixel corners, not centres
        errs.append(np.abs(ref - got).mean())
        area_errs.append(np.abs(ref - via_area).mean())
        naive_errs.append(np.abs(ref - naive).mean())
    err, area_err, naive_err = np.mean(errs), np.mean(area_errs), np.mean(naive_errs)
    print(f"r={r}: |full - reduced| {err:.2f}, |full - area| {area_err:.2f}, |full - uncentred| {naive_err:.2f}")
    assert err <= 1.25 * area_err, (err, area_err)
    assert naive_err > 1.3 * err, (naive_err, err)


def test_cv2_fallback_decodes_the_same(monkeypatch):
    data = _jpeg(_texture(96, 128, seed=3))
    fast = [L.decode_jpeg(data, "f.jpg", (96, 128), reduce=r) for r in (1, 2)]
    assert L.jpeg_size(data, "f.jpg") == (96, 128)
    monkeypatch.setattr(L, "simplejpeg", None)
    assert L.jpeg_size(data, "f.jpg") == (96, 128)
    for r, ref in zip((1, 2), fast, strict=True):
        got = L.decode_jpeg(data, "f.jpg", (96, 128), reduce=r)
        assert got.shape == ref.shape and np.abs(got.astype(int) - ref).mean() < 1.0


@pytest.mark.parametrize("fallback", [False, True])
def test_undecodable_jpegs_are_bad_samples(monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(L, "simplejpeg", None)
    data = _jpeg(_texture(96, 128, seed=4))
    with pytest.raises(L.BadSample, match="not a decodable JPEG"):
        L.jpeg_size(b"\x89PNG not a jpeg", "03.jpg")
    with pytest.raises(L.BadSample, match="03.jpg"):
        L.decode_jpeg(b"\xff\xd8\xff\xd9", "03.jpg", (96, 128))
    if not fallback:  # simplejpeg is strict: libjpeg's "premature end of data" is an error, not a grey frame
        with pytest.raises(L.BadSample, match="not a decodable JPEG"):
            L.decode_jpeg(data[: len(data) // 2] + b"\xff\xd9", "03.jpg", (96, 128))
    with pytest.raises(L.BadSample, match="header says 100x96"):  # a header that lies about the size
        L.decode_jpeg(data, "03.jpg", (96, 100))


@pytest.mark.parametrize("fallback", [False, True])
def test_rgbx_decode_and_warp_give_the_rgb_ones(monkeypatch, fallback):
    """The loader decodes and warps RGBX (OpenCV's 4-channel warp is SIMD): the RGB it yields is bit-identical to
    decoding and warping RGB, with either decoder, at full and reduced size, into a caller's buffer too."""
    if fallback:
        monkeypatch.setattr(L, "simplejpeg", None)
    data = _jpeg(_texture(96, 128, seed=5))
    rng = np.random.default_rng(5)
    for r in (1, 2):
        rgb = L.decode_jpeg(data, "f.jpg", (96, 128), reduce=r)
        buf = np.empty(96 * 128 * 4, np.uint8)
        rgbx = L.decode_jpeg(data, "f.jpg", (96, 128), reduce=r, buffer=buf, channels=4)
        assert rgbx.shape == (*rgb.shape[:2], 4) and np.array_equal(rgbx[..., :3], rgb)
        assert (rgbx[..., 3] == 255).all() and (fallback or np.shares_memory(rgbx, buf))
        for _ in range(5):
            m = A.draw_geometry(rng, *rgb.shape[:2], A.AugmentParams(crop_size=40))
            assert np.array_equal(A.warp_image(rgbx, m, 40)[..., :3], A.warp_image(rgb, m, 40))
    with pytest.raises(ValueError, match="channels"):
        L.decode_jpeg(data, "f.jpg", (96, 128), channels=1)
