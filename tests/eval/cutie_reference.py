"""Test oracle: Cutie's own evaluation pipeline (the installed rf-cutie package) run on CPU, plus small fixtures.

Our evaluator is checked pixel by pixel against what `cutie/eval_vos.py` would write for the same data and weights.
This module only *calls* rf-cutie (MIT licence): `VOSTestDataset` / `VideoReader` read the folders,
`InferenceCore` runs the network, and the first half of `ResultSaver.process` (resize, argmax, id remapping) turns
probabilities into id maps. The only departure from `eval_vos.py` is the device: its `.cuda()` calls and CUDA event
timing are dropped, and the DataLoader reads in the main process (the frames it yields are the same).

Fixtures (`make_davis_fixture`, `make_youtubevos_fixture`) write small videos in the real on-disk layouts that
Cutie's d17-val and y19-val presets read. `make_sharp_cutie` builds Cutie-base with seeded random weights and a
refitted last decoder conv, so that its masks follow the given objects (a plain random network does not).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import _tv_shim  # noqa: F401  (torchvision, which rf-cutie's VideoReader imports, needs it on CPU torch)
from training.evaluate import DAVIS_PALETTE, write_png

warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp.*")

# The sharpening of Cutie's last decoder conv (`mask_decoder.pred`, 3x3, 256 -> 1 logit per object): see
# make_sharp_cutie.
SHARPEN_GAIN = 8.0
SHARPEN_BIAS = 0.0
SHARPEN_RIDGE = 1e-4

DAVIS_SEQUENCES = {"large": (540, 960), "small": (250, 345)}  # name -> (H, W); Cutie reads them sorted
DAVIS_FRAMES = 7
YT_VIDEOS = {  # name -> (H, W, frames, {object id: first frame index})
    "vid_a": (360, 640, 16, {1: 0, 2: 0, 3: 10}),
    "vid_b": (200, 300, 11, {1: 0, 2: 5}),
}


# ---------------------------------------------------------------------------------------------------- fixtures
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth low-frequency colour field plus mild fine-grained texture, float32 (H, W, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        base = 90.0 + 25.0 * c
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 3.0, 2) * 2 * np.pi
            ph = rng.uniform(0, 2 * np.pi)
            base = base + 14.0 * np.sin(fy * yy / h + fx * xx / w + ph)
        bg[..., c] = base
    bg += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    return np.clip(bg, 0, 255)


def _texture(kind: str, h: int, w: int, colour: np.ndarray, period: float) -> np.ndarray:
    """Object-local texture: 'stripes' (diagonal), 'rings' (concentric) or 'checker', modulating a base colour."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes":
        mod = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + xx) / period)
    elif kind == "rings":
        mod = 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(yy - h / 2, xx - w / 2) / period)
    else:
        mod = ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)
    return colour[None, None, :] * (0.65 + 0.35 * mod[..., None])


