"""training.validation spread over ranks: 2 gloo CPU processes score a checkpoint of the tiny network (random
weights, the real inference engine and metrics) on a synthetic DAVIS split and get the J&F of one process and the
same predicted PNGs; only rank 0 logs and writes validation.jsonl; a time limit skips the validation with a
warning, and every rank returns."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.eval import synth
from training import checkpoint
from training.config import TrainConfig
from training.validation import split_by_frames, validate_checkpoint, weights_file_for

TAG, ITERATION = "iter_0000010", 10
SCORE_KEYS = ("J&F-Mean", "J-Mean", "F-Mean", "J-Recall", "F-Recall", "J-Decay", "F-Decay")


class RecordingTracker:
    """Stands in for training.tracking.Tracker: records what would be logged (the scores come from the engine)."""

    def __init__(self):
        self.calls = []

    def log_checkpoint(self, network, iteration, scores, extra_files, overlays=None):
        self.calls.append({"iteration": iteration, "scores": scores, "extra_files": extra_files,
                           "overlays": sorted(overlays or {}), "device": str(next(network.parameters()).device)})
        return f"models:/fake-{iteration}"


def _model_cfg():
    from model.config import load_model_config

    return load_model_config("tiny", None)


def _cfg(out: Path, davis: Path, time_limit: float = 0.0) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(out))
    v = cfg.validation
    v.root, v.split, v.size, v.overlays, v.max_sequences, v.time_limit_minutes = str(davis), "val", 64, 2, 0, time_limit
    return cfg


def _ref(out: Path) -> checkpoint.CheckpointRef:
    return checkpoint.CheckpointRef(out / "checkpoints", TAG, ITERATION)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-sequence DAVIS split (two lengths, so the split by frames matters) and the consolidated weights of a
    random tiny network, put where validation looks for them (consolidation is then skipped)."""
    root = tmp_path_factory.mktemp("dval")
    davis = synth.make_davis(root / "DAVIS", n_seq=3, t=5, full_resolution=False)
    long_one = synth.make_davis(root / "extra", n_seq=1, t=8, seed=3, full_resolution=False)
    for kind in ("JPEGImages", "Annotations"):
        shutil.copytree(long_one / kind / "480p" / "seq0", davis / kind / "480p" / "seq3")
    (davis / "ImageSets" / "2017" / "val.txt").write_text("seq0\nseq1\nseq2\nseq3\n")
    import model

    torch.manual_seed(0)
    network = model.build_network(_model_cfg())
    weights = root / "weights.pt"
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()}, weights)
    return {"root": root, "davis": davis, "weights": weights}


def _output(setup, name: str) -> Path:
    out = setup["root"] / name
    target = weights_file_for(TrainConfig(output_dir=str(out)), _ref(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(setup["weights"], target)
    return out


def _output_with_checkpoint(setup, name: str) -> Path:
    """An output folder holding a ZeRO-stage-0 checkpoint of the training wrapper (keys `network.*` plus a
    wrapper-only one), not yet consolidated: rank 0 consolidates it while the other ranks wait."""
    out = setup["root"] / name
    state = torch.load(setup["weights"], weights_only=True)
    module = {f"network.{k}": v for k, v in state.items()} | {"loss_weight": torch.ones(1)}
    ref = _ref(out)
    ref.path.mkdir(parents=True)
    torch.save({"module": module}, ref.path / "mp_rank_00_model_states.pt")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, davis: str, time_limit: float, fail_rank: int) -> None:
    import torch.distributed as dist

    from training import evaluate

    torch.set_num_threads(1)
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.levelname} {record.getMessage()}")

    logging.getLogger("training.validation").addHandler(Keep())
    if rank == fail_rank:
        def broken(*args, **kwargs):
            raise MemoryError("CUDA out of memory (injected)")

        evaluate.run_sequences = broken
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    record, error = None, None
    tracker = RecordingTracker()
    t = time.monotonic()
    try:
        record = validate_checkpoint(_cfg(Path(out), Path(davis), time_limit), _model_cfg(), _ref(Path(out)),
                                     tracker, device="cpu", progress=False)
        dist.barrier()  # what train.py does after it
    except Exception as e:  # noqa: BLE001 (reported to the test)
        error = f"{type(e).__name__}: {e}"
    finally:
        seconds = time.monotonic() - t
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"record": record, "error": error, "calls": tracker.calls, "messages": messages, "seconds": seconds}))


