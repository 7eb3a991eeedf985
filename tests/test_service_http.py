"""The CDS Hooks service through real HTTP: a real server on a loopback port, a real FHIR server
(sekmet-fhir) loaded with the scenario library, and the conformance points of spec-notes.md 1."""
from __future__ import annotations

import copy
import difflib
import json
import re
import socket
import uuid
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.fhir.prefetch import render_template
from cds_service.hooks.api import schema_validator
from cds_service.scenarios import SCENARIOS, by_name
from cds_service.settings import Settings

SARGRAMOSTIM_DRUG = "Leukine (sargramostim) 250 mcg/m2 IV"

SUMMARY = re.compile(r"^CRS grade (at least )?(\d)|ICANS grade (at least )?(\d)")


@pytest.fixture(scope="module")
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def loaded_fhir(fhir_server, now):
    for scenario in SCENARIOS:
        fhir_server.load(scenario.bundle(now))
    return fhir_server


@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_app_module):
    """Authentication off (tests/test_auth.py covers it); FHIR servers here are on loopback."""
    folder = tmp_path_factory.mktemp("svc")
    return serve_app_module(create_app(Settings(feedback_db=str(folder / "feedback.sqlite3"),
                                                fhir_budget_seconds=10, fhir_timeout_seconds=8,
                                                auth_enabled=False)))


