"""model.layouts / model.convert: official Cutie and S3-release checkpoints in and out.

Known-unused keys (present in the official files, absent from ours and from a `--to` output):
cutie: object_transformer.spatial_pe.inv_freq, object_summarizer.pos_enc.inv_freq;
s3-release: the same two plus pixel_encoder.vit_module.mask_token.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import load_model_config
from model.convert import (
    ConversionError,
    from_ours,
    load_network_from_checkpoint,
    main,
    network_shapes,
    offline_model_config,
    to_ours,
    unwrap_state_dict,
)
from model.layouts import LAYOUTS, detect_layout

REPO = Path(__file__).resolve().parents[2]
# the S3 release's 705 state-dict names and shapes (shared/data of the project, copied here so CI has it)
RELEASE_TSV = Path(__file__).resolve().parent / "data" / "s3_release_state_keys.tsv"
INV_FREQ = {"object_transformer.spatial_pe.inv_freq", "object_summarizer.pos_enc.inv_freq"}
UNUSED = {"cutie": INV_FREQ, "s3-release": INV_FREQ | {"pixel_encoder.vit_module.mask_token"}}
TOL = 1e-5


def rf_cutie_base():
    """Cutie-base from the rf-cutie package with random weights, offline (the oracle module's builders)."""
    pytest.importorskip("cutie")
    from cutie.model.cutie import CUTIE

    from tests.eval import cutie_reference as cr

    with cr.no_imagenet_download():
        return CUTIE(cr.cutie_eval_config()).eval()


def random_state(specs, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors for (name, shape, dtype) specs; int64 entries are random non-negative ints."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, dtype in specs:
        if dtype == torch.int64:
            out[name] = torch.randint(0, 1000, shape, generator=g, dtype=torch.int64)
        else:
            out[name] = torch.randn(shape, generator=g, dtype=dtype)
    return out


def release_specs() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    specs = []
    for line in RELEASE_TSV.read_text().splitlines():
        name, shape = line.split("\t")
        specs.append((name, tuple(ast.literal_eval(shape)),
                      torch.int64 if name.endswith("num_batches_tracked") else torch.float32))
    return specs


class LoadSpy:
    """Records every torch.load path (to show no pretrained file is read)."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        real = torch.load

        def spy(f, *args, **kwargs):
            self.paths.append(str(f))
            return real(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", spy)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cutie_ref(tmp_path_factory):
    """rf-cutie's Cutie-base built after torch.manual_seed(0), and its state dict saved as Cutie saves it."""
    torch.manual_seed(0)
    net = rf_cutie_base()
    path = tmp_path_factory.mktemp("cutie") / "cutie-base.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def cutie_specs(cutie_ref):
    return [(k, tuple(v.shape), v.dtype) for k, v in cutie_ref[0].state_dict().items()]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-layout S3 file with random tensors for all 705 TSV entries, and its converted copy."""
    state = random_state(release_specs(), seed=3)
    folder = tmp_path_factory.mktemp("release")
    path, ours = folder / "s3-release.pth", folder / "s3-ours.pt"
    torch.save(state, path)
    assert main(["--from", "s3-release", "--config", "s3", str(path), str(ours)]) == 0
    return state, path, ours


# ------------------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("layout", ["cutie", "s3-release"])
def test_table_maps_every_key(layout, request):
    """Every official key maps to one of ours with the same shape (or is known-unused), one to one and back;
    every rename row of the table is used."""
    lay = LAYOUTS[layout]
    if layout == "cutie":
        specs = request.getfixturevalue("cutie_specs")
    else:
        specs = release_specs()
    theirs = {name: shape for name, shape, _ in specs}
    ours = {k: tuple(v.shape) for k, v in network_shapes(offline_model_config(lay.model_config)).items()}
    assert set(lay.unused) == UNUSED[layout] and set(lay.unused) <= set(theirs)
    mapped = {lay.to_ours(k): k for k in theirs if k not in lay.unused}
    assert len(mapped) == len(theirs) - len(lay.unused)  # no two official keys share one of ours
    assert set(mapped) == set(ours)
    for o, t in mapped.items():
        assert ours[o] == theirs[t], (o, t)
        assert lay.to_theirs(o) == t
    used = {pattern.text for pattern in lay.their_patterns() if any(pattern.match(t) for t in theirs)}
    assert used == {p.text for p in lay.their_patterns()}


def test_detect_layout(cutie_specs):
    ours = network_shapes(offline_model_config("cutie_base"))
    assert detect_layout(ours) == "ours"
    assert detect_layout({k: 0 for k, _, _ in cutie_specs}) == "cutie"
    assert detect_layout({k: 0 for k, _, _ in release_specs()}) == "s3-release"
    with pytest.raises(ValueError, match="mixes cutie names"):
        detect_layout({"key_proj.d_proj.weight": 0, "key_proj.shrinkage_proj.weight": 0})
    with pytest.raises(ValueError, match="cannot tell"):
        detect_layout({"foo.weight": 0})


def test_unwrap_wrappers():
    sd = {"a.weight": torch.ones(2)}
    for wrapped in (sd, {"weights": sd, "it": 3}, {"network": sd}, {"model": sd}, {"state_dict": sd},
                    {"model": {"state_dict": sd}}, {"module.a.weight": torch.ones(2)}):
        assert list(unwrap_state_dict(wrapped)) == ["a.weight"]
    with pytest.raises(ConversionError, match="not named tensors"):
        unwrap_state_dict({"a": torch.ones(1), "b": 3})


# ------------------------------------------------------------------------------------------------ round trips
def test_round_trip_cutie(cutie_specs, tmp_path, capsys):
    """Cutie layout → ours (main, wrapped as Cutie's trainer checkpoint) → Cutie layout (subprocess): bit for bit."""
    official = random_state(cutie_specs, seed=1)
    src, ours, back = tmp_path / "cutie.pth", tmp_path / "ours.pt", tmp_path / "back.pth"
    torch.save({"it": 1000, "weights": official}, src)
    assert main(["--from", "cutie", "--config", "cutie_base", str(src), str(ours)]) == 0
    report = capsys.readouterr().out
    assert "525 tensors mapped" in report and "2 known-unused" in report and "inv_freq" in report
    sidecar = tmp_path / "ours.model.yaml"
    cfg = load_model_config(sidecar)
    assert cfg.name == "cutie_base" and cfg.pixel_encoder["init"] == "random" and cfg.mask_encoder.weights is None

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "model.convert", "--to", "cutie", "--config", "cutie_base",
                          str(ours), str(back)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "525 tensors mapped" in run.stdout
    want = {k: v for k, v in official.items() if k not in UNUSED["cutie"]}
    assert_same_tensors(torch.load(back, weights_only=True), want)


def test_round_trip_release(release, tmp_path):
    state, _, ours = release
    back = tmp_path / "back.pth"
    assert load_model_config(ours.with_suffix(".model.yaml")).name == "s3"
    assert main(["--to", "s3-release", "--config", "s3", str(ours), str(back)]) == 0
    want = {k: v for k, v in state.items() if k not in UNUSED["s3-release"]}
    assert_same_tensors(torch.load(back, weights_only=True), want)


def test_release_file_loads_into_s3_offline(release, tmp_path, monkeypatch):
    """(a) load_network_from_checkpoint on the 705-entry release file reads no Depth-Anything file and loads every
    weight; (b) the converted file loads into our s3 network with nothing missing and nothing unexpected."""
    state, path, ours = release
    assert load_model_config("s3").pixel_encoder["init"] == "file"  # the plain config would need the ViT file
    monkeypatch.chdir(tmp_path)
    spy = LoadSpy(monkeypatch)
    network, info = load_network_from_checkpoint(path)
    assert spy.paths == [str(path)]
    assert info["layout"] == "s3-release" and info["model_config"] == "s3" and info["mapped"] == 702
    assert set(info["unused"]) == UNUSED["s3-release"]
    assert not network.training
    got = network.state_dict()
    lay = LAYOUTS["s3-release"]
    for k, v in state.items():
        if k not in lay.unused:
            assert torch.equal(got[lay.to_ours(k)], v), k

    converted = torch.load(ours, weights_only=True)
    assert len(converted) == 702
    missing, unexpected = network.load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == []


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_key_and_shape_mismatch(cutie_ref, tmp_path, capsys):
    official = cutie_ref[0].state_dict()
    expected = network_shapes(offline_model_config("cutie_base"))

    bad = dict(official, **{"pixel_encoder.res2.0.conv9.weight": torch.zeros(1)})
    src = tmp_path / "bad.pth"
    torch.save(bad, src)
    assert main(["--from", "cutie", "--config", "cutie_base", str(src), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown key" in err and "pixel_encoder.res2.0.conv9.weight" in err
    assert not (tmp_path / "o.pt").exists()

    wrong = dict(official, **{"key_proj.d_proj.weight": torch.zeros(2, 256, 3, 3)})
    torch.save(wrong, src)
    assert main(["--from", "cutie", str(src), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "key_proj.d_proj.weight" in err and "(2, 256, 3, 3)" in err
    with pytest.raises(ConversionError, match=r"key_proj\.d_proj\.weight.*\(2, 256, 3, 3\)"):
        to_ours(wrong, "cutie", expected)

    missing = {k: v for k, v in official.items() if k != "mask_decoder.pred.bias"}
    with pytest.raises(ConversionError, match=r"missing key.*mask_decoder\.pred\.bias"):
        to_ours(missing, "cutie", expected)

    ours, _ = to_ours(official, "cutie", expected)
    with pytest.raises(ConversionError, match=r"unknown key.*extra\.weight"):
        from_ours(dict(ours, **{"extra.weight": torch.zeros(1)}), "cutie", expected)
    with pytest.raises(ConversionError, match=r"key_proj\.shrinkage_proj\.weight"):
        from_ours(dict(ours, **{"key_proj.shrinkage_proj.weight": torch.zeros(3)}), "cutie", expected)


def test_user_errors_exit_2(cutie_ref, tmp_path, capsys):
    _, path = cutie_ref
    out = str(tmp_path / "o.pt")
    for argv, needle in (
        (["--from", "s3-release", str(path), out], "of the cutie layout, not s3-release"),
        (["--to", "cutie", str(path), out], "of the cutie layout, not ours"),
        (["--from", "cutie", str(tmp_path / "nope.pth"), out], "checkpoint not found"),
        (["--from", "cutie", "--config", "nonexistent", str(path), out], "--config nonexistent"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ parity
def test_numerical_parity_with_rf_cutie(cutie_ref, tmp_path, monkeypatch):
    """rf-cutie's Cutie-base (seed 0) → model.convert → our cutie_base via load_network_from_checkpoint (no
    ImageNet file read): the same outputs of every network step and of a 3-frame InferenceCore run."""
    from model.inference import InferenceConfig, InferenceCore

    ref, path = cutie_ref
    ours_path = tmp_path / "cutie_base.pt"
    assert main(["--from", "cutie", "--config", "cutie_base", str(path), str(ours_path)]) == 0
    assert load_model_config("cutie_base").pixel_encoder["init"] == "file"
    monkeypatch.chdir(tmp_path)  # no pretrained/resnet50.pth here
    spy = LoadSpy(monkeypatch)
    ours, info = load_network_from_checkpoint(ours_path)
    assert spy.paths == [str(ours_path)] and info["layout"] == "ours" and info["mapped"] == 525

    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 96, generator=g)
    masks = torch.rand(1, 2, 64, 96, generator=g)
    sensory = torch.zeros(1, 2, 256, 4, 6)
    with torch.no_grad():
        (ms_r, pf_r), (ms_o, pf_o) = ref.encode_image(image), ours.encode_image(image)
        for a, b in zip([*ms_r, pf_r], [*ms_o, pf_o], strict=True):
            assert maxdiff(a, b) <= TOL
        for a, b in zip(ref.transform_key(ms_r[0]), ours.transform_key(ms_o[0]), strict=True):
            assert maxdiff(a, b) <= TOL
        enc_r = ref.encode_mask(image, pf_r, sensory, masks, need_weights=True)
        enc_o = ours.encode_mask(image, pf_o, sensory, masks, need_weights=True)
        for a, b in zip(enc_r, enc_o, strict=True):  # value, sensory, summaries, summary logits
            assert maxdiff(a, b) <= TOL
        readout = torch.randn(1, 2, 256, 4, 6, generator=g)
        pix_r = ref.pixel_fusion(pf_r, readout, enc_r[1], masks)
        pix_o = ours.pixel_fusion(pf_o, readout, enc_o[1], masks)
        assert maxdiff(pix_r, pix_o) <= TOL
        (mem_r, aux_r), (mem_o, aux_o) = (ref.readout_query(pix_r, enc_r[2].unsqueeze(2)),
                                          ours.readout_query(pix_o, enc_o[2].unsqueeze(2)))
        assert maxdiff(mem_r, mem_o) <= TOL
        assert len(aux_r["logits"]) == len(aux_o["logits"]) == 4  # the query aux heads: input + 3 blocks
        for a, b in zip(aux_r["logits"], aux_o["logits"], strict=True):
            assert maxdiff(a, b) <= TOL
        for a, b in zip(ref.segment(ms_r, mem_r, enc_r[1]), ours.segment(ms_o, mem_o, enc_o[1]), strict=True):
            assert maxdiff(a, b) <= TOL  # sensory, logits, prob

    cfg = InferenceConfig(size=-1, pad_to=32, amp=False)
    core_r, core_o = InferenceCore(ref, cfg), InferenceCore(ours, cfg)
    id_map = np.zeros((64, 96), np.int64)
    id_map[8:30, 10:40] = 1
    id_map[34:60, 50:90] = 2
    for t in range(3):
        frame = torch.rand(3, 64, 96, generator=g)
        mask = id_map if t == 0 else None
        assert maxdiff(core_r.step(frame, mask), core_o.step(frame, mask)) <= TOL
