"""The HTTP edge: discovery, service calls and feedback, with errors mapped to statuses here only.

Every route of the blueprint is ``@authenticated``: the CDS client first (``auth.Authenticator``;
CORS preflight OPTIONS excepted), a failure is a bare 401.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from functools import lru_cache, wraps
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote

import jsonschema
import jsonschema_rs
from flask import Blueprint, Request, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, Unauthorized
from ..metrics import record_call, record_refusal
from .auth import AuthenticatedClient
from .cards import add_app_link
from .openapi import load_schema_file
from .registry import SERVICES, SERVICES_BY_ID, gather

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
    # The first violation only: walking (and sorting) them all costs seconds and gigabytes on a
    # large invalid body.
    error = next(iter(check.explainer.iter_errors(instance)), None)
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


# -- reading the body: bounded in time, size and shape, before any schema looks at it ---------------

MAX_JSON_DEPTH = 64              # FHIR resources nest about 10 levels
MAX_JSON_VALUES = 500_000        # values in one body (a 5 MB prefetch of FHIR JSON holds about 250,000)
MAX_ARRAY_ITEMS = 50_000         # items in one array (fhir_max_resources_per_key is 5,000)
MAX_OBJECT_MEMBERS = 2_000       # members of one object
MAX_STRING_CHARS = 256 * 1024    # characters in one string or member name
MAX_INTEGER = 10**18             # integers beyond +-this are out of range (FHIR's decimals hold 18 digits)


class _BodyDeadlines:
    """One thread per process that ends the body reads which overran their deadline: it shuts the
    connection's reading side, so the blocked read returns at once (end of input) and the call is
    answered with a 400. A per-read socket timeout would not do: a client sending a byte a second
    never lets one read time out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, list] = {}   # id -> [deadline, socket, expired]
        self._next_id = 0
        self._pid: int | None = None

    def watch(self, sock, seconds: float) -> list:
        entry = [time.monotonic() + seconds, sock, False]
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (threads do not survive a fork)
                self._pid = os.getpid()
                self._watched = {}
                threading.Thread(target=self._run, name="crs-cds-body-deadlines", daemon=True).start()
            self._next_id += 1
            entry.append(self._next_id)
            self._watched[self._next_id] = entry
        return entry

    def done(self, entry: list) -> None:
        with self._lock:
            self._watched.pop(entry[3], None)

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                overdue = [entry for entry in self._watched.values() if entry[0] <= now]
                for entry in overdue:
                    entry[2] = True
                    del self._watched[entry[3]]
            for entry in overdue:
                try:
                    entry[1].shutdown(socket.SHUT_RD)
                except OSError:
                    pass


_DEADLINES = _BodyDeadlines()


def _read_body(req: Request, limit: int, timeout: float) -> bytes:
    # Werkzeug refuses a Content-Length above the request's limit before reading, and cuts a
    # chunked body there without a word: one byte more, so that a body cut there shows as too
    # long. Set on the request, not read from the app's config through Flask's proxies.
    req.max_content_length = limit + 1
    environ = req.environ
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    watch = _DEADLINES.watch(sock, timeout) if sock is not None else None
    try:
        raw = req.get_data(cache=False)
        too_large = len(raw) > limit
    except RequestEntityTooLarge:
        too_large = True
    except Exception as exc:  # noqa: BLE001 - the server's reader: bad chunk framing, a body cut short
        if watch is not None and watch[2]:
            raise BadRequest(f"request body not received within {timeout:g} s", kind="body-timeout") from None
        raise BadRequest(f"request body framing is malformed or the body ended early ({type(exc).__name__})",
                         kind="body-framing") from None
    finally:
        if watch is not None:
            _DEADLINES.done(watch)
    if watch is not None and watch[2]:
        raise BadRequest(f"request body not received within {timeout:g} s", kind="body-timeout")
    if too_large:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    return raw


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_json(req: Request, limit: int, timeout: float = 10.0) -> dict:
    raw = _read_body(req, limit, timeout)
    # A cheap bound before parsing: every value but the last of an array or object ends with a comma.
    commas = raw.count(b",")
    if commas > MAX_JSON_VALUES:
        raise BadRequest(f"request body holds more than {MAX_JSON_VALUES} JSON values", kind="json-limits")
    not_finite: list[str] = []

    def finite_float(text: str) -> float:  # 1e400 parses as inf: noted for the shape check
        value = float(text)
        if value - value != 0.0:
            not_finite.append(text)
        return value

    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=finite_float)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", kind="not-json") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply", kind="json-limits") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", kind="not-json")
    check_json_shape(body, raw, exact=bool(not_finite), commas=commas)
    if _may_hold_a_surrogate(raw) and _has_lone_surrogate(body):
        # json.loads lets one through; no UTF-8 text (the database, the response) can hold it.
        raise BadRequest("request body is not valid JSON text: a UTF-16 surrogate without its pair", kind="not-json")
    return body


