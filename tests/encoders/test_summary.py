"""`model.summary`: parameter counts as JSON (per module); the CLI runs on the real `tiny` config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.encoders import build_pixel_encoder
from model.summary import count_parameters, summarize
from tests.encoders.helpers import tiny

ROOT = Path(__file__).resolve().parents[2]


def test_counts_split_trainable_and_frozen_per_module():
    network = torch.nn.Module()
    network.pixel_encoder = build_pixel_encoder(tiny(), 0.0)
    network.head = torch.nn.Linear(4, 3)  # 15 parameters
    network.query_init = torch.nn.Parameter(torch.zeros(8, 4))
    summary = summarize(network)
    vit = sum(p.numel() for p in network.pixel_encoder.vit.parameters())
    encoder = count_parameters(network.pixel_encoder)
    assert summary["modules"]["head"] == {"total": 15, "trainable": 15, "frozen": 0}
    assert summary["modules"]["(network itself)"] == {"total": 32, "trainable": 32, "frozen": 0}
    assert summary["modules"]["pixel_encoder"] == encoder
    assert encoder["frozen"] == vit
    assert summary["pixel_encoder_parts"]["vit"] == {"total": vit, "trainable": 0, "frozen": vit}
    assert summary["total"] == encoder["total"] + 15 + 32
    assert summary["trainable"] + summary["frozen"] == summary["total"]
    assert sum(m["total"] for m in summary["modules"].values()) == summary["total"]


def _core_landed() -> bool:
    return (ROOT / "model" / "config.py").is_file() and (ROOT / "model" / "configs" / "tiny.yaml").is_file()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _core_landed(), reason="model.config / configs/tiny.yaml not in the tree yet")
def test_cli_prints_json_for_tiny():
    done = subprocess.run(
        [sys.executable, "-m", "model.summary", "--config", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["config"] == "tiny"
    assert summary["total"] == summary["trainable"] + summary["frozen"] > 0
    assert "pixel_encoder" in summary["modules"]
    assert sum(m["total"] for m in summary["modules"].values()) == summary["total"]
