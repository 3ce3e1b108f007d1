"""Health checks on fakes: free-space watermarks and eviction (fake statvfs and cache), the
scheduler's grace period and the sandbox probe (fake clock), the monitor and its thread,
and the runner probe (fake Runner). No sleeps, no full disks, no bubblewrap."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

import pytest

from reapi_worker.protos import code_pb2, re_pb2, status_pb2
from reapi_worker.protos.errors import InvalidArgument, ResourceExhausted
from reapi_worker.sandbox.errors import SandboxSetupError
from reapi_worker.sandbox.request import Bind, ResourceLimits, SandboxRequest
from reapi_worker.sandbox.result import SandboxResult
from reapi_worker.sandbox.runner import Runner
from reapi_worker.sandbox.usage import ResourceUsage
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.local_cas import CacheStats
from reapi_worker.sandbox.probe import runner_probe
from reapi_worker.worker.config import FreeSpace, Watermarks
from reapi_worker.worker.executor import Outcome, is_sandbox_setup_failure
from reapi_worker.worker.health import (
    CheckResult,
    DiskCheck,
    DiskUsage,
    HealthConfig,
    HealthMonitor,
    HealthRecordingExecutor,
    HealthReport,
    Level,
    SandboxCheck,
    SchedulerCheck,
    standard_checks,
    standard_disk_checks,
)

GiB = 2**30


# ---- fakes ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDisk:
    """One file system whose free space a test sets; ``statvfs`` is what DiskCheck measures.

    Like a real ext4, it keeps blocks reserved for root: ``f_bfree`` exceeds ``f_bavail``.
    """

    FRSIZE = 4096

    def __init__(self, total: int, free: int, reserved: int = 5 * GiB) -> None:
        self.total, self.free, self.reserved = total, free, reserved
        self.error: OSError | None = None
        self.measured: list[str] = []

    def statvfs(self, path: str) -> os.statvfs_result:
        self.measured.append(path)
        if self.error is not None:
            raise self.error
        f = self.FRSIZE
        blocks, bavail = self.total // f, self.free // f
        bfree = min(blocks, bavail + self.reserved // f)
        return os.statvfs_result((f, f, blocks, bfree, bavail, 1000, 900, 900, 0, 255))


class FakeCache:
    """An EvictableCache on ``disk``: evicting frees space there, but never below ``floor``
    bytes (blobs in use). Records every ``down_to`` it was asked for."""

    def __init__(self, disk: FakeDisk, size: int, floor: int = 0) -> None:
        self.disk, self.size, self.floor = disk, size, floor
        self.asked: list[int | None] = []
        self.error: Exception | None = None

    def stats(self) -> CacheStats:
        return CacheStats(hits=0, misses=0, evictions=0, bytes_evicted=0, size_bytes=self.size, max_bytes=100 * GiB)

    def evict(self, down_to: int | None = None) -> int:
        self.asked.append(down_to)
        if self.error is not None:
            raise self.error
        target = max(self.floor, down_to if down_to is not None else 0)
        freed = max(0, self.size - target)
        self.size -= freed
        self.disk.free += freed
        return freed


class FakeProbe:
    """A sandbox probe whose answer a test sets (``None``: passes; a string: why not; an
    exception: raised). ``during`` runs inside the probe, to model a race."""

    def __init__(self) -> None:
        self.answer: str | None | Exception = None
        self.calls = 0
        self.during = lambda: None

    def __call__(self) -> str | None:
        self.calls += 1
        self.during()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class StubCheck:
    """A named check that answers ``level``/``reason`` (or raises ``error``), recording the
    times it was evaluated at; sets ``evaluated_thrice`` on its third evaluation."""

    def __init__(self, name: str, level: Level = Level.OK, reason: str = "") -> None:
        self.name = name
        self.level, self.reason = level, reason
        self.error: Exception | None = None
        self.times: list[float] = []
        self.evaluated_thrice = threading.Event()

    def evaluate(self, now: float) -> CheckResult:
        self.times.append(now)
        if len(self.times) >= 3:
            self.evaluated_thrice.set()
        if self.error is not None:
            raise self.error
        return CheckResult(self.name, self.level, self.reason)


def outcome(code: int = code_pb2.OK, phase: str | None = None, message: str = "", exit_code: int = 0) -> Outcome:
    return Outcome(
        status=status_pb2.Status(code=code, message=message),
        result=re_pb2.ActionResult(exit_code=exit_code),
        failed_phase=phase,
    )


#: What the executor reports when an action's sandbox could not be set up and its own probe
#: failed too (the host is broken): UNAVAILABLE, so the scheduler retries elsewhere.
SETUP_FAILURE = outcome(
    code_pb2.UNAVAILABLE, "run",
    "the sandbox could not be set up on this worker: bwrap: Creating new namespace failed: Operation not permitted",
)
#: ... and when the probe passed, so the action's own input root or command was the cause.
ACTIONS_OWN_SETUP_FAILURE = outcome(
    code_pb2.INVALID_ARGUMENT, "run", "the action's sandbox could not be set up (...): bwrap: Can't mkdir /proc",
)


# ---- free space and watermarks -------------------------------------------------------------


@pytest.mark.parametrize("text, fraction", [("10%", 0.10), (" 2.5% ", 0.025), ("0%", 0.0)])
def test_free_space_parses_a_percentage_as_a_fraction(text, fraction):
    space = FreeSpace.parse(text)
    assert space.fraction == pytest.approx(fraction) and space.size_bytes is None
    assert space.of(200 * GiB) == int(200 * GiB * fraction)


@pytest.mark.parametrize("text, size", [("20G", 20 * GiB), ("500M", 500 * 2**20), ("1.5T", int(1.5 * 2**40)), ("4096", 4096)])
def test_free_space_parses_a_size_in_bytes_whatever_the_disk(text, size):
    space = FreeSpace.parse(text)
    assert space.size_bytes == size and space.fraction is None
    assert space.of(10 * GiB) == size == space.of(1000 * GiB)


@pytest.mark.parametrize("text", ["ten%", "lots", "", "%", "20X", "5 gigs"])
def test_free_space_refuses_bad_text_naming_it(text):
    with pytest.raises(InvalidArgument) as raised:
        FreeSpace.parse(text)
    assert repr(text.strip()) in str(raised.value)


@pytest.mark.parametrize("text", ["100%", "150%", "-1%", "nan%"])
def test_free_space_refuses_a_fraction_outside_0_to_1(text):
    with pytest.raises(InvalidArgument, match="fraction"):
        FreeSpace.parse(text)


def test_free_space_is_a_fraction_or_a_size_exactly_one():
    with pytest.raises(InvalidArgument, match="exactly one"):
        FreeSpace()
    with pytest.raises(InvalidArgument, match="exactly one"):
        FreeSpace(fraction=0.1, size_bytes=GiB)
    with pytest.raises(InvalidArgument, match="negative"):
        FreeSpace(size_bytes=-1)


def test_free_space_prints_as_an_operator_wrote_it():
    assert str(FreeSpace.parse("10%")) == "10%"
    assert str(FreeSpace.parse("20G")) == "20.0 GiB"


def test_watermarks_default_to_10_and_5_percent():
    marks = Watermarks()
    assert (marks.low.fraction, marks.critical.fraction) == (0.10, 0.05)


@pytest.mark.parametrize("low, critical", [("5%", "10%"), ("1G", "2G")])
def test_watermarks_refuse_critical_above_low(low, critical):
    with pytest.raises(InvalidArgument, match="critical free-space watermark .* above the low one"):
        Watermarks(low=FreeSpace.parse(low), critical=FreeSpace.parse(critical))


@pytest.mark.parametrize("low, critical", [("10%", "10%"), ("2G", "1G"), ("1G", "10%"), ("10%", "50G")])
def test_watermarks_accept_critical_at_or_below_low_and_mixed_kinds(low, critical):
    marks = Watermarks(low=FreeSpace.parse(low), critical=FreeSpace.parse(critical))
    assert marks.low == FreeSpace.parse(low)


# ---- disk check ----------------------------------------------------------------------------


def disk_check(disk: FakeDisk, cache: FakeCache | None = None, marks: Watermarks = Watermarks(), **options) -> DiskCheck:
    return DiskCheck("cache_disk", "/var/cache/rw", marks, cache=cache, statvfs=disk.statvfs, **options)


def test_disk_usage_counts_what_an_unprivileged_process_may_use():
    disk = FakeDisk(total=100 * GiB, free=40 * GiB, reserved=5 * GiB)
    usage = disk_check(disk).usage()
    assert usage == DiskUsage("/var/cache/rw", 40 * GiB, 100 * GiB)
    assert usage.free_fraction == pytest.approx(0.40)
    assert DiskUsage("/x", 0, 0).free_fraction == 0.0


def test_disk_above_low_is_ok_and_evicts_nothing():
    disk = FakeDisk(total=100 * GiB, free=50 * GiB)
    cache = FakeCache(disk, size=30 * GiB)
    result = disk_check(disk, cache).evaluate(0.0)
    assert (result.level, result.reason) == (Level.OK, "")
    assert result.disk == DiskUsage("/var/cache/rw", 50 * GiB, 100 * GiB)
    assert cache.asked == [] and disk.measured == ["/var/cache/rw"]


def test_disk_below_low_evicts_the_shortfall_and_measures_again():
    disk = FakeDisk(total=100 * GiB, free=8 * GiB)
    cache = FakeCache(disk, size=30 * GiB)
    result = disk_check(disk, cache).evaluate(0.0)
    # 2 GiB short of the 10% watermark: the cache is asked to shrink by exactly that.
    assert cache.asked == [28 * GiB]
    assert len(disk.measured) == 2
    assert result.level is Level.OK
    assert result.reason == "evicted 2.0 GiB from the cache"
    assert result.disk is not None and result.disk.free_bytes == 10 * GiB


def test_disk_still_below_low_after_evicting_warns_naming_the_path():
    disk = FakeDisk(total=100 * GiB, free=8 * GiB)
    cache = FakeCache(disk, size=30 * GiB, floor=29 * GiB)  # only 1 GiB can go
    result = disk_check(disk, cache).evaluate(0.0)
    assert result.level is Level.WARNING
    assert "cache disk /var/cache/rw" in result.reason
    assert "below the low watermark 10%" in result.reason
    assert "evicting from the cache" in result.reason and "evicted 1.0 GiB" in result.reason
    assert result.disk is not None and result.disk.free_bytes == 9 * GiB  # measured again


def test_disk_still_below_critical_after_evicting_is_unhealthy():
    disk = FakeDisk(total=100 * GiB, free=2 * GiB)
    cache = FakeCache(disk, size=30 * GiB, floor=29 * GiB)
    result = disk_check(disk, cache).evaluate(0.0)
    assert cache.asked == [22 * GiB]  # it did try first: 8 GiB short of the low watermark
    assert result.level is Level.UNHEALTHY
    assert "/var/cache/rw" in result.reason and "3.0 GiB free of 100.0 GiB" in result.reason
    assert "below the critical watermark 5%: taking no work" in result.reason
    assert "evicted 1.0 GiB" in result.reason


def test_disk_below_critical_with_eviction_enough_is_ok_again():
    disk = FakeDisk(total=100 * GiB, free=2 * GiB)
    cache = FakeCache(disk, size=30 * GiB)
    result = disk_check(disk, cache).evaluate(0.0)
    assert result.level is Level.OK and result.disk is not None and result.disk.free_bytes == 10 * GiB


def test_disk_without_a_cache_says_there_is_nothing_to_evict():
    disk = FakeDisk(total=100 * GiB, free=8 * GiB)
    result = disk_check(disk).evaluate(0.0)
    assert result.level is Level.WARNING and "no cache here to evict from" in result.reason
    disk.free = 4 * GiB
    assert disk_check(disk).evaluate(0.0).level is Level.UNHEALTHY


def test_disk_with_size_watermarks():
    disk = FakeDisk(total=100 * GiB, free=15 * GiB)
    marks = Watermarks(low=FreeSpace.parse("20G"), critical=FreeSpace.parse("10G"))
    assert disk_check(disk, marks=marks).evaluate(0.0).level is Level.WARNING
    disk.free = 25 * GiB
    assert disk_check(disk, marks=marks).evaluate(0.0).level is Level.OK
    disk.free = 9 * GiB
    result = disk_check(disk, marks=marks).evaluate(0.0)
    assert result.level is Level.UNHEALTHY and "critical watermark 10.0 GiB" in result.reason


def test_disk_with_critical_above_low_on_this_disk_still_evicts_before_giving_up():
    # Mixed kinds are only comparable per disk: 1 GiB low, 10% critical on a 100 GiB disk.
    # Below critical the cache must still be asked to evict first (the documented order).
    disk = FakeDisk(total=100 * GiB, free=5 * GiB)
    cache = FakeCache(disk, size=30 * GiB)
    marks = Watermarks(low=FreeSpace.parse("1G"), critical=FreeSpace.parse("10%"))
    result = disk_check(disk, cache, marks=marks).evaluate(0.0)
    assert cache.asked == [25 * GiB]
    assert result.level is Level.OK and result.disk is not None and result.disk.free_bytes == 10 * GiB


def test_disk_eviction_is_rate_limited_by_the_fake_clock():
    disk = FakeDisk(total=100 * GiB, free=50 * GiB)
    cache = FakeCache(disk, size=30 * GiB, floor=30 * GiB)  # nothing can go
    clock = FakeClock(0.0)
    monitor = HealthMonitor([disk_check(disk, cache, evict_interval_seconds=30.0)], clock=clock)
    monitor.check()
    assert cache.asked == []  # above low: no eviction, and the interval has not started
    clock.advance(5)
    disk.free = 8 * GiB
    monitor.check()
    assert len(cache.asked) == 1  # the first time below low: at once
    clock.advance(29)
    report = monitor.check()
    assert len(cache.asked) == 1  # 29 s later: not again
    assert report.results[0].level is Level.WARNING
    clock.advance(1)
    monitor.check()
    assert len(cache.asked) == 2  # 30 s later: again


def test_disk_eviction_that_fails_is_in_the_reason():
    disk = FakeDisk(total=100 * GiB, free=8 * GiB)
    cache = FakeCache(disk, size=30 * GiB)
    cache.error = ResourceExhausted("cache directory is read-only")
    result = disk_check(disk, cache).evaluate(0.0)
    assert result.level is Level.WARNING
    assert "eviction failed: cache directory is read-only" in result.reason
    assert len(disk.measured) == 1  # nothing was freed: no second measurement


def test_disk_that_cannot_be_measured_is_unhealthy():
    disk = FakeDisk(total=100 * GiB, free=50 * GiB)
    disk.error = OSError(errno.ENOENT, os.strerror(errno.ENOENT), "/var/cache/rw")
    result = disk_check(disk, FakeCache(disk, size=GiB)).evaluate(0.0)
    assert result.level is Level.UNHEALTHY
    assert result.reason == "cache disk /var/cache/rw: cannot measure free space: No such file or directory"
    assert result.disk is None


def test_build_root_disk_evicts_only_when_it_shares_the_caches_file_system(tmp_path):
    disk = FakeDisk(total=100 * GiB, free=8 * GiB)
    cache = FakeCache(disk, size=30 * GiB, floor=30 * GiB)
    cache_dir, build_root = str(tmp_path / "cache"), str(tmp_path / "builds")
    devices = {cache_dir: 1, build_root: 1}
    shared = standard_disk_checks(cache_dir, build_root, Watermarks(), cache, statvfs=disk.statvfs, device_of=devices.get)
    assert [c.name for c in shared] == ["cache_disk", "build_root_disk"]
    assert [c.path for c in shared] == [cache_dir, build_root]
    shared[1].evaluate(0.0)
    assert len(cache.asked) == 1
    devices[build_root] = 2
    apart = standard_disk_checks(cache_dir, build_root, Watermarks(), cache, statvfs=disk.statvfs, device_of=devices.get)
    result = apart[1].evaluate(0.0)
    assert len(cache.asked) == 1 and "no cache here to evict from" in result.reason


# ---- scheduler check -----------------------------------------------------------------------


def test_scheduler_grace_must_be_positive():
    with pytest.raises(InvalidArgument, match="grace"):
        SchedulerCheck(0)


def test_scheduler_is_unhealthy_only_after_the_grace_period_without_contact():
    clock = FakeClock()
    check = SchedulerCheck(60, clock=clock)
    assert check.evaluate(clock()).level is Level.OK  # a worker starting up is given the grace too
    clock.advance(60)
    assert check.evaluate(clock()).level is Level.OK
    clock.advance(1)
    result = check.evaluate(clock())
    assert result.level is Level.UNHEALTHY
    assert result.reason == "scheduler not reached for 61 s (grace 60 s)"


def test_scheduler_failures_within_grace_warn_with_the_last_error():
    clock = FakeClock()
    check = SchedulerCheck(60, clock=clock)
    check.record_contact(False, "connection refused")
    check.record_contact(False, "deadline exceeded")
    result = check.evaluate(clock())
    assert result.level is Level.WARNING
    assert result.reason == "2 scheduler call(s) failed in a row (last error: deadline exceeded)"


def test_scheduler_failures_do_not_restart_the_grace_period():
    clock = FakeClock()
    check = SchedulerCheck(60, clock=clock)
    for _ in range(7):
        clock.advance(10)
        check.record_contact(False, "unavailable")
    result = check.evaluate(clock())
    assert result.level is Level.UNHEALTHY and "(last error: unavailable)" in result.reason


def test_scheduler_recovers_on_contact_and_the_grace_restarts_from_it():
    clock = FakeClock()
    check = SchedulerCheck(60, clock=clock)
    check.record_contact(False, "unavailable")
    clock.advance(100)
    assert check.evaluate(clock()).level is Level.UNHEALTHY
    check.record_contact(True)
    result = check.evaluate(clock())
    assert (result.level, result.reason) == (Level.OK, "")
    clock.advance(60)
    assert check.evaluate(clock()).level is Level.OK
    clock.advance(1)
    assert check.evaluate(clock()).level is Level.UNHEALTHY


# ---- sandbox check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seen, expected",
    [
        (SETUP_FAILURE, True),
        (outcome(code_pb2.INTERNAL, "run", "bug"), True),  # a bug in running it: worth a probe
        (ACTIONS_OWN_SETUP_FAILURE, False),  # the action's doing: a result for the client
        (outcome(code_pb2.INTERNAL, "fetch", "bug"), False),  # INTERNAL, but not the sandbox
        (outcome(code_pb2.DEADLINE_EXCEEDED, "run", "timed out"), False),  # it ran
        (outcome(code_pb2.OK, exit_code=1), False),  # a failing command is a result
        (outcome(code_pb2.CANCELLED, "run"), False),
    ],
)
def test_is_sandbox_setup_failure(seen, expected):
    assert is_sandbox_setup_failure(seen) is expected


def sandbox_check(probe: FakeProbe, clock: FakeClock) -> SandboxCheck:
    return SandboxCheck(probe, interval_seconds=300, retry_seconds=15, clock=clock)


def test_sandbox_probe_runs_first_and_then_every_interval():
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    assert check.evaluate(clock()) == CheckResult("sandbox", Level.OK)
    assert probe.calls == 1
    clock.advance(299)
    check.evaluate(clock())
    assert probe.calls == 1
    clock.advance(1)
    check.evaluate(clock())
    assert probe.calls == 2


def test_sandbox_probe_failure_is_unhealthy_and_retried_every_retry_seconds():
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    probe.answer = "a trivial sandbox could not be set up: bwrap: No permissions"
    result = check.evaluate(clock())
    assert (result.level, result.reason) == (Level.UNHEALTHY, probe.answer)
    clock.advance(14)
    assert check.evaluate(clock()).level is Level.UNHEALTHY
    assert probe.calls == 1  # not yet
    clock.advance(1)
    assert check.evaluate(clock()).level is Level.UNHEALTHY
    assert probe.calls == 2  # retried after 15 s, not 300
    probe.answer = None
    clock.advance(15)
    assert check.evaluate(clock()).level is Level.OK
    assert probe.calls == 3


def test_sandbox_probe_that_raises_is_unhealthy():
    clock, probe = FakeClock(), FakeProbe()
    probe.answer = RuntimeError("no build root")
    result = sandbox_check(probe, clock).evaluate(clock())
    assert result.level is Level.UNHEALTHY
    assert result.reason == "the sandbox probe failed: RuntimeError('no build root')"


def test_sandbox_setup_failure_of_an_action_makes_the_probe_run_at_once():
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    assert check.evaluate(clock()).level is Level.OK
    clock.advance(1)  # far from the 300 s interval
    check.record_outcome(SETUP_FAILURE)
    probe.answer = "a trivial sandbox could not be set up: bwrap: No permissions"
    result = check.evaluate(clock())
    assert probe.calls == 2
    assert (result.level, result.reason) == (Level.UNHEALTHY, probe.answer)


def test_sandbox_setup_failure_of_an_action_alone_never_makes_the_worker_unhealthy():
    # The probe is the only judge: an action whose own input root breaks its sandbox must
    # not bench every worker the scheduler hands it to.
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    check.evaluate(clock())
    for seen in (SETUP_FAILURE, ACTIONS_OWN_SETUP_FAILURE, SETUP_FAILURE):
        check.record_outcome(seen)
        assert check.evaluate(clock()).level is Level.OK
    assert probe.calls == 3  # the two host-side failures each made it probe once


def test_sandbox_only_a_passing_probe_clears_a_failure():
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    probe.answer = "broken"
    check.evaluate(clock())
    check.record_outcome(outcome(code_pb2.OK))  # may have started before the cause appeared
    clock.advance(14)
    assert check.evaluate(clock()).level is Level.UNHEALTHY
    assert probe.calls == 1
    probe.answer = None
    clock.advance(1)  # 15 s after the last probe: retried, though the interval is 300 s
    assert check.evaluate(clock()).level is Level.OK
    assert probe.calls == 2


def test_sandbox_other_failures_of_actions_do_not_fail_the_check_or_probe():
    clock, probe = FakeClock(), FakeProbe()
    check = sandbox_check(probe, clock)
    check.evaluate(clock())
    for seen in (outcome(code_pb2.INTERNAL, "upload", "bug"), outcome(code_pb2.DEADLINE_EXCEEDED, "run"),
                 outcome(exit_code=2), ACTIONS_OWN_SETUP_FAILURE):
        check.record_outcome(seen)
    assert check.evaluate(clock()).level is Level.OK
    assert probe.calls == 1


# ---- runner probe --------------------------------------------------------------------------


class FakeRunner(Runner):
    """Runs nothing: writes ``output`` to the request's stdout file and exits ``exit_code``,
    or raises ``error``. Records each request and what its input root looked like."""

    def __init__(self, exit_code: int = 0, output: bytes = b"", error: Exception | None = None) -> None:
        self.exit_code, self.output, self.error = exit_code, output, error
        self.requests: list[SandboxRequest] = []
        self.roots: list[tuple[bool, list[str], int, int]] = []

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        self.requests.append(request)
        root = request.input_root
        top = os.path.dirname(root)
        self.roots.append((os.path.isdir(root), os.listdir(root), stat.S_IMODE(os.stat(root).st_mode),
                           stat.S_IMODE(os.stat(top).st_mode)))
        if self.error is not None:
            raise self.error
        with open(request.stdout_path, "wb") as stream:
            stream.write(self.output)
        return SandboxResult(
            exit_code=self.exit_code, signal=None, timed_out=False, cancelled=False, oom_killed=False,
            usage=ResourceUsage(wall_seconds=0.001),
        )


@pytest.fixture
def strict_umask():
    """A service's umask of 077 (systemd ``UMask=0077``): the probe must not rely on 022."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def test_runner_probe_runs_true_in_an_empty_root_like_an_action(tmp_path, strict_umask):
    runner = FakeRunner()
    limits = ResourceLimits(memory_bytes=GiB, max_pids=64)
    binds = [Bind("/usr", "/usr")]
    probe = runner_probe(runner, str(tmp_path), limits=limits, extra_ro_binds=binds, timeout=7.0)
    assert probe() is None
    (request,) = runner.requests
    assert request.arguments == ("/bin/true",) and dict(request.environment) == {}
    assert request.limits == limits and request.extra_ro_binds == (Bind("/usr", "/usr"),)
    assert request.timeout == 7.0
    assert os.path.dirname(os.path.dirname(request.input_root)) == str(tmp_path)
    assert not request.stdout_path.startswith(request.input_root + os.sep)  # the command cannot see it
    # An empty directory the sandbox's uid can reach (pytest's tmp dirs are 0700).
    assert runner.roots == [(True, [], 0o755, 0o755)]
    assert os.listdir(tmp_path) == []  # cleaned up


