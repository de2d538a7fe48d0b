"""The streaming training loader on small real WebDataset shards in the contract format."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_pipeline.loader import build_eval_loader, build_train_loader, finish_batch
from tests.loader.helpers import LOADER_KW, T, colour_of, small_set, take, write_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-shards")
    metas = small_set(root)
    return root, metas


def _loader(root, total=40, workers=0, batch_size=2, **kw):
    args = dict(LOADER_KW)
    args.update(kw)
    return build_train_loader(str(root), batch_size=batch_size, rank=args.pop("rank", 0),
                              world_size=args.pop("world_size", 1), total_iterations=total, num_workers=workers,
                              **args)


def test_batch_dict_layout(shards):
    root, _ = shards
    raw = take(_loader(root), 1)[0]
    # the loader's batch: uint8 RGBX frames and slot maps, the colour jitter drawn but not yet applied
    assert raw["rgb_u8"].shape == (2, T, 32, 32, 4) and raw["rgb_u8"].dtype == torch.uint8
    assert raw["cls"].shape == (2, T, 32, 32) and raw["cls"].dtype == torch.uint8
    assert raw["jitter"].shape == (2, T, 3) and raw["jitter"].dtype == torch.float64
    assert raw["grey"].shape == (2,) and raw["grey"].dtype == torch.bool
    b = finish_batch(raw)  # the model's batch (on the device, in training)
    assert finish_batch(b) is b
    bs, n = b["selector"].shape
    assert b["rgb"].shape == (2, T, 3, 32, 32) and b["rgb"].dtype == torch.float32
    assert float(b["rgb"].min()) >= 0.0 and float(b["rgb"].max()) <= 1.0
    assert b["cls_gt"].shape == (2, T, 1, 32, 32) and b["cls_gt"].dtype == torch.int64
    assert b["first_frame_gt"].shape == (2, 1, n, 32, 32) and b["first_frame_gt"].dtype == torch.float32
    assert 1 <= n <= 3 and b["selector"].dtype == torch.float32
    assert n == max(len(i["object_ids"]) for i in b["info"])  # padded to the batch max
    for i, info in enumerate(b["info"]):
        assert {"key", "dataset", "video", "frames", "object_ids", "level"} <= set(info)
        k = len(info["object_ids"])
        assert b["selector"][i].tolist() == [1.0] * k + [0.0] * (n - k)
        assert int(b["cls_gt"][i].max()) <= k
        for s in range(n):  # first_frame_gt is the one-hot of cls_gt's frame 0
            assert torch.equal(b["first_frame_gt"][i, 0, s], (b["cls_gt"][i, 0, 0] == s + 1).float())


def test_transform_moves_image_and_mask_together_and_ids_are_kept(shards):
    """Colour jitter, grayscale and merging off: every slot's pixels keep its object's colour, the ids are those
    of the clip's first frame (or last, when reversed), at most 3, and frame 0 always keeps each chosen object."""
    root, metas = shards
    loader = _loader(root, total=30, merge_probability=0.0, clip_jitter=[0, 0, 0], frame_jitter=[0, 0, 0],
                     grayscale_probability=0.0)
    seen_reversed, checked = set(), 0
    for b in map(finish_batch, loader):
        for i, info in enumerate(b["info"]):
            ids = info["object_ids"]
            assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
            assert set(ids) <= set(metas[info["key"]]["all_object_ids"])
            if not info["reversed"]:
                assert set(ids) <= set(metas[info["key"]]["object_ids"])
            seen_reversed.add(info["reversed"])
            rgb = (b["rgb"][i].permute(0, 2, 3, 1).numpy() * 255).round()  # (T, H, W, 3)
            cls = b["cls_gt"][i, :, 0].numpy()
            assert all(b["first_frame_gt"][i, 0, s].sum() > 0 for s in range(len(ids)))  # frame 0 keeps each
            for s, obj in enumerate(ids, start=1):
                # interior of the slot (edges blur: bilinear warp, JPEG chroma subsampling)
                inner = np.stack([cv2.erode((c == s).astype(np.uint8), np.ones((3, 3), np.uint8)) for c in cls]) > 0
                pix = rgb[inner]
                if len(pix) < 10:
                    continue
                checked += 1
                close = np.abs(pix - colour_of(obj)).max(axis=1) < 60
                assert close.mean() > 0.9, (info["key"], obj, close.mean())
            bg = rgb[cls == 0]
            for obj in ids:  # background pixels mostly do not carry a chosen object's colour
                assert (np.abs(bg - colour_of(obj)).max(axis=1) < 30).mean() < 0.1
    assert seen_reversed == {True, False} and checked > 20


def test_merge_pastes_second_clip_objects_with_new_ids(shards):
    root, metas = shards
    merged = 0
    for b in map(finish_batch, _loader(root, total=30, merge_probability=1.0)):
        for i, info in enumerate(b["info"]):
            assert 1 <= len(info["object_ids"]) <= 3
            own = set(metas[info["key"]]["all_object_ids"])
            new = {int(k) for k in info["merged_ids"]}
            assert new.isdisjoint(own) and all(0 < v < 255 for v in new)  # fresh labels for pasted objects
            assert set(info["object_ids"]) <= own | new
            if new:
                merged += 1
            n = len(info["object_ids"])
            assert all(b["first_frame_gt"][i, 0, s].sum() > 0 for s in range(n))
    assert merged > 0


