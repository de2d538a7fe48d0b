"""Operator experience: every command-line tool ends a user error in ONE line naming the path and the problem, with
a non-zero exit (2 for a usage error, 4 for a full disk), and shows the traceback only under --debug (model.cli).

Each case runs the real CLI in a subprocess on tiny inputs (a 2-sequence DAVIS layout, the `tiny` network):

a. evaluate --checkpoint MISSING.pt             c. evaluate --out somewhere that cannot be created
b. evaluate --predictions lacking a sequence    d. evaluate on a full disk while writing predictions
e. the trainer on a full disk during a checkpoint (torch.save's "unexpected pos N vs M")
f. model.convert, training.logged_model, model.summary, model.visualize with a missing input

Full disks: an injected ENOSPC on the evaluator's writes (d), a file size limit (RLIMIT_FSIZE, a genuine short
write under torch.save) for the trainer (e); where this process may mount a small tmpfs (root), both also run on a
really full file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .helpers import PY, ROOT, child_env

pytestmark = pytest.mark.fault
TRAIN_CONFIG = ROOT / "training" / "configs" / "demo_cpu.yaml"


# ------------------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], timeout: float = 300, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd`; stdout and stderr decoded as they were written (carriage returns kept: a progress bar redrawn
    in place is one line on the screen, and text=True would turn each redraw into a line of its own)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, timeout=timeout,
                          preexec_fn=preexec_fn)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def run_cli(module: str, *args: str, prelude: str | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m module args` (or, with a prelude, the prelude then the module as __main__)."""
    if prelude is None:
        return run([PY, "-m", module, *args], **kw)
    return run([PY, "-c", prelude + f"\nimport runpy, sys\nsys.argv = [{module!r}, *sys.argv[1:]]\n"
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n", *args], **kw)


def screen_lines(stderr: str) -> list[str]:
    """stderr as a terminal shows it: each line as left by its last carriage return, blank ones dropped."""
    return [s for s in (line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")) if s]


def check_one_line(proc: subprocess.CompletedProcess, code: int, *names: str, max_lines: int = 2) -> str:
    """Exit `code`, at most `max_lines` lines on stderr, one `error:` line naming every name, no traceback."""
    lines = screen_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) <= max_lines, proc.stderr[-3000:]
    (line,) = [x for x in lines if x.startswith("error:")]
    for name in names:
        assert name in line, (name, line)
    return line


def check_debug(proc: subprocess.CompletedProcess, code: int, *names: str) -> None:
    """--debug: the traceback, then the same one line, the same exit code."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in screen_lines(proc.stderr) if x.startswith("error:")]
    for name in names:
        assert name in line, (name, line)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (root only); skips the test where it cannot be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected full disk covers this case")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` up to `leave` bytes free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


# ------------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def davis(tmp_path_factory) -> Path:
    from tests.eval import synth

    return synth.make_davis(tmp_path_factory.mktemp("cli-davis") / "DAVIS", n_seq=2, t=3, full_resolution=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The `tiny` network's consolidated state dict with its .model.yaml sidecar (as training/validation.py)."""
    import torch

    import model
    from model.config import load_model_config

    torch.manual_seed(0)
    cfg = load_model_config("tiny", None)
    network = model.build_network(cfg)
    ckpt = tmp_path_factory.mktemp("cli-ckpt") / "iter_0000010.pt"
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()}, ckpt)
    ckpt.with_suffix(".model.yaml").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return ckpt


@pytest.fixture(scope="module")
def partial_predictions(davis, tmp_path_factory) -> Path:
    """Predictions for seq0 only (the ground truth copied): seq1's folder is missing."""
    pred = tmp_path_factory.mktemp("cli-pred") / "pred"
    shutil.copytree(davis / "Annotations" / "480p" / "seq0", pred / "seq0")
    return pred


def evaluate(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("training.evaluate", *args, **kw)


# ------------------------------------------------------------------------------------------------ a-d: evaluate


@pytest.mark.timeout(300)
def test_a_missing_checkpoint_is_one_line_and_creates_nothing(davis, tmp_path):
    missing, out = tmp_path / "MISSING.pt", tmp_path / "out"
    args = ("--checkpoint", str(missing), "--data", str(davis), "--format", "davis", "--split", "val",
            "--out", str(out))
    line = check_one_line(evaluate(*args), 2, str(missing), max_lines=1)
    assert "checkpoint not found" in line
    assert not out.exists()  # checked before --out is created or the network is loaded
    check_debug(evaluate(*args, "--debug"), 2, str(missing))
    # the dataset folder too, before anything is loaded
    ckpt = tmp_path / "present.pt"
    ckpt.write_bytes(b"")
    line = check_one_line(evaluate("--checkpoint", str(ckpt), "--data", str(tmp_path / "nodata"), "--out",
                                   str(out)), 2, str(tmp_path / "nodata"), max_lines=1)
    assert "dataset folder" in line and not out.exists()


@pytest.mark.timeout(300)
def test_b_predictions_missing_a_sequence_folder(davis, partial_predictions, tmp_path):
    args = ("--predictions", str(partial_predictions), "--data", str(davis), "--format", "davis", "--split", "val",
            "--out", str(tmp_path / "scores"), "--workers", "1")
    line = check_one_line(evaluate(*args), 2, "seq1", str(partial_predictions), max_lines=1)
    assert "no folder for sequence seq1" in line and str(partial_predictions / "seq1") in line
    check_debug(evaluate(*args, "--debug"), 2, "seq1", str(partial_predictions))


@pytest.mark.timeout(300)
def test_c_an_out_folder_that_cannot_be_created(davis, partial_predictions, tmp_path):
    shutil.copytree(davis / "Annotations" / "480p" / "seq1", tmp_path / "pred" / "seq1")
    shutil.copytree(partial_predictions / "seq0", tmp_path / "pred" / "seq0")
    pred = tmp_path / "pred"

    def score_into(out: str, *extra: str) -> subprocess.CompletedProcess:
        return evaluate("--predictions", str(pred), "--data", str(davis), "--out", out, "--workers", "1", *extra)

    # A system folder nobody may create anything in, root included (sysfs: EPERM, or EROFS where it is read-only)
    if Path("/sys/kernel").is_dir():  # sysfs is mounted (else /sys is a plain folder root could write in)
        sys_out = "/sys/s3vos-cli-test/out"
        line = check_one_line(score_into(sys_out), 2, sys_out, max_lines=1)
        assert "cannot create the results folder" in line
        assert any(w in line for w in ("not permitted", "permission denied", "read-only")), line
        check_debug(score_into(sys_out, "--debug"), 2, sys_out)
    # A file where a folder is wanted: the line says which
    line = check_one_line(score_into("/proc/version/out"), 2, "/proc/version/out", max_lines=1)
    assert "/proc/version is a file, not a folder" in line
    # A read-only parent folder (chmod 555): root writes through it, so this sub-case needs a normal user
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
        try:
            line = check_one_line(score_into(str(parent / "out")), 2, str(parent / "out"), max_lines=1)
            assert "permission denied" in line
        finally:
            parent.chmod(0o755)


# Makes every write to a file whose path matches S3VOS_FULL_RE fail as on a full disk: OSError ENOSPC from write(),
# naming no file, nothing written (tests/fault/inject/sitecustomize.py holds writes; it does not fail them).
FULL_DISK_PRELUDE = """
import builtins, errno, io, os, re
_pattern, _open = re.compile(os.environ['S3VOS_FULL_RE']), builtins.open

class _Full:
    def __init__(self, f):
        self._f = f
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()
        return False
    def __getattr__(self, name):
        return getattr(self._f, name)

def _open_full(file, mode='r', *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if any(c in mode for c in 'wax+') and isinstance(file, (str, os.PathLike)) and _pattern.search(os.fspath(file)):
        return _Full(f)
    return f

builtins.open = io.open = _open_full
"""


@pytest.mark.timeout(300)
def test_d_full_disk_while_writing_predictions(davis, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ("--checkpoint", str(tiny_checkpoint), "--data", str(davis), "--out", str(out), "--size", "64")
    env = {"S3VOS_FULL_RE": r"/Annotations/seq1/"}  # seq0's PNGs are written, seq1's first one fails
    proc = evaluate(*args, prelude=FULL_DISK_PRELUDE, **env)
    png = out / "Annotations" / "seq1" / "00000.png"
    line = check_one_line(proc, 4, str(png), str(out), "free of")
    assert line.startswith("error: disk full: ") and "no space left on device" in line
    assert not png.exists()  # no truncated prediction is left behind
    shutil.rmtree(out)
    check_debug(evaluate(*args, "--debug", prelude=FULL_DISK_PRELUDE, **env), 4, str(png))


@pytest.mark.timeout(300)
def test_d_really_full_tmpfs_while_writing_predictions(davis, tiny_checkpoint, tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "256k") as disk:
        fill(disk, leave=4096)  # room for one small PNG, not for the sequence
        out = disk / "out"
        proc = evaluate("--checkpoint", str(tiny_checkpoint), "--data", str(davis), "--out", str(out),
                        "--size", "64")
        line = check_one_line(proc, 4, str(out / "Annotations"), "free of")
        assert line.startswith("error: disk full: ") and "no space left on device" in line


# ------------------------------------------------------------------------------------------------ e: the trainer


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "training" / "train.py"), "--config", str(TRAIN_CONFIG), f"output_dir={out}",
            f"data.shards={shards}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment=cli-errors", "train.iterations=4", "checkpoint.every=2", "validation.every=0",
            "tracking.log_every=1", "tracking.system_metrics=false", "data.num_workers=0", "data.crop_size=64",
            "train.global_batch=2", *extra]


def train(args: list[str], preexec_fn=None) -> subprocess.CompletedProcess:
    return run([PY, *args], timeout=400, preexec_fn=preexec_fn)


def file_size_limit(limit: int):
    """A child whose files cannot grow past `limit` bytes: write() falls short (EFBIG) as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_status(out: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cli-errors").experiment_id])
    return run.info.status


def check_trainer_write_failed(proc: subprocess.CompletedProcess, out: Path, during: str = "checkpoint") -> str:
    """Exit 4, one line saying a file write failed (naming the file, OUTPUT's free space), no traceback, no
    'training goes on', nothing half-written left, the MLflow run FAILED."""
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "training goes on" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in screen_lines(proc.stderr) if x.startswith("error:")]
    assert line.startswith(f"error: a file write failed, most likely a full disk or quota: {during} "), line
    assert "unexpected pos" in line and "[enforce fail" not in line
    assert f"{out}: " in line and " free of " in line and "relaunch" in line
    if during == "checkpoint":
        assert str(out / "checkpoints" / "iter_0000002") in line
        assert not (out / "checkpoints" / "iter_0000002").exists()  # the incomplete checkpoint is gone
    else:
        assert str(out / "weights" / "iter_0000002") in line
        assert not [p.name for p in (out / "weights").iterdir()]  # no partial weights file
    assert run_status(out) == "FAILED"
    return line


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_e_trainer_short_write_during_a_checkpoint(reference_shards, tmp_path):
    """torch.save's zip writer on a short write says 'unexpected pos N vs M' (no errno): the trainer must call it
    a failed write, exit 4, mark the MLflow run FAILED, and not claim that training goes on."""
    out = tmp_path / "run"
    limit = file_size_limit(8 * 2**20)  # the tiny model's checkpoint files are 16 and 40 MiB
    check_trainer_write_failed(train(train_args(reference_shards, out), preexec_fn=limit), out)


@pytest.mark.timeout(300)
def test_e_trainer_output_folder_that_cannot_be_created(reference_shards, tmp_path):
    """An output_dir under /sys (not writable, even by root): one line naming it, exit 2, before DeepSpeed starts;
    --debug adds the traceback."""
    out = "/sys/s3vos-cli-test/run"
    check_one_line(train(train_args(reference_shards, Path(out))), 2, out, "output_dir")
    check_debug(train(train_args(reference_shards, Path(out)) + ["--debug"]), 2, out)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("size,during", [("30m", "checkpoint"), ("66m", "consolidated weights")])
def test_e_trainer_on_a_really_full_tmpfs(reference_shards, synth_data, tmp_path, size, during):
    """The output folder (checkpoints and MLflow's SQLite file) on a small tmpfs: at 30 MiB the first checkpoint
    (57 MiB) fills it; at 66 MiB the checkpoint fits and the validation's consolidated weights fill it. The
    partial files are released and removed, so MLflow's SQLite file still records the run as FAILED."""
    with small_tmpfs(tmp_path / "tmpfs", size) as disk:
        out = disk / "run"
        extra = [] if during == "checkpoint" else [
            "validation.every=2", f"validation.root={synth_data / 'DAVIS'}", "validation.max_sequences=1"]
        check_trainer_write_failed(train(train_args(reference_shards, out, *extra)), out, during)


# ------------------------------------------------------------------------------------------------ f: other CLIs


@pytest.mark.timeout(300)
def test_f_convert_missing_input(tmp_path):
    missing = tmp_path / "cutie-base.pth"
    args = ("--from", "cutie", str(missing), str(tmp_path / "ours.pt"))
    line = check_one_line(run_cli("model.convert", *args), 2, str(missing), max_lines=1)
    assert "not found" in line and not (tmp_path / "ours.pt").exists()
    check_debug(run_cli("model.convert", *args, "--debug"), 2, str(missing))


@pytest.mark.timeout(300)
def test_f_logged_model_missing_folder(tmp_path):
    missing = tmp_path / "downloaded-model"
    line = check_one_line(run_cli("training.logged_model", str(missing)), 2, str(missing), max_lines=1)
    assert "logged model folder not found" in line
    check_debug(run_cli("training.logged_model", str(missing), "--debug"), 2, str(missing))


@pytest.mark.timeout(300)
def test_f_summary_unknown_config(tmp_path):
    line = check_one_line(run_cli("model.summary", "--config", "nosuch"), 2, "nosuch", max_lines=1)
    assert "unknown model config" in line
    missing = tmp_path / "nosuch.yaml"
    line = check_one_line(run_cli("model.summary", "--config", str(missing)), 2, str(missing), max_lines=1)
    assert "not found" in line
    check_debug(run_cli("model.summary", "--config", "nosuch", "--debug"), 2, "nosuch")


@pytest.mark.timeout(300)
def test_f_visualize_missing_image_or_weights(davis, tmp_path):
    image, out = tmp_path / "frame.jpg", tmp_path / "viz"
    line = check_one_line(run_cli("model.visualize", "--config", "tiny", "--image", str(image), "--out", str(out)),
                          2, str(image), max_lines=1)
    assert "image not found" in line
    check_debug(run_cli("model.visualize", "--config", "tiny", "--image", str(image), "--out", str(out), "--debug"),
                2, str(image))
    frame = davis / "JPEGImages" / "480p" / "seq0" / "00000.jpg"
    weights = tmp_path / "weights.pt"
    line = check_one_line(run_cli("model.visualize", "--config", "tiny", "--image", str(frame), "--weights",
                                  str(weights), "--out", str(out)), 2, str(weights), max_lines=1)
    assert "weights file not found" in line and not out.exists()


# ------------------------------------------------------------------------------------------------ g: the data CLIs


@pytest.mark.timeout(300)
def test_g_synth_writes_what_was_asked_and_says_so(tmp_path):
    out = tmp_path / "vos"
    proc = run_cli("data_pipeline.synth", "--out", str(out), "--small", "--videos", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "YouTubeVOS 5, DAVIS 5 train + 2 val, OVIS 5, MOSE 5, BURST 5 videos" in proc.stdout, proc.stdout
    train = (out / "DAVIS" / "ImageSets" / "2017" / "train.txt").read_text().split()
    assert len(train) == 5 and len(list((out / "YouTubeVOS" / "train" / "JPEGImages").iterdir())) == 5
    again = run_cli("data_pipeline.synth", "--out", str(out), "--small")  # would mix two data sets: refused
    check_one_line(again, 2, str(out), "already holds")


@pytest.mark.timeout(300)
def test_g_shard_job_refusals_are_one_line(tmp_path):
    config = ROOT / "data_pipeline" / "configs" / "demo.yaml"
    missing = tmp_path / "no-such-data"
    proc = run_cli("data_pipeline.shard", "--config", str(config), "--data-root", str(missing), "--out",
                   str(tmp_path / "shards"))
    check_one_line(proc, 2, str(missing))
    assert not (tmp_path / "shards").exists()
    check_debug(run_cli("data_pipeline.shard", "--config", str(config), "--data-root", str(missing), "--out",
                        str(tmp_path / "shards"), "--debug"), 2, str(missing))
    proc = run_cli("data_pipeline.shard", "--config", str(tmp_path / "nope.yaml"), "--data-root", str(tmp_path))
    check_one_line(proc, 2, str(tmp_path / "nope.yaml"), "not found")
    proc = run_cli("data_pipeline.shard", "--config", str(config), "--data-root", str(tmp_path), "clips_per_shard=0")
    check_one_line(proc, 2, "clips_per_shard=0")
