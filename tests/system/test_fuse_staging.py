"""FUSE staging beyond the shared executor suite: laziness, failures, lifecycle, isolation.

Real FUSE mounts, real overlays, real bubblewrap; the remote CAS is the in-process fake
(:mod:`fakes.cas_server`) behind a real FetchThroughStore. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from conftest import REPO, require, require_tool
import executor_fixtures
from executor_fixtures import FUSE_BACKENDS, Farm, make_farm, shared_fuse_mount
from fakes.cas_server import FakeCasServer

from reapi_worker.protos import code_pb2, error_details_pb2, re_pb2
from reapi_worker.storage.channels import ConnectionOptions, open_channel
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fetch_through import FetchThroughStore
from reapi_worker.storage.fuse import kernel_requests, kernel_mounts, operations
from reapi_worker.storage.remote_cas import RemoteCAS, RemoteOptions
from reapi_worker.storage.retry import RetryPolicy


def require_fuse() -> None:
    require_tool("bwrap")
    require_tool("fusermount3")
    require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE staging needs root and /dev/fuse")


@pytest.fixture(autouse=True, scope="module", params=FUSE_BACKENDS)
def backend(request) -> Iterator[str]:
    """Every test here runs on each FUSE backend (storage/fuse/mount.py)."""
    executor_fixtures.fuse_backend = request.param
    yield request.param
    executor_fixtures.fuse_backend = "auto"


def patch_open_local(monkeypatch, replacement) -> None:  # type: ignore[no-untyped-def]
    """Make both backends open cached blobs with ``replacement``."""
    monkeypatch.setattr(operations, "_open_local", replacement)
    monkeypatch.setattr(kernel_requests, "open_local", replacement)


def end_serving_loop(mount) -> None:  # type: ignore[no-untyped-def]
    """From a request handler: make the mount's serving thread end, as a crash would."""
    if mount.backend_in_use.startswith("kernel"):
        mount._session.kernel.stop()
    else:
        operations.pyfuse3.terminate()


@pytest.fixture
def farm() -> Iterator[Farm]:
    require_fuse()
    farm = make_farm(max_action_timeout=30, staging="fuse")
    yield farm
    farm.close()
    assert kernel_mounts.mounts_under(farm.top) == []


class RemoteFarm:
    """A FUSE farm whose executor reads through a FetchThroughStore from a fake remote CAS
    holding the input trees (the local cache starts empty of them)."""

    def __init__(self, fetch_timeout: float = 60.0) -> None:
        self.server = FakeCasServer(tree_page_size=1000, tree_pages_per_call=100)
        address = self.server.start()
        self.channel = open_channel(ConnectionOptions(url=f"grpc://{address}"))
        # Few, quick retries: a stalled call is bounded by our fetch deadline, not these.
        options = RemoteOptions(retry=RetryPolicy(max_attempts=2, initial_backoff=0.05), call_timeout=30)
        self.remote = RemoteCAS(self.channel, options)
        self.stores: list[FetchThroughStore] = []

        def wrap(cache):  # type: ignore[no-untyped-def]
            store = FetchThroughStore(cache, self.remote)
            self.stores.append(store)
            return store

        self.farm = make_farm(max_action_timeout=30, staging="fuse", wrap_cache=wrap, fetch_timeout=fetch_timeout)
        self.store = self.stores[0]

    def remote_tree(self, files: dict[str, bytes], leave_out: set[Digest] = set()) -> Digest:
        """Put a tree's protos and blobs, but ``leave_out``, into the remote only."""
        memory = MemoryStore()
        tree = CasDirectory.empty(memory)
        for path, data in files.items():
            parent = path.rpartition("/")[0]
            if parent:
                tree.mkdir(parent)
            tree.write_bytes(path, data)
        root = tree.digest()
        for digest in memory:
            if digest not in leave_out:
                self.server.put_raw(digest, memory.read(digest))
        return root

    def action(self, script: str, root: Digest, **command_fields: object) -> Digest:
        command = re_pb2.Command(arguments=["/bin/sh", "-c", script], **command_fields)  # type: ignore[arg-type]
        command.environment_variables.add(name="PATH", value="/usr/bin:/bin")
        action = re_pb2.Action(command_digest=self.farm.cache.write(serialize(command)).to_proto(),
                               input_root_digest=root.to_proto(), do_not_cache=True)
        return self.farm.cache.write(serialize(action))

    def close(self) -> None:
        self.server.release_stall()
        self.farm.close()
        self.remote.close()
        self.channel.close()
        self.server.stop()


@pytest.fixture
def remote_farm() -> Iterator[RemoteFarm]:
    require_fuse()
    farm = RemoteFarm(fetch_timeout=2.0)
    yield farm
    farm.close()


