"""The common Video record (docs/architecture.md section 1) and the reader interface of the five dataset readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def ids_present(mask: np.ndarray) -> list[int]:
    """Sorted non-zero ids of an id map (for uint8, OpenCV's histogram: about 2x faster than np.unique at 720p)."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2 or not mask.size:
        return [int(v) for v in np.unique(mask) if v]
    counts = cv2.calcHist([np.ascontiguousarray(mask)], [0], None, [256], [0, 256]).ravel()
    return [int(v) for v in np.flatnonzero(counts[1:]) + 1]


class BadInput(ValueError):
    """A damaged input file: `file` names it, `reason` says what is wrong."""

    def __init__(self, file: str | Path, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = str(file), reason


@dataclass
class Video:
    dataset: str  # youtubevos|davis|ovis|mose|burst
    video: str
    frames: list[str]  # ordered frame names, no extension
    annotated: list[bool]
    object_ids: dict[int, list[int]]  # annotated frame index -> sorted ids > 0
    meta: dict = field(default_factory=dict, repr=False)  # reader-private (paths, RLEs, sizes)

    @property
    def annotated_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.annotated) if a]

    def restrict(self, indices: list[int] | tuple[int, ...], meta: dict) -> Video:
        """The same video cut down to the frames `indices` (renumbered 0..n-1), with the reader's `meta` for them:
        what a shard task needs for one clip, instead of the whole video's annotations."""
        return Video(self.dataset, self.video, [self.frames[i] for i in indices],
                     [self.annotated[i] for i in indices],
                     {j: self.object_ids[i] for j, i in enumerate(indices) if i in self.object_ids}, meta)


def read_jpeg(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); BadInput on an empty or undecodable file."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise BadInput(path, f"cannot read: {e}") from e
    if not blob:
        raise BadInput(path, "zero-byte image")
    img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(path, "not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_index_png(path: Path) -> np.ndarray:
    """A palette PNG read as its indices (uint8 (H, W)); BadInput when damaged or not single-channel."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise BadInput(path, f"mask mode {im.mode}, expected a palette or grey PNG")
            return np.array(im, dtype=np.uint8)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
        raise BadInput(path, f"not a readable PNG: {e}") from e


class Reader:
    """Base reader: `videos()` lists Video records; `read_image`/`read_mask` load one frame."""

    name = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.problems: list[dict] = []  # {file, reason, video} of inputs skipped while listing

    def videos(self) -> list[Video]:
        raise NotImplementedError

    def video_names(self) -> list[str] | None:
        """Names `videos(names)` can list a part of (so a Ray job lists a large dataset in parallel chunks);
        None where the reader lists everything from one index file in one go (OVIS, BURST)."""
        return None

    def read_image(self, video: Video, frame_idx: int) -> np.ndarray:
        raise NotImplementedError

    def read_mask(self, video: Video, frame_idx: int) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def restrict_meta(meta: dict, indices: list[int] | tuple[int, ...]) -> dict:
        """`Video.meta` for the frames `indices` only (renumbered 0..n-1); readers whose meta holds per-frame data
        (OVIS and BURST annotations) cut it down."""
        return meta


class PngFolderReader(Reader):
    """JPEGImages/<video>/<frame>.jpg + Annotations/<video>/<frame>.png (DAVIS, MOSE, YouTube-VOS train)."""

    def __init__(self, root, image_dir: Path, mask_dir: Path, names: list[str] | None = None):
        super().__init__(root)
        self.image_dir, self.mask_dir, self.names = image_dir, mask_dir, names

    def _ids(self, video: str, frame: str) -> list[int] | None:
        """Object ids of an annotated frame (None if not annotated); reads the mask."""
        p = self.mask_dir / video / f"{frame}.png"
        if not p.is_file():
            return None
        return ids_present(read_index_png(p))

    def video_names(self) -> list[str]:
        if not self.image_dir.is_dir():
            raise BadInput(self.image_dir, "image folder missing")
        return self.names if self.names is not None else sorted(p.name for p in self.image_dir.iterdir()
                                                                if p.is_dir())

    def videos(self, names: list[str] | None = None) -> list[Video]:
        """The named videos (all by default), reading every mask for its object ids; bad videos go to `problems`."""
        names = self.video_names() if names is None else names
        out = []
        for v in names:
            frames = sorted(p.stem for p in (self.image_dir / v).glob("*.jpg"))
            if not self.check_files(v, frames):
                continue
            try:
                ids = {i: got for i, f in enumerate(frames) if (got := self._ids(v, f)) is not None}
            except BadInput as e:
                self.problems.append({"file": e.file, "reason": e.reason, "video": v})
                continue
            out.append(Video(self.name, v, frames, [i in ids for i in range(len(frames))], ids))
        return out

    def check_files(self, video: str, frames: list[str]) -> bool:
        """Cheap header checks of a video's files (zero-byte JPEG, mask size differing from the frame size); a
        damaged video is recorded in `problems` and dropped."""
        size = None
        for f in frames:
            jpg, png = self.image_dir / video / f"{f}.jpg", self.mask_dir / video / f"{f}.png"
            try:
                if jpg.stat().st_size == 0:
                    raise BadInput(jpg, f"zero-byte image (video {video}, frame {f})")
                with Image.open(jpg) as im:
                    size = size or im.size
                    if im.size != size:
                        raise BadInput(jpg, f"frame size {im.size} differs from the video's {size} (video {video})")
                if png.is_file():
                    with Image.open(png) as im:
                        if im.size != size:
                            raise BadInput(png, f"mask size {im.size} differs from the frame size {size} "
                                                f"(video {video}, frame {f})")
            except BadInput as e:
                self.problems.append({"file": e.file, "reason": e.reason, "video": video})
                return False
            except Exception as e:  # noqa: BLE001 - undecodable header
                self.problems.append({"file": str(jpg), "reason": f"unreadable: {e}", "video": video})
                return False
        return True

    def read_image(self, video: Video, frame_idx: int) -> np.ndarray:
        return read_jpeg(self.image_dir / video.video / f"{video.frames[frame_idx]}.jpg")

    def read_mask(self, video: Video, frame_idx: int) -> np.ndarray:
        return read_index_png(self.mask_dir / video.video / f"{video.frames[frame_idx]}.png")
