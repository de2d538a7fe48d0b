"""Issue 9, items 2, 3, 5 and 7 on the real stack (tiny S3 network, DeepSpeed ZeRO-2 on gloo CPU ranks, the
WebDataset loader over the shards of the session's reference shard run, MLflow):

2. a rank SIGKILLed mid-iteration, then the relaunch SIGKILLed while writing a checkpoint: the second relaunch
   resumes from the last complete checkpoint, its losses equal an uninterrupted run's, it is the same MLflow run,
   and no checkpoint is left half-written;
3. a 2-rank ZeRO-2 checkpoint resumed on 1 rank through DeepSpeed universal checkpointing
   (cluster/deepspeed/to_universal.sh + checkpoint.load_universal=true): weights and optimizer state carried over;
5. non-finite losses (inputs poisoned by the injector) are skipped and counted; too many in a row stop the job with
   a clear message, the last complete checkpoint intact;
7. the MLflow server killed mid-run and restarted: training never stops and no metric is lost.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import PY, ROOT, child_env, free_port, sigkill_tree, wait_held

pytestmark = [pytest.mark.fault, pytest.mark.slow]
CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"
BIN = Path(sys.executable).parent
ITERATIONS = 6


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.shards={shards}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment=fault", f"train.iterations={ITERATIONS}", "checkpoint.every=2",
            "checkpoint.keep_last=2", "validation.every=0", "tracking.log_every=1",
            "tracking.system_metrics=false", "data.num_workers=0", "data.crop_size=64", "train.global_batch=4",
            *extra]


def command(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [PY, "training/train.py", "--config", str(CONFIG), *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "training/train.py", "--config", str(CONFIG), *args]


def launch(ranks: int, args: list[str], expect_rc: int = 0, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(ranks, args), cwd=ROOT, env=child_env(**env), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == expect_rc, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc


def launch_and_kill(ranks: int, args: list[str], directive: str, fault_dir: Path) -> dict:
    """Start a job whose rank holds at `directive` (named `point`), then SIGKILL every process of it."""
    fault_dir.mkdir(exist_ok=True)
    for f in fault_dir.glob("point.*"):
        f.unlink()
    proc = subprocess.Popen(command(ranks, args), cwd=ROOT, env=child_env(directive, fault_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return wait_held(proc, fault_dir, "point", timeout=300)
    finally:
        held = fault_dir / "point.held"
        sigkill_tree(proc, extra_pids=(json.loads(held.read_text())["pid"],) if held.is_file() else ())


def losses(out: Path) -> dict[int, dict]:
    from training.train import read_loss_log

    return {r["iteration"]: r for r in read_loss_log(out)}


def checkpoints(out: Path) -> dict[str, bool]:
    """iter_* folder → has its COMPLETE marker."""
    root = out / "checkpoints"
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(root.glob("iter_*"))} if root.is_dir() else {}


def mlflow_runs(out: Path, uri: str | None = None):
    from mlflow import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{out / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("fault").experiment_id])


@pytest.fixture(scope="module")
def shards(reference_shards) -> Path:
    return reference_shards


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-train-ref")
    launch(2, overrides(shards, out))
    assert sorted(losses(out)) == list(range(1, ITERATIONS + 1))
    return out


@pytest.mark.timeout(1200)
def test_rank_killed_mid_iteration_and_during_checkpoint_write(shards, uninterrupted, tmp_path):
    out, fault = tmp_path / "run", tmp_path / "fault"
    args = overrides(shards, out)

    # 1. Rank 1 is killed in the middle of iteration 4 (its 4th forward): iteration 2's checkpoint is the last one.
    held = launch_and_kill(2, args, "hold:forward=4:rank=1:name=point", fault)
    assert held["rank"] == 1 and held["point"] == "forward 4"
    assert checkpoints(out) == {"iter_0000002": True}
    _, (run,) = mlflow_runs(out)
    run_id = run.info.run_id

    # 2. The relaunch resumes at 2 and is killed while rank 0 writes iteration 4's checkpoint (one file on disk).
    held = launch_and_kill(2, args, "hold:save=iter_0000004:rank=0:name=point", fault)
    assert "iter_0000004" in held["point"]
    assert checkpoints(out) == {"iter_0000002": True, "iter_0000004": False}  # half-written: no marker

    from training import checkpoint

    assert checkpoint.latest_complete(out / "checkpoints").iteration == 2  # never resumed from the half one

    # 3. The second relaunch finishes from iteration 2.
    proc = launch(2, args)
    assert f"resumed from {out / 'checkpoints' / 'iter_0000002'}" in proc.stdout + proc.stderr
    ref, got = losses(uninterrupted), losses(out)
    assert sorted(got) == list(range(1, ITERATIONS + 1))
    for it in range(1, ITERATIONS + 1):
        for key, value in ref[it].items():
            if key == "total_loss" or key.startswith("loss/"):
                assert got[it][key] == pytest.approx(value, abs=1e-5), (it, key)
    assert checkpoints(out) == {"iter_0000004": True, "iter_0000006": True}  # the half one replaced, old purged
    assert not [p for p in (out / "checkpoints").rglob("*") if p.name.endswith(".tmp")]
    client, runs = mlflow_runs(out)
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run, continued twice
    assert runs[0].info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(1, ITERATIONS + 1))
    assert json.loads((out / "run_info.json").read_text())["mlflow_run_id"] == run_id


def _adam_steps(ckpt: Path) -> set[int]:
    """The optimizer step counts stored in a ZeRO checkpoint's optimizer files."""
    from training.checkpoint import safe_torch_load

    steps = set()
    for f in ckpt.glob("*optim_states.pt"):
        sd = safe_torch_load(f, map_location="cpu")["optimizer_state_dict"]
        base = sd.get("base_optimizer_state", sd)
        for state in (base.get("state", {}) if isinstance(base, dict) else {}).values():
            if "step" in state:
                steps.add(int(state["step"]))
    return steps


