"""Readers on the synthetic datasets (native layouts, corner cases) and the clip sampling rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.readers import FOLDERS, build_reader
from data_pipeline.sampling import effective_skip, mixture_weights, plan_clips, sample_clip, usable
from data_pipeline.synth import SHARED_ID, synthesize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("dp-synth") / "data", seed=0, videos=3, small=True)


@pytest.fixture(scope="module")
def videos(data):
    return {d: build_reader(d, data / f).videos() for d, f in FOLDERS.items()}


def test_every_reader_gives_consistent_records(data, videos):
    for d, vs in videos.items():
        reader = build_reader(d, data / FOLDERS[d])
        assert vs, d
        for v in vs:
            assert v.dataset == d and len(v.annotated) == len(v.frames)
            for i in v.annotated_indices[:4]:
                img, m = reader.read_image(v, i), reader.read_mask(v, i)
                assert img.dtype == np.uint8 and img.shape[2] == 3 and m.dtype == np.uint8
                assert m.shape == img.shape[:2]
                assert sorted(int(k) for k in np.unique(m) if k) == v.object_ids[i], (d, v.video, i)


def test_corner_cases(data, videos):
    yt = {v.video: v for v in videos["youtubevos"]}
    assert yt["yt0000ab"].frames[:2] == ["00010", "00015"]  # numbering above 00000 in steps of 5
    first = {d: vs[0] for d, vs in videos.items()}
    v = first["davis"]
    ids = [v.object_ids[i] for i in v.annotated_indices]
    assert 2 not in ids[0] and any(2 in x for x in ids)  # appears late
    assert 3 in ids[0] and 3 not in ids[-1]  # vanishes
    assert [] in ids  # an empty frame
    assert {v.video for v in videos["ovis"]} & {v.video for v in videos["mose"]} == {SHARED_ID}
    b = first["burst"]
    assert b.object_ids[3] != b.object_ids[2] and 1 not in b.object_ids[3]  # a track missing in one frame
    raw = json.loads((data / "BURST/train/all_classes.json").read_text())
    assert max(int(t) for s in raw["sequences"] for f in s["segmentations"] for t in f) > 100  # remapped ids
    assert max(k for v in videos["burst"] for ids in v.object_ids.values() for k in ids) <= 3
    segs = json.loads((data / "OVIS/annotations/annotations_train.json").read_text())["annotations"]
    kinds = {type(s["counts"]).__name__ if s else None for a in segs for s in a["segmentations"]}
    assert kinds == {"str", "list", None}  # both RLE flavours and null entries


def test_sampling_rules(videos):
    v = videos["davis"][1]
    rng = np.random.default_rng(0)
    for max_skip in (5, 10, 15):
        skip = effective_skip("davis", max_skip)
        assert skip == max_skip // 2
        for _ in range(30):
            f = sample_clip(v, max_skip, rng)
            assert len(f) == 8 and len(set(f)) == 8 and v.object_ids[f[0]]
            s = sorted(f)
            assert f == tuple(s)  # stored in time order
            assert all(b - a <= skip for a, b in zip(s, s[1:], strict=False))  # growing ±skip window
    assert effective_skip("ovis", 15) == 5 and effective_skip("youtubevos", 5) == 1


def test_short_videos_dropped_and_mixture(videos):
    short = videos["davis"][0].__class__("davis", "tiny", [str(i) for i in range(7)], [True] * 7,
                                         {i: [1] for i in range(7)})
    assert not usable(short) and sample_clip(short, 5, np.random.default_rng(0)) is None
    w = mixture_weights(videos)
    per = {d: sum(sum(v.annotated) for v in vs) for d, vs in videos.items()}
    assert w["davis"] / w["mose"] == pytest.approx(2 * per["davis"] / per["mose"])
    plans = plan_clips(videos, 60, seed=0)
    assert set(plans) == {"skip05", "skip10", "skip15"}
    assert plans == plan_clips(videos, 60, seed=0)  # deterministic
    assert all("." not in p.key for ps in plans.values() for p in ps)
    assert len({p.key for p in plans["skip05"]}) == len(plans["skip05"])


def test_plan_follows_cutie_frame_weighting_per_video_and_per_dataset(videos):
    """Cutie draws a seed frame uniformly over all (video, frame) pairs, DAVIS twice: a video's share of the clips
    is its annotated frames x multiplier. Every video gets the floor or ceiling of its quota, every dataset is
    within 1% of its frame-weighted share, and the order is shuffled (not sorted by key) yet deterministic."""
    from data_pipeline.sampling import video_weight

    weights = mixture_weights(videos)
    total_w = sum(video_weight(v) for vs in videos.values() for v in vs)
    long = videos["mose"][1]  # make one video 4x longer: it must get about 4x the clips of its neighbours
    longer = long.__class__(long.dataset, long.video, long.frames * 4, long.annotated * 4,
                            {i: long.object_ids.get(i % len(long.frames), []) for i in range(4 * len(long.frames))})
    skewed = {**videos, "mose": [longer if v is long else v for v in videos["mose"]]}
    for vids in (videos, skewed):
        weights = mixture_weights(vids)
        total_w = sum(video_weight(v) for vs in vids.values() for v in vs)
        for n in (64, 1000):
            plans = plan_clips(vids, n, seed=3)
            for level, ps in plans.items():
                assert len(ps) == n, level  # every synthetic video gives clips with an object in frame 0
                for d, w in weights.items():
                    share = sum(p.dataset == d for p in ps) / n
                    assert abs(share - w) <= max(0.01, 1 / n), (n, level, d, share, w)
                for vs in vids.values():
                    for v in vs:
                        quota = n * video_weight(v) / total_w
                        got = sum(p.dataset == v.dataset and p.video == v.video for p in ps)
                        assert np.floor(quota) <= got <= np.ceil(quota), (v.dataset, v.video, got, quota)
                keys = [p.key for p in ps]
                assert keys != sorted(keys)
    skip05 = plan_clips(skewed, 1000, seed=3)["skip05"]
    per_video = {v.video: sum(p.dataset == "mose" and p.video == v.video for p in skip05) for v in skewed["mose"]}
    assert per_video[long.video] > 3 * max(n for k, n in per_video.items() if k != long.video)


def test_ovis_polygons_and_missing_images(data, tmp_path):
    import shutil

    from data_pipeline.readers.ovis import decode_rle

    poly = decode_rle([[10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]], 60, 80, "poly")
    assert poly.shape == (60, 80) and 1000 < poly.sum() < 1400 and poly[25, 30]
    with pytest.raises(Exception, match="RLE size"):
        decode_rle({"size": [61, 80], "counts": [4880]}, 60, 80, "where")
    root = tmp_path / "OVIS"
    shutil.copytree(data / "OVIS", root)
    victim = sorted((root / "train" / "ovis0001").glob("*.jpg"))[3]
    victim.unlink()
    reader = build_reader("ovis", root)
    assert "ovis0001" not in {v.video for v in reader.videos()}
    assert reader.problems and reader.problems[0]["file"] == str(victim)


def test_a_shard_task_gets_only_its_clips_frames_and_writes_the_same_bytes(data, videos):
    """A mixed shard draws from hundreds of videos: each task item carries the video cut down to the clip's 8
    frames (OVIS/BURST annotations included), and the clip it encodes is byte-identical to the whole video's."""
    import pickle

    from data_pipeline.shard import clip_item, encode_clip

    plans = plan_clips(videos, 40, seed=0)["skip10"]
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    seen = set()
    for p in plans:
        if p.dataset in seen:
            continue
        seen.add(p.dataset)
        full = by_id[(p.dataset, p.video)]
        spec = {"dataset": p.dataset, "root": str(data / FOLDERS[p.dataset]), "options": {}}
        _, view, p2 = clip_item(spec, full, p)
        assert len(view.frames) == 8 and p2.frame_indices == tuple(range(8)) and p2.key == p.key
        reader = build_reader(p.dataset, data / FOLDERS[p.dataset])
        assert encode_clip(reader, view, p2, 160, 90) == encode_clip(reader, full, p, 160, 90)
        if p.dataset == "ovis":
            assert all(len(segs) == 8 for segs in view.meta["tracks"]) and len(view.meta["files"]) == 8
        if p.dataset == "burst":
            assert set(view.meta["segs"]) <= set(range(8)) and len(view.meta["names"]) == 8
        if p.dataset in ("ovis", "burst"):
            assert len(pickle.dumps(view)) < len(pickle.dumps(full))
    assert seen == set(videos)