def _tree(files: int, size: int = 2048) -> dict[str, bytes]:
    """``files`` distinct files, 20 per leaf directory, 10 leaves per parent (docs/measured.md's shape)."""
    return {f"p{i // 200:03d}/d{i // 20 % 10}/f{i % 20:02d}": (b"%08d" % i) * (size // 8) for i in range(files)}


# -- laziness ---------------------------------------------------------------------------


def test_reading_one_percent_of_a_20000_file_tree_fetches_only_those_blobs(remote_farm):
    files = _tree(20_000)
    root = remote_farm.remote_tree(files)
    remote_farm.store.fetch_tree(root)  # the Directory protos (the executor would do it too)
    before = remote_farm.store.stats().blobs_fetched
    wanted = sorted(files)[::100]
    assert len(wanted) == 200
    outcome = remote_farm.farm.executor.execute(remote_farm.action("cat " + " ".join(wanted) + " | wc -c", root))
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert remote_farm.farm.text(outcome.result.stdout_digest).strip() == str(200 * 2048)
    assert remote_farm.store.stats().blobs_fetched - before == 200


def test_an_output_that_is_an_unmodified_input_is_captured_without_reading_it(remote_farm):
    files = {"src/big.bin": os.urandom(256 * 1024), "src/other": b"other\n"}
    root = remote_farm.remote_tree(files)
    remote_farm.store.fetch_tree(root)
    before = remote_farm.store.stats().blobs_fetched
    outcome = remote_farm.farm.executor.execute(
        remote_farm.action("cp src/other src/copy", root, output_paths=["src"]))
    assert outcome.status.code == code_pb2.OK, outcome.status
    tree = re_pb2.Tree.FromString(remote_farm.store.read(Digest.from_proto(outcome.result.output_directories[0].tree_digest)))
    by_name = {f.name: Digest.from_proto(f.digest) for f in tree.root.files}
    assert by_name["big.bin"] == Digest.of_bytes(files["src/big.bin"])
    assert by_name["copy"] == by_name["other"] == Digest.of_bytes(b"other\n")
    # "other" was read by cp; "big.bin" was never fetched, though it is an output.
    assert remote_farm.store.stats().blobs_fetched - before == 1


def test_blobs_read_through_the_mount_count_as_used_for_the_cache_lru():
    require_fuse()
    farm = make_farm(staging="fuse", cache_recency=0.0)  # record every use, however recent
    try:
        _check_lru_use_is_recorded(farm)
    finally:
        farm.close()


def _check_lru_use_is_recorded(farm: Farm) -> None:
    content = b"read only through FUSE\n"
    action = farm.action(["/bin/sh", "-c", "wc -c < input"], {"input": content})
    digest = Digest.of_bytes(content)
    os.utime(farm.cache.path(digest), (1, 1))  # as if last used in 1970: first to evict
    outcome = farm.executor.execute(action)
    assert farm.text(outcome.result.stdout_digest) == f"{len(content)}\n"
    assert os.stat(farm.cache.path(digest)).st_mtime > 1


# -- failures ---------------------------------------------------------------------------


def test_missing_inputs_found_lazily_are_failed_precondition_naming_every_one_touched(remote_farm):
    """Nothing is checked before the command (storage/fuse/stager.py's trade-off): the
    inputs it opens that neither CAS holds are named together, the untouched one is not."""
    gone = {name: Digest.of_bytes(data) for name, data in (("a", b"alpha\n"), ("sub/b", b"beta\n"), ("z", b"zeta\n"))}
    root = remote_farm.remote_tree({"a": b"alpha\n", "sub/b": b"beta\n", "sub/c": b"gamma\n", "z": b"zeta\n"},
                                   leave_out=set(gone.values()))
    outcome = remote_farm.farm.executor.execute(
        remote_farm.action("cat a; cat sub/b; cat sub/c; echo exit=$?", root))
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    failure = error_details_pb2.PreconditionFailure()
    assert outcome.status.details[0].Unpack(failure)
    named = {violation.subject for violation in failure.violations}
    assert named == {f"blobs/{gone[n].hash}/{gone[n].size_bytes}" for n in ("a", "sub/b")}
    assert remote_farm.farm.text(outcome.result.stdout_digest) == "gamma\nexit=0\n"  # the present one was read


def test_a_remote_cas_that_stops_answering_mid_read_gives_eio_and_a_failed_action(remote_farm):
    files = {"a": b"first blob\n", "b": b"second blob\n"}
    root = remote_farm.remote_tree(files)
    remote_farm.store.fetch_tree(root)
    remote_farm.server.stall_reads_after(1)  # "a" arrives, then the server hangs
    outcome = remote_farm.farm.executor.execute(remote_farm.action("cat a; cat b; echo exit=$?", root))
    stdout = remote_farm.farm.text(outcome.result.stdout_digest)
    stderr = remote_farm.farm.text(outcome.result.stderr_digest)
    assert stdout == "first blob\nexit=1\n"
    assert "Input/output error" in stderr
    assert outcome.status.code == code_pb2.UNAVAILABLE, outcome.status
    assert Digest.of_bytes(files["b"]).hash in outcome.status.message
    assert "no answer within 2 s" in outcome.status.message


def test_a_bug_in_the_file_system_fails_the_action_with_eio_and_the_mount_lives_on(farm, monkeypatch):
    def broken(store, digest):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected bug")

    patch_open_local(monkeypatch, broken)
    outcome = farm.run(["/bin/sh", "-c", "cat input; echo exit=$?"], {"input": b"x\n"})
    assert farm.text(outcome.result.stdout_digest) == "exit=1\n"
    assert outcome.status.code == code_pb2.INTERNAL
    assert "injected bug" in outcome.status.message
    monkeypatch.undo()
    outcome = farm.run(["/bin/cat", "input"], {"input": b"fine\n"})
    assert (outcome.status.code, farm.text(outcome.result.stdout_digest)) == (code_pb2.OK, "fine\n")


def test_a_file_system_thread_that_dies_mid_action_fails_it_and_the_next_action_remounts(farm, monkeypatch):
    mount = shared_fuse_mount()
    original = operations._open_local
    assert mount.backend_in_use == executor_fixtures.fuse_backend

    def die_after_this_open(store, digest):  # type: ignore[no-untyped-def]
        end_serving_loop(mount)  # we are in the FUSE thread: end its loop
        return original(store, digest)

    patch_open_local(monkeypatch, die_after_this_open)
    outcome = farm.run(["/bin/sh", "-c", "cat a; cat b/c; echo exit=$?"], {"a": b"a\n", "b/c": b"c\n"})
    monkeypatch.undo()
    assert outcome.status.code == code_pb2.INTERNAL, outcome.status
    assert "input file system" in outcome.status.message
    assert farm.text(outcome.result.stdout_digest).endswith("exit=1\n")
    assert kernel_mounts.mounts_under(farm.build_root) == []
    outcome = farm.run(["/bin/cat", "a"], {"a": b"again\n"})
    assert (outcome.status.code, farm.text(outcome.result.stdout_digest)) == (code_pb2.OK, "again\n")
    assert mount.alive


# -- isolation --------------------------------------------------------------------------


def test_concurrent_actions_each_see_their_own_writable_view(farm):
    inputs = {"shared.txt": b"original\n", "dir/keep": b"keep\n"}
    digest = Digest.of_bytes(b"original\n")
    outcomes = {}

    def one(i: int) -> None:
        script = (f"cat shared.txt; rm -f shared.txt dir/keep; echo action-{i} > shared.txt; mkdir out; "
                  f"echo {i} > out/mine; sleep 0.3; cat shared.txt; ls -A dir | wc -l; ls out")
        outcomes[i] = farm.run(["/bin/sh", "-c", script], inputs, output_paths=["shared.txt", "out"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i, outcome in outcomes.items():
        assert outcome.status.code == code_pb2.OK, outcome.status
        assert farm.text(outcome.result.stdout_digest) == f"original\naction-{i}\n0\nmine\n"
        assert farm.cache.read(Digest.from_proto(outcome.result.output_files[0].digest)) == f"action-{i}\n".encode()
    assert len(outcomes) == 4
    assert farm.cache.read(digest) == b"original\n"
    farm.remover.drain()
    assert kernel_mounts.mounts_under(farm.build_root) == []
    assert [n for n in os.listdir(farm.build_root) if not n.startswith(".")] == []
    assert shared_fuse_mount().open_files() == 0


# -- lifecycle --------------------------------------------------------------------------

_HOLDER = textwrap.dedent('''
    import os, sys, time
    from reapi_worker.storage.directory.cas import CasDirectory
    from reapi_worker.storage.fuse import FuseMount, FuseStager
    from reapi_worker.storage.local_cas import LocalCAS
    from reapi_worker.storage.staging import Owner, TreeRemover
    top = sys.argv[1]
    cache = LocalCAS(os.path.join(top, "cache"))
    tree = CasDirectory.empty(cache)
    tree.mkdir("src")
    tree.write_bytes("src/a", b"a")
    root = CasDirectory.from_digest(cache, tree.digest())
    remover = TreeRemover(os.path.join(top, "builds", ".trash"))
    mount = FuseMount(os.path.join(top, "fuse"), backend=sys.argv[3]).open()
    stager = FuseStager(cache, remover, mount, os.path.join(top, "builds"))
    staged = stager.stage(root, os.path.join(top, "builds", "action"), [("out",)], Owner(65534, 65534))
    assert open(os.path.join(staged.path, "src", "a")).read() == "a"
    if sys.argv[2] == "hold":
        print("ready", flush=True)
        time.sleep(600)
    staged.close()
    remover.drain()
    mount.close()
    print("restarted", flush=True)
''')


def test_kill_9_of_a_worker_holding_a_mount_leaves_no_mount_after_restart(tmp_path, backend):
    require_fuse()
    top = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, top, "hold", backend], stdout=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(60, holder.kill)  # a hung holder ends the readline below
    watchdog.start()
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        assert len(kernel_mounts.mounts_under(top)) == 2  # the FUSE mount and the overlay
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        watchdog.cancel()
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert len(kernel_mounts.mounts_under(top)) == 2  # stale: nobody serves them any more
    restart = subprocess.run([sys.executable, "-c", _HOLDER, top, "once", backend], capture_output=True, text=True,
                             timeout=60, env=env)
    assert restart.stdout == "restarted\n", restart.stderr
    assert kernel_mounts.mounts_under(top) == []
    assert sorted(n for n in os.listdir(os.path.join(top, "builds")) if not n.startswith(".")) == []
