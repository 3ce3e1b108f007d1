"""BuildStream's sandbox rules through the executor: real bubblewrap, both stagers.

* ``SubtreeReadOnly`` markings (Directory node properties): a read-only subtree cannot be
  written by the command (EROFS), also by the owner of its directories after ``chmod``,
  and the cached blobs stay intact; a ``false`` inside a ``true`` is writable; host-tools
  and chroot root modes.
* Chroot robustness: ``proc``/``dev``/``tmp`` that are not directories are INVALID_ARGUMENT
  naming them, before any sandbox is built.
* An action whose own sandbox cannot be set up is INVALID_ARGUMENT for the client (the
  worker's probe sandbox still works), never a reason to bench the worker.
"""

from __future__ import annotations

import os

import pytest

from conftest import require, require_tool
from executor_fixtures import STAGINGS, make_farm
from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.sandbox.request import Bind
from reapi_worker.sandbox.probe import runner_probe
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.worker.health import HealthMonitor, HealthRecordingExecutor, SandboxCheck

#: In a tree spec, the key that marks the directory it is in.


def require_staging(staging: str) -> None:
    require_tool("bwrap")
    if staging.startswith("fuse"):
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")


@pytest.fixture(params=(*STAGINGS, "fuse-pyfuse3"))  # "fuse": the worker's choice (auto)
def staging(request) -> str:
    require_staging(request.param)
    return request.param


def _host_links() -> dict:
    """The merged-/usr top-level symlinks a chroot root needs beside a bound /usr."""
    return {n: "->" + os.readlink(f"/{n}") for n in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{n}")}


@pytest.fixture
def chroot_farm(staging):
    require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "needs a merged-/usr host")
    farm = make_farm(max_action_timeout=30, staging=staging, extra_ro_binds=(Bind("/usr", "/usr"),))
    yield farm
    farm.close()


@pytest.fixture
def farm(staging):
    farm = make_farm(max_action_timeout=30, staging=staging)
    yield farm
    farm.close()


def run(farm, script: str, tree: dict, **command_fields):
    platform = command_fields.pop("platform", None)
    command = re_pb2.Command(
        arguments=["/bin/sh", "-c", script],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")],
        **command_fields,
    )
    action = re_pb2.Action(
        command_digest=farm.cache.write(serialize(command)).to_proto(),
        input_root_digest=store_marked_tree(farm.cache, tree).to_proto(),
        do_not_cache=True,
    )
    if platform:
        action.platform.properties.extend(re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(platform.items()))
    return farm.executor.execute(farm.cache.write(serialize(action)))


PRECIOUS = b"precious cached bytes\n"

# Each attempt prints "<what>:ok" if the write went through, "<what>:refused" if not.
ATTEMPTS = " ".join([
    "t() { if ( eval \"$2\" ) 2>/dev/null; then echo $1:ok; else echo $1:refused; fi; };",
    "t new 'echo x > ro/new';",
    "t append 'echo x >> ro/input';",
    "t chmod-then-append 'chmod -R u+w ro; echo x >> ro/input';",
    "t remove 'rm -f ro/input';",
    "t deep 'mkdir ro/sub/deeper';",
    "t nested-writable 'echo x > ro/sub/rw/made && cat ro/sub/rw/made >/dev/null';",
    "t outside 'echo x > elsewhere';",
])


def _verdicts(farm, outcome) -> dict[str, str]:
    assert outcome.status.code == code_pb2.OK, outcome.status
    lines = farm.text(outcome.result.stdout_digest).split()
    return dict(line.split(":") for line in lines)


def _assert_cache_intact(farm) -> None:
    digest = Digest.of_bytes(PRECIOUS)
    with open(farm.cache.path(digest), "rb") as cached:
        assert cached.read() == PRECIOUS


READ_ONLY_TREE = {
    "ro": {MARK: "true", "input": PRECIOUS, "sub": {"rw": {MARK: "false", "x": b""}}},
}
EXPECTED = {
    "new": "refused", "append": "refused", "chmod-then-append": "refused", "remove": "refused",
    "deep": "refused", "nested-writable": "ok", "outside": "ok",
}


def test_writing_into_a_read_only_subtree_fails_in_host_tools_mode_and_the_cache_stays_intact(farm):
    outcome = run(farm, ATTEMPTS, READ_ONLY_TREE)
    assert _verdicts(farm, outcome) == EXPECTED
    _assert_cache_intact(farm)


def test_the_error_a_write_into_a_read_only_subtree_gets_is_erofs(farm):
    outcome = run(farm, "echo x > ro/new", READ_ONLY_TREE)
    assert outcome.result.exit_code != 0
    assert "Read-only file system" in farm.text(outcome.result.stderr_digest)


