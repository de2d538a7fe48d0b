"""The Ray sharding job: native datasets → 8-frame clip samples in deterministic WebDataset tars.

`python -m data_pipeline.shard --config data_pipeline/configs/demo.yaml [--data-root DIR] [--out OUT] [key=value]`

One Ray task per shard writes OUT/<level>/shard-NNNNNN.tar through a temporary name and a rename, then
shard-NNNNNN.stats.json (the completion marker); a rerun skips shards that have their stats. Tars are
byte-identical across runs (sorted members, mtime 0, uid/gid 0, cv2 JPEG at a fixed quality). Bad inputs are
recorded in OUT/manifest.json (`skipped`, `num_skipped`) and skipped; the job still exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from .readers import BadInput, Video, build_reader
from .readers.base import ids_present
from .sampling import ClipPlan, mixture_weights, plan_clips, usable

OPTIONAL = {"reader_options"}  # dataset -> reader keyword arguments (DAVIS resolution, BURST annotations, ...)
REQUIRED = {"data_root", "out", "datasets", "levels", "clips_per_level", "clips_per_shard", "short_side",
            "jpeg_quality", "seed", "num_cpus"}


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
    missing = REQUIRED - set(cfg)
    if missing:
        raise SystemExit(f"{path}: missing config keys {sorted(missing)}")
    cfg.setdefault("reader_options", {})
    unknown = set(cfg) - REQUIRED - OPTIONAL
    if unknown:
        raise SystemExit(f"{path}: unknown config keys {sorted(unknown)}")
    if not cfg["data_root"] or not Path(cfg["data_root"]).is_dir():
        raise SystemExit(f"data_root {cfg['data_root']!r} is not a folder (give --data-root)")
    for k in ("clips_per_level", "clips_per_shard", "short_side", "num_cpus"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise SystemExit(f"config {k}={cfg[k]!r}: expected a positive int")
    if not isinstance(cfg["jpeg_quality"], int) or not 1 <= cfg["jpeg_quality"] <= 100:
        raise SystemExit(f"config jpeg_quality={cfg['jpeg_quality']!r}: expected 1..100")
    for lv, skip in cfg["levels"].items():
        if not lv.startswith("skip") or not isinstance(skip, int) or skip <= 0:
            raise SystemExit(f"config levels: bad entry {lv}: {skip!r}")
    return cfg


def config_hash(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("out", "data_root", "num_cpus")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ writing


def resize_short(img: np.ndarray, short: int, nearest: bool) -> np.ndarray:
    h, w = img.shape[:2]
    s = short / min(h, w)
    if s == 1:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return cv2.resize(img, size, interpolation=interp)


def encode_clip(reader, video: Video, plan: ClipPlan, short: int, quality: int) -> list[tuple[str, bytes]]:
    """Members of one sample; BadInput on any damaged frame or mask."""
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
        ids = ids_present(mask)
        if t == 0:
            if not ids:
                raise BadInput(where, "first frame of the clip has no object")
            ids0 = ids
        all_ids.update(ids)
        img = resize_short(img, short, nearest=False)
        mask = resize_short(mask, short, nearest=True)
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


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> int:
    """Deterministic tar at `path` via `path.tmp` + rename; returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(blob))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


_READERS: dict = {}


def shard_task(tar_path: str, items: list[tuple[dict, Video, ClipPlan]], short: int, quality: int) -> dict:
    """Write one shard; returns (and writes) its stats."""
    t0 = time.time()
    members, skipped = [], []
    for spec, video, plan in items:
        key = (spec["dataset"], spec["root"])
        if key not in _READERS:
            _READERS[key] = build_reader(spec["dataset"], spec["root"], **spec.get("options", {}))
        try:
            members += encode_clip(_READERS[key], video, plan, short, quality)
        except BadInput as e:
            skipped.append({"file": e.file, "reason": e.reason, "video": video.video, "key": plan.key})
        except Exception as e:  # noqa: BLE001  a decoder crash on one clip must not lose the shard
            skipped.append({"file": f"{spec['root']} video {video.video}", "video": video.video, "key": plan.key,
                            "reason": f"unexpected {type(e).__name__}: {e}"})
    path = Path(tar_path)
    size = write_tar(path, members)
    clips = len(items) - len(skipped)
    ray = sys.modules.get("ray")  # inside a Ray task: the node that wrote the shard; never starts Ray itself
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    stats = {"shard": path.name, "clips": clips, "bytes": size, "skipped": skipped, "node_id": node,
             "hostname": socket.gethostname(), "seconds": round(time.time() - t0, 3),
             "source_bytes": sum(_source_bytes(spec, video, plan) for spec, video, plan in items)}
    write_json(path.with_name(path.name.replace(".tar", ".stats.json")), stats)
    return stats


