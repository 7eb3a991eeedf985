"""How a chart is read (decisions.md sections 7 and 10): strictly what the rules need, real EHR
shapes, and every resource that cannot be read named, never dropped."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from cds_service.clinical import assess
from cds_service.clinical.protocol import Protocol
from cds_service.scenarios import NOREPINEPHRINE, PHENYLEPHRINE, VASOPRESSIN, YESCARTA, Chart

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
MCG_MIN = (0.05, "ug/kg/min")


def febrile_chart(name: str) -> Chart:
    chart = Chart(name, NOW, "Test", "Pat", "female", 50)
    chart.iec(YESCARTA, days_ago=3)
    chart.weight(70, days_ago=2)
    chart.temp(39.2, hours_ago=2)
    return chart


# ---- Infusions charted as events ----------------------------------------------------------------

def test_two_pressors_charted_as_events_overlap_as_infusions():
    """Oracle Health style: each bag and rate change its own completed administration at one moment."""
    chart = febrile_chart("events-two")
    chart.infusion_event(NOREPINEPHRINE, 6, MCG_MIN)
    chart.infusion_event(NOREPINEPHRINE, 4, (0.1, "ug/kg/min"))   # rate change: still running
    chart.infusion_event(PHENYLEPHRINE, 3, (1, "ug/kg/min"))
    result = assess(chart.resources, NOW)
    assert result.crs.value == 4 and not result.crs.at_least
    assert "norepinephrine" in str(result.crs.evidence) and "phenylephrine" in str(result.crs.evidence)


def test_one_pressor_charted_as_events_is_grade_3_and_vasopressin_adds_none():
    chart = febrile_chart("events-one")
    chart.infusion_event(NOREPINEPHRINE, 5, MCG_MIN)
    chart.infusion_event(VASOPRESSIN, 4, (0.03, "U/min"))
    assert assess(chart.resources, NOW).crs.value == 3


def test_a_rate_of_zero_ends_the_infusion():
    chart = febrile_chart("events-stopped")
    chart.infusion_event(NOREPINEPHRINE, 8, MCG_MIN)
    chart.infusion_event(NOREPINEPHRINE, 6, (0, "ug/kg/min"))     # stopped before the second began
    chart.infusion_event(PHENYLEPHRINE, 5, (1, "ug/kg/min"))
    assert assess(chart.resources, NOW).crs.value == 3


def test_a_stopped_event_ends_the_infusion():
    chart = febrile_chart("events-status-stopped")
    chart.infusion_event(NOREPINEPHRINE, 8, MCG_MIN)
    chart.infusion_event(NOREPINEPHRINE, 6, MCG_MIN, status="stopped")
    chart.infusion_event(PHENYLEPHRINE, 5, (1, "ug/kg/min"))
    assert assess(chart.resources, NOW).crs.value == 3


def test_an_infusion_runs_at_most_the_carry_hours_after_its_last_event():
    """No stop was charted: the infusion counts 2 h (protocol value) after its last event, no more."""
    chart = febrile_chart("events-carry")
    chart.infusion_event(NOREPINEPHRINE, 9, MCG_MIN)
    chart.infusion_event(PHENYLEPHRINE, 6, (1, "ug/kg/min"))    # norepinephrine ended 7 h ago
    assert assess(chart.resources, NOW).crs.value == 3
    longer = Protocol.load(overrides={"infusion_carry_hours": 4})
    assert assess(chart.resources, NOW, longer).crs.value == 4


# ---- What is read, and what is not ----------------------------------------------------------------

def test_an_element_r4_does_not_have_is_noted_and_the_reading_kept():
    """SMART's sample data carry the STU3 ``context`` on Observations labelled R4."""
    from cds_service.clinical.facts import extract_facts
    from cds_service.clinical.protocol import default_protocol
    from cds_service.terminology import load_terminology

    chart = febrile_chart("stu3-context")
    chart.bp(84, 50, hours_ago=1)
    for resource in chart.resources:
        if resource["resourceType"] == "Observation":
            resource["context"] = {"reference": "Encounter/1"}
    result = assess(chart.resources, NOW)
    assert result.crs.value == 2 and not result.crs.at_least and result.unreadable == []
    facts = extract_facts(chart.resources, NOW, load_terminology(), default_protocol(), lambda f: None)
    assert facts.ignored == {}  # out of scope: no Observation read
    facts = extract_facts(chart.resources, NOW, load_terminology(), default_protocol())
    assert facts.ignored == {"Observation.context": 3}


