"""Issue 9, items 4 and 8b: corrupt inputs are recorded and skipped, never crash the job, and are counted.

Sharder: a zero-byte JPEG, a mask PNG of the wrong size, an RLE whose size disagrees with its frame, a dataset JSON
that is not JSON, all damaged in a copy of the synthetic datasets; the real Ray shard job must finish and name each
one (file + reason) in its manifest with a count.
Loader: a truncated tar, a clip JSON missing a key, a mask of the wrong size, and `.pth`/`.pyd` members carrying a
pickle payload, in a copy of real shards; the real loader must warn (naming the sample) and skip, count the skips,
and never unpickle a member; a training run over them logs that count to MLflow as `data/loader_skipped`."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import pickle
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import SHARD_CONFIG, run_shard
from .helpers import PY, ROOT, child_env

pytestmark = [pytest.mark.fault, pytest.mark.slow]


# ------------------------------------------------------------------------------------------------ sharder


def _first(paths, what: str) -> Path:
    paths = sorted(paths)
    assert paths, f"the synthetic data has no {what}"
    return paths[0]


def corrupt_datasets(root: Path) -> dict[str, Path]:
    """Damage one file of each kind in place; returns kind → the damaged file."""
    bad = {}
    davis = root / "DAVIS"
    seqs = sorted(p for p in (davis.rglob("JPEGImages/480p/*")) if p.is_dir())
    assert len(seqs) >= 2, "need two DAVIS sequences"
    jpg = sorted(seqs[0].glob("*.jpg"))[2]
    jpg.write_bytes(b"")  # zero-byte JPEG
    bad["zero_byte_jpeg"] = jpg
    ann = Path(str(seqs[1]).replace("JPEGImages", "Annotations"))
    png = sorted(ann.glob("*.png"))[1]
    with Image.open(png) as im:
        w, h = im.size
        palette = im.getpalette()
        arr = np.array(im)
    small = Image.fromarray(arr[: h // 2, : w // 2])  # wrong size: half the frame
    if palette:
        small.putpalette(palette)
    small.save(png)
    bad["wrong_size_mask"] = png

    ovis_json = _first((root / "OVIS").rglob("*.json"), "OVIS annotation JSON")
    data = json.loads(ovis_json.read_text())
    for ann_ in data["annotations"]:
        segs = [i for i, s in enumerate(ann_["segmentations"]) if s]
        if segs:
            seg = ann_["segmentations"][segs[0]]
            seg["size"] = [seg["size"][0] + 7, seg["size"][1] + 3]  # RLE size disagrees with the frame
            bad["rle_size_mismatch"] = ovis_json
            video = next(v for v in data["videos"] if v["id"] == ann_["video_id"])
            bad["rle_video"] = video["file_names"][0].split("/")[0]
            break
    ovis_json.write_text(json.dumps(data))

    burst_json = _first((root / "BURST").rglob("*.json"), "BURST annotation JSON")
    burst_json.write_text('{"sequences": [ this is not JSON')  # a dataset JSON that is not JSON
    bad["not_json"] = burst_json
    return bad


def _dataset_counts(videos) -> dict:
    """The manifest's per-dataset counts (shard.plan_summary) of a listing, clips left out."""
    from data_pipeline.sampling import usable

    return {d: {"videos": len(vs), "usable_videos": sum(map(usable, vs)), "frames": sum(len(v.frames) for v in vs),
                "annotated_frames": sum(sum(map(bool, v.annotated)) for v in vs)} for d, vs in videos.items()}


def _clean_listing_without(synth_data: Path, drop: set[tuple[str, str]], lost: set[str]):
    """The clean datasets' videos, listed in-process, less the videos (dataset, video) the damage must drop and
    the datasets it must lose whole: what the sharder should have planned from the damaged copy. Returns
    (shard config, clean videos, kept videos, the plan of the kept ones)."""
    from data_pipeline import shard
    from data_pipeline.sampling import plan_clips

    cfg = shard.load_config(SHARD_CONFIG, [], synth_data, synth_data / "unused")
    videos, _, problems = shard.list_videos(cfg)
    assert not problems, problems
    for d, v in drop:
        assert v in {x.video for x in videos[d]}, f"{d} has no video {v}"
    kept = {d: [] if d in lost else [v for v in vs if (d, v.video) not in drop] for d, vs in videos.items()}
    return cfg, videos, kept, plan_clips(kept, cfg["clips_per_level"], cfg["levels"], cfg["seed"])


