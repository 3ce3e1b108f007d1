"""Soak: many trivial actions through one worker; does it stay correct, and does it leak?

What is measured: ``--actions`` (default 1,000) unique actions (``sh -c 'echo x > out'``, a
fresh salt each, ``skip_cache_lookup``) through a real BuildGrid to one ``reapi-worker bot``
process at ``--concurrency`` (default 2), ``--in-flight`` (default 2 x concurrency) at a time
in a closed loop, in chunks of ``--every`` (default 100) actions. Every result is checked
(status OK, exit 0, ``out`` holding ``x\\n``, run by this worker), and so is the worker's
one-line-per-lease log (each action logged exactly once).

The worker process is sampled (psutil) after ``--warmup`` (default 20) unmeasured actions
("start"), after every chunk and at the end. Samples are taken between chunks, when no
action is in flight, after a short settle (``--settle`` s) so that the asynchronous removal
of staged trees has finished: anything left then is a leftover, not work in progress.

* the worker's own process: RSS, USS (memory only it holds), open file descriptors, threads;
* its descendants (bubblewrap, the actions): how many, and their RSS — between chunks there
  should be none;
* directories left in its part of the build root (``.trash`` and ``.fuse`` excepted) and in
  its ``.trash``;
* per chunk: actions/s and median end-to-end latency, to see whether it slows down.

The baseline is the worker itself at "start" (after warm-up: imports done, caches and
connections open); the figures of interest are the end-minus-start growth of RSS and fds,
and per 1,000 actions. No thresholds: the exit status is 1 only if an action failed or gave
a wrong result, or the worker died. Everything lives on /dev/shm.

Needs root and a BuildGrid on ``--remote`` (instance ``main``); if nothing answers, it starts
one with ``BGD_PORT=<port> deploy/buildgrid/start.sh`` and stops it afterwards.

Usage: .venv/bin/python bench/bench_soak.py [--actions 1000] [--concurrency 2] [--remote 127.0.0.1:50081]
       .venv/bin/python bench/bench_soak.py --quick     # 100 actions, a sample every 25
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_bot import DEFAULT_REMOTE, SCRIPT, BenchFarm, WorkerProcess, buildgrid, load_note, through_bot, write_results  # noqa: E402

MiB = 1 << 20
LEFT_ALONE = {".trash", ".fuse"}


@dataclasses.dataclass
class Point:
    """One sample of the worker process."""

    label: str
    actions: int  # measured actions done so far
    elapsed_s: float
    rss: int
    uss: int
    fds: int
    threads: int
    children: int
    children_rss: int
    build_dirs: int  # entries left in the build root (not .trash/.fuse)
    trash: int  # entries left in build_root/.trash
    chunk_per_s: float = float("nan")
    chunk_p50_ms: float = float("nan")


def sample(worker: WorkerProcess, label: str, actions: int, elapsed: float) -> Point:
    process = psutil.Process(worker.pid)
    with process.oneshot():
        rss = process.memory_info().rss
        uss = process.memory_full_info().uss
        fds = process.num_fds()
        threads = process.num_threads()
    children = process.children(recursive=True)
    children_rss = 0
    for child in children:
        try:
            children_rss += child.memory_info().rss
        except psutil.Error:
            pass
    build_dirs, trash = build_root_leftovers(worker.build_root)
    return Point(label, actions, elapsed, rss, uss, fds, threads, len(children), children_rss, build_dirs, trash)


def build_root_leftovers(build_root: str) -> tuple[int, int]:
    """(entries that are not the workers' own, trees waiting in their trash): each worker
    keeps its directories in a part ``w-<token>`` of the build root (storage/build_root.py)."""
    build_dirs = trash = 0
    for name in os.listdir(build_root) if os.path.isdir(build_root) else []:
        if name == ".owners":
            continue
        if not name.startswith("w-"):
            build_dirs += 1
            continue
        part = os.path.join(build_root, name)
        for entry in os.listdir(part):
            if entry == ".trash":
                trash += len(os.listdir(os.path.join(part, entry)))
            elif entry not in LEFT_ALONE:
                build_dirs += 1
    return build_dirs, trash


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default=DEFAULT_REMOTE, help=f"BuildGrid HOST:PORT (default {DEFAULT_REMOTE})")
    parser.add_argument("--actions", type=int, default=None, help="measured actions (default 1000)")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's --concurrency (default 2)")
    parser.add_argument("--in-flight", type=int, default=None, help="client executions at once (default 2 x concurrency)")
    parser.add_argument("--every", type=int, default=None, help="actions between samples (default 100)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured actions before the start sample (default 20)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait before each sample (default 1)")
    parser.add_argument("--staging", default="hardlink", help="the worker's --staging (default hardlink)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: defaults of 100 actions, a sample every 25, 5 warm-up (explicit flags win)")
    args = parser.parse_args()
    for name, full, quick in (("actions", 1000, 100), ("every", 100, 25), ("warmup", 20, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    in_flight = args.in_flight or 2 * args.concurrency
    load_start = load_note()
    points: list[Point] = []
    errors: list[str] = []
    logged: dict[str, int] = {}
    digests: list[str] = []
    worker_exit: int | None = None
    with buildgrid(args.remote):
        farm = BenchFarm(args.remote)
        try:
            worker = farm.start_worker("soak", args.concurrency, ("--staging", args.staging))
            _, warm = through_bot(farm, worker, farm.prepare(args.warmup, worker.bot_id), in_flight)
            errors += [f"warm-up: {s.error}" for s in warm if s.error]
            time.sleep(args.settle)
            points.append(sample(worker, "start", 0, 0.0))
            began = time.perf_counter()
            done = 0
            while done < args.actions and worker.process.poll() is None:
                size = min(args.every, args.actions - done)
                items = farm.prepare(size, worker.bot_id)  # uploads: outside the chunk's timing
                digests += [str(item.digest) for item in items]
                wall, samples = through_bot(farm, worker, items, in_flight)
                done += size
                errors += [f"action {done - size + i}: {s.error}" for i, s in enumerate(samples) if s.error]
                elapsed = time.perf_counter() - began
                time.sleep(args.settle)
                point = sample(worker, "end" if done >= args.actions else f"{done}", done, elapsed)
                good = [s.latency for s in samples if not s.error]
                point.chunk_per_s = len(good) / wall
                point.chunk_p50_ms = statistics.median(good) * 1000 if good else float("nan")
                points.append(point)
                print(f"[soak] {done}/{args.actions}: {point.chunk_per_s:.1f}/s, RSS {point.rss / MiB:.1f} MiB, "
                      f"{point.fds} fds; {load_note()}", file=sys.stderr)
            worker.lease_entries()
            logged = {d: worker.lease_lines.get(d, 0) for d in digests}
            sessions = worker.sessions_created
            alive = worker.process.poll() is None
            worker_exit = worker.stop()
        finally:
            farm.close()
    if not alive:
        errors.append(f"the worker died (exit {worker_exit})")
    if len(points) < 2 or points[-1].actions < args.actions:
        errors.append(f"only {points[-1].actions if points else 0} of {args.actions} actions were run")
    text = report(points, args, in_flight, load_start, load_note(), logged, sessions, worker_exit)
    print(text, end="")
    base = write_results("bench_soak", text, {
        "args": vars(args), "in_flight": in_flight, "load_start": load_start, "load_end": load_note(),
        "points": [dataclasses.asdict(p) for p in points], "errors": errors[:100],
        "sessions_created": sessions, "worker_exit": worker_exit,
        "executions_logged": {"once": sum(1 for n in logged.values() if n == 1),
                              "never": sum(1 for n in logged.values() if n == 0),
                              "more_than_once": sum(1 for n in logged.values() if n > 1)},
    })
    print(f"written: {base}.txt, {base}.json")
    for error in errors[:20]:
        print(f"FAILED: {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} failure(s)", file=sys.stderr)
    return 1 if errors else 0


def report(points: list[Point], args: argparse.Namespace, in_flight: int, load_start: str, load_end: str,
           logged: dict[str, int], sessions: int, worker_exit: int | None) -> str:
    lines = [
        f"bench_soak: {args.actions} actions (sh -c '{SCRIPT}', unique salts) through one worker, concurrency "
        f"{args.concurrency}, {in_flight} in flight; staging {args.staging}; BuildGrid {args.remote}",
        f"host: {load_start} at start, {load_end} at end",
        "",
        f"{'sample':>7} {'actions':>7} {'elapsed s':>9} {'RSS MiB':>8} {'USS MiB':>8} {'fds':>5} {'threads':>7} "
        f"{'children':>8} {'child MiB':>9} {'build dirs':>10} {'trash':>5} {'chunk /s':>8} {'chunk p50 ms':>12}",
    ]
    for p in points:
        lines.append(
            f"{p.label:>7} {p.actions:>7} {p.elapsed_s:>9.1f} {p.rss / MiB:>8.1f} {p.uss / MiB:>8.1f} {p.fds:>5} "
            f"{p.threads:>7} {p.children:>8} {p.children_rss / MiB:>9.1f} {p.build_dirs:>10} {p.trash:>5} "
            f"{p.chunk_per_s:>8.1f} {p.chunk_p50_ms:>12.1f}")
    if len(points) >= 2:
        start, end = points[0], points[-1]
        per_k = 1000 / max(end.actions, 1)
        rates = [p.chunk_per_s for p in points[1:]]
        lines += [
            "",
            f"start -> end: RSS {start.rss / MiB:.1f} -> {end.rss / MiB:.1f} MiB "
            f"({(end.rss - start.rss) / MiB:+.1f} MiB, {(end.rss - start.rss) / MiB * per_k:+.1f} MiB per 1,000 actions); "
            f"USS {start.uss / MiB:.1f} -> {end.uss / MiB:.1f} MiB; fds {start.fds} -> {end.fds} ({end.fds - start.fds:+d}); "
            f"threads {start.threads} -> {end.threads}; children {start.children} -> {end.children}",
            f"throughput: {end.actions / end.elapsed_s:.1f} actions/s overall (sampling pauses included); chunks "
            f"median {statistics.median(rates):.1f}/s, first {rates[0]:.1f}, last {rates[-1]:.1f}",
        ]
    counts = list(logged.values())
    lines += [
        f"worker log: {sum(1 for n in counts if n == 1)} actions logged once, {sum(1 for n in counts if n == 0)} never, "
        f"{sum(1 for n in counts if n > 1)} more than once; sessions created {sessions}; worker exit {worker_exit}",
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