def test_a_read_only_root_in_chroot_mode_with_writable_build_dir_like_buildstream(chroot_farm):
    farm = chroot_farm
    tree = {
        MARK: "true", **_host_links(),
        "etc": {"passwd": PRECIOUS},
        "buildstream": {"p": {"e.bst": {MARK: "false", "src": b"source\n"}}},
        "buildstream-install": {MARK: "false"},
        "tmp": {MARK: "false"}, "proc": {MARK: "false"}, "dev": {MARK: "false"},
    }
    script = " ".join([
        "t() { if ( eval \"$2\" ) 2>/dev/null; then echo $1:ok; else echo $1:refused; fi; };",
        "t root 'echo x > /newfile';",
        "t etc 'echo x >> /etc/passwd';",
        "t build 'echo built > made && cp src copied';",
        "t install 'mkdir -p /buildstream-install/usr/bin && echo x > /buildstream-install/usr/bin/tool';",
        "t tmp 'echo x > /tmp/scratch';",
        "t proc 'test -r /proc/self/status';",
        "t devnull 'echo x > /dev/null';",
    ])
    outcome = run(farm, script, tree, working_directory="buildstream/p/e.bst", platform={"rootMode": "chroot"},
                  output_paths=["made"])
    assert _verdicts(farm, outcome) == {
        "root": "refused", "etc": "refused", "build": "ok", "install": "ok", "tmp": "ok", "proc": "ok", "devnull": "ok",
    }
    assert [f.path for f in outcome.result.output_files] == ["made"]
    _assert_cache_intact(farm)


def test_an_unmarked_tree_and_a_false_marking_stay_writable(farm):
    script = "echo x > a/new && rm a/input && echo x > a/input && mkdir b/c && echo done"
    outcome = run(farm, script, {"a": {MARK: "false", "input": b"in\n"}, "b": {}})
    assert outcome.status.code == code_pb2.OK and outcome.result.exit_code == 0
    assert farm.text(outcome.result.stdout_digest) == "done\n"


def test_a_marking_other_than_true_or_false_is_invalid_argument_naming_the_directory(farm):
    outcome = run(farm, "true", {"a": {"b": {MARK: "yes"}}})
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT
    assert "'a/b'" in outcome.status.message and "SubtreeReadOnly='yes'" in outcome.status.message


def _wide_tree(marks: dict[tuple[str, ...], str] | None = None) -> dict:
    """Sixty directories one level below twelve (and ``p11/d4/deep``), an input in each; ``marks`` puts a
    marking on the directory at each path."""
    tree: dict = {f"p{i}": {f"d{j}": {"input": b"%d-%d\n" % (i, j)} for j in range(5)} for i in range(12)}
    tree["p11"]["d4"]["deep"] = {"input": b"deep\n"}
    for path, value in (marks or {}).items():
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node[MARK] = value
    return tree


# Each attempt writes a new file into one directory of the wide tree.
WIDE_ATTEMPTS = " ".join([
    "t() { if ( eval \"$2\" ) 2>/dev/null; then echo $1:ok; else echo $1:refused; fi; };",
    *(f"t {name} 'echo x > {path}/new';" for name, path in [
        ("marked", "p11/d4/deep"), ("above-mark", "p11/d4"), ("beside", "p11/d3"),
        ("shared-under-mark", "sys/d2"), ("shared-alone", "p5/d2"), ("other", "p0/d0"),
    ]),
])


def test_a_marking_deep_in_a_wide_tree_is_enforced(farm):
    """The walk's common case (no marking anywhere) takes a shortcut: a tree with a single
    marking three levels down, in its last directory, must still be read-only there."""
    tree = _wide_tree({("p11", "d4", "deep"): "true"})
    tree["sys"] = {"d2": {}}
    verdicts = _verdicts(farm, run(farm, WIDE_ATTEMPTS, tree))
    assert verdicts["marked"] == "refused"
    assert verdicts["above-mark"] == verdicts["beside"] == verdicts["other"] == verdicts["shared-alone"] == "ok"


def test_a_tree_sharing_subtrees_with_an_unmarked_one_seen_before_is_enforced(farm):
    """The executor remembers subtrees without markings: a later tree that puts one of them
    under a read-only parent, and marks a new directory deep inside, is enforced on both,
    while the same subtree stays writable where the new tree leaves it unmarked."""
    unmarked = _wide_tree()
    unmarked["sys"] = {"d2": {}}
    assert set(_verdicts(farm, run(farm, WIDE_ATTEMPTS, unmarked)).values()) == {"ok"}
    shared = unmarked["p5"]
    tree = _wide_tree({("p11", "d4", "deep"): "true"})
    tree["sys"] = {MARK: "true", **shared}  # p5's subtree, known unmarked, now under a marking
    verdicts = _verdicts(farm, run(farm, WIDE_ATTEMPTS, tree))
    assert verdicts == {
        "marked": "refused", "above-mark": "ok", "beside": "ok",
        "shared-under-mark": "refused", "shared-alone": "ok", "other": "ok",
    }


