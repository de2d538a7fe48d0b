"""End to end: the tiny model with random weights through InferenceCore and training.evaluate on benchmark layouts;
the --predictions mode, the copy-first-mask baseline, and the CLI with a consolidated checkpoint."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.eval import synth
from training import evaluate, metrics

try:  # the dev dependency: an independent J&F implementation
    from vos_benchmark.evaluator import Evaluator as VosEvaluator
except ImportError:  # pragma: no cover
    VosEvaluator = None


@pytest.fixture(scope="module")
def tiny():
    import model
    from model.config import load_model_config

    torch.manual_seed(0)
    cfg = load_model_config("tiny", None)
    return model.build_network(cfg).eval(), cfg


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    # 75x112 at 480p, 150x224 Full-Resolution: the 600 setting works at 600x896, exactly 4x (bilinear weights and
    # nearest indices exact, no resampling tie), padded evenly, so a mirrored video is preprocessed to the mirror
    return synth.make_davis(tmp_path_factory.mktemp("davis") / "DAVIS", n_seq=2, t=5, h=75, w=112)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _reference_rows(items):
    """{(sequence, object): (J-Mean, F-Mean)} of (name, gt, pred) id-map stacks (T, H, W), computed apart from
    training.metrics: J by counting pixels here, F by vos-benchmark (every object of these synthetic videos is in
    every GT frame, where vos-benchmark and the official evaluator agree). First and last frames skipped."""
    out = {}
    for name, gt, pred in items:
        g, p = gt[1:-1], pred[1:-1]
        ev = None
        if VosEvaluator is not None:
            ev = VosEvaluator()
            for i in range(len(g)):
                ev.feed_frame(p[i], g[i])
        for k in range(1, int(gt[0].max()) + 1):
            a, b = g == k, p == k
            assert a.any(axis=(1, 2)).all()  # the premise above
            inter, union = (a & b).sum(axis=(1, 2)), (a | b).sum(axis=(1, 2))
            j = float(np.mean(np.where(union == 0, 1.0, inter / np.maximum(union, 1))))
            f = float(np.mean(ev.boundary_f[k])) if ev is not None else float(metrics.db_eval_boundary(a, b).mean())
            out[(name, k)] = (j, f)
    return out


def _check_scores(res, ref):
    """res's per-object J/F and global J&F equal the reference, to 1e-6."""
    assert {(r["sequence"], r["object"]) for r in res["per_object"]} == set(ref)
    for r in res["per_object"]:
        j, f = ref[(r["sequence"], r["object"])]
        assert r["J-Mean"] == pytest.approx(j, abs=1e-9) and r["F-Mean"] == pytest.approx(f, abs=1e-6), r
    jf = (np.mean([j for j, _ in ref.values()]) + np.mean([f for _, f in ref.values()])) / 2
    assert res["J&F-Mean"] == pytest.approx(jf, abs=1e-6)


def _read_stack(folder, frames):
    return np.stack([np.asarray(Image.open(folder / f"{f}.png")) for f in frames])


