"""Two Ray nodes on one machine: `ray start --head` + `ray start --address` (1 CPU each, distinct node names and
resources, free ports, a short private --temp-dir, token authentication on), the sharding job submitted through
cluster/ray/submit_shard.sh (`ray job submit --runtime-env cluster/ray/runtime_env.yaml`). Its per-shard stats must name both nodes, and its
tars must equal the single-node run's byte for byte.

The cluster lives in a private loopback-only network namespace (see LoopbackNamespace), and only the processes
this test started are stopped (found through the private temp dir), never with `ray stop`, which would stop
every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import pytest

from .conftest import (
    BIN,
    ROOT,
    SHARD_CONFIG,
    LoopbackNamespace,
    base_env,
    free_ports,
    process_tree,
    run,
    shard_files,
    shard_stats,
    stop_pids,
    wait_until,
)

pytestmark = pytest.mark.slow

_LIST_NODES = """
import json, sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")])
print(json.dumps({n.node_id: n.node_name for n in nodes}))
"""


class TwoNodeRay:
    """A head and one more node, both on this machine, each its own raylet with 1 CPU."""

    def __init__(self, temp_dir: Path, netns: LoopbackNamespace):
        self.temp_dir = temp_dir
        self.prefix = netns.prefix
        (self.gcs, self.dashboard, self.client, *self._ports) = free_ports(3 + 2 * 6)
        # Token authentication on, as cluster/ray/cluster.yaml runs it: nodes and clients share the token.
        self.env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _node_ports(self, i: int) -> list[str]:
        p = self._ports[6 * i: 6 * i + 6]
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--metrics-export-port={p[2]}",
                f"--dashboard-agent-listen-port={p[3]}", f"--dashboard-agent-grpc-port={p[4]}",
                f"--runtime-env-agent-port={p[5]}"]

    def run(self, cmd: list[str], **kw):
        return run([*self.prefix, *cmd], env=kw.pop("env", self.env), **kw)

    def start(self) -> None:
        common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=150000000", "--disable-usage-stats",
                  "--node-ip-address=127.0.0.1"]
        ray = str(BIN / "ray")
        self.run([ray, "start", "--head", f"--port={self.gcs}", f"--temp-dir={self.temp_dir}",
                  "--node-name=cluster-test-head", '--resources={"cluster_test_head": 1}',
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                  f"--ray-client-server-port={self.client}", *common, *self._node_ports(0)], timeout=120)
        self.run([ray, "start", f"--address=127.0.0.1:{self.gcs}", "--node-name=cluster-test-worker",
                  '--resources={"cluster_test_worker": 1}', *common, *self._node_ports(1)], timeout=120)
        wait_until(lambda: len(self.alive_nodes()) == 2, 90, "both Ray nodes to register", interval=2)

    def alive_nodes(self) -> dict[str, str]:
        """node_id → node_name of the live nodes, from the dashboard's state API."""
        r = self.run([sys.executable, "-c", _LIST_NODES, self.dashboard_url], timeout=60, check=False)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {}

    def our_pids(self) -> list[int]:
        """Every process of this cluster: those whose command line names our private temp dir, and their trees."""
        import psutil

        marker = str(self.temp_dir)
        roots = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if marker in " ".join(p.info["cmdline"] or [])]
        return sorted({pid for r in roots for pid in process_tree(r)} - {os.getpid()})

    def stop(self) -> None:
        stop_pids(self.our_pids(), grace=8)


@pytest.fixture
def netns():
    ns = LoopbackNamespace()
    yield ns
    ns.close()


@pytest.mark.timeout(600)
def test_sharding_job_on_two_ray_nodes_matches_single_node(single_node_shards, synth_root, short_tmp, netns,
                                                           tmp_path):
    cluster = TwoNodeRay(short_tmp, netns)
    out = tmp_path / "shards"
    try:
        cluster.start()
        nodes = cluster.alive_nodes()
        assert sorted(nodes.values()) == ["cluster-test-head", "cluster-test-worker"]
        # Without the cluster's token the job API turns the client away.
        stranger = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        r = cluster.run([str(BIN / "ray"), "job", "list", "--address", cluster.dashboard_url], env=stranger,
                        timeout=60, check=False)
        assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower()
        r = cluster.run(["bash", str(ROOT / "cluster" / "ray" / "submit_shard.sh"), cluster.dashboard_url,
                         str(synth_root), str(out)],
                        env={**cluster.env, "SHARD_CONFIG": str(SHARD_CONFIG.relative_to(ROOT)),
                             "SUBMISSION_ID": "cluster-test-shard"}, timeout=400)
        assert "succeeded" in (r.stdout + r.stderr).lower()
    finally:
        started = cluster.our_pids()
        cluster.stop()
    assert started, "found none of the cluster's processes to stop"
    assert not cluster.our_pids(), "processes of the test cluster survived"

    stats = shard_stats(out)
    assert stats, f"no per-shard stats under {out}"
    recorded = {s["node_id"] for s in stats}
    assert recorded == set(nodes), f"shards were written on {recorded}, the cluster's nodes are {set(nodes)}"
    assert all(s.get("hostname") for s in stats)
    # Same inputs, config and seed: byte-identical tars whichever nodes wrote them.
    ours, reference = shard_files(out), shard_files(single_node_shards)
    assert sorted(ours) == sorted(reference)
    different = [k for k in ours if ours[k] != reference[k]]
    assert not different, f"tars differ from the single-node run: {different}"


def test_cleanup_selects_only_our_processes(short_tmp):
    """The cleanup selects processes by our private temp dir only: before anything starts it selects none."""
    ns = LoopbackNamespace()
    try:
        assert TwoNodeRay(short_tmp, ns).our_pids() == []
    finally:
        ns.close()