def test_runner_probe_can_run_each_time(tmp_path):
    runner = FakeRunner()
    probe = runner_probe(runner, str(tmp_path), command="/usr/bin/env")
    assert probe() is None and probe() is None
    assert [r.arguments for r in runner.requests] == [("/usr/bin/env",)] * 2
    assert runner.requests[0].input_root != runner.requests[1].input_root


def test_runner_probe_non_zero_exit_gives_the_code_and_what_it_said(tmp_path):
    runner = FakeRunner(exit_code=1, output=b"bwrap: Can't mount proc on /newroot/proc: Operation not permitted\n")
    reason = runner_probe(runner, str(tmp_path))()
    assert reason == "a trivial sandbox (/bin/true) exited 1: bwrap: Can't mount proc on /newroot/proc: Operation not permitted"
    assert os.listdir(tmp_path) == []


def test_runner_probe_keeps_only_the_end_of_a_long_output(tmp_path):
    runner = FakeRunner(exit_code=137, output=b"a" * 1000 + b"b" * 300)
    reason = runner_probe(runner, str(tmp_path))()
    assert reason is not None and reason.endswith(": " + "b" * 300)


def test_runner_probe_setup_error_gives_the_reason(tmp_path):
    runner = FakeRunner(error=SandboxSetupError("bwrap: setting up uid map: Permission denied"))
    reason = runner_probe(runner, str(tmp_path))()
    assert reason == "a trivial sandbox could not be set up: bwrap: setting up uid map: Permission denied"
    assert os.listdir(tmp_path) == []


def test_runner_probe_failure_fails_the_sandbox_check(tmp_path):
    clock = FakeClock()
    check = SandboxCheck(runner_probe(FakeRunner(exit_code=2), str(tmp_path)), clock=clock)
    result = check.evaluate(clock())
    assert result.level is Level.UNHEALTHY and result.reason.startswith("a trivial sandbox (/bin/true) exited 2")


# ---- the monitor ---------------------------------------------------------------------------


def test_monitor_refuses_duplicate_check_names():
    with pytest.raises(InvalidArgument, match="unique"):
        HealthMonitor([StubCheck("disk"), StubCheck("disk")])


def test_monitor_check_evaluates_every_check_at_its_clocks_time():
    clock = FakeClock(42.0)
    a, b = StubCheck("a"), StubCheck("b", Level.WARNING, "evicting")
    monitor = HealthMonitor([a, b], clock=clock)
    report = monitor.check()
    assert report.checked_at == 42.0 and a.times == [42.0] and b.times == [42.0]
    assert [r.name for r in report.results] == ["a", "b"]
    assert report.ok and report.reasons == () and report.warnings == ("evicting",)
    assert monitor.checks == (a, b)


def test_monitor_report_checks_once_then_returns_the_latest_without_checking():
    clock = FakeClock()
    a = StubCheck("a")
    monitor = HealthMonitor([a], clock=clock)
    first = monitor.report()
    assert len(a.times) == 1
    clock.advance(10)
    assert monitor.report() is first and monitor.healthy() == (True, ())
    assert len(a.times) == 1
    a.level, a.reason = Level.UNHEALTHY, "disk full"
    assert monitor.healthy() == (True, ())  # not checked again yet
    monitor.check()
    assert monitor.healthy() == (False, ("disk full",))


def test_monitor_healthy_gives_every_unhealthy_reason_and_no_warnings():
    monitor = HealthMonitor([
        StubCheck("scheduler", Level.UNHEALTHY, "scheduler not reached"),
        StubCheck("cache_disk", Level.WARNING, "evicting"),
        StubCheck("sandbox", Level.UNHEALTHY, "bwrap missing"),
    ])
    assert monitor.healthy() == (False, ("scheduler not reached", "bwrap missing"))


def test_monitor_a_check_that_raises_is_unhealthy_and_the_others_still_run():
    broken, fine = StubCheck("broken"), StubCheck("fine")
    broken.error = ValueError("oops")
    report = HealthMonitor([broken, fine]).check()
    assert report.results[0] == CheckResult("broken", Level.UNHEALTHY, "broken: the check itself failed: ValueError('oops')")
    assert report.results[1] == CheckResult("fine", Level.OK) and fine.times


def test_monitor_routes_scheduler_contacts_to_the_scheduler_check():
    clock, probe = FakeClock(), FakeProbe()
    monitor = HealthMonitor([SchedulerCheck(60, clock=clock), sandbox_check(probe, clock)], clock=clock)
    monitor.record_scheduler_contact(False, "unavailable")
    report = monitor.check()
    assert report.ok and report.warnings == ("1 scheduler call(s) failed in a row (last error: unavailable)",)
    clock.advance(61)
    assert monitor.check().reasons == ("scheduler not reached for 61 s (grace 60 s) (last error: unavailable)",)
    monitor.record_scheduler_contact(True)
    assert monitor.check().ok
    assert monitor.healthy() == (True, ())


