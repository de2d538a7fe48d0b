"""MOSE: train/JPEGImages/<video>/<frame>.jpg, train/Annotations/<video>/<frame>.png."""

from __future__ import annotations

from pathlib import Path

from .base import PngFolderReader


class MoseReader(PngFolderReader):
    name = "mose"

    def __init__(self, root, split: str = "train"):
        base = Path(root) / split
        super().__init__(root, base / "JPEGImages", base / "Annotations")
