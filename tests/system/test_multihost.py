"""Operate a farm: BuildGrid and two workers on three "hosts", and a cable cut mid-action.

Each host is a network namespace. The scheduler's namespace is the switch: one veth pair
("cable") per worker host ends in it, and BuildGrid listens on an address of its own
(``SERVER_IP`` on its loopback) that each worker reaches through its cable::

    rwmh-a-*  eth0 10.231.1.2 ──── to-a 10.231.1.1 ┐
                                                    ├ rwmh-bgd-*  BuildGrid on 10.231.0.1:PORT
    rwmh-b-*  eth0 10.231.2.2 ──── to-b 10.231.2.1 ┘              + unix socket (the client)

The test's own client (CAS uploads, Execute) runs in pytest, in the root namespace; it
talks to BuildGrid through a Unix socket that the server also listens on, so the root
namespace gets no interface, address or route: nothing here can clash with the machine's
own network or with another test session doing the same (every namespace is private and
named with a random suffix, so the 10.231.* addresses exist only inside them).

Cutting a cable is ``ip link set to-X down`` on the switch side: the worker's end loses
carrier and its packets go nowhere, as with a pulled cable; ``up`` restores it, and the
kernel re-adds the switch's route on its own (cutting the worker's end instead would delete
the worker's route to the server, which a real cable cut does not do).

Processes enter a namespace with ``nsenter --net`` rather than ``ip netns exec``: the latter
also remounts /sys, which hides /sys/fs/cgroup, and a worker started that way silently
loses its cgroup limits (``capabilities`` shows ``resource_controller rlimit`` instead of
the host's cgroup controller).

BuildGrid runs with ``bot-session-keepalive-timeout`` ``KEEPALIVE`` (docs/buildgrid-protocol.md section 8):
a worker that cannot reach it for that long loses its session, and its lease is requeued.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bot_fixtures import CLI, INSTANCE, Farm, Worker, stage_name, until
from conftest import BUILDGRID_HARNESS, require, require_tool

from reapi_worker.storage.digests import Digest
from reapi_worker.worker.client import Execution

pytestmark = [pytest.mark.buildgrid, pytest.mark.bwrap]

#: Inside the scheduler's namespace only, so it cannot clash with another BuildGrid.
PORT = 50071
SERVER_IP = "10.231.0.1"
#: Seconds without a call before BuildGrid reaps a session (the config's 10, lowered so the
#: cut costs less time; >= 4 keeps long-polling working, docs/buildgrid-protocol.md section 5).
KEEPALIVE = 5
#: Each worker's capacity.
CONCURRENCY = 2
#: How long the action that is cut off sleeps: long enough that the cut lands mid-action.
LONG_ACTION_SECONDS = 6


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command; raise with its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def in_netns(netns: str, *argv: str) -> list[str]:
    """``argv`` run in network namespace ``netns`` (and only that: mounts stay the host's)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


@dataclass(frozen=True)
class Host:
    """A worker host: its namespace, its address, and its cable's end on the switch."""

    name: str
    netns: str
    address: str
    switch_port: str


class FarmNetwork:
    """The scheduler's namespace and one namespace per worker host, cabled to it.

    :meth:`close` deletes every namespace made so far, also after a failed setup; it does
    not stop processes inside them (the caller does that first).
    """

    def __init__(self, host_names: tuple[str, ...]) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.server_netns = f"rwmh-bgd-{suffix}"
        self.hosts = tuple(
            Host(name, f"rwmh-{name}-{suffix}", f"10.231.{i}.2", f"to-{name}")
            for i, name in enumerate(host_names, start=1)
        )
        self._made: list[str] = []

    def __enter__(self) -> FarmNetwork:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        server = self.server_netns
        self._add_netns(server)
        _run("ip", "-n", server, "addr", "add", f"{SERVER_IP}/32", "dev", "lo")
        for i, host in enumerate(self.hosts, start=1):
            self._add_netns(host.netns)
            switch_ip = f"10.231.{i}.1"
            _run("ip", "-n", server, "link", "add", host.switch_port, "type", "veth",
                 "peer", "name", "eth0", "netns", host.netns)
            _run("ip", "-n", server, "addr", "add", f"{switch_ip}/24", "dev", host.switch_port)
            _run("ip", "-n", server, "link", "set", host.switch_port, "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.netns, "route", "add", f"{SERVER_IP}/32", "via", switch_ip)

    def _add_netns(self, netns: str) -> None:
        _run("ip", "netns", "add", netns)
        self._made.append(netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")

    def cut(self, host: Host) -> None:
        _run("ip", "-n", self.server_netns, "link", "set", host.switch_port, "down")

    def restore(self, host: Host) -> None:
        _run("ip", "-n", self.server_netns, "link", "set", host.switch_port, "up")

    def close(self) -> None:
        # Deleting a namespace drops its veth ends too; a pair goes when either end does.
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._made.clear()


class NetnsBuildGrid:
    """BuildGrid (with its PostgreSQL) started by start.sh inside ``netns``, on
    ``SERVER_IP:PORT`` for the workers and on a Unix socket for the test's client.

    The state directory (PostgreSQL data, CAS, logs, the derived config, the socket) is a
    fresh one under /tmp, removed by :meth:`stop`. PostgreSQL itself only uses a Unix socket,
    so it needs no network in the namespace.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        # Short and world-searchable: PostgreSQL runs as user postgres and its socket path
        # must stay under 100 bytes.
        self.state = tempfile.mkdtemp(prefix="rwmh-", dir="/tmp")
        os.chmod(self.state, 0o755)
        self.socket = os.path.join(self.state, "bgd.sock")
        self.config = os.path.join(self.state, "config-with-socket.yml")
        self.env = {
            **os.environ,
            "BGD_PORT": str(PORT),
            "BGD_HOST": SERVER_IP,
            "BGD_ALLOW_NON_LOOPBACK": "1",
            "BGD_STATE_DIR": os.path.join(self.state, "bgd"),
            "BGD_CONFIG": self.config,
            "BGD_BOT_KEEPALIVE": str(KEEPALIVE),
            "BGD_NO_APT": "1",  # the namespace has no way out; installs happen in install()
        }

    @property
    def client_address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def worker_remote(self) -> str:
        return f"grpc://{SERVER_IP}:{PORT}"

    def start(self) -> None:
        self._write_config()
        # The venv is made (or checked) in the root namespace, where PyPI can be reached.
        install = subprocess.run([str(BUILDGRID_HARNESS), "install"], env=self.env,
                                 capture_output=True, text=True, timeout=900)
        require(install.returncode == 0, f"BuildGrid's venv could not be installed: {install.stderr[-2000:]}")
        started = subprocess.run(in_netns(self.netns, str(BUILDGRID_HARNESS), "start"), env=self.env,
                                 capture_output=True, text=True, timeout=300)
        require(started.returncode == 0, f"BuildGrid did not start in {self.netns}: {started.stderr[-3000:]}")
        assert started.stdout.strip() == f"{SERVER_IP}:{PORT}", started.stdout

    def _write_config(self) -> None:
        """deploy/buildgrid/config.yml with a second listening channel: the Unix socket."""
        with open(BUILDGRID_HARNESS.parent / "config.yml", encoding="utf-8") as stream:
            text = stream.read()
        channel = f"server:\n  - !channel\n    address: unix:{self.socket}\n    insecure-mode: true\n"
        assert text.count("\nserver:\n") == 1, "config.yml changed shape: no single top-level 'server:' list"
        with open(self.config, "w", encoding="utf-8") as stream:
            stream.write(text.replace("\nserver:\n", "\n" + channel, 1))

    def log_tail(self, lines: int = 40) -> str:
        path = os.path.join(self.state, "bgd", "bgd.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as stream:
                return "".join(stream.readlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def stop(self) -> None:
        subprocess.run(in_netns(self.netns, str(BUILDGRID_HARNESS), "stop"), env=self.env,
                       capture_output=True, timeout=120)
        shutil.rmtree(self.state, ignore_errors=True)


@dataclass
class MultiHostFarm:
    network: FarmNetwork
    server: NetnsBuildGrid
    farm: Farm

    def start_worker(self, host: Host) -> Worker:
        """A ``reapi-worker bot`` on ``host`` (its own namespace), like
        :meth:`Farm.start_worker` but reaching the scheduler over its cable."""
        farm = self.farm
        top = os.path.join(farm.top, host.name)
        os.makedirs(top, mode=0o755)
        log_path = os.path.join(top, "worker.log")
        args = in_netns(host.netns, *CLI,
            "--log-level", "INFO", "bot",
            "--remote", self.server.worker_remote, "--instance-name", INSTANCE,
            "--bot-id", f"{farm.token}-{host.name}", "--concurrency", str(CONCURRENCY),
            "--platform", f"ISA={farm.token}",
            "--cache-dir", os.path.join(top, "cache"), "--build-root", os.path.join(top, "builds"),
            "--cache-size", "500M", "--log-format", "json",
            # Back on its feet soon after the cable returns, not after a 5 s backoff.
            "--max-backoff-seconds", "1",
        )
        env = {**os.environ, "no_proxy": SERVER_IP, "NO_PROXY": SERVER_IP}
        with open(log_path, "wb") as log:
            # nsenter execs the worker (no fork without --pid), so this is the worker's pid.
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        worker = Worker(f"{farm.token}-{host.name}", top, process, log_path)
        farm.workers.append(worker)  # killed by Farm.close
        return worker


@pytest.fixture
def multihost() -> Iterator[MultiHostFarm]:
    require(os.geteuid() == 0, "network namespaces and veth pairs need root")
    for tool in ("ip", "nsenter", "bwrap"):
        require_tool(tool)
    with FarmNetwork(("a", "b")) as network:
        server = NetnsBuildGrid(network.server_netns)
        try:
            server.start()
            farm = Farm(server.client_address)
            try:
                yield MultiHostFarm(network, server, farm)
            finally:
                farm.close()  # kills the workers first: nothing may be left in the namespaces
        finally:
            server.stop()


def _execute_all(farm: Farm, digests: list[Digest], timeout: float) -> list[Execution]:
    """Execute them all at once; raise TimeoutError if one is not done within ``timeout``
    (its thread is left to end when Farm.close closes the channel)."""
    pool = concurrent.futures.ThreadPoolExecutor(20)
    try:
        futures = [pool.submit(farm.execute, digest) for digest in digests]
        deadline = time.monotonic() + timeout
        return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _check_outputs(farm: Farm, executions: list[Execution], first: int) -> None:
    for i, execution in enumerate(executions, start=first):
        assert execution.ok, execution.response.status
        assert execution.response.result.exit_code == 0, execution.response.result
        assert farm.read_output(execution, "out.txt") == f"{i}\n".encode()


def _logs(*workers: Worker) -> str:
    return "\n".join(f"---- {w.bot_id} ----\n{w.log_text()[-6000:]}" for w in workers)


def test_a_cut_cable_requeues_the_lease_on_the_other_host_and_the_cut_worker_comes_back(multihost):
    farm = multihost.farm
    hosts = {host.name: host for host in multihost.network.hosts}
    workers = {name: multihost.start_worker(host) for name, host in hosts.items()}
    for worker in workers.values():
        worker.wait_registered(60)

    # 1. Fifty actions over the network: each runs once, with its own result, on both hosts.
    began = time.monotonic()
    digests = [farm.action(f"echo {i} > out.txt", outputs=("out.txt",)) for i in range(50)]
    executions = _execute_all(farm, digests, timeout=180)
    _check_outputs(farm, executions, first=0)
    runs = [e["action"] for w in workers.values() for e in w.leases()]
    assert sorted(runs) == sorted(str(d) for d in digests), _logs(*workers.values())
    assert all(w.leases("completed") for w in workers.values()), "one host took no work"
    assert {e.response.result.execution_metadata.worker for e in executions} == {w.bot_id for w in workers.values()}

    fifty_done = time.monotonic()

    # 2. A long action; whichever host runs it loses its cable while the command runs.
    mark = uuid.uuid4().hex
    long_action = farm.action(f"touch started; sleep {LONG_ACTION_SECONDS}; echo {mark} > out.txt",
                              outputs=("out.txt",))
    stages: list[str] = []
    stages_lock = threading.Lock()

    def watch(operation) -> None:
        with stages_lock:
            stages.append(stage_name(operation))

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pending = pool.submit(farm.execute, long_action, on_operation=watch)

        def running_on() -> str | None:
            for name, worker in workers.items():
                if glob.glob(os.path.join(worker.build_root, "*", "started")):
                    return name
            return None

        cut_name = until(running_on, 60, "the long action's command to start", interval=0.02)
        (other_name,) = set(workers) - {cut_name}
        cut, other = workers[cut_name], workers[other_name]
        sessions_before_cut = cut.sessions_created()
        multihost.network.cut(hosts[cut_name])
        cut_at = time.monotonic()

        # The cut worker goes silent; after KEEPALIVE (+ the reaper's second) BuildGrid
        # requeues its lease, and the other host runs the action from the start: ~12 s.
        execution = pending.result(timeout=120)
    finally:
        pool.shutdown(wait=False)
    assert execution.ok, (execution.response.status, _logs(cut, other))
    assert farm.read_output(execution, "out.txt") == f"{mark}\n".encode()
    assert execution.response.result.execution_metadata.worker == other.bot_id, (
        _logs(cut, other) + "\n---- BuildGrid ----\n" + multihost.server.log_tail())
    other_runs = [e for e in other.leases("completed") if e["action"] == str(long_action)]
    assert len(other_runs) == 1 and other_runs[0]["status"] == "OK", _logs(other)
    assert cut.process.poll() is None, f"the cut worker died:\n{_logs(cut)}"
    # The cut worker could not have made a new session: the cable is still cut.
    assert cut.sessions_created() == sessions_before_cut, _logs(cut)
    requeued = time.monotonic()

    # 3. The cable returns: the cut worker makes a new session (its old one was reaped) and
    # takes work again, shown by stopping the other host and running more actions.
    multihost.network.restore(hosts[cut_name])
    until(lambda: cut.sessions_created() > sessions_before_cut or cut.process.poll() is not None, 120,
          f"{cut.bot_id} to create a new session after the cable returned")
    assert cut.process.poll() is None, _logs(cut)
    recovered = time.monotonic()
    # Its own run of the long action ends too (its upload waited for the cable): the same
    # lease as the other host's, so the job was requeued, not submitted twice. That result
    # went nowhere: its session was gone, and the client had the other host's already.
    (cut_run,) = until(lambda: [e for e in cut.leases() if e["action"] == str(long_action)], 120,
                       f"{cut.bot_id} to finish its copy of the long action")
    assert cut_run["lease"] == other_runs[0]["lease"], (cut_run, other_runs)

    assert other.stop() == 0, _logs(other)
    more = [farm.action(f"echo {i} > out.txt", outputs=("out.txt",)) for i in range(50, 56)]
    more_executions = _execute_all(farm, more, timeout=120)
    _check_outputs(farm, more_executions, first=50)
    wanted = {str(d) for d in more}
    after = [e for e in cut.leases() if e["action"] in wanted]
    assert sorted(e["action"] for e in after) == sorted(wanted), _logs(cut)
    assert all(e["outcome"] == "completed" and e["status"] == "OK" for e in after), after
    assert {e.response.result.execution_metadata.worker for e in more_executions} == {cut.bot_id}

    # Nothing the cut worker did while it was away reached a client: every one of the
    # 57 executions above carried its own output, checked above. Both shut down cleanly.
    assert cut.stop() == 0, _logs(cut)
    if os.environ.get("SHOW_LOGS"):
        print(_logs(cut, other))
        print(f"long action stages seen by the client: {stages}")
        print(f"50 actions {fifty_done - began:.1f} s; cut -> result from the other host "
              f"{requeued - cut_at:.1f} s; cable back -> new session {recovered - requeued:.1f} s; "
              f"test body {time.monotonic() - began:.1f} s")
