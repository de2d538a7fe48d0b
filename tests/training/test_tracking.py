"""MLflow from the trainer's Tracker: one run with params and the resolved config, resumed by run id, and a
tracking server that disappears mid-run costs no metrics (kept locally, replayed when it is back)."""

from __future__ import annotations

import socket

import mlflow
import pytest
from mlflow import MlflowClient

from training import tracking
from training.config import TrainConfig


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path):
    c = TrainConfig(output_dir=str(tmp_path))
    c.tracking.experiment = "tracking-test"
    c.tracking.system_metrics = False
    c.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return c


def test_one_run_params_resume_and_outage(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    assert tracking.Tracker(cfg, rank=1, resume_run_id=None).run_id is None  # other ranks: no run at all
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    t.log_metrics({"train/loss": 1.0}, step=1)

    good_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{_closed_port()}")  # the server goes away
    t.log_metrics({"train/loss": 0.9}, step=2)
    t.log_metrics({"train/loss": 0.8}, step=3)
    assert (tmp_path / "mlflow_pending.jsonl").read_text().count("\n") == 2
    mlflow.set_tracking_uri(good_uri)  # ... and comes back
    t.log_metrics({"train/loss": 0.7}, step=4)
    t.end()

    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=t.run_id)  # a resumed job continues the same run
    t2.log_metrics({"train/loss": 0.6}, step=5)
    t2.end()

    client = MlflowClient(good_uri)
    exp = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == t.run_id
    assert runs[0].data.params["optim.lr"] == "5e-05" and runs[0].data.params["train.global_batch"] == "16"
    history = client.get_metric_history(t.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert client.get_metric_history(t.run_id, "tracking/replayed_metrics")[0].value == 2
    assert any(a.path == "config" for a in client.list_artifacts(t.run_id))
    assert exp.artifact_location.startswith("file://") and str(tmp_path) in exp.artifact_location


def test_metric_names():
    assert tracking.metric_key("val/J&F") == "val/JF"
    assert tracking.VAL_METRICS["J&F-Mean"] == "val/JF"
