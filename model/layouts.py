"""Checkpoint layouts: the parameter names of the official Cutie and S3-release networks, as renames of ours.

Our networks equal the reference networks numerically; only names differ. Each layout is one table of
(our pattern, their pattern) renames applied to whole dotted names, plus the source keys that have no use in our
network. A pattern matches the start of a name at a dot boundary (`key_proj.d_proj` matches
`key_proj.d_proj.weight`, never `key_proj.d_proj2.weight`); `*` stands for any text inside one dotted component
(a block index) and is carried over to the other side. When several rows match, the longest pattern wins. A
name no row matches is the same in both layouts. Tensors are never reshaped or split: every mapped tensor has
the same shape in both layouts.

    cutie       Cutie's own network (`cutie.model.cutie.CUTIE`), as Cutie's trainer saves it; our `cutie_base`.
    s3-release  the official S3 release (github yahooo-m/S3, the network in `s3/model/s3.py`); our `s3`.

`model.convert` applies the tables; `detect_layout` tells a state dict's layout from its names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OURS = "ours"

# Cutie's memory network (everything after the pixel encoder): the same names in Cutie and the S3 release.
_MEMORY_NETWORK: tuple[tuple[str, str], ...] = (
    ("key_proj.shrinkage_proj", "key_proj.d_proj"),
    ("key_proj.selection_proj", "key_proj.e_proj"),
    ("mask_encoder.fuser.x_proj", "mask_encoder.fuser.distributor.x_transform"),
    ("mask_encoder.fuser.g_proj", "mask_encoder.fuser.distributor.g_transform"),
    ("mask_encoder.fuser.block*.channel_conv", "mask_encoder.fuser.block*.conv"),
    ("pixel_fuser.fuser.x_proj", "pixel_fuser.fuser.distributor.x_transform"),
    ("pixel_fuser.fuser.g_proj", "pixel_fuser.fuser.distributor.g_transform"),
    ("pixel_fuser.fuser.block*.channel_conv", "pixel_fuser.fuser.block*.conv"),
    ("object_transformer.blocks.*.self_attn.attn", "object_transformer.blocks.*.self_attn.self_attn"),
    ("object_transformer.blocks.*.read_from_query.attn", "object_transformer.blocks.*.read_from_query.cross_attn"),
    ("object_transformer.blocks.*.pixel_ffn.conv.channel_conv", "object_transformer.blocks.*.pixel_ffn.conv.conv"),
    ("mask_decoder.f8_proj", "mask_decoder.decoder_feat_proc.transforms.0"),  # stride 8 skip (ms_dims[1])
    ("mask_decoder.f4_proj", "mask_decoder.decoder_feat_proc.transforms.1"),  # stride 4 skip (ms_dims[2])
    ("mask_decoder.up_16_8.out_conv.skip", "mask_decoder.up_16_8.out_conv.downsample"),
    ("sensory_aux", "aux_computer.sensory_aux"),
)

# The sinusoidal positional encodings keep a persistent `inv_freq` buffer; ours recompute it (same values).
_INV_FREQ = ("object_transformer.spatial_pe.inv_freq", "object_summarizer.pos_enc.inv_freq")


class _Pattern:
    """A dotted-name prefix with `*` wildcards inside components."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.stars = text.count("*")
        self.length = len(text.split("."))
        parts = [re.escape(part).replace(r"\*", r"([^.]+)") for part in text.split(".")]
        self.regex = re.compile(r"\.".join(parts) + r"(?=\.|$)")

    def match(self, name: str) -> tuple[tuple[str, ...], str] | None:
        """(wildcard values, rest of the name after the prefix) or None."""
        m = self.regex.match(name)
        return (m.groups(), name[m.end():]) if m else None

    def fill(self, values: tuple[str, ...]) -> str:
        it = iter(values)
        return re.sub(r"\*", lambda _: next(it), self.text)


