"""Fault injection through the service: a real FHIR stand-in on a loopback port misbehaves, the
service is called through real HTTP with no prefetch (so it must fetch everything itself), and each
call must end with the right status or card, inside the FHIR time budget (plus a small margin).

412 when the medication administrations cannot be read (whether IEC therapy was given cannot be
told); 200 otherwise, with "at least" grades naming each source that failed (decisions.md 7).
"""
from __future__ import annotations

import json
import re
import socket
import struct
import time
from datetime import datetime, timezone

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.fhir.client import encode_query
from cds_service.fhir.prefetch import render_template
from cds_service.hooks.registry import ALL_KEYS, prefetch_templates
from cds_service.scenarios import by_name
from cds_service.settings import Settings
from cds_service.terminology import load_terminology

BUDGET = 1.0          # fhir_budget_seconds for these tests (fhir_timeout_seconds stays 1.5: the budget binds)
MARGIN = 1.0          # what the service may add to the budget: validation, grading, HTTP
MAX_PAGES = 10        # fhir_max_pages (the default)
SCENARIO = "crs2-hypotension-fluids"   # CRS grade 2, no ICANS
SERVICE = "/cds-services/crs-icans-assessment"
OBSERVATION_KEYS = [key for key in ALL_KEYS if key not in ("patient", "medications")]


@pytest.fixture
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def service(serve_app, tmp_path):
    """One app (so one fetch thread pool) per test: no test's fetches still running touch another's."""
    return serve_app(create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False,
                                         fhir_budget_seconds=BUDGET, fhir_max_pages=MAX_PAGES)))


class Chart:
    """The scenario's FHIR data as a FHIR server answers the service's searches: the searchset Bundle
    (or Patient) for each prefetch key, by the exact request path the service sends."""

    def __init__(self, now: datetime):
        request = hook_request(by_name(SCENARIO), now)
        self.context = request["context"]
        self.bodies: dict[str, dict] = request["prefetch"]   # key -> searchset Bundle / Patient
        templates = prefetch_templates(load_terminology())
        self.keys_by_path = {"/fhir/" + encode_query(render_template(templates[key], self.context)): key
                             for key in ALL_KEYS}

    def key_of(self, path: str) -> str | None:
        # the service limits its own Observation searches with &date=ge<cutoff> (prefetch.only_since)
        return self.keys_by_path.get(re.sub(r"(&date=ge[^&]*)?(&_page=\d+)?$", "", path))

    def call(self, fhir_base: str) -> dict:
        """The hook request: no prefetch at all, fhirServer the stand-in."""
        return {"hook": "patient-view", "hookInstance": f"faults-{time.monotonic_ns()}", "context": self.context,
                "fhirServer": fhir_base}


@pytest.fixture
def chart(now) -> Chart:
    return Chart(now)


