"""WorkerMetrics on fake sources (read back through Prometheus' own parser), the
instrumented executor, and the HTTP endpoint on a loopback port."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reapi_worker.protos import code_pb2, re_pb2, status_pb2
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import TransferStats
from reapi_worker.storage.local_cas import CacheStats
from reapi_worker.worker.executor import PHASES, Outcome
from reapi_worker.worker.health import CheckResult, DiskUsage, HealthReport, Level
from reapi_worker.worker.metrics import METRICS, PREFIX, InstrumentedExecutor, MetricsServer, WorkerMetrics, code_name

P = PREFIX + "_"


# ---- fakes ---------------------------------------------------------------------------------


class FakeCache:
    def __init__(self, stats: CacheStats) -> None:
        self.value = stats
        self.error: Exception | None = None

    def stats(self) -> CacheStats:
        if self.error is not None:
            raise self.error
        return self.value


class FakeTransfers:
    def __init__(self, stats: TransferStats) -> None:
        self.value = stats

    def stats(self) -> TransferStats:
        return self.value


class FakeHealth:
    """A health source whose report a test sets."""

    def __init__(self, report: HealthReport) -> None:
        self.value = report

    def report(self) -> HealthReport:
        return self.value


HEALTHY = HealthReport((CheckResult("scheduler", Level.OK),), checked_at=0.0)
UNHEALTHY = HealthReport((
    CheckResult("scheduler", Level.OK),
    CheckResult("cache_disk", Level.WARNING, "evicting", DiskUsage("/cache", 9 * 2**30, 100 * 2**30)),
    CheckResult("build_root_disk", Level.UNHEALTHY, "disk full", DiskUsage("/builds", 2**30, 50 * 2**30)),
    CheckResult("sandbox", Level.UNHEALTHY, "bwrap missing"),
), checked_at=0.0)

CACHE = CacheStats(hits=11, misses=3, evictions=2, bytes_evicted=4096, size_bytes=5000, max_bytes=10000)
TRANSFERS = TransferStats(blobs_fetched=7, bytes_fetched=700, blobs_uploaded=5, bytes_uploaded=500)


def outcome(code: int = code_pb2.OK, phase: str | None = None, phases: dict[str, float] | None = None) -> Outcome:
    return Outcome(
        status=status_pb2.Status(code=code, message="fake"), result=re_pb2.ActionResult(),
        phases=dict(phases or {}), failed_phase=phase,
    )


# ---- reading the exposition back -----------------------------------------------------------


def families(metrics: WorkerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families(metrics).values() for s in family.samples
    }


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    """One sample's value, ``None`` when the exposition has no such series."""
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


# ---- counters the bot and the executor feed -------------------------------------------------


def test_a_new_worker_shows_zeros_not_missing_series():
    m = WorkerMetrics()
    assert value(m, P + "leases_received_total") == 0
    assert value(m, P + "leases_finished_total", outcome="completed", code="OK") == 0
    assert value(m, P + "active_actions") == 0
    for phase in PHASES:
        assert value(m, P + "phase_duration_seconds_count", phase=phase) == 0
    assert value(m, P + "sandbox_setup_failures_total") == 0
    assert value(m, P + "session_reconnects_total") == 0


def test_without_sources_their_families_are_absent():
    names = set(families(WorkerMetrics()))
    assert not {P + "cache_hits", P + "cas_fetched_blobs", P + "healthy"} & names


def test_each_worker_has_a_registry_of_its_own():
    a, b = WorkerMetrics(), WorkerMetrics()
    a.record_lease_received()
    assert (value(a, P + "leases_received_total"), value(b, P + "leases_received_total")) == (1, 0)


def test_leases_received_and_session_reconnects():
    m = WorkerMetrics()
    for _ in range(3):
        m.record_lease_received()
    m.record_session_reconnect()
    assert value(m, P + "leases_received_total") == 3
    assert value(m, P + "session_reconnects_total") == 1


