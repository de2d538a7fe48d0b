"""The per-node launch of the SLURM path (cluster/deepspeed/node_launch.sh), run as two "nodes" on this machine
with the SLURM variables a one-task-per-node allocation sets, for both launchers it offers: DeepSpeed's
`--no_ssh --node_rank` and torchrun's c10d rendezvous. Each rank runs rank_probe.py (in place of the trainer):
it joins the process group, all-reduces, and records what the launch handed it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, base_env, free_port, process_tree, stop_pids

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("rank_probe.py")


def launch_two_nodes(launcher: str, out: Path) -> list[dict]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = base_env(SLURM_NNODES="2", SLURM_NODEID=str(rank), SLURM_JOB_NODELIST="node0,node1",
                       SLURM_JOB_ID="77", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="1",
                       LAUNCHER=launcher, TRAIN_SCRIPT=str(PROBE), GLOO_SOCKET_IFNAME="lo", TMPDIR=str(out))
        env.pop("NCCL_SOCKET_IFNAME", None)
        env.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "cluster" / "deepspeed" / "node_launch.sh"), "training/configs/demo_cpu.yaml",
             f"out={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                stop_pids(process_tree(p.pid))
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"{launcher} node {rank} exited {p.returncode}:\n{logs[rank][-5000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_node_launch_joins_two_nodes(launcher, tmp_path):
    ranks = launch_two_nodes(launcher, tmp_path)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["allreduce"] == 1.0  # 0 + 1: both nodes took part in one collective
        assert r["LOCAL_RANK"] == "0" and r["config"] == "training/configs/demo_cpu.yaml"
        # nccl.env fills in what the job's environment does not set, and never overrides what it does.
        assert r["NCCL_SOCKET_IFNAME"] == "^lo,docker0" and r["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert r["OMP_NUM_THREADS"] == "1" and r["GLOO_SOCKET_IFNAME"] == "lo"
    if launcher == "deepspeed":  # static world: the node rank decides the global rank
        assert all(r["MASTER_ADDR"] == "127.0.0.1" for r in ranks)
