"""Run by tests/system/test_inputs_edited_in_place.py as an unprivileged uid: a worker that is
not root, built as worker/compose.py builds one (its sandbox runs as itself, so hardlink
staging copies instead of linking), runs one action editing its inputs in place and prints
what it saw as JSON. argv: work directory, the tests directory, the script."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, sys.argv[2])

from fakes.marked_trees import store_marked_tree  # noqa: E402

from reapi_worker.protos import re_pb2  # noqa: E402
from reapi_worker.sandbox.bubblewrap import BubblewrapRunner  # noqa: E402
from reapi_worker.sandbox.rlimits import RlimitController  # noqa: E402
from reapi_worker.storage.digests import Digest, serialize  # noqa: E402
from reapi_worker.storage.local_cas import LocalCAS  # noqa: E402
from reapi_worker.storage.parsed_trees import ParsedTrees  # noqa: E402
from reapi_worker.storage.staging import HardlinkStager, TreeRemover  # noqa: E402
from reapi_worker.worker.executor import Executor, ExecutorConfig  # noqa: E402

work, script = sys.argv[1], sys.argv[3]
tree = {"dep": {"input": b"original\n", "grown": b"grown\n"}}
# rlimits: the cgroup tree this test host gives root is not delegated to the test's uid.
runner = BubblewrapRunner(controller=RlimitController())
assert not runner.protects_hardlinks  # not root: the sandbox is this uid
with LocalCAS(os.path.join(work, "cache"), max_bytes=1 << 26) as cache:
    remover = TreeRemover(os.path.join(work, "builds", ".trash"))
    stager = HardlinkStager(cache, remover, link=False, parsed=ParsedTrees())
    executor = Executor(cache, stager, runner, ExecutorConfig(build_root=os.path.join(work, "builds")))
    command = re_pb2.Command(arguments=["/bin/sh", "-c", script], output_paths=["dep/grown", "dep/input"])
    command.environment_variables.add(name="PATH", value="/usr/bin:/bin")
    action = re_pb2.Action(command_digest=cache.write(serialize(command)).to_proto(),
                           input_root_digest=store_marked_tree(cache, tree).to_proto(), do_not_cache=True)
    outcome = executor.execute(cache.write(serialize(action)))
    if outcome.status.code != 0:
        print(json.dumps({"code": outcome.status.code, "message": outcome.status.message}))
        sys.exit(0)
    files = {f.path: cache.read(Digest.from_proto(f.digest)).decode() for f in outcome.result.output_files}
    print(json.dumps({
        "code": outcome.status.code, "message": outcome.status.message, "exit": outcome.result.exit_code,
        "stdout": cache.read(Digest.from_proto(outcome.result.stdout_digest)).decode(),
        "files": files, "blob": cache.read(Digest.of_bytes(b"grown\n")).decode(),
    }))
    remover.drain()
