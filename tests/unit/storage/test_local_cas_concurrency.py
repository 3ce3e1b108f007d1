"""Several processes share one LocalCAS whose max size is far below what they write.

Each worker process writes and reads random blobs (some shared with the other workers, so
writes race on the same names), creates executable variants, feeds some corrupt inserts,
and pins a few of its own blobs before writing them. When every worker is done (and still
holds its pins) the test checks, with its own eyes on the directory:

* every pinned blob is present and hashes to its digest;
* no file anywhere in ``objects/`` is corrupt (all rehashed) and modes are 0644 / 0755;
* the true size is at most ``max_bytes`` plus the documented slack: each process's pending
  bytes not yet folded into the shared counter (under ``flush_bytes`` each);

and after they all close: the size is at most ``max_bytes`` and no temp, pin or owner file
is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
import subprocess
import sys

from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import LocalCAS

PROCESSES = 4
MAX_BYTES = 512 << 10

WORKER = r"""
import io, json, random, sys
from reapi_worker.protos.errors import DataLoss, MissingBlobs
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import LocalCAS

root, max_bytes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
problems = []

def blob(key):
    r = random.Random(key)
    return r.randbytes(r.randint(1, 4096))

cas = LocalCAS(root, max_bytes=max_bytes, recency_interval=0)
pins = cas.pin_set()
pinned, written = [], []
for i in range(500):
    shared = rng.random() < 0.3
    data = blob(f"shared-{rng.randrange(50)}" if shared else f"own-{seed}-{i}")
    digest = Digest.of_bytes(data)
    if not shared and i % 40 == 0:
        pins.add([digest])  # pin, then write: protected from the moment it lands
        pinned.append(digest)
    how = i % 3
    if how == 0:
        got = cas.write(data)
    elif how == 1:
        got = cas.write_stream(io.BytesIO(data))
    else:
        cas.insert(digest, data)
        got = digest
    if got != digest:
        problems.append(f"wrote {digest}, got {got}")
    written.append((digest, shared))
    if i % 25 == 0:
        try:
            cas.insert(digest, data + b"corrupt")
            problems.append("corrupt insert accepted")
        except DataLoss:
            pass
    earlier, was_shared = rng.choice(written)
    try:
        if Digest.of_bytes(cas.read(earlier)) != earlier:
            problems.append(f"read {earlier}: wrong bytes")
        if was_shared and i % 7 == 0:
            with open(cas.path(earlier, executable=True), "rb") as f:
                if Digest.of_bytes(f.read()) != earlier:
                    problems.append(f"executable {earlier}: wrong bytes")
    except (MissingBlobs, FileNotFoundError):
        pass  # evicted (before, or right after path() answered): it was not pinned
for digest in pinned:
    try:
        if Digest.of_bytes(cas.read(digest)) != digest:
            problems.append(f"pinned {digest}: wrong bytes")
    except MissingBlobs:
        problems.append(f"pinned {digest} was evicted")
stats = cas.stats()
print(json.dumps({"pinned": [str(d) for d in pinned], "problems": problems,
                  "evictions": stats.evictions, "flush_bytes": cas.flush_bytes}), flush=True)
sys.stdin.readline()  # hold the pins until the test has looked
pins.release()
cas.close()
"""


def scan(root: pathlib.Path) -> tuple[int, list[str]]:
    """The true size of ``objects/`` and every problem found by rehashing each file."""
    total, problems = 0, []
    for path in (root / "objects").rglob("*"):
        if not path.is_file():
            continue
        total += path.stat().st_size
        name, executable = path.name.removesuffix(".x"), path.name.endswith(".x")
        if hashlib.sha256(path.read_bytes()).hexdigest() != name:
            problems.append(f"{path.name}: corrupt")
        if stat.S_IMODE(path.stat().st_mode) != (0o755 if executable else 0o644):
            problems.append(f"{path.name}: mode {oct(path.stat().st_mode)}")
    return total, problems


def test_processes_sharing_one_cache_keep_pins_integrity_and_the_size_bound(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "cas"
    LocalCAS(root, max_bytes=MAX_BYTES).close()  # create the layout once
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(MAX_BYTES), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(PROCESSES)
    ]
    try:
        reports = []
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()  # each is done and holds its pins
            # stdout at its end: the worker is exiting. Read its stderr here, not through
            # communicate(), which the clean-up below calls once per worker.
            assert line, f"worker failed: {worker.stderr.read() if worker.stderr else ''}"
            reports.append(json.loads(line))

        assert [r["problems"] for r in reports] == [[]] * PROCESSES
        assert sum(r["evictions"] for r in reports) > 0, "the test must exercise eviction"
        pinned = [Digest.parse(d) for r in reports for d in r["pinned"]]
        assert len(pinned) >= 2 * PROCESSES
        for digest in pinned:
            path = root / "objects" / digest.hash[:2] / digest.hash
            assert Digest.of_bytes(path.read_bytes()) == digest, f"pinned {digest} lost"
        size, problems = scan(root)
        assert problems == []
        slack = PROCESSES * reports[0]["flush_bytes"]
        assert size <= MAX_BYTES + slack
    finally:
        for worker in workers:
            _, err = worker.communicate("\n", timeout=60)
            assert worker.returncode == 0, err

    size, problems = scan(root)
    assert problems == []
    assert size <= MAX_BYTES
    for leftovers in ("tmp", "pins", "owners"):
        assert os.listdir(root / leftovers) == [], leftovers
