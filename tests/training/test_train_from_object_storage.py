"""Issue 17: the trainer on shards in object storage. The demo's shards are put in a bucket of moto's standalone S3
server on 127.0.0.1 and served over HTTPS on 127.0.0.1 (a self-signed certificate, trusted through curl's
CURL_CA_BUNDLE); `training/train.py` (DeepSpeed, 1 CPU rank, a DataLoader worker streaming the shards) trains 20
iterations from the local folder, from https:// and from s3:// (stopped at iteration 10 after a checkpoint, then relaunched: it resumes there): every iteration's
losses are identical, and the run logs the bucket's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loopback_storage import http_server, s3_server
from tests.fault.helpers import ROOT, child_env

pytestmark = pytest.mark.slow
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
ITERATIONS = 20


def overrides(shards: str, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.shards={shards}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment=remote", f"train.iterations={ITERATIONS}", "checkpoint.every=10",
            "checkpoint.keep_last=1", "validation.every=0", "tracking.log_every=5", "tracking.system_metrics=false",
            "data.num_workers=1", "data.crop_size=48", "train.global_batch=2", *extra]


def train(shards: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "training/train.py", "--config", str(CONFIG), *overrides(shards, out, *extra)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc


def losses(out: Path) -> dict[int, dict]:
    from training.train import read_loss_log

    return {r["iteration"]: r for r in read_loss_log(out)}


def assert_same_losses(got: dict[int, dict], ref: dict[int, dict], iterations, what: str) -> None:
    for it in iterations:
        keys = [k for k in ref[it] if k == "total_loss" or k.startswith("loss/")]
        assert keys, ref[it]
        for k in keys:
            assert got[it][k] == ref[it][k], f"{what}: iteration {it} {k} {got[it][k]} != {ref[it][k]}"
        assert got[it]["level"] == ref[it]["level"], (what, it)


@pytest.mark.timeout(1500)
def test_training_from_s3_and_https_equals_training_from_the_local_folder(demo_data, tmp_path):
    local = demo_data / "shards"
    ref_out = tmp_path / "local"
    train(str(local), ref_out)
    ref = losses(ref_out)
    assert sorted(ref) == list(range(1, ITERATIONS + 1))

    with s3_server() as s3:
        url = s3.bucket("train") + "/shards"
        s3.upload_folder(local, url)
        out = tmp_path / "s3"
        train(url, out, "train.stop_after=10")  # a checkpoint at 10, then the job stops
        assert sorted(losses(out)) == list(range(1, 11))
        assert (out / "checkpoints" / "iter_0000010" / "COMPLETE").is_file()
        proc = train(url, out)  # the relaunch resumes from iteration 10
        got = losses(out)
        assert sorted(got) == list(range(1, ITERATIONS + 1))
        assert_same_losses(got, ref, range(1, ITERATIONS + 1), "s3:// (resumed at 10)")
        assert "resum" in (proc.stdout + proc.stderr).lower()

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
        assert len(runs) == 1, "the resumed job is the same MLflow run"
        logged = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "data/manifest.json",
                                                           str(tmp_path))).read_text())
        assert logged["shards"] == json.loads((local / "manifest.json").read_text())["shards"]

    with http_server(local, tls=True) as web:
        assert web.url.startswith("https://127.0.0.1:")
        out = tmp_path / "https"
        train(web.url, out)
        assert_same_losses(losses(out), ref, range(1, ITERATIONS + 1), "https://")
        assert web.gets["manifest.json"] >= 1
        assert not [p for p in web.gets if not (p.endswith(".tar") or p == "manifest.json")], web.gets
