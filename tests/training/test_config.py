"""The training config: typed keys, key=value overrides, start-up validation, batch split and LR schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import ConfigError, load_config, split_global_batch
from training.optim import lr_at, milestone_iterations

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def shard_levels(root: Path) -> Path:
    """What load_config checks of a shard folder: the curriculum's level folders, each with a .tar."""
    for level in ("skip05", "skip10", "skip15"):
        (root / level).mkdir(parents=True)
        (root / level / "000000.tar").touch()
    return root


@pytest.fixture
def paths(tmp_path):
    shard_levels(tmp_path / "shards")
    (tmp_path / "val").mkdir()
    return [f"data.shards={tmp_path / 'shards'}", f"validation.root={tmp_path / 'val'}"]


@pytest.mark.parametrize("name,iterations", [("s3_ytvos_davis", 150_000), ("s3_mega", 190_000)])
def test_paper_values(name, iterations, paths):
    cfg = load_config(CONFIGS / f"{name}.yaml", paths)
    assert cfg.train.iterations == iterations
    assert cfg.optim.lr == 5e-5 and cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad_norm == 3.0
    assert cfg.train.global_batch == 16 and cfg.data.num_frames == 8 and cfg.data.num_ref_frames == 3
    assert cfg.data.max_skip == [5, 10, 15, 5] and cfg.data.max_skip_until == [0.1, 0.3, 0.8, 1.0]
    assert cfg.model.overrides["drop_path"] == 0.15
    assert milestone_iterations(cfg) == [round(0.8 * iterations), round(0.92 * iterations)]


def test_release_values_by_override(paths):
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths + ["optim.weight_decay=0.001", "train.iterations=175000",
                                                        "model.overrides.drop_path=0.0", "optim.lr=5e-5"])
    assert cfg.optim.weight_decay == 0.001 and cfg.train.iterations == 175_000
    assert cfg.model.overrides["drop_path"] == 0.0 and cfg.optim.lr == 5e-5


def test_lr_at_start_each_milestone_and_end(paths):
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths)
    m1, m2 = milestone_iterations(cfg)
    assert (m1, m2) == (152_000, 174_800)
    assert lr_at(cfg, 0) == pytest.approx(5e-5)
    assert lr_at(cfg, m1 - 1) == pytest.approx(5e-5)
    assert lr_at(cfg, m1) == pytest.approx(5e-6)
    assert lr_at(cfg, m2 - 1) == pytest.approx(5e-6)
    assert lr_at(cfg, m2) == pytest.approx(5e-7)
    assert lr_at(cfg, cfg.train.iterations) == pytest.approx(5e-7)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_global_batch_is_kept_whatever_the_world_size(world, paths):
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths)
    split = split_global_batch(cfg, world)
    assert split.micro_batch * split.accumulation * split.world_size == 16


@pytest.mark.parametrize("override,key,reason", [
    ("optim.lrate=1e-4", "optim.lrate", "unknown key"),
    ("bogus=1", "bogus", "unknown key"),
    ("train.iterations=lots", "train.iterations", "expected an integer"),
    ("train.iterations=1.5", "train.iterations", "expected an integer"),
    ("optim.lr=-1e-4", "optim.lr", "must be positive"),
    ("optim.lr=0", "optim.lr", "must be positive"),
    ("data.shards=/no/such/folder", "data.shards", "folder not found"),
    ("validation.root=/no/such/davis", "validation.root", "folder not found"),
    ("train.zero_stage=4", "train.zero_stage", "must be 0, 1, 2 or 3"),
    ("optim.lr_milestones=[0.9,0.5]", "optim.lr_milestones", "increasing"),
    ("train.precision=fp8", "train.precision", "must be auto, bf16 or fp32"),
    ("checkpoint.every=0", "checkpoint.every", "must be positive"),
])
def test_bad_configuration_names_key_and_reason(override, key, reason, paths):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "s3_mega.yaml", paths + [override])
    assert e.value.key == key and reason in str(e.value)


def test_unsplittable_global_batch(paths):
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths)
    with pytest.raises(ConfigError, match="train.global_batch.*cannot be split over 3 ranks"):
        split_global_batch(cfg, 3)
    with pytest.raises(ConfigError, match="multiple of 32"):
        split_global_batch(cfg, 32)  # past 16 ranks: the documented rule (grow the batch, scale the LR)
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths + ["train.global_batch=32", "optim.scale_lr_with_batch=true"])
    assert split_global_batch(cfg, 32).micro_batch == 1
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths + ["train.micro_batch=3"])
    with pytest.raises(ConfigError, match="train.micro_batch"):
        split_global_batch(cfg, 2)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/no/such.yaml")


