"""Tenants against the farm: network, worker facts, /etc, zombies. Real bubblewrap, real
network namespaces and slirp4netns, a real pid namespace; no fakes.

The "outside" is a network namespace this module creates, cabled to the worker's namespace
by a veth pair (``ip netns`` names it; processes enter it with ``nsenter --net``, as
test_multihost does): a server there stands for the internet a ``network=on`` action may
reach. The host's loopback listener, a listener on every host address (the worker's own
ports, e.g. metrics on 0.0.0.0) and an abstract UNIX socket stand for what it must not.
Every network test runs in both root modes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import require, require_tool

from reapi_worker.sandbox import Bind, BubblewrapRunner, RootMode, SandboxRequest, SandboxSetupError, prepare_build_dir
from reapi_worker.sandbox.network import SlirpNat
from reapi_worker.sandbox.reaper import is_child_subreaper

pytestmark = pytest.mark.bwrap
HOST_PATH = "/usr/bin:/bin"
OUTSIDE_REPLY = b"hello from outside\n"


@pytest.fixture(scope="module")
def runner() -> BubblewrapRunner:
    for tool in ("bwrap", "setpriv", "slirp4netns", "ip", "nsenter", "python3"):
        require_tool(tool)
    require(os.geteuid() == 0, "the worker's sandbox tests run as root (uid switch, chown, namespaces)")
    return BubblewrapRunner(nat=SlirpNat())


@dataclass
class Build:
    base: pathlib.Path
    runner: BubblewrapRunner
    root_mode: RootMode

    def run(self, *arguments: str, network: bool = False) -> tuple[int, str]:
        """Run in a fresh input root of this root mode; the exit code and stdout+stderr."""
        root = pathlib.Path(tempfile.mkdtemp(dir=self.base))
        binds: tuple[Bind, ...] = ()
        if self.root_mode is RootMode.CHROOT:
            # A root as BuildStream sends one: links into /usr, bound from the host.
            for name in ("bin", "lib", "lib64", "sbin"):
                if os.path.islink(f"/{name}"):
                    (root / name).symlink_to(os.readlink(f"/{name}"))
            binds = (Bind("/usr", "/usr"),)
        prepare_build_dir(str(root), *self.runner.host_ids)
        out = str(root) + ".out"
        request = SandboxRequest(
            arguments=arguments, environment={"PATH": HOST_PATH}, input_root=str(root),
            stdout_path=out, stderr_path=out, root_mode=self.root_mode, network=network,
            extra_ro_binds=binds,
        )
        result = self.runner.run(request)
        return result.exit_code, pathlib.Path(out).read_text()


@pytest.fixture(params=[RootMode.HOST_TOOLS, RootMode.CHROOT], ids=["host-tools", "chroot"])
def build(runner, request) -> Iterator[Build]:
    if request.param is RootMode.CHROOT:
        require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "chroot roots here link into a merged /usr")
    # Not pytest's tmp_path: bubblewrap, as the sandbox uid, must reach the input root.
    base = pathlib.Path(tempfile.mkdtemp(prefix="reapi-tenant-test-", dir="/dev/shm"))
    base.chmod(0o711)
    yield Build(base, runner, request.param)
    shutil.rmtree(base)


# --- the network ----------------------------------------------------------------------------


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(argv)}: {done.stderr}"


@dataclass(frozen=True)
class Outside:
    address: str
    port: int
    host_side: str  # the worker's end of the cable: a host address like any other


@pytest.fixture(scope="module")
def outside(runner) -> Iterator[Outside]:
    """A network namespace cabled to the worker's, serving OUTSIDE_REPLY on a TCP port."""
    suffix = uuid.uuid4().hex[:6]
    netns, host_end = f"rwtn-out-{suffix}", f"rwtn-{suffix}"
    subnet = 100 + int(suffix[:2], 16) % 100
    host_side, address = f"10.239.{subnet}.1", f"10.239.{subnet}.2"
    _ip("netns", "add", netns)
    server = None
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("addr", "add", f"{host_side}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", netns, "addr", "add", f"{address}/30", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        serve = textwrap.dedent(f"""
            import socket, sys
            server = socket.create_server(({address!r}, 0))
            print(server.getsockname()[1], flush=True)
            while True:
                conn, _ = server.accept()
                conn.sendall({OUTSIDE_REPLY!r})
                conn.close()
        """)
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "--", sys.executable, "-c", serve],
            stdout=subprocess.PIPE, text=True,
        )
        port = int(server.stdout.readline())  # printed once it listens
        yield Outside(address, port, host_side)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def host_addresses() -> list[str]:
    """Every IPv4 address of the worker's namespace but loopback."""
    done = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    return [
        info["local"] for link in json.loads(done.stdout) for info in link.get("addr_info", [])
        if not info["local"].startswith("127.")
    ]


