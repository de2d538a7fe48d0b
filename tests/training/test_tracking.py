"""MLflow from the trainer's Tracker: one run with params and the resolved config, resumed by run id, and a
tracking server that disappears mid-run costs no metrics (kept locally, replayed when it is back)."""

from __future__ import annotations

import json
import socket
import time

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

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
    # as the shard job writes it (data_pipeline.shard): 7 clips in 2 shards, 1 input skipped
    per_shard = {"skip05/shard-000000.tar": 4, "skip10/shard-000000.tar": 3}
    (shards / "manifest.json").write_text(json.dumps({"config_hash": "abc123", "num_clips": 7, "num_shards": 2,
                                                      "clips_per_shard": per_shard, "num_skipped": 1,
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
    assert runs[0].data.params["data/num_clips"] == "7", \
        f"data/num_clips is {runs[0].data.params.get('data/num_clips')!r}, the manifest counts 7 clips (4 + 3)"
    assert {a.path for a in client.list_artifacts(t.run_id, "data")} == {"data/manifest.json",
                                                                         "data/skipped_samples.json"}
    assert exp.artifact_location.startswith("file://") and str(tmp_path) in exp.artifact_location


def _logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / tracking.LOGGED_MODELS).read_text().splitlines()]


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
    for it, jf in ((10, 0.41), (20, 0.73), (30, 0.58)):
        net = torch.nn.Linear(2, 2)
        weights = tmp_path / f"iter_{it:07d}.pt"
        torch.save(net.state_dict(), weights)
        scores = {"J&F-Mean": jf, "J-Mean": jf - 0.01, "F-Mean": jf + 0.01, "fps": 3.0}
        overlay = {"seq_00005": np.zeros((8, 8, 3), np.uint8)}
        assert t.log_checkpoint(net, it, scores, [str(weights)], overlay) is None  # queued, off the training path
    t.end()  # waits for the uploads
    uris = {r["iteration"]: r["model_uri"] for r in _logged(tmp_path)}
    assert sorted(uris) == [10, 20, 30] and all(u.startswith("models:/") for u in uris.values())
    assert not any((tmp_path / "uploads").iterdir())  # the staged files are gone once uploaded

    # Logged models that are not READY score better but are never chosen: one a killed upload left PENDING, one
    # whose upload failed (FAILED), as the upload thread leaves them (training.tracking._log_staged_model).
    client = MlflowClient(cfg.tracking.tracking_uri)
    not_ready = {}
    for it, jf, status in ((50, 0.99, "PENDING"), (60, 0.95, "FAILED")):
        model = client.create_logged_model(t.experiment_id, name=f"ckpt-iter{it:07d}", source_run_id=t.run_id,
                                           tags={"iteration": str(it)})
        client.log_batch(t.run_id, metrics=[Metric("val/JF", jf, int(time.time() * 1000), it,
                                                   model_id=model.model_id)])
        if status == "FAILED":
            client.finalize_logged_model(model.model_id, status)
        assert client.get_logged_model(model.model_id).status.name == status
        not_ready[model.model_id] = status
    exp_id = client.get_experiment_by_name("tracking-test").experiment_id
    ranked = [(round(score, 2), m.model_id) for score, m in select.rank_logged_models(mlflow, exp_id, "val/J&F")]
    picked = [not_ready[i] for _, i in ranked if i in not_ready]
    assert not picked, f"training.select ranks logged models that are not READY ({picked}): {ranked}"
    assert [s for s, _ in ranked] == [0.73, 0.58, 0.41]

    champ = select.select("tracking-test", "val/J&F", tracking_uri=cfg.tracking.tracking_uri)
    assert champ.model_id not in not_ready, f"a {not_ready.get(champ.model_id)} logged model became the champion"
    assert champ.iteration == 20 and champ.score == pytest.approx(0.73)
    assert champ.logged_model_uri == uris[20] and champ.alias_uri == "models:/tracking-test-champion@champion"
    version = client.get_model_version_by_alias("tracking-test-champion", "champion")
    assert str(version.version) == champ.version
    model = mlflow.get_logged_model(champ.model_id)
    keys = {(m.key, m.step) for m in model.metrics}
    assert {("val/JF", 20), ("val/J", 20), ("val/F", 20)} <= keys
    assert model.source_run_id == t.run_id
    history = client.get_metric_history(t.run_id, "val/JF")
    assert sorted((m.step, round(m.value, 2)) for m in history) == [(10, 0.41), (20, 0.73), (30, 0.58), (50, 0.99),
                                                                    (60, 0.95)]
    images = [a.path for a in client.list_artifacts(t.run_id, "images")]
    assert any("overlay" in p for p in images)  # mask overlays were logged as images
    # A second selection after a better checkpoint arrives moves the alias.
    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=t.run_id)
    t2.log_checkpoint(torch.nn.Linear(2, 2), 40, {"J&F-Mean": 0.9}, [])  # no file given: the network is saved
    t2.end()
    champ2 = select.select("tracking-test", tracking_uri=cfg.tracking.tracking_uri)
    assert champ2.iteration == 40 and champ2.version != champ.version and champ2.model_id not in not_ready
    assert str(client.get_model_version_by_alias("tracking-test-champion", "champion").version) == champ2.version


