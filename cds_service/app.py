"""The Flask application factory. No app object exists at import time."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from .clinical.protocol import Protocol
from .feedback import FeedbackStore
from .fhir.client import FhirClient
from .hooks.api import blueprint, discovery_document, prefetch_templates, warm_up_schema_checks
from .hooks.auth import Authenticator
from .hooks.openapi import openapi_blueprint
from .settings import Settings
from .terminology import load_terminology

log = logging.getLogger("crs_cds")


@dataclass
class ServiceState:
    """Everything loaded once at start-up, so no request pays for it."""

    settings: Settings
    protocol: Protocol
    terminology: Any
    templates: dict[str, str]
    discovery: list[dict]
    fhir_client: FhirClient
    feedback: FeedbackStore
    auth: Authenticator


class LineFormatter(logging.Formatter):
    """``asctime %(levelname)s %(name)s %(message)s``, the date and time text made once a second:
    localtime and strftime for every line were ~15 us of a 0.4 ms out-of-scope call."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._made: tuple[int | None, str] = (None, "")  # one tuple: threads see both or neither

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        made_for, text = self._made
        if second != made_for:
            text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._made = (second, text)
        return f"{text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # The common line without the %-style machinery (which looks for "asctime" in the format
        # for every record): the same text.
        record.message = record.getMessage()
        return f"{self.formatTime(record)} {record.levelname} {record.name} {record.message}"


class LineHandler(logging.StreamHandler):
    """A StreamHandler that does not flush a line-buffered stream (stderr is, since Python 3.9)
    a second time after the newline has: one call and one lock less for every hook call's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            if not getattr(stream, "line_buffering", False):
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def configure_logging() -> None:
    """INFO to stderr (one line per hook call, see hooks/api.py), unless the host configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        handler = LineHandler()
        handler.setFormatter(LineFormatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    settings = config if isinstance(config, Settings) else Settings.load(**dict(config or {}))
    auth = Authenticator.from_settings(settings)  # first: a bad trust configuration stops start-up
    terminology = load_terminology(tuple(settings.terminology_dirs))
    templates = prefetch_templates(terminology)
    state = ServiceState(settings, Protocol.load(settings.protocol_file), terminology, templates,
                         discovery_document(templates), FhirClient(settings), FeedbackStore(settings.feedback_db),
                         auth)
    # Import fhir.resources and compile the request schemas now, not on the first chart open.
    from .clinical.facts import validation_error

    validation_error({"resourceType": "Patient", "id": "warm-up"})
    warm_up_schema_checks()

    app = Flask(__name__)
    app.config["CRS_CDS"] = state
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.register_blueprint(blueprint)
    app.register_blueprint(openapi_blueprint)  # GET /openapi.json, no client JWT (why: hooks/openapi.py)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return _outcome(error.code or 500, error.description or error.name, "processing")

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _outcome(500, "internal error; the service log has the details", "exception")

    @app.after_request
    def cors(response):
        origin = request.environ.get("HTTP_ORIGIN")  # most calls (EHR servers) send none: the cheap look
        allowed = settings.cors_origins
        if origin and ("*" in allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Accept"
            response.headers["Access-Control-Max-Age"] = "600"
            if "*" not in allowed:
                response.headers["Vary"] = "Origin"
        return response

    log.info("crs-cds ready: %d services, protocol %s", len(state.discovery), state.protocol.label)
    return app


def _outcome(status: int, message: str, code: str):
    from .hooks.api import json_response

    return json_response({"resourceType": "OperationOutcome",
                          "issue": [{"severity": "error", "code": code, "diagnostics": message}]}, status)
