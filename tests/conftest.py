"""Test-wide settings: keep each test process to few threads, since CI has 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """`training.demo.make_data(small=True)` once per session: ROOT/data (the five synthetic video sets and the
    static image sets, as synth writes them) and ROOT/shards (the demo shard job's output). Read-only for tests:
    copy it before changing anything."""
    from training import demo

    root = tmp_path_factory.mktemp("demo-data")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    demo.make_data(root, small=True, env=env)
    return root
