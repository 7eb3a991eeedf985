"""Fuzzing the service through real HTTP: no input may give a 5xx, and the server must stay up.

(a) Hypothesis-made hook requests: valid requests for each service (scenario charts, order
    sessions) broken at random places (wrong types, missing fields, nulls, huge strings, nested
    junk, invalid FHIR resources in prefetch, context and draftOrders), whole bodies of junk, and
    requests that make the service fetch from a FHIR stand-in that answers junk too.
(b) Schemathesis against the served OpenAPI document: the CDS Hooks operations, valid and invalid inputs,
    each response checked against the document (status, content type, headers, body schema).
    And a small run with authentication on: without a valid JWT, only 401s (or 404 for a path no
    route has).

The number of generated cases is asserted (at least a minimum) and printed in the session summary
(tests/conftest.py, pytest_terminal_summary).
"""
from __future__ import annotations

import copy
import json
import os
from datetime import datetime, timezone

import requests
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from cds_service.app import create_app
from cds_service.examples import gm_csf_order_sign_request, hook_request
from cds_service.hooks.api import schema_validator
from cds_service.hooks.registry import ALL_KEYS, SERVICES
from cds_service.scenarios import by_name
from cds_service.settings import Settings

SERVICE_IDS = [service.id for service in SERVICES]
SCENARIOS = ("crs2-hypotension-fluids", "crs3-norepi-vaso", "concurrent-icans-crs1", "no-iec-therapy")
# To fuzz longer: CRS_CDS_FUZZ_EXAMPLES=5000 (hook requests, (a)), CRS_CDS_SCHEMATHESIS_EXAMPLES=500 ((b)).
HOOK_EXAMPLES = int(os.environ.get("CRS_CDS_FUZZ_EXAMPLES", "300"))
SCHEMATHESIS_EXAMPLES = int(os.environ.get("CRS_CDS_SCHEMATHESIS_EXAMPLES", "40"))  # per operation and mode
AUTH_EXAMPLES = 15           # per operation, authentication on
FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck))

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def service_settings(tmp_path, **extra) -> Settings:
    return Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), fhir_budget_seconds=0.5,
                    fhir_timeout_seconds=0.5, **{"auth_enabled": False, **extra})


# ---- (a) hook requests ------------------------------------------------------------------------------

def valid_requests() -> dict[str, list[dict]]:
    """Per service id, well-formed requests with full prefetch (what a good CDS client sends)."""
    found: dict[str, list[dict]] = {service_id: [] for service_id in SERVICE_IDS}
    for name in SCENARIOS:
        scenario = by_name(name)
        found["crs-icans-assessment"].append(hook_request(scenario, NOW))
        sign = gm_csf_order_sign_request(NOW, scenario)
        found["crs-order-safety-sign"].append(sign)
        select = copy.deepcopy(sign)
        select["hook"] = "order-select"
        select["context"]["selections"] = ["MedicationRequest/request-123"]
        found["crs-order-safety-select"].append(select)
    return found


VALID = valid_requests()
ODD_STRINGS = [
    "", " ", "\u0000", "\t\n", "null", "{}", "[]", "'; DROP TABLE feedback; --", "\U0001F600" * 3, "é" * 40,
    "Patient/", "Patient/../../metadata", "{{context.patientId}}", "{{userPractitionerId}}", "%00%2F..%2F",
    "http://127.0.0.1:1/fhir", "https://evil.example.org/fhir", "javascript:alert(1)", "urn:uuid:x",
    "2026-02-30", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-11-21T25:61:00Z", "1e309",
    "-0", "NaN", "mg", "[degF]", "Cel", "mm[Hg]", "http://loinc.org", "8310-5", "final", "entered-in-error",
]
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30), st.sampled_from(ODD_STRINGS),
    st.integers(1_000, 300_000).map(lambda n: "x" * n),   # huge strings
)
junk = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["resourceType", "id", "entry",
                                                                                "resource", "code", "status"]),
                                      inner, max_size=5), max_leaves=25)
RESOURCE_TYPES = ["Observation", "MedicationAdministration", "Patient", "Bundle", "OperationOutcome",
                  "MedicationRequest", "ServiceRequest", "Nonsense", ""]
