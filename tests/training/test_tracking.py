"""MLflow from the trainer's Tracker: one run with params and the resolved config, resumed by run id, and a
tracking server that disappears mid-run costs no metrics (kept locally, replayed when it is back)."""

from __future__ import annotations

import json
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
    shards = tmp_path / "shards"
    shards.mkdir()
    skipped = [{"file": "MOSE/train/JPEGImages/v1/00003.jpg", "reason": "truncated JPEG", "key": "mose__v1__0"}]
    (shards / "manifest.json").write_text(json.dumps({"config_hash": "abc123", "num_clips": 7, "num_skipped": 1,
                                                      "skipped": skipped}))
    c.data.shards = str(shards)
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
    # the data it trained on: shard manifest, its hash and the samples the shard job skipped
    assert runs[0].data.params["data/config_hash"] == "abc123" and runs[0].data.metrics["data/skipped_samples"] == 1
    assert {a.path for a in client.list_artifacts(t.run_id, "data")} == {"data/manifest.json",
                                                                         "data/skipped_samples.json"}
    assert exp.artifact_location.startswith("file://") and str(tmp_path) in exp.artifact_location


def test_metric_names():
    assert tracking.metric_key("val/J&F") == "val/JF"
    assert tracking.VAL_METRICS["J&F-Mean"] == "val/JF"


def test_logged_checkpoints_ranked_and_champion_selected(cfg, tmp_path, monkeypatch):
    """Each validated checkpoint is an MLflow 3 LoggedModel (step = iteration) carrying its val J&F/J/F;
    training.select registers the best one and points the alias `champion` at it."""
    import numpy as np
    import torch

    from training import select

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    weights = tmp_path / "w.pt"
    uris = {}
    for it, jf in ((10, 0.41), (20, 0.73), (30, 0.58)):
        net = torch.nn.Linear(2, 2)
        torch.save(net.state_dict(), weights)
        scores = {"J&F-Mean": jf, "J-Mean": jf - 0.01, "F-Mean": jf + 0.01, "fps": 3.0}
        overlay = {"seq_00005": np.zeros((8, 8, 3), np.uint8)}
        uris[it] = t.log_checkpoint(net, it, scores, [str(weights)], overlay)
    t.end()
    assert all(u and u.startswith("models:/") for u in uris.values())

    champ = select.select("tracking-test", "val/J&F", tracking_uri=cfg.tracking.tracking_uri)
    assert champ.iteration == 20 and champ.score == pytest.approx(0.73)
    assert champ.logged_model_uri == uris[20] and champ.alias_uri == "models:/tracking-test-champion@champion"
    client = MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias("tracking-test-champion", "champion")
    assert str(version.version) == champ.version
    model = mlflow.get_logged_model(champ.model_id)
    keys = {(m.key, m.step) for m in model.metrics}
    assert {("val/JF", 20), ("val/J", 20), ("val/F", 20)} <= keys
    assert model.source_run_id == t.run_id
    history = client.get_metric_history(t.run_id, "val/JF")
    assert sorted((m.step, round(m.value, 2)) for m in history) == [(10, 0.41), (20, 0.73), (30, 0.58)]
    images = [a.path for a in client.list_artifacts(t.run_id, "images")]
    assert any("overlay" in p for p in images)  # mask overlays were logged as images
    # A second selection after a better checkpoint arrives moves the alias.
    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=t.run_id)
    t2.log_checkpoint(torch.nn.Linear(2, 2), 40, {"J&F-Mean": 0.9}, [str(weights)])
    t2.end()
    champ2 = select.select("tracking-test", tracking_uri=cfg.tracking.tracking_uri)
    assert champ2.iteration == 40 and champ2.version != champ.version
    assert str(client.get_model_version_by_alias("tracking-test-champion", "champion").version) == champ2.version
