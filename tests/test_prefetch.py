"""Prefetch templates and their resolution (CDS Hooks 2.0 prefetch rules, spec-notes 1.3 and 5.1)."""
from __future__ import annotations

import socket
import uuid

import pytest
import requests

from cds_service.errors import PreconditionFailed
from cds_service.fhir.client import FhirClient
from cds_service.fhir.prefetch import PrefetchResult, render_template, resolve_prefetch
from cds_service.settings import Settings

TOKEN = "prefetch-token-5e4d3c2b1a"
LOINC = "http://loinc.org"

CONTEXT = {"patientId": "123", "userId": "Practitioner/abc", "encounterId": "enc-9",
           "draftOrders": {"resourceType": "Bundle", "entry": []}, "count": 7, "flag": True}


# -- render_template ------------------------------------------------------------------------------

@pytest.mark.parametrize("template, expected", [
    ("Patient/{{context.patientId}}", "Patient/123"),
    ("Observation?patient={{context.patientId}}&encounter={{ context.encounterId }}",
     "Observation?patient=123&encounter=enc-9"),
    ("Observation?code=http://loinc.org|8310-5&patient={{context.patientId}}",
     "Observation?code=http://loinc.org|8310-5&patient=123"),
    ("Observation?_count={{context.count}}", "Observation?_count=7"),
    ("Practitioner/{{userPractitionerId}}", "Practitioner/abc"),
    ("{{context.userId}}", "Practitioner/abc"),
    ("Observation?patient=1", "Observation?patient=1"),
])
def test_render_fills_tokens(template, expected):
    assert render_template(template, CONTEXT) == expected


@pytest.mark.parametrize("template", [
    "Observation?patient={{context.missing}}",
    "Observation?patient={{context.draftOrders}}",           # not a primitive
    "MedicationRequest/{{context.draftOrders.entry.id}}",   # not root-level
    "Observation?x={{context.flag}}",                        # booleans are not str/int
    "PractitionerRole/{{userPractitionerRoleId}}",           # userId is a Practitioner
    "Patient/{{userPatientId}}",
    "RelatedPerson/{{userRelatedPersonId}}",
    "Patient/{{patient}}",                                   # pre-1.0 syntax
    "Observation?date=gt{{today() - 90 days}}",               # CI FHIRPath token, not supported
    "Observation?patient={{context.patientId}}&x={{context.missing}}",
])
def test_render_gives_none_when_a_token_cannot_be_filled(template):
    assert render_template(template, CONTEXT) is None


def test_render_encodes_substituted_values():
    context = {"patientId": "a b|c&d=e?#%"}
    assert render_template("Observation?patient={{context.patientId}}", context) == \
        "Observation?patient=a%20b%7Cc%26d%3De%3F%23%25"


def test_render_user_tokens_from_user_id():
    assert render_template("PractitionerRole/{{userPractitionerRoleId}}", {},
                           user_id="PractitionerRole/r-1") == "PractitionerRole/r-1"
    assert render_template("Patient/{{userPatientId}}", {"userId": "Patient/p7"}) == "Patient/p7"
    assert render_template("RelatedPerson/{{userRelatedPersonId}}", {"userId": "RelatedPerson/rp"}) == \
        "RelatedPerson/rp"
    assert render_template("Practitioner/{{userPractitionerId}}", {"userId": "abc"}) is None


def test_render_empty_string_field_is_unfilled():
    assert render_template("Patient/{{context.patientId}}", {"patientId": ""}) is None


# -- resolve_prefetch -----------------------------------------------------------------------------

SETTINGS = Settings(fhir_timeout_seconds=1.5, fhir_budget_seconds=2.0)


@pytest.fixture
def client():
    with FhirClient(SETTINGS) as fhir_client:
        yield fhir_client


@pytest.fixture(scope="module")
def pid(fhir_server) -> str:
    """A patient with 5 temperatures on the real server."""
    patient_id = f"pf-{uuid.uuid4().hex[:12]}"
    entries = [{"resource": {"resourceType": "Patient", "id": patient_id},
                "request": {"method": "PUT", "url": f"Patient/{patient_id}"}}]
    for day in range(1, 6):
        obs = {"resourceType": "Observation", "id": f"{patient_id}-t{day}", "status": "final",
               "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
               "subject": {"reference": f"Patient/{patient_id}"},
               "effectiveDateTime": f"2024-04-0{day}T08:00:00Z",
               "valueQuantity": {"value": 38.5, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}
        entries.append({"resource": obs, "request": {"method": "PUT", "url": f"Observation/{obs['id']}"}})
    fhir_server.load({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return patient_id


TEMPLATES = {
    "patient": "Patient/{{context.patientId}}",
    "temperatures": "Observation?patient={{context.patientId}}&code=http://loinc.org|8310-5&_sort=-date",
}


def _request(patient_id="123", prefetch=None, server=None, token=TOKEN) -> dict:
    request = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
               "context": {"patientId": patient_id, "userId": "Practitioner/abc"}}
    if prefetch is not None:
        request["prefetch"] = prefetch
    if server:
        request["fhirServer"] = server
        if token:
            request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "scope": "patient/*.read",
                                            "subject": "crs-cds", "expires_in": 300}
    return request


def _searchset(resources, next_url=None, extra_entries=()) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources] + list(extra_entries)}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def _temp(n, patient_id="123") -> dict:
    return {"resourceType": "Observation", "id": f"{patient_id}-t{n}", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
            "subject": {"reference": f"Patient/{patient_id}"}}