def _check_davis_output(out, davis_root, res, wall):
    seqs = (davis_root / "ImageSets" / "2017" / "val.txt").read_text().split()
    for s in seqs:
        frames = sorted(p.name for p in (davis_root / "JPEGImages" / "480p" / s).glob("*.jpg"))
        pngs = sorted(p.name for p in (out / "Annotations" / s).glob("*.png"))
        assert pngs == [f.replace(".jpg", ".png") for f in frames]
        im = Image.open(out / "Annotations" / s / pngs[0])
        gt = Image.open(davis_root / "Annotations" / "480p" / s / pngs[0])
        assert im.mode == "P" and im.size == gt.size
        # the first frame is given: the prediction reproduces it up to resizing
        assert (np.asarray(im) == np.asarray(gt)).mean() > 0.97
    n_objects = sum(int(np.asarray(Image.open(davis_root / "Annotations" / "480p" / s / "00000.png")).max())
                    for s in seqs)
    rows = _rows(out / "per-sequence_results-val.csv")
    assert len(rows) == n_objects == len(res["per_object"])
    g = _rows(out / "global_results-val.csv")[0]
    assert list(g) == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    # the scores are those of the PNGs written, recomputed apart from training.metrics
    items = []
    for s in seqs:
        frames = sorted(p.stem for p in (davis_root / "Annotations" / "480p" / s).glob("*.png"))
        items.append((s, _read_stack(davis_root / "Annotations" / "480p" / s, frames),
                      _read_stack(out / "Annotations" / s, frames)))
    _check_scores(res, _reference_rows(items))
    assert abs(float(g["J&F-Mean"]) - res["J&F-Mean"]) <= 5e-4 + 1e-9  # the CSV's %.3f
    # fps = frames / seconds of compute, a part of the call's wall time; every frame is processed (mask at 0)
    assert res["frames"] == sum(len(list((davis_root / "JPEGImages" / "480p" / s).glob("*.jpg"))) for s in seqs)
    assert res["frames"] / wall <= res["fps"] < float("inf")
    assert json.loads((out / "summary.json").read_text())["fps"] == res["fps"]


class _Mirrored(evaluate.Sequence):
    """The same sequence, frames and given masks mirrored left-right."""

    def image(self, frame):
        return np.ascontiguousarray(super().image(frame)[:, ::-1])

    def mask(self, frame):
        return np.ascontiguousarray(super().mask(frame)[:, ::-1])


def _record_steps(core, probs):
    step = core.step

    def recording(*args, **kwargs):
        p = step(*args, **kwargs)
        probs.append(p.detach().clone())
        return p

    core.step = recording
    return core


def _probs(network, icfg, seq):
    """The (N + 1, H, W) probabilities of every processed frame of seq, as predict_sequence runs it."""
    from model.inference import InferenceCore

    probs = []
    evaluate.predict_sequence(_record_steps(InferenceCore(network, icfg), probs), seq)
    return probs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flip,size", [(False, 480), (True, 600)])
def test_tiny_on_davis_layout(tiny, davis, tmp_path, monkeypatch, flip, size):
    from model.inference import InferenceCore

    network, _ = tiny
    probs = []  # the run's probabilities, step by step
    init = InferenceCore.__init__

    def init_recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _record_steps(self, probs)

    monkeypatch.setattr(InferenceCore, "__init__", init_recording)
    t0 = time.perf_counter()
    res = evaluate.evaluate_network(network, davis, size=size, flip=flip, out_dir=tmp_path, progress=False)
    wall = time.perf_counter() - t0
    monkeypatch.undo()
    _check_davis_output(tmp_path, davis, res, wall)
    assert set(res["per_sequence"]) == {"seq0", "seq1"}
    assert res["settings"]["flip"] is flip and res["settings"]["size"] == size
    if not flip:
        return
    # flip test-time augmentation: P(video) = (f(x) + mirror(f(mirror x))) / 2 with f one batch row of the same
    # network, so the mirrored video (frames and first mask) must give exactly the mirrored probabilities (up to
    # float noise, ~1e-7: batch rows are not bitwise independent), and the result must differ from the run without
    # flip. Checked on seq1 (2 objects) at frame 1, the first one read from the memory of the (averaged) frame 0.
    icfg, _, seqs = evaluate.plan_evaluation(network, davis, size=size, flip=True)
    seq = dataclasses.replace(seqs[1], frames=seqs[1].frames[:2])
    ran = probs[len(seqs[0].frames):][:2]
    mirrored = _probs(network, icfg, _Mirrored(**{f.name: getattr(seq, f.name) for f in dataclasses.fields(seq)}))
    plain = _probs(network, dataclasses.replace(icfg, flip=False), seq)
    assert len(ran) == len(mirrored) == len(plain) == 2
    err = float((mirrored[1] - ran[1].flip(-1)).abs().max())
    assert err < 1e-5, (f"the mirrored video's probabilities are {err:.3g} from the mirrored prediction: the "
                        "flipped branch is not averaged back in (mirrored)")
    gain = float((plain[1] - ran[1]).abs().max())
    assert gain > 1e-2, f"flip changes the probabilities by only {gain:.3g} over no flip"


