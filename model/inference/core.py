"""Frame-by-frame propagation (Cutie/S3 inference loop, s3-model-spec section 6), batch-free.

`InferenceCore(network, cfg).step(image, mask, objects)` takes one frame (3, H, W) in [0, 1] and optionally an id map
(H, W) giving objects (the first frame; or objects appearing later) and returns probabilities (num_objects + 1, H, W)
at the input size, channel k + 1 being `core.objects[k]`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.inference.config import InferenceConfig
from model.inference.memory import MemoryManager


def _sensory_dim(network: torch.nn.Module) -> int:
    for owner in (network, getattr(network, "cfg", None)):
        dim = getattr(owner, "sensory_dim", None)
        if dim:
            return int(dim)
    raise AttributeError("the network exposes no `sensory_dim` (nor network.cfg.sensory_dim)")


class InferenceCore:
    def __init__(self, network: torch.nn.Module, cfg: Any = None, **overrides: Any) -> None:
        self.network = network
        self.cfg = InferenceConfig.from_any(cfg, **overrides)
        self.sensory_dim = _sensory_dim(network)
        c = self.cfg
        self.memory = MemoryManager(c.top_k, c.max_mem_frames, c.use_long_term, c.long_max_mem_frames,
                                    c.long_min_mem_frames, c.num_prototypes, c.max_num_tokens, c.buffer_tokens)
        # frames after a memory frame on which the sensory memory is updated (evenly spaced)
        self.stagger = set(np.round(np.linspace(1, c.mem_every, c.stagger_updates)).astype(int).tolist())
        self.clear_memory()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def objects(self) -> list[int]:
        return self.memory.objects

    def clear_memory(self) -> None:
        self.memory.clear()
        self.curr_ti = -1
        self.last_mem_ti = 0
        self.last_prob: torch.Tensor | None = None  # (B, N, Hp, Wp) foreground probabilities of the last frame

    # ------------------------------------------------------------------------------------------------ geometry
    def _work_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.cfg.size
        if s is None or s <= 0:
            return h, w
        scale = s / min(h, w)
        return int(round(h * scale)), int(round(w * scale))

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        d = self.cfg.pad_to
        ph, pw = (d - h % d) % d, (d - w % d) % d
        return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """(C, Hp, Wp) -> (B, C, Hp, Wp); B = 2 with the horizontally flipped copy."""
        x = x[None]
        return torch.cat([x, torch.flip(x, dims=[-1])]) if self.cfg.flip else x

    def _merge_flip(self, p: torch.Tensor) -> torch.Tensor:
        return (p[0] + torch.flip(p[1], dims=[-1])) / 2 if self.cfg.flip else p[0]

    # -------------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self, image: torch.Tensor, mask: torch.Tensor | np.ndarray | None = None,
             objects: list[int] | None = None, *, end: bool = False) -> torch.Tensor:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        dev = self.device
        use_amp = self.cfg.amp and dev.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        self.curr_ti += 1
        h, w = image.shape[-2:]
        wh, ww = self._work_size(h, w)
        img = image.to(dev, torch.float32)
        if (wh, ww) != (h, w):
            img = F.interpolate(img[None], size=(wh, ww), mode="bilinear", align_corners=False)[0]
        img, _ = self._pad(img)
        x = self._batch(img)

        given: torch.Tensor | None = None
        given_ids: list[int] = []
        new_objects: list[int] = []
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).to(dev).long()
            if m.shape != (h, w):
                raise ValueError(f"mask {tuple(m.shape)} does not match the image {h}x{w}")
            ids = sorted(int(i) for i in torch.unique(m).tolist() if i != 0) if objects is None else list(objects)
            if (wh, ww) != (h, w):
                m = F.interpolate(m[None, None].float(), size=(wh, ww), mode="nearest-exact")[0, 0].long()
            m, _ = self._pad(m)
            given = torch.stack([(m == i) for i in ids]).float() if ids else None
            known = set(self.objects)
            new_objects = [i for i in ids if i not in known]
            given_ids = ids

        with amp:
            ms_feat, pix_feat = self.network.encode_image(x)
            key, shrinkage, selection = self.network.transform_key(ms_feat[0])
        is_mem = (mask is not None or self.curr_ti - self.last_mem_ti >= self.cfg.mem_every) and not end

        tracked = self.objects
        fg: torch.Tensor | None = None  # (B, N_tracked, Hp, Wp)
        if tracked and self.memory.engaged():
            update_sensory = (self.curr_ti - self.last_mem_ti) in self.stagger
            fg = self._segment(ms_feat, pix_feat, key, selection, update_sensory=update_sensory)

        all_objects = tracked + new_objects
        if not all_objects:
            self.last_prob = None
            return torch.ones((1, h, w), device=dev)
        prob_fg = torch.zeros((x.shape[0], len(all_objects), *x.shape[-2:]), device=dev)
        if fg is not None:
            prob_fg[:, :len(tracked)] = fg.float()
        if given is not None:
            g = self._batch(given)
            region = g.sum(1, keepdim=True) > 0
            prob_fg = prob_fg.masked_fill(region, 0.0)
            for k, obj in enumerate(given_ids):
                prob_fg[:, all_objects.index(obj)] = torch.maximum(prob_fg[:, all_objects.index(obj)], g[:, k])
        # the flipped branch agrees with the averaged result from here on
        merged_fg = self._merge_flip(prob_fg)
        prob_fg = self._batch(merged_fg)

        if is_mem:
            for obj in new_objects:
                self.memory.sensory[obj] = torch.zeros((x.shape[0], self.sensory_dim, *key.shape[-2:]), device=dev)
            sensory = torch.stack([self.memory.sensory[o] for o in all_objects], 1)
            with amp:
                value, new_sensory, summaries, _ = self.network.encode_mask(
                    x, pix_feat, sensory, prob_fg, deep_update=True, chunk_size=self.cfg.chunk_size)
            values = {o: value[:, k] for k, o in enumerate(all_objects)}
            sums = {o: summaries[:, k] for k, o in enumerate(all_objects)} if summaries is not None else None
            self.memory.add(key, shrinkage, selection, values, sums, new_objects)
            for k, o in enumerate(all_objects):
                self.memory.sensory[o] = new_sensory[:, k].float()
            self.last_mem_ti = self.curr_ti
        self.last_prob = prob_fg

        bg = (1 - merged_fg.sum(0, keepdim=True)).clamp(min=0)
        prob = torch.cat([bg, merged_fg], 0)[:, :wh, :ww]
        if (wh, ww) != (h, w):
            prob = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return prob.float()

    def _segment(self, ms_feat, pix_feat, key, selection, *, update_sensory: bool) -> torch.Tensor:
        objs = self.objects
        readout = self.memory.read(key, selection)
        visual = torch.stack([readout[o] for o in objs], 1).to(pix_feat.dtype)
        sensory = torch.stack([self.memory.sensory[o] for o in objs], 1)
        last = self.last_prob if self.last_prob is not None else torch.zeros(
            (key.shape[0], len(objs), *ms_feat[0].shape[-2:]), device=key.device)
        obj_mem = None
        if self.memory.obj_memory:
            obj_mem = torch.stack([self.memory.obj_memory[o] for o in objs], 1).unsqueeze(2)
        dev = key.device
        use_amp = self.cfg.amp and dev.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with amp:
            pixel = self.network.pixel_fusion(pix_feat, visual, sensory, last, chunk_size=self.cfg.chunk_size)
            mem_readout, _ = self.network.readout_query(pixel, obj_mem)
            new_sensory, _, prob = self.network.segment(ms_feat, mem_readout, sensory, chunk_size=self.cfg.chunk_size,
                                                        update_sensory=update_sensory)
        if update_sensory:
            for k, o in enumerate(objs):
                self.memory.sensory[o] = new_sensory[:, k].float()
        return prob[:, 1:]

    # ------------------------------------------------------------------------------------------------ helpers
    def to_id_map(self, prob: torch.Tensor) -> np.ndarray:
        """(N+1, H, W) probabilities -> (H, W) uint8 map of the object ids."""
        lut = torch.tensor([0, *self.objects], device=prob.device)
        return lut[prob.argmax(0)].to(torch.uint8).cpu().numpy()