@pytest.mark.parametrize("status, counts", [
    ("preliminary", True), ("final", True), ("amended", True), ("corrected", True), ("unknown", True),
    ("entered-in-error", False), ("cancelled", False), ("registered", False),
])
def test_observation_statuses(status, counts):
    chart = febrile_chart(f"status-{status}")
    chart.resources[-1]["status"] = status
    result = assess(chart.resources, NOW)
    assert (result.crs.value == 1) == counts and not result.crs.at_least


def test_a_time_without_a_zone_is_read_in_the_site_s_time_zone_and_flagged():
    """14:00 written without a zone, at a site in New York: 19:00 UTC, not 14:00 UTC."""
    chart = Chart("zoneless", NOW, "Test", "Pat", "female", 50)
    chart.iec(YESCARTA, days_ago=3)
    chart.temp(39.0, hours_ago=0)
    chart.resources[-1]["effectiveDateTime"] = "2026-11-20T09:30:00"   # 14:30 UTC in New York
    inside = assess(chart.resources, NOW, zone=ZoneInfo("America/New_York"))
    assert inside.crs.value == 1
    assert inside.crs.evidence[0].time == datetime(2026, 11, 20, 14, 30, tzinfo=timezone.utc)
    assert any(f.code == "time-without-zone" and "America/New_York" in f.text for f in inside.crs.flags)
    # In UTC the same reading is 09:30, outside the last 24 h: no fever.
    assert assess(chart.resources, NOW).crs.value == 0


@pytest.mark.parametrize("value, unit, kg", [(70, "kg", 70), (154.32, "[lb_av]", 70), (2469.2, "[oz_av]", 70),
                                             (70000, "g", 70)])
