"""MLflow tracking from global rank 0 only: one run per job however many ranks, resumed jobs continue the same run,
and a tracking server that goes away mid-run never stops training.

When a call fails, metrics are kept in memory and appended to OUTPUT/mlflow_pending.jsonl; the next successful
call replays them with their original steps and timestamps and logs the outage as `tracking/gap_seconds` and
`tracking/replayed_metrics` (a retry is attempted at most every `RETRY_SECONDS`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0
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


def get_or_create_experiment(mlflow, name: str, artifact_root: Path | None) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # An absolute artifact location: the default ("./mlruns") depends on the working directory.
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return mlflow.create_experiment(name, artifact_location=location)


class Tracker:
    """Rank-0 MLflow run. On other ranks every method is a no-op, so callers need no rank checks."""

    def __init__(self, cfg, rank: int, resume_run_id: str | None):
        self.enabled = rank == 0
        self.run_id: str | None = None
        self._pending: list[dict[str, Any]] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self.out = Path(cfg.output_dir)
        if not self.enabled:
            return
        # Fail fast against a server that is down (MLflow otherwise retries for minutes per call).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
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
        else:
            run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.tracking.run_name or None, **kwargs)
            params = {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in cfg.flat().items()}
            params["config_hash"] = cfg.hash()
            items = list(params.items())
            for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i:i + 90]))
            mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")
            self._log_shard_manifest(mlflow, Path(cfg.data.shards))
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.tracking_uri = uri

    @staticmethod
    def _log_shard_manifest(mlflow, shards: Path) -> None:
        """The data the run trains on: the shard job's manifest (config hash, clip counts, skipped samples)."""
        path = shards / "manifest.json"
        if not path.is_file():
            log.warning("no shard manifest at %s: the run's data provenance is not logged", path)
            return
        manifest = json.loads(path.read_text())
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
                log.warning("MLflow call %s failed (%s); training goes on, metrics are kept locally", what, e)
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
        self._pending.append(record)
        with open(self.out / "mlflow_pending.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _replay(self) -> bool:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, r["timestamp"], r["step"]) for r in self._pending for k, v in r["metrics"].items()]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(metrics), 900):
            if self._call("log_batch", client.log_batch, self.run_id, metrics=metrics[i:i + 900]) is FAILED:
                return False
        gap = time.time() - (self._down_since or time.time())
        log.warning("MLflow is back after %.0f s; replayed %d buffered metric values", gap, len(metrics))
        last_step = self._pending[-1]["step"]
        self._pending.clear()
        self._down_since = None
        self._call("log_gap", self.mlflow.log_metrics,
                   {"tracking/gap_seconds": gap, "tracking/replayed_metrics": len(metrics)}, step=last_step)
        return True

    def flush(self) -> None:
        if self.enabled and self._pending:
            self._replay()

    # ---------------------------------------------------------------------------------- checkpoints

    def log_checkpoint(self, network, iteration: int, scores: dict[str, float], extra_files: list[str],
                       overlays: dict[str, Any] | None = None) -> str | None:
        """Log a validated checkpoint as an MLflow 3 LoggedModel with its val metrics; returns its model URI."""
        if not self.enabled:
            return None
        mlflow = self.mlflow
        info = self._call("log_model", _log_model, mlflow, network, iteration, extra_files)
        values = {VAL_METRICS[k]: float(v) for k, v in scores.items() if k in VAL_METRICS}
        if info is FAILED:
            self._keep({"metrics": values, "step": iteration, "timestamp": int(time.time() * 1000),
                        "unlogged_checkpoint": iteration})
            return None
        self._call("log_val_metrics", mlflow.log_metrics, values, step=iteration, model_id=info.model_id)
        for name, image in (overlays or {}).items():
            self._call("log_image", mlflow.log_image, image, key=f"val/overlay/{name}", step=iteration)
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.flush()
            self._call("end_run", self.mlflow.end_run, status=status)


def _log_model(mlflow, network, iteration: int, extra_files: list[str]):
    import mlflow.pytorch

    # Explicit requirements: MLflow's inference of them would re-import the model in a subprocess (slow).
    # "pickle": MLflow 3's default pt2 export traces forward() with an input example, which a memory-based VOS
    # network has no single form of. The consolidated state dict rides along (extra_files) for weights_only loads.
    return mlflow.pytorch.log_model(
        pytorch_model=network, name=f"ckpt-iter{iteration:07d}", step=iteration, extra_files=extra_files,
        serialization_format="pickle",
        pip_requirements=["torch", "timm", "numpy", "opencv-python"], tags={"iteration": str(iteration)},
    )