def walk(value, path="$"):
    """Every (path, value) in a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


def assert_conformant(body: dict) -> None:
    """spec-notes 1.0 and 1.5: no null or empty values, uuids, summary < 140, selectionBehavior."""
    errors = list(schema_validator("response").iter_errors(body))
    assert not errors, errors[0].message
    for path, value in walk(body):
        if path == "$.cards":
            continue
        assert value is not None and value != "" and value != [] and value != {}, f"empty value at {path}"
    for card in body["cards"]:
        uuid.UUID(card["uuid"])
        assert len(card["summary"]) < 140
        if "suggestions" in card:
            assert card["selectionBehavior"] == "any"
            for suggestion in card["suggestions"]:
                uuid.UUID(suggestion["uuid"])
                assert len(suggestion["actions"]) == 1


def client_prefetch(fhir_base: str, service_entry: dict, context: dict) -> dict:
    """What a CDS client that honours the discovery templates sends: each template run on the FHIR server."""
    prefetch = {}
    for key, template in service_entry["prefetch"].items():
        query = render_template(template, context)
        path, _, params = query.partition("?")
        encoded = "&".join(f"{p.split('=', 1)[0]}={quote(p.split('=', 1)[1], safe=',:/')}" for p in params.split("&")
                           if p) if params else ""
        answer = requests.get(f"{fhir_base}/{path}" + (f"?{encoded}" if encoded else ""), timeout=30,
                              headers={"Accept": "application/fhir+json"})
        prefetch[key] = answer.json() if answer.status_code == 200 else None
    return prefetch


def comparable(cards: list[dict]) -> list:
    """Cards without the parts that differ per call (uuids)."""
    stripped = copy.deepcopy(cards)
    for _, value in walk(stripped):
        if isinstance(value, dict):
            value.pop("uuid", None)
            if value.get("resourceType") == "Observation":
                value.pop("effectiveDateTime", None)  # the time of the call
    return stripped


def assert_same_cards(first: list[dict], second: list[dict]) -> None:
    a, b = (json.dumps(comparable(c), indent=1, sort_keys=True).splitlines() for c in (first, second))
    assert a == b, "\n".join(difflib.unified_diff(a, b, "with prefetch", "fetched", lineterm="", n=1))


# ---- Discovery ------------------------------------------------------------------------------------

def test_discovery(service):
    answer = requests.get(service.base + "/cds-services", timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert not list(schema_validator("discovery").iter_errors(body))
    ids = [s["id"] for s in body["services"]]
    assert len(ids) == len(set(ids)) == 3
    assert {s["hook"] for s in body["services"]} == {"patient-view", "order-sign", "order-select"}
    for entry in body["services"]:
        for template in entry["prefetch"].values():
            tokens = re.findall(r"\{\{(.*?)\}\}", template)
            assert tokens and all(re.fullmatch(r"context\.[A-Za-z]+", t) for t in tokens), template


# ---- Every scenario, with client prefetch and with no prefetch -------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_cards_agree_with_and_without_prefetch(service, loaded_fhir, scenario):
    discovery = requests.get(service.base + "/cds-services", timeout=10).json()
    entry = next(s for s in discovery["services"] if s["id"] == "crs-icans-assessment")
    context = {"userId": "Practitioner/example", "patientId": scenario.name}
    with_prefetch = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": context,
                     "prefetch": client_prefetch(loaded_fhir.base_url, entry, context)}
    fetching = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": context,
                "fhirServer": loaded_fhir.base_url}
    first = service.post("/cds-services/crs-icans-assessment", with_prefetch)
    second = service.post("/cds-services/crs-icans-assessment", fetching)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert_conformant(first.json())
    assert_conformant(second.json())
    assert_same_cards(first.json()["cards"], second.json()["cards"])
    cards = first.json()["cards"]
    if scenario.expected_crs is None and scenario.expected_icans is None:
        assert cards == []
        return
    if scenario.expected_crs in (0, None) and scenario.expected_icans == 0 and not scenario.expected_topics:
        assert cards == [], "quiet when normal"
        return
    summary = cards[0]["summary"]
    assert "grade 0" not in summary, summary
    if scenario.expected_crs:
        assert summary.startswith(f"CRS grade {scenario.expected_crs}"), summary
    elif scenario.expected_crs == 0:
        assert summary.startswith("No CRS"), summary
    if scenario.expected_icans:
        assert f"ICANS grade {scenario.expected_icans}" in summary, summary
    elif scenario.expected_icans == 0:
        assert "no ICANS" in summary, summary
    topics = {c["source"]["topic"]["code"] for c in cards}
    assert "crsIcansAssessment" in topics


# ---- Card content ---------------------------------------------------------------------------------

def cards_for(service, name: str, now: datetime) -> list[dict]:
    answer = service.post("/cds-services/crs-icans-assessment", hook_request(by_name(name), now))
    assert answer.status_code == 200, answer.text
    assert_conformant(answer.json())
    return answer.json()["cards"]


def actions(card: dict) -> list[dict]:
    return [a for s in card.get("suggestions", []) for a in s["actions"]]


def test_tocilizumab_suggestion_is_a_medication_request_in_mg(service, now):
    [main, *_] = cards_for(service, "crs3-norepi-vaso", now)
    orders = [a["resource"] for a in actions(main) if a["resource"].get("resourceType") == "MedicationRequest"]
    toci = next(o for o in orders if o["medicationCodeableConcept"]["text"] == "tocilizumab")
    dose = toci["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]
    assert dose["code"] == "mg" and dose["system"] == "http://unitsofmeasure.org" and dose["value"] > 0
    assert toci["medicationCodeableConcept"]["coding"][0]["code"] == "612865"
    steroid = next(o for o in orders if o["medicationCodeableConcept"]["text"] == "dexamethasone")
    assert steroid["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 10
    assert main["summary"].startswith("CRS grade 3, ICANS grade 1:") and "tocilizumab" in main["summary"]
    assert main["indicator"] == "critical"


def test_grade_observation_suggestions_use_the_project_profiles(service, now):
    from fhir.resources.R4B.observation import Observation

    [main, *_] = cards_for(service, "crs2-hypotension-fluids", now)
    observations = [a["resource"] for a in actions(main) if a["resource"]["resourceType"] == "Observation"]
    # CRS grade 2 is recordable; "no ICANS" is never offered as "record ICANS grade 0" (decisions.md 8).
    assert {o["meta"]["profile"][0].rsplit("/", 1)[-1] for o in observations} == {"crs-grade-observation"}
    assert not any("grade 0" in s["label"] for s in main["suggestions"])
    for observation in observations:
        Observation.model_validate(observation)
    assert next(o for o in observations if o["code"]["coding"][0]["code"] == "crs-grade")["valueInteger"] == 2


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_resource_the_service_suggests_is_valid_fhir(service, now, scenario):
    """What the service emits is checked with the FHIR models (fhir.resources, R4B), whatever it reads."""
    from fhir.resources.R4B import get_fhir_model_class

    answer = service.post("/cds-services/crs-icans-assessment", hook_request(scenario, now))
    assert answer.status_code == 200, answer.text
    for card in answer.json()["cards"]:
        for action in actions(card):
            if "resource" in action:
                get_fhir_model_class(action["resource"]["resourceType"]).model_validate(action["resource"])


def test_no_tocilizumab_suggestion_in_concurrent_icans_and_the_card_says_why(service, now):
    cards = cards_for(service, "concurrent-icans-crs1", now)
    all_orders = [a["resource"] for c in cards for a in actions(c) if a["resource"]["resourceType"] == "MedicationRequest"]
    assert not any(o["medicationCodeableConcept"]["text"] == "tocilizumab" for o in all_orders)
    concurrent = next(c for c in cards if c["source"]["topic"]["code"] == "concurrentIcans")
    assert "neurotoxicity" in concurrent["detail"] and concurrent["overrideReasons"]


def test_dose_limit_reached_gives_no_tocilizumab_order(service, now):
    cards = cards_for(service, "crs3-refractory-four-doses", now)
    main = cards[0]
    assert "No more tocilizumab: limit reached (4 doses this episode, maximum 4)" in main["detail"]
    assert "Tocilizumab now" not in main["detail"] and "give tocilizumab" not in main["summary"]
    assert not any(a["resource"].get("medicationCodeableConcept", {}).get("text") == "tocilizumab"
                   for a in actions(main))
    assert any(c["source"]["topic"]["code"] == "refractoryCrs" for c in cards)


def test_out_of_scope_patient_gets_an_empty_card_list(service, now):
    answer = service.post("/cds-services/crs-icans-assessment", hook_request(by_name("no-iec-therapy"), now))
    assert answer.status_code == 200 and answer.json() == {"cards": []}


def _medications_only(body: dict, fhir_base: str | None) -> dict:
    body["prefetch"] = {"medications": body["prefetch"]["medications"]}
    if fhir_base:
        body["fhirServer"] = fhir_base
    else:
        body.pop("fhirServer", None)
    return body


def test_out_of_scope_is_told_from_the_medications_key_alone(service, now, local_http):
    """No IEC therapy in a whole medications key: no cards, and the vitals are neither needed nor
    fetched (nor is their absence a 412). The same request for an in-scope patient does fetch them."""
    fhir = local_http(lambda request, server: (200, {"resourceType": "Bundle", "type": "searchset", "total": 0}))
    body = _medications_only(hook_request(by_name("no-iec-therapy"), now), fhir.base_url)
    assert body["prefetch"]["medications"]["entry"], "the scenario gives other drugs"
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 200 and answer.json() == {"cards": []}
    assert fhir.requests == []
    without_server = service.post("/cds-services/crs-icans-assessment",
                                  _medications_only(hook_request(by_name("no-iec-therapy"), now), None))
    assert without_server.status_code == 200 and without_server.json() == {"cards": []}

    in_scope = _medications_only(hook_request(by_name("crs2-hypotension-fluids"), now), fhir.base_url)
    assert service.post("/cds-services/crs-icans-assessment", in_scope).status_code == 200
    assert sorted(r.path.split("?")[0] for r in fhir.requests) == ["/fhir/Observation"] * 5 + ["/fhir/Patient/"
                                                                  + in_scope["context"]["patientId"]]


def test_in_scope_with_the_medications_key_alone_and_no_server_is_412(service, now):
    body = _medications_only(hook_request(by_name("crs2-hypotension-fluids"), now), None)
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 412 and "temperatures" in outcome_of(answer)


def test_a_medications_key_with_more_pages_does_not_tell_out_of_scope(service, now):
    """The next page may hold the CAR-T infusion: without a server to fetch it, 412, not silence."""
    body = hook_request(by_name("no-iec-therapy"), now)
    body.pop("fhirServer", None)
    body["prefetch"]["medications"]["link"] = [{"relation": "next", "url": "http://127.0.0.1:9/fhir/page2"}]
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 412 and "prefetch:medications: prefetched Bundle has more pages" in outcome_of(answer)


# ---- Order hooks --------------------------------------------------------------------------------

def order_request(hook: str, scenario: str, now: datetime, orders: list[dict], selections=None) -> dict:
    body = hook_request(by_name(scenario), now)
    body["hook"] = hook
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "entry": [{"resource": o} for o in orders]}
    if selections:
        body["context"]["selections"] = selections
    return body


def sandbox_style_order(order_id: str, text: str, dose: float | None = None) -> dict:
    """As the CDS Hooks Sandbox builds it: no intent, category and reasonCode as single objects."""
    order = {"resourceType": "MedicationRequest", "id": order_id, "status": "draft",
             "subject": {"reference": "Patient/x"}, "category": {"text": "inpatient"},
             "reasonCode": {"text": "neutropenia"}, "medicationCodeableConcept": {"text": text}}
    if dose:
        order["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": dose, "unit": "mg",
                                                                           "system": "http://unitsofmeasure.org",
                                                                           "code": "mg"}}]}]
    return order


def test_order_sign_gm_csf_warning_with_delete_and_filgrastim(service, now):
    body = order_request("order-sign", "crs1-fever-day1", now,
                         [sandbox_style_order("request-123", SARGRAMOSTIM_DRUG)])
    answer = service.post("/cds-services/crs-order-safety-sign", body)
    assert answer.status_code == 200, answer.text
    assert_conformant(answer.json())
    [card] = answer.json()["cards"]
    assert card["indicator"] == "warning" and card["source"]["topic"]["code"] == "gmCsfAfterIec"
    [remove, instead] = actions(card)
    assert remove == {"type": "delete", "description": "Remove the sargramostim order",
                      "resourceId": "MedicationRequest/request-123"}
    assert instead["type"] == "create"
    assert instead["resource"]["medicationCodeableConcept"]["coding"][0]["code"] == "68442"


def test_order_select_looks_at_the_selections_only(service, now):
    orders = [sandbox_style_order("a", SARGRAMOSTIM_DRUG), sandbox_style_order("b", SARGRAMOSTIM_DRUG)]
    body = order_request("order-select", "crs1-fever-day1", now, orders, ["MedicationRequest/b"])
    cards = service.post("/cds-services/crs-order-safety-select", body).json()["cards"]
    assert [a.get("resourceId") for c in cards for a in actions(c) if a["type"] == "delete"] == ["MedicationRequest/b"]


def test_tocilizumab_order_above_the_computed_dose_is_corrected(service, now):
    body = order_request("order-sign", "crs3-norepi-vaso", now, [sandbox_style_order("t1", "tocilizumab", 1000)])
    [card] = service.post("/cds-services/crs-order-safety-sign", body).json()["cards"]
    assert "800 mg" in card["summary"]
    [update] = actions(card)
    assert update["type"] == "update" and update["resource"]["id"] == "t1"


# ---- Errors -------------------------------------------------------------------------------------

def outcome_of(answer: requests.Response) -> str:
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"hook": "patient-view", "hookInstance": "x"}, 400, "'context' is a required property"),
    ({"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p"}}, 400, "userId"),
    ({"hook": "patient-view", "hookInstance": "x", "context": {"patientId": 5, "userId": "Practitioner/1"}}, 400,
     "patientId"),
    ({"hook": "order-sign", "hookInstance": "x", "context": {"patientId": "p", "userId": "Practitioner/1"}}, 400,
     "expects hook"),
    ({"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p", "userId": "Practitioner/1"},
      "fhirAuthorization": {"access_token": "t"}}, 400, "fhirServer"),
])
def test_bad_requests_get_400_with_an_operation_outcome(service, body, status, message):
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == status
    assert message in outcome_of(answer)


def test_unknown_service_is_404(service):
    answer = service.post("/cds-services/nope", {"hook": "patient-view"})
    assert answer.status_code == 404 and "nope" in outcome_of(answer)


def test_no_prefetch_and_no_fhir_server_is_412(service):
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": "p", "userId": "Practitioner/1"}}
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 412
    assert "medications" in outcome_of(answer)


def test_unreachable_fhir_server_is_412_naming_the_medications(service):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": f"http://127.0.0.1:{closed}/fhir",
            "context": {"patientId": "p", "userId": "Practitioner/1"}}
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 412 and "medication" in outcome_of(answer)


def test_operation_outcome_in_the_medication_key_is_412_without_a_server(service, now):
    body = hook_request(by_name("crs2-hypotension-fluids"), now)
    body["prefetch"]["medications"] = {"resourceType": "OperationOutcome",
                                       "issue": [{"severity": "error", "code": "exception"}]}
    assert service.post("/cds-services/crs-icans-assessment", body).status_code == 412


def test_failed_observation_source_gives_an_at_least_grade_naming_it(service, now):
    body = hook_request(by_name("crs2-hypotension-fluids"), now)
    body["prefetch"]["assessments"] = {"resourceType": "OperationOutcome",
                                       "issue": [{"severity": "error", "code": "exception"}]}
    answer = service.post("/cds-services/crs-icans-assessment", body)
    assert answer.status_code == 200
    main = answer.json()["cards"][0]
    assert main["summary"].startswith("CRS grade at least 2, ICANS grade at least 0")
    assert "prefetch:assessments" in main["detail"]
    assert not any(s["label"].startswith("Record") for s in main.get("suggestions", []))


LIMIT = Settings().max_body_bytes  # the service fixture keeps the default


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size, status", [(LIMIT, 400), (LIMIT + 1, 413), (LIMIT + 1024 * 1024, 413)])
def test_a_body_over_the_limit_is_413(service, size, status, chunked):
    body = b"{" + b" " * (size - 2) + b"}"  # an empty object: 400 for its missing fields when read

    def chunks():  # no Content-Length: the size shows only while reading
        for start in range(0, size, 1024 * 1024):
            yield body[start:start + 1024 * 1024]

    answer = requests.post(service.base + "/cds-services/crs-icans-assessment", data=chunks() if chunked else body,
                           timeout=30, headers={"Content-Type": "application/json"})
    assert answer.status_code == status
    assert (f"larger than {LIMIT} bytes" in outcome_of(answer)) == (status == 413)


def _status_before_the_body_ends(base: str, head: str, body: bytes = b"") -> int:
    """Send a request's head and only part of its body, then read the answer's status: a server
    that read on, waiting for the rest, would leave this socket's read to time out."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=15) as conn:
        conn.sendall(head.encode("ascii") + body)
        return int(conn.makefile("rb").readline().split()[1])


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(service):
    head = ("POST /cds-services/crs-icans-assessment HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {LIMIT + 1024 * 1024}\r\n\r\n")
    assert _status_before_the_body_ends(service.base, head, b"{") == 413