@pytest.mark.timeout(300)
def test_tiny_on_youtubevos_layout_with_late_object(tiny, tmp_path):
    network, _ = tiny
    root = synth.make_youtubevos(tmp_path / "yt")
    res = evaluate.evaluate_network(network, root, fmt="youtubevos", out_dir=tmp_path / "out", progress=False)
    meta = json.loads((root / "valid" / "meta.json").read_text())["videos"]["vid0"]["objects"]
    wanted = sorted({f for o in meta.values() for f in o["frames"]})
    written = sorted(p.stem for p in (tmp_path / "out" / "Annotations" / "vid0").glob("*.png"))
    assert written == wanted  # only the meta.json frames
    # the object appearing at 00025 (given there) is absent before and predicted on every written frame after it
    # (00030 and 00040 are object 1's meta frames, 00035 and 00045 its own): a late object dropped after its
    # first frame never shows up again; object 1 is still predicted after it
    first = meta["2"]["frames"][0]
    assert first == "00025"
    for f in written:
        ids = np.asarray(Image.open(tmp_path / "out" / "Annotations" / "vid0" / f"{f}.png"))
        has2 = bool((ids == 2).any())
        assert has2 == (f >= first), f"frame {f}: object 2 {'present' if has2 else 'missing'}"
        assert bool((ids == 1).any()), f"frame {f}: object 1 missing"
        assert set(np.unique(ids).tolist()) <= {0, 1, 2}
    with zipfile.ZipFile(res["zip"]) as z:
        assert sorted(z.namelist()) == sorted(f"Annotations/vid0/{f}.png" for f in wanted)


def test_predictions_mode_and_copy_first_mask_baseline(davis, tmp_path):
    base = evaluate.copy_first_mask_baseline(davis, tmp_path / "copy")
    items = []
    for s in ("seq0", "seq1"):
        gt = _read_stack(davis / "Annotations" / "480p" / s, [f"{i:05d}" for i in range(5)])
        items.append((s, gt, np.repeat(gt[:1], len(gt), axis=0)))  # every frame predicted as the first mask
    _check_scores(base, _reference_rows(items))
    assert base["J&F-Mean"] < 0.9  # the boxes move: the copy is no perfect score
    assert len(_rows(tmp_path / "copy" / "per-sequence_results-val.csv")) == len(base["per_object"])
    # the ground truth itself scores 1 through the CLI's --predictions mode
    perfect = tmp_path / "perfect"
    for s in ("seq0", "seq1"):
        for p in (davis / "Annotations" / "480p" / s).glob("*.png"):
            (perfect / s).mkdir(parents=True, exist_ok=True)
            (perfect / s / p.name).write_bytes(p.read_bytes())
    assert evaluate.main(["--predictions", str(perfect), "--data", str(davis), "--out", str(tmp_path / "s")]) == 0
    g = _rows(tmp_path / "s" / "global_results-val.csv")[0]
    assert float(g["J&F-Mean"]) == 1.0 and float(g["J-Decay"]) == 0.0
    # a missing prediction is a clear error
    next((perfect / "seq1").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="seq1"):
        evaluate.score_predictions(perfect, davis, workers=1, progress=False)


