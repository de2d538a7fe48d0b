"""Checkpoint folder rules: only marked checkpoints count, purge keeps the last k, loads refuse pickled code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

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


# ------------------------------------------------------------- edge cases (found by `make mutation`, issue 18)


def _iterations(root):
    return [r.iteration for r in checkpoint.list_checkpoints(root, complete_only=False)]


def test_only_tag_folders_count_and_the_newest_of_many_is_latest(tmp_path):
    for it in (2, 4, 6):
        _make(tmp_path, it)
    (tmp_path / "other").mkdir()  # not a tag: ignored
    (tmp_path / "iter_0000009").write_text("a file named like a tag")  # not a folder: ignored
    assert _iterations(tmp_path) == [2, 4, 6]
    assert checkpoint.latest_complete(tmp_path).iteration == 6


def test_purge_edge_cases(tmp_path, caplog):
    caplog.set_level("INFO", logger="training.checkpoint")
    a = tmp_path / "a"  # keep the last one; dead saves before it go, the one after it stays
    for it in (2, 4, 6):
        _make(a, it)
    for it in (3, 5, 7):
        _make(a, it, complete=False)
    checkpoint.purge(a, keep_last=1)
    assert _iterations(a) == [6, 7]
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"removed checkpoint {a / checkpoint.tag_for(it)}" for it in (2, 3, 4, 5))
    b = tmp_path / "b"  # a dead save between two kept checkpoints goes too
    _make(b, 1, complete=False)
    _make(b, 6)
    _make(b, 7, complete=False)
    _make(b, 8)
    checkpoint.purge(b, keep_last=2)
    assert _iterations(b) == [6, 8]
    c = tmp_path / "c"  # nothing complete yet: every save may still be in progress, none is removed
    _make(c, 0, complete=False)
    _make(c, 1, complete=False)
    checkpoint.purge(c, keep_last=1)
    assert _iterations(c) == [0, 1]


def test_purge_weights_orders_by_iteration_and_leaves_other_files(tmp_path, caplog):
    caplog.set_level("INFO", logger="training.checkpoint")
    for it in (9_999_999, 10_000_000, 4):  # past 10^7 iterations the names no longer sort as numbers
        (tmp_path / f"iter_{it:07d}.pt").write_bytes(b"w")
    (tmp_path / "other.pt").write_bytes(b"not a tag")
    for name in ("a_dir", "iter_0000001.pt.d", "z_dir"):
        (tmp_path / name).mkdir()
    removed = checkpoint.purge_weights(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["iter_0000004.pt", "iter_9999999.pt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["iter_10000000.pt", "other.pt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 consolidated weight files from {tmp_path} (keeping iter_10000000)"]
    caplog.clear()
    for it in (20, 30):
        (tmp_path / f"iter_{it:07d}.pt").write_bytes(b"w")
    checkpoint.purge_weights(tmp_path, keep=2)  # iterations 20, 30, 10^7: the two newest stay
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 1 consolidated weight files from {tmp_path} (keeping iter_0000030, iter_10000000)"]
    caplog.clear()
    checkpoint.purge_weights(tmp_path, keep=0)
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 consolidated weight files from {tmp_path} (keeping none)"]


def test_load_weights_names_the_file_and_the_keys(tmp_path):
    net = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(6)])  # 12 keys
    keys = list(net.state_dict())
    empty, extra = tmp_path / "empty.pt", tmp_path / "extra.pt"
    torch.save({}, empty)
    with pytest.raises(RuntimeError) as e:  # missing keys alone are an error
        checkpoint.load_weights(net, empty)
    assert str(e.value).startswith(f"{empty}: missing keys {keys[:10]}, unexpected keys []")
    torch.save({**net.state_dict(), **{f"x{i}": torch.zeros(1) for i in range(12)}}, extra)
    with pytest.raises(RuntimeError) as e:
        checkpoint.load_weights(net, extra)
    assert str(e.value) == f"{extra}: missing keys [], unexpected keys {[f'x{i}' for i in range(10)]}"


def test_safe_load_keeps_its_promise_whatever_the_caller_asks(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=False from a caller is overridden
        checkpoint.safe_torch_load(evil, weights_only=False)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert checkpoint.safe_torch_load(good, map_location="meta")["w"].is_meta
    with checkpoint.refuse_pickled_code():  # any torch.load inside the block, nested blocks included
        with checkpoint.refuse_pickled_code(), pytest.raises(pickle.UnpicklingError, match=f"^{evil}: refused"):
            torch.load(evil, weights_only=False)  # guarded: inside refuse_pickled_code
        assert torch.load(good, map_location="meta", weights_only=False)["w"].is_meta  # guarded: as above
    assert torch.load.__module__.startswith("torch")  # restored


def test_failed_save_removes_what_it_wrote_and_says_so(tmp_path):
    ref = checkpoint.CheckpointRef(tmp_path, checkpoint.tag_for(3), 3)
    ref.path.mkdir()
    (ref.path / "part.pt").write_bytes(b"\0" * 2**20)
    full = OSError(28, "No space left on device")
    assert checkpoint._failed_save(ref, full) == (
        f"checkpoint {ref.path} was not written ([Errno 28] No space left on device); its incomplete files "
        "(1.0 MiB) were removed")
    assert not ref.path.exists()
    ref.path.mkdir()
    assert checkpoint._failed_save(ref, full) == (
        f"checkpoint {ref.path} was not written ([Errno 28] No space left on device)")
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"^w.pt not written \(\[Errno 28\] No space left on "
                                                              r"device\); the partial file was removed$"):
        checkpoint.raise_write_failure(full, "w.pt")
    assert checkpoint.raise_write_failure(ValueError("not a write"), "w.pt") is None


@pytest.fixture(scope="module", params=[(0, ""), (1, ""), (1, "bf16")], ids=["zero0", "zero1", "zero1-bf16"])
def saved(request, tmp_path_factory):
    """Real DeepSpeed checkpoints at iterations 1 and 2 (one rank, gloo; ZeRO stage 0 or 1, fp32 or bf16) and the
    module state after each."""
    import subprocess
    import sys

    from tests.fault.helpers import ROOT, child_env, free_port

    stage, precision = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}{precision}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault" / "checkpoint_load_worker.py"), "save",
                           str(root), str(stage), *([precision] if precision else [])], cwd=ROOT,
                          env=child_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = checkpoint.list_checkpoints(root)
    assert [r.iteration for r in refs] == [1, 2]
    return precision, {r.iteration: (r, torch.load(root / f"expected_module_{r.iteration}.pt", weights_only=True))
                       for r in refs}


def test_consolidate_writes_the_modules_fp32_weights_once(saved, tmp_path, capsys, caplog):
    """Each checkpoint (the older one too: the tag is honoured, not DeepSpeed's `latest`) becomes the module's
    weights in fp32: under bf16 the trainable ones are ZeRO's fp32 master weights (they round to the module's
    bf16 copy but carry more bits), the frozen ones the module's own. zero_to_fp32's prints go to the DEBUG log."""
    caplog.set_level("DEBUG", logger="training.checkpoint")
    precision, by_iteration = saved
    for it, (ref, expected) in by_iteration.items():
        out = checkpoint.consolidate(ref, tmp_path / "w" / "nested" / f"iter_{it:07d}.pt")
        assert capsys.readouterr().out == ""
        quiet = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"zero_to_fp32 on {ref.path}:")]
        zero = any(ref.path.glob("*zero_pp_rank_*optim_states.pt"))  # ZeRO 1+: zero_to_fp32 ran, quietly
        assert len(quiet) == int(zero) and all(len(q.splitlines()) > 2 for q in quiet), quiet
        caplog.clear()
        state = torch.load(out, weights_only=True)
        assert state.keys() == expected.keys()
        finer = []
        for k, v in expected.items():  # trainable, frozen, BatchNorm statistics and its integer counter
            assert state[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
            if precision == "bf16" and not k.startswith("frozen."):
                assert torch.equal(state[k].bfloat16(), v), (it, k)
                finer.append(not torch.equal(state[k], v.float()))
            else:
                assert torch.equal(state[k], v.float() if v.is_floating_point() else v), (it, k)
        if precision == "bf16":
            assert finer and all(finer), f"iteration {it}: not the fp32 master weights (the bf16 module's?)"
        else:
            assert int(state["norm.num_batches_tracked"]) == it
    assert sorted(p.name for p in out.parent.iterdir()) == ["iter_0000001.pt", "iter_0000002.pt"]  # no temp file
    stamp = out.stat().st_mtime_ns
    assert checkpoint.consolidate(ref, out) == out and out.stat().st_mtime_ns == stamp  # written once


def test_failed_save_of_a_folder_never_created(tmp_path):
    """A save that failed before writing anything: nothing to remove, nothing claimed removed, no second error."""
    ref = checkpoint.CheckpointRef(tmp_path, checkpoint.tag_for(5), 5)
    assert checkpoint._failed_save(ref, OSError(28, "No space left on device")) == (
        f"checkpoint {ref.path} was not written ([Errno 28] No space left on device)")


def test_release_failed_write_lets_go_of_what_the_failed_frames_held():
    """torch.save's writer lives on in the locals of the frames of its exception; release_failed_write frees it
    (on a full disk, the space of the deleted partial file comes back only then)."""
    import weakref

    class Writer:
        pass

    refs = []

    def write():
        writer = Writer()  # held by this frame, as torch.save's file writer is
        refs.append(weakref.ref(writer))
        raise OSError(28, "No space left on device")

    try:
        write()
    except OSError as e:
        error = e
    (held,) = refs
    assert held() is not None
    checkpoint.release_failed_write(error)
    assert held() is None


def test_loads_stay_safe_when_the_environment_makes_torch_unsafe_by_default(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's default to weights_only=False: the project's loaders
    say weights_only=True explicitly, so they still refuse pickled code."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.safe_torch_load(evil)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_weights(torch.nn.Linear(2, 1), evil)
    with checkpoint.refuse_pickled_code(), pytest.raises(pickle.UnpicklingError):
        torch.load(evil)  # guarded: inside refuse_pickled_code
    assert not marker.exists()


def test_consolidate_on_a_full_disk_removes_its_partial_file_and_says_so(saved, tmp_path, monkeypatch):
    """torch.save dies half-way (ENOSPC): the partial `<name>.tmp` (the name purge_weights cleans up) is removed,
    the writer it held is released, and the error is a CheckpointWriteError naming the file."""
    import weakref

    _, by_iteration = saved
    ref, _ = by_iteration[2]
    out = tmp_path / "iter_0000002.pt"
    seen, held = [], []

    class Writer:
        pass

    def full_disk(obj, f, *args, **kwargs):
        writer = Writer()  # held by this frame, as torch.save's file writer is
        held.append(weakref.ref(writer))
        seen.append(Path(f))
        Path(f).write_bytes(b"\0" * 1024)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match=rf"^consolidated weights {out} not written \(\[Errno 28\]"
                                                              r" No space left on device\); the partial file was removed$"):
        checkpoint.consolidate(ref, out)
    assert seen == [tmp_path / "iter_0000002.pt.tmp"]
    assert list(tmp_path.iterdir()) == [] and held[0]() is None

    def full_before_open(obj, f, *args, **kwargs):  # nothing written at all: still the same error, not another
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_before_open)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"^consolidated weights .* not written \(\[Errno 28\]"):
        checkpoint.consolidate(ref, out)
    assert list(tmp_path.iterdir()) == []
