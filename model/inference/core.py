"""Frame-by-frame propagation (Cutie/S3 inference loop, s3-model-spec section 6), batch-free.

`InferenceCore(network, cfg).step(image, mask, objects)` takes one frame (3, H, W) in [0, 1] and optionally an id map
(H, W) giving objects (the first frame; or objects appearing later) and returns probabilities (num_objects + 1, H, W)
at the input size (or `out_size`), channel k + 1 being `core.objects[k]`.

Geometry and merging follow Cutie's evaluation pipeline to the pixel (eval-protocols.md section 1): Cutie's resize
rule, centred zero padding before normalisation, probabilities resized back before the argmax, Cutie's merge of a
mask given after the first frame.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.inference.config import InferenceConfig
from model.inference.memory import MemoryManager
from model.modules.group import soft_aggregate


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
        # frames after a memory frame on which the sensory memory is updated (Cutie: every frame when
        # stagger_updates >= mem_every, else evenly spaced)
        if c.stagger_updates >= c.mem_every:
            self.stagger = set(range(1, c.mem_every + 1))
        else:
            self.stagger = set(np.round(np.linspace(1, c.mem_every, c.stagger_updates)).astype(int).tolist())
        net_pad = int(getattr(network, "pad_to", 0) or getattr(getattr(network, "cfg", None), "pad_to", 0) or 1)
        # pad to the preset's multiple (Cutie 16, S3 32), and to what the network needs if that is coarser
        self.pad_to = math.lcm(c.pad_to, net_pad)
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
        self.unmemorised: list[int] = []
        self.last_prob: torch.Tensor | None = None  # (B, N, Hp, Wp) foreground probabilities of the last frame

    # ------------------------------------------------------------------------------------------------ geometry
    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        return pad_centered(x, self.pad_to)

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """(C, Hp, Wp) -> (B, C, Hp, Wp); B = 2 with the horizontally flipped copy."""
        x = x[None]
        return torch.cat([x, torch.flip(x, dims=[-1])]) if self.cfg.flip else x

    def _merge_flip(self, p: torch.Tensor) -> torch.Tensor:
        return (p[0] + torch.flip(p[1], dims=[-1])) / 2 if self.cfg.flip else p[0]

    # -------------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self, image: torch.Tensor, mask: torch.Tensor | np.ndarray | None = None,
             objects: list[int] | None = None, *, end: bool = False,
             out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One frame, as Cutie's eval pipeline runs it (eval-protocols.md section 1).

        image (3, H, W) in [0, 1] at the input resolution; mask (H, W) object ids or None; objects: the ids of
        the mask (default: its unique non-zero values). The frame is resized by Cutie's rule (bilinear with
        antialias; masks by pixel-centre nearest), zero-padded on all sides to a multiple of `pad_to`, and the
        probabilities (N + 1, *out_size) come back resized bilinearly (align_corners=False) to `out_size`
        (default (H, W)). A mask for objects already tracked replaces their prediction; pixels it leaves at 0
        keep the prediction (Cutie's merge)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        dev = self.device
        use_amp = self.cfg.amp and dev.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        self.curr_ti += 1
        h, w = image.shape[-2:]
        oh, ow = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
        wh, ww = working_size(h, w, self.cfg.size, (oh, ow))
        img = image.to(dev, torch.float32)
        if (wh, ww) != (h, w):
            img = F.interpolate(img[None], size=(wh, ww), mode="bilinear", align_corners=False, antialias=True)[0]
        img, pad = self._pad(img)
        x = self._batch(img)

        m: torch.Tensor | None = None
        ids: list[int] = []
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).to(dev).long()
            if m.shape != (h, w):
                raise ValueError(f"mask {tuple(m.shape)} does not match the image {h}x{w}")
            ids = sorted(int(i) for i in torch.unique(m).tolist() if i != 0) if objects is None else list(objects)
            if (wh, ww) != (h, w):
                m = resize_nearest(m, (wh, ww))
            m, _ = self._pad(m)
        known = self.objects
        new_objects = [i for i in ids if i not in known]
        # Cutie: segment when there is no mask, or when the mask brings new objects while others are tracked
        need_segment = m is None or (bool(known) and bool(new_objects))
        is_mem = (m is not None or self.curr_ti - self.last_mem_ti >= self.cfg.mem_every) and not end
        update_sensory = (self.curr_ti - self.last_mem_ti) in self.stagger and not end

        with amp:
            ms_feat, pix_feat = self.network.encode_image(x)
            key, shrinkage, selection = self.network.transform_key(ms_feat[0])

        pred: torch.Tensor | None = None  # (N + 1, Hp, Wp) probabilities with background
        if need_segment and known and self.memory.engaged():
            pred = self._segment(ms_feat, pix_feat, key, selection, update_sensory=update_sensory)

        if m is not None:
            if need_segment:
                fg = pred[1:].clone() if pred is not None else x.new_zeros((len(known), *x.shape[-2:]))
                fg[:, m > 0] = 0  # mutual exclusion with the given objects
                for obj in ids:
                    if obj in known:
                        fg[known.index(obj)] = (m == obj).float()
                fg = torch.cat([fg, *[(m == obj).float()[None] for obj in new_objects]], 0)
            else:
                fg = torch.stack([(m == obj) for obj in known + new_objects]).float() if ids else None
            if fg is None or fg.shape[0] == 0:
                self.last_prob = None
                return torch.ones((1, oh, ow), device=dev)
            pred = torch.softmax(soft_aggregate(fg, dim=0), dim=0)
        elif pred is None:  # nothing tracked yet
            self.last_prob = None
            return torch.ones((1, oh, ow), device=dev)
        all_objects = known + new_objects
        prob_fg = self._batch(pred[1:])
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
        else:  # objects first given on the last frame are output but never memorised (Cutie does the same)
            self.unmemorised += new_objects
        self.last_prob = prob_fg

        prob = unpad(pred, pad)
        if (wh, ww) != (oh, ow):
            prob = F.interpolate(prob[None], size=(oh, ow), mode="bilinear", align_corners=False)[0]
        return prob.float()

    def _segment(self, ms_feat, pix_feat, key, selection, *, update_sensory: bool) -> torch.Tensor:
        """Read the memory and decode: (N + 1, Hp, Wp) probabilities, the flipped branch averaged in.

        As in Cutie, the pixel fusion and the object transformer run per bucket (objects registered together):
        the "other objects" mask an object sees holds only the objects of its own bucket."""
        objs = self.objects
        readout = self.memory.read(key, selection)
        dev = key.device
        use_amp = self.cfg.amp and dev.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        fused: dict[int, torch.Tensor] = {}
        for bucket in self.memory.buckets:
            group = bucket.objects
            visual = torch.stack([readout[o] for o in group], 1).to(pix_feat.dtype)
            sensory = torch.stack([self.memory.sensory[o] for o in group], 1)
            if self.last_prob is not None:
                last = self.last_prob[:, [objs.index(o) for o in group]]
            else:
                last = torch.zeros((key.shape[0], len(group), *ms_feat[0].shape[-2:]), device=dev)
            obj_mem = None
            if self.memory.obj_memory:
                obj_mem = torch.stack([self.memory.obj_memory[o] for o in group], 1).unsqueeze(2)
            with amp:
                pixel = self.network.pixel_fusion(pix_feat, visual, sensory, last, chunk_size=self.cfg.chunk_size)
                mem_readout, _ = self.network.readout_query(pixel, obj_mem)
            for k, o in enumerate(group):
                fused[o] = mem_readout[:, k]
        mem_readout = torch.stack([fused[o] for o in objs], 1)
        sensory = torch.stack([self.memory.sensory[o] for o in objs], 1)
        with amp:
            new_sensory, _, prob = self.network.segment(ms_feat, mem_readout, sensory, chunk_size=self.cfg.chunk_size,
                                                        update_sensory=update_sensory)
        if update_sensory:
            for k, o in enumerate(objs):
                self.memory.sensory[o] = new_sensory[:, k].float()
        return self._merge_flip(prob.float())

    # ------------------------------------------------------------------------------------------------ helpers
    def to_id_map(self, prob: torch.Tensor) -> np.ndarray:
        """(N+1, H, W) probabilities -> (H, W) uint8 map of the object ids."""
        lut = torch.tensor([0, *self.objects, *self.unmemorised], device=prob.device)
        return lut[prob.argmax(0)].to(torch.uint8).cpu().numpy()


def working_size(h: int, w: int, size: int | None, out_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """torchvision `Resize(size)` as Cutie's VideoReader applies it: only when the output size differs from the
    input or the short side is strictly above `size`; short side -> size, long side int(size * long / short)."""
    needed = (out_size is not None and tuple(out_size) != (h, w)) or (size is not None and 0 < size < min(h, w))
    if not needed:
        return h, w
    if size is None or size <= 0:
        return int(out_size[0]), int(out_size[1])  # type: ignore[index]
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_nearest(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's NEAREST resize of an id map (pixel-centre sampling: source index floor((i + 0.5) * in / out)),
    as Cutie's VideoReader resizes masks."""
    h, w = m.shape[-2:]
    oh, ow = size
    rows = ((torch.arange(oh, dtype=torch.float64) + 0.5) * (h / oh)).floor().long().clamp_(max=h - 1)
    cols = ((torch.arange(ow, dtype=torch.float64) + 0.5) * (w / ow)).floor().long().clamp_(max=w - 1)
    return m[..., rows.to(m.device)[:, None], cols.to(m.device)[None, :]]


def pad_centered(x: torch.Tensor, d: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad the last two axes to multiples of d, floor(pad/2) on the top/left and the rest bottom/right
    (Cutie's pad_divide_by). Returns (padded, (left, right, top, bottom))."""
    h, w = x.shape[-2:]
    ph, pw = (d - h % d) % d, (d - w % d) % d
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pad) if ph or pw else x), pad


def unpad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]
