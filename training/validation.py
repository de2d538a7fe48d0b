"""Validation of one checkpoint, spread over every rank: rank 0 consolidates the ZeRO shards into fp32 weights;
each rank loads them (weights_only=True) on its own device, runs the evaluation engine of training.evaluate on its
share of the DAVIS-format val split, and scores it; rank 0 gathers the per-sequence results, summarises them as one
process would, and logs the checkpoint to MLflow as a LoggedModel carrying its val J&F, J and F, with a few mask
overlays. A time bound (validation.time_limit_minutes) skips a validation that would take too long, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import checkpoint

log = logging.getLogger(__name__)
PALETTE = np.array([[0, 0, 0], [220, 40, 40], [40, 200, 60], [40, 90, 230], [230, 200, 30], [200, 60, 200]],
                   dtype=np.uint8)


def strip_wrapper_prefix(state: dict[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The engine wraps the network in the training wrapper: map 'network.x' (or similar) back to 'x'."""
    wanted = set(network.state_dict())
    probe = next(iter(sorted(wanted)))
    prefixes = [""] + sorted({k[: -len(probe)] for k in state if k.endswith("." + probe)}, key=len)
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= set(stripped):
            return {k: stripped[k] for k in wanted}
    missing = sorted(wanted - set(state))[:5]
    raise KeyError(f"consolidated checkpoint does not hold the network's weights (e.g. {missing})")


def weights_file_for(cfg, ref: checkpoint.CheckpointRef) -> Path:
    return Path(cfg.output_dir) / "weights" / f"{ref.tag}.pt"


def build_network(model_cfg) -> torch.nn.Module:
    """A fresh network on the CPU, leaving the caller's random state as it was (the training stream's RNG)."""
    import model

    # The consolidated checkpoint holds every weight, frozen ones included: read no pretrained file.
    model_cfg = dataclasses.replace(
        model_cfg, pixel_encoder={**model_cfg.pixel_encoder, "init": "random", "weights": None},
        mask_encoder=dataclasses.replace(model_cfg.mask_encoder, weights=None))
    with torch.random.fork_rng(devices=[]):
        return model.build_network(model_cfg)


def ensure_consolidated(network: torch.nn.Module, ref: checkpoint.CheckpointRef, weights_file: Path) -> Path:
    """Write the checkpoint's consolidated fp32 weights, the training wrapper's prefix stripped to the keys of
    `network`, to weights_file (once: an existing file is reused)."""
    if weights_file.is_file():
        return weights_file
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    raw_file = weights_file.with_suffix(".raw.pt")
    tmp = weights_file.with_suffix(".tmp")
    try:
        checkpoint.consolidate(ref, raw_file)
        state = torch.load(raw_file, map_location="cpu", weights_only=True)
        state = strip_wrapper_prefix(state, network)
        torch.save(state, tmp)
        tmp.replace(weights_file)
    except BaseException as e:
        # A partial write (a full disk: torch.save says 'unexpected pos ...'): give the space back at once;
        # the error goes on to the trainer, which reports it and stops.
        checkpoint.release_failed_write(e)
        tmp.unlink(missing_ok=True)
        raw_file.unlink(missing_ok=True)
        if not isinstance(e, checkpoint.CheckpointWriteError):  # consolidate() named its own file
            checkpoint.raise_write_failure(e, f"consolidated weights {weights_file}")
        raise
    raw_file.unlink()
    return weights_file


def load_network(model_cfg, weights_file: Path, device: torch.device | str | None = None) -> torch.nn.Module:
    """Build the network, load the consolidated fp32 weights, move it to `device` (default CPU), eval mode."""
    network = build_network(model_cfg)
    checkpoint.load_weights(network, weights_file)
    return network.to(device or "cpu").eval()


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.astype(np.uint8)


