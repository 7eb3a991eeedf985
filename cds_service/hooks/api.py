"""The HTTP edge: discovery, service calls and feedback, with errors mapped to statuses here only.

Every route of the blueprint first authenticates the CDS client (``auth.Authenticator``; CORS
preflight OPTIONS excepted); a failure is a bare 401.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import jsonschema
from flask import Blueprint, Response, current_app, g, request

from ..errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, Unauthorized
from ..fhir.prefetch import resolve_prefetch
from .registry import SERVICES, SERVICES_BY_ID, HookCall, prefetch_cutoffs, prefetch_templates

log = logging.getLogger("crs_cds.hooks")
SCHEMA_DIR = Path(__file__).with_name("schemas")

blueprint = Blueprint("cds_hooks", __name__)


@lru_cache(maxsize=None)
def schema_validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)


def _first_error(validator, instance, where: str) -> str | None:
    if validator.is_valid(instance):  # the common case, and the cheap one
        return None
    error = next(iter(sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))), None)
    if error is None:
        return None
    path = ".".join(str(p) for p in error.absolute_path)
    return f"{where}{'.' + path if path else ''}: {error.message}"


def json_response(body, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status=status,
                    mimetype="application/json")


def operation_outcome(error: ServiceError) -> dict:
    issue = {"severity": "error", "code": error.code, "diagnostics": error.message}
    if error.expression:
        issue["expression"] = [error.expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _read_json() -> dict:
    limit = current_app.config["CRS_CDS"].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@blueprint.errorhandler(ServiceError)
def _service_error(error: ServiceError):
    if isinstance(error, Unauthorized):  # no details: the reason is in the log
        return Response(b"", status=401, headers={"WWW-Authenticate": "Bearer"})
    return json_response(operation_outcome(error), error.status)


@blueprint.before_request
def _authenticate():
    if request.method == "OPTIONS":  # CORS preflight: browsers send it without credentials
        return
    g.cds_client = current_app.config["CRS_CDS"].auth.authenticate(request)


@blueprint.get("/cds-services")
def discovery():
    state = current_app.config["CRS_CDS"]
    return json_response({"services": state.discovery})


def validate_hook_request(body: dict, hook: str) -> None:
    problem = _first_error(schema_validator("request"), body, "request")
    if problem:
        raise BadRequest(problem)
    if body["hook"] != hook:
        raise BadRequest(f"service expects hook {hook!r}, request has {body['hook']!r}", expression="hook")
    problem = _first_error(context_validator(hook), body["context"], "context")
    if problem:
        raise BadRequest(problem)


@lru_cache(maxsize=None)
def context_validator(hook: str) -> jsonschema.protocols.Validator:
    """The request schema's definition of one hook's context, compiled once."""
    defs = schema_validator("request").schema["$defs"]
    return jsonschema.Draft202012Validator({**defs[hook], "$defs": defs})


@blueprint.post("/cds-services/<service_id>")
def call_service(service_id: str):
    started = time.perf_counter()
    state = current_app.config["CRS_CDS"]
    service = SERVICES_BY_ID.get(service_id)
    outcome, cards, notes = "error", [], {}
    try:
        if service is None:
            raise NotFound(f"no CDS service {service_id!r}")
        body = _read_json()
        notes["hookInstance"] = body.get("hookInstance") if isinstance(body.get("hookInstance"), str) else None
        validate_hook_request(body, service.hook)
        templates = {key: state.templates[key] for key in service.prefetch_keys}
        allowed = state.auth.fhir_server_allowed(body.get("fhirServer"), g.cds_client)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        gathered = resolve_prefetch(templates, body, state.fhir_client, state.settings, set(service.required_keys),
                                    server_allowed=allowed, cutoffs=prefetch_cutoffs(state.protocol, now))
        call = HookCall(service, body, gathered.resources, gathered.failures, now,
                        state.protocol, state.terminology)
        cards = service.handler(call)
        state.feedback.remember_cards(service_id, body["hookInstance"],
                                      [(card["uuid"], card["source"]["topic"]["code"]) for card in cards])
        notes.update(call.notes)
        notes["sources"] = gathered.sources
        outcome = "ok"
        return json_response({"cards": cards})
    except ServiceError as error:
        outcome = f"{error.status}"
        notes["reason"] = error.message
        raise
    finally:
        log.info(json.dumps({
            "event": "hook-call", "service": service_id, "hookInstance": notes.get("hookInstance"),
            "outcome": outcome, "ms": round((time.perf_counter() - started) * 1000, 1),
            "cards": [c["source"]["topic"]["code"] for c in cards], "grades": notes.get("grades"),
            "sources": notes.get("sources"), "lenient": notes.get("lenient"), "reason": notes.get("reason"),
        }))


@blueprint.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str):
    state = current_app.config["CRS_CDS"]
    if service_id not in SERVICES_BY_ID:
        raise NotFound(f"no CDS service {service_id!r}")
    body = _read_json()
    problem = _first_error(schema_validator("feedback"), body, "feedback")
    if problem:
        raise BadRequest(problem)
    stored, duplicates = state.feedback.record_feedback(service_id, body["feedback"])
    log.info(json.dumps({"event": "feedback", "service": service_id, "stored": stored, "duplicates": duplicates}))
    return json_response({"stored": stored, "duplicates": duplicates})


def discovery_document(templates: dict[str, str]) -> list[dict]:
    return [service.discovery(templates) for service in SERVICES]


__all__ = ["blueprint", "discovery_document", "prefetch_templates", "validate_hook_request"]
