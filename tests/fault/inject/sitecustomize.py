"""Fault injector for tests/fault: loaded only by processes the fault tests start (their PYTHONPATH puts this
folder first), and inert unless S3VOS_FAULT is set. It changes no behaviour of the code under test; it only lets a
test stop a real process at a named point (so its SIGKILL lands deterministically) or poison one value.

S3VOS_FAULT      ';'-separated directives, each `what:key=value:key=value`:
  hold:forward=K:rank=R:name=N     before the K-th forward of the DeepSpeed engine on rank R (mid-iteration)
  hold:step=K:rank=R:name=N        after the K-th optimizer step on rank R
  hold:save=SUBSTR:rank=R:name=N   after torch.save wrote its first file whose path contains SUBSTR on rank R
                                   (a checkpoint half on disk, before its completion marker)
  nan:forward=3,6-:rank=R          the inputs of those forward calls on rank R become NaN (a numerical fault)
  full:save=SUBSTR:rank=R          torch.save of a path containing SUBSTR raises what torch raises on a full disk
  hold:write=REGEX:nth=K:name=N    in the K-th write() this process makes to files whose path matches REGEX
                                   (re.search): half of that write's bytes are written and flushed, then the
                                   process holds, so the file is cut mid-write (a tar, a manifest) even when its
                                   writer emits it in one call
  hold:done=REGEX:nth=K:name=N     after the K-th file matching REGEX is complete: closed after writing, or the
                                   target of an os.replace/os.rename (between two shards)
Directives without `rank` apply in every process (Ray workers have no RANK: they count as rank 0 unless given).
S3VOS_FAULT_DIR  where a held process writes N.held (JSON: pid, rank, point) and waits for N.release.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import io
import json
import os
import re
import sys
import time


def _parse(text: str) -> list[dict[str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        what, *pairs = item.split(":")
        d = dict(p.split("=", 1) for p in pairs)
        d["what"] = what
        out.append(d)
    return out


DIRECTIVES = _parse(os.environ.get("S3VOS_FAULT", ""))
FAULT_DIR = os.environ.get("S3VOS_FAULT_DIR", ".")
_counts = {"forward": 0, "step": 0, "write": 0, "done": 0}
_done: set[str] = set()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _matches_count(spec: str, n: int) -> bool:
    for part in spec.split(","):
        if part.endswith("-"):
            if n >= int(part[:-1]):
                return True
        elif n == int(part):
            return True
    return False


def hold(name: str, point: str) -> None:
    """Announce where we are, then wait (forever unless released): the test kills or releases us."""
    if name in _done:
        return
    _done.add(name)
    flag = os.path.join(FAULT_DIR, f"{name}.held")
    with open(flag + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "rank": _rank(), "point": point}, f)
    os.replace(flag + ".tmp", flag)
    release = os.path.join(FAULT_DIR, f"{name}.release")
    while not os.path.exists(release):
        time.sleep(0.05)


def _for_me(d: dict[str, str]) -> bool:
    return "rank" not in d or int(d["rank"]) == _rank()


def _patch_engine(module) -> None:
    engine_cls = module.DeepSpeedEngine
    orig_forward, orig_step = engine_cls.forward, engine_cls.step

    def forward(self, *args, **kwargs):
        _counts["forward"] += 1
        n = _counts["forward"]
        for d in DIRECTIVES:
            if not _for_me(d) or "forward" not in d:
                continue
            if d["what"] == "hold" and _matches_count(d["forward"], n):
                hold(d["name"], f"forward {n}")
            if d["what"] == "nan" and _matches_count(d["forward"], n) and args and isinstance(args[0], dict):
                batch = dict(args[0])
                batch["rgb"] = batch["rgb"] * float("nan")
                args = (batch, *args[1:])
        return orig_forward(self, *args, **kwargs)

    def step(self, *args, **kwargs):
        result = orig_step(self, *args, **kwargs)
        _counts["step"] += 1
        for d in DIRECTIVES:
            if d["what"] == "hold" and _for_me(d) and "step" in d and _matches_count(d["step"], _counts["step"]):
                hold(d["name"], f"step {_counts['step']}")
        return result

    engine_cls.forward, engine_cls.step = forward, step


def _patch_torch(torch) -> None:
    orig_save = torch.save

    def save(obj, f, *args, **kwargs):
        for d in DIRECTIVES:
            if d["what"] == "full" and _for_me(d) and isinstance(f, str | os.PathLike) and d["save"] in os.fspath(f):
                # What torch.save raises when the disk fills up under it (no errno: the C++ writer's words).
                raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                                   f"writing file data/0: file write failed ({os.fspath(f)})")
        result = orig_save(obj, f, *args, **kwargs)
        for d in DIRECTIVES:
            if d["what"] == "hold" and _for_me(d) and "save" in d and isinstance(f, str | os.PathLike) \
                    and d["save"] in os.fspath(f):
                hold(d["name"], f"saved {os.fspath(f)}")
        return result

    torch.save = save


# ------------------------------------------------------------------------------------------ file-level points

_FILE_DIRECTIVES = [d for d in DIRECTIVES if d["what"] == "hold" and ("write" in d or "done" in d)]


def _file_matches(kind: str, path: str) -> list[dict[str, str]]:
    return [d for d in _FILE_DIRECTIVES if kind in d and _for_me(d) and re.search(d[kind], path)]


def _event(kind: str, path: str) -> None:
    hits = _file_matches(kind, path)
    if not hits:
        return
    _counts[kind] += 1
    for d in hits:
        if _counts[kind] == int(d.get("nth", "1")):
            hold(d["name"], f"{kind} {_counts[kind]} of {path}")


class _WatchedFile:
    """A file opened for writing whose path a directive names: counts its writes and its completion."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def write(self, data):
        hits = _file_matches("write", self._path)
        if not hits:
            return self._f.write(data)
        _counts["write"] += 1
        n = _counts["write"]
        firing = [d for d in hits if n == int(d.get("nth", "1"))]
        if not firing:
            return self._f.write(data)
        # Half of this very write reaches the disk, then the process holds: the file is cut mid-write even
        # when its writer emits it in one call.
        half = len(data) // 2
        self._f.write(data[:half])
        self._f.flush()
        os.fsync(self._f.fileno())
        for d in firing:
            hold(d["name"], f"write {n} of {self._path} (half written)")
        self._f.write(data[half:])
        return len(data)

    def close(self):
        closed = self._f.closed
        self._f.close()
        if not closed:
            _event("done", self._path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _patch_files() -> None:
    orig_open, orig_replace, orig_rename = builtins.open, os.replace, os.rename

    def open_(file, mode="r", *args, **kwargs):
        f = orig_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and isinstance(file, str | bytes | os.PathLike):
            path = os.fsdecode(file)
            if _file_matches("write", path) or _file_matches("done", path):
                return _WatchedFile(f, path)
        return f

    def replace(src, dst, *args, **kwargs):
        orig_replace(src, dst, *args, **kwargs)
        if isinstance(dst, str | bytes | os.PathLike):
            _event("done", os.fsdecode(dst))

    def rename(src, dst, *args, **kwargs):
        orig_rename(src, dst, *args, **kwargs)
        if isinstance(dst, str | bytes | os.PathLike):
            _event("done", os.fsdecode(dst))

    builtins.open = io.open = open_
    os.replace, os.rename = replace, rename


_PATCHES = {"deepspeed.runtime.engine": _patch_engine, "torch": _patch_torch}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Applies a patch right after the target module finishes executing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module, _orig=orig_exec, _name=fullname):
            _orig(module)
            _PATCHES[_name](module)

        spec.loader.exec_module = exec_module
        return spec


if DIRECTIVES:
    sys.meta_path.insert(0, _PatchAfterImport())
if _FILE_DIRECTIVES:
    _patch_files()
