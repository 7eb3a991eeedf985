"""The HTTP edge: discovery, service calls and feedback, with errors mapped to statuses here only.

Every route of the blueprint is ``@authenticated``: the CDS client first (``auth.Authenticator``;
CORS preflight OPTIONS excepted), a failure is a bare 401.
"""
from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timezone
from functools import lru_cache, wraps
from typing import TYPE_CHECKING, Callable

import jsonschema
import jsonschema_rs
from flask import Blueprint, Request, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, Unauthorized
from .auth import AuthenticatedClient
from .cards import add_app_link
from .openapi import load_schema_file
from .registry import SERVICES, SERVICES_BY_ID, gather, prefetch_templates

if TYPE_CHECKING:
    from ..app import ServiceState

log = logging.getLogger("crs_cds.hooks")

blueprint = Blueprint("cds_hooks", __name__)
NO_CARDS = '{"cards":[]}'
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once: json.dumps with options makes one a call
_LINE_ENCODER = json.JSONEncoder()  # the log line's values: json.dumps's text, without its argument checks


@lru_cache(maxsize=None)
def schema_validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema_file(name)  # the same files the OpenAPI document embeds (openapi.py)
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)


class SchemaCheck:
    """One schema, compiled twice: jsonschema-rs says whether a body is valid in about 1 us (jsonschema
    takes 160 us for a small request, a fifth of the whole call); jsonschema, when it is not, finds
    the first violation to explain."""

    def __init__(self, explainer: jsonschema.protocols.Validator):
        self.explainer = explainer
        self.is_valid = jsonschema_rs.validator_for(explainer.schema).is_valid


@lru_cache(maxsize=None)
def schema_check(name: str) -> SchemaCheck:
    return SchemaCheck(schema_validator(name))


def _first_error(check: SchemaCheck, instance, where: str) -> str | None:
    if check.is_valid(instance):  # the common case, and the cheap one
        return None
    errors = check.explainer.iter_errors(instance)
    error = next(iter(sorted(errors, key=lambda e: list(e.absolute_path))), None)
    if error is None:
        return None
    path = ".".join(_short(str(p), 80) for p in error.absolute_path)
    return f"{where}{'.' + path if path else ''}: {_what_is_wrong(error)}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _what_is_wrong(error: jsonschema.ValidationError) -> str:
    """The broken rule, in the schema's words only: jsonschema's own messages quote the offending
    value, which may be an access token or resource contents (this text is logged and sent back)."""
    rule, value = error.validator, error.validator_value
    if rule in ("required", "dependentRequired"):  # names only, and they come from the schema
        return error.message
    wording = {
        "type": lambda: f"must be of type {value if isinstance(value, str) else ' or '.join(value)}",
        "enum": lambda: f"must be one of {', '.join(json.dumps(v) for v in value)}",
        "const": lambda: f"must be {json.dumps(value)}",
        "pattern": lambda: f"must match the pattern {value}",
        "format": lambda: f"must be a valid {value}",
        "minLength": lambda: f"must be at least {value} characters long",
        "maxLength": lambda: f"must be at most {value} characters long",
        "minItems": lambda: f"must have at least {value} items",
        "maxItems": lambda: f"must have at most {value} items",
        "minProperties": lambda: f"must have at least {value} properties",
        "additionalProperties": lambda: "has properties that are not allowed here",
    }.get(rule)
    return _short(wording(), 300) if wording else f"does not satisfy the schema's {rule!r} rule"


def json_response(body, status: int = 200) -> Response:
    return Response(_ENCODER.encode(body), status=status, mimetype="application/json")


