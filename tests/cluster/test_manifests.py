"""cluster/: every script parses, every YAML parses and says what the tools it is written for accept.

Real tools where they exist: `bash -n`; Ray's own cluster-config schema and RuntimeEnv; DeepSpeed's launcher
argument parser; `mlflow server --help`; `kubectl kustomize` (offline). `kubectl apply --dry-run=client` needs an
API server and `docker compose config` needs the compose plugin: those two are skipped, with the reason, when
absent — the structural checks next to them run regardless.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCRIPTS = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.slurm")])
YAMLS = sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])


def _load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kubernetes_docs() -> list[tuple[Path, dict]]:
    out = []
    for p in YAMLS:
        for d in _load_all(p):
            if isinstance(d, dict) and "apiVersion" in d and "kind" in d and d["kind"] != "Kustomization":
                out.append((p, d))
    return out


def _pyproject_pins() -> dict[str, str]:
    """name → version spec of pyproject.toml's [project] dependencies and its s3/gcs extras (read as text:
    tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):]
    block = block[:block.index("\n]")]
    deps = re.findall(r'^\s*"([^"]+)"', block, flags=re.M)
    deps += re.findall(r'^(?:s3|gcs) = \["([^"]+)"\]', text, flags=re.M)  # the object-storage extras
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", d)
        pins[m.group(1).lower()] = m.group(3).replace(" ", "")
    return pins


# ----------------------------------------------------------------------------------------------- scripts