def call_timed(service, chart: Chart, fhir_base: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    answer = service.post(SERVICE, chart.call(fhir_base))
    return answer, time.monotonic() - started


def assert_in_budget(elapsed: float) -> None:
    assert elapsed < BUDGET + MARGIN, f"the call took {elapsed:.2f} s; budget {BUDGET} s + {MARGIN} s"


def precondition_failed(service, chart: "Chart", fhir_base: str) -> str:
    """One call against the stand-in: a 412 within the budget. Returns what its OperationOutcome says."""
    answer, elapsed = call_timed(service, chart, fhir_base)
    assert answer.status_code == 412, answer.text
    assert_in_budget(elapsed)
    return diagnostics(answer)


def diagnostics(answer: requests.Response) -> str:
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["diagnostics"]


def main_card(answer: requests.Response) -> dict:
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    assert cards, "expected the assessment card"
    return cards[0]


def assert_at_least_naming(answer: requests.Response, failed_keys: list[str], crs: int = 2) -> dict:
    """An "at least" grade naming each failed key. With every Observation source lost, nothing is
    left to grade with: "at least 0"."""
    card = main_card(answer)
    assert card["summary"].startswith(f"CRS grade at least {crs}, ICANS grade at least 0"), card["summary"]
    for key in failed_keys:
        assert f"prefetch:{key}" in card["detail"], (key, card["detail"])
    return card


# ---- the healthy server: the baseline the faults are measured against --------------------------------

def test_a_healthy_server_gives_the_full_grade(service, chart, local_http):
    fhir = local_http(lambda request, server: (200, chart.bodies[chart.key_of(request.path)]))
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    card = main_card(answer)
    assert card["summary"].startswith("CRS grade 2, no ICANS"), card["summary"]
    assert sorted(chart.key_of(r.path) for r in fhir.requests) == sorted(ALL_KEYS)
    assert_in_budget(elapsed)


# ---- the whole server misbehaves: medications unreadable, 412 -----------------------------------------

def test_a_slow_server_is_cut_off_at_the_budget(service, chart, local_http):
    def slow(request, server):
        server.stop.wait(BUDGET + 5)  # far past the budget; ends when the test does
        return 200, chart.bodies[chart.key_of(request.path)]

    said = precondition_failed(service, chart, local_http(slow).base_url)
    assert re.search(r"prefetch:medications: (MedicationAdministration search timed out|time budget exhausted)",
                     said), said


@pytest.mark.parametrize("status, says", [(500, "answered 500"), (503, "answered 503"),
                                          (401, "answered 401"), (403, "answered 403"), (404, "answered 404")])
def test_error_statuses_from_the_server(service, chart, local_http, status, says):
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    said = precondition_failed(service, chart, local_http(lambda request, server: (status, outcome)).base_url)
    assert f"prefetch:medications: FHIR server {says} for MedicationAdministration search" in said


@pytest.mark.parametrize("body, says", [
    (b'{"resourceType": "Bundle", "entry": [', "invalid JSON"),
    (b"<html>Bad gateway</html>", "invalid JSON"),
    (b"\xff\xfe not utf-8", "invalid JSON"),
    (b'["a", "list"]', "not a FHIR resource"),
    (b'{"resourceType": "Bundle", "entry": {"resource": 1}}', "malformed entry list"),
    (b'{"resourceType": "Patient", "id": "p"}', "not a Bundle"),
])
def test_malformed_answers(service, chart, local_http, body, says):
    def malformed(request, server):
        key = chart.key_of(request.path)
        return 200, (chart.bodies[key] if key == "patient" else body)

    said = precondition_failed(service, chart, local_http(malformed).base_url)
    assert says in said and "prefetch:medications" in said


def _reset(request) -> None:
    """Headers and half a body, then the socket closed with a TCP reset (SO_LINGER 0)."""
    handler = request.raw
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100000\r\n\r\n"
                        b'{"resourceType": "Bundle", "type": "searchset", "entry": [')
    handler.close_connection = True
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()


def test_a_connection_reset_mid_answer_on_the_medications(service, chart, local_http):
    def resetting(request, server):
        key = chart.key_of(request.path)
        if key == "medications":
            return _reset(request)
        return 200, chart.bodies[key]

    said = precondition_failed(service, chart, local_http(resetting).base_url)
    assert re.search(r"prefetch:medications: (request for MedicationAdministration search failed|could not connect)",
                     said), said


def test_a_connection_reset_on_the_observations_only(service, chart, local_http):
    def resetting(request, server):
        key = chart.key_of(request.path)
        if key in OBSERVATION_KEYS:
            return _reset(request)
        return 200, chart.bodies[key]

    fhir = local_http(resetting)
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    assert_at_least_naming(answer, OBSERVATION_KEYS, crs=0)
    assert_in_budget(elapsed)


def test_a_server_that_drips_its_answer(service, chart, local_http):
    """Headers at once, then one byte every 0.2 s: no read ever times out, the budget still ends it,
    and ends the fetch threads too (else two such calls hold every thread of the pool)."""
    def drip(request, server):
        handler = request.raw
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 5000\r\n\r\n")
        for byte in b'{"resourceType": "Bundle", "type": "searchset", "entry": []}' + b" " * 4940:
            if server.stop.wait(0.2):
                break
            handler.wfile.write(bytes([byte]))
        handler.close_connection = True

    fhir = local_http(drip)
    for _ in range(2):
        assert "prefetch:medications" in precondition_failed(service, chart, fhir.base_url)
    healthy = local_http(lambda request, server: (200, chart.bodies[chart.key_of(request.path)]))
    answer, elapsed = call_timed(service, chart, healthy.base_url)
    assert main_card(answer)["summary"].startswith("CRS grade 2, no ICANS"), answer.text
    assert_in_budget(elapsed)


# ---- paging and size ------------------------------------------------------------------------------

