"""Issue 9, item 8: untrusted files. Every torch.load in the project refuses pickled code (weights_only=True), no
project code unpickles by other means, and the servers the project starts locally bind to 127.0.0.1 by default."""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .helpers import PY, ROOT, child_env, free_port

pytestmark = [pytest.mark.fault]
PRODUCT = ("model", "training", "data_pipeline", "benchmarks", "cluster")
SOURCES = sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_there_is_code_to_check():
    assert any(p.parts[-2] == "training" for p in SOURCES) and len(SOURCES) > 10


UNPICKLERS = ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "torch.jit.load",
              "mlflow.pytorch.load_model", "dill.load", "dill.loads", "joblib.load")


def unsafe_loads(paths, product: bool) -> tuple[int, list[str]]:
    """(number of torch.load calls seen, problems): torch.load without weights_only=True anywhere (in tests, except
    on a line marked `# guarded:`, a deliberate load inside refuse_pickled_code); in product code, any other call
    that unpickles."""
    bad, seen = [], 0
    for path in paths:
        lines = path.read_text().splitlines()
        for node, name in _calls(path):
            where = f"{path}:{node.lineno}"
            if name == "torch.load":
                seen += 1
                if not product and "# guarded:" in lines[node.lineno - 1]:
                    continue  # a test's deliberate load inside training.checkpoint.refuse_pickled_code
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if product and name in UNPICKLERS:
                bad.append(f"{where}: {name} can run code from the file it reads")
    return seen, bad


def test_every_torch_load_says_weights_only_true():
    """AST check (a grep that line breaks cannot fool): torch.load(..., weights_only=True) everywhere, product and
    tests alike; nothing else that unpickles (pickle, torch.jit.load, MLflow's pickled-model loader) in product code."""
    seen, bad = unsafe_loads(SOURCES, product=True)
    seen_tests, bad_tests = unsafe_loads(sorted((ROOT / "tests").rglob("*.py")), product=False)
    assert seen >= 3, "found no torch.load at all: is the scan looking at the right tree?"
    assert not bad + bad_tests, "\n".join(bad + bad_tests)


def test_the_scan_catches_unsafe_loads(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import torch, pickle\na = torch.load('a')\nb = torch.load('b', weights_only=False)\n"
                 "c = torch.load('c',\n    map_location='cpu', weights_only=True)\nd = pickle.loads(b'')\n")
    seen, bad = unsafe_loads([f], product=True)
    assert seen == 3 and len(bad) == 3 and "x.py:6: pickle.loads" in bad[-1]
    g = tmp_path / "test_x.py"  # the marker exempts a test's line, never product code's
    g.write_text("import torch\na = torch.load('a')  # guarded: inside refuse_pickled_code\nb = torch.load('b')\n")
    assert unsafe_loads([g], product=False) == (2, [f"{g}:3: torch.load without weights_only=True"])
    assert len(unsafe_loads([g], product=True)[1]) == 2


def test_safe_load_refuses_a_pickled_payload(tmp_path):
    """The loaders the project routes DeepSpeed's files through refuse a checkpoint that would run code."""
    from training import checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": torch.ones(1), "x": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.safe_torch_load(evil)
    net = torch.nn.Linear(1, 1)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_weights(net, evil)
    assert not marker.exists()