# ------------------------------------------------------------------------- reader options (shard config reader_options)

def _rle(mask: np.ndarray) -> str:
    """A binary (h, w) mask as the datasets store it: COCO compressed RLE counts (column-major), ASCII."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _box(rows: slice, cols: slice, h: int = 4, w: int = 6) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[rows, cols] = True
    return m


def _jpgs(folder, names: list[str], h: int = 4, w: int = 6) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / n, quality=92)


def test_ovis_keep_crowd_decides_whether_crowd_tracks_are_objects(tmp_path):
    """OVIS (annotations/annotations_train.json, train/<video>/img_*.jpg), one video of 2 frames, 3 tracks: 11
    (an object in both frames), 12 (`iscrowd: 1`, frame 0 only), 13 (an object in frame 1 only). Ids are the
    track's rank by annotation id among the kept tracks."""
    root = tmp_path / "OVIS"
    files = ["cam/img_0000001.jpg", "cam/img_0000002.jpg"]
    _jpgs(root / "train" / "cam", [f.split("/")[1] for f in files])
    tracks = {  # annotation id: (iscrowd, [frame 0 mask or None, frame 1 mask or None])
        11: (0, [_box(0, slice(0, 2)), _box(0, slice(1, 3))]),
        12: (1, [_box(slice(2, 4), slice(4, 6)), None]),
        13: (0, [None, _box(3, slice(0, 3))]),
    }
    anns = [{"id": i, "video_id": 1, "category_id": 1, "iscrowd": crowd, "height": 4, "width": 6, "length": 2,
             "segmentations": [None if m is None else {"size": [4, 6], "counts": _rle(m)} for m in masks],
             "areas": [None if m is None else int(m.sum()) for m in masks], "bboxes": [None, None]}
            for i, (crowd, masks) in tracks.items()]
    (root / "annotations").mkdir()
    (root / "annotations" / "annotations_train.json").write_text(json.dumps(
        {"videos": [{"id": 1, "file_names": files, "height": 4, "width": 6, "length": 2}], "annotations": anns,
         "categories": [{"id": 1, "name": "fish"}]}))

    with_crowd = [[[1, 1, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 2, 2],
                   [0, 0, 0, 0, 2, 2]],
                  [[0, 1, 1, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0],
                   [3, 3, 3, 0, 0, 0]]]
    without_crowd = [[[1, 1, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0]],
                     [[0, 1, 1, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0],
                      [2, 2, 2, 0, 0, 0]]]
    for options, ids, masks in (({}, {0: [1, 2], 1: [1, 3]}, with_crowd),  # the default keeps them (Cutie)
                                ({"keep_crowd": True}, {0: [1, 2], 1: [1, 3]}, with_crowd),
                                ({"keep_crowd": False}, {0: [1], 1: [1, 2]}, without_crowd)):
        reader = build_reader("ovis", root, **options)
        (video,) = reader.videos()
        assert video.video == "cam" and video.frames == ["img_0000001", "img_0000002"] and not reader.problems
        assert video.object_ids == ids, \
            f"OVIS {options or 'defaults'}: object ids per frame {video.object_ids}, expected {ids} (track 12 is crowd)"
        for i in range(2):
            got = reader.read_mask(video, i)
            assert got.tolist() == masks[i], f"OVIS {options or 'defaults'}: frame {i} mask {got.tolist()}"


