"""Issue 9, item 1: the Ray sharding job SIGKILLed during a shard write, between two shards and during the manifest.
After each kill no tar is visible under its final name unless it is complete (byte-identical to the uninterrupted
run's), and rerunning the same command finishes with tars byte-identical to an uninterrupted run.

The kill points are file-level hooks of tests/fault/inject (a write to a `.tar`, a completed `.stats.json`, a write
to the manifest), so they hold the real job at that point whatever writes the files; the test then SIGKILLs the
whole process tree (driver, raylet, workers)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import run_shard, shard_cmd
from .helpers import ROOT, child_env, sigkill_tree, wait_held

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


POINTS = [
    # (id, directive: hold the first process that reaches it)
    ("during-shard-write", r"hold:write=\.tar:nth=2:name=point"),
    ("between-shards", r"hold:done=\.stats\.json$:nth=1:name=point"),
    ("during-manifest", r"hold:write=manifest\.json:nth=1:name=point"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("point,directive", POINTS, ids=[p[0] for p in POINTS])
def test_killed_shard_job_reruns_to_identical_tars(synth_data, reference_shards, tmp_path, point, directive):
    data, reference = synth_data, reference_shards
    out, fault_dir = tmp_path / "shards", tmp_path / "fault"
    fault_dir.mkdir()
    proc = subprocess.Popen(shard_cmd(data, out), cwd=ROOT, env=child_env(directive, fault_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        held = wait_held(proc, fault_dir, "point", timeout=300)
    finally:
        sigkill_tree(proc, extra_pids=tuple(_held_pids(fault_dir)))
    assert held["point"]

    # After the kill: a tar under its final name is a complete one, never a partial one.
    ref = tars(reference)
    for name, blob in tars(out).items():
        assert name in ref and blob == ref[name], f"{point}: {name} is visible but not the complete shard"
    manifest = out / "manifest.json"
    if manifest.exists():  # never a half-written manifest under the final name
        json.loads(manifest.read_text())

    run_shard(data, out)  # the same command again
    again = tars(out)
    assert sorted(again) == sorted(ref), f"{point}: rerun wrote other shards"
    for name in ref:
        assert again[name] == ref[name], f"{point}: {name} differs from the uninterrupted run"
    assert not [p for p in out.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))], \
        "temporary files left after the rerun finished"
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((reference / "manifest.json").read_text())
    assert _counts(a) == _counts(b)


def _held_pids(fault_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in fault_dir.glob("*.held")]


def _counts(manifest: dict) -> dict:
    """The integer counts of a manifest (timings and paths may differ between runs)."""
    return {k: v for k, v in manifest.items() if isinstance(v, int) and not isinstance(v, bool)}
