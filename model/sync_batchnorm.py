"""BatchNorm statistics over all ranks (SyncBatchNorm), on CUDA and on CPU/gloo.

The S3 release converts its network with `nn.SyncBatchNorm.convert_sync_batchnorm`: with 2 clips per GPU, and the
8 frames of a clip strongly correlated, per-rank statistics are a different (noisier) training. torch's
`nn.SyncBatchNorm` only runs on accelerators, and our tests run 2 gloo CPU ranks, so:

    n = model.sync_batchnorm(network)      # before deepspeed.initialize; returns how many layers changed

turns every `nn.BatchNorm2d` the network keeps in *training use* into a `SyncBatchNorm2d`. Layers the network keeps
frozen (eval mode after `network.train()`: Cutie's ResNet pixel encoder and the mask encoder's ResNet-18) are left
alone. The conversion swaps the class in place: the same module objects, parameters, buffers and state-dict keys,
so checkpoints stay interchangeable with plain BatchNorm2d, and an optimizer or wrapper built before keeps working.

`SyncBatchNorm2d` in training mode with a process group of more than one rank:
- CUDA tensors on an NCCL group: torch's own SyncBatchNorm kernel;
- anything else (CPU tensors, gloo): `_GlooSyncBatchNorm` below: per-channel sums all-reduced in fp32 (the mean
  first, then the sum of squared deviations from the global mean, so no E[x²] - E[x]² cancellation), the
  backward all-reduces Σdy and Σdy·x̂ so the input gradient is the full-batch BatchNorm gradient; weight and bias
  gradients are this rank's part (the data-parallel engine averages them, as with torch's SyncBatchNorm).
Running statistics are updated with the global mean and the unbiased global variance, with BatchNorm2d's momentum
rule, so they are identical on every rank. Eval mode, no process group, or a world of 1: plain BatchNorm2d.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _sync_world(process_group) -> tuple[object, int] | None:
    """(group, world size) when statistics must be synchronised, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    return (group, world) if world > 1 else None


class _GlooSyncBatchNorm(torch.autograd.Function):
    """Cross-rank batch norm through plain all_reduce (any backend, any device), statistics in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
        stats = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / channels])])
        dist.all_reduce(stats, group=group)
        total = float(stats[-1])
        if total < 1:
            raise ValueError("SyncBatchNorm2d: the batch is empty on every rank")
        mean = stats[:channels] / total
        centered = xf - mean.view(shape)
        sq = centered.square().sum(dims)
        dist.all_reduce(sq, group=group)
        var = sq / total  # biased, for normalising
        invstd = torch.rsqrt(var + eps)
        out = centered.mul_(invstd.view(shape))
        if weight is not None:
            out = out * weight.float().view(shape) + bias.float().view(shape)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = var * (total / (total - 1)) if total > 1 else var
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, total
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        dy = grad_out.float()
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            g_dy, g_dy_xhat = (sums[:channels] / ctx.total), (sums[channels:] / ctx.total)
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (dy - g_dy.view(shape) - xhat * g_dy_xhat.view(shape)).mul_(scale.view(shape)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training-mode statistics cover every rank of `process_group` (None = the world).

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d (it is one: freezing code that looks for
    BatchNorm2d still finds it). See the module docstring for the backends."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sync = _sync_world(self.process_group) if self.training else None
        if sync is None:
            return super().forward(input)
        self._check_input_dim(input)
        group, world = sync
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        if input.is_cuda and dist.get_backend(group) == "nccl":
            from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNorm

            return TorchSyncBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                            factor, group, world)
        return _GlooSyncBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                        factor, group)


def batchnorms_in_training_use(module: nn.Module) -> list[str]:
    """Names of the plain BatchNorm2d layers that are in training mode after `module.train()` (the network's own
    `train` keeps its frozen ones in eval). Every submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(True)
        return [name for name, m in module.named_modules() if type(m) is nn.BatchNorm2d and m.training]
    finally:
        for m, mode in modes:
            m.training = mode


def sync_batchnorm(module: nn.Module, process_group=None) -> int:
    """Turn the BatchNorm2d layers `module` trains (not the ones it keeps frozen) into SyncBatchNorm2d, in place
    (class swap: same objects, parameters, buffers, state-dict keys). Returns how many layers were converted.

    Call it on every rank before building the DeepSpeed engine; with no process group, or a world of 1, the
    converted layers behave exactly as BatchNorm2d."""
    names = set(batchnorms_in_training_use(module))
    count = 0
    for name, m in module.named_modules():
        if name in names and type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            m.process_group = process_group
            count += 1
    return count


def plain_batchnorm(module: nn.Module) -> int:
    """Undo `sync_batchnorm` (SyncBatchNorm2d → BatchNorm2d in place); returns how many layers changed."""
    count = 0
    for m in module.modules():
        if type(m) is SyncBatchNorm2d:
            del m.process_group
            m.__class__ = nn.BatchNorm2d
            count += 1
    return count


__all__ = ["SyncBatchNorm2d", "batchnorms_in_training_use", "plain_batchnorm", "sync_batchnorm"]
