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
* Paste partners (Cutie's merge of a second clip, `merge_probability`): per (level, block) a lane draws a *paste
  pool* of `paste_pool_shards` shards of the level (without replacement; all of them when the level has fewer)
  with an RNG seeded by (seed, rank, lane, level, block). A clip's partner is drawn with the clip's own RNG from
  the pool's samples of another video (`{dataset}_{video}` of the key), failing that of another key, failing that
  there is no merge; a bad candidate passes to the next one (at most PARTNER_TRIES). `info["merged_from"]` /
  `info["merged_shard"]` name the partner.
* Decoding follows the draws: a clip's PNG masks are decoded first, its geometry is drawn from them, and only then
  are its JPEGs decoded (simplejpeg/libjpeg-turbo, cv2 if simplejpeg is missing), at 1/2, 1/4 or 1/8 size by DCT
  scaling when the warp downsamples at least that much (`augment.decode_reduction`). A partner's frames are
  decoded only where its objects land in the crop, and warped only inside their boxes.
* Shards are read on the local file with seeks: their headers are walked once per lane (ustar/pax headers read
  directly, `tarfile` for anything unusual; WebDataset's key/extension rule: the key is the basename before the
  first dot), only `NN.jpg`, `NN.png` and `json` members are ever read: nothing is unpickled.
* A malformed sample is replaced by the next good one of the same shard visit (a sample whose JPEG turns out
  undecodable after the geometry draw is replaced the same way, with the clip's RNG rewound, so the batch does
  not depend on whether the lane already knew it was bad; a paste candidate is judged on the frames it would
  give), a truncated shard is dropped; both are logged with a warning naming the sample/shard and counted
  (`stats()`, `state_dict()["skipped"]`).
* `verify_shards`: start-up requires every shard's `shard-NNNNNN.stats.json` with its `sha256`; each lane hashes a
  shard the first time it indexes it and drops one whose hash differs (warning naming both hashes, counted like a
  truncated shard in `skipped` and `stats()["bad_shards"]`): silent corruption (a changed byte in pixel data) is
  otherwise invisible to the cheap tar checks.
* Stage 0 (`kind="static"`, shards of the static job in OUT/static/): each sample is one image and its binary
  mask; a clip is a `num_frames`-frame pseudo-video of it drawn afresh at every draw (`data_pipeline.pseudo_video`:
  Cutie's shared scale and flip, per-frame affine, resize and crop, a thin-plate-spline warp on a third of the
  frames, per-sequence and per-frame colour jitter, 5 % grey), one object, no paste partner, no curriculum. The
  streams, resume arithmetic and bad-sample handling are the video loader's.
* `build_eval_loader` is a finite, non-resampled `webdataset.WebDataset` split by node and worker.
"""

from __future__ import annotations

import hashlib
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
from data_pipeline import pseudo_video as PV
from data_pipeline import storage
from data_pipeline.readers.base import ids_present
from data_pipeline.sampling import KINDS, STATIC_LEVEL
from data_pipeline.shard import stats_path  # the name the shard job gives a tar's stats (sha256) file

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; cv2 (also libjpeg-turbo, but slower here) stands in
    simplejpeg = None

log = logging.getLogger("data_pipeline.loader")

KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset tariterators.base_plus_ext
FIELD_RE = re.compile(r"^(?:(\d+)\.(jpg|png)|json)$")
LEVELS_DIR = "skip{:02d}"
PARTNER_TRIES = 8  # paste-partner candidates tried before a clip goes unmerged
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BadSample(ValueError):
    pass


class BadShard(ValueError):
    pass


@dataclass(frozen=True)
class RemoteShard:
    """A shard under a remote root, as its manifest.json lists it (the loader never lists a bucket or a server)."""

    root: str  # the shard root it is under (its manifest's)
    rel: str  # level/shard-NNNNNN.tar: also its label in batch info, as for a local shard
    clips: int
    sha256: str | None
    bytes: int | None


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


def scan_shard(path: Path | bytes) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Headers only: [(key, {field: (data offset, size)})] in tar order, of a tar file or of a whole tar in memory
    (a streamed remote shard). Raises BadShard when truncated."""
    fast = _scan_plain(path)
    return fast if fast is not None else _scan_tarfile(path)


def _add_member(samples: list, name: str, offset: int, size: int) -> None:
    mt = KEY_RE.match(name)
    if not mt:
        return
    key, field = mt.group(1), mt.group(2).lower()
    if not FIELD_RE.match(field):
        return  # never read members the project does not write (.pyd, .pth, ...)
    if not samples or samples[-1][0] != key:
        samples.append((key, {}))
    samples[-1][1][field] = (offset, size)


def _scan_tarfile(path: Path | bytes) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    in_memory = isinstance(path, bytes | bytearray | memoryview)
    size = len(path) if in_memory else path.stat().st_size
    try:
        with (tarfile.open(fileobj=io.BytesIO(path), mode="r:") if in_memory else tarfile.open(path, "r:")) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise BadShard(f"member {m.name} runs past the end of the file (truncated)")
                _add_member(samples, m.name, m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadShard(f"{type(e).__name__}: {e}") from e
    return samples


_ZERO_BLOCK = bytes(512)


def _scan_plain(path: Path | bytes) -> list[tuple[str, dict[str, tuple[int, int]]]] | None:
    """`_scan_tarfile`'s answer for a tar of plain ustar file members (optionally with pax path/size records), as
    the shard job writes, at several times its speed (one pread per member, no TarInfo objects). None, for
    `tarfile` to decide, on anything else (other member types, GNU headers, base-256 sizes, bad checksums, a short
    header)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    if isinstance(path, bytes | bytearray | memoryview):
        data = memoryview(path)
        return _scan_plain_from(lambda n, off: bytes(data[off:off + n]), len(data), samples)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise BadShard(f"{type(e).__name__}: {e}") from e
    try:
        return _scan_plain_from(lambda n, off: os.pread(fd, n, off), os.fstat(fd).st_size, samples)
    finally:
        os.close(fd)


def _scan_plain_from(pread, size: int, samples: list) -> list[tuple[str, dict[str, tuple[int, int]]]] | None:
    """`_scan_plain` over `pread(n, offset)` of a tar of `size` bytes."""
    try:
        off = 0
        pax: dict[str, str] = {}
        while True:
            h = pread(512, off)
            if len(h) < 512:
                return None
            if h == _ZERO_BLOCK:
                return samples
            if h[124] & 0x80 or h[148:156].strip(b"\0 ") == b"":
                return None
            n = int(h[124:136].rstrip(b"\0 ").strip() or b"0", 8)
            chksum = int(h[148:156].rstrip(b"\0 ").strip(), 8)
            if chksum != 256 + sum(h[:148]) + sum(h[156:]):
                return None
            kind = h[156:157]
            if kind == b"x":
                if off + 512 + n > size:
                    return None
                pax = _pax_records(pread(n, off + 512))
                if pax is None:
                    return None
                off += 512 + -(-n // 512) * 512
                continue
            if kind not in (b"0", b"\0", b"7"):
                return None
            name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = prefix + "/" + name
            if pax:
                name = pax.get("path", name)
                n = int(pax["size"]) if "size" in pax else n
                pax = {}
            if kind == b"\0" and name.endswith("/"):
                return None  # a directory in old style
            if off + 512 + n > size:
                raise BadShard(f"member {name} runs past the end of the file (truncated)")
            _add_member(samples, name, off + 512, n)
            off += 512 + -(-n // 512) * 512
    except BadShard:
        raise
    except (ValueError, UnicodeDecodeError):  # an unparsable number or name: tarfile says what is wrong
        return None


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The records of a pax extended header, or None when they say anything but a member's path, size or times."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        record = data[sp + 1:pos + length - 1]  # without the trailing newline
        if length <= 0 or data[pos + length - 1:pos + length] != b"\n":
            return None
        k, v = record.split(b"=", 1)
        key = k.decode("utf-8")
        if key in ("path", "size"):
            out[key] = v.decode("utf-8", "surrogateescape")
        elif key not in ("mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"):
            return None
        pos += length
    return out


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        return h.hexdigest()


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker, None when there is none before the scan."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        if marker == 0xDA:
            return None
        i += 2 + length
    return None


def jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) from the JPEG header; BadSample when it is not a JPEG."""
    if simplejpeg is not None:
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            return int(h), int(w)
        except ValueError as e:
            raise BadSample(f"{name} is not a decodable JPEG: {e}") from e
    size = _jpeg_size(data)
    if size is None or min(size) < 1:
        raise BadSample(f"{name} is not a decodable JPEG (no frame header)")
    return size


_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_jpeg(data: bytes, name: str, size: tuple[int, int], reduce: int = 1, buffer: np.ndarray | None = None,
                channels: int = 3) -> np.ndarray:
    """RGB uint8 (ceil(h / reduce), ceil(w / reduce), channels) of a JPEG whose header says `size` = (h, w);
    `reduce` in {1, 2, 4, 8} decodes smaller by DCT scaling; `channels` 4 gives RGBX (the 4th channel 255), which
    OpenCV warps over twice as fast as RGB. `buffer`: a writable contiguous uint8 array of at least that many bytes
    to decode into (the result is then a view of it: no fresh memory per frame). BadSample when undecodable
    (simplejpeg: also on corrupt data that libjpeg only warns about)."""
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 (RGB) or 4 (RGBX), got {channels!r}")
    h, w = size
    want = (-(-h // reduce), -(-w // reduce))
    if simplejpeg is not None:
        kw: dict[str, Any] = {"min_height": want[0], "min_width": want[1]} if reduce > 1 else {}
        if buffer is not None and buffer.nbytes >= want[0] * want[1] * channels:
            kw["buffer"] = buffer
        try:
            img = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "RGBX", **kw)
        except ValueError as e:
            raise BadSample(f"{name} is not a decodable JPEG: {e}") from e
    else:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_REDUCED[reduce])
        if bgr is None:
            raise BadSample(f"{name} is not a decodable JPEG")
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGR2RGBA)
    if img.shape[:2] != want:
        raise BadSample(f"{name} decodes to {img.shape[1]}x{img.shape[0]}, its header says {w}x{h} (at 1/{reduce}: "
                        f"{want[1]}x{want[0]})")
    return img


def decode_png_mask(data: bytes, name: str) -> np.ndarray:
    """uint8 (H, W) ids of a single-channel PNG (8-bit grey via cv2, palette and others via PIL); BadSample."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 0:
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2 or mask.dtype != np.uint8:
            raise BadSample(f"{name} is not a decodable PNG")
        return mask
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG" or im.mode not in ("L", "P"):
                raise BadSample(f"{name} is not a single-channel PNG (format {im.format}, mode {im.mode})")
            return np.asarray(im).astype(np.uint8, copy=False)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"{name} is not a decodable PNG: {e}") from e


@dataclass
class Sample:
    """A clip read from its shard with its masks decoded and its JPEGs not yet (see `decode_jpeg`)."""

    key: str
    meta: dict
    masks: np.ndarray  # (T, H, W) uint8 ids
    jpegs: list[bytes]
    size: tuple[int, int]  # (H, W) of every frame


def read_sample(fh, key: str, fields: dict[str, tuple[int, int]], num_frames: int) -> Sample:
    """Read and check one clip: json, masks (decoded), JPEG bytes with their headers checked. Raises BadSample."""

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
    jpegs: list[bytes] = []
    masks: np.ndarray | None = None
    size: tuple[int, int] | None = None
    for t in range(num_frames):
        jf, pf = f"{t:02d}.jpg", f"{t:02d}.png"
        if jf not in fields or pf not in fields:
            raise BadSample(f"frame {t} is missing ({jf}/{pf}); the loader needs {num_frames} frames")
        data = read(jf)
        hw = jpeg_size(data, jf)
        mask = decode_png_mask(read(pf), pf)
        if mask.shape != hw:
            raise BadSample(f"{pf} is {mask.shape[1]}x{mask.shape[0]} but {jf} is {hw[1]}x{hw[0]}")
        if size is None:
            size = hw
            masks = np.empty((num_frames, *hw), np.uint8)
        elif hw != size:
            raise BadSample(f"{jf} is {hw[1]}x{hw[0]}, frame 00 is {size[1]}x{size[0]}")
        masks[t] = mask
        jpegs.append(data)
    if masks is None or not masks[0].any():
        raise BadSample("frame 0 has no object")
    return Sample(key, meta, masks, jpegs, size)


def decode_sample(fh, key: str, fields: dict[str, tuple[int, int]], num_frames: int):
    """Read, check and fully decode one clip: (frames uint8 (T,H,W,3) RGB, masks uint8 (T,H,W), meta). Raises
    BadSample."""
    s = read_sample(fh, key, fields, num_frames)
    frames = np.empty((num_frames, *s.size, 3), np.uint8)
    for t, data in enumerate(s.jpegs):
        img = decode_jpeg(data, f"{t:02d}.jpg", s.size, buffer=frames[t])
        if not np.shares_memory(img, frames[t]):
            frames[t] = img
    return frames, s.masks, s.meta


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
    paste_pool_shards: int = 4  # shards whose samples a (level, block) draws paste partners from
    verify_shards: bool = False  # check each shard's sha256 (its stats.json) before reading it
    kind: str = "video"  # or "static": single-image samples turned into num_frames-frame pseudo-videos
    shard_cache: str = ""  # remote shards: a local folder to keep the downloaded tars in ("" keeps them in memory)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"data.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "static" and len(self.max_skip) != 1:
            raise ValueError("a static loader has one level (static/): no max_skip curriculum")
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
        if isinstance(self.paste_pool_shards, bool) or not isinstance(self.paste_pool_shards, int) \
                or self.paste_pool_shards < 1:
            raise ValueError(f"data.loader.paste_pool_shards must be an int >= 1, got {self.paste_pool_shards!r}")
        if not isinstance(self.shard_cache, str):
            raise ValueError(f"data.loader.shard_cache must be a folder path (or empty), got {self.shard_cache!r}")
        if not isinstance(self.verify_shards, bool):
            raise ValueError(f"data.verify_shards must be true or false, got {self.verify_shards!r}")

    def level_at(self, iteration: int) -> int:
        """Index into max_skip of the curriculum level in force at `iteration` (Cutie: it >= fraction × total)."""
        for idx, frac in enumerate(self.max_skip_until):
            if iteration < frac * self.total_iterations:
                return idx
        return len(self.max_skip) - 1

    def boundaries(self) -> list[int]:
        """First iteration of each level after the first."""
        return [math.ceil(f * self.total_iterations) for f in self.max_skip_until[:-1]]

    @property
    def static(self) -> bool:
        return self.kind == "static"

    @property
    def stored_frames(self) -> int:
        """Frames each stored sample holds: num_frames of a clip, or the one image of a static sample."""
        return 1 if self.static else self.num_frames

    def level_dir(self, level: int) -> str:
        """The shard folder of curriculum level `level` (index into max_skip)."""
        return STATIC_LEVEL if self.static else level_name(self.max_skip[level])


def _lanes(cfg: LoaderConfig) -> int:
    return max(1, cfg.num_workers)


def _block_batches(cfg: LoaderConfig) -> int:
    return max(1, cfg.block_clips // cfg.batch_size)


# ----------------------------------------------------------------------------------------------- streams


def clip_video(key: str) -> str:
    """`{dataset}_{video}` of a sample key `{dataset}_{video}_{level}_{index}` (level names have no underscore)."""
    return key.rsplit("_", 2)[0]


class _Pool:
    """The paste pool of one (level, block): every sample of a few shards, by video."""

    def __init__(self, entries: list[tuple[Path, str, dict]]):
        self.entries = entries
        ids: dict[str, int] = {}
        self.videos = np.array([ids.setdefault(clip_video(k), len(ids)) for _, k, _ in entries], np.int64)
        self.video_ids = ids

    def candidates(self, key: str) -> np.ndarray:
        """Entries of another video than `key`'s; failing that, of another key."""
        vid = self.video_ids.get(clip_video(key))
        if vid is None:
            return np.arange(len(self.entries))
        other = np.flatnonzero(self.videos != vid)
        if len(other):
            return other
        return np.array([i for i, (_, k, _) in enumerate(self.entries) if k != key], np.int64)


class _Lane:
    """All batches of one (rank, lane): iterations i ≡ lane (mod lanes)."""

    def __init__(self, cfg: LoaderConfig, shards: dict[int, list], rank: int, lane: int,
                 params: A.AugmentParams, digests: dict[Path, str] | None = None,
                 remote: dict[str, RemoteShard] | None = None):
        self.cfg, self.shards, self.rank, self.lane, self.params = cfg, shards, rank, lane, params
        self.digests = digests  # verify_shards: the sha256 each shard must have
        # remote shards (URL -> manifest record): streamed whole, kept in memory (an LRU of the shards in use: the
        # stream's and the paste pool's) or, with cfg.shard_cache, in a local folder
        self.remote = remote or {}
        self.sources: OrderedDict[str, bytes | Path] = OrderedDict()
        self.fetches = 0  # remote shards downloaded by this lane (re-downloads included)
        self.fetched_bytes = 0
        self.verified: set[Path] = set()
        self.index_cache: OrderedDict[Path, list] = OrderedDict()
        self.bad_shards: set[Path] = set()
        self.new_bad_shards: list[str] = []  # found since the last batch (TrainLoader.stats)
        self.bad_samples: set[tuple[Path, str]] = set()  # unreadable json/masks/headers: skipped on sight
        self.bad_frames: set[tuple[Path, str, int]] = set()  # undecodable JPEGs, known already
        self.handles: OrderedDict[Path, Any] = OrderedDict()
        self.stream_key: tuple[int, int] | None = None
        self.stream: Iterator | None = None
        self.stream_pos = 0  # draws taken from `stream` so far
        self.pool_key: tuple[int, int] | None = None
        self.pool: _Pool | None = None
        self.position_memo: tuple[int, int, int, int] | None = None
        self.scratch = np.empty(0, np.uint8)  # decoded JPEG, reused frame after frame
        self.skipped = 0

    # -- shard access
    def _drop_shard(self, path: Path, why: str) -> None:
        log.warning("skipping shard %s: %s", path, why)
        self.bad_shards.add(path)
        self.new_bad_shards.append(str(path))
        self.skipped += 1

    def _label(self, path) -> str:
        """level/shard-NNNNNN.tar: the same for a local and a remote shard."""
        return self.remote[path].rel if isinstance(path, str) else f"{path.parent.name}/{path.name}"

    def _count(self, path) -> int:
        """Samples a visit of `path` draws from: a local shard's by its headers, a remote shard's by its manifest
        record (nothing is fetched: a resume fast-forwards without downloading; the shard is streamed when a clip
        is read from it)."""
        if isinstance(path, str):
            return 0 if path in self.bad_shards else self.remote[path].clips
        return len(self._index(path))

    def _fetch(self, url: str) -> bytes | Path:
        """A remote shard, streamed whole (one sequential read), checked against its manifest record (size,
        sha256) and kept in memory or in cfg.shard_cache. BadShard / OSError when it cannot be had."""
        rec = self.remote[url]
        cached = None
        if self.cfg.shard_cache:
            tag = hashlib.sha256(rec.root.encode()).hexdigest()[:12]  # by root: two roots never mix
            cached = Path(self.cfg.shard_cache) / tag / rec.rel
            if cached.is_file() and (rec.bytes is None or cached.stat().st_size == rec.bytes):
                return cached  # written there only after its sha256 matched
        data = storage.read_url(url)
        self.fetches += 1
        self.fetched_bytes += len(data)
        if rec.bytes is not None and len(data) != rec.bytes:
            raise BadShard(f"{len(data)} bytes streamed, manifest.json records {rec.bytes} (truncated or replaced?)")
        if rec.sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != rec.sha256:
                raise BadShard(f"sha256 {got} differs from {rec.sha256} recorded in manifest.json (corrupted since "
                               "the shard job wrote it?)")
        if cached is None:
            return data
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, cached)  # atomic: lanes (and ranks) of a node sharing the cache never see half a tar
        return cached

    def _source(self, url: str) -> bytes | Path:
        """The remote shard's bytes or cached file, fetched again when the LRU let it go."""
        if url in self.sources:
            self.sources.move_to_end(url)
            return self.sources[url]
        src = self._fetch(url)
        self.sources[url] = src
        while len(self.sources) > self.cfg.paste_pool_shards + 2:  # the stream's shard and the paste pool's
            self.sources.popitem(last=False)
        return src

    def _index(self, path) -> list:
        if path in self.bad_shards:
            return []
        if path in self.index_cache:
            self.index_cache.move_to_end(path)
            return self.index_cache[path]
        if isinstance(path, str):
            return self._index_remote(path)
        if self.digests is not None and path not in self.verified:
            try:
                got = file_sha256(path)
            except OSError as e:
                self._drop_shard(path, f"unreadable: {e}")
                return []
            want = self.digests.get(path)
            if got != want:
                self._drop_shard(path, f"sha256 {got} differs from {want} recorded in {stats_path(path)} (corrupted "
                                       "since the shard job wrote it?)")
                return []
            self.verified.add(path)
        try:
            idx = scan_shard(path)
        except (BadShard, OSError) as e:
            self._drop_shard(path, str(e))
            return []
        return self._keep_index(path, idx)

    def _keep_index(self, path, idx: list) -> list:
        self.index_cache[path] = idx
        while len(self.index_cache) > self.cfg.cache_shards:
            self.index_cache.popitem(last=False)
        return idx

    def _index_remote(self, url: str) -> list:
        try:
            src = self._source(url)
            idx = scan_shard(src)
            if len(idx) != self.remote[url].clips:
                raise BadShard(f"holds {len(idx)} samples, manifest.json records {self.remote[url].clips}")
        except (BadShard, OSError) as e:
            self.sources.pop(url, None)
            self._drop_shard(url, str(e))
            return []
        return self._keep_index(url, idx)

    def _handle(self, path):
        if isinstance(path, str):  # remote: a file-like view of the shard in memory (no copy), or its cached file
            src = self._source(path)
            if isinstance(src, bytes):
                return io.BytesIO(src)
            path = src
        if path in self.handles:
            self.handles.move_to_end(path)
            return self.handles[path]
        fh = open(path, "rb")  # noqa: SIM115 - kept open across batches, closed on eviction
        self.handles[path] = fh
        while len(self.handles) > 8:
            self.handles.popitem(last=False)[1].close()
        return fh

    def _visits(self, level: int, block: int) -> Iterator[tuple[Any, int, int]]:
        """Infinite resampled stream of (shard, its sample count, sample position) for one (level, block)."""
        urls = self.shards[level]
        empty_in_a_row = 0
        visit = 0
        while True:
            rng = np.random.default_rng([self.cfg.seed, 11, self.rank, self.lane, level, block, visit])
            visit += 1
            path = urls[int(rng.integers(len(urls)))]
            n = self._count(path)
            if not n:
                empty_in_a_row += 1
                if empty_in_a_row > 50 * len(urls):
                    where = self._label(path).rpartition("/")[0] if isinstance(path, str) else path.parent
                    raise RuntimeError(f"no readable sample in any shard of {where}")
                continue
            empty_in_a_row = 0
            for pos in rng.permutation(n):
                yield path, n, int(pos)

    def _paste_pool(self) -> _Pool:
        """The paste pool of the current stream's (level, block): a pure function of (seed, rank, lane, level,
        block) and the shard files."""
        if self.pool_key != self.stream_key or self.pool is None:
            level, block = self.stream_key
            urls = self.shards[level]
            rng = np.random.default_rng([self.cfg.seed, 37, self.rank, self.lane, level, block])
            picks = rng.choice(len(urls), size=min(self.cfg.paste_pool_shards, len(urls)), replace=False)
            entries = [(urls[int(i)], key, fields) for i in picks for key, fields in self._index(urls[int(i)])]
            self.pool, self.pool_key = _Pool(entries), self.stream_key
        return self.pool

    def _position(self, iteration: int, level: int) -> tuple[int, int]:
        """(block, number of clips this lane's (level, block) stream gave out before `iteration`)."""
        lanes, kb = _lanes(self.cfg), _block_batches(self.cfg)
        k = iteration // lanes
        block = k // kb
        start, before = block * kb, 0
        memo = self.position_memo  # (block, level, k, count): the next batch only counts the batches since
        if memo is not None and memo[:2] == (block, level) and memo[2] <= k:
            start, before = memo[2], memo[3]
        before += sum(1 for k2 in range(start, k) if self.cfg.level_at(k2 * lanes + self.lane) == level)
        self.position_memo = (block, level, k, before)
        return block, before * self.cfg.batch_size

    def _draws(self, iteration: int, level: int) -> Iterator[tuple[Any, int, int]]:
        block, pos = self._position(iteration, level)
        if self.stream_key != (level, block) or self.stream_pos != pos:
            self.stream = self._visits(level, block)
            for _ in range(pos):  # fast-forward: headers only, no decoding
                next(self.stream)
            self.stream_key, self.stream_pos = (level, block), pos
        return self.stream

    def _next_draw(self) -> tuple[Any, int, int]:
        self.stream_pos += 1
        return next(self.stream)

    # -- samples
    def _read(self, path: Path, key: str, fields: dict) -> Sample | None:
        """The sample with its masks decoded, or None (warned about once, counted every time) when it is bad."""
        if (path, key) in self.bad_samples:
            self.skipped += 1
            return None
        if isinstance(path, str):  # remote: its bytes may have to be fetched again (the LRU let them go)
            if path in self.bad_shards:
                return None  # dropped (and counted) once, when it failed
            try:
                self._source(path)
            except (BadShard, OSError) as e:  # deleted or changed since it was indexed: the whole shard goes
                self.index_cache.pop(path, None)
                self._drop_shard(path, str(e))
                return None
        try:
            return read_sample(self._handle(path), key, fields, self.cfg.stored_frames)
        except (BadSample, OSError) as e:
            log.warning("skipping sample %s in shard %s: %s", key, path, e)
            self.bad_samples.add((path, key))
            self.skipped += 1
            return None

    def _decode(self, path: Path, s: Sample, t: int, reduce: int) -> np.ndarray:
        """Frame t of `s` (RGBX, at 1/reduce); BadSample when undecodable (each such frame is warned about once)."""
        if (path, s.key, t) in self.bad_frames:
            raise BadSample(f"{t:02d}.jpg is not a decodable JPEG (known)")
        need = s.size[0] * s.size[1] * 4
        if self.scratch.nbytes < need:
            self.scratch = np.empty(need, np.uint8)
        try:
            # into the lane's scratch: the frame is warped before the next one is decoded
            return decode_jpeg(s.jpegs[t], f"{t:02d}.jpg", s.size, reduce, buffer=self.scratch, channels=4)
        except BadSample as e:
            log.warning("skipping sample %s in shard %s: %s", s.key, path, e)
            self.bad_frames.add((path, s.key, t))
            raise

    def _warped(self, path: Path, s: Sample, order: list[int], m: np.ndarray, out: np.ndarray) -> None:
        """The clip's frames in `order` through `m` into `out` (T, crop, crop, 4) uint8 RGBX, decoded as small as
        the warp allows. RGBX because OpenCV's 4-channel warp is SIMD and its 3-channel one is not (0.49 vs 1.22 ms
        a 480² frame here), with bit-identical RGB."""
        size = self.params.crop_size
        r = A.decode_reduction(m, *s.size)
        mr = A.reduced_matrix(m, r)
        for i, t in enumerate(order):
            A.warp_image(self._decode(path, s, t, r), mr, size, out=out[i])

    def _patches(self, path: Path, s: Sample, order: list[int], m: np.ndarray, boxes: list) -> list:
        """The partner's warped pixels inside `boxes` only; frames whose box is None are not decoded at all."""
        r = A.decode_reduction(m, *s.size)
        mr = A.reduced_matrix(m, r)
        patches: list[np.ndarray | None] = []
        for t, box in zip(order, boxes, strict=True):
            if box is None:
                patches.append(None)
                continue
            y0, y1, x0, x1 = box
            mb = np.array(mr, np.float64)
            mb[0, 2] -= x0
            mb[1, 2] -= y0
            patches.append(A.warp_image(self._decode(path, s, t, r), mb, (x1 - x0, y1 - y0)))
        return patches

    # -- clips
    def _partner(self, rng: np.random.Generator, key: str, frames: np.ndarray, masks: np.ndarray
                 ) -> tuple[dict[int, int], tuple[Path, str] | None]:
        """Paste a partner from the pool over (frames, masks) in place: ({old id: new id}, (shard, key)) or
        ({}, None) when there is none. Deterministic: a bad candidate passes to the next one with the RNG rewound."""
        p = self.params
        pool = self._paste_pool()
        cands = pool.candidates(key)
        if not len(cands):
            return {}, None
        first = int(rng.integers(len(cands)))
        for step in range(min(len(cands), PARTNER_TRIES)):
            path, key2, fields = pool.entries[int(cands[(first + step) % len(cands)])]
            s2 = self._read(path, key2, fields)
            if s2 is None:
                continue
            state = rng.bit_generator.state
            order, masks2, _ = A.maybe_reverse(rng, list(range(self.cfg.num_frames)), s2.masks, p)
            try:
                m2, wm2 = A.draw_clip_geometry(rng, masks2, p)
            except A.NoObjectError:
                return {}, None  # the partner's objects miss the crop: no merge (Cutie: the same)
            boxes = A.paste_boxes(wm2)
            try:
                patches = self._patches(path, s2, order, m2, boxes)
            except BadSample:
                self.skipped += 1
                rng.bit_generator.state = state
                continue
            return A.paste(frames, masks, wm2, patches, boxes), (path, key2)
        return {}, None

    def _augment(self, rng: np.random.Generator, level: int, path: Path, s: Sample, rgb_out: np.ndarray,
                 cls_out: np.ndarray) -> dict[str, Any]:
        p = self.params
        order, masks, reversed_ = A.maybe_reverse(rng, list(range(self.cfg.num_frames)), s.masks, p)
        m, masks = A.draw_clip_geometry(rng, masks, p)  # NoObjectError: the caller takes the next draw
        self._warped(path, s, order, m, rgb_out)  # BadSample: the caller passes to the next sample
        mapping: dict[int, int] = {}
        partner = None
        first_ids = A.ids_in(masks[0])
        if len(first_ids) < p.num_objects and rng.random() < p.merge_probability:
            mapping, partner = self._partner(rng, s.key, rgb_out, masks)
        objects = A.choose_objects(rng, masks[0], p.num_objects, None if partner else first_ids)
        jitter, grey = A.colour_draw(rng, self.cfg.num_frames, p)  # applied by finish_batch, on the device
        A.slot_maps(masks, objects, out=cls_out)
        meta = s.meta
        return {"objects": objects, "jitter": jitter, "grey": grey,
                "info": {"key": s.key, "dataset": meta.get("dataset"), "video": meta.get("video"),
                         "frames": meta.get("frames") if not reversed_ else list(meta["frames"])[::-1],
                         "object_ids": objects, "level": self.cfg.level_dir(level),
                         "reversed": reversed_, "merged_ids": {str(v): k for k, v in mapping.items()},
                         "merged_from": partner[1] if partner else None,
                         "merged_shard": self._label(partner[0]) if partner else None,
                         "shard": self._label(path)}}

    def _augment_static(self, rng: np.random.Generator, path: Path, s: Sample, rgb_out: np.ndarray,
                        cls_out: np.ndarray) -> dict[str, Any]:
        """Stage 0: the one image of `s` as a pseudo-video (geometry drawn from the mask, then the JPEG decoded and
        warped the same way), one object, its colour jitter drawn and returned, not applied."""
        p, t = self.params, self.cfg.num_frames
        geometry, masks = PV.draw_pseudo_video(rng, s.masks[0], t, p)  # NoObjectError: the caller takes the next
        PV.warp_pseudo_video(self._decode(path, s, 0, 1), geometry, rgb_out)  # BadSample: the next sample
        objects = A.ids_in(masks[0])[:1]
        jitter, grey = A.colour_draw(rng, t, p)
        A.slot_maps(masks, objects, out=cls_out)
        meta = s.meta
        frame = (meta.get("frames") or [None])[0]
        return {"objects": objects, "jitter": jitter, "grey": grey,
                "info": {"key": s.key, "dataset": meta.get("dataset"), "video": meta.get("video"),
                         "frames": [frame] * t, "object_ids": objects, "level": STATIC_LEVEL, "reversed": False,
                         "merged_ids": {}, "merged_from": None, "merged_shard": None,
                         "shard": self._label(path)}}

    def _clip(self, rng: np.random.Generator, level: int, rgb_out: np.ndarray, cls_out: np.ndarray
              ) -> dict[str, Any]:
        """The next clip of the stream, warped (and pasted) into rgb_out (T, S, S, 4) uint8 RGBX and cls_out (T, S, S)
        uint8; its colour jitter is drawn and returned (`jitter`, `grey`), not applied."""
        while True:
            path, n, pos = self._next_draw()
            idx = self._index(path)
            if len(idx) != n:  # a remote shard found bad when streamed: its draws pass to the next ones
                continue
            for step in range(len(idx)):  # the clip at `pos`, or the next good one of the same shard
                key, fields = idx[(pos + step) % len(idx)]
                s = self._read(path, key, fields)
                if s is None:
                    continue
                state = rng.bit_generator.state
                try:
                    if self.cfg.static:
                        return self._augment_static(rng, path, s, rgb_out, cls_out)
                    return self._augment(rng, level, path, s, rgb_out, cls_out)
                except A.NoObjectError:
                    break  # deterministic: the next draw of the same stream
                except BadSample:  # a JPEG that does not decode: as if the sample had been skipped on sight
                    self.skipped += 1
                    rng.bit_generator.state = state

    def batch(self, iteration: int) -> dict[str, Any]:
        level = self.cfg.level_at(iteration)
        self._draws(iteration, level)
        b, t, size = self.cfg.batch_size, self.cfg.num_frames, self.params.crop_size
        rgb = np.empty((b, t, size, size, 4), np.uint8)
        cls = np.empty((b, t, size, size), np.uint8)
        clips = []
        for slot in range(b):
            rng = np.random.default_rng([self.cfg.seed, 23, self.rank, iteration, slot])
            clips.append(self._clip(rng, level, rgb[slot], cls[slot]))
        return loader_batch(rgb, cls, [c["objects"] for c in clips], np.stack([c["jitter"] for c in clips]),
                            np.array([c["grey"] for c in clips]),
                            [dict(c["info"], iteration=iteration) for c in clips])

    def close(self):
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()
        self.sources.clear()


