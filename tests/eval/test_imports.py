"""model.inference imports only torch, numpy and model (never deepspeed, ray, mlflow, training, data_pipeline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_inference_import_is_clean():
    code = ("import sys, model.inference; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('deepspeed', 'ray', 'mlflow', 'training', 'data_pipeline')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