def test_burst_keep_non_gt_decides_whether_non_gt_masks_are_kept(tmp_path):
    """BURST (train/all_classes.json, frames/train/<dataset>/<seq>/*.jpg), one sequence of 3 frames, 0 and 2
    annotated. Frame 0: track 105 (is_gt), 250 and 300 (is_gt false); frame 2: 105 and 250 (both is_gt). Track ids
    are remapped to 1..n in id order over the kept masks; track 300 has no gt mask, so without non-gt masks it is
    gone from the sequence."""
    root = tmp_path / "BURST"
    names = ["f0.jpg", "f1.jpg", "f2.jpg"]
    _jpgs(root / "frames" / "train" / "LaSOT" / "cat-1", names)
    segs = [{"105": {"rle": _rle(_box(0, slice(0, 2))), "is_gt": True},
             "250": {"rle": _rle(_box(1, slice(2, 4))), "is_gt": False},
             "300": {"rle": _rle(_box(3, slice(4, 6))), "is_gt": False}},
            {"105": {"rle": _rle(_box(0, slice(1, 3))), "is_gt": True},
             "250": {"rle": _rle(_box(2, slice(3, 6))), "is_gt": True}}]
    (root / "train").mkdir()
    (root / "train" / "all_classes.json").write_text(json.dumps({"split": "train", "sequences": [
        {"dataset": "LaSOT", "seq_name": "cat-1", "fps": 30, "width": 6, "height": 4, "id": 0,
         "annotated_image_paths": ["f0.jpg", "f2.jpg"], "all_image_paths": names, "segmentations": segs,
         "track_category_ids": {"105": 1, "250": 1, "300": 1}}]}))

    frame2 = [[0, 1, 1, 0, 0, 0],
              [0, 0, 0, 0, 0, 0],
              [0, 0, 0, 2, 2, 2],
              [0, 0, 0, 0, 0, 0]]
    all_masks = [[[1, 1, 0, 0, 0, 0],
                  [0, 0, 2, 2, 0, 0],
                  [0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 0, 3, 3]], frame2]
    gt_only = [[[1, 1, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0]], frame2]
    for options, ids, masks in (({}, {0: [1, 2, 3], 2: [1, 2]}, all_masks),  # the default keeps them (Cutie)
                                ({"keep_non_gt": True}, {0: [1, 2, 3], 2: [1, 2]}, all_masks),
                                ({"keep_non_gt": False}, {0: [1], 2: [1, 2]}, gt_only)):
        reader = build_reader("burst", root, **options)
        (video,) = reader.videos()
        assert video.video == "LaSOT/cat-1" and video.annotated == [True, False, True] and not reader.problems
        assert video.object_ids == ids, (f"BURST {options or 'defaults'}: object ids per frame {video.object_ids}, "
                                         f"expected {ids} (frame 0: tracks 250 and 300 are not gt)")
        for i, want in zip((0, 2), masks, strict=True):
            got = reader.read_mask(video, i)
            assert got.tolist() == want, f"BURST {options or 'defaults'}: frame {i} mask {got.tolist()}"
