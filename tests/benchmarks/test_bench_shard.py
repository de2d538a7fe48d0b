"""benchmarks/bench_shard.py at toy sizes, so the sharding benchmark never rots: it runs the plain loop and the
Ray job with 1 and 2 CPUs on the same plan, they write the same clips, and the cost line is fitted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_shard_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_shard.py"), "--clips", "48",
                           "--scaling", "24", "--videos", "2", "--frames", "16", "--height", "120", "--width", "160",
                           "--short-side", "120", "--clips-per-shard", "8", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["plain"]["clips"] == res["ray1"]["clips"] == res["ray2"]["clips"] >= 40
    assert res["ray1"]["shards"] == res["ray2"]["shards"] == -(-48 // 3 // 8) * 3
    assert [p["clips"] for p in res["scaling"]] == [24, res["plain"]["clips"]]
    # the line is fitted (its sign is timing: at toy sizes Ray's start-up noise can outweigh 24 clips' cost, so it
    # is a figure to read, not something a test can assert)
    fit = res["scaling_fit"]
    assert all(math.isfinite(fit[k]) for k in ("startup_seconds", "seconds_per_clip")), fit
    assert "Ray 1 CPU / plain loop" in proc.stdout and "line =" in proc.stdout
