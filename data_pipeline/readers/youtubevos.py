"""YouTube-VOS 2019 train: train/JPEGImages/<video>/<00005>.jpg, train/Annotations/<video>/<00005>.png.

meta.json is optional and never trusted over the PNGs: object ids come from the masks themselves; frame numbering
may start above 00000 (names are kept as they are).
"""

from __future__ import annotations

from pathlib import Path

from .base import PngFolderReader


class YouTubeVOSReader(PngFolderReader):
    name = "youtubevos"

    def __init__(self, root, split: str = "train"):
        base = Path(root) / split
        super().__init__(root, base / "JPEGImages", base / "Annotations")
