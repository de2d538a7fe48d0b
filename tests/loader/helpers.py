"""Small clip shards in the contract format (docs/architecture.md section 2), written with webdataset.TarWriter.

Each object id has its own saturated colour (`colour_of`) and the background is dark grey, so a test can check
that a transformed mask still lies on its object's pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

H, W, T = 48, 64, 8
PY_ENV_KEYS = ("RANK", "WORLD_SIZE")


def colour_of(obj: int) -> np.ndarray:
    table = {3: (255, 0, 0), 7: (0, 255, 0), 20: (0, 0, 255), 41: (255, 255, 0), 200: (255, 0, 255)}
    return np.array(table.get(obj, (0, 255, 255)), np.uint8)


def make_clip(rng: np.random.Generator, ids: list[int], h: int = H, w: int = W, t: int = T):
    frames = np.full((t, h, w, 3), 40, np.uint8)
    masks = np.zeros((t, h, w), np.uint8)
    for obj in ids:
        bh, bw = int(rng.integers(10, 18)), int(rng.integers(10, 18))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        dy, dx = int(rng.integers(-1, 2)), int(rng.integers(-1, 2))
        for i in range(t):
            yy = int(np.clip(y + dy * i, 0, h - bh))
            xx = int(np.clip(x + dx * i, 0, w - bw))
            masks[i, yy:yy + bh, xx:xx + bw] = obj
    for i in range(t):
        for obj in ids:
            frames[i][masks[i] == obj] = colour_of(obj)
    return frames, masks


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(root: Path, per_level: dict[str, list[int]], seed: int = 0, id_pool=(3, 7, 20, 41, 200),
                 max_objects: int = 5) -> dict[str, dict]:
    """per_level: {"skip05": [samples in shard 0, samples in shard 1, ...], ...}. Returns {key: json meta}."""
    rng = np.random.default_rng(seed)
    metas: dict[str, dict] = {}
    for level, counts in per_level.items():
        (root / level).mkdir(parents=True, exist_ok=True)
        index = 0
        for s, n in enumerate(counts):
            path = root / level / f"shard-{s:06d}.tar"
            with wds.TarWriter(str(path), mtime=0) as tw:
                for _ in range(n):
                    k = int(rng.integers(1, max_objects + 1))
                    ids = sorted(int(v) for v in rng.choice(id_pool, size=k, replace=False))
                    frames, masks = make_clip(rng, ids)
                    key = f"synth_vid{index:04d}_{level}_{index}"
                    meta = {"dataset": "synth", "video": f"vid{index:04d}", "frames": [f"{i:05d}" for i in range(T)],
                            "object_ids": sorted(int(v) for v in np.unique(masks[0]) if v),
                            "all_object_ids": ids, "max_skip": int(level[4:]), "level": level,
                            "original_size": [H, W], "size": [H, W], "index": index}
                    sample = {"__key__": key, "json": json.dumps(meta).encode()}
                    for i in range(T):
                        sample[f"{i:02d}.jpg"] = _jpg(frames[i])
                        sample[f"{i:02d}.png"] = _png(masks[i])
                    tw.write(sample)
                    metas[key] = meta
                    index += 1
            (root / level / f"shard-{s:06d}.stats.json").write_text(json.dumps({"count": n}))
    return metas


def small_set(root: Path, seed: int = 0) -> dict[str, dict]:
    """Three levels, uneven shards of a few samples each."""
    return write_shards(root, {"skip05": [3, 5, 2], "skip10": [4, 3], "skip15": [5, 2, 3]}, seed=seed)


LOADER_KW = dict(num_frames=T, num_objects=3, crop_size=32, max_skip=[5, 10, 15, 5],
                 max_skip_until=[0.1, 0.3, 0.8, 1.0], seed=7)


# ----------------------------------------------------------------------------------------------- real shards


def run_module(args: list[str], root: Path) -> None:
    """`python -m ...` from the repository root with the test settings; fails the test with its output."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def add_sha256(root: Path) -> None:
    """Record each shard's sha256 in its stats.json, as the shard job does (for shards written without it)."""
    import hashlib

    for tar in sorted(root.glob("skip*/*.tar")):
        st = tar.with_name(tar.name.replace(".tar", ".stats.json"))
        rec = json.loads(st.read_text()) if st.is_file() else {}
        if "sha256" not in rec:
            rec["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
            st.write_text(json.dumps(rec))


def corrupt_quantisation_byte(tar: Path) -> str:
    """Silent corruption: change one byte of a JPEG quantisation table in the sample in the middle of `tar` (the
    file keeps its size and tar structure, the JPEG still decodes, only its pixels change). Returns the key."""
    from data_pipeline.loader import scan_shard

    idx = scan_shard(tar)
    key, fields = idx[len(idx) // 2]
    off, size = fields["03.jpg"]
    with open(tar, "r+b") as f:
        f.seek(off)
        data = f.read(size)
        dqt = data.index(b"\xff\xdb")  # marker, 2-byte length, Pq/Tq, then the 64 table entries
        pos = off + dqt + 5 + 10
        f.seek(pos)
        old = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([old + 1 if old < 255 else old - 1]))
    return key


def take(loader, n: int) -> list:
    """The first n batches of an iteration over `loader` (which then stops there)."""
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out
