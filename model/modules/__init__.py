"""Cutie's memory-network modules, with S3's discriminative query attention (spec sections 2.2, 2.3)."""

from model.modules.attention import DiscriminativeQueryAttention, PixelQueryCrossAttention
from model.modules.key_projection import KeyProjection
from model.modules.mask_decoder import MaskDecoder
from model.modules.mask_encoder import MaskEncoder
from model.modules.memory import anisotropic_l2_similarity, memory_readout, softmax_affinity
from model.modules.object_summarizer import ObjectSummarizer
from model.modules.object_transformer import ObjectTransformer
from model.modules.pixel_fuser import PixelFuser

__all__ = [
    "DiscriminativeQueryAttention",
    "KeyProjection",
    "MaskDecoder",
    "MaskEncoder",
    "ObjectSummarizer",
    "ObjectTransformer",
    "PixelFuser",
    "PixelQueryCrossAttention",
    "anisotropic_l2_similarity",
    "memory_readout",
    "softmax_affinity",
]
