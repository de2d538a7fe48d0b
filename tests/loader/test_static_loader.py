"""The training loader on stage-0 shards (`kind="static"`): each single-image sample becomes a 3-frame pseudo-video
of that image, with its mask moving with it; the stream is the video loader's (batch i a pure function of seed,
rank, i and the shards), with one level and one object."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline import shard
from data_pipeline.loader import build_train_loader, finish_batch
from data_pipeline.readers import build_reader
from data_pipeline.sampling import plan_images

RED = (230, 20, 20)


def _image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A red ellipse (the object) on a blue-green textured background, and its 0/255 mask."""
    bg = np.zeros((h, w, 3), np.uint8)
    bg[..., 1] = rng.integers(60, 120, (h, w))
    bg[..., 2] = rng.integers(120, 200, (h, w))
    mask = np.zeros((h, w), np.uint8)
    centre = (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3)))
    cv2.ellipse(mask, centre, (w // 5, h // 4), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    bg[mask > 0] = RED
    return bg, mask


def write_static_shards(root: Path, images: int = 8, per_shard: int = 4, seed: int = 0) -> Path:
    """Static shards written by the shard job's own encoder from an ECSSD-layout folder of drawn images."""
    rng = np.random.default_rng(seed)
    src = root / "src" / "ecssd"
    src.mkdir(parents=True)
    for i in range(images):
        img, mask = _image(rng, 120, 160)
        cv2.imwrite(str(src / f"im{i:02d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
        cv2.imwrite(str(src / f"im{i:02d}.png"), mask)
    reader = build_reader("ecssd", src)
    videos = {v.video: v for v in reader.videos()}
    plans = plan_images({"ecssd": list(videos.values())}, {"ecssd": 1})["static"]
    out = root / "shards" / "static"
    out.mkdir(parents=True)
    for s in range(0, len(plans), per_shard):
        members = []
        for p in plans[s:s + per_shard]:
            members += shard.encode_clip(reader, videos[p.video], p, 160, 98, only_shrink=True)
        shard.write_tar(out / f"shard-{s // per_shard:06d}.tar", sorted(members))
    return root / "shards"


@pytest.fixture(scope="module")
def static_shards(tmp_path_factory) -> Path:
    return write_static_shards(tmp_path_factory.mktemp("static-loader"))


def _loader(root: Path, **kw):
    args = dict(batch_size=2, rank=0, world_size=1, total_iterations=20, num_frames=3, num_objects=1, crop_size=64,
                num_workers=0, seed=5, kind="static")
    args.update(kw)
    return build_train_loader(root, **args)


def _red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., k].astype(int) for k in range(3))
    return (r > 150) & (g < 90) & (b < 90)


def test_three_frames_of_one_image_that_differ_with_the_mask_moving_along(static_shards):
    loader = _loader(static_shards)
    batches = [b for _, b in zip(range(4), loader, strict=False)]
    inner = np.zeros((64, 64), bool)
    inner[2:-2, 2:-2] = True
    checked = 0
    for batch in batches:
        rgb, cls = batch["rgb_u8"].numpy()[..., :3], batch["cls"].numpy()
        assert rgb.shape == (2, 3, 64, 64, 3) and cls.shape == (2, 3, 64, 64)
        for i, info in enumerate(batch["info"]):
            assert info["level"] == "static" and info["object_ids"] == [1]
            assert len(set(info["frames"])) == 1 and len(info["frames"]) == 3  # one image, three frames
            assert set(np.unique(cls[i])) <= {0, 1} and cls[i, 0].any()
            for t in range(3):
                m = (cls[i, t] == 1) & inner
                # erode both by a pixel: bilinear image edges vs nearest mask edges
                m_in = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                red = _red(rgb[i, t]) & inner
                red_in = cv2.erode(red.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                if m_in.sum() < 20:
                    continue
                assert _red(rgb[i, t])[m_in].mean() > 0.97, (info["key"], t)  # the mask lies on the object
                assert (cls[i, t][red_in] == 1).mean() > 0.97, (info["key"], t)  # and covers it
                checked += 1
            for a, b in ((0, 1), (1, 2), (0, 2)):  # per-frame transforms: no two frames alike
                assert not np.array_equal(cls[i, a], cls[i, b])
                assert np.abs(rgb[i, a].astype(int) - rgb[i, b].astype(int)).mean() > 3
    assert checked >= 12
    model_batch = finish_batch(batches[0])
    assert tuple(model_batch["rgb"].shape) == (2, 3, 3, 64, 64)
    assert tuple(model_batch["first_frame_gt"].shape) == (2, 1, 1, 64, 64)
    assert model_batch["selector"].tolist() == [[1.0], [1.0]]


def test_batch_i_is_the_same_after_a_resume(static_shards):
    full = [b for _, b in zip(range(5), _loader(static_shards), strict=False)]
    resumed = _loader(static_shards, start_iteration=3)
    again = [b for _, b in zip(range(2), resumed, strict=False)]
    for a, b in zip(full[3:], again, strict=True):
        assert [x["key"] for x in a["info"]] == [x["key"] for x in b["info"]]
        assert np.array_equal(a["rgb_u8"].numpy(), b["rgb_u8"].numpy())
        assert np.array_equal(a["cls"].numpy(), b["cls"].numpy())
        assert np.array_equal(a["jitter"].numpy(), b["jitter"].numpy())
    other_seed = next(iter(_loader(static_shards, seed=6)))
    assert not np.array_equal(other_seed["rgb_u8"].numpy(), full[0]["rgb_u8"].numpy())


def test_kinds_and_knobs_do_not_mix(static_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="skip05"):
        build_train_loader(static_shards, batch_size=2, rank=0, world_size=1, num_workers=0)  # a video loader
    (tmp_path / "skip05").mkdir()
    with pytest.raises(FileNotFoundError, match="static"):
        _loader(tmp_path)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['merge_probability'\] for data.kind=static"):
        _loader(static_shards, merge_probability=0.5)
    with pytest.raises(ValueError, match="num_objects"):
        _loader(static_shards, num_objects=3)
    state = _loader(static_shards).state_dict()
    video_state = dict(state, kind="video")
    with pytest.raises(ValueError, match="data.kind=video loader"):
        _loader(static_shards).load_state_dict(video_state)
    # a knob of the pseudo-video reaches it: no TPS and no per-frame rotation/shear/scale/flip, one crop offset
    loader = _loader(static_shards, tps_probability=0.0, rotation=0.0, shear=0.0, frame_scale=[1.0, 1.0],
                     sequence_scale=[1.0, 1.0], hflip_probability=0.0)
    assert loader.params.tps_probability == 0.0 and loader.params.frame_scale == (1.0, 1.0)