@pytest.mark.timeout(300)
def test_cli_with_consolidated_checkpoint(tiny, davis, tmp_path):
    fresh, cfg = tiny
    # "trained" weights: the tiny network's, every parameter perturbed, so no fresh initialisation equals them
    network = copy.deepcopy(fresh)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * (float(p.std()) if p.numel() > 1 else 1.0))
    ckpt = tmp_path / "iter_0000010.pt"
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()}, ckpt)
    ckpt.with_suffix(".model.yaml").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    out = tmp_path / "out"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(davis), "--format", "davis", "--split", "val",
                        "--size", "480", "--out", str(out), "--max-sequences", "1", "--device", "cpu"])
    assert rc == 0
    assert (out / "global_results-val.csv").is_file() and (out / "Annotations" / "seq0").is_dir()
    assert not (out / "Annotations" / "seq1").exists()
    # the CLI ran the saved network: its predictions and scores are those of the in-memory network it came from,
    # and not those of the fresh (unperturbed) one
    ref = evaluate.evaluate_network(network, davis, size=480, max_sequences=1, out_dir=tmp_path / "ref",
                                    progress=False)
    base = evaluate.evaluate_network(fresh, davis, size=480, max_sequences=1, out_dir=tmp_path / "fresh",
                                     progress=False)
    frames = [f"{i:05d}" for i in range(5)]
    cli_ids = _read_stack(out / "Annotations" / "seq0", frames)
    ref_ids = _read_stack(tmp_path / "ref" / "Annotations" / "seq0", frames)
    fresh_ids = _read_stack(tmp_path / "fresh" / "Annotations" / "seq0", frames)
    summary = json.loads((out / "summary.json").read_text())
    assert (fresh_ids[1:] != ref_ids[1:]).mean() > 0.05 and abs(base["J&F-Mean"] - ref["J&F-Mean"]) > 1e-3
    assert np.array_equal(cli_ids, ref_ids), \
        f"the CLI's predictions differ from the saved network's on {(cli_ids != ref_ids).mean():.1%} of the pixels"
    assert summary["J&F-Mean"] == pytest.approx(ref["J&F-Mean"], abs=1e-12)
    assert summary["per_sequence"]["seq0"]["J&F"] == pytest.approx(ref["per_sequence"]["seq0"]["J&F"], abs=1e-12)
    lone = ckpt.with_name("lone.pt")
    lone.write_bytes(ckpt.read_bytes())
    with pytest.raises(FileNotFoundError, match="sidecar"):
        evaluate.load_network(lone)


@pytest.mark.timeout(300)
def test_youtubevos_runs_every_frame_of_valid_all_frames_and_writes_only_meta_frames(tiny, tmp_path):
    network, _ = tiny
    root = synth.make_youtubevos(tmp_path / "yt", t=10)
    res = evaluate.evaluate_network(network, root, fmt="youtubevos", out_dir=tmp_path / "out", progress=False)
    assert res["frames"] == 46  # every frame of valid_all_frames (00000-00045), not only the 10 of valid/
    seq = evaluate.read_split(root, "youtubevos")[0]
    assert seq.image_dir == root / "all_frames" / "valid_all_frames" / "JPEGImages" / "vid0"
    assert "00003" in seq.frames and seq.given == ["00000", "00025"]
    written = sorted(p.stem for p in (tmp_path / "out" / "Annotations" / "vid0").glob("*.png"))
    assert written == sorted(seq.output_frames) and "00003" not in written
    # the object given at 00025 is predicted on the meta frames after it (the random tiny net labels large areas)
    for f in ("00035", "00045"):
        assert (np.asarray(Image.open(tmp_path / "out" / "Annotations" / "vid0" / f"{f}.png")) == 2).any()


def test_missing_ground_truth_annotation_is_an_error_naming_it(davis, tmp_path):
    import shutil

    root = tmp_path / "DAVIS"
    shutil.copytree(davis, root)
    (root / "Annotations" / "480p" / "seq1" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"seq1.*00003\.png"):
        evaluate.read_split(root, "davis")
    assert evaluate.main(["--predictions", str(root / "Annotations" / "480p"), "--data", str(root),
                          "--out", str(tmp_path / "s")]) == 2


