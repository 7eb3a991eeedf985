"""The scenario library: every vignette gets the grades and topics decisions.md requires, at any ``now``.

Each scenario is graded at a fixed time, at the real current time and at a leap-day moment in a
non-UTC offset, which proves the charts are built relative to ``now`` and never go stale. Every
bundle must be a valid FHIR R4 (R4B model) transaction with unique, well-formed ids.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.bundle import Bundle

from cds_service.clinical import assess
from cds_service.scenarios import SCENARIOS, Scenario, by_name

FIXED_NOW = datetime(2025, 3, 5, 14, 30, tzinfo=timezone.utc)
NOWS = {
    "fixed": FIXED_NOW,
    "real": datetime.now(timezone.utc),
    "leap-day-offset": datetime(2024, 2, 29, 23, 59, 30, tzinfo=timezone(timedelta(hours=-5))),
}
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
NAMES = [s.name for s in SCENARIOS]


def _topics(assessment) -> set[str]:
    return {r.topic for r in assessment.recommendations}


@pytest.mark.parametrize("when", NOWS, ids=list(NOWS))
@pytest.mark.parametrize("name", NAMES)
def test_scenario_grades_and_topics(name: str, when: str) -> None:
    scenario = by_name(name)
    now = NOWS[when]
    assessment = assess(scenario.resources(now), now)
    topics = _topics(assessment)
    assert assessment.unreadable == [], "scenario resources must all be readable"
    assert assessment.crs.value == scenario.expected_crs, assessment.crs.reason
    assert assessment.icans.value == scenario.expected_icans, assessment.icans.reason
    assert scenario.expected_topics <= topics, f"missing topics {sorted(scenario.expected_topics - topics)}"
    assert not scenario.absent_topics & topics, f"unwanted topics {sorted(scenario.absent_topics & topics)}"
    if scenario.expected_crs is None and scenario.expected_icans is None:
        assert not assessment.in_scope and assessment.recommendations == []


@pytest.mark.parametrize("name", ["crs2-no-weight", "crs3-refractory-four-doses"])
def test_tocilizumab_card_without_an_order(name: str) -> None:
    """No weight in 30 days, or the episode limit reached: a tocilizumab card, but never a dose."""
    assessment = assess(by_name(name).resources(FIXED_NOW), FIXED_NOW)
    card = assessment.recommendation("tocilizumab")
    assert card is not None and card.order is None


# Flags decisions.md section 3 requires on the card for some edge cases.
EXPECTED_FLAGS = {
    "crs2-hfnc-device-4lpm": {"device-flow-mismatch"},  # "the card flags the mismatch"
    "crs3-fever-masked-hfnc": {"fever-masked"},
    "possible-masked-crs-prophylaxis": {"possible-masked-crs"},
    "icans4-intubated-seizure": {"airway-protection", "sedation"},  # positive pressure while ICANS >= 3
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_edge_case_flags(name: str) -> None:
    assessment = assess(by_name(name).resources(FIXED_NOW), FIXED_NOW)
    flags = {f.code for f in assessment.crs.flags + assessment.icans.flags}
    assert EXPECTED_FLAGS[name] <= flags


def test_tocilizumab_dose_under_30_kg() -> None:
    """The 14.5 kg child gets 12 mg/kg = 174 mg, rounded to 170 mg."""
    assessment = assess(by_name("crs2-child-blow-by").resources(FIXED_NOW), FIXED_NOW)
    assert assessment.recommendation("tocilizumab").order.dose_mg == 170


def test_library_size_and_grade_coverage() -> None:
    assert len(SCENARIOS) >= 15
    assert {s.expected_crs for s in SCENARIOS} >= {0, 1, 2, 3, 4}
    assert {s.expected_icans for s in SCENARIOS} >= {0, 1, 2, 3, 4}
    assert any(s.expected_crs is None and s.expected_icans is None for s in SCENARIOS)
    assert any(s.expected_crs is None and s.expected_icans is not None for s in SCENARIOS)


def test_names_are_unique_kebab_case() -> None:
    assert len(set(NAMES)) == len(NAMES)
    for name in NAMES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name


def test_by_name_lists_known_names() -> None:
    with pytest.raises(KeyError, match="crs4-bipap"):
        by_name("no-such-scenario")


@pytest.mark.parametrize("name", NAMES)
def test_bundle_is_valid_r4_transaction(name: str) -> None:
    scenario: Scenario = by_name(name)
    bundle = scenario.bundle(FIXED_NOW)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    keys = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]]
    assert len(set(keys)) == len(keys), "resource ids must be unique"
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(keys)
    patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert [p["id"] for p in patients] == [name]
    for entry, key in zip(bundle["entry"], keys):
        resource_id = entry["resource"]["id"]
        assert FHIR_ID.match(resource_id), resource_id
        assert resource_id == name or resource_id.startswith(f"{name}-"), resource_id
        assert entry["request"] == {"method": "PUT", "url": key}
        assert entry["fullUrl"].startswith("urn:uuid:")
        subject = entry["resource"].get("subject")
        if subject is not None:
            assert subject["reference"] == f"Patient/{name}"
    with_base = scenario.bundle(FIXED_NOW, base_url="http://127.0.0.1:8091/fhir/")
    assert [e["fullUrl"] for e in with_base["entry"]] == [f"http://127.0.0.1:8091/fhir/{k}" for k in keys]


def test_ids_are_unique_across_the_library() -> None:
    """All scenarios can be loaded side by side into one FHIR server."""
    keys = [f"{r['resourceType']}/{r['id']}" for s in SCENARIOS for r in s.resources(FIXED_NOW)]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", NAMES)
def test_resources_are_stable_and_relative_to_now(name: str) -> None:
    scenario = by_name(name)
    first, again = scenario.resources(FIXED_NOW), scenario.resources(FIXED_NOW)
    assert first == again
    later = scenario.resources(FIXED_NOW + timedelta(days=400))
    assert [r["id"] for r in later] == [r["id"] for r in first]
    assert later != first


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        SCENARIOS[0].resources(datetime(2025, 3, 5, 14, 30))


def test_required_shapes_are_represented() -> None:
    """The library exercises the R4 shapes real EHRs send, not just the easy ones."""
    resources = [r for s in SCENARIOS for r in s.resources(FIXED_NOW)]
    admins = [r for r in resources if r["resourceType"] == "MedicationAdministration"]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert any(a.get("medicationReference", {}).get("reference", "").startswith("#") and a.get("contained")
               for a in admins)
    assert any("effectivePeriod" in a and "end" not in a["effectivePeriod"] and a["status"] == "in-progress"
               for a in admins)
    assert any(o.get("valueQuantity", {}).get("code") == "[degF]" for o in observations)
    assert any(c["code"]["coding"][0]["code"] == "3151-8" for o in observations for c in o.get("component", [])
               if o["code"]["coding"][0]["code"] == "59408-5")
    assert any(not o["effectiveDateTime"].endswith("Z") for o in observations)