def test_a_chunked_body_is_read_no_further_than_the_limit(service):
    head = ("POST /cds-services/crs-icans-assessment HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (1024 * 1024)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 1))
    # More than the limit, and no closing chunk: the body never ends.
    assert _status_before_the_body_ends(service.base, head, chunks) == 413


@pytest.mark.parametrize("escaped, status", [
    (r"\udc00", 400),           # a lone low surrogate
    (r"\\\ud800x", 400),        # an escaped backslash, then a lone high surrogate
    (r"x\u00e9\/\udbff", 400),  # other escapes first
    (r"\\ud800", 200),          # an escaped backslash, then the text "ud800"
    (r"\ud83d\ude00", 200),     # a surrogate pair: one emoji
    (r"\u00b0\/", 200),
])
def test_escaped_surrogates_are_refused_only_when_unpaired(service, now, escaped, status):
    body = json.dumps(hook_request(by_name("no-iec-therapy"), now))
    answer = service.post("/cds-services/crs-icans-assessment",
                          body.replace('"hookInstance": "', '"hookInstance": "' + escaped, 1))
    assert answer.status_code == status
    if status == 400:
        assert "surrogate without its pair" in outcome_of(answer)
    else:
        assert answer.json() == {"cards": []}


LONE_SURROGATE_IN_UTF8 = b"\xed\xa0\x80"  # U+D800 as UTF-8 would write it; json.loads reads it


@pytest.mark.parametrize("path, text, encoding, status", [
    ("", LONE_SURROGATE_IN_UTF8, "utf-8", 400),
    ("/feedback", LONE_SURROGATE_IN_UTF8, "utf-8", 400),
    ("", r"\ud800".encode("utf-16-le"), "utf-16-le", 400),  # an escape in a UTF-16 body
    ("/feedback", r"\ud800".encode("utf-16-le"), "utf-16-le", 400),
    ("", "\ud55c".encode("utf-8"), "utf-8", 200),            # Hangul: the same lead byte, not a surrogate
    ("", "\ud55c".encode("utf-16-le"), "utf-16-le", 200),
])
def test_surrogates_written_as_bytes_or_in_utf16_are_refused_too(service, now, path, text, encoding, status):
    if path == "/feedback":
        body = {"feedback": [{"card": "c-MARK", "outcome": "accepted", "outcomeTimestamp": "2026-11-21T12:00:00Z"}]}
    else:
        body = hook_request(by_name("no-iec-therapy"), now)
        body["hookInstance"] = "h-MARK"
    before, _, after = json.dumps(body).encode(encoding).partition("MARK".encode(encoding))
    answer = service.post("/cds-services/crs-icans-assessment" + path, before + text + after)
    assert answer.status_code == status, answer.text
    if status == 400:
        assert "surrogate without its pair" in outcome_of(answer)


# ---- Feedback and CORS -----------------------------------------------------------------------------

def test_feedback_is_stored_and_duplicates_ignored(service, now):
    cards = cards_for(service, "crs3-norepi-vaso", now)
    feedback = {"feedback": [{"card": cards[0]["uuid"], "outcome": "overridden",
                              "overrideReason": {"reason": {"code": "already-addressed",
                                                            "system": "http://crs-cds.org/fhir/CodeSystem/override-reason"}},
                              "outcomeTimestamp": "2026-11-21T12:00:00Z"}]}
    first = service.post("/cds-services/crs-icans-assessment/feedback", feedback)
    second = service.post("/cds-services/crs-icans-assessment/feedback", feedback)
    assert first.status_code == second.status_code == 200
    assert first.json() == {"stored": 1, "duplicates": 0} and second.json() == {"stored": 0, "duplicates": 1}
    bad = service.post("/cds-services/crs-icans-assessment/feedback", {"feedback": [{"card": "x"}]})
    assert bad.status_code == 400 and "outcome" in outcome_of(bad)


def test_cors_preflight_needs_no_credentials(service):
    answer = requests.options(service.base + "/cds-services/crs-icans-assessment", timeout=10, headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] in ("*", "https://sandbox.cds-hooks.org")
    allowed = answer.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


SANDBOX = "https://sandbox.cds-hooks.org"


def test_cors_headers_go_to_allowed_origins_only_and_on_errors_too(serve_app, tmp_path, now):
    service = serve_app(create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False,
                                            cors_origins=[SANDBOX])))
    call = hook_request(by_name("no-iec-therapy"), now)
    answered = service.post("/cds-services/crs-icans-assessment", call, headers={"Origin": SANDBOX})
    assert answered.status_code == 200 and answered.json() == {"cards": []}
    assert answered.headers["Access-Control-Allow-Origin"] == SANDBOX and answered.headers["Vary"] == "Origin"
    for path in ("/cds-services/nope", "/no-such-path"):  # a 404 from the service and one from Flask
        refused = service.post(path, call, headers={"Origin": SANDBOX})
        assert refused.status_code == 404 and refused.headers["Access-Control-Allow-Origin"] == SANDBOX
    for headers in ({"Origin": "https://elsewhere.example"}, {}):
        plain = service.post("/cds-services/crs-icans-assessment", call, headers=headers)
        assert plain.status_code == 200
        assert not any(name.lower().startswith("access-control-") for name in plain.headers)