def collate(clips: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clips into the batch dict of docs/architecture.md section 3; objects padded to the batch max."""
    rgb = np.stack([c["rgb"] for c in clips])  # clips are already (T, 3, H, W) float32
    cls = np.stack([c["cls"] for c in clips])
    return assemble(rgb, cls, [c["objects"] for c in clips], [c["info"] for c in clips])


def _selector(objects: list[list[int]]) -> np.ndarray:
    """float32 (B, N): 1 for each clip's object slots, 0 for padding up to the batch's largest count (N >= 1)."""
    selector = np.zeros((len(objects), max(1, max(len(o) for o in objects))), np.float32)
    for i, obj in enumerate(objects):
        selector[i, :len(obj)] = 1.0
    return selector


def assemble(rgb: np.ndarray, cls_u8: np.ndarray, objects: list[list[int]], infos: list[dict]) -> dict[str, Any]:
    """The batch dict from rgb (B, T, 3, H, W) float32 and slot maps (B, T, H, W) uint8 (numpy buffers: numpy
    reuses freed memory where fresh torch tensors of this size page-fault on every batch)."""
    selector = _selector(objects)
    b, t, h, w = cls_u8.shape
    first = np.zeros((b, 1, selector.shape[1], h, w), np.float32)
    for i, obj in enumerate(objects):
        for k in range(len(obj)):
            np.equal(cls_u8[i, 0], k + 1, out=first[i, 0, k], casting="unsafe")
    return {"rgb": torch.from_numpy(rgb), "cls_gt": torch.from_numpy(cls_u8.astype(np.int64).reshape(b, t, 1, h, w)),
            "first_frame_gt": torch.from_numpy(first), "selector": torch.from_numpy(selector), "info": infos}


def loader_batch(rgb_u8: np.ndarray, cls_u8: np.ndarray, objects: list[list[int]], jitter: np.ndarray,
                 grey: np.ndarray, infos: list[dict]) -> dict[str, Any]:
    """The training loader's batch (docs/architecture.md section 3): warped uint8 frames and slot maps, the colour
    jitter still to apply, the object selector. A third of the float rgb's bytes (and an eighth of an int64
    cls_gt's) through the workers' shared memory; `finish_batch` turns it into the model's batch, on the device."""
    selector = _selector(objects)
    return {"rgb_u8": torch.from_numpy(rgb_u8), "cls": torch.from_numpy(cls_u8),
            "jitter": torch.from_numpy(np.ascontiguousarray(jitter, np.float64)),
            "grey": torch.from_numpy(np.asarray(grey, bool)), "selector": torch.from_numpy(selector), "info": infos}


# OpenCV's RGB→GRAY on uint8: 0.299, 0.587, 0.114 in 15-bit fixed point, rounded (bit-identical to cv2.cvtColor)
_GREY_FIXED = (9798, 19235, 3735)


def _finish_rgb_torch(u8: torch.Tensor, jitter: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """finish_batch's colour on an accelerator: uint8 (B, T, H, W, 3) → float32 (B, T, 3, H, W)."""
    b, t, h, w, _ = u8.shape
    dev = u8.device
    jit = jitter.to(dev, torch.float64)
    bri, con, sat = jit.unbind(-1)  # (B, T) each
    gw = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=dev)
    eye = torch.eye(3, dtype=torch.float64, device=dev)
    mix = sat[..., None, None] * eye + (1.0 - sat)[..., None, None] * gw.expand(3, 3)  # rows: s e_i + (1 - s) w
    mat = (mix * (con * bri)[..., None, None]).float()  # (B, T, 3, 3)
    mean = u8.sum(dim=(2, 3), dtype=torch.int64).double() / float(h * w)  # (B, T, 3), as cv2.mean
    off = ((1.0 - con) * (bri * (mean @ gw))).float()  # (B, T): the same for every channel
    x = u8.permute(0, 1, 4, 2, 3).float()  # (B, T, 3, H, W)
    y = torch.matmul(mat, x.reshape(b, t, 3, h * w)).view(b, t, 3, h, w) + off[:, :, None, None, None]
    y = y.round_().clamp_(0.0, 255.0)
    grey = grey.to(dev)
    if bool(grey.any()):
        yi = y[grey].to(torch.int32)
        g = (yi[:, :, 0] * _GREY_FIXED[0] + yi[:, :, 1] * _GREY_FIXED[1] + yi[:, :, 2] * _GREY_FIXED[2] + 16384) >> 15
        y[grey] = g.float()[:, :, None].expand(-1, -1, 3, -1, -1)
    return y.mul_(torch.tensor(1.0 / 255.0, dtype=torch.float32, device=dev)).contiguous()


def _finish_rgb_cv2(u8: np.ndarray, jitter: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """The same on the CPU: `augment.apply_colour` clip by clip (torch's one-thread CPU kernels take about 3x
    longer)."""
    b, t, h, w, _ = u8.shape
    out = np.empty((b, t, 3, h, w), np.float32)
    for i in range(b):
        A.apply_colour(u8[i], jitter[i], bool(grey[i]), out=out[i])
    return out


def finish_batch(batch: dict[str, Any], backend: str | None = None) -> dict[str, Any]:
    """The model's batch (rgb float32 (B, T, 3, H, W) in [0, 1], cls_gt int64 (B, T, 1, H, W), first_frame_gt
    float32 (B, 1, N, H, W), selector, info) from the loader's, on whatever device its tensors are: each frame
    through its colour map (`augment.colour_matrix`: brightness, contrast about the frame's mean grey, saturation),
    computed in float32 and rounded once, saturated to [0, 255]; grey clips to OpenCV's grey; then / 255. The
    exact map up to float32 rounding: tests/loader/test_finish_batch.py. `backend`: "torch" (any device) or "cv2"
    (CPU tensors: `augment.apply_colour`); by default cv2 on the CPU, where torch's kernels take about 3x longer,
    and torch elsewhere. A batch that is already the model's passes through unchanged."""
    if "rgb_u8" not in batch:
        return batch
    u8, cls, sel = batch["rgb_u8"][..., :3], batch["cls"], batch["selector"]  # RGB of RGB or RGBX
    backend = backend or ("cv2" if u8.device.type == "cpu" else "torch")
    if backend not in ("cv2", "torch"):
        raise ValueError(f"finish_batch backend must be 'cv2' or 'torch', got {backend!r}")
    if backend == "cv2":
        rgb = torch.from_numpy(_finish_rgb_cv2(u8.numpy(), batch["jitter"].numpy(), batch["grey"].numpy()))
    else:
        rgb = _finish_rgb_torch(u8, batch["jitter"], batch["grey"])
    n = sel.shape[1]
    slots = torch.arange(1, n + 1, device=cls.device, dtype=cls.dtype)
    first = (cls[:, 0, None] == slots[None, :, None, None]).float().unsqueeze(1)
    out = {"rgb": rgb, "cls_gt": cls.long().unsqueeze(2), "first_frame_gt": first, "selector": sel}
    out.update({k: v for k, v in batch.items() if k not in ("rgb_u8", "cls", "jitter", "grey", "selector")})
    return out


# ----------------------------------------------------------------------------------------------- loader


class _Batches(torch.utils.data.IterableDataset):
    """Worker w of W yields (iteration, batch, skipped since the last batch, shards found bad since the last batch)
    for iterations start + w, start + w + W, ..."""

    def __init__(self, cfg, shards, rank, params, start, stop, digests=None, remote=None):
        super().__init__()
        self.cfg, self.shards, self.rank, self.params, self.start, self.stop = cfg, shards, rank, params, start, stop
        self.digests, self.remote = digests, remote

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if info is not None:
            cv2.setNumThreads(1)  # one core per DataLoader worker
        lanes = _lanes(self.cfg)
        # with W workers each worker owns one lane; in-process (0 workers) the one lane is lane 0 of 1
        it = self.start + w
        lane = _Lane(self.cfg, self.shards, self.rank, it % lanes, self.params, self.digests, self.remote)
        try:
            while self.stop is None or it < self.stop:
                before = lane.skipped
                batch = lane.batch(it)
                bad, lane.new_bad_shards = lane.new_bad_shards, []
                yield it, batch, lane.skipped - before, bad
                it += n_workers
        finally:
            lane.close()


class TrainLoader:
    """Iterable of training batches for one rank; `iter()` continues from the last batch handed out."""

    def __init__(self, shard_root: str | os.PathLike, cfg: LoaderConfig, rank: int, world_size: int,
                 params: A.AugmentParams):
        self.cfg, self.rank, self.world_size, self.params = cfg, rank, world_size, params
        self.iteration = 0
        self.infinite = False
        self.skipped = 0
        self.bad_shards: list[str] = []
        self.shards: dict[int, list] = {}
        self.remote: dict[str, RemoteShard] | None = None
        self.digests = None
        if storage.is_remote(shard_root):
            self.root = str(shard_root)
            self._list_remote(storage.Store(shard_root))
            return
        self.root = storage.local_path(shard_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.shards: shard root {self.root} does not exist")
        for li in range(len(cfg.max_skip)):
            good = []
            for p in list_shards(self.root, cfg.level_dir(li)):
                why = shard_end_ok(p)
                if why is None:
                    good.append(p)
                elif str(p) not in self.bad_shards:
                    log.warning("skipping shard %s: %s", p, why)
                    self.bad_shards.append(str(p))
            if not good:
                raise FileNotFoundError(f"no intact shard in {self.root / cfg.level_dir(li)}")
            self.shards[li] = good
        self.skipped = len(self.bad_shards)
        self.digests = self._digests() if cfg.verify_shards else None

    def _list_remote(self, store: storage.Store) -> None:
        """A remote root's shards, by level, from its manifest.json (which the shard job writes last): never a
        bucket listing. Each shard is later streamed whole and checked against the manifest's size and sha256
        (always: data.verify_shards is implied)."""
        try:
            manifest = store.read_json("manifest.json")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.shards: {store.url('manifest.json')} not found: a remote shard root is "
                                    "read through the manifest the shard job writes when it has finished (has it?)"
                                    ) from e
        recs = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(recs, dict):
            raise ValueError(f"data.shards: {store.url('manifest.json')} has no 'shards' table (written by an older "
                             "shard job? rerun data_pipeline.shard)")
        self.remote = {}
        for li in range(len(self.cfg.max_skip)):
            level = self.cfg.level_dir(li)
            rels = sorted(r for r in recs if r.startswith(level + "/") and r.endswith(".tar"))
            if not rels:
                raise FileNotFoundError(f"data.shards: {store.url('manifest.json')} lists no shard in {level}/ (the "
                                        f"curriculum needs it; levels there: "
                                        f"{sorted({r.split('/')[0] for r in recs})})")
            urls = []
            for r in rels:
                rec = recs[r] if isinstance(recs[r], dict) else {}
                url = store.url(r)
                self.remote[url] = RemoteShard(store.root, r, int(rec.get("clips", 0)), rec.get("sha256"),
                                               rec.get("bytes"))
                urls.append(url)
            self.shards[li] = urls

    def _digests(self) -> dict[Path, str]:
        """verify_shards: every shard's sha256 from its stats.json, or a clear error at start-up."""
        digests: dict[Path, str] = {}
        for paths in self.shards.values():
            for p in paths:
                if p in digests:
                    continue
                st = stats_path(p)
                if not st.is_file():
                    raise FileNotFoundError(f"data.verify_shards: {st} is missing: the shard job writes it with the "
                                            f"sha256 of {p.name} (rerun data_pipeline.shard, or set verify_shards "
                                            "false)")
                try:
                    rec = json.loads(st.read_text())
                except (OSError, ValueError) as e:
                    raise ValueError(f"data.verify_shards: {st} is unreadable: {e}") from e
                sha = rec.get("sha256") if isinstance(rec, dict) else None
                if not isinstance(sha, str) or not SHA256_RE.match(sha):
                    raise ValueError(f"data.verify_shards: {st} has no 'sha256' (hex sha256 of {p.name}; shards "
                                     "written before the shard job recorded it: rerun it, or set verify_shards "
                                     "false)")
                digests[p] = sha
        return digests

    def __len__(self) -> int:
        return self.cfg.total_iterations

    def level_at(self, iteration: int) -> str:
        return self.cfg.level_dir(self.cfg.level_at(iteration))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # `infinite`: total_iterations only scales the curriculum; a trainer that drops a batch (non-finite loss)
        # must not find the stream dry before its last iteration.
        stop = None if self.infinite else self.cfg.total_iterations
        ds = _Batches(self.cfg, self.shards, self.rank, self.params, self.iteration, stop, self.digests, self.remote)
        if self.cfg.num_workers == 0:
            source = iter(ds)
        else:
            workers = self.cfg.num_workers
            source = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=workers, prefetch_factor=2, persistent_workers=False,
                # spawn, not fork: a forked worker inherits OpenCV's/OpenMP's thread pools in whatever state the
                # parent left them and can deadlock on its first cv2 call (seen here); workers start once per run
                multiprocessing_context="spawn"))
        for it, batch, skipped, bad in source:
            if it != self.iteration:
                raise RuntimeError(f"loader out of order: got batch {it}, expected {self.iteration}")
            self.iteration += 1
            self.skipped += skipped
            self.bad_shards += [b for b in bad if b not in self.bad_shards]
            yield batch

    def stats(self) -> dict[str, int]:
        return {"iteration": self.iteration, "skipped": self.skipped, "bad_shards": len(self.bad_shards)}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "skipped": self.skipped, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.cfg.num_workers, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "total_iterations": self.cfg.total_iterations,
                "paste_pool_shards": self.cfg.paste_pool_shards, "kind": self.cfg.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "iteration" not in state:
            raise KeyError(f"loader state has no 'iteration': {state!r}")
        if state.get("kind", "video") != self.cfg.kind:
            raise ValueError(f"loader state was saved by a data.kind={state.get('kind', 'video')} loader; this one "
                             f"reads data.kind={self.cfg.kind} shards")
        for k in ("num_workers", "seed", "batch_size", "total_iterations", "paste_pool_shards"):
            if k in state and state[k] != getattr(self.cfg, k):
                log.warning("loader state was saved with %s=%r, now %r: the resumed batches differ from an "
                            "uninterrupted run's", k, state[k], getattr(self.cfg, k))
        self.iteration = int(state["iteration"])
        self.skipped = int(state.get("skipped", 0))


