"""Benchmark: the stage phase of an action whose build directory is marked
``SubtreeReadOnly=false`` (BuildStream's build elements), with the private copies the
executor makes there (what every stager needed before) against none (a stager whose
inputs are the action's own: ``Stager.private_inputs``). The same stager, interleaved in
one run, so the copy cost is the difference and the copying row is the floor to compare to.

Files of 2 KiB, 20 per directory, on /dev/shm, warm (the root staged once before). Prints
medians of ``--runs``; never asserts. Needs root (overlays, bubblewrap as another uid).

Usage: python bench/bench_writable_inputs.py [--files 2000] [--runs 7] [--staging cached,hardlink+bound]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests", "system"), os.path.join(REPO, "tests")]

from executor_fixtures import make_farm  # noqa: E402
from fakes.marked_trees import MARK, store_marked_tree  # noqa: E402

from reapi_worker.protos import re_pb2  # noqa: E402
from reapi_worker.storage.digests import serialize  # noqa: E402
from reapi_worker.storage.staging import Stager  # noqa: E402


class _Copying(Stager):
    """``inner``, with its staged inputs' ``private_inputs`` turned off while ``copy``: the
    executor then copies the writable inputs, as it did for every stager before."""

    def __init__(self, inner: Stager) -> None:
        self.inner = inner
        self.copy = False

    def stage(self, root, build_dir, directories=(), owner=None):  # type: ignore[no-untyped-def]
        staged = self.inner.stage(root, build_dir, directories, owner)
        if self.copy:
            staged.private_inputs = False
        return staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--staging", default="cached,hardlink+bound")
    args = parser.parse_args()
    for staging in args.staging.split(","):
        name, _, bound = staging.partition("+")
        farm = make_farm(max_action_timeout=60, staging=name, bound_bytes=(1 << 30) if bound else None, parent="/dev/shm")
        try:
            build: dict = {MARK: "false"}
            for i in range(args.files):
                build.setdefault(f"d{i // 20}", {})[f"f{i}"] = os.urandom(1024).hex().encode()
            command = farm.cache.write(serialize(re_pb2.Command(arguments=["/bin/true"])))
            root = store_marked_tree(farm.cache, {MARK: "true", "build": build})
            action = farm.cache.write(serialize(re_pb2.Action(
                command_digest=command.to_proto(), input_root_digest=root.to_proto(), do_not_cache=True)))
            farm.executor.execute(action)  # warm
            rows = {"private copies (the floor: before)": False, "none (private_inputs)": True}
            times: dict[str, list[float]] = {row: [] for row in rows}
            stager = farm.executor._stager = _Copying(farm.stager)
            for _ in range(args.runs):
                for row, private in rows.items():
                    stager.copy = not private  # the copies the executor makes, or not
                    outcome = farm.executor.execute(action)
                    if not outcome.ok:
                        raise SystemExit(f"benchmark action failed: {outcome.status}")
                    times[row].append(outcome.phases["stage"] * 1000)
                    farm.remover.drain()  # removal is off the action's path: not timed
            for row, values in times.items():
                print(f"{args.files} files, {staging}, copies: {row}: stage median {statistics.median(values):.1f} ms "
                      f"(min {min(values):.1f}, max {max(values):.1f})")
        finally:
            farm.close()


if __name__ == "__main__":
    main()