# ---- The advice of decisions.md revision 2, through HTTP ------------------------------------------------

from cds_service.scenarios import (  # noqa: E402
    DEXAMETHASONE, NOREPINEPHRINE, TOCILIZUMAB, YESCARTA, Chart, Drug, Scenario,
)

KYMRIAH_HTTP = Drug("Kymriah (tisagenlecleucel)")


def custom(name: str, build) -> Scenario:
    return Scenario(name, name, name, None, None, build)


def cards_of(service, scenario: Scenario, now: datetime) -> list[dict]:
    answer = service.post("/cds-services/crs-icans-assessment", hook_request(scenario, now))
    assert answer.status_code == 200, answer.text
    assert_conformant(answer.json())
    return answer.json()["cards"]


def _adult_crs3(name: str, now: datetime) -> Chart:
    c = Chart(name, now, "Test", "Pat", "female", 55)
    c.iec(YESCARTA, days_ago=3)
    c.weight(70, days_ago=2)
    c.temp(39.0, hours_ago=1)
    c.infusion(NOREPINEPHRINE, started_hours_ago=2, rate=(0.1, "ug/kg/min"))
    c.ice(10, hours_ago=1)
    return c


def test_http_tocilizumab_5_hours_ago_is_timing_not_refractory(service, now):
    def build(at):
        c = _adult_crs3("http-toci-5h", at)
        c.give(TOCILIZUMAB, hours_ago=5, dose_mg=560)
        return c.resources
    cards = cards_of(service, custom("http-toci-5h", build), now)
    text = json.dumps(cards)
    assert "next dose possible from" in cards[0]["detail"] and "if no improvement" in cards[0]["detail"]
    assert "Refractory" not in text and "refractoryCrs" not in text and "Tocilizumab now" not in text
    assert not any(a["resource"].get("medicationCodeableConcept", {}).get("text") == "tocilizumab"
                   for c in cards for a in actions(c) if "resource" in a)


