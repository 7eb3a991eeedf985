"""FhirClient against a real FHIR server (sekmet) and against small real HTTP servers for faults."""
from __future__ import annotations

import socket
import time
import uuid

import pytest

from cds_service.fhir.client import FhirClient, encode_query
from cds_service.settings import Settings

TOKEN = "tok-9f8e7d6c5b4a-secret"
LOINC_TEMP = "8310-5"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
TOCILIZUMAB = "612865"


def _settings(**overrides) -> Settings:
    values = dict(fhir_timeout_seconds=1.5, fhir_budget_seconds=2.0, fhir_max_pages=10,
                  fhir_max_resources_per_key=5000)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client_factory():
    clients: list[FhirClient] = []

    def make(**overrides) -> FhirClient:
        client = FhirClient(_settings(**overrides))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _put(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


@pytest.fixture(scope="module")
def patient(fhir_server) -> str:
    """A patient with 5 temperatures (days 1-5) and 3 tocilizumab doses (days 5, 4, 3), loaded once."""
    pid = f"pt-{uuid.uuid4().hex[:12]}"
    resources = [{"resourceType": "Patient", "id": pid, "birthDate": "1960-05-01"}]
    for day in range(1, 6):
        resources.append({
            "resourceType": "Observation", "id": f"{pid}-t{day}", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": LOINC_TEMP}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": f"2024-03-0{day}T08:00:00+01:00",
            "valueQuantity": {"value": 38.0 + day / 10, "unit": "Cel", "system": "http://unitsofmeasure.org",
                              "code": "Cel"},
        })
    for n, day in enumerate((5, 4, 3), start=1):
        resources.append({
            "resourceType": "MedicationAdministration", "id": f"{pid}-m{n}", "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": TOCILIZUMAB}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": f"2024-03-0{day}T09:00:00Z",
        })
    fhir_server.load({"resourceType": "Bundle", "type": "transaction", "entry": [_put(r) for r in resources]})
    return pid


def _ids(outcome) -> list[str]:
    return [r["id"] for r in outcome.resources]


# -- against the real FHIR server -----------------------------------------------------------------

def test_fetches_several_keys_in_parallel_from_a_real_server(fhir_server, patient, client_factory):
    client = client_factory()
    queries = {
        "patient": f"Patient/{patient}",
        "temperatures": f"Observation?patient={patient}&code=http://loinc.org|{LOINC_TEMP}&_sort=-date",
        "tocilizumab": f"MedicationAdministration?patient={patient}&code={RXNORM}|{TOCILIZUMAB}"
                       "&_sort=-effective-time",
        "nothing": f"Observation?patient={patient}&code=http://loinc.org|9279-1",
    }
    outcomes = client.fetch(fhir_server.base_url, queries, TOKEN)

    assert set(outcomes) == set(queries)
    for key, outcome in outcomes.items():
        assert outcome.key == key
        assert outcome.error is None and outcome.complete, (key, outcome.error)
    assert _ids(outcomes["patient"]) == [patient]
    assert _ids(outcomes["temperatures"]) == [f"{patient}-t{d}" for d in (5, 4, 3, 2, 1)]
    assert _ids(outcomes["tocilizumab"]) == [f"{patient}-m{n}" for n in (1, 2, 3)]
    assert outcomes["nothing"].resources == [] and outcomes["nothing"].pages == 1


def test_more_keys_than_workers(fhir_server, patient, client_factory):
    client = client_factory()
    queries = {f"k{i}": f"Observation?patient={patient}&date=ge2024-03-0{1 + i % 5}" for i in range(12)}
    outcomes = client.fetch(fhir_server.base_url, queries, None)
    assert all(o.complete and o.resources is not None for o in outcomes.values())
    assert len(outcomes["k0"].resources) == 5 and len(outcomes["k4"].resources) == 1


def test_follows_next_links_page_by_page(fhir_server, patient, client_factory):
    outcome = client_factory().fetch(fhir_server.base_url,
                                     {"t": f"Observation?patient={patient}&_count=2&_sort=date"}, TOKEN)["t"]
    assert outcome.complete and outcome.error is None
    assert outcome.pages == 3
    assert _ids(outcome) == [f"{patient}-t{d}" for d in (1, 2, 3, 4, 5)]


