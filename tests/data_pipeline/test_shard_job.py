"""The Ray shard job on the synthetic datasets: sample content, byte-identical reruns, resume, bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"
pytestmark = pytest.mark.timeout(300)


def shard(data: Path, out: Path, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(CONFIG), "--data-root",
                           str(data), "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def member_names(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-shard") / "data"
    subprocess.run([sys.executable, "-m", "data_pipeline.synth", "--out", str(root), "--seed", "0", "--small"],
                   cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return root


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-ref") / "shards"
    proc = shard(data, out)
    assert "clips/s" in proc.stdout and "skipped 0" in proc.stdout
    return out


def test_sample_content(ref):
    manifest = json.loads((ref / "manifest.json").read_text())
    assert manifest["num_skipped"] == 0 and manifest["num_clips"] > 0
    assert set(manifest["clips_per_level"]) == {"skip05", "skip10", "skip15"}
    assert {d for d, c in manifest["datasets"].items() if c["clips"]} == {"youtubevos", "davis", "ovis", "mose",
                                                                         "burst"}
    tar_path = sorted((ref / "skip05").glob("*.tar"))[0]
    stats = json.loads(tar_path.with_name(tar_path.name.replace(".tar", ".stats.json")).read_text())
    assert stats["node_id"] and stats["hostname"] and stats["bytes"] == tar_path.stat().st_size
    with tarfile.open(tar_path) as t:
        members = t.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
        names = [m.name for m in members]
        keys = sorted({n.split(".")[0] for n in names})
        assert len(keys) == stats["clips"]
        for key in keys:
            own = sorted(n for n in names if n.split(".")[0] == key)
            assert own == sorted(
                [f"{key}.{i:02d}.jpg" for i in range(8)] + [f"{key}.{i:02d}.png" for i in range(8)] + [f"{key}.json"])
            meta = json.loads(t.extractfile(f"{key}.json").read())
            img = np.array(Image.open(io.BytesIO(t.extractfile(f"{key}.00.jpg").read())))
            m0 = np.array(Image.open(io.BytesIO(t.extractfile(f"{key}.00.png").read())))
            assert img.shape[:2] == m0.shape == tuple(meta["size"]) and min(meta["size"]) == 160
            assert m0.any() and sorted(int(k) for k in np.unique(m0) if k) == meta["object_ids"]
            assert len(meta["frames"]) == 8 and meta["level"] == "skip05"
    samples = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert len(samples) == stats["clips"] and all(len(s) >= 17 + 2 for s in samples)


def test_rerun_is_byte_identical_and_resumes(data, ref, tmp_path):
    out = tmp_path / "shards"
    shard(data, out)
    assert tars(out) == tars(ref)
    victim = sorted(out.rglob("*.stats.json"))[1]
    tar = victim.with_name(victim.name.replace(".stats.json", ".tar"))
    victim.unlink()
    tar.write_bytes(b"partial")
    (out / "skip10" / "shard-000099.tar.tmp").write_bytes(b"junk")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    proc = shard(data, out)
    assert "1 shards planned" not in proc.stdout and "already done" in proc.stdout
    assert tars(out) == tars(ref)
    assert not list(out.rglob("*.tmp"))
    rewritten = [p for p in out.rglob("*.tar") if p.stat().st_mtime_ns != before[p]]
    assert rewritten == [tar]


def test_bad_inputs_recorded_and_skipped(data, ref, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    jpg = sorted((bad / "DAVIS/JPEGImages/480p/dtrain00").glob("*.jpg"))[2]
    jpg.write_bytes(b"")
    (bad / "BURST/train/all_classes.json").write_text('{"sequences": [ not json')
    out = tmp_path / "shards"
    proc = shard(bad, out, "--allow-missing", "burst")  # a whole dataset lost is an error without the flag
    manifest = json.loads((out / "manifest.json").read_text())
    files = {s["file"] for s in manifest["skipped"]}
    assert str(jpg) in files and str(bad / "BURST/train/all_classes.json") in files
    assert manifest["num_skipped"] == 2 and "skipped 2" in proc.stdout
    assert manifest["datasets"]["burst"]["clips"] == 0 and manifest["datasets"]["davis"]["clips"] > 0
    assert list(manifest["missing_datasets"]) == ["burst"] and "left out (--allow-missing): burst" in proc.stdout
    names = [n for p in out.rglob("*.tar") for n in member_names(p)]
    assert names and not [n for n in names if n.startswith("davis_dtrain00_")]  # the damaged video is left out
    assert [n for n in names if n.startswith("davis_dtrain01_")]


def test_long_sample_keys_survive_the_tar(tmp_path):
    """BURST and YouTube-VOS names make keys past USTAR's 100-character limit: the shard must still hold them
    whole, and WebDataset must group a sample's members under that key."""
    from data_pipeline.shard import write_tar

    key = "burst__" + "HACS__" + "Long_jump_v_" + "x" * 120 + "__skip05__0003"
    members = sorted([(f"{key}.00.jpg", b"jpg"), (f"{key}.00.png", b"png"), (f"{key}.json", b"{}")])
    path = tmp_path / "shard-000000.tar"
    write_tar(path, members)
    with tarfile.open(path) as t:
        assert sorted(t.getnames()) == [m[0] for m in members]
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(samples) == 1 and samples[0]["__key__"] == key and samples[0]["00.png"] == b"png"