def _one_rank_moments(ckpt: Path) -> dict[str, tuple]:
    """Adam's moments per parameter in a 1-rank ZeRO-1/2 checkpoint: name → (exp_avg, exp_avg_sq, beta1, beta2).
    The optimizer holds one flat fp32 partition per parameter group; the file's param_slice_mappings cut it into
    parameters (the names of the universal checkpoint's zero/<name>/ folders)."""
    from training.checkpoint import safe_torch_load

    (optim_file,) = ckpt.glob("*optim_states.pt")
    sd = safe_torch_load(optim_file, map_location="cpu")["optimizer_state_dict"]
    assert set(sd["partition_count"]) == {1}, sd["partition_count"]  # one rank: each partition is its whole group
    shapes = safe_torch_load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["param_shapes"]
    base = sd["base_optimizer_state"]
    out = {}
    for gi, (group, slices) in enumerate(zip(shapes, sd["param_slice_mappings"], strict=True)):
        state, (b1, b2) = base["state"][gi], base["param_groups"][gi]["betas"]
        for name, shape in group.items():
            cut = slice(slices[name].start, slices[name].start + slices[name].numel)
            out[name] = (state["exp_avg"][cut].view(shape), state["exp_avg_sq"][cut].view(shape), b1, b2)
    return out


