"""OVIS: train/<video>/img_XXXXXXX.jpg + annotations/annotations_train.json (COCO-style video RLE, null entries)."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from .base import BadInput, Reader, Video, read_jpeg


def decode_rle(seg: dict, h: int, w: int, where: str) -> np.ndarray:
    """Compressed string or uncompressed count-list RLE → bool (h, w); BadInput if its size disagrees."""
    if isinstance(seg, list):  # polygons
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
    size = list(seg.get("size", []))
    if size != [h, w]:
        raise BadInput(where, f"RLE size {size} differs from the frame size {[h, w]}")
    counts = seg["counts"]
    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(counts, list) else \
        {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


class OvisReader(Reader):
    name = "ovis"

    def __init__(self, root, split: str = "train", keep_crowd: bool = True):
        """`keep_crowd`: keep tracks marked `iscrowd: 1` as objects (OVIS has few; Cutie's conversion keeps them)."""
        super().__init__(root)
        self.keep_crowd = keep_crowd
        self.image_dir = self.root / split
        self.ann_path = self.root / "annotations" / f"annotations_{split}.json"

    def videos(self) -> list[Video]:
        try:
            data = json.loads(self.ann_path.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(self.ann_path, f"unreadable annotation JSON: {e}") from e
        anns: dict[int, list[dict]] = {}
        for a in data.get("annotations", []):
            anns.setdefault(a["video_id"], []).append(a)
        out = []
        for v in data.get("videos", []):
            files = v["file_names"]
            name = files[0].split("/")[0]
            tracks = sorted(anns.get(v["id"], []), key=lambda a: a["id"])
            if not self.keep_crowd:
                tracks = [t for t in tracks if not t.get("iscrowd", 0)]
            if len(tracks) > 255:
                self.problems.append({"file": str(self.ann_path), "video": name,
                                      "reason": f"video {name}: {len(tracks)} tracks do not fit a uint8 id mask"})
                continue
            h, w = int(v["height"]), int(v["width"])
            bad = [t for t in tracks for s in t["segmentations"]
                   if s and isinstance(s, dict) and list(s.get("size", [])) != [h, w]]
            missing = [f for f in files if not (self.image_dir / f).is_file() or not (self.image_dir / f).stat().st_size]
            if missing:
                self.problems.append({"file": str(self.image_dir / missing[0]), "video": name,
                                      "reason": f"image named in {self.ann_path.name} is missing or empty"})
                continue
            if bad:
                self.problems.append({"file": str(self.ann_path), "video": name,
                                      "reason": f"video {name}: an RLE size differs from the frame size {[h, w]}"})
                continue
            ids = {}
            for i in range(len(files)):
                ids[i] = [k for k, t in enumerate(tracks, start=1) if t["segmentations"][i]]
            frames = [f.rsplit(".", 1)[0].split("/", 1)[1] for f in files]
            out.append(Video(self.name, name, frames, [True] * len(files), ids,
                             meta={"files": files, "tracks": [t["segmentations"] for t in tracks], "hw": (h, w)}))
        return out

    @staticmethod
    def restrict_meta(meta: dict, indices) -> dict:
        return {"files": [meta["files"][i] for i in indices], "hw": meta["hw"],
                "tracks": [[segs[i] for i in indices] for segs in meta["tracks"]]}

    def read_image(self, video: Video, frame_idx: int) -> np.ndarray:
        return read_jpeg(self.image_dir / video.meta["files"][frame_idx])

    def read_mask(self, video: Video, frame_idx: int) -> np.ndarray:
        h, w = video.meta["hw"]
        m = np.zeros((h, w), np.uint8)
        for k, segs in enumerate(video.meta["tracks"], start=1):
            if segs[frame_idx]:
                m[decode_rle(segs[frame_idx], h, w, f"{self.ann_path} video {video.video}")] = k
        return m
