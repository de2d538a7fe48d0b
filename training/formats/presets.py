"""Named evaluation presets: each method's memory settings on top of each benchmark's protocol, in one table.

- `cutie`: Cutie's `config/eval_config.yaml` (hkchengrex/Cutie, ec5cdd4): fp32, no flip, pad 16, top-k 30,
  stagger 5, 5 working-memory frames; long-term memory (10/5/128/10000/2000) only where Cutie's dataset preset
  turns it on (LVOS); mem_every 5. "Plus" sizes (`eval_plus_config.yaml`, any size above 480): 10 working-memory
  frames; DAVIS reads Full-Resolution with 480p output and mem_every 3; MOSE mem_every 3.
- `s3`: the S3 release's `s3/config/eval_config.yaml` (yahooo-m/S3, eedf595) memory settings: flip test-time
  augmentation, long-term memory on with its numbers 25/15/128/30000/3000, pad 32; LVOS at size 600. The release's
  file also overrides *every* dataset with `size: 720, mem_every: 10, use_all_masks: True` (one long-video run,
  eval-protocols.md section 2); that would feed all DAVIS ground truth as input, so the per-dataset protocol is kept
  here and those two numbers are reachable with `--size 720 --mem-every 10`.
  Known difference kept out: the release's inference core still indexes a re-annotated known object the
  pre-Dec-2023 Cutie way; that only matters when a later mask re-annotates a tracked object, which none of the
  benchmarks do.

Command-line values override the table; the resolved settings are printed and written into the results.
"""

from __future__ import annotations

from typing import Any

from model.inference import InferenceConfig

PRESETS = ("cutie", "s3")
FORMATS = ("davis", "youtubevos", "mose", "lvos")

_MEMORY: dict[str, dict[str, Any]] = {
    "cutie": {"flip": False, "amp": False, "pad_to": 16, "top_k": 30, "stagger_updates": 5, "max_mem_frames": 5,
              "chunk_size": -1, "long_max_mem_frames": 10, "long_min_mem_frames": 5, "num_prototypes": 128,
              "max_num_tokens": 10000, "buffer_tokens": 2000},
    "s3": {"flip": True, "amp": False, "pad_to": 32, "top_k": 30, "stagger_updates": 5, "max_mem_frames": 5,
           "chunk_size": -1, "use_long_term": True, "long_max_mem_frames": 25, "long_min_mem_frames": 15,
           "num_prototypes": 128, "max_num_tokens": 30000, "buffer_tokens": 3000},
}
# Cutie's per-dataset presets: default size, long-term memory, mem_every; then what its plus config changes
_BENCHMARK: dict[str, dict[str, Any]] = {
    "davis": {"size": 480, "use_long_term": False, "mem_every": 5},
    "youtubevos": {"size": 480, "use_long_term": False, "mem_every": 5},
    "mose": {"size": 480, "use_long_term": False, "mem_every": 5},
    "lvos": {"size": 480, "use_long_term": True, "mem_every": 5},
}
_PLUS: dict[str, dict[str, Any]] = {
    "davis": {"max_mem_frames": 10, "mem_every": 3, "resolution": "Full-Resolution"},
    "youtubevos": {"max_mem_frames": 10},
    "mose": {"max_mem_frames": 10, "mem_every": 3},
    "lvos": {},  # Cutie's plus config leaves LVOS unchanged
}
_PRESET_SIZE = {("s3", "lvos"): 600}


def default_preset(model_name: str | None) -> str:
    return "s3" if str(model_name or "").startswith("s3") else "cutie"


def resolve(preset: str, fmt: str, **overrides: Any) -> tuple[InferenceConfig, dict[str, Any]]:
    """→ (InferenceConfig, settings): `settings` is every value used (memory, size, DAVIS resolution, preset),
    for printing and for the results. Overrides that are None are ignored."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    settings: dict[str, Any] = {**_BENCHMARK[fmt], **_MEMORY[preset]}
    settings["size"] = _PRESET_SIZE.get((preset, fmt), settings["size"])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    size = overrides.get("size", settings["size"])
    if size is not None and size > 480:
        settings.update(_PLUS[fmt])
    settings.update(overrides)
    settings.setdefault("resolution", "480p")
    settings["preset"] = preset
    cfg = InferenceConfig(**{k: v for k, v in settings.items() if k not in ("resolution", "preset")})
    return cfg, settings