fhir_junk = st.fixed_dictionaries({"resourceType": st.sampled_from(RESOURCE_TYPES) | junk},
                                  optional={"id": junk, "status": junk, "code": junk, "subject": junk,
                                            "effectiveDateTime": junk, "effectivePeriod": junk, "valueQuantity": junk,
                                            "component": junk, "entry": junk, "link": junk, "issue": junk,
                                            "medicationCodeableConcept": junk, "dosage": junk, "birthDate": junk,
                                            "dosageInstruction": junk, "meta": junk})


def paths(value, here=()):
    """Every (path, value) in a JSON document."""
    yield here, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, here + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, here + (index,))


REGIONS = [(), ("context",), ("context", "draftOrders"), ("context", "selections"), ("prefetch",)]


def mutate(draw, document):
    """One random change somewhere in ``document`` (in place); returns the document. The place is
    drawn in a region first (the top level, the context, the draft orders, the prefetch), so
    small parts of a large request are broken as often as the big prefetch."""
    every = [path for path, _ in paths(document) if path]
    if not every:
        return draw(junk | fhir_junk)
    region = draw(st.sampled_from(REGIONS))
    inside = [path for path in every if path[:len(region)] == region and len(path) > len(region)] or every
    path = draw(st.sampled_from(inside))
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    kind = draw(st.sampled_from(["replace", "replace", "resource", "delete", "add", "repeat"]))
    if kind == "replace":
        parent[last] = draw(junk)
    elif kind == "resource":
        parent[last] = draw(fhir_junk)
    elif kind == "delete":
        del parent[last]
    elif kind == "add" and isinstance(parent[last], dict):
        parent[last][draw(st.text(max_size=12))] = draw(junk | fhir_junk)
    elif kind == "repeat" and isinstance(parent[last], list) and parent[last]:
        parent[last] = parent[last] * draw(st.integers(2, 300))
    return document


@st.composite
def hook_calls(draw, fhir_base: str):
    """(service id, body: a JSON document or raw bytes, what the FHIR stand-in answers)."""
    service_id = draw(st.sampled_from(SERVICE_IDS))
    shape = draw(st.sampled_from(["broken", "broken", "broken", "fetching", "other-hook", "junk", "bytes"]))
    answer = (200, {"resourceType": "Bundle", "type": "searchset"})
    if shape == "junk":
        return service_id, draw(junk | fhir_junk), answer
    if shape == "bytes":
        return service_id, draw(st.binary(max_size=200)), answer
    body = copy.deepcopy(draw(st.sampled_from(VALID[service_id])))
    if shape == "other-hook":
        body["hook"] = draw(st.sampled_from(["patient-view", "order-sign", "order-select"]))
    if shape == "fetching":  # some keys left to the service, from a FHIR stand-in answering junk
        for key in draw(st.lists(st.sampled_from(ALL_KEYS), min_size=1, unique=True)):
            body["prefetch"].pop(key, None)
        body["fhirServer"] = fhir_base
        if draw(st.booleans()):
            body["fhirAuthorization"] = {"access_token": "fuzz-token", "token_type": "Bearer"}
        kind = draw(st.sampled_from(["real, broken", "real, broken", "junk", "bytes"]))
        if kind == "real, broken":  # a real searchset Bundle or Patient, broken in places
            fhir_body = copy.deepcopy(draw(st.sampled_from(VALID["crs-icans-assessment"]))["prefetch"]
                                      [draw(st.sampled_from(ALL_KEYS))])
            for _ in range(draw(st.integers(0, 3))):
                fhir_body = mutate(draw, fhir_body)
        else:
            fhir_body = draw(junk | fhir_junk) if kind == "junk" else draw(st.binary(max_size=100))
        answer = (draw(st.sampled_from([200, 200, 200, 404, 410, 500, 401])), fhir_body)
    for _ in range(draw(st.integers(1 if shape == "broken" else 0, 4))):
        body = mutate(draw, body)
    return service_id, body, answer


def check_answer(answer: requests.Response) -> None:
    assert answer.status_code < 500, answer.text[:2000]
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers
    body = answer.json()
    if answer.status_code == 200:
        errors = list(schema_validator("response").iter_errors(body))
        assert not errors, errors[0].message
    else:
        assert not list(schema_validator("operation-outcome").iter_errors(body)), body


