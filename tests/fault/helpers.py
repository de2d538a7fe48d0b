"""Shared by the fault tests: the repository root, a child environment that loads the injector, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(fault: str = "", fault_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a process a fault test starts: repo on the path, the injector first (inert unless
    S3VOS_FAULT is set), few threads, CPU accelerator, no stray MLflow URI."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(INJECT), str(ROOT)]), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("S3VOS_FAULT", None)
    if fault:
        env["S3VOS_FAULT"] = fault
        env["S3VOS_FAULT_DIR"] = str(fault_dir)
    env.update(extra)
    return env


def wait_held(proc: subprocess.Popen, fault_dir: Path, name: str, timeout: float) -> dict:
    """Wait until a process of the job announces it is held at `name`; fail loudly if the job ends first."""
    flag = fault_dir / f"{name}.held"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if flag.is_file():
            return json.loads(flag.read_text())
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"job ended (rc {proc.returncode}) before reaching fault point {name}:\n{out[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"fault point {name} not reached in {timeout} s")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Ray's raylet and workers, DeepSpeed's ranks), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def sigkill_tree(proc: subprocess.Popen, extra_pids: tuple[int, ...] = ()) -> None:
    """SIGKILL the job: its process group, every descendant of it and any held process named (a preemption)."""
    pids = descendants(proc.pid)
    for p in extra_pids:
        pids += descendants(p)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group (the job was started with start_new_session=True): a preemption."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
