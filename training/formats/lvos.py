"""LVOS v1/v2 (val and test): the reader, the official lvos-evaluation scoring, and the CodaLab submission zip.

Layout (`LingyiHongfd/LVOS-api: README.md`): `<root>/<split dir>/JPEGImages/<vid>/00000001.jpg…` and
`Annotations/<vid>/<8-digit>.png` (palette PNGs, annotated every 5th frame); the meta `valid_meta.json` /
`test_meta.json` in the split dir is `{"videos": {vid: {"objects": {oid: {"frame_range": {"start", "end",
"frame_nums"}}}}}}`, oid being the pixel value. val ships every annotation, test only the first mask of each object.

How Cutie runs it (`hkchengrex/Cutie: cutie/config/eval_config.yaml`, presets `lvos-val` / `lvos-test`; the
evaluator owns the preset table, this is the reference): size 480, `use_all_masks: True` (every PNG in the mask
folder is fed: each holds the objects that first appear there), long-term memory on, `mem_every: 5`; every frame from
the first mask on is processed and written; val reads `valid/Annotations_first_only`, test reads `test/Annotations`,
and lvos-test is zipped as `Annotations/<vid>/*.png`. The S3 release (`yahooo-m/S3: s3/config/eval_config.yaml`)
uses size 600 for both LVOS presets (and its top-level overrides replace the rest; set them explicitly).

First-appearance masks for val: `Annotations_first_only` is what `Cutie: scripts/data/preprocess_lvos.py` writes
(a PNG only where new labels appear, holding only those labels). When that folder is absent the reader derives the
same masks on the fly from the full `Annotations` and the meta's `frame_range.start`, without writing anything:
`FirstAppearanceSequence.mask(frame)` keeps only the objects whose range starts at `frame`. (Cutie's script scans
pixels instead of the meta; the two agree when every object is present at its meta start, which the reader checks,
and when the PNGs hold no label missing from the meta, which is not checked: such a label is not fed, nor scored.)

Scoring (`LingyiHongfd/lvos-evaluation` @ 25cb02d, 2024-05-10, the "update code for v2" version c05e889:
`lvos/evaluation.py: _evaluate_semisupervised, evaluate`, `lvos/utils.py`, `lvos/lvos_seperate.py`,
`evaluation_method.py`): see `score`.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.formats.base import Sequence, check_apart, frame_stems, read_mask, zip_annotations
from training.metrics import bound_pixels, db_eval_boundary, db_eval_iou

SPLIT_DIRS = {"val": ("valid", "val"), "test": ("test",)}
OFFICIAL_META = {"val": "valid_meta.json", "test": "test_meta.json"}
FIRST_ONLY_DIR = "Annotations_first_only"
UNSEEN_FILE = "unseen_videos.txt"
STEP = 5  # LVOS annotates every 5th frame
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-seen-Mean", "J-unseen-Mean", "F-Mean", "F-seen-Mean", "F-unseen-Mean",
                  "V-Mean", "V-seen-Mean", "V-unseen-Mean")


def _frame(i: int) -> str:
    return f"{int(i):08d}"


# ------------------------------------------------------------------------------------------------ layout and meta
def _split_name(split: str) -> str:
    s = {"valid": "val"}.get(split, split)
    if s not in SPLIT_DIRS:
        raise ValueError(f"LVOS split {split!r}: expected one of {sorted(SPLIT_DIRS)}")
    return s


def split_dir(root: Path, split: str) -> Path:
    """`<root>/valid` or `<root>/val` (val), `<root>/test` (test); `root` itself when it is the split folder."""
    root = Path(root)
    names = SPLIT_DIRS[_split_name(split)]
    for name in names:
        if (root / name / "JPEGImages").is_dir():
            return root / name
    if (root / "JPEGImages").is_dir() and root.name in names:
        return root
    looked = ", ".join(str(root / n / "JPEGImages") for n in names)
    raise FileNotFoundError(f"LVOS {split}: no JPEGImages folder under {root} (looked for {looked})")


def meta_candidates(root: Path, split: str) -> list[Path]:
    """Where the meta is looked for, in order: the official name (`lvos/lvos_seperate.py` opens
    `<split root>/<subset>_meta.json`, subset `valid`/`test`), then `<split>_meta.json` and `meta.json`, in the
    split dir, then in the root."""
    split = _split_name(split)
    base = split_dir(root, split)
    names = [OFFICIAL_META[split], f"{split}_meta.json", f"{base.name}_meta.json", "meta.json"]
    out: list[Path] = []
    for folder in (base, Path(root)):
        for name in names:
            if folder / name not in out:
                out.append(folder / name)
    return out


def load_meta(root: Path, split: str) -> tuple[dict[str, Any], Path]:
    """The meta's `videos` dict and the file it came from; a missing meta is an error naming every path tried."""
    tried = meta_candidates(root, split)
    for path in tried:
        if path.is_file():
            try:
                videos = json.loads(path.read_text())["videos"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not an LVOS meta file ({{'videos': ...}} expected): {e}") from e
            return videos, path
    raise FileNotFoundError(f"LVOS {split}: no meta file; looked for " + ", ".join(str(p) for p in tried))


@dataclass(frozen=True)
class ObjectRange:
    """One object's `frame_range` and the frames the official scorer visits for it (see `score`)."""

    video: str
    oid: str
    start: int
    end: int
    frame_nums: int

    @property
    def first_frame(self) -> str:
        return _frame(self.start)

    def slots(self) -> tuple[int, list[tuple[int, str]]]:
        """(number of per-frame slots, [(slot, frame)]) exactly as `_evaluate_semisupervised` fills them:
        slots = frame_nums - 2; it walks `range(start, end, 5)` with oidx = 0, 1, … and scores oidx in
        1 … frame_nums - 2 into slot oidx - 1. With a consistent meta (end = start + 5 (frame_nums - 1)) these are the
        frames start + 5k, k = 1 … frame_nums - 2. Slots it never reaches stay 0 (its np.zeros)."""
        n = self.frame_nums - 2
        if n < 0:
            raise ValueError(f"LVOS video {self.video} object {self.oid}: frame_nums={self.frame_nums} < 2 "
                             "(the official scorer cannot score it)")
        walked = list(range(self.start, self.end, STEP))
        if len(walked) > self.frame_nums:
            raise ValueError(f"LVOS video {self.video} object {self.oid}: frame_range start={self.start} "
                             f"end={self.end} spans {len(walked)} annotated frames but frame_nums="
                             f"{self.frame_nums} (the official scorer fails with an IndexError)")
        return n, [(k - 1, _frame(f)) for k, f in enumerate(walked) if 1 <= k <= n]


def object_ranges(meta_videos: dict[str, Any], video: str, meta_path: Path) -> list[ObjectRange]:
    """The video's objects in the meta's order (the order the official per-object names `<vid>_<i>` follow)."""
    try:
        objects = meta_videos[video]["objects"]
        out = []
        for oid, o in objects.items():
            r = o["frame_range"]
            out.append(ObjectRange(video, str(oid), int(r["start"]), int(r["end"]), int(r["frame_nums"])))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: video {video}: objects/<id>/frame_range/{{start,end,frame_nums}} "
                         f"expected ({e!r})") from e
    if not out:
        raise ValueError(f"{meta_path}: video {video} lists no objects")
    return out