def _spawn(world: int, out: Path, davis: Path, time_limit: float = 0.0, timeout: float = 120.0,
           fail_rank: int = -1) -> list[dict]:
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(out), str(davis), time_limit, fail_rank), nprocs=world,
                   join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not all return within {timeout:.0f} s (a hang)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _pngs(out: Path) -> dict[str, bytes]:
    ann = out / "val" / TAG / "Annotations"
    return {str(p.relative_to(ann)): p.read_bytes() for p in sorted(ann.rglob("*.png"))}


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]


def test_split_by_frames_is_balanced_and_deterministic():
    assert split_by_frames([5, 5, 5, 8], 2) == [[2, 3], [0, 1]]  # 13 and 10 frames
    assert split_by_frames([10, 1, 1, 1, 9], 2) == [[0, 2], [1, 3, 4]]
    assert split_by_frames([3, 2], 4) == [[0], [1], [], []]  # more ranks than sequences: some get none
    assert split_by_frames([7, 7, 7], 1) == [[0, 1, 2]]


@pytest.mark.timeout(240)
def test_two_ranks_give_the_single_rank_scores_and_predictions(setup, tmp_path):
    cfg_one = _cfg(_output(setup, "one"), setup["davis"])
    tracker = RecordingTracker()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, the same floating-point sums
    try:
        one = validate_checkpoint(cfg_one, _model_cfg(), _ref(Path(cfg_one.output_dir)), tracker, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert one["sequences"] == 4 and one["model_uri"] == f"models:/fake-{ITERATION}" and one["ranks"] == 1
    assert [c["iteration"] for c in tracker.calls] == [ITERATION] and tracker.calls[0]["device"] == "cpu"

    out = _output_with_checkpoint(setup, "two")
    r0, r1 = _spawn(2, out, setup["davis"])
    assert r0["error"] is None and r1["error"] is None
    weights = weights_file_for(cfg_one, _ref(out)).relative_to(cfg_one.output_dir)
    assert (out / weights).read_bytes() != b"" and sorted(p.name for p in (out / "weights").iterdir()) == [
        f"{TAG}.model.yaml", f"{TAG}.pt"]  # consolidated once, the raw file gone; the sidecar for the model
    assert torch.load(out / weights, weights_only=True).keys() == torch.load(setup["weights"], weights_only=True).keys()
    two = r0["record"]
    assert r1["record"] is None and r1["calls"] == []  # rank 1 neither logs nor returns a record
    assert len(r0["calls"]) == 1 and two["ranks"] == 2 and two["sequences"] == 4 and two["frames"] == one["frames"]
    for key in SCORE_KEYS:
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
        assert r0["calls"][0]["scores"][key] == pytest.approx(one[key], abs=1e-9)
    assert r0["calls"][0]["overlays"] == tracker.calls[0]["overlays"] and len(tracker.calls[0]["overlays"]) == 2
    # every sequence predicted, by one rank or the other, identically to one process
    pngs_one, pngs_two = _pngs(Path(cfg_one.output_dir)), _pngs(out)
    assert len(pngs_one) == 5 + 5 + 5 + 8 and pngs_two == pngs_one
    # rank 0 alone wrote validation.jsonl and the per-sequence CSV (all four sequences' objects)
    assert [r["tag"] for r in _jsonl(out)] == [TAG] and _jsonl(out)[0]["J&F-Mean"] == two["J&F-Mean"]
    csv_one = (Path(cfg_one.output_dir) / "val" / TAG / "per-sequence_results-val.csv").read_text()
    assert (out / "val" / TAG / "per-sequence_results-val.csv").read_text() == csv_one
    assert json.loads((out / "val" / TAG / "summary.json").read_text())["per_sequence"].keys() == {
        "seq0", "seq1", "seq2", "seq3"}

    # the engine of `python -m training.evaluate` on the whole split, in this process: the same numbers
    from training.evaluate import evaluate_network
    from training.validation import load_network

    torch.set_num_threads(1)
    try:
        ref = evaluate_network(load_network(_model_cfg(), setup["weights"]), setup["davis"], size=64, progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in SCORE_KEYS:
        assert ref[key] == pytest.approx(one[key], abs=1e-9), key


@pytest.mark.timeout(240)
def test_time_limit_skips_with_a_warning_and_every_rank_returns(setup):
    out = _output(setup, "limited")
    r0, r1 = _spawn(2, out, setup["davis"], time_limit=1e-4, timeout=90)  # 6 ms: no rank gets to a sequence
    rec = r0["record"]
    assert r0["error"] is None and r1["error"] is None and r1["record"] is None
    assert rec["tag"] == TAG and rec["iteration"] == ITERATION and rec["skipped"].startswith("time limit")
    assert rec["sequences_done"] == 0 and rec["sequences"] == 4 and "J&F-Mean" not in rec
    assert r0["calls"] == [] == r1["calls"]  # no scores, no model logged
    warnings = [m for m in r0["messages"] if m.startswith("WARNING")]
    assert len(warnings) == 1 and TAG in warnings[0] and "0.0001" in warnings[0] and "0 of 4" in warnings[0]
    assert not any(m.startswith("WARNING") for m in r1["messages"])
    assert _jsonl(out) == [rec]


@pytest.mark.timeout(240)
def test_an_error_on_one_rank_is_raised_on_every_rank(setup):
    out = _output(setup, "failing")
    r0, r1 = _spawn(2, out, setup["davis"], timeout=90, fail_rank=1)
    assert r1["error"] == "MemoryError: CUDA out of memory (injected)"
    assert r0["error"].startswith("RuntimeError") and "rank 1" in r0["error"] and "out of memory" in r0["error"]
    assert r0["calls"] == [] and not (out / "validation.jsonl").exists()


def test_time_limit_in_one_process(setup, caplog):
    out = _output(setup, "limited_one")
    cfg = _cfg(out, setup["davis"], time_limit=1e-9)
    tracker = RecordingTracker()
    with caplog.at_level(logging.WARNING, logger="training.validation"):
        rec = validate_checkpoint(cfg, _model_cfg(), _ref(out), tracker, progress=False)
    assert "skipped" in rec and tracker.calls == [] and _jsonl(out) == [rec]
    assert any(TAG in r.getMessage() and "0 of 4" in r.getMessage() for r in caplog.records)


def test_time_limit_reached_mid_split(setup, monkeypatch, caplog):
    """A limit passed while a sequence runs: that sequence finishes, no further one starts, the validation is
    skipped naming how many were done."""
    from training import evaluate

    real = evaluate.predict_sequence

    def slow(core, seq):
        result = real(core, seq)
        time.sleep(3.5)
        return result

    monkeypatch.setattr(evaluate, "predict_sequence", slow)
    out = _output(setup, "limited_mid")
    cfg = _cfg(out, setup["davis"], time_limit=3.0 / 60)  # 3 s from the call: the first sequence starts before
    tracker = RecordingTracker()
    with caplog.at_level(logging.WARNING, logger="training.validation"):
        rec = validate_checkpoint(cfg, _model_cfg(), _ref(out), tracker, progress=False)
    assert rec["sequences_done"] == 1 and rec["sequences"] == 4 and tracker.calls == []
    assert any("1 of 4" in r.getMessage() for r in caplog.records)
    assert len(_pngs(out)) == 5  # the finished sequence's predictions stay (seq0: 5 frames)
