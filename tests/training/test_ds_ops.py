"""DeepSpeed's CPU op: the trainer looks for it in the venv and says so in one line when it must build it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from training import ds_ops


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


def test_default_is_the_venv(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ds_ops.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def test_a_set_folder_wins(ext_dir):
    assert ds_ops.extensions_dir() == ext_dir


def test_every_rank_looks_in_the_venv(monkeypatch):
    """Not only rank 0: a rank that looked in the default (the home folder) would compile the op again there."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    ds_ops.prepare(1)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def test_announces_a_build_once_on_rank_0_only(ext_dir, capsys):
    assert ds_ops.built_path() == ext_dir / ds_ops.OP / f"{ds_ops.OP}.so"
    ds_ops.prepare(1)
    assert capsys.readouterr().err == ""
    ds_ops.prepare(0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building DeepSpeed's CPU op deepspeed_shm_comm" in err and str(ext_dir) in err
    ds_ops.built_path().parent.mkdir(parents=True, exist_ok=True)
    ds_ops.built_path().write_bytes(b"")  # built: nothing to say
    ds_ops.prepare(0)
    assert capsys.readouterr().err == ""


def test_make_install_built_it_into_this_venv(monkeypatch):
    """`make install` ran `python -m training.ds_ops`: the op the trainer loads is already in the venv."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ds_ops.built_path().is_file(), "run `make install` (it builds DeepSpeed's CPU op into the venv)"