def test_weight_units(value, unit, kg):
    chart = febrile_chart(f"weight-{unit}")
    chart.bp(84, 50, hours_ago=1)   # CRS 2: tocilizumab dosed by weight
    weight = next(r for r in chart.resources if r.get("id", "").endswith("weight1"))
    weight["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    dose = next(r for r in assess(chart.resources, NOW).recommendations if r.topic == "tocilizumab")
    assert any(f"{kg:g} kg" in line for line in dose.detail)


def test_the_same_resource_twice_counts_once_and_the_newest_version_wins():
    chart = febrile_chart("duplicates")
    temperature = chart.resources[-1]
    temperature["meta"] = {"versionId": "1", "lastUpdated": "2026-11-21T10:00:00Z"}
    corrected = copy.deepcopy(temperature)
    corrected.update(status="corrected", valueQuantity={"value": 36.9, "unit": "Cel", "code": "Cel"},
                     meta={"versionId": "2", "lastUpdated": "2026-11-21T11:00:00Z"})
    result = assess([*chart.resources, copy.deepcopy(temperature)], NOW)
    assert result.crs.value == 1 and len(result.crs.evidence) == 1
    assert assess([*chart.resources, corrected], NOW).crs.value == 0
    assert assess([corrected, *chart.resources], NOW).crs.value == 0


# ---- Nothing silently dropped: each reason a reading cannot be had makes the grade "at least" -----

def _temperature(chart: Chart) -> dict:
    return next(r for r in chart.resources if r.get("id", "").endswith("temp1"))


def _iec(chart: Chart) -> dict:
    return next(r for r in chart.resources if r.get("id", "").endswith("iec1"))


def _pressor(chart: Chart) -> dict:
    return next(r for r in chart.resources if r.get("id", "").endswith("event1"))


SKIP_REASONS = {
    "no value": (_temperature, lambda r: r.pop("valueQuantity"), "no valueQuantity"),
    "a value that is not a number": (_temperature, lambda r: r["valueQuantity"].update(value="high"),
                                     "no numeric value"),
    "a number beyond a float's range": (_temperature, lambda r: r["valueQuantity"].update(value=10 ** 400),
                                        "out of range"),
    "an unknown unit": (_temperature, lambda r: r["valueQuantity"].update(unit="K", code="K"), "not understood"),
    "no time": (_temperature, lambda r: r.pop("effectiveDateTime"), "no effective time"),
    "a malformed time": (_temperature, lambda r: r.update(effectiveDateTime="yesterday"), "not a FHIR dateTime"),
    "an unknown status": (_temperature, lambda r: r.update(status="done"), "is not a Observation status"),
    "a modifier extension": (_temperature, lambda r: r.update(modifierExtension=[{"url": "x", "valueBoolean": True}]),
                             "modifierExtension"),
    "a pressor rate that is not a number": (_pressor, lambda r: r["dosage"]["rateQuantity"].update(value="fast"),
                                            "dosage rate"),
    "a pressor's drug that cannot be resolved": (
        _pressor, lambda r: (r.pop("medicationCodeableConcept"), r.update(medicationReference={"reference": "Medication/x9"})),
        "Medication/x9"),
    "a dose that is not a Quantity": (_pressor, lambda r: r["dosage"].update(dose=5), "dosage.dose"),
}


@pytest.mark.parametrize("reason", sorted(SKIP_REASONS))
def test_each_reason_a_reading_is_skipped_makes_the_grade_at_least_and_names_it(reason):
    find, spoil, words = SKIP_REASONS[reason]
    chart = febrile_chart(f"skip-{reason.replace(' ', '-')}")
    chart.infusion_event(NOREPINEPHRINE, 2, MCG_MIN)
    spoiled = find(chart)
    spoil(spoiled)
    result = assess(chart.resources, NOW)
    assert result.crs.value is not None and result.crs.at_least, reason
    assert any(words in line and spoiled["id"] in line for line in result.crs.missing), result.crs.missing


def test_an_unreadable_iec_therapy_gives_no_grade_at_all():
    chart = febrile_chart("skip-iec")
    _iec(chart)["effectivePeriod"] = {"start": "soon"}
    result = assess(chart.resources, NOW)
    assert not result.assessable and result.crs.value is None


def test_a_blood_pressure_panel_without_a_systolic_value_is_named():
    chart = febrile_chart("skip-panel")
    chart.bp(80, 45, hours_ago=1)
    panel = chart.resources[-1]
    panel["component"] = panel["component"][1:]   # diastolic only
    result = assess(chart.resources, NOW)
    assert result.crs.at_least and any("without a systolic component" in m for m in result.crs.missing)


def test_an_unrecognised_oxygen_device_is_named():
    chart = febrile_chart("skip-device")
    chart.o2_device(("oxygen-device-high-flow", None, "Vapotherm-ish gadget"), hours_ago=1)
    result = assess(chart.resources, NOW)
    assert result.crs.at_least and any("oxygen device not recognised" in m for m in result.crs.missing)


def test_a_reading_outside_every_window_is_neither_read_nor_reported():
    chart = febrile_chart("skip-old")
    chart.bp(70, 40, hours_ago=30)
    chart.resources[-1]["component"][0]["valueQuantity"]["value"] = "low"
    assert not assess(chart.resources, NOW).crs.at_least


def test_a_whole_source_that_could_not_be_read_is_named():
    from cds_service.clinical.model import Unreadable

    chart = febrile_chart("skip-source")
    failed = Unreadable("prefetch:oxygen", "time budget exhausted", "Observation")
    result = assess(chart.resources, NOW, unread_sources=[failed])
    assert result.crs.value == 1 and result.crs.at_least
    assert result.crs.missing == ["prefetch:oxygen: time budget exhausted"]


def test_the_window_of_an_event_infusion_is_not_past_now():
    """Charted 1 h ago with no stop: running now, not for 2 h more."""
    chart = febrile_chart("events-now")
    chart.infusion_event(NOREPINEPHRINE, 1, MCG_MIN)
    from cds_service.clinical.facts import extract_facts
    from cds_service.clinical.protocol import default_protocol
    from cds_service.terminology import load_terminology

    facts = extract_facts(chart.resources, NOW, load_terminology(), default_protocol())
    [run] = facts.drugs_in("vasopressors")
    assert run.start == NOW - timedelta(hours=1) and run.end == NOW