def test_http_an_8_kg_infant_gets_a_weight_based_dexamethasone_order(service, now):
    def build(at):
        c = Chart("http-infant", at, "Test", "Baby", "female", 0)
        c.iec(KYMRIAH_HTTP, days_ago=3)
        c.weight(8, days_ago=1)
        c.capd(10, hours_ago=1)
        return c.resources
    [main, *_] = cards_of(service, custom("http-infant", build), now)
    steroid = next(a["resource"] for a in actions(main)
                   if a["resource"].get("medicationCodeableConcept", {}).get("text") == "dexamethasone")
    assert steroid["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 4
    assert "pediatric weight-based dose: confirm with your pediatric protocol" in main["detail"]
    assert "dexamethasone 10 mg" not in main["detail"]


def test_http_status_epilepticus_care_and_no_ventilation_advice_when_intubated(service, now):
    [main, *_] = cards_for(service, "icans4-intubated-seizure", now)
    assert "status epilepticus: benzodiazepine, then levetiracetam load per institutional protocol" in main["detail"]
    assert "levetiracetam 500-750 mg BID" in main["detail"] and "EEG" in main["detail"]
    assert "mechanical ventilation" not in main["detail"]


def test_http_crs_4_methylprednisolone_order_is_bounded_to_3_days(service, now):
    [main, *_] = cards_for(service, "crs4-norepi-phenylephrine", now)
    order = next(a["resource"] for a in actions(main)
                 if a["resource"].get("medicationCodeableConcept", {}).get("text") == "methylprednisolone")
    assert order["dosageInstruction"][0]["timing"]["repeat"]["boundsDuration"]["value"] == 3
    assert "Then 250 mg q12h x 2 days" in main["detail"]
    label = next(s["label"] for s in main["suggestions"] if "methylprednisolone" in s["label"])
    assert label == "Order: methylprednisolone 500 mg IV q12h x 3 days"


def test_http_home_cpap_is_not_grade_4(service, now):
    cpap = ("oxygen-device-positive-pressure", "47545007", "CPAP")

    def build(at):
        c = Chart("http-home-cpap", at, "Test", "Pat", "male", 62)
        c.o2_device(cpap, hours_ago=24 * 5)
        c.iec(YESCARTA, days_ago=3)
        c.weight(90, days_ago=1)
        c.temp(38.4, hours_ago=1)
        c.o2_device(cpap, hours_ago=1)
        c.ice(10, hours_ago=1)
        return c.resources
    [main, *_] = cards_of(service, custom("http-home-cpap", build), now)
    assert main["summary"].startswith("CRS grade 1"), main["summary"]
    assert ("CPAP also charted before the therapy (home CPAP?): not counted; if it is now for hypoxia, this is "
            "grade 4.") in main["detail"]


def test_http_documented_map_below_65_is_read_from_the_blood_pressure_key(service, now):
    def build(at):
        c = Chart("http-map", at, "Test", "Pat", "male", 62)
        c.iec(YESCARTA, days_ago=3)
        c.weight(90, days_ago=1)
        c.temp(38.4, hours_ago=1)
        c.mean_bp(58, hours_ago=1)
        c.ice(10, hours_ago=1)
        return c.resources
    request = hook_request(custom("http-map", build), now)
    assert any(e["resource"]["code"]["coding"][0]["code"] == "8478-0"
               for e in request["prefetch"]["bloodPressures"]["entry"])
    answer = service.post("/cds-services/crs-icans-assessment", request)
    assert answer.json()["cards"][0]["summary"].startswith("CRS grade 2"), answer.text
    assert "MAP 58 mmHg at" in answer.json()["cards"][0]["detail"]


def test_http_no_duplicate_dexamethasone_order(service, now):
    def build(at):
        c = Chart("http-on-dex", at, "Test", "Pat", "male", 62)
        c.iec(YESCARTA, days_ago=3)
        c.weight(90, days_ago=1)
        c.ice(5, hours_ago=3)
        c.give(DEXAMETHASONE, hours_ago=2, dose_mg=10)
        return c.resources
    [main, *_] = cards_of(service, custom("http-on-dex", build), now)
    assert "Continue dexamethasone 10 mg IV every 6 h" in main["detail"]
    assert not any("dexamethasone" in s["label"] for s in main.get("suggestions", []))


def test_http_no_concurrent_icans_card_without_a_crs_grade(service, now):
    cards = cards_for(service, "day45-icans-only", now)
    assert [c["source"]["topic"]["code"] for c in cards] == ["crsIcansAssessment"]


def test_http_quiet_when_normal(service, now):
    assert cards_for(service, "crs0-afebrile-day2", now) == []


def test_http_a_fifth_tocilizumab_order_offers_removal_not_a_dose(service, now):
    body = order_request("order-sign", "crs3-refractory-four-doses", now,
                         [sandbox_style_order("toci-5", "Actemra (tocilizumab) IV", 640)])
    answer = service.post("/cds-services/crs-order-safety-sign", body)
    assert answer.status_code == 200, answer.text
    [card] = answer.json()["cards"]
    assert [s["label"] for s in card["suggestions"]] == ["Remove the tocilizumab 640 mg order"]
    assert "anakinra" in card["detail"] and "Computed dose" not in card["detail"]


def test_http_the_protocol_document_is_served_and_linked(service, now):
    [main, *_] = cards_for(service, "crs3-norepi-vaso", now)
    link = next(link["url"] for link in main["links"] if link["url"].endswith("/protocol"))
    document = requests.get(link, timeout=10)
    assert document.status_code == 200 and document.headers["Content-Type"].startswith("text/markdown")
    assert document.text.startswith("# crs-cds default protocol")
    assert "seed" not in json.dumps(main)


@pytest.fixture(scope="module")
def berlin_service(tmp_path_factory, serve_app_module):
    folder = tmp_path_factory.mktemp("svc-berlin")
    return serve_app_module(create_app(Settings(feedback_db=str(folder / "feedback.sqlite3"), auth_enabled=False,
                                                time_zone="Europe/Berlin", quiet_when_normal=False)))


def test_http_times_in_the_site_time_zone_and_quiet_when_normal_off(berlin_service, now):
    [main, *_] = cards_for(berlin_service, "crs3-norepi-vaso", now)
    assert "UTC" not in main["detail"] and re.search(r"\d\d:\d\d CES?T", main["detail"])
    [normal] = cards_for(berlin_service, "crs0-afebrile-day2", now)
    assert normal["summary"] == "No CRS, no ICANS"


def test_an_unknown_time_zone_stops_start_up(tmp_path):
    from cds_service.settings import SettingsError

    with pytest.raises(SettingsError, match="time_zone"):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), auth_enabled=False, time_zone="Mars/Olympus"))


