"""Pick the best logged checkpoint of an experiment, register it and point the alias `champion` at it.

    python -m training.select --experiment s3-demo [--metric val/J&F] [--name s3vos] [--tracking-uri URI]

Prints the champion's URI (`models:/<name>@champion`). The same choice by hand: `mlflow ui`, open the experiment's
"Models" tab (logged models, sortable by val/JF), open the best one, "Register model", then set the alias
`champion` on that version in the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

from training.tracking import metric_key

ALIAS = "champion"


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


def select(experiment: str, metric: str = "val/J&F", name: str | None = None,
           tracking_uri: str | None = None) -> Champion:
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment '{experiment}' not found at {mlflow.get_tracking_uri()}")
    ranked = rank_logged_models(mlflow, exp.experiment_id, metric)
    if not ranked:
        raise SystemExit(f"no logged model in '{experiment}' has the metric '{metric}' ({metric_key(metric)})")
    score, best = ranked[0]
    registered = name or f"{experiment}-champion"
    version = mlflow.register_model(f"models:/{best.model_id}", registered)
    client = MlflowClient()
    client.set_registered_model_alias(registered, ALIAS, version.version)
    tags = best.tags or {}
    return Champion(registered, str(version.version), f"models:/{registered}@{ALIAS}", best.model_id,
                    f"models:/{best.model_id}", int(tags["iteration"]) if "iteration" in tags else None,
                    float(score), metric)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Register the best logged checkpoint and alias it 'champion'.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metric", default="val/J&F", help="higher is better (default val/J&F)")
    p.add_argument("--name", default=None, help="registered model name (default <experiment>-champion)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--json", action="store_true", help="print the full choice as JSON")
    args = p.parse_args(argv)
    champ = select(args.experiment, args.metric, args.name, args.tracking_uri)
    if args.json:
        print(json.dumps(asdict(champ), indent=2))
    else:
        print(f"champion: {champ.alias_uri} (version {champ.version}, {champ.logged_model_uri}, "
              f"iteration {champ.iteration}, {champ.metric} = {champ.score:.4f})")
        print(champ.alias_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