def test_page_cap_marks_the_key_incomplete(fhir_server, patient, client_factory):
    outcome = client_factory(fhir_max_pages=2).fetch(
        fhir_server.base_url, {"t": f"Observation?patient={patient}&_count=2&_sort=date"}, TOKEN)["t"]
    assert outcome.resources is not None and len(outcome.resources) == 4
    assert outcome.pages == 2 and outcome.complete is False
    assert "page limit" in outcome.error


def test_resource_cap_marks_the_key_incomplete(fhir_server, patient, client_factory):
    outcome = client_factory(fhir_max_resources_per_key=3).fetch(
        fhir_server.base_url, {"t": f"Observation?patient={patient}&_count=2"}, None)["t"]
    assert len(outcome.resources) == 3 and outcome.complete is False
    assert "resource limit" in outcome.error


def test_reading_a_missing_patient_gives_no_data(fhir_server, client_factory):
    outcome = client_factory().fetch(fhir_server.base_url, {"p": "Patient/does-not-exist-42"}, TOKEN)["p"]
    assert outcome.resources == [] and outcome.complete and outcome.error is None


def test_warning_outcome_entries_are_skipped(fhir_server, patient, client_factory):
    # sekmet ignores an unknown parameter and says so in a warning OperationOutcome entry.
    outcome = client_factory().fetch(
        fhir_server.base_url, {"m": f"MedicationAdministration?patient={patient}&date=ge2024-01-01"}, None)["m"]
    assert outcome.complete and {r["resourceType"] for r in outcome.resources} == {"MedicationAdministration"}


def test_base_url_with_trailing_slash(fhir_server, patient, client_factory):
    outcome = client_factory().fetch(fhir_server.base_url + "/", {"p": f"Patient/{patient}"}, None)["p"]
    assert _ids(outcome) == [patient]


# -- faults, against small real HTTP servers ------------------------------------------------------

def _searchset(resources, next_url=None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def _obs(n) -> dict:
    return {"resourceType": "Observation", "id": f"o{n}", "status": "final", "code": {"text": "t"}}


def test_sends_accept_and_bearer_token_and_encodes_the_query(local_http, client_factory):
    server = local_http(lambda req, srv: (200, _searchset([_obs(1)])))
    client = client_factory()
    client.fetch(server.base_url, {"a": "Observation?patient=p 1&code=http://loinc.org|8310-5"}, TOKEN)
    client.fetch(server.base_url, {"b": "Observation?patient=p1"}, None)
    first, second = server.requests
    assert first.path == "/fhir/Observation?patient=p%201&code=http://loinc.org%7C8310-5"
    assert first.headers["accept"] == "application/fhir+json"
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in second.headers


def test_keys_run_in_parallel(local_http, client_factory):
    def slowish(req, srv):
        srv.stop.wait(0.4)
        return 200, _searchset([_obs(1)])

    server = local_http(slowish)
    started = time.monotonic()
    outcomes = client_factory(fhir_budget_seconds=3).fetch(
        server.base_url, {f"k{i}": f"Observation?i={i}" for i in range(4)}, None)
    elapsed = time.monotonic() - started
    assert all(o.complete for o in outcomes.values())
    assert elapsed < 1.0, f"4 keys of 0.4 s took {elapsed:.2f} s: not parallel"


def test_slow_server_fails_within_the_budget(local_http, client_factory):
    def hang(req, srv):
        srv.stop.wait(5)
        return 200, _searchset([])

    server = local_http(hang)
    client = client_factory(fhir_timeout_seconds=5, fhir_budget_seconds=1.0)
    started = time.monotonic()
    outcome = client.fetch(server.base_url, {"slow": "Observation?patient=1"}, TOKEN)["slow"]
    elapsed = time.monotonic() - started
    assert outcome.resources is None and outcome.complete is False
    assert "timed out" in outcome.error or "time budget" in outcome.error
    assert elapsed < 1.0 + 0.5


def test_per_request_timeout_names_the_seconds(local_http, client_factory):
    def hang(req, srv):
        srv.stop.wait(5)
        return 200, _searchset([])

    server = local_http(hang)
    client = client_factory(fhir_timeout_seconds=0.5, fhir_budget_seconds=3)
    outcome = client.fetch(server.base_url, {"slow": "Observation?patient=1"}, None)["slow"]
    assert outcome.resources is None and outcome.error == "Observation search timed out after 0.5 s"


def test_a_stuck_body_does_not_hold_the_call_past_the_deadline(local_http, client_factory):
    def drip(req, srv):  # headers at once, then one byte every 0.1 s: no read ever times out
        raw = req.raw
        raw.send_response(200)
        raw.send_header("Content-Type", "application/fhir+json")
        raw.send_header("Content-Length", "100000")
        raw.end_headers()
        while not srv.stop.wait(0.1):
            raw.wfile.write(b" ")
            raw.wfile.flush()

    server = local_http(drip)
    client = client_factory(fhir_timeout_seconds=0.5, fhir_budget_seconds=0.8)
    started = time.monotonic()
    outcome = client.fetch(server.base_url, {"drip": "Observation?patient=1"}, TOKEN)["drip"]
    elapsed = time.monotonic() - started
    assert outcome.resources is None and "time budget exhausted" in outcome.error
    assert elapsed < 0.8 + 0.5


@pytest.mark.parametrize("status", [500, 502, 401, 403, 400])
def test_error_statuses_fail_the_key(local_http, client_factory, status):
    server = local_http(lambda req, srv: (status, {"resourceType": "OperationOutcome",
                                                   "issue": [{"severity": "error", "code": "exception",
                                                              "diagnostics": f"echo {TOKEN}"}]}))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.resources is None and outcome.complete is False
    assert outcome.error.startswith(f"FHIR server answered {status} for Observation search")


def test_404_on_a_search_is_a_failure_not_empty(local_http, client_factory):
    server = local_http(lambda req, srv: (404, {"resourceType": "OperationOutcome", "issue": []}))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, None)["o"]
    assert outcome.resources is None and "404" in outcome.error