def test_listing_in_ray_tasks_equals_the_serial_listing(data, tmp_path):
    """Reading every mask of YouTube-VOS/MOSE to list their objects is split into Ray tasks of a few videos; the
    result (videos, frames, object ids per frame, order, problems) must equal the serial listing, bad inputs
    included."""
    import ray

    from data_pipeline import shard as S

    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    vids = sorted((bad / "MOSE" / "train" / "JPEGImages").iterdir())
    (vids[1] / sorted(os.listdir(vids[1]))[2]).write_bytes(b"")  # a zero-byte JPEG in one MOSE video
    cfg = S.load_config(CONFIG, data_root=bad, out=tmp_path / "out")
    serial = S.list_videos(cfg)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        parallel = S.list_videos(cfg, ray, chunk=2)
    finally:
        ray.shutdown()

    def flat(listing):
        videos, specs, skipped = listing
        return ({d: [(v.video, v.frames, v.annotated, v.object_ids) for v in vs] for d, vs in videos.items()},
                specs, skipped)

    assert flat(parallel) == flat(serial)
    assert any(s["dataset"] == "mose" and "zero-byte" in s["reason"] for s in serial[2])
    assert sum(len(v) for v in serial[0].values()) > 10


def shard_datasets(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return [json.loads(t.extractfile(n).read())["dataset"] for n in t.getnames() if n.endswith(".json")]


def test_every_shard_mixes_datasets_and_carries_its_sha256(ref):
    """The plan is shuffled before it is cut into shards: no shard is one dataset's (or a few neighbouring
    videos'). Each shard's stats carry the sha256 of the tar as written."""
    manifest = json.loads((ref / "manifest.json").read_text())
    for path in sorted(ref.rglob("*.tar")):
        got = shard_datasets(path)
        assert len(set(got)) > 1, f"{path} holds only {set(got)}"
        st = json.loads(path.with_name(path.name.replace(".tar", ".stats.json")).read_text())
        assert st["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert manifest["shards"][str(path.relative_to(ref))]["sha256"] == st["sha256"]


def test_plan_report_equals_what_the_job_writes(data, ref):
    """`--plan` writes nothing and predicts the job: per-dataset clips per level counted in the tars, the listing
    counts, the shard count, the disk size within 5%, and each level's reuse over the demo schedule."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    fresh = ref.parent / "never-written"
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--config", str(CONFIG), "--data-root",
                           str(data), "--out", str(fresh), "--plan", "--json", "--train-config",
                           str(ROOT / "training/configs/demo_cpu.yaml"), "num_cpus=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not fresh.exists()
    plan = json.loads(proc.stdout)
    manifest = json.loads((ref / "manifest.json").read_text())
    written: dict[str, dict[str, int]] = {}
    for path in ref.rglob("*.tar"):
        for d in shard_datasets(path):
            written.setdefault(d, {}).setdefault(path.parent.name, 0)
            written[d][path.parent.name] += 1
    for d, row in plan["datasets"].items():
        assert {lv: n for lv, n in row["clips"].items() if n} == written[d], d
        for k in ("videos", "usable_videos", "frames", "annotated_frames"):
            assert row[k] == manifest["datasets"][d][k], (d, k)
    assert plan["shards"] == manifest["num_shards"] == len(list(ref.rglob("*.tar")))
    assert plan["clips"] == manifest["num_clips"]
    on_disk = sum(p.stat().st_size for p in ref.rglob("*.tar"))
    assert abs(plan["estimated_bytes"] - on_disk) < 0.05 * on_disk, (plan["estimated_bytes"], on_disk)
    # demo_cpu.yaml: 200 iterations x global batch 4; skip05 in force for 10% + 20% of them, skip15 for 50%
    assert plan["levels"]["skip05"]["training_draws"] == 240 and plan["levels"]["skip15"]["training_draws"] == 400
    assert plan["levels"]["skip15"]["reuse"] == pytest.approx(400 / manifest["clips_per_level"]["skip15"])
    assert plan["config_hash"] == manifest["config_hash"]


def test_rerun_into_another_configs_folder_is_refused(data, ref, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(ref, out)
    before = tars(out)
    proc = shard(data, out, "seed=1", rc=2)
    manifest = json.loads((ref / "manifest.json").read_text())
    msg = proc.stderr.strip().splitlines()[-1]
    assert manifest["config_hash"] in msg and "changed: seed" in msg and "new --out" in msg
    other = json.loads(subprocess.run(
        [sys.executable, "-m", "data_pipeline.shard", "--config", str(CONFIG), "--data-root", str(data), "--out",
         str(tmp_path / "x"), "--plan", "--json", "seed=1", "num_cpus=1"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout)["config_hash"]
    assert other in msg and other != manifest["config_hash"]
    assert tars(out) == before  # nothing rewritten, nothing deleted
    (out / "job.json").unlink()
    (out / "manifest.json").unlink()
    proc = shard(data, out, rc=2)
    assert "no job.json" in proc.stderr


def test_a_dataset_that_yields_nothing_is_an_error_unless_allowed(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shutil.rmtree(bad / "OVIS")
    out = tmp_path / "shards"
    proc = shard(bad, out, rc=2)
    msg = proc.stderr.strip().splitlines()[-1]
    assert "dataset ovis yields no usable video" in msg and "--allow-missing ovis" in msg
    assert not list(out.rglob("*.tar"))
    shard(bad, out, "--allow-missing", "ovis")
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["missing_datasets"]) == ["ovis"] and manifest["datasets"]["ovis"]["clips"] == 0
    proc = shard(bad, tmp_path / "other", "--allow-missing", "coco", rc=2)
    assert "coco" in proc.stderr
