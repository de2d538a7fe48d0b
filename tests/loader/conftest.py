"""Shared fixtures of the loader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loader.helpers import add_sha256

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def job_shards(demo_data) -> Path:
    """The shard job's own output (data_pipeline.synth --small → data_pipeline.shard, demo config: 3 levels of 4
    shards of 16 clips over 15 videos), written once per session (tests/conftest.py `demo_data`); do not modify it
    (copy it first). Each shard's stats.json carries its sha256 (the job writes it)."""
    out = demo_data / "shards"
    add_sha256(out)  # a no-op for the job's own shards
    return out
