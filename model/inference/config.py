"""Inference settings (s3-model-spec section 6). Defaults: Cutie/S3 d17-val (480p, mem_every 5, top-k 30, stagger 5,
5 working-memory frames, no long-term memory); the long-term numbers are Cutie's (10/5/128/10000/2000); S3's
release uses 25/15/128/30000/3000 (see `S3_LONG_TERM`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class InferenceConfig:
    size: int = 480  # short side above which frames are resized down to it (Cutie's rule); <= 0 never resizes
    flip: bool = False  # horizontal-flip test-time augmentation (S3's eval_config: True)
    mem_every: int = 5
    top_k: int = 30
    stagger_updates: int = 5
    max_mem_frames: int = 5  # working memory frames including the permanent first frame
    use_long_term: bool = False
    long_max_mem_frames: int = 10
    long_min_mem_frames: int = 5
    num_prototypes: int = 128
    max_num_tokens: int = 10000
    buffer_tokens: int = 2000
    pad_to: int = 16  # centred padding multiple: Cutie 16, S3's release 32 (and never below the network's)
    chunk_size: int = -1  # objects processed together; -1 = all
    amp: bool = False  # bf16 autocast, only ever on CUDA (Cutie and S3 evaluate in fp32: `amp: False`)

    def __post_init__(self) -> None:
        for name in ("mem_every", "top_k", "stagger_updates", "max_mem_frames", "pad_to"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"inference config: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.use_long_term:
            if not 1 <= self.long_min_mem_frames < self.long_max_mem_frames:
                raise ValueError("inference config: need 1 <= long_min_mem_frames < long_max_mem_frames, got "
                                 f"{self.long_min_mem_frames}, {self.long_max_mem_frames}")
            if self.max_num_tokens <= self.num_prototypes + self.buffer_tokens:
                raise ValueError("inference config: max_num_tokens must exceed num_prototypes + buffer_tokens")

    @classmethod
    def from_any(cls, cfg: Any = None, **overrides: Any) -> InferenceConfig:
        """An InferenceConfig, a dict, or a model config carrying an `inference` section (dict or object)."""
        if cfg is None:
            base: dict[str, Any] = {}
        elif isinstance(cfg, InferenceConfig):
            base = dataclasses.asdict(cfg)
        elif isinstance(cfg, dict):
            base = dict(cfg.get("inference", cfg))
        else:
            section = getattr(cfg, "inference", None)
            if section is None:
                base = {}
            elif isinstance(section, dict):
                base = dict(section)
            elif dataclasses.is_dataclass(section):
                base = dataclasses.asdict(section)
            else:
                base = dict(vars(section))
        base = _from_cutie_names(base)
        base.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise ValueError(f"inference config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**base)


_CUTIE_LONG_TERM = {"max_mem_frames": "long_max_mem_frames", "min_mem_frames": "long_min_mem_frames",
                    "num_prototypes": "num_prototypes", "max_num_tokens": "max_num_tokens",
                    "buffer_tokens": "buffer_tokens"}


def _from_cutie_names(d: dict[str, Any]) -> dict[str, Any]:
    """Accept Cutie/S3 eval_config spellings: `flip_aug`, and a nested `long_term:` section."""
    d = dict(d)
    if "flip_aug" in d:
        d["flip"] = d.pop("flip_aug")
    lt = d.pop("long_term", None)
    if lt is not None:
        lt = dict(lt) if isinstance(lt, dict) else dict(vars(lt))
        lt.pop("count_usage", None)  # usage is always counted here
        for k, v in lt.items():
            if k not in _CUTIE_LONG_TERM:
                raise ValueError(f"inference config: unknown key long_term.{k}; known: {sorted(_CUTIE_LONG_TERM)}")
            d[_CUTIE_LONG_TERM[k]] = v
    return d


S3_LONG_TERM = {"use_long_term": True, "long_max_mem_frames": 25, "long_min_mem_frames": 15, "num_prototypes": 128,
                "max_num_tokens": 30000, "buffer_tokens": 3000}