# ------------------------------------------------------------------------------------------------------- reader
@dataclass
class FirstAppearanceSequence(Sequence):
    """An LVOS val video read from the full `Annotations` when `Annotations_first_only` is absent: `mask(frame)`
    keeps only the objects whose meta `frame_range.start` is `frame` (what Cutie's preprocess_lvos.py would have
    written there), so later-annotated objects never leak into the input. Nothing is written to the dataset."""

    first_labels: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def mask(self, frame: str) -> np.ndarray:
        if frame not in self.first_labels:
            raise ValueError(f"{self.name}: no object first appears at frame {frame} (given: {self.given})")
        ids = read_mask(self.mask_dir / f"{frame}.png")
        return np.where(np.isin(ids, self.first_labels[frame]), ids, 0).astype(ids.dtype, copy=False)


def read(root: Path, split: str) -> list[Sequence]:
    """Every video of the meta, sorted by name (`lvos/lvos_seperate.py` sorts them too); videos in JPEGImages but
    not in the meta are not part of the benchmark and are left out.

    frames: every JPEG of the video; given: the frames where an object first appears (val: the PNGs of
    `Annotations_first_only/<vid>`, or the meta starts when deriving; test: the PNGs of `Annotations/<vid>`);
    output_frames None (every processed frame is written); val: gt_dir = `Annotations/<vid>` and gt_frames = every
    frame the official scorer reads. A meta video without frames, or an object without its first mask, is an error
    naming the missing path."""
    split = _split_name(split)
    base = split_dir(root, split)
    meta, meta_path = load_meta(root, split)
    first_only = base / FIRST_ONLY_DIR
    derive = split == "val" and not first_only.is_dir()
    seqs: list[Sequence] = []
    for vid in sorted(meta):
        objs = object_ranges(meta, vid, meta_path)
        image_dir = base / "JPEGImages" / vid
        frames = frame_stems(image_dir, ".jpg", f"LVOS {split} video {vid}")
        ann_dir = base / "Annotations" / vid
        starts: dict[str, list[int]] = {}
        for o in objs:
            starts.setdefault(o.first_frame, []).append(int(o.oid))
        if split == "val" and not derive:
            mask_dir = first_only / vid
            given = frame_stems(mask_dir, ".png", f"LVOS val video {vid} ({FIRST_ONLY_DIR})")
        elif split == "val":
            mask_dir = ann_dir
            given = sorted(starts)
        else:
            mask_dir = ann_dir
            given = frame_stems(mask_dir, ".png", f"LVOS test video {vid}")
        for f in sorted(starts):
            if not (mask_dir / f"{f}.png").is_file():
                raise FileNotFoundError(f"LVOS {split} video {vid}: object(s) {starts[f]} start at frame {f} "
                                        f"(meta {meta_path}) but the first mask {mask_dir / f}.png is missing")
        for f in given:
            if f not in frames:
                raise FileNotFoundError(f"LVOS {split} video {vid}: a mask is given at frame {f} but the image "
                                        f"{image_dir / f}.jpg is missing")
        if split == "test":
            seqs.append(Sequence(vid, frames, image_dir, mask_dir, given))
            continue
        gt_frames = sorted({f for o in objs for _, f in o.slots()[1]})
        if derive:
            for f, labels in starts.items():
                present = set(np.unique(read_mask(mask_dir / f"{f}.png")).tolist())
                absent = [i for i in labels if i not in present]
                if absent:
                    raise ValueError(f"LVOS val video {vid}: the meta starts object(s) {absent} at frame {f} but "
                                     f"{mask_dir / f}.png has no pixel of them; build {first_only} with Cutie's "
                                     "scripts/data/preprocess_lvos.py instead")
            seqs.append(FirstAppearanceSequence(
                vid, frames, image_dir, mask_dir, given, gt_dir=ann_dir, gt_frames=gt_frames,
                first_labels={f: tuple(sorted(v)) for f, v in starts.items()}))
        else:
            seqs.append(Sequence(vid, frames, image_dir, mask_dir, given, gt_dir=ann_dir, gt_frames=gt_frames))
    return seqs


