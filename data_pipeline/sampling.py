"""Clip plans: which 8 annotated frames of which video go into each training clip (Cutie's sampling rules).

- per-dataset frame interval divides the curriculum's max skip (DAVIS 2, OVIS 3, YouTube-VOS/MOSE/BURST 5: the
  stored frames of those are already that far apart);
- the first frame is drawn anywhere, then each further frame from the union of ±skip windows around the frames
  already taken (the window grows with the clip); frames are stored in time order (the loader reverses);
- the first frame must hold at least one object; videos with fewer than 8 annotated frames are dropped;
- Cutie's frame-level weighting: Cutie draws a seed frame uniformly from every (video, frame) pair of the mixture
  (DAVIS listed twice), so a *video's* share is its annotated frames × the dataset multiplier. The plan gives each
  video that share of each level's clips by systematic sampling along the cumulative weights (every video gets
  the floor or the ceiling of its quota, every dataset within one clip of its share);
- the plan is then shuffled (seeded) so that cutting it into shards gives shards mixing datasets and videos in the
  mixture's proportions, not one dataset per shard.

Stage 0 (static images, `plan_images`): every image of every set `multiplier` times (Cutie concatenates each set's
image list `multiplier` times: BIG and HRSOD x5), shuffled the same way, as one level `static`.
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
STATIC_LEVEL = "static"  # the one shard level of a static-image (stage-0) job
KINDS = ("video", "static")  # what a shard job writes and a training loader reads: clips, or static images


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
            pick = sorted(pool)[int(rng.integers(len(pool)))]  # = rng.choice(sorted(pool)), without its overhead
            taken.append(pick)
            pool |= set(range(max(0, pick - skip), min(n, pick + skip + 1)))
            pool -= set(taken)
        taken.sort()  # time reversal is the training loader's job, not the stored clip's
        frames = tuple(ann[i] for i in taken)
        if video.object_ids.get(frames[0]):
            return frames
    return None


def video_weight(video: Video) -> float:
    """Cutie's seed-frame weight of one video: annotated frames × the dataset multiplier, 0 when unusable."""
    if not usable(video):
        return 0.0
    return MULTIPLIER.get(video.dataset, 1.0) * sum(bool(a) for a in video.annotated)


def mixture_weights(videos: dict[str, list[Video]]) -> dict[str, float]:
    """Each dataset's share of Cutie's mixture: its usable videos' annotated frames × multiplier, normalised."""
    raw = {d: sum(video_weight(v) for v in vs) for d, vs in videos.items()}
    total = sum(raw.values()) or 1.0
    return {d: r / total for d, r in raw.items()}


def level_counts(clips_per_level: int | dict[str, int], levels: dict[str, int]) -> dict[str, int]:
    """Clips wanted per level: one number for all levels, or a number per level name."""
    if isinstance(clips_per_level, dict):
        missing = set(levels) - set(clips_per_level)
        if missing:
            raise ValueError(f"clips_per_level has no count for level(s) {sorted(missing)}")
        return {lv: int(clips_per_level[lv]) for lv in levels}
    return {lv: int(clips_per_level) for lv in levels}


def allocate(weights: list[float], n: int, offset: float) -> list[int]:
    """Systematic sampling: `n` draws at positions (j + offset) / n along the cumulative weights; item k gets the
    draws that land in its interval, i.e. floor or ceil of n·w_k/W, and any run of consecutive items (a dataset)
    is within one draw of its quota."""
    total = float(sum(weights))
    counts = [0] * len(weights)
    if n <= 0 or total <= 0:
        return counts
    cum = np.cumsum(np.asarray(weights, np.float64)) / total
    pos = (np.arange(n) + offset) / n
    for k in np.searchsorted(cum, pos, side="right"):
        counts[min(int(k), len(weights) - 1)] += 1
    return counts


def plan_clips(videos: dict[str, list[Video]], clips_per_level: int | dict[str, int],
               levels: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[ClipPlan]]:
    """Per level, `clips_per_level` clips (or fewer, where a video gives no clip with an object in its first frame)
    spread over the usable videos of all datasets by Cutie's frame-level weights, in a seeded shuffled order.
    Deterministic in (seed, dataset, video, level, index)."""
    levels = levels or LEVELS
    wanted = level_counts(clips_per_level, levels)
    pool = [v for d in sorted(videos) for v in sorted(videos[d], key=lambda v: v.video) if usable(v)]
    weights = [video_weight(v) for v in pool]
    out: dict[str, list[ClipPlan]] = {}
    for level, max_skip in levels.items():
        offset = np.random.default_rng(stable_seed(seed, "offset", level)).random()
        plans = []
        for v, n in zip(pool, allocate(weights, wanted[level], offset), strict=True):
            for idx in range(n):
                rng = np.random.default_rng(stable_seed(seed, v.dataset, v.video, level, idx))
                frames = sample_clip(v, max_skip, rng)
                if frames is not None:
                    plans.append(ClipPlan(v.dataset, v.video, frames, max_skip, level, idx))
        plans.sort(key=lambda p: p.key)
        order = np.random.default_rng(stable_seed(seed, "shuffle", level)).permutation(len(plans))
        out[level] = [plans[i] for i in order]
    return out


def plan_images(videos: dict[str, list[Video]], multipliers: dict[str, int], seed: int = 0
                ) -> dict[str, list[ClipPlan]]:
    """Stage 0: one single-frame sample per (image, repeat), each set's images `multipliers[set]` times, in a
    seeded shuffled order: {"static": [ClipPlan, ...]}. `ClipPlan.index` is the repeat; `frame_indices` is (0,)."""
    plans = [ClipPlan(d, v.video, (0,), 0, STATIC_LEVEL, rep)
             for d in sorted(videos) for v in sorted(videos[d], key=lambda v: v.video) if any(v.annotated)
             for rep in range(int(multipliers.get(d, 1)))]
    plans.sort(key=lambda p: p.key)
    order = np.random.default_rng(stable_seed(seed, "shuffle", STATIC_LEVEL)).permutation(len(plans))
    return {STATIC_LEVEL: [plans[i] for i in order]}


def image_weights(videos: dict[str, list[Video]], multipliers: dict[str, int]) -> dict[str, float]:
    """Each static set's share of Cutie's stage-0 mixture: its usable images x its multiplier, normalised."""
    raw = {d: float(sum(1 for v in vs if any(v.annotated)) * int(multipliers.get(d, 1))) for d, vs in videos.items()}
    total = sum(raw.values()) or 1.0
    return {d: r / total for d, r in raw.items()}
