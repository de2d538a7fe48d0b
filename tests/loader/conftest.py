"""Shared fixtures of the loader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loader.helpers import add_sha256, run_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def job_shards(tmp_path_factory) -> Path:
    """The shard job's own output (data_pipeline.synth --small → data_pipeline.shard, demo config: 3 levels of 4
    shards of 16 clips over 15 videos), written once per session; do not modify it (copy it first). Each shard's
    stats.json carries its sha256 (the job writes it; added here for a job that does not yet)."""
    base = tmp_path_factory.mktemp("job-shards")
    data, out = base / "data", base / "shards"
    run_module(["data_pipeline.synth", "--out", str(data), "--seed", "0", "--small"], ROOT)
    run_module(["data_pipeline.shard", "--config", str(ROOT / "data_pipeline/configs/demo.yaml"),
                "--data-root", str(data), "--out", str(out)], ROOT)
    add_sha256(out)
    return out