@pytest.mark.parametrize(
    "code, label, name",
    [
        (code_pb2.OK, "completed", "OK"),
        (code_pb2.UNAVAILABLE, "failed", "UNAVAILABLE"),
        (code_pb2.CANCELLED, "cancelled", "CANCELLED"),
        (99, "failed", "99"),  # not a google.rpc code: kept as a number
    ],
)
def test_leases_finished_by_outcome_and_code(code, label, name):
    m = WorkerMetrics()
    m.record_lease_finished(code)
    m.record_lease_finished(code)
    assert value(m, P + "leases_finished_total", outcome=label, code=name) == 2
    assert code_name(code) == name


def test_an_executed_action_counts_its_phases_and_how_it_ended():
    m = WorkerMetrics()
    m.record_outcome(outcome(phases={"fetch": 0.002, "stage": 0.0004, "run": 1.5, "upload": 0.2}))
    m.record_outcome(outcome(phases={"fetch": 0.003, "stage": 0.0001, "run": 0.7, "upload": 0.1}))
    assert value(m, P + "leases_finished_total", outcome="completed", code="OK") == 2
    for phase in PHASES:
        assert value(m, P + "phase_duration_seconds_count", phase=phase) == 2
    assert value(m, P + "phase_duration_seconds_sum", phase="run") == pytest.approx(2.2)
    assert value(m, P + "phase_duration_seconds_bucket", phase="run", le="1.0") == 1
    assert value(m, P + "phase_duration_seconds_bucket", phase="run", le="2.5") == 2
    assert value(m, P + "phase_duration_seconds_bucket", phase="stage", le="0.001") == 2
    assert P + "action_failures" in families(m) and not families(m)[P + "action_failures"].samples


def test_a_failed_action_counts_only_the_phases_it_finished():
    m = WorkerMetrics()
    m.record_outcome(outcome(code_pb2.FAILED_PRECONDITION, "stage", phases={"fetch": 0.01}))
    assert value(m, P + "phase_duration_seconds_count", phase="fetch") == 1
    assert value(m, P + "phase_duration_seconds_count", phase="stage") == 0
    assert value(m, P + "leases_finished_total", outcome="failed", code="FAILED_PRECONDITION") == 1
    assert value(m, P + "action_failures_total", phase="stage", code="FAILED_PRECONDITION") == 1


def test_action_failures_by_phase_and_code_and_sandbox_setup_failures():
    m = WorkerMetrics()
    m.record_outcome(outcome(code_pb2.INTERNAL, "run"))  # the sandbox could not be set up
    m.record_outcome(outcome(code_pb2.INTERNAL, "run"))
    m.record_outcome(outcome(code_pb2.DEADLINE_EXCEEDED, "run"))
    m.record_outcome(outcome(code_pb2.INTERNAL, "upload"))
    m.record_outcome(outcome(code_pb2.UNKNOWN, None))
    assert value(m, P + "action_failures_total", phase="run", code="INTERNAL") == 2
    assert value(m, P + "action_failures_total", phase="run", code="DEADLINE_EXCEEDED") == 1
    assert value(m, P + "action_failures_total", phase="upload", code="INTERNAL") == 1
    assert value(m, P + "action_failures_total", phase="unknown", code="UNKNOWN") == 1
    assert value(m, P + "sandbox_setup_failures_total") == 2
    assert value(m, P + "leases_finished_total", outcome="failed", code="INTERNAL") == 3


def test_a_cancelled_action_is_not_a_failure():
    m = WorkerMetrics()
    m.record_outcome(outcome(code_pb2.CANCELLED, "run", phases={"fetch": 0.1}))
    assert value(m, P + "leases_finished_total", outcome="cancelled", code="CANCELLED") == 1
    assert not families(m)[P + "action_failures"].samples
    assert value(m, P + "sandbox_setup_failures_total") == 0


# ---- figures read at scrape time -----------------------------------------------------------


