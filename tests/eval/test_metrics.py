"""J&F against vos-benchmark (per-object J and F to 1e-6) and the official edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from training import metrics

vos_evaluator = pytest.importorskip("vos_benchmark.evaluator")


def _blob_video(rng, t, h, w, n):
    """Moving, jittered ellipses; every object present in frame 0 (where vos-benchmark and DAVIS agree)."""
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.zeros((t, h, w), np.uint8)
    pred = np.zeros((t, h, w), np.uint8)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        vy, vx = rng.normal(0, 1.5, 2)
        for i in range(t):
            y, x = cy + vy * i, cx + vx * i
            g = ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
            if i == 0:
                g[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True
            gt[i][g] = k
            jy, jx = rng.normal(0, 2, 2)
            p = ((yy - y - jy) / (ry * rng.uniform(0.8, 1.2))) ** 2 + ((xx - x - jx) / rx) ** 2 <= 1
            if rng.random() < 0.1:
                p[:] = False  # a missed frame
            pred[i][p] = k
        noise = rng.random((t, h, w)) < 0.002
        pred[noise] = rng.integers(0, n + 1, noise.sum())
    return gt, pred


@pytest.mark.parametrize("seed", range(6))
def test_matches_vos_benchmark(seed):
    rng = np.random.default_rng(seed)
    t, h, w, n = int(rng.integers(5, 12)), int(rng.integers(30, 90)), int(rng.integers(40, 120)), int(rng.integers(1, 4))
    gt, pred = _blob_video(rng, t, h, w, n)
    ours = metrics.evaluate_sequence(gt, pred)
    ev = vos_evaluator.Evaluator()
    for i in range(1, t - 1):
        ev.feed_frame(pred[i], gt[i])
    assert ev.objects_in_gt == set(ours["objects"])
    for k, obj in enumerate(ours["objects"]):
        np.testing.assert_allclose(ours["J"][k], ev.object_iou[obj], atol=1e-6, rtol=0)
        np.testing.assert_allclose(ours["F"][k], ev.boundary_f[obj], atol=1e-6, rtol=0)
    iou, bf = ev.conclude()
    rows = metrics.object_statistics("v", ours)
    for r in rows:
        assert abs(r["J-Mean"] * 100 - iou[r["object"]]) < 1e-4
        assert abs(r["F-Mean"] * 100 - bf[r["object"]]) < 1e-4


def test_vectorised_equals_per_frame():
    rng = np.random.default_rng(7)
    gt, pred = _blob_video(rng, 9, 40, 50, 2)
    g, p = gt == 1, pred == 1
    f_all = metrics.db_eval_boundary(g, p)
    f_one = [metrics.db_eval_boundary(g[i], p[i]) for i in range(len(g))]
    np.testing.assert_array_equal(f_all, np.array(f_one))


def _frames(*masks):
    return np.stack(masks).astype(np.uint8)


def test_edge_cases():
    z = np.zeros((20, 30), bool)
    sq = z.copy()
    sq[5:12, 8:20] = True
    # both empty: J = F = 1
    assert metrics.db_eval_iou(z, z) == 1.0 and metrics.db_eval_boundary(z, z) == 1.0
    # empty prediction on a non-empty GT: J = 0, F = 0 (P=1, R=0)
    assert metrics.db_eval_iou(sq, z) == 0.0 and metrics.db_eval_boundary(sq, z) == 0.0
    # prediction on an empty GT: J = 0, F = 0 (P=0, R=1)
    assert metrics.db_eval_iou(z, sq) == 0.0 and metrics.db_eval_boundary(z, sq) == 0.0
    # perfect: 1, 1
    assert metrics.db_eval_iou(sq, sq) == 1.0 and metrics.db_eval_boundary(sq, sq) == 1.0


def test_object_vanishing_mid_sequence():
    a = np.zeros((20, 30), np.uint8)
    a[2:10, 2:10] = 1
    a[12:18, 15:25] = 2
    b = a.copy()
    b[b == 2] = 0  # object 2 gone from the GT
    gt = _frames(a, a, b, b, a)
    pred = _frames(a, a, a, b, a)  # predicts it one frame too long
    res = metrics.evaluate_sequence(gt, pred)
    assert res["objects"] == [1, 2]
    np.testing.assert_array_equal(res["J"][0], [1, 1, 1])
    np.testing.assert_array_equal(res["J"][1], [1, 0, 1])  # frame 2: predicted on empty GT -> 0; frame 3: both empty -> 1
    np.testing.assert_array_equal(res["F"][1], [1, 0, 1])


def test_void_is_background_and_extra_objects_rejected():
    a = np.zeros((3, 10, 10), np.uint8)
    a[:, 2:5, 2:5] = 1
    g = a.copy()
    g[:, 0, :] = 255
    res = metrics.evaluate_sequence(g, a)
    assert res["objects"] == [1] and np.all(res["J"] == 1)
    bad = a.copy()
    bad[1, 8, 8] = 2
    with pytest.raises(ValueError, match="object id 2"):
        metrics.evaluate_sequence(a, bad, name="seqX")


def test_statistics_and_long_video_decay():
    v = np.linspace(1, 0, 300)
    m, o, d = metrics.db_statistics(v)
    assert abs(m - 0.5) < 1e-12 and abs(o - 150 / 300) < 1e-12
    # bins: ids round(linspace(1, 300, 5)) - 1 = [0, 75, 150, 224, 299]; v[i] = 1 - i / 299, so the first bin
    # v[0:76] has mean 1 - 37.5 / 299 and the last v[224:300] 1 - 261.5 / 299 (the official uint8 bins give NaN)
    assert d == pytest.approx(224 / 299, rel=0, abs=1e-12)
    short = np.array([1.0, 0.9, 0.8, 0.2, 0.1, 0.0, 0.3])
    ids = (np.round(np.linspace(1, 7, 5) + 1e-10) - 1).astype(np.uint8)  # the official indices (no wrap below 256)
    expect = short[ids[0]:ids[1] + 1].mean() - short[ids[3]:ids[4] + 1].mean()
    assert metrics.db_statistics(short)[2] == pytest.approx(expect)


def test_summarize_pools_objects():
    rows = [{"J-Mean": 1.0, "J-Recall": 1, "J-Decay": 0, "F-Mean": 0.5, "F-Recall": 1, "F-Decay": 0},
            {"J-Mean": 0.0, "J-Recall": 0, "J-Decay": 0, "F-Mean": 0.5, "F-Recall": 0, "F-Decay": 0},
            {"J-Mean": 0.5, "J-Recall": 1, "J-Decay": 0, "F-Mean": 0.5, "F-Recall": 1, "F-Decay": 0}]
    s = metrics.summarize(rows)
    assert s["J-Mean"] == pytest.approx(0.5) and s["J&F-Mean"] == pytest.approx(0.5)
    assert list(s) == list(metrics.GLOBAL_KEYS)


def test_evaluate_many_parallel_equals_serial():
    rng = np.random.default_rng(3)
    items = [(f"s{i}", *_blob_video(rng, 6, 30, 40, 2)) for i in range(3)]
    assert metrics.evaluate_many(items, workers=2) == metrics.evaluate_many(items, workers=0)


def test_object_appearing_after_frame_0_is_scored_on_the_frames_before_it():
    """README: where an object first appears after frame 0 the official DAVIS evaluator (followed here) scores the
    frames before it appears, vos-benchmark skips them. Object 1 appears at frame 3 (object 2 holds frame 0, so
    id 1 <= max(first frame) is one of the sequence's objects); frames 1-4 are scored. Prediction of object 1:
    frame 1 nothing (both empty), frame 2 a false positive before it appears, frame 3 exact, frame 4 missed."""
    box1 = (slice(3, 9), slice(3, 11))
    box2 = (slice(10, 16), slice(18, 26))
    gt = np.zeros((6, 20, 30), np.uint8)
    gt[:, box2[0], box2[1]] = 2
    gt[3:, box1[0], box1[1]] = 1
    pred = gt.copy()
    pred[2][box1] = 1  # before it appears
    pred[4][box1] = 0  # missed
    res = metrics.evaluate_sequence(gt, pred)
    assert res["objects"] == [1, 2]
    # by hand: both empty -> J = F = 1; false positive -> 0, 0 (F: P = 0, R = 1); exact -> 1, 1; miss -> 0, 0
    np.testing.assert_array_equal(res["J"], [[1, 0, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(res["F"], [[1, 0, 1, 0], [1, 1, 1, 1]])
    rows = metrics.object_statistics("s", res)
    assert [(r["J-Mean"], r["F-Mean"], r["J-Recall"]) for r in rows] == [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0)]
    assert metrics.summarize(rows)["J&F-Mean"] == 0.75  # (0.5 + 1) / 2

    # vos-benchmark scores object 1 from frame 2 on (its first frame in the GT or the prediction): [0, 1, 0]
    ev = vos_evaluator.Evaluator()
    for i in range(1, 5):
        ev.feed_frame(pred[i], gt[i])
    np.testing.assert_array_equal(ev.object_iou[1], [0, 1, 0])
    np.testing.assert_array_equal(ev.boundary_f[1], [0, 1, 0])
    np.testing.assert_array_equal(ev.object_iou[1], res["J"][0, 1:])  # the frames both score agree
    iou, bf = ev.conclude()
    assert iou[1] == pytest.approx(100 / 3) and bf[1] == pytest.approx(100 / 3) and iou[2] == bf[2] == 100
    vos_jf = (np.mean(list(iou.values())) + np.mean(list(bf.values()))) / 200
    assert vos_jf == pytest.approx(2 / 3)  # (1/3 + 1) / 2, not our 0.75

    # an object whose id is above every id of frame 0 is not one of the sequence's objects (official: N = max of
    # the first GT frame); vos-benchmark scores it
    late3 = gt.copy()
    late3[3:, 0:2, 0:4] = 3
    assert metrics.evaluate_sequence(late3, pred)["objects"] == [1, 2]
    ev = vos_evaluator.Evaluator()
    for i in range(1, 5):
        ev.feed_frame(pred[i], late3[i])
    assert ev.objects_in_gt == {1, 2, 3}
