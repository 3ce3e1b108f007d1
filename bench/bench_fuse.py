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
* the same for ``read all`` (every input opened and read through the mount).

Everything on /dev/shm (docs/measured.md: ext4 churn). Prints medians of ``--runs`` and the
ratio to the floor; never asserts. Needs root (bubblewrap as another uid, FUSE, overlays).

Usage: python bench/bench_fuse.py [--sizes 1000,10000,50000] [--runs 5] [--read-all-sizes 10000]
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
from reapi_worker.storage.fuse import FuseMount  # noqa: E402
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
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    read_all = {int(s) for s in args.read_all_sizes.split(",") if s}
    work = tempfile.mkdtemp(prefix="bench-fuse-", dir=SHM)
    os.chmod(work, 0o755)
    times: dict[tuple[int, str, str], list[float]] = {}
    mount = FuseMount(os.path.join(work, "fuse")).open()
    cache = LocalCAS(os.path.join(work, "cache"), max_bytes=1 << 33)
    try:
        bench = Bench(work, mount, None, BubblewrapRunner())  # type: ignore[arg-type]  # no remote: warm cache
        for files in sizes:
            root = build_tree(cache, files)
            source = os.path.join(work, f"src-{files}")
            CasDirectory.from_digest(cache, root).export_files(source)
            workloads = ["true"] + (["read all"] if files in read_all else [])
            actions = {name: action(cache, root, WORKLOADS[name]) for name in workloads}
            bench.execute(cache, bench.stager("fuse", cache, TreeFacts()), actions["true"])  # page cache, imports
            for run in range(args.runs):
                for workload in workloads:
                    copy = os.path.join(work, "cp-al")
                    command = WORKLOADS[workload]

                    def floor() -> None:
                        subprocess.run(["cp", "-al", source, copy], check=True)
                        subprocess.run(bwrap_over(copy, command), check=True)

                    times.setdefault((files, workload, "floor: cp -al + bwrap"), []).append(timed(floor))
                    shutil.rmtree(copy)
                    stager = bench.stager("fuse", cache, TreeFacts())  # never seen: fresh facts and executor
                    times.setdefault((files, workload, "fuse, new tree"), []).append(
                        bench.execute(cache, stager, actions[workload]))
                print(f"  {files} files: run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    finally:
        cache.close()
        mount.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Whole action on {SHM}, warm cache, median of {args.runs} runs, ms; ratio to the same-run floor")
    print(f"{'files':>6} {'workload':9} {'what':24} {'median':>9} {'min':>9} {'max':>9} {'/floor':>7}")
    for (files, workload, what), values in sorted(times.items()):
        floor_median = statistics.median(times[(files, workload, "floor: cp -al + bwrap")])
        median = statistics.median(values)
        print(f"{files:>6} {workload:9} {what:24} {median:9.1f} {min(values):9.1f} {max(values):9.1f} "
              f"{median / floor_median:6.2f}x")


if __name__ == "__main__":
    main()