def _where(path: tuple) -> str:
    return ".".join(_short(str(p), 80) for p in path) or "(the body)"


def check_json_shape(body: dict, raw: bytes, exact: bool = False, commas: int | None = None) -> None:
    """Depth, array and object sizes, string lengths and number ranges of a parsed body, before any
    schema or reading code sees it: a 400 naming the place.

    Why: jsonschema walks every violation of a large invalid body (gigabytes for 5 MB of nulls), and
    a 400-digit integer reaches the reading code's float() as an OverflowError.
    How: too few commas and brackets for too many values, and the same limits as a JSON Schema
    checked in Rust (about 5 ms for a 1 MB prefetch), say "within them"; anything else (a body the
    schema refuses, or ``exact``: a number the parser found not finite) gets the exact walk in
    Python (about 14 ms a megabyte), which names the place."""
    commas = raw.count(b",") if commas is None else commas
    if (not exact and commas + raw.count(b"{") + raw.count(b"[") < MAX_JSON_VALUES
            and _within_limits().is_valid(body)):
        return
    _walk_json_shape(body)


@lru_cache(maxsize=None)
def _within_limits():
    """The shape limits as a JSON Schema, one level of it per level of nesting allowed."""
    def level(n: int) -> dict:
        limits: dict = {"maxLength": MAX_STRING_CHARS, "maximum": MAX_INTEGER, "minimum": -MAX_INTEGER,
                        "maxItems": MAX_ARRAY_ITEMS, "maxProperties": MAX_OBJECT_MEMBERS,
                        "propertyNames": {"maxLength": MAX_STRING_CHARS}}
        if n == MAX_JSON_DEPTH:
            limits["type"] = ["string", "number", "boolean", "null"]
        else:
            limits["items"] = limits["additionalProperties"] = {"$ref": f"#/$defs/level{n + 1}"}
        return limits

    return jsonschema_rs.validator_for({"$ref": "#/$defs/level1",
                                        "$defs": {f"level{n}": level(n) for n in range(1, MAX_JSON_DEPTH + 1)}})


def _walk_json_shape(body: dict) -> None:
    """The exact check, in one walk without recursion. It keeps no path; the place of a violation
    is looked for afterwards."""
    stack: list[tuple[dict | list, int]] = [(body, 1)]
    push, pop = stack.append, stack.pop
    values = 0
    while stack:
        node, depth = pop()
        if depth > MAX_JSON_DEPTH:
            _refuse_shape(body, lambda v, d: d > MAX_JSON_DEPTH and isinstance(v, (dict, list)),
                          f"nested more than {MAX_JSON_DEPTH} levels deep", "json-limits")
        values += len(node)
        if values > MAX_JSON_VALUES:
            raise BadRequest(f"request body holds more than {MAX_JSON_VALUES} JSON values", kind="json-limits")
        if type(node) is dict:
            if len(node) > MAX_OBJECT_MEMBERS:
                _refuse_shape(body, lambda v, d: type(v) is dict and len(v) > MAX_OBJECT_MEMBERS,
                              f"more than {MAX_OBJECT_MEMBERS} members", "json-limits")
            for key in node:
                if len(key) > MAX_STRING_CHARS:
                    _refuse_shape(body, lambda v, d: type(v) is dict and any(len(k) > MAX_STRING_CHARS for k in v),
                                  f"a member name longer than {MAX_STRING_CHARS} characters", "json-limits")
            items = node.values()
        else:
            if len(node) > MAX_ARRAY_ITEMS:
                _refuse_shape(body, lambda v, d: type(v) is list and len(v) > MAX_ARRAY_ITEMS,
                              f"more than {MAX_ARRAY_ITEMS} items", "json-limits")
            items = node
        depth += 1
        for value in items:
            kind = type(value)
            if kind is str:
                if len(value) > MAX_STRING_CHARS:
                    _refuse_shape(body, _too_long, f"longer than {MAX_STRING_CHARS} characters", "json-limits")
            elif kind is dict or kind is list:
                if value:
                    push((value, depth))
            elif kind is int:
                if value > MAX_INTEGER or value < -MAX_INTEGER:
                    _refuse_shape(body, _out_of_range, "number out of range (more than 18 digits)",
                                  "number-out-of-range")
            elif kind is float:
                if value - value != 0.0:  # inf (e.g. 1e400) or nan
                    _refuse_shape(body, _out_of_range, "number out of range", "number-out-of-range")