def _tar_keys(root: Path) -> list[str]:
    keys = []
    for p in sorted(root.rglob("*.tar")):
        with tarfile.open(p) as t:
            keys += sorted({m.split(".", 1)[0] for m in t.getnames()})
    return keys


@pytest.mark.timeout(600)
def test_sharder_records_and_skips_bad_inputs(synth_data, reference_shards, tmp_path):
    """Four bad inputs planted, four recorded: `num_skipped` is exactly 4 and `skipped` names each planted file
    (with its video) and nothing else. Each one costs exactly its video (BURST's unreadable JSON: the whole
    dataset), so the manifest's per-dataset counts are the clean run's less those videos, and the clips are
    exactly the plan over the clean videos less those videos: the same keys in the tars, none of a bad video."""
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    bad = corrupt_datasets(data)
    out = tmp_path / "shards"
    # BURST's one annotation JSON is unreadable, so the whole dataset is lost: an error naming it, nothing written...
    refused = run_shard(data, out, rc=2)
    assert "dataset burst yields no usable video" in refused.stderr and bad["not_json"].name in refused.stderr
    assert "--allow-missing burst" in refused.stderr and not list(out.rglob("*.tar"))
    proc = run_shard(data, out, "--allow-missing", "burst")  # ...until it is allowed; then nothing crashes the job
    assert "Traceback" not in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())

    # 1. exactly the planted bad inputs are recorded, each with its file and video, and counted
    planted = {(str(bad["zero_byte_jpeg"]), bad["zero_byte_jpeg"].parent.name),
               (str(bad["wrong_size_mask"]), bad["wrong_size_mask"].parent.name),
               (str(bad["rle_size_mismatch"]), bad["rle_video"]),
               (str(bad["not_json"]), None)}
    recorded = [(s["file"], s.get("video")) for s in manifest["skipped"]]
    assert sorted(recorded, key=str) == sorted(planted, key=str), json.dumps(manifest["skipped"], indent=1)
    assert manifest["num_skipped"] == len(planted) == 4, \
        f"num_skipped is {manifest['num_skipped']}, but {len(planted)} bad inputs were planted (and recorded)"
    assert f"skipped {len(planted)} bad inputs" in proc.stdout
    assert set(manifest["missing_datasets"]) == {"burst"}

    # 2. each bad input costs exactly its video: counts are the clean run's less those videos' ...
    drop = {("davis", bad["zero_byte_jpeg"].parent.name), ("davis", bad["wrong_size_mask"].parent.name),
            ("ovis", bad["rle_video"])}
    _, clean_videos, kept, plan = _clean_listing_without(synth_data, drop, lost={"burst"})
    clean = json.loads((reference_shards / "manifest.json").read_text())["datasets"]
    assert {d: {k: c[k] for k in ("videos", "usable_videos", "frames", "annotated_frames")}
            for d, c in clean.items()} == _dataset_counts(clean_videos)  # the in-process listing is the clean run's
    removed = {d: len(clean_videos[d]) - len(vs) for d, vs in kept.items()}
    assert removed == {"davis": 2, "ovis": 1, "burst": len(clean_videos["burst"]), "youtubevos": 0, "mose": 0}
    got = {d: {k: c[k] for k in ("videos", "usable_videos", "frames", "annotated_frames")}
           for d, c in manifest["datasets"].items()}
    assert got == _dataset_counts(kept), (got, clean)
    # ... and its clips are exactly the plan without those videos: per dataset, per level, key for key
    want_clips = {d: sum(p.dataset == d for ps in plan.values() for p in ps) for d in kept}
    assert {d: c["clips"] for d, c in manifest["datasets"].items()} == want_clips, (manifest["datasets"], clean)
    assert manifest["clips_per_level"] == {lv: len(ps) for lv, ps in plan.items()}
    keys = _tar_keys(out)
    assert len(keys) == len(set(keys)) == manifest["num_clips"] == sum(want_clips.values())
    assert set(keys) == {p.key for ps in plan.values() for p in ps}
    dead = {f"{d}_{v}_".replace(".", "-").replace("/", "-") for d, v in drop} | {"burst_"}
    assert not [k for k in keys if k.startswith(tuple(dead))], "a clip of a bad video or of BURST was written"
    # the good datasets still made it, and took the lost videos' share of the clips
    assert all(want_clips[d] > 0 for d in ("davis", "ovis", "youtubevos", "mose"))
    assert sum(want_clips.values()) == sum(c["clips"] for c in clean.values())


