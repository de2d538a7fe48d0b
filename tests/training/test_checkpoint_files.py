"""Checkpoint folder rules: only marked checkpoints count, purge keeps the last k, loads refuse pickled code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from training import checkpoint


def _make(root, iteration, complete=True):
    p = root / checkpoint.tag_for(iteration)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (p / checkpoint.MARKER).write_text(json.dumps({"iteration": iteration, "mlflow_run_id": "abc"}))
    return p


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 4)
    _make(tmp_path, 6, complete=False)  # the job died while writing it
    (tmp_path / "latest").write_text("iter_0000006")  # DeepSpeed's own pointer already moved on: not trusted
    ref = checkpoint.latest_complete(tmp_path)
    assert ref.iteration == 4 and ref.marker()["mlflow_run_id"] == "abc"
    assert [r.iteration for r in checkpoint.list_checkpoints(tmp_path, complete_only=False)] == [2, 4, 6]


def test_purge_keeps_last_k_and_drops_dead_saves_before_them(tmp_path):
    for it in (2, 4, 6, 8):
        _make(tmp_path, it)
    _make(tmp_path, 5, complete=False)
    _make(tmp_path, 10, complete=False)  # newer than the newest complete one: maybe being written right now
    checkpoint.purge(tmp_path, keep_last=2)
    assert [r.iteration for r in checkpoint.list_checkpoints(tmp_path, complete_only=False)] == [6, 8, 10]


def test_empty_or_missing_folder(tmp_path):
    assert checkpoint.latest_complete(tmp_path / "nothing") is None
    assert checkpoint.latest_complete(tmp_path) is None


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_loads_refuse_pickled_objects(tmp_path):
    good, evil = tmp_path / "good.pt", tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2)}, good)
    torch.save({"w": torch.ones(2), "x": _Evil()}, evil)
    assert torch.equal(checkpoint.safe_torch_load(good)["w"], torch.ones(2))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.safe_torch_load(evil)
    net = torch.nn.Linear(2, 1)
    torch.save(net.state_dict(), good)
    checkpoint.load_weights(torch.nn.Linear(2, 1), good)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_weights(net, evil)


def test_purge_weights_keeps_the_newest_k_with_their_sidecars(tmp_path):
    for it in (4, 8, 12, 16):
        (tmp_path / f"iter_{it:07d}.pt").write_bytes(b"w")
        (tmp_path / f"iter_{it:07d}.model.yaml").write_text("{}")
    (tmp_path / "iter_0000020.raw.pt").write_bytes(b"r")  # a consolidation cut short
    (tmp_path / "iter_0000020.tmp").write_bytes(b"t")
    (tmp_path / "iter_0000016.pt.tmp").write_bytes(b"t")
    (tmp_path / "iter_0000002.model.yaml").write_text("{}")  # a sidecar whose weights are gone
    (tmp_path / "notes.txt").write_text("not ours")
    removed = checkpoint.purge_weights(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000012.model.yaml", "iter_0000012.pt", "iter_0000016.model.yaml", "iter_0000016.pt", "notes.txt"]
    assert len(removed) == 8
    assert checkpoint.purge_weights(tmp_path, keep=2) == []
    assert checkpoint.purge_weights(tmp_path / "missing", keep=2) == []
    checkpoint.purge_weights(tmp_path, keep=0)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
