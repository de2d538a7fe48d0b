"""YouTube-VOS 2019 train: train/JPEGImages/<video>/<00005>.jpg, train/Annotations/..., train/meta.json."""

from __future__ import annotations

import json
from pathlib import Path

from .base import BadInput, PngFolderReader, Video


class YouTubeVOSReader(PngFolderReader):
    name = "youtubevos"

    def __init__(self, root, split: str = "train"):
        base = Path(root) / split
        super().__init__(root, base / "JPEGImages", base / "Annotations")
        self.meta_path = base / "meta.json"

    def videos(self) -> list[Video]:
        """Object ids come from meta.json (no mask reads); frames without a PNG are not annotated."""
        try:
            meta = json.loads(self.meta_path.read_text())["videos"]
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(self.meta_path, f"unreadable meta.json: {e}") from e
        out = []
        for v in sorted(meta):
            frames = sorted(p.stem for p in (self.image_dir / v).glob("*.jpg"))
            pngs = {p.stem for p in (self.mask_dir / v).glob("*.png")}
            per = {}
            for k, obj in meta[v].get("objects", {}).items():
                for f in obj.get("frames", []):
                    per.setdefault(f, set()).add(int(k))
            ann = [f in pngs for f in frames]
            ids = {i: sorted(per.get(f, ())) for i, f in enumerate(frames) if ann[i]}
            out.append(Video(self.name, v, frames, ann, ids))
        return out
