"""The stage-0 shard job (`kind: static`): Cutie's static image sets → single-image samples in OUT/static/, through
the same Ray job as the video sets (local Ray), with the bad pairs recorded and skipped, each set repeated by its
multiplier, images only ever shrunk, and a deleted shard rewritten byte for byte on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data_pipeline import shard
from data_pipeline.synth import synth_static

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "data_pipeline" / "configs" / "static_demo.yaml"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")


def _shard(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(CONFIG), *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def static_root(tmp_path_factory) -> Path:
    """The synthetic sets (6 images each) with three bad pairs planted."""
    root = tmp_path_factory.mktemp("static") / "static"
    synth_static(root.parent, np.random.default_rng([0, 99]), 6, 120, 160)  # writes root.parent/static
    ecssd = sorted((root / "ecssd").glob("*.png"))
    ecssd[0].unlink()  # a JPEG whose mask is missing
    duts = sorted((root / "DUTS-TR").glob("*.png"))
    Image.fromarray(np.full((50, 60), 255, np.uint8)).save(duts[0])  # a mask of another size
    fss = sorted((root / "fss").glob("*/*.png"))
    with Image.open(fss[0]) as im:
        size = im.size
    Image.fromarray(np.full((size[1], size[0]), 127, np.uint8)).save(fss[0])  # empty once binarised
    return root


@pytest.mark.slow
def test_static_job_records_bad_pairs_repeats_sets_and_rewrites_a_deleted_shard(static_root, tmp_path):
    out = tmp_path / "shards"
    first = _shard("--data-root", str(static_root), "--out", str(out))
    assert "static shard plan" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "static" and manifest["levels"] == {"static": 0}
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert manifest["num_skipped"] == 3 and len(skipped) == 3, manifest["skipped"]
    ecssd_jpg = sorted((static_root / "ecssd").glob("*.jpg"))[0].name
    assert skipped[ecssd_jpg].startswith("mask missing")
    duts_png = sorted((static_root / "DUTS-TR").glob("*.png"))[0].name
    assert "50" in skipped[duts_png] and "60" in skipped[duts_png]  # names the mask's size
    assert any(r.startswith("empty mask") for r in skipped.values())
    # each set: usable images x multiplier (BIG and HRSOD x5), the bad pairs left out
    want = {"fss": 5, "duts_tr": 5, "duts_te": 6, "ecssd": 5, "big": 30, "hrsod": 30}
    assert {d: r["clips"] for d, r in manifest["datasets"].items()} == want
    assert manifest["num_clips"] == sum(want.values())
    # the samples: one frame, a binary mask, the short side at most 160 and never enlarged
    keys, sizes = set(), []
    for tar in sorted((out / "static").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, blob in members.items():
            if name.endswith(".json"):
                meta = json.loads(blob)
                key = name[:-len(".json")]
                keys.add(key)
                assert sorted(n for n in members if n.startswith(key + ".")) == \
                    [f"{key}.00.jpg", f"{key}.00.png", f"{key}.json"]
                mask = cv2.imdecode(np.frombuffer(members[f"{key}.00.png"], np.uint8), cv2.IMREAD_UNCHANGED)
                assert set(np.unique(mask)) == {0, 1} and meta["object_ids"] == [1]
                assert list(mask.shape) == meta["size"]
                sizes.append((meta["original_size"], meta["size"]))
    assert len(keys) == manifest["num_clips"]
    assert sum(k.startswith("big_") for k in keys) == 30  # 6 images x 5 repeats, each its own key
    for orig, stored in sizes:
        if min(orig) > 160:
            assert min(stored) == 160
        else:
            assert stored == orig  # small images are stored as they are
    assert any(min(o) > 160 for o, _ in sizes) and any(min(o) <= 160 for o, _ in sizes)
    # resumable and deterministic: a deleted shard is written again with the same bytes, the others skipped
    victim = out / "static" / "shard-000001.tar"
    sha = json.loads(shard.stats_path(victim).read_text())["sha256"]
    victim.unlink()
    shard.stats_path(victim).unlink()
    again = _shard("--data-root", str(static_root), "--out", str(out))
    n = len(list((out / "static").glob("*.tar")))
    assert f"{n} shards planned, {n - 1} already done" in again.stdout
    import hashlib

    assert hashlib.sha256(victim.read_bytes()).hexdigest() == sha


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = ("kind: static\ndata_root: {root}\nout: /tmp/x\ndatasets: {{ecssd: ecssd, big: BIG_small}}\n"
        "clips_per_shard: 4\nshort_side: 160\njpeg_quality: 90\nseed: 0\nnum_cpus: 1\n")


def test_static_config_defaults_cutie_multipliers_and_refuses_video_keys(tmp_path):
    cfg = shard.load_config(_config(tmp_path, BASE.format(root=tmp_path)))
    assert cfg["multipliers"] == {"ecssd": 1, "big": 5}
    with pytest.raises(SystemExit, match=r"\['levels'\] are for video jobs"):
        shard.load_config(_config(tmp_path, BASE.format(root=tmp_path) + "levels: {skip05: 5}\n"))
    with pytest.raises(SystemExit, match=r"kind static takes the image sets .* not \['davis'\]"):
        shard.load_config(_config(tmp_path, BASE.format(root=tmp_path).replace("big: BIG_small", "davis: DAVIS")))
    with pytest.raises(SystemExit, match=r"multipliers names \['fss'\]"):
        shard.load_config(_config(tmp_path, BASE.format(root=tmp_path) + "multipliers: {fss: 2}\n"))
    with pytest.raises(SystemExit, match=r"expected \{set: positive int\}"):
        shard.load_config(_config(tmp_path, BASE.format(root=tmp_path) + "multipliers: {big: 0}\n"))
    video = (f"data_root: {tmp_path}\nout: /tmp/x\ndatasets: {{davis: DAVIS, ecssd: ecssd}}\nlevels: {{skip05: 5}}\n"
             "clips_per_level: 4\nclips_per_shard: 4\nshort_side: 160\njpeg_quality: 90\nseed: 0\nnum_cpus: 1\n")
    with pytest.raises(SystemExit, match=r"\['ecssd'\] are static image sets"):
        shard.load_config(_config(tmp_path, video))
    with pytest.raises(SystemExit, match="kind='stills'"):
        shard.load_config(_config(tmp_path, BASE.format(root=tmp_path).replace("kind: static", "kind: stills")))


def test_training_config_of_the_other_kind_is_refused_in_the_plan(tmp_path):
    with pytest.raises(SystemExit, match="data.kind=video shards, this shard config writes static"):
        shard.training_draws(ROOT / "training" / "configs" / "s3_mega.yaml", {"static": 0})
    draws = shard.training_draws(ROOT / "training" / "configs" / "s3_pretrain_static.yaml", {"static": 0})
    assert draws["draws"] == {"static": 80000 * 16}


def test_encode_clip_stores_a_static_image_shrunk_never_enlarged(tmp_path):
    from data_pipeline.readers import build_reader
    from data_pipeline.sampling import plan_images

    root = tmp_path / "ecssd"
    root.mkdir()
    for name, (h, w) in {"small": (100, 150), "large": (300, 400)}.items():
        cv2.imwrite(str(root / f"{name}.jpg"), np.full((h, w, 3), 90, np.uint8))
        m = np.zeros((h, w), np.uint8)
        m[h // 4:h // 2, w // 4:w // 2] = 255
        Image.fromarray(m).save(root / f"{name}.png")
    reader = build_reader("ecssd", root)
    videos = {"ecssd": reader.videos()}
    plans = {p.video: p for p in plan_images(videos, {"ecssd": 1})["static"]}
    by_name = {v.video: v for v in videos["ecssd"]}
    for name, want in {"small": [100, 150], "large": [160, 213]}.items():
        members = dict(shard.encode_clip(reader, by_name[name], plans[name], 160, 90, only_shrink=True))
        meta = json.loads(members[f"{plans[name].key}.json"])
        assert meta["size"] == want, name
        mask = cv2.imdecode(np.frombuffer(members[f"{plans[name].key}.00.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == tuple(want) and set(np.unique(mask)) == {0, 1}
    # the video rule (only_shrink off) enlarges: what the static job must not do
    members = dict(shard.encode_clip(reader, by_name["small"], plans["small"], 160, 90))
    assert json.loads(members[f"{plans['small'].key}.json"])["size"] == [160, 240]
