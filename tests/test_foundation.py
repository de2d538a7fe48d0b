"""The foundation's contracts: the three packages import, the model stays free of the infrastructure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_packages_import():
    loaded = json.loads(
        _run("import json, model, data_pipeline, training; print(json.dumps([model.__name__, data_pipeline.__name__, training.__name__]))")
    )
    assert loaded == ["model", "data_pipeline", "training"]


def test_model_does_not_import_infrastructure():
    code = (
        "import sys, json, model\n"
        "import model.config, model.train_wrapper, model.inference  # the network, trainer and engine too\n"
        "print(json.dumps(sorted(m for m in ('deepspeed', 'ray', 'mlflow', 'training', 'data_pipeline') if m in sys.modules)))"
    )
    assert json.loads(_run(code)) == []


def test_timm_imports_with_cpu_torch():
    # torchvision from PyPI is a CUDA build; model/_tv_shim.py must make timm importable anyway.
    assert _run("import model, timm, torch; print(torch.__version__)").startswith("2.13.0")


def test_torch_is_the_pinned_build():
    import torch

    constraints = (ROOT / "constraints" / "cpu.txt").read_text()
    assert "torch==2.13.0+cpu" in constraints
    assert torch.__version__.startswith("2.13.0")
    if not torch.cuda.is_available():
        assert torch.__version__ == "2.13.0+cpu"
