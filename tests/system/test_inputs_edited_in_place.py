"""Input files an action edits in place, through the executor with real bubblewrap and the
real stagers: what BuildStream's local sandbox lets a build do to its dependencies' files
(``touch``, ``chmod``, appending, truncating) in a part of the input root no
``SubtreeReadOnly=true`` marks.

* Where the stager shows inputs as the action's own (``private_inputs``: cached staging, and
  hardlink staging under a ``build_dir_size`` bound — idmapped overlays; FUSE staging, whose
  daemon shows files as the action's), every edit goes
  through; what is captured reflects it; the cached blob keeps its bytes, mode and times
  (it still matches its digest); the next action sees the original; two paths that are one
  blob are two files; a ``true``-marked subtree still refuses.
* Where it does not (hardlink staging without a bound, which has no overlay),
  the edits are refused as before: the staged input's ``private_inputs`` says so, and the README's
  staging section. A worker that is not root has no overlay but stages copies owned by
  the sandbox's uid (its own), which the action may edit.
* Input files have the CAS's modes, 0644/0755 as in BuildStream's local sandbox: where they
  are the action's own it may append to one without a ``chmod`` first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import require, require_tool
from executor_fixtures import make_farm
from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.storage.digests import Digest, serialize

ORIGINAL = b"original bytes of a dependency\n"
TWIN = b"one blob at two paths\n"
PLAIN = b"appended without chmod\n"

#: (staging, bound?) -> whether the stager shows inputs as the action's own.
CONFIGS = {
    "hardlink+bound": ("hardlink", True, True),
    "cached": ("cached", False, True),
    "cached+bound": ("cached", True, True),
    "fuse": ("fuse", False, True),  # the daemon shows files as the action's (storage/fuse/inodes.py)
    "fuse+bound": ("fuse", True, True),
    "hardlink": ("hardlink", False, False),
}

TREE = {
    "dep": {"input": ORIGINAL, "tool": ORIGINAL + b"tool\n", "grown": ORIGINAL + b"grown\n",
            "cut": ORIGINAL + b"cut\n", "twin": TWIN, "plain": PLAIN},
    "other": {"twin": TWIN},
    "ro": {MARK: "true", "input": ORIGINAL + b"ro\n"},
}

# Each attempt prints "<what>:ok" if it went through, "<what>:refused" if not.
ATTEMPTS = " ".join([
    "t() { if ( eval \"$2\" ) 2>/dev/null; then echo $1:ok; else echo $1:refused; fi; };",
    "t touch 'touch -d @86400 dep/input && test \"$(stat -c %Y dep/input)\" = 86400';",
    "t chmod 'chmod 0755 dep/tool && test -x dep/tool';",
    "t append 'chmod u+w dep/grown && echo more >> dep/grown';",
    "t truncate 'chmod u+w dep/cut && truncate -s 5 dep/cut';",
    "t twin 'chmod u+w dep/twin && echo changed >> dep/twin && ! cmp -s other/twin dep/twin';",
    "t twin-intact 'test \"$(cat other/twin)\" = \"one blob at two paths\"';",
    "t append-no-chmod 'echo more >> dep/plain';",
    "t ro-touch 'touch ro/input';",
    "t ro-chmod 'chmod u+w ro/input';",
])
OUTPUTS = ["dep/input", "dep/tool", "dep/grown", "dep/cut", "dep/twin"]


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    staging, bound, private = CONFIGS[request.param]
    require_tool("bwrap")
    if staging == "fuse":
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")
    if bound or staging == "cached":
        require(os.geteuid() == 0, f"{request.param} staging mounts and needs root")
    farm = make_farm(max_action_timeout=30, staging=staging, bound_bytes=(64 << 20) if bound else None)
    yield farm, private
    farm.close()


def run(farm, script: str, outputs=()):
    command = re_pb2.Command(
        arguments=["/bin/sh", "-c", script],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")],
        output_paths=sorted(outputs),
    )
    action = re_pb2.Action(
        command_digest=farm.cache.write(serialize(command)).to_proto(),
        input_root_digest=store_marked_tree(farm.cache, TREE).to_proto(),
        do_not_cache=True,
    )
    outcome = farm.executor.execute(farm.cache.write(serialize(action)))
    assert outcome.status.code == code_pb2.OK, outcome.status
    return outcome


def _blob_facts(farm) -> dict[bytes, tuple[int, int, int, bytes]]:
    facts = {}
    for data in (ORIGINAL, ORIGINAL + b"tool\n", ORIGINAL + b"grown\n", ORIGINAL + b"cut\n", TWIN, PLAIN):
        path = farm.cache.path(Digest.of_bytes(data))
        st = os.stat(path)
        with open(path, "rb") as blob:
            facts[data] = (st.st_mode, st.st_mtime_ns, st.st_uid, blob.read())
    return facts


def test_an_action_edits_unmarked_inputs_in_place_where_its_stager_makes_them_its_own(config):
    farm, private = config
    store_marked_tree(farm.cache, TREE)
    before = _blob_facts(farm)

    outcome = run(farm, ATTEMPTS, OUTPUTS)
    verdicts = dict(line.split(":") for line in farm.text(outcome.result.stdout_digest).split())
    edits = "ok" if private else "refused"
    assert verdicts == {
        "touch": edits, "chmod": edits, "append": edits, "truncate": edits, "twin": edits,
        "twin-intact": "ok",
        "append-no-chmod": edits,
        "ro-touch": "refused", "ro-chmod": "refused",
    }

    captured = {f.path: f for f in outcome.result.output_files}
    assert sorted(captured) == sorted(OUTPUTS)

    def content(path: str) -> bytes:
        return farm.cache.read(Digest.from_proto(captured[path].digest))

    if private:
        assert captured["dep/tool"].is_executable
        assert content("dep/grown") == ORIGINAL + b"grown\nmore\n"
        assert content("dep/cut") == ORIGINAL[:5]
        assert content("dep/twin") == TWIN + b"changed\n"
    else:
        assert not captured["dep/tool"].is_executable
        assert content("dep/grown") == ORIGINAL + b"grown\n"
    assert content("dep/input") == ORIGINAL

    # The cache never saw any of it: each blob keeps its bytes (so its digest), mode, times.
    assert _blob_facts(farm) == before
    for data, (_, _, _, stored) in before.items():
        assert Digest.of_bytes(stored) == Digest.of_bytes(data)

    # The next action over the same tree sees the originals.
    again = run(farm, "stat -c '%a %Y' dep/input dep/tool; cat dep/grown dep/twin other/twin")
    lines = farm.text(again.result.stdout_digest).splitlines()
    mode = "644"  # the CAS's, and the FUSE daemon's
    assert lines[0].split()[0] == mode and lines[0].split()[1] != "86400"
    assert lines[1].split()[0] == mode
    assert "\n".join(lines[2:]) + "\n" == (ORIGINAL + b"grown\n" + TWIN + TWIN).decode()


def test_the_staged_input_says_whether_inputs_are_the_actions_own(config):
    farm, private = config
    assert farm.private_inputs() is private


NOBODY_WORKER = 60555  # an unprivileged uid playing a worker that is not root


def test_a_worker_that_is_not_root_stages_copies_its_actions_may_edit():
    """No overlay without root, and no uid switch either: the sandbox runs as the worker, so
    hardlink staging copies (worker/compose.py), and the copies are the action's own files."""
    require_tool("bwrap")
    require_tool("setpriv")
    # Not pytest's tmp_path (its parents are 0700 root's): a directory the uid can reach.
    work = tempfile.mkdtemp(prefix="reapi-worker-nonroot-")
    os.chown(work, NOBODY_WORKER, NOBODY_WORKER)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nonroot_edit_child.py")
    script = ("touch -d @86400 dep/input && chmod +x dep/input && chmod u+w dep/grown && echo more >> dep/grown"
              " && echo edited")
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY_WORKER}", f"--regid={NOBODY_WORKER}", "--clear-groups", "--",
         sys.executable, child, work, tests, script],
        capture_output=True, text=True, timeout=120,
    )
    shutil.rmtree(work)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert (seen["code"], seen["exit"], seen["stdout"]) == (code_pb2.OK, 0, "edited\n"), seen
    assert seen["files"] == {"dep/grown": "grown\nmore\n", "dep/input": "original\n"}
    assert seen["blob"] == "grown\n"  # the copy changed, never the cache


