"""ClipTrainer: the 8-frame clip forward of Cutie / S3 training (spec section 3) and its losses.

    trainer = ClipTrainer(network, cfg)
    out = trainer(batch)       # batch dict of docs/architecture.md section 3
    out["total_loss"].backward()

1. All frames are encoded at once; keys, shrinkage and selection in fp32.
   Precision: run it inside `training.optim.forward_context(cfg, device)` (torch.autocast bf16 on fp32
   parameters); inputs stay fp32 (`dtype` below is the parameters' dtype). The fp32 islands: key projection,
   memory affinity and readout, the deformable sampling, the GRUs, the aggregation of the logits and the losses
   (all logits are cast to fp32 before sigmoid / soft aggregation / CE / Dice).
2. Frame 0 is encoded with its ground truth (mask values, sensory memory, object summaries).
3. Frames 1..T-1: the memory read uses all previous frames while ti <= num_ref_frames, then num_ref_frames random
   previous frames per sample (`torch.randperm`); the object memory always sums all previous frames. The
   predicted soft masks (not the ground truth) feed back as the last mask and, before the last frame, as new
   memory; the mask encoder's sensory deep update happens with probability deep_update_prob.
4. Losses on frames 1..T-1: point-sampled CE + soft Dice, and the sensory / query auxiliary losses (weight 0.01).

Every random choice (reference frames, deep update, loss points) comes from torch's global RNG, so
`torch.manual_seed` before a call reproduces it.

The trainer registers the network's modules as its own children, so its `state_dict()` has exactly the network's
keys (a DeepSpeed checkpoint of the trainer loads into a bare `S3Network`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from model.losses import LossComputer
from model.network import S3Network, pad_to_multiple

BATCH_KEYS = ("rgb", "cls_gt", "first_frame_gt", "selector")


def _check_batch(batch: dict[str, Any], num_frames_min: int = 2) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"training batch lacks key(s) {missing} (docs/architecture.md section 3)")
    rgb, cls_gt, first, selector = (batch[k] for k in BATCH_KEYS)
    if rgb.ndim != 5 or rgb.shape[2] != 3:
        raise ValueError(f"batch['rgb'] must be (B, T, 3, H, W), got {tuple(rgb.shape)}")
    b, t, _, h, w = rgb.shape
    if t < num_frames_min:
        raise ValueError(f"batch['rgb'] has {t} frames; a clip needs at least {num_frames_min}")
    if tuple(cls_gt.shape) != (b, t, 1, h, w):
        raise ValueError(f"batch['cls_gt'] must be {(b, t, 1, h, w)}, got {tuple(cls_gt.shape)}")
    if first.ndim != 5 or first.shape[0] != b or first.shape[1] != 1 or tuple(first.shape[-2:]) != (h, w):
        raise ValueError(f"batch['first_frame_gt'] must be (B, 1, N, H, W), got {tuple(first.shape)}")
    if tuple(selector.shape) != (b, first.shape[2]):
        raise ValueError(f"batch['selector'] must be {(b, first.shape[2])}, got {tuple(selector.shape)}")


class ClipTrainer(nn.Module):
    def __init__(self, network: S3Network, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "network", network)  # not a registered child: no "network." key prefix
        for name, child in network.named_children():
            self.add_module(name, child)
        self.cfg = cfg if cfg is not None else network.cfg
        self.num_ref_frames = self.cfg.num_ref_frames
        self.deep_update_prob = self.cfg.deep_update_prob
        self.loss_computer = LossComputer(self.cfg.loss)

    def train(self, mode: bool = True) -> ClipTrainer:
        super().train(mode)
        self.network.train(mode)
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        _check_batch(batch)
        net = self.network
        rgb = batch["rgb"]
        b, t, _, h, w = rgb.shape
        dtype = next(self.parameters()).dtype
        selector_flat = batch["selector"].float()
        num_objects = [int(round(float(s))) for s in selector_flat.sum(1)]
        for bi, n in enumerate(num_objects):
            if n < 1 or not bool((selector_flat[bi, :n] == 1).all()):
                raise ValueError(f"batch['selector'][{bi}] = {selector_flat[bi].tolist()}: expected 1 for the first "
                                 "k >= 1 object slots and 0 for padding")
        selector = selector_flat.view(b, -1, 1, 1).to(dtype)

        frames = pad_to_multiple(rgb.to(dtype), net.pad_to)  # B, T, 3, Hp, Wp
        first_gt = pad_to_multiple(batch["first_frame_gt"][:, 0].to(dtype), net.pad_to)  # B, N, Hp, Wp
        n_obj = first_gt.shape[1]

        ms_flat, pix_flat = net.encode_image(frames.flatten(0, 1))
        keys, shrinkages, selections = net.transform_key(ms_flat[0])  # fp32 (KeyProjection leaves autocast)
        gh, gw = keys.shape[-2:]

        def per_time(x: torch.Tensor) -> torch.Tensor:  # (B·T, C, h, w) -> (B, C, T, h, w)
            return x.view(b, t, *x.shape[1:]).transpose(1, 2)

        keys, shrinkages, selections = per_time(keys), per_time(shrinkages), per_time(selections)
        ms_feat = [f.view(b, t, *f.shape[1:]) for f in ms_flat]
        pix_feat = pix_flat.view(b, t, *pix_flat.shape[1:])

        sensory = torch.zeros(b, n_obj, net.sensory_dim, gh, gw, device=frames.device, dtype=dtype)
        value, sensory, summaries, _ = net.encode_mask(frames[:, 0], pix_feat[:, 0], sensory, first_gt)
        masks = first_gt
        values = value.unsqueeze(3)  # B, N, CV, T, h, w
        obj_memory = summaries.unsqueeze(2)  # B, N, T, Q, C + 1

        all_logits, all_aux = [], []
        for ti in range(1, t):
            if ti <= self.num_ref_frames:
                ref_values, ref_keys, ref_shrinkages = values, keys[:, :, :ti], shrinkages[:, :, :ti]
            else:
                picks = [torch.randperm(ti)[:self.num_ref_frames].to(frames.device) for _ in range(b)]
                ref_values = torch.stack([values[bi][:, :, picks[bi]] for bi in range(b)])
                ref_keys = torch.stack([keys[bi][:, picks[bi]] for bi in range(b)])
                ref_shrinkages = torch.stack([shrinkages[bi][:, picks[bi]] for bi in range(b)])
            readout, aux_inputs = net.read_memory(keys[:, :, ti], selections[:, :, ti], ref_keys, ref_shrinkages,
                                                  ref_values, obj_memory, pix_feat[:, ti], sensory, masks,
                                                  selector)
            aux = net.compute_aux(pix_feat[:, ti], aux_inputs, selector)
            sensory, logits, prob = net.segment([f[:, ti] for f in ms_feat], readout, sensory, selector=selector)
            masks = prob[:, 1:].to(dtype)
            all_logits.append(logits)
            all_aux.append(aux)
            if ti < t - 1:
                deep_update = bool(torch.rand(()) < self.deep_update_prob)
                value, sensory, summaries, _ = net.encode_mask(frames[:, ti], pix_feat[:, ti], sensory, masks,
                                                               deep_update=deep_update)
                values = torch.cat([values, value.unsqueeze(3)], 3)
                obj_memory = torch.cat([obj_memory, summaries.unsqueeze(2)], 2)

        # supervise at the input size (crop the padding)
        all_logits = [lg[..., :h, :w] for lg in all_logits]
        cls_gt = batch["cls_gt"][:, 1:].long()
        extent = (h / frames.shape[-2], w / frames.shape[-1])
        out = self.loss_computer.compute(all_logits, all_aux, cls_gt, num_objects, extent)
        logits = torch.stack(all_logits, 1).detach()  # B, T-1, N+1, H, W
        out["logits"] = logits
        out["masks"] = torch.softmax(logits, dim=2)
        return out