_AUG_KEYS = {f.name for f in A.AugmentParams.__dataclass_fields__.values()} - {"crop_size", "num_objects"}
_STATIC_KEYS = {f.name for f in PV.PseudoVideoParams.__dataclass_fields__.values()} - {"crop_size", "num_objects"}
_CFG_KEYS = {"block_clips", "cache_shards", "paste_pool_shards", "shard_cache"}


def build_train_loader(shards: str | os.PathLike, batch_size: int, rank: int | None = None,
                       world_size: int | None = None, total_iterations: int = 1, *, num_frames: int = 8,
                       num_objects: int = 3, crop_size: int = 480, max_skip=(5, 10, 15, 5),
                       max_skip_until=(0.1, 0.3, 0.8, 1.0), num_workers: int = 2, seed: int = 42,
                       start_iteration: int = 0, infinite: bool = False, verify_shards: bool = False,
                       kind: str = "video", **knobs) -> TrainLoader:
    """The training loader for one rank. `rank`/`world_size` default to the RANK/WORLD_SIZE env vars (as the
    launcher sets them). `verify_shards` (data.verify_shards): check every shard's sha256 against its stats.json.
    `knobs` are `data.loader` extras: augmentation fields of `AugmentParams` (merge_probability,
    reverse_probability, rotation, shear, scale, crop_tries, clip_jitter, ...) and block_clips / cache_shards /
    paste_pool_shards. `kind="static"` (stage 0): the shards of a static job (ROOT/static/), each sample a
    `num_frames`-frame pseudo-video; its knobs are the fields of `pseudo_video.PseudoVideoParams` and max_skip /
    max_skip_until are not used."""
    aug_keys = _STATIC_KEYS if kind == "static" else _AUG_KEYS
    unknown = set(knobs) - aug_keys - _CFG_KEYS
    if unknown:
        raise ValueError(f"data.loader: unknown key(s) {sorted(unknown)} for data.kind={kind} "
                         f"(known: {sorted(aug_keys | _CFG_KEYS)})")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items() if k in aug_keys}
    if kind == "static":
        params = PV.PseudoVideoParams(crop_size=crop_size, num_objects=num_objects, **aug)
        max_skip, max_skip_until = (0,), (1.0,)
    else:
        params = A.AugmentParams(crop_size=crop_size, num_objects=num_objects, **aug)
    cfg = LoaderConfig(batch_size=batch_size, total_iterations=total_iterations, num_frames=num_frames,
                       num_objects=num_objects, crop_size=crop_size, max_skip=tuple(max_skip),
                       max_skip_until=tuple(max_skip_until), num_workers=num_workers, seed=seed,
                       verify_shards=verify_shards, kind=kind, **{k: v for k, v in knobs.items() if k in _CFG_KEYS})
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