# -- chroot robustness -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["proc", "dev", "tmp"])
@pytest.mark.parametrize("entry, kind", [
    (b"a file\n", "a regular file"),
    ("->" + "loop", "a symlink"),  # points at itself: a loop
    ("->" + "nowhere/at/all", "a symlink"),  # dangling
    ("->" + "/etc", "a symlink"),  # absolute
])
def test_a_chroot_root_whose_mount_point_is_not_a_directory_is_invalid_argument_naming_it(
    chroot_farm, name, entry, kind
):
    if entry == "->loop":
        entry = "->" + name
    outcome = run(chroot_farm, "true", {**_host_links(), name: entry}, platform={"rootMode": "chroot"})
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT, outcome.status
    assert f"'{name}' is {kind}" in outcome.status.message
    assert outcome.failed_phase == "fetch"  # refused before staging, no sandbox built


# -- an action's own set-up failure ------------------------------------------------------------


def _probe(farm):
    """The worker's own probe sandbox, as the composition root builds it."""
    config = farm.executor._config
    return runner_probe(farm.executor._runner, config.build_root, extra_ro_binds=config.extra_ro_binds)


def test_an_actions_own_setup_failure_is_its_result_and_leaves_the_worker_healthy(farm):
    # A uid the sandbox cannot map: bubblewrap fails to set the action's sandbox up, while the
    # worker's own probe sandbox (uid 0) works. Before: INTERNAL, and the worker benched.
    checks = [SandboxCheck(_probe(farm))]
    with HealthMonitor(checks) as monitor:
        assert monitor.check().ok
        executor = HealthRecordingExecutor(farm.executor, monitor)
        command = re_pb2.Command(arguments=["/bin/true"])
        action = re_pb2.Action(
            command_digest=farm.cache.write(serialize(command)).to_proto(),
            input_root_digest=store_marked_tree(farm.cache, {"proc": {}}).to_proto(),
            platform=re_pb2.Platform(properties=[re_pb2.Platform.Property(name="unixUID", value="4294967294")]),
        )
        outcome = executor.execute(farm.cache.write(serialize(action)))
        assert outcome.status.code == code_pb2.INVALID_ARGUMENT, outcome.status
        assert "the action's sandbox could not be set up" in outcome.status.message
        assert monitor.check().ok


def test_a_probe_failure_still_makes_the_worker_unhealthy(farm):
    import dataclasses

    # The operator's bind is broken: every sandbox on this host fails, the probe's too.
    farm.executor._config = dataclasses.replace(farm.executor._config, extra_ro_binds=(Bind("/nonexistent-reapi-bind", "/opt/x"),))
    with HealthMonitor([SandboxCheck(_probe(farm))]) as monitor:
        executor = HealthRecordingExecutor(farm.executor, monitor)
        outcome = executor.execute(farm.action(["/bin/true"]))
        assert outcome.status.code == code_pb2.UNAVAILABLE
        report = monitor.check()
        assert not report.ok
        assert any("nonexistent-reapi-bind" in reason for reason in report.reasons)


# -- what BuildStream's local sandbox gives a command -----------------------------------------


def test_a_chroot_action_gets_buildstreams_environment(chroot_farm):
    # What buildbox-run-bubblewrap gives BuildStream locally: fresh /proc, a minimal /dev, a
    # writable /tmp, a fixed hostname, the uid/gid it asks for, nothing of the host's env.
    farm = chroot_farm
    script = " ".join([
        "echo uid=$(id -u) gid=$(id -g);",
        "echo pid1=$(cat /proc/1/comm);",
        "echo dev=$(ls /dev | grep -c -x -e null -e zero -e full -e random -e urandom -e tty);",
        "echo sda=$(ls /dev | grep -c sd);",
        "echo tmp > /tmp/t && echo tmp=$(cat /tmp/t);",
        "echo host=$(cat /proc/sys/kernel/hostname);",
        "echo env=$(env | grep -v -e ^PATH= -e ^PWD= -e ^SHLVL= -e ^_= | wc -l)",
    ])
    tree = {MARK: "true", **_host_links(), "build": {MARK: "false"}, "tmp": {MARK: "false"}}
    outcome = run(farm, script, tree, working_directory="build",
                  platform={"rootMode": "chroot", "unixUID": "1000", "unixGID": "100"})
    assert outcome.status.code == code_pb2.OK, outcome.status
    said = dict(line.split("=", 1) for line in farm.text(outcome.result.stdout_digest).split())
    assert said == {"uid": "1000", "gid": "100", "pid1": "bwrap", "dev": "6", "sda": "0", "tmp": "tmp",
                    "host": "localhost", "env": "0"}, farm.text(outcome.result.stderr_digest)


def test_a_uid_that_is_not_a_number_is_invalid_argument_naming_the_property(farm):
    outcome = run(farm, "true", {}, platform={"unixUID": "root"})
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT
    assert "unixUID='root'" in outcome.status.message
