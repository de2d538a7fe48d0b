"""The MLflow logged models of validated checkpoints, and the loader that turns one back into a network.

A logged model holds ONE copy of the weights: the consolidated fp32 state dict (tensors only) with its model
config sidecar, as a pyfunc model whose loader is this module (no pickled object anywhere):

    MLmodel                                    flavor python_function, loader_module training.logged_model
    data/iter_0001000/iter_0001000.pt          the consolidated state dict (torch.save of tensors)
    data/iter_0001000/iter_0001000.model.yaml  the model config (JSON), as written next to OUTPUT/weights/*.pt
    requirements.txt, python_env.yaml, conda.yaml

Loading needs the installed package only (`pip install -e .` installs `model`, `training`, `data_pipeline`), from
any working directory:

    from training.logged_model import load_logged_model
    network = load_logged_model("models:/s3-demo-champion@champion")  # or models:/<model_id>, or a local folder

    import mlflow
    network = mlflow.pyfunc.load_model("models:/<model_id>").get_raw_model()  # the same network, through MLflow

The weights load with torch.load(weights_only=True); the encoders are built without reading any pretrained file
(every weight is in the state dict). To evaluate a logged model, download it and pass its weights file:
`python -m training.evaluate --checkpoint $(python -m training.logged_model models:/... --download DIR) ...`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from model import cli

LOADER_MODULE = "training.logged_model"
PIP_REQUIREMENTS = ["torch", "timm", "numpy", "opencv-python"]


def weights_in(folder: str | os.PathLike) -> Path:
    """The one consolidated weights file (`*.pt`) inside a logged model's folder (or any folder below it)."""
    found = sorted(Path(folder).rglob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one weights file (*.pt) under {folder}, found {len(found)}")
    return found[0]


def is_uri(text: str) -> bool:
    """`models:/...`, `runs:/...`, `s3://...`, `file:///...`: a scheme, not a plain path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) is not None


def download(model_uri: str, dst_path: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    """Download a logged model (`models:/<id>`, `models:/<name>@<alias>`, `models:/<name>/<version>`); a local
    folder is returned as it is (FileNotFoundError when a path that is no URI is not a folder). Returns the
    folder."""
    if Path(model_uri).is_dir():
        return Path(model_uri)
    if not is_uri(model_uri):
        what = "is not a folder" if Path(model_uri).exists() else "not found"
        raise FileNotFoundError(f"logged model folder {what}: {model_uri} (expected a downloaded logged model's "
                                "folder, or a models:/<model_id> or models:/<name>@<alias> URI)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    dst = str(dst_path) if dst_path is not None else None
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst))


def load_network(weights_file: str | os.PathLike):
    """Our network (eval mode) from a consolidated weights file and its `.model.yaml` sidecar, loaded strictly."""
    from model.convert import load_network_from_checkpoint

    network, _ = load_network_from_checkpoint(weights_file)
    return network


def load_logged_model(model_uri: str, dst_path: str | os.PathLike | None = None,
                      tracking_uri: str | None = None):
    """The network of a logged model: a `models:/...` URI (resolved against `tracking_uri`, else MLflow's
    current one, e.g. MLFLOW_TRACKING_URI) or a folder holding a downloaded logged model. Returns a
    torch.nn.Module in eval mode on the CPU."""
    return load_network(weights_in(download(model_uri, dst_path, tracking_uri)))


class PyfuncNetwork:
    """What `mlflow.pyfunc.load_model` returns the inside of: `.get_raw_model()` is the network. A VOS network
    has no single-table predict(); run it through training.evaluate or model.inference."""

    def __init__(self, network):
        self.network = network

    def get_raw_model(self):
        return self.network

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError("segmenting a video needs the inference engine: use .get_raw_model() with "
                                  "model.inference, or python -m training.evaluate --checkpoint <weights .pt>")


def _load_pyfunc(data_path: str) -> PyfuncNetwork:
    """MLflow's pyfunc entry point (loader_module): `data_path` is the model's data/ folder."""
    return PyfuncNetwork(load_network(weights_in(data_path)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.logged_model",
                                description="Download a logged model and print its weights file (for "
                                            "training.evaluate --checkpoint), or check that it loads.")
    p.add_argument("model_uri", help="models:/<model_id>, models:/<name>@<alias>, or a downloaded folder")
    p.add_argument("--download", metavar="DIR", default=None, help="download into DIR (default: a temp folder)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--check", action="store_true", help="also build the network and load the weights")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    return cli.run_cli(lambda: _run(args), debug=args.debug, user_errors=(ValueError,),
                       disk=[args.download] if args.download else [])


def _run(args: argparse.Namespace) -> int:
    """Errors the user can fix end in one line (model.cli): a missing folder, a model or alias MLflow does not
    know (exit 2), a full disk while downloading (exit 4)."""
    try:
        folder = download(args.model_uri, args.download, args.tracking_uri)
    except Exception as e:
        if type(e).__name__ != "MlflowException" or getattr(e, "error_code", None) not in _NOT_FOUND_CODES:
            raise
        where = f" (tracking URI {args.tracking_uri})" if args.tracking_uri else " (no --tracking-uri given)"
        raise cli.CliError(f"logged model {args.model_uri} not found{where}: {cli.one_line(str(e))}") from e
    weights = weights_in(folder)
    if args.check:
        network = load_network(weights)
        print(f"loaded {sum(t.numel() for t in network.state_dict().values())} values from {weights}",
              file=sys.stderr)
    print(weights)
    return 0


_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


if __name__ == "__main__":
    sys.exit(main())
