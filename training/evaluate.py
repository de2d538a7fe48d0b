"""Run a network over a VOS benchmark split, write palette-PNG predictions, and score DAVIS-style J&F.

    python -m training.evaluate --checkpoint CKPT --data ROOT --format davis|youtubevos|mose --split val --size 480 \
        --out DIR [--flip] [--model-config NAME_OR_PATH]
    python -m training.evaluate --predictions PRED_DIR --data ROOT --format davis --split val --out DIR

Layouts read (val splits only):
- davis: ROOT/ImageSets/2017/<split>.txt, ROOT/JPEGImages/480p/<seq>/<frame>.jpg, ROOT/Annotations/480p/<seq>/<frame>.png
  (palette PNGs read as indices). Only the first frame's mask is given to the model; every frame is written to
  OUT/<seq>/<frame>.png and scored against the ground truth (training.metrics, the official DAVIS definitions):
  OUT/global_results-<split>.csv and OUT/per-sequence_results-<split>.csv (one row per object, `<seq>_<id>`).
- youtubevos: ROOT/<valid|split>/{JPEGImages,Annotations}/<vid>/ + meta.json. Masks are given on every frame that has
  an annotation PNG (objects first appear there, per meta.json); only the frames listed in meta.json are written
  (OUT/Annotations/<vid>/<frame>.png), then zipped as OUT/submission.zip for the server (GT is hidden: no CSV).
- mose: ROOT/<valid|split>/{JPEGImages,Annotations}/<vid>/, first-frame masks only; every frame is written and zipped.

The checkpoint is a plain fp32 state dict (training.checkpoint.consolidate), loaded with weights_only=True; the model
config comes from --model-config or from the sidecar `<checkpoint stem>.model.yaml` written next to it by validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training import metrics

log = logging.getLogger(__name__)
FORMATS = ("davis", "youtubevos", "mose")


def davis_palette() -> bytes:
    """The PASCAL-VOC / DAVIS colour map (256 entries, bit-interleaved)."""
    out = bytearray()
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += bytes((r, g, b))
    return bytes(out)


DAVIS_PALETTE = davis_palette()


# ------------------------------------------------------------------------------------------------- dataset readers
@dataclass
class Sequence:
    name: str
    frames: list[str]  # frame names without extension, in order
    image_dir: Path
    mask_dir: Path
    mask_frames: list[str]  # frames with an annotation PNG that is given to the model
    objects_at: dict[str, list[int]] = field(default_factory=dict)  # frame -> object ids first given there
    output_frames: list[str] | None = None  # None = every frame
    has_gt: bool = False

    def image(self, frame: str) -> np.ndarray:
        path = self.image_dir / f"{frame}.jpg"
        try:
            return np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            raise OSError(f"cannot read frame {path}: {e}") from e

    def mask(self, frame: str) -> np.ndarray:
        return read_mask(self.mask_dir / f"{frame}.png")


def read_mask(path: Path) -> np.ndarray:
    try:
        img = Image.open(path)
    except OSError as e:
        raise OSError(f"cannot read mask {path}: {e}") from e
    if img.mode not in ("P", "L"):
        raise ValueError(f"{path}: expected a palette (P) or grey (L) PNG of object ids, got mode {img.mode}")
    return np.asarray(img)


def _split_dir(root: Path, split: str) -> Path:
    for name in ([split, "valid"] if split == "val" else [split]):
        if (root / name / "JPEGImages").is_dir():
            return root / name
    if (root / "JPEGImages").is_dir():
        return root
    raise FileNotFoundError(f"no JPEGImages folder under {root} (looked for {root}/{split}, {root}/valid, {root})")


def read_davis(root: Path, split: str = "val", resolution: str = "480p") -> list[Sequence]:
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"DAVIS split file not found: {listing}")
    seqs = []
    for name in listing.read_text().split():
        img_dir = root / "JPEGImages" / resolution / name
        ann_dir = root / "Annotations" / resolution / name
        frames = sorted(p.stem for p in img_dir.glob("*.jpg"))
        if not frames:
            raise FileNotFoundError(f"DAVIS sequence {name}: no JPEG frames in {img_dir}")
        if not (ann_dir / f"{frames[0]}.png").is_file():
            raise FileNotFoundError(f"DAVIS sequence {name}: no first-frame annotation {ann_dir / frames[0]}.png")
        has_gt = all((ann_dir / f"{f}.png").is_file() for f in frames)
        seqs.append(Sequence(name, frames, img_dir, ann_dir, [frames[0]], has_gt=has_gt))
    return seqs


def read_youtubevos(root: Path, split: str = "val", use_meta: bool = True) -> list[Sequence]:
    base = _split_dir(root, split)
    meta_file = base / "meta.json"
    meta = None
    if use_meta:
        if not meta_file.is_file():
            raise FileNotFoundError(f"YouTube-VOS meta.json not found: {meta_file}")
        try:
            meta = json.loads(meta_file.read_text())["videos"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{meta_file}: not a YouTube-VOS meta.json ({e})") from e
    seqs = []
    for img_dir in sorted(p for p in (base / "JPEGImages").iterdir() if p.is_dir()):
        name = img_dir.name
        ann_dir = base / "Annotations" / name
        frames = sorted(p.stem for p in img_dir.glob("*.jpg"))
        mask_frames = sorted(p.stem for p in ann_dir.glob("*.png"))
        if not frames or not mask_frames:
            raise FileNotFoundError(f"video {name}: no frames in {img_dir} or no annotations in {ann_dir}")
        objects_at: dict[str, list[int]] = {}
        output = None
        if meta is not None:
            if name not in meta:
                raise KeyError(f"{meta_file}: video {name!r} missing")
            objs = meta[name]["objects"]
            for oid, o in objs.items():
                objects_at.setdefault(o["frames"][0], []).append(int(oid))
            output = sorted({f for o in objs.values() for f in o["frames"]})
            mask_frames = sorted(objects_at)
        seqs.append(Sequence(name, frames, img_dir, ann_dir, mask_frames, objects_at, output))
    return seqs


def read_split(root: str | os.PathLike, fmt: str, split: str = "val") -> list[Sequence]:
    root = Path(root)
    if fmt == "davis":
        return read_davis(root, split)
    if fmt == "youtubevos":
        return read_youtubevos(root, split)
    if fmt == "mose":
        seqs = read_youtubevos(root, split, use_meta=False)
        for s in seqs:
            s.mask_frames = s.mask_frames[:1]
        return seqs
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# ----------------------------------------------------------------------------------------------------- writing
def write_png(path: Path, ids: np.ndarray, palette: bytes = DAVIS_PALETTE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette(palette)
    img.save(path)


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


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*.png")):
            z.write(p, p.relative_to(folder.parent))
    return zip_path


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
    return torch.from_numpy(np.require(img, requirements=['C', 'W'])).permute(2, 0, 1).float().div_(255)


def predict_sequence(core, seq: Sequence) -> tuple[dict[str, np.ndarray], float]:
    """Run the engine over one sequence; returns (frame -> id map for the frames to output, seconds of compute)."""
    core.clear_memory()
    preds: dict[str, np.ndarray] = {}
    wanted = set(seq.frames if seq.output_frames is None else seq.output_frames)
    given = set(seq.mask_frames)
    seconds = 0.0
    last = len(seq.frames) - 1
    for i, frame in enumerate(seq.frames):
        image = _to_tensor(seq.image(frame))
        mask = objects = None
        if frame in given:
            mask = seq.mask(frame).astype(np.int64)
            if mask.shape != image.shape[-2:]:
                raise ValueError(f"{seq.mask_dir / frame}.png: mask {mask.shape} vs frame {tuple(image.shape[-2:])}")
            mask[mask == metrics.VOID] = 0
            objects = seq.objects_at.get(frame)
            if objects is not None:
                mask = np.where(np.isin(mask, objects), mask, 0)
        t = time.perf_counter()
        prob = core.step(image, mask, objects, end=(i == last))
        ids = core.to_id_map(prob)
        seconds += time.perf_counter() - t
        if frame in wanted:
            preds[frame] = ids
    return preds, seconds


def _score_arrays(name: str, gt: np.ndarray, pred: np.ndarray) -> list[dict[str, Any]]:
    return metrics.object_statistics(name, metrics.evaluate_sequence(gt, pred, name=name))


def evaluate_network(network: torch.nn.Module, val_root: str | os.PathLike, split: str = "val", size: int = 480,
                     flip: bool = False, out_dir: str | os.PathLike | None = None, max_sequences: int | None = None,
                     fmt: str = "davis", inference_cfg: Any = None, progress: bool = True) -> dict[str, Any]:
    """Propagate through every sequence of the split and score it (DAVIS layout with GT). Returns the global numbers
    (J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay), `per_sequence`, `per_object`, `fps`, `frames`.
    PNGs and CSVs are written only when out_dir is given."""
    from model.inference import InferenceConfig, InferenceCore

    seqs = read_split(val_root, fmt, split)
    if max_sequences:
        seqs = seqs[:max_sequences]
    if not seqs:
        raise ValueError(f"no sequences in {val_root} ({fmt}, {split})")
    cfg = InferenceConfig.from_any(inference_cfg if inference_cfg is not None else getattr(network, "cfg", None),
                                   size=size, flip=flip)
    core = InferenceCore(network, cfg)
    out = Path(out_dir) if out_dir is not None else None
    pred_root = None if out is None else (out if fmt == "davis" else out / "Annotations")
    was_training = network.training
    network.eval()
    rows: list[dict[str, Any]] = []
    frames = 0
    seconds = 0.0
    try:
        for seq in tqdm(seqs, desc=f"evaluate {fmt}/{split}", disable=not progress, unit="seq"):
            preds, s = predict_sequence(core, seq)
            seconds += s
            frames += len(seq.frames)
            if pred_root is not None:
                palette = DAVIS_PALETTE
                if fmt != "davis":
                    first = Image.open(seq.mask_dir / f"{seq.mask_frames[0]}.png")
                    palette = bytes(first.getpalette() or []) or DAVIS_PALETTE
                for frame, ids in preds.items():
                    write_png(pred_root / seq.name / f"{frame}.png", ids, palette)
            if fmt == "davis" and seq.has_gt:
                gt = np.stack([seq.mask(f) for f in seq.frames])
                pred = np.stack([preds[f] for f in seq.frames])
                rows += _score_arrays(seq.name, gt, pred)
    finally:
        network.train(was_training)
    result: dict[str, Any] = {"fps": frames / seconds if seconds else float("nan"), "frames": frames,
                              "sequences": len(seqs)}
    if rows:
        summary = metrics.summarize(rows)
        result.update(summary)
        result["per_sequence"] = _per_sequence(rows)
        result["per_object"] = rows
        if out is not None:
            write_csvs(out, split, rows, summary)
    if out is not None:
        if fmt != "davis":
            result["zip"] = str(zip_folder(pred_root, out / "submission.zip"))
        (out / "summary.json").write_text(json.dumps({k: v for k, v in result.items() if k != "per_object"},
                                                     indent=1))
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
                      progress: bool = True) -> dict[str, Any]:
    """Score PRED_DIR/<seq>/<frame>.png against a DAVIS-layout ground truth (sequences in parallel)."""
    seqs = [s for s in read_davis(Path(val_root), split) if s.has_gt]
    if not seqs:
        raise ValueError(f"no sequence of {val_root} ({split}) has full ground truth to score against")
    jobs = [(s.name, str(s.mask_dir), str(Path(pred_dir) / s.name), s.frames) for s in seqs]
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
    for seq in read_davis(Path(val_root), split):
        first = seq.mask(seq.frames[0]).copy()
        first[first == metrics.VOID] = 0
        for f in seq.frames:
            write_png(out / "predictions" / seq.name / f"{f}.png", first)
    return score_predictions(out / "predictions", val_root, split, out) if score else {}


# --------------------------------------------------------------------------------------------------------- CLI
def load_network(checkpoint: str | os.PathLike, model_config: str | None = None) -> torch.nn.Module:
    import model
    from model.config import load_model_config

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if model_config is None:
        sidecar = ckpt.with_suffix(".model.yaml")
        if not sidecar.is_file():
            raise FileNotFoundError(f"no --model-config given and no sidecar config {sidecar} next to the checkpoint")
        model_config = str(sidecar)
    cfg = load_model_config(model_config, None)
    network = model.build_network(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt}: expected a state dict, got {type(state).__name__}")
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    return network.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="consolidated fp32 state dict (.pt)")
    src.add_argument("--predictions", help="score an existing folder PRED_DIR/<seq>/<frame>.png instead")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="davis", choices=FORMATS)
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, default=480, help="short side for inference (480; 600/720 improved size)")
    p.add_argument("--out", required=True)
    p.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--model-config", help="model config name or YAML (default: <checkpoint>.model.yaml sidecar)")
    p.add_argument("--long-term", action="store_true", help="long-term memory with prototype consolidation")
    p.add_argument("--mem-every", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--workers", type=int, help="processes for scoring (--predictions)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(a.out)
    if a.predictions:
        if a.format != "davis":
            p.error("--predictions scores DAVIS-layout ground truth only (--format davis)")
        res = score_predictions(a.predictions, a.data, a.split, out, a.workers)
    else:
        network = load_network(a.checkpoint, a.model_config).to(a.device)
        overrides: dict[str, Any] = {"size": a.size, "flip": a.flip}
        if a.long_term:
            overrides["use_long_term"] = True
        if a.mem_every:
            overrides["mem_every"] = a.mem_every
        from model.inference import InferenceConfig

        icfg = InferenceConfig.from_any(getattr(network, "cfg", None), **overrides)
        res = evaluate_network(network, a.data, a.split, a.size, a.flip, out, a.max_sequences, a.format, icfg)
        print(f"FPS: {res['fps']:.2f} over {res['frames']} frames")
    if "J&F-Mean" in res:
        print(",".join(metrics.GLOBAL_KEYS))
        print(",".join(f"{res[k]:.3f}" for k in metrics.GLOBAL_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