def test_a_next_link_that_never_ends(service, chart, local_http):
    """Every key's first page is right, then empty pages whose next link points one page further."""
    def endless(request, server):
        key = chart.key_of(request.path)
        if key == "patient":
            return 200, chart.bodies[key]
        page = int(request.path.rsplit("&_page=", 1)[1]) if "&_page=" in request.path else 1
        bundle = dict(chart.bodies[key]) if page == 1 else {"resourceType": "Bundle", "type": "searchset"}
        base = re.sub(r"&_page=\d+$", "", request.path)
        bundle["link"] = [{"relation": "self", "url": server.origin + request.path},
                          {"relation": "next", "url": f"{server.origin}{base}&_page={page + 1}"}]
        return 200, bundle

    fhir = local_http(endless)
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    card = assert_at_least_naming(answer, ["medications"])
    assert "page limit" in card["detail"] or "stopped after" in card["detail"], card["detail"]
    pages = [r for r in fhir.requests if chart.key_of(r.path) == "medications"]
    assert len(pages) == MAX_PAGES
    assert_in_budget(elapsed)


def _temperatures(chart: Chart, count: int, minutes_apart: int) -> dict:
    """The scenario's temperatures, then ``count`` normal ones before them, newest first (lean: no
    category, no display texts, as a FHIR server may send them)."""
    real = [e for e in chart.bodies["temperatures"]["entry"]]
    model = real[-1]["resource"]
    oldest = datetime.fromisoformat(model["effectiveDateTime"].replace("Z", "+00:00")).timestamp()
    shape = {key: model[key] for key in ("resourceType", "status", "subject")}
    shape["code"] = {"coding": [{key: c[key] for key in ("system", "code")} for c in model["code"]["coding"]]}
    entries = list(real)
    for n in range(1, count + 1):
        moment = datetime.fromtimestamp(oldest - 60 * minutes_apart * n, timezone.utc)
        entries.append({"resource": {**shape, "id": f"t{n}", "effectiveDateTime": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                     "valueQuantity": {"value": 36.6, "unit": "Cel",
                                                       "system": "http://unitsofmeasure.org", "code": "Cel"}}})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def test_an_enormous_bundle(service, chart, local_http):
    """A server that ignores _count: 20,000 temperatures (about 6 MB, a year at one every 30 min) in
    one page. The resource limit keeps the newest 5000, which reach back further than any rule
    looks, so nothing is missing and the grade is whole."""
    big = json.dumps(_temperatures(chart, 20_000, minutes_apart=30)).encode()
    assert len(big) > 5_000_000

    def enormous(request, server):
        key = chart.key_of(request.path)
        return 200, big if key == "temperatures" else chart.bodies[key]

    fhir = local_http(enormous)
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    card = main_card(answer)
    assert card["summary"].startswith("CRS grade 2, no ICANS"), (card["summary"], card["detail"])
    assert_in_budget(elapsed)


def test_a_body_far_too_large_is_not_read_to_the_end(service, chart, local_http):
    """Tens of MB in one answer: refused, and the service does not stop reading only at the budget."""
    padding = b'{"resourceType": "Bundle", "type": "searchset", "entry": [], "padding": "' + b"x" * 60_000_000 + b'"}'

    def huge(request, server):
        key = chart.key_of(request.path)
        return 200, padding if key == "medications" else chart.bodies[key]

    said = precondition_failed(service, chart, local_http(huge).base_url)
    assert "more than" in said and "prefetch:medications" in said


# ---- one source fails: the others are used, the grade says "at least" -----------------------------------

@pytest.mark.parametrize("failing, crs", [(OBSERVATION_KEYS, 0), (["assessments"], 2)],
                         ids=["all-observations", "assessments-only"])
def test_medications_fine_observations_500(service, chart, local_http, failing, crs):
    def half(request, server):
        key = chart.key_of(request.path)
        if key in failing:
            return 500, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
        return 200, chart.bodies[key]

    fhir = local_http(half)
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    card = assert_at_least_naming(answer, failing, crs=crs)
    assert "FHIR server answered 500 for Observation search" in card["detail"]
    for key in set(OBSERVATION_KEYS) - set(failing):
        assert f"prefetch:{key}" not in card["detail"]
    assert_in_budget(elapsed)


def test_slow_observations_fast_medications(service, chart, local_http):
    def slow_observations(request, server):
        key = chart.key_of(request.path)
        if key in OBSERVATION_KEYS:
            server.stop.wait(BUDGET + 5)
        return 200, chart.bodies[key]

    fhir = local_http(slow_observations)
    answer, elapsed = call_timed(service, chart, fhir.base_url)
    card = assert_at_least_naming(answer, OBSERVATION_KEYS, crs=0)
    assert "time budget exhausted" in card["detail"] or "timed out" in card["detail"], card["detail"]
    assert_in_budget(elapsed)
