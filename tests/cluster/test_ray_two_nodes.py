"""Two Ray nodes on one machine: `ray start --head` + `ray start --address` (1 CPU each, distinct names and
resources, all ports chosen free, a short private --temp-dir), the sharding job submitted through
cluster/ray/submit_shard.sh (`ray job submit --runtime-env cluster/ray/runtime_env.yaml`). Its per-shard stats must
name both nodes, and its tars must equal the single-node run's byte for byte. Only the processes this test started
are stopped (found through the private temp dir), never with `ray stop`, which would stop every cluster here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import (
    BIN,
    ROOT,
    SHARD_CONFIG,
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


class TwoNodeRay:
    """A head and one more node, both on this machine, each its own raylet with 1 CPU."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        (self.gcs, self.dashboard, self.client, *self._ports) = free_ports(3 + 2 * 6)
        self.env = base_env()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _node_ports(self, i: int) -> list[str]:
        p = self._ports[6 * i: 6 * i + 6]
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--metrics-export-port={p[2]}",
                f"--dashboard-agent-listen-port={p[3]}", f"--dashboard-agent-grpc-port={p[4]}",
                f"--runtime-env-agent-port={p[5]}"]

    def start(self) -> None:
        common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=150000000", "--disable-usage-stats",
                  "--node-ip-address=127.0.0.1"]
        ray = str(BIN / "ray")
        run([ray, "start", "--head", f"--port={self.gcs}", f"--temp-dir={self.temp_dir}",
             "--node-name=cluster-test-head", '--resources={"cluster_test_head": 1}',
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
             f"--ray-client-server-port={self.client}", *common, *self._node_ports(0)],
            env=self.env, timeout=120)
        run([ray, "start", f"--address=127.0.0.1:{self.gcs}", "--node-name=cluster-test-worker",
             '--resources={"cluster_test_worker": 1}', *common, *self._node_ports(1)],
            env=self.env, timeout=120)
        wait_until(lambda: len(self.alive_nodes()) == 2, 60, "both Ray nodes to register")

    def alive_nodes(self) -> dict[str, str]:
        """node_id → node_name of the live nodes, from the dashboard's state API."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")])
        except Exception:  # noqa: BLE001 (dashboard still starting)
            return {}
        return {n.node_id: n.node_name for n in nodes}

    def our_pids(self) -> list[int]:
        """Every process of this cluster: those whose command line names our private temp dir, and their trees."""
        import psutil

        marker = str(self.temp_dir)
        roots = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if marker in cmd:
                roots.append(p.info["pid"])
        return sorted({pid for r in roots for pid in process_tree(r)} - {os.getpid()})

    def stop(self) -> None:
        stop_pids(self.our_pids(), grace=15)


@pytest.mark.timeout(600)
def test_sharding_job_on_two_ray_nodes_matches_single_node(single_node_shards, synth_root, short_tmp, tmp_path):
    cluster = TwoNodeRay(short_tmp)
    out = tmp_path / "shards"
    try:
        cluster.start()
        nodes = cluster.alive_nodes()
        assert sorted(nodes.values()) == ["cluster-test-head", "cluster-test-worker"]
        r = run(["bash", str(ROOT / "cluster" / "ray" / "submit_shard.sh"), cluster.dashboard_url, str(synth_root),
                 str(out)],
                env={**cluster.env, "SHARD_CONFIG": str(SHARD_CONFIG.relative_to(ROOT)),
                     "SUBMISSION_ID": "cluster-test-shard"}, timeout=400)
        assert "succeeded" in (r.stdout + r.stderr).lower()
    finally:
        leftover_before = cluster.our_pids()
        cluster.stop()
    assert leftover_before, "found none of the cluster's processes to stop"
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
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.get("config_hash") == json.loads((single_node_shards / "manifest.json").read_text()).get(
        "config_hash")


def test_two_node_helper_finds_nothing_before_start(short_tmp):
    """The cleanup selects processes by our private temp dir only: before starting, it selects none."""
    assert TwoNodeRay(short_tmp).our_pids() == []
