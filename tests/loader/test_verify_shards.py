"""data.verify_shards: each shard's sha256 (its stats.json) checked before the loader reads it."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from data_pipeline.loader import build_train_loader
from tests.loader.helpers import LOADER_KW, add_sha256, corrupt_quantisation_byte, small_set


def _loader(root, verify, total=12, **kw):
    args = dict(LOADER_KW, max_skip=[5], max_skip_until=[1.0])
    args.update(kw)
    return build_train_loader(str(root), batch_size=2, rank=0, world_size=1, total_iterations=total,
                              verify_shards=verify, **args)


def test_verify_needs_a_sha256_for_every_shard(tmp_path):
    small_set(tmp_path)  # stats.json without sha256, as shards written before the job recorded it
    _loader(tmp_path, verify=False, num_workers=0)  # not asked: not needed
    with pytest.raises(ValueError, match=r"skip05/shard-000000\.stats\.json has no 'sha256'"):
        _loader(tmp_path, verify=True, num_workers=0)
    add_sha256(tmp_path)
    loader = _loader(tmp_path, verify=True, num_workers=0)
    assert loader.cfg.verify_shards and len(list(loader)) == 12 and loader.stats()["skipped"] == 0
    (tmp_path / "skip05" / "shard-000001.stats.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"skip05/shard-000001\.stats\.json is missing"):
        _loader(tmp_path, verify=True, num_workers=0)
    (tmp_path / "skip05" / "shard-000001.stats.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"shard-000001\.stats\.json is unreadable"):
        _loader(tmp_path, verify=True, num_workers=0)


@pytest.mark.timeout(300)
def test_silent_corruption_is_caught_only_with_verify(job_shards, tmp_path, caplog):
    """One byte of a JPEG quantisation table changed in the middle of a shard: same size, intact tar, the JPEG
    still decodes. Only the sha256 check sees it (why the option exists): with it the shard is dropped (warning,
    skipped, bad_shards) and no clip or paste partner comes from it; without it the stream reads it."""
    root = tmp_path / "shards"
    shutil.copytree(job_shards, root)
    bad = root / "skip05" / "shard-000001.tar"
    size = bad.stat().st_size
    key = corrupt_quantisation_byte(bad)
    assert bad.stat().st_size == size
    want = json.loads((root / "skip05" / "shard-000001.stats.json").read_text())["sha256"]

    plain = _loader(root, verify=False, total=24, num_workers=0, crop_size=64, merge_probability=1.0)
    infos = [i for b in plain for i in b["info"]]
    assert plain.stats()["skipped"] == 0 and plain.stats()["bad_shards"] == 0  # not detected
    assert any("skip05/shard-000001.tar" in (i["shard"], i["merged_shard"]) for i in infos)

    for workers in (0, 2):  # in-process, and through DataLoader workers (the report crosses processes)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
            checked = _loader(root, verify=True, total=24, num_workers=workers, crop_size=64,
                              merge_probability=1.0)
            infos = [i for b in checked for i in b["info"]]
        assert len(infos) == 48
        assert all(i["shard"] != "skip05/shard-000001.tar" for i in infos)
        assert all(i["merged_shard"] != "skip05/shard-000001.tar" for i in infos)
        assert any(i["merged_from"] for i in infos)
        stats = checked.stats()
        assert stats["bad_shards"] == 1 and stats["skipped"] >= 1
        assert checked.state_dict()["skipped"] == stats["skipped"]
        if workers == 0:  # a worker's warnings go to its own stderr
            text = caplog.text
            assert str(bad) in text and want in text and "sha256" in text and key not in text
