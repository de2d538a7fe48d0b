"""The S3 network: spatial-semantic encoder on a Depth-Anything ViT-B, discriminative queries, Cutie memory.

Imports torch and timm only; never deepspeed, ray or mlflow (tests/test_foundation.py checks it).

    from model import build_network, load_model_config, param_groups
    network = build_network(load_model_config("s3"))
"""

from model import _tv_shim  # noqa: F401  (must run before timm / torchvision are imported)
from model.config import ModelConfig, load_model_config
from model.network import S3Network, build_network
from model.params import param_groups

__all__ = ["ModelConfig", "S3Network", "build_network", "load_model_config", "param_groups"]
