"""FUSE staging of trees never seen before, beside the same-run floor.

For trees of 1k/10k/50k distinct ~2 KiB files (bench_staging.py's shape), run after run:

* ``floor: cp -al + bwrap`` — ``cp -al`` of the tree, then ``setpriv ... bwrap ... /bin/true``
  (for ``read all``: ``find . -type f -exec cat {} +`` in that bwrap over the copy): what
  the action would cost with nothing but the syscalls;
* ``fuse, new tree`` — one whole action through the real executor with FUSE staging, on a
  tree in the local cache (warm) that neither the stager nor the executor has seen: a fresh
  executor (its SubtreeReadOnly memory empty) and stager every run — the row the lazy mount
  is for: nothing of the tree is read before the command but its root and a shallow walk
  of its Directories (storage/fuse/stager.py);
* the same for ``read all`` (every input opened and read through the mount);
* ``big file`` (``--big-mib``, 0 for none): ``cat`` of one input of that many MiB, read
  for the first time through the mount (a new blob every run), beside ``cat`` of the same
  blob's file in the cache: what a big input costs where reads go through READ requests
  (the page-cache mode) rather than passthrough.

Each row is measured per FUSE backend (``--backends``, storage/fuse/mount.py: ``pyfuse3``
through libfuse, ``kernel`` speaking /dev/fuse with passthrough reads, ``kernel-read`` the
same without passthrough, as under a bounded build directory), one mount at a time,
each with its own floor measured in the same runs. It also prints the requests the daemon
answered during one action, by type (for pyfuse3 only with ``--count-pyfuse3``, which
wraps its handlers and so slows that run).

Everything on /dev/shm (docs/measured.md: ext4 churn). Prints medians of ``--runs`` and the
ratio to the floor; never asserts. Needs root (bubblewrap as another uid, FUSE, overlays).

Usage: python bench/bench_fuse.py [--sizes 1000,10000,50000] [--runs 5] [--read-all-sizes 10000]
                                  [--backends pyfuse3,kernel] [--count-pyfuse3] [--big-mib 100]

``--backends`` names: see :data:`VARIANTS` (``kernel``: the page-cache mode with its
prefetcher; ``kernel-passthrough``; ``kernel-noprefetch``, ``kernel-read``:
variants for comparison).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_staging import SHM, WORKLOADS, Bench, action, build_tree, timed  # noqa: E402

from reapi_worker.sandbox.bubblewrap import BubblewrapRunner  # noqa: E402
from reapi_worker.storage.directory.cas import CasDirectory  # noqa: E402
from reapi_worker.storage.digests import Digest  # noqa: E402
from reapi_worker.storage.fuse import FuseMount, protocol  # noqa: E402
from reapi_worker.storage.local_cas import LocalCAS  # noqa: E402
from reapi_worker.storage.tree_facts import TreeFacts  # noqa: E402

SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def bwrap_over(tree: str, command: list[str]) -> list[str]:
    return [*SETPRIV, "bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--proc", "/proc", "--dev", "/dev", "--bind", tree, "/build", "--chdir", "/build", *command]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--read-all-sizes", default="10000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="pyfuse3,kernel")
    parser.add_argument("--count-pyfuse3", action="store_true", help="count pyfuse3's requests (slower)")
    parser.add_argument("--big-mib", type=int, default=100, help="MiB of the big-file row (0: no such row)")
    args = parser.parse_args()
    pyfuse3_counts: dict[str, int] = {}
    if args.count_pyfuse3:
        count_pyfuse3_requests(pyfuse3_counts)
    sizes = [int(s) for s in args.sizes.split(",")]
    read_all = {int(s) for s in args.read_all_sizes.split(",") if s}
    work = tempfile.mkdtemp(prefix="bench-fuse-", dir=SHM)
    os.chmod(work, 0o755)
    times: dict[tuple[int, str, str, str], list[float]] = {}
    requests: dict[tuple[int, str, str], dict[str, int]] = {}
    cache = LocalCAS(os.path.join(work, "cache"), max_bytes=1 << 33)
    roots = {files: build_tree(cache, files) for files in sizes}
    for files, root in roots.items():
        CasDirectory.from_digest(cache, root).export_files(os.path.join(work, f"src-{files}"))
    try:
        for backend in args.backends.split(","):
            mount = FuseMount(os.path.join(work, "fuse"), **VARIANTS[backend]).open()  # type: ignore[arg-type]
            try:
                print(f"  backend {backend}: {mount.backend_in_use} serves", file=sys.stderr, flush=True)
                os.makedirs(os.path.join(work, backend), mode=0o755)  # a build root per backend
                bench = Bench(os.path.join(work, backend), mount, None, BubblewrapRunner())  # type: ignore[arg-type]
                for files in sizes:
                    measure(args.runs, bench, cache, files, roots[files], files in read_all, work, backend, times,
                            requests, pyfuse3_counts)
                if args.big_mib:
                    measure_big_file(args.runs, args.big_mib, bench, cache, backend, times)
            finally:
                mount.close()
    finally:
        cache.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Whole action on {SHM}, warm cache, median of {args.runs} runs, ms; ratio to the floor of the same runs")
    print(f"{'files':>6} {'workload':9} {'backend':11} {'what':24} {'median':>9} {'min':>9} {'max':>9} {'/floor':>7}")
    for (files, workload, backend, what), values in sorted(times.items()):
        floor_median = statistics.median(next(
            floor for key, floor in times.items() if key[:3] == (files, workload, backend) and key[3].startswith("floor")))
        median = statistics.median(values)
        print(f"{files:>6} {workload:9} {backend:11} {what:24} {median:9.1f} {min(values):9.1f} {max(values):9.1f} "
              f"{median / floor_median:6.2f}x")
    for (files, workload, backend), counts in sorted(requests.items()):
        named = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda c: -c[1]))
        print(f"{backend}, {files} files, {workload}: requests answered in one action: {named}")


FLOOR = "floor: cp -al + bwrap"
#: What each ``--backends`` name mounts (FuseMount's arguments).
VARIANTS = {
    "pyfuse3": {"backend": "pyfuse3"},
    "kernel": {"backend": "kernel"},  # the page-cache mode, pushing listed files
    "kernel-noprefetch": {"backend": "kernel", "prefetch": False},
    "kernel-passthrough": {"backend": "kernel-passthrough"},
    # passthrough's fallback: READ per file (as with two overlays stacked on the mount)
    "kernel-read": {"backend": "kernel-passthrough", "stacked_overlays": 2},
}
OPCODE_NAMES = {getattr(protocol, name): name for name in (
    "LOOKUP", "FORGET", "GETATTR", "READLINK", "OPEN", "READ", "STATFS", "RELEASE", "GETXATTR", "LISTXATTR",
    "FLUSH", "OPENDIR", "READDIR", "RELEASEDIR", "INTERRUPT", "BATCH_FORGET", "READDIRPLUS", "ACCESS", "STATX")}
PYFUSE3_COUNTED = ("lookup", "forget", "getattr", "readlink", "open", "read", "statfs", "release", "getxattr",
                   "listxattr", "flush", "opendir", "readdir", "releasedir", "access")


def count_pyfuse3_requests(counts: dict[str, int]) -> None:
    """Count pyfuse3's handler calls by name (``--count-pyfuse3``: each call pays a wrapper,
    so the timings of that run are not the ones to quote)."""
    from reapi_worker.storage.fuse.operations import InputFileSystem

    for name in PYFUSE3_COUNTED:
        method = getattr(InputFileSystem, name)

        def counted(self, *args, _method=method, _name=name):  # type: ignore[no-untyped-def]
            counts[_name] = counts.get(_name, 0) + 1
            return _method(self, *args)

        setattr(InputFileSystem, name, counted)


def served(mount: FuseMount, pyfuse3_counts: dict[str, int]) -> dict[str, int]:
    """Requests the mount's daemon answered so far, by name."""
    if (mount.backend_in_use or "").startswith("kernel"):
        return {OPCODE_NAMES.get(op, str(op)): n for op, n in mount.request_counts().items()}
    return {name.upper(): n for name, n in pyfuse3_counts.items()}


