"""The Flask application factory. No app object exists at import time."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .feedback import FeedbackStore
from .fhir.client import FhirClient
from .hooks.api import blueprint, discovery_document, log_call_line, warm_up_schema_checks
from .hooks.api import log as hooks_log
from .hooks.auth import Authenticator
from .hooks.openapi import openapi_blueprint
from .settings import Settings, SettingsError
from .site import Sites
from . import smart

log = logging.getLogger("crs_cds")


@dataclass
class ServiceState:
    """Everything loaded once at start-up, so no request pays for it."""

    settings: Settings
    sites: Sites            # the deployment default and each client profile's site
    discovery: list[dict]
    fhir_client: FhirClient
    feedback: FeedbackStore
    auth: Authenticator
    database: Any  # the SQLAlchemy Engine of feedback, card topics and (unless jti_db) the replay cache
    # Writes each hook call's line: through logging (hooks/api.py ``log_call_line``), or straight
    # to the service's own stderr handler while that is the only place logging would put it.
    write_call_line: Callable[[str], None]


def open_database(settings: Settings):
    """The service's database, its schema brought up to date first (a no-op when gunicorn's master
    already did it, see gunicorn_conf.py). An unusable database stops start-up."""
    from .storage import StorageError, database_url, describe_url, make_engine, prepare_database

    url = database_url(settings)
    try:
        prepare_database(url)
        engine = make_engine(url, pool_size=max(2, settings.threads))
    except StorageError as exc:
        raise SettingsError(str(exc)) from None
    log.info("database: %s", describe_url(url))
    return engine


class LineFormatter(logging.Formatter):
    """``asctime %(levelname)s %(name)s %(message)s``, the date and time text made once a second:
    localtime and strftime for every line were ~15 us of a 0.4 ms out-of-scope call."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._made: tuple[int | None, str] = (None, "")  # one tuple: threads see both or neither

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.time_text(record.created, record.msecs)

    def time_text(self, created: float, msecs: float) -> str:
        """``asctime`` of a record with these ``created`` (seconds since the epoch) and ``msecs``."""
        second = int(created)
        made_for, text = self._made
        if second != made_for:
            text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._made = (second, text)
        return f"{text},{int(msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # The common line without the %-style machinery (which looks for "asctime" in the format
        # for every record): the same text.
        record.message = record.getMessage()
        return f"{self.formatTime(record)} {record.levelname} {record.name} {record.message}"


