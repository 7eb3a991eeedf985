"""The benchmark's cold charts (benchmarks/workloads.py): copies of a hook request with every id made
new are other patients' charts, complete and graded as the original is."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import workloads  # noqa: E402  (benchmarks/ joins the path above)
from workloads import (CALL_TAG, ICU_PATIENT, ICU_SCENARIO, PATIENT_VIEW, cold_tag, fresh_ids,  # noqa: E402
                       out_of_scope_chart, with_call_tag, with_prefetch)


@pytest.fixture(scope="module")
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def icu(now) -> dict:
    """Workload B's body: the ICU chart, every match prefetched."""
    return with_prefetch(PATIENT_VIEW, ICU_SCENARIO.resources(now), ICU_PATIENT, whole_result_sets=True)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return create_app(Settings(feedback_db=str(folder / "feedback.sqlite3"), auth_enabled=False)).test_client()


def as_sent(body: dict, call: str) -> dict:
    """A cold body as the load generator sends it at one call."""
    return json.loads(with_call_tag(json.dumps(body), call))


def resources(body: dict) -> list[dict]:
    return workloads._top_resources(body)


def references(value) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [ref for item in value.values() for ref in references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    return []


def cards(client, body: dict) -> list[str]:
    response = client.post(f"/cds-services/{PATIENT_VIEW}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return [card["summary"] for card in response.get_json()["cards"]]


def test_a_copy_has_new_unique_ids_and_references_that_resolve(icu):
    copies = [as_sent(fresh_ids(icu, cold_tag(variant)), f"call{call}") for variant, call in ((0, 1), (1, 1), (1, 2))]
    original = {(r["resourceType"], r["id"]) for r in resources(icu)}
    seen = set(original)
    for copy in copies:
        keys = [(r["resourceType"], r["id"]) for r in resources(copy)]
        assert len(keys) == len(set(keys)) == len(original)
        assert not set(keys) & seen  # new against the original and every other copy or call
        seen |= set(keys)
        patient = copy["context"]["patientId"]
        assert ("Patient", patient) in keys and patient != ICU_PATIENT
        by_key = {f"{kind}/{id_}" for kind, id_ in keys}
        refs = references(copy)
        assert refs and all(ref in by_key or ref.startswith("#") for ref in refs)
        assert {ref for ref in refs if ref.startswith("Patient/")} == {f"Patient/{patient}"}
        full_urls = [e["fullUrl"] for v in copy["prefetch"].values() if v and v.get("entry") for e in v["entry"]]
        assert len(full_urls) == len(set(full_urls))
        assert CALL_TAG not in json.dumps(copy)
    originals = {e["fullUrl"] for v in icu["prefetch"].values() if v and v.get("entry") for e in v["entry"]}
    assert not originals & {e["fullUrl"] for v in copies[0]["prefetch"].values() if v and v.get("entry")
                            for e in v["entry"]}
    assert icu["context"]["patientId"] == ICU_PATIENT  # the original is left alone


def test_a_copy_is_graded_as_the_original(client, icu):
    expected = cards(client, icu)
    assert expected
    assert cards(client, as_sent(fresh_ids(icu, cold_tag(7)), "x1")) == expected


def test_out_of_scope_charts_are_other_patients_without_cards(client, now):
    bodies = []
    for number in (0, 3, 5):  # without, with one and with three more non-IEC medications
        chart = with_prefetch(PATIENT_VIEW, out_of_scope_chart(number, now), f"bench-opd-{number:03d}",
                              whole_result_sets=False)
        bodies.append(as_sent(fresh_ids(chart, f"m{number:03d}{CALL_TAG}"), "y1"))
    administrations = [[r["id"] for r in resources(body) if r["resourceType"] == "MedicationAdministration"]
                       for body in bodies]
    assert [len(ids) for ids in administrations] == [1, 2, 4]
    assert len({body["context"]["patientId"] for body in bodies}) == 3
    for body in bodies:
        assert cards(client, body) == []
