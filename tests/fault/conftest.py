"""Session fixtures shared by the fault tests: one synthetic data set and one uninterrupted shard run, which is both
the byte-identity reference of the shard-kill tests and the training data of the training-fault tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .helpers import PY, ROOT, child_env

SHARD_CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"


def shard_cmd(data_root: Path, out: Path, *args: str) -> list[str]:
    return [PY, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root", str(data_root),
            "--out", str(out), *args]


def run_shard(data_root: Path, out: Path, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(shard_cmd(data_root, out, *args), cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """The five synthetic datasets in their native layouts (root/YouTubeVOS, root/DAVIS, ...)."""
    root = tmp_path_factory.mktemp("fault-data") / "data"
    proc = subprocess.run([PY, "-m", "data_pipeline.synth", "--out", str(root), "--seed", "0", "--small"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def reference_shards(synth_data, tmp_path_factory) -> Path:
    """An uninterrupted run of the shard job over `synth_data`."""
    out = tmp_path_factory.mktemp("fault-ref") / "shards"
    run_shard(synth_data, out)
    assert len(list(out.rglob("*.tar"))) >= 2, "the kill points need at least two shards"
    return out
