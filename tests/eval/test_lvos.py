"""LVOS: the reader (val with and without Annotations_first_only, test), the official lvos-evaluation scoring on
hand-computed cases, the CodaLab zip, and the errors that must name a path. Fixtures are built in tmp_path in the
real layout: <root>/valid/{JPEGImages,Annotations}/<vid>/<8-digit>.{jpg,png}, valid/valid_meta.json."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.formats import lvos
from training.formats.base import DAVIS_PALETTE

H = W = 20  # diagonal 28.3 px -> boundary tolerance ceil(0.008 * 28.3) = 1 px (a 3x3 cross)


def _box(y0: int, y1: int, x0: int, x1: int, value: int = 1, base: np.ndarray | None = None) -> np.ndarray:
    m = np.zeros((H, W), np.uint8) if base is None else base.copy()
    m[y0:y1 + 1, x0:x1 + 1] = value
    return m


GT_A = _box(4, 11, 4, 11)  # 8x8 object 1
HALF_A = _box(4, 11, 4, 7)  # its left half: J = 32 / 64 = 1/2
# F of HALF_A against GT_A, by hand: DAVIS boundaries sit half a pixel towards the origin, so the GT outline is
# row 3 (x 3..11) + column 3 (y 4..11) outside and column 11 (y 4..11) + row 11 (x 4..10) inside: 9+8+8+7 = 32 px;
# the half's: row 3 (x 3..7), column 3 (y 4..11), column 7 (y 4..11), row 11 (x 4..6): 5+8+8+3 = 24 px.
# Precision (half's px within 1 px, cross-shaped, of the GT outline): 5 + 8 + 3 (column 7 at y 4, 10, 11) + 3 = 19/24.
# Recall (GT px near the half's outline): row 3 x 3..8 (6) + column 3 (8) + row 11 x 4..8 (5) = 19/32.
# F = 2PR / (P + R) = 2 * 19 / (24 + 32) = 19/28.
F_HALF = 19 / 28
GT_B1 = _box(2, 6, 2, 6)  # video B, object 1 (from frame 1)
GT_B2 = _box(12, 17, 12, 17, value=2)  # video B, object 2 (appears at frame 6)


def _png(path: Path, m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(m.astype(np.uint8), mode="P")
    im.putpalette(DAVIS_PALETTE)
    im.save(path)


def _frame(i: int) -> str:
    return f"{i:08d}"


def _video(split: Path, vid: str, n_frames: int, gt: dict[int, np.ndarray]) -> None:
    img = np.full((H, W, 3), 90, np.uint8)
    for i in range(1, n_frames + 1):
        (split / "JPEGImages" / vid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(split / "JPEGImages" / vid / f"{_frame(i)}.jpg")
    for i, m in gt.items():
        _png(split / "Annotations" / vid / f"{_frame(i)}.png", m)


def _obj(start: int, frame_nums: int, end: int | None = None) -> dict:
    return {"frame_range": {"start": start, "end": start + 5 * (frame_nums - 1) if end is None else end,
                            "frame_nums": frame_nums}}


def make_val(root: Path, first_only: bool = True) -> Path:
    """Video A: object 1 annotated at frames 1, 6, 11, 16 (frame_nums 4), and frame 21 outside its range (absent).
    Video B: object 1 at 1, 6, 11 (frame_nums 3); object 2 appears at 6: 6, 11, 16 (frame_nums 3)."""
    split = root / "valid"
    empty = np.zeros((H, W), np.uint8)
    _video(split, "vidA", 21, {1: GT_A, 6: GT_A, 11: GT_A, 16: GT_A, 21: empty})
    b6 = np.maximum(GT_B1, GT_B2)
    _video(split, "vidB", 16, {1: GT_B1, 6: b6, 11: b6, 16: GT_B2})
    meta = {"videos": {"vidB": {"objects": {"1": _obj(1, 3), "2": _obj(6, 3)}},
                       "vidA": {"objects": {"1": _obj(1, 4)}}}}
    (split / "valid_meta.json").write_text(json.dumps(meta))
    if first_only:  # what Cutie's scripts/data/preprocess_lvos.py writes
        _png(split / "Annotations_first_only" / "vidA" / "00000001.png", GT_A)
        _png(split / "Annotations_first_only" / "vidB" / "00000001.png", GT_B1)
        _png(split / "Annotations_first_only" / "vidB" / "00000006.png", GT_B2)
    return root


def make_test(root: Path) -> Path:
    split = root / "test"
    _video(split, "vidT", 12, {1: GT_B1, 6: GT_B2})  # test: first masks only
    meta = {"videos": {"vidT": {"objects": {"1": _obj(1, 3), "2": _obj(6, 2)}}}}
    (split / "test_meta.json").write_text(json.dumps(meta))
    return root


def write_preds(out: Path, preds: dict[str, dict[int, np.ndarray]]) -> Path:
    for vid, frames in preds.items():
        for i, m in frames.items():
            _png(out / "Annotations" / vid / f"{_frame(i)}.png", m)
    return out


def good_preds(overrides: dict[str, dict[int, np.ndarray]] | None = None) -> dict[str, dict[int, np.ndarray]]:
    """Every frame of both videos; A: frame 6 half the object, the rest perfect; B: object 1 perfect on frame 6,
    object 2 missed on frame 11 (J = F = 0)."""
    empty = np.zeros((H, W), np.uint8)
    a = {i: GT_A for i in range(1, 22)}
    a[6] = HALF_A
    a[21] = empty
    b = {i: GT_B1 for i in range(1, 17)}
    b.update({6: np.maximum(GT_B1, GT_B2), 11: GT_B1, 16: GT_B2})
    preds = {"vidA": a, "vidB": b}
    for vid, frames in (overrides or {}).items():
        preds[vid] = {**preds[vid], **frames}
    return preds


# ----------------------------------------------------------------------------------------------------- reader
def test_read_val_first_only_and_derived_agree(tmp_path):
    with_dir = lvos.read(make_val(tmp_path / "a", first_only=True), "val")
    derived = lvos.read(make_val(tmp_path / "b", first_only=False), "val")
    assert [s.name for s in with_dir] == [s.name for s in derived] == ["vidA", "vidB"]
    for s, d in zip(with_dir, derived, strict=True):
        assert s.given == d.given
        assert s.frames == d.frames == [_frame(i) for i in range(1, len(s.frames) + 1)]
        assert s.output_frames is None and d.output_frames is None
        assert s.gt_dir == tmp_path / "a" / "valid" / "Annotations" / s.name
        assert d.gt_dir == tmp_path / "b" / "valid" / "Annotations" / s.name
        assert s.gt_frames == d.gt_frames
        for f in s.given:
            np.testing.assert_array_equal(s.mask(f), d.mask(f))
    b = derived[1]
    assert isinstance(b, lvos.FirstAppearanceSequence) and not isinstance(with_dir[1], lvos.FirstAppearanceSequence)
    assert b.given == ["00000001", "00000006"]
    # the full annotation at frame 6 holds both objects; the derived input holds only the newcomer
    assert set(np.unique(b.gt("00000006")).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(b.mask("00000006"), GT_B2)
    np.testing.assert_array_equal(b.mask("00000001"), GT_B1)
    # scored frames: A's object 1 at 6, 11 (1 and 16 dropped); B's object 1 at 6, object 2 at 11
    assert with_dir[0].gt_frames == ["00000006", "00000011"]
    assert with_dir[1].gt_frames == ["00000006", "00000011"]
    assert with_dir[0].gt_dir == tmp_path / "a" / "valid" / "Annotations" / "vidA"
    # nothing was written into the dataset
    assert not (tmp_path / "b" / "valid" / "Annotations_first_only").exists()


def test_read_test_split(tmp_path):
    (seq,) = lvos.read(make_test(tmp_path), "test")
    assert seq.name == "vidT" and seq.given == ["00000001", "00000006"]
    assert len(seq.frames) == 12 and seq.output_frames is None
    assert seq.gt_dir is None and not seq.has_gt
    np.testing.assert_array_equal(seq.mask("00000006"), GT_B2)


def test_read_accepts_split_folder_and_other_meta_names(tmp_path):
    root = make_val(tmp_path)
    assert [s.name for s in lvos.read(root / "valid", "valid")] == ["vidA", "vidB"]  # root = the split folder
    (root / "valid" / "valid_meta.json").rename(root / "meta.json")
    assert [s.name for s in lvos.read(root, "val")] == ["vidA", "vidB"]
    assert lvos.load_meta(root, "val")[1] == root / "meta.json"


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_meta_names_the_paths(tmp_path):
    root = make_val(tmp_path)
    (root / "valid" / "valid_meta.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        lvos.read(root, "val")
    assert str(root / "valid" / "valid_meta.json") in str(e.value)
    assert str(root / "meta.json") in str(e.value)


@pytest.mark.parametrize("first_only", [True, False])
def test_missing_first_mask_names_the_path(tmp_path, first_only):
    root = make_val(tmp_path, first_only=first_only)
    folder = "Annotations_first_only" if first_only else "Annotations"
    missing = root / "valid" / folder / "vidB" / "00000006.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        lvos.read(root, "val")


def test_missing_frames_or_video_names_the_path(tmp_path):
    root = make_test(tmp_path)
    for p in (root / "test" / "JPEGImages" / "vidT").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match=str(root / "test" / "JPEGImages" / "vidT")):
        lvos.read(root, "test")


def test_derived_mask_requires_the_object_at_its_meta_start(tmp_path):
    root = make_val(tmp_path, first_only=False)
    _png(root / "valid" / "Annotations" / "vidB" / "00000006.png", GT_B1)  # object 2 absent at its start
    with pytest.raises(ValueError, match="00000006.png has no pixel"):
        lvos.read(root, "val")


# ----------------------------------------------------------------------------------------------------- scoring
def test_score_hand_computed(tmp_path):
    root = make_val(tmp_path / "data")
    pred = write_preds(tmp_path / "out", good_preds())
    r = lvos.score(pred, root, "val", unseen_videos=["vidB"])
    rows = {x["Sequence"]: x for x in r["per_object"]}
    assert list(rows) == ["vidA_1", "vidB_1", "vidB_2"]
    a, b1, b2 = rows["vidA_1"], rows["vidB_1"], rows["vidB_2"]
    # A: frames 6 (half: J 1/2, F 19/28) and 11 (perfect); 1, 16 are the range's ends, 21 lies outside it
    assert a["frames"] == 2 and not a["unseen"]
    assert a["J-Mean"] == pytest.approx(0.75)
    assert a["F-Mean"] == pytest.approx((F_HALF + 1) / 2)
    # V: JF = (1/2 + 19/28)/2 = 33/56 and 1; mean 89/112; squared deviations (23/112)^2 each -> 0.04217 -> 0.0422
    assert a["V"] == pytest.approx(math.sqrt(0.0422), abs=1e-12)
    assert (b1["J-Mean"], b1["F-Mean"], b1["V"]) == (1.0, 1.0, 0.0)
    assert (b2["J-Mean"], b2["F-Mean"], b2["V"]) == (0.0, 0.0, 0.0)  # missed: J 0, boundary P=1 R=0 -> F 0
    assert b1["unseen"] and b2["unseen"] and b1["frames"] == b2["frames"] == 1
    f_seen = (F_HALF + 1) / 2
    assert r["J-seen-Mean"] == pytest.approx(0.75) and r["J-unseen-Mean"] == pytest.approx(0.5)
    assert r["F-seen-Mean"] == pytest.approx(f_seen) and r["F-unseen-Mean"] == pytest.approx(0.5)
    assert r["J-Mean"] == pytest.approx((0.75 + 0.5) / 2)  # not the pooled 0.5833
    assert r["F-Mean"] == pytest.approx((f_seen + 0.5) / 2)
    assert r["J&F-Mean"] == pytest.approx((0.75 + f_seen + 0.5 + 0.5) / 4)
    assert r["V-Mean"] == pytest.approx((math.sqrt(0.0422) + 0.0) / 2)
    assert r["J-Decay"] == r["F-Decay"] == 0.0
    assert (r["num_seen_objects"], r["num_unseen_objects"], r["note"]) == (1, 2, "")


def test_range_ends_and_outside_frames_do_not_count(tmp_path):
    root = make_val(tmp_path / "data")
    base = lvos.score(write_preds(tmp_path / "p0", good_preds()), root, unseen_videos=["vidB"])
    junk = np.full((H, W), 1, np.uint8)
    # wrong at A's first (1) and last (16) range frames, false positives at 21 (outside the range); B's object 1
    # wrong at its last frame 11, object 2 wrong at its first frame 6
    bad = good_preds({"vidA": {1: junk, 16: np.zeros((H, W), np.uint8), 21: junk},
                      "vidB": {6: GT_B1, 11: np.zeros((H, W), np.uint8)}})
    other = lvos.score(write_preds(tmp_path / "p1", bad), root, unseen_videos=["vidB"])
    for k in lvos.GLOBAL_COLUMNS:
        assert other[k] == base[k], k


def test_score_without_unseen_list_counts_all_seen(tmp_path):
    root = make_val(tmp_path / "data")
    r = lvos.score(write_preds(tmp_path / "out", good_preds()), root)
    assert r["unseen_source"] is None and "every video counted as seen" in r["note"]
    assert r["num_unseen_objects"] == 0 and math.isnan(r["J-unseen-Mean"])
    assert r["J-Mean"] == pytest.approx((0.75 + 1 + 0) / 3)
    assert r["J&F-Mean"] == pytest.approx((r["J-Mean"] + r["F-Mean"]) / 2)
    # a list file in the dataset root is picked up
    (root / "unseen_videos.txt").write_text("vidB\n")
    r2 = lvos.score(tmp_path / "out", root)
    assert r2["unseen_source"] == str(root / "unseen_videos.txt") and r2["num_unseen_objects"] == 2


def test_inconsistent_meta_leaves_zero_slots_as_the_official_code(tmp_path):
    root = make_val(tmp_path / "data")
    meta_path = root / "valid" / "valid_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["vidA"]["objects"]["1"] = _obj(1, 4, end=11)  # walks 1, 6 only: slot for 11 stays 0
    meta_path.write_text(json.dumps(meta))
    r = lvos.score(write_preds(tmp_path / "out", good_preds()), root)
    a = r["per_object"][0]
    assert a["Sequence"] == "vidA_1" and a["J-Mean"] == pytest.approx(0.25) and a["F-Mean"] == pytest.approx(
        F_HALF / 2)
    meta["videos"]["vidA"]["objects"]["1"] = _obj(1, 2, end=16)  # 4 frames walked for frame_nums 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="IndexError"):
        lvos.score(tmp_path / "out", root)


def test_missing_prediction_names_the_file(tmp_path):
    root = make_val(tmp_path / "data")
    out = write_preds(tmp_path / "out", good_preds())
    (out / "Annotations" / "vidA" / "00000011.png").unlink()
    with pytest.raises(FileNotFoundError, match=str(out / "Annotations" / "vidA" / "00000011.png")):
        lvos.score(out, root)


def test_write_csv(tmp_path):
    root = make_val(tmp_path / "data")
    out = write_preds(tmp_path / "out", good_preds())
    r = lvos.score(out, root, unseen_videos=["vidB"])
    with pytest.raises(ValueError, match="prediction folder"):
        lvos.write_csv(out / "Annotations" / "scores", r)
    g, s = lvos.write_csv(tmp_path / "scores", r)
    assert g.name == "global_results-valid.csv" and s.name == "per-sequence_results-valid.csv"
    head, values = g.read_text().splitlines()
    assert head.split(",")[:2] == ["J&F-Mean", "J-Mean"] and values.split(",")[1] == "0.625"
    assert s.read_text().splitlines()[1:] == ["vidA_1,0.750,0.839,0.205", "vidB_1,1.000,1.000,0.000",
                                              "vidB_2,0.000,0.000,0.000"]
    assert not list((out / "Annotations").glob("*.csv"))


# -------------------------------------------------------------------------------------------------- submission
def test_submission_zip_layout_and_missing_frame(tmp_path):
    root = make_test(tmp_path / "data")
    preds = {"vidT": {i: GT_B1 for i in range(1, 13)}}
    out = write_preds(tmp_path / "out", preds)
    z = lvos.submission_zip(out, tmp_path / "sub.zip", root=root, split="test")
    names = zipfile.ZipFile(z).namelist()
    assert names == [f"Annotations/vidT/{_frame(i)}.png" for i in range(1, 13)]
    missing = out / "Annotations" / "vidT" / "00000007.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        lvos.submission_zip(out, tmp_path / "sub2.zip", root=root, split="test")
    assert not (tmp_path / "sub2.zip").exists()
    for p in (out / "Annotations" / "vidT").iterdir():
        p.unlink()
    (out / "Annotations" / "vidT").rmdir()
    with pytest.raises(FileNotFoundError, match="video vidT missing"):
        lvos.check_submission(out, root, "test")


def test_test_split_is_not_scored(tmp_path):
    with pytest.raises(ValueError, match="hidden"):
        lvos.score(tmp_path, make_test(tmp_path / "data"), "test")


# -------------------------------------------------------------------------------------------- through the CLI
def test_evaluate_cli_runs_lvos_val_and_test(tmp_path, capsys):
    """training.evaluate on LVOS: val is scored as the toolkit scores it (the CLI's numbers equal lvos.score on the
    written predictions), CSVs in OUT; test gives a complete submission zip. Settings: Cutie's lvos preset."""
    import dataclasses
    import zipfile

    import torch

    import model
    from model.config import load_model_config
    from training import evaluate

    torch.manual_seed(0)
    cfg = load_model_config("tiny", None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.build_network(cfg).state_dict(), ckpt)
    ckpt.with_suffix(".model.yaml").write_text(json.dumps(dataclasses.asdict(cfg)))
    root = make_test(make_val(tmp_path / "LVOS"))
    out = tmp_path / "val_out"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root), "--format", "lvos", "--split", "val",
                          "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "preset=cutie" in printed and "use_long_term=True" in printed  # Cutie's lvos preset
    assert sorted(p.name for p in (out / "Annotations").iterdir()) == ["vidA", "vidB"]
    assert len(list((out / "Annotations" / "vidA").glob("*.png"))) == 21
    again = lvos.score(out / "Annotations", root, "val")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["J&F-Mean"] == pytest.approx(again["J&F-Mean"])
    assert (out / "global_results-valid.csv").is_file()
    out_t = tmp_path / "test_out"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root), "--format", "lvos", "--split", "test",
                          "--out", str(out_t), "--device", "cpu"]) == 0
    with zipfile.ZipFile(out_t / "submission.zip") as z:
        assert sorted(z.namelist()) == [f"Annotations/vidT/{i:08d}.png" for i in range(1, 13)]
