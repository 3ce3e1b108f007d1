"""Building blocks for the bot's system tests: real worker processes and a real client.

Isolation on a shared BuildGrid: each test gets a token (``Farm.token``), its workers
advertise ``ISA=<token>`` and its actions ask for it. On instance ``main`` ISA is a match
key (docs/buildgrid-protocol.md section 9), so no other worker takes these jobs, whoever else uses the
server at the same time.

Workers are real subprocesses (``python -m reapi_worker.worker.cli bot``) logging JSON
lines, so tests count executions from the one-line-per-lease log, and kill them for real.
Their cache and build directories live under /tmp with 0755 parents: bubblewrap runs
actions as uid 65534, which must reach the build directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from reapi_worker.protos import re_pb2
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.fuse import kernel_mounts
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.worker.client import CommandSpec, Execution, ExecutionClient, build_action

CLI = [sys.executable, "-m", "reapi_worker.worker.cli"]
INSTANCE = "main"


def until(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Worker:
    """One ``reapi-worker bot`` process. ``log_path`` holds its JSON log lines."""

    bot_id: str
    top: str
    process: subprocess.Popen
    log_path: str

    @property
    def build_root(self) -> str:
        return os.path.join(self.top, "builds")

    def entries(self) -> list[dict]:
        entries = []
        with open(self.log_path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return entries

    def leases(self, outcome: str | None = None) -> list[dict]:
        """The one-per-lease log entries (optionally only those that ended ``outcome``)."""
        found = [e for e in self.entries() if e.get("logger") == "reapi_worker.lease" and "lease" in e]
        return [e for e in found if outcome is None or e.get("outcome") == outcome]

    def sessions_created(self) -> int:
        return sum(1 for e in self.entries() if e.get("message", "").startswith("session ") and "created" in e["message"])

    def wait_registered(self, timeout: float = 30.0) -> None:
        until(lambda: self.sessions_created() > 0 or self.process.poll() is not None, timeout, f"{self.bot_id} to register")
        assert self.process.poll() is None, f"worker {self.bot_id} exited:\n{self.log_text()}"

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


@dataclass
class Farm:
    """Workers and a client for one test, against one BuildGrid at ``address``."""

    address: str
    token: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:12])
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.top = tempfile.mkdtemp(prefix="reapi-bot-test-", dir="/tmp")
        os.chmod(self.top, 0o755)
        self._channel = grpc.insecure_channel(self.address)
        self._local = LocalCAS(os.path.join(self.top, "client-cache"), max_bytes=1 << 30)
        self._remote = RemoteCAS(self._channel, RemoteOptions(instance_name=INSTANCE))
        self.store = FetchThroughStore(self._local, self._remote)
        self.client = ExecutionClient(self._channel, INSTANCE)

    @property
    def platform(self) -> tuple[tuple[str, str], ...]:
        return (("ISA", self.token),)

    def start_worker(self, name: str, concurrency: int = 1, *extra: str, log_level: str = "INFO") -> Worker:
        bot_id = f"{self.token}-{name}"
        top = os.path.join(self.top, name)
        os.makedirs(top, mode=0o755)
        log_path = os.path.join(top, "worker.log")
        args = CLI + [
            "--log-level", log_level, "bot",
            "--remote", f"grpc://{self.address}", "--instance-name", INSTANCE,
            "--bot-id", bot_id, "--concurrency", str(concurrency),
            "--platform", f"ISA={self.token}",
            "--cache-dir", os.path.join(top, "cache"), "--build-root", os.path.join(top, "builds"),
            "--cache-size", "500M", "--log-format", "json", *extra,
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        worker = Worker(bot_id, top, process, log_path)
        self.workers.append(worker)
        return worker

    def action(self, script: str, outputs: tuple[str, ...] = (), inputs: str | None = None, salt: str = "") -> Digest:
        """Upload an action running ``sh -c script`` for this farm's workers."""
        spec = CommandSpec(
            arguments=("/bin/sh", "-c", script),
            environment=(("PATH", "/usr/bin:/bin"),),
            output_paths=outputs,
            platform=self.platform,
            salt=(salt or uuid.uuid4().hex).encode(),
        )
        digest, blobs = build_action(self.store, spec, inputs)
        self.store.upload_missing(blobs)
        return digest

    def execute(self, digest: Digest, on_operation=None) -> Execution:
        return self.client.execute(digest, skip_cache_lookup=True, on_operation=on_operation)

    def execute_many(self, digests: list[Digest], parallel: int = 20) -> list[Execution]:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(self.execute, digests))

    def read_output(self, execution: Execution, path: str) -> bytes:
        for out in execution.response.result.output_files:
            if out.path == path:
                return self.store.read(Digest.from_proto(out.digest))
        raise AssertionError(f"no output {path!r} in {execution.response.result}")

    def stdout(self, execution: Execution) -> str:
        return self.store.read(Digest.from_proto(execution.response.result.stdout_digest)).decode()

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
        self._remote.close()
        self._local.close()
        self._channel.close()
        if os.geteuid() == 0:
            # A worker killed mid-action leaves its per-action mounts (the next worker on its
            # build root would sweep them): never leave them on the host.
            kernel_mounts.detach_all_under(self.top)
        shutil.rmtree(self.top, ignore_errors=True)


def build_root_parts(build_root: str) -> list[str]:
    """The workers' parts of a build root (``w-<token>``, storage/build_root.py)."""
    if not os.path.isdir(build_root):
        return []
    return [os.path.join(build_root, n) for n in os.listdir(build_root) if n.startswith("w-")]


def staged_builds(worker: Worker, build_root: str | None = None) -> list[str]:
    """The worker's per-action build directories (not its own dot-directories, e.g. the
    trash that exists from the start): non-empty once an action is being staged.
    ``build_root``: where the worker was told to put them, if not its default."""
    parts = build_root_parts(build_root or worker.build_root)
    return [n for part in parts for n in os.listdir(part) if not n.startswith(".")]


def trash_entries(worker: Worker) -> list[str]:
    """Trees handed to the worker's background remover and not yet removed."""
    found = []
    for part in build_root_parts(worker.build_root):
        trash = os.path.join(part, ".trash")
        found += os.listdir(trash) if os.path.isdir(trash) else []
    return found


def stage_name(operation) -> str:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    return re_pb2.ExecutionStage.Value.Name(metadata.stage)


@contextlib.contextmanager
def small_tmpfs(farm: Farm, size_bytes: int, prefix: str) -> Iterator[str]:
    """A tmpfs of ``size_bytes``, mode 0755 with 0755 parents (the sandbox uid must reach a
    build root under it), for a worker's cache and build root. Unmounted when the context
    ends, after the farm's workers are killed (a running worker keeps it busy)."""
    top = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(top, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", top], check=True)
    try:
        yield top
    finally:
        for worker in farm.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
        if subprocess.run(["umount", top]).returncode != 0:
            subprocess.run(["umount", "--lazy", top], check=False)
        os.rmdir(top)
