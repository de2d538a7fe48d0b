"""Issue "Operator experience", loopback by default (row 8c of docs/reliability.md): the local Ray that the shard job
starts when no cluster address is given listens on 127.0.0.1 only, and runs with token authentication on.

The real job (`python -m data_pipeline.shard`, demo config, small synthetic data) is held by tests/fault/inject
while a Ray worker writes its first shard, so the driver, gcs_server, raylet, the workers and the agents are all up.
The test then maps the socket inodes held open by that process tree (/proc/PID/fd) to the kernel's tables of
listening TCP sockets (/proc/net/tcp, /proc/net/tcp6, state 0A) and fails on any that accepts connections from
another machine: 0.0.0.0, ::, or an address that is not 127.0.0.0/8, ::1 or ::ffff:127.x.x.x."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import shard_cmd
from .helpers import ROOT, child_env, descendants, sigkill_tree, wait_held

pytestmark = [pytest.mark.fault]

LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def show(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(addr, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(addr)  # Python 3.11 prints ::ffff:7f00:1


def is_loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, what gRPC binds for 127.0.0.1 on a dual-stack socket
    return addr.is_loopback


def _socket_owners(pids: list[int]) -> dict[str, str]:
    """socket inode -> 'name[pid]' of a process in `pids` that holds it open."""
    owners = {}
    for pid in pids:
        try:
            name = (Path("/proc") / str(pid) / "comm").read_text().strip()
            fds = list((Path("/proc") / str(pid) / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(target[len("socket:["):-1], f"{name}[{pid}]")
    return owners


def listening_sockets(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process, address, port) of every TCP socket in LISTEN state that a process in `pids` holds open."""
    owners = _socket_owners(pids)
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if state != LISTEN or inode not in owners:
                continue
            addr, port = local.split(":")
            out.append((owners[inode], show(_address(addr)), int(port, 16)))
    return sorted(out)


def test_address_decoding():
    assert str(_address("0100007F")) == "127.0.0.1"
    assert str(_address("00000000")) == "0.0.0.0"
    assert str(_address("020200C0")) == "192.0.2.2"
    assert str(_address("00000000000000000000000001000000")) == "::1"
    assert show(_address("0000000000000000FFFF00000100007F")) == "::ffff:127.0.0.1"
    assert is_loopback(_address("0000000000000000FFFF00000100007F")) and is_loopback(_address("0100007F"))
    assert not is_loopback(_address("00000000000000000000000000000000"))  # ::
    assert not is_loopback(_address("0000000000000000FFFF0000020200C0"))  # ::ffff:192.0.2.2
    assert not is_loopback(_address("00000000")) and not is_loopback(_address("020200C0"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_ray_of_the_shard_job_listens_on_loopback_only(synth_data, tmp_path):
    out, fault_dir, home = tmp_path / "shards", tmp_path / "fault", tmp_path / "home"
    fault_dir.mkdir()
    home.mkdir()
    env = child_env(r"hold:write=\.tar:nth=1:name=point", fault_dir, HOME=str(home))
    for var in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)  # the defaults a user gets: no cluster named, no auth settings of their own
    proc = subprocess.Popen(shard_cmd(synth_data, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_held(proc, fault_dir, "point", timeout=300)
        tree = descendants(proc.pid)
        sockets = listening_sockets(tree)
    finally:
        sigkill_tree(proc)
    log = proc.stdout.read()
    listed = "\n".join(f"  {who} {addr}:{port}" for who, addr, port in sockets)

    # The test can fail: Ray's processes were found and they do listen (GCS, raylet, object manager, workers, ...).
    names = {who.split("[")[0] for who, _, _ in sockets}
    assert len(sockets) >= 6 and {"gcs_server", "raylet"} <= names, \
        f"expected the local Ray's listening sockets, found {len(sockets)} in {len(tree)} processes:\n{listed}"
    public = [(who, addr, port) for who, addr, port in sockets if not is_loopback(ipaddress.ip_address(addr))]
    assert not public, "the shard job's local Ray listens beyond loopback:\n" + "\n".join(
        f"  {who} {addr}:{port}" for who, addr, port in public) + f"\nall listening sockets:\n{listed}"

    # Token authentication: on, set explicitly (no "enabled by default ... opt out" warning), and the token that
    # was generated for this user is readable by them only.
    assert "Token authentication is enabled for this Ray cluster" not in log, log[-3000:]
    assert "Token authentication is disabled" not in log, log[-3000:]
    token = home / ".ray" / "auth_token"
    assert token.is_file(), f"no token in {token}:\n{log[-3000:]}"
    assert stat.S_IMODE(token.stat().st_mode) & 0o077 == 0, oct(token.stat().st_mode)


MLFLOW = ROOT / "cluster" / "mlflow"


def _default(value: str) -> str:
    """A compose value with each ${VAR:-default} / ${VAR-default} replaced by its default: what an empty .env gives."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def test_tracking_server_is_published_on_loopback_unless_the_env_file_says_otherwise():
    """cluster/mlflow/docker-compose.yaml: every published port, with .env left at its defaults, is on the host's
    127.0.0.1; the MLflow port's address is MLFLOW_PUBLISH_ADDR, which server.env.example documents."""
    services = yaml.safe_load((MLFLOW / "docker-compose.yaml").read_text())["services"]
    published = [(name, str(p)) for name, s in services.items() for p in s.get("ports", [])]
    assert any(name == "mlflow" for name, _ in published), published
    for name, spec in published:
        parts = _default(spec).rsplit(":", 2)  # [host address:]host port:container port
        host = parts[0].strip("[]") if len(parts) == 3 else ""
        assert host and ipaddress.ip_address(host).is_loopback, \
            f"{name} publishes {spec!r} beyond the host's loopback by default"
    mlflow_port = next(spec for name, spec in published if name == "mlflow")
    assert mlflow_port.startswith("${MLFLOW_PUBLISH_ADDR:-127.0.0.1}:"), mlflow_port
    example = (MLFLOW / "server.env.example").read_text()
    assert re.search(r"^MLFLOW_PUBLISH_ADDR=127\.0\.0\.1$", example, flags=re.M), "server.env.example"


def test_tracking_server_answers_local_host_names_by_default():
    """entrypoint.sh: without MLFLOW_ALLOWED_HOSTS, --allowed-hosts lists this machine's names (host and host:port,
    as MLflow compares the Host header), never "*" (which turns MLflow's DNS-rebinding check off)."""
    entry = (MLFLOW / "entrypoint.sh").read_text()
    default = re.search(r'allowed_hosts="\$\{MLFLOW_ALLOWED_HOSTS:-([^"]*)\}"', entry)
    assert default, "entrypoint.sh: no allowed_hosts default"
    hosts = default.group(1).split(",")
    assert "*" not in hosts and {"localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:5000"} <= set(hosts), hosts
    assert '--allowed-hosts "${allowed_hosts}"' in entry
    env = yaml.safe_load((MLFLOW / "docker-compose.yaml").read_text())["services"]["mlflow"]["environment"]
    assert _default(env["MLFLOW_ALLOWED_HOSTS"]) == "", "compose must leave the default to entrypoint.sh"
