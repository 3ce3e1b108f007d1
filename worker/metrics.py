"""Prometheus metrics of one worker, and the HTTP endpoint that serves them with its health.

Everything lives in a :class:`~prometheus_client.CollectorRegistry` of its own (never the
process-global one), so a test can make as many workers' metrics as it likes.

Where each figure comes from, counted once:

* per action — :class:`InstrumentedExecutor` wraps the executor (as Buildbarn's metrics wrap
  theirs): active actions, each phase's duration, how the lease ended (by google.rpc code),
  failures by phase, sandbox set-up failures;
* per lease, for what the executor never sees — the bot calls
  :meth:`WorkerMetrics.record_lease_received`, :meth:`~WorkerMetrics.record_lease_finished`
  (a lease handed back or refused before it ran) and
  :meth:`~WorkerMetrics.record_session_reconnect`;
* at scrape time — transfers, the local cache and health are read from the objects that
  already count them (``FetchThroughStore.stats()``, ``LocalCAS.stats()``,
  ``HealthMonitor.report()``) by a custom collector: no second set of counters to drift.

The names (all prefixed ``reapi_worker_``) and what they mean are in :data:`METRICS`; the
Grafana dashboard in ``deploy/grafana/`` has a panel for each (a test checks both ways).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.storage.digests import Digest
from reapi_worker.storage.fetch_through import TransferStats
from reapi_worker.storage.local_cas import CacheStats

from .executor import PHASES, ActionExecutor, Outcome, is_sandbox_setup_failure
from .health import HealthReport

log = logging.getLogger("reapi_worker.metrics")

PREFIX = "reapi_worker"

#: Phase durations, in seconds: build actions run from milliseconds (a cached compile
#: step's fetch) to an hour (a long test); roughly three buckets per decade up to 1 h.
PHASE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)

#: Every metric family this module exports: name (without the ``_total`` a counter's
#: samples add) -> help text. The dashboard test reads this.
METRICS: dict[str, str] = {
    f"{PREFIX}_leases_received": "Leases the scheduler assigned to this worker.",
    f"{PREFIX}_leases_finished": "Leases that ended, by outcome (completed, failed, cancelled) and google.rpc code. "
    "Completed means the action ran, whatever its exit code.",
    f"{PREFIX}_active_actions": "Actions being executed now.",
    f"{PREFIX}_phase_duration_seconds": "Duration of each phase of an action: fetch (Action, Command, input tree), "
    "stage (input root made a directory), run (the sandbox), upload (outputs captured and sent).",
    f"{PREFIX}_action_failures": "Actions whose status was not OK (cancellations excepted), by the phase that failed "
    "and google.rpc code.",
    f"{PREFIX}_sandbox_setup_failures": "Actions whose sandbox could not be set up (INTERNAL from the run phase).",
    f"{PREFIX}_session_reconnects": "Bot sessions created again after one was lost or the scheduler was unreachable.",
    f"{PREFIX}_cas_fetched_blobs": "Blobs fetched from the remote CAS into the local cache.",
    f"{PREFIX}_cas_fetched_bytes": "Bytes fetched from the remote CAS into the local cache.",
    f"{PREFIX}_cas_uploaded_blobs": "Blobs uploaded from the local cache to the remote CAS.",
    f"{PREFIX}_cas_uploaded_bytes": "Bytes uploaded from the local cache to the remote CAS.",
    f"{PREFIX}_cache_size_bytes": "Size of the local CAS cache (shared by the workers of this host).",
    f"{PREFIX}_cache_max_bytes": "Size limit of the local CAS cache.",
    f"{PREFIX}_cache_hits": "Blobs found in the local cache.",
    f"{PREFIX}_cache_misses": "Blobs not found in the local cache.",
    f"{PREFIX}_cache_evictions": "Blobs evicted from the local cache by this worker.",
    f"{PREFIX}_cache_evicted_bytes": "Bytes evicted from the local cache by this worker.",
    f"{PREFIX}_healthy": "1 when the worker takes work, 0 when a health check keeps it from doing so.",
    f"{PREFIX}_health_check_level": "Each health check's level: 0 ok, 1 warning (acting on it), 2 unhealthy (no work).",
    f"{PREFIX}_disk_free_bytes": "Free space (for unprivileged use) of the disk a health check watches.",
    f"{PREFIX}_disk_size_bytes": "Size of the disk a health check watches.",
}


class CacheStatsSource(Protocol):
    def stats(self) -> CacheStats: ...


class TransferStatsSource(Protocol):
    def stats(self) -> TransferStats: ...


class HealthSource(Protocol):
    def report(self) -> HealthReport: ...


def code_name(code: int) -> str:
    """``14`` -> ``"UNAVAILABLE"``; a code google.rpc does not define stays a number."""
    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


class WorkerMetrics:
    """One worker's metrics in ``registry`` (a new one unless given).

    ``cache``, ``transfers`` and ``health`` are read at every scrape (each may be ``None``:
    its metrics are then absent). All methods are thread-safe.
    """

    def __init__(
        self,
        *,
        cache: CacheStatsSource | None = None,
        transfers: TransferStatsSource | None = None,
        health: HealthSource | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.leases_received = Counter(*_named("leases_received"), registry=r)
        self.leases_finished = Counter(*_named("leases_finished"), ("outcome", "code"), registry=r)
        self.active_actions = Gauge(*_named("active_actions"), registry=r)
        self.phase_seconds = Histogram(*_named("phase_duration_seconds"), ("phase",), registry=r, buckets=PHASE_BUCKETS)
        self.action_failures = Counter(*_named("action_failures"), ("phase", "code"), registry=r)
        self.sandbox_setup_failures = Counter(*_named("sandbox_setup_failures"), registry=r)
        self.session_reconnects = Counter(*_named("session_reconnects"), registry=r)
        # Series that exist from the start, so rate() and dashboards show 0, not "no data".
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.leases_finished.labels("completed", "OK")
        self.registry.register(_SnapshotCollector(cache, transfers, health))

    # -- what the bot calls ----------------------------------------------------------------

    def record_lease_received(self) -> None:
        self.leases_received.inc()

    def record_lease_finished(self, code: int) -> None:
        """A lease ended with google.rpc ``code`` without an outcome of the executor (handed
        back, refused); :meth:`record_outcome` counts the others."""
        self.leases_finished.labels(_outcome_label(code), code_name(code)).inc()

    def record_session_reconnect(self) -> None:
        self.session_reconnects.inc()

    # -- what InstrumentedExecutor calls ---------------------------------------------------

    def record_outcome(self, outcome: Outcome) -> None:
        """Count an executed action: how it ended, its phases, why it failed."""
        code = outcome.status.code
        self.record_lease_finished(code)
        for phase, seconds in outcome.phases.items():
            self.phase_seconds.labels(phase).observe(seconds)
        if code not in (code_pb2.OK, code_pb2.CANCELLED):
            self.action_failures.labels(outcome.failed_phase or "unknown", code_name(code)).inc()
        if is_sandbox_setup_failure(outcome):
            self.sandbox_setup_failures.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what ``/metrics`` serves by default)."""
        encoder, _ = choose_encoder("")
        return encoder(self.registry)


