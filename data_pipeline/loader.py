"""Streaming training loader: WebDataset clip shards → augmented batches (docs/architecture.md sections 2 and 3).

Design: **the iteration drives everything**. Batch number `i` of rank `r` is a pure function of
(seed, r, i, the shard files), so a loader's whole state is the number of batches it handed out, every rank yields
exactly as many batches as asked (no rank runs dry: the stream is infinite and resampled), and a resumed loader
draws the very batches the uninterrupted one would have drawn.

* Curriculum: `max_skip` [5, 10, 15, 5] until `max_skip_until` [0.1, 0.3, 0.8, 1.0] of `total_iterations`; batch
  `i` reads the `skipNN` shard set of the level in force at `i` (`level_at(i)`), on every rank, also after resume.
* Streams: batch `i` belongs to lane `i mod W` (W = DataLoader workers, one lane per worker, batches come back in
  order). A lane reads, per curriculum level and per block of `block_clips` clips, an infinite stream of
  shard visits: each visit draws a shard **with replacement** (resampled) with an RNG seeded by
  (seed, rank, lane, level, block, visit) and reads that shard's samples in a seeded random order. Batch `i`
  takes the next `batch_size` clips of its lane's stream; resuming re-derives the position by arithmetic and
  skips forward reading tar headers only.
* Shards are read with `tarfile` on the local file with seeks (WebDataset's key/extension rule: the key is the
  basename before the first dot), only `NN.jpg`, `NN.png` and `json` members are ever read: nothing is unpickled.
* A malformed sample is replaced by the next good one of the same shard visit, a truncated shard is dropped;
  both are logged with a warning naming the sample/shard and counted (`stats()`, `state_dict()["skipped"]`).
* `build_eval_loader` is a finite, non-resampled `webdataset.WebDataset` split by node and worker.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from data_pipeline import augment as A
from data_pipeline.readers.base import ids_present

log = logging.getLogger("data_pipeline.loader")

KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset tariterators.base_plus_ext
FIELD_RE = re.compile(r"^(?:(\d+)\.(jpg|png)|json)$")
LEVELS_DIR = "skip{:02d}"


class BadSample(ValueError):
    pass


class BadShard(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- shard files


def level_name(max_skip: int) -> str:
    return LEVELS_DIR.format(max_skip)


def list_shards(root: Path, level: str) -> list[Path]:
    d = root / level
    if not d.is_dir():
        raise FileNotFoundError(f"shard level folder {d} is missing (the curriculum needs it; run data_pipeline.shard)")
    shards = sorted(d.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {d}")
    return shards


def shard_end_ok(path: Path) -> str | None:
    """O(1) integrity check: a complete tar is a whole number of 512-byte blocks ending in zero blocks."""
    try:
        size = path.stat().st_size
        if size < 1024 or size % 512:
            return f"size {size} is not a whole number of tar blocks (truncated?)"
        with open(path, "rb") as f:
            f.seek(size - 1024)
            if any(f.read(1024)):
                return "no end-of-archive marker (truncated?)"
    except OSError as e:
        return f"unreadable: {e}"
    return None


def scan_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Headers only: [(key, {field: (data offset, size)})] in tar order. Raises BadShard when truncated."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise BadShard(f"member {m.name} runs past the end of the file (truncated)")
                mt = KEY_RE.match(m.name)
                if not mt:
                    continue
                key, field = mt.group(1), mt.group(2).lower()
                if not FIELD_RE.match(field):
                    continue  # never read members the project does not write (.pyd, .pth, ...)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][field] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadShard(f"{type(e).__name__}: {e}") from e
    return samples


def decode_sample(fh, key: str, fields: dict[str, tuple[int, int]], num_frames: int):
    """Read and check one clip: (frames uint8 (T,H,W,3) RGB, masks uint8 (T,H,W), meta). Raises BadSample."""

    def read(field: str) -> bytes:
        off, n = fields[field]
        fh.seek(off)
        data = fh.read(n)
        if len(data) != n:
            raise BadSample(f"member {key}.{field} is cut short")
        return data

    if "json" not in fields:
        raise BadSample("no .json member")
    try:
        meta = json.loads(read("json"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"unreadable json: {e}") from e
    if not isinstance(meta, dict):
        raise BadSample("json is not an object")
    for k in ("frames", "object_ids"):
        if not isinstance(meta.get(k), list):
            raise BadSample(f"json has no list '{k}'")
    frames, masks = [], []
    for t in range(num_frames):
        jf, pf = f"{t:02d}.jpg", f"{t:02d}.png"
        if jf not in fields or pf not in fields:
            raise BadSample(f"frame {t} is missing ({jf}/{pf}); the loader needs {num_frames} frames")
        img = cv2.imdecode(np.frombuffer(read(jf), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise BadSample(f"{jf} is not a decodable JPEG")
        try:
            with Image.open(io.BytesIO(read(pf))) as im:
                if im.format != "PNG" or im.mode not in ("L", "P"):
                    raise BadSample(f"{pf} is not a single-channel PNG (format {im.format}, mode {im.mode})")
                mask = np.asarray(im)
        except (OSError, SyntaxError) as e:
            raise BadSample(f"{pf} is not a decodable PNG: {e}") from e
        if mask.shape != img.shape[:2]:
            raise BadSample(f"{pf} is {mask.shape[1]}x{mask.shape[0]} but {jf} is {img.shape[1]}x{img.shape[0]}")
        if frames and img.shape != frames[0].shape:
            raise BadSample(f"{jf} is {img.shape[1]}x{img.shape[0]}, frame 00 is "
                            f"{frames[0].shape[1]}x{frames[0].shape[0]}")
        frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        masks.append(mask.astype(np.uint8, copy=False))
    f, m = np.stack(frames), np.stack(masks)
    if not m[0].any():
        raise BadSample("frame 0 has no object")
    return f, m, meta


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    total_iterations: int
    num_frames: int = 8
    num_objects: int = 3
    crop_size: int = 480
    max_skip: tuple[int, ...] = (5, 10, 15, 5)
    max_skip_until: tuple[float, ...] = (0.1, 0.3, 0.8, 1.0)
    num_workers: int = 2
    seed: int = 42
    block_clips: int = 256  # clips a lane reads from one stream before re-seeding (bounds resume fast-forward)
    cache_shards: int = 64  # shard header indexes kept per worker

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"loader 'batch_size' must be >= 1, got {self.batch_size!r}")
        if self.total_iterations < 1:
            raise ValueError(f"loader 'total_iterations' must be >= 1, got {self.total_iterations!r}")
        if self.num_frames < 1:
            raise ValueError(f"loader 'num_frames' must be >= 1, got {self.num_frames!r}")
        if len(self.max_skip) != len(self.max_skip_until) or not self.max_skip:
            raise ValueError(f"data.max_skip {list(self.max_skip)} and data.max_skip_until "
                             f"{list(self.max_skip_until)} must be non-empty lists of the same length")
        if list(self.max_skip_until) != sorted(self.max_skip_until) or self.max_skip_until[-1] < 1.0:
            raise ValueError(f"data.max_skip_until must increase and end at >= 1.0, got {list(self.max_skip_until)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers!r}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0 for the loader's seeded streams, got {self.seed!r}")

    def level_at(self, iteration: int) -> int:
        """Index into max_skip of the curriculum level in force at `iteration` (Cutie: it >= fraction × total)."""
        for idx, frac in enumerate(self.max_skip_until):
            if iteration < frac * self.total_iterations:
                return idx
        return len(self.max_skip) - 1

    def boundaries(self) -> list[int]:
        """First iteration of each level after the first."""
        return [math.ceil(f * self.total_iterations) for f in self.max_skip_until[:-1]]


def _lanes(cfg: LoaderConfig) -> int:
    return max(1, cfg.num_workers)


def _block_batches(cfg: LoaderConfig) -> int:
    return max(1, cfg.block_clips // cfg.batch_size)


# ----------------------------------------------------------------------------------------------- streams


class _Lane:
    """All batches of one (rank, lane): iterations i ≡ lane (mod lanes)."""

    def __init__(self, cfg: LoaderConfig, shards: dict[int, list[Path]], rank: int, lane: int,
                 params: A.AugmentParams):
        self.cfg, self.shards, self.rank, self.lane, self.params = cfg, shards, rank, lane, params
        self.index_cache: OrderedDict[Path, list] = OrderedDict()
        self.bad_shards: set[Path] = set()
        self.bad_samples: set[tuple[Path, str]] = set()
        self.handles: OrderedDict[Path, Any] = OrderedDict()
        self.stream_key: tuple[int, int] | None = None
        self.stream: Iterator | None = None
        self.stream_pos = 0  # draws taken from `stream` so far
        self.skipped = 0

    # -- shard access
    def _index(self, path: Path) -> list:
        if path in self.bad_shards:
            return []
        if path in self.index_cache:
            self.index_cache.move_to_end(path)
            return self.index_cache[path]
        try:
            idx = scan_shard(path)
        except (BadShard, OSError) as e:
            log.warning("skipping shard %s: %s", path, e)
            self.bad_shards.add(path)
            self.skipped += 1
            return []
        self.index_cache[path] = idx
        while len(self.index_cache) > self.cfg.cache_shards:
            self.index_cache.popitem(last=False)
        return idx

    def _handle(self, path: Path):
        if path in self.handles:
            self.handles.move_to_end(path)
            return self.handles[path]
        fh = open(path, "rb")  # noqa: SIM115 - kept open across batches, closed on eviction
        self.handles[path] = fh
        while len(self.handles) > 8:
            self.handles.popitem(last=False)[1].close()
        return fh

    def _visits(self, level: int, block: int) -> Iterator[tuple[Path, list, int]]:
        """Infinite resampled stream of (shard, its index, sample position) for one (level, block)."""
        urls = self.shards[level]
        empty_in_a_row = 0
        visit = 0
        while True:
            rng = np.random.default_rng([self.cfg.seed, 11, self.rank, self.lane, level, block, visit])
            visit += 1
            path = urls[int(rng.integers(len(urls)))]
            idx = self._index(path)
            if not idx:
                empty_in_a_row += 1
                if empty_in_a_row > 50 * len(urls):
                    raise RuntimeError(f"no readable sample in any shard of {path.parent}")
                continue
            empty_in_a_row = 0
            for pos in rng.permutation(len(idx)):
                yield path, idx, int(pos)

    def _position(self, iteration: int, level: int) -> tuple[int, int]:
        """(block, number of clips this lane's (level, block) stream gave out before `iteration`)."""
        lanes, kb = _lanes(self.cfg), _block_batches(self.cfg)
        k = iteration // lanes
        block = k // kb
        before = sum(1 for k2 in range(block * kb, k) if self.cfg.level_at(k2 * lanes + self.lane) == level)
        return block, before * self.cfg.batch_size

    def _draws(self, iteration: int, level: int) -> Iterator[tuple[Path, list, int]]:
        block, pos = self._position(iteration, level)
        if self.stream_key != (level, block) or self.stream_pos != pos:
            self.stream = self._visits(level, block)
            for _ in range(pos):  # fast-forward: headers only, no decoding
                next(self.stream)
            self.stream_key, self.stream_pos = (level, block), pos
        return self.stream

    def _next_draw(self) -> tuple[Path, list, int]:
        self.stream_pos += 1
        return next(self.stream)

    # -- clips
    def _load(self, path: Path, idx: list, pos: int):
        """The clip at `pos`, or the next good one of the same shard; None when the shard has no good sample."""
        for step in range(len(idx)):
            key, fields = idx[(pos + step) % len(idx)]
            if (path, key) in self.bad_samples:  # warned about once already; still counted
                self.skipped += 1
                continue
            try:
                frames, masks, meta = decode_sample(self._handle(path), key, fields, self.cfg.num_frames)
                return key, frames, masks, meta
            except (BadSample, OSError) as e:
                log.warning("skipping sample %s in shard %s: %s", key, path, e)
                self.bad_samples.add((path, key))
                self.skipped += 1
        return None

    def _clip(self, rng: np.random.Generator, level: int) -> dict[str, Any]:
        p = self.params
        while True:
            path, idx, pos = self._next_draw()
            loaded = self._load(path, idx, pos)
            if loaded is None:
                continue
            key, frames, masks, meta = loaded
            frames, masks, reversed_ = A.maybe_reverse(rng, frames, masks, p)
            try:
                frames, masks = A.geometric(rng, frames, masks, p)
            except A.NoObjectError:
                continue  # deterministic: the next draw of the same stream
            mapping: dict[int, int] = {}
            n_first = len(ids_present(masks[0]))
            if n_first < p.num_objects and rng.random() < p.merge_probability and len(idx) > 1:
                other = (pos + 1 + int(rng.integers(len(idx) - 1))) % len(idx)
                second = self._load(path, idx, other)
                if second is not None and second[0] != key:
                    f2, m2, _ = second[1], second[2], second[3]
                    f2, m2, _ = A.maybe_reverse(rng, f2, m2, p)
                    try:
                        f2, m2 = A.geometric(rng, f2, m2, p)
                        frames, masks, mapping = A.merge(frames, masks, f2, m2)
                    except A.NoObjectError:
                        pass
            objects = A.choose_objects(rng, masks[0], p.num_objects)
            rgb = A.colour(rng, frames, p)
            return {"rgb": rgb, "cls": A.slot_maps(masks, objects), "objects": objects,
                    "info": {"key": key, "dataset": meta.get("dataset"), "video": meta.get("video"),
                             "frames": meta.get("frames") if not reversed_ else list(meta["frames"])[::-1],
                             "object_ids": objects, "level": level_name(self.cfg.max_skip[level]),
                             "reversed": reversed_, "merged_ids": {str(v): k for k, v in mapping.items()},
                             "shard": f"{path.parent.name}/{path.name}"}}

    def batch(self, iteration: int) -> dict[str, Any]:
        level = self.cfg.level_at(iteration)
        self._draws(iteration, level)
        clips = []
        for slot in range(self.cfg.batch_size):
            rng = np.random.default_rng([self.cfg.seed, 23, self.rank, iteration, slot])
            clips.append(self._clip(rng, level))
        out = collate(clips)
        out["info"] = [dict(c["info"], iteration=iteration) for c in clips]
        return out

    def close(self):
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()


def collate(clips: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clips into the batch dict of docs/architecture.md section 3; objects padded to the batch max."""
    n = max(1, max(len(c["objects"]) for c in clips))
    rgb = torch.from_numpy(np.stack([c["rgb"] for c in clips]))  # clips are already (T, 3, H, W) float32
    cls = torch.from_numpy(np.stack([c["cls"] for c in clips])).long()[:, :, None]  # (B, T, 1, H, W) int64
    b, _, _, h, w = cls.shape
    first = torch.zeros(b, 1, n, h, w, dtype=torch.float32)
    selector = torch.zeros(b, n, dtype=torch.float32)
    for i, c in enumerate(clips):
        for k in range(len(c["objects"])):
            first[i, 0, k] = (cls[i, 0, 0] == k + 1).float()
            selector[i, k] = 1.0
    return {"rgb": rgb, "cls_gt": cls.long(), "first_frame_gt": first, "selector": selector,
            "info": [c["info"] for c in clips]}


# ----------------------------------------------------------------------------------------------- loader


class _Batches(torch.utils.data.IterableDataset):
    """Worker w of W yields (iteration, batch, skipped-so-far) for iterations start + w, start + w + W, ..."""

    def __init__(self, cfg, shards, rank, params, start, stop):
        super().__init__()
        self.cfg, self.shards, self.rank, self.params, self.start, self.stop = cfg, shards, rank, params, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if info is not None:
            cv2.setNumThreads(1)  # one core per DataLoader worker
        lanes = _lanes(self.cfg)
        # with W workers each worker owns one lane; in-process (0 workers) the one lane is lane 0 of 1
        it = self.start + w
        lane = _Lane(self.cfg, self.shards, self.rank, it % lanes, self.params)
        try:
            while self.stop is None or it < self.stop:
                before = lane.skipped
                batch = lane.batch(it)
                yield it, batch, lane.skipped - before
                it += n_workers
        finally:
            lane.close()


class TrainLoader:
    """Iterable of training batches for one rank; `iter()` continues from the last batch handed out."""

    def __init__(self, shard_root: str | os.PathLike, cfg: LoaderConfig, rank: int, world_size: int,
                 params: A.AugmentParams):
        self.root, self.cfg, self.rank, self.world_size, self.params = Path(shard_root), cfg, rank, world_size, params
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.shards: shard root {self.root} does not exist")
        self.iteration = 0
        self.infinite = False
        self.skipped = 0
        self.bad_shards: list[str] = []
        self.shards: dict[int, list[Path]] = {}
        for li, skip in enumerate(cfg.max_skip):
            good = []
            for p in list_shards(self.root, level_name(skip)):
                why = shard_end_ok(p)
                if why is None:
                    good.append(p)
                elif str(p) not in self.bad_shards:
                    log.warning("skipping shard %s: %s", p, why)
                    self.bad_shards.append(str(p))
            if not good:
                raise FileNotFoundError(f"no intact shard in {self.root / level_name(skip)}")
            self.shards[li] = good
        self.skipped = len(self.bad_shards)

    def __len__(self) -> int:
        return self.cfg.total_iterations

    def level_at(self, iteration: int) -> str:
        return level_name(self.cfg.max_skip[self.cfg.level_at(iteration)])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # `infinite`: total_iterations only scales the curriculum; a trainer that drops a batch (non-finite loss)
        # must not find the stream dry before its last iteration.
        stop = None if self.infinite else self.cfg.total_iterations
        ds = _Batches(self.cfg, self.shards, self.rank, self.params, self.iteration, stop)
        if self.cfg.num_workers == 0:
            source = iter(ds)
        else:
            workers = self.cfg.num_workers
            source = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=workers, prefetch_factor=2, persistent_workers=False,
                # spawn, not fork: a forked worker inherits OpenCV's/OpenMP's thread pools in whatever state the
                # parent left them and can deadlock on its first cv2 call (seen here); workers start once per run
                multiprocessing_context="spawn"))
        for it, batch, skipped in source:
            if it != self.iteration:
                raise RuntimeError(f"loader out of order: got batch {it}, expected {self.iteration}")
            self.iteration += 1
            self.skipped += skipped
            yield batch

    def stats(self) -> dict[str, int]:
        return {"iteration": self.iteration, "skipped": self.skipped, "bad_shards": len(self.bad_shards)}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "skipped": self.skipped, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.cfg.num_workers, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "total_iterations": self.cfg.total_iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "iteration" not in state:
            raise KeyError(f"loader state has no 'iteration': {state!r}")
        for k in ("num_workers", "seed", "batch_size", "total_iterations"):
            if k in state and state[k] != getattr(self.cfg, k):
                log.warning("loader state was saved with %s=%r, now %r: the resumed batches differ from an "
                            "uninterrupted run's", k, state[k], getattr(self.cfg, k))
        self.iteration = int(state["iteration"])
        self.skipped = int(state.get("skipped", 0))


_AUG_KEYS = {f.name for f in A.AugmentParams.__dataclass_fields__.values()} - {"crop_size", "num_objects"}
_CFG_KEYS = {"block_clips", "cache_shards"}


def build_train_loader(shards: str | os.PathLike, batch_size: int, rank: int | None = None,
                       world_size: int | None = None, total_iterations: int = 1, *, num_frames: int = 8,
                       num_objects: int = 3, crop_size: int = 480, max_skip=(5, 10, 15, 5),
                       max_skip_until=(0.1, 0.3, 0.8, 1.0), num_workers: int = 2, seed: int = 42,
                       start_iteration: int = 0, infinite: bool = False, **knobs) -> TrainLoader:
    """The training loader for one rank. `rank`/`world_size` default to the RANK/WORLD_SIZE env vars (as the
    launcher sets them). `knobs` are `data.loader` extras: augmentation fields of `AugmentParams`
    (merge_probability, reverse_probability, rotation, shear, scale, crop_tries, clip_jitter, ...) and
    block_clips / cache_shards."""
    unknown = set(knobs) - _AUG_KEYS - _CFG_KEYS
    if unknown:
        raise ValueError(f"data.loader: unknown key(s) {sorted(unknown)} (known: {sorted(_AUG_KEYS | _CFG_KEYS)})")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items() if k in _AUG_KEYS}
    params = A.AugmentParams(crop_size=crop_size, num_objects=num_objects, **aug)
    cfg = LoaderConfig(batch_size=batch_size, total_iterations=total_iterations, num_frames=num_frames,
                       num_objects=num_objects, crop_size=crop_size, max_skip=tuple(max_skip),
                       max_skip_until=tuple(max_skip_until), num_workers=num_workers, seed=seed,
                       **{k: v for k, v in knobs.items() if k in _CFG_KEYS})
    loader = TrainLoader(shards, cfg, rank, world_size, params)
    loader.iteration = start_iteration
    loader.infinite = infinite
    return loader


# ----------------------------------------------------------------------------------------------- eval mode


def build_eval_loader(shards: str | os.PathLike, level: str = "skip05", batch_size: int = 1,
                      num_frames: int = 8, num_objects: int = 3, crop_size: int = 480, num_workers: int = 0):
    """Finite pass over one level's shards, split by node (RANK/WORLD_SIZE) and worker, not resampled, no random
    augmentation (frames resized to crop_size², the first `num_objects` objects of frame 0). Ranks may get
    different batch counts: not for lock-step training."""
    import webdataset as wds

    urls = [str(p) for p in list_shards(Path(shards), level)]

    def handler(exn):
        log.warning("eval loader skipping: %s", exn)
        return True

    def to_clip(sample):
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        try:
            return _eval_clip(sample["__key__"], fields, num_frames, num_objects, crop_size)
        except BadSample as e:
            log.warning("skipping sample %s in shard %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            return None

    ds = (wds.WebDataset(urls, resampled=False, shardshuffle=False, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, handler=handler, empty_check=False)
          .map(to_clip).select(lambda c: c is not None).batched(batch_size, collation_fn=collate, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers)


def _eval_clip(key: str, fields: dict[str, bytes], num_frames: int, num_objects: int, crop_size: int):
    offsets, blob = {}, io.BytesIO()
    for name, data in fields.items():
        if FIELD_RE.match(name) and isinstance(data, bytes):
            offsets[name] = (blob.tell(), len(data))
            blob.write(data)
    frames, masks, meta = decode_sample(blob, key, offsets, num_frames)
    frames = np.stack([cv2.resize(f, (crop_size, crop_size), interpolation=cv2.INTER_LINEAR) for f in frames])
    masks = np.stack([cv2.resize(m, (crop_size, crop_size), interpolation=cv2.INTER_NEAREST) for m in masks])
    objects = ids_present(masks[0])[:num_objects]
    return {"rgb": frames.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, "cls": A.slot_maps(masks, objects), "objects": objects,
            "info": {"key": key, "dataset": meta.get("dataset"), "video": meta.get("video"),
                     "frames": meta.get("frames"), "object_ids": objects, "level": meta.get("level")}}
