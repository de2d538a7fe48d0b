"""Training-loader throughput, clips/s per worker (one process each, same machine, same run):

  (a) data_pipeline.loader from WebDataset shards (decode + Cutie's augmentation + the uint8 batch; the colour
      jitter is drawn there and applied by finish_batch on the device, which (f) times on this CPU);
  (b) the same clips, decode and augmentation read from the raw dataset folders frame by frame, as Cutie does
      (JPEGImages/<video>/<frame>.jpg + Annotations/<video>/<frame>.png, one file per frame);
  (c) bare decode of 8 JPEGs + 8 PNGs per clip from the shards (the loader's decoder), no augmentation;
  (d), (e) the same with PIL (Cutie's decoder) and with cv2 (this loader's decoder before simplejpeg).

Prints (a)/(b) and the loader against the decode cost of the clips it actually needs: a fraction f of its clips
(those < num_objects objects, times merge_probability) also decode a paste partner, so its ceiling is
(c)/(1 + f) and (a)/((c)/(1 + f)) says how much the augmentation, warps and collation add (1.0: nothing). The raw
folders: `--raw-root` (a DAVIS/YouTube-VOS layout, e.g. one written by
`python -m data_pipeline.synth`) or, by default, a generated 480p textured set under /tmp. The shards for (a) and
(c) are written from exactly the clips (b) reads (contract format, docs/architecture.md section 2), so the only
difference between (a) and (b) is the storage.

  (g) the loader of (a) streaming the same shards over loopback HTTP (benchmarks/loopback_storage.http_server over
      the shard folder: http://127.0.0.1:PORT as the shard root, each shard one curl GET);
  (h) the same from a loopback S3 endpoint (moto's S3 server, the shard folder uploaded to a bucket: s3://... as the
      shard root, each shard one s3fs GET).

(g) and (h) are timed exactly as (a) (one process, the same clips, crop, knobs and seed, one warm-up batch) and must
hand out the very clips (a) does: only where the shards live differs. A remote root is listed through its
manifest.json (written here from the tars, as the shard job writes it); each shard is streamed whole, checked
against the manifest's bytes and sha256 and kept in memory. Printed beside them: the shards each downloaded (all of
the run, and those inside the timing), the bytes downloaded per clip against the shard bytes per clip (a lane also
downloads its paste pool, `paste_pool_shards` shards per block of `block_clips` clips: the steady-state factor is
printed), the cost of one shard's download + sha256 check, and the ratio to (a) (target >= 0.9). Usage:

    python benchmarks/bench_loader.py [--raw-root DIR] [--clips 80] [--crop 480] [--workdir /tmp/bench-loader]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loopback_storage import http_server, s3_server  # noqa: E402
from data_pipeline import augment as A  # noqa: E402
from data_pipeline import loader as L  # noqa: E402
from data_pipeline import storage  # noqa: E402
from data_pipeline.loader import build_train_loader, decode_sample, scan_shard  # noqa: E402

T = 8


def make_raw(root: Path, videos: int, frames: int, h: int = 480, w: int = 854, seed: int = 0) -> None:
    """A YouTube-VOS-style folder set with textured frames (flat colours would make JPEG decoding unrealistically
    cheap) and a few moving objects."""
    rng = np.random.default_rng(seed)
    for v in range(videos):
        jd, ad = root / "JPEGImages" / f"v{v:03d}", root / "Annotations" / f"v{v:03d}"
        jd.mkdir(parents=True, exist_ok=True)
        ad.mkdir(parents=True, exist_ok=True)
        base = cv2.resize(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
        objs = [(int(rng.integers(1, 6)), int(rng.integers(0, h - 150)), int(rng.integers(0, w - 200)))
                for _ in range(int(rng.integers(1, 5)))]
        for f in range(frames):
            img = base.copy()
            mask = np.zeros((h, w), np.uint8)
            for oid, y, x in objs:
                yy, xx = y + f % 20, x + 2 * (f % 30)
                cv2.ellipse(mask, (xx + 80, yy + 60), (80, 55), 0, 0, 360, oid, -1)
                img[mask == oid] = (img[mask == oid] // 2 + np.array([40 * oid, 120, 200 - 30 * oid], np.uint8) // 2)
            noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
            cv2.imwrite(str(jd / f"{f:05d}.jpg"), cv2.add(img, noise), [cv2.IMWRITE_JPEG_QUALITY, 90])
            Image.fromarray(mask).save(ad / f"{f:05d}.png")


def sample_clips(root: Path, n: int, max_skip: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Cutie's frame sampling: grow a set of 8 frames within max_skip of any picked one, sorted."""
    rng = np.random.default_rng(seed)
    vids = sorted(p.name for p in (root / "JPEGImages").iterdir())
    clips = []
    while len(clips) < n:
        vid = vids[int(rng.integers(len(vids)))]
        names = sorted(p.stem for p in (root / "JPEGImages" / vid).glob("*.jpg"))
        if len(names) < T:
            continue
        picked = {int(rng.integers(len(names)))}
        while len(picked) < T:
            cand = {j for i in picked for j in range(max(0, i - max_skip), min(len(names), i + max_skip + 1))} - picked
            picked.add(int(rng.choice(sorted(cand))))
        frames = [names[i] for i in sorted(picked)]
        first = np.asarray(Image.open(root / "Annotations" / vid / f"{frames[0]}.png"))
        if first.any():
            clips.append((vid, frames))
    return clips


