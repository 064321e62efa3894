"""Static checks of docker/: images pinned to the Ray of pyproject.toml, COPY sources that exist,
compose ports on 127.0.0.1 and the Ray token as a secret, a valid cluster-launcher config.

No Docker engine is needed: the files are parsed, and docker/install.sh runs in DRY_RUN mode
(CI runs it for real in a fresh virtual environment, see .ci/run).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
TOKEN_SECRET_DIR = "/run/secrets/"


def pinned(name: str) -> str:
    """The ==version that pyproject.toml pins ``name`` (extras allowed) to."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(name)}(\[[^\]]*\])?==([^";\s]+)"', text)
    assert m, f"pyproject.toml pins no {name}==VERSION"
    return m.group(2)


def instructions(path: Path):
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_is_built_from_the_official_ray_image_of_the_pinned_version(kind):
    ray_version = pinned("ray")
    froms = [args for op, args in instructions(DOCKERFILES[kind]) if op == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\S+?)-py(\d)(\d+)-(\S+)", froms[0].split()[0])
    assert m, f"not an official rayproject/ray:VERSION-pyXY-PLATFORM tag: {froms[0]}"
    version, platform = m.group(1), m.group(4)
    assert version == ray_version, f"{DOCKERFILES[kind].name} uses Ray {version}, pyproject.toml pins {ray_version}"
    if kind == "cpu":
        assert platform == "cpu"
    else:
        assert platform == "gpu" or re.fullmatch(r"cu\d+", platform), platform


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_only_files_that_exist_and_installs_with_install_sh(kind):
    steps = instructions(DOCKERFILES[kind])
    copies = [args for op, args in steps if op in ("COPY", "ADD")]
    assert copies, "the image copies nothing"
    assert not [args for op, args in steps if op == "ADD"], "use COPY: ADD also fetches URLs and unpacks archives"
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert len(words) >= 2, args
        for source in words[:-1]:
            assert not source.startswith(("/", "..")), f"COPY source outside the build context: {source}"
            assert glob.glob(str(ROOT / source)), f"{DOCKERFILES[kind].name}: COPY source {source} does not exist"
            assert "auth_token" not in source and "secret" not in source.lower(), f"never copy credentials: {source}"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "docker/install.sh" in runs
    copied = [w for args in copies for w in shlex.split(args) if not w.startswith("--")]
    assert "docker/install.sh" in copied and "pyproject.toml" in copied


@pytest.mark.parametrize("kind,backend,package", [("cpu", "osmesa", "libosmesa6"), ("gpu", "egl", "libegl1")])
def test_dockerfile_sets_up_headless_mujoco(kind, backend, package):
    steps = instructions(DOCKERFILES[kind])
    env = " ".join(args for op, args in steps if op == "ENV")
    assert re.search(rf"\bMUJOCO_GL={backend}\b", env), env
    assert re.search(rf"\bPYOPENGL_PLATFORM={backend}\b", env), env
    assert re.search(r"\bRAY_AUTH_MODE=token\b", env), "images must run Ray with token auth"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert re.search(rf"apt-get install[^&;]*\b{package}\b", runs), f"{package} is not apt-get installed"


def test_gpu_image_preinstalls_the_pinned_torch_and_skips_it_in_install_sh():
    steps = instructions(DOCKERFILES["gpu"])
    args = " ".join(a for op, a in steps if op == "ARG")
    assert f"TORCH_SPEC=\"torch=={pinned('torch')}\"" in args or f"TORCH_SPEC=torch=={pinned('torch')}" in args, args
    runs = [a for op, a in steps if op == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "TORCH_SPEC" in a)
    install_step = next(i for i, a in enumerate(runs) if "docker/install.sh" in a)
    assert torch_step < install_step and "SKIP_TORCH=1" in runs[install_step]


def test_no_credentials_or_index_hosts_in_docker_files():
    for path in sorted(DOCKER.iterdir()):
        if path.suffix == ".md":
            continue
        text = path.read_text()
        hosts = set(re.findall(r"[A-Za-z][A-Za-z0-9+.-]*://([^/\s:'\"]+)", text)) - {"127.0.0.1", "localhost"}
        assert not hosts, f"{path.name} names {hosts}: package indexes and registries are the user's choice"
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text), f"{path.name} sets a token value"


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_every_compose_service_builds_its_image_the_same_way():
    # Two builds of one tag with different torch options: the last one built would own it.
    services = compose()["services"]
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert len(builds) == len(services) and all(b == builds["head"] for b in builds.values()), builds
    assert "TORCH_PIP_ARGS" in builds["head"]["args"]


def test_compose_publishes_ports_on_localhost_only():
    services = compose()["services"]
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is not bound to 127.0.0.1"
    assert published >= 2  # the dashboard (job submission) and TensorBoard
    assert any("tensorboard" in str(s.get("command", "")) for s in services.values())


def test_compose_passes_the_ray_token_as_a_secret_file():
    data = compose()
    secrets = data["secrets"]
    assert len(secrets) == 1
    (secret, spec), = secrets.items()
    assert set(spec) == {"file"}, "the token comes from a file on the host"
    ray_nodes = {n: s for n, s in data["services"].items() if "ray start" in str(s.get("command", ""))}
    assert {"head", "worker"} <= set(ray_nodes)
    for name, service in ray_nodes.items():
        names = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
        assert secret in names, f"{name} does not get the token secret"
        env = service.get("environment", {})
        assert env.get("RAY_AUTH_MODE") == "token"
        assert env.get("RAY_AUTH_TOKEN_PATH") == TOKEN_SECRET_DIR + secret
        assert "RAY_AUTH_TOKEN" not in env
    # workers scale: deploy.replicas (docker compose up --scale worker=N works as well)
    assert "replicas" in ray_nodes["worker"].get("deploy", {})
    assert "learner" in ray_nodes["head"]["command"] and "rollout" in ray_nodes["worker"]["command"]


def test_cluster_yaml_is_a_valid_launcher_config_with_a_learner_head_and_autoscaling_cpu_workers():
    import jsonschema
    import ray

    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("learner", 0) >= 1
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all("learner" not in t["resources"] and t["resources"].get("rollout", 0) >= 1 for t in workers)
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers)
    assert config["docker"]["head_image"] and config["docker"]["worker_image"]
    assert any("auth_token" in remote for remote in config["file_mounts"]), "the token comes by file mount"


INSTALL_SETTINGS = ("PYTHON", "TORCH_SPEC", "TORCH_PIP_ARGS", "PIP_ARGS", "SKIP_TORCH", "EDITABLE", "EXTRAS", "CHECK_RENDER")


def dry_run(**env):
    # The caller's own settings (CI sets PIP_ARGS) must not change what each case expects.
    base = {k: v for k, v in os.environ.items() if k not in INSTALL_SETTINGS}
    out = subprocess.run(["bash", str(DOCKER / "install.sh")], env={**base, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_install_sh_installs_the_pinned_torch_then_distdiff():
    cmds = dry_run()
    assert len(cmds) == 2
    assert cmds[0].endswith(f"-m pip install torch=={pinned('torch')}")
    assert cmds[1].endswith("-m pip install .")
    cmds = dry_run(SKIP_TORCH="1", EDITABLE="1", EXTRAS="[dev]", PIP_ARGS="--no-cache-dir")
    assert len(cmds) == 1 and cmds[0].endswith("-m pip install --no-cache-dir -e .[dev]")
    cmds = dry_run(TORCH_PIP_ARGS="--pre --no-deps", TORCH_SPEC="torch==9.9")
    assert cmds[0].endswith("-m pip install --pre --no-deps torch==9.9")