def _outcome_label(code: int) -> str:
    if code == code_pb2.OK:
        return "completed"
    return "cancelled" if code == code_pb2.CANCELLED else "failed"


class _SnapshotCollector(Collector):
    """Reads the store's, the cache's and the monitor's own figures at scrape time.

    A source that raises (a cache being closed) loses its metrics for that scrape only:
    the rest of ``/metrics`` must still answer.
    """

    def __init__(
        self,
        cache: CacheStatsSource | None,
        transfers: TransferStatsSource | None,
        health: HealthSource | None,
    ) -> None:
        self._cache = cache
        self._transfers = transfers
        self._health = health

    def describe(self) -> Iterator[Metric]:
        # Names only, so the registry can refuse duplicates without reading the sources.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        for source, families in (
            (self._transfers, self._transfer_families),
            (self._cache, self._cache_families),
            (self._health, self._health_families),
        ):
            if source is None:
                continue
            try:
                yield from families()
            except Exception:
                log.warning("metrics: reading %s failed", type(source).__name__, exc_info=True)

    def _transfer_families(self) -> list[Metric]:
        assert self._transfers is not None
        stats = self._transfers.stats()
        return [
            _counter("cas_fetched_blobs", stats.blobs_fetched),
            _counter("cas_fetched_bytes", stats.bytes_fetched),
            _counter("cas_uploaded_blobs", stats.blobs_uploaded),
            _counter("cas_uploaded_bytes", stats.bytes_uploaded),
        ]

    def _cache_families(self) -> list[Metric]:
        assert self._cache is not None
        stats = self._cache.stats()
        return [
            _gauge("cache_size_bytes", stats.size_bytes),
            _gauge("cache_max_bytes", stats.max_bytes),
            _counter("cache_hits", stats.hits),
            _counter("cache_misses", stats.misses),
            _counter("cache_evictions", stats.evictions),
            _counter("cache_evicted_bytes", stats.bytes_evicted),
        ]

    def _health_families(self) -> list[Metric]:
        assert self._health is not None
        report = self._health.report()
        level = _gauge("health_check_level", None, labels=("check",))
        free = _gauge("disk_free_bytes", None, labels=("check",))
        size = _gauge("disk_size_bytes", None, labels=("check",))
        for result in report.results:
            level.add_metric([result.name], int(result.level))
            if result.disk is not None:
                free.add_metric([result.name], result.disk.free_bytes)
                size.add_metric([result.name], result.disk.total_bytes)
        return [_gauge("healthy", 1 if report.ok else 0), level, free, size]


