"""Benchmark of whole actions by stager: hardlink, FUSE, auto and cached, beside ``cp -al``.

For trees of 1k/10k/50k distinct ~2 KiB files (20 per leaf directory, 10 leaves per parent:
docs/measured.md's shape), run after run, times one whole action through the real executor
(real bubblewrap, the stager under test) that either runs ``/bin/true`` or reads every file
(``find . -type f -exec cat {} +``), with

* a **warm** cache: every blob already in the local cache, the stager has seen the tree
  before (the steady state of a worker running similar actions);
* a **cold** cache: a fresh local cache and stager in front of a remote CAS (the in-repo
  fake server, in a process of its own so it does not share our GIL) holding the tree.

Interleaved in the same run: ``cp -al`` of the same tree (the physical floor of
hardlink staging). Everything lives on /dev/shm (docs/measured.md: ext4 churn). Prints medians
(ms) of ``--runs`` runs and the ratio to ``cp -al``; never asserts.

Needs root (bubblewrap as another uid, FUSE, overlay mounts).

Usage: python bench/bench_staging.py [--sizes 1000,10000,50000] [--runs 5] [--only hardlink,fuse,auto,cached]

A kind ending in ``+bound`` is that stager under a BoundedStager (``build_dir_size``);
``hardlink-unmapped+bound`` is hardlink staging under the bound's overlay without the
idmapped lower layer (the inputs not the action's own): the floor of ``hardlink+bound``.
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
from collections.abc import Callable

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner
from reapi_worker.storage.auto_staging import AutoStager, StagingRule
from reapi_worker.storage.bounded_staging import BoundedStager
from reapi_worker.storage.cached_staging import CachedTreeStager
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.fuse import FuseMount, FuseStager
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.parsed_trees import ParsedTrees
from reapi_worker.storage.remote_cas import RemoteCAS
from reapi_worker.storage.staging import HardlinkStager, Stager, TreeRemover
from reapi_worker.storage.tree_cache import TreeCache
from reapi_worker.storage.tree_facts import TreeFacts
from reapi_worker.worker.executor import Executor, ExecutorConfig

SHM = "/dev/shm"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"true": ["/bin/true"], "read all": ["/bin/sh", "-c", "find . -type f -exec cat {} + > /dev/null"]}

_SERVER = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from fakes.cas_server import FakeCasServer
server = FakeCasServer(tree_page_size=1000, tree_pages_per_call=1000)
print(server.start(), flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
server.stop()
"""


def build_tree(cache: LocalCAS, files: int) -> Digest:
    tree = CasDirectory.empty(cache)
    for i in range(files):
        parent = f"p{i // 200:03d}/d{i // 20 % 10}"
        if i % 20 == 0:
            tree.mkdir(parent)
        tree.write_bytes(f"{parent}/f{i % 20:02d}.c", (b"%08d" % i) * 256, executable=i % 20 == 0)
    return tree.digest()


def upload(cache: LocalCAS, remote: RemoteCAS, root: Digest) -> None:
    tree = CasDirectory.from_digest(cache, root)
    blobs = {digest for digest, _ in tree.file_digests()} | {digest for digest, _ in tree.directory_protos()}
    todo = sorted(remote.find_missing(blobs))
    for start in range(0, len(todo), 2000):
        remote.write_many(cache.read(digest) for digest in todo[start:start + 2000])


def action(cache: LocalCAS, root: Digest, arguments: list[str]) -> Digest:
    command = re_pb2.Command(arguments=arguments)
    command.environment_variables.add(name="PATH", value="/usr/bin:/bin")
    act = re_pb2.Action(command_digest=cache.write(serialize(command)).to_proto(), input_root_digest=root.to_proto(),
                        do_not_cache=True)
    return cache.write(serialize(act))