class _Obj:
    """A moving textured ellipse or rectangle near its own anchor; clamped so that it stays fully in view."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, shape: str, kind: str, colour, anchor, scale: float):
        self.shape = shape
        self.ry = int(rng.uniform(0.12, 0.16) * h * scale)
        self.rx = int(rng.uniform(0.09, 0.13) * w * scale)
        self.cy = (anchor[0] + rng.uniform(-0.04, 0.04)) * h
        self.cx = (anchor[1] + rng.uniform(-0.04, 0.04)) * w
        speed = max(2.0, 0.006 * min(h, w))
        ang = rng.uniform(0, 2 * np.pi)
        self.vy, self.vx = speed * np.sin(ang), speed * np.cos(ang)
        self.h, self.w = h, w
        self.tex = _texture(kind, 2 * self.ry + 1, 2 * self.rx + 1, np.asarray(colour, np.float32),
                            period=max(4.0, self.rx / 3))

    def draw(self, img: np.ndarray, ids: np.ndarray, t: int, obj_id: int) -> None:
        cy = int(round(np.clip(self.cy + self.vy * t, self.ry, self.h - 1 - self.ry)))
        cx = int(round(np.clip(self.cx + self.vx * t, self.rx, self.w - 1 - self.rx)))
        y0, x0 = cy - self.ry, cx - self.rx
        hh, ww = self.tex.shape[:2]
        if self.shape == "ellipse":
            yy, xx = np.mgrid[-self.ry:self.ry + 1, -self.rx:self.rx + 1]
            inside = (yy / max(self.ry, 1)) ** 2 + (xx / max(self.rx, 1)) ** 2 <= 1.0
        else:
            inside = np.ones((hh, ww), bool)
        img[y0:y0 + hh, x0:x0 + ww][inside] = self.tex[inside]
        ids[y0:y0 + hh, x0:x0 + ww][inside] = obj_id


_STYLES = [  # (shape, texture, colour, anchor (y, x) as fractions of the frame) for object ids 1, 2, 3
    ("ellipse", "stripes", (230, 60, 50), (0.3, 0.25)),
    ("rect", "checker", (40, 90, 230), (0.62, 0.72)),
    ("rect", "rings", (250, 220, 40), (0.22, 0.74)),
]


def _video(rng: np.random.Generator, h: int, w: int, t: int, first: dict[int, int]):
    """Frames (uint8 H×W×3) and id maps (uint8 H×W) of a synthetic video; object k exists from frame first[k]."""
    bg = _background(rng, h, w)
    objs = {k: _Obj(rng, h, w, *_STYLES[k - 1], scale=1.0 if k < 3 else 0.8) for k in first}
    frames, masks = [], []
    for i in range(t):
        img = bg.copy()
        ids = np.zeros((h, w), np.uint8)
        for k in sorted(first):  # later ids are drawn on top
            if i >= first[k]:
                objs[k].draw(img, ids, i, k)
        frames.append(np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8))
        masks.append(ids)
    return frames, masks


def _jpg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def make_davis_fixture(root: Path, seed: int = 0) -> Path:
    """DAVIS-2017 val layout under root: sequences `small` (250x345, not a multiple of 16) and `large` (540x960,
    which Cutie resizes to 480x853), 7 frames each, ground-truth PNGs (ids 1, 2) for every frame."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, (h, w) in DAVIS_SEQUENCES.items():
        frames, masks = _video(rng, h, w, DAVIS_FRAMES, {1: 0, 2: 0})
        for i, (img, ids) in enumerate(zip(frames, masks, strict=True)):
            _jpg(root / "JPEGImages" / "480p" / name / f"{i:05d}.jpg", img)
            write_png(root / "Annotations" / "480p" / name / f"{i:05d}.png", ids, DAVIS_PALETTE)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(DAVIS_SEQUENCES) + "\n")
    return root


