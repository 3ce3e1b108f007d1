"""Throughput and latency of trivial actions through a real BuildGrid and one real worker.

What is measured (medians over ``--repeats``; every row run once per repeat, interleaved):

* ``bot c=C in-flight K`` — ``--actions`` unique actions (``sh -c 'echo x > out'``, a fresh
  salt each, so nothing is cached; ``skip_cache_lookup``) sent through BuildGrid's Execution
  service to one ``reapi-worker bot`` process at ``--concurrency C``, by K client threads in a
  closed loop (each submits its next action when its last one completes); K is C, 2C and 4C
  (``--in-flight 1,2,4``). K = C: every action finds a free slot, so latency is what one
  action costs end to end; K = 2C, 4C: actions wait behind each slot, so actions/s
  approaches what the worker *and the scheduler* can sustain (2C is not enough to keep a
  slot busy: a completed action's client learns of it ~30 ms late, so the next submission
  often misses the refill), and "queue" grows by construction.
  Per action: end-to-end latency (client's Execute call to the completed Operation), and its
  parts, which add up to it exactly:

  =========  =====================================================================
  submit     client's Execute call -> job queued (ExecuteResponse ``queued_timestamp``)
  queue      queued -> assigned to the bot (``worker_start_timestamp``, set by BuildGrid)
  dispatch   assigned -> the worker's executor starts (``input_fetch_start``): the lease
             reaching the bot through UpdateBotSession, and a lease thread starting
  fetch      Action/Command/input tree into the local cache (the worker's lease log, ``fetch_s``)
  stage      input root made a directory (log ``stage_s``; ends at ``input_fetch_completed``)
  run        -> ``execution_completed``: the bubblewrap sandbox
  upload     -> ``output_upload_completed``: capture and upload outputs, stdout, stderr
  report     -> ``worker_completed_timestamp`` (set by BuildGrid when the completion reached it)
  notify     -> the client's Execute stream delivers the completed Operation
  =========  =====================================================================

  BuildGrid overwrites queued/worker_start/worker_completed (docs/buildgrid-protocol.md
  section 6); the rest are the worker's own stamps. One clock: all on this host.

Baselines, measured in the same run, interleaved with the rows above:

* ``baseline: in-process Executor, C threads`` — the same kind of actions (fresh salts; the
  Action passed in directly, as a lease payload carries it) through the Executor that
  ``reapi-worker execute --local`` builds (``worker.compose.open_executor``: the same
  BuildGrid CAS, local cache, hardlink stager, bubblewrap as uid 65534), by C threads. It
  is the identical pipeline without the scheduler, so bot / baseline is what BuildGrid and
  the Bots session protocol add per action. Chosen over a bare ``bwrap`` loop because that
  would also charge the worker's own fetch/stage/capture/upload to "the scheduler".
* ``floor: setpriv+bwrap /bin/true`` — the sandbox alone, sequential: the part of every
  row that no worker can avoid.

Also per row: CPU ms per action of the worker process (with its sandboxes), the BuildGrid
server, its PostgreSQL and the bench process (psutil; see :class:`CpuMeter`), to show which
process the 2 CPUs go to. Everything lives on /dev/shm (docs/measured.md: ext4 inode churn). The worker logs JSON lines,
one per lease (worker/leases.py); the bench joins them to executions by action digest.
Timings are printed and written to bench/results/; nothing is asserted about them. The
exit status is 1 if any action failed or produced a wrong result.

Needs root (bubblewrap as uid 65534 is what the worker does) and a BuildGrid on
``--remote`` (instance ``main``); if nothing answers there, the bench starts one with
``BGD_PORT=<port> deploy/buildgrid/start.sh`` and stops it at the end.

Usage: .venv/bin/python bench/bench_bot.py [--actions 200] [--repeats 3] [--in-flight 1,2,4] [--remote 127.0.0.1:50081]
       .venv/bin/python bench/bench_bot.py --quick     # 20 actions, 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psutil

from reapi_worker.protos import re_grpc, re_pb2
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.worker.client import CommandSpec, ExecutionClient, build_action
from reapi_worker.worker.compose import open_executor
from reapi_worker.worker.config import WorkerConfig
from reapi_worker.worker.executor import Executor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
START_SH = os.path.join(REPO, "deploy", "buildgrid", "start.sh")
CLI = [sys.executable, "-m", "reapi_worker.worker.cli"]
INSTANCE = "main"
DEFAULT_REMOTE = "127.0.0.1:50081"  # not 50051: test sessions use that one
SCRIPT = "echo x > out"
OUTPUT = "out"
EXPECTED_OUTPUT = Digest.of_bytes(b"x\n")
#: The phases of one action through the bot, in order; their durations add up to its latency.
BOT_PHASES = ("submit", "queue", "dispatch", "fetch", "stage", "run", "upload", "report", "notify")
EXECUTOR_PHASES = ("fetch", "stage", "run", "upload")

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "/bin/true"]
SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


# -- the farm: a client, worker processes ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An uploaded action: its digest and the Action itself (what a lease payload carries)."""

    digest: Digest
    action: re_pb2.Action


