"""The executor seam: :class:`ActionExecutor` (its contract), :class:`Outcome` (what it
returns) and :class:`Executor` (the one that does the work: fetch inputs, stage, run in the
sandbox, capture outputs). Wrappers that count or watch outcomes (``metrics.py``,
``health/monitor.py``) implement the same interface around it; the composition root stacks them.

The phases are named after the REAPI timestamps they fill in ``ExecutedActionMetadata``:
input fetch (Action, Command, the input tree, its blobs, staging), execution (the sandbox),
output upload (capture into the local CAS, upload what the remote lacks). For logs and
metrics the input fetch is timed in two parts, ``fetch`` and ``stage`` (see :data:`PHASES`).

:meth:`Executor.execute` never raises: every problem becomes the ``status`` of the
:class:`Outcome`, a bad action never takes the worker down, and a non-zero exit code is a
normal, successful result. The first error wins (Buildbarn's rule): once a status is set —
a timeout's DEADLINE_EXCEEDED, say — a later error (capturing or uploading what the
command left) only adds to its message, so the client learns why the action really failed.
A fault of the worker's own (out of space, ...) is UNAVAILABLE, never a result
(worker/faults.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from reapi_worker.protos import code_pb2, execution_stats_pb2, re_pb2, status_pb2
from reapi_worker.protos.errors import BoundExceeded, Internal, InvalidArgument, MissingBlobs, ReapiError, Unavailable
from reapi_worker.sandbox.errors import BubblewrapRefused, SandboxSetupError
from reapi_worker.sandbox.identity import RunAs, default_run_as
from reapi_worker.sandbox.probe import runner_probe
from reapi_worker.sandbox.request import Bind, ResourceLimits, SandboxRequest, SubtreeAccess
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.runner import Runner
from reapi_worker.sandbox.uid_pool import SharedUid, UidLease, UidSource
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.staging import Owner, Stager
from reapi_worker.storage.writable_inputs import copy_writable_inputs

from .action import ActionSpec, PlatformPolicy, load_action, parse_message
from .bounds import CaptureDeadline, bound_status
from .faults import lease_status, worker_resource_cause
from .outputs import capture_outputs
from .sandbox_tree import InputRootRules

log = logging.getLogger(__name__)

#: The phases an :class:`Outcome` times, in order: ``fetch`` (Action, Command and input tree
#: into the local CAS), ``stage`` (the input root made a directory), ``run`` (the sandbox),
#: ``upload`` (outputs captured and sent). ``fetch`` + ``stage`` span REAPI's input fetch.
PHASES = ("fetch", "stage", "run", "upload")


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """The operator's settings for running actions.

    ``build_root``: where per-action directories are made (same file system as the cache,
    so hardlinks work). ``max_action_timeout``: caps ``Action.timeout`` and applies when the
    action gives none. ``limits``: per-action resource limits; ``capture_timeout``:
    seconds to capture and upload the outputs (see :mod:`.bounds`).
    ``platform``: the default root mode, the platform keys accepted besides the worker's
    own, and whether ``network=on`` is allowed (the runner must then have an outbound NAT).
    ``max_output_bytes``: bound on the new file content one action's outputs may store
    (None: unbounded).
    """

    build_root: str
    worker_name: str = ""
    max_action_timeout: float = 3600.0
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    extra_ro_binds: tuple[Bind, ...] = ()
    capture_timeout: float | None = None
    platform: PlatformPolicy = field(default_factory=PlatformPolicy)
    max_output_bytes: int | None = None


@dataclass(slots=True)
class Outcome:
    """What an execution produced: the status a lease reports and the ActionResult (which
    may be partial, e.g. after a timeout). ``phases`` holds the duration in seconds of each
    phase that finished (names from :data:`PHASES`), for logs and metrics.
    ``failed_phase``: when the status is not OK, the phase it came from (a name from
    :data:`PHASES`: ``run`` for a timeout, a cancellation or a sandbox that could not be set
    up); ``None`` when the status is OK."""

    status: status_pb2.Status
    result: re_pb2.ActionResult
    phases: dict[str, float] = field(default_factory=dict)
    failed_phase: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.code == code_pb2.OK


def is_sandbox_setup_failure(outcome: Outcome) -> bool:
    """Whether an execution failed because its sandbox could not be set up on this host:
    UNAVAILABLE (a SandboxSetupError the worker's own probe sandbox confirmed, see
    :meth:`Executor._run`) or INTERNAL (a bug) from the run phase. A set-up failure the
    action caused is INVALID_ARGUMENT and not one of these; a command that runs and fails
    is not an error."""
    return outcome.status.code in (code_pb2.UNAVAILABLE, code_pb2.INTERNAL) and outcome.failed_phase == "run"


class ActionExecutor(Protocol):
    """Execute one Action; the seam between the lease runner and everything below it.

    Contract, for the executor and every wrapper of it:

    * ``execute`` never raises: whatever goes wrong is the returned :class:`Outcome`'s
      status (an infrastructure fault as UNAVAILABLE, so the scheduler retries it); a
      non-zero exit code is an OK status;
    * ``action`` is the Action when the caller already holds it (a lease payload), else
      ``None`` and it is read from the CAS by ``action_digest``;
    * ``cancel``: once set, the run is killed and the outcome's status is CANCELLED; the
      caller owns the event;
    * thread-safe: one executor serves every lease at once, each on its own thread.
    """

    def execute(
        self, action_digest: Digest, action: re_pb2.Action | None = None, cancel: threading.Event | None = None
    ) -> Outcome: ...


class Executor:
    """The :class:`ActionExecutor` that does the work, with the given store, stager and
    runner. Thread-safe: the bot calls :meth:`execute` from several threads at once, one per
    lease.

    ``identities``: where each action gets the host uid/gid its sandbox runs as and its
    build directory belongs to, held from staging until the build directory is gone (a
    :class:`~reapi_worker.sandbox.uid_pool.UidPool`: one uid per concurrent action). A
    pool with none free fails the action UNAVAILABLE (the worker's shortage, retried
    elsewhere). ``None``: every action shares the runner's automatic identity
    (:func:`~reapi_worker.sandbox.identity.default_run_as`)."""

    def __init__(
        self,
        store: LocalContent,
        stager: Stager,
        runner: Runner,
        config: ExecutorConfig,
        clock: Callable[[], float] = time.time,
        identities: UidSource | None = None,
    ) -> None:
        self._store = store
        self._stager = stager
        self._runner = runner
        self._config = config
        self._clock = clock
        self._identities = identities if identities is not None else SharedUid(default_run_as())
        self._input_root_rules = InputRootRules(config.extra_ro_binds)
        os.makedirs(config.build_root, exist_ok=True)

    def execute(
        self, action_digest: Digest, action: re_pb2.Action | None = None, cancel: threading.Event | None = None
    ) -> Outcome:
        """Execute the Action (``action`` if the caller already has it, e.g. from a lease
        payload; else read by digest). See the module docstring: never raises."""
        outcome = Outcome(status=status_pb2.Status(code=code_pb2.OK), result=re_pb2.ActionResult())
        metadata = outcome.result.execution_metadata
        metadata.worker = self._config.worker_name
        try:
            self._execute(action_digest, action, cancel, outcome)
        except ReapiError as error:
            # The worker's own faults (out of space, ...) are never results: faults.py.
            _first_error_wins(outcome, lease_status(error), action_digest)
        except Exception as error:  # a bug must cost one action, never the worker
            if worker_resource_cause(error) is None:
                log.exception("executing %s", action_digest)
                error = Internal(f"executing {action_digest}: {error!r}")
            _first_error_wins(outcome, lease_status(error), action_digest)
        if not outcome.ok and outcome.failed_phase is None:
            # A phase records its duration when it finishes, so an error rose in the first
            # phase without one.
            outcome.failed_phase = next((p for p in PHASES if p not in outcome.phases), PHASES[-1])
        return outcome

    def _execute(
        self, action_digest: Digest, action: re_pb2.Action | None, cancel: threading.Event | None, outcome: Outcome
    ) -> None:
        metadata = outcome.result.execution_metadata
        started = self._stamp(metadata.input_fetch_start_timestamp)
        spec = self._load(action_digest, action)
        self._store.fetch_tree(spec.input_root_digest)
        root = CasDirectory.from_digest(self._store, spec.input_root_digest)
        access = self._input_root_rules.subtree_access(root, spec.root_mode)
        tree_fetched = self._clock()
        outcome.phases["fetch"] = tree_fetched - started
        build_dir = os.path.join(self._config.build_root, uuid.uuid4().hex)
        directories = [spec.working_directory] + [o.components[:-1] for o in spec.outputs if o.components]
        # This action's own host uid, from staging until its build directory is gone.
        lease = self._identities.lease()
        owner = Owner(lease.run_as.uid, lease.run_as.gid)
        try:
            with self._stager.stage(root, build_dir, directories, owner) as staged:
                if not staged.private_inputs:  # else they are the action's own already
                    _copy_writable_inputs(staged.path, access, owner)
                fetched = self._stamp(metadata.input_fetch_completed_timestamp)
                outcome.phases["stage"] = fetched - tree_fetched
                # The streams are the action's writes: on its own bounded space when it has one.
                scratch = staged.scratch_dir or self._config.build_root
                with tempfile.TemporaryDirectory(prefix="streams-", dir=scratch) as streams:
                    self._stamp(metadata.execution_start_timestamp)
                    run = self._run(self._request(spec, staged.path, streams, access, lease.run_as), cancel)
                    ran = self._stamp(metadata.execution_completed_timestamp)
                    outcome.phases["run"] = ran - fetched
                    if run.cancelled:
                        outcome.status.CopyFrom(status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled"))
                        outcome.failed_phase = "run"
                        return
                    self._stamp(metadata.output_upload_start_timestamp)
                    deadline = CaptureDeadline(self._config.capture_timeout)
                    self._record_run(spec, run, streams, outcome)
                    if outcome.ok:
                        # A lazily staged input that could not be read (the command got EIO)
                        # fails the action with that reason; stdout/stderr are kept.
                        try:
                            staged.check()
                        except ReapiError as error:
                            # A bound the action went past, or a blob's lazy fetch that failed.
                            outcome.failed_phase = "run" if isinstance(error, BoundExceeded) else "fetch"
                            raise
                    captured = capture_outputs(
                        staged.path, spec, deadline.guard(self._store), known=staged.known_digest,
                        max_bytes=self._config.max_output_bytes,
                    )
        finally:
            _give_back(lease, build_dir)
        result = outcome.result
        result.MergeFrom(captured.result)  # capture fills only the output fields
        blobs = captured.blobs | {Digest.from_proto(d) for d in (result.stdout_digest, result.stderr_digest)}
        deadline.check("before uploading")
        try:
            self._store.upload_missing(blobs)
        except MissingBlobs as error:
            # Outputs captured a moment ago left this worker's cache before they reached the
            # remote (evicted under disk pressure): the worker's fault, never the client's
            # FAILED_PRECONDITION, which means "your inputs are missing".
            raise Unavailable(f"the worker's cache lost outputs before they were uploaded: {error.reason}") from None
        uploaded = self._stamp(metadata.output_upload_completed_timestamp)
        outcome.phases["upload"] = uploaded - ran

    def _load(self, action_digest: Digest, action: re_pb2.Action | None) -> ActionSpec:
        """Read and check the Action and Command. When blobs are missing, report every one
        that can be known at this point: the Action, or the Command and input root together."""
        if action is None:
            missing = self._store.find_missing([action_digest])
            if missing:
                raise MissingBlobs(missing, "fetching action")
            action = parse_message(re_pb2.Action, self._store.read(action_digest), f"action {action_digest}")
        roots = [action.command_digest, action.input_root_digest]
        if all(field_.hash for field_ in roots):
            missing = self._store.find_missing(Digest.from_proto(field_) for field_ in roots)
            if missing:
                raise MissingBlobs(missing, "fetching inputs")
        return load_action(self._store, action_digest, action, self._config.platform)

    def _run(self, request: SandboxRequest, cancel: threading.Event | None) -> SandboxResult:
        """Run the sandbox. A set-up failure bubblewrap itself reports (BubblewrapRefused:
        the one kind a request can cause) is blamed on the action or the host by the
        worker's own probe sandbox, run at once; any other set-up failure is the host's.

        Why: a set-up failure is INTERNAL to the runner, but passing it on as INTERNAL would
        make the scheduler retry an action whose own input root or command breaks the
        sandbox on every worker, and treating it as the host's fault would bench every
        worker it reaches. If a trivial sandbox still works here, the difference is the
        action: INVALID_ARGUMENT, a result for the client. If not, this host is broken:
        UNAVAILABLE, so the scheduler retries elsewhere, and the health check (told by
        the outcome) runs its own probe, which alone may turn the worker UNHEALTHY.
        """
        try:
            return self._runner.run(request, cancel)
        except BubblewrapRefused as error:
            config = self._config
            # As the action's own uid, so a uid this host cannot run is the host's fault.
            probe = runner_probe(
                self._runner, config.build_root, limits=config.limits, extra_ro_binds=config.extra_ro_binds,
                run_as=request.run_as,
            )
            problem = probe()
            if problem is None:
                raise InvalidArgument(
                    f"the action's sandbox could not be set up (a trivial sandbox can be on this worker, "
                    f"so the action's input root or command is the cause): {error.reason}"
                ) from None
            raise Unavailable(f"the sandbox could not be set up on this worker: {error.reason}") from None
        except SandboxSetupError as error:  # the host's alone (see BubblewrapRefused)
            raise Unavailable(f"the sandbox could not be set up on this worker: {error.reason}") from None

    def _request(
        self, spec: ActionSpec, input_root: str, streams: str, access: tuple[SubtreeAccess, ...], run_as: RunAs,
    ) -> SandboxRequest:
        timeout = min(spec.timeout or self._config.max_action_timeout, self._config.max_action_timeout)
        return SandboxRequest(
            arguments=spec.arguments,
            environment=spec.environment,
            input_root=input_root,
            stdout_path=os.path.join(streams, "stdout"),
            stderr_path=os.path.join(streams, "stderr"),
            working_directory="/".join(spec.working_directory),
            root_mode=spec.root_mode,
            network=spec.network,
            timeout=timeout,
            limits=self._config.limits,
            extra_ro_binds=self._config.extra_ro_binds,
            subtree_access=access,
            uid=spec.uid,
            gid=spec.gid,
            run_as=run_as,
        )

    def _record_run(self, spec: ActionSpec, run: SandboxResult, streams: str, outcome: Outcome) -> None:
        result = outcome.result
        result.exit_code = run.exit_code
        for name, field_ in (("stdout", result.stdout_digest), ("stderr", result.stderr_digest)):
            field_.CopyFrom(self._store.write_file(os.path.join(streams, name)).to_proto())
        _add_usage(result.execution_metadata, run)
        if run.timed_out:
            # REAPI: DEADLINE_EXCEEDED, with whatever the command wrote before it was killed.
            outcome.status.CopyFrom(
                status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=f"action timed out after {spec.timeout or self._config.max_action_timeout:g} s")
            )
            outcome.failed_phase = "run"
        elif (exceeded := bound_status(run, self._config.limits)) is not None:
            outcome.status.CopyFrom(exceeded)
            outcome.failed_phase = "run"

    def _stamp(self, field_: Timestamp) -> float:
        now = self._clock()
        field_.FromNanoseconds(int(now * 1e9))
        return now


def _copy_writable_inputs(path: str, access: tuple[SubtreeAccess, ...], owner: Owner | None) -> None:
    """Inputs below a ``SubtreeReadOnly=false`` marking become the command's own files
    (see :mod:`reapi_worker.storage.writable_inputs`); unmarked trees stay as staged."""
    def parts(entry: SubtreeAccess) -> tuple[str, ...]:
        return tuple(part for part in entry.path.split("/") if part)

    writable = [parts(entry) for entry in access if not entry.read_only]
    if writable:
        copy_writable_inputs(path, writable, [parts(entry) for entry in access if entry.read_only], owner)


def _give_back(lease: UidLease, build_dir: str) -> None:
    """Return the action's uid once its build directory is gone: the stager's ``close``
    unmounted it and moved it into the worker's trash (0700, root's: no pool uid reaches
    what the action left there) or deleted it. If it is still in place — a mount that would
    not come off, left for the next start's sweep — what the action left may still be
    reachable by its uid, so the uid is retired instead: never leased again."""
    if os.path.lexists(build_dir):
        lease.retire(f"its build directory {build_dir} could not be removed")
    else:
        lease.release()


def _first_error_wins(outcome: Outcome, status: status_pb2.Status, action_digest: Digest) -> None:
    """Make ``status`` the outcome's, unless an earlier error already set one: that one is
    why the action failed (a capture that fails after a timeout failed *because* of it, or
    failed besides); the later error is appended to its message, never put in its place."""
    if outcome.ok:
        outcome.status.CopyFrom(status)
        return
    log.warning(
        "executing %s: after %s, also: %s", action_digest, code_pb2.Code.Name(outcome.status.code), status.message,
    )
    outcome.status.message = f"{outcome.status.message}; then: {status.message}"


def _add_usage(metadata: re_pb2.ExecutedActionMetadata, run: SandboxResult) -> None:
    """Resource usage into ``auxiliary_metadata``: buildbox's ExecutionStatistics (what
    buildbox-based tooling reads) and, when a cgroup measured it, a Struct with its figures."""
    usage = run.usage
    stats = execution_stats_pb2.ExecutionStatistics()
    rusage = stats.command_rusage
    # Without a cgroup the runner cannot measure the action (None): leave the field unset
    # rather than report a made-up zero.
    if usage.user_cpu_seconds is not None:
        rusage.utime.CopyFrom(_duration(usage.user_cpu_seconds))
    if usage.system_cpu_seconds is not None:
        rusage.stime.CopyFrom(_duration(usage.system_cpu_seconds))
    if usage.peak_rss_bytes is not None:
        rusage.maxrss = usage.peak_rss_bytes // 1024  # getrusage's unit, as buildbox reports it
    metadata.auxiliary_metadata.add().Pack(stats)
    figures = {"wall_seconds": usage.wall_seconds, "oom_killed": run.oom_killed}
    if usage.cgroup is not None:
        for name in ("memory_peak_bytes", "pids_peak", "cpu_seconds"):
            value = getattr(usage.cgroup, name)
            if value is not None:
                figures[f"cgroup_{name}"] = value
    extra = struct_pb2.Struct()
    extra.update(figures)
    metadata.auxiliary_metadata.add().Pack(extra)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
