"""DeepSpeed checkpoints that survive being killed: collective save, completion marker, auto-resume, keep-last-k,
and consolidation of the ZeRO shards into a plain fp32 state dict for the inference engine.

Layout: CKPT_DIR/iter_0001000/ (DeepSpeed's files for that tag) + CKPT_DIR/iter_0001000/COMPLETE (JSON, written by
rank 0 through a temporary name and a rename, only after every rank returned from save_checkpoint and met at a
barrier). A tag folder without COMPLETE is a save that was cut short: never resumed from, deleted by the next
purge. DeepSpeed's own `latest` file is written too but not trusted: it is updated before all ranks finish.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import pickle
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.cli import chain, one_line, write_failure

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_TAG = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass(frozen=True)
class CheckpointRef:
    dir: Path  # the checkpoint root (DeepSpeed's save_dir)
    tag: str
    iteration: int

    @property
    def path(self) -> Path:
        return self.dir / self.tag

    def marker(self) -> dict[str, Any]:
        return json.loads((self.path / MARKER).read_text())


def list_checkpoints(ckpt_dir: str | os.PathLike, complete_only: bool = True) -> list[CheckpointRef]:
    """Checkpoints in `ckpt_dir`, oldest first; by default only those with a completion marker."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    refs = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if not (m and p.is_dir()):
            continue
        if complete_only and not (p / MARKER).is_file():
            continue
        refs.append(CheckpointRef(root, p.name, int(m.group(1))))
    return sorted(refs, key=lambda r: r.iteration)


