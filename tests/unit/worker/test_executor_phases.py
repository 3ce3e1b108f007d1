"""The executor pipeline on fakes of our own seams: every phase's failure, the first
error wins, and the worker's own faults are never results.

The store is a real :class:`LocalCAS` in a temporary directory behind :class:`FaultyStore`
(which fails a named method on request), the stager is :class:`FakeStager` (makes the
build directory and the requested directories; inputs are not materialised: every action
here has an empty input root) and the runner is the shipped :class:`FakeRunner`. Real
bubblewrap, real staging and a real CAS server are exercised by tests/system/.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import pytest

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.protos.errors import BoundExceeded, Internal, MissingBlobs, ReapiError, ResourceExhausted, Unavailable
from reapi_worker.sandbox.errors import BubblewrapRefused, SandboxSetupError
from reapi_worker.sandbox.fake import FakeRunner
from reapi_worker.sandbox.request import SandboxRequest
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.uid_pool import UidPool
from reapi_worker.sandbox.usage import ResourceUsage
from reapi_worker.storage.content import LocalContent, PinSet
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.paths import RelPath
from reapi_worker.storage.staging import Owner, StagedInput, Stager
from reapi_worker.worker.platform_properties import PlatformPolicy
from reapi_worker.worker.executor import PHASES, Executor, ExecutorConfig, Outcome, is_sandbox_setup_failure

# -- fakes of our own interfaces ---------------------------------------------------------


class FaultyStore(LocalContent):
    """A LocalCAS that raises ``failures[method]`` from that method (``write_file`` only
    for a file of that base name, given as ``"write_file:NAME"``)."""

    def __init__(self, inner: LocalCAS) -> None:
        self.inner = inner
        self.failures: dict[str, ReapiError] = {}
        self.uploaded: set[Digest] = set()

    def _maybe_fail(self, what: str) -> None:
        if what in self.failures:
            raise self.failures[what]

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        return self.inner.find_missing(digests)

    def read(self, digest: Digest) -> bytes:
        return self.inner.read(digest)

    def write(self, data: bytes) -> Digest:
        return self.inner.write(data)

    def write_file(self, path: str | os.PathLike[str]) -> Digest:
        self._maybe_fail(f"write_file:{os.path.basename(path)}")
        return self.inner.write_file(path)

    def path(self, digest: Digest, executable: bool = False) -> str:
        return self.inner.path(digest, executable)

    def fetch(self, digests: Iterable[Digest]) -> None:
        self.inner.fetch(digests)

    def pinned(self, digests: Iterable[Digest]) -> contextlib.AbstractContextManager[None]:
        return self.inner.pinned(digests)

    def object_path(self, digest: Digest, executable: bool = False) -> str:
        return self.inner.object_path(digest, executable)

    def pin_set(self) -> PinSet:
        return self.inner.pin_set()

    def insert(self, digest: Digest, data: bytes) -> None:
        self.inner.insert(digest, data)

    def insert_stream(self, digest: Digest, stream: BinaryIO, *, stream_verifies: bool = False) -> None:
        self.inner.insert_stream(digest, stream, stream_verifies=stream_verifies)

    def fetch_tree(self, root: Digest) -> None:
        self._maybe_fail("fetch_tree")
        self.inner.fetch_tree(root)

    def upload_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        self._maybe_fail("upload_missing")
        self.uploaded |= set(digests)
        return set()


class FakeStaged(StagedInput):
    def __init__(self, stager: FakeStager, path: str) -> None:
        self.path = path
        self._stager = stager

    def check(self) -> None:
        if self._stager.check_error is not None:
            raise self._stager.check_error

    def close(self) -> None:
        if not self._stager.keep_build_dir:
            shutil.rmtree(self.path, ignore_errors=True)
        self._stager.open -= 1


class FakeStager(Stager):
    """Makes ``build_dir`` and the requested directories (the input root is empty);
    raises ``stage_error`` instead when set. ``open`` counts staged inputs not yet closed;
    ``check_error`` is what the staged input's ``check`` raises (a lazy fetch that failed).
    ``keep_build_dir``: closing leaves the build directory in place (a stuck mount).
    ``owners``: the owner of each staging, in order."""

    def __init__(self) -> None:
        self.stage_error: BaseException | None = None
        self.check_error: ReapiError | None = None
        self.keep_build_dir = False
        self.owners: list[Owner | None] = []
        self.open = 0

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        self.owners.append(owner)
        if self.stage_error is not None:
            raise self.stage_error
        os.makedirs(build_dir)
        for parts in directories:
            os.makedirs(os.path.join(build_dir, *parts), exist_ok=True)
        self.open += 1
        return FakeStaged(self, build_dir)


def ran(exit_code: int = 0, *, timed_out: bool = False, cancelled: bool = False) -> SandboxResult:
    return SandboxResult(
        exit_code=exit_code, signal=9 if timed_out else None, timed_out=timed_out, cancelled=cancelled,
        oom_killed=False, usage=ResourceUsage(wall_seconds=0.0),
    )


def write_stdout(request: SandboxRequest, text: bytes) -> None:
    with open(request.stdout_path, "wb") as stream:
        stream.write(text)


def output(request: SandboxRequest, name: str) -> str:
    """Host path of ``name`` in the request's input root."""
    return os.path.join(request.input_root, name)