def _source_bytes(spec, video: Video, plan: ClipPlan) -> int:
    """Bytes of the source JPEGs of a clip (for the stored/source ratio); 0 where the path is not known."""
    reader = _READERS.get((spec["dataset"], spec["root"]))
    total = 0
    for fi in plan.frame_indices:
        p = None
        if hasattr(reader, "image_dir") and "files" in video.meta:
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


def init_ray(num_cpus: int):
    import ray

    if os.environ.get("RAY_JOB_ID"):  # running under `ray job submit`: attach to that cluster
        ray.init()
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    return ray


def run(cfg: dict) -> dict:
    t0 = time.time()
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*.tmp"):  # leftovers of a killed run
        stale.unlink()
    ray = init_ray(cfg["num_cpus"])
    try:
        return _run(cfg, out, ray, t0)
    finally:
        ray.shutdown()


def _run(cfg: dict, out: Path, ray, t0: float) -> dict:
    videos, specs, skipped = list_videos(cfg, ray)
    plans = plan_clips(videos, cfg["clips_per_level"], cfg["levels"], cfg["seed"])
    by_id = {(d, v.video): v for d, vs in videos.items() for v in vs}
    jobs = []  # (tar path, items)
    for level in sorted(plans):
        (out / level).mkdir(exist_ok=True)
        ps = plans[level]
        for s in range(0, len(ps), cfg["clips_per_shard"]):
            chunk = ps[s:s + cfg["clips_per_shard"]]
            items = [(specs[p.dataset], by_id[(p.dataset, p.video)], p) for p in chunk]
            jobs.append((out / level / f"shard-{s // cfg['clips_per_shard']:06d}.tar", items))
    todo = [(p, it) for p, it in jobs if not p.with_name(p.name.replace(".tar", ".stats.json")).is_file()]
    print(f"{len(jobs)} shards planned, {len(jobs) - len(todo)} already done", flush=True)
    if todo:
        remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(shard_task)
        pending = [remote.remote(str(p), it, cfg["short_side"], cfg["jpeg_quality"]) for p, it in todo]
        with tqdm(total=len(pending), desc="shards", unit="shard", file=sys.stdout) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                bar.update(len(done))
    stats = {}
    for p, _ in jobs:
        st = json.loads(p.with_name(p.name.replace(".tar", ".stats.json")).read_text())
        stats[str(p.relative_to(out))] = st
        skipped += [dict(s, shard=str(p.relative_to(out))) for s in st["skipped"]]
    counts = {}
    for d, vs in videos.items():
        ok = [v for v in vs if usable(v)]
        counts[d] = {"videos": len(vs), "usable_videos": len(ok), "frames": sum(len(v.frames) for v in vs),
                     "annotated_frames": sum(sum(map(bool, v.annotated)) for v in vs),
                     "clips": sum(1 for ps in plans.values() for p in ps if p.dataset == d)}
    total_clips = sum(s["clips"] for s in stats.values())
    total_bytes = sum(s["bytes"] for s in stats.values())
    source = sum(s.get("source_bytes", 0) for s in stats.values())
    manifest = {"config": cfg, "config_hash": config_hash(cfg), "datasets": counts,
                "mixture_weights": mixture_weights(videos), "levels": cfg["levels"],
                "clips_per_level": {lv: sum(s["clips"] for k, s in stats.items() if k.startswith(lv + "/"))
                                    for lv in sorted(plans)},
                "clips_per_shard": {k: s["clips"] for k, s in stats.items()},
                "num_shards": len(stats), "num_clips": total_clips, "bytes": total_bytes,
                "skipped": skipped, "num_skipped": len(skipped)}
    write_json(out / "manifest.json", manifest)
    secs = time.time() - t0
    ratio = total_bytes / source if source else float("nan")
    print(f"done: {total_clips} clips in {len(stats)} shards, {secs:.1f} s ({total_clips / max(secs, 1e-9):.1f} "
          f"clips/s), {total_bytes} bytes, {total_bytes // max(total_clips, 1)} bytes/clip, stored/source "
          f"{ratio:.2f}; skipped {len(skipped)} bad inputs (see manifest.json)", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-root")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML values)")
    a = ap.parse_args(argv)
    run(load_config(a.config, a.overrides, a.data_root, a.out))


if __name__ == "__main__":
    main()
