"""The loader on the real output of the shard job (data_pipeline.synth → data_pipeline.shard, demo config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import build_train_loader, finish_batch

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loader_reads_the_shard_job_output(tmp_path):
    data, out = tmp_path / "data", tmp_path / "shards"
    _run([sys.executable, "-m", "data_pipeline.synth", "--out", str(data), "--seed", "0", "--small"])
    _run([sys.executable, "-m", "data_pipeline.shard", "--config", str(ROOT / "data_pipeline/configs/demo.yaml"),
          "--data-root", str(data), "--out", str(out)])
    total = 20
    loader = build_train_loader(str(out), batch_size=2, rank=0, world_size=1, total_iterations=total,
                                crop_size=64, num_workers=2, seed=0)
    batches = [finish_batch(b) for b in loader]
    assert len(batches) == total and loader.stats()["skipped"] == 0
    levels = [b["info"][0]["level"] for b in batches]
    assert levels == [loader.level_at(i) for i in range(total)] and len(set(levels)) == 3
    for b in batches:
        assert b["rgb"].shape[:3] == (2, 8, 3) and b["rgb"].shape[-2:] == (64, 64)
        assert b["cls_gt"].dtype == torch.int64 and b["selector"].sum(1).min() >= 1
        for i, info in enumerate(b["info"]):
            # the shard's json says which ids are in the clip; the chosen ones are among them, at most 3
            assert info["shard"].split("/")[0] == info["level"]
            assert 1 <= len(info["object_ids"]) <= 3
            n = len(info["object_ids"])
            assert all(b["first_frame_gt"][i, 0, s].sum() > 0 for s in range(n))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest
