"""Per-action bounds: defaults derived from the host, parsing, the status of an action that
ran into one, and the capture deadline (on a fake clock)."""

from __future__ import annotations

import pytest

from reapi_worker.protos import code_pb2
from reapi_worker.protos.errors import DeadlineExceeded, InvalidArgument
from reapi_worker.sandbox.request import ResourceLimits
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.usage import ResourceUsage
from reapi_worker.storage.content import MemoryStore
from reapi_worker.worker.bounds import BoundSettings, CaptureDeadline, HostFacts, bound_status

GiB, MiB = 1 << 30, 1 << 20
HOST = HostFacts(memory_bytes=16 * GiB, cpus=8, pid_max=4194304, open_files_hard=1 << 20)


def test_defaults_share_the_host_between_concurrent_actions():
    bounds = BoundSettings().resolve(concurrency=4, host=HOST)
    limits = bounds.limits
    assert limits.memory_bytes == 3 * GiB  # 3/4 of 16 GiB over 4
    assert limits.tmp_bytes == 3 * GiB // 2  # half the memory bound: /tmp counts against it
    assert limits.max_pids == 4096  # pid_max / 16, capped
    assert limits.cpu_cores == 2.0
    assert limits.stream_bytes == 256 * MiB
    assert limits.open_files == 65536  # (2^20 - 1024) / 4, capped
    assert bounds.capture_timeout == 600.0


def test_defaults_on_a_small_host_stay_usable():
    small = HostFacts(memory_bytes=1 * GiB, cpus=1, pid_max=32768, open_files_hard=4096)
    limits = BoundSettings().resolve(concurrency=8, host=small).limits
    assert limits.memory_bytes == 256 * MiB  # the floor
    assert limits.max_pids == 1024
    assert limits.cpu_cores == 1.0  # never under one core
    assert limits.open_files == 384  # (4096 - 1024) / 8
    assert 384 * 8 + 1024 <= small.open_files_hard  # the worker stays above its actions


def test_every_default_is_a_bound_unless_the_operator_says_unlimited():
    limits = BoundSettings().resolve(concurrency=1, host=HOST).limits
    assert all(getattr(limits, name) is not None for name in limits.__dataclass_fields__)
    off = BoundSettings(*(["unlimited"] * 7)).resolve(concurrency=1, host=HOST)
    assert off.limits.unlimited and off.capture_timeout is None


def test_explicit_values_parse_and_bad_ones_name_their_key():
    bounds = BoundSettings(
        memory="2G", tmp_size="512M", pids="100", cpu="1.5", stream_size="1048576", open_files="300",
        capture_timeout="30",
    ).resolve(concurrency=2, host=HOST)
    assert bounds.limits == ResourceLimits(
        memory_bytes=2 * GiB, tmp_bytes=512 * MiB, max_pids=100, cpu_cores=1.5, stream_bytes=MiB, open_files=300
    )
    assert bounds.capture_timeout == 30.0
    for field, value, key in [
        ("memory", "lots", "action_memory"), ("pids", "1.5", "action_pids"), ("cpu", "0", "action_cpu"),
        ("tmp_size", "-1M", "action_tmp_size"), ("capture_timeout", "soon", "capture_timeout"),
    ]:
        with pytest.raises(InvalidArgument, match=key):
            BoundSettings(**{field: value}).resolve(concurrency=1, host=HOST)


def test_the_tmp_default_follows_an_explicit_memory_bound():
    assert BoundSettings(memory="1G").resolve(concurrency=1, host=HOST).limits.tmp_bytes == 512 * MiB


def _run(exit_code: int = 1, oom: bool = False, exceeded: frozenset[str] = frozenset()) -> SandboxResult:
    return SandboxResult(
        exit_code=exit_code, signal=None, timed_out=False, cancelled=False, oom_killed=oom,
        usage=ResourceUsage(wall_seconds=0.0), exceeded=exceeded,
    )


LIMITS = ResourceLimits(memory_bytes=64 * MiB, max_pids=32, tmp_bytes=8 * MiB, stream_bytes=MiB)


@pytest.mark.parametrize(
    "run, words",
    [
        (_run(137, oom=True), ["out of memory", "64 MiB", "action_memory"]),
        (_run(2, exceeded=frozenset({"max_pids"})), ["32 processes", "action_pids"]),
        (_run(1, exceeded=frozenset({"tmp_bytes"})), ["/tmp", "8 MiB", "action_tmp_size"]),
        (_run(137, oom=True, exceeded=frozenset({"stream_bytes", "max_pids"})), ["stdout", "1 MiB", "action_stream_size"]),
    ],
)
def test_an_action_that_ran_into_a_bound_gets_a_status_naming_it(run, words):
    status = bound_status(run, LIMITS)
    assert status is not None and status.code == code_pb2.RESOURCE_EXHAUSTED  # neither retried nor cached
    for word in words:
        assert word in status.message


def test_an_action_within_its_bounds_keeps_its_own_result():
    assert bound_status(_run(1), LIMITS) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_capture_stops_between_files_once_its_deadline_passed():
    clock = FakeClock()
    deadline = CaptureDeadline(30.0, clock=clock)
    store = deadline.guard(MemoryStore())
    first = store.write(b"first output")
    clock.now += 31
    with pytest.raises(DeadlineExceeded, match=r"capture_timeout \(30 s\)"):
        store.write(b"second output")
    assert store.read(first) == b"first output"  # reads are never refused
    with pytest.raises(DeadlineExceeded):
        deadline.check("before uploading")


def test_no_capture_deadline_costs_no_wrapper():
    store = MemoryStore()
    assert CaptureDeadline(None).guard(store) is store