def test_cache_figures_are_read_at_every_scrape():
    cache = FakeCache(CACHE)
    m = WorkerMetrics(cache=cache)
    assert value(m, P + "cache_size_bytes") == 5000
    assert value(m, P + "cache_max_bytes") == 10000
    assert value(m, P + "cache_hits_total") == 11
    assert value(m, P + "cache_misses_total") == 3
    assert value(m, P + "cache_evictions_total") == 2
    assert value(m, P + "cache_evicted_bytes_total") == 4096
    cache.value = CacheStats(hits=12, misses=3, evictions=2, bytes_evicted=4096, size_bytes=6000, max_bytes=10000)
    assert value(m, P + "cache_hits_total") == 12 and value(m, P + "cache_size_bytes") == 6000
    assert families(m)[P + "cache_hits"].type == "counter"
    assert families(m)[P + "cache_size_bytes"].type == "gauge"


def test_transfer_figures_are_read_at_every_scrape():
    transfers = FakeTransfers(TRANSFERS)
    m = WorkerMetrics(transfers=transfers)
    assert value(m, P + "cas_fetched_blobs_total") == 7
    assert value(m, P + "cas_fetched_bytes_total") == 700
    assert value(m, P + "cas_uploaded_blobs_total") == 5
    assert value(m, P + "cas_uploaded_bytes_total") == 500
    transfers.value = TransferStats(blobs_fetched=8, bytes_fetched=800)
    assert value(m, P + "cas_fetched_blobs_total") == 8 and value(m, P + "cas_uploaded_blobs_total") == 0


def test_health_gauges_show_each_check_and_each_disk():
    health = FakeHealth(UNHEALTHY)
    m = WorkerMetrics(health=health)
    assert value(m, P + "healthy") == 0
    assert value(m, P + "health_check_level", check="scheduler") == 0
    assert value(m, P + "health_check_level", check="cache_disk") == 1
    assert value(m, P + "health_check_level", check="build_root_disk") == 2
    assert value(m, P + "health_check_level", check="sandbox") == 2
    assert value(m, P + "disk_free_bytes", check="cache_disk") == 9 * 2**30
    assert value(m, P + "disk_size_bytes", check="build_root_disk") == 50 * 2**30
    assert value(m, P + "disk_free_bytes", check="sandbox") is None  # not a disk
    health.value = HEALTHY
    assert value(m, P + "healthy") == 1


def test_a_source_that_raises_loses_only_its_own_figures():
    cache = FakeCache(CACHE)
    cache.error = OSError("cache closed")
    m = WorkerMetrics(cache=cache, transfers=FakeTransfers(TRANSFERS), health=FakeHealth(HEALTHY))
    names = set(families(m))
    assert P + "cache_hits" not in names
    assert value(m, P + "cas_fetched_blobs_total") == 7 and value(m, P + "healthy") == 1
    cache.error = None
    assert value(m, P + "cache_hits_total") == 11


def test_every_documented_name_is_exported_and_every_exported_name_is_documented():
    m = WorkerMetrics(cache=FakeCache(CACHE), transfers=FakeTransfers(TRANSFERS), health=FakeHealth(UNHEALTHY))
    exported = families(m)
    missing = [name for name in METRICS if name not in exported]
    assert missing == []
    undocumented = [n for n in exported if n.startswith(P) and not n.endswith("_created") and n not in METRICS]
    assert undocumented == []
    for name, help_text in METRICS.items():
        assert exported[name].documentation == help_text


# ---- the instrumented executor -------------------------------------------------------------


class ProbingExecutor:
    """An ActionExecutor that reads the active-actions gauge from inside ``execute``, then
    returns ``result`` (or raises ``error``)."""

    def __init__(self, metrics: WorkerMetrics, result: Outcome | None = None, error: Exception | None = None) -> None:
        self.metrics, self.result, self.error = metrics, result, error
        self.active_during: list[float | None] = []
        self.calls: list[tuple] = []

    def execute(self, action_digest, action=None, cancel=None) -> Outcome:
        self.calls.append((action_digest, action, cancel))
        self.active_during.append(value(self.metrics, P + "active_actions"))
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def test_instrumented_executor_tracks_active_actions_and_records_the_outcome():
    m = WorkerMetrics()
    done = outcome(phases={"fetch": 0.01, "run": 0.5})
    inner = ProbingExecutor(m, done)
    digest, act, cancel = Digest.of_bytes(b"action"), re_pb2.Action(), threading.Event()
    assert InstrumentedExecutor(inner, m).execute(digest, act, cancel) is done
    assert inner.calls == [(digest, act, cancel)]
    assert inner.active_during == [1]
    assert value(m, P + "active_actions") == 0
    assert value(m, P + "leases_finished_total", outcome="completed", code="OK") == 1
    assert value(m, P + "phase_duration_seconds_count", phase="run") == 1


