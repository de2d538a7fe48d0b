"""Clip plans: which 8 annotated frames of which video go into each training clip (Cutie's sampling rules).

- per-dataset frame interval divides the curriculum's max skip (DAVIS 2, OVIS 3, YouTube-VOS/MOSE/BURST 5: the
  stored frames of those are already that far apart);
- the first frame is drawn anywhere, then each further frame from the union of ±skip windows around the frames
  already taken (the window grows with the clip); frames are stored in time order (the loader reverses);
- the first frame must hold at least one object; videos with fewer than 8 annotated frames are dropped;
- the dataset mixture is proportional to annotated frames × multiplier (DAVIS ×2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .readers.base import Video

FRAME_INTERVAL = {"davis": 2, "youtubevos": 5, "mose": 5, "burst": 5, "ovis": 3}
MULTIPLIER = {"davis": 2.0, "youtubevos": 1.0, "mose": 1.0, "burst": 1.0, "ovis": 1.0}
LEVELS = {"skip05": 5, "skip10": 10, "skip15": 15}
NUM_FRAMES = 8


@dataclass(frozen=True)
class ClipPlan:
    dataset: str
    video: str
    frame_indices: tuple[int, ...]  # indices into Video.frames
    max_skip: int
    level: str
    index: int  # clip number within (dataset, video, level)

    @property
    def key(self) -> str:
        return f"{self.dataset}_{self.video}_{self.level}_{self.index}".replace(".", "-").replace("/", "-")


def usable(video: Video, num_frames: int = NUM_FRAMES) -> bool:
    return sum(bool(a) for a in video.annotated) >= num_frames


def effective_skip(dataset: str, max_skip: int) -> int:
    return max(1, max_skip // FRAME_INTERVAL[dataset])


def stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def sample_clip(video: Video, max_skip: int, rng: np.random.Generator, num_frames: int = NUM_FRAMES,
                tries: int = 20) -> tuple[int, ...] | None:
    """Frame indices (into video.frames) of one clip, or None when no try gives a non-empty first frame."""
    ann = video.annotated_indices
    n = len(ann)
    if n < num_frames:
        return None
    skip = effective_skip(video.dataset, max_skip)
    for _ in range(tries):
        taken = [int(rng.integers(n))]
        pool = set(range(max(0, taken[0] - skip), min(n, taken[0] + skip + 1))) - set(taken)
        while len(taken) < num_frames:
            if not pool:  # window exhausted (short video): widen to all remaining frames
                pool = set(range(n)) - set(taken)
            pick = int(rng.choice(sorted(pool)))
            taken.append(pick)
            pool |= set(range(max(0, pick - skip), min(n, pick + skip + 1)))
            pool -= set(taken)
        taken.sort()  # time reversal is the training loader's job, not the stored clip's
        frames = tuple(ann[i] for i in taken)
        if video.object_ids.get(frames[0]):
            return frames
    return None


def mixture_weights(videos: dict[str, list[Video]]) -> dict[str, float]:
    raw = {d: MULTIPLIER.get(d, 1.0) * sum(sum(bool(a) for a in v.annotated) for v in vs if usable(v))
           for d, vs in videos.items()}
    total = sum(raw.values()) or 1.0
    return {d: r / total for d, r in raw.items()}


def plan_clips(videos: dict[str, list[Video]], clips_per_level: int, levels: dict[str, int] | None = None,
               seed: int = 0) -> dict[str, list[ClipPlan]]:
    """Per level, about `clips_per_level` clips spread over datasets by the mixture weights and evenly over each
    dataset's usable videos. Deterministic in (seed, dataset, video, level, index)."""
    levels = levels or LEVELS
    weights = mixture_weights(videos)
    out: dict[str, list[ClipPlan]] = {}
    for level, max_skip in levels.items():
        plans = []
        for d in sorted(videos):
            vs = sorted((v for v in videos[d] if usable(v)), key=lambda v: v.video)
            if not vs:
                continue
            want = max(len(vs), round(clips_per_level * weights[d]))
            for j in range(want):
                v = vs[j % len(vs)]
                idx = j // len(vs)
                rng = np.random.default_rng(stable_seed(seed, d, v.video, level, idx))
                frames = sample_clip(v, max_skip, rng)
                if frames is not None:
                    plans.append(ClipPlan(d, v.video, frames, max_skip, level, idx))
        out[level] = sorted(plans, key=lambda p: p.key)
    return out
