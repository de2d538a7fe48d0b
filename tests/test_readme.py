"""The README's one-machine commands, run as printed, in order, on the synthetic datasets.

Every ```bash block of README.md is either run here or carries, on the line before it, a
`<!-- readme-test: skip (REASON) -->` comment saying where else it is exercised. A run block is executed by bash
(`-euo pipefail`), from a scratch working directory that links the repository's entries (so `.venv/bin/...`,
`training/train.py` and the configs resolve as in a checkout, and `runs/` is the scratch one), with the variables
`make` exports removed (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR) as in a user's shell. What this test changes in a
command, and nothing else:

* paths the README names as the user's: `/data/vos` → the synthetic datasets, `/data/shards` → a scratch folder,
  the DAVIS frame `bear/00000.jpg` → a synthetic one (`dval00`);
* sizes: the shard job's clip counts, 2 CPU ranks for `--num_gpus 8`, and for training the `tiny` model (the full
  S3 architecture at small widths; the real ViT-B needs a 400 MB file), crop 64, 2 iterations, global batch 2;
* ports: the launcher's rendezvous port and `mlflow ui`'s (free ones); `mlflow ui` runs in the background until it
  answers, then is stopped.

Input files a user brings are made first: an official Cutie-base file (`pretrained/cutie-base-mega.pth`, saved
from rf-cutie, Cutie's own code) and an S3 checkpoint of ours (`runs/weights/s3.pt`, from a random release-layout
file).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->")

# What each stage of the one-machine walk-through must contain (so a block cannot vanish unnoticed).
STAGES = ("data_pipeline.shard", "--plan", "training/train.py", "mlflow ui", "training.select", "training.logged_model",
          "training.evaluate --checkpoint", "training.evaluate --predictions", "model.convert --from cutie",
          "model.convert --to s3-release", "model.summary", "model.visualize")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    skip: str | None


def bash_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            m = SKIP.search(before)
            blocks.append(Block(start + 1, "\n".join(body) + "\n", m.group(1) if m else None))
        i += 1
    return blocks


def logical_lines(block: str) -> list[str]:
    """Commands with their backslash continuations joined; comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_every_block_is_run_or_says_where_it_is_tested():
    blocks = bash_blocks(README.read_text())
    assert len(blocks) >= 6
    for b in blocks:
        assert b.skip is None or len(b.skip) > 20, f"README.md:{b.line}: a skipped block needs its reason"
    run = "\n".join(" ".join(logical_lines(b.text)) for b in blocks if b.skip is None)
    missing = [s for s in STAGES if s not in run]
    assert not missing, f"README one-machine blocks lost {missing}"
    for b in blocks:
        if b.skip is None:
            for cmd in logical_lines(b.text):
                first = cmd.split()[0]
                assert (first.startswith(".venv/bin/") or "=" in first.split("/")[0]), \
                    f"README.md:{b.line}: {cmd!r} does not use the venv's executables"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapt(cmd: str, data: Path, shards: Path) -> str:
    """The documented changes (module docstring) to one logical command line."""
    cmd = cmd.replace("/data/vos", str(data)).replace("/data/shards", str(shards))
    cmd = cmd.replace("JPEGImages/480p/bear/", "JPEGImages/480p/dval00/")
    if "data_pipeline.shard" in cmd and "--out" in cmd:
        cmd += " clips_per_level=6 clips_per_shard=6 num_cpus=2"
    if "training/train.py" in cmd:
        cmd = cmd.replace("--num_gpus 8", f"--num_gpus 2 --master_port {_free_port()}")
        cmd += (" model.name=tiny data.crop_size=64 train.iterations=2 train.global_batch=2 data.num_workers=1"
                " validation.size=128")
    if cmd.startswith(".venv/bin/mlflow ui"):
        port = _free_port()
        probe = ("import sys, time, urllib.request\n"
                 "for _ in range(120):\n"
                 "    try:\n"
                 f"        urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=2); sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.5)\n"
                 "sys.exit('mlflow ui never answered')\n")
        cmd = (f"{cmd} --port {port} > mlflow_ui.log 2>&1 & ui=$!\n"
               f".venv/bin/python -c \"{probe}\"\nkill $ui; wait $ui || true")
    return cmd


def _inputs(cwd: Path, data: Path) -> None:
    """What a user brings: the datasets, an official Cutie file, an S3 checkpoint of ours."""
    import torch

    from model.convert import main as convert
    from tests.model.test_convert import random_state, release_specs, rf_cutie_base

    subprocess.run([sys.executable, "-m", "data_pipeline.synth", "--out", str(data), "--small"], check=True,
                   cwd=ROOT)
    (cwd / "pretrained").mkdir()
    torch.manual_seed(0)
    torch.save(rf_cutie_base().state_dict(), cwd / "pretrained" / "cutie-base-mega.pth")
    release = cwd / "release.pth"
    torch.save(random_state(release_specs(), seed=3), release)
    assert convert(["--from", "s3-release", "--config", "s3", str(release), str(cwd / "runs/weights/s3.pt")]) == 0
    release.unlink()


@pytest.mark.slow
def test_readme_commands_run_as_printed(tmp_path):
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {"runs", "pretrained", "demo_out", ".git"}:
            (cwd / entry.name).symlink_to(entry)
    data, shards = tmp_path / "vos", tmp_path / "shards"
    _inputs(cwd, data)
    env = {k: v for k, v in os.environ.items()
           if k not in {"DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH"}}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    ran = []
    for b in bash_blocks(README.read_text()):
        if b.skip is not None:
            continue
        script = "\n".join(adapt(c, data, shards) for c in logical_lines(b.text))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=1200)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README.md:{b.line} block failed ({proc.returncode}):\n{script}\n---\n{out[-6000:]}"
        ran.append((b.line, out))
    everything = "\n".join(o for _, o in ran)

    # each stage left what the README says it leaves
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_clips"] == 18 and not manifest["missing_datasets"]
    assert "estimated disk" in everything  # the plan report
    run = cwd / "runs" / "s3_mega"
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_0000002"]
    assert "champion" in everything and "models:/s3-mega-champion@champion" in everything
    preds = cwd / "runs" / "eval" / "davis_val" / "Annotations"
    assert sorted(p.name for p in preds.iterdir()) == ["dval00", "dval01"]
    assert "J&F-Mean" in everything
    scores = cwd / "runs" / "eval" / "davis_val_scores" / "global_results-val.csv"
    assert scores.read_text() == (cwd / "runs" / "eval" / "davis_val" / "global_results-val.csv").read_text()
    for name in ("cutie_base.pt", "cutie_base.model.yaml", "s3_release_layout.pth"):
        assert (cwd / "runs" / "weights" / name).is_file(), name
    assert list((cwd / "runs" / "viz").glob("*.png"))
    # the op DeepSpeed compiles for CPU ranks comes from the venv (make install built it), not the home folder
    assert "building DeepSpeed's CPU op" not in everything