def test_train_entry_point_fails_fast_on_bad_config(paths, capsys, monkeypatch):
    from training.train import main

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)  # restored after the test: other tests share this process

    assert main(["--config", str(CONFIGS / "s3_mega.yaml"), *paths, "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_follows_the_training_config(stage, paths):
    from training.optim import deepspeed_config

    cfg = load_config(CONFIGS / "s3_mega.yaml", paths + [f"train.zero_stage={stage}"])
    ds = deepspeed_config(cfg, split_global_batch(cfg, 4))
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 16 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["gradient_clipping"] == 3.0
    assert ds["bf16"]["enabled"] is False  # precision auto: fp32 on a machine without a GPU
    cfg = load_config(CONFIGS / "s3_mega.yaml", paths + ["train.precision=bf16"])
    # bf16 is autocast over fp32 parameters (training/optim.py): DeepSpeed's own bf16 mode stays off.
    assert deepspeed_config(cfg, split_global_batch(cfg, 1))["bf16"]["enabled"] is False
    from training.optim import autocast_dtype

    assert autocast_dtype(cfg) is torch.bfloat16


def test_demo_config_loads(tmp_path):
    shard_levels(tmp_path / "s")
    (tmp_path / "v").mkdir()
    cfg = load_config(CONFIGS / "demo_cpu.yaml", [f"data.shards={tmp_path / 's'}", f"validation.root={tmp_path / 'v'}"])
    assert cfg.model.name == "tiny" and cfg.train.zero_stage == 2 and cfg.train.precision == "fp32"
    assert split_global_batch(cfg, 2).world_size == 2


def _static_paths(tmp_path: Path) -> list[str]:
    (tmp_path / "static_shards" / "static").mkdir(parents=True)
    (tmp_path / "static_shards" / "static" / "shard-000000.tar").touch()
    (tmp_path / "val").mkdir(exist_ok=True)
    return [f"data.shards={tmp_path / 'static_shards'}", f"validation.root={tmp_path / 'val'}"]


def test_stage0_config_has_the_release_values(tmp_path):
    from model.config import load_model_config
    from training.optim import lr_at

    cfg = load_config(CONFIGS / "s3_pretrain_static.yaml", _static_paths(tmp_path))
    d, o, t = cfg.data, cfg.optim, cfg.train
    assert d.kind == "static" and (d.num_frames, d.num_ref_frames, d.num_objects, d.crop_size) == (3, 2, 1, 384)
    assert (t.iterations, t.global_batch, t.precision) == (80_000, 16, "fp32")
    assert (o.lr, o.weight_decay, o.encoder_lr_ratio, o.clip_grad_norm) == (1e-4, 0.001, 0.1, 3.0)
    assert {lr_at(cfg, i) for i in (0, 40_000, 79_999)} == {1e-4}  # constant
    m = load_model_config(cfg.model.name, cfg.model.overrides)
    assert (m.loss.num_points, m.loss.oversample_ratio, m.loss.importance_sample_ratio) == (8192, 3.0, 0.75)
    assert m.drop_path == 0.0


def test_static_and_video_shards_are_not_mixed_up(tmp_path, paths):
    static = _static_paths(tmp_path)
    with pytest.raises(ConfigError, match=r"static-image shards \(static/\): set data.kind=static"):
        load_config(CONFIGS / "s3_mega.yaml", static)
    with pytest.raises(ConfigError, match=r"static is missing \(data.kind is static\)"):
        load_config(CONFIGS / "s3_pretrain_static.yaml", paths)
    with pytest.raises(ConfigError, match="data.num_objects"):
        load_config(CONFIGS / "s3_pretrain_static.yaml", static + ["data.num_objects=3"])
    with pytest.raises(ConfigError, match="data.kind"):
        load_config(CONFIGS / "s3_mega.yaml", paths + ["data.kind=images"])


def test_a_checkpoint_written_before_data_kind_existed_resumes_without_a_change(paths):
    from training import lifecycle
    from training.config import OPERATIONAL_KEYS

    cfg = load_config(CONFIGS / "s3_mega.yaml", paths)
    old = cfg.to_dict()
    del old["data"]["kind"]  # what a checkpoint of the earlier code holds
    assert lifecycle.config_diff(old, cfg.to_dict(), ignore=OPERATIONAL_KEYS) == [("data.kind", "<absent>", "video")]
    assert lifecycle.config_diff(lifecycle.with_later_keys(old), cfg.to_dict(), ignore=OPERATIONAL_KEYS) == []
    static = load_config(CONFIGS / "s3_mega.yaml", paths)
    static.data.kind = "static"
    assert static.hash() != cfg.hash()  # the key is hashed once it says something new
    # the hashes the code before data.kind gave these configs (computed at f77e8e1): their checkpoints match
    for name, before in (("s3_mega", "4e8635fa12a138c5"), ("s3_ytvos_davis", "4febdddfd1b6cad2")):
        assert load_config(CONFIGS / f"{name}.yaml", check_paths=False).hash() == before, name
