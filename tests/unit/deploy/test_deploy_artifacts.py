"""The deploy artifacts of ``deploy/``, each checked by a real validator and against the code.

* ``deploy/worker.toml``: read by :func:`load_config`; names every setting of the schema.
* ``deploy/systemd/reapi-worker.service``: ``systemd-analyze verify`` must be silent; the
  settings the worker depends on (drain on SIGTERM, delegated cgroups, /dev/fuse, the
  namespaces bubblewrap creates) are read back from the file.
* ``deploy/container/Dockerfile``: parsed by ``dockerfile-parse``; base image, packages per
  stage, entrypoint, and every COPY source present in the build context.
* ``deploy/kubernetes/*.yaml``: validated (strict: unknown fields refused) by
  ``kubernetes-validate`` against the OpenAPI schemas it ships, for the oldest and newest
  Kubernetes versions it knows; the ConfigMap's TOML read by :func:`load_config`; the
  probes' paths asked of a real :class:`MetricsServer`.
* ``deploy/grafana/reapi-worker.json``: ``jsonschema`` against the parts Grafana needs;
  a panel for every family of :data:`METRICS`, and no ``reapi_worker_*`` name that the
  worker does not export (both read from a live registry).

Each validator is also run on a deliberately broken copy, which it must reject.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import utils as k8s_utils

from conftest import REPO, require, require_tool

from reapi_worker.sandbox.bwrap_args import ControlFds, HostLayout, bwrap_arguments
from reapi_worker.sandbox.request import SandboxRequest
from reapi_worker.storage.fetch_through import TransferStats
from reapi_worker.storage.local_cas import CacheStats
from reapi_worker.worker.bot import BotConfig
from reapi_worker.worker.config import WorkerConfig, load_config, settings
from reapi_worker.worker.health import CheckResult, DiskUsage, HealthReport, Level
from reapi_worker.worker.metrics import METRICS, PREFIX, MetricsServer, WorkerMetrics

DEPLOY = REPO / "deploy"
SAMPLE_CONFIG = DEPLOY / "worker.toml"
UNIT = DEPLOY / "systemd" / "reapi-worker.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "reapi-worker.json"

#: Where the systemd unit and the image install the project, and where they read the config.
INSTALLED_CLI = "/opt/reapi-worker/.venv/bin/reapi-worker"
CONFIG_PATH = "/etc/reapi-worker/worker.toml"
BUILDGRID_SERVICE = "grpc://buildgrid.buildgrid.svc.cluster.local:50051"

#: How long after the grace period the bot may still take to abort and report (its default).
FINAL_REPORT_SECONDS = BotConfig().final_report_seconds


def sample_config() -> WorkerConfig:
    return load_config(str(SAMPLE_CONFIG))


def is_below(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


# ---- deploy/worker.toml --------------------------------------------------------------------


def test_the_sample_config_loads_and_keeps_cache_and_build_root_on_one_mount():
    config = sample_config()
    assert is_below(config.cache_dir, "/var/lib/reapi-worker")
    assert is_below(config.build_root, "/var/lib/reapi-worker")
    assert config.metrics_port is not None, "the probes and the scrape need the endpoint"


def test_the_sample_config_names_every_setting_of_the_schema():
    """Set or commented out, every key appears: the sample documents the whole schema (a key
    added to config.py fails here until deploy/worker.toml shows it)."""
    text = SAMPLE_CONFIG.read_text()
    missing = []
    for name, setting, _default in settings():
        pattern = r"^#?\s*\[platform\]" if setting.kind == "platform" else rf"^#?\s*{name}\s*="
        if not re.search(pattern, text, re.MULTILINE):
            missing.append(name)
    assert missing == []


def test_the_sample_config_comments_out_only_known_keys():
    """A key shown commented out is one the schema still has (a removed or renamed setting
    must not linger as an example that load_config would refuse)."""
    known = {name for name, _setting, _default in settings()}
    # What follows [platform] are property names, not settings.
    settings_part = re.split(r"^#?\s*\[platform\]\s*$", SAMPLE_CONFIG.read_text(), maxsplit=1, flags=re.MULTILINE)[0]
    commented = re.findall(r"^#\s*([a-z_]+)\s*=", settings_part, re.MULTILINE)
    assert commented, "the optional keys are shown commented out"
    assert [key for key in commented if key not in known] == []


# ---- deploy/systemd/reapi-worker.service ---------------------------------------------------


def parse_unit(text: str) -> dict[tuple[str, str], list[str]]:
    """``(section, key) -> values`` in file order (a key may repeat). The unit uses no line
    continuations, which this reader does not support."""
    values: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line continuation in the unit: {raw!r}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        values.setdefault((section, key.strip()), []).append(value.strip())
    return values


def systemd_verify(unit_text: str, directory: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` of ``unit_text`` saved as reapi-worker.service (the name
    matters to systemd): its exit code and everything it printed."""
    analyze = require_tool("systemd-analyze")
    path = directory / "reapi-worker.service"
    path.write_text(unit_text)
    done = subprocess.run(
        [analyze, "verify", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )
    return done.returncode, done.stdout.strip()


def unit_with_existing_binary() -> str:
    """The unit with ExecStart's binary replaced by this venv's reapi-worker, the one part
    of the unit that cannot hold on a machine without /opt/reapi-worker."""
    local_cli = Path(sys.executable).parent / "reapi-worker"
    require(local_cli.is_file(), f"{local_cli} is not installed")
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_CLI} ") == 1
    return text.replace(f"ExecStart={INSTALLED_CLI} ", f"ExecStart={local_cli} ")


