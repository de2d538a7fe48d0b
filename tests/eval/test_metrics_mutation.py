"""Edge cases of training/metrics.py that tests/eval/test_metrics.py leaves open (found by mutation testing).

The expected values are computed by hand or by `_ref_iou` / `_ref_f`, a transcription of the official
davis2017-evaluation `db_eval_iou` and `f_measure` (per frame, with `void_pixels`), built on vos-benchmark's copy of
the official `_seg2bmap` and skimage's `disk`.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training import metrics

vos_utils = pytest.importorskip("vos_benchmark.utils")
skimage_morphology = pytest.importorskip("skimage.morphology")


# --- the official formulas (davis2017-evaluation davis2017/metrics.py), one frame at a time -------------------------

def _ref_iou(annotation, segmentation, void_pixels=None):
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    void = np.zeros_like(segmentation) if void_pixels is None else void_pixels.astype(bool)
    inters = np.sum((segmentation & annotation) & np.logical_not(void))
    union = np.sum((segmentation | annotation) & np.logical_not(void))
    return 1.0 if np.isclose(union, 0) else inters / union


def _ref_f(annotation, segmentation, void_pixels=None, bound_th=0.008):
    """f_measure(foreground_mask=segmentation, gt_mask=annotation, void_pixels, bound_th) of the official code."""
    void = np.zeros(segmentation.shape, bool) if void_pixels is None else void_pixels.astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(segmentation.shape))
    fg_boundary = vos_utils._seg2bmap(segmentation.astype(bool) * np.logical_not(void))
    gt_boundary = vos_utils._seg2bmap(annotation.astype(bool) * np.logical_not(void))
    kernel = skimage_morphology.disk(bound_pix).astype(np.uint8)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), kernel)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), kernel)
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _ref_statistics(v):
    """The official db_statistics (uint8 bin ids; identical to ours below 256 frames)."""
    v = np.asarray(v, np.float64)
    ids = np.round(np.linspace(1, len(v), 5) + 1e-10) - 1
    ids = ids.astype(np.uint8)
    d_bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return np.nanmean(v), np.nanmean(v > 0.5), np.nanmean(d_bins[0]) - np.nanmean(d_bins[3])


def _row(w, *runs):
    """A (1, w) mask, True on the inclusive column runs (a, b)."""
    m = np.zeros((1, w), bool)
    for a, b in runs:
        m[0, a:b + 1] = True
    return m


def _random_masks(rng, shape, p=0.5, smooth=True):
    m = rng.random(shape) < p
    if smooth:  # blobs rather than salt and pepper, so that boundaries partly match
        m = cv2.blur(m.astype(np.float32).reshape(-1, shape[-1]), (3, 3)).reshape(shape) > 0.5
    return m


# --- region J ------------------------------------------------------------------------------------------------------

def test_iou_void_pixels_by_hand():
    ann = np.array([[1, 1, 0, 0, 0]], bool)
    seg = np.array([[0, 1, 1, 0, 1]], bool)
    void = np.array([[1, 0, 0, 0, 1]], bool)
    assert metrics.db_eval_iou(ann, seg) == 1 / 4
    assert metrics.db_eval_iou(ann, seg, void) == 1 / 2  # ann -> [0,1,0,0,0], seg -> [0,1,1,0,0]
    # uint8 void (not bool) is a mask too; void covering the whole union leaves both empty: J = 1
    assert metrics.db_eval_iou(ann, seg, (ann | seg).astype(np.uint8)) == 1.0
    # void inside the GT only: the GT pixel is dropped, not the prediction's
    assert metrics.db_eval_iou(ann, ann, np.array([[0, 1, 0, 0, 0]], np.uint8)) == 1.0
    assert metrics.db_eval_iou(ann, seg, np.array([[0, 0, 1, 0, 0]], np.uint8)) == 1 / 3


def test_iou_single_pixel_union():
    px = np.zeros((4, 5), bool)
    px[2, 3] = True
    assert metrics.db_eval_iou(px, px) == 1.0
    assert metrics.db_eval_iou(px, ~px & False) == 0.0


def test_iou_void_matches_official_on_stacks():
    rng = np.random.default_rng(11)
    ann = _random_masks(rng, (4, 9, 13))
    seg = _random_masks(rng, (4, 9, 13))
    void = rng.random((4, 9, 13)) < 0.3
    ours = metrics.db_eval_iou(ann, seg, void)
    ref = [_ref_iou(ann[i], seg[i], void[i]) for i in range(4)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
    assert not np.allclose(ours, metrics.db_eval_iou(ann, seg))  # the void pixels matter here


# --- boundary F ----------------------------------------------------------------------------------------------------

def test_bound_pixels():
    assert metrics.bound_pixels((10, 10), 1) == 1
    assert metrics.bound_pixels((10, 10), 1.0) == 1
    assert metrics.bound_pixels((10, 10), 2) == 2
    assert metrics.bound_pixels((10, 10), 2.5) == 2  # the official disk(2.5) is disk(2)
    assert metrics.bound_pixels((480, 854)) == 8  # ceil(0.008 * 979.6)
    # (T, H, W): the last two axes, not the first two
    assert metrics.bound_pixels((1, 10, 1000)) == 9  # ceil(0.008 * 1000.05); (1, 10) would give 1
    assert metrics.bound_pixels((3, 1000, 10)) == 9
    assert metrics.bound_pixels((3, 1000, 10), 0.5) == 501


def test_boundary_bound_th_on_a_row():
    """(1, 40) masks: GT boundary pixels at columns 4 and 20, predicted at 7 and 20 (a boundary pixel is where a
    pixel differs from its east neighbour). Radius r: column 7 matches 4 iff r >= 3."""
    gt = _row(40, (5, 20))
    fg = _row(40, (8, 20))
    assert metrics.db_eval_boundary(gt, fg) == 0.5  # r = ceil(0.008 * 40.01) = 1: P = R = 1/2
    assert metrics.db_eval_boundary(gt, fg, bound_th=1) == 0.5
    assert metrics.db_eval_boundary(gt, fg, bound_th=2) == 0.5
    assert metrics.db_eval_boundary(gt, fg, bound_th=3) == 1.0
    assert metrics.db_eval_boundary(gt, fg, bound_th=0.08) == 1.0  # r = ceil(3.2) = 4
    # P = 1/2, R = 1: F = 2/3 (prediction boundaries 7, 20; GT boundary 20 only)
    assert metrics.db_eval_boundary(_row(40, (8, 20)) | _row(40, (0, 7)), fg) == pytest.approx(2 / 3, abs=1e-15)
    for th in (0.008, 1, 2, 3, 0.08):
        assert metrics.db_eval_boundary(gt, fg, bound_th=th) == _ref_f(gt, fg, bound_th=th)


def test_boundary_radius_one_disk_is_a_cross():
    """GT: the pixel (0, 0) -> boundary {(0, 0)}. Prediction: the pixel (2, 2) -> boundary (1..2, 1..2). Only the
    diagonal neighbour (1, 1) is within one pixel of (0, 0): disk(1) excludes it, a 3x3 square would not."""
    gt = np.zeros((10, 10), bool)
    gt[0, 0] = True
    fg = np.zeros((10, 10), bool)
    fg[2, 2] = True
    assert metrics.bound_pixels(gt.shape) == 1
    assert metrics.db_eval_boundary(gt, fg) == 0.0
    assert _ref_f(gt, fg) == 0.0
    fg[1, 2] = True  # boundary now includes (0, 1), next to (0, 0): P = 1/6, R = 1
    assert metrics.db_eval_boundary(gt, fg) == pytest.approx(2 / 7, abs=1e-15)
    assert metrics.db_eval_boundary(gt, fg) == pytest.approx(_ref_f(gt, fg), abs=1e-15)


def test_boundary_single_boundary_pixel_each():
    """A lone pixel at (0, 0) has exactly one boundary pixel (nothing lies north-west of it): n_fg = n_gt = 1."""
    px = np.zeros((6, 7), bool)
    px[0, 0] = True
    assert np.count_nonzero(metrics.seg2bmap(px)) == 1
    assert metrics.db_eval_boundary(px, px) == 1.0
    far = np.zeros((6, 7), bool)
    far[0, 5] = True  # n_fg = 2 (columns 4, 5 of row 0), far from (0, 0): P = R = 0
    assert metrics.db_eval_boundary(px, far) == 0.0
    assert metrics.db_eval_boundary(far, px) == 0.0
    # one-row masks: one boundary pixel each, one pixel apart (within r = 1)
    assert metrics.db_eval_boundary(_row(12, (0, 4)), _row(12, (0, 5))) == 1.0
    assert metrics.db_eval_boundary(_row(12, (0, 4)), _row(12, (0, 6))) == 0.0


def test_boundary_void_pixels_by_hand():
    gt = np.zeros((10, 20), bool)
    gt[2:8, 2:8] = True
    fg = gt.copy()
    fg[2:8, 12:16] = True  # a false positive blob right of column 11
    void = np.zeros((10, 20), np.uint8)
    void[:, 11:] = 1
    assert metrics.db_eval_boundary(gt, fg) == pytest.approx(_ref_f(gt, fg), abs=1e-15)
    assert metrics.db_eval_boundary(gt, fg) < 0.9
    assert metrics.db_eval_boundary(gt, fg, void) == 1.0
    assert metrics.db_eval_boundary(fg, gt, void) == 1.0
    # void over the GT object: the GT becomes empty, the prediction is not: P = 0, R = 1 -> 0
    void2 = np.zeros((10, 20), bool)
    void2[:, :10] = True
    assert metrics.db_eval_boundary(gt, fg, void2) == 0.0
    assert metrics.db_eval_boundary(gt, gt, void2) == 1.0  # both empty after voiding


def test_boundary_void_matches_official_on_stacks():
    rng = np.random.default_rng(5)
    shape = (5, 14, 23)
    ann = _random_masks(rng, shape)
    seg = _random_masks(rng, shape)
    void = _random_masks(rng, shape, p=0.3)
    for th in (0.008, 2):
        ours = metrics.db_eval_boundary(ann, seg, void, bound_th=th)
        ref = [_ref_f(ann[i], seg[i], void[i], bound_th=th) for i in range(shape[0])]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
        assert not np.allclose(ours, metrics.db_eval_boundary(ann, seg, bound_th=th))
    ours = metrics.db_eval_boundary(ann, seg)
    np.testing.assert_allclose(ours, [_ref_f(ann[i], seg[i]) for i in range(shape[0])], rtol=0, atol=1e-12)


def test_boundary_non_square_stack_uses_last_two_axes():
    """(2, 6, 200): radius ceil(0.008 * 200.09) = 2, not ceil(0.008 * ||(2, 6)||) = 1."""
    gt = np.zeros((2, 6, 200), bool)
    fg = np.zeros((2, 6, 200), bool)
    gt[:, :, 0:100] = True
    fg[:, :, 0:102] = True  # boundary two columns right of the GT's
    np.testing.assert_array_equal(metrics.db_eval_boundary(gt, fg), [1.0, 1.0])
    assert _ref_f(gt[0], fg[0]) == 1.0
    fg[:, :, 102] = True  # three columns
    np.testing.assert_array_equal(metrics.db_eval_boundary(gt, fg), [0.0, 0.0])


def test_boundary_integer_masks_with_void():
    """Id maps compared to an id, passed as uint8 0/1 masks, with a uint8 void map: same as booleans."""
    gt = np.zeros((8, 12), np.uint8)
    gt[1:6, 1:6] = 1
    fg = np.zeros((8, 12), np.uint8)
    fg[1:6, 2:9] = 1
    void = np.zeros((8, 12), np.uint8)
    void[:, 7:] = 1
    got = metrics.db_eval_boundary(gt, fg, void)
    assert got == metrics.db_eval_boundary(gt.astype(bool), fg.astype(bool), void.astype(bool))
    assert got == pytest.approx(_ref_f(gt, fg, void), abs=1e-15)
    assert metrics.db_eval_iou(gt, fg, void) == pytest.approx(_ref_iou(gt, fg, void), abs=1e-15)


# --- statistics ----------------------------------------------------------------------------------------------------

def test_statistics_recall_is_strictly_above_half():
    v = [0.5, 0.5, 1.0, 0.0, 0.6]
    m, o, d = metrics.db_statistics(v)
    assert o == 2 / 5  # 0.5 is not a success
    assert (m, o, d) == pytest.approx(_ref_statistics(v), abs=1e-15)


def test_statistics_computed_in_float64():
    v = np.array([0.1, 0.2, 0.7], np.float32)
    exact = (float(v[0]) + float(v[1]) + float(v[2])) / 3
    m, o, d = metrics.db_statistics(v)
    assert m == pytest.approx(exact, rel=0, abs=1e-16)
    assert float(np.mean(v)) != pytest.approx(exact, rel=0, abs=1e-16)  # a float32 mean would differ
    assert o == 1 / 3
    assert d == pytest.approx((float(v[0]) + float(v[1])) / 2 - float(v[2]), rel=0, abs=1e-16)  # bins [0, 1], [2]
    assert (m, o, d) == pytest.approx(_ref_statistics(v), rel=0, abs=1e-16)


# --- frame chunks and evaluate_sequence ----------------------------------------------------------------------------

def test_frame_chunks():
    assert metrics._frame_chunks(100, 1000, 1000) == 4  # 4 Mi pixels // 1e6
    assert type(metrics._frame_chunks(100, 1000, 1000)) is int
    assert metrics._frame_chunks(100, 1024, 2048) == 2
    assert metrics._frame_chunks(100, 4096, 4096) == 1  # a frame over the budget: one at a time
    assert metrics._frame_chunks(3, 10, 10) == 3
    assert metrics._frame_chunks(1, 10, 10) == 1
    assert metrics._frame_chunks(10**8, 1, 1) == 4 * 2**20
    assert metrics._frame_chunks(10**8, 1, 3) == 4 * 2**20 // 3
    assert metrics._frame_chunks(5, 0, 10) == 5  # empty frames
    assert metrics._frame_chunks(100, 10, 10, budget=250) == 2


def _reference_sequence(gt, pred, objects):
    gt = np.where(gt == 255, 0, gt)
    j = [[_ref_iou(gt[i] == o, pred[i] == o) for i in range(1, len(gt) - 1)] for o in objects]
    f = [[_ref_f(gt[i] == o, pred[i] == o) for i in range(1, len(gt) - 1)] for o in objects]
    return np.array(j), np.array(f)


def _chunk_video():
    """9 frames (7 evaluated), 16 x 20. Object 1 everywhere; object 2 in frame 0 and only from frame 5 on (so
    empty on the first evaluated chunks); object 3 only in frame 0 (both empty on every evaluated frame)."""
    gt = np.zeros((9, 16, 20), np.uint8)
    pred = np.zeros((9, 16, 20), np.uint8)
    for i in range(9):
        gt[i, 2:7, 2 + i:8 + i] = 1
        pred[i, 2:7, 3 + i:8 + i] = 1
        pred[i, 3, 1 + i] = 1
    gt[0, 10:12, 0:2] = 2
    gt[0, 14, 18] = 3
    gt[5:, 9:14, 10:16] = 2
    pred[4:, 10:14, 11:17] = 2
    return gt, pred


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_evaluate_sequence_chunked_equals_official(monkeypatch, step):
    gt, pred = _chunk_video()
    monkeypatch.setattr(metrics, "_frame_chunks", lambda t, h, w: step)
    res = metrics.evaluate_sequence(gt, pred)
    assert res["objects"] == [1, 2, 3]
    ref_j, ref_f = _reference_sequence(gt, pred, [1, 2, 3])
    np.testing.assert_allclose(res["J"], ref_j, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["F"], ref_f, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res["J"][1, :4], [1, 1, 1, 0])  # both empty on frames 1-3, false positive on 4
    np.testing.assert_array_equal(res["J"][2], np.ones(7))
    np.testing.assert_array_equal(res["F"][2], np.ones(7))
    assert 0 < res["J"][1, 4] < 1 and 0 < res["J"][0, 6] < 1


def test_evaluate_sequence_num_objects_adds_absent_objects():
    gt, pred = _chunk_video()
    res = metrics.evaluate_sequence(gt, pred, num_objects=5)
    assert res["objects"] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(res["J"][3:], np.ones((2, 7)))
    np.testing.assert_array_equal(res["F"][3:], np.ones((2, 7)))
    few = metrics.evaluate_sequence(gt, np.where(pred == 2, 0, pred), num_objects=1)
    assert few["objects"] == [1] and few["J"].shape == (1, 7)
    with pytest.raises(ValueError, match=r"^sequence: the prediction has object id 2 but the ground truth only 1 "):
        metrics.evaluate_sequence(gt, pred, num_objects=1)


def test_evaluate_sequence_objects_come_from_frame_0():
    gt, pred = _chunk_video()
    gt2 = gt.copy()
    gt2[1] = np.where(gt2[1] == 1, 4, gt2[1])  # a larger id in frame 1 only: not an object
    res = metrics.evaluate_sequence(gt2, pred)
    assert res["objects"] == [1, 2, 3]
    np.testing.assert_array_equal(res["J"][0, 0], 0.0)  # frame 1: the GT of object 1 is id 4 there
    solo = gt.copy()
    solo[1:] = np.where(solo[1:] > 1, 0, solo[1:])  # frame 1 has only object 1, frame 0 all three
    assert metrics.evaluate_sequence(solo, np.where(pred > 1, 0, pred))["objects"] == [1, 2, 3]


def test_evaluate_sequence_one_row_object():
    """A union that spans a single row of the chunk is not 'both empty'."""
    gt = np.zeros((4, 10, 12), np.uint8)
    pred = np.zeros((4, 10, 12), np.uint8)
    gt[:, 5, 2:9] = 1
    pred[:, 5, 2:6] = 1
    res = metrics.evaluate_sequence(gt, pred)
    np.testing.assert_array_equal(res["J"], [[4 / 7, 4 / 7]])
    ref_j, ref_f = _reference_sequence(gt, pred, [1])
    np.testing.assert_allclose(res["F"], ref_f, rtol=0, atol=1e-12)
    assert res["F"][0, 0] < 1


def test_evaluate_sequence_rejects_bad_shapes_with_its_name():
    a = np.zeros((3, 5, 6), np.uint8)
    with pytest.raises(ValueError, match=r"^sequence: GT \(5, 6\) and prediction \(5, 6\) must both be"):
        metrics.evaluate_sequence(a[0], a[0])
    with pytest.raises(ValueError, match=r"^bike: GT \(3, 5, 6\) and prediction \(3, 5, 7\) must both be"):
        metrics.evaluate_sequence(a, np.zeros((3, 5, 7), np.uint8), name="bike")
    with pytest.raises(ValueError, match=r"^sequence: GT \(3, 5, 6\) and prediction \(2, 5, 6\) must both be"):
        metrics.evaluate_sequence(a, a[:2])


def test_evaluate_sequence_empty_frames():
    e = np.zeros((3, 0, 4), np.uint8)
    res = metrics.evaluate_sequence(e, e, num_objects=1)
    assert res["objects"] == [1]
    np.testing.assert_array_equal(res["J"], [[1.0]])
    np.testing.assert_array_equal(res["F"], [[1.0]])
    none = metrics.evaluate_sequence(e, e, num_objects=0)
    assert none["objects"] == [] and none["J"].shape == (0, 1) and none["F"].shape == (0, 1)


# --- rows, summaries, evaluate_many --------------------------------------------------------------------------------

def test_object_statistics_rows():
    res = {"objects": [1, 3], "J": np.array([[1.0, 0.5, 0.0], [0.6, 0.6, 0.6]]),
           "F": np.array([[1.0, 1.0, 0.0], [0.4, 0.5, 0.6]])}
    rows = metrics.object_statistics("car", res)
    assert [set(r) for r in rows] == [{"Sequence", "sequence", "object", "J-Mean", "J-Recall", "J-Decay", "F-Mean",
                                       "F-Recall", "F-Decay"}] * 2
    assert [(r["Sequence"], r["sequence"], r["object"]) for r in rows] == [("car_1", "car", 1), ("car_3", "car", 3)]
    for r, k in zip(rows, range(2), strict=True):
        assert (r["J-Mean"], r["J-Recall"], r["J-Decay"]) == pytest.approx(_ref_statistics(res["J"][k]), abs=1e-15)
        assert (r["F-Mean"], r["F-Recall"], r["F-Decay"]) == pytest.approx(_ref_statistics(res["F"][k]), abs=1e-15)


def test_summarize_rejects_no_rows():
    with pytest.raises(ValueError, match=r"^no objects to summarize$"):
        metrics.summarize([])
    with pytest.raises(ValueError, match=r"^no objects to summarize$"):
        metrics.summarize(iter(()))


def test_evaluate_pair_passes_name_and_object_count():
    gt, pred = _chunk_video()
    name, rows = metrics._evaluate_pair(("dog", gt, pred, None))
    assert name == "dog" and [r["Sequence"] for r in rows] == ["dog_1", "dog_2", "dog_3"]
    name, rows = metrics._evaluate_pair(("cat", gt, pred, 4))
    assert [r["Sequence"] for r in rows] == ["cat_1", "cat_2", "cat_3", "cat_4"]
    assert rows[3]["J-Mean"] == 1.0 and rows[3]["F-Mean"] == 1.0
    with pytest.raises(ValueError, match=r"^cat: the prediction has object id 2 but the ground truth only 1 "):
        metrics._evaluate_pair(("cat", gt, pred, 1))
    with pytest.raises(ValueError, match=r"^owl: GT "):
        metrics.evaluate_many([("owl", gt, pred[:, :5])])


class _FakePool:
    """Stands in for ProcessPoolExecutor: records the pool size and maps in this process."""

    made: list = []

    def __init__(self, max_workers=None):
        _FakePool.made.append(max_workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return map(fn, jobs)


@pytest.mark.parametrize(("workers", "n_items", "pool"), [
    (0, 3, None), (1, 3, None), (None, 3, None), (2, 1, None), (2, 2, 2), (3, 3, 3), (8, 2, 8),
])
def test_evaluate_many_uses_a_pool_only_for_several_workers_and_sequences(monkeypatch, workers, n_items, pool):
    _FakePool.made = []
    monkeypatch.setattr(metrics, "ProcessPoolExecutor", _FakePool)
    gt, pred = _chunk_video()
    items = [(f"s{i}", gt, pred) for i in range(n_items)]
    rows = metrics.evaluate_many(items, workers=workers)
    assert _FakePool.made == ([] if pool is None else [pool])
    assert [r["Sequence"] for r in rows] == [f"s{i}_{k}" for i in range(n_items) for k in (1, 2, 3)]
    assert rows[:3] == metrics.object_statistics("s0", metrics.evaluate_sequence(gt, pred))


def test_evaluate_many_default_is_serial(monkeypatch):
    _FakePool.made = []
    monkeypatch.setattr(metrics, "ProcessPoolExecutor", _FakePool)
    gt, pred = _chunk_video()
    assert len(metrics.evaluate_many([("a", gt, pred), ("b", gt, pred)])) == 6
    assert _FakePool.made == []
