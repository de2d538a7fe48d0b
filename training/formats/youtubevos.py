"""YouTube-VOS 2018/2019 validation as Cutie's y18/y19 presets read it, and the submission layout.

Frames are processed from the all-frames release (`valid_all_frames/JPEGImages/<vid>/`, every original frame;
looked for at ROOT/all_frames/valid_all_frames, ROOT/valid_all_frames), masks come from every PNG of
ROOT/valid/Annotations/<vid>/ (each holds the objects that first appear in that frame; Cutie's
`use_all_masks: True`), and only the frames listed in ROOT/valid/meta.json are written (every 5th original frame).
Without the all-frames folder the 5-step `valid/JPEGImages` is used, with a warning: that lowers scores
(eval-protocols.md, gotcha 1). Ground truth is hidden; the zip holds Annotations/<vid>/<frame>.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.formats.base import Sequence, frame_stems, zip_annotations

log = logging.getLogger(__name__)


def split_dir(root: Path, split: str) -> Path:
    for name in ([split, "valid"] if split == "val" else [split]):
        if (root / name / "Annotations").is_dir():
            return root / name
    raise FileNotFoundError(f"no Annotations folder under {root} (looked for {root}/{split}/Annotations"
                            f"{', ' + str(root / 'valid' / 'Annotations') if split == 'val' else ''})")


def all_frames_dir(root: Path, split_name: str) -> Path | None:
    for cand in (root / "all_frames" / f"{split_name}_all_frames" / "JPEGImages",
                 root / f"{split_name}_all_frames" / "JPEGImages"):
        if cand.is_dir():
            return cand
    return None


def read(root: Path, split: str = "val") -> list[Sequence]:
    base = split_dir(root, split)
    meta_file = base / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"YouTube-VOS meta.json not found: {meta_file}")
    try:
        meta = json.loads(meta_file.read_text())["videos"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{meta_file}: not a YouTube-VOS meta.json ({e})") from e
    frames_root = all_frames_dir(root, base.name)
    if frames_root is None:
        frames_root = base / "JPEGImages"
        log.warning("YouTube-VOS: no %s_all_frames folder under %s; processing the 5-step %s instead, which lowers "
                    "scores (Cutie and the official numbers run on every frame)", base.name, root, frames_root)
    seqs = []
    for ann_dir in sorted(p for p in (base / "Annotations").iterdir() if p.is_dir()):
        name = ann_dir.name
        if name not in meta:
            raise KeyError(f"{meta_file}: video {name!r} (in {ann_dir.parent}) missing")
        img_dir = frames_root / name
        frames = frame_stems(img_dir, ".jpg", f"YouTube-VOS video {name}")
        given = frame_stems(ann_dir, ".png", f"YouTube-VOS video {name} (annotations)")
        wanted = sorted({f for o in meta[name]["objects"].values() for f in o["frames"]})
        missing = [f for f in wanted if f not in set(frames)]
        if missing:
            raise FileNotFoundError(f"YouTube-VOS video {name}: meta.json frame {missing[0]} has no image in {img_dir}")
        seqs.append(Sequence(name, frames, img_dir, ann_dir, given=given, output_frames=wanted))
    if not seqs:
        raise FileNotFoundError(f"no video folders in {base / 'Annotations'}")
    return seqs


def submission_zip(pred_root: Path, zip_path: Path) -> Path:
    return zip_annotations(pred_root, zip_path)