@pytest.mark.parametrize("body, reason", [
    (b'{"resourceType": "Bundle", "entry": [', "invalid JSON"),
    (b"<html>login</html>", "invalid JSON"),
    (b'{"hello": "world"}', "not a FHIR resource"),
    (b'[1, 2]', "not a FHIR resource"),
])
def test_malformed_answers_fail_the_key(local_http, client_factory, body, reason):
    server = local_http(lambda req, srv: (200, body))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.resources is None and reason in outcome.error


def test_error_outcome_entry_fails_the_key(local_http, client_factory):
    bundle = _searchset([_obs(1)])
    bundle["entry"].append({"resource": {"resourceType": "OperationOutcome",
                                         "issue": [{"severity": "error", "code": "too-costly"}]},
                            "search": {"mode": "outcome"}})
    server = local_http(lambda req, srv: (200, bundle))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, None)["o"]
    assert outcome.resources is None and "too-costly" in outcome.error


def test_a_search_answered_with_a_lone_resource_fails(local_http, client_factory):
    server = local_http(lambda req, srv: (200, {"resourceType": "Patient", "id": "x"}))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, None)["o"]
    assert outcome.resources is None and "not a Bundle" in outcome.error


def test_redirects_are_not_followed(local_http, client_factory):
    other = local_http(lambda req, srv: (200, _searchset([_obs(1)])))
    server = local_http(lambda req, srv: (302, b"", {"Location": other.base_url + "/Observation"}))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.resources is None and "302" in outcome.error
    assert other.requests == []


def test_endless_next_links_stop_at_the_page_cap(local_http, client_factory):
    def endless(req, srv):
        n = len(srv.requests)
        return 200, _searchset([_obs(n)], next_url=f"{srv.base_url}/Observation?page={n + 1}")

    server = local_http(endless)
    outcome = client_factory(fhir_max_pages=4).fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.complete is False and outcome.pages == 4
    assert _ids(outcome) == ["o1", "o2", "o3", "o4"]
    assert len(server.requests) == 4


def test_relative_next_links_are_followed(local_http, client_factory):
    def paged(req, srv):
        if "page=2" in req.path:
            return 200, _searchset([_obs(2)])
        return 200, _searchset([_obs(1)], next_url="Observation?patient=1&page=2")

    server = local_http(paged)
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.complete and _ids(outcome) == ["o1", "o2"]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)


