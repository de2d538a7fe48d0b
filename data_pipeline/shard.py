"""The Ray sharding job: native datasets → 8-frame clip samples in deterministic WebDataset tars.

`python -m data_pipeline.shard --config data_pipeline/configs/demo.yaml [--data-root DIR] [--out OUT]
 [--allow-missing DATASET ...] [key=value]`
`python -m data_pipeline.shard --config ... --plan [--train-config training/configs/s3_mega.yaml] [--json]`
`python -m data_pipeline.shard --config data_pipeline/configs/static.yaml --data-root /data/static --out ...`
(stage 0: `kind: static`, Cutie's static image sets as single-image samples in OUT/static/, each set's images
repeated by its multiplier, stored with the short side at most `short_side`)

The plan (data_pipeline.sampling) draws each level's clips over every usable video by Cutie's frame-level weights
and shuffles them (seeded), so each shard mixes datasets and videos in the mixture's proportions. `--plan` prints,
without writing anything, per dataset: videos found and usable, frames, clips per level, its share next to
Cutie's, the expected reuse of each clip over the training schedule and the estimated disk size.

One Ray task per shard writes OUT/<level>/shard-NNNNNN.tar through a temporary name and a rename, then
shard-NNNNNN.stats.json (the completion marker, with the tar's sha256); a rerun skips shards that have their stats.
Tars are byte-identical across runs (sorted members, mtime 0, uid/gid 0, cv2 JPEG at a fixed quality). OUT/job.json
records the config hash at start: a rerun into OUT with another config is refused, naming both hashes. A dataset
that yields no usable video is an error unless `--allow-missing` names it. Bad inputs inside a dataset are recorded
in OUT/manifest.json (`skipped`, `num_skipped`) and skipped; the job still exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import secrets
import socket
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from . import storage
from .readers import READERS, STATIC_DATASETS, STATIC_MULTIPLIER, BadInput, Video, build_reader
from .readers.base import ids_present
from .sampling import (
    KINDS,
    NUM_FRAMES,
    STATIC_LEVEL,
    ClipPlan,
    image_weights,
    mixture_weights,
    plan_clips,
    plan_images,
    usable,
)

# reader_options: dataset -> reader keyword arguments (DAVIS resolution, BURST annotations, ...); kind: video (the
# default) or static (stage 0); multipliers: static only, set -> repeats (default Cutie's, STATIC_MULTIPLIER)
OPTIONAL = {"reader_options", "kind", "multipliers"}
REQUIRED = {"data_root", "out", "datasets", "levels", "clips_per_level", "clips_per_shard", "short_side",
            "jpeg_quality", "seed", "num_cpus"}
VIDEO_ONLY = {"levels", "clips_per_level"}  # a static job has one level and stores every image (x multiplier)


def is_static(cfg: dict) -> bool:
    return cfg.get("kind", "video") == "static"


def levels_of(cfg: dict) -> dict[str, int]:
    """The job's shard levels, {folder: max skip}: the config's, or {"static": 0} for a static job."""
    return {STATIC_LEVEL: 0} if is_static(cfg) else cfg["levels"]


def usable_sample(video: Video, cfg: dict) -> bool:
    """A video with enough annotated frames for a clip, or (static) an image that kept its mask."""
    return any(video.annotated) if is_static(cfg) else usable(video)


def load_config(path: str | Path, overrides: list[str] = (), data_root=None, out=None) -> dict:
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        if k not in REQUIRED | OPTIONAL:
            raise SystemExit(f"unknown config key {k!r} in override; known: {sorted(REQUIRED)}")
        cfg[k] = yaml.safe_load(v)
    if data_root is not None:
        cfg["data_root"] = str(data_root)
    if out is not None:
        cfg["out"] = str(out)
    _check_out_url(cfg.get("out"))
    kind = cfg.get("kind", "video")
    if kind not in KINDS:
        raise SystemExit(f"config kind={kind!r}: expected one of {list(KINDS)}")
    required = REQUIRED - VIDEO_ONLY if kind == "static" else REQUIRED
    missing = required - set(cfg)
    if missing:
        raise SystemExit(f"{path}: missing config keys {sorted(missing)}")
    cfg.setdefault("reader_options", {})
    unknown = set(cfg) - REQUIRED - OPTIONAL
    if unknown:
        raise SystemExit(f"{path}: unknown config keys {sorted(unknown)}")
    if kind == "static":
        _check_static(path, cfg)
        _check_common(cfg)
        return cfg
    if "multipliers" in cfg:
        raise SystemExit(f"{path}: 'multipliers' is for kind: static (a video job weights datasets as Cutie does)")
    wrong = sorted(set(cfg.get("datasets") or {}) & set(STATIC_DATASETS)) if isinstance(cfg["datasets"], dict) else []
    if wrong:
        raise SystemExit(f"{path}: {wrong} are static image sets; shard them with kind: static "
                         "(data_pipeline/configs/static.yaml)")
    _check_common(cfg)
    cpl = cfg["clips_per_level"]
    counts = cpl.values() if isinstance(cpl, dict) else [cpl]
    if not counts or not all(isinstance(n, int) and n > 0 for n in counts):
        raise SystemExit(f"config clips_per_level={cpl!r}: expected a positive int or {{level: positive int}}")
    if isinstance(cpl, dict) and set(cpl) != set(cfg["levels"]):
        raise SystemExit(f"config clips_per_level names levels {sorted(cpl)}, config levels are "
                         f"{sorted(cfg['levels'])}")
    for lv, skip in cfg["levels"].items():
        if not lv.startswith("skip") or not isinstance(skip, int) or skip <= 0:
            raise SystemExit(f"config levels: bad entry {lv}: {skip!r}")
    return cfg


def _check_out_url(out) -> None:
    """--out: a local folder, s3:// or gs:// (with its filesystem installed); refused at start-up otherwise."""
    if not out:
        return
    try:
        store = storage.Store(out)
        if not store.writable:
            raise storage.StorageError(f"--out {out}: {store.scheme}: is read-only; write shards to a local folder, "
                                       "s3://bucket/prefix or gs://bucket/prefix")
        if store.scheme in storage.OBJECT_SCHEMES:
            store.fs  # noqa: B018 - the s3fs/gcsfs import: a missing extra is named now, not in every task
    except storage.StorageError as e:
        raise SystemExit(str(e)) from e


