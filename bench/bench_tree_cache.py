"""Benchmark of the directory cache (``staging = "cached"``): whole actions on input roots
seen before, or close to one seen before, beside the floors measured in the same run.

Rows (medians of ``--runs``, ms, all on /dev/shm; the tree: ~2 KiB distinct files, 20 per
leaf directory, 10 leaves per parent, under ``src/``):

* ``floor: setpriv+bwrap true`` — the sandbox alone, as the runner starts it;
* ``floor: action, 1-file root`` — a whole action with a one-file input root (hardlink
  staging): the executor and sandbox without a tree, the floor of a whole action;
* ``floor: cp -al N`` — hard-linking the tree, the floor of staging it afresh;
* ``hardlink: seen N`` — today's hardlink staging of a tree staged before (whole action);
* ``cached: seen N`` — the directory cache, the root seen before (whole action);
* ``cached: seen 10k + 100 new`` — a root never seen, ``src/`` equal to the seen 10k tree's
  plus 100 new files in ``new/`` (a new set each run): one delta layer over the cached tree;
* ``cached: first sight N`` — a root never seen and far from any cached one: built into
  the cache (for comparison with ``cp -al``; once per root);
* ``view only: idmapped overlay`` / ``view only: ro bind`` — mounting and unmounting the view
  of a cached 10k tree alone: an idmapped overlay (what the stager does) against one
  read-only bind mount (the alternative of binding cached subtrees).

Every action runs ``/bin/true`` through the real executor, real bubblewrap (as uid 65534).
Prints each median, min, max, its excess over ``setpriv+bwrap true`` and the median of the
executor's own ``stage`` phase (the part staging owns; the rest is the sandbox, whose start
costs more than bare bwrap: cgroups); never asserts.

Needs root (mounts). Usage: python bench/bench_tree_cache.py [--sizes 10000,50000] [--runs 7]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "system"))

from executor_fixtures import Farm, make_farm  # noqa: E402

from reapi_worker.protos import code_pb2  # noqa: E402
from reapi_worker.storage.digests import Digest  # noqa: E402
from reapi_worker.storage.directory.cas import CasDirectory  # noqa: E402
from reapi_worker.storage.fuse import kernel_mounts  # noqa: E402
from reapi_worker.storage.idmapped_mounts import OwnerMappings, attach_idmapped  # noqa: E402

SHM = "/dev/shm"
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "/bin/true"]
SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
_libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_RDONLY, MS_REMOUNT, MS_REC = 4096, 1, 32, 16384


def tree(files: int, prefix: str = "src", salt: str = "") -> dict[str, bytes]:
    return {f"{prefix}/p{i // 200:03d}/d{i // 20 % 10}/f{i % 20:02d}.c": (b"%s%08d" % (salt.encode(), i)) * 256
            for i in range(files)}


def ms(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000


def execute(farm: Farm, action: Digest, stage_times: list[float] | None = None) -> None:
    outcome = farm.executor.execute(action)
    if outcome.status.code != code_pb2.OK or outcome.result.exit_code != 0:
        raise SystemExit(f"benchmark action failed: {outcome.status} exit {outcome.result.exit_code}")
    if stage_times is not None:
        stage_times.append(outcome.phases["stage"] * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cached = make_farm(staging="cached", parent=SHM, tree_cache_bytes=1 << 34)
    hardlink = make_farm(staging="hardlink", parent=SHM)
    rows: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}  # the executor's stage phase of the same actions
    work = tempfile.mkdtemp(prefix="bench-tree-cache-", dir=SHM)

    def record(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    def stage(name: str) -> list[float]:
        return stages.setdefault(name, [])

    try:
        seen: dict[int, tuple[Digest, Digest, str]] = {}
        for files in sizes:
            inputs = tree(files)
            cached_action = cached.action(["/bin/true"], inputs)
            hardlink_action = hardlink.action(["/bin/true"], inputs)
            source = os.path.join(work, f"src-{files}")
            CasDirectory.from_digest(cached.cache, cached.upload_tree(inputs)).export_files(source)
            seen[files] = (cached_action, hardlink_action, source)
            execute(cached, cached_action)  # seen once: built into the cache
            execute(hardlink, hardlink_action)
        base_10k = tree(10000)
        view_tree = cached.upload_tree(base_10k)
        held = cached.stager.cache.get(view_tree)  # type: ignore[attr-defined]
        assert held is not None, "the 10k tree should be cached by now"
        mappings = OwnerMappings()
        tiny = hardlink.action(["/bin/true"], {"a": b"a"})
        execute(hardlink, tiny)
        for run in range(args.runs):
            record("floor: setpriv+bwrap true", ms(lambda: subprocess.run(SETPRIV + BWRAP, check=True)))
            record("floor: action, 1-file root", ms(lambda: execute(hardlink, tiny, stage("floor: action, 1-file root"))))
            for files in sizes:
                cached_action, hardlink_action, source = seen[files]
                dest = os.path.join(work, "cp-al")
                record(f"floor: cp -al {files}", ms(lambda: subprocess.run(["cp", "-al", source, dest], check=True)))
                shutil.rmtree(dest)
                record(f"hardlink: seen {files}", ms(lambda: execute(hardlink, hardlink_action, stage(f"hardlink: seen {files}"))))
                hardlink.remover.drain()
                record(f"cached: seen {files}", ms(lambda: execute(cached, cached_action, stage(f"cached: seen {files}"))))
                cached.remover.drain()
                fresh = cached.action(["/bin/true"], tree(files, salt=f"r{run}"))
                record(f"cached: first sight {files}", ms(lambda: execute(cached, fresh, stage(f"cached: first sight {files}"))))
                cached.remover.drain()
            near = dict(base_10k)
            near.update(tree(100, prefix="new", salt=f"n{run}"))
            near_action = cached.action(["/bin/true"], near)
            record("cached: seen 10k + 100 new", ms(lambda: execute(cached, near_action, stage("cached: seen 10k + 100 new"))))
            cached.remover.drain()
            record("view only: idmapped overlay", ms(lambda: view_overlay(work, held.path, mappings)))
            record("view only: ro bind", ms(lambda: view_bind(work, held.path)))
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        held.release()
        mappings.close()
    finally:
        cached.close()
        hardlink.close()
        shutil.rmtree(work, ignore_errors=True)
    report(rows, stages, args.runs)


def view_overlay(work: str, lower: str, mappings: OwnerMappings) -> None:
    view = tempfile.mkdtemp(dir=work)
    names = ("lower", "upper", "work", "root")
    for name in names:
        os.mkdir(os.path.join(view, name))
    point = os.path.join(view, "lower")
    attach_idmapped(lower, point, mappings.userns_fd(65534, 65534))
    kernel_mounts.mount_overlay(point, os.path.join(view, "upper"), os.path.join(view, "work"), os.path.join(view, "root"))
    kernel_mounts.detach(point)
    kernel_mounts.unmount(os.path.join(view, "root"))


def view_bind(work: str, lower: str) -> None:
    target = tempfile.mkdtemp(dir=work)
    if _libc.mount(lower.encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), "bind")
    if _libc.mount(None, target.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None) != 0:
        raise OSError(ctypes.get_errno(), "remount")
    kernel_mounts.unmount(target)


def report(rows: dict[str, list[float]], stages: dict[str, list[float]], runs: int) -> None:
    floor = statistics.median(rows["floor: setpriv+bwrap true"])
    print(f"Directory cache on {SHM}, median of {runs} runs, ms; excess = median - setpriv+bwrap true; "
          f"stage = the executor's stage phase of the same actions")
    print(f"{'what':<34} {'median':>8} {'min':>8} {'max':>8} {'excess':>8} {'stage':>8}")
    for name, values in rows.items():
        median = statistics.median(values)
        staged = f"{statistics.median(stages[name]):8.1f}" if name in stages else ""
        print(f"{name:<34} {median:8.1f} {min(values):8.1f} {max(values):8.1f} {median - floor:8.1f} {staged}")


if __name__ == "__main__":
    main()