def test_below_a_false_marking_edits_go_through_everywhere_copied_only_where_the_stager_must(config):
    """BuildStream's build directory (``SubtreeReadOnly=false``): every stager lets the build
    edit its sources in place; one whose inputs are the action's own already makes no copy
    (the input still shows the cache inode's link count), the others copy (one link)."""
    farm, private = config
    # A false marking counts below a true one (as BuildStream sends them): the root read-only.
    tree = {MARK: "true", "build": {MARK: "false", "src": ORIGINAL, "configure": ORIGINAL + b"configure\n"}}
    script = ("stat -c %h build/src; touch -d @86400 build/src && chmod +x build/configure"
              " && echo more >> build/src && truncate -s 4 build/configure && echo edited")
    command = re_pb2.Command(
        arguments=["/bin/sh", "-c", script],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")],
        output_paths=["build/configure", "build/src"],
    )
    action = re_pb2.Action(
        command_digest=farm.cache.write(serialize(command)).to_proto(),
        input_root_digest=store_marked_tree(farm.cache, tree).to_proto(), do_not_cache=True,
    )
    outcome = farm.executor.execute(farm.cache.write(serialize(action)))
    assert outcome.status.code == code_pb2.OK and outcome.result.exit_code == 0, farm.text(outcome.result.stderr_digest)
    links, edited = farm.text(outcome.result.stdout_digest).split()
    assert edited == "edited"
    assert (int(links) > 1) is private
    captured = {f.path: f for f in outcome.result.output_files}
    assert farm.cache.read(Digest.from_proto(captured["build/src"].digest)) == ORIGINAL + b"more\n"
    assert farm.cache.read(Digest.from_proto(captured["build/configure"].digest)) == ORIGINAL[:4]
    assert captured["build/configure"].is_executable
    with open(farm.cache.path(Digest.of_bytes(ORIGINAL)), "rb") as blob:
        assert blob.read() == ORIGINAL
