"""Per-action cost of the executor, beside the floors measured in the same run.

Rows (medians of --runs, all on /dev/shm, warm cache: every blob already local):

* ``bwrap true`` — ``bwrap --unshare-all ... /bin/true`` as root: the sandbox floor;
* ``setpriv+bwrap true`` — the same dropped to uid 65534, as every sandbox of ours runs;
* ``action: true, tiny root`` — Executor.execute of ``/bin/true`` with a 1-file input root:
  fetch (Action, Command, tree), stage, sandbox, capture, upload (local only);
* ``action: true, N-file root`` — the same with 1k and 10k-file input roots, beside the
  floor ``cp -al`` of that tree + ``setpriv+bwrap true``;
* ``action: write 1000 outputs`` — the upload phase of an action that writes 1,000 small
  files into an output directory (Tree building, hashing, storing).

Usage: python bench/bench_action.py [--runs N]. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "system"))

from executor_fixtures import make_farm  # noqa: E402

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "/bin/true"]
SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def tree(files: int) -> dict[str, bytes]:
    """``files`` distinct ~2 KiB files, 10 per leaf directory, 10 leaves per parent."""
    return {f"src/p{i // 100:03d}/d{i // 10 % 10}/f{i % 10}.c": os.urandom(1024).hex().encode() for i in range(files)}


def ms(function) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    os.environ.setdefault("TMPDIR", "/dev/shm")
    tempfile.tempdir = "/dev/shm"
    farm = make_farm(parent="/dev/shm")  # tmpfs: docs/measured.md's ext4 inode trap
    rows: dict[str, list[float]] = {}
    try:
        actions = {
            "tiny": farm.action(["/bin/true"], {"a": b"a"}),
            "1k": farm.action(["/bin/true"], tree(1000)),
            "10k": farm.action(["/bin/true"], tree(10000)),
        }
        writes = farm.action(["/bin/sh", "-c", "mkdir out && cd out && i=0; while [ $i -lt 1000 ]; do echo $i > f$i; i=$((i+1)); done"],
                             output_paths=["out"])
        sources = {}
        for name, size in (("1k", 1000), ("10k", 10000)):
            src = tempfile.mkdtemp(prefix=f"bench-src-{name}-")
            for path, data in tree(size).items():
                os.makedirs(os.path.join(src, os.path.dirname(path)), exist_ok=True)
                with open(os.path.join(src, path), "wb") as out:
                    out.write(data)
            sources[name] = src
        for _ in range(2):  # warm up: fill the cache's executable variants, page cache, imports
            for digest in actions.values():
                farm.executor.execute(digest)
        for _ in range(args.runs):
            rows.setdefault("bwrap true (root)", []).append(ms(lambda: subprocess.run(BWRAP, check=True)))
            rows.setdefault("setpriv+bwrap true", []).append(ms(lambda: subprocess.run(SETPRIV + BWRAP, check=True)))
            for name, digest in actions.items():
                rows.setdefault(f"action: /bin/true, {name} root", []).append(ms(lambda: farm.executor.execute(digest)))
            for name, src in sources.items():
                dest = tempfile.mktemp(prefix="bench-cpal-")

                def floor() -> None:
                    subprocess.run(["cp", "-al", src, dest], check=True)
                    subprocess.run(SETPRIV + BWRAP, check=True)

                rows.setdefault(f"floor: cp -al {name} + setpriv+bwrap", []).append(ms(floor))
                shutil.rmtree(dest)
            outcome = farm.executor.execute(writes)
            assert outcome.result.exit_code == 0, outcome
            rows.setdefault("capture+upload 1000 outputs (phase)", []).append(outcome.phases["upload"] * 1000)
            farm.remover.drain()
    finally:
        farm.close()
        for src in sources.values():
            shutil.rmtree(src, ignore_errors=True)
    print(f"{'what':<42} {'median ms':>10} {'min':>8} {'max':>8}   (runs={args.runs})")
    for name, values in rows.items():
        print(f"{name:<42} {statistics.median(values):>10.1f} {min(values):>8.1f} {max(values):>8.1f}")


if __name__ == "__main__":
    main()