def test_systemd_analyze_verify_finds_nothing_in_the_unit(tmp_path):
    returncode, output = systemd_verify(unit_with_existing_binary(), tmp_path)
    assert (returncode, output) == (0, "")


def test_systemd_analyze_verify_of_the_unit_as_shipped_only_misses_the_installed_binary(tmp_path):
    returncode, output = systemd_verify(UNIT.read_text(), tmp_path)
    lines = output.splitlines()
    expected = f"Command {INSTALLED_CLI} is not executable: No such file or directory"
    if Path(INSTALLED_CLI).exists():  # a machine where the unit is installed for real
        assert (returncode, lines) == (0, [])
    else:
        assert len(lines) == 1 and lines[0].endswith(expected), output


def test_systemd_analyze_verify_rejects_a_broken_unit(tmp_path):
    broken = unit_with_existing_binary().replace("KillMode=mixed", "KillMode=mixd\nKilMode=mixed")
    _returncode, output = systemd_verify(broken, tmp_path)
    assert "Failed to parse kill mode" in output
    assert "Unknown key" in output and "KilMode" in output


def test_systemd_security_analysis_scores_the_unit_below_an_unhardened_copy(tmp_path):
    """systemd's own analyzer sees the hardening take effect (lower is better)."""
    analyze = require_tool("systemd-analyze")

    def exposure(text: str, name: str) -> float:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "reapi-worker.service").write_text(text)
        done = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", str(folder / "reapi-worker.service")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        )
        found = re.search(r"Overall exposure level for reapi-worker\.service: ([0-9.]+)", done.stdout)
        assert found, done.stdout[-2000:]
        return float(found.group(1))

    hardened = unit_with_existing_binary()
    plain = "\n".join(
        line for line in hardened.splitlines()
        if not re.match(r"(Protect|Private|Restrict|NoNewPrivileges|Capability|Device|UMask)", line)
    )
    assert exposure(hardened, "hardened") < exposure(plain, "plain")


def test_the_unit_drains_on_sigterm_for_longer_than_the_grace_period():
    unit = parse_unit(UNIT.read_text())
    assert unit[("Service", "KillMode")] == ["mixed"], "SIGTERM to the worker only, not to every action"
    timeout = unit[("Service", "TimeoutStopSec")][-1]
    assert timeout.isdigit(), f"TimeoutStopSec in plain seconds, not {timeout!r}"
    assert int(timeout) > sample_config().shutdown_grace_seconds + FINAL_REPORT_SECONDS
    assert unit[("Service", "Restart")] == ["on-failure"]