def _ids(result: PrefetchResult) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in result.resources]


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/fhir"


def test_complete_prefetch_needs_no_server(client):
    prefetch = {"patient": {"resourceType": "Patient", "id": "123"},
                "temperatures": _searchset([_temp(1), _temp(2)])}
    result = resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS,
                              required={"patient", "temperatures"})
    assert _ids(result) == ["Patient/123", "Observation/123-t1", "Observation/123-t2"]
    assert result.sources == {"patient": "prefetch", "temperatures": "prefetch"}
    assert result.failures == [] and result.fetch_seconds == 0


def test_null_key_means_no_data_not_a_failure(client):
    prefetch = {"patient": {"resourceType": "Patient", "id": "123"}, "temperatures": None}
    result = resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS,
                              required={"patient", "temperatures"})
    assert _ids(result) == ["Patient/123"]
    assert result.sources["temperatures"] == "prefetch" and result.failures == []


def test_warning_outcomes_in_a_prefetched_bundle_are_dropped(client):
    warning = {"resource": {"resourceType": "OperationOutcome",
                            "issue": [{"severity": "warning", "code": "not-supported"}]},
               "search": {"mode": "outcome"}}
    prefetch = {"patient": None, "temperatures": _searchset([_temp(1)], extra_entries=[warning])}
    result = resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS)
    assert _ids(result) == ["Observation/123-t1"] and result.failures == []


def test_operation_outcome_key_is_refetched_from_the_server(fhir_server, pid, client):
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    prefetch = {"patient": {"resourceType": "Patient", "id": pid}, "temperatures": failed}
    result = resolve_prefetch(TEMPLATES, _request(pid, prefetch, fhir_server.base_url), client, SETTINGS,
                              required={"temperatures"})
    assert result.sources == {"patient": "prefetch", "temperatures": "fetched"}
    assert _ids(result) == [f"Patient/{pid}"] + [f"Observation/{pid}-t{d}" for d in (5, 4, 3, 2, 1)]
    assert result.failures == [] and result.fetch_seconds > 0


def test_error_outcome_entry_in_a_prefetched_bundle_is_refetched(fhir_server, pid, client):
    error = {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "exception"}]},
             "search": {"mode": "outcome"}}
    prefetch = {"patient": None, "temperatures": _searchset([_temp(1, pid)], extra_entries=[error])}
    result = resolve_prefetch(TEMPLATES, _request(pid, prefetch, fhir_server.base_url), client, SETTINGS)
    assert result.sources["temperatures"] == "fetched"
    assert len(result.resources) == 5


def test_missing_keys_are_fetched_in_one_call(fhir_server, pid, client):
    result = resolve_prefetch(TEMPLATES, _request(pid, None, fhir_server.base_url, token=None), client, SETTINGS,
                              required={"patient", "temperatures"})
    assert result.sources == {"patient": "fetched", "temperatures": "fetched"}
    assert len(result.resources) == 6 and result.failures == []


def test_missing_read_on_the_server_is_no_data(fhir_server, client):
    templates = {"patient": "Patient/{{context.patientId}}"}
    result = resolve_prefetch(templates, _request("nobody-here-1", None, fhir_server.base_url), client, SETTINGS,
                              required={"patient"})
    assert result.resources == [] and result.failures == [] and result.sources == {"patient": "fetched"}


def test_paginated_prefetch_is_followed_through_the_server(fhir_server, pid, client):
    first_page = requests.get(f"{fhir_server.base_url}/Observation",
                              params={"patient": pid, "_count": 2, "_sort": "date"}, timeout=5).json()
    assert any(link["relation"] == "next" for link in first_page["link"])
    prefetch = {"patient": None, "temperatures": first_page}
    result = resolve_prefetch(TEMPLATES, _request(pid, prefetch, fhir_server.base_url), client, SETTINGS)
    assert _ids(result) == [f"Observation/{pid}-t{d}" for d in (1, 2, 3, 4, 5)]
    assert result.sources["temperatures"] == "prefetch" and result.failures == []


