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
from reapi_worker.protos.errors import Internal, MissingBlobs, ReapiError
from reapi_worker.sandbox.request import Bind, ResourceLimits, SandboxRequest
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.runner import Runner
from reapi_worker.storage.content import LocalContent
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.staging import Owner, Stager

from .action import ActionSpec, load_action, parse_message
from .outputs import capture_outputs

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
    action gives none. ``owner``: the uid/gid the sandbox runs as (it must be able to write
    in the staged directories). ``limits``: per-action resource limits.
    """

    build_root: str
    worker_name: str = ""
    max_action_timeout: float = 3600.0
    owner: Owner | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    extra_ro_binds: tuple[Bind, ...] = ()


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
    """Whether an execution failed because its sandbox could not be set up: INTERNAL from
    the run phase, which is what the executor reports for a SandboxSetupError (a runner
    that does not start the command); a command that runs and fails is not an error."""
    return outcome.status.code == code_pb2.INTERNAL and outcome.failed_phase == "run"


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
    lease."""

    def __init__(
        self,
        store: LocalContent,
        stager: Stager,
        runner: Runner,
        config: ExecutorConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._stager = stager
        self._runner = runner
        self._config = config
        self._clock = clock
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
            _first_error_wins(outcome, error.to_status(), action_digest)
        except Exception as error:  # a bug must cost one action, never the worker
            log.exception("executing %s", action_digest)
            _first_error_wins(outcome, Internal(f"executing {action_digest}: {error!r}").to_status(), action_digest)
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
        tree_fetched = self._clock()
        outcome.phases["fetch"] = tree_fetched - started
        build_dir = os.path.join(self._config.build_root, uuid.uuid4().hex)
        directories = [spec.working_directory] + [o.components[:-1] for o in spec.outputs if o.components]
        with self._stager.stage(root, build_dir, directories, self._config.owner) as staged:
            fetched = self._stamp(metadata.input_fetch_completed_timestamp)
            outcome.phases["stage"] = fetched - tree_fetched
            with tempfile.TemporaryDirectory(prefix="streams-", dir=self._config.build_root) as streams:
                self._stamp(metadata.execution_start_timestamp)
                run = self._runner.run(self._request(spec, staged.path, streams), cancel)
                ran = self._stamp(metadata.execution_completed_timestamp)
                outcome.phases["run"] = ran - fetched
                if run.cancelled:
                    outcome.status.CopyFrom(status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled"))
                    outcome.failed_phase = "run"
                    return
                self._stamp(metadata.output_upload_start_timestamp)
                self._record_run(spec, run, streams, outcome)
                if outcome.ok:
                    # A lazily staged input that could not be read (the command got EIO)
                    # fails the action with that reason; stdout/stderr are kept.
                    try:
                        staged.check()
                    except ReapiError:
                        outcome.failed_phase = "fetch"  # the blob's lazy fetch failed
                        raise
                captured = capture_outputs(staged.path, spec, self._store, known=staged.known_digest)
        result = outcome.result
        result.MergeFrom(captured.result)  # capture fills only the output fields
        blobs = captured.blobs | {Digest.from_proto(d) for d in (result.stdout_digest, result.stderr_digest)}
        self._store.upload_missing(blobs)
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
        return load_action(self._store, action_digest, action)

    def _request(self, spec: ActionSpec, input_root: str, streams: str) -> SandboxRequest:
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
        elif run.oom_killed:
            outcome.status.message = "the action was killed for exceeding its memory limit (out of memory)"

    def _stamp(self, field_: Timestamp) -> float:
        now = self._clock()
        field_.FromNanoseconds(int(now * 1e9))
        return now


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
