"""The executor end to end on this host: real local CAS, real bubblewrap, and each stager
(hardlink and FUSE: ``STAGINGS``) — one suite, every test run over both.

Security tests are named after the attack they stop.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import psutil
import pytest

from conftest import require, require_tool
from executor_fixtures import STAGINGS, make_farm

from reapi_worker.protos import code_pb2, error_details_pb2, re_pb2
from reapi_worker.sandbox.request import Bind
from reapi_worker.storage.digests import Digest, serialize


def require_staging(staging: str) -> None:
    require_tool("bwrap")
    if staging == "fuse":
        require_tool("fusermount3")
        require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")
    if staging == "cached":
        require_tool("unshare")
        require(os.geteuid() == 0, "cached staging mounts overlays and needs root")


@pytest.fixture(params=STAGINGS + tuple(f"{s}+bound" for s in STAGINGS))
def staging(request) -> str:
    """A staging; ``+bound``: the same under a BoundedStager (storage/bounded_staging.py),
    which must pass the whole suite too."""
    require_staging(request.param.removesuffix("+bound"))
    if request.param.endswith("+bound"):
        require(os.geteuid() == 0, "a bounded build directory mounts a tmpfs: root only")
    return request.param


@pytest.fixture
def farm(staging):
    name, bounded = staging.removesuffix("+bound"), staging.endswith("+bound")
    farm = make_farm(max_action_timeout=30, staging=name, bound_bytes=64 << 20 if bounded else None)
    yield farm
    farm.close()


def _sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


# -- correctness -------------------------------------------------------------------


def test_exit_code_stdout_and_stderr(farm):
    outcome = farm.run(_sh("echo out; echo err >&2; exit 3"))
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert outcome.result.exit_code == 3
    assert farm.text(outcome.result.stdout_digest) == "out\n"
    assert farm.text(outcome.result.stderr_digest) == "err\n"


def test_environment_is_exactly_the_commands(farm):
    os.environ["REAPI_WORKER_LEAK_CANARY"] = "leaked"
    try:
        env = [re_pb2.Command.EnvironmentVariable(name=n, value=v) for n, v in [("A", "1"), ("PATH", "/usr/bin:/bin")]]
        outcome = farm.run(["env"], environment_variables=env)
    finally:
        del os.environ["REAPI_WORKER_LEAK_CANARY"]
    assert sorted(farm.text(outcome.result.stdout_digest).splitlines()) == ["A=1", "PATH=/usr/bin:/bin"]


def test_working_directory_and_relative_argv0(farm):
    inputs = {"pkg/tool.sh": (b"#!/bin/sh\npwd\necho tool ran\n", True)}
    outcome = farm.run(["./tool.sh"], inputs, working_directory="pkg")
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert farm.text(outcome.result.stdout_digest) == "/build/pkg\ntool ran\n"


def test_bare_argv0_is_looked_up_on_the_commands_path(farm):
    inputs = {"bin/hello": (b"#!/bin/sh\necho from the PATH of the action\n", True)}
    env = [re_pb2.Command.EnvironmentVariable(name="PATH", value="/build/bin:/usr/bin:/bin")]
    outcome = farm.run(["hello"], inputs, environment_variables=env)
    assert farm.text(outcome.result.stdout_digest) == "from the PATH of the action\n"


def test_output_paths_files_dirs_empty_dirs_exec_bits(farm):
    script = "mkdir -p out/d/e out/empty && echo a > out/d/e/a && printf x > f && chmod +x f && ln -s f link"
    outcome = farm.run(_sh(script), output_paths=["f", "out", "link", "never-made"])
    result = outcome.result
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert [(f.path, f.is_executable) for f in result.output_files] == [("f", True)]
    assert [(s.path, s.target) for s in result.output_symlinks] == [("link", "f")]
    tree = re_pb2.Tree.FromString(farm.cache.read(Digest.from_proto(result.output_directories[0].tree_digest)))
    assert [d.name for d in tree.root.directories] == ["d", "empty"]
    assert any(not child.files and not child.directories for child in tree.children)  # the empty dir


def test_legacy_output_fields_and_parents_created_before_the_run(farm):
    # Parents of output files and directories (not the directories themselves) exist
    # before the command starts.
    outcome = farm.run(_sh("echo x > gen/deep/file && mkdir outdir && touch outdir/y"), output_files=["gen/deep/file"],
                       output_directories=["outdir"])
    result = outcome.result
    assert result.exit_code == 0, farm.text(result.stderr_digest)
    assert [f.path for f in result.output_files] == ["gen/deep/file"]
    assert [d.path for d in result.output_directories] == ["outdir"]
    assert not result.output_symlinks


def test_node_properties_when_asked(farm):
    outcome = farm.run(_sh("echo x > f && chmod 640 f && touch -d @1700000000 f"), output_paths=["f"],
                       output_node_properties=["unix_mode", "mtime"])
    props = outcome.result.output_files[0].node_properties
    assert props.unix_mode.value == 0o640
    assert props.mtime.seconds == 1700000000


def test_inputs_are_staged_with_their_bits_and_symlinks(farm):
    inputs = {"src/a.txt": b"alpha", "src/run": (b"#!/bin/sh\necho ok\n", True), "src/link": "->a.txt"}
    outcome = farm.run(_sh("cat src/link; test -x src/run && src/run; test -x src/a.txt || echo not-exec"), inputs)
    assert farm.text(outcome.result.stdout_digest) == "alphaok\nnot-exec\n"


def test_chroot_mode_sees_the_input_root_as_slash_and_writes_to_its_own_view(staging):
    require(all(os.path.islink(f"/{n}") for n in ("bin", "lib")), "needs a merged-/usr host")
    farm = make_farm(max_action_timeout=30, staging=staging.removesuffix("+bound"), extra_ro_binds=(Bind("/usr", "/usr"),),
                     bound_bytes=64 << 20 if staging.endswith("+bound") else None)
    try:
        inputs: dict = {f"{n}": "->" + os.readlink(f"/{n}") for n in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{n}")}
        inputs["src/a.txt"] = b"alpha\n"
        script = "pwd; cat a.txt; rm a.txt; echo built > /src/out.txt; ls /"
        outcome = farm.run(["sh", "-c", script], inputs, working_directory="src", platform={"rootMode": "chroot"},
                           output_paths=["out.txt", "a.txt"])
        assert outcome.status.code == code_pb2.OK, outcome.status
        lines = farm.text(outcome.result.stdout_digest).split()
        assert lines[:2] == ["/src", "alpha"]
        assert {"bin", "lib", "src", "usr", "proc", "dev", "tmp"} <= set(lines[2:])
        assert [(f.path, farm.cache.read(Digest.from_proto(f.digest))) for f in outcome.result.output_files] == [
            ("out.txt", b"built\n")]
        assert farm.cache.read(Digest.of_bytes(b"alpha\n")) == b"alpha\n"
    finally:
        farm.close()


def test_hardlink_staging_links_the_cache_inode_instead_of_copying():
    # A property of hardlink staging only: not parametrized over the stagers.
    require_staging("hardlink")
    farm = make_farm(max_action_timeout=30, staging="hardlink")
    try:
        content = b"linked, not copied\n"
        outcome = farm.run(["stat", "-c", "%i %h", "input"], {"input": content})
        inode, links = farm.text(outcome.result.stdout_digest).split()
        assert int(inode) == os.stat(farm.cache.path(Digest.of_bytes(content))).st_ino
        assert int(links) >= 2
    finally:
        farm.close()


def test_metadata_phases_and_resource_usage(farm):
    outcome = farm.run(["/bin/true"])
    meta = outcome.result.execution_metadata
    assert meta.worker == "test-worker"
    stamps = [meta.input_fetch_start_timestamp, meta.input_fetch_completed_timestamp, meta.execution_start_timestamp,
              meta.execution_completed_timestamp, meta.output_upload_start_timestamp, meta.output_upload_completed_timestamp]
    nanos = [s.ToNanoseconds() for s in stamps]
    assert nanos == sorted(nanos) and nanos[0] > 0
    from reapi_worker.protos import execution_stats_pb2
    stats = execution_stats_pb2.ExecutionStatistics()
    assert meta.auxiliary_metadata[0].Unpack(stats)
    assert stats.command_rusage.maxrss > 0


# -- errors ------------------------------------------------------------------------


def test_missing_input_blobs_are_all_listed_as_failed_precondition(farm):
    absent = [Digest.of_bytes(b"absent one"), Digest.of_bytes(b"absent two")]
    root = re_pb2.Directory(files=[re_pb2.FileNode(name=f"f{i}", digest=d.to_proto()) for i, d in enumerate(absent)])
    # The command reads both: a lazy stager names the missing inputs the command touched.
    command = re_pb2.Command(arguments=["/bin/cat", "f0", "f1"])
    action = re_pb2.Action(command_digest=farm.cache.write(serialize(command)).to_proto(),
                           input_root_digest=farm.cache.write(serialize(root)).to_proto())
    outcome = farm.executor.execute(farm.cache.write(serialize(action)))
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert outcome.status.details[0].Unpack(failure)
    assert sorted(v.subject for v in failure.violations) == sorted(f"blobs/{d.hash}/{d.size_bytes}" for d in absent)
    assert {v.type for v in failure.violations} == {"MISSING"}
    assert _build_dirs(farm) == []


def test_missing_command_and_input_root_are_both_listed(farm):
    command, root = Digest.of_bytes(b"no command"), Digest.of_bytes(b"no root")
    action = re_pb2.Action(command_digest=command.to_proto(), input_root_digest=root.to_proto())
    outcome = farm.executor.execute(farm.cache.write(serialize(action)))
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    assert command.hash in outcome.status.message or "2 blob" in outcome.status.message


def test_dotdot_in_output_path_is_refused(farm):
    outcome = farm.run(["/bin/true"], output_paths=["../escape"])
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT
    assert "output_paths" in outcome.status.message


def test_non_canonical_input_root_is_invalid_argument(farm):
    blob = farm.cache.write(b"x")
    files = [re_pb2.FileNode(name=n, digest=blob.to_proto()) for n in ("b", "a")]  # unsorted
    root = farm.cache.write(serialize(re_pb2.Directory(files=files)))
    command = re_pb2.Command(arguments=["/bin/true"])
    action = re_pb2.Action(command_digest=farm.cache.write(serialize(command)).to_proto(), input_root_digest=root.to_proto())
    outcome = farm.executor.execute(farm.cache.write(serialize(action)))
    assert outcome.status.code == code_pb2.INVALID_ARGUMENT
    assert root.hash in outcome.status.message


def test_timeout_is_deadline_exceeded_with_partial_output(farm):
    started = time.monotonic()
    outcome = farm.run(_sh("echo before; sleep 60"), timeout=1)
    assert time.monotonic() - started < 30
    assert outcome.status.code == code_pb2.DEADLINE_EXCEEDED
    assert farm.text(outcome.result.stdout_digest) == "before\n"


# -- attacks -----------------------------------------------------------------------


def test_action_cannot_reach_host_loopback_service_with_network_off(farm):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        script = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        outcome = farm.run(["/bin/bash", "-c", script])
        assert outcome.result.exit_code != 0
        assert "connected" not in farm.text(outcome.result.stdout_digest)
        server.settimeout(0.2)
        with pytest.raises(OSError):
            server.accept()
    finally:
        server.close()


def test_action_cannot_see_the_cache_home_or_other_builds(farm):
    other = os.path.join(farm.build_root, "other-action")
    os.makedirs(other)
    paths = [farm.cache_dir, farm.build_root, other, "/root", "/home", farm.top]
    script = "; ".join(f"test -e '{p}' && echo visible:{p}" for p in paths) + "; true"
    outcome = farm.run(_sh(script))
    assert outcome.status.code == code_pb2.OK
    assert farm.text(outcome.result.stdout_digest) == ""


def test_an_action_s_change_to_a_hardlinked_input_never_reaches_the_cache(farm):
    content = b"precious cached bytes\n"
    digest = Digest.of_bytes(content)
    outcome = farm.run(_sh("chmod u+w input; echo corrupted >> input; cat input"), {"input": content})
    # Where the stager makes inputs the action's own (an idmapped overlay) the change is
    # its own view's; elsewhere it is refused (tests/system/test_inputs_edited_in_place.py).
    seen = content + b"corrupted\n" if farm.private_inputs() else content
    assert farm.text(outcome.result.stdout_digest) == seen.decode()
    assert farm.cache.read(digest) == content
    with open(farm.cache.path(digest), "rb") as cached:
        assert Digest.of_bytes(cached.read()) == digest
    assert os.stat(farm.cache.path(digest)).st_mode & 0o777 == 0o644


def test_action_may_replace_an_input_in_its_own_view_without_touching_the_cache(farm):
    content = b"original\n"
    outcome = farm.run(_sh("rm -f input && echo replaced > input && cat input"), {"input": content})
    assert farm.text(outcome.result.stdout_digest) == "replaced\n"
    assert farm.cache.read(Digest.of_bytes(content)) == content


@pytest.mark.parametrize("timeout", [None, 1])
def test_no_process_survives_the_action(farm, timeout):
    marker = f"reapi-daemon-{os.getpid()}-{timeout}"
    script = f"(exec -a {marker} sleep 300 &) ; (setsid sh -c 'exec -a {marker} sleep 300' &); "
    script += "sleep 60" if timeout else "true"
    outcome = farm.run(["/bin/bash", "-c", script], timeout=timeout)
    expected = code_pb2.DEADLINE_EXCEEDED if timeout else code_pb2.OK
    assert outcome.status.code == expected
    survivors = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert survivors == []


def test_output_symlink_to_etc_passwd_is_captured_as_a_symlink(farm):
    outcome = farm.run(["ln", "-s", "/etc/passwd", "leak"], output_paths=["leak"])
    result = outcome.result
    assert [(s.path, s.target) for s in result.output_symlinks] == [("leak", "/etc/passwd")]
    assert not result.output_files


def test_cancelled_action_is_killed_and_reported_cancelled(farm):
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    outcome = farm.executor.execute(farm.action(_sh("sleep 60")), cancel=cancel)
    assert outcome.status.code == code_pb2.CANCELLED
    assert time.monotonic() - started < 10


def test_build_directory_is_removed_after_the_action(farm):
    farm.run(_sh("mkdir -p a/b && touch a/b/c"))
    farm.remover.drain()
    assert _build_dirs(farm) == []


def _build_dirs(farm):
    farm.remover.drain()
    return [n for n in os.listdir(farm.build_root) if n != ".trash" and not n.startswith("streams-")]


def test_sandbox_that_cannot_be_set_up_on_this_host_is_unavailable_and_leaves_no_build_dir(farm):
    import dataclasses

    from reapi_worker.sandbox.request import Bind

    broken = dataclasses.replace(farm.executor._config, extra_ro_binds=(Bind("/nonexistent-reapi-bind", "/opt/x"),))
    farm.executor._config = broken
    outcome = farm.run(["/bin/true"], {"input": b"x"})
    # The worker's own probe sandbox fails the same way: the host's fault, retried elsewhere.
    assert outcome.status.code == code_pb2.UNAVAILABLE
    assert "nonexistent-reapi-bind" in outcome.status.message
    assert _build_dirs(farm) == []