def test_paginated_prefetch_without_a_server_is_incomplete(client):
    prefetch = {"patient": None, "temperatures": _searchset([_temp(1)], next_url="https://ehr.example/fhir/x?p=2")}
    result = resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS, required={"temperatures"})
    assert _ids(result) == ["Observation/123-t1"]
    assert [(f.reference, f.source) for f in result.failures] == [("prefetch:temperatures", "Observation")]
    assert "more pages" in result.failures[0].reason


def test_missing_required_key_without_a_server_is_412(client):
    prefetch = {"patient": {"resourceType": "Patient", "id": "123"}}
    with pytest.raises(PreconditionFailed) as caught:
        resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS, required={"temperatures"})
    assert caught.value.status == 412
    assert "temperatures" in caught.value.message and "patient" not in caught.value.message.split("(")[0]


def test_missing_optional_key_without_a_server_is_a_recorded_failure(client):
    prefetch = {"patient": {"resourceType": "Patient", "id": "123"}}
    result = resolve_prefetch(TEMPLATES, _request(prefetch=prefetch), client, SETTINGS, required={"patient"})
    assert _ids(result) == ["Patient/123"]
    assert result.sources == {"patient": "prefetch", "temperatures": "failed"}
    (failure,) = result.failures
    assert failure.reference == "prefetch:temperatures" and failure.source == "Observation"
    assert "no fhirServer" in failure.reason


def test_failed_fetch_of_a_required_key_is_a_failure_for_the_caller_to_judge(client):
    """Tried and failed is not 412 here: the core grades "at least N" or, without medications,
    the service answers 412 (decisions.md 7)."""
    result = resolve_prefetch(TEMPLATES, _request(server=_closed_port_url()), client, SETTINGS, required={"patient"})
    assert result.sources["patient"] == "failed"
    failure = next(f for f in result.failures if f.reference == "prefetch:patient")
    assert "could not connect" in failure.reason and TOKEN not in failure.reason


def test_failed_fetch_of_an_optional_key_is_recorded(fhir_server, pid, client):
    templates = dict(TEMPLATES, bad="NoSuchType?patient={{context.patientId}}")
    result = resolve_prefetch(templates, _request(pid, None, fhir_server.base_url), client, SETTINGS,
                              required={"patient"})
    assert result.sources["bad"] == "failed" and result.sources["temperatures"] == "fetched"
    (failure,) = result.failures
    assert failure.reference == "prefetch:bad" and failure.source == "NoSuchType"
    assert TOKEN not in failure.reason


def test_unfillable_template_is_412_when_required_and_a_failure_otherwise(fhir_server, client):
    templates = {"encounter": "Encounter/{{context.encounterId}}"}
    with pytest.raises(PreconditionFailed, match="encounter"):
        resolve_prefetch(templates, _request(server=fhir_server.base_url), client, SETTINGS, required={"encounter"})
    result = resolve_prefetch(templates, _request(server=fhir_server.base_url), client, SETTINGS)
    assert result.sources == {"encounter": "failed"}
    assert "cannot be filled" in result.failures[0].reason and result.failures[0].source == "Encounter"


def test_resources_repeated_across_keys_are_read_once(client):
    """Every key's resources are passed on; the reading, which every path shares, keeps each once."""
    from cds_service.clinical.facts import unique_resources

    patient = {"resourceType": "Patient", "id": "123"}
    templates = dict(TEMPLATES, everything="Observation?patient={{context.patientId}}")
    prefetch = {"patient": patient,
                "temperatures": _searchset([_temp(1), _temp(2)]),
                "everything": _searchset([_temp(2), _temp(3), patient])}
    result = resolve_prefetch(templates, _request(prefetch=prefetch), client, SETTINGS)
    unique, dropped = unique_resources(result.resources)
    assert [f"{r['resourceType']}/{r['id']}" for r in unique] == [
        "Patient/123", "Observation/123-t1", "Observation/123-t2", "Observation/123-t3"]
    assert dropped == 2


# ---- Paging stops once a newest-first page reaches back far enough --------------------------------

def _obs_at(identifier: str, when: str) -> dict:
    return {"resourceType": "Observation", "id": identifier, "status": "final", "code": {"text": "t"},
            "effectiveDateTime": when}


def test_reaches_back_needs_a_newest_first_page_past_the_cutoff():
    from datetime import datetime, timezone

    from cds_service.fhir.prefetch import reaches_back

    cutoff = datetime(2026, 11, 20, tzinfo=timezone.utc)
    newest_first = [_obs_at("a", "2026-11-21T10:00:00Z"), _obs_at("b", "2026-11-19T10:00:00Z")]
    assert reaches_back(newest_first, cutoff)
    assert not reaches_back(newest_first[:1], cutoff)
    assert not reaches_back(list(reversed(newest_first)), cutoff)  # a server that ignored _sort
    assert not reaches_back([], cutoff)


