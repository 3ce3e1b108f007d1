"""Benchmark of the CAS Directory's bulk paths against ``cp -al``, all on tmpfs.

Builds a tree of small files (default 10,000 files of ~2 KiB in 500 leaf directories) on
/dev/shm, then, run after run, times:

* import into a LocalCAS on /dev/shm, cold (a fresh cache: hash and store every blob)
  and warm (every blob already present);
* staging by hardlinks: ``CasDirectory.from_digest(...).export_files(dest)`` (read and
  check every Directory proto, pin and check every blob, mkdir + link);
* the same export from a tree already in memory;
* the floors, interleaved in the same run: ``cp -al`` of the source tree and a bare
  Python ``os.mkdir`` + ``os.link`` loop over the cache paths.

Prints medians (ms) and the ratios against ``cp -al``. Never asserts: timings belong in a
report, not in a test (docs/measured.md: ext4 churn and run-to-run noise).

Usage: python bench/bench_directory.py [--files N] [--dirs N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory import CasDirectory
from reapi_worker.storage.local_cas import LocalCAS

SHM = "/dev/shm"


def build_source(root: str, files: int, dirs: int) -> None:
    """``dirs`` leaf directories under sqrt-ish parents, ``files`` distinct ~2 KiB files,
    one in twenty executable."""
    per_parent = 20
    per_dir = max(1, files // dirs)
    made = 0
    for i in range(dirs):
        leaf = os.path.join(root, f"p{i // per_parent:03d}", f"d{i % per_parent:02d}")
        os.makedirs(leaf)
        for j in range(per_dir if i < dirs - 1 else files - made):
            path = os.path.join(leaf, f"f{j:03d}.c")
            with open(path, "wb") as out:
                out.write(os.urandom(1024).hex().encode())  # 2 KiB, unique
            os.chmod(path, 0o755 if (made % 20 == 0) else 0o644)
            made += 1


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def link_loop_plan(tree: CasDirectory, cas: LocalCAS) -> tuple[list[str], list[tuple[str, str]]]:
    """Directories and (cache path, relative destination) pairs, for the bare loop."""
    dirs: list[str] = []
    links: list[tuple[str, str]] = []
    for path, stat in tree.walk():
        if stat.type.value == "directory":
            dirs.append(path)
        elif stat.type.value == "file":
            assert stat.digest is not None
            links.append((cas.path(stat.digest, stat.executable), path))
    return dirs, links


def bare_link_loop(dest: str, dirs: list[str], links: list[tuple[str, str]]) -> None:
    os.mkdir(dest)
    for path in dirs:
        os.mkdir(os.path.join(dest, path))
    for src, path in links:
        os.link(src, os.path.join(dest, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=500)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-directory-", dir=SHM)
    try:
        source = os.path.join(work, "src")
        build_source(source, args.files, args.dirs)
        times: dict[str, list[float]] = {}

        def record(name: str, ms: float) -> None:
            times.setdefault(name, []).append(ms)

        warm_root = os.path.join(work, "cas-warm")
        with LocalCAS(warm_root, max_bytes=1 << 30) as warm:
            seeded = CasDirectory.empty(warm)
            seeded.import_files(source)
            digest: Digest = seeded.digest()
            dirs, links = link_loop_plan(seeded, warm)

            for run in range(args.runs):
                cold_root = os.path.join(work, f"cas-cold-{run}")
                with LocalCAS(cold_root, max_bytes=1 << 30) as cold:
                    record("import, cold cache", timed(lambda: CasDirectory.empty(cold).import_files(source)))
                shutil.rmtree(cold_root)

                record("import, warm cache", timed(lambda: CasDirectory.empty(warm).import_files(source)))

                dest = os.path.join(work, "out-cp")
                record("cp -al (floor)", timed(lambda: subprocess.run(["cp", "-al", source, dest], check=True)))
                shutil.rmtree(dest)

                dest = os.path.join(work, "out-loop")
                record("os.mkdir+os.link loop (floor)", timed(lambda: bare_link_loop(dest, dirs, links)))
                shutil.rmtree(dest)

                dest = os.path.join(work, "out-stage")
                record("stage: from_digest + export", timed(
                    lambda: CasDirectory.from_digest(warm, digest).export_files(dest)))
                shutil.rmtree(dest)

                loaded = CasDirectory.from_digest(warm, digest)
                list(loaded.file_digests())  # load every node outside the timing
                dest = os.path.join(work, "out-export")
                record("export of a loaded tree", timed(lambda: loaded.export_files(dest)))
                shutil.rmtree(dest)

        medians = {name: statistics.median(values) for name, values in times.items()}
        floor = medians["cp -al (floor)"]
        print(f"{args.files} files in {args.dirs} leaf dirs, ~2 KiB each, on {SHM}; "
              f"median of {args.runs} runs (ms)")
        print(f"{'what':34} {'median':>8} {'min':>8} {'max':>8} {'/ cp -al':>9}")
        for name, values in times.items():
            print(f"{name:34} {medians[name]:8.1f} {min(values):8.1f} {max(values):8.1f} "
                  f"{medians[name] / floor:8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
