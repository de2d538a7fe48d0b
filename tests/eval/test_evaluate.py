"""End to end: the tiny model with random weights through InferenceCore and training.evaluate on benchmark layouts;
the --predictions mode, the copy-first-mask baseline, and the CLI with a consolidated checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.eval import synth
from training import evaluate


@pytest.fixture(scope="module")
def tiny():
    import model
    from model.config import load_model_config

    torch.manual_seed(0)
    cfg = load_model_config("tiny", None)
    return model.build_network(cfg).eval(), cfg


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    return synth.make_davis(tmp_path_factory.mktemp("davis") / "DAVIS", n_seq=2, t=5)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_davis_output(out, davis_root, res):
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
    assert 0.0 <= res["J&F-Mean"] <= 1.0 and res["fps"] > 0
    assert abs(float(g["J&F-Mean"]) - res["J&F-Mean"]) < 1e-3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flip,size", [(False, 480), (True, 600)])
def test_tiny_on_davis_layout(tiny, davis, tmp_path, flip, size):
    network, _ = tiny
    res = evaluate.evaluate_network(network, davis, size=size, flip=flip, out_dir=tmp_path, progress=False)
    _check_davis_output(tmp_path, davis, res)
    assert set(res["per_sequence"]) == {"seq0", "seq1"}


@pytest.mark.timeout(300)
def test_tiny_on_youtubevos_layout_with_late_object(tiny, tmp_path):
    network, _ = tiny
    root = synth.make_youtubevos(tmp_path / "yt")
    res = evaluate.evaluate_network(network, root, fmt="youtubevos", out_dir=tmp_path / "out", progress=False)
    meta = json.loads((root / "valid" / "meta.json").read_text())["videos"]["vid0"]["objects"]
    wanted = sorted({f for o in meta.values() for f in o["frames"]})
    written = sorted(p.stem for p in (tmp_path / "out" / "Annotations" / "vid0").glob("*.png"))
    assert written == wanted  # only the meta.json frames
    late = np.asarray(Image.open(tmp_path / "out" / "Annotations" / "vid0" / f"{meta['2']['frames'][0]}.png"))
    assert (late == 2).any()  # the object appearing later is tracked from its first mask on
    early = np.asarray(Image.open(tmp_path / "out" / "Annotations" / "vid0" / "00000.png"))
    assert not (early == 2).any()
    with zipfile.ZipFile(res["zip"]) as z:
        assert sorted(z.namelist()) == sorted(f"Annotations/vid0/{f}.png" for f in wanted)


def test_predictions_mode_and_copy_first_mask_baseline(davis, tmp_path):
    base = evaluate.copy_first_mask_baseline(davis, tmp_path / "copy")
    assert 0.0 < base["J&F-Mean"] < 1.0
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
    network, cfg = tiny
    ckpt = tmp_path / "iter_0000010.pt"
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()}, ckpt)
    ckpt.with_suffix(".model.yaml").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    out = tmp_path / "out"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(davis), "--format", "davis", "--split", "val",
                        "--size", "480", "--out", str(out), "--max-sequences", "1"])
    assert rc == 0
    assert (out / "global_results-val.csv").is_file() and (out / "Annotations" / "seq0").is_dir()
    assert not (out / "Annotations" / "seq1").exists()
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
    # the object given at 00025 is predicted on the meta frames after it (the tiny net tracks boxes this big)
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
