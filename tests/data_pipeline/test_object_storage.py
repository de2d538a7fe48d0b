"""Issue 17: shards on object storage. Against a real S3 API on loopback (moto's standalone server, started here on
127.0.0.1) and a local HTTP server:

* the demo's shard job written to the bucket gives byte-identical tars (and the same stats and manifest) to the
  local run; a job SIGKILLed mid-way resumes to the same bytes, skipping the shards it had finished;
* the training loader reads s3://, http://, https:// and pipe: roots through their manifest, batch for batch equal to the
  local folder's, with DataLoader workers; a resume fetches the one shard its lane is in, not the ones it skips;
* a shard deleted from the bucket mid-run, or changed, is reported (named) and skipped, and the stream goes on;
* bad roots fail at start-up with the URL named.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.loopback_storage import http_server, s3_server
from data_pipeline.loader import build_train_loader
from tests.fault.helpers import PY, ROOT, child_env, sigkill_tree, wait_held

SHARD_CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"
KNOBS = dict(num_frames=8, crop_size=48, max_skip=(5, 10, 15), max_skip_until=(0.5, 0.7, 1.0), seed=3)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def local_shards(demo_data) -> Path:
    return demo_data / "shards"  # the demo shard job's own output (read-only)


@pytest.fixture(scope="module")
def bucket_shards(s3, local_shards) -> str:
    url = s3.bucket("shards") + "/demo"
    s3.upload_folder(local_shards, url)
    return url


def shard_job(data: Path, out: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root", str(data),
                           "--out", out], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600, **kw)


def tars(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def batches(root, n: int, start: int = 0, total: int = 20, workers: int = 0, **knobs) -> list[dict]:
    loader = build_train_loader(str(root), 2, 0, 1, total, num_workers=workers, start_iteration=start,
                                **{**KNOBS, **knobs})
    out = []
    it = iter(loader)
    try:
        for b in it:
            out.append(b)
            if len(out) == n:
                break
    finally:
        it.close()  # stops the DataLoader workers now, not whenever the garbage collector gets to them
    return out, loader


def assert_same(a: list[dict], b: list[dict], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x["info"] == y["info"], f"{what}: batch {i} draws other clips"
        for k in ("rgb_u8", "cls", "jitter", "grey", "selector"):
            assert torch.equal(x[k], y[k]), f"{what}: batch {i} differs in {k}"


# ------------------------------------------------------------------------------------------------ the shard job


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shard_job_into_a_bucket_writes_the_local_runs_bytes(s3, demo_data, local_shards):
    url = s3.bucket("job") + "/demo"
    proc = shard_job(demo_data / "data", url)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = s3.objects(url)
    ref = tars(local_shards)
    assert sorted(k for k in got if k.endswith(".tar")) == sorted(ref)
    for name, blob in ref.items():
        assert got[name] == blob, f"{name} in the bucket differs from the local run's"
    assert not [k for k in got if ".tmp" in k], "a temporary object was left in the bucket"
    manifest = json.loads(got["manifest.json"])
    local = json.loads((local_shards / "manifest.json").read_text())
    assert manifest["shards"] == local["shards"] and manifest["num_clips"] == local["num_clips"]
    assert manifest["config_hash"] == local["config_hash"] and manifest["skipped"] == local["skipped"]
    for name in ref:  # each tar's completion marker, after it, with its sha256
        st = json.loads(got[name.replace(".tar", ".stats.json")])
        assert st["sha256"] == local["shards"][name]["sha256"] and st["clips"] == local["shards"][name]["clips"]

    again = shard_job(demo_data / "data", url)  # a rerun finds every shard done
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"{len(ref)} shards planned, {len(ref)} already done" in again.stdout
    other = subprocess.run([PY, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root",
                            str(demo_data / "data"), "--out", url, "seed=7"], cwd=ROOT, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds shards of config hash" in other.stdout + other.stderr, other.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shard_job_killed_mid_way_resumes_to_the_same_bytes(s3, demo_data, local_shards, tmp_path):
    url = s3.bucket("killed") + "/demo"
    fault = tmp_path / "fault"
    fault.mkdir()
    # a Ray worker holds once its second tar is built locally (its first one is uploaded, with its stats): SIGKILL
    cmd = [PY, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root", str(demo_data / "data"),
           "--out", url]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(r"hold:done=s3vos-.*\.tar\.tmp$:nth=2:name=point", fault),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_held(proc, fault, "point", timeout=400)
    finally:
        held = fault / "point.held"
        sigkill_tree(proc, extra_pids=(json.loads(held.read_text())["pid"],) if held.is_file() else ())
    ref = tars(local_shards)
    after_kill = s3.objects(url)
    assert "manifest.json" not in after_kill, "the manifest was written although a shard was not"
    done = [k for k in after_kill if k.endswith(".tar")]
    assert done and len(done) < len(ref), f"the kill was not mid-way: {len(done)} of {len(ref)} shards there"
    for k in done:  # an object is all or nothing: what is there is the complete shard
        assert after_kill[k] == ref[k], f"{k} is visible but not the complete shard"

    proc = shard_job(demo_data / "data", url)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    marks = sum(1 for k in after_kill if k.endswith(".stats.json"))
    assert f"{len(ref)} shards planned, {marks} already done" in proc.stdout, proc.stdout[-2000:]
    got = s3.objects(url)
    assert sorted(k for k in got if k.endswith(".tar")) == sorted(ref)
    for k, blob in ref.items():
        assert got[k] == blob, f"{k} differs from the uninterrupted run's after the resume"
    assert json.loads(got["manifest.json"])["shards"] == json.loads((local_shards / "manifest.json").read_text())[
        "shards"]


# ------------------------------------------------------------------------------------------------ the loader


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loader_batches_from_s3_http_and_pipe_equal_the_local_folders(s3, bucket_shards, local_shards, tmp_path):
    ref, _ = batches(local_shards, 8, workers=2)
    got, loader = batches(bucket_shards, 8, workers=2)
    assert_same(ref, got, "s3:// with 2 DataLoader workers")
    assert loader.stats()["bad_shards"] == 0 and loader.skipped == 0
    ref, _ = batches(local_shards, 8)  # one lane (the lanes are part of what a batch is a function of)
    with http_server(local_shards) as web:
        got, _ = batches(web.url, 8)
        assert_same(ref, got, "http://")
        assert not [p for p in web.gets if not (p.endswith(".tar") or p == "manifest.json")], web.gets
        assert web.gets["manifest.json"] == 1  # listed through the manifest, never by a listing
    with http_server(local_shards, tls=True) as web:  # curl checks the certificate (CURL_CA_BUNDLE)
        got, _ = batches(web.url, 8)
        assert_same(ref, got, "https://")
    got, _ = batches("pipe:cat " + str(local_shards) + "/{path}", 8)
    assert_same(ref, got, "pipe:")
    cache = tmp_path / "cache"
    got, loader = batches(bucket_shards, 8, shard_cache=str(cache))
    assert_same(ref, got, "s3:// through the local shard cache")
    kept = sorted(str(p.relative_to(p.parents[1])) for p in cache.rglob("*.tar"))
    assert kept and all((local_shards / k).read_bytes() == (next(cache.glob("*")) / k).read_bytes() for k in kept)
    with http_server(local_shards) as web:  # a second pass reads the cached tars: only the manifest is fetched
        got, _ = batches(web.url, 8, shard_cache=str(cache / "by-http"))
        first = sum(web.gets.values())
        got, _ = batches(web.url, 8, shard_cache=str(cache / "by-http"))
        assert_same(ref, got, "http:// from the filled shard cache")
        assert sum(web.gets.values()) == first + 1 and web.gets["manifest.json"] == 2, web.gets


def test_a_resume_streams_the_shard_its_lane_is_in_and_nothing_it_skips(local_shards):
    """Resuming at iteration 30 of one lane passes over some 60 draws (several shard visits) by arithmetic: with
    merges off it fetches exactly the one shard batch 30 reads from; with merges on, at most that one and its
    block's paste pool (paste_pool_shards=1 here)."""
    knobs = dict(max_skip=(5,), max_skip_until=(1.0,), block_clips=512)
    ref, _ = batches(local_shards, 31, total=40, merge_probability=0.0, **knobs)
    visited = {c["shard"] for b in ref[:30] for c in b["info"]}
    assert len(visited) >= 3, "the fast-forward should pass over several shards"
    with http_server(local_shards) as web:
        got, loader = batches(web.url, 1, start=30, total=40, merge_probability=0.0, **knobs)
        assert_same(ref[30:], got, "resumed at 30 over http")
        fetched = {p for p in web.gets if p.endswith(".tar")}
        assert fetched == {c["shard"] for c in got[0]["info"]}, fetched
        assert sum(web.gets[p] for p in fetched) == 1
    ref, _ = batches(local_shards, 31, total=40, paste_pool_shards=1, **knobs)
    with http_server(local_shards) as web:
        got, _ = batches(web.url, 1, start=30, total=40, paste_pool_shards=1, **knobs)
        assert_same(ref[30:], got, "resumed at 30 over http, with merges")
        assert sum(n for p, n in web.gets.items() if p.endswith(".tar")) <= 2, web.gets


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_shard_deleted_from_the_bucket_mid_run_is_reported_and_skipped(s3, local_shards):
    """Iterations 0-9 read skip05, 10-13 skip10, 14-19 skip15. After two batches (the DataLoader workers have not
    touched skip15), a skip15 shard that the uninterrupted run reads is deleted from the bucket: the loader names
    it, counts it, and its draws pass to the other shards; the stream goes on to iteration 20."""
    url = s3.bucket("deleted") + "/demo"
    s3.upload_folder(local_shards, url)
    ref, _ = batches(local_shards, 20, workers=2)
    used = sorted({c["shard"] for b in ref[14:] for c in b["info"] if c["shard"].startswith("skip15/")})
    assert used, "the uninterrupted run reads skip15 at 14-19"
    victim = used[0]
    loader = build_train_loader(url, 2, 0, 1, 20, num_workers=2, **KNOBS)
    got = []
    it = iter(loader)
    for b in it:
        got.append(b)
        if len(got) == 2:
            s3.delete(f"{url}/{victim}")
        if len(got) == 20:
            break
    it.close()
    assert len(got) == 20
    assert_same(ref[:14], got[:14], "before skip15")
    # reported: the shard's URL in the loader's record (the workers' warning names it too) and counted in
    # stats()/skipped, which the trainer logs as data/loader_skipped
    assert loader.bad_shards == [f"{url}/{victim}"], loader.bad_shards
    assert loader.stats()["bad_shards"] == 1 and loader.skipped >= 1
    after = [c for b in got[14:] for c in b["info"]]
    assert all(c["shard"] != victim and c["merged_shard"] != victim for c in after)
    assert {c["shard"] for c in after} <= {k for k in tars(local_shards) if k.startswith("skip15/")} - {victim}


