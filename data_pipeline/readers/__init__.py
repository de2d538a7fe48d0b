"""Native-format readers of the five training video datasets and of the static image sets of Cutie's stage-0
pre-training (`static.py`), all producing the common `Video` record."""

from __future__ import annotations

from pathlib import Path

from .base import BadInput, Reader, Video
from .burst import BurstReader
from .davis import DavisReader
from .mose import MoseReader
from .ovis import OvisReader
from .static import STATIC_DATASETS, STATIC_FOLDERS, STATIC_MULTIPLIER, STATIC_READERS, StaticReader
from .youtubevos import YouTubeVOSReader

READERS = {"youtubevos": YouTubeVOSReader, "davis": DavisReader, "ovis": OvisReader, "mose": MoseReader,
           "burst": BurstReader, **STATIC_READERS}
FOLDERS = {"youtubevos": "YouTubeVOS", "davis": "DAVIS", "ovis": "OVIS", "mose": "MOSE", "burst": "BURST"}


def build_reader(dataset: str, root: str | Path, **kw) -> Reader:
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(READERS)}")
    return READERS[dataset](root, **kw)


__all__ = ["BadInput", "Reader", "Video", "READERS", "FOLDERS", "build_reader", "StaticReader",
           "STATIC_DATASETS", "STATIC_FOLDERS", "STATIC_MULTIPLIER"]