def test_monitor_routes_outcomes_to_the_sandbox_check():
    clock, probe = FakeClock(), FakeProbe()
    monitor = HealthMonitor([SchedulerCheck(60, clock=clock), sandbox_check(probe, clock)], clock=clock)
    assert monitor.check().ok
    probe.answer = "a trivial sandbox could not be set up: bwrap: No permissions"
    monitor.record_outcome(SETUP_FAILURE)  # the probe is due at once, 300 s early
    ok, reasons = monitor.check().ok, monitor.healthy()[1]
    assert not ok and reasons == (probe.answer,)


def test_monitor_report_as_json():
    report = HealthReport((
        CheckResult("scheduler", Level.OK),
        CheckResult("cache_disk", Level.UNHEALTHY, "disk full"),
    ), checked_at=1.0)
    assert report.to_json() == {
        "status": "unhealthy",
        "reasons": ["disk full"],
        "checks": {"scheduler": {"level": "ok", "reason": ""}, "cache_disk": {"level": "unhealthy", "reason": "disk full"}},
    }
    assert HealthReport((CheckResult("a", Level.WARNING, "w"),), 0.0).to_json()["status"] == "ok"


def test_monitor_logs_changes_of_level_not_every_report(caplog):
    check = StubCheck("cache_disk")
    monitor = HealthMonitor([check])
    caplog.set_level(logging.INFO, logger="reapi_worker.health")
    monitor.check()
    assert caplog.records == []
    check.level, check.reason = Level.UNHEALTHY, "disk full"
    monitor.check()
    monitor.check()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["health: cache_disk is UNHEALTHY: disk full", "health: taking no work: disk full"]
    caplog.clear()
    check.level, check.reason = Level.OK, ""
    monitor.check()
    assert [r.getMessage() for r in caplog.records] == ["health: cache_disk is OK again", "health: taking work again"]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def _health_thread(before: list[threading.Thread]) -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == "reapi-worker-health" and t not in before]
    return thread


