"""Issue 13, "stop and requeue safely" and "provenance", on the real stack (the `tiny` network in a DeepSpeed engine
on gloo CPU ranks, the WebDataset loader over the session's reference shards, MLflow on SQLite):

* the SLURM path: cluster/deepspeed/train.slurm run as SLURM would run it (its `srun` and `scontrol` are the only
  stand-ins: this machine has no SLURM), its pre-timeout SIGUSR1 → a checkpoint → a requeue; the relaunch resumes;
* SIGTERM to a rank → a checkpoint and exit 0; a second trainer on the same output folder is refused;
* a `kill -9` of the `deepspeed` launcher → its ranks checkpoint and exit (none trains on headless);
* provenance: a changed config refused, or allowed and logged into the same MLflow run; load_universal without a
  checkpoint and an empty shards folder fail at start-up before DeepSpeed and MLflow; a full disk says so and
  marks the MLflow run FAILED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import PY, ROOT, _alive, child_env, descendants, free_port, sigkill_tree

pytestmark = [pytest.mark.fault, pytest.mark.slow]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
BIN = Path(sys.executable).parent


def overrides(shards: Path, out: Path, *extra: str, iterations: int = 1000) -> list[str]:
    return [f"output_dir={out}", f"data.shards={shards}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment=lifecycle", f"train.iterations={iterations}", "checkpoint.every=1000",
            "validation.every=0", "tracking.log_every=1", "tracking.system_metrics=false", "data.num_workers=0",
            "data.crop_size=64", "train.global_batch=2", *extra]


def train_cmd(args: list[str], ranks: int = 1) -> list[str]:
    if ranks == 1:
        return [PY, "training/train.py", "--config", str(CONFIG), *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "training/train.py", "--config", str(CONFIG), *args]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=400)


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_iterations(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    """Until rank 0 has logged `n` iterations of this launch (losses.jsonl), failing loudly if the job ends."""
    deadline = time.monotonic() + timeout
    log = out / "losses.jsonl"
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{n} iterations not reached in {timeout} s")


def complete_checkpoints(out: Path) -> list[int]:
    from training import checkpoint

    return [r.iteration for r in checkpoint.list_checkpoints(out / "checkpoints")]


def mlflow_runs(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id])


def iterations_logged(out: Path) -> list[int]:
    from training.train import read_loss_log

    return [r["iteration"] for r in read_loss_log(out)]


@pytest.fixture(scope="module")
def shards(reference_shards) -> Path:
    return reference_shards


def _fake_slurm_bin(tmp: Path) -> Path:
    """`srun` runs its command once (one node), `scontrol` answers `show hostnames` and records `requeue`."""
    bin_dir = tmp / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                                  "SLURM_NODEID=0 exec \"$@\"\n")
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\ncase $1 in\n show) echo localhost ;;\n"
                                      f" requeue) echo \"$2\" >> {tmp / 'requeued'} ;;\nesac\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.timeout(900)
def test_slurm_pre_timeout_signal_checkpoints_requeues_and_the_relaunch_resumes(shards, tmp_path):
    out = tmp_path / "run"
    bin_dir = _fake_slurm_bin(tmp_path)
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), VENV=str(BIN.parent),
               S3VOS_STOP_FILE=str(tmp_path / "stop-4242"))
    job = start(["bash", str(ROOT / "cluster" / "deepspeed" / "train.slurm"), str(CONFIG),
                 *overrides(shards, out)], **env)
    try:
        wait_iterations(job, out, 2)
        ranks = _ranks(job)
        os.kill(job.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends to the batch shell
        log = job.communicate(timeout=300)[0]
    finally:
        if job.poll() is None:
            sigkill_tree(job)
    assert job.returncode == 0, log[-4000:]
    assert "caught USR1" in log and "requeueing 4242" in log, log[-4000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # requeued once, after the checkpoint
    assert not (tmp_path / "stop-4242").exists()
    assert ranks and not any(_alive(p) for p in ranks)
    (stopped_at,) = complete_checkpoints(out)  # the only checkpoint: the one the signal asked for
    assert stopped_at >= 2 and iterations_logged(out)[-1] == stopped_at
    _, (mlrun,) = mlflow_runs(out)
    assert mlrun.info.status == "KILLED"  # stopped, to be continued: not FINISHED, not FAILED

    # The requeued job (here: the same command, one rank) resumes there and continues the same MLflow run.
    proc = run(train_cmd(overrides(shards, out, f"train.stop_after={stopped_at + 1}")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'iter_{stopped_at:07d}'}" in proc.stdout + proc.stderr
    assert iterations_logged(out) == list(range(1, stopped_at + 2))
    _, (again,) = mlflow_runs(out)
    assert again.info.run_id == mlrun.info.run_id


def _ranks(job: subprocess.Popen) -> list[int]:
    """The trainer ranks under a launcher: DeepSpeed's launcher hands each one --local_rank=N."""
    def argv(pid: int) -> list[str]:
        try:
            return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            return []

    return [p for p in descendants(job.pid) if any(a.startswith("--local_rank=") for a in argv(p))]