@dataclass(frozen=True)
class Layout:
    """One official checkpoint layout: renames (ours, theirs), the source keys we drop, and detection marks."""

    name: str
    model_config: str  # the config of ours this layout describes (the default for conversion)
    source: str
    renames: tuple[tuple[str, str], ...]
    unused: tuple[str, ...]  # their keys with no use in our network: dropped by --from, absent after --to
    marks: tuple[str, ...]  # their name prefixes found in no other layout (detect_layout)
    _rules: tuple[tuple[_Pattern, _Pattern], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = []
        for ours, theirs in self.renames:
            a, b = _Pattern(ours), _Pattern(theirs)
            if a.stars != b.stars:
                raise ValueError(f"layout {self.name}: rename {ours!r} -> {theirs!r} has unequal wildcards")
            rules.append((a, b))
        object.__setattr__(self, "_rules", tuple(rules))

    def _rename(self, name: str, side: int) -> str:
        best: tuple[int, str] | None = None
        for rule in self._rules:
            src, dst = rule[side], rule[1 - side]
            hit = src.match(name)
            if hit is None:
                continue
            if best is not None and best[0] == src.length:
                raise ValueError(f"layout {self.name}: two renames of equal length match {name!r}")
            if best is None or src.length > best[0]:
                best = (src.length, dst.fill(hit[0]) + hit[1])
        return name if best is None else best[1]

    def to_ours(self, name: str) -> str:
        """Their name → ours."""
        return self._rename(name, 1)

    def to_theirs(self, name: str) -> str:
        """Our name → theirs."""
        return self._rename(name, 0)

    def our_patterns(self) -> list[_Pattern]:
        return [rule[0] for rule in self._rules]

    def their_patterns(self) -> list[_Pattern]:
        return [rule[1] for rule in self._rules]


CUTIE = Layout(
    name="cutie",
    model_config="cutie_base",
    source="Cutie's network cutie.model.cutie.CUTIE (Cutie's trainer: a plain state dict, or one under "
    "`weights` / `network` / `model` / `state_dict`)",
    renames=(
        ("pixel_encoder.layer1", "pixel_encoder.res2"),  # Cutie's ResNet-50 names layer1 `res2`
        # Cutie's queries read the pixels by masked cross-attention; S3's discriminative queries (`DQ_CA`:
        # alpha, norm, proj, final) have the same names in both layouts
        ("object_transformer.blocks.*.read_from_pixel.attn", "object_transformer.blocks.*.read_from_pixel.cross_attn"),
        *_MEMORY_NETWORK,
    ),
    unused=_INV_FREQ,
    marks=("pixel_encoder.res2", "key_proj.d_proj", "key_proj.e_proj", "aux_computer",
           "mask_decoder.decoder_feat_proc"),
)

S3_RELEASE = Layout(
    name="s3-release",
    model_config="s3",
    source="the official S3 release (github yahooo-m/S3): DinoV2ViTAdapter as `pixel_encoder` in Cutie's network",
    renames=(
        ("pixel_encoder.vit", "pixel_encoder.vit_module"),
        ("pixel_encoder.spatial_prior", "pixel_encoder.spm"),
        # interaction stage g = ViT block group g: semantic injection (`read_from_cls`, a Cutie-style
        # CrossAttention), then the Extractor; the last stage runs two extra Extractors after it
        ("pixel_encoder.stages.*.semantic.attn", "pixel_encoder.interactions.*.read_from_cls.cross_attn"),
        ("pixel_encoder.stages.*.semantic.norm", "pixel_encoder.interactions.*.read_from_cls.norm"),
        ("pixel_encoder.stages.*.spatial.0", "pixel_encoder.interactions.*.extractor"),
        ("pixel_encoder.stages.*.spatial.0.value_norm", "pixel_encoder.interactions.*.extractor.feat_norm"),
        ("pixel_encoder.stages.*.spatial.0.ffn.dwconv.conv", "pixel_encoder.interactions.*.extractor.ffn.dwconv.dwconv"),
        ("pixel_encoder.stages.3.spatial.1", "pixel_encoder.interactions.3.extra_extractors.0"),
        ("pixel_encoder.stages.3.spatial.1.value_norm", "pixel_encoder.interactions.3.extra_extractors.0.feat_norm"),
        ("pixel_encoder.stages.3.spatial.1.ffn.dwconv.conv",
         "pixel_encoder.interactions.3.extra_extractors.0.ffn.dwconv.dwconv"),
        ("pixel_encoder.stages.3.spatial.2", "pixel_encoder.interactions.3.extra_extractors.1"),
        ("pixel_encoder.stages.3.spatial.2.value_norm", "pixel_encoder.interactions.3.extra_extractors.1.feat_norm"),
        ("pixel_encoder.stages.3.spatial.2.ffn.dwconv.conv",
         "pixel_encoder.interactions.3.extra_extractors.1.ffn.dwconv.dwconv"),
        # c2 → c1 upsampling and the final norms: norm1/2/3 act on f1 (stride 4), f2 (stride 8), f3 (stride 16)
        ("pixel_encoder.up_s8_to_s4", "pixel_encoder.up"),
        ("pixel_encoder.norm_f4", "pixel_encoder.norm1"),
        ("pixel_encoder.norm_f8", "pixel_encoder.norm2"),
        ("pixel_encoder.norm_f16", "pixel_encoder.norm3"),
        *_MEMORY_NETWORK,
    ),
    # DINOv2's mask_token is never read (no masked tokens at inference or in S3's training)
    unused=("pixel_encoder.vit_module.mask_token", *_INV_FREQ),
    marks=("pixel_encoder.vit_module", "pixel_encoder.spm", "pixel_encoder.interactions"),
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (CUTIE, S3_RELEASE)}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def _first_match(keys: Iterable[str], prefixes: Iterable[str]) -> str | None:
    patterns = [_Pattern(p) for p in prefixes]
    return next((k for k in keys if any(p.match(k) for p in patterns)), None)


def detect_layout(state: Mapping[str, Any]) -> str:
    """"ours", "cutie" or "s3-release", from the names of a state dict. Raises ValueError when the names are
    of no known layout, or mix ours with an official layout's."""
    keys = list(state)
    ours_mark = _first_match(keys, {p.text for layout in LAYOUTS.values() for p in layout.our_patterns()})
    # the release first: outside its pixel encoder it uses Cutie's names
    for layout in (S3_RELEASE, CUTIE):
        theirs = _first_match(keys, layout.marks)
        if theirs is not None:
            if ours_mark is not None:
                raise ValueError(f"the state dict mixes {layout.name} names ({theirs!r}) with ours ({ours_mark!r})")
            return layout.name
    if ours_mark is not None:
        return OURS
    raise ValueError(f"cannot tell the checkpoint layout from its {len(keys)} keys (first: {keys[:3]}); "
                     f"expected ours or one of {sorted(LAYOUTS)}")
