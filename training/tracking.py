"""MLflow tracking from global rank 0 only: one run per job however many ranks, resumed jobs continue the same run,
and a tracking server that goes away mid-run never stops training.

When a call fails, metrics are kept in memory and appended to OUTPUT/mlflow_pending.jsonl; the next successful
call replays them with their original steps and timestamps and logs the outage as `tracking/gap_seconds` and
`tracking/replayed_metrics` (a retry is attempted at most every `RETRY_SECONDS`). The file holds exactly what has
not reached MLflow yet: `end()` tries once more and warns with the count and the file when some remain, and a job
that resumes the run (same output folder) replays them first.

Validated checkpoints become MLflow 3 LoggedModels off the training path: `log_checkpoint` stages hard links
of the consolidated weights and their config in OUTPUT/uploads/<tag>-<ms>/ and returns; one background thread
uploads them in order (step = iteration, tag `iteration`, the val metrics on the model and the run, mask
overlays), retrying `tracking.upload_retries` times with a doubling back-off. Each finished upload appends
{"iteration", "tag", "status", "model_uri", "model_id"} to OUTPUT/logged_models.jsonl; one that still fails is
logged as a WARNING naming the iteration, recorded there with status FAILED, and its val metrics still reach
the run. `end()` waits
for the queue (at most `UPLOAD_WAIT_SECONDS`); uploads a killed job left staged resume at the next launch.
The model stores the weights once (training.logged_model: format and loader). Timeouts and retries of each HTTP
request are MLflow's own variables (`DEFAULT_ENV`), set only where the user has not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0
UPLOADS = "uploads"  # OUTPUT/uploads/<tag>-<ms>/: the files of a logged model until its upload is done
JOB_FILE = "job.json"
PENDING = "mlflow_pending.jsonl"  # OUTPUT/mlflow_pending.jsonl: the metric records MLflow has not received yet
LOGGED_MODELS = "logged_models.jsonl"  # OUTPUT/logged_models.jsonl: one line per finished (or failed) upload
UPLOAD_BACKOFF_SECONDS = 10.0  # first retry delay of an upload; doubled each retry
UPLOAD_BACKOFF_MAX_SECONDS = 300.0
UPLOAD_WAIT_SECONDS = 3600.0  # Tracker.end waits at most this long for queued uploads when the run finished
STOPPED_UPLOAD_WAIT_SECONDS = 60.0  # ... and this long when it was stopped or failed (a scheduler's grace is short)
# Set with os.environ.setdefault when the tracker starts, so a value the user exports wins. The HTTP ones apply to
# every request MLflow makes, metric calls on the training path and each artifact upload request alike: raise
# MLFLOW_HTTP_REQUEST_TIMEOUT for a slow artifact store (large uploads: MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD).
DEFAULT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
FAILED = object()  # what a tracking call returns when MLflow raised
# MLflow's name rules forbid "&": the UI/CLI name "val/J&F" is stored as "val/JF".
VAL_METRICS = {"J&F-Mean": "val/JF", "J-Mean": "val/J", "F-Mean": "val/F", "J-Recall": "val/J_recall",
               "F-Recall": "val/F_recall", "J-Decay": "val/J_decay", "F-Decay": "val/F_decay"}


def metric_key(name: str) -> str:
    """User-facing metric name → MLflow key ("val/J&F" → "val/JF")."""
    return name.replace("&", "")


def default_tracking_uri(output_dir: str) -> str:
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def resolve_tracking_uri(config_uri: str, output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config_uri or default_tracking_uri(output_dir)


# The experiment tag MLflow 3 reads for an experiment's kind (its UI's values: "custom_model_development",
# "genai_development", their "*_inferred" variants, "no_inferred_type", "finetuning", "forecasting",
# "classification", "regression", "automl"): a training experiment is "custom_model_development" ("Machine
# learning"), so MLflow UIs that follow the tag open it in the model-training view (runs, logged models with their
# metrics) instead of the GenAI view (checkpoints as "agent versions" without scores). The UI of MLflow 3.17 picks
# the view from its sidebar switch "GenAI | Model training" (or `?workflowType=machine_learning`) instead.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tag_experiment_kind(client, exp) -> bool:
    """Tag an existing experiment as model training unless it has a kind already (a user's choice wins); True when
    tagged. Best effort: a failure (no permission) is logged, never raised."""
    if (exp.tags or {}).get(EXPERIMENT_KIND_TAG):
        return False
    try:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as e:  # noqa: BLE001 (the tag only steers the UI)
        log.warning("could not tag experiment %s with %s=%s (%s)", exp.name, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND, e)
        return False
    return True


def get_or_create_experiment(mlflow, name: str, artifact_root: Path | None) -> str:
    """The experiment's id; created tagged `mlflow.experimentKind=custom_model_development`, an existing one
    without a kind gets the tag."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        tag_experiment_kind(mlflow.MlflowClient(), exp)
        return exp.experiment_id
    # An absolute artifact location: the default ("./mlruns") depends on the working directory.
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


class Tracker:
    """Rank-0 MLflow run. On other ranks every method is a no-op, so callers need no rank checks."""

    def __init__(self, cfg, rank: int, resume_run_id: str | None):
        self.enabled = rank == 0
        self.run_id: str | None = None
        self._pending: list[dict[str, Any]] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self._ending = False  # set by end(): failures then end the job, they do not let training go on
        self._lock = threading.Lock()  # the buffered metrics and OUTPUT/*.jsonl: shared with the upload thread
        self.out = Path(cfg.output_dir)
        self.upload_retries = cfg.tracking.upload_retries
        if not self.enabled:
            return
        # MLflow's own variables, only where the user has not set them (theirs win): fail fast against a server
        # that is down (MLflow otherwise retries for minutes per call); no progress bar per artifact download.
        for name, value in DEFAULT_ENV.items():
            os.environ.setdefault(name, value)
        import mlflow

        self.mlflow = mlflow
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
        mlflow.set_tracking_uri(uri)
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        exp_id = get_or_create_experiment(mlflow, cfg.tracking.experiment, self.out / "mlartifacts" if local else None)
        if cfg.tracking.system_metrics:
            mlflow.system_metrics.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval)
        kwargs = dict(log_system_metrics=cfg.tracking.system_metrics)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, **kwargs)
            log.info("continuing MLflow run %s", resume_run_id)
            self._pending = self._read_pending()  # what the previous job could not send: replayed first
        else:
            run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.tracking.run_name or None, **kwargs)
            params = {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in cfg.flat().items()}
            params["config_hash"] = cfg.hash()
            items = list(params.items())
            for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i:i + 90]))
            mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")
            self._log_shard_manifest(mlflow, cfg.data.shards)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.tracking_uri = uri
        self._uploads = _UploadQueue(self._upload)
        self._resume_staged_uploads()

    @staticmethod
    def _log_shard_manifest(mlflow, shards: str) -> None:
        """The data the run trains on: the shard job's manifest (config hash, clip counts, skipped samples), from
        the shard folder or the remote root (s3://, gs://, https://, pipe:)."""
        from data_pipeline import storage

        store = storage.Store(shards)
        try:
            manifest = store.read_json("manifest.json")
        except FileNotFoundError:
            log.warning("no shard manifest at %s: the run's data provenance is not logged", store.url("manifest.json"))
            return
        mlflow.log_dict(manifest, "data/manifest.json")
        mlflow.log_params({"data/config_hash": manifest.get("config_hash", ""),
                           "data/num_clips": manifest.get("num_clips", -1)})
        skipped = manifest.get("skipped", [])
        mlflow.log_metric("data/skipped_samples", float(manifest.get("num_skipped", len(skipped))), step=0)
        if skipped:
            mlflow.log_dict({"skipped": skipped}, "data/skipped_samples.json")

    # ---------------------------------------------------------------------------------- robust calls

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """Run one MLflow call; on failure remember that the server is down and return FAILED."""
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (any tracking failure must leave training running)
            if self._down_since is None:
                self._down_since = time.time()
                then = ("the job is ending: this MLflow run may not show its final status" if self._ending
                        else "training goes on, metrics are kept locally")
                log.warning("MLflow call %s failed (%s); %s", what, e, then)
            self._last_try = time.time()
            return FAILED
        return result

    def _server_may_be_back(self) -> bool:
        return self._down_since is None or time.time() - self._last_try >= RETRY_SECONDS

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "timestamp": int(time.time() * 1000)}
        if not self._server_may_be_back():
            self._keep(record)
            return
        if self._pending and not self._replay():
            self._keep(record)
            return
        if self._call("log_metrics", self.mlflow.log_metrics, record["metrics"], step=step) is FAILED:
            self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append(record)
            with open(self.out / PENDING, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _replay(self) -> bool:
        from mlflow.entities import Metric

        with self._lock:
            records = list(self._pending)
        metrics = [Metric(k, v, r["timestamp"], r["step"]) for r in records for k, v in r["metrics"].items()]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(metrics), 900):
            if self._call("log_batch", client.log_batch, self.run_id, metrics=metrics[i:i + 900]) is FAILED:
                return False
        last_step = records[-1]["step"]
        with self._lock:
            del self._pending[:len(records)]
            self._write_pending()
        if self._down_since is None:  # no outage on this thread: a failed model upload's scores, a previous job's
            log.info("logged %d buffered metric values (kept while MLflow could not be reached: an earlier outage "
                     "or a failed model upload)", len(metrics))
            return True
        gap = time.time() - self._down_since
        log.warning("MLflow is back after %.0f s; replayed %d buffered metric values", gap, len(metrics))
        self._down_since = None
        self._call("log_gap", self.mlflow.log_metrics,
                   {"tracking/gap_seconds": gap, "tracking/replayed_metrics": len(metrics)}, step=last_step)
        return True

    def _write_pending(self) -> None:
        """OUTPUT/mlflow_pending.jsonl holds exactly what has not reached MLflow yet (caller holds the lock)."""
        path = self.out / PENDING
        if not self._pending:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self._pending))
        os.replace(tmp, path)

    def _read_pending(self) -> list[dict[str, Any]]:
        """The records a previous job of this run left in OUTPUT/mlflow_pending.jsonl (a line it was killed
        while writing is skipped, with a warning naming it)."""
        path = self.out / PENDING
        if not path.is_file():
            return []
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
                records.append({"metrics": {k: float(v) for k, v in r["metrics"].items()}, "step": int(r["step"]),
                                "timestamp": int(r["timestamp"])})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("%s:%d: unreadable buffered metric record skipped (%s)", path, n, e)
        if records:
            log.info("%d metric records the previous job could not send to MLflow (%s) are replayed first",
                     len(records), path)
        return records

    def flush(self) -> None:
        if self.enabled and self._pending:
            self._replay()
        if self.enabled and self._pending:
            values = sum(len(r["metrics"]) for r in self._pending)
            log.warning("%d metric values (steps %d-%d) could not reach MLflow; they stay in %s and are replayed "
                        "when a job resumes this run from %s", values, self._pending[0]["step"],
                        self._pending[-1]["step"], self.out / PENDING, self.out)

    # ---------------------------------------------------------------------------------- checkpoints

    def log_checkpoint(self, network, iteration: int, scores: dict[str, float], extra_files: list[str],
                       overlays: dict[str, Any] | None = None) -> None:
        """Queue a validated checkpoint to be logged as an MLflow 3 LoggedModel with its val metrics; returns
        at once (None: the model URI is not known yet).

        `extra_files` are the consolidated weights (`*.pt`, the one copy the model stores) and its `.model.yaml`
        config sidecar; they are hard-linked into OUTPUT/uploads/<tag>-<ms>/ first, so rotating OUTPUT/weights
        (checkpoint.purge_weights) never pulls a file from under an upload. `network` is saved only when no
        `*.pt` is given. The upload runs on one background thread (FIFO), retried `tracking.upload_retries`
        times; its model URI is appended to OUTPUT/logged_models.jsonl when done (`wait_for_uploads`, `end`).
        """
        if not self.enabled:
            return None
        values = {VAL_METRICS[k]: float(v) for k, v in scores.items() if k in VAL_METRICS}
        try:
            job = _stage(self.out / UPLOADS, iteration, extra_files, network, values, self.run_id,
                         self.experiment_id)
        except OSError as e:
            log.warning("checkpoint iteration %d is NOT logged to MLflow: staging its files failed (%s)", iteration, e)
            self._record_failed(iteration, values, f"staging failed: {e}")
            return None
        self._uploads.submit(job, overlays or {})
        return None

    def wait_for_uploads(self, timeout: float | None = None) -> bool:
        """Wait for the queued logged-model uploads; True when none is left."""
        return not self.enabled or self._uploads.wait(timeout)

    def _upload(self, job: dict[str, Any], overlays: dict[str, Any]) -> None:
        """Background thread: log one staged checkpoint, with retries; never raises."""
        attempts = 1 + max(0, int(self.upload_retries))
        it, error = job["iteration"], ""
        for attempt in range(1, attempts + 1):
            try:
                uri = _log_staged_model(self.mlflow, job, overlays)
            except Exception as e:  # noqa: BLE001 (an upload failure must never reach training)
                error = f"{type(e).__name__}: {e}"
                if attempt == attempts:
                    break
                delay = min(UPLOAD_BACKOFF_SECONDS * 2 ** (attempt - 1), UPLOAD_BACKOFF_MAX_SECONDS)
                log.warning("MLflow upload of checkpoint iteration %d failed (attempt %d/%d: %s); retrying in "
                            "%.0f s", it, attempt, attempts, error, delay)
                time.sleep(delay)
                continue
            self._append_logged({"iteration": it, "tag": job["tag"], "status": "READY", "model_uri": uri,
                                 "model_id": job.get("model_id"), "attempts": attempt})
            shutil.rmtree(job["dir"], ignore_errors=True)
            log.info("logged checkpoint iteration %d to MLflow as %s", it, uri)
            return
        if job.get("model_id"):
            with contextlib.suppress(Exception):
                self.mlflow.MlflowClient().finalize_logged_model(job["model_id"], "FAILED")
        log.warning("checkpoint iteration %d was NOT logged to MLflow after %d attempts (%s); its val metrics are "
                    "kept for the run, its weights stay in %s until rotated (checkpoint.keep_weights)",
                    it, attempts, error, self.out / "weights")
        self._record_failed(it, job["values"], error, job.get("model_id"), job["timestamp"])
        shutil.rmtree(job["dir"], ignore_errors=True)

    def _record_failed(self, iteration: int, values: dict[str, float], error: str, model_id: str | None = None,
                       timestamp: int | None = None) -> None:
        self._append_logged({"iteration": iteration, "tag": f"iter_{iteration:07d}", "status": "FAILED",
                             "model_uri": None, "model_id": model_id, "error": error})
        if values:  # the run still gets the scores (replayed with the buffered metrics)
            self._keep({"metrics": values, "step": iteration, "timestamp": timestamp or int(time.time() * 1000),
                        "unlogged_checkpoint": iteration})

    def _append_logged(self, record: dict[str, Any]) -> None:
        with self._lock, open(self.out / LOGGED_MODELS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _resume_staged_uploads(self) -> None:
        """Uploads a killed job left in OUTPUT/uploads are queued again (their scores travel in job.json)."""
        root = self.out / UPLOADS
        for path in sorted(root.glob("iter_*/" + JOB_FILE)) if root.is_dir() else []:
            try:
                job = json.loads(path.read_text())
                job["dir"] = str(path.parent)
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable staged upload %s (%s)", path, e)
                continue
            log.info("resuming the MLflow upload of checkpoint iteration %d left by the previous job", job["iteration"])
            self._uploads.submit(job, {})

    def end(self, status: str = "FINISHED") -> None:
        """End the run after waiting for queued uploads: at most `UPLOAD_WAIT_SECONDS` when it finished,
        `STOPPED_UPLOAD_WAIT_SECONDS` when it was stopped or failed (what is left stays staged and resumes at the
        relaunch)."""
        upload_wait = UPLOAD_WAIT_SECONDS if status == "FINISHED" else STOPPED_UPLOAD_WAIT_SECONDS
        self._ending = True  # a failing call from here on must not say that training goes on
        if self.enabled:
            pending = self._uploads.pending()
            if pending:
                log.info("waiting for %d logged-model upload(s) to MLflow (at most %.0f s)", pending, upload_wait)
            if not self._uploads.wait(upload_wait):
                log.warning("%d logged-model upload(s) still unfinished after %.0f s; they stay staged in %s and "
                            "resume when the job is relaunched into this output folder",
                            self._uploads.pending(), upload_wait, self.out / UPLOADS)
            self._uploads.close()
            self.flush()
            self._call("end_run", self.mlflow.end_run, status=status)


class _UploadQueue:
    """One daemon thread running upload jobs in submission order (a daemon: a hung upload never blocks exit)."""

    def __init__(self, run_job):
        self._run_job = run_job
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, job: dict[str, Any], overlays: dict[str, Any]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="mlflow-upload", daemon=True)
            self._thread.start()
        self._queue.put((job, overlays))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run_job(*item)
            except Exception:  # noqa: BLE001 (belt and braces: _upload already catches)
                log.exception("MLflow upload worker error")
            finally:
                self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive() and not self._queue.unfinished_tasks:
            self._queue.put(None)


