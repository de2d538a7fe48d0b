"""The tracker's outage buffer (training.tracking, docs/reliability.md item 7): metrics logged while the MLflow
server is down are kept in memory and appended to OUTPUT/mlflow_pending.jsonl, then replayed with their original
steps and timestamps by the next call that reaches the server, or by `end()` when the server is back only then;
when it never comes back they stay in mlflow_pending.jsonl, and training never stops.

The tracker runs against a real MLflow store (SQLite); the server "goes away" by pointing MLflow at a closed
127.0.0.1 port and "comes back" by pointing it at the store again, as tests/training/test_tracking.py does (a real
`mlflow server` killed and restarted around a training job: tests/fault::test_tracking_server_down_mid_run)."""

from __future__ import annotations

import json
import socket
import time

import mlflow
import pytest
from mlflow import MlflowClient

from training import tracking
from training.config import TrainConfig

PENDING = "mlflow_pending.jsonl"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own runs."""
    return f"sqlite:///{tmp_path_factory.mktemp('pending-store') / 'mlflow.db'}"


@pytest.fixture
def cfg(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    c = TrainConfig(output_dir=str(tmp_path))
    c.tracking.experiment = "pending-test"
    c.tracking.system_metrics = False
    c.tracking.tracking_uri = store
    c.data.shards = str(tmp_path / "no-shards")  # no manifest: only a warning
    yield c
    mlflow.set_tracking_uri(c.tracking.tracking_uri)
    if mlflow.active_run() is not None:  # a test that failed half-way
        mlflow.end_run("KILLED")


class _Server:
    """Makes the tracker's MLflow calls fail (a closed port) and succeed again (the store)."""

    def __init__(self, uri: str):
        self.uri, self.down_uri = uri, f"http://127.0.0.1:{_closed_port()}"

    def down(self) -> None:
        mlflow.set_tracking_uri(self.down_uri)

    def up(self) -> None:
        mlflow.set_tracking_uri(self.uri)


def _pending(out) -> list[dict]:
    path = out / PENDING
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, round(m.value, 6), m.timestamp) for m in client.get_metric_history(run_id, key))