def measure(runs: int, bench: Bench, cache: LocalCAS, files: int, root: Digest, read_all: bool, work: str,
            backend: str, times: dict[tuple[int, str, str, str], list[float]],
            requests: dict[tuple[int, str, str], dict[str, int]], pyfuse3_counts: dict[str, int]) -> None:
    """``runs`` runs of each workload on ``files`` files: the floor, then the action."""
    source = os.path.join(work, f"src-{files}")
    workloads = ["true"] + (["read all"] if read_all else [])
    actions = {name: action(cache, root, WORKLOADS[name]) for name in workloads}
    bench.execute(cache, bench.stager("fuse", cache, TreeFacts()), actions["true"])  # page cache, imports
    for run in range(runs):
        for workload in workloads:
            copy = os.path.join(work, "cp-al")
            command = WORKLOADS[workload]

            def floor() -> None:
                subprocess.run(["cp", "-al", source, copy], check=True)
                subprocess.run(bwrap_over(copy, command), check=True)

            times.setdefault((files, workload, backend, FLOOR), []).append(timed(floor))
            shutil.rmtree(copy)
            stager = bench.stager("fuse", cache, TreeFacts())  # never seen: fresh facts and executor
            before = served(bench.mount, pyfuse3_counts)
            times.setdefault((files, workload, backend, "fuse, new tree"), []).append(
                bench.execute(cache, stager, actions[workload]))
            after = served(bench.mount, pyfuse3_counts)
            if after:
                requests[(files, workload, backend)] = {
                    name: n - before.get(name, 0) for name, n in after.items() if n > before.get(name, 0)}
        print(f"  {backend}, {files} files: run {run + 1}/{runs} done", file=sys.stderr, flush=True)


def measure_big_file(runs: int, mib: int, bench: Bench, cache: LocalCAS, backend: str,
                     times: dict[tuple[int, str, str, str], list[float]]) -> None:
    """``cat`` of a ``mib`` MiB input read for the first time through the mount (a blob
    never served before, each run), beside ``cat`` of its cache file (in memory too)."""
    stager = bench.stager("fuse", cache, TreeFacts())
    workload = f"cat {mib} MiB"
    for run in range(runs):
        tree = CasDirectory.empty(cache)
        tree.write_bytes("big", f"{backend} {run}\n".encode().ljust(4096, b"-") * (mib * 256))
        digest = tree.entries()["big"].digest  # type: ignore[union-attr]
        cached = cache.object_path(digest)
        times.setdefault((1, workload, backend, "floor: cat of the cache file"), []).append(
            timed(lambda: subprocess.run(["cat", cached], stdout=subprocess.DEVNULL, check=True)))
        staged = stager.stage(CasDirectory.from_digest(cache, tree.digest()), os.path.join(bench.build_root, "big"))
        try:
            path = os.path.join(staged.path, "big")
            times.setdefault((1, workload, backend, "fuse: cat, first read"), []).append(
                timed(lambda: subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)))
        finally:
            staged.close()
            bench.remover.drain()


if __name__ == "__main__":
    main()