def test_the_unit_runs_the_installed_cli_with_the_documented_config():
    unit = parse_unit(UNIT.read_text())
    assert shlex.split(unit[("Service", "ExecStart")][-1]) == [INSTALLED_CLI, "bot", "--config", CONFIG_PATH]
    assert unit[("Service", "User")] == ["root"], "/dev/fuse and mount(2) need root"


def test_the_unit_gives_the_worker_fuse_cgroups_and_one_writable_state_directory():
    unit = parse_unit(UNIT.read_text())
    service = {key: values for (section, key), values in unit.items() if section == "Service"}
    assert service["Delegate"] == ["yes"], "per-action cgroups below the worker's own"
    assert service["OOMPolicy"] == ["continue"], "an OOM-killed action must not stop the worker"
    assert service["DevicePolicy"] == ["closed"]
    assert "/dev/fuse rw" in service["DeviceAllow"]
    for breaks_the_sandbox in (
        "PrivateDevices", "ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups",
        "ProtectHostname", "ProtectProc", "ProcSubset", "SystemCallFilter", "SystemCallArchitectures",
        "MemoryDenyWriteExecute", "PrivateUsers", "PrivateNetwork",
    ):
        assert breaks_the_sandbox not in service, breaks_the_sandbox
    # One writable directory holding both cache_dir and build_root: hardlinks between two
    # mounts fail with EXDEV.
    assert service["ProtectSystem"] == ["strict"]
    assert len(service["StateDirectory"]) == 1 and " " not in service["StateDirectory"][0]
    assert "ReadWritePaths" not in service
    state = "/var/lib/" + service["StateDirectory"][0]
    config = sample_config()
    assert is_below(config.cache_dir, state) and is_below(config.build_root, state)


def bubblewrap_namespaces(tmp_path: Path) -> set[str]:
    """The namespaces the sandbox asks bubblewrap for (network off, the most it unshares),
    in systemd's names; bubblewrap always adds a mount namespace."""
    request = SandboxRequest(
        arguments=("true",), environment={}, input_root=str(tmp_path),
        stdout_path=str(tmp_path / "out"), stderr_path=str(tmp_path / "err"),
    )
    options = bwrap_arguments(request, HostLayout(entries=(), env_shim=None), ControlFds(3, 4, 5)).options
    unshared = {option.removeprefix("--unshare-") for option in options if option.startswith("--unshare-")}
    assert unshared, options
    return unshared | {"mnt"}


def test_the_unit_allows_every_namespace_the_sandbox_creates(tmp_path):
    unit = parse_unit(UNIT.read_text())
    (allowed,) = unit[("Service", "RestrictNamespaces")]
    assert not allowed.startswith("~"), "an allow-list"
    assert bubblewrap_namespaces(tmp_path) <= set(allowed.split())


# ---- deploy/container/Dockerfile -----------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "COMMENT",
}
BUILD_PACKAGES = {"libfuse3-dev", "pkg-config", "gcc", "python3-dev", "python3-venv"}
RUNTIME_PACKAGES = {"bubblewrap", "fuse3", "python3"}
BASE_IMAGE = re.compile(r"^debian:bookworm(-slim)?(@sha256:[0-9a-f]{64})?$")


@dataclasses.dataclass
class Stage:
    name: str
    image: str
    instructions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def apt_packages(self) -> set[str]:
        packages: set[str] = set()
        for command in self.values("RUN"):
            for part in re.split(r"&&|;|\|\|", command):
                words = part.split()
                if words[:2] == ["apt-get", "install"]:
                    packages.update(w for w in words[2:] if not w.startswith("-"))
        return packages