def _scheduled_car_t(name: str):
    def build(at):
        c = Chart(name, at, "Test", "Pat", "female", 48)
        c.weight(64, days_ago=1)
        c.resources.append({"resourceType": "MedicationRequest", "id": f"{name}-cart", "status": "active",
                            "intent": "order", "subject": {"reference": f"Patient/{name}"},
                            "medicationCodeableConcept": {"text": "Kymriah (tisagenlecleucel) suspension for IV infusion"},
                            "authoredOn": at.date().isoformat()})
        return c.resources
    return custom(name, build)


def _steroid_order_sign(scenario, now) -> dict:
    body = hook_request(scenario, now, "crs-order-safety-sign")
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": sandbox_style_order("dex-premed", "dexamethasone 10 mg IV", 10)}]}
    return body


def test_http_order_sign_reads_the_patients_medication_requests_for_a_scheduled_car_t(service, now):
    body = _steroid_order_sign(_scheduled_car_t("http-cart-scheduled"), now)
    assert body["prefetch"]["medicationRequests"]["entry"], "the prefetch key holds the CAR-T order"
    answer = service.post("/cds-services/crs-order-safety-sign", body)
    assert answer.status_code == 200, answer.text
    [card] = answer.json()["cards"]
    assert card["source"]["topic"]["code"] == "steroidPremedication", card
    assert "a CAR-T product is ordered" in card["detail"]


def test_http_order_sign_fetches_medication_requests_when_not_prefetched(service, loaded_fhir, now):
    scenario = _scheduled_car_t("http-cart-fetched")
    loaded_fhir.load(scenario.bundle(now))
    body = _steroid_order_sign(scenario, now)
    del body["prefetch"]["medicationRequests"]
    body["fhirServer"] = loaded_fhir.base_url
    answer = service.post("/cds-services/crs-order-safety-sign", body)
    assert answer.status_code == 200, answer.text
    assert [c["source"]["topic"]["code"] for c in answer.json()["cards"]] == ["steroidPremedication"]


def test_discovery_declares_the_medication_requests_key_for_the_order_hooks(service):
    services = {s["id"]: s for s in service.get("/cds-services").json()["services"]}
    assert services["crs-order-safety-sign"]["prefetch"]["medicationRequests"].startswith(
        "MedicationRequest?patient={{context.patientId}}")
    assert "medicationRequests" not in services["crs-icans-assessment"]["prefetch"]
