"""The service's OpenAPI 3.1 document: valid, served without a JWT, and made of the very JSON Schemas
the service validates with (so the two cannot drift apart)."""
from __future__ import annotations

import json
import uuid

import jsonschema
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from openapi_spec_validator import validate as validate_openapi

from cds_service import __version__
from cds_service.app import create_app
from cds_service.errors import BadRequest
from cds_service.hooks.api import schema_validator, validate_hook_request
from cds_service.hooks.openapi import (OPENAPI_FILE, SCHEMA_DIR, as_component, as_schema_file,
                                       embedded_schema_files, load_schema_file, openapi_document, raw_document)
from cds_service.hooks.registry import SERVICES
from cds_service.settings import Settings

ISS = "https://ehr.example.org"
KEY = ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_app_module):
    """Authentication ON: the document needs no token, everything else does."""
    jwk = {**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
    folder = tmp_path_factory.mktemp("openapi")
    return serve_app_module(create_app(Settings(feedback_db=str(folder / "feedback.sqlite3"),
                                                trusted_issuers={ISS: {"jwks": {"keys": [jwk]}}})))


@pytest.fixture(scope="module")
def served(service) -> dict:
    answer = requests.get(service.base + "/openapi.json", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.json()


def test_the_served_document_is_valid_openapi_3_1(served):
    assert served["openapi"].startswith("3.1.")
    validate_openapi(served)


def test_the_repository_file_is_valid_openapi_as_it_is():
    """Its schema references resolve relative to the file itself (schemas/*.json beside it)."""
    raw = raw_document()
    assert embedded_schema_files(raw)  # it references the files rather than copying them
    validate_openapi(raw, base_uri=OPENAPI_FILE.resolve().as_uri())


def test_every_schema_file_is_in_the_document_and_equal_to_the_file(served):
    files = embedded_schema_files(raw_document())
    assert sorted(files.values()) == sorted(path.stem for path in SCHEMA_DIR.glob("*.json"))
    assert {files[name] for name in ("CdsServiceRequest", "CdsServiceResponse", "Feedback")} == {
        "request", "response", "feedback"}
    for component, file_name in files.items():
        on_disk = json.loads((SCHEMA_DIR / f"{file_name}.json").read_text(encoding="utf-8"))
        embedded = served["components"]["schemas"][component]
        assert as_schema_file(embedded, component, on_disk["$id"]) == on_disk, component
        # Nothing but the $id and the reference prefix differs: the same text once those are undone.
        assert json.dumps(embedded, sort_keys=True) == json.dumps(as_component(on_disk, component), sort_keys=True)
        # And the validator the service runs is built from the same file.
        assert schema_validator(file_name).schema == on_disk == load_schema_file(file_name)


def _service_accepts(body: dict) -> bool:
    try:
        validate_hook_request(body, body["hook"])
    except BadRequest:
        return False
    return True


def test_the_embedded_request_schema_judges_requests_as_the_service_does(served):
    """Resolved inside the OpenAPI document, the request schemas accept and refuse the same bodies."""
    document_validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/HookRequest", **served})
    sign = {"hook": "order-sign", "hookInstance": "h", "context": {
        "patientId": "p", "userId": "Practitioner/1", "draftOrders": {"resourceType": "Bundle", "entry": []}}}
    view = {"hook": "patient-view", "hookInstance": "h", "context": {"patientId": "p", "userId": "Practitioner/1"}}
    bodies = [
        sign, view, {**sign, "hook": "order-select"},
        {**sign, "context": {**sign["context"], "draftOrders": {"resourceType": "List"}}},
        {**sign, "fhirAuthorization": {"access_token": "t"}},
        {**sign, "fhirServer": "https://ehr.example.org/fhir", "fhirAuthorization": {"access_token": "t"}},
        {**view, "context": {"patientId": 5, "userId": "u"}},
        {**view, "prefetch": {"patient": None, "vitals": []}},
        {**view, "hookInstance": ""},
    ]
    verdicts = [(document_validator.is_valid(body), _service_accepts(body)) for body in bodies]
    assert all(doc == svc for doc, svc in verdicts), verdicts
    assert [doc for doc, _ in verdicts] == [True, True, False, False, False, True, False, False, False]


def test_the_document_names_the_services_and_the_version():
    document = openapi_document()
    assert document["components"]["parameters"]["ServiceId"]["schema"]["enum"] == [s.id for s in SERVICES]
    assert document["info"]["version"] == __version__
    assert "servers" not in document
    assert openapi_document("https://cds.example.org/crs/")["servers"] == [{"url": "https://cds.example.org/crs"}]


def test_every_route_of_the_app_is_documented(service, served):
    documented = {(path, method.upper()) for path, item in served["paths"].items()
                  for method in item if method in ("get", "post", "put", "delete", "patch")}
    routes = set()
    for rule in service.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<service_id>", "{id}").replace("<site_name>", "{site_name}")
        routes |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == documented


def test_statuses_and_security_are_documented(served):
    call = served["paths"]["/cds-services/{id}"]["post"]["responses"]
    assert {"200", "400", "401", "404", "412", "413"} <= set(call)
    unauthorized = served["components"]["responses"]["Unauthorized"]
    assert "content" not in unauthorized and "WWW-Authenticate" in unauthorized["headers"]
    scheme = served["components"]["securitySchemes"]["cdsClientJwt"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert served["security"] == [{"cdsClientJwt": []}]
    assert served["paths"]["/openapi.json"]["get"]["security"] == []


def test_the_document_needs_no_token_but_the_hooks_do(service):
    assert requests.get(service.base + "/openapi.json", timeout=10).status_code == 200
    refused = requests.get(service.base + "/cds-services", timeout=10)
    assert refused.status_code == 401 and refused.content == b""
    assert refused.headers["WWW-Authenticate"] == "Bearer"


def test_error_responses_match_the_documented_schemas(service, served):
    """401 (no token) here; the fuzz tests (tests/test_fuzz.py) check every response against the document."""
    outcome = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/OperationOutcome", **served})
    missing = requests.post(service.base + "/openapi.json", timeout=10)
    assert missing.status_code == 405 and outcome.is_valid(missing.json())
    answer = requests.post(service.base + f"/cds-services/{SERVICES[0].id}", json={"hook": "x"}, timeout=10,
                           headers={"Authorization": f"Bearer {uuid.uuid4().hex}"})
    assert answer.status_code == 401 and answer.content == b""