@pytest.mark.timeout(600)
def test_a_second_trainer_is_refused_and_sigterm_ends_in_a_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    first = start(train_cmd(overrides(shards, out)))
    try:
        wait_iterations(first, out, 1)
        second = run(train_cmd(overrides(shards, out)))
        assert second.returncode == 2
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert lines[-1].startswith(f"error: output folder {out} is in use by another trainer (host ")
        assert f"pid {first.pid}" in lines[-1]
        assert iterations_logged(out) and first.poll() is None  # the first one trains on, untouched
        first.send_signal(signal.SIGTERM)
        log = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            sigkill_tree(first)
    assert first.returncode == 0, log[-4000:]
    assert "SIGTERM received" in log and "relaunch the same command to resume" in log
    (stopped_at,) = complete_checkpoints(out)
    assert iterations_logged(out)[-1] == stopped_at
    # The lock went with the process: a relaunch is not refused.
    proc = run(train_cmd(overrides(shards, out, f"train.stop_after={stopped_at + 1}")))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(600)
def test_killing_the_deepspeed_launcher_stops_its_ranks_after_a_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    job = start(train_cmd(overrides(shards, out, "train.global_batch=4"), ranks=2))
    try:
        wait_iterations(job, out, 2)
        ranks = _ranks(job)
        assert len(ranks) == 2
        os.kill(job.pid, signal.SIGKILL)  # the `deepspeed` runner, and only it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(_alive(p) for p in ranks):
            time.sleep(0.5)
        alive = [p for p in ranks if _alive(p)]
    finally:
        sigkill_tree(job)
    log = job.stdout.read()
    assert not alive, "ranks kept training after their launcher was killed"
    assert f"launcher process {job.pid} is gone" in log, log[-4000:]
    (stopped_at,) = complete_checkpoints(out)  # written by both ranks together before they exited
    assert iterations_logged(out)[-1] == stopped_at


# ------------------------------------------------------------------------------------------- provenance


@pytest.mark.timeout(600)
def test_a_changed_config_is_refused_unless_allowed_and_then_logged_in_the_same_run(shards, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(overrides(shards, out, "train.stop_after=1", "checkpoint.every=1", iterations=3)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (mlrun,) = mlflow_runs(out)

    other = tmp_path / "other-shards"  # a valid shard folder, just not the one this run trains on
    shutil.copytree(shards, other)
    for change, key in ((["optim.lr=1e-3"], "optim.lr"), ([f"data.shards={other}"], "data.shards")):
        args = overrides(shards, out, "checkpoint.every=1", *change, iterations=3)
        refused = run(train_cmd(args))
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = [x for x in refused.stderr.splitlines() if x.startswith("configuration error")]
        assert f"config key '{key}': resuming {out / 'checkpoints' / 'iter_0000001'} with a changed config" in line
        assert "--allow-config-change" in line and "DeepSpeed" not in refused.stdout + refused.stderr
    assert iterations_logged(out) == [1]

    # Operational keys (where and how the run is kept) need no permission.
    proc = run(train_cmd(overrides(shards, out, "checkpoint.every=1", "checkpoint.keep_last=5",
                                   "train.stop_after=2", iterations=3)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run(train_cmd(overrides(shards, out, "checkpoint.every=1", "optim.lr=1e-3", iterations=3)
                         + ["--allow-config-change"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iterations_logged(out) == [1, 2, 3]
    client, (same,) = mlflow_runs(out)
    assert same.info.run_id == mlrun.info.run_id and same.info.status == "FINISHED"
    change = json.loads(Path(client.download_artifacts(same.info.run_id, "config/change_at_iter_0000002.json",
                                                       str(tmp_path))).read_text())
    assert change["changes"] == [{"key": "optim.lr", "old": 5e-4, "new": 1e-3}]
    assert same.data.tags["config_hash"] == change["to_config_hash"] != change["from_config_hash"]
    from training.train import read_loss_log

    assert read_loss_log(out)[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # the new lr, past the step at 80 %


@pytest.mark.timeout(300)
def test_start_up_refuses_a_missing_universal_checkpoint_and_empty_shards(shards, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-universal"
    proc = run(train_cmd(overrides(shards, out, f"checkpoint.dir={missing}", "checkpoint.load_universal=true")))
    assert proc.returncode == 2
    assert (f"configuration error: config key 'checkpoint.dir': checkpoint.load_universal=true but {missing} does "
            "not exist") in proc.stderr

    empty = tmp_path / "empty-shards"
    empty.mkdir()
    (empty / "skip05").mkdir()
    proc = run(train_cmd(overrides(empty, out)))
    assert proc.returncode == 2
    assert f"config key 'data.shards': {empty / 'skip05'} holds no .tar shard" in proc.stderr
    proc = run(train_cmd(overrides(tmp_path / "nowhere", out)))
    assert proc.returncode == 2 and "data.shards" in proc.stderr
    # Nothing started: no DeepSpeed, no MLflow run, no checkpoint folder.
    assert not out.exists() or not any(p.name in ("mlflow.db", "checkpoints") for p in out.iterdir())


@pytest.mark.timeout(600)
def test_a_full_disk_says_so_and_marks_the_mlflow_run_failed(shards, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(overrides(shards, out, "checkpoint.every=2", iterations=4)),
               S3VOS_FAULT="full:save=iter_0000002:rank=0", S3VOS_FAULT_DIR=str(tmp_path))
    assert proc.returncode == 4, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: a file write failed, most likely a full disk or quota: ")
    assert f"{out}: " in line and "GiB free" in line and "relaunch" in line
    assert "Traceback" not in proc.stderr
    _, (mlrun,) = mlflow_runs(out)
    assert mlrun.info.status == "FAILED"
    assert complete_checkpoints(out) == []