def test_metrics_kept_during_an_outage_are_replayed_exactly_when_the_server_is_back(cfg, tmp_path, monkeypatch,
                                                                                 caplog):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)  # every call tries the server
    server = _Server(cfg.tracking.tracking_uri)
    client = MlflowClient(cfg.tracking.tracking_uri)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    t.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=1)

    server.down()
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.tracking"):
        t.log_metrics({"train/loss": 0.9, "train/lr": 0.09}, step=2)
        t.log_metrics({"train/loss": 0.8}, step=3)
    kept = _pending(tmp_path)
    assert [(r["step"], r["metrics"]) for r in kept] == [(2, {"train/loss": 0.9, "train/lr": 0.09}),
                                                          (3, {"train/loss": 0.8})], \
        f"the values logged while the server was down are not (all) in {PENDING}: {kept}"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "training goes on, metrics are kept locally" in warnings[0], warnings
    server.up()
    assert [m.step for m in client.get_metric_history(t.run_id, "train/loss")] == [1]  # not in the run yet

    with caplog.at_level("WARNING", logger="training.tracking"):
        t.log_metrics({"train/loss": 0.7}, step=4)  # the first call that reaches the server replays first
    # in the run before end(): each value once, at its own step, with the timestamp it was logged at
    loss, lr = _history(client, t.run_id, "train/loss"), _history(client, t.run_id, "train/lr")
    assert [(s, v) for s, v, _ in loss] == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)], \
        f"the metrics kept during the outage were not replayed when the server came back: {loss}"
    assert [(s, v) for s, v, _ in lr] == [(1, 0.1), (2, 0.09)]
    assert any("MLflow is back after" in r.getMessage() and "replayed 3 buffered metric values" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert [ts for s, _, ts in loss if s in (2, 3)] == [kept[0]["timestamp"], kept[1]["timestamp"]], \
        f"the replayed values lost the timestamps they were logged at: {loss} vs {kept}"
    assert [ts for s, _, ts in lr if s == 2] == [kept[0]["timestamp"]]
    (replayed,) = client.get_metric_history(t.run_id, "tracking/replayed_metrics")
    assert (replayed.step, replayed.value) == (3, 3.0)  # 3 values, logged at the last replayed step
    (gap,) = client.get_metric_history(t.run_id, "tracking/gap_seconds")
    assert gap.step == 3 and gap.value > 0

    t.end()
    assert [(s, v) for s, v, _ in _history(client, t.run_id, "train/loss")] == [(1, 1.0), (2, 0.9), (3, 0.8),
                                                                                (4, 0.7)]  # not replayed twice
    assert client.get_run(t.run_id).info.status == "FINISHED"


def test_an_outage_until_the_end_is_replayed_by_end_or_stays_in_the_pending_file(cfg, tmp_path, monkeypatch,
                                                                                 caplog):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 3600.0)  # once down, no call tries the server before end()
    server = _Server(cfg.tracking.tracking_uri)
    client = MlflowClient(cfg.tracking.tracking_uri)

    # 1. The server is back only when the run ends: end() replays everything it kept, then ends the run.
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    t.log_metrics({"train/loss": 1.0}, step=1)
    server.down()
    t.log_metrics({"train/loss": 0.9}, step=2)
    server.up()
    t.log_metrics({"train/loss": 0.8, "train/grad_norm": 2.5}, step=3)  # kept: no retry within RETRY_SECONDS
    kept = _pending(tmp_path)
    assert [(r["step"], r["metrics"]) for r in kept] == [(2, {"train/loss": 0.9}),
                                                          (3, {"train/loss": 0.8, "train/grad_norm": 2.5})]
    assert [m.step for m in client.get_metric_history(t.run_id, "train/loss")] == [1]
    t.end()
    loss = _history(client, t.run_id, "train/loss")
    assert [(s, v) for s, v, _ in loss] == [(1, 1.0), (2, 0.9), (3, 0.8)], \
        f"end() did not replay the metrics kept while the server was down: {loss}"
    assert [ts for s, _, ts in loss if s > 1] == [r["timestamp"] for r in kept], \
        f"the values end() replayed lost the timestamps they were logged at: {loss} vs {kept}"
    assert [(s, v) for s, v, _ in _history(client, t.run_id, "train/grad_norm")] == [(3, 2.5)]
    assert client.get_metric_history(t.run_id, "tracking/replayed_metrics")[0].value == 3
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert not (tmp_path / PENDING).exists(), f"{PENDING} still lists values that reached MLflow: {_pending(tmp_path)}"

    # 2. The server never comes back: end() returns (training is not stopped), the run keeps what it had and
    # OUTPUT/mlflow_pending.jsonl holds every value logged since, with its step and timestamp.
    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    t2.log_metrics({"train/loss": 0.7}, step=4)
    server.down()
    t2.log_metrics({"train/loss": 0.6, "train/lr": 0.01}, step=5)
    t2.log_metrics({"train/loss": 0.5}, step=6)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="training.tracking"):
        t2.end()  # no exception
    assert time.monotonic() - start < 60
    server.up()
    kept = _pending(tmp_path)
    assert [(r["step"], r["metrics"]) for r in kept] == [(5, {"train/loss": 0.6, "train/lr": 0.01}),
                                                          (6, {"train/loss": 0.5})], \
        f"the values logged after the server went away are not all in {PENDING}: {kept}"
    assert all(isinstance(r["timestamp"], int) and r["timestamp"] > 0 for r in kept)
    assert [(s, v) for s, v, _ in _history(client, t2.run_id, "train/loss")] == [(4, 0.7)]
    assert client.get_metric_history(t2.run_id, "train/lr") == []
    assert client.get_run(t2.run_id).info.status == "RUNNING"  # end_run could not reach the server either
    assert mlflow.active_run() is None
    assert (f"3 metric values (steps 5-6) could not reach MLflow; they stay in {tmp_path / PENDING} and are "
            f"replayed when a job resumes this run from {tmp_path}") in [r.getMessage() for r in caplog.records]

    # 3. A job that resumes the run replays what the last one could not send, once, with its steps and timestamps
    with open(tmp_path / PENDING, "a") as f:
        f.write('{"metrics": {"train/loss": 0.4}, "st')  # the previous job was killed while writing a line
    t3 = tracking.Tracker(cfg, rank=0, resume_run_id=t2.run_id)
    t3.log_metrics({"train/loss": 0.3}, step=7)
    t3.end()
    loss = _history(client, t2.run_id, "train/loss")
    assert [(s, v) for s, v, _ in loss] == [(4, 0.7), (5, 0.6), (6, 0.5), (7, 0.3)], \
        f"the resumed job did not replay what the previous one left in {PENDING}: {loss}"
    assert [ts for s, _, ts in loss if s in (5, 6)] == [r["timestamp"] for r in kept]
    assert [(s, v) for s, v, _ in _history(client, t2.run_id, "train/lr")] == [(5, 0.01)]
    assert client.get_run(t2.run_id).info.status == "FINISHED"
    assert not (tmp_path / PENDING).exists()