def test_scripts_exist_and_parse():
    names = {p.name for p in SCRIPTS}
    assert {"node_launch.sh", "train.slurm", "launch_pdsh.sh", "submit_shard.sh", "entrypoint.sh"} <= names
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p}: {r.stderr}"
        assert os.access(p, os.X_OK), f"{p} is not executable"
        assert p.read_text().startswith("#!/usr/bin/env bash"), p


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    r = subprocess.run(["shellcheck", "-S", "warning", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _node_launch(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(CLUSTER / "deepspeed" / "node_launch.sh"), "training/configs/demo_cpu.yaml"],
                          env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(60)
def test_node_launch_refuses_an_incomplete_allocation(tmp_path):
    r = _node_launch({}, tmp_path)
    assert r.returncode != 0 and "SLURM_NNODES" in r.stderr
    r = _node_launch({"SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a,b"}, tmp_path)
    assert r.returncode == 2 and "3 nodes expected" in r.stderr
    r = _node_launch({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]"}, tmp_path)
    if shutil.which("scontrol") is None:
        assert r.returncode == 2 and "scontrol" in r.stderr
    r = _node_launch({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a", "GPUS_PER_NODE": "1",
                      "LAUNCHER": "mpirun"}, tmp_path)
    assert r.returncode == 2 and "LAUNCHER must be" in r.stderr


def test_deepspeed_launcher_accepts_our_flags():
    """The exact launcher flags node_launch.sh and launch_pdsh.sh pass, through DeepSpeed's own parser."""
    from deepspeed.launcher.runner import parse_args

    text = (CLUSTER / "deepspeed" / "node_launch.sh").read_text()
    for flag in ("--hostfile", "--no_ssh", "--num_nodes", "--node_rank", "--num_gpus", "--master_addr", "--master_port"):
        assert flag in text, flag
    a = parse_args(["--hostfile", "/tmp/h", "--no_ssh", "--num_nodes", "2", "--node_rank", "1", "--num_gpus", "8",
                    "--master_addr", "10.0.0.1", "--master_port", "29500", "training/train.py", "--config", "c.yaml"])
    assert a.no_ssh and a.node_rank == 1 and a.num_nodes == 2 and a.user_script == "training/train.py"
    a = parse_args(["--hostfile", "/tmp/h", "--launcher", "pdsh", "--master_addr", "n1", "--master_port", "29500",
                    "training/train.py", "--config", "c.yaml"])
    assert a.launcher == "pdsh"


def test_nccl_env_is_plain_key_value():
    lines = [ln for ln in (CLUSTER / "deepspeed" / "nccl.env").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines
    keys = set()
    for ln in lines:
        assert re.match(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$", ln), f"not KEY=VALUE: {ln!r}"
        keys.add(ln.split("=", 1)[0])
    assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS"} <= keys


def test_hostfile_example_parses_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(CLUSTER / "deepspeed" / "hostfile.example"))
    assert len(pool) >= 2 and all(v == 8 for v in pool.values())


# ------------------------------------------------------------------------------------------------ YAML


def test_every_yaml_parses():
    assert len(YAMLS) >= 8
    for p in YAMLS:
        docs = _load_all(p)
        assert docs, f"{p} is empty"


def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    # What `ray up` does first: fill in the provider's defaults, then check against Ray's JSON schema (raises on
    # any key the schema does not know, a wrong type, a missing required field).
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "the head must not run shard tasks"
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert any("/shared" in c for c in cfg["initialization_commands"]), "nodes must mount the shared storage"
    assert any("pip install" in c and "-e" in c for c in cfg["setup_commands"]), "nodes must install the project"


def test_runtime_envs_are_valid_and_pinned_like_pyproject():
    from ray.runtime_env import RuntimeEnv

    plain = yaml.safe_load((CLUSTER / "ray" / "runtime_env.yaml").read_text())
    RuntimeEnv(**plain)  # Ray's own validation of every field
    assert plain["working_dir"] == "." and "pip" not in plain
    env = yaml.safe_load((CLUSTER / "ray" / "runtime_env.pip.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    pins = _pyproject_pins()
    packages = env["pip"]["packages"]
    constraint = [p for p in packages if p.startswith("-c ")]
    assert constraint == ["-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints/cpu.txt"]
    assert (ROOT / "constraints" / "cpu.txt").is_file()
    for req in packages:
        if req.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", req.replace(" ", ""))
        name, spec = m.group(1).lower(), m.group(2)
        assert name in pins, f"runtime_env pip '{name}' is not a project dependency"
        assert spec == pins[name], f"runtime_env pins {name}{spec}, pyproject.toml {name}{pins[name]}"


def test_kuberay_manifests():
    import ray
    from ray.runtime_env import RuntimeEnv

    docs = {d["kind"]: d for p, d in _kubernetes_docs() if d["apiVersion"] == "ray.io/v1"}
    assert {"RayCluster", "RayJob"} <= set(docs)
    pvcs = {d["metadata"]["name"] for _, d in _kubernetes_docs() if d["kind"] == "PersistentVolumeClaim"}
    job = docs["RayJob"]["spec"]
    specs = [docs["RayCluster"]["spec"], job["rayClusterSpec"]]
    for spec in specs:
        assert spec["rayVersion"] == ray.__version__, "KubeRay rayVersion must match the pinned ray"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = spec["workerGroupSpecs"]
        assert groups
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
        for pod in pods:
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims and claims <= pvcs, f"pods mount {claims}, manifests define {pvcs}"
            assert any(m["mountPath"] == "/shared" for c in pod["containers"] for m in c["volumeMounts"])
    entry = job["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "data_pipeline.shard"]
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config.removeprefix("/opt/s3vos/")).is_file(), f"RayJob config {config} not in the repository"
    RuntimeEnv(**yaml.safe_load(job["runtimeEnvYAML"]))
    assert job["shutdownAfterJobFinishes"] is True


def test_kubernetes_objects_are_well_formed():
    docs = _kubernetes_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service",
            "ConfigMap"} <= kinds
    for p, d in docs:
        assert d["metadata"].get("name"), f"{p}: {d['kind']} without a name"
        if d["kind"] in ("Deployment", "StatefulSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert sel.items() <= labels.items(), f"{p}: selector {sel} does not match the pod labels {labels}"
    # The MLflow pod gets its settings from the ConfigMap + Secret the entrypoint reads.
    mlflow = [d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"][0]
    config = [d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-config"][0]
    entry = (CLUSTER / "mlflow" / "entrypoint.sh").read_text()
    needed = set(re.findall(r"\$\{([A-Z_]+)(?::-[^}]*)?(?::\?[^}]*)?\}", entry))
    provided = set(config["data"]) | {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert needed <= provided, f"entrypoint reads {sorted(needed - provided)} that the manifest never sets"
    refs = {e["secretRef"]["name"] for e in mlflow["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "secretRef" in e}
    assert refs == {"mlflow-secrets"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.timeout(120)
def test_kubectl_kustomize_builds_offline():
    for d in (CLUSTER / "ray" / "kuberay", CLUSTER / "mlflow" / "k8s"):
        r = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{d}: {r.stderr}"
        assert all(doc.get("kind") for doc in yaml.safe_load_all(r.stdout) if doc)


def _kubectl_server_reachable() -> bool:
    if shutil.which("kubectl") is None:
        return False
    r = subprocess.run(["kubectl", "version", "--request-timeout=3s"], capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.timeout(120)
def test_kubectl_dry_run_client():
    if not _kubectl_server_reachable():
        pytest.skip("kubectl --dry-run=client needs a reachable API server (for the kinds' REST mapping); none here")
    for p in {p for p, _ in _kubernetes_docs()}:
        r = subprocess.run(["kubectl", "apply", "--dry-run=client", "-f", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p}: {r.stderr}"


# --------------------------------------------------------------------------------------------- MLflow


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_compose_file_structure():
    path = CLUSTER / "mlflow" / "docker-compose.yaml"
    c = yaml.safe_load(path.read_text())
    services = c["services"]
    assert {"postgres", "mlflow"} <= set(services)
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (path.parent / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in c.get("volumes", {}), f"{name} uses undeclared volume {src}"
        if "build" in s:
            assert (path.parent / s["build"] / "Dockerfile").is_file()
    # Every variable the compose file requires is in the example env file users copy.
    example = dict(ln.split("=", 1) for ln in (CLUSTER / "mlflow" / "server.env.example").read_text().splitlines()
                   if ln and not ln.startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_]+)(?::\?[^}]*)?\}", path.read_text()))
    assert required <= set(example), f"missing from server.env.example: {sorted(required - set(example))}"
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and env["MLFLOW_S3_ENDPOINT_URL"]


@pytest.mark.timeout(120)
def test_docker_compose_config(tmp_path):
    if not _compose_plugin():
        pytest.skip("`docker compose` (the compose plugin) is not installed here")
    env_file = tmp_path / ".env"
    shutil.copy(CLUSTER / "mlflow" / "server.env.example", env_file)
    r = subprocess.run(["docker", "compose", "--env-file", str(env_file), "-f",
                        str(CLUSTER / "mlflow" / "docker-compose.yaml"), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(120)
def test_mlflow_server_accepts_the_entrypoint_flags():
    entry = (CLUSTER / "mlflow" / "entrypoint.sh").read_text()
    flags = set(re.findall(r"^\s+(--[a-z][a-z\-]+)", entry, flags=re.M))
    assert {"--app-name", "--backend-store-uri", "--artifacts-destination", "--serve-artifacts"} <= flags
    r = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    for flag in flags:
        assert flag in r.stdout, f"mlflow server has no {flag}"
    assert "basic-auth" in r.stdout


def test_client_env_names_are_mlflow_settings():
    import mlflow.environment_variables as ev

    known = {v.name for v in vars(ev).values() if isinstance(getattr(v, "name", None), str)}
    for f in ("client.env",):
        for ln in (CLUSTER / "mlflow" / f).read_text().splitlines():
            if ln and not ln.startswith("#"):
                key = ln.split("=", 1)[0]
                assert key in known, f"{f}: {key} is not an MLflow environment variable"


def test_to_universal_refuses_a_folder_without_a_complete_checkpoint(tmp_path):
    (tmp_path / "iter_0000010").mkdir()  # a save that died before its COMPLETE marker
    r = subprocess.run(["bash", str(CLUSTER / "deepspeed" / "to_universal.sh"), str(tmp_path), str(tmp_path / "u")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr
    assert not (tmp_path / "u").exists()