def test_out_folder_rules(tiny, davis, tmp_path, capsys):
    # results never go into the predictions folder
    pred = tmp_path / "pred"
    for s in ("seq0", "seq1"):
        (pred / s).mkdir(parents=True)
        for p in (davis / "Annotations" / "480p" / s).glob("*.png"):
            (pred / s / p.name).write_bytes(p.read_bytes())
    assert evaluate.main(["--predictions", str(pred), "--data", str(davis), "--out", str(pred)]) == 2
    assert "predictions folder" in capsys.readouterr().err
    assert not (pred / "global_results-val.csv").exists()
    # a non-empty --out is refused, and --overwrite empties it (no stale file survives)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"x")
    network, _ = tiny
    with pytest.raises(FileExistsError, match="not empty"):
        evaluate.evaluate_network(network, davis, out_dir=out, progress=False)
    res = evaluate.evaluate_network(network, davis, out_dir=out, progress=False, overwrite=True)
    assert not (out / "stale.png").exists() and (out / "Annotations" / "seq0").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["preset"] == "cutie" and summary["settings"]["pad_to"] == 16
    assert res["settings"]["size"] == 480 and res["settings"]["flip"] is False


def test_submission_zips_of_davis_test_dev_and_mose(tiny, davis, tmp_path):
    import shutil

    network, _ = tiny
    td = tmp_path / "test-dev"
    shutil.copytree(davis, td)
    (td / "ImageSets" / "2017" / "val.txt").rename(td / "ImageSets" / "2017" / "test-dev.txt")
    for p in (td / "Annotations" / "480p" / "seq0").glob("*.png"):
        if p.stem != "00000":
            p.unlink()  # test-dev ships first-frame masks only
    res = evaluate.evaluate_network(network, td, split="test-dev", out_dir=tmp_path / "o1", progress=False)
    assert "J&F-Mean" not in res
    with zipfile.ZipFile(res["zip"]) as z:
        names = z.namelist()
    assert "seq0/00000.png" in names and all(not n.startswith("Annotations") for n in names)
    mose = tmp_path / "MOSE" / "valid"
    for s in ("seq0",):
        shutil.copytree(davis / "JPEGImages" / "480p" / s, mose / "JPEGImages" / s)
        (mose / "Annotations" / s).mkdir(parents=True)
        shutil.copy(davis / "Annotations" / "480p" / s / "00000.png", mose / "Annotations" / s / "00000.png")
    res = evaluate.evaluate_network(network, tmp_path / "MOSE", fmt="mose", out_dir=tmp_path / "o2", progress=False)
    with zipfile.ZipFile(res["zip"]) as z:
        assert sorted(z.namelist()) == [f"seq0/{i:05d}.png" for i in range(5)]


def test_presets_table():
    from training.formats import presets

    cfg, s = presets.resolve("cutie", "davis")
    assert (cfg.size, cfg.flip, cfg.use_long_term, cfg.mem_every, cfg.pad_to, cfg.amp) == (480, False, False, 5, 16,
                                                                                            False)
    cfg, s = presets.resolve("cutie", "davis", size=720)  # Cutie's plus config
    assert (cfg.mem_every, cfg.max_mem_frames, s["resolution"]) == (3, 10, "Full-Resolution")
    cfg, _ = presets.resolve("cutie", "lvos")
    assert cfg.use_long_term and cfg.long_max_mem_frames == 10
    cfg, s = presets.resolve("s3", "davis")
    assert cfg.flip and cfg.use_long_term and cfg.pad_to == 32
    assert (cfg.long_max_mem_frames, cfg.long_min_mem_frames, cfg.max_num_tokens, cfg.buffer_tokens) == (
        25, 15, 30000, 3000)
    assert presets.resolve("s3", "lvos")[0].size == 600
    assert presets.resolve("s3", "davis", flip=False, mem_every=10)[0].mem_every == 10