class WorkerProcess:
    """One ``reapi-worker bot`` subprocess logging JSON lines to ``log_path``."""

    def __init__(self, bot_id: str, top: str, process: subprocess.Popen, log_path: str) -> None:
        self.bot_id = bot_id
        self.top = top
        self.process = process
        self.log_path = log_path
        self._offset = 0
        self._leases: dict[str, dict[str, Any]] = {}
        self.lease_lines: collections.Counter[str] = collections.Counter()  # log lines per action
        self._sessions = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def build_root(self) -> str:
        return os.path.join(self.top, "builds")

    def _read_log(self) -> None:
        """Parse the log lines written since the last call."""
        with open(self.log_path, "rb") as stream:
            stream.seek(self._offset)
            data = stream.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        self._offset += end
        for raw in data[:end].splitlines():
            if not raw.startswith(b"{"):
                continue
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if entry.get("logger") == "reapi_worker.lease" and "action" in entry and "outcome" in entry:
                self._leases[entry["action"]] = entry
                self.lease_lines[entry["action"]] += 1
            elif entry.get("message", "").startswith("session ") and "created" in entry["message"]:
                self._sessions += 1

    def lease_entries(self) -> dict[str, dict[str, Any]]:
        """The one-per-lease log entries so far, by action digest (``HASH/SIZE``)."""
        self._read_log()
        return self._leases

    @property
    def sessions_created(self) -> int:
        self._read_log()
        return self._sessions

    def wait_registered(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._read_log()
            if self._sessions:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                with open(self.log_path, encoding="utf-8", errors="replace") as stream:
                    tail = stream.read()[-3000:]
                raise RuntimeError(f"worker {self.bot_id} did not register (exit {self.process.poll()}):\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


class BenchFarm:
    """A BuildGrid client and bench-owned workers, all under one directory on ``parent``.

    Each worker advertises ``ISA=<its own token>`` and actions made for it ask for that token
    (ISA is a match key on instance ``main``, docs/buildgrid-protocol.md section 9), so jobs reach exactly
    the worker they were made for, whoever else uses the server. ``close`` kills what is left
    and removes the directory."""

    def __init__(self, address: str, parent: str = "/dev/shm") -> None:
        self.address = address
        self.token = "b" + uuid.uuid4().hex[:10]
        # bubblewrap runs actions as uid 65534: every parent of a build directory must be
        # searchable by it.
        self.top = tempfile.mkdtemp(prefix="reapi-bench-bot-", dir=parent)
        os.chmod(self.top, 0o755)
        self.channel = grpc.insecure_channel(address)
        self._local = LocalCAS(os.path.join(self.top, "client-cache"), max_bytes=1 << 30)
        self._remote = RemoteCAS(self.channel, RemoteOptions(instance_name=INSTANCE))
        self.store = FetchThroughStore(self._local, self._remote)
        self.client = ExecutionClient(self.channel, INSTANCE)
        self.workers: list[WorkerProcess] = []

    def start_worker(self, name: str, concurrency: int, extra: tuple[str, ...] = ()) -> WorkerProcess:
        bot_id = f"{self.token}-{name}"
        top = os.path.join(self.top, name)
        os.makedirs(top, mode=0o755)
        log_path = os.path.join(top, "worker.log")
        args = CLI + [
            "--log-level", "INFO", "bot",
            "--remote", f"grpc://{self.address}", "--instance-name", INSTANCE,
            "--bot-id", bot_id, "--concurrency", str(concurrency), "--platform", f"ISA={bot_id}",
            "--cache-dir", os.path.join(top, "cache"), "--build-root", os.path.join(top, "builds"),
            "--cache-size", "1G", "--log-format", "json", *extra,
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        worker = WorkerProcess(bot_id, top, process, log_path)
        self.workers.append(worker)
        worker.wait_registered()
        return worker

    def prepare(self, count: int, isa: str) -> list[Prepared]:
        """Upload ``count`` distinct ``sh -c 'echo x > out'`` actions asking for ``ISA=isa``."""
        prepared, blobs = [], set()
        for _ in range(count):
            spec = CommandSpec(
                arguments=("/bin/sh", "-c", SCRIPT),
                environment=(("PATH", "/usr/bin:/bin"),),
                output_paths=(OUTPUT,),
                platform=(("ISA", isa),),
                salt=uuid.uuid4().bytes,
            )
            digest, needed = build_action(self.store, spec)
            blobs |= needed
            prepared.append(Prepared(digest, re_pb2.Action.FromString(self.store.read(digest))))
        self.store.upload_missing(blobs)
        return prepared

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
        self._remote.close()
        self._local.close()
        self.channel.close()
        shutil.rmtree(self.top, ignore_errors=True)


# -- one action through the bot ------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One action's end-to-end latency (s), its phases (s, see BOT_PHASES or EXECUTOR_PHASES)
    and, if it went wrong, why."""

    latency: float
    phases: dict[str, float]
    error: str = ""


def _seconds(timestamp) -> float:  # type: ignore[no-untyped-def]
    return timestamp.ToNanoseconds() / 1e9


def check_result(status_code: int, status_message: str, result: re_pb2.ActionResult, worker_name: str) -> str:
    """Why ``result`` is not what ``echo x > out`` on ``worker_name`` gives ("" if it is)."""
    if status_code != 0:
        return f"status {status_code}: {status_message}"
    if result.exit_code != 0:
        return f"exit code {result.exit_code}"
    outputs = {out.path: Digest.from_proto(out.digest) for out in result.output_files}
    if outputs.get(OUTPUT) != EXPECTED_OUTPUT:
        return f"outputs {sorted((k, str(v)) for k, v in outputs.items())}, expected {OUTPUT}={EXPECTED_OUTPUT}"
    if result.execution_metadata.worker != worker_name:
        return f"ran on {result.execution_metadata.worker!r}, not {worker_name!r}"
    return ""


def bot_phases(submitted: float, done: float, meta: re_pb2.ExecutedActionMetadata, entry: dict[str, Any] | None) -> dict[str, float]:
    """The phases of BOT_PHASES (see the module docstring), from the client's wall clock, the
    ExecuteResponse's timestamps and the worker's log entry for the lease."""
    queued = _seconds(meta.queued_timestamp)
    assigned = _seconds(meta.worker_start_timestamp)
    fetch_start = _seconds(meta.input_fetch_start_timestamp)
    fetched = _seconds(meta.input_fetch_completed_timestamp)
    ran = _seconds(meta.execution_completed_timestamp)
    uploaded = _seconds(meta.output_upload_completed_timestamp)
    reported = _seconds(meta.worker_completed_timestamp)
    input_fetch = fetched - fetch_start
    fetch = float(entry["fetch_s"]) if entry and "fetch_s" in entry else input_fetch
    fetch = min(fetch, input_fetch)  # the log rounds to 0.1 ms
    return {
        "submit": queued - submitted,
        "queue": assigned - queued,
        "dispatch": fetch_start - assigned,
        "fetch": fetch,
        "stage": input_fetch - fetch,
        "run": ran - fetched,
        "upload": uploaded - ran,
        "report": reported - uploaded,
        "notify": done - reported,
    }


def closed_loop(items: list[Prepared], parallel: int, one: Callable[[Prepared], Sample]) -> tuple[float, list[Sample]]:
    """Run ``one`` over ``items`` from ``parallel`` threads, each taking the next item when
    its last one is done. Returns the wall time (s) and the samples in item order."""
    samples: list[Sample | None] = [None] * len(items)
    lock = threading.Lock()
    position = iter(range(len(items)))

    def loop() -> None:
        while True:
            with lock:
                index = next(position, None)
            if index is None:
                return
            try:
                samples[index] = one(items[index])
            except Exception as error:  # one broken call must not hide the rest of the run
                samples[index] = Sample(0.0, {}, f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=loop, name=f"client-{i}") for i in range(parallel)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return wall, [s for s in samples if s is not None]


def through_bot(farm: BenchFarm, worker: WorkerProcess, items: list[Prepared], in_flight: int) -> tuple[float, list[Sample]]:
    """Execute ``items`` through BuildGrid on ``worker``, ``in_flight`` at a time."""
    raw: dict[Digest, tuple[float, float, re_pb2.ExecuteResponse]] = {}

    def one(item: Prepared) -> Sample:
        submitted = time.time()
        began = time.perf_counter()
        execution = farm.client.execute(item.digest, skip_cache_lookup=True)
        latency = time.perf_counter() - began
        raw[item.digest] = (submitted, submitted + latency, execution.response)
        response = execution.response
        return Sample(latency, {}, check_result(response.status.code, response.status.message, response.result, worker.bot_id))

    wall, samples = closed_loop(items, in_flight, one)
    # Join with the worker's lease log (it writes the line just before reporting the lease,
    # so every line is there once its execution completed; wait briefly for the flush).
    deadline = time.monotonic() + 10
    while True:
        entries = worker.lease_entries()
        if all(str(d) in entries for d in raw) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for item, sample in zip(items, samples):
        if item.digest in raw and not sample.error:
            submitted, done, response = raw[item.digest]
            sample.phases = bot_phases(submitted, done, response.result.execution_metadata, entries.get(str(item.digest)))
    return wall, samples


def through_executor(executor: Executor, items: list[Prepared], threads: int) -> tuple[float, list[Sample]]:
    """The baseline: ``items`` through the in-process Executor, ``threads`` at a time."""

    def one(item: Prepared) -> Sample:
        began = time.perf_counter()
        outcome = executor.execute(item.digest, item.action)
        latency = time.perf_counter() - began
        error = check_result(outcome.status.code, outcome.status.message, outcome.result, "bench-baseline")
        return Sample(latency, dict(outcome.phases), error)

    return closed_loop(items, threads, one)


def sandbox_floor(count: int) -> tuple[float, list[Sample]]:
    def one(_: object) -> Sample:
        began = time.perf_counter()
        subprocess.run(SETPRIV + BWRAP, check=True)
        return Sample(time.perf_counter() - began, {"run": time.perf_counter() - began})

    return closed_loop([None] * count, 1, one)  # type: ignore[list-item]


# -- statistics ----------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10)[8]


@dataclasses.dataclass
class RunFigures:
    """One row's figures in one repeat."""

    actions: int
    failures: int
    wall_s: float
    per_s: float
    p50_ms: float
    p90_ms: float
    phase_ms: dict[str, float]  # median per action
    phase_share: dict[str, float]  # sum over actions / sum of latencies
    errors: list[str]
    cpu_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # CPU per action, by process (CpuMeter)


def figures(wall: float, samples: list[Sample], phases: tuple[str, ...]) -> RunFigures:
    good = [s for s in samples if not s.error]
    latencies = [s.latency for s in good]
    with_phases = [s for s in good if s.phases]
    total = sum(s.latency for s in with_phases) or float("nan")
    return RunFigures(
        actions=len(samples),
        failures=len(samples) - len(good),
        wall_s=wall,
        per_s=len(good) / wall if wall else float("nan"),
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p90_ms=p90(latencies) * 1000,
        phase_ms={p: statistics.median(s.phases.get(p, 0.0) for s in with_phases) * 1000 for p in phases} if with_phases else {},
        phase_share={p: sum(s.phases.get(p, 0.0) for s in with_phases) / total for p in phases} if with_phases else {},
        errors=[s.error for s in samples if s.error][:5],
    )


@dataclasses.dataclass
class Row:
    name: str
    phases: tuple[str, ...]
    runs: list[RunFigures] = dataclasses.field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def median_phase(self, table: str, phase: str) -> float:
        values = [getattr(run, table).get(phase) for run in self.runs]
        present = [v for v in values if v is not None and v == v]  # v == v: not NaN
        return statistics.median(present) if present else float("nan")

    @property
    def failures(self) -> int:
        return sum(run.failures for run in self.runs)


# -- the server ----------------------------------------------------------------------------


def server_answers(address: str, timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name=INSTANCE), timeout=timeout)
            return True
        except grpc.RpcError:
            return False


@contextlib.contextmanager
def buildgrid(address: str) -> Iterator[None]:
    """Use the BuildGrid at ``address``; start one with start.sh if none answers (and stop
    it afterwards: only a server this bench started)."""
    if server_answers(address):
        yield
        return
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"no BuildGrid answers on {address}, and only a loopback one can be started here")
    env = dict(os.environ, BGD_PORT=port)
    print(f"[bench] no BuildGrid on {address}: starting one (BGD_PORT={port} {START_SH})", file=sys.stderr)
    subprocess.run([START_SH], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        subprocess.run([START_SH, "stop"], env=env, check=False, stdout=subprocess.DEVNULL)


class CpuMeter:
    """CPU seconds (user + system, with reaped children) of the processes a row keeps busy:
    ``worker`` (the bot process under test, set per row), ``bgd`` (the BuildGrid server),
    ``postgres`` (its postmaster and backends) and ``bench`` (this process: the client
    threads, or the in-process Executor of a baseline row). The server's processes are found
    through ``start.sh env`` when start.sh runs it; otherwise those columns stay empty.
    A backend that exits between two readings takes its time with it (the server pools its
    connections, so few do)."""

    def __init__(self, address: str) -> None:
        self.bgd: psutil.Process | None = None
        self.postmaster: psutil.Process | None = None
        port = address.rpartition(":")[2]
        env = subprocess.run([START_SH, "env"], env=dict(os.environ, BGD_PORT=port), capture_output=True, text=True)
        values = dict(line.split("=", 1) for line in env.stdout.splitlines() if "=" in line)
        with contextlib.suppress(Exception):
            self.bgd = psutil.Process(int(values["BGD_PID"]))
        with contextlib.suppress(Exception):
            pid_file = os.path.join(values["BGD_STATE_DIR"], "postgres", "data", "postmaster.pid")
            with open(pid_file, encoding="ascii") as stream:
                self.postmaster = psutil.Process(int(stream.readline()))

    @staticmethod
    def _seconds(process: psutil.Process | None) -> float:
        if process is None:
            return float("nan")
        try:
            t = process.cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            return float("nan")

    def read(self, worker: psutil.Process | None) -> dict[str, float]:
        postgres = float("nan")
        if self.postmaster is not None:
            with contextlib.suppress(psutil.Error):
                postgres = self._seconds(self.postmaster) + sum(self._seconds(p) for p in self.postmaster.children())
        return {"worker": self._seconds(worker), "bgd": self._seconds(self.bgd), "postgres": postgres,
                "bench": self._seconds(psutil.Process())}

    @staticmethod
    def per_action_ms(before: dict[str, float], after: dict[str, float], actions: int) -> dict[str, float]:
        return {name: (after[name] - before[name]) * 1000 / max(actions, 1) for name in before}


CPU_COLUMNS = ("worker", "bgd", "postgres", "bench")


def baseline_config(address: str, top: str, staging: str) -> WorkerConfig:
    """What ``reapi-worker execute --local`` would build, against the bench's server."""
    os.makedirs(top, mode=0o755)
    return WorkerConfig(
        remote=f"grpc://{address}",
        instance_name=INSTANCE,
        cache_dir=os.path.join(top, "cache"),
        cache_size="1G",
        build_root=os.path.join(top, "builds"),
        bot_id="bench-baseline",
        staging=staging,
    )


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def write_results(stem: str, text: str, data: dict[str, Any]) -> str:
    """``bench/results/<stem>-<UTC time>.{txt,json}``; returns the path without extension."""
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"{stem}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}")
    with open(base + ".txt", "w", encoding="utf-8") as out:
        out.write(text)
    with open(base + ".json", "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2, default=str)
    return base


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default=DEFAULT_REMOTE, help=f"BuildGrid HOST:PORT (default {DEFAULT_REMOTE})")
    parser.add_argument("--actions", type=int, default=None, help="actions per row and repeat (default 200)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats; figures are medians over them (default 3)")
    parser.add_argument("--concurrency", default="1,2", help="worker concurrencies to measure (default 1,2)")
    parser.add_argument("--in-flight", default="1,2,4",
                        help="client executions at once, as multiples of the concurrency (default 1,2,4)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured actions per worker first (default 10)")
    parser.add_argument("--staging", default="hardlink", help="the worker's --staging (default hardlink)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: defaults of 20 actions, 1 repeat, 3 warm-up actions (explicit flags win)")
    args = parser.parse_args()
    for name, full, quick in (("actions", 200, 20), ("repeats", 3, 1), ("warmup", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    multiples = [int(m) for m in args.in_flight.split(",")]
    started_note = load_note()
    rows: dict[str, Row] = {}

    def row(name: str, phases: tuple[str, ...]) -> Row:
        return rows.setdefault(name, Row(name, phases))

    with buildgrid(args.remote):
        farm = BenchFarm(args.remote)
        try:
            workers = {c: farm.start_worker(f"c{c}", c, ("--staging", args.staging)) for c in concurrencies}
            processes = {c: psutil.Process(worker.pid) for c, worker in workers.items()}
            meter = CpuMeter(args.remote)
            baseline = baseline_config(args.remote, os.path.join(farm.top, "baseline"), args.staging)
            with open_executor(baseline) as graph:
                executor = graph.executor
                for c, worker in workers.items():  # warm up: caches, imports, connections
                    through_bot(farm, worker, farm.prepare(args.warmup, worker.bot_id), c)
                    through_executor(executor, farm.prepare(args.warmup, "baseline"), c)
                sandbox_floor(3)
                for repeat in range(args.repeats):
                    for c, worker in workers.items():
                        for in_flight in (m * c for m in multiples):
                            items = farm.prepare(args.actions, worker.bot_id)
                            before = meter.read(processes[c])
                            wall, samples = through_bot(farm, worker, items, in_flight)
                            measured = figures(wall, samples, BOT_PHASES)
                            measured.cpu_ms = meter.per_action_ms(before, meter.read(processes[c]), len(samples))
                            row(f"bot c={c} in-flight {in_flight}", BOT_PHASES).runs.append(measured)
                        items = farm.prepare(args.actions, "baseline")
                        before = meter.read(None)
                        wall, samples = through_executor(executor, items, c)
                        measured = figures(wall, samples, EXECUTOR_PHASES)
                        measured.cpu_ms = meter.per_action_ms(before, meter.read(None), len(samples))
                        row(f"baseline: in-process Executor, {c} thread(s)", EXECUTOR_PHASES).runs.append(measured)
                    before = meter.read(None)
                    wall, samples = sandbox_floor(args.actions)
                    measured = figures(wall, samples, ("run",))
                    measured.cpu_ms = meter.per_action_ms(before, meter.read(None), len(samples))
                    row("floor: setpriv+bwrap /bin/true", ("run",)).runs.append(measured)
                    print(f"[bench] repeat {repeat + 1}/{args.repeats} done; {load_note()}", file=sys.stderr)
            for worker in workers.values():
                worker.stop()
        finally:
            farm.close()
    text = report(rows, args, started_note, load_note(), concurrencies)
    print(text, end="")
    base = write_results("bench_bot", text, {
        "args": vars(args), "load_start": started_note, "load_end": load_note(),
        "rows": {name: [dataclasses.asdict(run) for run in r.runs] for name, r in rows.items()},
    })
    print(f"written: {base}.txt, {base}.json")
    failures = sum(r.failures for r in rows.values())
    if failures:
        for r in rows.values():
            for run in r.runs:
                for error in run.errors:
                    print(f"FAILED ({r.name}): {error}", file=sys.stderr)
        print(f"{failures} action(s) failed or gave a wrong result", file=sys.stderr)
    return 1 if failures else 0


def report(rows: dict[str, Row], args: argparse.Namespace, load_start: str, load_end: str, concurrencies: list[int]) -> str:
    lines = [
        f"bench_bot: {args.actions} actions (sh -c '{SCRIPT}', unique salts) per row, medians of {args.repeats} "
        f"repeat(s); staging {args.staging}; BuildGrid {args.remote}",
        f"host: {load_start} at start, {load_end} at end",
        "",
        f"{'row':<44} {'actions/s':>9} {'(min-max)':>11} {'p50 ms':>8} {'p90 ms':>8} {'fail':>5}  {'vs baseline (same C)':<22}",
    ]
    baselines = {c: rows.get(f"baseline: in-process Executor, {c} thread(s)") for c in concurrencies}
    for name, r in rows.items():
        ratio = ""
        if name.startswith("bot c="):
            c = int(name.split()[1].removeprefix("c="))
            base = baselines.get(c)
            if base and base.runs:
                ratio = (f"x{r.median('per_s') / base.median('per_s'):.2f} rate, "
                         f"x{r.median('p50_ms') / base.median('p50_ms'):.2f} p50")
        rates = [run.per_s for run in r.runs]
        spread = f"{min(rates):.1f}-{max(rates):.1f}"
        lines.append(f"{name:<44} {r.median('per_s'):>9.1f} {spread:>11} {r.median('p50_ms'):>8.1f} {r.median('p90_ms'):>8.1f} "
                     f"{r.failures:>5}  {ratio}")
    floor = rows.get("floor: setpriv+bwrap /bin/true")
    lines += ["", "phases: median ms per action (share of the summed end-to-end latency)"]
    header = f"{'row':<44} " + " ".join(f"{p:>13}" for p in BOT_PHASES)
    lines.append(header)
    for name, r in rows.items():
        if r is floor:
            continue
        cells = []
        for phase in BOT_PHASES:
            if phase in r.phases:
                cells.append(f"{r.median_phase('phase_ms', phase):6.1f} ({r.median_phase('phase_share', phase) * 100:3.0f}%)")
            else:
                cells.append(f"{'-':>13}")
        lines.append(f"{name:<44} " + " ".join(f"{cell:>13}" for cell in cells))
    lines += ["", "CPU ms per action, by process (the bench process is the client in bot rows, the executor in "
              "baseline rows); busy = total CPU x actions/s / CPUs"]
    lines.append(f"{'row':<44} " + " ".join(f"{name:>9}" for name in CPU_COLUMNS) + f" {'total':>9} {'busy':>6}")
    for name, r in rows.items():
        cells = [r.median_phase("cpu_ms", column) for column in CPU_COLUMNS]
        total = sum(c for c in cells if c == c)
        busy = total * r.median("per_s") / 1000 / (os.cpu_count() or 1)
        shown = " ".join(f"{c:>9.1f}" if c == c else f"{'-':>9}" for c in cells)
        lines.append(f"{name:<44} {shown} {total:>9.1f} {busy * 100:>5.0f}%")
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