class _ShellPayload:
    """Unpickling it runs a shell command (what an attacker's checkpoint would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _booby_trap(file: Path, marker: Path) -> None:
    """Rewrite `file` as a pickle that, loaded with weights_only=False, touches `marker`."""
    torch.save({"state": torch.zeros(2), "payload": _ShellPayload(f"touch {marker}")}, file)


def _loads(*triples: str) -> list[dict]:
    proc = subprocess.run([PY, str(Path(__file__).with_name("checkpoint_load_worker.py")), "load", *triples],
                          cwd=ROOT, env=child_env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=300)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and len(lines) == len(triples) // 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    return lines


@pytest.mark.timeout(600)
def test_booby_trapped_checkpoints_raise_and_run_nothing(tmp_path):
    """A checkpoint whose files would run a shell command when unpickled, fed to training.checkpoint.load in a real
    DeepSpeed engine, plain (ZeRO-1) and universal (cluster/deepspeed/to_universal.sh, load_universal=true), and to
    the converter itself: each load raises UnpicklingError naming the file, and no command runs. The untouched
    checkpoints load under the same guard, Adam's moments included (the guard refuses code, not checkpoints)."""
    plain = tmp_path / "plain"
    proc = subprocess.run([PY, str(Path(__file__).with_name("checkpoint_load_worker.py")), "save", str(plain)],
                          cwd=ROOT, env=child_env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(proc.stdout.splitlines()[-1])
    universal = tmp_path / "universal"
    to_universal = ["bash", str(ROOT / "cluster" / "deepspeed" / "to_universal.sh")]
    proc = subprocess.run([*to_universal, str(plain), str(universal)], cwd=ROOT,
                          env=child_env(PYTHON=PY, WORKERS="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = "iter_0000002"
    traps = {  # name: (the checkpoint to copy, the file in it to booby-trap, universal)
        "plain_optimizer": (plain, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "0"),
        "plain_model": (plain, "mp_rank_00_model_states.pt", "0"),
        "universal_optimizer_state": (universal, "zero/optimizer_state.pt", "1"),
        "universal_exp_avg": (universal, "zero/a.weight/exp_avg.pt", "1"),
        "universal_fp32": (universal, "zero/b.bias/fp32.pt", "1"),
    }
    triples, markers = [str(plain), tag, "0", str(universal), tag, "1"], {}
    for name, (src, rel, uni) in traps.items():
        root = tmp_path / name
        shutil.copytree(src / tag, root / tag)
        markers[name] = tmp_path / f"pwned_{name}"
        _booby_trap(root / tag / rel, markers[name])
        triples += [str(root), tag, uni]
    results = _loads(*triples)
    clean_plain, clean_universal = results[:2]
    assert clean_plain == {"loaded": 2, "moments": pytest.approx(saved["moments"], rel=1e-6)}, clean_plain
    assert clean_universal == {"loaded": 2, "moments": pytest.approx(saved["moments"], rel=1e-6)}, clean_universal
    assert saved["moments"] > 0
    ran = [f"{name} ({rel})" for name, (_, rel, _) in traps.items() if markers[name].exists()]
    assert not ran, f"loading these booby-trapped files ran the payload's command: {ran}"
    for (name, (_, rel, _)), got in zip(traps.items(), results[2:], strict=True):
        assert got.get("error") == "UnpicklingError", (name, got)
        assert rel.split("/")[-1] in got["message"], (name, got["message"])

    # the converter reads the checkpoint it is pointed at: same refusal, nothing written as a finished conversion
    trapped = tmp_path / "to_convert"
    shutil.copytree(plain / tag, trapped / tag)
    marker = tmp_path / "pwned_converter"
    _booby_trap(trapped / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    proc = subprocess.run([*to_universal, str(trapped), str(tmp_path / "converted")], cwd=ROOT,
                          env=child_env(PYTHON=PY, WORKERS="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "converted" / tag).exists()


def test_local_ray_dashboard_defaults_to_localhost():
    """ray.init's dashboard binds 127.0.0.1 unless told otherwise; no project ray.init tells it otherwise."""
    import ray

    assert inspect.signature(ray.init).parameters["dashboard_host"].default == "127.0.0.1"
    for path in SOURCES:
        for node, name in _calls(path):
            if name.endswith("ray.init"):
                for k in node.keywords:
                    if k.arg == "dashboard_host":
                        assert isinstance(k.value, ast.Constant) and k.value.value == "127.0.0.1", \
                            f"{path.relative_to(ROOT)}:{node.lineno} binds the dashboard to {ast.unparse(k.value)}"


def test_public_binds_are_only_in_cluster_manifests():
    """0.0.0.0 appears only in the cluster deployment files (behind Ray token auth / MLflow basic-auth), never
    in what `make demo`, the tests' helpers or the local commands in the docs start."""
    offenders = []
    for d in ("model", "training", "data_pipeline", "benchmarks", "docs"):
        for p in (ROOT / d).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".txt") and "0.0.0.0" in p.read_text():
                offenders.append(str(p.relative_to(ROOT)))
    for name in ("README.md", "Makefile"):
        if "0.0.0.0" in (ROOT / name).read_text():
            offenders.append(name)
    assert not offenders, offenders
    for cmd in re.findall(r"mlflow (?:ui|server)[^\n`]*", (ROOT / "README.md").read_text()):
        host = re.search(r"--host[ =](\S+)", cmd)
        assert host is None or host.group(1) == "127.0.0.1", cmd


@pytest.mark.timeout(90)
def test_mlflow_ui_as_documented_listens_on_localhost_only(tmp_path):
    """Start `mlflow ui` the way the README/demo say and read the kernel's socket table: 127.0.0.1 only."""
    from mlflow import cli

    assert next(p for p in cli.server.params if p.name == "host").default == "127.0.0.1"
    port = free_port()
    mlflow_bin = Path(__import__("sys").executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                             "--port", str(port), "--workers", "1"], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        listening = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not listening:
            listening = _listeners(port)
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}")
            time.sleep(0.3)
        assert listening, "mlflow ui never listened"
        assert set(listening) == {"127.0.0.1"}, listening
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _listeners(port: int) -> list[str]:
    """IPv4/IPv6 addresses in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:
                continue
            if v6:
                out.append("::" if set(addr) == {"0"} else "::1" if addr.endswith("01000000") else addr)
            else:
                b = bytes.fromhex(addr)[::-1]
                out.append(".".join(str(x) for x in b))
    return out
