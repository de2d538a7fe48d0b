"""Paste (merge) partners drawn from a pool spanning several shards, not from the clip's own shard."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline import augment as A
from data_pipeline.loader import LoaderConfig, _Lane, _Pool, build_train_loader, finish_batch
from tests.loader.helpers import LOADER_KW, T, small_set, take


def _video(key: str) -> str:
    return key.rsplit("_", 2)[0]  # {dataset}_{video} of {dataset}_{video}_{level}_{index}


@pytest.mark.timeout(300)
def test_partners_are_other_videos_from_several_shards(job_shards):
    """On the shard job's output (4 shards of 16 clips per level): >= 90% of pastes bring another video, and the
    partners come from more than one shard besides the clip's own (the old rule took them from the clip's shard)."""
    loader = build_train_loader(str(job_shards), batch_size=4, rank=0, world_size=1, total_iterations=40,
                                crop_size=64, num_workers=0, seed=0, merge_probability=1.0)
    pastes, clips = [], 0
    for b in map(finish_batch, loader):
        for i, info in enumerate(b["info"]):
            clips += 1
            assert (info["merged_from"] is None) == (not info["merged_ids"]) == (info["merged_shard"] is None)
            n = len(info["object_ids"])
            assert all(b["first_frame_gt"][i, 0, s].sum() > 0 for s in range(n))
            if info["merged_from"] is not None:
                pastes.append(info)
    assert clips == 160 and len(pastes) >= 50, (clips, len(pastes))
    other_video = sum(_video(p["merged_from"]) != _video(p["key"]) for p in pastes)
    assert other_video >= 0.9 * len(pastes), (other_video, len(pastes))
    foreign = {p["merged_shard"] for p in pastes if p["merged_shard"] != p["shard"]}
    assert len(foreign) > 1, foreign
    assert all(p["merged_shard"].split("/")[0] == p["level"] for p in pastes)  # the pool is the clip's level


def _lane(root, **kw) -> _Lane:
    from data_pipeline.loader import TrainLoader

    cfg = LoaderConfig(batch_size=2, total_iterations=40, num_frames=T, crop_size=32, num_workers=0, seed=7, **kw)
    loader = TrainLoader(root, cfg, 0, 1, A.AugmentParams(crop_size=32))
    return _Lane(cfg, loader.shards, 0, 0, loader.params)


def test_pool_is_seeded_by_level_and_block_and_drawn_without_replacement(tmp_path):
    small_set(tmp_path)
    lane, again = _lane(tmp_path, paste_pool_shards=2), _lane(tmp_path, paste_pool_shards=2)
    pools = {}
    for block in range(6):
        for ln in (lane, again):
            ln.stream_key = (0, block)
        a, b = lane._paste_pool(), again._paste_pool()
        assert [(p, k) for p, k, _ in a.entries] == [(p, k) for p, k, _ in b.entries]  # a pure function
        shards = sorted({p.name for p, _, _ in a.entries})
        assert len(shards) == 2  # 2 of the level's 3 shards, never one twice
        pools[block] = tuple(shards)
    assert len(set(pools.values())) > 1  # blocks draw different pools
    whole = _lane(tmp_path, paste_pool_shards=10)  # more than the level has: all of them
    whole.stream_key = (0, 0)
    assert len({p for p, _, _ in whole._paste_pool().entries}) == 3


def test_pool_candidates_other_video_then_other_key_then_none(tmp_path):
    e = lambda key: (tmp_path / "s.tar", key, {})  # noqa: E731
    pool = _Pool([e("ds_a_skip05_0"), e("ds_a_skip05_1"), e("ds_b_skip05_2"), e("ds_c_skip05_3")])
    assert pool.candidates("ds_a_skip05_0").tolist() == [2, 3]
    assert pool.candidates("ds_z_skip05_9").tolist() == [0, 1, 2, 3]  # the clip's video is not in the pool
    same = _Pool([e("ds_a_skip05_0"), e("ds_a_skip05_1")])
    assert same.candidates("ds_a_skip05_0").tolist() == [1]  # only its own video: another clip of it
    assert len(_Pool([e("ds_a_skip05_0")]).candidates("ds_a_skip05_0")) == 0  # nothing else: no merge


def test_paste_pool_shards_is_validated(tmp_path):
    small_set(tmp_path)
    for bad in (0, -1, 1.5, "4", True):
        with pytest.raises(ValueError, match="paste_pool_shards"):
            build_train_loader(str(tmp_path), batch_size=2, rank=0, world_size=1, paste_pool_shards=bad, **LOADER_KW)
    loader = build_train_loader(str(tmp_path), batch_size=2, rank=0, world_size=1, paste_pool_shards=1, **LOADER_KW)
    assert loader.cfg.paste_pool_shards == 1 and loader.state_dict()["paste_pool_shards"] == 1


def _broken_jpeg(good: bytes) -> bytes:
    """Headers intact (the sample passes the header checks), entropy data cut: fails only when decoded."""
    return good[: len(good) // 2] + b"\xff\xd9"


@pytest.mark.timeout(120)
def test_undecodable_jpegs_are_skipped_the_same_way_whatever_the_lane_knew(tmp_path, caplog):
    """A sample whose JPEGs only fail when decoded (after its geometry was drawn) is passed over as if it had been
    skipped on sight: the batches are the same whether or not the lane met it before (resume), it never becomes a
    clip or a paste partner, and it is reported."""
    root = tmp_path / "shards"
    small_set(root)
    for name, broken_frames in (("shard-000000.tar", range(T)), ("shard-000001.tar", [5])):
        path = root / "skip05" / name
        samples = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                   for s in wds.WebDataset(str(path), shardshuffle=False)]
        bad = dict(samples[0], __key__=f"synth_broken{name[-5]}_skip05_99")
        for t in broken_frames:
            bad[f"{t:02d}.jpg"] = _broken_jpeg(bad[f"{t:02d}.jpg"])
        with wds.TarWriter(str(path)) as tw:
            for s in [bad, *samples]:
                tw.write(s)
    kw = dict(LOADER_KW, max_skip=[5], max_skip_until=[1.0], merge_probability=1.0, block_clips=8)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        full = take(build_train_loader(str(root), batch_size=2, rank=0, world_size=1, total_iterations=30,
                                        num_workers=0, **kw), 24)
        resumed = build_train_loader(str(root), batch_size=2, rank=0, world_size=1, total_iterations=30,
                                     num_workers=0, **kw)
        resumed.load_state_dict({"iteration": 13})
        later = take(resumed, 11)
    for a, b in zip(full[13:], later, strict=True):
        assert [i["key"] for i in a["info"]] == [i["key"] for i in b["info"]]
        assert [i["merged_from"] for i in a["info"]] == [i["merged_from"] for i in b["info"]]
        for k in ("rgb_u8", "cls", "jitter", "grey", "selector"):
            assert torch.equal(a[k], b[k]), k
    infos = [i for b in full for i in b["info"]]
    assert not any("broken" in i["key"] for i in infos)
    assert not any("broken0" in (i["merged_from"] or "") for i in infos)  # every frame broken: never pasted
    assert sum(i["merged_from"] is not None for i in infos) >= 5
    assert "synth_broken0_skip05_99" in caplog.text and "not a decodable JPEG" in caplog.text


def test_merge_equals_cutie_full_frame_merge():
    """The box-wise paste (blur and blend only around clip 2's objects) equals the full-frame definition."""
    rng = np.random.default_rng(0)
    f1 = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    f2 = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    m1 = np.zeros((3, 40, 50), np.uint8)
    m1[:, 5:15, 5:20] = 4
    m1[:, 20:30, 30:45] = 14  # (4 + 10) is taken: bumped to 15
    m2 = np.zeros((3, 40, 50), np.uint8)
    m2[0, 0:6, 40:50] = 4  # touches the frame's corner: the blur's border handling must match
    m2[1, 18:25, 10:22] = 7
    m2[1, 30:33, 0:3] = 4
    f, m, mapping = A.merge(f1, m1, f2, m2)
    ref_f, ref_m = f1.copy(), m1.copy()
    for i in range(3):
        fg = m2[i] > 0
        alpha = cv2.GaussianBlur(fg.astype(np.float32), (5, 5), 1.0)[..., None]
        ref_f[i] = (f1[i] * (1.0 - alpha) + f2[i] * alpha + 0.5).astype(np.uint8)
        ref_m[i][fg] = np.array([0, 0, 0, 0, 15, 0, 0, 17], np.uint8)[m2[i][fg]]
    assert mapping == {4: 15, 7: 17}
    assert np.array_equal(m, ref_m) and np.abs(f.astype(int) - ref_f).max() <= 1
    assert np.array_equal(f[2], f1[2])  # a frame where clip 2 has no object is left alone


def test_masks_decode_from_grey_and_palette_pngs():
    """Masks stored as palette PNGs (the contract allows L or P) go through PIL, 8-bit grey ones through cv2:
    the same ids; anything else, or a damaged PNG, is a BadSample."""
    from data_pipeline.loader import BadSample, decode_png_mask

    ids = np.zeros((6, 7), np.uint8)
    ids[2:4, 1:5] = 9
    grey, pal, rgb = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(ids).save(grey, format="PNG")
    im = Image.frombytes("P", (7, 6), ids.tobytes())
    im.putpalette([0, 0, 0] + [200, 100, 50] * 255)
    im.save(pal, format="PNG")
    Image.fromarray(np.dstack([ids] * 3)).save(rgb, format="PNG")
    assert Image.open(io.BytesIO(pal.getvalue())).mode == "P"
    for data in (grey.getvalue(), pal.getvalue()):
        assert np.array_equal(decode_png_mask(data, "x.png"), ids)
    with pytest.raises(BadSample, match="single-channel"):
        decode_png_mask(rgb.getvalue(), "x.png")
    cut = grey.getvalue()[:45]
    with pytest.raises(BadSample, match="not a decodable PNG"):
        decode_png_mask(cut, "x.png")