def test_monitor_start_checks_now_then_on_its_thread_until_closed():
    check = StubCheck("a")
    monitor = HealthMonitor([check])
    before = threading.enumerate()
    assert monitor.start(interval=0.01) is monitor
    try:
        assert len(check.times) >= 1  # checked before start returned
        thread = _health_thread(before)
        assert thread.daemon and thread.is_alive()
        assert check.evaluated_thrice.wait(10), "the monitor's thread never checked again"
        with pytest.raises(RuntimeError, match="already started"):
            monitor.start()
    finally:
        monitor.close()
    assert not thread.is_alive()
    evaluations = len(check.times)
    monitor.report()
    assert len(check.times) == evaluations  # the thread is gone and report() does not check
    monitor.close()  # idempotent


def test_monitor_close_without_start_and_as_a_context_manager():
    HealthMonitor([StubCheck("a")]).close()
    before = threading.enumerate()
    with HealthMonitor([StubCheck("a")]) as monitor:
        monitor.start(interval=60)
        thread = _health_thread(before)
    assert not thread.is_alive()


# ---- the recording executor ----------------------------------------------------------------


class OneOutcomeExecutor:
    """An ActionExecutor that returns ``outcome`` (or raises ``error``), recording its calls."""

    def __init__(self, result: Outcome | None = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.calls: list[tuple[Digest, re_pb2.Action | None, threading.Event | None]] = []

    def execute(self, action_digest, action=None, cancel=None) -> Outcome:
        self.calls.append((action_digest, action, cancel))
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def test_recording_executor_shows_every_outcome_to_the_monitor():
    clock, probe = FakeClock(), FakeProbe()
    monitor = HealthMonitor([sandbox_check(probe, clock)], clock=clock)
    assert monitor.check().ok
    inner = OneOutcomeExecutor(SETUP_FAILURE)
    executor = HealthRecordingExecutor(inner, monitor)
    digest, act, cancel = Digest.of_bytes(b"action"), re_pb2.Action(), threading.Event()
    assert executor.execute(digest, act, cancel) is SETUP_FAILURE
    assert inner.calls == [(digest, act, cancel)]
    assert monitor.check().ok and probe.calls == 2  # shown: the probe ran at once, and passed


def test_recording_executor_passes_a_healthy_outcome_and_an_error_through():
    clock, probe = FakeClock(), FakeProbe()
    monitor = HealthMonitor([sandbox_check(probe, clock)], clock=clock)
    fine = outcome(exit_code=1)
    assert HealthRecordingExecutor(OneOutcomeExecutor(fine), monitor).execute(Digest.of_bytes(b"a")) is fine
    with pytest.raises(RuntimeError, match="executor bug"):
        HealthRecordingExecutor(OneOutcomeExecutor(error=RuntimeError("executor bug")), monitor).execute(Digest.of_bytes(b"b"))
    assert monitor.check().ok


# ---- the standard checks -------------------------------------------------------------------


def test_standard_checks_with_and_without_a_probe(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "builds").mkdir()
    disk = FakeDisk(total=100 * GiB, free=50 * GiB)
    clock = FakeClock()
    dirs = {"cache_dir": str(tmp_path / "cache"), "build_root": str(tmp_path / "builds")}
    settings = HealthConfig(scheduler_grace_seconds=30.0)
    checks = standard_checks(settings, **dirs, cache=None, probe=FakeProbe(), clock=clock, statvfs=disk.statvfs)
    assert [c.name for c in checks] == ["scheduler", "cache_disk", "build_root_disk", "sandbox"]
    monitor = HealthMonitor(checks, clock=clock)
    assert monitor.check().ok
    clock.advance(31)  # the settings' grace period, not the default 60 s
    assert not monitor.check().ok
    without = standard_checks(settings, **dirs, cache=None, probe=None, clock=clock, statvfs=disk.statvfs)
    assert [c.name for c in without] == ["scheduler", "cache_disk", "build_root_disk"]


def test_the_monitor_thread_survives_a_round_that_raises(caplog):
    """A bug outside the checks (here: the clock) costs one round, never the monitor."""
    calls = []

    def clock() -> float:
        calls.append(None)
        if len(calls) == 2:  # the thread's first round
            raise RuntimeError("a broken clock")
        return float(len(calls))

    check = StubCheck("a")
    monitor = HealthMonitor([check], clock=clock)
    with caplog.at_level(logging.ERROR):
        monitor.start(interval=0.01)
        try:
            assert check.evaluated_thrice.wait(10), "the monitor's thread died with the failed round"
        finally:
            monitor.close()
    assert "a broken clock" in caplog.text