# ------------------------------------------------------------------------------------------------------ scoring
def prediction_dir(pred_root: Path, videos: Iterable[str] = ()) -> Path:
    """The folder holding `<vid>/<frame>.png`: `pred_root`, or `pred_root/Annotations` (the evaluator's OUT) when
    no video folder sits directly in `pred_root`."""
    pred_root = Path(pred_root)
    if (pred_root / "Annotations").is_dir() and not any((pred_root / v).is_dir() for v in videos):
        return pred_root / "Annotations"
    return pred_root


def _read_prediction(path: Path) -> np.ndarray:
    """`lvos/results.py` reads `np.array(Image.open(path))`, so only indexed (P) or grey (L) PNGs score."""
    try:
        img = Image.open(path)
        img.load()
    except OSError as e:
        raise FileNotFoundError(f"LVOS prediction missing or unreadable: {path} ({e})") from e
    if img.mode not in ("P", "L"):
        raise ValueError(f"{path}: the LVOS evaluator needs an indexed (P) or grey (L) PNG, got mode {img.mode}")
    return np.asarray(img)


def _j_f(gt: np.ndarray, pred: np.ndarray, radius: int) -> tuple[float, float]:
    """DAVIS J and F of two binary masks, cropped to their union's bounding box plus 2 pixels (exact: the boundary
    maps and every match lie inside it; the disk radius comes from the full frame size)."""
    u = gt | pred
    rows, cols = np.flatnonzero(u.any(axis=1)), np.flatnonzero(u.any(axis=0))
    if rows.size == 0:
        return 1.0, 1.0
    h, w = gt.shape
    y0, y1 = max(rows[0] - 2, 0), min(rows[-1] + 3, h)
    x0, x1 = max(cols[0] - 2, 0), min(cols[-1] + 3, w)
    g, p = gt[y0:y1, x0:x1], pred[y0:y1, x0:x1]
    return float(db_eval_iou(g, p)), float(db_eval_boundary(g, p, bound_th=radius))