# -- the rig -------------------------------------------------------------------------------


class Rig:
    def __init__(self, store: FaultyStore, stager: FakeStager, build_root: str) -> None:
        self.store = store
        self.stager = stager
        self.build_root = build_root
        self.respond = lambda request: 0
        self.runner = FakeRunner(lambda request: self.respond(request))
        self.executor = Executor(store, stager, self.runner, ExecutorConfig(build_root=build_root, worker_name="w"))

    def action(self, output_file: str = "out", timeout: float | None = None, network: str | None = None) -> Digest:
        # output_files (not output_paths) so that a directory in its place is an error.
        command = re_pb2.Command(arguments=["cmd"], output_files=[output_file])
        root = self.store.write(serialize(re_pb2.Directory()))
        action = re_pb2.Action(command_digest=self.store.write(serialize(command)).to_proto(), input_root_digest=root.to_proto())
        if network is not None:
            action.platform.properties.add(name="network", value=network)
        if timeout is not None:
            action.timeout.FromNanoseconds(int(timeout * 1e9))
        return self.store.write(serialize(action))

    def execute(self, digest: Digest, cancel: threading.Event | None = None) -> Outcome:
        outcome = self.executor.execute(digest, cancel=cancel)
        # Whatever happened, nothing staged is left open.
        assert self.stager.open == 0
        return outcome


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    with LocalCAS(str(tmp_path / "cache"), max_bytes=1 << 30) as cache:
        yield Rig(FaultyStore(cache), FakeStager(), str(tmp_path / "builds"))


def assert_failed(outcome: Outcome, code: int, phase: str) -> None:
    assert code_pb2.Code.Name(outcome.status.code) == code_pb2.Code.Name(code), outcome.status.message
    assert outcome.failed_phase == phase
    # Every phase before the failed one finished (and was timed).
    assert list(outcome.phases)[: PHASES.index(phase)] == list(PHASES[: PHASES.index(phase)])


# -- success -------------------------------------------------------------------------------


def test_a_non_zero_exit_is_an_ok_result_with_its_outputs(rig):
    def respond(request):
        write_stdout(request, b"said")
        with open(output(request, "out"), "wb") as stream:
            stream.write(b"made")
        return 3

    rig.respond = respond
    outcome = rig.execute(rig.action())
    assert outcome.ok and outcome.failed_phase is None
    assert outcome.result.exit_code == 3
    assert list(outcome.phases) == list(PHASES)
    [made] = outcome.result.output_files
    assert (made.path, rig.store.read(Digest.from_proto(made.digest))) == ("out", b"made")
    assert rig.store.read(Digest.from_proto(outcome.result.stdout_digest)) == b"said"
    assert {Digest.from_proto(made.digest), Digest.from_proto(outcome.result.stdout_digest)} <= rig.store.uploaded
    assert outcome.result.execution_metadata.worker == "w"


# -- each phase's failure --------------------------------------------------------------------


def test_fetch_an_absent_action_is_missing_blobs_naming_it(rig):
    absent = Digest.of_bytes(b"no such action")
    outcome = rig.execute(absent)
    assert_failed(outcome, code_pb2.FAILED_PRECONDITION, "fetch")
    assert absent.hash in outcome.status.message
    assert rig.runner.requests == []


def test_attack_network_on_is_refused_by_default_naming_the_property_before_anything_runs(rig):
    outcome = rig.execute(rig.action(network="on"))
    assert_failed(outcome, code_pb2.INVALID_ARGUMENT, "fetch")
    assert "network=on" in outcome.status.message
    assert rig.runner.requests == []
    assert rig.execute(rig.action(network="off")).ok


def test_network_on_reaches_the_runner_when_the_operator_allows_it(rig):
    rig.executor = Executor(rig.store, rig.stager, rig.runner, ExecutorConfig(build_root=rig.build_root, platform=PlatformPolicy(allow_network=True)))
    assert rig.execute(rig.action(network="on")).ok
    assert [request.network for request in rig.runner.requests] == [True]