def make_youtubevos_fixture(root: Path, seed: int = 0) -> Path:
    """YouTube-VOS 2019 valid layout under root, as Cutie's y19-val preset reads it.

    all_frames/valid_all_frames/JPEGImages/<vid>/ holds every frame, valid/JPEGImages/<vid>/ every 5th,
    valid/Annotations/<vid>/ only first-appearance masks (each PNG holds only the objects first given there), and
    valid/meta.json lists, per object, every 5th frame from its first appearance. `vid_a` (360x640, 16 frames): objects
    1, 2 from 00000 and object 3 from 00010. `vid_b` (200x300, 11 frames): object 1 from 00000, object 2 from 00005.
    The full ground truth (every frame) is written to gt_all/<vid>/ for the tests; Cutie never reads it.
    """
    root = Path(root)
    rng = np.random.default_rng(seed + 1000)
    meta: dict[str, Any] = {"videos": {}}
    for vid, (h, w, t, first) in YT_VIDEOS.items():
        frames, masks = _video(rng, h, w, t, first)
        for i, (img, ids) in enumerate(zip(frames, masks, strict=True)):
            stem = f"{i:05d}"
            _jpg(root / "all_frames" / "valid_all_frames" / "JPEGImages" / vid / f"{stem}.jpg", img)
            write_png(root / "gt_all" / vid / f"{stem}.png", ids)
            if i % 5 == 0:
                _jpg(root / "valid" / "JPEGImages" / vid / f"{stem}.jpg", img)
            new = [k for k, f in first.items() if f == i]
            if new:
                assert i % 5 == 0, "first appearances must fall on annotated (every 5th) frames"
                write_png(root / "valid" / "Annotations" / vid / f"{stem}.png",
                          np.where(np.isin(ids, new), ids, 0).astype(np.uint8))
        meta["videos"][vid] = {"objects": {
            str(k): {"category": "x", "frames": [f"{i:05d}" for i in range(f, t, 5)]} for k, f in first.items()}}
    (root / "valid" / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def davis_ground_truth(davis_root: Path) -> dict[str, dict[str, np.ndarray]]:
    ann = Path(davis_root) / "Annotations" / "480p"
    return {seq.name: {p.stem: np.array(Image.open(p)) for p in sorted(seq.glob("*.png"))}
            for seq in sorted(ann.iterdir())}


def youtubevos_ground_truth(yt_root: Path) -> dict[str, dict[str, np.ndarray]]:
    gt = Path(yt_root) / "gt_all"
    return {vid.name: {p.stem: np.array(Image.open(p)) for p in sorted(vid.glob("*.png"))}
            for vid in sorted(gt.iterdir())}


# ---------------------------------------------------------------------------------------------------- network
@contextlib.contextmanager
def no_imagenet_download() -> Iterator[None]:
    """Build rf-cutie's ResNets without their ImageNet weights (no network access; weights are random anyway)."""
    from cutie.model import big_modules

    r18, r50 = big_modules.resnet.resnet18, big_modules.resnet.resnet50
    big_modules.resnet.resnet18 = lambda pretrained=True, **k: r18(False, **k)
    big_modules.resnet.resnet50 = lambda pretrained=True, **k: r50(False, **k)
    try:
        yield
    finally:
        big_modules.resnet.resnet18, big_modules.resnet.resnet50 = r18, r50


def cutie_eval_config(model: str = "base"):
    """Cutie's eval_config.yaml with the model config merged in (what Hydra composes), minus the hydra keys."""
    from cutie.model import big_modules
    from omegaconf import OmegaConf

    cfg_dir = Path(big_modules.__file__).resolve().parents[1] / "config"
    cfg = OmegaConf.load(cfg_dir / "eval_config.yaml")
    cfg.pop("defaults", None)
    cfg.pop("hydra", None)
    cfg.model = OmegaConf.load(cfg_dir / "model" / f"{model}.yaml")
    return cfg


def _calibration_features(network, cfg, clips) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run InferenceCore on in-memory clips; collect, per pixel and object, the relu'd input of
    mask_decoder.pred, a label (1: the object, 2: another object, 0: background) and a track number (clip, object)."""
    from cutie.inference.inference_core import InferenceCore

    feats: list[torch.Tensor] = []
    hook = network.mask_decoder.pred.register_forward_hook(lambda m, i, o: feats.append(F.relu(i[0]).clone()))
    xs, ys, tracks = [], [], []
    try:
        with torch.inference_mode():
            for c, (frames, masks, first) in enumerate(clips):
                core = InferenceCore(network, cfg=cfg)
                known: list[int] = []
                for ti, (img, ids) in enumerate(zip(frames, masks, strict=True)):
                    image = torch.from_numpy(img).permute(2, 0, 1).float() / 255
                    gt = torch.from_numpy(ids).long()
                    new = sorted(k for k, f in first.items() if f == ti)
                    if new:  # first appearances are given as masks holding only the new objects
                        core.step(image, torch.where(torch.isin(gt, torch.tensor(new)), gt, 0), new)
                        known += new
                        continue
                    feats.clear()
                    core.step(image, end=ti == len(frames) - 1)
                    x = feats[0]  # (objects, C, H/4, W/4): frames are multiples of 16, so no padding
                    for j, k in enumerate(known):
                        y = F.interpolate((gt == k).float()[None, None], x.shape[-2:], mode="area")[0, 0] > 0.5
                        xs.append(x[j].flatten(1).T)
                        other = F.interpolate(((gt > 0) & (gt != k)).float()[None, None], x.shape[-2:],
                                              mode="area")[0, 0] > 0.5
                        ys.append(y.flatten().long() + 2 * (other & ~y).flatten().long())
                        tracks.append(torch.full((y.numel(),), 10 * c + k))
    finally:
        hook.remove()
    return torch.cat(xs), torch.cat(ys), torch.cat(tracks)


def make_sharp_cutie(seed: int = 0, *, gain: float = SHARPEN_GAIN, bias: float = SHARPEN_BIAS):
    """Cutie-base with torch.manual_seed(seed) random weights, eval mode, its last decoder conv refitted.

    With random weights the logit of `mask_decoder.pred` differs between an object and the background by only
    ~0.05-0.25 (its sign even varies), so the masks of later frames are near-full frames of one object or
    another; no scaling of that conv or shift of its bias makes them follow the objects. So the conv is
    refitted instead, once: a weighted ridge regression of +-1 targets (this object / not) on its own input
    features (centre tap of the 3x3 kernel and the bias; the other taps are zeroed), collected by running Cutie's
    InferenceCore on two small synthetic calibration clips (own seed; one with a third object given mid-clip).
    Each (clip, object) track's object pixels, other-object pixels and background pixels weigh the same, so the
    fit separates objects from each other and not only from the background. The weights are then multiplied by
    `gain` (sharper probabilities) and `bias` (in target units) is added to the bias. Everything else is
    untouched. Returns (network, cfg); cfg is Cutie's eval_config.yaml with weights None and the d17-val memory
    settings (use_long_term False, mem_every 5).
    """
    from cutie.model.cutie import CUTIE

    cfg = cutie_eval_config("base")
    cfg.weights = None
    cfg.use_long_term = False
    cfg.mem_every = 5
    torch.manual_seed(seed)
    with no_imagenet_download():
        network = CUTIE(cfg).eval()
    rng = np.random.default_rng(10_000 + seed)
    clips = [(*_video(rng, h, w, t, first), first)
             for h, w, t, first in ((240, 336, 5, {1: 0, 2: 0}), (304, 528, 6, {1: 0, 2: 0, 3: 2}))]
    x, label, track = _calibration_features(network, cfg, clips)
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    group = track * 3 + label
    sw = 1.0 / torch.bincount(group).double()[group]
    sw = sw / sw.sum()
    xw = x1 * sw[:, None]
    a = xw.T @ x1 + SHARPEN_RIDGE * torch.eye(x1.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xw.T @ (2 * (label == 1).double() - 1))
    pred = network.mask_decoder.pred
    with torch.no_grad():
        pred.weight.zero_()
        pred.weight[0, :, 1, 1] = (w[:-1] * gain).float()
        pred.bias.fill_(float(w[-1] + bias) * gain)
    return network, cfg


def save_cutie_weights(network: torch.nn.Module, path: Path) -> Path:
    """Save like Cutie's trainer (`torch.save(model.state_dict(), path)`): a plain state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def load_cutie(weights: Path, model: str = "base"):
    """Load weights as eval_vos.py does (`CUTIE(cfg).eval()`, `load_weights(torch.load(path))`), on CPU."""
    from cutie.model.cutie import CUTIE

    cfg = cutie_eval_config(model)
    cfg.weights = str(weights)
    with no_imagenet_download():
        network = CUTIE(cfg).eval()
    network.load_weights(torch.load(weights, map_location="cpu", weights_only=True))
    return network, cfg


# ---------------------------------------------------------------------------------------------------- the oracle
def _run_cfg(cfg, *, flip: bool, use_long_term: bool, mem_every: int, long_term: dict | None, max_mem_frames: int):
    """The cfg eval_vos.py hands InferenceCore after get_dataset_cfg escalated the dataset settings."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    cfg.amp = False
    cfg.flip_aug = flip
    cfg.use_long_term = use_long_term
    cfg.mem_every = mem_every
    cfg.max_mem_frames = max_mem_frames
    if long_term:
        cfg.long_term = OmegaConf.merge(cfg.long_term, long_term)
    return cfg


def _to_ids(prob: torch.Tensor, object_manager, resize_needed: bool, shape) -> np.ndarray:
    """ResultSaver.process up to the uint8 id map (no writer thread, nothing written)."""
    if resize_needed:
        prob = F.interpolate(prob.unsqueeze(1), shape, mode="bilinear", align_corners=False)[:, 0]
    mask = torch.argmax(prob, dim=0)
    new_mask = torch.zeros_like(mask)
    for tmp_id, obj in object_manager.tmp_id_to_obj.items():
        new_mask[mask == tmp_id] = obj.id
    return new_mask.cpu().numpy().astype(np.uint8)


def cutie_reference(image_dir, mask_dir, network, cfg, *, size: int = 480, use_all_masks: bool = False,
                    req_frames_json=None, subset=None, size_dir=None, flip: bool = False,
                    use_long_term: bool = False, mem_every: int = 5, long_term: dict | None = None,
                    max_mem_frames: int = 5, save_all: bool | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Run Cutie's eval_vos.py loop on CPU; returns {video: {frame stem: uint8 (H, W) id map}}.

    Frames are returned where eval_vos.py would save them: `info['save']` (every frame unless req_frames_json
    names some), or every processed frame when save_all is true (None: Cutie's preset, i.e. true without
    req_frames_json, false with it -- both give the same frames). Frames before the first mask are never processed.
    """
    from cutie.inference.data.vos_test_dataset import VOSTestDataset
    from cutie.inference.inference_core import InferenceCore
    from torch.utils.data import DataLoader

    run_cfg = _run_cfg(cfg, flip=flip, use_long_term=use_long_term, mem_every=mem_every, long_term=long_term,
                       max_mem_frames=max_mem_frames)
    if save_all is None:
        save_all = req_frames_json is None
    meta_dataset = VOSTestDataset(
        str(image_dir),
        str(mask_dir),
        use_all_masks=use_all_masks,
        req_frames_json=None if req_frames_json is None else str(req_frames_json),
        size=size,
        size_dir=None if size_dir is None else str(size_dir),
        subset=None if subset is None else str(subset),
    )
    was_training = network.training
    network.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            for vid_reader in meta_dataset.get_datasets():
                loader = DataLoader(vid_reader, batch_size=None, shuffle=False, num_workers=0)
                vid_name = vid_reader.vid_name
                vid_length = len(loader)
                processor = InferenceCore(network, cfg=run_cfg)
                frames: dict[str, np.ndarray] = {}
                first_mask_loaded = False
                for ti, data in enumerate(loader):
                    image = data["rgb"]
                    mask = data.get("mask")
                    valid_labels = data.get("valid_labels")
                    if valid_labels is not None:
                        valid_labels = valid_labels.tolist()
                    info = data["info"]
                    if not first_mask_loaded:
                        if mask is not None:
                            first_mask_loaded = True
                        else:
                            continue
                    prob = processor.step(image, mask, valid_labels, end=(ti == vid_length - 1))
                    if save_all or info["save"]:
                        frames[info["frame"][:-4]] = _to_ids(prob, processor.object_manager,
                                                             info["resize_needed"], info["shape"])
                out[vid_name] = frames
    finally:
        network.train(was_training)
    return out


def davis_reference(davis_root, network, cfg, **kw) -> dict[str, dict[str, np.ndarray]]:
    """Cutie's d17-val preset on a DAVIS-2017 folder."""
    root = Path(davis_root)
    kw.setdefault("size", 480)
    kw.setdefault("use_all_masks", False)
    return cutie_reference(root / "JPEGImages" / "480p", root / "Annotations" / "480p", network, cfg,
                           subset=root / "ImageSets" / "2017" / "val.txt", **kw)


def youtubevos_reference(yt_root, network, cfg, **kw) -> dict[str, dict[str, np.ndarray]]:
    """Cutie's y19-val preset on a YouTube-VOS 2019 valid folder (all frames read, meta.json frames returned)."""
    root = Path(yt_root)
    kw.setdefault("size", 480)
    kw.setdefault("use_all_masks", True)
    return cutie_reference(root / "all_frames" / "valid_all_frames" / "JPEGImages", root / "valid" / "Annotations",
                           network, cfg, req_frames_json=root / "valid" / "meta.json", **kw)


# ---------------------------------------------------------------------------------------------------- long-term memory
@contextlib.contextmanager
def record_long_term_decisions() -> Iterator[dict[str, list[tuple[str, torch.Tensor]]]]:
    """Record the two discrete choices of long-term memory, in Cutie's MemoryManager and in ours: the normalized
    usage each consolidation ranks its candidates by (the most used become prototypes) and the usage each pruning of
    the long-term memory ranks it by (the most used survive). Yields {"cutie": [...], "ours": [...]}, each a list of
    ("prune" | "consolidate", usage (B, L) float64) in Cutie's order (a pruning comes before the consolidation that
    triggered it)."""
    from cutie.inference import kv_memory_store, memory_manager

    from model.inference import memory as ours

    rec: dict[str, list[tuple[str, torch.Tensor]]] = {"cutie": [], "ours": []}
    c_cons = memory_manager.MemoryManager.consolidation
    c_prune = kv_memory_store.KeyValueMemoryStore.remove_obsolete_features
    o_cons, o_prune = ours.MemoryManager._consolidate, ours.MemoryManager._prune

    def cutie_consolidation(self, key, shrinkage, selection, value, usage):
        rec["cutie"].append(("consolidate", usage.detach().double().clone()))
        return c_cons(self, key, shrinkage, selection, value, usage)

    def cutie_prune(self, bucket_id, max_size):
        rec["cutie"].append(("prune", self.get_usage(bucket_id).detach().double().clone()))
        return c_prune(self, bucket_id, max_size)

    def our_consolidate(self, bucket, hw):
        work = bucket.work
        n_cand = work.non_perm - self.min_frames * hw
        cand = work.normalized_usage()[..., work.perm:work.perm + n_cand].double().clone()
        o_cons(self, bucket, hw)  # a pruning it makes is recorded first, as Cutie prunes before consolidating
        if n_cand > 0:
            rec["ours"].append(("consolidate", cand))

    def our_prune(self, long):
        rec["ours"].append(("prune", long.normalized_usage()[..., long.perm:].double().clone()))
        return o_prune(self, long)

    memory_manager.MemoryManager.consolidation = cutie_consolidation
    kv_memory_store.KeyValueMemoryStore.remove_obsolete_features = cutie_prune
    ours.MemoryManager._consolidate, ours.MemoryManager._prune = our_consolidate, our_prune
    try:
        yield rec
    finally:
        memory_manager.MemoryManager.consolidation = c_cons
        kv_memory_store.KeyValueMemoryStore.remove_obsolete_features = c_prune
        ours.MemoryManager._consolidate, ours.MemoryManager._prune = o_cons, o_prune


def compare_long_term_decisions(ours: list, cutie: list, *, num_prototypes: int, keep_after_prune: int) -> None:
    """Assert that both made the same choices: the same number of consolidations and prunings in the same order,
    and per batch row the same set of prototypes / survivors. A failure says where, the usage gap at the rank
    boundary (how near a tie the choice was) and how far apart the two usages are (float noise or a real
    difference)."""
    assert [kind for kind, _ in ours] == [kind for kind, _ in cutie], "consolidations/prunings differ in order"
    for i, ((kind, a), (_, b)) in enumerate(zip(ours, cutie, strict=True)):
        assert a.shape == b.shape, (i, kind, a.shape, b.shape)
        k = min(num_prototypes if kind == "consolidate" else keep_after_prune, a.shape[-1])
        for row in range(a.shape[0]):
            got = set(torch.topk(a[row], k).indices.tolist())
            want = set(torch.topk(b[row], k).indices.tolist())
            if got != want:
                srt = torch.sort(b[row], descending=True).values
                gap = float((srt[k - 1] - srt[k]) / srt[k - 1].abs().clamp(min=1e-12)) if k < len(srt) else 0.0
                diff = float((a[row] - b[row]).abs().max())
                raise AssertionError(
                    f"{kind} #{i} (batch row {row}): {len(got ^ want) // 2} of {k} chosen tokens differ from Cutie's; "
                    f"Cutie's usage gap at rank {k}: {gap:.2e} (relative), largest usage difference ours vs Cutie: "
                    f"{diff:.2e}")