def _v_statistic(j: np.ndarray, f: np.ndarray) -> float:
    """`lvos/utils.py: db_statistics_var`: sqrt(round(nansum((nanmean(JF) - JF)^2) / N, 4)), JF = (J + F) / 2."""
    jf = (j + f) / 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        var = np.nansum((np.nanmean(jf) - jf) ** 2) / np.float64(jf.size)
    return math.sqrt(float(np.round(var, 4)))


def _nanmean(v: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(v))


def _score_video(args: tuple[str, list[ObjectRange], str, str]) -> list[dict[str, Any]]:
    vid, objs, gt_dir, pred_dir = args
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"LVOS prediction folder missing for video {vid}: {pred_dir}")
    sizes, todo = [], {}
    for i, o in enumerate(objs):
        n, slots = o.slots()
        sizes.append(n)
        for slot, f in slots:
            todo.setdefault(f, []).append((i, slot))
    j = [np.zeros(n) for n in sizes]  # slots the walk never reaches stay 0, as the official np.zeros
    fm = [np.zeros(n) for n in sizes]
    for frame in sorted(todo):
        gt = read_mask(gt_dir / f"{frame}.png")
        pred = _read_prediction(pred_dir / f"{frame}.png")
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_dir / frame}.png: prediction {pred.shape} vs ground truth {gt.shape} "
                             f"({gt_dir / frame}.png); LVOS scores at the annotation resolution")
        radius = bound_pixels(gt.shape)
        for i, slot in todo[frame]:
            oid = int(objs[i].oid)
            j[i][slot], fm[i][slot] = _j_f(gt == oid, pred == oid, radius)
    rows = []
    for i, o in enumerate(objs):
        rows.append({"Sequence": f"{vid}_{i + 1}", "video": vid, "object": o.oid, "frames": sizes[i],
                     "J-Mean": _nanmean(j[i]), "F-Mean": _nanmean(fm[i]), "V": _v_statistic(j[i], fm[i]),
                     "J-Decay": 0.0, "F-Decay": 0.0})
    return rows


