"""What every benchmark format shares: the `Sequence` record the evaluator runs over, mask reading in the modes
Cutie accepts, palette-PNG writing, submission zips, and the output-folder rule (never mix old results in).

A format module (`davis`, `youtubevos`, `mose`, `lvos`) turns a dataset root into `Sequence`s; `training.evaluate`
runs the network over them and writes OUT/Annotations/<seq>/<frame>.png.
"""

from __future__ import annotations

import contextlib
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synth import PALETTE

DAVIS_PALETTE = bytes(PALETTE)  # the PASCAL-VOC / DAVIS colour map, 256 entries
VOID = 255


@dataclass
class Sequence:
    """One video as the evaluator runs it (Cutie's VideoReader, one record).

    frames: every frame stem of `image_dir`, sorted (the frames processed; those before the first given mask are
    skipped, as Cutie's eval_vos does). given: stems whose PNG in `mask_dir` is fed to the network (DAVIS and MOSE:
    the first PNG only; YouTube-VOS and LVOS: every PNG, each holding the objects that first appear there).
    output_frames: stems written (None = every processed frame). size_dir: a folder whose same-named image fixes the
    output size (Cutie's `size_dir`: 480p output from Full-Resolution input); None = the input's size.
    gt_dir / gt_frames: the ground truth to score against (None: hidden, e.g. test-dev or YouTube-VOS).
    """

    name: str
    frames: list[str]
    image_dir: Path
    mask_dir: Path
    given: list[str]
    output_frames: list[str] | None = None
    size_dir: Path | None = None
    gt_dir: Path | None = None
    gt_frames: list[str] = field(default_factory=list)
    image_ext: str = ".jpg"

    @property
    def has_gt(self) -> bool:
        return self.gt_dir is not None

    def image(self, frame: str) -> np.ndarray:
        path = self.image_dir / f"{frame}{self.image_ext}"
        try:
            return np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            raise OSError(f"cannot read frame {path}: {e}") from e

    def mask(self, frame: str) -> np.ndarray:
        return read_mask(self.mask_dir / f"{frame}.png")

    def gt(self, frame: str) -> np.ndarray:
        if self.gt_dir is None:
            raise ValueError(f"sequence {self.name} has no ground truth")
        return read_mask(self.gt_dir / f"{frame}.png")

    def output_size(self, frame: str, image: np.ndarray) -> tuple[int, int]:
        if self.size_dir is None:
            return image.shape[0], image.shape[1]
        path = self.size_dir / f"{frame}{self.image_ext}"
        try:
            w, h = Image.open(path).size
        except OSError as e:
            raise OSError(f"cannot read the output-size frame {path}: {e}") from e
        return h, w

    def palette(self) -> bytes:
        """The palette of the first given PNG (Cutie reuses it for the output), else DAVIS's."""
        with Image.open(self.mask_dir / f"{self.given[0]}.png") as first:
            pal = first.getpalette() if first.mode == "P" else None
        if not pal:
            return DAVIS_PALETTE
        pal = bytes(pal)
        return pal + bytes(768 - len(pal)) if len(pal) < 768 else pal[:768]


def read_mask(path: Path) -> np.ndarray:
    """Object ids of an annotation PNG: palette (P) or grey (L) as indices, RGB as R + 256 G + 65536 B (Cutie's
    long-id mode); any other mode (16-bit grey, RGBA) is refused, naming the file."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, FileNotFoundError) as e:
        raise FileNotFoundError(f"cannot read mask {path}: {e}") from e
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode == "RGB":
        rgb = np.asarray(img).astype(np.int64)
        return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    raise ValueError(f"{path}: expected a palette (P), grey (L) or RGB PNG of object ids, got mode {img.mode}")


def frame_stems(folder: Path, ext: str, what: str) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {folder}")
    stems = sorted(p.stem for p in folder.iterdir() if p.suffix.lower() == ext)
    if not stems:
        raise FileNotFoundError(f"{what}: no {ext} files in {folder}")
    return stems


def write_png(path: Path, ids: np.ndarray, palette: bytes = DAVIS_PALETTE) -> None:
    if ids.max(initial=0) > 255:
        raise ValueError(f"{path}: object id {int(ids.max())} does not fit an indexed PNG (ids 0-255)")
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette(palette)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # no truncated PNG is left behind
        if e.errno is not None and e.filename is None:
            e.filename = str(path)  # a failed write() (a full disk) names no file: this is the one
        raise


def zip_annotations(pred_root: Path, zip_path: Path) -> Path:
    """Annotations/<vid>/<frame>.png inside the zip (YouTube-VOS, LVOS)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(pred_root.rglob("*.png")):
            z.write(p, Path("Annotations") / p.relative_to(pred_root))
    return zip_path


def zip_video_folders(pred_root: Path, zip_path: Path) -> Path:
    """<vid>/<frame>.png at the zip's root (DAVIS 2017 test-dev, MOSE): a single top folder is rejected there."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(pred_root.rglob("*.png")):
            z.write(p, p.relative_to(pred_root))
    return zip_path


def check_apart(pred_dir: Path, out_dir: Path | None) -> None:
    """Refuse score files inside the predictions folder: the official evaluators read such files back as their
    own results (davis2017's global_results-*.csv, LVOS's "Using precomputed results")."""
    if out_dir is None:
        return
    p, o = Path(pred_dir).resolve(), Path(out_dir).resolve()
    if o == p or p in o.parents:
        raise ValueError(f"--out {out_dir} is inside the predictions folder {pred_dir}: the official evaluator "
                         "reads score files in a prediction folder as its own results; choose another folder")


def prepare_out(out: Path, overwrite: bool) -> Path:
    """A results folder that holds nothing old: a non-empty OUT is refused unless overwrite, which empties it."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty; choose a new folder or pass --overwrite "
                                  "(which deletes what is there)")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