def test_a_prefetched_page_reaching_past_the_cutoff_is_complete(client, fhir_server, pid):
    from datetime import datetime, timezone

    cutoff = datetime(2026, 11, 20, tzinfo=timezone.utc)
    page = {"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": f"{fhir_server.base_url}/Observation?_offset=2"}],
            "entry": [{"resource": _obs_at("a", "2026-11-21T10:00:00Z")},
                      {"resource": _obs_at("b", "2026-11-19T10:00:00Z")}]}
    prefetch = {"patient": None, "temperatures": page}
    result = resolve_prefetch(TEMPLATES, _request(pid, prefetch, fhir_server.base_url), client, SETTINGS,
                              cutoffs={"temperatures": cutoff})
    assert result.failures == [] and result.sources["temperatures"] == "prefetch"
    assert [r["id"] for r in result.resources] == ["a", "b"]


def test_the_services_own_search_asks_only_for_what_the_rules_read(client, fhir_server, pid):
    """Fetched by the service (not prefetched): the real server is asked for date >= the key's cutoff,
    so it sends, and the service parses, only those; the Patient read is left as it is."""
    from datetime import datetime, timezone

    from cds_service.fhir.prefetch import only_since

    cutoff = datetime(2024, 4, 3, 8, 0, tzinfo=timezone.utc)
    result = resolve_prefetch(TEMPLATES, _request(pid, server=fhir_server.base_url), client, SETTINGS,
                              cutoffs={"temperatures": cutoff})
    assert result.failures == [] and result.sources["temperatures"] == "fetched"
    assert sorted(r["id"] for r in result.resources if r["resourceType"] == "Observation") == [
        f"{pid}-t3", f"{pid}-t4", f"{pid}-t5"]
    assert only_since("Patient/123", cutoff) == "Patient/123"
    assert only_since("Observation?patient=1", cutoff) == "Observation?patient=1&date=ge2024-04-03T08:00:00Z"


# ---- Medications named only by reference ---------------------------------------------------------

def _administration(identifier: str, reference: str, display: str | None = None) -> dict:
    ref = {"reference": reference, **({"display": display} if display else {})}
    return {"resourceType": "MedicationAdministration", "id": identifier, "status": "completed",
            "medicationReference": ref, "effectiveDateTime": "2026-11-20T10:00:00Z"}


def test_a_medication_named_only_by_reference_is_fetched_in_one_search(client, local_http):
    norepinephrine = {"resourceType": "Medication", "id": "eNE1", "code": {"text": "norepinephrine"}}
    fhir = local_http(lambda request, server: (200, _searchset([norepinephrine]))
                      if request.path.startswith("/fhir/Medication?") else (404, {}))
    templates = {"medications": "MedicationAdministration?patient={{context.patientId}}"}
    prefetch = {"medications": _searchset([
        _administration("a1", "Medication/eNE1"),
        _administration("a2", "#contained"),                       # inside the administration
        _administration("a3", "Medication/eNamed", "vasopressin"),  # the display names it
        _administration("a4", "https://ehr.example/fhir/Medication/eNE1/_history/2"),
    ])}
    result = resolve_prefetch(templates, _request(prefetch=prefetch, server=fhir.base_url), client, SETTINGS)
    assert [r.path for r in fhir.requests] == ["/fhir/Medication?_id=eNE1"]
    assert fhir.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert norepinephrine in result.resources and result.failures == []


def test_a_medication_that_cannot_be_fetched_leaves_only_its_administration_unreadable(client, local_http):
    from datetime import datetime, timezone

    from cds_service.clinical import assess

    fhir = local_http(lambda request, server: (500, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "exception"}]}))
    templates = {"medications": "MedicationAdministration?patient={{context.patientId}}"}
    car_t = {"resourceType": "MedicationAdministration", "id": "cart", "status": "completed",
             "medicationCodeableConcept": {"text": "Yescarta (axicabtagene ciloleucel)"},
             "effectiveDateTime": "2026-11-18T10:00:00Z"}
    prefetch = {"medications": _searchset([car_t, _administration("a1", "Medication/eGone")])}
    result = resolve_prefetch(templates, _request(prefetch=prefetch, server=fhir.base_url), client, SETTINGS)
    assert result.sources["referenced medications"] == "failed"
    graded = assess(result.resources, datetime(2026, 11, 21, tzinfo=timezone.utc), unread_sources=result.failures)
    assert graded.assessable and graded.crs.value == 0 and graded.crs.at_least
    assert graded.crs.missing == ["MedicationAdministration/a1: its medication (Medication/eGone) could not be read"]