def unseen_list(root: Path, split: str, unseen_videos: Path | str | list[str] | None) -> tuple[set[str] | None, str]:
    """(names, source): a given path or list, else `<root>/unseen_videos.txt` or `<split dir>/unseen_videos.txt`
    (the toolkit reads `./unseen_videos.txt`, or `<ref>/unseen_videos.txt` on CodaLab: one name a line, stripped);
    (None, reason) when there is none."""
    if isinstance(unseen_videos, (list, tuple, set)):
        return {str(v).strip() for v in unseen_videos if str(v).strip()}, "list given"
    if unseen_videos is not None:
        paths = [Path(unseen_videos)]
        if not paths[0].is_file():
            raise FileNotFoundError(f"unseen-video list not found: {paths[0]}")
    else:
        paths = [Path(root) / UNSEEN_FILE, split_dir(root, split) / UNSEEN_FILE]
    for p in paths:
        if p.is_file():
            return {line.strip() for line in p.read_text().splitlines() if line.strip()}, str(p)
    return None, "no unseen_videos.txt (looked at " + ", ".join(str(p) for p in paths) + ")"


def score(pred_root: Path, root: Path, split: str = "val", unseen_videos: Path | str | list[str] | None = None,
          workers: int = 0) -> dict[str, Any]:
    """The current official lvos-evaluation numbers (`lvos/evaluation.py` @ 25cb02d; `evaluation_method.py`).

    Per object (the meta's objects of every meta video): frames start + 5k (8-digit names), k = 1 … frame_nums - 2
    (the object's first and last annotated frame are not scored; frames outside its range never are). GT and
    prediction are binarised as `== object id`; no void (255 is not ignored). J = IoU (1 when both empty), F = DAVIS
    boundary F (bound 0.008 of the diagonal, disk dilation), `training.metrics`. Per object J-Mean / F-Mean =
    nanmean over its frames; V = sqrt(round(sum((mean - JF_t)^2) / N, 4)), JF_t = (J_t + F_t) / 2
    (`lvos/utils.py: db_statistics_var`); Decay = 0 (`db_statistics` gets a (1, N) row, every bin is the whole row).
    Seen/unseen by video (`unseen_videos.txt`); J&F-Mean = (J_s + F_s + J_u + F_u) / 4, J-Mean = (J_s + J_u) / 2,
    F-Mean and V-Mean likewise, each a mean over objects. When one group is empty (no list, or no video of the list in
    the split) the official formula is NaN; here the globals are the non-empty group's means and `note` says so.
    A missing prediction folder or PNG is an error naming it (the toolkit prints it and exits).
    """
    split = _split_name(split)
    if split != "val":
        raise ValueError(f"LVOS {split}: the ground truth is hidden; submit `submission_zip` to the CodaLab server")
    base = split_dir(root, split)
    meta, meta_path = load_meta(root, split)
    videos = sorted(meta)
    pred_dir = prediction_dir(pred_root, videos)
    jobs = [(v, object_ranges(meta, v, meta_path), str(base / "Annotations" / v), str(pred_dir / v))
            for v in videos]
    if workers and workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            per_video = list(pool.map(_score_video, jobs))
    else:
        per_video = [_score_video(job) for job in jobs]
    unseen, source = unseen_list(root, split, unseen_videos)
    rows = [r for rs in per_video for r in rs]
    for r in rows:
        r["unseen"] = unseen is not None and r["video"] in unseen
    return _summarise(rows, unseen, source, pred_dir, meta_path)


