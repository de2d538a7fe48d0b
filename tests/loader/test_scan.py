"""The fast tar header scan gives tarfile's answer (or leaves the tar to tarfile)."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.loader import BadShard, _scan_plain, _scan_tarfile, scan_shard
from tests.loader.helpers import small_set


def _tar(path, members, fmt=tarfile.PAX_FORMAT, extra=()):
    with tarfile.open(path, "w", format=fmt) as t:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            t.addfile(info, io.BytesIO(blob))
        for info in extra:
            t.addfile(info)
    return path


def _members(key, n=3):
    return [(f"{key}.{t:02d}.jpg", b"j" * (100 + t)) for t in range(n)] + [(f"{key}.json", b"{}"), (f"{key}.pyd", b"x")]


def test_fast_scan_equals_tarfile(tmp_path, job_shards):
    tars = sorted(job_shards.glob("skip*/*.tar"))  # the shard job's own tars (plain ustar members)
    small_set(tmp_path / "wds")
    tars += sorted((tmp_path / "wds").glob("skip*/*.tar"))  # webdataset's TarWriter (pax headers)
    long_key = "youtubevos_" + "v" * 150 + "_skip05_3"  # a name only a pax record can hold
    tars.append(_tar(tmp_path / "long.tar", _members("a_b_skip05_0") + _members(long_key)))
    tars.append(_tar(tmp_path / "ustar.tar", _members("a_b_skip05_0") + _members("dir/a_c_skip05_1"),
                     fmt=tarfile.USTAR_FORMAT))
    for tar in tars:
        fast = _scan_plain(tar)
        assert fast is not None and fast == _scan_tarfile(tar), tar
    assert any(k == long_key for k, _ in _scan_plain(tmp_path / "long.tar"))


def test_unusual_tars_are_left_to_tarfile(tmp_path):
    d = tarfile.TarInfo("somedir")
    d.type = tarfile.DIRTYPE
    gnu = _tar(tmp_path / "gnu.tar", _members("a_" + "b" * 120 + "_skip05_0"), fmt=tarfile.GNU_FORMAT)
    with_dir = _tar(tmp_path / "dir.tar", _members("a_b_skip05_0"), extra=[d])
    for tar in (gnu, with_dir):
        assert _scan_plain(tar) is None
        assert scan_shard(tar) == _scan_tarfile(tar) and len(scan_shard(tar)) == 1


def test_truncated_member_is_a_bad_shard_either_way(tmp_path):
    tar = _tar(tmp_path / "t.tar", _members("a_b_skip05_0") + [("a_b_skip05_1.00.jpg", b"z" * 5000)])
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(b"z" * 100) + 1000])  # cut inside the last member's data
    with pytest.raises(BadShard, match="truncated"):
        _scan_plain(tar)
    with pytest.raises(BadShard, match="truncated"):
        _scan_tarfile(tar)
