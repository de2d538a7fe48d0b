"""Benchmark formats, one small module each (as data_pipeline/readers/ does for the training sets): how a split
is read into `Sequence`s, which frames are given, written and scored, and the submission layout.
`presets` holds the named evaluation presets (Cutie's and S3's settings per benchmark)."""

from training.formats.base import DAVIS_PALETTE, VOID, Sequence, prepare_out, read_mask, write_png

__all__ = ["DAVIS_PALETTE", "VOID", "Sequence", "prepare_out", "read_mask", "write_png"]