def _assert_moments_carried_over(universal_tag: Path, resumed: Path) -> None:
    """The resumed job's one Adam step (iteration 5) started from the source's moments (iteration 4, as
    to_universal.sh wrote them to zero/<param>/exp_avg.pt and exp_avg_sq.pt), for every trainable parameter.

    torch's AdamW does m5 = b1·m4 + (1-b1)·g and v5 = b2·v4 + (1-b2)·g² with one and the same gradient g. So g is
    read off the first moment, g = (m5 - b1·m4) / (1-b1), and the second moment must agree: v5 - b2·v4 = (1-b2)·g²
    (to fp32 rounding; measured ≤ 1e-6 relative). Moments zeroed or left fresh after the load give m5 = (1-b1)·g,
    v5 = (1-b2)·g², which miss this by the size of b2·v4 and b1·m4 (≥ 0.5 relative on every parameter here)."""
    import torch

    src = universal_tag / "zero"
    moments = _one_rank_moments(resumed)
    with_moments = {p.name for p in src.iterdir() if (p / "exp_avg.pt").is_file()}
    assert moments and set(moments) == with_moments, sorted(set(moments) ^ with_moments)[:10]
    eps = float(torch.finfo(torch.float32).eps)
    wrong, carried = [], 0.0
    for name, (m5, v5, b1, b2) in sorted(moments.items()):
        m4 = torch.load(src / name / "exp_avg.pt", map_location="cpu", weights_only=True)["param"].double()
        v4 = torch.load(src / name / "exp_avg_sq.pt", map_location="cpu", weights_only=True)["param"].double()
        m5, v5 = m5.double(), v5.double()
        assert m4.shape == m5.shape and v4.shape == v5.shape, name
        carried += v4.sum().item()
        g = (m5 - b1 * m4) / (1 - b1)
        miss = ((v5 - b2 * v4) - (1 - b2) * g * g).norm().item()
        tol = 1e-4 * ((1 - b2) * g * g).norm().item() + 8 * eps * v5.norm().item()
        if not miss <= tol:
            wrong.append(f"{name}: |v5 - b2·v4 - (1-b2)·g²| = {miss:.3e} > {tol:.3e} (|b2·v4| = "
                         f"{(b2 * v4).norm().item():.3e}, |m4| = {m4.norm().item():.3e})")
    assert not wrong, (f"{len(wrong)} of {len(moments)} parameters: Adam's moments after the resume are not the "
                       "universal checkpoint's, stepped once:\n" + "\n".join(wrong[:8]))
    assert carried > 0, "the source checkpoint has no second moments: nothing to carry over"