def test_fetch_the_input_tree_from_an_unreachable_cas_is_unavailable(rig):
    rig.store.failures["fetch_tree"] = Unavailable("CAS down")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "fetch")
    assert rig.runner.requests == []


def test_stage_missing_blobs_fail_the_stage_phase(rig):
    blob = Digest.of_bytes(b"input")
    rig.stager.stage_error = MissingBlobs([blob], "staging input root")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.FAILED_PRECONDITION, "stage")
    assert blob.hash in outcome.status.message
    assert rig.runner.requests == []


def test_a_bug_in_a_stager_costs_the_action_internal_and_never_raises(rig):
    rig.stager.stage_error = RuntimeError("a bug")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.INTERNAL, "stage")
    assert "a bug" in outcome.status.message


def test_run_a_sandbox_that_cannot_be_set_up_on_this_host_is_unavailable_from_the_run_phase(rig):
    # Every sandbox fails, the worker's own probe's too: the host is broken, retry elsewhere.
    requests = []

    def respond(request):
        requests.append(request)
        raise BubblewrapRefused("bwrap: no permission")

    rig.respond = respond
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "run")
    assert "bwrap: no permission" in outcome.status.message
    assert is_sandbox_setup_failure(outcome)
    assert len(requests) == 2 and requests[1].arguments == ("/bin/true",)  # the action's, then the probe's


def test_run_a_sandbox_only_the_action_breaks_is_invalid_argument_and_no_host_failure(rig):
    # The probe sandbox works: what differs is the action, so the client gets the answer.
    def respond(request):
        if "health-probe-" in request.input_root:
            return ran(0)
        raise BubblewrapRefused("bwrap: Can't mkdir /proc: Read-only file system")

    rig.respond = respond
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.INVALID_ARGUMENT, "run")
    assert "the action's sandbox could not be set up" in outcome.status.message
    assert "Can't mkdir /proc" in outcome.status.message
    assert not is_sandbox_setup_failure(outcome)


def test_run_a_host_side_set_up_failure_is_unavailable_and_never_blamed_on_the_action(rig):
    # A cgroup that cannot be made, a spawn that failed: the host's, even if a probe passes.
    requests = []

    def respond(request):
        requests.append(request)
        if "health-probe-" in request.input_root:
            return ran(0)
        raise SandboxSetupError("cannot start bubblewrap: [Errno 11] Resource temporarily unavailable")

    rig.respond = respond
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "run")
    assert "Resource temporarily unavailable" in outcome.status.message
    assert len(requests) == 1  # no probe is asked to blame the action


def test_run_a_timeout_is_deadline_exceeded_keeping_what_the_command_wrote(rig):
    def respond(request):
        write_stdout(request, b"partial")
        return ran(137, timed_out=True)

    rig.respond = respond
    outcome = rig.execute(rig.action(timeout=5))
    assert_failed(outcome, code_pb2.DEADLINE_EXCEEDED, "run")
    assert "5 s" in outcome.status.message
    assert rig.store.read(Digest.from_proto(outcome.result.stdout_digest)) == b"partial"
    assert not is_sandbox_setup_failure(outcome)


def test_run_cancelled_is_cancelled(rig):
    cancel = threading.Event()

    def respond(request):
        cancel.set()
        return ran(137, cancelled=True)

    rig.respond = respond
    outcome = rig.execute(rig.action(), cancel)
    assert_failed(outcome, code_pb2.CANCELLED, "run")


def test_a_lazily_staged_input_that_could_not_be_read_fails_the_fetch_phase(rig):
    rig.stager.check_error = Unavailable("fetching blob abc: CAS down")
    outcome = rig.execute(rig.action())
    assert code_pb2.Code.Name(outcome.status.code) == "UNAVAILABLE"
    assert outcome.failed_phase == "fetch"
    assert outcome.result.HasField("stdout_digest")  # kept, for whoever debugs it


def test_upload_capturing_an_output_of_the_wrong_kind_fails_the_upload_phase(rig):
    rig.respond = lambda request: os.mkdir(output(request, "out")) or 0
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.FAILED_PRECONDITION, "upload")
    assert "'out'" in outcome.status.message


def test_upload_of_outputs_the_worker_s_cache_lost_meanwhile_is_unavailable_never_failed_precondition(rig):
    # Evicted between capture and upload (a full disk): a retry elsewhere, not a result.
    rig.store.failures["upload_missing"] = MissingBlobs({Digest.of_bytes(b"out")}, "uploading to the remote CAS")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")
    assert "lost outputs before they were uploaded" in outcome.status.message


def test_upload_to_an_unreachable_cas_is_unavailable(rig):
    rig.store.failures["upload_missing"] = Unavailable("CAS down")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")