# ------------------------------------------------------------------------------------------------ loader


class _Payload:
    """Unpickling this creates `marker`: proof that a member was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _rewrite(tar_path: Path, edit) -> list[str]:
    """Rewrite a tar member by member through `edit(name, bytes) -> list[(name, bytes)]`; returns the keys edited."""
    with tarfile.open(tar_path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    edited, out = [], []
    for m, blob in members:
        new = edit(m.name, blob)
        if new != [(m.name, blob)]:
            edited.append(m.name)
        out.extend(new)
    tmp = tar_path.with_suffix(".rewrite")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, blob in out:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            t.addfile(info, io.BytesIO(blob))
    tmp.replace(tar_path)
    return edited


LEVEL = "skip05"  # the loader tests read one curriculum level, so every corrupted shard is in play


@pytest.fixture
def corrupt_shards(reference_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(reference_shards, shards)
    tars = sorted((shards / LEVEL).glob("*.tar"))
    assert len(tars) >= 2, f"need two {LEVEL} shards to damage one and keep one"
    marker = tmp_path / "unpickled"
    with tarfile.open(tars[0]) as t:
        keys = sorted({m.split(".", 1)[0] for m in t.getnames()})
    assert len(keys) >= 3, "the first shard needs three samples"
    no_frames, bad_mask, evil = keys[0], keys[1], keys[2]

    def edit(name: str, blob: bytes):
        key, ext = name.split(".", 1)
        if key == no_frames and ext == "json":
            meta = json.loads(blob)
            del meta["frames"]
            return [(name, json.dumps(meta).encode())]
        if key == bad_mask and ext == "03.png":
            buf = io.BytesIO()
            Image.fromarray(np.zeros((7, 5), np.uint8)).save(buf, format="PNG")
            return [(name, buf.getvalue())]
        if key == evil and ext == "json":
            payload = pickle.dumps(_Payload(marker))
            return [(name, blob), (f"{key}.pyd", payload), (f"{key}.pth", payload)]
        return [(name, blob)]

    _rewrite(tars[0], edit)
    cut = tars[-1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])  # truncated mid-member
    clips = 0
    for p in tars[:-1]:
        with tarfile.open(p) as t:
            clips += len({m.split(".", 1)[0] for m in t.getnames()})
    return {"root": shards, "no_frames": no_frames, "bad_mask": bad_mask, "evil": evil, "marker": marker,
            "truncated": cut, "clips": clips}


def _loader(c, total: int):
    from data_pipeline.loader import build_train_loader

    return build_train_loader(shards=str(c["root"]), batch_size=2, rank=0, world_size=1, total_iterations=total,
                              num_frames=8, num_objects=3, crop_size=64, max_skip=[5], max_skip_until=[1.0],
                              num_workers=0, seed=0)


def _spy_reads(monkeypatch) -> list[tuple[str, str, bool]]:
    """Record every time a loader lane considers a sample (drawn, or tried as a paste partner) as (shard file name,
    key, readable): the loader's documented count ("warned about once, counted every time") is checked against
    this record, not against itself. In-process loaders only (num_workers=0)."""
    from data_pipeline import loader as L

    met: list[tuple[str, str, bool]] = []
    read = L._Lane._read

    def spy(self, path, key, fields):
        sample = read(self, path, key, fields)
        met.append((path.name, key, sample is not None))
        return sample

    monkeypatch.setattr(L._Lane, "_read", spy)
    return met


def _refused(met) -> int:
    return sum(not ok for _, _, ok in met)


_WARNED = re.compile(r"skipping (sample (\S+) in shard|shard) (\S+): (.*)", re.S)


def _warnings(caplog, start: int = 0) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """The loader's warnings from record `start` on: ({sample key: [reasons]}, [shards dropped], [anything else])."""
    samples: dict[str, list[str]] = {}
    shards, other = [], []
    for r in caplog.records[start:]:
        if r.levelno < logging.WARNING:
            continue
        m = _WARNED.fullmatch(r.getMessage())
        if m and m.group(2):
            samples.setdefault(m.group(2), []).append(m.group(4))
        elif m:
            shards.append(m.group(3))
        else:
            other.append(r.getMessage())
    return samples, shards, other


