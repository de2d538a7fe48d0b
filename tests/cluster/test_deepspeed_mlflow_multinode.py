"""Two DeepSpeed "nodes" on one machine, tracked by an MLflow server over HTTP.

Each node is started with the SLURM path's own per-node command line (cluster/deepspeed/node_launch.sh, i.e.
`deepspeed --no_ssh --num_nodes 2 --node_rank R --master_addr 127.0.0.1`) with the SLURM variables set here; they
train the `tiny` demo config with ZeRO-2 for two iterations, write one checkpoint, then a second pair of launches
resumes it. The trainer logs to `mlflow server` (SQLite backend, proxied artifact store) through
MLFLOW_TRACKING_URI=http://127.0.0.1:PORT, and `training.select` sets the `champion` alias through the same server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import (
    BIN,
    ROOT,
    base_env,
    free_port,
    process_tree,
    run,
    stop_pids,
    wait_until,
)

pytestmark = pytest.mark.slow
EXPERIMENT = "cluster-two-nodes"


# ------------------------------------------------------------------------------------------ MLflow server


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a proxied artifact store, stopped by its PIDs."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(d / "server.log", "w")  # noqa: SIM115 (the server writes to it until the fixture ends)
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", (d / "artifacts").as_uri(),
         "--serve-artifacts"],
        cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or _healthy(url), 90, "mlflow server /health")
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited {proc.returncode}:\n{(d / 'server.log').read_text()[-4000:]}")
        yield url
    finally:
        stop_pids(process_tree(proc.pid))
        log.close()


# ------------------------------------------------------------------------------------------ two nodes


def _launch_two_nodes(tmp: Path, overrides: list[str], tracking_uri: str, tag: str) -> None:
    """Start node 0 and node 1 (one process group each) and wait for both; kill both if either fails."""
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        env = base_env(
            SLURM_NNODES="2", SLURM_NODEID=str(rank), SLURM_JOB_NODELIST="node0,node1", SLURM_JOB_ID="4242",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="1",
            GLOO_SOCKET_IFNAME="lo",  # loopback only (nccl.env's eth0 default is for real clusters)
            MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=str(tmp))
        log = open(tmp / f"{tag}-node{rank}.log", "w")  # noqa: SIM115 (closed below, after the launch)
        logs.append(log)
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "cluster" / "deepspeed" / "node_launch.sh"), "training/configs/demo_cpu.yaml",
             *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                stop_pids(process_tree(p.pid))
        for log in logs:
            log.close()
    for rank, p in enumerate(procs):
        text = (tmp / f"{tag}-node{rank}.log").read_text()
        assert p.returncode == 0, f"{tag} node {rank} exited {p.returncode}:\n{text[-6000:]}"


@pytest.fixture(scope="module")
def two_node_run(single_node_shards, synth_root, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds-two-nodes")
    out = tmp / "run"
    overrides = [
        f"output_dir={out}", f"data.shards={single_node_shards}", "data.num_workers=0",
        "train.iterations=4", "train.global_batch=2", "train.zero_stage=2", "train.precision=fp32",
        "checkpoint.every=2", "checkpoint.keep_last=2",
        "validation.every=2", f"validation.root={synth_root / 'DAVIS'}", "validation.size=96",
        "validation.max_sequences=1", "validation.overlays=1",
        f"tracking.experiment={EXPERIMENT}", "tracking.system_metrics=false", "tracking.log_every=1",
    ]
    _launch_two_nodes(tmp, [*overrides, "train.stop_after=2"], mlflow_server, "first")
    first_info = json.loads((out / "run_info.json").read_text())
    _launch_two_nodes(tmp, overrides, mlflow_server, "resume")
    return {"out": out, "first_info": first_info, "info": json.loads((out / "run_info.json").read_text()),
            "tmp": tmp}


@pytest.mark.timeout(600)
def test_two_nodes_zero2_write_one_consistent_checkpoint_that_resumes(two_node_run):
    from training import checkpoint
    from training.train import read_loss_log

    out, first, info = two_node_run["out"], two_node_run["first_info"], two_node_run["info"]
    assert first["world_size"] == 2 and first["zero_stage"] == 2 and first["resumed_from"] is None
    refs = checkpoint.list_checkpoints(out / "checkpoints")
    assert [r.iteration for r in refs] == [2, 4]
    for ref in refs:
        marker = ref.marker()
        assert marker["world_size"] == 2 and marker["iteration"] == ref.iteration
        # ZeRO-2 over two ranks on two "nodes": one optimizer partition per rank, both in the one tag folder.
        parts = sorted(p.name for p in ref.path.glob("*optim_states.pt"))
        assert len(parts) == 2 and any("zero_pp_rank_0" in p for p in parts) and any("zero_pp_rank_1" in p for p in parts)
        assert (ref.path / "mp_rank_00_model_states.pt").is_file()
    # The second pair of launches resumed the first pair's checkpoint and carried on, in the same MLflow run.
    assert info["resumed_from"] == str(refs[0].path) and info["world_size"] == 2
    assert info["mlflow_run_id"] == first["mlflow_run_id"]
    losses = read_loss_log(out)
    assert [r["iteration"] for r in losses] == [1, 2, 3, 4]
    # The consolidated weights of the final checkpoint are complete and finite.
    import math

    import torch

    weights = checkpoint.consolidate(refs[-1], two_node_run["tmp"] / "final.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state and all(math.isfinite(float(v.float().abs().sum())) for v in state.values())


@pytest.mark.timeout(600)
def test_training_logs_over_http_and_select_sets_the_alias_through_the_server(two_node_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == two_node_run["info"]["mlflow_run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]

    r = run([sys.executable, "-m", "training.select", "--experiment", EXPERIMENT, "--json"],
            env=base_env(MLFLOW_TRACKING_URI=mlflow_server), timeout=180)
    champ = json.loads(r.stdout[r.stdout.index("{"):])
    assert champ["alias_uri"].endswith("@champion") and champ["iteration"] in (2, 4)
    version = client.get_model_version_by_alias(champ["registered_name"], "champion")
    assert str(version.version) == champ["version"]
    # The registered version points at a logged model whose files the server stores (proxied artifact store).
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    files = mlflow.artifacts.list_artifacts(artifact_uri=champ["alias_uri"])
    assert files, "the champion's artifacts are not reachable through the server"


@pytest.mark.timeout(300)
def test_checkpoint_converts_to_universal_for_another_world_size(two_node_run, tmp_path):
    """cluster/deepspeed/to_universal.sh on the two-rank ZeRO-2 checkpoint: every parameter whole (fp32 weights +
    both Adam moments), equal to the consolidated weights, with the trainer's client state and a completion marker."""
    import torch

    from training import checkpoint

    src = two_node_run["out"] / "checkpoints"
    dst = tmp_path / "universal"
    run(["bash", str(ROOT / "cluster" / "deepspeed" / "to_universal.sh"), str(src), str(dst)],
        env=base_env(PYTHON=sys.executable, WORKERS="1"), timeout=240)
    newest = checkpoint.latest_complete(src)
    ref = checkpoint.latest_complete(dst)
    assert ref is not None and ref.tag == newest.tag
    assert ref.marker()["universal"] is True and ref.marker()["world_size"] == 2
    consolidated = torch.load(checkpoint.consolidate(newest, tmp_path / "fp32.pt"), map_location="cpu",
                              weights_only=True)
    zero = ref.path / "zero"
    names = {p.name for p in zero.iterdir() if p.is_dir()}  # one folder per parameter (+ optimizer_state.pt)
    assert names, "the universal checkpoint holds no parameters"
    for name in names:
        fp32 = torch.load(zero / name / "fp32.pt", map_location="cpu", weights_only=True)["param"]
        if name in consolidated:  # an exact name first: a nested module may end with the same suffix
            key = name
        else:
            (key,) = [k for k in consolidated if k.endswith("." + name) or name.endswith("." + k)]
        assert torch.equal(fp32.reshape(consolidated[key].shape), consolidated[key]), name
    trained = [n for n in names if (zero / n / "exp_avg.pt").is_file()]
    assert trained and all((zero / n / "exp_avg_sq.pt").is_file() for n in trained)
    client = checkpoint.safe_torch_load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu")
    assert client["iteration"] == newest.iteration and client["mlflow_run_id"] == two_node_run["info"]["mlflow_run_id"]
