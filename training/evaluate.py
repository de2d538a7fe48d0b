"""Run a network over a VOS benchmark split as Cutie's evaluation pipeline does, write palette-PNG predictions and
submission zips, and score what has public ground truth.

    python -m training.evaluate --checkpoint CKPT --data ROOT --format davis|youtubevos|mose|lvos --split val \
        --out DIR [--preset cutie|s3] [--size 480] [--flip|--no-flip] [--long-term|--no-long-term] [--mem-every N]
    python -m training.evaluate --predictions DIR/Annotations --data ROOT --format davis|lvos --split val --out DIR2

CKPT is our consolidated state dict (model config from --model-config or the `<stem>.model.yaml` sidecar), or a
network file as Cutie's or the S3 release's trainers save it (layout detected, renamed by `model.convert`).
Predictions go to OUT/Annotations/<seq>/<frame>.png; scores (the official davis2017-evaluation CSVs, or LVOS's),
`summary.json` with every setting used, and the submission zip go to OUT itself, never into a predictions folder.
A non-empty OUT is refused unless --overwrite (which empties it first), so old predictions never mix in.

Errors the user can fix end in one line `error: ...` naming the path (model.cli): exit 2 for a missing or unusable
file or folder given on the command line (checked before OUT is created), a dataset or predictions folder that
lacks what the split lists, a bad setting; exit 4 for a full disk while writing (with the free space). --debug adds
the traceback; anything else (a bug) keeps its traceback.

Formats and what is given, written and scored: `training/formats/` (one module each). Presets (Cutie's and S3's
memory settings per benchmark, sizes, DAVIS Full-Resolution at 600/720): `training/formats/presets.py`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import cli
from training import metrics
from training.formats import davis, lvos, mose, presets, youtubevos
from training.formats.base import DAVIS_PALETTE, Sequence, check_apart, prepare_out, read_mask, write_png

log = logging.getLogger(__name__)
FORMATS = presets.FORMATS
_MODULES = {"davis": davis, "youtubevos": youtubevos, "mose": mose, "lvos": lvos}
__all__ = ["DAVIS_PALETTE", "FORMATS", "Sequence", "SequenceResult", "evaluate_network", "load_network", "main",
           "plan_evaluation", "read_mask", "read_split", "run_sequences", "score_predictions", "summarise",
           "write_png", "write_results"]


def read_split(root: str | os.PathLike, fmt: str, split: str = "val", resolution: str = "480p") -> list[Sequence]:
    if fmt not in _MODULES:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "davis":
        return davis.read(Path(root), split, resolution)
    return _MODULES[fmt].read(Path(root), split)


# ----------------------------------------------------------------------------------------------------- writing
def write_csvs(out: Path, split: str, rows: list[dict[str, Any]], summary: dict[str, float]) -> None:
    """The official davis2017-evaluation files (float_format %.3f)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"global_results-{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(metrics.GLOBAL_KEYS)
        w.writerow([f"{summary[k]:.3f}" for k in metrics.GLOBAL_KEYS])
    cols = ("J-Mean", "F-Mean", "J-Recall", "J-Decay", "F-Recall", "F-Decay")
    with open(out / f"per-sequence_results-{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("Sequence", *cols))
        for r in rows:
            w.writerow((r["Sequence"], *(f"{r[c]:.3f}" for c in cols)))


def _per_sequence(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for seq in dict.fromkeys(r["sequence"] for r in rows):
        mine = [r for r in rows if r["sequence"] == seq]
        j = float(np.mean([r["J-Mean"] for r in mine]))
        f = float(np.mean([r["F-Mean"] for r in mine]))
        out[seq] = {"J&F": (j + f) / 2, "J": j, "F": f, "objects": len(mine)}
    return out


# -------------------------------------------------------------------------------------------------- inference
def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)


def predict_sequence(core, seq: Sequence) -> tuple[dict[str, np.ndarray], float, int]:
    """Run the engine over one sequence as Cutie's eval_vos does: frames before the first given mask are neither
    processed nor written; every PNG in `seq.given` is fed with all its labels. Returns (frame -> id map at the
    output size, for the frames to write; seconds of compute; frames processed)."""
    core.clear_memory()
    preds: dict[str, np.ndarray] = {}
    wanted = set(seq.frames if seq.output_frames is None else seq.output_frames)
    given = set(seq.given)
    first = next((i for i, f in enumerate(seq.frames) if f in given), None)
    if first is None:
        raise FileNotFoundError(f"sequence {seq.name}: none of its frames has a given mask in {seq.mask_dir}")
    seconds = 0.0
    last = len(seq.frames) - 1
    for i in range(first, len(seq.frames)):
        frame = seq.frames[i]
        raw = seq.image(frame)
        out_size = seq.output_size(frame, raw)
        mask = None
        if frame in given:
            mask = seq.mask(frame).astype(np.int64)
            if mask.shape != raw.shape[:2]:
                raise ValueError(f"{seq.mask_dir / frame}.png: mask {mask.shape} vs frame {raw.shape[:2]}")
        image = _to_tensor(raw)
        t = time.perf_counter()
        prob = core.step(image, mask, end=(i == last), out_size=out_size)
        ids = core.to_id_map(prob)
        seconds += time.perf_counter() - t
        if frame in wanted:
            preds[frame] = ids
    return preds, seconds, len(seq.frames) - first


def _score_arrays(name: str, gt: np.ndarray, pred: np.ndarray) -> list[dict[str, Any]]:
    return metrics.object_statistics(name, metrics.evaluate_sequence(gt, pred, name=name))


def _inference_settings(network: torch.nn.Module, fmt: str, preset: str | None, inference_cfg: Any,
                        overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from model.inference import InferenceConfig

    if inference_cfg is not None:
        cfg = InferenceConfig.from_any(inference_cfg, **overrides)
        return cfg, {**dataclasses.asdict(cfg), "preset": None, "resolution": "480p"}
    from model.inference.config import _from_cutie_names

    mcfg = getattr(network, "cfg", None)
    preset = preset or presets.default_preset(getattr(mcfg, "name", None))
    # a model config's own `inference:` section sits between the preset and the command line
    section = getattr(mcfg, "inference", None) or {}
    merged = {**_from_cutie_names(dict(section)), **{k: v for k, v in overrides.items() if v is not None}}
    return presets.resolve(preset, fmt, **merged)


@dataclasses.dataclass
class SequenceResult:
    """What running one sequence gives: its position in the split, its per-object rows (empty without ground truth
    or for LVOS, scored from the PNGs), frames processed and seconds of compute. Picklable: ranks gather these."""

    index: int
    name: str
    rows: list[dict[str, Any]]
    frames: int
    seconds: float


def plan_evaluation(network: torch.nn.Module, val_root: str | os.PathLike, split: str = "val",
                    size: int | None = None, flip: bool | None = None, max_sequences: int | None = None,
                    fmt: str = "davis", inference_cfg: Any = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], list[Sequence]]:
    """The inference settings (preset < model config's `inference:` < overrides; fp32 unless they say amp) and the
    sequences of the split, in split order: (InferenceConfig, settings dict, sequences)."""
    over = {"size": size, "flip": flip, **(overrides or {})}
    icfg, settings = _inference_settings(network, fmt, preset, inference_cfg, over)
    seqs = read_split(val_root, fmt, split, settings.get("resolution", "480p"))
    if max_sequences:
        seqs = seqs[:max_sequences]
    return icfg, settings, seqs


def run_sequences(network: torch.nn.Module, icfg: Any, seqs: list[Sequence], indices: list[int] | None = None,
                  pred_root: Path | None = None, fmt: str = "davis", progress: bool = True, desc: str = "evaluate",
                  deadline: float | None = None) -> tuple[list[SequenceResult], bool]:
    """Run the engine over `seqs[i]` for i in `indices` (default: all, in order), write their PNGs under pred_root
    and score those with ground truth (not LVOS: its toolkit scores the PNGs). Before each sequence the clock
    (time.monotonic) is checked against `deadline`: once past it, no new sequence starts. Returns (the results of
    the sequences run, whether all of them were)."""
    from model.inference import InferenceCore

    indices = list(range(len(seqs))) if indices is None else list(indices)
    core = InferenceCore(network, icfg)
    was_training = network.training
    network.eval()
    done: list[SequenceResult] = []
    bar = tqdm(total=len(indices), desc=desc, disable=not progress, unit="seq")
    try:
        for i in indices:
            if deadline is not None and time.monotonic() >= deadline:
                return done, False
            seq = seqs[i]
            preds, s, n = predict_sequence(core, seq)
            rows: list[dict[str, Any]] = []
            if pred_root is not None:
                palette = seq.palette()
                for frame, ids in preds.items():
                    write_png(pred_root / seq.name / f"{frame}.png", ids, palette)
            if fmt != "lvos" and seq.has_gt:
                missing = [f for f in seq.gt_frames if f not in preds]
                if missing:
                    raise RuntimeError(f"sequence {seq.name}: no prediction for scored frame {missing[0]}")
                gt = np.stack([seq.gt(f) for f in seq.gt_frames])
                pred = np.stack([preds[f] for f in seq.gt_frames])
                rows = _score_arrays(seq.name, gt, pred)
            done.append(SequenceResult(i, seq.name, rows, n, s))
            bar.update(1)
    except BaseException:
        bar.leave = False  # an error: its one line follows, not a half-drawn bar
        raise
    finally:
        bar.close()
        network.train(was_training)
    return done, True


def summarise(results: list[SequenceResult], num_sequences: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The global numbers of a split from its per-sequence results, taken in split order (however they were
    produced: one process, or gathered from many), so the pooled means are the same floating-point sums."""
    results = sorted(results, key=lambda r: r.index)
    rows = [row for r in results for row in r.rows]
    frames = sum(r.frames for r in results)
    seconds = sum(r.seconds for r in results)
    result: dict[str, Any] = {"fps": frames / seconds if seconds else float("nan"), "frames": frames,
                              "sequences": num_sequences, "settings": settings}
    if rows:
        result.update(metrics.summarize(rows))
        result["per_sequence"] = _per_sequence(rows)
        result["per_object"] = rows
    return result


def write_results(result: dict[str, Any], seqs: list[Sequence], out: Path | None, split: str = "val",
                  fmt: str = "davis", val_root: str | os.PathLike | None = None, pred_root: Path | None = None,
                  unseen_videos: Any = None, files: bool = True) -> dict[str, Any]:
    """After the run: LVOS's toolkit scores (into `result`), and with `files` the CSVs, the submission zip of a
    hidden-ground-truth split and summary.json in `out`. Returns `result`."""
    rows = result.get("per_object")
    if rows and out is not None and files:
        write_csvs(out, split, rows, {k: result[k] for k in metrics.GLOBAL_KEYS})
    if fmt == "lvos" and any(s.has_gt for s in seqs) and pred_root is not None:
        scores = lvos.score(pred_root, Path(val_root), split, unseen_videos)
        result.update(scores)
        if files:
            lvos.write_csv(out, scores, split)
    if out is not None and files:
        hidden = fmt in ("youtubevos", "mose") or (fmt == "davis" and split in davis.HIDDEN_GT_SPLITS) or (
            fmt == "lvos" and not any(s.has_gt for s in seqs))
        if hidden and fmt == "lvos":
            result["zip"] = str(lvos.submission_zip(pred_root, out / "submission.zip", Path(val_root), split))
        elif hidden:
            result["zip"] = str(_MODULES[fmt].submission_zip(pred_root, out / "submission.zip"))
        (out / "summary.json").write_text(json.dumps(
            {k: v for k, v in result.items() if k not in ("per_object",)}, indent=1, default=str))
    return result


def evaluate_network(network: torch.nn.Module, val_root: str | os.PathLike, split: str = "val",
                     size: int | None = None, flip: bool | None = None, out_dir: str | os.PathLike | None = None,
                     max_sequences: int | None = None, fmt: str = "davis", inference_cfg: Any = None,
                     progress: bool = True, preset: str | None = None, overwrite: bool = False,
                     overrides: dict[str, Any] | None = None, unseen_videos: Any = None) -> dict[str, Any]:
    """Propagate through every sequence of the split and score what has ground truth. Returns the global numbers
    (DAVIS: J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay; LVOS: its toolkit's), `per_sequence`,
    `per_object`, `fps`, `frames`, `settings`. Predictions and CSVs are written only when out_dir is given
    (refused when it is not empty, unless overwrite).

    The pieces (plan_evaluation, run_sequences, summarise, write_results) are what training.validation runs
    spread over ranks."""
    icfg, settings, seqs = plan_evaluation(network, val_root, split, size, flip, max_sequences, fmt, inference_cfg,
                                           preset, overrides)
    out = prepare_out(Path(out_dir), overwrite) if out_dir is not None else None
    tmp = None
    if out is None and fmt == "lvos" and any(s.has_gt for s in seqs):
        tmp = tempfile.TemporaryDirectory(prefix="s3vos-lvos-")  # LVOS's scorer reads PNG files
        out = Path(tmp.name)
    pred_root = None if out is None else out / "Annotations"
    try:
        done, _ = run_sequences(network, icfg, seqs, pred_root=pred_root, fmt=fmt, progress=progress,
                                desc=f"evaluate {fmt}/{split}")
        result = summarise(done, len(seqs), settings)
        write_results(result, seqs, out, split, fmt, val_root, pred_root, unseen_videos, files=tmp is None)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return result


# -------------------------------------------------------------------------------------------- scoring folders
def _score_folder_seq(args: tuple[str, str, str, list[str]]) -> list[dict[str, Any]]:
    name, gt_dir, pred_dir, frames = args
    gt = np.stack([read_mask(Path(gt_dir) / f"{f}.png") for f in frames])
    pred_files = [Path(pred_dir) / f"{f}.png" for f in frames]
    missing = [str(p) for p in pred_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sequence {name}: {len(missing)} predictions missing, e.g. {missing[0]}")
    pred = np.stack([read_mask(p) for p in pred_files])
    return _score_arrays(name, gt, pred)


def score_predictions(pred_dir: str | os.PathLike, val_root: str | os.PathLike, split: str = "val",
                      out_dir: str | os.PathLike | None = None, workers: int | None = None,
                      progress: bool = True, fmt: str = "davis", unseen_videos: Any = None) -> dict[str, Any]:
    """Score PRED_DIR/<seq>/<frame>.png against a DAVIS-layout (or LVOS) ground truth (sequences in parallel).
    CSVs go to out_dir, which must not lie inside PRED_DIR."""
    check_apart(Path(pred_dir), Path(out_dir) if out_dir is not None else None)
    if fmt == "lvos":
        res = lvos.score(Path(pred_dir), Path(val_root), split, unseen_videos)
        if out_dir is not None:
            lvos.write_csv(Path(out_dir), res, split)
        return res
    if fmt != "davis":
        raise ValueError(f"--predictions scores DAVIS or LVOS ground truth only, not {fmt!r} (hidden ground truth)")
    seqs = [s for s in davis.read(Path(val_root), split) if s.has_gt]
    if not seqs:
        raise ValueError(f"split {split} of {val_root} has no public ground truth to score against")
    absent = [s.name for s in seqs if not (Path(pred_dir) / s.name).is_dir()]
    if absent:
        more = f" (and {len(absent) - 1} more sequence(s) of {len(seqs)})" if len(absent) > 1 else ""
        raise FileNotFoundError(f"predictions folder {pred_dir} has no folder for sequence {absent[0]} of split "
                                f"{split}{more}: expected {Path(pred_dir) / absent[0]}/<frame>.png")
    for s in seqs:  # before any scoring starts: one line, not a progress bar cut short
        missing = [f for f in s.gt_frames if not (Path(pred_dir) / s.name / f"{f}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"sequence {s.name}: {len(missing)} of {len(s.gt_frames)} predictions missing "
                                    f"in {Path(pred_dir) / s.name}, e.g. {missing[0]}.png")
    jobs = [(s.name, str(s.gt_dir), str(Path(pred_dir) / s.name), s.gt_frames) for s in seqs]
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in tqdm(pool.map(_score_folder_seq, jobs), total=len(jobs), desc="score", disable=not progress):
                rows += r
    else:
        for j in tqdm(jobs, desc="score", disable=not progress):
            rows += _score_folder_seq(j)
    summary = metrics.summarize(rows)
    if out_dir is not None:
        write_csvs(Path(out_dir), split, rows, summary)
    return {**summary, "per_sequence": _per_sequence(rows), "per_object": rows}


def copy_first_mask_baseline(val_root: str | os.PathLike, out_dir: str | os.PathLike, split: str = "val",
                             score: bool = True) -> dict[str, Any]:
    """The floor a trained model must beat: every frame predicted as the first frame's mask (DAVIS layout).
    Writes OUT/predictions/<seq>/<frame>.png and, with score=True, the CSVs in OUT."""
    out = Path(out_dir)
    for seq in davis.read(Path(val_root), split):
        first = seq.mask(seq.given[0]).copy()
        first[first == metrics.VOID] = 0
        for f in seq.frames:
            write_png(out / "predictions" / seq.name / f"{f}.png", first)
    return score_predictions(out / "predictions", val_root, split, out) if score else {}


# --------------------------------------------------------------------------------------------------------- CLI
def load_network(checkpoint: str | os.PathLike, model_config: str | None = None) -> torch.nn.Module:
    """Our consolidated state dict (config from `model_config` or the `.model.yaml` sidecar), or an official Cutie /
    S3-release network file (layout detected and renamed, model.convert). A checkpoint holding every weight never
    needs an ImageNet or Depth-Anything file."""
    from model.convert import load_network_from_checkpoint

    network, info = load_network_from_checkpoint(checkpoint, model_config)
    log.info("loaded %s (%s layout, model config %s)", checkpoint, info.get("layout"), info.get("model_config"))
    return network.eval()


def _settings_line(settings: dict[str, Any]) -> str:
    keys = ("preset", "size", "resolution", "flip", "mem_every", "max_mem_frames", "use_long_term",
            "long_max_mem_frames", "long_min_mem_frames", "num_prototypes", "max_num_tokens", "buffer_tokens",
            "top_k", "stagger_updates", "pad_to", "amp")
    return " ".join(f"{k}={settings[k]}" for k in keys if k in settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our consolidated state dict (.pt), or a Cutie / S3-release network file")
    src.add_argument("--predictions", help="score an existing folder PRED_DIR/<seq>/<frame>.png instead")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="davis", choices=FORMATS)
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="results folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    p.add_argument("--preset", choices=presets.PRESETS,
                   help="memory settings per benchmark: cutie (Cutie's eval config) or s3 (the S3 release's); "
                        "default: s3 for s3 model configs, else cutie")
    p.add_argument("--size", type=int, help="resize when the short side exceeds this (480; 600/720 = Cutie's plus "
                                            "settings, DAVIS then reads Full-Resolution); default: the preset's")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the preset's)")
    p.add_argument("--long-term", action=argparse.BooleanOptionalAction, default=None,
                   help="long-term memory with prototype consolidation (default: the preset's)")
    p.add_argument("--mem-every", type=int)
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU (default fp32, as Cutie and S3)")
    p.add_argument("--model-config", help="model config name or YAML (default: <checkpoint>.model.yaml sidecar, "
                                          "or cutie_base / s3 for official files)")
    p.add_argument("--unseen-videos", help="LVOS: unseen_videos.txt (default: looked for in the dataset root)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--workers", type=int, help="processes for scoring (--predictions)")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return cli.run_cli(lambda: _run(a), debug=a.debug, user_errors=(ValueError, KeyError), disk=[a.out])


def _check_inputs(a: argparse.Namespace) -> None:
    """What the command line names must be there before anything is created or loaded."""
    if a.predictions:
        _must_exist(Path(a.predictions), "predictions folder", folder=True,
                    hint=" (expected PRED_DIR/<sequence>/<frame>.png)")
    else:
        _must_exist(Path(a.checkpoint), "checkpoint", folder=False)
    _must_exist(Path(a.data), "dataset folder (--data)", folder=True)
    if a.unseen_videos and not Path(a.unseen_videos).is_file():
        raise cli.CliError(f"--unseen-videos file not found: {a.unseen_videos}")


def _must_exist(path: Path, label: str, folder: bool, hint: str = "") -> None:
    if path.is_dir() if folder else path.is_file():
        return
    if folder:
        what = "is not a folder" if path.exists() else "not found"
    else:
        what = "is a folder, not a file" if path.is_dir() else "not found"
    raise cli.CliError(f"{label} {what}: {path}{hint}")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    with cli.about("--out", out, "cannot create the results folder"):
        return prepare_out(out, overwrite)


def _run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    _check_inputs(a)
    if a.predictions:
        check_apart(Path(a.predictions), out)
        _prepare_out(out, a.overwrite)
        res = score_predictions(a.predictions, a.data, a.split, out, a.workers, fmt=a.format,
                                unseen_videos=a.unseen_videos)
    else:
        _prepare_out(out, a.overwrite)  # before the (slow) network load
        network = load_network(a.checkpoint, a.model_config).to(a.device)
        overrides: dict[str, Any] = {"use_long_term": a.long_term, "mem_every": a.mem_every,
                                     "amp": True if a.amp else None}
        res = evaluate_network(network, a.data, a.split, a.size, a.flip, out, a.max_sequences, a.format,
                               preset=a.preset, overwrite=True, overrides=overrides, unseen_videos=a.unseen_videos)
        print(f"settings: {_settings_line(res['settings'])}")
        print(f"FPS: {res['fps']:.2f} over {res['frames']} frames; predictions in {out / 'Annotations'}"
              + (f"; submission {res['zip']}" if "zip" in res else ""))
    if "J&F-Mean" in res:
        keys = [k for k in metrics.GLOBAL_KEYS if k in res]
        print(",".join(keys))
        print(",".join(f"{res[k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