def dockerfile_stages(text: str) -> tuple[list[Stage], list[str]]:
    """The stages of a Dockerfile, as dockerfile-parse reads it, and any instruction it
    found outside a stage or does not know."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[Stage] = []
    problems = []
    for item in parser.structure:
        instruction = item["instruction"]
        if instruction not in DOCKERFILE_INSTRUCTIONS:
            problems.append(f"line {item['startline'] + 1}: unknown instruction {instruction}")
        if instruction == "FROM":
            image, _, name = item["value"].partition(" AS ")
            if not name:
                image, _, name = item["value"].partition(" as ")
            stages.append(Stage(name.strip() or str(len(stages)), image.strip()))
        elif instruction != "COMMENT":
            if not stages:
                problems.append(f"line {item['startline'] + 1}: {instruction} before FROM")
            else:
                stages[-1].instructions.append(item)
    return stages, problems


def exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed) else None


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the context path (or a folder above it) is left out by ``patterns``. Enough
    for the simple patterns .dockerignore uses (no ``!`` exceptions: a test refuses them)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.strip("/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if pattern.startswith("**/"):
                tail = candidate.split("/")
                if any(fnmatch.fnmatchcase("/".join(tail[i:]), pattern[3:]) for i in range(len(tail))):
                    return True
    return False


def copy_sources(value: str) -> tuple[str | None, list[str], str]:
    """``COPY [--from=STAGE] SRC... DEST`` -> (stage, sources, destination)."""
    words = shlex.split(value)
    stage = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--from="):
            stage = flag.removeprefix("--from=")
    form = exec_form(value)
    if form is not None:
        words = form
    return stage, words[:-1], words[-1]


def dockerfile_problems(text: str) -> list[str]:
    """Everything wrong with the Dockerfile ``text`` for this project; empty if nothing."""
    stages, problems = dockerfile_stages(text)
    if not stages:
        return problems + ["no FROM"]
    for stage in stages:
        if not BASE_IMAGE.match(stage.image):
            problems.append(f"stage {stage.name}: base image {stage.image} is not Debian 12 (bookworm)")
    final = stages[-1]
    built = set().union(*(s.apt_packages() for s in stages[:-1])) if len(stages) > 1 else set()
    if not BUILD_PACKAGES <= built:
        problems.append(f"build stage lacks {sorted(BUILD_PACKAGES - built)}")
    if not RUNTIME_PACKAGES <= final.apt_packages():
        problems.append(f"final stage lacks {sorted(RUNTIME_PACKAGES - final.apt_packages())}")
    if {"gcc", "libfuse3-dev", "python3-dev"} & final.apt_packages():
        problems.append("the compiler and headers belong in the build stage only")

    entrypoints = final.values("ENTRYPOINT")
    entry = exec_form(entrypoints[-1]) if entrypoints else None
    if entry != [INSTALLED_CLI, "bot"]:
        problems.append(f"ENTRYPOINT {entrypoints} is not the exec form of [{INSTALLED_CLI!r}, 'bot']")
    commands = final.values("CMD")
    if not commands or exec_form(commands[-1]) != ["--config", CONFIG_PATH]:
        problems.append(f"CMD {commands} does not name {CONFIG_PATH}")

    names = {s.name for s in stages}
    patterns = dockerignore_patterns()
    copied: set[str] = set()
    for stage in stages:
        for value in stage.values("COPY") + stage.values("ADD"):
            source_stage, sources, destination = copy_sources(value)
            if source_stage is not None:
                if source_stage not in names:
                    problems.append(f"COPY --from={source_stage}: no such stage")
                continue
            for source in sources:
                source = source.rstrip("/")
                if not (REPO / source).exists():
                    problems.append(f"COPY {source}: not in the build context")
                elif ignored(source, patterns):
                    problems.append(f"COPY {source}: left out by .dockerignore")
                copied.add(source)
                if source == "deploy/worker.toml" and destination != CONFIG_PATH:
                    problems.append(f"the config is copied to {destination}, not {CONFIG_PATH}")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {folder.split("/")[0] for folder in pyproject["tool"]["setuptools"]["package-dir"].values()}
    if not needed <= copied:
        problems.append(f"the build stage does not copy {sorted(needed - copied)}")
    if "deploy/worker.toml" not in copied:
        problems.append("the sample config is not in the image")

    config = sample_config()
    volumes = [v for value in final.values("VOLUME") for v in (exec_form(value) or value.split())]
    if not any(is_below(config.cache_dir, v) and is_below(config.build_root, v) for v in volumes):
        problems.append(f"no VOLUME holds both {config.cache_dir} and {config.build_root}")
    exposed = {port.split("/")[0] for value in final.values("EXPOSE") for port in value.split()}
    if str(config.metrics_port) not in exposed:
        problems.append(f"metrics_port {config.metrics_port} is not exposed")
    return problems


def test_the_dockerfile_builds_the_worker_image_as_designed():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerignore_uses_no_exceptions_and_keeps_the_sources():
    patterns = dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "the simple matcher above handles no exceptions"
    for needed in ("pyproject.toml", "README.md", "worker/cli.py", "storage/fuse", "deploy/worker.toml"):
        assert not ignored(needed, patterns), needed
    for large in (".venv/bin/python", ".git/HEAD", "worker/__pycache__/cli.cpython-311.pyc", "tests/conftest.py"):
        assert ignored(large, patterns), large


BROKEN_DOCKERFILES: dict[str, tuple[Callable[[str], str], str]] = {
    "another Debian": (lambda t: t.replace("FROM debian:bookworm-slim\n", "FROM debian:bullseye-slim\n"), "bookworm"),
    "a typo in an instruction": (lambda t: t.replace("\nWORKDIR /src", "\nWORKDIRR /src"), "unknown instruction"),
    "shell-form entrypoint": (
        lambda t: re.sub(r"^ENTRYPOINT .*$", "ENTRYPOINT reapi-worker bot", t, flags=re.M), "ENTRYPOINT",
    ),
    "no bubblewrap at run time": (lambda t: t.replace(" bubblewrap ca-certificates", " ca-certificates"), "bubblewrap"),
    "no FUSE headers to build with": (lambda t: t.replace(" libfuse3-dev", ""), "libfuse3-dev"),
    "a source that is not there": (lambda t: t.replace("COPY worker/ worker/", "COPY workers/ worker/"), "workers"),
    "a source folder left out": (lambda t: t.replace("COPY sandbox/ sandbox/\n", ""), "sandbox"),
    "no volume": (lambda t: re.sub(r"^VOLUME .*$", "", t, flags=re.M), "VOLUME"),
}


@pytest.mark.parametrize("case", BROKEN_DOCKERFILES)
def test_a_broken_dockerfile_is_rejected(case):
    mutate, expected = BROKEN_DOCKERFILES[case]
    original = DOCKERFILE.read_text()
    broken = mutate(original)
    assert broken != original, "the mutation must apply"
    problems = dockerfile_problems(broken)
    assert any(expected in problem for problem in problems), problems


# ---- deploy/kubernetes ---------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return documents


def only(kind: str) -> dict[str, Any]:
    (found,) = [d for d in manifests() if d["kind"] == kind]
    return found


def worker_container() -> dict[str, Any]:
    (container,) = only("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


def configmap_config(tmp_path: Path) -> WorkerConfig:
    (toml,) = only("ConfigMap")["data"].values()
    path = tmp_path / "worker.toml"
    path.write_text(toml)
    return load_config(str(path))


#: The oldest and the newest Kubernetes whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = sorted({k8s_utils.all_versions()[0], k8s_utils.latest_version()})


def kubernetes_errors(documents: list[dict[str, Any]], version: str) -> list[str]:
    errors = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(p) for p in error.path)
            errors.append(f"{document.get('kind')} {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(error.message)
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_kubernetes_objects(version):
    documents = manifests()
    assert {d["kind"] for d in documents} == {"Namespace", "ConfigMap", "DaemonSet"}
    assert kubernetes_errors(documents, version) == []


def _daemonset_spec(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"]["template"]["spec"]


BROKEN_MANIFESTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a misspelled field": (
        lambda d: _daemonset_spec(d).update(terminationGracePeriodSecond=360), "terminationGracePeriodSecond",
    ),
    "a port as a string": (
        lambda d: _daemonset_spec(d)["containers"][0]["ports"][0].update(containerPort="9102"), "integer",
    ),
    "a container without a name": (lambda d: _daemonset_spec(d)["containers"][0].pop("name"), "name"),
    "a probe without a handler port": (
        lambda d: _daemonset_spec(d)["containers"][0]["livenessProbe"]["httpGet"].pop("port"), "port",
    ),
    "privileged as a string": (
        lambda d: _daemonset_spec(d)["containers"][0]["securityContext"].update(privileged="yes"), "boolean",
    ),
}


@pytest.mark.parametrize("case", BROKEN_MANIFESTS)
def test_a_broken_manifest_is_rejected(case):
    mutate, expected = BROKEN_MANIFESTS[case]
    broken = copy.deepcopy(only("DaemonSet"))
    mutate(broken)
    errors = kubernetes_errors([broken], k8s_utils.latest_version())
    assert len(errors) == 1 and expected in errors[0], errors


def test_the_namespace_comes_first_and_admits_privileged_pods():
    documents = manifests()
    assert documents[0]["kind"] == "Namespace", "kubectl apply -f applies the files in name order"
    namespace = documents[0]["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in documents[1:])
    assert documents[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_configmap_holds_a_config_the_worker_loads(tmp_path):
    config = configmap_config(tmp_path)
    assert config.remote == BUILDGRID_SERVICE
    assert config.metrics_port is not None
    assert config.log_format == "json"


def test_the_daemonset_wires_config_state_fuse_and_shutdown_together(tmp_path):
    config = configmap_config(tmp_path)
    spec = _daemonset_spec(only("DaemonSet"))
    container = worker_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    # The image's ENTRYPOINT is `reapi-worker bot`; the config file comes from the ConfigMap.
    assert container["args"] == ["--config", CONFIG_PATH]
    config_mount = mounts[str(PurePosixPath(CONFIG_PATH).parent)]
    assert volumes[config_mount["name"]]["configMap"]["name"] == only("ConfigMap")["metadata"]["name"]
    assert PurePosixPath(CONFIG_PATH).name in only("ConfigMap")["data"]

    # Cache and build root below one hostPath mount (hardlinks), surviving the pod.
    (state,) = [path for path in mounts if is_below(config.cache_dir, path) and is_below(config.build_root, path)]
    assert "hostPath" in volumes[mounts[state]["name"]]
    assert "mountPropagation" not in mounts[state], "the worker's mounts stay in the pod"
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert container["securityContext"]["privileged"] is True

    assert spec["terminationGracePeriodSeconds"] > config.shutdown_grace_seconds + FINAL_REPORT_SECONDS
    assert spec["shareProcessNamespace"] is True, "a PID 1 that reaps"


def test_the_probes_and_the_scrape_annotations_name_the_metrics_port(tmp_path):
    config = configmap_config(tmp_path)
    container = worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == config.metrics_port, probe
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez", "never restart for a health check"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = only("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics_port)


class _Report:
    def __init__(self, report: HealthReport) -> None:
        self._report = report

    def report(self) -> HealthReport:
        return self._report


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("healthy", [True, False])
def test_the_worker_endpoint_answers_the_paths_the_pod_asks_for(healthy):
    """The probes' and the scrape's paths on a real MetricsServer (loopback): liveness stays
    200 while readiness follows the health checks."""
    level = Level.OK if healthy else Level.UNHEALTHY
    result = CheckResult("cache_disk", level, "" if healthy else "disk full")
    health = _Report(HealthReport(results=(result,), checked_at=0.0))
    container = worker_container()
    annotations = only("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    with MetricsServer(WorkerMetrics(health=health), health, port=0, host="127.0.0.1") as server:
        assert _get(server.port, container["livenessProbe"]["httpGet"]["path"]) == 200
        assert _get(server.port, container["startupProbe"]["httpGet"]["path"]) == 200
        assert _get(server.port, container["readinessProbe"]["httpGet"]["path"]) == (200 if healthy else 503)
        assert _get(server.port, annotations["prometheus.io/path"]) == 200


# ---- deploy/grafana/reapi-worker.json ------------------------------------------------------

PANEL_TYPES = ["row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline", "text"]

DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string", "pattern": r"^\$\{[A-Za-z0-9_]+\}$"}},
}

#: What Grafana needs of a dashboard to import or provision it, and what this project adds:
#: every query panel on the templated Prometheus data source.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "id": {"type": ["integer", "null"]},
        "time": {
            "type": "object", "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "type"]},
                    "contains": {
                        "type": "object",
                        "required": ["name", "type", "query"],
                        "properties": {"type": {"const": "datasource"}, "query": {"const": "prometheus"}},
                    },
                },
            },
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
    },
    "$defs": {
        "gridPos": {
            "type": "object",
            "required": ["x", "y", "w", "h"],
            "additionalProperties": False,
            "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "h": {"type": "integer", "minimum": 1},
            },
        },
        "target": {
            "type": "object",
            "required": ["refId", "expr", "datasource"],
            "properties": {
                "refId": {"type": "string", "minLength": 1},
                "expr": {"type": "string", "minLength": 1},
                "datasource": DATASOURCE_REF,
            },
        },
        "panel": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": PANEL_TYPES},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"$ref": "#/$defs/gridPos"},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"not": {"required": ["targets"]}},
            "else": {
                "required": ["datasource", "targets"],
                "properties": {
                    "datasource": DATASOURCE_REF,
                    "targets": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/target"}},
                },
            },
        },
    },
}


def exported_metrics() -> tuple[set[str], dict[str, set[str]], set[str]]:
    """From a live registry whose every source reports something: the family names, each
    family's sample names (``_total``, ``_bucket``...; ``_created`` left out, no panel has a
    use for it) and every label name."""
    disk = DiskUsage("/var/lib/reapi-worker", free_bytes=1, total_bytes=2)

    class Source:
        def __init__(self, value: Any) -> None:
            self.value = value

        def stats(self) -> Any:
            return self.value

        def report(self) -> Any:
            return self.value

    metrics = WorkerMetrics(
        cache=Source(CacheStats(hits=1, misses=1, evictions=1, bytes_evicted=1, size_bytes=1, max_bytes=2)),
        transfers=Source(TransferStats(1, 1, 1, 1)),
        health=Source(HealthReport(results=(CheckResult("cache_disk", Level.OK, disk=disk),), checked_at=0.0)),
    )
    # A labelled family has no samples (so shows no label names) until one label set is used.
    metrics.action_failures.labels("run", "INTERNAL").inc()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    families: set[str] = set()
    samples: dict[str, set[str]] = {}
    labels: set[str] = set()
    for family in metrics.registry.collect():
        families.add(family.name)
        samples[family.name] = {family.name + suffix for suffix in suffixes[family.type]}
        samples[family.name] |= {s.name for s in family.samples if not s.name.endswith("_created")}
        for sample in family.samples:
            labels.update(sample.labels)
    return families, samples, labels


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every query: panel targets (also inside rows) and variables."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield f"panel {panel.get('id')} {panel.get('title')!r}", target.get("expr", "")
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            yield f"variable {variable.get('name')}", query


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found += panel.get("panels", [])
    return found


def _balanced(expr: str) -> bool:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for char in expr:
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in closing:
            if not stack or stack.pop() != closing[char]:
                return False
    return not stack and not in_string


def _call_arguments(expr: str, function: str) -> list[str]:
    """The argument text of every call of ``function`` in ``expr``."""
    found = []
    for match in re.finditer(rf"\b{function}\(", expr):
        depth, start = 1, match.end()
        for index in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[index], 0)
            if depth == 0:
                found.append(expr[start:index])
                break
    return found


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    """Everything wrong with ``dashboard`` for this project; empty if nothing."""
    validator = jsonschema.Draft202012Validator(DASHBOARD_SCHEMA)
    problems = [
        f"schema: {'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(dashboard)
    ]
    if problems:
        return problems

    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    problems += [f"panel id {i} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    boxes = [(p["id"], p["gridPos"]) for p in panels]
    for pid, box in boxes:
        if box["x"] + box["w"] > 24:
            problems.append(f"panel {pid} is wider than the 24-column grid")
    for index, (first, a) in enumerate(boxes):
        for second, b in boxes[index + 1:]:
            apart_x = a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
            apart_y = a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]
            if not (apart_x or apart_y):
                problems.append(f"panels {first} and {second} overlap")

    variables = {v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    for panel in panels:
        refs = [panel.get("datasource")] + [t["datasource"] for t in panel.get("targets", [])]
        for ref in refs:
            if ref is not None and ref["uid"][2:-1] not in variables:
                problems.append(f"panel {panel['id']}: data source {ref['uid']} is no data source variable")
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"panel {panel['id']}: refIds repeat")

    families, samples, labels = exported_metrics()
    assert families == set(METRICS), "the live registry above must export every family"
    sample_names = set().union(*samples.values())
    known_labels = labels | {"instance", "job"}  # the target labels Prometheus adds
    used: set[str] = set()
    for where, expr in panel_queries(dashboard):
        if not _balanced(expr):
            problems.append(f"{where}: unbalanced brackets or quotes in {expr!r}")
        names = set(re.findall(rf"\b{PREFIX}_[A-Za-z0-9_:]+", expr))
        for name in sorted(names - sample_names):
            problems.append(f"{where}: {name} is not exported by the worker")
        used |= names
        for function in ("rate", "irate", "increase"):
            for argument in _call_arguments(expr, function):
                if not argument.rstrip().endswith("]"):
                    problems.append(f"{where}: {function}() without a range: {argument!r}")
        for argument in _call_arguments(expr, "histogram_quantile"):
            if not re.search(r"\bby \([^)]*\ble\b", argument):
                problems.append(f"{where}: histogram_quantile() without `by (le, ...)`")
        for clause in re.findall(r"\b(?:by|without) \(([^)]*)\)", expr):
            for label in (x.strip() for x in clause.split(",")):
                if label and label not in known_labels:
                    problems.append(f"{where}: label {label!r} is on no worker metric")
        for label in re.findall(r"[{,]\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", expr):
            if label not in known_labels:
                problems.append(f"{where}: label {label!r} is on no worker metric")
    for family in sorted(families):
        if not samples[family] & used:
            problems.append(f"no panel shows {family}")
    return problems


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(DASHBOARD_SCHEMA)


def test_the_dashboard_has_a_panel_for_every_metric_and_no_other_worker_metric():
    assert dashboard_problems(load_dashboard()) == []


def _drop_panels_showing(name: str) -> Callable[[dict[str, Any]], None]:
    def mutate(dashboard: dict[str, Any]) -> None:
        dashboard["panels"] = [
            p for p in dashboard["panels"] if not any(name in t["expr"] for t in p.get("targets", []))
        ]

    return mutate


def _first_query_panel(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in dashboard["panels"] if p["type"] != "row")


BROKEN_DASHBOARDS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no uid": (lambda d: d.pop("uid"), "'uid' is a required property"),
    "a panel without targets": (lambda d: _first_query_panel(d).pop("targets"), "'targets' is a required property"),
    "a fixed data source": (
        lambda d: _first_query_panel(d).update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}),
        "does not match",
    ),
    "a repeated panel id": (lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), "used twice"),
    "overlapping panels": (lambda d: d["panels"][2].update(gridPos=dict(d["panels"][1]["gridPos"])), "overlap"),
    "a metric the worker does not export": (
        lambda d: _first_query_panel(d)["targets"][0].update(expr="sum(reapi_worker_leases_recieved_total)"),
        "reapi_worker_leases_recieved_total is not exported",
    ),
    "a counter without _total": (
        lambda d: _first_query_panel(d)["targets"][0].update(expr="rate(reapi_worker_cache_hits[5m])"),
        "reapi_worker_cache_hits is not exported",
    ),
    "a metric without a panel": (
        _drop_panels_showing("reapi_worker_session_reconnects"), "no panel shows reapi_worker_session_reconnects",
    ),
    "rate without a range": (
        lambda d: _first_query_panel(d)["targets"][0].update(expr="rate(reapi_worker_leases_received_total)"),
        "without a range",
    ),
    "a label no metric has": (
        lambda d: _first_query_panel(d)["targets"][0].update(expr="sum by (stage) (reapi_worker_active_actions)"),
        "label 'stage'",
    ),
}


@pytest.mark.parametrize("case", BROKEN_DASHBOARDS)
def test_a_broken_dashboard_is_rejected(case):
    mutate, expected = BROKEN_DASHBOARDS[case]
    dashboard = load_dashboard()
    mutate(dashboard)
    problems = dashboard_problems(dashboard)
    assert any(expected in problem for problem in problems), problems
