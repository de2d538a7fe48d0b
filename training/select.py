"""Pick the best logged checkpoint of an experiment, register it and point the alias `champion` at it.

    python -m training.select --experiment s3-demo [--metric val/J&F] [--name s3vos] [--tracking-uri URI]
                              [--json] [--debug]

Prints the champion's URI (`models:/<name>@champion`) on its last line. Selecting again is idempotent: when the
alias already points at a version of the best logged model nothing is registered; when a better model arrived it
is registered (or its existing version reused) and the alias moves. The same choice by hand: README, section
"3. Pick the checkpoint (MLflow)".

Exit codes: 0 done (or nothing to do), 1 the tracking server is unreachable or a tracking call failed, 2 usage
errors (unknown experiment, no logged model with the metric). Errors are one line on stderr; `--debug` shows the
traceback. An HTTP tracking server is probed first (`<uri>/health`, `PROBE_TRIES` short tries), and MLflow's own
request retries are bounded (`CLI_ENV`, set only where the user has not exported them), so a server that is down
fails in seconds instead of MLflow's default minutes of retries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from model import cli
from training.tracking import metric_key, tag_experiment_kind

ALIAS = "champion"
# MLflow's HTTP retry settings for the CLI (its defaults: 7 retries, backoff factor 2, 120 s timeout: minutes
# against a server that is down); os.environ.setdefault, so exported values win.
CLI_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TRIES = 3
PROBE_TIMEOUT_SECONDS = 3.0
PROBE_PAUSE_SECONDS = 1.0


class SelectError(SystemExit):
    """A user-facing failure: one line, an exit code (1 tracking server, 2 usage). A SystemExit, so a caller of
    `select()` that does not catch it exits with the message, as before."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(f"error: {message}")
        self.message = message
        self.exit_code = exit_code


@dataclass
class Champion:
    registered_name: str
    version: str
    alias_uri: str
    model_id: str
    logged_model_uri: str
    iteration: int | None
    score: float
    metric: str
    already: bool = False  # the alias already pointed at a version of this logged model: nothing changed
    previous_version: str | None = None  # the version the alias pointed at before (None: it did not exist)
    registered: bool = False  # this call registered a new version


def rank_logged_models(mlflow, experiment_id: str, metric: str) -> list[tuple[float, object]]:
    """(score, LoggedModel) best first; a model without the metric is left out."""
    key = metric_key(metric)
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    ranked = []
    from mlflow.entities import LoggedModelStatus

    for m in models:
        if m.status != LoggedModelStatus.READY:  # a log_model cut short (job killed mid-upload) stays PENDING
            continue
        values = [x for x in (m.metrics or []) if x.key == key]
        if values:
            latest = max(values, key=lambda x: (x.step, x.timestamp))
            ranked.append((latest.value, m))
    ranked.sort(key=lambda t: -t[0])
    return ranked


def _unreachable_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if any(s in text for s in ("name or service not known", "nodename nor servname", "failed to resolve",
                               "getaddrinfo failed", "name resolution", "no address associated")):
        return "unknown host"
    if "timed out" in text or "timeout" in text:
        return "no answer"
    return type(exc).__name__


def check_reachable(uri: str, tries: int = PROBE_TRIES, timeout: float = PROBE_TIMEOUT_SECONDS,
                    pause: float = PROBE_PAUSE_SECONDS) -> None:
    """Raise SelectError (exit code 1) when an http(s) tracking server does not answer `<uri>/health`.

    Any HTTP answer counts as reachable (an auth proxy's 401 too: MLflow reports that itself); other schemes
    (sqlite:, file:, databricks) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    start = time.monotonic()
    reason = ""
    for attempt in range(1, tries + 1):
        try:
            requests.get(url, timeout=timeout, allow_redirects=False)
            return
        except requests.exceptions.SSLError:
            return  # TLS settings are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS, ...): let it report
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            reason = _unreachable_reason(e)
        if attempt < tries:
            time.sleep(pause)
    elapsed = time.monotonic() - start
    raise SelectError(f"MLflow tracking server {uri} is not reachable ({reason}) after {tries} tries in "
                      f"{elapsed:.0f} s", exit_code=1)


def _is_version_of(version, model) -> bool:
    """Whether a registered model version was made from this logged model: `register_model("models:/<id>")`
    records source `models:/<id>` (model_id where the store keeps it), and so does the 3.17 UI's "Register model";
    a source naming the model's artifact location counts too."""
    if getattr(version, "model_id", None) == model.model_id:
        return True
    source = (version.source or "").rstrip("/")
    location = (getattr(model, "artifact_location", None) or "").rstrip("/")
    return source == f"models:/{model.model_id}" or bool(location) and source == location