def _too_long(value, depth: int) -> bool:
    return type(value) is str and len(value) > MAX_STRING_CHARS


def _out_of_range(value, depth: int) -> bool:
    kind = type(value)
    return ((kind is int and (value > MAX_INTEGER or value < -MAX_INTEGER))
            or (kind is float and value - value != 0.0))


def _refuse_shape(body: dict, wrong: Callable, what: str, kind: str):
    """Raise the 400 for the first value (depth first, in document order) that is ``wrong``."""
    stack: list[tuple[object, tuple, int]] = [(body, (), 1)]
    path: tuple = ()
    while stack:
        value, place, depth = stack.pop()
        if wrong(value, depth):
            path = place
            break
        if isinstance(value, dict):
            stack.extend((v, place + (k,), depth + 1) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, place + (i,), depth + 1) for i, v in reversed(list(enumerate(value))))
    where = _where(path)
    raise BadRequest(f"{where}: {what}", kind=kind, expression=where if path else None)


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
        try:
            client = state.auth.authenticate(req)
        except Unauthorized as refused:  # a refusal is logged and counted like a call's
            record_refusal(refused.kind)
            record_call(view.__name__, "refused", refused.status, 0.0)
            log.info(json.dumps({"event": view.__name__, "outcome": "401", "reason": "unauthorized"}))
            raise
        return view(state, req, client, **route_args)

    return view_for_an_authenticated_client


@blueprint.get("/cds-services")
@authenticated
def discovery(state: ServiceState, req: Request, client: AuthenticatedClient | None):
    return json_response({"services": state.discovery})


def validate_hook_request(body: dict, hook: str) -> None:
    problem = _first_error(schema_check("request"), body, "request")
    if problem:
        raise BadRequest(problem, kind="schema")
    if body["hook"] != hook:
        raise BadRequest(f"service expects hook {hook!r}, request has {_short(body['hook'], 60)!r}",
                         expression="hook", kind="wrong-hook")
    problem = _first_error(context_check(hook), body["context"], "context")
    if problem:
        raise BadRequest(problem, kind="schema")


@lru_cache(maxsize=None)
def context_check(hook: str) -> SchemaCheck:
    """The request schema's definition of one hook's context, compiled once."""
    defs = schema_validator("request").schema["$defs"]
    return SchemaCheck(jsonschema.Draft202012Validator({**defs[hook], "$defs": defs}))


# The calls this process is answering, by thread: a worker killed on timeout logs them (gunicorn_conf.py).
_IN_FLIGHT: dict[int, tuple[str, float]] = {}


def in_flight_calls() -> list[dict]:
    now = time.perf_counter()
    return [{"service": _short(service, 100), "running_s": round(now - started, 1)}
            for service, started in list(_IN_FLIGHT.values())]


def protocol_url(state: ServiceState, req: Request, site) -> str:
    """Where this service serves the document of the protocol a site applies (cards link to it)."""
    base = state.settings.external_base_url or req.host_url
    return base.rstrip("/") + "/protocol" + ("" if site is state.sites.default else f"/{quote(site.name, safe='')}")