def _named(name: str) -> tuple[str, str]:
    """A family's full name and help text, from :data:`METRICS`."""
    full = f"{PREFIX}_{name}"
    return full, METRICS[full]


def _counter(name: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(*_named(name), value=value)


def _gauge(name: str, value: float | None, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    if labels:
        return GaugeMetricFamily(*_named(name), labels=labels)
    return GaugeMetricFamily(*_named(name), value=value)


class InstrumentedExecutor:
    """Wraps an executor (same ``execute`` contract) and records each action's metrics.

    The wrapped executor never raises by contract; if it does anyway (a bug), the lease
    runner reports INTERNAL, so that is what is counted, and the error goes on up.
    """

    def __init__(self, inner: ActionExecutor, metrics: WorkerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def execute(
        self, action_digest: Digest, action: re_pb2.Action | None = None, cancel: threading.Event | None = None
    ) -> Outcome:
        with self._metrics.active_actions.track_inprogress():
            try:
                outcome = self._inner.execute(action_digest, action, cancel)
            except BaseException:
                self._metrics.record_lease_finished(code_pb2.INTERNAL)
                raise
        self._metrics.record_outcome(outcome)
        return outcome


# ---- the HTTP endpoint ---------------------------------------------------------------------


class MetricsServer:
    """Serves, from a daemon thread, on ``host:port`` (``port`` 0: any free one):

    * ``GET /metrics`` — the registry (text format, or OpenMetrics if the scraper asks);
    * ``GET /healthz`` — 200 and ``{"status": "ok", ...}`` while the worker takes work, 503
      and ``{"status": "unhealthy", "reasons": [...], "checks": {...}}`` while it does not
      (the latest report: never blocks on a check). For readiness and for humans;
    * ``GET /livez`` — 200 ``ok`` while the process answers. For liveness: a worker whose
      scheduler or disk is in trouble must not be restarted (that throws its cache and its
      running actions away and fixes nothing); it reports UNHEALTHY and waits.

    :meth:`start` binds (raising OSError if the port is taken) and serves; :meth:`close`
    stops and releases the port. The caller owns both calls.
    """

    def __init__(self, metrics: WorkerMetrics, health: HealthSource | None, port: int, host: str = "") -> None:
        self._metrics = metrics
        self._health = health
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        host, port = self._address
        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), _handler(self._metrics, self._health))
        self._thread = threading.Thread(target=self._server.serve_forever, name="reapi-worker-metrics", daemon=True)
        self._thread.start()
        log.info("metrics and health served on port %d (/metrics, /healthz, /livez)", self.port)
        return self

    def close(self) -> None:
        """Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(metrics: WorkerMetrics, health: HealthSource | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "reapi-worker"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            route: dict[str, Callable[[], tuple[int, str, bytes]]] = {
                "/metrics": self._metrics,
                "/healthz": self._healthz,
                "/livez": lambda: (200, "text/plain; charset=utf-8", b"ok\n"),
            }
            answer = route.get(path)
            status, content_type, body = answer() if answer else (404, "text/plain; charset=utf-8", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _metrics(self) -> tuple[int, str, bytes]:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            return 200, content_type, encoder(metrics.registry)

        def _healthz(self) -> tuple[int, str, bytes]:
            if health is None:
                document: dict[str, object] = {"status": "ok", "reasons": [], "checks": {}}
                ok = True
            else:
                report = health.report()
                document, ok = report.to_json(), report.ok
            return (200 if ok else 503), "application/json", json.dumps(document, indent=1).encode() + b"\n"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
            log.debug("metrics endpoint: " + format, *args)

    return Handler