def _stage(root: Path, iteration: int, files: list[str], network, values: dict[str, float], run_id: str | None,
           experiment_id: str | None) -> dict[str, Any]:
    """OUTPUT/uploads/<tag>-<ms>/: hard links of the files to upload (a copy across file systems) and job.json."""
    tag = f"iter_{iteration:07d}"
    stamp = int(time.time() * 1000)
    folder = root / f"{tag}-{stamp}"  # unique: an upload of the same tag resumed from a killed job may be queued
    folder.mkdir(parents=True)
    for f in map(Path, files):
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copy2(f, folder / f.name)
    if not any(p.suffix == ".pt" for p in folder.iterdir()):
        import torch

        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, folder / f"{tag}.pt")
    job = {"iteration": iteration, "tag": tag, "values": values, "timestamp": stamp,
           "run_id": run_id, "experiment_id": experiment_id, "model_id": None}
    (folder / JOB_FILE).write_text(json.dumps(job))
    job["dir"] = str(folder)
    return job


def _log_staged_model(mlflow, job: dict[str, Any], overlays: dict[str, Any]) -> str:
    """One attempt: the LoggedModel (created once, reused by retries), its files, its val metrics, the overlays."""
    from mlflow.entities import Metric
    from mlflow.models import Model

    from training import logged_model

    client = mlflow.MlflowClient()
    it, run_id, folder = job["iteration"], job["run_id"], Path(job["dir"])
    if not job.get("model_id"):
        model = client.create_logged_model(job["experiment_id"], name=f"ckpt-iter{it:07d}", source_run_id=run_id,
                                           tags={"iteration": str(it)})
        job["model_id"] = model.model_id
        (folder / JOB_FILE).write_text(json.dumps({k: v for k, v in job.items() if k != "dir"}))
    data = folder / "data" / job["tag"]  # what the model stores: the weights and the config sidecar, nothing else
    if not data.is_dir():
        data.mkdir(parents=True)
        for p in folder.iterdir():
            if p.is_file() and p.name != JOB_FILE:
                os.replace(p, data / p.name)
    # The pyfunc flavour with a loader module: no pickled object, loadable with the package installed
    # (training.logged_model.load_logged_model, or mlflow.pyfunc.load_model(uri).get_raw_model()).
    info = Model.log(None, name=f"ckpt-iter{it:07d}", flavor=mlflow.pyfunc, run_id=run_id, model_id=job["model_id"],
                     step=it, loader_module=logged_model.LOADER_MODULE, data_path=str(data),
                     pip_requirements=logged_model.PIP_REQUIREMENTS)
    ts = job["timestamp"]
    metrics = [Metric(k, v, ts, it, model_id=job["model_id"]) for k, v in job["values"].items()]
    if metrics and not job.get("metrics_logged"):
        client.log_batch(run_id, metrics=metrics)
        job["metrics_logged"] = True
    for name, image in overlays.items():
        client.log_image(run_id, image, key=f"val/overlay/{name}", step=it, timestamp=ts)
    overlays.clear()  # logged: a retry of a later step does not log them twice
    return info.model_uri
