"""Inference engine: memory-based frame-by-frame propagation (imports torch, numpy and model only)."""

from model.inference.config import S3_LONG_TERM, InferenceConfig
from model.inference.core import InferenceCore
from model.inference.memory import MemoryManager, similarity, topk_softmax

__all__ = ["InferenceConfig", "InferenceCore", "MemoryManager", "S3_LONG_TERM", "similarity", "topk_softmax"]
