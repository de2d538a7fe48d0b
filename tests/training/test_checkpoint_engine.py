"""training.checkpoint against a real DeepSpeed engine on 2 gloo ranks (torchrun): the collective save with its
completion marker, keep-last-k, per-rank client state, fp32 consolidation equal to the live weights, and a load
that brings back weights and optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [2, 3])
def test_save_consolidate_load_on_two_ranks(stage, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(Path(__file__).with_name("ds_checkpoint_worker.py")), str(tmp_path),
                           str(stage)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1))
    assert r0["kept"] == r1["kept"] == [2, 3] and r0["latest"] == 3
    assert r0["consolidated_keys_match"] and r0["consolidated_equal"]
    assert r0["int_buffer_dtype"] == "torch.int64"
    assert r0["client_iteration"] == r1["client_iteration"] == 3
    assert r0["client_loader"] == {"rank": 0, "it": 3} and r1["client_loader"] == {"rank": 1, "it": 3}
    for r in (r0, r1):
        assert r["same_loss_after_load"] and r["same_loss_after_step"] and r["lr_zero_freezes_weights"]
