"""Readers of Cutie's static image sets (data_pipeline/readers/static.py) on files written in each real
layout, and the synthetic static sets of data_pipeline.synth. Fast: no Ray."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data_pipeline.readers import (
    READERS,
    STATIC_DATASETS,
    STATIC_FOLDERS,
    STATIC_MULTIPLIER,
    BadInput,
    StaticReader,
    Video,
    build_reader,
)
from data_pipeline.synth import synthesize


def _jpg(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, quality=95)
    return img


def _mask(h: int = 12, w: int = 16) -> np.ndarray:
    """Grey 0/255 mask with anti-aliased edge values: a block of 255 framed by 128 (object) and 127 (not)."""
    m = np.zeros((h, w), np.uint8)
    m[3:9, 4:12] = 128
    m[4:8, 5:11] = 255
    m[3, 4:12] = 127
    return m


EXPECTED = (_mask() >= 128).astype(np.uint8)


def _png(path: Path, m: np.ndarray | None = None, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(_mask() if m is None else m)
    (im.convert(mode) if mode else im).save(path)


def _pair(folder: Path, stem: str, seed: int = 0) -> None:
    _jpg(folder / f"{stem}.jpg", seed=seed)
    _png(folder / f"{stem}.png")


def test_registry_and_constants():
    assert STATIC_MULTIPLIER == {"fss": 1, "duts_tr": 1, "duts_te": 1, "ecssd": 1, "big": 5, "hrsod": 5}
    assert STATIC_FOLDERS == {"fss": "fss", "duts_tr": "DUTS-TR", "duts_te": "DUTS-TE", "ecssd": "ecssd",
                              "big": "BIG_small", "hrsod": "HRSOD_small"}
    assert STATIC_DATASETS == ("fss", "duts_tr", "duts_te", "ecssd", "big", "hrsod")
    for d in STATIC_DATASETS:
        assert issubclass(READERS[d], StaticReader) and READERS[d].name == d
    assert {"youtubevos", "davis", "ovis", "mose", "burst"} <= set(READERS)


def test_fss_class_folders(tmp_path):
    root = tmp_path / "fss"
    for cls, ns in (("cat", (1,)), ("bird", (2, 10, 1)), ("bird-x", (3,))):
        for n in ns:
            _pair(root / cls, str(n), seed=n)
    (root / "stray.jpg").write_bytes(b"not a class folder")  # files beside the class folders are not images
    r = build_reader("fss", root)
    assert r.layout == "fss"
    names = ["bird-x/3", "bird/1", "bird/10", "bird/2", "cat/1"]  # sorted as strings
    assert r.video_names() == names
    vs = r.videos()
    assert r.problems == []
    assert [v.video for v in vs] == names
    v = vs[3]
    assert (v.dataset, v.video, v.frames, v.annotated) == ("fss", "bird/2", ["2"], [True])
    assert v.object_ids == {0: [1]}
    assert v.meta == {"image": "bird/2.jpg", "mask": "bird/2.png"}
    img = r.read_image(v, 0)
    assert img.shape == (12, 16, 3) and img.dtype == np.uint8
    m = r.read_mask(v, 0)
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 1}
    np.testing.assert_array_equal(m, EXPECTED)
    with pytest.raises(IndexError):
        r.read_image(v, 1)


def test_name_pairs_ecssd(tmp_path):
    root = tmp_path / "ecssd"
    for stem in ("0002", "0001", "0010"):
        _pair(root, stem)
    r = build_reader("ecssd", root)
    assert r.layout == "pairs"
    vs = r.videos()
    assert [(v.video, v.frames, v.meta["image"], v.meta["mask"]) for v in vs] == [
        ("0001", ["0001"], "0001.jpg", "0001.png"), ("0002", ["0002"], "0002.jpg", "0002.png"),
        ("0010", ["0010"], "0010.jpg", "0010.png")]
    assert all(v.dataset == "ecssd" for v in vs) and r.problems == []
    np.testing.assert_array_equal(r.read_mask(vs[0], 0), EXPECTED)


@pytest.mark.parametrize("dataset,folder", [("duts_tr", "DUTS-TR"), ("duts_te", "DUTS-TE")])
def test_duts_own_layout_detected(tmp_path, dataset, folder):
    root = tmp_path / folder
    for stem in ("b", "a"):
        _jpg(root / f"{folder}-Image" / f"{stem}.jpg")
        _png(root / f"{folder}-Mask" / f"{stem}.png")
    r = build_reader(dataset, root)
    assert r.layout == "duts"
    vs = r.videos()
    assert r.problems == []
    assert [(v.dataset, v.video, v.meta["image"], v.meta["mask"]) for v in vs] == [
        (dataset, "a", f"{folder}-Image/a.jpg", f"{folder}-Mask/a.png"),
        (dataset, "b", f"{folder}-Image/b.jpg", f"{folder}-Mask/b.png")]
    np.testing.assert_array_equal(r.read_mask(vs[1], 0), EXPECTED)
    assert r.read_image(vs[1], 0).shape == (12, 16, 3)


def test_duts_tr_cutie_layout(tmp_path):
    root = tmp_path / "DUTS-TR"
    _pair(root, "ILSVRC2012_test_00000004")
    r = build_reader("duts_tr", root)
    assert r.layout == "pairs"
    assert [v.meta for v in r.videos()] == [{"image": "ILSVRC2012_test_00000004.jpg",
                                             "mask": "ILSVRC2012_test_00000004.png"}]
    with pytest.raises(BadInput, match="DUTS layout"):
        build_reader("duts_tr", root, layout="duts")
    with pytest.raises(ValueError, match="unknown static layout"):
        build_reader("duts_tr", root, layout="coco")


def test_missing_root(tmp_path):
    with pytest.raises(BadInput) as e:
        build_reader("hrsod", tmp_path / "HRSOD_small")
    assert e.value.file == str(tmp_path / "HRSOD_small") and e.value.reason == "static image folder missing"


def test_binarisation_of_mask_modes(tmp_path):
    root = tmp_path / "ecssd"
    _jpg(root / "grey.jpg", 2, 4)
    _png(root / "grey.png", np.array([[0, 127, 128, 255], [255, 126, 129, 0]], np.uint8))
    _jpg(root / "rgb.jpg", 2, 4)  # PIL luma: (255,0,0) -> 76, (0,255,0) -> 150, grey g -> g
    rgb = np.array([[[255, 255, 255], [127, 127, 127], [128, 128, 128], [255, 0, 0]],
                    [[0, 255, 0], [0, 0, 0], [0, 0, 255], [200, 200, 200]]], np.uint8)
    _png(root / "rgb.png", rgb)
    _png(root / "rgba.png", np.dstack([rgb, np.zeros((2, 4), np.uint8)]))  # alpha ignored, as convert('L')
    _jpg(root / "rgba.jpg", 2, 4)
    _jpg(root / "pal.jpg", 2, 4)
    pal = Image.fromarray(np.array([[0, 1, 2, 3], [1, 0, 3, 2]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 128, 0, 0, 128, 128, 128] + [0] * (256 * 3 - 12))
    pal.save(root / "pal.png")
    _jpg(root / "bit.jpg", 2, 4)
    _png(root / "bit.png", np.array([[0, 255, 0, 255], [255, 255, 0, 0]], np.uint8), mode="1")
    _jpg(root / "deep.jpg", 2, 4)
    deep = np.array([[0, 32767, 32768, 65535], [65535, 0, 33000, 300]], np.uint16)  # >> 8: 127 -> 0, 128 -> 1
    cv2.imwrite(str(root / "deep.png"), deep)
    with Image.open(root / "deep.png") as im:
        assert im.mode.startswith("I")
    r = build_reader("ecssd", root)
    vs = {v.video: v for v in r.videos()}
    assert r.problems == [] and sorted(vs) == ["bit", "deep", "grey", "pal", "rgb", "rgba"]
    want = {"grey": [[0, 0, 1, 1], [1, 0, 1, 0]], "rgb": [[1, 0, 1, 0], [1, 0, 0, 1]],
            "rgba": [[1, 0, 1, 0], [1, 0, 0, 1]], "pal": [[0, 1, 0, 1], [1, 0, 1, 0]],
            "bit": [[0, 1, 0, 1], [1, 1, 0, 0]], "deep": [[0, 0, 1, 1], [1, 0, 1, 0]]}
    for name, expected in want.items():
        m = r.read_mask(vs[name], 0)
        assert m.dtype == np.uint8, name
        np.testing.assert_array_equal(m, np.array(expected, np.uint8), err_msg=name)


def test_bad_pairs_recorded_and_skipped(tmp_path):
    root = tmp_path / "BIG_small"
    _pair(root, "good1")
    _pair(root, "good2", seed=2)
    _jpg(root / "nomask.jpg")
    _jpg(root / "size.jpg")
    _png(root / "size.png", np.full((10, 16), 255, np.uint8))
    _jpg(root / "empty.jpg")
    _png(root / "empty.png", np.full((12, 16), 127, np.uint8))
    (root / "zero.jpg").write_bytes(b"")
    _png(root / "zero.png")
    (root / "junk.jpg").write_bytes(b"this is not a jpeg")
    _png(root / "junk.png")
    _jpg(root / "badpng.jpg")
    (root / "badpng.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 4)
    _png(root / "orphan.png")  # a mask without its image is not an image of the set
    r = build_reader("big", root)
    assert r.video_names() == ["badpng", "empty", "good1", "good2", "junk", "nomask", "size", "zero"]
    vs = r.videos()
    assert [v.video for v in vs] == ["good1", "good2"]
    probs = {p["video"]: p for p in r.problems}
    assert sorted(probs) == ["badpng", "empty", "junk", "nomask", "size", "zero"] and len(r.problems) == 6
    assert probs["nomask"]["file"] == str(root / "nomask.jpg")
    assert "mask missing" in probs["nomask"]["reason"]
    assert str(root / "nomask.jpg") in probs["nomask"]["reason"]
    assert probs["size"]["file"] == str(root / "size.png")
    assert "16x10" in probs["size"]["reason"] and "16x12" in probs["size"]["reason"]
    assert probs["empty"]["file"] == str(root / "empty.png") and "empty mask" in probs["empty"]["reason"]
    assert probs["zero"]["file"] == str(root / "zero.jpg") and probs["zero"]["reason"] == "zero-byte image"
    assert probs["junk"]["file"] == str(root / "junk.jpg")
    assert "not a decodable image" in probs["junk"]["reason"]
    assert probs["badpng"]["file"] == str(root / "badpng.png")
    assert "not a decodable mask" in probs["badpng"]["reason"]
    with pytest.raises(BadInput) as e:  # reading a damaged mask names the file
        r.read_mask(Video("big", "badpng", ["badpng"], [True], {0: [1]},
                          {"image": "badpng.jpg", "mask": "badpng.png"}), 0)
    assert e.value.file == str(root / "badpng.png")


def test_videos_of_a_subset(tmp_path):
    root = tmp_path / "HRSOD_small"
    for stem in ("a", "b", "c", "d"):
        _pair(root, stem)
    r = build_reader("hrsod", root)
    assert [v.video for v in r.videos(["d", "b"])] == ["d", "b"]
    assert [v.video for v in r.videos([])] == [] and r.problems == []
    assert [v.video for v in r.videos(["zz"])] == [] and r.problems == [
        {"file": str(root / "zz.jpg"), "reason": "image missing", "video": "zz"}]


def test_synthetic_static_sets(tmp_path):
    out = synthesize(tmp_path / "data", small=True)
    static = out / "static"
    te = static / "DUTS-TE"
    assert sorted(p.name for p in te.iterdir()) == ["DUTS-TE-Image", "DUTS-TE-Mask"]  # DUTS's own layout
    assert len(list((static / "DUTS-TR").glob("*.jpg"))) == 6  # Cutie's layout
    assert sorted(p.name for p in (static / "fss").iterdir()) == ["apple", "kite", "zebra"]
    layouts = {}
    for d in STATIC_DATASETS:
        r = build_reader(d, static / STATIC_FOLDERS[d])
        vs = r.videos()
        layouts[d] = r.layout
        assert r.problems == [] and len(vs) == 6, d
        shapes = []
        for v in vs:
            m = r.read_mask(v, 0)
            img = r.read_image(v, 0)
            assert m.shape == img.shape[:2] and m.any() and not m.all(), (d, v.video)
            shapes.append(m.shape)
            with Image.open(r.root / v.meta["mask"]) as im:
                raw = np.asarray(im)
                assert im.mode == "L" and raw.min() == 0 and raw.max() == 255, (d, v.video)
            assert ((raw > 0) & (raw < 255)).any(), (d, v.video)  # anti-aliased edges
        assert any(h > w for h, w in shapes), d  # a portrait image in every set
        assert len(set(shapes)) > 1, d  # sizes vary within a set
    assert layouts == {"fss": "fss", "duts_tr": "pairs", "duts_te": "duts", "ecssd": "pairs", "big": "pairs",
                       "hrsod": "pairs"}
    fss = build_reader("fss", static / "fss").video_names()
    assert fss == [f"{c}/{n}" for c in ("apple", "kite", "zebra") for n in (1, 2)]


def test_duts_layout_in_a_renamed_folder(tmp_path):
    root = tmp_path / "duts_train"  # the folder renamed: its one *-Image folder with a *-Mask sibling is used
    _jpg(root / "DUTS-TR-Image" / "x.jpg")
    _png(root / "DUTS-TR-Mask" / "x.png")
    r = build_reader("duts_tr", root)
    assert r.layout == "duts"
    assert [v.meta for v in r.videos()] == [{"image": "DUTS-TR-Image/x.jpg", "mask": "DUTS-TR-Mask/x.png"}]