def _check_common(cfg: dict) -> None:
    if not cfg["data_root"] or not Path(cfg["data_root"]).is_dir():
        raise SystemExit(f"data_root {cfg['data_root']!r} is not a folder (give --data-root)")
    for k in ("clips_per_shard", "short_side", "num_cpus"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise SystemExit(f"config {k}={cfg[k]!r}: expected a positive int")
    if not isinstance(cfg["datasets"], dict) or not cfg["datasets"]:
        raise SystemExit(f"config datasets={cfg['datasets']!r}: expected {{dataset: folder under data_root}}")
    if not isinstance(cfg["jpeg_quality"], int) or not 1 <= cfg["jpeg_quality"] <= 100:
        raise SystemExit(f"config jpeg_quality={cfg['jpeg_quality']!r}: expected 1..100")


def _check_static(path, cfg: dict) -> None:
    """kind: static: image sets only, no levels, multipliers {set: positive int} (Cutie's by default)."""
    given = sorted(VIDEO_ONLY & set(cfg))
    if given:
        raise SystemExit(f"{path}: {given} are for video jobs; a static job stores every image once per multiplier "
                         "in one level, static/")
    sets = cfg["datasets"] if isinstance(cfg["datasets"], dict) else {}
    wrong = sorted(set(sets) - set(STATIC_DATASETS))
    if wrong:
        raise SystemExit(f"{path}: kind static takes the image sets {list(STATIC_DATASETS)}, not {wrong}")
    mult = cfg.setdefault("multipliers", {d: STATIC_MULTIPLIER[d] for d in sets})
    if not isinstance(mult, dict) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                         for v in mult.values()):
        raise SystemExit(f"config multipliers={mult!r}: expected {{set: positive int}}")
    extra = sorted(set(mult) - set(sets))
    if extra:
        raise SystemExit(f"config multipliers names {extra}, not in datasets {sorted(sets)}")
    for d in sets:
        mult.setdefault(d, STATIC_MULTIPLIER[d])


PLAN_VERSION = 2  # 2: frame-weighted, shuffled plan (1: per-dataset, sorted by key); part of the config hash
HASH_EXCLUDED = ("out", "data_root", "num_cpus")


def hashed_config(cfg: dict) -> dict:
    return {"plan_version": PLAN_VERSION, **{k: v for k, v in cfg.items() if k not in HASH_EXCLUDED}}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(hashed_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def check_out(out: str | Path, cfg: dict) -> None:
    """Refuse to write into a folder (or bucket prefix) holding shards of another config (or of an unknown one):
    the manifest would describe data that is not there. A new config gets a new --out."""
    store = storage.Store(out)
    if store.local:
        if not Path(out).exists():
            return
        if not Path(out).is_dir():
            raise SystemExit(f"--out {out} exists and is not a folder")
    mine = config_hash(cfg)
    theirs, their_cfg = None, None
    if store.exists("job.json"):
        try:
            rec = json.loads(store.read_bytes("job.json"))
            theirs, their_cfg = rec["config_hash"], rec.get("hashed_config")
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{store.url('job.json')} is unreadable ({e}); cannot tell which config wrote {out}") from e
    elif store.exists("manifest.json"):  # written before job.json existed
        try:
            theirs = json.loads(store.read_bytes("manifest.json"))["config_hash"]
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{store.url('manifest.json')} is unreadable ({e}); cannot tell which config wrote "
                             f"{out}") from e
    elif store.find(".tar"):
        raise SystemExit(f"--out {out} holds .tar files but no job.json: not written by this job; give a new --out")
    if theirs is not None and theirs != mine:
        changed = ""
        if isinstance(their_cfg, dict):
            now = hashed_config(cfg)
            keys = sorted(k for k in set(now) | set(their_cfg) if now.get(k) != their_cfg.get(k))
            changed = f" (changed: {', '.join(keys)})"
        raise SystemExit(f"--out {out} holds shards of config hash {theirs}; this config's hash is {mine}{changed}. "
                         f"Write a new config into a new --out folder (or delete {out} to rebuild it).")


# ------------------------------------------------------------------------------------------------ writing


def resize_short(img: np.ndarray, short: int, nearest: bool) -> np.ndarray:
    h, w = img.shape[:2]
    s = short / min(h, w)
    if s == 1:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return cv2.resize(img, size, interpolation=interp)