def _readable_keys(c) -> set[str]:
    keys = set()
    for p in sorted((c["root"] / LEVEL).glob("*.tar")):
        if p != c["truncated"]:
            with tarfile.open(p) as t:
                keys |= {m.split(".", 1)[0] for m in t.getnames()}
    return keys - {c["no_frames"], c["bad_mask"]}


@pytest.mark.timeout(300)
def test_loader_warns_and_skips_bad_samples(corrupt_shards, caplog, monkeypatch):
    """What the loader did, checked against what was planted and what it met (a spy on its sample reads):
    - the truncated shard is dropped at start-up, warned about once and counted once;
    - the two bad samples, and only they, are refused, each warned about once, naming it and why;
    - `skipped` after every batch is exactly 1 (the shard) + the number of times a bad sample came up so far;
    - the batches hold only good samples (also as paste partners), never anything of the truncated shard;
    - a loader resumed half-way from `state_dict()` gives the same batches and ends with the same count."""
    c = corrupt_shards
    met = _spy_reads(monkeypatch)
    bad = {c["no_frames"], c["bad_mask"]}
    good = _readable_keys(c)
    damaged = sorted((c["root"] / LEVEL).glob("*.tar"))[0].name
    batches = min(400, 4 * c["clips"])  # ~8 passes over the readable clips: the damaged shard is drawn
    half = batches // 2
    keys: list[list[str]] = []
    counts, expected = [], []
    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    loader = _loader(c, batches)
    assert loader.stats() == {"iteration": 0, "skipped": 1, "bad_shards": 1}  # the truncated shard, at start-up
    it = iter(loader)
    for i in range(batches):
        batch = next(it)
        assert batch["rgb_u8"].shape[0] == 2
        infos = batch["info"]
        keys.append([x["key"] for x in infos])
        for x in infos:
            assert x["key"] in good, f"batch {i}: {x['key']} is not a good sample"
            assert x["merged_from"] is None or x["merged_from"] in good, f"batch {i}: pasted {x['merged_from']}"
            assert c["truncated"].name not in (x["shard"], x["merged_shard"]), f"batch {i}: {x}"
        counts.append(loader.stats()["skipped"])
        expected.append(1 + _refused(met))
        if i + 1 == half:
            state, met_at_half, warned_at_half = loader.state_dict(), len(met), len(caplog.records)
    assert counts == expected, "skipped is not 1 (truncated shard) + bad samples met, batch by batch: " + \
        str([(i, n, e) for i, (n, e) in enumerate(zip(counts, expected, strict=True)) if n != e][:5])
    refused = {k for _, k, ok in met if not ok}
    assert refused == bad, f"refused {refused}, planted bad {bad}"  # both met, no good sample refused
    assert {name for name, _, ok in met if not ok} == {damaged}
    assert counts[-1] > 3  # bad samples are counted every time they come up, not once
    seen = {k for ks in keys for k in ks}
    assert c["evil"] in seen  # a sample with stray members is still good: the members are just never read
    samples, shards, other = _warnings(caplog)
    assert shards == [str(c["truncated"])] and not other, (shards, other)
    assert sorted(samples) == sorted(bad) and all(len(v) == 1 for v in samples.values()), samples  # once each
    assert "frames" in samples[c["no_frames"]][0], samples
    assert "03.png" in samples[c["bad_mask"]][0], samples

    # resumed half-way: the same batches, the same count, and the same (re-met) bad samples counted on
    assert state["iteration"] == half and state["skipped"] == counts[half - 1]
    resumed = _loader(c, batches)
    resumed.load_state_dict(state)
    assert resumed.stats()["skipped"] == state["skipped"]
    met_before = len(met)
    it = iter(resumed)
    for i in range(half, batches):
        assert [x["key"] for x in next(it)["info"]] == keys[i], f"resumed batch {i} differs"
    assert resumed.stats()["skipped"] == counts[-1] == state["skipped"] + _refused(met[met_before:])
    assert _refused(met[met_before:]) == _refused(met[met_at_half:met_before])  # the same bad draws, re-met
    samples, shards, other = _warnings(caplog, warned_at_half)
    assert set(samples) <= bad and not other, (samples, other)