# ------------------------------------------------------------------------------ logged models off the training path

def _tiny_weights(folder, iteration):
    """A consolidated weights file of the `tiny` network and its .model.yaml sidecar, as validation writes them."""
    import torch

    import model
    from model.convert import offline_model_config, write_sidecar

    model_cfg = offline_model_config("tiny")
    weights = folder / f"iter_{iteration:07d}.pt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.build_network(model_cfg).state_dict(), weights)
    return weights, write_sidecar(weights, model_cfg)


def test_logged_model_holds_one_weight_copy_and_loads_outside_the_repo(cfg, tmp_path, monkeypatch):
    """The upload runs on the tracker's thread from hard links staged at log time: rotating OUTPUT/weights before
    it runs loses nothing. The model stores the state dict once and loads in a process started elsewhere."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import torch

    from training import checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    release = threading.Event()
    real = tracking._log_staged_model

    def held(*args):
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(tracking, "_log_staged_model", held)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    weights, sidecar = _tiny_weights(tmp_path / "weights", 8)
    expected = torch.load(weights, weights_only=True)
    assert t.log_checkpoint(None, 8, {"J&F-Mean": 0.5}, [str(weights), str(sidecar)]) is None
    _tiny_weights(tmp_path / "weights", 12)
    checkpoint.purge_weights(tmp_path / "weights", keep=1)  # rotation while the upload is still queued
    assert not weights.exists() and not sidecar.exists()
    release.set()
    t.end()
    (record,) = _logged(tmp_path)
    assert record["status"] == "READY" and record["iteration"] == 8
    model = mlflow.get_logged_model(record["model_id"])
    assert model.status.name == "READY" and model.tags["iteration"] == "8"
    assert {(m.key, m.step) for m in model.metrics} >= {("val/JF", 8)}

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=record["model_uri"], dst_path=str(tmp_path / "dl")))
    files = [p for p in local.rglob("*") if p.is_file()]
    pt = [p for p in files if p.suffix == ".pt"]
    assert len(pt) == 1 and pt[0].name == "iter_0000008.pt"  # one copy of the weights, nothing pickled
    assert sum(p.stat().st_size for p in files) < 1.1 * pt[0].stat().st_size
    assert not [p for p in files if p.suffix in (".pkl", ".pth")]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys, torch, mlflow\n"
              "from training.logged_model import load_logged_model\n"
              "net = load_logged_model(sys.argv[1], tracking_uri=sys.argv[2])\n"
              "torch.save(net.state_dict(), 'via_loader.pt')\n"
              "raw = mlflow.pyfunc.load_model(sys.argv[1]).get_raw_model()\n"
              "torch.save(raw.state_dict(), 'via_pyfunc.pt')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", script, record["model_uri"], cfg.tracking.tracking_uri],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pickle" not in proc.stderr.lower()
    for name in ("via_loader.pt", "via_pyfunc.pt"):
        got = torch.load(elsewhere / name, weights_only=True)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), name


def test_failed_upload_is_retried_then_recorded_and_never_stops_training(cfg, tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "UPLOAD_BACKOFF_SECONDS", 0.0)
    cfg.tracking.upload_retries = 2
    calls = {}
    real = tracking._log_staged_model

    def flaky(mlflow_, job, overlays):
        calls[job["iteration"]] = calls.get(job["iteration"], 0) + 1
        if job["iteration"] == 10 or calls[job["iteration"]] == 1:  # iteration 10 always fails, 20 fails once
            raise ConnectionError("artifact store unreachable")
        return real(mlflow_, job, overlays)

    monkeypatch.setattr(tracking, "_log_staged_model", flaky)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    for it, jf in ((10, 0.4), (20, 0.6)):
        weights = tmp_path / f"iter_{it:07d}.pt"
        torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
        t.log_checkpoint(None, it, {"J&F-Mean": jf}, [str(weights)])
    with caplog.at_level("WARNING", logger="training.tracking"):
        assert t.wait_for_uploads(120)
    t.log_metrics({"train/loss": 1.0}, step=21)  # the failed checkpoint's score reaches the run
    t.end()
    assert calls == {10: 3, 20: 2}  # 1 + upload_retries attempts
    assert any("iteration 10 was NOT logged" in r.getMessage() for r in caplog.records)
    records = {r["iteration"]: r for r in _logged(tmp_path)}
    assert records[10]["status"] == "FAILED" and "unreachable" in records[10]["error"]
    assert records[20]["status"] == "READY" and records[20]["attempts"] == 2
    # the failed checkpoint's scores were kept, then reached the run: nothing is pending any more
    assert not (tmp_path / "mlflow_pending.jsonl").exists()
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "val/JF")) == [(10, 0.4), (20, 0.6)]
    failed = mlflow.get_logged_model(records[10]["model_id"]) if records[10]["model_id"] else None
    assert failed is None or failed.status.name == "FAILED"  # never picked by training.select


def test_tracker_leaves_the_users_mlflow_settings_alone(cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    t.end()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "600"  # the user's value wins
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # quiet by default


def test_upload_left_staged_by_a_killed_job_resumes_at_relaunch(cfg, tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    weights = tmp_path / "iter_0000006.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    # What log_checkpoint leaves when the job is SIGKILLed before its upload thread ran.
    tracking._stage(tmp_path / tracking.UPLOADS, 6, [str(weights)], None, {"val/JF": 0.3}, t.run_id, t.experiment_id)
    mlflow.end_run("KILLED")

    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=t.run_id)
    t2.end()
    (record,) = _logged(tmp_path)
    assert record["iteration"] == 6 and record["status"] == "READY"
    model = mlflow.get_logged_model(record["model_id"])
    assert model.source_run_id == t.run_id and ("val/JF", 6) in {(m.key, m.step) for m in model.metrics}


def test_a_stopped_run_ends_after_a_short_upload_wait_and_the_relaunch_finishes_the_upload(cfg, tmp_path,
                                                                                              monkeypatch):
    """A job stopped before a scheduler's time limit must not sit out the hour a finished run waits for its uploads:
    it ends KILLED after `STOPPED_UPLOAD_WAIT_SECONDS`, the upload stays staged, and the relaunch logs it."""
    import threading
    import time

    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "STOPPED_UPLOAD_WAIT_SECONDS", 0.5)
    release = threading.Event()
    real = tracking._log_staged_model

    def hung(*args):  # the artifact store does not answer while the first job is up
        release.wait(120)
        raise ConnectionError("artifact store did not answer")

    monkeypatch.setattr(tracking, "_log_staged_model", hung)
    cfg.tracking.upload_retries = 0
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    weights = tmp_path / "iter_0000004.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    t.log_checkpoint(None, 4, {"J&F-Mean": 0.5}, [str(weights)])
    start = time.monotonic()
    t.end("KILLED")
    assert time.monotonic() - start < 30  # not UPLOAD_WAIT_SECONDS
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(t.run_id).info.status == "KILLED"
    assert [p for p in (tmp_path / tracking.UPLOADS).iterdir()]  # still staged

    # The process exits in a real stop (the daemon upload thread dies with it); here: a job that never finishes.
    monkeypatch.setattr(tracking, "_log_staged_model", real)
    t2 = tracking.Tracker(cfg, rank=0, resume_run_id=t.run_id)
    t2.end()
    (record,) = [r for r in _logged(tmp_path) if r["status"] == "READY"]
    assert record["iteration"] == 4
    release.set()


def test_a_failure_while_the_run_ends_does_not_say_training_goes_on(cfg, monkeypatch, caplog):
    """Mid-run a failed MLflow call lets training go on; once end() has begun (the job is finishing, stopping or
    dying, e.g. on a full disk) it must not claim that."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    t = tracking.Tracker(cfg, rank=0, resume_run_id=None)
    good_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{_closed_port()}")
    try:
        with caplog.at_level("WARNING", logger="training.tracking"):
            t.end("FAILED")
    finally:
        mlflow.set_tracking_uri(good_uri)
    warnings = [r.getMessage() for r in caplog.records if "MLflow call" in r.getMessage()]
    assert warnings and "the job is ending: this MLflow run may not show its final status" in warnings[0]
    assert not any("training goes on" in w for w in warnings), warnings