def encode_clip(reader, video: Video, plan: ClipPlan, short: int, quality: int, only_shrink: bool = False
                ) -> list[tuple[str, bytes]]:
    """Members of one sample; BadInput on any damaged frame or mask. `only_shrink` (static images): the short side
    becomes `short` only where it is longer (a small image is stored as it is)."""
    members, ids0, all_ids, orig, size = [], [], set(), None, None
    for t, fi in enumerate(plan.frame_indices):
        img = reader.read_image(video, fi)
        mask = reader.read_mask(video, fi)
        where = f"{video.dataset} video {video.video} frame {video.frames[fi]}"
        if img.shape[:2] != mask.shape[:2]:
            raise BadInput(where, f"mask size {mask.shape} differs from frame size {img.shape[:2]}")
        orig = orig or list(img.shape[:2])
        if list(img.shape[:2]) != orig:
            raise BadInput(where, f"frame size {img.shape[:2]} differs from the clip's {orig}")
        to = min(short, min(img.shape[:2])) if only_shrink else short
        img = resize_short(img, to, nearest=False)
        mask = resize_short(mask, to, nearest=True)
        ids = ids_present(mask)  # of the stored mask: an object too small to survive the resize is not listed
        if t == 0:
            if not ids:
                raise BadInput(where, "first frame of the clip has no object (at the stored size)")
            ids0 = ids
        all_ids.update(ids)
        size = list(img.shape[:2])
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        ok2, png = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not (ok and ok2):
            raise BadInput(where, "encoding failed")
        members += [(f"{plan.key}.{t:02d}.jpg", jpg.tobytes()), (f"{plan.key}.{t:02d}.png", png.tobytes())]
    meta = {"dataset": plan.dataset, "video": plan.video, "frames": [video.frames[i] for i in plan.frame_indices],
            "object_ids": ids0, "all_object_ids": sorted(all_ids), "max_skip": plan.max_skip, "level": plan.level,
            "original_size": orig, "size": size, "index": plan.index}
    members.append((f"{plan.key}.json", json.dumps(meta, sort_keys=True).encode()))
    return sorted(members)


class _HashingFile:
    """A write-only file that hashes what passes through it (the tar's sha256 without reading it back)."""

    def __init__(self, fh):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.fh.write(b)

    def tell(self) -> int:
        return self.n


