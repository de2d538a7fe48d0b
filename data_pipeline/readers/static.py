"""Static image sets of Cutie's stage-0 pre-training (FSS-1000, DUTS-TR/TE, ECSSD, BIG, HRSOD), one `Video`
a picture.

Layouts, under the `static/` folder of Cutie's download script (`STATIC_FOLDERS` names each set's folder):

- ``fss``: FSS-1000, one sub-folder per class, ``<class>/<N>.jpg`` + ``<class>/<N>.png``; image id
  ``"<class>/<N>"``.
- ``pairs``: ``name.jpg`` + ``name.png`` side by side in the set's folder (Cutie's DUTS-TR, DUTS-TE, ecssd,
  BIG_small, HRSOD_small); image id ``name``.
- ``duts``: DUTS's own distribution, ``<X>-Image/name.jpg`` + ``<X>-Mask/name.png`` with X the folder's name
  (``DUTS-TR/DUTS-TR-Image``, ``DUTS-TR/DUTS-TR-Mask``); image id ``name``.

``layout="auto"`` picks ``fss`` for the FSS reader; for the others ``duts`` when the ``<X>-Image`` and
``<X>-Mask`` sub-folders exist (else a single ``*-Image`` folder with its ``*-Mask`` sibling), and ``pairs``
otherwise. Images are ``.jpg`` or ``.jpeg`` (any case), masks ``.png``.

Each image becomes ``Video(dataset=<set>, video=<image id>, frames=[<last part of the id>], annotated=[True],
object_ids={0: [1]}, meta={"image": <path>, "mask": <path>})``, the paths relative to the reader's root. Cutie
repeats BIG and HRSOD five times per epoch (`STATIC_MULTIPLIER`).

Masks are binarised as Cutie does (PIL ``convert('L')``, then value > 127.5): an 8-bit grey pixel >= 128 is
the object (1), the rest background (0). RGB, RGBA and palette masks are converted to grey by PIL first
(ITU-R 601 luma of the palette colour for 'P'); 1-bit masks count white as object; 16-bit masks ('I;16', 'I')
are scaled to 8 bits (value >> 8) before the threshold. Listing checks each pair and records the bad ones in
`problems`: a JPEG without its mask, a mask whose size differs from the image's, a zero-byte or undecodable
file, an empty mask (no object pixel after binarisation).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .base import BadInput, Reader, Video, read_jpeg

STATIC_FOLDERS = {"fss": "fss", "duts_tr": "DUTS-TR", "duts_te": "DUTS-TE", "ecssd": "ecssd",
                  "big": "BIG_small", "hrsod": "HRSOD_small"}
STATIC_MULTIPLIER = {"fss": 1, "duts_tr": 1, "duts_te": 1, "ecssd": 1, "big": 5, "hrsod": 5}
LAYOUTS = ("auto", "fss", "pairs", "duts")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")
MASK_SUFFIXES = (".png", ".PNG")


def binarise(im: Image.Image) -> np.ndarray:
    """A PIL mask as uint8 (H, W): 1 where the object is (grey level >= 128 after the conversions in the
    module docstring), 0 elsewhere. Decodes the pixels: a damaged file raises from PIL."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=bool).astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8
    elif mode == "L":
        grey = np.asarray(im)
    else:  # RGB, RGBA, P, LA, ...: PIL's own grey conversion, as Cutie's convert('L')
        grey = np.asarray(im.convert("L"))
    return (grey >= 128).astype(np.uint8)


def read_binary_mask(path: Path) -> np.ndarray:
    """The mask file at `path` binarised (uint8 0/1, (H, W)); BadInput naming the file when it is empty or
    undecodable."""
    try:
        if path.stat().st_size == 0:
            raise BadInput(path, "zero-byte mask")
        with Image.open(path) as im:
            return binarise(im)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
        raise BadInput(path, f"not a decodable mask: {e}") from e


