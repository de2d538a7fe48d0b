"""The loader on the real output of the shard job (data_pipeline.synth → data_pipeline.shard, demo config: the
session's `job_shards`), and the shard job's manifest checked against the shards on disk."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter

import pytest
import torch

from data_pipeline.loader import build_train_loader, finish_batch

# The curriculum of build_train_loader's defaults, max_skip (5, 10, 15, 5) until (0.1, 0.3, 0.8, 1.0) of the run
# (Cutie: level k while iteration < until[k] x total), over total = 20 iterations: skip05 for iterations 0-1
# (< 2), skip10 for 2-5 (< 6), skip15 for 6-15 (< 16), skip05 again for 16-19.
TOTAL = 20
EXPECTED_LEVELS = ["skip05", "skip05",
                   "skip10", "skip10", "skip10", "skip10",
                   "skip15", "skip15", "skip15", "skip15", "skip15", "skip15", "skip15", "skip15", "skip15", "skip15",
                   "skip05", "skip05", "skip05", "skip05"]


def _samples(tar_path) -> dict[str, dict]:
    """{sample key: its clip JSON} of one shard."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                out[member.name[:-len(".json")]] = json.loads(tar.extractfile(member).read())
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loader_reads_the_shard_job_output(job_shards):
    out = job_shards
    # The manifest (demo config: levels skip05/10/15, 64 clips per level, 16 per shard) against the tars on disk.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["levels"] == {"skip05": 5, "skip10": 10, "skip15": 15}
    assert manifest["clips_per_level"] == {"skip05": 64, "skip10": 64, "skip15": 64}
    assert manifest["num_clips"] == 192 and manifest["num_shards"] == 12
    assert manifest["num_skipped"] == 0 and manifest["skipped"] == [] and not manifest["missing_datasets"]
    assert sorted(manifest["shards"]) == sorted(str(p.relative_to(out)) for p in out.glob("skip*/*.tar"))
    keys: dict[str, set[str]] = {}
    per_dataset: Counter[str] = Counter()
    for name, entry in manifest["shards"].items():
        path = out / name
        samples = _samples(path)
        assert entry["clips"] == len(samples) == manifest["clips_per_shard"][name] == 16, name
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert all(s["level"] == name.split("/")[0] for s in samples.values()), name
        keys[name] = set(samples)
        per_dataset.update(s["dataset"] for s in samples.values())
    assert sum(len(k) for k in keys.values()) == 192
    assert dict(per_dataset) == {d: c["clips"] for d, c in manifest["datasets"].items()}
    assert set(per_dataset) == {"youtubevos", "davis", "ovis", "mose", "burst"}

    loader = build_train_loader(str(out), batch_size=2, rank=0, world_size=1, total_iterations=TOTAL,
                                crop_size=64, num_workers=2, seed=0)
    assert [loader.level_at(i) for i in range(TOTAL)] == EXPECTED_LEVELS
    batches = [finish_batch(b) for b in loader]
    assert len(batches) == TOTAL and loader.stats()["skipped"] == 0
    levels = [b["info"][0]["level"] for b in batches]
    assert levels == EXPECTED_LEVELS, f"batches follow the curriculum {levels}, expected {EXPECTED_LEVELS}"
    for b in batches:
        assert b["rgb"].shape[:3] == (2, 8, 3) and b["rgb"].shape[-2:] == (64, 64)
        assert b["cls_gt"].dtype == torch.int64 and b["selector"].sum(1).min() >= 1
        for i, info in enumerate(b["info"]):
            # the shard's json says which ids are in the clip; the chosen ones are among them, at most 3
            assert info["level"] == b["info"][0]["level"] and info["shard"].split("/")[0] == info["level"]
            assert info["key"] in keys[info["shard"]], (info["shard"], info["key"])  # a clip the manifest lists
            assert 1 <= len(info["object_ids"]) <= 3
            n = len(info["object_ids"])
            assert all(b["first_frame_gt"][i, 0, s].sum() > 0 for s in range(n))