def test_a_remote_shard_whose_bytes_changed_is_dropped_naming_both_hashes(s3, local_shards, caplog):
    url = s3.bucket("changed") + "/demo"
    s3.upload_folder(local_shards, url)
    manifest = json.loads((local_shards / "manifest.json").read_text())
    victim = "skip05/shard-000000.tar"
    blob = bytearray((local_shards / victim).read_bytes())
    blob[5000] ^= 0xFF  # one byte of pixel data: the tar still parses
    bucket, _, prefix = url[len("s3://"):].partition("/")
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{victim}", Body=bytes(blob))
    knobs = dict(max_skip=(5,), max_skip_until=(1.0,), merge_probability=0.0)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        got, loader = batches(url, 12, total=12, **knobs)
    assert loader.stats()["bad_shards"] == 1
    text = caplog.text
    assert f"{url}/{victim}" in text and manifest["shards"][victim]["sha256"] in text, text
    assert all(c["shard"] != victim for b in got for c in b["info"])


def test_bad_remote_roots_fail_at_start_up_naming_the_url(s3, local_shards, tmp_path):
    from data_pipeline.storage import StorageError, Store
    from training.config import ConfigError, load_config

    empty = s3.bucket("empty") + "/nothing"
    with pytest.raises(FileNotFoundError, match=f"{empty}/manifest.json not found"):
        build_train_loader(empty, 2, 0, 1, 10, **KNOBS)
    cfg = ROOT / "training" / "configs" / "demo_cpu.yaml"
    with pytest.raises(ConfigError, match=f"data.shards.*{empty}/manifest.json"):
        load_config(cfg, [f"data.shards={empty}", f"output_dir={tmp_path}"])
    with http_server(local_shards) as web:  # a root whose manifest lacks the curriculum's level
        with pytest.raises(FileNotFoundError, match=r"lists no shard in skip20/"):
            build_train_loader(web.url, 2, 0, 1, 10, **{**KNOBS, "max_skip": (5, 20), "max_skip_until": (0.5, 1.0)})
        with pytest.raises(ConfigError, match=r"lists no shard in skip20/"):
            load_config(cfg, [f"data.shards={web.url}", f"output_dir={tmp_path}", "data.max_skip=[5,20]",
                              "data.max_skip_until=[0.5,1.0]"])
    with pytest.raises(StorageError, match=r"\{path\}"):
        Store("pipe:cat /somewhere")
    with pytest.raises(StorageError, match="unsupported scheme ftp"):
        Store("ftp://host/x")
    proc = subprocess.run([PY, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root",
                           str(tmp_path), "--out", "https://example.invalid/shards"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "https: is read-only" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_a_remote_shard_gone_when_fetched_again_is_dropped_once(local_shards, tmp_path):
    """A lane keeps paste_pool_shards + 2 remote shards; one it let go is fetched again when a sample of it is read
    (a paste partner from its index, say). Deleted meanwhile: the whole shard is dropped, named and counted once,
    and its other samples are passed over without another request."""
    import shutil

    from data_pipeline.loader import _Lane

    served = tmp_path / "served"
    shutil.copytree(local_shards, served)
    with http_server(served) as web:
        loader = build_train_loader(web.url, 2, 0, 1, 10, num_workers=0, **KNOBS)
        lane = _Lane(loader.cfg, loader.shards, 0, 0, loader.params, None, loader.remote)
        url = loader.shards[0][1]
        rel = loader.remote[url].rel
        idx = lane._index(url)
        assert len(idx) == loader.remote[url].clips and web.gets[rel] == 1
        assert lane._read(url, *idx[0]) is not None and web.gets[rel] == 1  # served from memory
        lane.sources.clear()  # as the LRU does when other shards come in
        (served / rel).unlink()
        assert lane._read(url, *idx[1]) is None
        assert lane.bad_shards == {url} and lane.new_bad_shards == [url] and lane.skipped == 1
        assert web.gets[rel] == 2
        assert all(lane._read(url, *entry) is None for entry in idx[2:])
        assert web.gets[rel] == 2 and lane.skipped == 1 and lane._count(url) == 0


def test_a_new_endpoint_in_the_environment_gets_a_new_client():
    """s3fs clients are made for the endpoint of the environment they were made in: a process whose
    AWS_ENDPOINT_URL changes (a second S3 server, another MinIO) reads from the new one, not the old."""
    from data_pipeline.storage import Store

    for n in range(2):
        with s3_server() as server:
            url = server.bucket(f"endpoint{n}") + "/x"
            Store(url).write_json("a.json", {"n": n})
            assert Store(url).read_json("a.json") == {"n": n}
