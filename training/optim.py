"""Optimizer, learning-rate schedule and the DeepSpeed config built from the training config.

The LR is a pure function of the iteration (step schedule, γ at fractions of the run), set on every param group
before each optimizer step: a resumed job gets the right LR from the iteration alone, with no scheduler state.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from training.config import BatchSplit, TrainConfig, effective_lr


def lr_factor(iteration: int, total: int, milestones: list[float], gamma: float) -> float:
    """Multiplier of the base LR at `iteration` (0-based count of finished optimizer steps).

    As torch's MultiStepLR: the factor drops to gamma**k once `iteration` reaches the k-th milestone
    (milestone = round(fraction × total); Cutie's 100k/115k of 125k are 0.8/0.92).
    """
    steps = [round(m * total) for m in milestones]
    return gamma ** bisect.bisect_right(steps, iteration)


def milestone_iterations(cfg: TrainConfig) -> list[int]:
    return [round(m * cfg.train.iterations) for m in cfg.optim.lr_milestones]


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    return effective_lr(cfg) * lr_factor(iteration, cfg.train.iterations, cfg.optim.lr_milestones, cfg.optim.lr_gamma)


def build_param_groups(network: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The model's own groups (no decay on embeddings, encoder at a lower LR, frozen ViT left out)."""
    import model

    groups = model.param_groups(network, effective_lr(cfg), cfg.optim.weight_decay, cfg.optim.encoder_lr_ratio)
    groups = [g for g in groups if len(list(g["params"]))]
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr", effective_lr(cfg))
        g["lr_scale"] = g["lr"] / effective_lr(cfg)  # keeps the ratio when the schedule changes the base
    return groups


def build_optimizer(network: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # torch's AdamW (not DeepSpeed's FusedAdam/CPUAdam): no JIT compile on CPU, identical maths on every stage.
    return torch.optim.AdamW(build_param_groups(network, cfg), lr=effective_lr(cfg),
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iteration: int) -> float:
    base = lr_at(cfg, iteration)
    for g in optimizer.param_groups:
        g["lr"] = base * g.get("lr_scale", 1.0)
    return base


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, split: BatchSplit) -> dict[str, Any]:
    return {
        "train_batch_size": split.global_batch,
        "train_micro_batch_size_per_gpu": split.micro_batch,
        "gradient_accumulation_steps": split.accumulation,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO: supported, just not on DeepSpeed's list
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our own logging; keep DeepSpeed's per-step prints off
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": cfg.checkpoint.load_universal},
    }