def write_shards(raw: Path, clips, out: Path, per_shard: int = 16) -> None:
    import webdataset as wds

    for level in ("skip05", "skip10", "skip15"):
        (out / level).mkdir(parents=True, exist_ok=True)
    for s in range(0, len(clips), per_shard):
        with wds.TarWriter(str(out / "skip05" / f"shard-{s // per_shard:06d}.tar"), mtime=0) as tw:
            for i, (vid, frames) in enumerate(clips[s:s + per_shard], start=s):
                m0 = np.asarray(Image.open(raw / "Annotations" / vid / f"{frames[0]}.png"))
                h, w = m0.shape
                meta = {"dataset": "bench", "video": vid, "frames": frames,
                        "object_ids": [int(v) for v in np.unique(m0) if v], "all_object_ids": [], "max_skip": 5,
                        "level": "skip05", "original_size": [h, w], "size": [h, w], "index": i}
                sample = {"__key__": f"bench_{vid}_skip05_{i}", "json": json.dumps(meta).encode()}
                for t, f in enumerate(frames):
                    sample[f"{t:02d}.jpg"] = (raw / "JPEGImages" / vid / f"{f}.jpg").read_bytes()
                    sample[f"{t:02d}.png"] = (raw / "Annotations" / vid / f"{f}.png").read_bytes()
                tw.write(sample)
    for level in ("skip10", "skip15"):  # the curriculum needs the folders; the benchmark stays in skip05
        for p in (out / "skip05").glob("*.tar"):
            shutil.copy(p, out / level / p.name)


