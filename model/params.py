"""Optimizer parameter groups (spec section 3.6).

- Frozen parameters (the ViT when `freeze_vit`) are left out entirely.
- The trainable pixel encoder (`pixel_encoder.*`: S3's spatial-semantic block, or the ResNet-50 of cutie_base)
  trains at `encoder_lr_ratio` × the base learning rate (0.1).
- No weight decay on embeddings (Cutie's `query_init`, `query_emb`, `summary_pos`, `obj_pe`, plus position and
  level embeddings, the discriminative query's `alpha`), on normalisation layers, or on biases (any 1-D tensor).
"""

from __future__ import annotations

from typing import Any

from torch import nn

EMBEDDING_NAMES = ("query_init", "query_emb", "summary_pos", "obj_pe", "pos_embed", "cls_token", "level_embed",
                   "alpha")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _no_decay_names(network: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in network.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            is_norm_or_embedding = isinstance(module, (*NORM_TYPES, nn.Embedding))
            if is_norm_or_embedding or param.ndim <= 1 or any(p in EMBEDDING_NAMES for p in full.split(".")):
                names.add(full)
    return names


def param_groups(network: nn.Module, base_lr: float, weight_decay: float, encoder_lr_ratio: float = 0.1
                 ) -> list[dict[str, Any]]:
    """Up to four groups (empty ones dropped), each with `name`, `params`, `lr`, `weight_decay`."""
    no_decay = _no_decay_names(network)
    buckets: dict[tuple[bool, bool], list] = {(e, d): [] for e in (True, False) for d in (True, False)}
    seen: set[int] = set()
    for name, param in network.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        name = name.removeprefix("module.")
        buckets[(name.startswith("pixel_encoder."), name not in no_decay)].append(param)
    groups = []
    for (encoder, decay), params in buckets.items():
        if not params:
            continue
        groups.append({
            "name": f"{'encoder' if encoder else 'memory_network'}_{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": base_lr * (encoder_lr_ratio if encoder else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
        })
    return groups