def test_fuzzed_hook_requests_never_get_a_5xx(serve_app, local_http, tmp_path, fuzz_counts):
    fhir_answer = {"now": (200, {"resourceType": "Bundle", "type": "searchset"})}
    fhir = local_http(lambda request, server: fhir_answer["now"])
    service = serve_app(create_app(service_settings(tmp_path)))
    seen = {"cases": 0, "statuses": {}}

    @settings(max_examples=HOOK_EXAMPLES, **FUZZ_SETTINGS)
    @given(hook_calls(fhir.base_url))
    def run(case):
        service_id, body, fhir_answer["now"] = case
        seen["cases"] += 1
        if isinstance(body, bytes):
            answer = service.post(f"/cds-services/{service_id}", body)
        else:
            answer = service.post(f"/cds-services/{service_id}", json.dumps(body))
        seen["statuses"][answer.status_code] = seen["statuses"].get(answer.status_code, 0) + 1
        check_answer(answer)

    run()
    fuzz_counts["hook requests (hypothesis, through HTTP)"] = seen["cases"]
    assert seen["cases"] >= HOOK_EXAMPLES * 0.9, seen
    assert {200, 400} <= set(seen["statuses"]), seen  # both accepted and refused requests were made
    assert requests.get(service.base + "/cds-services", timeout=10).status_code == 200  # still up