@pytest.mark.timeout(900)
def test_two_rank_checkpoint_resumes_on_one_rank(shards, uninterrupted, tmp_path):
    """Universal checkpointing, stated plainly: to_universal.sh converts iteration 4 of the 2-rank run; the 1-rank
    job loads weights AND optimizer state from it (load_universal). A learning rate of 1e-30 makes the resumed
    step a no-op on the weights, so iteration 5's weights must equal iteration 4's: a fresh start would not. Adam's
    moments: iteration 5's are exactly iteration 4's (the universal files) after one Adam step, for every trainable
    parameter (_assert_moments_carried_over), and the step count is 5."""
    import torch

    from training import checkpoint

    src = tmp_path / "src"
    shutil.copytree(uninterrupted / "checkpoints" / "iter_0000004", src / "iter_0000004")
    universal = tmp_path / "universal"
    proc = subprocess.run(["bash", str(ROOT / "cluster" / "deepspeed" / "to_universal.sh"), str(src), str(universal)],
                          cwd=ROOT, env=child_env(PYTHON=PY, WORKERS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "one"
    out.mkdir()
    shutil.copy(uninterrupted / "mlflow.db", out / "mlflow.db")  # the run id in the marker lives there
    proc = launch(1, overrides(shards, out, f"checkpoint.dir={universal}", "checkpoint.load_universal=true",
                              "train.stop_after=5", "optim.lr=1e-30", "optim.weight_decay=0")
                  + ["--allow-config-change"])  # a deliberate change of lr: refused without the flag
    log = proc.stdout + proc.stderr
    assert f"resumed from {universal / 'iter_0000004'}" in log
    assert "written by another world size; the data streams continue at iteration 4" in log
    assert sorted(losses(out)) == [5]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["engine_train_batch_size"] == 4

    before = torch.load(checkpoint.consolidate(checkpoint.CheckpointRef(uninterrupted / "checkpoints", "iter_0000004", 4),
                                               tmp_path / "w4.pt"), weights_only=True)
    after_ref = checkpoint.latest_complete(universal)
    assert after_ref.iteration == 5
    after = torch.load(checkpoint.consolidate(after_ref, tmp_path / "w5.pt"), weights_only=True)
    assert before.keys() == after.keys()
    for k in before:
        if k.endswith(("running_mean", "running_var")):
            continue  # BatchNorm statistics move with every training forward, whatever the learning rate
        if k.endswith("num_batches_tracked"):  # restored, then counted on (a fresh module restarts from 0)
            assert int(after[k]) >= int(before[k]), (k, int(before[k]), int(after[k]))
            continue
        assert torch.allclose(before[k], after[k], atol=1e-6), k  # trainable and frozen weights
    assert _adam_steps(after_ref.path) == {5}  # Adam's step count came along (a fresh optimizer: 1)
    _assert_moments_carried_over(universal / "iter_0000004", after_ref.path)  # ... and its moments
    client, (run,) = mlflow_runs(out)
    assert run.info.run_id == json.loads((uninterrupted / "run_info.json").read_text())["mlflow_run_id"]


@pytest.mark.timeout(1200)
def test_universal_resume_on_another_world_size_continues_the_curriculum_and_the_one_rank_stream(shards, tmp_path):
    """2 ranks train to iteration 4 of 6, the checkpoint is made universal and 1 rank finishes the run. With a
    learning rate of 1e-30 the weights stay the initial ones, so iterations 5 and 6 of the resumed job must equal
    those of a 1-rank job from scratch: same curriculum level (skip15 then skip05 at 80 % of 6) and the same
    clips, which only holds when the streams follow the global iteration (a restart at 0 reads skip05, skip10)."""
    frozen = ("optim.lr=1e-30", "optim.weight_decay=0", "checkpoint.every=4")
    two = tmp_path / "two"
    launch(2, overrides(shards, two, "train.stop_after=4", *frozen))
    universal = tmp_path / "universal"
    proc = subprocess.run(["bash", str(ROOT / "cluster" / "deepspeed" / "to_universal.sh"),
                           str(two / "checkpoints"), str(universal)],
                          cwd=ROOT, env=child_env(PYTHON=PY, WORKERS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(two / "mlflow.db", resumed / "mlflow.db")
    launch(1, overrides(shards, resumed, f"checkpoint.dir={universal}", "checkpoint.load_universal=true", *frozen))
    fresh = tmp_path / "fresh"
    launch(1, overrides(shards, fresh, *frozen))

    got, ref = losses(resumed), losses(fresh)
    assert sorted(got) == [5, 6]
    assert [ref[i]["level"] for i in (1, 2, 3, 4, 5, 6)] == ["skip05", "skip10", "skip15", "skip15", "skip15",
                                                             "skip05"]
    for it in (5, 6):
        assert got[it]["level"] == ref[it]["level"], it
        for key, value in ref[it].items():
            if key == "total_loss" or key.startswith("loss/"):
                assert got[it][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (it, key)
    # ... and the 2-rank job's own streams were other clips: its iteration 4 is not the 1-rank one's.
    assert losses(two)[4]["total_loss"] != pytest.approx(ref[4]["total_loss"], rel=1e-4)


@pytest.mark.timeout(600)
def test_isolated_nonfinite_losses_are_skipped_and_counted(shards, tmp_path):
    """Forwards 2 and 5 are poisoned: each micro-batch is dropped, counted, and training still completes every
    iteration (the data stream must not run dry because two batches were thrown away)."""
    out, fault = tmp_path / "nan", tmp_path / "fault"
    fault.mkdir()
    proc = launch(1, overrides(shards, out, "train.max_nonfinite_in_a_row=3"),
                  S3VOS_FAULT="nan:forward=2,5", S3VOS_FAULT_DIR=str(fault))
    assert proc.stderr.count("micro-batch skipped") == 2, proc.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, ITERATIONS + 1)) and all(math.isfinite(r["total_loss"]) for r in got.values())
    client, (run,) = mlflow_runs(out)
    counted = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/nonfinite_skipped")}
    assert counted[1] == 0 and counted[ITERATIONS] == 2
    assert run.info.status == "FINISHED"


@pytest.mark.timeout(600)
def test_nonfinite_losses_in_a_row_stop_with_the_last_checkpoint_intact(shards, tmp_path):
    out, fault = tmp_path / "nan", tmp_path / "fault"
    fault.mkdir()
    # forwards 1-4 are good (checkpoints at 2 and 4); from forward 5 on every one is poisoned: 3 in a row stop.
    proc = launch(1, overrides(shards, out, "train.max_nonfinite_in_a_row=3"), expect_rc=3,
                  S3VOS_FAULT="nan:forward=5-", S3VOS_FAULT_DIR=str(fault))
    err = proc.stderr
    assert "training stopped: 3 non-finite losses in a row at iteration 4" in err, err[-3000:]
    assert "train.max_nonfinite_in_a_row=3" in err and "is intact" in err
    assert "Traceback" not in err
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(r["total_loss"]) for r in got.values())
    assert checkpoints(out) == {"iter_0000002": True, "iter_0000004": True}  # nothing half-written, 4 is last

    import torch

    from training import checkpoint

    ref = checkpoint.latest_complete(out / "checkpoints")
    assert ref.iteration == 4
    weights = torch.load(checkpoint.consolidate(ref, tmp_path / "w.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    client, (run,) = mlflow_runs(out)
    assert run.info.status == "FAILED"


class _MlflowServer:
    """`mlflow server` on 127.0.0.1 (SQLite backend, local artifacts) that the test can kill and restart."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1)
                return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                __import__("time").sleep(0.2)
        raise AssertionError("mlflow server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            sigkill_tree(self.proc)


@pytest.mark.timeout(600)
def test_tracking_server_down_mid_run(shards, tmp_path):
    server_root = tmp_path / "server"
    server_root.mkdir()
    server = _MlflowServer(server_root)
    server.start()
    out, fault = tmp_path / "run", tmp_path / "fault"
    fault.mkdir()
    args = [a for a in overrides(shards, out) if not a.startswith("tracking.tracking_uri=")]
    args.append(f"tracking.tracking_uri={server.uri}")
    env = child_env("hold:step=2:name=down;hold:step=4:name=up", fault)
    proc = subprocess.Popen(command(1, args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_held(proc, fault, "down", timeout=300)
        server.kill()  # the tracking server disappears after iteration 2
        (fault / "down.release").touch()
        wait_held(proc, fault, "up", timeout=300)
        assert (out / "mlflow_pending.jsonl").is_file()  # iterations 3-4 kept locally meanwhile
        server.start()  # ... and is back after iteration 4
        (fault / "up.release").touch()
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    finally:
        if proc.poll() is None:
            sigkill_tree(proc)
        server.kill()
    assert "training goes on, metrics are kept locally" in output
    assert sorted(losses(out)) == list(range(1, ITERATIONS + 1))
    server.start()
    try:
        client, (run,) = mlflow_runs(out, server.uri)
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}) == \
            list(range(1, ITERATIONS + 1))  # nothing lost
        gap = client.get_metric_history(run.info.run_id, "tracking/gap_seconds")
        assert gap and gap[0].value > 0  # the outage is reported in the run
        assert run.info.status == "FINISHED"
    finally:
        server.kill()


@pytest.mark.timeout(900)
def test_killed_while_validating_the_final_checkpoint_is_validated_on_relaunch(shards, synth_data, tmp_path):
    """Item 2, the last step: the job dies while rank 0 validates the final checkpoint (its consolidated weights
    are on disk, the MLflow LoggedModel is not). The relaunch has no iteration left to train; it must still
    validate that checkpoint, so the UI lists it with its score, and it must not train again."""
    out, fault = tmp_path / "run", tmp_path / "fault"
    tag = f"iter_{ITERATIONS:07d}"
    args = overrides(shards, out, f"validation.every={ITERATIONS}", f"validation.root={synth_data / 'DAVIS'}",
                     "validation.size=64", "validation.overlays=0")
    held = launch_and_kill(1, args, f"hold:done=weights/{tag}:name=point", fault)
    assert tag in held["point"]
    assert checkpoints(out)[tag] is True and not (out / "validated.txt").exists()

    proc = launch(1, args)
    assert f"validated {tag}" in proc.stdout + proc.stderr
    assert (out / "validated.txt").read_text().split() == [tag]
    assert sorted(losses(out)) == list(range(1, ITERATIONS + 1))  # no iteration trained twice
    import mlflow

    client, (run,) = mlflow_runs(out)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    ready = [m for m in models if str(m.status).endswith("READY")]
    assert [m.metrics[0].step for m in ready if m.metrics] == [ITERATIONS]
