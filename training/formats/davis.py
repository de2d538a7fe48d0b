"""DAVIS 2017 (val, test-dev) as Cutie's d17 presets read it, and the test-dev submission layout.

ROOT/ImageSets/2017/<split>.txt lists the sequences; frames come from ROOT/JPEGImages/<resolution>/<seq>/ and the
first PNG of ROOT/Annotations/<resolution>/<seq>/ is the only mask given (Cutie's `use_all_masks: False`).
At 600/720 ("plus", C`config/eval_plus_config.yaml`) the Full-Resolution frames and first mask are read and the
output is written at the 480p frame size (Cutie's `size_directory`), scored against the 480p ground truth.
val/train: every frame must have a 480p annotation (scored as the official davis2017-evaluation does);
test-dev/test-challenge: ground truth is hidden; the zip holds the sequence folders at its root.
"""

from __future__ import annotations

from pathlib import Path

from training.formats.base import Sequence, frame_stems, zip_video_folders

HIDDEN_GT_SPLITS = ("test-dev", "test-challenge")
RESOLUTIONS = ("480p", "Full-Resolution")


def read(root: Path, split: str = "val", resolution: str = "480p") -> list[Sequence]:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"DAVIS resolution {resolution!r}: expected one of {RESOLUTIONS}")
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"DAVIS split file not found: {listing}")
    names = sorted(line.strip() for line in listing.read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"{listing} lists no sequence")
    seqs = []
    for name in names:
        img_dir = root / "JPEGImages" / resolution / name
        ann_dir = root / "Annotations" / resolution / name
        frames = frame_stems(img_dir, ".jpg", f"DAVIS sequence {name}")
        pngs = frame_stems(ann_dir, ".png", f"DAVIS sequence {name} (annotations)")
        seq = Sequence(name, frames, img_dir, ann_dir, given=[pngs[0]])
        if resolution != "480p":
            seq.size_dir = root / "JPEGImages" / "480p" / name
            if not seq.size_dir.is_dir():
                raise FileNotFoundError(f"DAVIS sequence {name}: the 480p frames that fix the output size are "
                                        f"missing: {seq.size_dir}")
        if split not in HIDDEN_GT_SPLITS:
            gt_dir = root / "Annotations" / "480p" / name
            missing = [gt_dir / f"{f}.png" for f in frames if not (gt_dir / f"{f}.png").is_file()]
            if missing:
                raise FileNotFoundError(f"DAVIS sequence {name}: {len(missing)} ground-truth annotations missing "
                                        f"(split {split} is scored on every frame), e.g. {missing[0]}")
            seq.gt_dir, seq.gt_frames = gt_dir, list(frames)
        seqs.append(seq)
    return seqs


def submission_zip(pred_root: Path, zip_path: Path) -> Path:
    """DAVIS 2017 test-dev: <seq>/<frame>.png at the zip's root, indexed PNGs at 480p."""
    return zip_video_folders(pred_root, zip_path)