class LineHandler(logging.StreamHandler):
    """A StreamHandler that does not flush a line-buffered stream (stderr is, since Python 3.9)
    a second time after the newline has: one call and one lock less for every hook call's line.
    ``writer_for`` writes a logger's INFO lines to it without making their records."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self, text: str) -> None:
        stream = self.stream
        stream.write(text)
        if not getattr(stream, "line_buffering", False):
            stream.flush()

    def writer_for(self, logger: logging.Logger, otherwise: Callable[[str], None]) -> Callable[[str], None]:
        """A function that writes an INFO message of ``logger`` as ``logger.handle`` would, straight
        to this handler while logging would send it here and nowhere else (no other handler or
        filter on the way, this handler's level and formatter as they were); through ``otherwise``
        as soon as that changes, e.g. when the host configures logging later. The caller asks
        ``logger.isEnabledFor(logging.INFO)`` first, as ``logger.info`` does.

        Why: making a LogRecord and passing it down the loggers, for the line of every hook call,
        was the largest part of an out-of-scope call's own work (benchmarks/README.md)."""
        formatter = self.formatter
        if not isinstance(formatter, LineFormatter):
            raise TypeError("writer_for needs the handler's LineFormatter")

        def only_here() -> bool:
            if self.filters or self.level > logging.INFO or self.formatter is not formatter or logger.disabled:
                return False
            node = logger
            while node.parent is not None:
                if node.handlers or node.filters or not node.propagate:
                    return False
                node = node.parent
            return len(node.handlers) == 1 and node.handlers[0] is self and not node.filters

        def write(message: str) -> None:
            if not only_here():
                otherwise(message)
                return
            now = time.time()
            text = (f"{formatter.time_text(now, (now - int(now)) * 1000)} INFO {logger.name} {message}"
                    f"{self.terminator}")
            with self.lock:  # as handle() does: threads' lines never interleave
                try:
                    self._write(text)
                except RecursionError:
                    raise
                except Exception:
                    self.handleError(logging.makeLogRecord({"name": logger.name, "msg": message}))

        return write


def configure_logging() -> LineHandler | None:
    """INFO to stderr (one line per hook call, see hooks/api.py), unless the host configured logging.
    Returns the handler when it installed one, for ``create_app(call_lines_to=...)``."""
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = LineHandler()
    handler.setFormatter(LineFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def create_app(config: Settings | Mapping[str, Any] | None = None, *,
               call_lines_to: LineHandler | None = None) -> Flask:
    """``call_lines_to``: the handler ``configure_logging`` installed, which each hook call's line
    is then written to directly while logging would send it there alone (``LineHandler.writer_for``);
    without it the line goes through logging (logger ``crs_cds.hooks``)."""
    settings = config if isinstance(config, Settings) else Settings.load(**dict(config or {}))
    database = open_database(settings)
    auth = Authenticator.from_settings(settings, database)  # a bad trust configuration stops start-up
    sites = Sites.from_settings(settings)
    state = ServiceState(settings, sites, discovery_document(sites.default.templates), FhirClient(settings),
                         FeedbackStore(database), auth, database,
                         call_lines_to.writer_for(hooks_log, otherwise=log_call_line) if call_lines_to
                         else log_call_line)
    warm_up_schema_checks()  # compiled now, not on the first chart open

    app = Flask(__name__)
    app.config["CRS_CDS"] = state
    app.register_blueprint(blueprint)
    app.register_blueprint(openapi_blueprint)  # GET /openapi.json, no client JWT (why: hooks/openapi.py)
    # /smart/: the timeline app, read with the deployment's own site (a launch names a FHIR server,
    # not a CDS client, so no client profile applies)
    smart.init_app(app, settings, sites.default, sites.default.templates, state.fhir_client)

    @app.get("/healthz")
    def healthz():  # alive: the process answers
        return Response('{"status":"ok"}', mimetype="application/json")

    @app.get("/readyz")
    def readyz():  # ready: settings loaded (this app exists) and the database answers
        from .storage import ping

        try:
            ping(state.database)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason is logged
            log.warning("readyz: database unreachable (%s)", type(exc).__name__)
            return Response('{"status":"unavailable","database":"unreachable"}', status=503,
                            mimetype="application/json")
        return Response('{"status":"ok","database":"ok"}', mimetype="application/json")

    @app.get("/metrics")
    def metrics():  # Prometheus text format; scrape it from inside the network (deploy/nginx.conf)
        from .metrics import exposition

        body, content_type = exposition()
        return Response(body, content_type=content_type)

    @app.get("/protocol")
    @app.get("/protocol/<site_name>")
    def protocol_document(site_name: str | None = None):
        """The protocol in force (the deployment's, or a site profile's) as a readable Markdown
        document, which the cards link to. No patient data and nothing the package does not publish:
        no client JWT, so that a clinician can follow the link from a card."""
        from .clinical.protocol import protocol_markdown

        site = state.sites.default if site_name is None else state.sites.named(site_name)
        if site is None:
            return _outcome(404, f"no site profile {site_name[:80]!r}", "not-found")
        return Response(protocol_markdown(site.protocol), mimetype="text/markdown")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return _outcome(error.code or 500, error.description or error.name, "processing")

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _outcome(500, "internal error; the service log has the details", "exception")

    app.wsgi_app = CorsHeaders(app.wsgi_app, settings.cors_origins)
    log.info("crs-cds ready: %d services, protocol %s", len(state.discovery), sites.default.protocol.label)
    return app


class CorsHeaders:
    """WSGI middleware: CORS headers on every answer (errors too) to a browser origin the settings
    allow, e.g. the CDS Hooks Sandbox. Not a Flask after_request hook: most calls come from EHR
    servers, with no Origin, and pass here with one dictionary look-up."""

    def __init__(self, app: Callable, allowed_origins: list[str]):
        self.app = app
        self.any_origin = "*" in allowed_origins
        self.allowed_origins = frozenset(allowed_origins)

    def __call__(self, environ: dict, start_response: Callable):
        origin = environ.get("HTTP_ORIGIN")
        if not origin or not (self.any_origin or origin in self.allowed_origins):
            return self.app(environ, start_response)
        cors = [("Access-Control-Allow-Origin", "*" if self.any_origin else origin),
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept"),
                ("Access-Control-Max-Age", "600")]
        if not self.any_origin:
            cors.append(("Vary", "Origin"))

        def start_with_cors(status: str, headers: list, exc_info=None):
            return start_response(status, [*headers, *cors], exc_info)

        return self.app(environ, start_with_cors)


def _outcome(status: int, message: str, code: str):
    from .hooks.api import json_response

    return json_response({"resourceType": "OperationOutcome",
                          "issue": [{"severity": "error", "code": code, "diagnostics": message}]}, status)
