"""`python -m training.select` for an operator: a tracking server that is down fails in seconds with one line,
selecting again registers nothing unless the best model changed, and training experiments carry the experiment
kind that makes the MLflow UI show them as model training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from training import select, tracking

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_one_line():
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "training.select", "--experiment", "x"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=20)  # MLflow's own retries: about 4 minutes
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], proc.stderr[-2000:]
    assert "not reachable" in lines[0] and "refused" in lines[0]
    assert proc.stdout == ""
    assert elapsed < 20


def _log_model(client, exp_id: str, run_id: str, iteration: int, jf: float, status: str = "READY") -> str:
    """A LoggedModel with its val metrics, as the trainer's upload thread makes one (training.tracking): READY, or
    FAILED (an upload that kept failing), or PENDING (never finalized: the job was killed mid-upload)."""
    model = client.create_logged_model(exp_id, name=f"ckpt-iter{iteration:07d}", source_run_id=run_id,
                                       tags={"iteration": str(iteration)})
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("val/JF", jf, ts, iteration, model_id=model.model_id),
                                      Metric("val/J", jf - 0.01, ts, iteration, model_id=model.model_id)])
    if status != "PENDING":
        client.finalize_logged_model(model.model_id, status)
    assert client.get_logged_model(model.model_id).status.name == status
    return model.model_id


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def _select(capsys, uri: str, *extra: str) -> tuple[int, str, str]:
    rc = select.main(["--experiment", "sel", "--tracking-uri", uri, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_selecting_again_is_idempotent_and_a_better_model_moves_the_alias(db, tmp_path, capsys):
    client = MlflowClient(db)
    exp_id = tracking.get_or_create_experiment(mlflow, "sel", tmp_path / "mlartifacts")
    run_id = client.create_run(exp_id).info.run_id
    _log_model(client, exp_id, run_id, 100, 0.41)
    best = _log_model(client, exp_id, run_id, 200, 0.73)
    _log_model(client, exp_id, run_id, 300, 0.58)
    pending = _log_model(client, exp_id, run_id, 500, 0.99, status="PENDING")  # better scores, not READY
    failed = _log_model(client, exp_id, run_id, 600, 0.95, status="FAILED")

    rc, out, _ = _select(capsys, db)
    assert rc == 0 and out.splitlines()[-1] == "models:/sel-champion@champion"
    assert pending not in out and failed not in out, f"a logged model that is not READY was chosen: {out}"
    assert f"models:/{best}" in out and "iteration 200" in out
    assert len(client.search_model_versions("name='sel-champion'")) == 1

    rc, out, _ = _select(capsys, db, "--json")  # again, nothing changed: nothing registered
    assert rc == 0
    assert len(client.search_model_versions("name='sel-champion'")) == 1
    champ = json.loads(out)
    assert champ["already"] is True and champ["registered"] is False and champ["version"] == "1"
    assert champ["model_id"] == best and champ["iteration"] == 200
    rc, out, _ = _select(capsys, db)
    assert rc == 0 and "already points at version 1" in out and "nothing registered" in out
    assert len(client.search_model_versions("name='sel-champion'")) == 1

    better = _log_model(client, exp_id, run_id, 400, 0.9)  # a better checkpoint arrives
    rc, out, _ = _select(capsys, db)
    assert rc == 0 and "moved from version 1 to registered version 2" in out and f"models:/{better}" in out
    assert pending not in out and failed not in out
    assert len(client.search_model_versions("name='sel-champion'")) == 2
    assert client.get_model_version_by_alias("sel-champion", "champion").source == f"models:/{better}"
    rc, out, _ = _select(capsys, db)
    assert rc == 0 and "already points at version 2" in out
    assert len(client.search_model_versions("name='sel-champion'")) == 2

    client.set_registered_model_alias("sel-champion", "champion", "1")  # moved back by hand: version 2 is reused
    rc, out, _ = _select(capsys, db)
    assert rc == 0 and "moved from version 1 to existing version 2" in out
    assert len(client.search_model_versions("name='sel-champion'")) == 2

    # usage errors: exit code 2, one line
    rc, out, err = _select(capsys, db, "--metric", "val/nothing")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "val/nothing" in err
    rc = select.main(["--experiment", "no-such", "--tracking-uri", db])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "'no-such' not found" in err


def test_training_experiments_are_tagged_model_training(db, tmp_path):
    client = MlflowClient(db)
    exp_id = tracking.get_or_create_experiment(mlflow, "new", tmp_path / "a")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"

    old = client.create_experiment("old")  # made by an earlier trainer: no kind, tagged when reused
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.get_or_create_experiment(mlflow, "old", tmp_path / "b") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"

    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.get_or_create_experiment(mlflow, "chosen", None)  # a kind set by the user is kept
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"

    untagged = client.create_experiment("sel")  # an old database: select tags it too
    run_id = client.create_run(untagged).info.run_id
    _log_model(client, untagged, run_id, 10, 0.5)
    assert select.select("sel", tracking_uri=db).iteration == 10
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