#: Runs inside the sandbox: tries each "host:port" (or "@abstract-name") argument and
#: prints one JSON object: target -> the reply, or the error.
PROBE = textwrap.dedent("""
    import json, socket, sys
    seen = {}
    for target in sys.argv[1:]:
        try:
            if target.startswith("@"):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(3)
                s.connect("\\0" + target[1:])
            else:
                host, port = target.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=3)
            seen[target] = "connected " + s.recv(100).decode()
        except OSError as e:
            seen[target] = "refused " + type(e).__name__
    print(json.dumps(seen))
""")


@contextlib.contextmanager
def listening(address: str, family: int = socket.AF_INET) -> Iterator[socket.socket]:
    with socket.socket(family) as server:
        server.bind((address, 0) if family == socket.AF_INET else address)
        server.listen(16)
        server.settimeout(0)
        yield server


def probe(build: Build, targets: list[str], network: bool) -> dict[str, str]:
    code, output = build.run("python3", "-c", PROBE, *targets, network=network)
    assert code == 0, output
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("network", [True, False], ids=["network-on", "network-off"])
def test_attack_cannot_connect_to_the_hosts_loopback_its_addresses_or_its_abstract_sockets(build, outside, network):
    abstract = f"rwtn-{uuid.uuid4().hex}"
    with listening("127.0.0.1") as loopback, listening("0.0.0.0") as every_address, \
            listening("\0" + abstract, socket.AF_UNIX) as abstract_server:
        loopback_port, worker_port = loopback.getsockname()[1], every_address.getsockname()[1]
        targets = [
            f"127.0.0.1:{loopback_port}",
            f"10.0.2.2:{loopback_port}",  # slirp's name for the host's loopback
            *(f"{address}:{worker_port}" for address in host_addresses()),  # the veth's end included
            f"@{abstract}",
        ]
        assert f"{outside.host_side}:{worker_port}" in targets
        seen = probe(build, targets, network)
        for server in (loopback, every_address, abstract_server):
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody got through, not even half-way
    assert all(result.startswith("refused") for result in seen.values()), seen


def test_network_on_reaches_a_server_outside(build, outside):
    target = f"{outside.address}:{outside.port}"
    assert probe(build, [target], network=True) == {target: "connected " + OUTSIDE_REPLY.decode()}
    assert probe(build, [target], network=False)[target].startswith("refused")


def test_network_on_without_an_outbound_nat_is_refused_before_anything_runs(build, tmp_path):
    plain = BubblewrapRunner()
    request = SandboxRequest(
        arguments=("true",), environment={}, input_root=str(build.base), stdout_path=str(tmp_path / "o"),
        stderr_path=str(tmp_path / "e"), network=True,
    )
    with pytest.raises(SandboxSetupError, match="network"):
        plain.run(request)


# --- worker facts ----------------------------------------------------------------------------