@blueprint.post("/cds-services/<service_id>")
def call_service(service_id: str):
    # Not @authenticated: a refused client is a refusal like any other, in the call's log line.
    state: ServiceState = current_app._get_current_object().config["CRS_CDS"]
    req = request._get_current_object()
    started = time.perf_counter()
    service = SERVICES_BY_ID.get(service_id)
    outcome, cards, notes, client, status = "error", [], {}, None, 500
    _IN_FLIGHT[threading.get_ident()] = (service_id, started)
    try:
        client = state.auth.authenticate(req)
        if service is None:
            raise NotFound(f"no CDS service {service_id!r}")
        body = _read_json(req, state.settings.max_body_bytes, state.settings.body_read_timeout_seconds)
        hook_instance = body.get("hookInstance")
        notes["hookInstance"] = _short(hook_instance, 100) if isinstance(hook_instance, str) else None
        validate_hook_request(body, service.hook)
        allowed = state.auth.fhir_server_allowed(body.get("fhirServer"), client)
        now = datetime.fromtimestamp(time.time_ns() // 10**9, timezone.utc)  # whole seconds (replace() costs 3 us)
        site = state.sites.for_client(client.iss, client.tenant) if client is not None else state.sites.default
        call = gather(service, body, site, now, state.fhir_client, state.settings, server_allowed=allowed)
        if isinstance(call, str):  # out of scope, told from the scope key alone
            notes.update(scope=call, sources={service.scope_key: "prefetch"})
            outcome, status = "ok", 200
            return Response(NO_CARDS, mimetype="application/json")
        call.quiet_when_normal = state.settings.quiet_when_normal
        call.protocol_url = protocol_url(state, req, site)
        cards = service.handler(call)
        if state.settings.smart_link_enabled and cards and (
                not state.settings.smart_link_clients or (client and client.iss in state.settings.smart_link_clients)):
            # Oracle Health does not pass appContext to the app; elsewhere it names the episode graded.
            context = (json.dumps({"episodeStart": call.episode_start.isoformat()}, separators=(",", ":"))
                       if call.episode_start is not None and site.ehr != "oracle-health" else None)
            add_app_link(cards, state.settings.smart_launch_url or
                         f"{(state.settings.external_base_url or req.url_root).rstrip('/')}/smart/launch", context)
        # Written before the answer leaves: feedback on these cards may arrive at any instance.
        state.feedback.remember_cards(service_id, body["hookInstance"],
                                      [(card["uuid"], card["source"]["topic"]["code"]) for card in cards])
        notes.update(call.notes)
        outcome, status = "ok", 200
        return json_response({"cards": cards})
    except ServiceError as error:
        outcome, status = f"{error.status}", error.status
        notes["reason"] = error.message
        record_refusal(error.kind)
        raise
    finally:
        _IN_FLIGHT.pop(threading.get_ident(), None)
        record_call(service_id if service is not None else "(unknown)", "ok" if status == 200 else
                    ("refused" if status < 500 else "error"), status, time.perf_counter() - started)
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
def feedback(service_id: str):
    state: ServiceState = current_app._get_current_object().config["CRS_CDS"]
    req = request._get_current_object()
    started = time.perf_counter()
    line: dict = {"event": "feedback", "service": _short(service_id, 100), "outcome": "error"}
    status = 500
    _IN_FLIGHT[threading.get_ident()] = (f"{service_id}/feedback", started)
    try:
        client = state.auth.authenticate(req)
        line["iss"] = client.iss if client is not None else None
        if service_id not in SERVICES_BY_ID:
            raise NotFound(f"no CDS service {service_id!r}")
        body = _read_json(req, state.settings.max_body_bytes, state.settings.body_read_timeout_seconds)
        problem = _first_error(schema_check("feedback"), body, "feedback")
        if problem:
            raise BadRequest(problem, kind="schema")
        stored, duplicates = state.feedback.record_feedback(service_id, body["feedback"])
        line.update(outcome="ok", stored=stored, duplicates=duplicates)
        status = 200
        return json_response({"stored": stored, "duplicates": duplicates})
    except ServiceError as error:
        status = error.status
        line.update(outcome=f"{error.status}", reason=error.message)
        record_refusal(error.kind)
        raise
    finally:
        _IN_FLIGHT.pop(threading.get_ident(), None)
        record_call("feedback", "ok" if status == 200 else ("refused" if status < 500 else "error"), status,
                    time.perf_counter() - started)
        line["ms"] = round((time.perf_counter() - started) * 1000, 1)
        log.info(json.dumps(line))


def warm_up_schema_checks() -> None:
    schema_check("request"), schema_check("feedback")
    for hook in {service.hook for service in SERVICES}:
        context_check(hook)


def discovery_document(templates: dict[str, str]) -> list[dict]:
    return [service.discovery(templates) for service in SERVICES]


__all__ = ["blueprint", "discovery_document", "log_call_line", "validate_hook_request",
           "warm_up_schema_checks"]
