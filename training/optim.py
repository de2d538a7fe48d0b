"""Optimizer, learning-rate schedule and the DeepSpeed config built from the training config.

The LR is a pure function of the iteration (step schedule, γ at fractions of the run), set on every param group
before each optimizer step: a resumed job gets the right LR from the iteration alone, with no scheduler state.

Precision (`train.precision`: auto = bf16 on GPU): **torch autocast(bf16) over fp32 parameters**, as Cutie and the
S3 release train; DeepSpeed's own "bf16" mode (bf16 parameters and gradients, fp32 master copy in the optimizer) is
switched off. With fp32 parameters the fp32 islands of the network (key projection, memory affinity, deformable
sampling grid, GRUs, losses) really are fp32, the gradients reach the optimizer in fp32, and the weights the
forward uses are the optimizer's own. The loop does:

    with forward_context(cfg, device):          # torch.autocast(device.type, bfloat16) or a no-op
        out = engine(batch_in_input_dtype)      # input_dtype(cfg) = float32: the batch is not cast to bf16
    engine.backward(out["total_loss"])          # outside the context, as torch recommends

Measured by benchmarks/bench_precision.py (tiny config, one ClipTrainer forward+backward of 2 clips × 8 frames at
64², CPU, same weights/seed/loss points; errors relative to the fp32 step; 128² gives the same picture):

    (b) autocast bf16, fp32 params:   loss rel. err 5.8e-4, gradient rel. err 1.1e-2
    (c) bf16 params (DeepSpeed bf16): loss rel. err 9.2e-4, gradient rel. err 1.3e-2
    one AdamW step at lr 5e-5 from those gradients: with (c) the forward afterwards sees bf16(master weight), and
    60 % of the 3.49 M trainable entries get no update at all (below half a bf16 ulp of the weight; 44 % at lr 1e-4,
    worse after the LR drops); the update it does see differs from the fp32 run's by 172 % (rel. norm). With (b)
    every update is applied (0 % lost), 20 % rel. difference, all of it Adam's first-step sign(g) on near-zero
    gradient entries (the master update of (c) differs by the same 21 %).
So the gradients are about equally good, but bf16 parameters silently drop most small updates from the weights
the network runs with; autocast keeps them, at the cost of fp32 parameter memory (54 M trainable, negligible).
"""

from __future__ import annotations

import bisect
import contextlib
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


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of the forward pass: bfloat16 when `use_bf16(cfg)`, else None (plain fp32)."""
    return torch.bfloat16 if use_bf16(cfg) else None


def forward_context(cfg: TrainConfig, device: torch.device | str):
    """The context the training forward runs in: torch.autocast(device.type, bfloat16) or a no-op context."""
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def input_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of the floating batch tensors handed to the engine: float32 (parameters are fp32, autocast
    lowers the matmuls/convs itself). A function of `cfg` so a future mode can change it in one place."""
    del cfg
    return torch.float32


def deepspeed_config(cfg: TrainConfig, split: BatchSplit) -> dict[str, Any]:
    """DeepSpeed's config. Parameters, gradients and their all-reduce stay fp32: DeepSpeed's "bf16" is off and the
    bf16 compute comes from `forward_context` (module docstring)."""
    return {
        "train_batch_size": split.global_batch,
        "train_micro_batch_size_per_gpu": split.micro_batch,
        "gradient_accumulation_steps": split.accumulation,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO: supported, just not on DeepSpeed's list
        "bf16": {"enabled": False},  # bf16 via torch.autocast (forward_context) on fp32 parameters
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our own logging; keep DeepSpeed's per-step prints off
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": cfg.checkpoint.load_universal},
    }
