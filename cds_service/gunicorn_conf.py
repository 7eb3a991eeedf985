"""Gunicorn configuration for crs-cds: ``gunicorn -c python:cds_service.gunicorn_conf cds_service.wsgi:app``.

Sizes come from the service's settings (``CRS_CDS_CONFIG`` / ``CRS_CDS_*``: workers, threads,
worker_timeout_seconds); the address from ``CRS_CDS_BIND`` (default 127.0.0.1:8080: nginx in front,
deploy/nginx.conf).

* ``gthread`` workers: each call holds one thread, so a call waiting on a slow FHIR server does not
  hold up calls that came with their prefetch (``threads`` of them per worker).
* The database schema is created or migrated once, in the master, before any worker starts.
* A worker killed on timeout, interrupted or dead leaves a line in the error log, with the calls it
  was answering (``worker_abort``/``worker_int``) or at least its exit (``child_exit``).
* Header limits agree with the service's 16 KiB JWT limit (a larger token is the service's 401, not
  gunicorn's 431); nginx's ``large_client_header_buffers`` agree too.
"""
import json
import os
import tempfile

from cds_service.hooks.auth import MAX_TOKEN_CHARS
from cds_service.settings import Settings

_settings = Settings.load()

bind = [os.environ.get("CRS_CDS_BIND", "127.0.0.1:8080")]
workers = _settings.workers
worker_class = "gthread"
threads = _settings.threads
timeout = _settings.worker_timeout_seconds
graceful_timeout = 20
keepalive = 5
# "Authorization: Bearer " and a token of MAX_TOKEN_CHARS, with room to spare.
limit_request_field_size = MAX_TOKEN_CHARS + 1024
limit_request_line = 8190
limit_request_fields = 100
wsgi_app = "cds_service.wsgi:app"

# Metrics of every worker in one place (cds_service/metrics.py); set before any worker imports them.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="crs-cds-metrics-")


def _event(log, level: str, **fields) -> None:
    getattr(log, level)(json.dumps(fields))


def on_starting(server):
    from cds_service.storage import prepare_database

    prepare_database(_settings)  # once, here: workers starting together never race on the schema
    _event(server.log, "info", event="database-ready", database=_describe_database())


def _describe_database() -> str:
    from cds_service.storage import database_url, describe_url

    return describe_url(database_url(_settings))


def _in_flight_calls() -> list[dict]:
    from cds_service.hooks.api import in_flight_calls

    return in_flight_calls()


def worker_abort(worker):
    # SIGABRT: the master killed this worker for timing out; these calls get no answer.
    _event(worker.log, "error", event="worker-timeout", pid=worker.pid, timeout_s=timeout,
           dropped_calls=_in_flight_calls())


def worker_int(worker):
    _event(worker.log, "warning", event="worker-interrupted", pid=worker.pid, dropped_calls=_in_flight_calls())


def child_exit(server, worker):
    # Every worker exit, in the master. A worker killed by a signal (gunicorn adds its own error line,
    # "was sent SIGKILL") or on timeout (aborted) dropped the calls it was answering.
    from cds_service.metrics import worker_exited

    worker_exited(worker.pid)
    timed_out = bool(getattr(worker, "aborted", False))
    _event(server.log, "warning" if timed_out else "info", event="worker-exit", pid=worker.pid, timed_out=timed_out)
