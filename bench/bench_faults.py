"""Faults: a stream of verifiable actions through two workers while faults are injected.

What is run: ``--actions`` (default 300) unique actions, ``--in-flight`` (default 8) at a
time, through a real BuildGrid to two ``reapi-worker bot`` processes (concurrency 2 each,
``build_dir_size`` 16M), each with its cache and build root on a 96 MiB tmpfs of its own.
Action ``n`` sleeps ``--sleep`` seconds (default 1: faults hit running actions), then writes
``out`` = ``"<n>\\n"`` repeated to 300,000 bytes, so every result can be
checked byte for byte (the client reads the output back from the CAS). The actions are
cacheable: a wrong result would be stored.

Faults, one every ``--fault-every`` seconds (default 4), in turn, each on one worker:

* ``kill``: SIGKILL, then restarted at once with the same bot id and directories;
* ``restart``: SIGTERM (drain), then restarted;
* ``stop``: SIGSTOP for ``--hold`` seconds (default 3), then SIGCONT;
* ``disk``: its tmpfs filled to ENOSPC for ``--hold`` seconds, then freed.

Reported: actions, correct, wrong (status OK but not the expected output: must be 0),
lost (the client got no OK result: must be 0), retries (lease log lines beyond one per
action: leases handed back, requeued or re-run), the worst recovery time (from a fault's
injection to the first action completing correctly after it was undone), and leftovers
once both workers stopped (entries in the build roots beside the workers' parts, mounts
under the bench's directory, action cgroups of any worker pid: must be 0).

Needs root (tmpfs, per-action mounts). Uses the BuildGrid on ``--remote`` or starts one.
Timing figures are for the record only: on a shared host they say little.

Usage: .venv/bin/python bench/bench_faults.py [--actions 300] [--remote 127.0.0.1:50081]
       .venv/bin/python bench/bench_faults.py --quick    # 60 actions, a fault every 3 s
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_bot import CLI, DEFAULT_REMOTE, INSTANCE, BenchFarm, WorkerProcess, buildgrid  # noqa: E402
from bench_soak import build_root_leftovers  # noqa: E402

from reapi_worker.protos import code_pb2  # noqa: E402
from reapi_worker.storage.digests import Digest  # noqa: E402
from reapi_worker.storage.fuse import kernel_mounts  # noqa: E402
from reapi_worker.worker.client import CommandSpec, build_action  # noqa: E402

OUTPUT_BYTES = 300_000
DISK = 96 << 20
FAULTS = ("kill", "disk", "restart", "stop")


def expected(n: int) -> bytes:
    line = f"{n}\n".encode()
    return (line * (OUTPUT_BYTES // len(line) + 1))[:OUTPUT_BYTES]


class Node:
    """One worker: its tmpfs, its process (replaced on restart)."""

    def __init__(self, farm: BenchFarm, name: str, isa: str) -> None:
        self.name = name
        self.top = os.path.join(farm.top, name)
        os.makedirs(self.top, mode=0o755)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0755", "tmpfs", self.top], check=True)
        self.bot_id = f"{farm.token}-{name}"
        self.farm, self.isa = farm, isa
        self.logs: list[WorkerProcess] = []
        self.worker = self.start()

    def start(self) -> WorkerProcess:
        log_path = os.path.join(self.farm.top, f"{self.name}-{len(self.logs)}.log")
        args = CLI + [
            "--log-level", "INFO", "bot", "--remote", f"grpc://{self.farm.address}", "--instance-name", INSTANCE,
            "--bot-id", self.bot_id, "--concurrency", "2", "--platform", f"ISA={self.isa}",
            "--cache-dir", os.path.join(self.top, "cache"), "--build-root", os.path.join(self.top, "builds"),
            "--build-dir-size", "16M", "--health-interval-seconds", "0.5", "--max-backoff-seconds", "1",
            "--shutdown-grace-seconds", "10", "--log-format", "json",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        worker = WorkerProcess(self.bot_id, self.top, process, log_path)
        self.logs.append(worker)
        worker.wait_registered()
        return worker

    def inject(self, fault: str, hold: float) -> None:
        """Inject ``fault`` and undo it; returns once undone."""
        process = self.worker.process
        if fault == "kill":
            process.kill()
            process.wait(10)
        elif fault == "restart":
            self.worker.stop(20)
        elif fault == "stop":
            process.send_signal(signal.SIGSTOP)
            time.sleep(hold)
            process.send_signal(signal.SIGCONT)
            return
        elif fault == "disk":
            filler = os.path.join(self.top, "filler")
            with open(filler, "wb", buffering=0) as stream:
                try:
                    while True:
                        stream.write(bytes(1 << 20))
                except OSError:
                    pass
            time.sleep(hold)
            os.unlink(filler)
            return
        self.worker = self.start()

    def close(self) -> None:
        if self.worker.process.poll() is None:
            self.worker.stop(30)
        subprocess.run(["umount", "--lazy", self.top], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default=DEFAULT_REMOTE)
    parser.add_argument("--actions", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=4.0)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each action sleeps first, so faults hit running actions")
    parser.add_argument("--quick", action="store_true", help="60 actions, a fault every 3 s")
    args = parser.parse_args()
    if args.quick:
        args.actions, args.fault_every = 60, 3.0
    if os.geteuid() != 0:
        raise SystemExit("needs root: tmpfs and per-action mounts")
    with buildgrid(args.remote):
        farm = BenchFarm(args.remote, parent="/tmp")
        nodes: list[Node] = []
        try:
            isa = "f" + uuid.uuid4().hex[:10]
            nodes = [Node(farm, name, isa) for name in ("a", "b")]
            return run(farm, nodes, isa, args)
        finally:
            for node in nodes:
                node.close()
            farm.close()


def run(farm: BenchFarm, nodes: list[Node], isa: str, args: argparse.Namespace) -> int:
    digests = []
    blobs: set[Digest] = set()
    for n in range(args.actions):
        spec = CommandSpec(
            arguments=("/bin/sh", "-c", f"sleep {args.sleep}; yes {n} | head -c {OUTPUT_BYTES} > out"),
            environment=(("PATH", "/usr/bin:/bin"),), output_paths=("out",), platform=(("ISA", isa),),
            salt=uuid.uuid4().bytes,
        )
        digest, needed = build_action(farm.store, spec)
        digests.append(digest)
        blobs |= needed
    farm.store.upload_missing(blobs)

    done: list[tuple[float, bool]] = []  # (completed at, correct)
    verdicts: dict[int, str] = {}
    lock = threading.Lock()

    def one(n: int) -> None:
        try:
            execution = farm.client.execute(digests[n], skip_cache_lookup=True)
            status, result = execution.response.status, execution.response.result
            if status.code != 0:
                print(f"[bench] action {n}: {code_pb2.Code.Name(status.code)}: {status.message}", file=sys.stderr)
                verdict = "lost"
            else:
                out = {o.path: Digest.from_proto(o.digest) for o in result.output_files}.get("out")
                good = result.exit_code == 0 and out == Digest.of_bytes(expected(n)) and farm.store.read(out) == expected(n)
                verdict = "correct" if good else "wrong"
        except Exception as error:  # the client gave up: the action is lost
            print(f"[bench] action {n}: {error}", file=sys.stderr)
            verdict = "lost"
        with lock:
            verdicts[n] = verdict
            done.append((time.monotonic(), verdict == "correct"))

    stop = threading.Event()
    faults: list[tuple[str, str, float, float]] = []  # (fault, node, injected, undone)

    def injector() -> None:
        turn = 0
        while not stop.wait(args.fault_every):
            fault, node = FAULTS[turn % len(FAULTS)], nodes[turn % len(nodes)]
            injected = time.monotonic()
            node.inject(fault, args.hold)
            faults.append((fault, node.name, injected, time.monotonic()))
            turn += 1

    started = time.monotonic()
    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    with ThreadPoolExecutor(args.in_flight) as pool:
        list(pool.map(one, range(args.actions)))
    stop.set()
    thread.join(120)
    wall = time.monotonic() - started

    recoveries = []
    for fault, name, injected, undone in faults:
        after = [t for t, ok in done if ok and t >= undone]
        if after:
            recoveries.append((min(after) - injected, fault, name))
    logs = [w for node in nodes for w in node.logs]
    for log in logs:
        log.lease_entries()  # reads the log
    lines = sum(sum(log.lease_lines.values()) for log in logs)
    for node in nodes:
        node.worker.stop(30)
    time.sleep(1.0)  # the last trees leave the trash
    leftovers = sum(sum(build_root_leftovers(os.path.join(node.top, "builds"))) for node in nodes)
    tops = {node.top for node in nodes}  # the bench's own tmpfs mounts
    leftovers += len([m for m in kernel_mounts.mounts_under(farm.top) if m not in tops])
    pids = {w.pid for node in nodes for w in node.logs}
    leftovers += sum(len(glob.glob(f"/sys/fs/cgroup/**/reapi-worker/{pid}-*", recursive=True)) for pid in pids)

    counts = {k: sum(1 for v in verdicts.values() if v == k) for k in ("correct", "wrong", "lost")}
    worst = max(recoveries, default=(float("nan"), "-", "-"))
    print(f"actions {args.actions}  correct {counts['correct']}  wrong {counts['wrong']}  lost {counts['lost']}  "
          f"retries {lines - args.actions}  faults {len(faults)} ({', '.join(f'{f}:{n}' for f, n, _, _ in faults)})")
    print(f"worst recovery {worst[0]:.1f} s ({worst[1]} on {worst[2]})  leftovers {leftovers}  wall {wall:.0f} s")
    return 0 if counts["wrong"] == counts["lost"] == leftovers == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