def make_overlays(val_root: str, pred_dir: Path, count: int) -> dict[str, np.ndarray]:
    """Overlay predicted masks on the middle frame of the first `count` sequences."""
    import cv2

    images: dict[str, np.ndarray] = {}
    if not pred_dir.is_dir():
        return images
    for seq in sorted(p for p in pred_dir.iterdir() if p.is_dir())[:count]:
        frames = sorted(seq.glob("*.png"))
        if not frames:
            continue
        f = frames[len(frames) // 2]
        jpg = Path(val_root) / "JPEGImages" / "480p" / seq.name / (f.stem + ".jpg")
        img = cv2.imread(str(jpg), cv2.IMREAD_COLOR)
        pred = np.array(__import__("PIL.Image", fromlist=["Image"]).open(f))
        if img is None or pred.shape != img.shape[:2]:
            continue
        images[f"{seq.name}_{f.stem}"] = overlay(img[:, :, ::-1], pred)
    return images


# ------------------------------------------------------------------------------------------ spread over ranks


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_by_frames(frame_counts: list[int], world: int) -> list[list[int]]:
    """Sequence indices per rank, balanced by frames: longest first (ties: split order) into the rank with the
    fewest frames so far (ties: the lowest rank). Deterministic; each rank's list is in split order."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(frame_counts)), key=lambda i: (-frame_counts[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += frame_counts[i]
    return [sorted(s) for s in shares]


def _rank0_first(fn, rank: int, world: int) -> Any:
    """Run fn on rank 0 while the others wait; an error there is raised on every rank (nobody is left waiting)."""
    import torch.distributed as dist

    outcome: Any = None
    error: BaseException | None = None
    if rank == 0:
        try:
            outcome = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
            error = e
    if world > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and rank != 0:
            raise RuntimeError(f"validation failed on rank 0: {box[0]}")
    if error is not None:
        raise error
    return outcome


def _gather(value: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _write_record(cfg, record: dict[str, Any]) -> None:
    with open(Path(cfg.output_dir) / "validation.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def validate_checkpoint(cfg, model_cfg, ref: checkpoint.CheckpointRef, tracker, *,
                        device: torch.device | str | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Score checkpoint `ref` on the val split and log it; a collective: every rank calls it (one process without
    torch.distributed, or a world of one, does it all).

    Rank 0 consolidates the ZeRO shards into OUTPUT/weights/<tag>.pt (once; reused when there) and empties
    OUTPUT/val/<tag> while the others wait. Every rank then loads the weights on `device` (its own GPU; default
    CPU), takes its share of the sequences (balanced by frames, `split_by_frames`), runs the evaluation engine on it
    with training.evaluate's settings (the preset for the model, fp32 unless it says amp), writes its PNGs to
    OUTPUT/val/<tag>/Annotations (a shared filesystem) and scores them. The per-sequence results are gathered and
    rank 0 summarises them in split order, exactly as one process would (same J&F), writes the CSVs and
    summary.json next to the predictions, logs the model with its val metrics and overlays (tracker), and appends
    the record to OUTPUT/validation.jsonl.

    Time bound: `validation.time_limit_minutes` (0 = none), counted on each rank from the call. A rank past it
    starts no new sequence; if any rank left part of its share undone, the validation is skipped: rank 0 warns
    (tag, limit, sequences done of N), logs no score and no model, and appends {"tag", "iteration", "skipped",
    "sequences_done", "sequences"} to validation.jsonl. Either way every rank returns together.

    Returns the record (scores, or "skipped") on rank 0 and None on the other ranks. An error on any rank (e.g.
    out of memory) is raised on every rank after the gather, so no rank is left waiting."""
    from training import evaluate
    from training.formats.base import prepare_out

    start = time.monotonic()
    rank, world = _world()
    v = cfg.validation
    weights = weights_file_for(cfg, ref)
    pred_dir = Path(cfg.output_dir) / "val" / ref.tag

    network: torch.nn.Module | None = None
    error: BaseException | None = None
    try:  # every rank builds its network while rank 0 consolidates
        network = build_network(model_cfg)
    except Exception as e:  # noqa: BLE001 (raised below on every rank, after the gather)
        error = e

    def prepare() -> None:
        if error is not None:
            raise error
        ensure_consolidated(network, ref, weights)
        prepare_out(pred_dir, overwrite=True)

    _rank0_first(prepare, rank, world)
    limit = float(getattr(v, "time_limit_minutes", 0) or 0)
    deadline = start + 60.0 * limit if limit > 0 else None
    done: list[Any] = []
    finished = True
    seqs: list[Any] = []
    settings: dict[str, Any] = {}
    if error is None:
        try:
            checkpoint.load_weights(network, weights)
            network = network.to(device or "cpu").eval()
            icfg, settings, seqs = evaluate.plan_evaluation(network, v.root, v.split, v.size,
                                                            max_sequences=v.max_sequences or None)
            mine = split_by_frames([len(s.frames) for s in seqs], world)[rank]
            desc = f"validate {ref.tag}" + (f" rank {rank}/{world}" if world > 1 else "")
            done, finished = evaluate.run_sequences(network, icfg, seqs, mine, pred_root=pred_dir / "Annotations",
                                                    progress=progress and rank == 0, desc=desc, deadline=deadline)
        except Exception as e:  # noqa: BLE001 (raised below on every rank, after the gather)
            error = e
    payload = {"rank": rank, "done": done, "finished": finished,
               "error": None if error is None else f"{type(error).__name__}: {error}"}
    gathered = _gather(payload, world)
    failed = [g for g in gathered if g["error"]]
    network = None if failed or rank != 0 or not all(g["finished"] for g in gathered) else network
    _free_cuda(device)
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"validation of {ref.tag} failed on rank {failed[0]['rank']}: {failed[0]['error']}")
    if rank != 0:
        return None

    results = [r for g in gathered for r in g["done"]]
    if not all(g["finished"] for g in gathered):
        reason = (f"time limit validation.time_limit_minutes={limit:g} reached after {len(results)} of "
                  f"{len(seqs)} sequences")
        log.warning("validation of checkpoint %s skipped: %s (no scores logged; the job goes on)", ref.tag, reason)
        record = {"tag": ref.tag, "iteration": ref.iteration, "skipped": reason, "sequences_done": len(results),
                  "sequences": len(seqs), "seconds": round(time.monotonic() - start, 3)}
        _write_record(cfg, record)
        return record

    result = evaluate.summarise(results, len(seqs), settings)
    evaluate.write_results(result, seqs, pred_dir, v.split, "davis", v.root, pred_dir / "Annotations")
    scores = {k: float(x) for k, x in result.items() if isinstance(x, int | float) and not isinstance(x, bool)}
    network = network.cpu()  # the logged model loads anywhere; the GPU memory goes back to training
    _free_cuda(device)
    config_file = weights.with_suffix(".model.yaml")
    config_file.write_text(json.dumps(_model_cfg_dict(model_cfg), indent=1))
    uri = tracker.log_checkpoint(network, ref.iteration, scores, [str(weights), str(config_file)],
                                 make_overlays(v.root, pred_dir / "Annotations", v.overlays))
    record = {"iteration": ref.iteration, "tag": ref.tag, "weights": str(weights), "model_uri": uri,
              "ranks": world, "seconds": round(time.monotonic() - start, 3), **scores}
    _write_record(cfg, record)
    log.info("validated %s on %d rank(s) in %.0f s: J&F %.4f (%s)", ref.tag, world, record["seconds"],
             scores.get("J&F-Mean", float("nan")),
             f"model {uri}" if uri else "MLflow upload queued; its URI goes to logged_models.jsonl")
    return record


def _free_cuda(device) -> None:
    """Give the validation network's GPU memory back before training resumes (its references dropped first)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_cfg_dict(model_cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(vars(model_cfg))