def latest_complete(ckpt_dir: str | os.PathLike) -> CheckpointRef | None:
    refs = list_checkpoints(ckpt_dir)
    return refs[-1] if refs else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_per_rank(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (collective). DeepSpeed keeps only rank 0's client state under ZeRO
    0-2, so per-rank state (each rank's loader position) travels inside it as a list."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def this_ranks(values: list[Any] | None) -> Any | None:
    """This rank's entry of a `gather_per_rank` list saved in a checkpoint; None if the world size changed."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not values or len(values) != world:
        return None
    return values[_rank()]


def save(engine, ckpt_dir: str | os.PathLike, iteration: int, client_state: dict[str, Any], keep_last: int) -> CheckpointRef:
    """Collective: EVERY rank must call this (a rank-0-only save deadlocks ZeRO, DeepSpeed issue 2993)."""
    root = Path(ckpt_dir)
    tag = tag_for(iteration)
    ref = CheckpointRef(root, tag, iteration)
    if _rank() == 0 and ref.path.exists():
        # A leftover of a save that died before its marker (or a rerun of the same iteration): start clean.
        shutil.rmtree(ref.path)
    _barrier()
    try:  # a failed write (a full disk) of a rank's shards or of the marker: say so, give the space back
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
        _barrier()  # every rank's shards are on disk before the marker says so
        if _rank() == 0:
            tmp = ref.path / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"iteration": iteration, "tag": tag,
                                       "config_hash": client_state.get("config_hash"),
                                       "config": client_state.get("config"),  # a resume diffs against it
                                       "mlflow_run_id": client_state.get("mlflow_run_id"),
                                       "world_size": dist.get_world_size() if dist.is_initialized() else 1}))
            os.replace(tmp, ref.path / MARKER)
    except Exception as e:
        if write_failure(e) is None:
            raise
        raise CheckpointWriteError(_failed_save(ref, e)) from e
    if _rank() == 0:
        purge(root, keep_last)
    _barrier()
    return ref


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or its consolidated weights) could not be written, most often a full disk; what it left
    half-written has been removed."""


def raise_write_failure(error: BaseException, what: str) -> None:
    """If `error` is a failed write (model.cli.write_failure: a full disk, torch.save's 'unexpected pos'), raise
    a CheckpointWriteError naming `what` (chained to it); else return (the caller re-raises `error`)."""
    if isinstance(error, Exception) and write_failure(error) is not None:
        raise CheckpointWriteError(f"{what} not written ({one_line(str(error))}); the partial file was "
                                   "removed") from error


def release_failed_write(error: BaseException) -> None:
    """Let go of the file a failed torch.save still holds open. Its C++ writer lives on in the locals of the
    frames of `error`'s traceback: until they go, a deleted partial file keeps its blocks, and on a full disk the
    MLflow run's final status and the error report have no room to be written."""
    for e in chain(error):
        traceback.clear_frames(e.__traceback__)  # finished frames only; the ones still running are skipped
    gc.collect()


def _failed_save(ref: CheckpointRef, error: BaseException) -> str:
    """Remove what a failed save left of `ref` (never resumed from, and on a full disk its bytes are what MLflow
    and the error report need to finish) and describe the failure in one line."""
    release_failed_write(error)
    size = sum(p.stat().st_size for p in ref.path.rglob("*") if p.is_file()) if ref.path.is_dir() else 0
    shutil.rmtree(ref.path, ignore_errors=True)
    removed = f"; its incomplete files ({size / 2**20:.1f} MiB) were removed" if size else ""
    return f"checkpoint {ref.path} was not written ({one_line(str(error))}){removed}"


def purge(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and any unfinished save before them."""
    complete = list_checkpoints(ckpt_dir)
    keep = {r.tag for r in complete[-keep_last:]}
    newest = complete[-1].iteration if complete else -1
    for r in list_checkpoints(ckpt_dir, complete_only=False):
        if r.tag in keep or r.iteration > newest:
            continue
        # Remove the marker first: a purge killed half-way leaves an incomplete folder, never a broken "complete" one.
        (r.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(r.path, ignore_errors=True)
        log.info("removed checkpoint %s", r.path)


def _deepspeed_safe_globals() -> list[Any]:
    """The few non-tensor classes DeepSpeed pickles into ZeRO checkpoints; all plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location=None, **kwargs: Any) -> Any:
    """torch.load with weights_only=True (no arbitrary pickled code), DeepSpeed's data classes allowed."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


@contextlib.contextmanager
def refuse_pickled_code():
    """Within the block, every `torch.load` (whoever calls it, whatever `weights_only` it asks for) loads with
    weights_only=True and DeepSpeed's few data classes allowed (`safe_torch_load`): a file holding pickled code
    raises `pickle.UnpicklingError` and runs nothing.

    DeepSpeed reads checkpoints with torch.load(weights_only=False) in dozens of places: its checkpoint engine,
    and, for universal checkpoints, `universal_checkpoint.load_hp_checkpoint_state` (each parameter's fp32,
    exp_avg, exp_avg_sq and step files) and the `ds_to_universal` converter; swapping `torch.load` itself covers
    them all. Every file of the plain and universal formats loads under the allow-list (tests/fault). Not
    thread-safe against a concurrent caller that needs an unrestricted torch.load: nothing in this project does.
    """
    real = torch.load
    if getattr(real, "_s3vos_guard", False):  # nested: the outer block already guards
        yield
        return

    def guarded(f, map_location=None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return real(f, map_location, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            if isinstance(f, (str, os.PathLike)):  # name the file: DeepSpeed reads hundreds of them
                raise pickle.UnpicklingError(f"{f}: refused: it holds pickled objects other than tensors and "
                                             f"DeepSpeed's data classes ({one_line(str(e))[:300]})") from None
            raise

    guarded._s3vos_guard = True  # type: ignore[attr-defined]
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = real


class _TorchWithSafeLoad:
    """Stands in for the `torch` module inside deepspeed.utils.zero_to_fp32, whose loads say weights_only=False."""

    load = staticmethod(safe_torch_load)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _no_bar(iterable, *args: Any, **kwargs: Any):
    return iterable


def load(engine, ref: CheckpointRef) -> dict[str, Any]:
    """Collective load of `ref` into `engine`; returns the client state saved with it.

    DeepSpeed calls torch.load(weights_only=False) on every file of a checkpoint, plain or universal; every load
    here runs under `refuse_pickled_code`, so a tampered checkpoint raises UnpicklingError and runs nothing
    (issues 9 and 18, untrusted files).
    """
    engine.checkpoint_engine.load = safe_torch_load
    with refuse_pickled_code():
        load_path, client_state = engine.load_checkpoint(str(ref.dir), tag=ref.tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ref.path}")
    if engine.load_universal_checkpoint():
        # DeepSpeed restores only the optimizer-managed parameters from a universal checkpoint (it skips the
        # module state dict): buffers (BatchNorm statistics) and frozen parameters come from the model states.
        module = safe_torch_load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        engine.module.load_state_dict({k: v for k, v in module.items() if k not in trainable}, strict=False)
    return client_state or {}


# ------------------------------------------------------------------------------------------ consolidation


def consolidate(ref: CheckpointRef, out_file: str | os.PathLike) -> Path:
    """Write the fp32 weights of `ref` as one plain state dict (tensors only), loadable with weights_only=True."""
    out = Path(out_file)
    if out.is_file():
        return out
    zero_files = list(ref.path.glob("*zero_pp_rank_*optim_states.pt"))
    if zero_files:
        from deepspeed.utils import zero_to_fp32

        # Quiet: zero_to_fp32 prints a dozen lines and progress bars per consolidation (kept at DEBUG level).
        real = zero_to_fp32.torch, zero_to_fp32.tqdm
        zero_to_fp32.torch, zero_to_fp32.tqdm = _TorchWithSafeLoad(), _no_bar
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ref.dir), tag=ref.tag)
        finally:
            zero_to_fp32.torch, zero_to_fp32.tqdm = real
            log.debug("zero_to_fp32 on %s:\n%s", ref.path, printed.getvalue())
        # zero_to_fp32 leaves out frozen parameters for ZeRO-1: they were never updated, so the module's
        # own copy in the model-states file is exact (under ZeRO-3 those copies are empty placeholders).
        model_file = ref.path / "mp_rank_00_model_states.pt"  # stages 1-2 (stage 3 stores per-rank files)
        module = safe_torch_load(model_file, map_location="cpu").get("module") or {} if model_file.is_file() else {}
        for k, v in module.items():
            if k not in state and v.numel() > 0:
                state[k] = v
    else:  # ZeRO stage 0: the module's weights are stored whole
        model_file = ref.path / "mp_rank_00_model_states.pt"
        state = safe_torch_load(model_file, map_location="cpu")["module"]
    # fp32 for weights (bf16 training included); integer buffers (BatchNorm's counters) keep their dtype.
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in state.items()}
    tmp = out.with_suffix(out.suffix + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except BaseException as e:
        release_failed_write(e)
        tmp.unlink(missing_ok=True)  # a partial file (a full disk): give its space back
        raise_write_failure(e, f"consolidated weights {out}")
        raise
    return out


def purge_weights(weights_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest `keep` consolidated weight files `weights_dir/iter_*.pt` (and their `.model.yaml`
    sidecars); delete older ones, orphaned sidecars and leftovers of an interrupted consolidation (`*.raw.pt`,
    `*.tmp`). Call it between validations (rank 0): nothing may be consolidating into `weights_dir` meanwhile.

    A logged-model upload still in flight is not affected: the tracker stages its files as hard links of its own
    (training.tracking), so deleting the file here frees the space only once the upload is done.
    Returns the removed paths.
    """
    root = Path(weights_dir)
    if not root.is_dir():
        return []
    weights: dict[str, Path] = {}
    leftovers: list[Path] = []
    for p in root.iterdir():
        if not p.is_file():
            continue
        if p.name.endswith((".raw.pt", ".tmp")):
            leftovers.append(p)
        elif p.suffix == ".pt" and _TAG.match(p.stem):
            weights[p.stem] = p
    ordered = sorted(weights, key=lambda tag: int(_TAG.match(tag).group(1)))
    kept = set(ordered[-keep:]) if keep > 0 else set()
    removed = [weights[tag] for tag in ordered if tag not in kept] + leftovers
    for p in root.glob("iter_*.model.yaml"):  # sidecars of removed (or never finished) weight files
        if p.name[: -len(".model.yaml")] not in kept:
            removed.append(p)
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        log.info("removed %d consolidated weight files from %s (keeping %s)", len(removed), root,
                 ", ".join(sorted(kept)) or "none")
    return removed


def load_weights(network: torch.nn.Module, weights_file: str | os.PathLike) -> None:
    """Load a consolidated state dict into `network`; refuses pickled objects (weights_only=True)."""
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    missing, unexpected = network.load_state_dict(state, strict=False)
    # Frozen, non-trained weights (none today) would be the only acceptable missing keys; say so loudly if any.
    if missing or unexpected:
        raise RuntimeError(f"{weights_file}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
