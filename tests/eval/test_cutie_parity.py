"""Parity with Cutie's own evaluation pipeline (rf-cutie): a Cutie-base checkpoint saved in Cutie's format, converted
by `model.convert`, run by `training.evaluate` gives the masks Cutie's VOSTestDataset + InferenceCore + saver give,
on DAVIS-layout fixtures (a sequence smaller than 480p with sides that are not multiples of 16, one at 540x960 that
Cutie resizes to 480x853) and a YouTube-VOS-layout fixture where an object is given mid-video (valid_all_frames
with frames between the annotated ones). Pixel agreement >= 99.9 % on every frame, flip off and on, long-term memory
on (consolidating and pruning, flip off and on: the same tokens chosen as Cutie's at each), and the masks are
asserted to be non-trivial (the decoder is refitted so that they follow the objects; tests/eval/cutie_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model import convert
from tests.eval import cutie_reference as ref
from training import evaluate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MIN_AGREEMENT = 0.999
# small long-term numbers so that consolidation and pruning happen within a few frames (mem_every 1): each
# consolidation adds 16 prototypes; the long-term memory is pruned to 40 - 16 - 8 = 16 tokens once it holds 24
LONG_TERM = {"max_mem_frames": 3, "min_mem_frames": 2, "num_prototypes": 16, "max_num_tokens": 40,
             "buffer_tokens": 8}
OURS_LONG_TERM = {"use_long_term": True, "mem_every": 1, "long_max_mem_frames": LONG_TERM["max_mem_frames"],
                  "long_min_mem_frames": LONG_TERM["min_mem_frames"],
                  **{k: LONG_TERM[k] for k in ("num_prototypes", "max_num_tokens", "buffer_tokens")}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("parity")
    davis = ref.make_davis_fixture(root / "DAVIS")
    yt = ref.make_youtubevos_fixture(root / "YouTubeVOS")
    network, cfg = ref.make_sharp_cutie(0)
    official = ref.save_cutie_weights(network, root / "cutie-base-sharp.pth")
    converted = root / "weights" / "cutie_base.pt"
    assert convert.main(["--from", "cutie", "--config", "cutie_base", str(official), str(converted)]) == 0
    return {"root": root, "davis": davis, "yt": yt, "net": network, "cfg": cfg, "official": official,
            "converted": converted}


def _read_ours(out):
    pred = {}
    for seq in sorted(p for p in (out / "Annotations").iterdir() if p.is_dir()):
        pred[seq.name] = {p.stem: np.asarray(Image.open(p)) for p in sorted(seq.glob("*.png"))}
    return pred


def _compare(ours, theirs, gt=None):
    assert sorted(ours) == sorted(theirs)
    worst = 1.0
    for seq, frames in theirs.items():
        assert sorted(ours[seq]) == sorted(frames), seq
        for f, want in frames.items():
            got = ours[seq][f]
            assert got.shape == want.shape, (seq, f)
            agree = float((got == want).mean())
            worst = min(worst, agree)
            print(f"{seq}/{f}: agreement {agree:.6f}") if agree < 1 else None
            assert agree >= MIN_AGREEMENT, f"{seq}/{f}: {agree:.5f} of pixels agree with Cutie"
    # non-trivial: every object given is predicted in later frames, and not everything is foreground
    for seq, frames in theirs.items():
        names = sorted(frames)
        for f in names[1:]:
            fg = (frames[f] > 0).mean()
            assert 0.01 < fg < 0.6, (seq, f, fg)
        ids = set(np.unique(np.concatenate([frames[f].ravel() for f in names[1:]]))) - {0}
        assert len(ids) >= 2, (seq, ids)
    return worst


def _run_cli(setup, tmp_path, extra, checkpoint=None, fmt="davis", data=None):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint or setup["converted"]), "--data", str(data or setup["davis"]),
            "--format", fmt, "--split", "val", "--out", str(out), "--preset", "cutie", "--device", "cpu", *extra]
    assert evaluate.main(argv) == 0
    return _read_ours(out)


def test_davis_d17_settings(setup, tmp_path):
    theirs = ref.davis_reference(setup["davis"], setup["net"], setup["cfg"])
    ours = _run_cli(setup, tmp_path, [])
    assert sorted(theirs) == ["large", "small"]
    assert theirs["large"]["00000"].shape == (540, 960)  # output at the original size after a 480p run
    _compare(ours, theirs)


def test_davis_with_flip_from_the_official_file_directly(setup, tmp_path):
    theirs = ref.davis_reference(setup["davis"], setup["net"], setup["cfg"], flip=True)
    ours = _run_cli(setup, tmp_path, ["--flip"], checkpoint=setup["official"])  # layout detected, no conversion
    _compare(ours, theirs)
    plain = ref.davis_reference(setup["davis"], setup["net"], setup["cfg"])
    assert any((plain[s][f] != theirs[s][f]).any() for s in plain for f in plain[s])  # flip changes the output


@pytest.mark.parametrize("flip", [False, True])
def test_davis_with_long_term_memory(setup, tmp_path, flip):
    """Long-term memory (consolidation into prototypes, pruning by usage), with and without flip: the same tokens
    chosen as Cutie at every consolidation and pruning, per batch row, then the same masks."""
    network = evaluate.load_network(setup["converted"])
    out = tmp_path / "out"
    with ref.record_long_term_decisions() as rec:
        theirs = ref.davis_reference(setup["davis"], setup["net"], setup["cfg"], use_long_term=True, mem_every=1,
                                     long_term=LONG_TERM, flip=flip)
        evaluate.evaluate_network(network, setup["davis"], out_dir=out, preset="cutie",
                                  overrides={**OURS_LONG_TERM, "flip": flip}, progress=False)
    kinds = [kind for kind, _ in rec["cutie"]]
    assert kinds.count("consolidate") >= 6 and kinds.count("prune") >= 3, kinds  # both sequences prune
    assert all(u.shape[0] == (2 if flip else 1) for _, u in rec["cutie"])
    ref.compare_long_term_decisions(rec["ours"], rec["cutie"], num_prototypes=LONG_TERM["num_prototypes"],
                                    keep_after_prune=LONG_TERM["max_num_tokens"] - LONG_TERM["num_prototypes"]
                                    - LONG_TERM["buffer_tokens"])
    _compare(_read_ours(out), theirs)


def test_youtubevos_with_masks_given_mid_video(setup, tmp_path):
    theirs = ref.youtubevos_reference(setup["yt"], setup["net"], setup["cfg"])
    ours = _run_cli(setup, tmp_path, [], fmt="youtubevos", data=setup["yt"])
    _compare(ours, theirs)
    # the object first given at 00010 is tracked after it
    assert (ours["vid_a"]["00015"] == 3).any() and not (ours["vid_a"]["00005"] == 3).any()


def test_davis_plus_settings_read_full_resolution_and_write_480p(setup, tmp_path):
    """Cutie's eval_plus_config for DAVIS: Full-Resolution frames and first mask, resized to --size 600, output at
    the 480p size (size_directory), mem_every 3, 10 memory frames. One sequence, Full-Resolution = 2x its 480p."""
    import shutil

    root = tmp_path / "DAVIS"
    src = setup["davis"]
    for kind in ("JPEGImages", "Annotations"):
        shutil.copytree(src / kind / "480p" / "small", root / kind / "480p" / "small")
        (root / kind / "Full-Resolution" / "small").mkdir(parents=True)
        for p in sorted((src / kind / "480p" / "small").iterdir()):
            im = Image.open(p)
            big = im.resize((im.width * 2, im.height * 2), Image.BICUBIC if kind == "JPEGImages" else Image.NEAREST)
            big.save(root / kind / "Full-Resolution" / "small" / p.name, quality=95)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("small\n")
    theirs = ref.cutie_reference(root / "JPEGImages" / "Full-Resolution", root / "Annotations" / "Full-Resolution",
                                 setup["net"], setup["cfg"], size=600, size_dir=root / "JPEGImages" / "480p",
                                 subset=root / "ImageSets" / "2017" / "val.txt", mem_every=3, max_mem_frames=10)
    ours = _run_cli(setup, tmp_path, ["--size", "600"], data=root)
    assert theirs["small"]["00003"].shape == (250, 345)
    _compare(ours, theirs)


@pytest.mark.parametrize("flip", [False, True])
def test_engine_step_by_step_with_a_known_object_re_annotated(setup, flip):
    """Our InferenceCore driving Cutie's own network vs Cutie's InferenceCore, frame by frame, where a mid-video
    mask brings a new object and re-annotates a tracked one (Cutie's merge replaces that object's channel)."""
    from cutie.inference.inference_core import InferenceCore as CutieCore

    from model.inference import InferenceConfig, InferenceCore

    rng = np.random.default_rng(0)
    h, w, t = 112, 150, 8
    frames, m0, m4 = [], np.zeros((h, w), np.int64), np.zeros((h, w), np.int64)
    m0[20:60, 20:70], m0[70:100, 90:140] = 1, 2
    m4[10:30, 100:140], m4[24:64, 30:80] = 3, 1  # object 1 re-annotated where it moved, object 3 new
    for i in range(t):
        im = 0.3 + 0.1 * rng.random((3, h, w), dtype=np.float32)
        im[:, 20:60, 20 + 2 * i:70 + 2 * i] = np.array([0.9, 0.2, 0.2], np.float32)[:, None, None]
        im[:, 70:100, 90:140] = np.array([0.1, 0.8, 0.3], np.float32)[:, None, None]
        im[:, 10:30, 100:140] = np.array([0.2, 0.2, 0.9], np.float32)[:, None, None]
        frames.append(torch.from_numpy(im))
    cfg = ref._run_cfg(setup["cfg"], flip=flip, use_long_term=False, mem_every=2, long_term=None, max_mem_frames=5)
    theirs = CutieCore(setup["net"], cfg)
    ours = InferenceCore(setup["net"], InferenceConfig(size=-1, flip=flip, mem_every=2, pad_to=16))
    for i, im in enumerate(frames):
        m = {0: m0, 4: m4}.get(i)
        labels = sorted(int(v) for v in np.unique(m) if v) if m is not None else None
        with torch.inference_mode():
            p_theirs = theirs.step(im, torch.from_numpy(m) if m is not None else None, labels, end=(i == t - 1))
        p_ours = ours.step(im, m, end=(i == t - 1))
        assert p_ours.shape == p_theirs.shape
        assert float((p_ours - p_theirs).abs().max()) < 1e-3, i  # float noise through the sharpened decoder
        assert (ours.to_id_map(p_ours) == theirs.output_prob_to_mask(p_theirs).numpy()).all(), i
    assert (ours.to_id_map(p_ours) == 3).any()
