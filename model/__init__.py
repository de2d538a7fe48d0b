"""The S3 network: spatial-semantic encoder on a Depth-Anything ViT-B, discriminative queries, Cutie memory.

Imports torch and timm only; never deepspeed, ray or mlflow (tests/test_foundation.py checks it).
"""

from model import _tv_shim  # noqa: F401  (must run before timm / torchvision are imported)

__all__: list[str] = []