TRAIN_ITERATIONS = 4


@pytest.mark.timeout(600)
def test_training_logs_loader_skips_to_mlflow(corrupt_shards, monkeypatch, tmp_path):
    """A 1-rank training run over the damaged skip05 level logs `data/loader_skipped` at every step with the
    exact count: the truncated shard plus every time a bad sample came up in the batches of steps 1..k. The
    expected counts come from an in-process loader built from the run's own resolved config (config.yaml,
    run_info.json: the same batches, as a pure function of seed, rank, iteration and shards) and a spy on its
    sample reads, not from the loader's counter."""
    import yaml

    from data_pipeline.loader import build_train_loader

    c = corrupt_shards
    tars = sorted((c["root"] / LEVEL).glob("*.tar"))
    for p in tars[1:-1]:  # the damaged shard and the truncated one only: the bad samples come up within 4 steps
        p.unlink()
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.shards={c['root']}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment=fault", f"train.iterations={TRAIN_ITERATIONS}",
            f"checkpoint.every={TRAIN_ITERATIONS}", "checkpoint.keep_last=1", "validation.every=0",
            "tracking.log_every=1", "tracking.system_metrics=false", "data.num_workers=0", "data.crop_size=64",
            "train.global_batch=4", "data.max_skip=[5]", "data.max_skip_until=[1.0]"]
    proc = subprocess.run([PY, "training/train.py", "--config", str(ROOT / "training" / "configs" / "demo_cpu.yaml"),
                           *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]
    assert "skipping sample" in proc.stderr and c["truncated"].name in proc.stderr

    # the batches the run drew, again, in-process: the count it should have logged after each step
    cfg, info = yaml.safe_load((out / "config.yaml").read_text()), json.loads((out / "run_info.json").read_text())
    d, acc = cfg["data"], info["accumulation"]
    assert info["world_size"] == 1 and d["max_skip"] == [5] and d["num_workers"] == 0
    met = _spy_reads(monkeypatch)
    replica = build_train_loader(
        shards=d["shards"], batch_size=info["micro_batch"], rank=0, world_size=1,
        total_iterations=TRAIN_ITERATIONS * acc, num_frames=d["num_frames"], num_objects=d["num_objects"],
        crop_size=d["crop_size"], max_skip=d["max_skip"], max_skip_until=d["max_skip_until"],
        num_workers=d["num_workers"], seed=cfg["train"]["seed"], infinite=True, verify_shards=d["verify_shards"],
        kind=d["kind"], **d["loader"])
    it = iter(replica)
    expected = {}
    for step in range(1, TRAIN_ITERATIONS + 1):
        for _ in range(acc):
            next(it)
        expected[step] = len(replica.bad_shards) + _refused(met)
    assert expected[TRAIN_ITERATIONS] > 1, f"no bad sample came up in the run's batches: {expected}"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fault").experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "data/loader_skipped")}
    assert logged == expected, f"data/loader_skipped logged {logged}, the run's batches skipped {expected}"
    assert run.info.status == "FINISHED"




@pytest.mark.timeout(300)
def test_loader_never_unpickles_shard_members(corrupt_shards):
    c = corrupt_shards
    batches = min(400, 4 * c["clips"])
    it = iter(_loader(c, batches))
    for _ in range(batches):
        batch = next(it)
        assert not [k for k in batch if k.endswith(("pth", "pyd"))]
    assert not c["marker"].exists(), "a .pyd/.pth member from a shard was unpickled"
    # and the payload is live: unpickling it the unsafe way does create the marker
    with tarfile.open(sorted((c["root"] / LEVEL).glob("*.tar"))[0]) as t:
        blob = t.extractfile(f"{c['evil']}.pyd").read()
    pickle.loads(blob)  # noqa: S301 (the point: prove the payload would have run)
    assert c["marker"].exists()
