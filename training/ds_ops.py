"""DeepSpeed's one compiled op on CPU ranks, built where the project keeps it, once, and said when it happens.

On a CPU accelerator `deepspeed.init_distributed` JIT-compiles its shared-memory collective op
(`deepspeed_shm_comm`, 1-2 minutes of C++ on 2 cores) into `TORCH_EXTENSIONS_DIR`, by default a folder in the
user's home, and says nothing while it compiles. The trainer points `TORCH_EXTENSIONS_DIR` at the virtualenv
(`<venv>/torch_extensions`, unless the variable is set) and prints one line before a build; `make install` runs

    python -m training.ds_ops

to build it ahead (a no-op on GPU accelerators, which compile nothing here).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OP = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """`TORCH_EXTENSIONS_DIR`, defaulting (and exported, for the ranks' own builds) to the virtualenv's folder."""
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))


def _builder():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return None
    return get_accelerator().create_op_builder("ShareMemCommBuilder")


def built_path() -> Path:
    """Where torch's JIT build puts (or finds) the op's library."""
    from torch.utils.cpp_extension import _get_build_directory

    extensions_dir()
    return Path(_get_build_directory(OP, verbose=False)) / f"{OP}.so"


def prepare(rank: int) -> None:
    """Before `init_distributed` on CPU ranks: every rank looks for the op in `extensions_dir()` (the venv's unless
    set), and rank 0 says in one line when it is not built yet (the build itself is silent)."""
    extensions_dir()
    if rank != 0 or _builder() is None or built_path().exists():
        return
    print(f"building DeepSpeed's CPU op {OP} into {built_path().parent} (once, 1-2 minutes on 2 cores; "
          f"`make install` builds it ahead)", file=sys.stderr, flush=True)


def build() -> int:
    extensions_dir()
    builder = _builder()
    if builder is None:
        print("no op to build: the accelerator is not the CPU")
        return 0
    where = built_path()
    if where.exists():
        print(f"{OP}: already built in {where.parent}")
        return 0
    print(f"building DeepSpeed's CPU op {OP} into {where.parent} (once, 1-2 minutes on 2 cores)", flush=True)
    t = time.time()
    builder.load(verbose=False)
    print(f"{OP}: built in {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(build())