# ---- (b) schemathesis against the OpenAPI document -----------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def run_schemathesis(base: str, examples: int, checks, on_response=None) -> tuple[int, dict]:
    """Every operation of the served document, valid then invalid inputs: the number of cases run,
    and how many got each (operation, status)."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    count, statuses = 0, {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        has_inputs = bool(operation.path_parameters or operation.body or operation.query or operation.headers)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not has_inputs:
                continue

            @settings(max_examples=examples, **FUZZ_SETTINGS)
            @given(operation.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal count
                count += 1
                response = case.call(base_url=base, session=session, timeout=30)
                seen = (operation.label, response.status_code)
                statuses[seen] = statuses.get(seen, 0) + 1
                case.validate_response(response, checks=checks)
                if on_response is not None:
                    on_response(operation, response)

            run()
    return count, statuses


def test_schemathesis_against_the_openapi_document(serve_app, tmp_path, fuzz_counts):
    service = serve_app(create_app(service_settings(tmp_path)))
    count, statuses = run_schemathesis(service.base, SCHEMATHESIS_EXAMPLES, CHECKS)
    fuzz_counts["OpenAPI operations (schemathesis)"] = count
    # Three operations, two modes each (schemathesis leaves out the document's own path, which
    # tests/test_openapi.py covers).
    assert count >= SCHEMATHESIS_EXAMPLES * 5, count
    got = {status for (_, status) in statuses}
    assert {200, 400, 404} <= got, statuses
    assert requests.get(service.base + "/cds-services", timeout=10).status_code == 200


def test_schemathesis_with_authentication_on_gets_only_401s(serve_app, tmp_path, fuzz_counts):
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
    service = serve_app(create_app(service_settings(tmp_path, auth_enabled=True,
                                                    trusted_issuers={"https://ehr.example.org": {
                                                        "jwks": {"keys": [jwk]}}})))
    def only_401(operation, response):
        if operation.path.startswith("/smart/"):  # the SMART app: browser navigations, no CDS client JWT
            assert response.status_code in (400, 401), (response.status_code, response.text[:300])
        elif operation.definition.raw.get("security") == []:  # documented as public: no JWT asked for
            # A site profile's protocol is 404 for a name no profile has (here, every name).
            expected = 404 if operation.path == "/protocol/{site_name}" else 200
            assert response.status_code == expected, (operation.label, response.status_code)
        elif response.status_code == 404:  # a path no route has (e.g. an id holding "/"): nothing to authenticate
            assert response.json()["resourceType"] == "OperationOutcome"
        else:
            assert response.status_code == 401 and response.content == b"", (response.status_code, response.text)

    count, statuses = run_schemathesis(service.base, AUTH_EXAMPLES, [not_a_server_error], only_401)
    fuzz_counts["OpenAPI operations, auth on, no valid JWT (schemathesis)"] = count
    assert count >= AUTH_EXAMPLES * 4, count
    assert any(status == 401 for (_, status) in statuses), statuses


# ---- what fuzzing found (each was a 500), kept as plain cases ------------------------------------------

def _with(body: dict, change) -> dict:
    body = copy.deepcopy(body)
    change(body)
    return body


def _first(bundle: dict) -> dict:
    return bundle["entry"][0]["resource"]


def _paged(body: dict, key: str, effective_period) -> None:
    """A prefetched page with a next link (so the service decides whether it needs the next page)."""
    bundle = body["prefetch"][key]
    bundle["link"] = [{"relation": "next", "url": "http://127.0.0.1:1/fhir/Observation?page=2"}]
    bundle["entry"].append({"resource": {"resourceType": "Observation", "effectivePeriod": effective_period}})


VIEW = VALID["crs-icans-assessment"][0]      # crs2-hypotension-fluids, CRS grade 2
SIGN = VALID["crs-order-safety-sign"][0]
FOUND = {
    "JSON nested 100,000 deep": ("crs-icans-assessment", b"[" * 100_000 + b"]" * 100_000, 400),
    "an escaped lone surrogate (feedback)": (
        "crs-icans-assessment/feedback",
        b'{"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00Z", '
        b'"overrideReason": {"userComment": "\\ud800"}}]}', 400),
    "an escaped lone surrogate (hook call)": ("crs-icans-assessment",
                                              json.dumps(VIEW).replace('"hookInstance": "', '"hookInstance": "\\udc00'),
                                              400),
    "a draft order entry whose resource is a number": (
        "crs-order-safety-sign", _with(SIGN, lambda b: b["context"]["draftOrders"]["entry"].append({"resource": 5})),
        400),
    "a paged prefetch Bundle with effectivePeriod a string": (
        "crs-icans-assessment", _with(VIEW, lambda b: _paged(b, "temperatures", "yesterday")), 200),
    "a dateTime before year 1 in UTC": (
        "crs-icans-assessment",
        _with(VIEW, lambda b: _first(b["prefetch"]["temperatures"]).update(
            effectiveDateTime="0001-01-01T00:00:00+14:00", meta={"versionId": "x", "lastUpdated": "x"})), 200),
    "a coding system that is an object": (
        "crs-icans-assessment",
        _with(VIEW, lambda b: _first(b["prefetch"]["temperatures"])["code"]["coding"][0].update(system={"a": 1})), 200),
    "a coding list that is a number": (
        "crs-icans-assessment", _with(VIEW, lambda b: _first(b["prefetch"]["bloodPressures"])["code"].update(
            coding=7)), 200),
    "a status that is an object": (  # the one CAR-T administration unreadable: whether it was given is unknown
        "crs-icans-assessment", _with(VIEW, lambda b: _first(b["prefetch"]["medications"]).update(status={})), 412),
    "a versionId that is an object": (
        "crs-icans-assessment", _with(VIEW, lambda b: _first(b["prefetch"]["oxygenDevices"])["meta"].update(versionId={"a": 1})),
        200),
}


def test_what_fuzzing_found(serve_app, tmp_path):
    service = serve_app(create_app(service_settings(tmp_path)))
    for name, (path, body, status) in FOUND.items():
        answer = service.post(f"/cds-services/{path}", body if isinstance(body, (str, bytes)) else json.dumps(body))
        assert answer.status_code == status, (name, answer.text[:500])
        check_answer(answer)


def test_a_known_version_with_other_content_is_not_a_500(serve_app, tmp_path):
    """Content sent again under a version already seen is read again: an Observation whose
    valueQuantity became a list is reported, and an administration whose dosage became a list makes
    whether IEC therapy was given impossible to tell."""
    service = serve_app(create_app(service_settings(tmp_path)))
    assert service.post("/cds-services/crs-icans-assessment", json.dumps(VIEW)).status_code == 200
    observation = _with(VIEW, lambda b: _first(b["prefetch"]["temperatures"]).update(valueQuantity=[{"value": 1}]))
    answer = service.post("/cds-services/crs-icans-assessment", json.dumps(observation))
    assert answer.status_code == 200, answer.text[:500]
    check_answer(answer)
    administration = _with(VIEW, lambda b: _first(b["prefetch"]["medications"]).update(dosage=[{"dose": 1}]))
    answer = service.post("/cds-services/crs-icans-assessment", json.dumps(administration))
    assert answer.status_code == 412, answer.text[:500]
    assert "dosage is not an object" in answer.json()["issue"][0]["diagnostics"]
