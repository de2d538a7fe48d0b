"""Sanity tests of the Cutie oracle (tests/eval/cutie_reference.py): fixture layouts, and that rf-cutie's own
pipeline, run on CPU with the sharpened random network, gives masks worth comparing against (neither empty nor
full, following the objects), only the frames Cutie would save, and every frame of the all-frames folder read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.eval import cutie_reference as cr
from training.evaluate import DAVIS_PALETTE


def _iou(p: np.ndarray, g: np.ndarray, k: int) -> float:
    return float(((p == k) & (g == k)).sum() / max(((p == k) | (g == k)).sum(), 1))


def _stems(d):
    return sorted(p.stem for p in d.iterdir())


# ------------------------------------------------------------------------------------------------------ layouts
def test_davis_fixture_layout(tmp_path):
    root = cr.make_davis_fixture(tmp_path / "d")
    assert (root / "ImageSets" / "2017" / "val.txt").read_text().split() == ["large", "small"]
    for seq, (h, w) in cr.DAVIS_SEQUENCES.items():
        frames = [f"{i:05d}" for i in range(cr.DAVIS_FRAMES)]
        assert _stems(root / "JPEGImages" / "480p" / seq) == frames
        assert _stems(root / "Annotations" / "480p" / seq) == frames
        for f in frames:
            assert Image.open(root / "JPEGImages" / "480p" / seq / f"{f}.jpg").size == (w, h)
            png = Image.open(root / "Annotations" / "480p" / seq / f"{f}.png")
            assert png.mode == "P" and bytes(png.getpalette()) == DAVIS_PALETTE[: len(png.getpalette())]
            ids = np.array(png)
            assert ids.shape == (h, w) and set(np.unique(ids)) == {0, 1, 2}
            assert 0.01 < (ids == 1).mean() < 0.2 and 0.01 < (ids == 2).mean() < 0.2
        first = np.array(Image.open(root / "Annotations" / "480p" / seq / "00000.png"))
        last = np.array(Image.open(root / "Annotations" / "480p" / seq / f"{frames[-1]}.png"))
        assert (first != last).any()  # the objects move
    assert cr.DAVIS_SEQUENCES["small"][0] % 16 and cr.DAVIS_SEQUENCES["small"][1] % 16  # padding matters
    again = cr.make_davis_fixture(tmp_path / "d2")
    for rel in ("JPEGImages/480p/small/00003.jpg", "Annotations/480p/large/00005.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes()  # deterministic


def test_youtubevos_fixture_layout(tmp_path):
    root = cr.make_youtubevos_fixture(tmp_path / "y")
    meta = json.loads((root / "valid" / "meta.json").read_text())
    assert sorted(meta["videos"]) == sorted(cr.YT_VIDEOS)
    for vid, (h, w, t, first) in cr.YT_VIDEOS.items():
        all_frames = _stems(root / "all_frames" / "valid_all_frames" / "JPEGImages" / vid)
        assert all_frames == [f"{i:05d}" for i in range(t)]
        assert _stems(root / "valid" / "JPEGImages" / vid) == [f"{i:05d}" for i in range(0, t, 5)]
        assert Image.open(root / "valid" / "JPEGImages" / vid / "00000.jpg").size == (w, h)
        anns = _stems(root / "valid" / "Annotations" / vid)
        assert anns == sorted({f"{f:05d}" for f in first.values()})
        for stem in anns:  # each PNG holds only the objects that first appear there
            png = Image.open(root / "valid" / "Annotations" / vid / f"{stem}.png")
            assert png.mode == "P"
            ids = set(np.unique(np.array(png))) - {0}
            assert ids == {k for k, f in first.items() if f"{f:05d}" == stem}
        objs = meta["videos"][vid]["objects"]
        assert {int(k) for k in objs} == set(first)
        for k, f in first.items():
            assert objs[str(k)]["frames"] == [f"{i:05d}" for i in range(f, t, 5)]
    assert cr.YT_VIDEOS["vid_a"][3][3] == 10  # a new object given mid-video


# ------------------------------------------------------------------------------------------------- the oracle
@pytest.fixture(scope="module")
def sharp():
    return cr.make_sharp_cutie(0)


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = cr.make_davis_fixture(tmp_path_factory.mktemp("davis"))
    return root, cr.davis_ground_truth(root)


@pytest.fixture(scope="module")
def davis_ref(sharp, davis):
    return cr.davis_reference(davis[0], *sharp)


@pytest.fixture(scope="module")
def yt(tmp_path_factory):
    root = cr.make_youtubevos_fixture(tmp_path_factory.mktemp("yt"))
    return root, cr.youtubevos_ground_truth(root)


@pytest.fixture(scope="module")
def yt_ref(sharp, yt):
    """The y19-val reference, counting the frames InferenceCore.step sees (shape of each image)."""
    from cutie.inference.inference_core import InferenceCore

    seen: list[tuple[int, int]] = []
    step = InferenceCore.step

    def spy(self, image, *a, **k):
        seen.append(tuple(image.shape[-2:]))
        return step(self, image, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InferenceCore, "step", spy)
        ref = cr.youtubevos_reference(yt[0], *sharp)
    return ref, seen


def _assert_nontrivial(ref, gt, first_given):
    """Every object given so far is predicted on a fair part of its area in every later frame, follows it (mean
    IoU over the later frames), and the frame is far from all-foreground."""
    for seq, frames in ref.items():
        ious: dict[int, list[float]] = {}
        for stem, pred in frames.items():
            g = gt[seq][stem]
            assert pred.dtype == np.uint8 and pred.shape == g.shape
            assert (pred > 0).mean() < 0.5, (seq, stem)
            for k in np.unique(g[g > 0]):
                k = int(k)
                if stem == first_given[seq].get(k):  # the given mask comes back (through 480p and back if resized)
                    assert _iou(pred, g, k) == 1.0 if min(g.shape) <= 480 else _iou(pred, g, k) > 0.98
                    continue
                assert (pred == k).sum() > 0.1 * (g == k).sum(), (seq, stem, k)
                ious.setdefault(k, []).append(_iou(pred, g, k))
        assert ious, seq
        for k, v in ious.items():
            assert 0.2 < np.mean(v) < 0.99, (seq, k, v)  # follows the object, is no copy of the ground truth


@pytest.mark.slow
def test_davis_reference_nontrivial(davis, davis_ref):
    _, gt = davis
    assert sorted(davis_ref) == ["large", "small"]
    for seq in davis_ref:
        assert sorted(davis_ref[seq]) == sorted(gt[seq])  # d17-val saves every frame
        assert davis_ref[seq]["00000"].shape == cr.DAVIS_SEQUENCES[seq]  # back at the original size
    _assert_nontrivial(davis_ref, gt, {seq: {1: "00000", 2: "00000"} for seq in gt})


@pytest.mark.slow
def test_youtubevos_reference(yt, yt_ref):
    root, gt = yt
    ref, seen = yt_ref
    meta = json.loads((root / "valid" / "meta.json").read_text())["videos"]
    for vid in cr.YT_VIDEOS:  # only the meta.json frames come back
        want = sorted({f for o in meta[vid]["objects"].values() for f in o["frames"]})
        assert sorted(ref[vid]) == want
    # every frame of all_frames went through the network, not only the every-5th ones
    assert len(seen) == sum(t for _, _, t, _ in cr.YT_VIDEOS.values())
    assert seen.count((360, 640)) == cr.YT_VIDEOS["vid_a"][2]
    # object 3 is given at 00010 and tracked after it; vid_b's object 2 likewise from 00005
    assert (ref["vid_a"]["00010"] == 3).sum() == (gt["vid_a"]["00010"] == 3).sum()
    assert not (ref["vid_a"]["00005"] == 3).any()
    assert (ref["vid_a"]["00015"] == 3).sum() > 0.1 * (gt["vid_a"]["00015"] == 3).sum()
    assert _iou(ref["vid_a"]["00015"], gt["vid_a"]["00015"], 3) > 0.1
    assert (ref["vid_b"]["00010"] == 2).any() and not (ref["vid_b"]["00000"] == 2).any()
    first = {vid: {k: f"{f:05d}" for k, f in spec[3].items()} for vid, spec in cr.YT_VIDEOS.items()}
    _assert_nontrivial(ref, gt, first)


@pytest.mark.slow
def test_reference_options_run(sharp, davis, davis_ref, tmp_path):
    """flip, long-term memory with overrides and another mem_every go through to Cutie's InferenceCore."""
    root, gt = davis
    subset = tmp_path / "small.txt"
    subset.write_text("small\n")
    kw = dict(subset=subset, size=480)
    img, ann = root / "JPEGImages" / "480p", root / "Annotations" / "480p"
    flip = cr.cutie_reference(img, ann, *sharp, flip=True, **kw)
    lt = cr.cutie_reference(img, ann, *sharp, use_long_term=True, mem_every=2,
                            long_term={"min_mem_frames": 2, "max_mem_frames": 3, "num_prototypes": 16}, **kw)
    plain = cr.cutie_reference(img, ann, *sharp, **kw)
    assert list(flip) == list(lt) == list(plain) == ["small"]
    for stem, p in plain["small"].items():  # same pipeline, same frames as the d17-val preset
        np.testing.assert_array_equal(p, davis_ref["small"][stem])
    assert any((flip["small"][s] != plain["small"][s]).any() for s in plain["small"])
    assert any((lt["small"][s] != plain["small"][s]).any() for s in plain["small"])
    _assert_nontrivial(flip, gt, {"small": {1: "00000", 2: "00000"}})


@pytest.mark.slow
def test_save_and_load_weights(sharp, tmp_path):
    network, _ = sharp
    path = cr.save_cutie_weights(network, tmp_path / "w" / "cutie.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict) and set(sd) == set(network.state_dict())
    loaded, cfg = cr.load_cutie(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, network.state_dict()[k]), k
    assert cfg.weights == str(path)
