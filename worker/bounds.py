"""Per-action bounds: their defaults, derived from the host, and what exceeding one makes of
the action's result.

Every action is bounded unless the operator says ``unlimited``; ``auto`` (the default of
each key) derives the bound from the host and ``concurrency``, so that ``concurrency``
actions at their bounds together still fit the host:

=================== ========================================================================
key                 ``auto``
=================== ========================================================================
action_memory       3/4 of the host's memory (MemTotal) / concurrency, at least 256 MiB
action_tmp_size     half of action_memory (``/tmp`` pages are charged to the action's
                    memory cgroup, so they count against action_memory too)
action_pids         pid_max / (4 x concurrency), between 256 and 4096
action_cpu          CPUs / concurrency, at least 1 (CPU bandwidth, cgroups only)
action_stream_size  256 MiB for stdout, and again for stderr
action_open_files   (the worker's hard RLIMIT_NOFILE - 1024) / concurrency, between 256 and
                    65536: each action's RLIMIT_NOFILE and its quota of inputs open through
                    FUSE, so the worker's own descriptors (raised to its hard limit at start)
                    stay above what all actions may make it hold
capture_timeout     600 s to capture and upload the outputs
=================== ========================================================================

What an action that ran into a bound gets (:func:`bound_status`): its ActionResult as far as
it got (exit code, stdout, stderr) under a status that names the bound and the key —
RESOURCE_EXHAUSTED for memory (OOM-killed), processes, ``/tmp`` and the streams,
DEADLINE_EXCEEDED for ``capture_timeout``. Neither is retried by the scheduler nor cached:
the action would hit its bound again on any worker configured alike, and a result shaped by
a bound is not the action's own. CPU and open files produce no status: a throttled action
is slower, and EMFILE is the command's to handle as on any host.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from reapi_worker.host import format_bytes
from reapi_worker.protos import status_pb2
from reapi_worker.protos.errors import BoundExceeded, DeadlineExceeded, InvalidArgument
from reapi_worker.sandbox.bounds import MAX_PIDS, STREAM_BYTES, TMP_BYTES
from reapi_worker.sandbox.request import ResourceLimits
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest

AUTO = "auto"
UNLIMITED = "unlimited"
MiB = 1 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Descriptors the worker keeps for itself (sockets, cache files, pipes) besides the actions'.
WORKER_OWN_FILES = 1024
DEFAULT_STREAM_BYTES = 256 * MiB
DEFAULT_CAPTURE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the defaults are derived from, read once (:meth:`probe`)."""

    memory_bytes: int
    cpus: int
    pid_max: int
    open_files_hard: int

    @classmethod
    def probe(cls) -> "HostFacts":
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/sys/kernel/pid_max") as stream:
                pid_max = int(stream.read())
        except (OSError, ValueError):
            pid_max = 32768
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(memory_bytes=pages, cpus=max(1, cpus), pid_max=pid_max, open_files_hard=hard)