def _first_file(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for s in suffixes:
        p = folder / f"{stem}{s}"
        if p.is_file():
            return p
    return None


def _image_stems(folder: Path) -> list[str]:
    """Stems of the JPEG files directly in `folder` (sorted, each once)."""
    with os.scandir(folder) as it:
        return sorted({os.path.splitext(e.name)[0] for e in it
                       if os.path.splitext(e.name)[1] in IMAGE_SUFFIXES and e.is_file()})


def _duts_dirs(root: Path) -> tuple[Path, Path] | None:
    """DUTS's own image and mask folders in `root` (``<root name>-Image``/``-Mask``, else the only ``*-Image``
    folder that has a ``*-Mask`` sibling), or None."""
    img, msk = root / f"{root.name}-Image", root / f"{root.name}-Mask"
    if img.is_dir() and msk.is_dir():
        return img, msk
    pairs = [(p, root / f"{p.name[:-len('-Image')]}-Mask") for p in root.glob("*-Image") if p.is_dir()]
    pairs = [(i, m) for i, m in pairs if m.is_dir()]
    return pairs[0] if len(pairs) == 1 else None


class StaticReader(Reader):
    """One static image set: `video_names()` the sorted image ids, `videos(names)` their checked records."""

    name = ""
    auto_layout = "pairs"  # what "auto" means when the folder does not look like DUTS's own layout

    def __init__(self, root, layout: str = "auto"):
        super().__init__(root)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown static layout {layout!r}; expected one of {LAYOUTS}")
        if not self.root.is_dir():
            raise BadInput(self.root, "static image folder missing")
        auto_duts = layout == "auto" and self.auto_layout != "fss"
        duts = _duts_dirs(self.root) if layout == "duts" or auto_duts else None
        if layout == "auto":
            layout = "duts" if duts else self.auto_layout
        if layout == "duts":
            if duts is None:
                raise BadInput(self.root / f"{self.root.name}-Image",
                               f"DUTS layout: no {self.root.name}-Image and {self.root.name}-Mask folders")
            self.image_dir, self.mask_dir = duts
        else:
            self.image_dir = self.mask_dir = self.root
        self.layout = layout

    def video_names(self) -> list[str]:
        if self.layout == "fss":
            with os.scandir(self.image_dir) as it:
                classes = sorted(e.name for e in it if e.is_dir())
            return sorted(f"{c}/{s}" for c in classes for s in _image_stems(self.image_dir / c))
        return _image_stems(self.image_dir)

    def _paths(self, image_id: str) -> tuple[Path | None, Path | None, Path, Path]:
        """(image file or None, mask file or None, expected image path, expected mask path) of an image id."""
        folder, _, stem = image_id.rpartition("/")
        img_dir, msk_dir = self.image_dir / folder, self.mask_dir / folder
        return (_first_file(img_dir, stem, IMAGE_SUFFIXES), _first_file(msk_dir, stem, MASK_SUFFIXES),
                img_dir / f"{stem}.jpg", msk_dir / f"{stem}.png")

    def _check(self, image_id: str) -> Video:
        """The record of one image id; BadInput when its pair is unusable."""
        jpg, png, want_jpg, want_png = self._paths(image_id)
        if jpg is None:
            raise BadInput(want_jpg, "image missing")
        if png is None:
            raise BadInput(jpg, f"mask missing: no {want_png.name} for image {jpg}")
        if jpg.stat().st_size == 0:
            raise BadInput(jpg, "zero-byte image")
        if png.stat().st_size == 0:
            raise BadInput(png, "zero-byte mask")
        try:
            with Image.open(jpg) as im:  # lazy: the header only
                size = im.size
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
            raise BadInput(jpg, f"not a decodable image: {e}") from e
        try:
            with Image.open(png) as im:
                if im.size != size:
                    raise BadInput(png, f"mask size {im.size[0]}x{im.size[1]} differs from the image size "
                                        f"{size[0]}x{size[1]} ({jpg.name})")
                mask = binarise(im)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
            raise BadInput(png, f"not a decodable mask: {e}") from e
        if not mask.any():
            raise BadInput(png, "empty mask: no pixel >= 128")
        meta = {"image": jpg.relative_to(self.root).as_posix(), "mask": png.relative_to(self.root).as_posix()}
        return Video(self.name, image_id, [image_id.rpartition("/")[2]], [True], {0: [1]}, meta)

    def videos(self, names: list[str] | None = None) -> list[Video]:
        """The named images (all by default) whose pairs pass the checks; the others go to `problems`."""
        names = self.video_names() if names is None else names
        out = []
        for image_id in names:
            try:
                out.append(self._check(image_id))
            except BadInput as e:
                self.problems.append({"file": e.file, "reason": e.reason, "video": image_id})
            except OSError as e:
                self.problems.append({"file": str(self.image_dir / image_id), "reason": f"unreadable: {e}",
                                      "video": image_id})
        return out

    @staticmethod
    def _only_frame(video: Video, frame_idx: int) -> None:
        if frame_idx not in (0, -1):
            raise IndexError(f"{video.dataset} {video.video}: a static image has one frame, "
                             f"asked for {frame_idx}")

    def read_image(self, video: Video, frame_idx: int) -> np.ndarray:
        self._only_frame(video, frame_idx)
        return read_jpeg(self.root / video.meta["image"])

    def read_mask(self, video: Video, frame_idx: int) -> np.ndarray:
        self._only_frame(video, frame_idx)
        return read_binary_mask(self.root / video.meta["mask"])


class FssReader(StaticReader):
    name = "fss"
    auto_layout = "fss"


class DutsTrReader(StaticReader):
    name = "duts_tr"


class DutsTeReader(StaticReader):
    name = "duts_te"


class EcssdReader(StaticReader):
    name = "ecssd"


class BigReader(StaticReader):
    name = "big"


class HrsodReader(StaticReader):
    name = "hrsod"


STATIC_READERS = {r.name: r for r in (FssReader, DutsTrReader, DutsTeReader, EcssdReader, BigReader,
                                       HrsodReader)}
STATIC_DATASETS = tuple(STATIC_FOLDERS)
