"""What keeps a long training job safe to stop, requeue and relaunch (issue 13): one trainer per output folder,
stop requests that end in a checkpoint, ranks that never outlive their launcher, plain words for a full disk and
for a config that changed under a resumed run.

* `OutputLock`: global rank 0 holds an exclusive `flock` on OUTPUT/train.lock for the life of the job; a second
  trainer pointed at the same folder is refused at start-up with the holder's host, pid and start time. The kernel
  drops the lock when the holder dies, however it dies, so a stale file never blocks a relaunch.
* `StopRequest`: SIGUSR1 / SIGTERM (SLURM's pre-timeout signal, `scancel`, the DeepSpeed launcher forwarding its
  own SIGTERM), the stop file named by `S3VOS_STOP_FILE` (cluster/deepspeed/train.slurm touches it on a shared
  filesystem), or the death of the launcher that started this rank. The trainer reads `requested` once per
  iteration, all ranks agree through the iteration's all-reduce, write a checkpoint together and exit 0; the
  relaunch resumes there. A rank whose launcher is gone and that cannot reach the end of its iteration (a peer
  died in a collective) exits on its own after `grace_seconds`.
* `disk_full`: whether an exception was a full disk (ENOSPC anywhere in its chain, or the writer's own words for
  it when the disk has no room left), and a one-line message that says so with the free space.
* `config_diff`: the keys whose values differ between the config a checkpoint was written with and this one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("training.lifecycle")

LOCK_NAME = "train.lock"
STOP_FILE_ENV = "S3VOS_STOP_FILE"
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")


class OutputInUse(RuntimeError):
    """Another trainer holds the output folder's lock."""


class OutputLock:
    """Exclusive lock on OUTPUT/train.lock, held until `release()` or the process ends."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fh = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the job
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                h = json.loads(holder)
                who = f"host {h.get('host')} pid {h.get('pid')} since {h.get('started')}"
            except ValueError:
                who = "another process"
            raise OutputInUse(f"output folder {self.path.parent} is in use by another trainer ({who}); stop that "
                              f"job first, or give this one another output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "slurm_job": os.environ.get("SLURM_JOB_ID")}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# ----------------------------------------------------------------------------------------------- stopping


def _is_launcher(pid: int) -> bool:
    """Whether `pid` runs a distributed launcher: DeepSpeed's `deepspeed` runner or its launcher module, torchrun."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(os.path.basename(a) in LAUNCHER_SCRIPTS or a in LAUNCHER_MODULES for a in argv[:4])


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (guards against a reused pid); None when it is gone or a zombie."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def launcher_chain(pid: int | None = None) -> list[tuple[int, str]]:
    """The launcher processes above this rank: the parent and its ancestors, as long as they are launchers
    (deepspeed's runner and launch.py, torchrun). Each as (pid, start time)."""
    chain = []
    p = _parent(pid or os.getpid())
    while p > 1 and _is_launcher(p):
        st = _start_time(p)
        if st is None:
            break
        chain.append((p, st))
        p = _parent(p)
    return chain


class StopRequest:
    """Collects the reasons to stop at the end of the current iteration (see the module docstring)."""

    def __init__(self, stop_file: str | None = None, watch_launcher: bool = True, poll_seconds: float = 2.0,
                 grace_seconds: float = 600.0):
        self.reason: str | None = None
        self.stop_file = Path(stop_file) if stop_file else None
        self.grace_seconds = grace_seconds
        self._poll = poll_seconds
        self._chain = launcher_chain() if watch_launcher else []
        self._stopped = threading.Event()

    @classmethod
    def from_env(cls, launched: bool) -> StopRequest:
        return cls(os.environ.get(STOP_FILE_ENV) or None, watch_launcher=launched)

    def install(self) -> StopRequest:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if self._chain:
            threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True).start()
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"signal {signal.Signals(signum).name}"
            log.warning("%s received: a checkpoint is written at the end of this iteration, then the job exits",
                        signal.Signals(signum).name)

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll):
            gone = [pid for pid, st in self._chain if _start_time(pid) != st]
            if gone:
                if self.reason is None:
                    self.reason = f"launcher process {gone[0]} is gone"
                    log.warning("the launcher (pid %d) is gone: stopping after this iteration's checkpoint", gone[0])
                if self._stopped.wait(self.grace_seconds):
                    return
                log.error("the launcher is gone and the job did not stop within %.0f s: exiting", self.grace_seconds)
                os._exit(143)

    def requested(self, check_file: bool = True) -> bool:
        """This process's view; the trainer all-reduces it so that every rank stops at the same iteration."""
        if self.reason is None and check_file and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
            log.warning("stop file %s found: writing a checkpoint and exiting", self.stop_file)
        return self.reason is not None

    def close(self) -> None:
        self._stopped.set()


# ----------------------------------------------------------------------------------------------- disk full

def disk_full(exc: BaseException, paths: list[str | os.PathLike]) -> str | None:
    """A one-line message when `exc` is a full disk (or quota), else None. Looks at the whole exception chain
    (model.cli.write_failure): ENOSPC / EDQUOT or their words anywhere in it, and torch.save's C++ writer, which
    reports a full disk without an errno ('unexpected pos N vs M', 'PytorchStreamWriter failed writing file ...:
    file write failed'). The free space of `paths` (one per file system) is measured now."""
    from model import cli

    found = cli.write_failure(exc)
    if found is None:
        return None
    what = "disk full" if found[0] == "full" else "a file write failed, most likely a full disk or quota"
    return (f"{what}: {cli.one_line(str(exc))} ({cli.free_space_of(paths)}). Free space (or lower "
            "checkpoint.keep_last / checkpoint.keep_weights) and relaunch: the job resumes from its last complete "
            "checkpoint")


# ----------------------------------------------------------------------------------------------- provenance


def with_later_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the keys added since it was written (training.config.LATER_KEYS) at the value
    their absence meant."""
    from training.config import LATER_KEYS

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key, value in LATER_KEYS.items():
        section, name = key.split(".", 1)
        if isinstance(out.get(section), dict):
            out[section].setdefault(name, value)
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] for every key whose value differs (sections flattened)."""
    from training.config import flatten

    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append((k, a.get(k, "<absent>"), b.get(k, "<absent>")))
    return out


def format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in diff)
