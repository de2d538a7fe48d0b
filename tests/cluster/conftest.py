"""Shared pieces of the multi-node tests: free ports, readiness waits, the synthetic data and its single-node shards,
and process cleanup that only ever touches the processes these tests started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARD_CONFIG = ROOT / "data_pipeline" / "configs" / "demo.yaml"
TRAIN_CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so the kernel cannot hand out one twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    """Readiness wait (not a timing assertion): poll `check` until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300, cwd: Path = ROOT,
        check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}"
                             f"\n--- stderr\n{r.stderr[-6000:]}")
    return r


def stop_pids(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM the given processes (only these), then SIGKILL whatever is left after `grace` seconds."""
    import psutil

    procs = []
    for pid in set(pids):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def process_tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def shard_files(out: Path) -> dict[str, bytes]:
    """Relative path → bytes of every tar the sharding job wrote."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def shard_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.rglob("*.stats.json"))]


# ------------------------------------------------------------------------------------------- session data


def _need(path: Path, what: str) -> None:
    if not path.exists():
        pytest.fail(f"{what} is missing ({path}): the cluster tests run the project's real entry points")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The synthetic MEGA datasets in their native layouts (small)."""
    _need(ROOT / "data_pipeline" / "synth.py", "data_pipeline.synth")
    out = tmp_path_factory.mktemp("cluster-data") / "vos"
    run([sys.executable, "-m", "data_pipeline.synth", "--out", str(out), "--seed", "0", "--videos", "2"], timeout=300)
    return out


@pytest.fixture(scope="session")
def single_node_shards(synth_root, tmp_path_factory) -> Path:
    """The reference: the sharding job on one machine (its own local Ray), written once per session."""
    _need(ROOT / "data_pipeline" / "shard.py", "data_pipeline.shard")
    out = tmp_path_factory.mktemp("cluster-shards") / "single"
    ns = LoopbackNamespace()  # its local Ray stays on loopback too
    try:
        run([*ns.prefix, sys.executable, "-m", "data_pipeline.shard", "--config", str(SHARD_CONFIG), "--data-root",
             str(synth_root), "--out", str(out)], timeout=400)
    finally:
        ns.close()
    assert shard_files(out), f"the single-node run wrote no tars under {out}"
    return out


@pytest.fixture
def short_tmp():
    """A short /tmp folder: Ray's unix socket paths must stay under 107 characters."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cluster-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class LoopbackNamespace:
    """A private network namespace holding only a loopback interface, kept alive by one `sleep` process.

    Commands prefixed with `self.prefix` run inside it: everything they open is on 127.0.0.1, unreachable from
    outside and unable to reach out, and their ports cannot collide with other test runs on this machine. (Ray in
    particular swaps a 127.0.0.1 node address for the host's routable address when it finds one; here there is
    none, so the whole cluster stays on loopback.)
    """

    def __init__(self) -> None:
        import psutil

        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            raise RuntimeError("unshare/nsenter (util-linux) are needed for a loopback-only namespace")
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--fork", "sh", "-c", "ip link set lo up && exec sleep 86400"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 20
        self.pid = None
        while time.monotonic() < deadline and self._holder.poll() is None:
            children = psutil.Process(self._holder.pid).children()
            if children and children[0].name() == "sleep":
                self.pid = children[0].pid
                break
            time.sleep(0.05)
        if self.pid is None:
            err = self._holder.stderr.read().decode() if self._holder.poll() is not None else "timeout"
            self.close()
            raise RuntimeError(f"could not create a network namespace: {err}")
        self.prefix = ["nsenter", f"--net=/proc/{self.pid}/ns/net"]

    def close(self) -> None:
        stop_pids(process_tree(self._holder.pid), grace=5)
