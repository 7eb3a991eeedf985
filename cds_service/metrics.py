"""Prometheus metrics (``GET /metrics``): calls by service, outcome and status, latency histograms,
FHIR fetch latency and failures, refusals by reason.

Under gunicorn every worker is its own process: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder
before the workers start (the shipped gunicorn configuration does, and marks dead workers' files),
and ``/metrics`` then adds up every worker's values. Without it the values are this process's.
"""
from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram,
                               generate_latest, multiprocess)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CALLS = Counter("crs_cds_calls", "CDS Hooks service calls and feedback posts, by service, outcome and HTTP status",
                ["service", "outcome", "status"])
CALL_SECONDS = Histogram("crs_cds_call_seconds", "Time to answer a service call or feedback post",
                         ["service"], buckets=_LATENCY_BUCKETS)
FHIR_FETCH_SECONDS = Histogram("crs_cds_fhir_fetch_seconds",
                               "Time spent fetching the missing prefetch keys of one call from its FHIR server",
                               buckets=_LATENCY_BUCKETS)
FHIR_FETCH_FAILURES = Counter("crs_cds_fhir_fetch_failures", "Prefetch keys the FHIR server did not deliver")
REFUSALS = Counter("crs_cds_refusals", "Requests refused, by reason", ["reason"])


def record_call(service: str, outcome: str, status: int, seconds: float) -> None:
    CALLS.labels(service, outcome, str(status)).inc()
    CALL_SECONDS.labels(service).observe(seconds)


def record_refusal(reason: str) -> None:
    REFUSALS.labels(reason).inc()


def record_fhir_fetch(seconds: float, failed_keys: int) -> None:
    FHIR_FETCH_SECONDS.observe(seconds)
    if failed_keys:
        FHIR_FETCH_FAILURES.inc(failed_keys)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric: summed over gunicorn's workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Gunicorn's ``child_exit``: the dead worker's live gauges are dropped (counters are kept)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


__all__ = ["exposition", "record_call", "record_fhir_fetch", "record_refusal", "worker_exited"]