def operation_outcome(error: ServiceError) -> dict:
    issue = {"severity": "error", "code": error.code, "diagnostics": error.message}
    if error.expression:
        issue["expression"] = [error.expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _read_json(req: Request, limit: int) -> dict:
    # Werkzeug refuses a Content-Length above the request's limit before reading, and cuts a
    # chunked body there without a word: one byte more, so that a body cut there shows as too
    # long. Set on the request, not read from the app's config through Flask's proxies.
    req.max_content_length = limit + 1
    try:
        raw = req.get_data(cache=False)
        too_large = len(raw) > limit
    except RequestEntityTooLarge:
        too_large = True
    if too_large:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _may_hold_a_surrogate(raw) and _has_lone_surrogate(body):
        # json.loads lets one through; no UTF-8 text (the database, the response) can hold it.
        raise BadRequest("request body is not valid JSON text: a UTF-16 surrogate without its pair")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # U+D800-DFFF in UTF-8's pattern


def _may_hold_a_surrogate(raw: bytes) -> bool:
    """Whether this (valid) JSON text may hold a UTF-16 surrogate, which json.loads lets through:
    escaped ("\\ud800"), encoded as UTF-8 bytes (json.loads decodes bytes with "surrogatepass"),
    or anywhere in a body in UTF-16 or UTF-32, which json.loads reads too.

    Bytes are found with ``find`` (memchr), each backslash in turn: a regular-expression search
    reads the text byte by byte, some 30,000 instructions for a 6 KB request."""
    if raw.find(b"\x00", 0, 4) != -1:  # UTF-16 or -32: a JSON object's first character is ASCII
        return True
    if b"\xed" in raw and _ENCODED_SURROGATE.search(raw):
        return True
    escape = raw.find(b"\\")
    while escape != -1:
        if _SURROGATE_ESCAPE.match(raw, escape):
            return True
        escape = raw.find(b"\\", escape + 2)  # past the escaped character, a backslash too
    return False


def _has_lone_surrogate(body: dict) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@blueprint.errorhandler(ServiceError)
def _service_error(error: ServiceError):
    if isinstance(error, Unauthorized):  # no details: the reason is in the log
        return Response(b"", status=401, headers={"WWW-Authenticate": "Bearer"})
    return json_response(operation_outcome(error), error.status)


def authenticated(view: Callable[..., Response]) -> Callable[..., Response]:
    """A route for CDS clients: the client authenticated first (a failure is a bare 401), then
    ``view(state, req, client, **route_args)`` with the service's state, the request object and the
    verified client (None when auth is off). Flask answers CORS preflight OPTIONS itself, without
    the view: browsers send it without credentials.

    Why not a before_request hook: the request and the app are read once here, not through
    Flask's proxies at each use (every read is a context lookup, ~3 us in a 0.2 ms call)."""
    @wraps(view)
    def view_for_an_authenticated_client(**route_args):
        state = current_app._get_current_object().config["CRS_CDS"]
        req = request._get_current_object()
        return view(state, req, state.auth.authenticate(req), **route_args)

    return view_for_an_authenticated_client


@blueprint.get("/cds-services")
@authenticated
def discovery(state: ServiceState, req: Request, client: AuthenticatedClient | None):
    return json_response({"services": state.discovery})


def validate_hook_request(body: dict, hook: str) -> None:
    problem = _first_error(schema_check("request"), body, "request")
    if problem:
        raise BadRequest(problem)
    if body["hook"] != hook:
        raise BadRequest(f"service expects hook {hook!r}, request has {_short(body['hook'], 60)!r}",
                         expression="hook")
    problem = _first_error(context_check(hook), body["context"], "context")
    if problem:
        raise BadRequest(problem)


@lru_cache(maxsize=None)
def context_check(hook: str) -> SchemaCheck:
    """The request schema's definition of one hook's context, compiled once."""
    defs = schema_validator("request").schema["$defs"]
    return SchemaCheck(jsonschema.Draft202012Validator({**defs[hook], "$defs": defs}))


@blueprint.post("/cds-services/<service_id>")
@authenticated
def call_service(state: ServiceState, req: Request, client: AuthenticatedClient | None, service_id: str):
    started = time.perf_counter()
    service = SERVICES_BY_ID.get(service_id)
    outcome, cards, notes = "error", [], {}
    try:
        if service is None:
            raise NotFound(f"no CDS service {service_id!r}")
        body = _read_json(req, state.settings.max_body_bytes)
        hook_instance = body.get("hookInstance")
        notes["hookInstance"] = _short(hook_instance, 100) if isinstance(hook_instance, str) else None
        validate_hook_request(body, service.hook)
        allowed = state.auth.fhir_server_allowed(body.get("fhirServer"), client)
        now = datetime.fromtimestamp(time.time_ns() // 10**9, timezone.utc)  # whole seconds (replace() costs 3 us)
        call = gather(service, body, state.templates, now, state.protocol, state.terminology, state.zone,
                      state.fhir_client, state.settings, server_allowed=allowed)
        if isinstance(call, str):  # out of scope, told from the scope key alone
            notes.update(scope=call, sources={service.scope_key: "prefetch"})
            outcome = "ok"
            return Response(NO_CARDS, mimetype="application/json")
        cards = service.handler(call)
        if state.settings.smart_link_enabled and cards and (
                not state.settings.smart_link_clients or (client and client.iss in state.settings.smart_link_clients)):
            add_app_link(cards, state.settings.smart_launch_url or
                         f"{(state.settings.external_base_url or req.url_root).rstrip('/')}/smart/launch")
        state.feedback.remember_cards(service_id, body["hookInstance"],
                                      [(card["uuid"], card["source"]["topic"]["code"]) for card in cards])
        notes.update(call.notes)
        outcome = "ok"
        return json_response({"cards": cards})
    except ServiceError as error:
        outcome = f"{error.status}"
        notes["reason"] = error.message
        raise
    finally:
        if log.isEnabledFor(logging.INFO):  # the line costs a JSON encoding: only when it is kept
            _log_call(state.write_call_line, service_id, client, started, outcome, cards, notes)


def _log_call(write_line: Callable[[str], None], service_id: str, client, started: float, outcome: str,
              cards: list[dict], notes: dict) -> None:
    """The call's line: the text json.dumps gives the object of these keys in this order, written
    value by value (~41k instructions in an out-of-scope call, against ~53k to encode one dict)."""
    write_line(
        f'{{"event": "hook-call", "service": {_json(service_id)}, "hookInstance": {_json(notes.get("hookInstance"))}, '
        f'"iss": {_json(client.iss if client is not None else None)}, "outcome": {_json(outcome)}, '
        f'"ms": {round((time.perf_counter() - started) * 1000, 1)!r}, '  # a finite float: repr is json's text
        f'"cards": {_json([card["source"]["topic"]["code"] for card in cards])}, "grades": {_json(notes.get("grades"))}, '
        f'"sources": {_json(notes.get("sources"))}, "read": {_json(notes.get("read"))}, '
        f'"scope": {_json(notes.get("scope"))}, '
        f'"lenient": {_json(notes.get("lenient"))}, "reason": {_json(notes.get("reason"))}}}')


def _json(value) -> str:
    """json.dumps's text of one value; None and the empty list without the encoder's set-up."""
    if value is None:
        return "null"
    if value == []:
        return "[]"
    return _LINE_ENCODER.encode(value)


def log_call_line(line: str) -> None:
    """The hook-call line through logging. A record made directly: log.info would also walk the
    stack for the caller's file and line, which the line does not show."""
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None, "call_service"))


@blueprint.post("/cds-services/<service_id>/feedback")
@authenticated
def feedback(state: ServiceState, req: Request, client: AuthenticatedClient | None, service_id: str):
    if service_id not in SERVICES_BY_ID:
        raise NotFound(f"no CDS service {service_id!r}")
    body = _read_json(req, state.settings.max_body_bytes)
    problem = _first_error(schema_check("feedback"), body, "feedback")
    if problem:
        raise BadRequest(problem)
    stored, duplicates = state.feedback.record_feedback(service_id, body["feedback"])
    log.info(json.dumps({"event": "feedback", "service": service_id, "stored": stored, "duplicates": duplicates}))
    return json_response({"stored": stored, "duplicates": duplicates})


def warm_up_schema_checks() -> None:
    schema_check("request"), schema_check("feedback")
    for hook in {service.hook for service in SERVICES}:
        context_check(hook)


def discovery_document(templates: dict[str, str]) -> list[dict]:
    return [service.discovery(templates) for service in SERVICES]


__all__ = ["blueprint", "discovery_document", "log_call_line", "prefetch_templates", "validate_hook_request",
           "warm_up_schema_checks"]