def test_next_link_to_another_origin_is_not_followed(local_http, client_factory):
    other = local_http(lambda req, srv: (200, _searchset([_obs(99)])))
    server = local_http(lambda req, srv: (200, _searchset([_obs(1)],
                                                          next_url=f"{other.base_url}/Observation?page=2")))
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert _ids(outcome) == ["o1"] and outcome.complete is False
    assert "another server" in outcome.error
    assert not any("authorization" in r.headers for r in other.requests)
    assert other.requests == []


def test_failure_on_a_later_page_keeps_earlier_pages_as_incomplete(local_http, client_factory):
    def second_page_breaks(req, srv):
        if "page=2" in req.path:
            return 503, b"busy"
        return 200, _searchset([_obs(1)], next_url=f"{srv.base_url}/Observation?page=2")

    server = local_http(second_page_breaks)
    outcome = client_factory().fetch(server.base_url, {"o": "Observation?patient=1"}, None)["o"]
    assert _ids(outcome) == ["o1"] and outcome.complete is False and "503" in outcome.error


def test_connection_refused(client_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = client_factory().fetch(f"http://127.0.0.1:{port}/fhir", {"o": "Observation?patient=1"}, TOKEN)["o"]
    assert outcome.resources is None and "could not connect" in outcome.error


def test_one_bad_key_does_not_spoil_the_others(local_http, client_factory):
    def mixed(req, srv):
        return (500, b"oops") if req.path.startswith("/fhir/MedicationAdministration") \
            else (200, _searchset([_obs(1)]))

    server = local_http(mixed)
    outcomes = client_factory().fetch(server.base_url, {"o": "Observation?patient=1",
                                                        "m": "MedicationAdministration?patient=1"}, TOKEN)
    assert _ids(outcomes["o"]) == ["o1"] and outcomes["m"].resources is None


def test_zero_budget_fails_every_key_at_once(local_http, client_factory):
    server = local_http(lambda req, srv: (200, _searchset([])))
    started = time.monotonic()
    outcomes = client_factory().fetch(server.base_url, {"a": "Observation", "b": "Patient/1"}, TOKEN,
                                      budget_seconds=0)
    assert time.monotonic() - started < 0.2
    assert all(o.resources is None for o in outcomes.values())


def test_the_token_never_appears_in_an_error(local_http, client_factory):
    echo = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": TOKEN, "diagnostics": f"Bearer {TOKEN}"}]}

    def faults(req, srv):
        kind = req.path.split("?")[0].rsplit("/", 1)[-1]
        return {
            "Observation": (500, echo),
            "Condition": (401, echo),
            "Encounter": (200, b"not json " + TOKEN.encode()),
            "Procedure": (200, {"resourceType": "Bundle", "type": "searchset",
                                "entry": [{"resource": echo, "search": {"mode": "outcome"}}]}),
            "Device": (200, _searchset([], next_url=f"http://other.invalid/{TOKEN}")),
        }.get(kind, (200, echo))

    server = local_http(faults)
    queries = {k: f"{k}?patient=1" for k in ("Observation", "Condition", "Encounter", "Procedure", "Device")}
    queries["Patient"] = "Patient/1"
    outcomes = client_factory().fetch(server.base_url, queries, TOKEN)
    errors = [o.error for o in outcomes.values()]
    assert all(errors), errors
    assert not any(TOKEN in e for e in errors), errors


def test_encode_query_keeps_delimiters_and_escapes():
    assert encode_query("Observation?code=http://loinc.org|8310-5,http://loinc.org|8867-4") == \
        "Observation?code=http://loinc.org%7C8310-5,http://loinc.org%7C8867-4"
    assert encode_query("Observation?code=http%3A%2F%2Floinc.org%7C1") == "Observation?code=http://loinc.org%7C1"
    assert encode_query("Observation?date=ge2024-01-01T00:00:00+02:00") == \
        "Observation?date=ge2024-01-01T00:00:00%2B02:00"
    assert encode_query("Patient/abc") == "Patient/abc"