def test_upload_storing_stdout_on_a_broken_disk_is_internal(rig):
    rig.store.failures["write_file:stdout"] = Internal("disk gone")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.INTERNAL, "upload")
    assert not is_sandbox_setup_failure(outcome)


# -- the first error wins --------------------------------------------------------------------


def timed_out_leaving_a_directory_as_out(request: SandboxRequest) -> SandboxResult:
    os.mkdir(output(request, "out"))
    return ran(137, timed_out=True)


def test_a_capture_error_after_a_timeout_does_not_replace_deadline_exceeded(rig):
    rig.respond = timed_out_leaving_a_directory_as_out
    outcome = rig.execute(rig.action(timeout=5))
    assert_failed(outcome, code_pb2.DEADLINE_EXCEEDED, "run")
    assert "timed out" in outcome.status.message
    assert "'out'" in outcome.status.message  # the later error is told, not lost


def test_an_upload_error_after_a_timeout_does_not_replace_deadline_exceeded(rig):
    rig.respond = lambda request: ran(137, timed_out=True)
    rig.store.failures["upload_missing"] = Unavailable("CAS down")
    outcome = rig.execute(rig.action(timeout=5))
    assert_failed(outcome, code_pb2.DEADLINE_EXCEEDED, "run")
    assert "CAS down" in outcome.status.message


# -- the worker's own faults are never results (worker/faults.py) ----------------------------


def test_a_full_cache_while_storing_stdout_is_unavailable_not_a_result(rig: Rig):
    rig.respond = lambda request: write_stdout(request, b"half an output") or 1
    rig.store.failures["write_file:stdout"] = ResourceExhausted("storing blob: No space left on device (local CAS at /c)")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")
    assert "No space left on device" in outcome.status.message


def test_a_full_remote_cas_at_upload_is_unavailable(rig: Rig):
    rig.store.failures["upload_missing"] = ResourceExhausted("CAS quota exceeded")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "upload")


def test_staging_that_met_enospc_is_unavailable(rig: Rig):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise Internal("staging input root into /b/1: [Errno 28] No space left on device") from None
    except Internal as error:
        rig.stager.stage_error = error
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "stage")


def test_an_enospc_escaping_as_a_bare_oserror_is_unavailable(rig: Rig):
    rig.stager.stage_error = OSError(errno.ENOSPC, "No space left on device", "/b/1")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "stage")


def test_an_action_past_its_bound_is_resource_exhausted_with_its_run_kept(rig: Rig):
    rig.respond = lambda request: write_stdout(request, b"wrote a lot") or 2
    rig.stager.check_error = BoundExceeded("the action went past its build directory bound of 1 GiB")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.RESOURCE_EXHAUSTED, "run")
    assert "build directory bound" in outcome.status.message
    assert outcome.result.exit_code == 2 and outcome.result.HasField("stdout_digest")


# -- one host uid per action ---------------------------------------------------------------


def pooled(rig: Rig, size: int) -> UidPool:
    pool = UidPool(range(300000, 300000 + size))
    rig.executor = Executor(rig.store, rig.stager, rig.runner, ExecutorConfig(build_root=rig.build_root), identities=pool)
    return pool


def test_each_action_stages_and_runs_as_a_uid_of_the_pool_given_back_when_its_build_directory_is_gone(rig):
    pool = pooled(rig, 2)
    seen: list = []

    def respond(request):
        seen.append(request.run_as)
        open(output(request, "out"), "w").close()
        return 0

    rig.respond = respond
    for _ in range(3):
        assert rig.execute(rig.action()).ok
    assert [(r.uid, r.gid) for r in seen] == [(300000, 300000), (300001, 300001), (300000, 300000)]
    assert [(o.uid, o.gid) for o in rig.stager.owners if o is not None] == [(r.uid, r.gid) for r in seen]
    assert pool.free == 2


def test_a_build_directory_left_in_place_retires_its_uid_and_the_action_keeps_its_result(rig):
    pool = pooled(rig, 2)
    rig.respond = lambda request: open(output(request, "out"), "w").close() or 0
    rig.stager.keep_build_dir = True
    assert rig.execute(rig.action()).ok
    assert pool.retired == {300000} and pool.free == 1


def test_a_pool_with_no_uid_free_fails_the_action_unavailable_before_staging(rig):
    pool = pooled(rig, 1)
    pool.lease()  # held by another action
    rig.respond = lambda request: pytest.fail("nothing may run")
    outcome = rig.execute(rig.action())
    assert_failed(outcome, code_pb2.UNAVAILABLE, "stage")
    assert "no sandbox uid free" in outcome.status.message and rig.stager.owners == []