class Bench:
    def __init__(self, work: str, mount: FuseMount, remote: RemoteCAS, runner: BubblewrapRunner) -> None:
        self.work = work
        self.mount = mount
        self.remote = remote
        self.runner = runner
        self.build_root = os.path.join(work, "builds")
        os.makedirs(self.build_root, mode=0o755)
        self.remover = TreeRemover(os.path.join(self.build_root, ".trash"))
        self.times: dict[tuple[int, str, str, str], list[float]] = {}

    def stager(self, kind: str, store: LocalContent, facts: TreeFacts) -> Stager:
        if kind.endswith("+bound"):  # under build_dir_size: each action's writes on a tmpfs
            return BoundedStager(self.stager(kind.removesuffix("+bound"), store, facts), 1 << 30)
        hardlink = HardlinkStager(store, self.remover, parsed=ParsedTrees())
        if kind == "hardlink-unmapped":
            # The bound's overlay straight over the links, without the idmapped lower layer
            # that makes the inputs the action's own: the floor for hardlink+bound.
            hardlink.plain_tree = False
            return hardlink
        if kind == "hardlink":
            return hardlink
        if kind == "cached":  # a directory cache of its own, beside the cache it links from
            trees = TreeCache(tempfile.mkdtemp(prefix="trees-", dir=self.work), 1 << 34)
            return CachedTreeStager(store, self.remover, trees, self.build_root)
        fuse = FuseStager(store, self.remover, self.mount, self.build_root, facts=facts)
        return fuse if kind == "fuse" else AutoStager(hardlink, fuse, StagingRule(), facts)

    def execute(self, store: LocalContent, stager: Stager, action_digest: Digest) -> float:
        config = ExecutorConfig(build_root=self.build_root, worker_name="bench")
        executor = Executor(store, stager, self.runner, config)
        start = time.perf_counter()
        outcome = executor.execute(action_digest)
        elapsed = (time.perf_counter() - start) * 1000
        if outcome.status.code != code_pb2.OK or outcome.result.exit_code != 0:
            raise SystemExit(f"benchmark action failed: {outcome.status} exit {outcome.result.exit_code}")
        self.remover.drain()  # deleting the tree is off the action's path: not timed
        return elapsed

    def record(self, key: tuple[int, str, str, str], ms: float) -> None:
        self.times.setdefault(key, []).append(ms)


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="hardlink,fuse,auto,cached")
    parser.add_argument("--temperatures", default="warm,cold")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.only.split(",")
    temperatures = args.temperatures.split(",")

    work = tempfile.mkdtemp(prefix="bench-staging-", dir=SHM)
    os.chmod(work, 0o755)
    server = subprocess.Popen([sys.executable, "-c", _SERVER, os.path.join(REPO, "tests")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        channel = open_channel(ConnectionOptions(url=f"grpc://{address}"))
        remote = RemoteCAS(channel)
        mount = FuseMount(os.path.join(work, "fuse")).open()
        bench = Bench(work, mount, remote, BubblewrapRunner())
        warm = LocalCAS(os.path.join(work, "cache-warm"), max_bytes=1 << 33)
        try:
            for files in sizes:
                root = build_tree(warm, files)
                upload(warm, remote, root)
                source = os.path.join(work, f"src-{files}")
                CasDirectory.from_digest(warm, root).export_files(source)
                actions = {name: action(warm, root, argv) for name, argv in WORKLOADS.items()}
                warm_facts = {kind: TreeFacts() for kind in kinds}
                warm_stagers = {kind: bench.stager(kind, warm, warm_facts[kind]) for kind in kinds}
                for kind in kinds:  # the warm state: the tree seen once before
                    bench.execute(warm, warm_stagers[kind], actions["true"])
                for run in range(args.runs):
                    dest = os.path.join(work, "cp-al")
                    bench.record((files, "cp -al (floor)", "", ""), timed(
                        lambda: subprocess.run(["cp", "-al", source, dest], check=True)))
                    shutil.rmtree(dest)
                    for workload, action_digest in actions.items():
                        for kind in kinds:
                            if "warm" in temperatures:
                                bench.record((files, kind, workload, "warm"),
                                             bench.execute(warm, warm_stagers[kind], action_digest))
                            if "cold" in temperatures:
                                cold_dir = os.path.join(work, f"cache-cold-{run}")
                                with LocalCAS(cold_dir, max_bytes=1 << 33) as cold_cache:
                                    cold_cache.write(warm.read(action_digest))  # the action itself is local
                                    cold_cache.write(warm.read(Digest.from_proto(
                                        re_pb2.Action.FromString(warm.read(action_digest)).command_digest)))
                                    store = FetchThroughStore(cold_cache, remote)
                                    stager = bench.stager(kind, store, TreeFacts())
                                    bench.record((files, kind, workload, "cold"), bench.execute(store, stager, action_digest))
                                shutil.rmtree(cold_dir)
                    print(f"  {files} files: run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        finally:
            warm.close()
            mount.close()
            remote.close()
            channel.close()
        report(bench.times, args.runs)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def report(times: dict[tuple[int, str, str, str], list[float]], runs: int) -> None:
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"Whole action (stage + run + capture) on {SHM}, median of {runs} runs, ms; "
          f"ratio to cp -al of the same tree in the same run")
    print(f"{'files':>6} {'stager':10} {'workload':9} {'cache':5} {'median':>9} {'min':>9} {'max':>9} {'/cp -al':>8}")
    for key in sorted(times, key=lambda k: (k[0], k[2], k[3], k[1])):
        files, kind, workload, temperature = key
        floor = medians[(files, "cp -al (floor)", "", "")]
        values = times[key]
        print(f"{files:>6} {kind:10} {workload:9} {temperature:5} {medians[key]:9.1f} {min(values):9.1f} "
              f"{max(values):9.1f} {medians[key] / floor:7.2f}x")


if __name__ == "__main__":
    main()
