"""Fault injector for tests/fault: loaded only by processes the fault tests start (their PYTHONPATH puts this
folder first), and inert unless S3VOS_FAULT is set. It changes no behaviour of the code under test; it only lets a
test stop a real process at a named point (so its SIGKILL lands deterministically) or poison one value.

S3VOS_FAULT      ';'-separated directives, each `what:key=value:key=value`:
  hold:forward=K:rank=R:name=N     before the K-th forward of the DeepSpeed engine on rank R (mid-iteration)
  hold:step=K:rank=R:name=N        after the K-th optimizer step on rank R
  hold:save=SUBSTR:rank=R:name=N   after torch.save wrote its first file whose path contains SUBSTR on rank R
                                   (a checkpoint half on disk, before its completion marker)
  nan:forward=3,6-:rank=R          the inputs of those forward calls on rank R become NaN (a numerical fault)
S3VOS_FAULT_DIR  where a held process writes N.held (JSON: pid, rank, point) and waits for N.release.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
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
_counts = {"forward": 0, "step": 0}
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
    return int(d.get("rank", "0")) == _rank()


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
        result = orig_save(obj, f, *args, **kwargs)
        for d in DIRECTIVES:
            if d["what"] == "hold" and _for_me(d) and "save" in d and isinstance(f, str | os.PathLike) \
                    and d["save"] in os.fspath(f):
                hold(d["name"], f"saved {os.fspath(f)}")
        return result

    torch.save = save


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