def tar_members(fileobj, members: list[tuple[str, bytes]]) -> int:
    """Write the members as a deterministic tar; returns their payload (the bytes before the end of archive)."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(blob))
        return tar.offset


def put_tar(store: storage.Store, rel: str, members: list[tuple[str, bytes]]) -> tuple[int, str]:
    """The deterministic tar as the object `rel` of `store`: built in a scratch file (beside it locally, renamed
    into place; a temporary file for object storage, uploaded whole); returns its size and sha256."""
    scratch = store.scratch_for(rel)
    try:
        with open(scratch, "wb") as fh:
            hf = _HashingFile(fh)
            tar_members(hf, members)
            fh.flush()
            os.fsync(fh.fileno())
        store.put_file(scratch, rel)
    finally:
        scratch.unlink(missing_ok=True)
    return hf.n, hf.sha.hexdigest()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> tuple[int, str]:
    """Deterministic tar at `path` via `path.tmp` + rename; returns its size and sha256."""
    return put_tar(storage.Store(path.parent), path.name, members)


_READERS: dict = {}


def stats_path(tar: Path) -> Path:
    """shard-NNNNNN.tar → shard-NNNNNN.stats.json, the completion marker written after the tar."""
    return tar.with_name(stats_name(tar.name))


def stats_name(rel: str) -> str:
    """`stats_path` of a path relative to the shard root (a local folder or a bucket prefix)."""
    head, _, name = rel.rpartition("/")
    return (head + "/" if head else "") + name.replace(".tar", ".stats.json")


def clip_item(spec: dict, video: Video, plan: ClipPlan) -> tuple[dict, Video, ClipPlan]:
    """A shard task's input for one clip: the video cut down to the clip's frames (the OVIS/BURST annotations of
    8 frames, not of the whole video: a mixed shard draws from hundreds of videos) and the plan renumbered to it."""
    idx = plan.frame_indices
    view = video.restrict(idx, READERS[spec["dataset"]].restrict_meta(video.meta, idx))
    return spec, view, dataclasses.replace(plan, frame_indices=tuple(range(len(idx))))


def shard_task(out: str, rel: str, items: list[tuple[dict, Video, ClipPlan]], short: int, quality: int,
               only_shrink: bool = False) -> dict:
    """Write one shard, `rel` (level/shard-NNNNNN.tar) under `out` (a folder or an s3:// / gs:// prefix), then its
    stats (the completion marker); returns the stats. Uses one core, as the Ray task reserves: OpenCV's own
    thread pool (2 threads on 2 cores) made two tasks on two cores 1.2x slower each."""
    cv2.setNumThreads(1)
    t0 = time.time()
    members, skipped = [], []
    for spec, video, plan in items:
        key = (spec["dataset"], spec["root"])
        if key not in _READERS:
            _READERS[key] = build_reader(spec["dataset"], spec["root"], **spec.get("options", {}))
        try:
            members += encode_clip(_READERS[key], video, plan, short, quality, only_shrink)
        except BadInput as e:
            skipped.append({"file": e.file, "reason": e.reason, "video": video.video, "key": plan.key})
        except Exception as e:  # noqa: BLE001  a decoder crash on one clip must not lose the shard
            skipped.append({"file": f"{spec['root']} video {video.video}", "video": video.video, "key": plan.key,
                            "reason": f"unexpected {type(e).__name__}: {e}"})
    store = storage.Store(out)
    size, sha = put_tar(store, rel, members)
    clips = len(items) - len(skipped)
    ray = sys.modules.get("ray")  # inside a Ray task: the node that wrote the shard; never starts Ray itself
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    stats = {"shard": rel.rpartition("/")[2], "clips": clips, "bytes": size, "sha256": sha, "skipped": skipped, "node_id": node,
             "hostname": socket.gethostname(), "seconds": round(time.time() - t0, 3),
             "source_bytes": sum(_source_bytes(spec, video, plan) for spec, video, plan in items)}
    store.write_json(stats_name(rel), stats)
    return stats


def _source_bytes(spec, video: Video, plan: ClipPlan) -> int:
    """Bytes of the source JPEGs of a clip (for the stored/source ratio); 0 where the path is not known."""
    reader = _READERS.get((spec["dataset"], spec["root"]))
    total = 0
    for fi in plan.frame_indices:
        p = None
        if "image" in video.meta:  # a static image set: the path under the set's root
            p = Path(spec["root"]) / video.meta["image"]
        elif hasattr(reader, "image_dir") and "files" in video.meta:
            p = reader.image_dir / video.meta["files"][fi]
        elif hasattr(reader, "frame_dir"):
            p = reader.frame_dir / video.meta["dir"] / video.meta["names"][fi]
        elif hasattr(reader, "image_dir"):
            p = reader.image_dir / video.video / f"{video.frames[fi]}.jpg"
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p else 0
    return total


# ------------------------------------------------------------------------------------------------ driver


LIST_CHUNK = 32  # videos per listing task: reading every mask of YouTube-VOS/MOSE is the job's serial part


def list_chunk(spec: dict, names: list[str]) -> tuple[list[Video], list[dict]]:
    """List some videos of one dataset (a Ray task): their Video records and the problems met."""
    cv2.setNumThreads(1)
    reader = build_reader(spec["dataset"], spec["root"], **spec.get("options", {}))
    return reader.videos(names), reader.problems


def _list_dataset(reader, spec: dict, ray, chunk: int) -> tuple[list[Video], list[dict]]:
    names = reader.video_names()
    if names is None:  # listed from one index file (OVIS, BURST)
        return reader.videos(), reader.problems
    if ray is None or len(names) <= chunk:
        return reader.videos(names), reader.problems
    task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(list_chunk)
    refs = [task.remote(spec, names[i:i + chunk]) for i in range(0, len(names), chunk)]
    videos, problems = [], []
    for vs, ps in tqdm((ray.get(r) for r in refs), total=len(refs), desc=f"list {spec['dataset']}", unit="chunk",
                       file=sys.stdout, disable=len(refs) < 4):
        videos += vs  # in name order whatever node listed them: the plan (and the tars) stay byte-identical
        problems += ps
    return videos, problems


def list_videos(cfg: dict, ray=None, chunk: int = LIST_CHUNK
                ) -> tuple[dict[str, list[Video]], dict[str, dict], list[dict]]:
    """Every dataset's videos; with `ray`, the datasets that can be split are listed in parallel tasks."""
    videos, specs, skipped = {}, {}, []
    for d, folder in cfg["datasets"].items():
        root = str(Path(cfg["data_root"]) / folder)
        opts = (cfg.get("reader_options") or {}).get(d, {})
        specs[d] = {"dataset": d, "root": root, "options": opts}
        try:
            reader = build_reader(d, root, **opts)
            videos[d], problems = _list_dataset(reader, specs[d], ray, chunk)
            skipped += [dict(p, dataset=d) for p in problems]
        except BadInput as e:
            videos[d] = []
            skipped.append({"file": e.file, "reason": e.reason, "dataset": d})
        except TypeError as e:
            raise SystemExit(f"config reader_options.{d}: {e}") from e
        except (OSError, ValueError, KeyError) as e:
            videos[d] = []
            skipped.append({"file": root, "reason": f"cannot read dataset: {e!r}", "dataset": d})
    return videos, specs, skipped


def missing_datasets(videos: dict[str, list[Video]], skipped: list[dict], cfg: dict) -> dict[str, str]:
    """Datasets that give no usable video, with the reason (the unreadable file, the empty folder)."""
    out = {}
    what = "image with its mask" if is_static(cfg) else "video"
    for d, vs in videos.items():
        if any(usable_sample(v, cfg) for v in vs):
            continue
        whole = [s for s in skipped if s.get("dataset") == d and "video" not in s]
        bad = [s for s in skipped if s.get("dataset") == d and "video" in s]
        if whole:
            out[d] = f"{whole[0]['file']}: {whole[0]['reason']}"
        elif not vs and bad:
            out[d] = f"every {what} was skipped ({len(bad)}; e.g. {bad[0]['file']}: {bad[0]['reason']})"
        elif not vs:
            out[d] = f"no {what} found under {Path(cfg['data_root']) / cfg['datasets'][d]}"
        else:
            out[d] = f"{len(vs)} videos found, none with {NUM_FRAMES} annotated frames"
    return out


def check_missing(missing: dict[str, str], allow: list[str], cfg: dict) -> None:
    unknown = sorted(set(allow) - set(cfg["datasets"]))
    if unknown:
        raise SystemExit(f"--allow-missing names {unknown}, not datasets of the config ({sorted(cfg['datasets'])})")
    refused = {d: why for d, why in missing.items() if d not in allow}
    if refused:
        unit = "image" if is_static(cfg) else "video"
        what = "; ".join(f"dataset {d} yields no usable {unit} ({why})" for d, why in sorted(refused.items()))
        flags = " ".join(f"--allow-missing {d}" for d in sorted(refused))
        them = "them" if len(refused) > 1 else "it"
        raise SystemExit(f"{what}. Fix the data (data_root {cfg['data_root']}) or give {flags} to shard without {them}.")


# ------------------------------------------------------------------------------------------------ plan report


def _payload_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes these members take inside a tar (headers, PAX records and padding), without the end of archive."""
    return tar_members(_HashingFile(io.BytesIO()), members)


def tar_size(payload: float) -> int:
    """A tar's size on disk from its members' payload: two zero blocks, padded to tarfile's 10240-byte record."""
    rec = tarfile.RECORDSIZE
    return int(-(-(payload + 2 * tarfile.BLOCKSIZE) // rec) * rec)


def bytes_per_clip(cfg: dict, specs: dict, by_id: dict, plans: dict[str, list[ClipPlan]], per_dataset: int = 3
                   ) -> dict[str, float]:
    """Mean tar payload of a clip per dataset, from encoding a few planned clips in memory."""
    out = {}
    level = sorted(plans)[0] if plans else None
    for d in sorted(specs):
        sample = [p for p in plans.get(level, []) if p.dataset == d][:per_dataset]
        sizes = []
        for p in sample:
            reader = _READERS.get((d, specs[d]["root"])) or build_reader(d, specs[d]["root"], **specs[d]["options"])
            _READERS[(d, specs[d]["root"])] = reader
            try:
                sizes.append(_payload_bytes(encode_clip(reader, by_id[(d, p.video)], p, cfg["short_side"],
                                                        cfg["jpeg_quality"], is_static(cfg))))
            except BadInput:
                continue
        if sizes:
            out[d] = sum(sizes) / len(sizes)
    return out


def training_draws(train_config: str | Path, levels: dict[str, int]) -> dict:
    """Clips the training schedule of `train_config` draws from each shard level (and its paste partners)."""
    from training.config import ConfigError
    from training.config import load_config as load_train_config

    try:
        tc = load_train_config(train_config, check_paths=False)
    except ConfigError as e:
        raise SystemExit(f"--train-config: {e}") from e
    total, batch, d = tc.train.iterations, tc.train.global_batch, tc.data
    static = STATIC_LEVEL in levels
    if (d.kind == "static") != static:
        raise SystemExit(f"--train-config {train_config} trains on data.kind={d.kind} shards, this shard config "
                         f"writes {'static' if static else 'video'} shards")
    if static:
        return {"train_config": str(train_config), "iterations": total, "global_batch": batch, "max_skip": [],
                "max_skip_until": [], "merge_probability": 0.0, "draws": {STATIC_LEVEL: total * batch}}
    bounds = [0] + [math.ceil(f * total) for f in d.max_skip_until[:-1]] + [total]
    by_skip = {skip: name for name, skip in levels.items()}
    draws: dict[str, int] = {}
    for i, skip in enumerate(d.max_skip):
        name = by_skip.get(skip)
        if name is None:
            raise SystemExit(f"--train-config {train_config}: data.max_skip uses {skip}, but the shard config has "
                             f"no level with that skip (levels: {levels})")
        draws[name] = draws.get(name, 0) + (bounds[i + 1] - bounds[i]) * batch
    merge = float(d.loader.get("merge_probability", 0.5))
    return {"train_config": str(train_config), "iterations": total, "global_batch": batch,
            "max_skip": list(d.max_skip), "max_skip_until": list(d.max_skip_until), "merge_probability": merge,
            "draws": draws}


def plan_summary(cfg: dict, videos: dict[str, list[Video]], plans: dict[str, list[ClipPlan]], specs: dict,
                 missing: dict[str, str], train: dict | None = None, estimate: bool = True) -> dict:
    """What the job will write, per dataset and per level, before it writes anything."""
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    static = is_static(cfg)
    cutie = image_weights(videos, cfg["multipliers"]) if static else mixture_weights(videos)
    all_clips = sum(len(ps) for ps in plans.values()) or 1
    datasets = {}
    for d in cfg["datasets"]:
        if static:
            vs = videos.get(d, [])
            n = sum(1 for p in plans.get(STATIC_LEVEL, []) if p.dataset == d)
            datasets[d] = {"images": len(vs), "usable_images": sum(1 for v in vs if any(v.annotated)),
                           "multiplier": cfg["multipliers"][d], "clips": {STATIC_LEVEL: n},
                           "share": n / all_clips, "cutie_share": cutie.get(d, 0.0), "missing": missing.get(d)}
            continue
        vs = videos.get(d, [])
        per_level = {lv: sum(1 for p in ps if p.dataset == d) for lv, ps in sorted(plans.items())}
        datasets[d] = {"videos": len(vs), "usable_videos": sum(map(usable, vs)),
                       "frames": sum(len(v.frames) for v in vs),
                       "annotated_frames": sum(sum(map(bool, v.annotated)) for v in vs),
                       "clips": per_level, "share": sum(per_level.values()) / all_clips,
                       "cutie_share": cutie.get(d, 0.0), "missing": missing.get(d)}
    per = cfg["clips_per_shard"]
    levels = {}
    for lv, ps in sorted(plans.items()):
        levels[lv] = {"max_skip": levels_of(cfg)[lv], "clips": len(ps), "shards": -(-len(ps) // per)}
        if train:
            n = train["draws"].get(lv, 0)
            levels[lv]["training_draws"] = n
            levels[lv]["reuse"] = n / len(ps) if ps else None
            levels[lv]["reuse_with_pastes"] = n * (1 + train["merge_probability"]) / len(ps) if ps else None
    out = {"config_hash": config_hash(cfg), "kind": cfg.get("kind", "video"), "datasets": datasets, "levels": levels,
           "clips": all_clips,
           "shards": sum(v["shards"] for v in levels.values()), "missing": missing, "train": train}
    if estimate:
        bpc = bytes_per_clip(cfg, specs, by_id, plans)
        mean = sum(bpc.values()) / len(bpc) if bpc else 0.0
        total = 0
        for ps in plans.values():
            for s in range(0, len(ps), per):
                total += tar_size(sum(bpc.get(p.dataset, mean) for p in ps[s:s + per]))
        out["bytes_per_clip"] = {d: round(b) for d, b in bpc.items()}
        out["estimated_bytes"] = total
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_static_plan(plan: dict) -> str:
    """The plan report of a static (stage-0) job: per image set, images found, usable, multiplier, samples."""
    head = f"{'set':<11}{'images':>8}{'usable':>8}{'x':>4}{'samples':>9}{'share':>8}{'Cutie':>8}"
    lines = [f"static shard plan (config hash {plan['config_hash']})", head, "-" * len(head)]
    for d, r in plan["datasets"].items():
        lines.append(f"{d:<11}{r['images']:>8}{r['usable_images']:>8}{r['multiplier']:>4}"
                     f"{r['clips'][STATIC_LEVEL]:>9}{100 * r['share']:>7.1f}%{100 * r['cutie_share']:>7.1f}%")
    lv = plan["levels"].get(STATIC_LEVEL, {"clips": 0, "shards": 0})
    lines.append(f"{'total':<31}{lv['clips']:>9}")
    lines.append("samples: usable images x multiplier (Cutie repeats each set's list); Cutie: the same share")
    line = f"{STATIC_LEVEL}: {lv['clips']} single-image samples in {lv['shards']} shards"
    if plan.get("train"):
        t = plan["train"]
        n = t["draws"][STATIC_LEVEL]
        line += f"; training draws {n} -> each sample used {n / max(lv['clips'], 1):.1f}x"
        lines.append(line)
        lines.append(f"schedule: {t['train_config']}: {t['iterations']} iterations x global batch {t['global_batch']}"
                     ", each sample a 3-frame pseudo-video drawn afresh")
    else:
        lines += [line, "reuse over training: give --train-config to see it"]
    return "\n".join(lines + _plan_tail(plan, "sample", "set", "image"))


def format_plan(plan: dict) -> str:
    if plan.get("kind") == "static":
        return format_static_plan(plan)
    levels = sorted(plan["levels"])
    head = (f"{'dataset':<11}{'videos':>8}{'usable':>8}{'frames':>10}{'annotated':>11}"
            + "".join(f"{lv:>9}" for lv in levels) + f"{'share':>8}{'Cutie':>8}")
    lines = [f"shard plan (config hash {plan['config_hash']})", head, "-" * len(head)]
    for d, r in plan["datasets"].items():
        lines.append(f"{d:<11}{r['videos']:>8}{r['usable_videos']:>8}{r['frames']:>10}{r['annotated_frames']:>11}"
                     + "".join(f"{r['clips'].get(lv, 0):>9}" for lv in levels)
                     + f"{100 * r['share']:>7.1f}%{100 * r['cutie_share']:>7.1f}%")
    lines.append(f"{'total':<48}" + "".join(f"{plan['levels'][lv]['clips']:>9}" for lv in levels))
    lines.append("share: this plan's clips; Cutie: annotated frames x multiplier (DAVIS x2), Cutie's seed-frame draw")
    for lv in levels:
        r = plan["levels"][lv]
        line = f"{lv}: {r['clips']} clips in {r['shards']} shards"
        if "reuse" in r and r["reuse"] is not None:
            line += (f"; training draws {r['training_draws']} -> each clip used {r['reuse']:.1f}x "
                     f"(up to {r['reuse_with_pastes']:.1f}x counting paste partners)")
        lines.append(line)
    if plan.get("train"):
        t = plan["train"]
        lines.append(f"schedule: {t['train_config']}: {t['iterations']} iterations x global batch {t['global_batch']}, "
                     f"max_skip {t['max_skip']} until {t['max_skip_until']}")
    else:
        lines.append("reuse over training: give --train-config to see it")
    return "\n".join(lines + _plan_tail(plan, "clip", "dataset", "video"))


def _plan_tail(plan: dict, sample: str, group: str, unit: str) -> list[str]:
    """The plan report's last lines: the estimated disk size and the datasets (or sets) left without samples."""
    lines = []
    if "estimated_bytes" in plan:
        bpc = ", ".join(f"{d} {_human(b)}" for d, b in plan["bytes_per_clip"].items())
        lines.append(f"estimated disk: {_human(plan['estimated_bytes'])} ({bpc} per {sample})")
    for d, why in sorted(plan["missing"].items()):
        lines.append(f"MISSING: {group} {d} yields no usable {unit}: {why}")
    return lines


LOOPBACK = "127.0.0.1"


def _private_ray_token() -> None:
    """Create ~/.ray/auth_token readable by its owner only, when token auth is on and no token is configured.

    Ray would generate the same file (64 hex digits) on the first local `ray.init`, but with the process umask
    (0644 usually): on a shared machine other users could then read it, and the token is what keeps them out of
    this user's local Ray. Nothing is created when RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH names the token, and an
    existing file is left as it is."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))


def init_ray(num_cpus: int):
    """Attach to the cluster the job was submitted to (RAY_JOB_ID) or named (RAY_ADDRESS); otherwise start a local
    Ray for this job alone, on 127.0.0.1 only and with token authentication on."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        import ray

        if os.environ.get("RAY_JOB_ID"):  # running under `ray job submit`: attach to that cluster
            ray.init()
        else:
            ray.init(address=os.environ["RAY_ADDRESS"])
        return ray

    # Token auth, set explicitly. Ray 2.60 (pinned) turns it on by default for a new local cluster and says so on
    # every run ("Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out"). Loopback keeps other
    # machines out but not other users of this one; the token does. A RAY_AUTH_MODE of the user's own wins. Ray
    # reads the mode once, at import: set it later and the driver and the GCS it starts disagree, so when Ray is
    # already imported it is left to Ray's default (the same mode, with its warning).
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        _private_ray_token()
    import ray
    from ray._private import ray_constants

    # Loopback. A node IP of 127.0.0.1 makes every Ray process bind its ports there (GCS, raylet and object
    # manager, workers, dashboard and runtime-env agents, metrics), but ray.init replaces a loopback
    # _node_ip_address with the machine's routable address unless Ray is in its single-machine mode (macOS and
    # Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import into ray_constants.ENABLE_RAY_CLUSTER). That
    # mode only matters while the node starts: Ray's processes get the node IP on their command lines.
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                 log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # another Ray version resolving the address otherwise: refuse rather than listen
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not {LOOPBACK}: its ports would be reachable from "
                           f"the network (Ray {ray.__version__}); set RAY_ADDRESS to use a cluster instead")
    return ray


def run(cfg: dict, allow_missing: list[str] = (), train_config: str | None = None) -> dict:
    t0 = time.time()
    out = storage.Store(cfg["out"])
    check_out(cfg["out"], cfg)
    train = training_draws(train_config, levels_of(cfg)) if train_config else None
    ray = init_ray(cfg["num_cpus"])
    try:
        return _run(cfg, out, ray, t0, list(allow_missing), train)
    finally:
        ray.shutdown()


def make_plans(cfg: dict, videos: dict[str, list[Video]]) -> dict[str, list[ClipPlan]]:
    """Every level's samples: 8-frame clips by Cutie's weights, or (static) every image x its multiplier."""
    if is_static(cfg):
        return plan_images(videos, cfg["multipliers"], cfg["seed"])
    return plan_clips(videos, cfg["clips_per_level"], cfg["levels"], cfg["seed"])


def plan_only(cfg: dict, allow_missing: list[str] = (), train_config: str | None = None, as_json: bool = False
              ) -> dict:
    """`--plan`: list, plan and estimate; writes nothing."""
    train = training_draws(train_config, levels_of(cfg)) if train_config else None
    ray = init_ray(cfg["num_cpus"]) if cfg["num_cpus"] > 1 else None
    try:
        videos, specs, skipped = list_videos(cfg, ray)
    finally:
        if ray is not None:
            ray.shutdown()
    missing = missing_datasets(videos, skipped, cfg)
    plans = make_plans(cfg, videos)
    plan = plan_summary(cfg, videos, plans, specs, missing, train)
    plan["skipped_while_listing"] = len(skipped)
    print(json.dumps(plan, indent=1, sort_keys=True) if as_json else format_plan(plan), flush=True)
    try:
        check_out(cfg["out"], cfg)
    except SystemExit:
        print(f"note: --out {cfg['out']} holds shards of another config; the job would refuse it", flush=True)
    return plan


def _run(cfg: dict, out: storage.Store, ray, t0: float, allow_missing: list[str], train: dict | None) -> dict:
    videos, specs, skipped = list_videos(cfg, ray)
    missing = missing_datasets(videos, skipped, cfg)
    check_missing(missing, allow_missing, cfg)
    plans = make_plans(cfg, videos)
    plan = plan_summary(cfg, videos, plans, specs, missing, train, estimate=False)
    print(format_plan(plan), flush=True)
    out.write_json("job.json", {"config_hash": config_hash(cfg), "hashed_config": hashed_config(cfg),
                                "config": cfg})
    if out.local:
        for stale in Path(out.root).rglob("*.tmp"):  # leftovers of a killed run (an upload is all or nothing)
            stale.unlink()
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    jobs = []  # (tar path under out, items)
    for level in sorted(plans):
        if out.local:
            (Path(out.root) / level).mkdir(exist_ok=True)
        ps = plans[level]
        for s in range(0, len(ps), cfg["clips_per_shard"]):
            items = [clip_item(specs[p.dataset], by_id[(p.dataset, p.video)], p)
                     for p in ps[s:s + cfg["clips_per_shard"]]]
            jobs.append((f"{level}/shard-{s // cfg['clips_per_shard']:06d}.tar", items))
    done_marks = set(out.find(".stats.json"))  # one listing, not a request per shard
    todo = [(p, it) for p, it in jobs if stats_name(p) not in done_marks]
    print(f"{len(jobs)} shards planned, {len(jobs) - len(todo)} already done", flush=True)
    if todo:
        remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(shard_task)
        # longest first (a level's last shard is partial): the last wave leaves fewer workers idle
        todo.sort(key=lambda job: -len(job[1]))
        pending = [remote.remote(cfg["out"], p, it, cfg["short_side"], cfg["jpeg_quality"], is_static(cfg))
                   for p, it in todo]
        with tqdm(total=len(pending), desc="shards", unit="shard", file=sys.stdout) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                bar.update(len(done))
    stats = {}
    marks = out.read_many([stats_name(p) for p, _ in jobs])
    for p, _ in jobs:
        st = json.loads(marks[stats_name(p)])
        stats[p] = st
        skipped += [dict(s, shard=p) for s in st["skipped"]]
    counted = ("images", "usable_images", "multiplier") if is_static(cfg) else \
        ("videos", "usable_videos", "frames", "annotated_frames")
    counts = {d: {**{k: r[k] for k in counted}, "clips": sum(r["clips"].values())} for d, r in plan["datasets"].items()}
    total_clips = sum(s["clips"] for s in stats.values())
    total_bytes = sum(s["bytes"] for s in stats.values())
    source = sum(s.get("source_bytes", 0) for s in stats.values())
    weights = image_weights(videos, cfg["multipliers"]) if is_static(cfg) else mixture_weights(videos)
    manifest = {"config": cfg, "config_hash": config_hash(cfg), "plan_version": PLAN_VERSION,
                "kind": cfg.get("kind", "video"), "datasets": counts, "mixture_weights": weights,
                "levels": levels_of(cfg),
                "clips_per_level": {lv: sum(s["clips"] for k, s in stats.items() if k.startswith(lv + "/"))
                                    for lv in sorted(plans)},
                "clips_per_shard": {k: s["clips"] for k, s in stats.items()},
                "shards": {k: {"clips": s["clips"], "bytes": s["bytes"], "sha256": s.get("sha256")}
                           for k, s in stats.items()},
                "num_shards": len(stats), "num_clips": total_clips, "bytes": total_bytes,
                "missing_datasets": missing, "plan": plan, "skipped": skipped, "num_skipped": len(skipped)}
    out.write_json("manifest.json", manifest)  # last: a manifest means every shard it lists is there
    secs = time.time() - t0
    ratio = total_bytes / source if source else float("nan")
    print(f"done: {total_clips} clips in {len(stats)} shards, {secs:.1f} s ({total_clips / max(secs, 1e-9):.1f} "
          f"clips/s), {total_bytes} bytes, {total_bytes // max(total_clips, 1)} bytes/clip, stored/source "
          f"{ratio:.2f}; skipped {len(skipped)} bad inputs (see manifest.json)", flush=True)
    if missing:
        print(f"datasets left out (--allow-missing): {', '.join(sorted(missing))}", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.shard", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-root")
    ap.add_argument("--out")
    ap.add_argument("--plan", action="store_true", help="print the plan report and exit; writes nothing")
    ap.add_argument("--json", action="store_true", help="with --plan: the report as JSON")
    ap.add_argument("--train-config", help="a training config: the report shows each clip's reuse over its schedule")
    ap.add_argument("--allow-missing", action="append", default=[], metavar="DATASET",
                    help="shard without DATASET when it yields no usable video (repeatable)")
    ap.add_argument("--debug", action="store_true", help="print the full traceback of an error too")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML values)")
    a = ap.parse_args(argv)
    if a.json and not a.plan:
        ap.error("--json goes with --plan")
    from model import cli

    try:
        return _main(a)
    except SystemExit as e:  # the job's own refusals (config, --out, missing datasets): one line, exit 2
        if not isinstance(e.code, str):
            raise
        return cli.report(e, cli.EXIT_USAGE, e.code, debug=a.debug)


def _main(a: argparse.Namespace) -> int:
    from model import cli

    if not Path(a.config).is_file():
        raise SystemExit(f"shard config not found: {a.config}")
    cfg = load_config(a.config, a.overrides, a.data_root, a.out)
    if a.plan:
        plan = plan_only(cfg, a.allow_missing, a.train_config, a.json)
        check_missing(plan["missing"], a.allow_missing, cfg)  # after the report: it shows what is missing
        return 0

    def job() -> None:
        run(cfg, a.allow_missing, a.train_config)

    disk = [cfg["out"]] if not storage.is_remote(cfg["out"]) else []
    return cli.run_cli(job, debug=a.debug, disk=disk)


if __name__ == "__main__":
    sys.exit(main())
