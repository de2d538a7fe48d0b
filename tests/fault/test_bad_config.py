"""Issue 9, item 6: a bad configuration fails at start-up, naming the key and the reason, before DeepSpeed, the
model, the data or MLflow are touched (the output folder is never even created)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .helpers import PY, ROOT, child_env

pytestmark = [pytest.mark.fault]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"


@pytest.fixture
def good(tmp_path: Path) -> list[str]:
    for level in ("skip05", "skip10", "skip15"):  # what start-up checks of a shard folder
        (tmp_path / "shards" / level).mkdir(parents=True)
        (tmp_path / "shards" / level / "000000.tar").touch()
    (tmp_path / "val").mkdir()
    return [f"output_dir={tmp_path / 'out'}", f"data.shards={tmp_path / 'shards'}",
            f"validation.root={tmp_path / 'val'}"]


def start(args: list[str], world: int | None = None, config: Path = CONFIG) -> subprocess.CompletedProcess:
    extra = {} if world is None else {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
                                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    return subprocess.run([PY, "training/train.py", "--config", str(config), *args], cwd=ROOT,
                          env=child_env(**extra), capture_output=True, text=True, timeout=60)


CASES = [
    # (override, key named in the message, reason named in the message)
    ("optim.lrate=1e-4", "optim.lrate", "unknown key"),
    ("train.iterations=many", "train.iterations", "expected an integer"),
    ("train.iterations=1.5", "train.iterations", "expected an integer"),
    ("optim.lr=-1e-4", "optim.lr", "must be positive"),
    ("optim.lr=0", "optim.lr", "must be positive"),
    ("data.max_skip=5", "data.max_skip", "expected a list"),
    ("train.zero_stage=4", "train.zero_stage", "must be 0, 1, 2 or 3"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,key,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_value_fails_at_startup_naming_key_and_reason(good, tmp_path, override, key, reason):
    proc = start([*good, override])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config key '{key}'" in proc.stderr and reason in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # a message, not a crash
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.timeout(120)
def test_unknown_key_in_the_yaml_file(good, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("  zero_stage: 2", "  zero_stage: 2\n  zero_stagee: 3"))
    proc = start(good, config=bad)
    assert proc.returncode == 2 and "config key 'train.zero_stagee': unknown key" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_missing_data_path(good, tmp_path):
    missing = tmp_path / "no-such-shards"
    proc = start([*good, f"data.shards={missing}"])
    assert proc.returncode == 2, proc.stderr
    assert "config key 'data.shards'" in proc.stderr and f"folder not found: {missing}" in proc.stderr
    proc = start([*good, f"validation.root={tmp_path / 'nope'}"])
    assert proc.returncode == 2 and "config key 'validation.root'" in proc.stderr and "folder not found" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_missing_config_file(tmp_path):
    proc = start([], config=tmp_path / "nope.yaml")
    assert proc.returncode == 2 and "config key '--config'" in proc.stderr and "file not found" in proc.stderr


@pytest.mark.timeout(120)
def test_global_batch_the_world_size_cannot_split(good, tmp_path):
    proc = start([*good, "train.global_batch=4"], world=3)  # as the 3 ranks of a launcher would see it
    assert proc.returncode == 2, proc.stderr
    assert "config key 'train.global_batch'" in proc.stderr
    assert "4 cannot be split over 3 ranks" in proc.stderr and "multiple of 3" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = start([*good, "train.global_batch=6", "train.micro_batch=4"], world=3)
    assert proc.returncode == 2 and "config key 'train.micro_batch'" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_missing_pretrained_weight_files_fail_at_startup_naming_the_key(good, tmp_path):
    """The paper's `s3` reads the Depth-Anything ViT and an ImageNet ResNet-18 (the mask encoder, as Cutie): a
    missing file stops the job before DeepSpeed, naming the key and what to put there."""
    proc = start([*good, "model.name=s3"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model s3: pixel_encoder.weights: pretrained/depth_anything_vitb14.pth not found" in proc.stderr
    proc = start([*good, "model.name=s3", "model.overrides={pixel_encoder: {init: random, weights: null}}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model s3: mask_encoder.weights: pretrained/resnet18.pth not found" in proc.stderr
    assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