def _alias_version(client, registered: str):
    """The version the alias points at, or None (no such registered model, or no such alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(registered, ALIAS)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _existing_version(client, registered: str, model):
    """A version of `registered` already made from this logged model (registered by hand, say), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{registered}'")
    except MlflowException:
        return None
    mine = [v for v in versions if _is_version_of(v, model)]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def select(experiment: str, metric: str = "val/J&F", name: str | None = None,
           tracking_uri: str | None = None) -> Champion:
    """Register the best READY logged model of `experiment` (highest `metric`) as `name` (default
    `<experiment>-champion`) and point the alias `champion` at it; a no-op when the alias already points there.
    Raises SelectError (a SystemExit) for an unreachable server (exit code 1) or a usage error (2)."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    check_reachable(uri)
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SelectError(f"experiment '{experiment}' not found at {uri}")
    tag_experiment_kind(client, exp)  # experiments of older trainer versions: the UI's model-training view
    ranked = rank_logged_models(mlflow, exp.experiment_id, metric)
    if not ranked:
        raise SelectError(f"no READY logged model in '{experiment}' has the metric '{metric}' ({metric_key(metric)})")
    score, best = ranked[0]
    registered = name or f"{experiment}-champion"
    tags = best.tags or {}
    champ = Champion(registered, "", f"models:/{registered}@{ALIAS}", best.model_id, f"models:/{best.model_id}",
                     int(tags["iteration"]) if "iteration" in tags else None, float(score), metric)

    current = _alias_version(client, registered)
    if current is not None:
        champ.previous_version = str(current.version)
        if _is_version_of(current, best):
            champ.version, champ.already = str(current.version), True
            return champ
    version = _existing_version(client, registered, best)
    if version is None:
        version = mlflow.register_model(champ.logged_model_uri, registered)
        champ.registered = True
    champ.version = str(version.version)
    client.set_registered_model_alias(registered, ALIAS, champ.version)
    return champ


def describe(champ: Champion) -> str:
    what = f"({champ.logged_model_uri}, iteration {champ.iteration}, {champ.metric} = {champ.score:.4f})"
    how = "registered" if champ.registered else "existing"
    if champ.already:
        return f"champion: {champ.alias_uri} already points at version {champ.version} {what}; nothing registered"
    if champ.previous_version is not None:
        return (f"champion: {champ.alias_uri} moved from version {champ.previous_version} to {how} version "
                f"{champ.version} {what}")
    return f"champion: {champ.alias_uri} set to {how} version {champ.version} {what}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Register the best logged checkpoint and alias it 'champion'.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metric", default="val/J&F", help="higher is better (default val/J&F)")
    p.add_argument("--name", default=None, help="registered model name (default <experiment>-champion)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--json", action="store_true", help="print the full choice as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = p.parse_args(argv)
    for key, value in CLI_ENV.items():
        os.environ.setdefault(key, value)
    try:
        champ = select(args.experiment, args.metric, args.name, args.tracking_uri)
    except SelectError as e:  # a SystemExit prints no traceback by itself: report() does under --debug
        return cli.report(e, e.exit_code, e.message, debug=args.debug)
    except Exception as e:  # noqa: BLE001 (a tracking call that failed: one line unless --debug)
        if args.debug:
            raise
        import mlflow

        message = cli.one_line(f"{type(e).__name__}: {e}")
        message = message if len(message) <= 300 else message[:297] + "..."
        print(f"error: MLflow call to {mlflow.get_tracking_uri()} failed ({message}); --debug for the traceback",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(champ), indent=2))
    else:
        print(describe(champ))
        print(champ.alias_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