def test_instrumented_executor_that_raises_counts_internal_and_raises_on():
    m = WorkerMetrics()
    inner = ProbingExecutor(m, error=RuntimeError("executor bug"))
    with pytest.raises(RuntimeError, match="executor bug"):
        InstrumentedExecutor(inner, m).execute(Digest.of_bytes(b"action"))
    assert inner.active_during == [1]
    assert value(m, P + "active_actions") == 0
    assert value(m, P + "leases_finished_total", outcome="failed", code="INTERNAL") == 1
    assert value(m, P + "leases_finished_total", outcome="completed", code="OK") == 0


# ---- the HTTP endpoint ---------------------------------------------------------------------


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


@pytest.fixture
def health():
    return FakeHealth(HEALTHY)


@pytest.fixture
def served(health):
    metrics = WorkerMetrics(health=health)
    with MetricsServer(metrics, health, port=0, host="127.0.0.1") as server:
        yield metrics, server


def test_server_serves_metrics_in_the_text_format(served):
    metrics, server = served
    metrics.record_lease_received()
    status, content_type, body = get(server.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert parsed[P + "leases_received"].samples[0].value == 1
    assert parsed[P + "healthy"].samples[0].value == 1


def test_server_serves_openmetrics_when_asked_and_ignores_a_query(served):
    _, server = served
    status, content_type, body = get(server.port, "/metrics?x=1", {"Accept": "application/openmetrics-text"})
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_server_healthz_is_200_while_healthy(served):
    _, server = served
    status, content_type, body = get(server.port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "reasons": [], "checks": {"scheduler": {"level": "ok", "reason": ""}}}


def test_server_healthz_is_503_with_the_reasons_while_unhealthy(served, health):
    _, server = served
    health.value = UNHEALTHY
    status, _, body = get(server.port, "/healthz")
    document = json.loads(body)
    assert status == 503
    assert document["status"] == "unhealthy" and document["reasons"] == ["disk full", "bwrap missing"]
    assert document["checks"]["cache_disk"] == {"level": "warning", "reason": "evicting"}
    health.value = HEALTHY
    assert get(server.port, "/healthz")[0] == 200


def test_server_without_health_says_ok():
    with MetricsServer(WorkerMetrics(), None, port=0, host="127.0.0.1") as server:
        status, _, body = get(server.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_server_livez_and_unknown_paths(served, health):
    _, server = served
    health.value = UNHEALTHY  # liveness does not depend on health
    assert get(server.port, "/livez") == (200, "text/plain; charset=utf-8", b"ok\n")
    assert get(server.port, "/nope")[0] == 404
    assert get(server.port, "/metrics/extra")[0] == 404


def test_server_port_is_known_only_once_started():
    server = MetricsServer(WorkerMetrics(), None, port=0, host="127.0.0.1")
    with pytest.raises(RuntimeError, match="not started"):
        server.port
    server.close()  # idempotent, even before start


def test_server_refuses_a_port_that_is_taken(served):
    _, server = served
    with pytest.raises(OSError):
        MetricsServer(WorkerMetrics(), None, port=server.port, host="127.0.0.1").start()


def test_server_close_releases_the_port():
    server = MetricsServer(WorkerMetrics(), None, port=0, host="127.0.0.1").start()
    port = server.port
    assert get(port, "/livez")[0] == 200
    server.close()
    server.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # A worker restarted on its configured port binds it again.
    with MetricsServer(WorkerMetrics(), None, port=port, host="127.0.0.1") as again:
        assert again.port == port and get(port, "/livez")[0] == 200