def _summarise(rows: list[dict[str, Any]], unseen: set[str] | None, source: str, pred_dir: Path,
               meta_path: Path) -> dict[str, Any]:
    groups = {"seen": [r for r in rows if not r["unseen"]], "unseen": [r for r in rows if r["unseen"]]}
    means = {(g, k): float(np.mean([r[k] for r in rs])) if rs else float("nan")
             for g, rs in groups.items() for k in ("J-Mean", "F-Mean", "V")}
    used = [g for g in ("seen", "unseen") if groups[g]]
    note = ""
    if unseen is None:
        note = f"{source}: every video counted as seen; the globals are the seen means"
    elif len(used) < 2:
        note = (f"no {'unseen' if 'seen' in used else 'seen'} video in the split (list: {source}); the official "
                f"formula gives NaN, the globals here are the {used[0] if used else ''} means")

    def mean_of(k: str) -> float:
        return float(np.mean([means[(g, k)] for g in used])) if used else float("nan")

    j, f = mean_of("J-Mean"), mean_of("F-Mean")
    return {
        "J&F-Mean": (j + f) / 2, "J-Mean": j, "J-seen-Mean": means[("seen", "J-Mean")],
        "J-unseen-Mean": means[("unseen", "J-Mean")], "F-Mean": f, "F-seen-Mean": means[("seen", "F-Mean")],
        "F-unseen-Mean": means[("unseen", "F-Mean")], "V-Mean": mean_of("V"), "V-seen-Mean": means[("seen", "V")],
        "V-unseen-Mean": means[("unseen", "V")], "J-Decay": 0.0, "F-Decay": 0.0,
        "num_objects": len(rows), "num_seen_objects": len(groups["seen"]),
        "num_unseen_objects": len(groups["unseen"]), "unseen_source": source if unseen is not None else None,
        "note": note, "meta": str(meta_path), "pred_dir": str(pred_dir), "per_object": rows,
    }


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_csv(out: Path, result: dict[str, Any], split: str = "val") -> tuple[Path, Path]:
    """`global_results-<set>.csv` and `per-sequence_results-<set>.csv` as `evaluation_method.py` writes them
    (set `valid`; columns as there, float_format %.3f, NaN empty), into OUT. Never into the prediction folder: the
    toolkit would later read those CSVs back instead of scoring ("Using precomputed results")."""
    out = Path(out).resolve()
    if result.get("pred_dir"):
        check_apart(Path(result["pred_dir"]), out)
    name = {"val": "valid"}.get(_split_name(split), split)
    out.mkdir(parents=True, exist_ok=True)
    g_path, s_path = out / f"global_results-{name}.csv", out / f"per-sequence_results-{name}.csv"
    with open(g_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(GLOBAL_COLUMNS)
        w.writerow([_fmt(result[k]) for k in GLOBAL_COLUMNS])
    with open(s_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("Sequence", "J-Mean", "F-Mean", "V-Mean"))
        for r in result["per_object"]:
            w.writerow((r["Sequence"], _fmt(r["J-Mean"]), _fmt(r["F-Mean"]), _fmt(r["V"])))
    return g_path, s_path


# --------------------------------------------------------------------------------------------------- submission
def check_submission(pred_root: Path, root: Path, split: str = "test") -> Path:
    """Every meta video has a folder and a PNG for every frame from its first mask on (what Cutie writes; a
    superset of the scored frames). `evaluation_codalab.py` stops at a missing video, `lvos/results.py` at a missing
    frame; this fails on the first missing one, naming it. Returns the folder holding the video folders."""
    seqs = read(root, split)
    pred_dir = prediction_dir(pred_root, [s.name for s in seqs])
    for s in seqs:
        vdir = pred_dir / s.name
        if not vdir.is_dir():
            raise FileNotFoundError(f"LVOS {split} submission: video {s.name} missing ({vdir})")
        have = {p.stem for p in vdir.iterdir() if p.suffix == ".png"}
        for f in s.frames[s.frames.index(s.given[0]):]:
            if f not in have:
                raise FileNotFoundError(f"LVOS {split} submission: frame missing: {vdir / f}.png")
    return pred_dir


def submission_zip(pred_root: Path, zip_path: Path, root: Path | None = None, split: str = "test") -> Path:
    """The CodaLab zip: `Annotations/<vid>/<8-digit>.png` (`evaluation_codalab.py` reads `res/Annotations`).
    With `root`, `check_submission` runs first, so an incomplete zip is never written."""
    if root is not None:
        pred_dir = check_submission(pred_root, root, split)
    else:
        pred_dir = prediction_dir(pred_root)
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    return zip_annotations(pred_dir, zip_path)


__all__ = ["FirstAppearanceSequence", "ObjectRange", "check_submission", "load_meta", "meta_candidates",
           "prediction_dir", "read", "score", "split_dir", "submission_zip", "unseen_list", "write_csv"]