def write_manifest(shards: Path) -> dict:
    """The shard root's manifest.json as the shard job writes it, from the tars on disk: its `shards` table
    {"skip05/shard-000000.tar": {"clips", "bytes", "sha256"}} is what a remote root is listed and checked through."""
    table = {}
    for p in sorted(shards.glob("skip*/*.tar")):
        table[str(p.relative_to(shards))] = {"clips": len(scan_shard(p)), "bytes": p.stat().st_size,
                                             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    manifest = {"kind": "video", "shards": table, "num_shards": len(table),
                "num_clips": sum(r["clips"] for r in table.values()),
                "bytes": sum(r["bytes"] for r in table.values())}
    (shards / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def bench_a(shards: str | Path, n: int, crop: int, on_warm=None) -> tuple[float, float, list]:
    """(clips/s, fraction of the clips that got a paste partner, (shard, key, partner's shard, partner's key) of
    every clip, the warm-up's included). `shards`: the local folder of (a) or the remote root of (g)/(h), nothing else differs. `on_warm` is
    called between the warm-up and the timing (outside it)."""
    # total_iterations: the n + 1 clips all fall in the curriculum's first tenth, skip05 (10 * n put the last one in
    # skip10: a level switch, one more shard index locally, one more shard and paste pool downloaded remotely)
    loader = build_train_loader(str(shards), batch_size=1, rank=0, world_size=1, total_iterations=10 * (n + 1),
                                crop_size=crop, num_workers=0, seed=1)
    it = iter(loader)
    infos = [next(it)["info"][0]]  # warm-up (shard index, first file open; remote: the manifest, first downloads)
    if on_warm is not None:
        on_warm()
    pasted = 0
    t0 = time.perf_counter()
    for _ in range(n):
        infos.append(next(it)["info"][0])
        pasted += infos[-1]["merged_from"] is not None
    rate = n / (time.perf_counter() - t0)
    return rate, pasted / n, [(i["shard"], i["key"], i.get("merged_shard"), i["merged_from"]) for i in infos]


@contextlib.contextmanager
def counting_reads():
    """storage.read_url (the loader's only way to a remote object) wrapped to count, per URL, the GETs and bytes
    the loader received: the client side's account (for S3, whose server keeps no count). Nothing else changes."""
    got: dict[str, list[int]] = {}
    real = storage.read_url

    def read_url(url: str) -> bytes:
        data = real(url)
        rec = got.setdefault(url, [0, 0])
        rec[0] += 1
        rec[1] += len(data)
        return data

    storage.read_url = read_url
    try:
        yield got
    finally:
        storage.read_url = real


def bench_streaming(shards: Path, manifest: dict, n: int, crop: int, local_clips: list) -> dict:
    """(g) and (h): the loader of bench_a reading `shards` through loopback HTTP and loopback S3. For each: clips/s,
    the tars downloaded (in all, and inside the timing), the bytes downloaded, one shard's download + sha256 time."""
    tars = manifest["shards"]
    out = {}

    def run(name: str, root: str, gets) -> None:
        """gets(): {rel: number of GETs so far} of the tars."""
        at_warm = {}
        rate, pasted, clips = bench_a(root, n, crop, on_warm=lambda: at_warm.update(gets()))
        if clips != local_clips:  # the streams are a pure function of (seed, shard files): the same clips as (a)
            raise SystemExit(f"({name}) handed out other clips than (a) from the same shards: "
                             f"{clips[:3]} ... against {local_clips[:3]} ...")
        done = gets()
        rel = max(tars, key=lambda r: tars[r]["bytes"])
        t0 = time.perf_counter()
        data = storage.read_url(f"{root}/{rel}")  # as the loader's _fetch: the whole object, then its sha256
        t1 = time.perf_counter()
        if hashlib.sha256(data).hexdigest() != tars[rel]["sha256"]:
            raise SystemExit(f"({name}) {rel}: the bytes served differ from the manifest's sha256")
        fetch_s, sha_s = time.perf_counter() - t0, time.perf_counter() - t1
        out[name] = {"rate": rate, "pasted": pasted,
                     "gets": sum(done.values()), "gets_timed": sum(done.values()) - sum(at_warm.values()),
                     "bytes": sum(c * tars[r]["bytes"] for r, c in done.items()),
                     "fetch_s": fetch_s, "sha_s": sha_s, "fetch_bytes": len(data), "fetch_clips": tars[rel]["clips"]}

    with http_server(shards) as web:  # server side: the GETs it answered, per path
        run("http", web.url, lambda: {r: c for r, c in web.gets.items() if r in tars})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    with s3_server() as s3:
        url = s3.bucket("bench-shards") + "/shards"
        s3.upload_folder(shards, url)
        with counting_reads() as got:  # client side: moto's server keeps no count
            prefix = url + "/"
            run("s3", url, lambda: {u[len(prefix):]: c for u, (c, _) in got.items() if u[len(prefix):] in tars})
    return out


def bench_b(raw: Path, clips, crop: int) -> float:
    """Cutie's storage: one file open + read per frame and per mask, then the loader's own augmentation
    (`_Lane._augment`: geometry from the masks, RGBX decode and warps, a partner from a pool of the other clips
    pasted inside its boxes, the colour jitter drawn) and the same uint8 batch. Only the storage differs from (a)."""
    params = A.AugmentParams(crop_size=crop)
    cfg = L.LoaderConfig(batch_size=1, total_iterations=1, num_frames=T, crop_size=crop, num_workers=0)
    lane = L._Lane(cfg, {0: []}, 0, 0, params)

    def read_raw(path: Path, key: str, fields: dict) -> L.Sample:
        """As read_sample, from one file per frame and mask (path: the video's JPEGImages folder)."""
        jpegs = [(path / f"{f}.jpg").read_bytes() for f in fields["frames"]]
        size = L.jpeg_size(jpegs[0], "00.jpg")
        for t, data in enumerate(jpegs[1:], start=1):
            L.jpeg_size(data, f"{t:02d}.jpg")
        ann = path.parent.parent / "Annotations" / path.name
        masks = np.stack([L.decode_png_mask((ann / f"{f}.png").read_bytes(), f) for f in fields["frames"]])
        return L.Sample(key, {"frames": fields["frames"]}, masks, jpegs, size)

    lane._read = read_raw
    entries = [(raw / "JPEGImages" / vid, f"bench_{vid}_skip05_{i}", {"frames": frames})
               for i, (vid, frames) in enumerate(clips)]
    lane.stream_key = lane.pool_key = (0, 0)  # the paste pool: every clip (another video when there is one)
    lane.pool = L._Pool(entries)
    rgb = np.empty((1, T, crop, crop, 4), np.uint8)
    cls = np.empty((1, T, crop, crop), np.uint8)
    t0 = time.perf_counter()
    for i, (path, key, fields) in enumerate(entries):
        rng = np.random.default_rng([1, i])
        try:
            c = lane._augment(rng, 0, path, read_raw(path, key, fields), rgb[0], cls[0])
        except A.NoObjectError:
            continue  # the loader takes the next draw; here the clip is just not counted as augmented
        L.loader_batch(rgb, cls, [c["objects"]], c["jitter"][None], np.array([c["grey"]]), [c["info"]])
    return len(clips) / (time.perf_counter() - t0)


def bench_finish(n: int, crop: int, batch: int = 4) -> float:
    """finish_batch on this CPU, ms per clip (in training it runs on the device, after the copy)."""
    rng = np.random.default_rng(0)
    b = L.loader_batch(rng.integers(0, 256, (batch, T, crop, crop, 4), dtype=np.uint8),
                       rng.integers(0, 3, (batch, T, crop, crop), dtype=np.uint8), [[1, 2]] * batch,
                       np.stack([A.colour_draw(rng, T, A.AugmentParams())[0] for _ in range(batch)]),
                       np.zeros(batch, bool), [{}] * batch)
    L.finish_batch(b)
    reps = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        L.finish_batch(b)
    return (time.perf_counter() - t0) / (reps * batch) * 1e3


def bench_decode(shards: Path, n: int, decoder: str = "loader") -> float:
    """Bare decode of n clips' 8 JPEGs + 8 PNGs from the shards, no augmentation. `decoder`: "loader" (the loader's
    own decode_sample: simplejpeg), "pil" (as Cutie's loader: Image.open(...).convert("RGB"), palette PNGs) or "cv2"
    (cv2.imdecode + BGR→RGB for JPEGs, PIL PNGs: this loader's decoder before simplejpeg)."""
    tars = sorted((shards / "skip05").glob("*.tar"))
    items = [(p, key, fields) for p in tars for key, fields in scan_shard(p)]

    def decode(fh, key, fields):
        if decoder == "loader":
            decode_sample(fh, key, fields, T)
            return
        for t in range(T):
            for ext in ("jpg", "png"):
                off, size = fields[f"{t:02d}.{ext}"]
                fh.seek(off)
                data = fh.read(size)
                if decoder == "cv2" and ext == "jpg":
                    cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                    continue
                with Image.open(io.BytesIO(data)) as im:
                    np.asarray(im.convert("RGB") if ext == "jpg" else im)

    t0 = time.perf_counter()
    done = 0
    while done < n:
        for p, key, fields in items:
            with open(p, "rb") as fh:
                decode(fh, key, fields)
            done += 1
            if done == n:
                break
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-root", type=Path, default=None, help="DAVIS/YouTube-VOS layout folder (default: generated)")
    ap.add_argument("--clips", type=int, default=80)
    ap.add_argument("--crop", type=int, default=480)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-loader"))
    ap.add_argument("--repeat", type=int, default=1,
                    help="time (a), (g), (h) this many times, alternating, and report the medians (a busy machine "
                         "makes one run of each swing by 10-15 %%)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cv2.setNumThreads(1)
    raw = args.raw_root
    if raw is None:
        raw = args.workdir / "raw"
        if not (raw / "JPEGImages").is_dir():
            print(f"generating a 480p raw folder set in {raw} ...", flush=True)
            make_raw(raw, videos=6, frames=40)
    clips = sample_clips(raw, args.clips, max_skip=5)
    shards = args.workdir / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    write_shards(raw, clips, shards)
    manifest = write_manifest(shards)
    h, w = np.asarray(Image.open(raw / "Annotations" / clips[0][0] / f"{clips[0][1][0]}.png")).shape
    print(f"{len(clips)} clips of {T} frames at {w}x{h}, crop {args.crop}, one process, OMP/cv2 threads 1")
    c = bench_decode(shards, len(clips))
    d = bench_decode(shards, len(clips), "pil")
    e = bench_decode(shards, len(clips), "cv2")
    rounds = []
    for _ in range(max(1, args.repeat)):  # alternating, so that a change in the machine's load hits all three
        a, pasted, local_clips = bench_a(shards, len(clips), args.crop)
        rounds.append((a, bench_streaming(shards, manifest, len(clips), args.crop, local_clips)))
    a = float(np.median([r[0] for r in rounds]))
    st = rounds[0][1]
    for name in ("http", "s3"):
        st[name]["rate"] = float(np.median([r[1][name]["rate"] for r in rounds]))
    b = bench_b(raw, clips, args.crop)
    f = bench_finish(len(clips), args.crop)
    decoder = "simplejpeg" if L.simplejpeg is not None else "cv2"
    print(f"(a) loader from shards           : {a:7.2f} clips/s per worker ({pasted:.2f} of them pasted a partner)")
    print(f"(b) raw folders, frame by frame  : {b:7.2f} clips/s per worker")
    print(f"(c) bare decode 8 JPEG + 8 PNG   : {c:7.2f} clips/s per worker (JPEG: {decoder})")
    print(f"(d) the same decode with PIL     : {d:7.2f} clips/s per worker (Cutie's decoder)")
    print(f"(e) the same decode with cv2     : {e:7.2f} clips/s per worker (this loader's decoder before)")
    print(f"(f) finish_batch on this CPU     : {f:7.2f} ms per clip (colour jitter + float conversion; on the "
          "device in training, not in (a))")
    read = len(clips) + 1  # clips handed out, the warm-up's included
    level = {r: v for r, v in manifest["shards"].items() if r.startswith("skip05/")}  # the level the bench reads
    shard_mb = sum(v["bytes"] for v in level.values()) / sum(v["clips"] for v in level.values()) / 1e6
    per_shard = sum(v["clips"] for v in level.values()) / len(level)
    cfg = L.LoaderConfig(batch_size=1, total_iterations=1)
    for tag, name, where in (("g", "http", "over loopback HTTP "), ("h", "s3", "from loopback S3   ")):
        r = st[name]
        print(f"({tag}) loader streaming {where}: {r['rate']:7.2f} clips/s per worker ({r['gets']} shard GETs, "
              f"{r['gets_timed']} of them in the timing; {r['bytes'] / read / 1e6:.2f} MB downloaded per clip, the "
              f"shards hold {shard_mb:.2f} MB per clip)")
    print(f"one shard ({st['http']['fetch_clips']} clips, {st['http']['fetch_bytes'] / 1e6:.1f} MB) downloaded and "
          f"sha256-checked: http {st['http']['fetch_s'] * 1e3:.0f} ms, s3 {st['s3']['fetch_s'] * 1e3:.0f} ms "
          f"(the sha256 {st['http']['sha_s'] * 1e3:.0f} ms of it); in "
          f"the steady state a lane downloads about 1 + paste_pool_shards {cfg.paste_pool_shards} x {per_shard:.0f} clips "
          f"per shard / block_clips {cfg.block_clips} = {1 + cfg.paste_pool_shards * per_shard / cfg.block_clips:.2f}"
          " x the shard bytes of the clips it hands out")
    print(f"decode of the clips (a) needs, 1 + {pasted:.2f} per clip: {c / (1 + pasted):.2f} clips/s with (c), "
          f"{d / (1 + pasted):.2f} with (d), {e / (1 + pasted):.2f} with (e)")
    print(f"(a)/(b) = {a / b:.2f}   (a)/(c) = {a / c:.2f}   (a) against the decode it needs (target >= 0.8): "
          f"{a * (1 + pasted) / c:.2f} with (c), {a * (1 + pasted) / d:.2f} with (d), {a * (1 + pasted) / e:.2f} with (e)")
    print(f"streaming / local-file loader: http {st['http']['rate'] / a:.2f}, s3 {st['s3']['rate'] / a:.2f} "
          "(target >= 0.9)")
    if len(rounds) > 1:
        per = ", ".join(f"{r[1]['http']['rate'] / r[0]:.2f}/{r[1]['s3']['rate'] / r[0]:.2f}" for r in rounds)
        print(f"(a), (g), (h) are medians of {len(rounds)} alternating rounds; http/s3 ratio per round: {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