@dataclass(frozen=True, slots=True)
class BoundSettings:
    """The operator's bounds as written (each ``auto``, ``unlimited`` or a value); see the
    module docstring. Values: sizes as ``512M``/``2G``/bytes, counts as integers, ``cpu`` in
    cores (``1.5``), ``capture_timeout`` in seconds."""

    memory: str = AUTO
    tmp_size: str = AUTO
    pids: str = AUTO
    cpu: str = AUTO
    stream_size: str = AUTO
    open_files: str = AUTO
    capture_timeout: str = AUTO

    def resolve(self, concurrency: int, host: HostFacts) -> "ActionBounds":
        """The bounds for a worker running ``concurrency`` actions on ``host``. Raises
        InvalidArgument naming the key of a value that does not parse."""
        share = max(1, concurrency)
        # Whole MiB: tmpfs sizes are whole pages, and a bound reads better round.
        memory_share = max(256 * MiB, host.memory_bytes * 3 // 4 // share // MiB * MiB)
        memory = _size("action_memory", self.memory, memory_share)
        tmp_default = (memory if memory is not None else memory_share) // 2 // MiB * MiB
        pids = _count("action_pids", self.pids, min(4096, max(256, host.pid_max // (4 * share))))
        open_files = _count(
            "action_open_files", self.open_files,
            min(65536, max(256, (host.open_files_hard - WORKER_OWN_FILES) // share)),
        )
        limits = ResourceLimits(
            memory_bytes=memory,
            max_pids=pids,
            cpu_cores=_number("action_cpu", self.cpu, max(1.0, host.cpus / share)),
            tmp_bytes=_size("action_tmp_size", self.tmp_size, tmp_default),
            stream_bytes=_size("action_stream_size", self.stream_size, DEFAULT_STREAM_BYTES),
            open_files=open_files,
        )
        capture = _number("capture_timeout", self.capture_timeout, DEFAULT_CAPTURE_SECONDS)
        return ActionBounds(limits=limits, capture_timeout=capture)


@dataclass(frozen=True, slots=True)
class ActionBounds:
    """Resolved bounds: the sandbox's limits and the capture deadline (``None``: none)."""

    limits: ResourceLimits
    capture_timeout: float | None = None


# -- what exceeding one means ------------------------------------------------------------


def bound_status(run: SandboxResult, limits: ResourceLimits) -> status_pb2.Status | None:
    """The status of an action that ran into a bound (module docstring), or ``None``. When
    several apply, the one that ended the action wins: the runner's kill for a stream, then
    the kernel's OOM kill, then a refused fork, then a full ``/tmp``."""
    if STREAM_BYTES in run.exceeded:
        return _exhausted(
            f"the action wrote more than its bound of {_bytes(limits.stream_bytes)} to stdout or stderr "
            "(action_stream_size): it was killed and the stream cut at the bound"
        )
    if run.oom_killed:
        return _exhausted(
            f"the action ran out of memory: the kernel killed it at its memory bound of "
            f"{_bytes(limits.memory_bytes)} (action_memory; /tmp counts against it)"
        )
    if MAX_PIDS in run.exceeded:
        return _exhausted(
            f"the action hit its bound of {limits.max_pids} processes and threads (action_pids): "
            "a fork or thread was refused"
        )
    if TMP_BYTES in run.exceeded:
        return _exhausted(
            f"the action failed with its /tmp full at its bound of {_bytes(limits.tmp_bytes)} (action_tmp_size)"
        )
    return None


def _exhausted(message: str) -> status_pb2.Status:
    return BoundExceeded(message).to_status()


def _bytes(value: int | None) -> str:
    return "an unknown size" if value is None else format_bytes(value, exact=True)


# -- the capture deadline ------------------------------------------------------------------


class CaptureDeadline:
    """``capture_timeout`` from the moment it is made; :meth:`check` raises
    DeadlineExceeded (naming the key) once it passed. ``clock`` for tests."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = None if seconds is None else clock() + seconds

    def check(self, doing: str) -> None:
        if self._end is not None and self._clock() > self._end:
            raise DeadlineExceeded(
                f"capturing and uploading the outputs took longer than capture_timeout ({self.seconds:g} s); "
                f"stopped {doing}"
            )

    def guard(self, store: ContentStore) -> ContentStore:
        """``store``, checking the deadline before each blob is written: capture writes one
        per output file and directory, so it stops between files once the time is up."""
        return store if self._end is None else _DeadlineStore(store, self)


class _DeadlineStore(ContentStore):
    def __init__(self, inner: ContentStore, deadline: CaptureDeadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        return self._inner.find_missing(digests)

    def read(self, digest: Digest) -> bytes:
        return self._inner.read(digest)

    def write(self, data: bytes) -> Digest:
        self._deadline.check("storing a directory")
        return self._inner.write(data)

    def write_stream(self, stream: BinaryIO) -> Digest:
        self._deadline.check("storing an output file")
        return self._inner.write_stream(stream)


# -- parsing -------------------------------------------------------------------------------


def _special(text: str, default: object) -> tuple[bool, object]:
    word = str(text).strip().lower()
    if word == AUTO:
        return True, default
    if word == UNLIMITED:
        return True, None
    return False, None


def _size(key: str, text: str, default: int) -> int | None:
    done, value = _special(text, default)
    if done:
        return value  # type: ignore[return-value]
    word = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = word[-1:] if word[-1:] in _UNITS and word[-1:] != "" else ""
    try:
        size = int(float(word[: len(word) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise InvalidArgument(f"{key}: {text!r} is not a size (e.g. 512M, 2G), auto or unlimited") from None
    if size <= 0:
        raise InvalidArgument(f"{key}: {text!r} must be positive")
    return size


def _count(key: str, text: str, default: int) -> int | None:
    done, value = _special(text, default)
    if done:
        return value  # type: ignore[return-value]
    try:
        count = int(str(text).strip())
    except ValueError:
        raise InvalidArgument(f"{key}: {text!r} is not a whole number, auto or unlimited") from None
    if count <= 0:
        raise InvalidArgument(f"{key}: {text!r} must be positive")
    return count


def _number(key: str, text: str, default: float) -> float | None:
    done, value = _special(text, default)
    if done:
        return value  # type: ignore[return-value]
    try:
        number = float(str(text).strip())
    except ValueError:
        raise InvalidArgument(f"{key}: {text!r} is not a number, auto or unlimited") from None
    if not number > 0:
        raise InvalidArgument(f"{key}: {text!r} must be positive")
    return number


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (the FUSE mount holds a
    descriptor per open input blob; actions are bounded below it by ``action_open_files``).
    Returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
