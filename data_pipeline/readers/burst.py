"""BURST: train/all_classes.json + frames/train/<dataset>/<seq>/<frame>.jpg; track ids remapped to uint8 1..n."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from .base import BadInput, Reader, Video, read_jpeg


class BurstReader(Reader):
    name = "burst"

    def __init__(self, root, split: str = "train", annotations: str | None = None, keep_non_gt: bool = True):
        """`annotations`: the JSON relative to root (default `<split>/all_classes.json`; `train/train.json` also
        works); `keep_non_gt`: keep masks marked `is_gt: false` (Cutie keeps them)."""
        super().__init__(root)
        self.ann_path = self.root / (annotations or f"{split}/all_classes.json")
        self.frame_dir = self.root / "frames" / split
        self.keep_non_gt = keep_non_gt

    def videos(self) -> list[Video]:
        try:
            data = json.loads(self.ann_path.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(self.ann_path, f"unreadable annotation JSON: {e}") from e
        out = []
        for s in data.get("sequences", []):
            names = s.get("all_image_paths") or s["annotated_image_paths"]
            frames = [n.rsplit(".", 1)[0] for n in names]
            pos = {n: i for i, n in enumerate(names)}
            if not self.keep_non_gt:
                s["segmentations"] = [{t: v for t, v in seg.items() if v.get("is_gt", True)}
                                      for seg in s["segmentations"]]
            tracks = sorted({int(t) for seg in s["segmentations"] for t in seg})
            if len(tracks) > 255:
                self.problems.append({"file": str(self.ann_path), "reason": f"{s['seq_name']}: > 255 tracks"})
                continue
            seq_dir = self.frame_dir / s["dataset"] / s["seq_name"]
            missing = [n for n in s["annotated_image_paths"] if not (seq_dir / n).is_file()]
            if missing:
                self.problems.append({"file": str(seq_dir / missing[0]), "video": s["seq_name"],
                                      "reason": "annotated image named in the JSON is missing"})
                continue
            remap = {t: k for k, t in enumerate(tracks, start=1)}
            ann = [False] * len(frames)
            ids, segs = {}, {}
            for n, seg in zip(s["annotated_image_paths"], s["segmentations"], strict=True):
                i = pos[n]
                ann[i] = True
                ids[i] = sorted(remap[int(t)] for t in seg)
                segs[i] = {remap[int(t)]: v["rle"] for t, v in seg.items()}
            out.append(Video(self.name, f"{s['dataset']}/{s['seq_name']}", frames, ann, ids,
                             meta={"names": names, "segs": segs, "hw": (int(s["height"]), int(s["width"])),
                                   "dir": f"{s['dataset']}/{s['seq_name']}"}))
        return out

    @staticmethod
    def restrict_meta(meta: dict, indices) -> dict:
        return {"names": [meta["names"][i] for i in indices], "hw": meta["hw"], "dir": meta["dir"],
                "segs": {j: meta["segs"][i] for j, i in enumerate(indices) if i in meta["segs"]}}

    def read_image(self, video: Video, frame_idx: int) -> np.ndarray:
        return read_jpeg(self.frame_dir / video.meta["dir"] / video.meta["names"][frame_idx])

    def read_mask(self, video: Video, frame_idx: int) -> np.ndarray:
        h, w = video.meta["hw"]
        m = np.zeros((h, w), np.uint8)
        for k, rle in video.meta["segs"].get(frame_idx, {}).items():
            m[mask_utils.decode({"size": [h, w], "counts": rle.encode("ascii")}).astype(bool)] = k
        return m
