"""MOSE v1 validation as Cutie's mose-val preset reads it, and the submission layout.

ROOT/valid/{JPEGImages,Annotations}/<vid>/ (5-digit names, palette PNGs); videos are the Annotations folders;
only the first PNG (the first frame's mask) is given; every frame is written at the original resolution and
zipped with the video folders at the zip's root (henghuiding/MOSE-api: MOSEv1/README.md). Ground truth is hidden.
"""

from __future__ import annotations

from pathlib import Path

from training.formats.base import Sequence, frame_stems, zip_video_folders
from training.formats.youtubevos import split_dir


def read(root: Path, split: str = "val") -> list[Sequence]:
    base = split_dir(root, split)
    seqs = []
    for ann_dir in sorted(p for p in (base / "Annotations").iterdir() if p.is_dir()):
        img_dir = base / "JPEGImages" / ann_dir.name
        frames = frame_stems(img_dir, ".jpg", f"MOSE video {ann_dir.name}")
        given = frame_stems(ann_dir, ".png", f"MOSE video {ann_dir.name} (annotations)")[:1]
        seqs.append(Sequence(ann_dir.name, frames, img_dir, ann_dir, given=given))
    if not seqs:
        raise FileNotFoundError(f"no video folders in {base / 'Annotations'}")
    return seqs


def submission_zip(pred_root: Path, zip_path: Path) -> Path:
    return zip_video_folders(pred_root, zip_path)
