"""DAVIS 2017: JPEGImages/480p/<seq>, Annotations/480p/<seq>, ImageSets/2017/<split>.txt."""

from __future__ import annotations

from pathlib import Path

from .base import BadInput, PngFolderReader


class DavisReader(PngFolderReader):
    name = "davis"

    def __init__(self, root, split: str = "train", resolution: str = "480p"):
        root = Path(root)
        lst = root / "ImageSets" / "2017" / f"{split}.txt"
        if not lst.is_file():
            raise BadInput(lst, "split list missing")
        names = [s.strip() for s in lst.read_text().splitlines() if s.strip()]
        super().__init__(root, root / "JPEGImages" / resolution, root / "Annotations" / resolution, names)
