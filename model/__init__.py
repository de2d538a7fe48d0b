"""The S3 network: spatial-semantic encoder on a Depth-Anything ViT-B, discriminative queries, Cutie memory.

Imports torch and timm only; never deepspeed, ray or mlflow (tests/test_foundation.py checks it).

    from model import build_network, load_model_config, param_groups
    network = build_network(load_model_config("s3"))
    model.sync_batchnorm(network)              # multi-rank training: BatchNorm statistics over all ranks
    model.init_from_checkpoint(network, path)  # start from a Cutie / S3-release / our checkpoint (model.init_from)
"""

from model import _tv_shim  # noqa: F401  (must run before timm / torchvision are imported)
from model.config import ModelConfig, load_model_config
from model.network import S3Network, build_network
from model.params import param_groups
from model.sync_batchnorm import SyncBatchNorm2d, sync_batchnorm
from model.weights import format_init_report, init_from_checkpoint

__all__ = ["ModelConfig", "S3Network", "SyncBatchNorm2d", "build_network", "format_init_report",
           "init_from_checkpoint", "load_model_config", "param_groups", "sync_batchnorm"]