@pytest.mark.timeout(120)
def test_curriculum_switches_at_scheduled_iterations(shards):
    root, _ = shards
    loader = _loader(root, total=20, batch_size=1, workers=2)
    assert loader.cfg.boundaries() == [2, 6, 16]
    expected = ["skip05"] * 2 + ["skip10"] * 4 + ["skip15"] * 10 + ["skip05"] * 4
    got = [(b["info"][0]["level"], b["info"][0]["shard"].split("/")[0]) for b in loader]
    assert [g[0] for g in got] == expected and [g[1] for g in got] == expected
    resumed = _loader(root, total=20, batch_size=1, workers=2)  # after a resume mid-way: same switch points
    resumed.load_state_dict({"iteration": 5})
    assert [b["info"][0]["level"] for b in resumed] == expected[5:]


def _same(a, b):
    assert [i["key"] for i in a["info"]] == [i["key"] for i in b["info"]]
    for k in ("rgb_u8", "cls", "jitter", "grey", "selector"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block_clips", [256, 6])  # 6: a new stream block every 3 batches of a lane
def test_resume_draws_the_same_batches(shards, block_clips):
    root, _ = shards
    full = take(_loader(root, total=40, workers=2, block_clips=block_clips), 16)  # crosses the switch at 4, 12
    # the stream moves on: (nearly) every batch draws a new pair of clips
    assert len({tuple(i["key"] for i in b["info"]) for b in full}) >= 12
    first = _loader(root, total=40, workers=2, block_clips=block_clips)
    take(first, 7)
    state = first.state_dict()
    assert state["iteration"] == 7
    second = _loader(root, total=40, workers=2, block_clips=block_clips)
    second.load_state_dict(json.loads(json.dumps(state)))  # as it travels in a checkpoint
    for a, b in zip(full[7:], take(second, 9), strict=True):
        _same(a, b)
    inproc = take(_loader(root, total=40, workers=0), 6)  # in-process (no DataLoader workers): same contract
    third = _loader(root, total=40, workers=0)
    third.load_state_dict({"iteration": 4})
    for a, b in zip(inproc[4:], take(third, 2), strict=True):
        _same(a, b)


@pytest.mark.timeout(150)
def test_two_ranks_two_workers_equal_batch_counts(shards, tmp_path):
    root, _ = shards
    total = 14  # × batch 2 = 28 clips per rank: more than any shard (≤ 5) or level holds
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.loader.rank_worker", str(root),
                                       str(tmp_path / f"r{rank}.json"), str(total), "2"], cwd=ROOT, env=env))
    for p in procs:
        assert p.wait(timeout=120) == 0
    r = [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in range(2)]
    assert [x["rank"] for x in r] == [0, 1] and all(x["world_size"] == 2 for x in r)
    assert r[0]["batches"] == r[1]["batches"] == total
    assert r[0]["levels"] == r[1]["levels"]  # the curriculum is in step on every rank
    assert r[0]["keys"] != r[1]["keys"]  # but the ranks draw different clips


def test_truncated_shard_and_bad_sample_are_skipped_with_warnings(shards, tmp_path, caplog):
    src, _ = shards
    root = tmp_path / "shards"
    shutil.copytree(src, root)
    cut = root / "skip05" / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    # a sample whose json lost "frames", appended to another shard
    import webdataset as wds

    bad = root / "skip05" / "shard-000000.tar"
    good = dict(next(iter(wds.WebDataset(str(bad), shardshuffle=False))))
    samples = [dict(s) for s in wds.WebDataset(str(bad), shardshuffle=False)]
    meta = json.loads(good["json"])
    del meta["frames"]
    evil = {k: v for k, v in good.items() if not k.startswith("__")}
    evil.update({"__key__": "broken_clip_x", "json": json.dumps(meta).encode(), "pyd": b"not a pickle"})
    with wds.TarWriter(str(bad)) as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"})
        tw.write(evil)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        loader = _loader(root, total=60, batch_size=2)
        keys = [i["key"] for b in take(loader, 6) for i in b["info"]]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert str(cut) in text and "truncated" in text
    assert len(keys) == 12 and "broken_clip_x" not in keys
    assert "broken_clip_x" in text and "frames" in text
    stats = loader.stats()
    assert stats["bad_shards"] == 1 and stats["skipped"] >= 2 and loader.state_dict()["skipped"] == stats["skipped"]


def test_bad_arguments_fail_clearly(shards, tmp_path):
    root, _ = shards
    with pytest.raises(ValueError, match="unknown key"):
        _loader(root, flip_everything=True)
    with pytest.raises(FileNotFoundError, match="skip10"):
        write_shards(tmp_path / "only5", {"skip05": [1]})
        _loader(tmp_path / "only5")
    with pytest.raises(ValueError, match="merge_probability"):
        _loader(root, merge_probability=2.0)


def test_eval_mode_is_finite_and_split(shards, monkeypatch):
    root, metas = shards
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = build_eval_loader(root, level="skip15", batch_size=2, num_frames=T, crop_size=32)
        keys = [i["key"] for b in loader for i in b["info"]]
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(k for k, m in metas.items() if m["level"] == "skip15")