def test_attack_proc_1_environ_and_mountinfo_show_no_worker_path_or_environment(build, monkeypatch):
    monkeypatch.setenv("REAPI_WORKER_SECRET", "must-not-leak")
    worker_cwd = os.getcwd()
    code, output = build.run("sh", "-c", "tr '\\0' '\\n' < /proc/1/environ; echo ---; cat /proc/self/mountinfo")
    assert code == 0, output
    environ, mountinfo = output.split("---\n")
    # bubblewrap's init carries the environment it was started with: none at all.
    assert environ.split() == []
    assert worker_cwd not in mountinfo and "must-not-leak" not in mountinfo
    # Known and documented: the kernel prints a bind mount's source path within its file
    # system, so the build directory's own path shows as the root of the input root's mount
    # (and nowhere else).
    naming_the_build = [line.split()[4] for line in mountinfo.splitlines() if build.base.name in line]
    input_root = "/build" if build.root_mode is RootMode.HOST_TOOLS else "/"
    assert naming_the_build == [input_root]


@pytest.fixture
def worker_config_in_etc() -> Iterator[str]:
    """A world-readable worker config directory in the host's /etc, as a ConfigMap mount is."""
    name = f"reapi-worker-test-{uuid.uuid4().hex[:8]}"
    path = pathlib.Path("/etc") / name
    path.mkdir(mode=0o755)
    (path / "worker.toml").write_text('access_token_file = "/run/secrets/token"\n')
    (path / "worker.toml").chmod(0o644)
    yield name
    shutil.rmtree(path)


def test_attack_host_tools_etc_shows_only_the_allow_list(runner, worker_config_in_etc, tmp_path):
    base = pathlib.Path(tempfile.mkdtemp(prefix="reapi-tenant-test-", dir="/dev/shm"))
    try:
        base.chmod(0o711)
        prepare_build_dir(str(base), *runner.host_ids)
        out = str(tmp_path / "out")
        request = SandboxRequest(
            arguments=("sh", "-c", "ls -A /etc; cat /etc/passwd > /dev/null && echo passwd-readable"),
            environment={"PATH": HOST_PATH}, input_root=str(base), stdout_path=out, stderr_path=out,
        )
        assert runner.run(request).exit_code == 0, pathlib.Path(out).read_text()
        *listed, last = pathlib.Path(out).read_text().split()
    finally:
        shutil.rmtree(base)
    assert last == "passwd-readable"
    expected = sorted(path.removeprefix("/etc/") for path in (e.path for e in runner.layout.entries)
                      if path.startswith("/etc/"))
    assert sorted(listed) == expected
    assert worker_config_in_etc not in listed
    for secret in ("shadow", "gshadow", "machine-id", "ssh", "sudoers", "crontab"):
        assert secret not in listed


# --- zombies ----------------------------------------------------------------------------------


ZOMBIE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from reapi_worker.sandbox import BubblewrapRunner, SandboxRequest, prepare_build_dir
    assert os.getpid() == 1, os.getpid()
    base = sys.argv[1]
    runner = BubblewrapRunner()
    prepare_build_dir(base, *runner.host_ids)
    for i in range(int(sys.argv[2])):
        # A daemon left behind too: it dies with the sandbox's pid namespace.
        request = SandboxRequest(
            arguments=("sh", "-c", "sleep 60 & exit 0"), environment={"PATH": "/usr/bin:/bin"},
            input_root=base, stdout_path=base + ".out", stderr_path=base + ".out",
        )
        assert runner.run(request).exit_code == 0
    # The spawner reaps its children as their SIGCHLD comes in, so the last action's may be
    # a zombie for a moment after run returned; none may stay.
    deadline = time.monotonic() + 2
    while True:
        zombies = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if fields[0] == "Z":
                zombies.append(pid)
        if not zombies or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    print("zombies", len(zombies))
""")


def test_no_zombie_outlives_100_actions_with_the_worker_as_pid_1(runner, tmp_path):
    require_tool("unshare")
    base = pathlib.Path(tempfile.mkdtemp(prefix="reapi-tenant-test-", dir="/dev/shm"))
    try:
        base.chmod(0o711)
        root = base / "root"
        root.mkdir()
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", ZOMBIE_SCRIPT, str(root), "100"],
            capture_output=True, text=True, timeout=600,
        )
    finally:
        shutil.rmtree(base)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["zombies", "0"]


def test_the_runner_makes_the_worker_a_child_subreaper(runner):
    assert is_child_subreaper()
