"""benchmarks/bench_loader.py at toy sizes, so the loader benchmark never rots: every measured path (loader,
raw folders, three decoders, finish_batch, the loader streaming the same shards over loopback HTTP and from a
loopback S3 server) runs on the same clips and the ratio lines are printed (their values are not asserted: speed is
never a timed assert here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.timeout(300)
def test_bench_loader_smoke(tmp_path):
    import bench_loader

    raw = tmp_path / "raw"
    bench_loader.make_raw(raw, videos=3, frames=12, h=180, w=256)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--raw-root", str(raw),
                           "--clips", "6", "--crop", "48", "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for label in ("(a) loader from shards", "(b) raw folders", "(c) bare decode", "(d) the same decode with PIL",
                  "(e) the same decode with cv2", "(f) finish_batch", "(g) loader streaming over loopback HTTP",
                  "(h) loader streaming from loopback S3"):
        line = next((ln for ln in out.splitlines() if ln.startswith(label)), None)
        assert line is not None, (label, out)
        assert float(re.search(r":\s+([0-9.]+)", line).group(1)) > 0, line
    assert "against the decode it needs (target >= 0.8)" in out
    # the streaming variants against (a): both ratios printed (the bench itself fails if they handed out other clips)
    assert re.search(r"^streaming / local-file loader: http [0-9.]+, s3 [0-9.]+ \(target >= 0\.9\)$", out, re.M), out
