"""Every grading edge case of reference.md section 5 and every grading rule of decisions.md 1-4.

Each test writes a small chart with the scenario builder and checks the grade, and the evidence or
flag that explains it. No server is needed: this is the pure clinical core.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cds_service.clinical import assess
from cds_service.scenarios import (
    ACETAMINOPHEN, BIPAP_MASK, BLOW_BY, DEXAMETHASONE, HFNC, NASAL_CANNULA, NON_REBREATHER, NOREPINEPHRINE,
    PHENYLEPHRINE, PROPOFOL, ROOM_AIR, TECLISTAMAB, TOCILIZUMAB, VASOPRESSIN, VENTILATOR, YESCARTA, Chart, Drug,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
EPINEPHRINE = Drug("epinephrine infusion", "vasopressors", "3992")
DOBUTAMINE = Drug("dobutamine infusion", "inotropes", "3616")
LEVOPHED = Drug("Levophed 4 mg in 250 mL")
VENTURI = ("oxygen-device-high-flow", "428285009", "Venturi mask 28%")
SIMPLE_MASK = ("oxygen-device-high-flow", "336602003", "Simple face mask")
CPAP = ("oxygen-device-positive-pressure", "47545007", "CPAP")


def car_t_chart(name: str = "edge", age: int = 55, days_since_infusion: float = 3, weight: float | None = 70) -> Chart:
    chart = Chart(name, NOW, "Test", "Pat", "female", age)
    chart.iec(YESCARTA, days_ago=days_since_infusion)
    if weight:
        chart.weight(weight, days_ago=1)
    return chart


def graded(chart: Chart):
    return assess(chart.resources, NOW)


def flag_codes(grade) -> set[str]:
    return {f.code for f in grade.flags}


def topics(assessment) -> set[str]:
    return {r.topic for r in assessment.recommendations}


# ---- reference.md section 5, CRS ---------------------------------------------------------------------

def test_1_fever_norepinephrine_and_vasopressin_is_grade_3():
    chart = car_t_chart()
    chart.temp(39.0, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.1, "ug/kg/min"))
    chart.infusion(VASOPRESSIN, started_hours_ago=2, rate=(0.03, "U/min"))
    crs = graded(chart).crs
    assert crs.value == 3
    assert {e.reference for e in crs.evidence} >= {"MedicationAdministration/edge-drip1", "MedicationAdministration/edge-drip2"}


@pytest.mark.parametrize("second", [PHENYLEPHRINE, EPINEPHRINE])
def test_2_two_vasopressors_excluding_vasopressin_is_grade_4(second):
    chart = car_t_chart()
    chart.temp(38.6, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=4, rate=(0.2, "ug/kg/min"))
    chart.infusion(second, started_hours_ago=2, rate=(1, "ug/kg/min"))
    assert graded(chart).crs.value == 4


def test_2b_vasopressors_that_never_overlap_count_one_at_a_time():
    chart = car_t_chart()
    chart.temp(38.6, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=10, rate=(0.2, "ug/kg/min"), stopped_hours_ago=8)
    chart.infusion(PHENYLEPHRINE, started_hours_ago=6, rate=(1, "ug/kg/min"))
    assert graded(chart).crs.value == 3


def test_2c_brand_and_generic_name_are_one_agent():
    chart = car_t_chart()
    chart.temp(38.6, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=4, rate=(0.2, "ug/kg/min"))
    chart.infusion(LEVOPHED, started_hours_ago=2, rate=(0.3, "ug/kg/min"))
    assert graded(chart).crs.value == 3


def test_3_more_severe_event_decides():
    chart = car_t_chart()
    chart.temp(39.5, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.1, "ug/kg/min"))
    chart.o2_device(NASAL_CANNULA, hours_ago=2)
    chart.o2_flow(2, hours_ago=2)
    assert graded(chart).crs.value == 3


def test_4_afebrile_after_tocilizumab_on_hfnc_40_is_grade_3_with_masked_fever():
    chart = car_t_chart()
    chart.temp(39.2, hours_ago=40)
    chart.give(TOCILIZUMAB, hours_ago=38, dose_mg=560)
    chart.temp(37.1, hours_ago=2)
    chart.o2_device(HFNC, hours_ago=1)
    chart.o2_flow(40, hours_ago=1)
    assessment = graded(chart)
    assert assessment.crs.value == 3
    assert "fever-masked" in flag_codes(assessment.crs)
    assert "fever-masked" in topics(assessment)
    masked = assessment.recommendation("fever-masked")
    assert "tocilizumab" in masked.detail[0]


def test_5_blow_by_is_low_flow_grade_2():
    chart = car_t_chart(age=4, weight=16)
    chart.temp(38.4, hours_ago=1)
    chart.o2_device(BLOW_BY, hours_ago=1)
    chart.o2_flow(10, hours_ago=1)  # flow through blow-by does not make it high flow
    assert graded(chart).crs.value == 2


def test_6_nasal_cannula_at_exactly_6_l_is_grade_2():
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_device(NASAL_CANNULA, hours_ago=1)
    chart.o2_flow(6, hours_ago=1)
    assert graded(chart).crs.value == 2


def test_7_nasal_cannula_above_6_l_is_grade_3_and_flow_decides_over_label():
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_device(NASAL_CANNULA, hours_ago=1)
    chart.o2_flow(6.5, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 3
    assert "device-flow-mismatch" in flag_codes(crs)


def test_7b_hfnc_label_at_4_l_is_low_flow_and_flagged():
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_device(HFNC, hours_ago=1)
    chart.spo2(95, hours_ago=1, flow=4)  # flow as a pulse-oximetry component
    crs = graded(chart).crs
    assert crs.value == 2
    assert "device-flow-mismatch" in flag_codes(crs)


def test_7c_flow_with_no_device_is_graded_by_flow():
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_flow(8, hours_ago=1)
    assert graded(chart).crs.value == 3


@pytest.mark.parametrize("device", [SIMPLE_MASK, VENTURI, NON_REBREATHER])
def test_8_masks_are_grade_3_whatever_the_flow(device):
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_device(device, hours_ago=1)
    chart.o2_flow(5, hours_ago=1)
    assert graded(chart).crs.value == 3


@pytest.mark.parametrize("device", [BIPAP_MASK, CPAP])
def test_9_positive_pressure_is_grade_4(device):
    chart = car_t_chart()
    chart.temp(38.2, hours_ago=1)
    chart.o2_device(device, hours_ago=1)
    assert graded(chart).crs.value == 4


def test_10_hypotension_corrected_by_fluids_is_grade_2():
    chart = car_t_chart()
    chart.temp(38.9, hours_ago=1)
    chart.bp(82, 50, hours_ago=3)
    chart.bp(104, 62, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 2
    assert any("82" in e.text for e in crs.evidence)


def test_11_high_dose_single_vasopressor_is_grade_3():
    chart = car_t_chart()
    chart.temp(38.9, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.8, "ug/kg/min"))
    assert graded(chart).crs.value == 3


def test_12_organ_toxicity_does_not_change_the_grade():
    chart = car_t_chart()
    chart.temp(38.9, hours_ago=1)
    chart._observation("alt", "laboratory", {"coding": [{"system": "http://loinc.org", "code": "1742-6"}],
                                             "text": "ALT"}, chart._at(2),
                       valueQuantity={"value": 900, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"})
    assert graded(chart).crs.value == 1


def test_13_temperature_37_9_is_not_fever():
    chart = car_t_chart()
    chart.temp(37.9, hours_ago=1)
    assessment = graded(chart)
    assert assessment.crs.value == 0
    assert "infection-workup" not in topics(assessment)


def test_13b_38_0_exactly_is_fever_and_fahrenheit_is_converted():
    chart = car_t_chart()
    chart.temp(100.4, hours_ago=1, fahrenheit=True)
    crs = graded(chart).crs
    assert crs.value == 1
    assert "38" in crs.evidence[0].text


@pytest.mark.parametrize("age, sbp, expected", [(6, 80, 2), (6, 84, 1), (12, 88, 2), (12, 92, 1)])
def test_14_pediatric_hypotension_threshold(age, sbp, expected):
    chart = car_t_chart(age=age, weight=20 if age < 10 else 40)
    chart.temp(38.5, hours_ago=1)
    chart.bp(sbp, 50, hours_ago=1)
    assert graded(chart).crs.value == expected


def test_14b_infant_threshold_follows_pals_and_is_flagged():
    chart = car_t_chart(age=0, weight=8)
    chart.temp(38.5, hours_ago=1)
    chart.bp(68, 40, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 2
    assert "infant-threshold" in flag_codes(crs)


def test_14c_unknown_age_uses_the_adult_threshold_and_says_so():
    chart = car_t_chart()
    del chart.resources[0]["birthDate"]
    chart.temp(38.5, hours_ago=1)
    chart.bp(88, 50, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 2
    assert "age-unknown" in flag_codes(crs)


def test_16_vasopressin_alone_counts_as_one_vasopressor():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.infusion(VASOPRESSIN, started_hours_ago=2, rate=(0.03, "U/min"))
    assert graded(chart).crs.value == 3


def test_17_inotrope_does_not_count_and_is_flagged():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.infusion(DOBUTAMINE, started_hours_ago=2, rate=(5, "ug/kg/min"))
    crs = graded(chart).crs
    assert crs.value == 1
    assert "inotrope-running" in flag_codes(crs)


def test_17b_inotrope_added_to_norepinephrine_stays_grade_3():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.1, "ug/kg/min"))
    chart.infusion(DOBUTAMINE, started_hours_ago=2, rate=(5, "ug/kg/min"))
    crs = graded(chart).crs
    assert crs.value == 3
    assert "inotrope-running" in flag_codes(crs)


def test_18_positive_pressure_with_icans_3_counts_but_is_flagged():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.o2_device(VENTILATOR, hours_ago=1)
    chart.consciousness("awakens-to-tactile", hours_ago=2)
    assessment = graded(chart)
    assert assessment.icans.value == 3
    assert assessment.crs.value == 4
    assert "airway-protection" in flag_codes(assessment.crs)


def test_19_home_cpap_before_the_therapy_is_not_counted_after_it():
    """decisions.md 3 (rev. 2): CPAP in the 7 days before the first IEC dose is the baseline."""
    chart = car_t_chart(days_since_infusion=3)
    chart.o2_device(CPAP, hours_ago=24 * 5)
    chart.temp(38.5, hours_ago=1)
    chart.o2_device(CPAP, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 1
    [flag] = [f for f in crs.flags if f.code == "home-positive-pressure"]
    assert flag.text == ("CPAP also charted before the therapy (home CPAP?): not counted; if it is now for hypoxia, "
                         "this is grade 4.")


def test_19_home_cpap_then_intubation_counts():
    chart = car_t_chart(days_since_infusion=3)
    chart.o2_device(CPAP, hours_ago=24 * 5)
    chart.temp(38.5, hours_ago=1)
    chart.o2_device(VENTILATOR, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 4 and "home-positive-pressure" not in flag_codes(crs)


def test_19_cpap_more_than_7_days_before_the_therapy_is_not_home_cpap():
    chart = car_t_chart(days_since_infusion=3)
    chart.o2_device(CPAP, hours_ago=24 * 11)
    chart.temp(38.5, hours_ago=1)
    chart.o2_device(CPAP, hours_ago=1)
    assert graded(chart).crs.value == 4


def test_20_prophylaxis_before_any_fever_is_not_a_waiver():
    chart = Chart("edge", NOW, "Test", "Pat", "female", 60)
    chart.iec(TECLISTAMAB, days_ago=2, route="SC", dose_mg=0.06)
    chart.weight(70, days_ago=1)
    chart.give(DEXAMETHASONE, hours_ago=49, dose_mg=16)
    chart.bp(78, 40, hours_ago=2)
    assessment = graded(chart)
    assert assessment.crs.value == 0
    assert "possible-masked-crs" in flag_codes(assessment.crs)
    warning = assessment.recommendation("possible-masked-crs")
    assert warning.indicator == "warning" and "dexamethasone" in warning.detail[0]


def test_waiver_without_hypotension_or_hypoxia_leaves_no_active_crs():
    chart = car_t_chart()
    chart.temp(39.0, hours_ago=30)
    chart.give(ACETAMINOPHEN, hours_ago=29, dose_mg=650)
    chart.temp(37.0, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 0
    assert "no active CRS criteria" in crs.reason


def test_later_room_air_does_not_erase_an_earlier_tier():
    chart = car_t_chart()
    chart.temp(38.4, hours_ago=1)
    chart.o2_device(NON_REBREATHER, hours_ago=6)
    chart.o2_device(ROOM_AIR, hours_ago=1)
    assert graded(chart).crs.value == 3


def test_windows_oxygen_older_than_12_hours_and_fever_older_than_24_hours_do_not_count():
    chart = car_t_chart()
    chart.temp(39.0, hours_ago=25)
    chart.o2_device(NON_REBREATHER, hours_ago=13)
    assert graded(chart).crs.value == 0


# ---- reference.md section 5, ICANS ----------------------------------------------------------------------

def test_22_ice_8_with_a_rapidly_resolving_seizure_is_icans_3():
    chart = car_t_chart()
    chart.ice(8, hours_ago=2)
    chart.seizure("seizure-rapidly-resolving", hours_ago=1)
    icans = graded(chart).icans
    assert icans.value == 3
    assert icans.evidence[0].reference.endswith("seizure1")


def test_23_ice_0_awake_is_3_and_unarousable_is_4():
    awake = car_t_chart()
    awake.ice(0, hours_ago=1)
    awake.consciousness("awakens-to-voice", hours_ago=1)
    assert graded(awake).icans.value == 3
    asleep = car_t_chart()
    asleep.ice(0, hours_ago=1)
    asleep.consciousness("unarousable", hours_ago=1)
    assert graded(asleep).icans.value == 4


def test_24_and_26_tremor_and_intracranial_hemorrhage_do_not_grade_icans():
    chart = car_t_chart()
    chart.ice(9, hours_ago=1)
    for text in ("Tremor", "Myoclonus", "Intracranial hemorrhage"):
        chart._observation("exam", "exam", {"text": text}, chart._at(1), valueBoolean=True)
    assert graded(chart).icans.value == 1


def test_25_sedation_stops_consciousness_from_grading_and_is_flagged():
    chart = car_t_chart()
    chart.infusion(PROPOFOL, started_hours_ago=5, rate=(30, "ug/kg/min"))
    chart.consciousness("unarousable", hours_ago=1)
    chart.ice(7, hours_ago=8)
    icans = graded(chart).icans
    assert icans.value == 1
    assert "sedation" in flag_codes(icans)


def test_27_child_capd_10_is_icans_3_and_ice_is_not_used_under_12():
    chart = car_t_chart(age=8, weight=25)
    chart.capd(10, hours_ago=1)
    chart.ice(10, hours_ago=1)
    icans = graded(chart).icans
    assert icans.value == 3
    assert "ice-under-12" in flag_codes(icans)


@pytest.mark.parametrize("ice, grade", [(10, 0), (9, 1), (7, 1), (6, 2), (3, 2), (2, 3), (0, 3)])
def test_ice_score_bands(ice, grade):
    chart = car_t_chart()
    chart.ice(ice, hours_ago=1)
    assert graded(chart).icans.value == grade


@pytest.mark.parametrize("finding, grade", [
    (("consciousness", "awakens-spontaneously"), 1), (("consciousness", "awakens-to-voice"), 2),
    (("consciousness", "awakens-to-tactile"), 3), (("consciousness", "unarousable"), 4),
    (("seizure", "seizure-prolonged"), 4), (("cerebral_edema", "edema-focal"), 3),
    (("cerebral_edema", "edema-diffuse"), 4), (("motor_weakness", True), 4), (("motor_weakness", False), 0),
])
def test_icans_domains(finding, grade):
    chart = car_t_chart()
    method, value = finding
    getattr(chart, method)(value, hours_ago=1)
    assert graded(chart).icans.value == grade


def test_no_icans_assessment_is_flagged():
    icans = graded(car_t_chart()).icans
    assert icans.value == 0
    assert "no-icans-assessment" in flag_codes(icans)


# ---- decisions.md 1: scope ------------------------------------------------------------------------------

def test_no_iec_therapy_is_out_of_scope():
    chart = Chart("edge", NOW, "Test", "Pat", "female", 50)
    chart.temp(39.5, hours_ago=1)
    assessment = graded(chart)
    assert not assessment.in_scope and assessment.crs.value is None and assessment.recommendations == []


def test_crs_window_30_days_icans_window_60_days():
    day_40 = car_t_chart(days_since_infusion=40)
    day_40.temp(39.5, hours_ago=1)
    day_40.ice(5, hours_ago=1)
    assessment = graded(day_40)
    assert assessment.crs.value is None and assessment.icans.value == 2
    day_61 = car_t_chart(days_since_infusion=61)
    day_61.ice(5, hours_ago=1)
    assert not graded(day_61).in_scope


def test_iec_recognised_by_name_with_fda_suffix_and_contained_medication():
    chart = Chart("edge", NOW, "Test", "Pat", "female", 60)
    chart.iec(TECLISTAMAB, days_ago=1, route="SC", dose_mg=0.06, contained=True)
    chart.temp(38.3, hours_ago=1)
    assessment = graded(chart)
    assert assessment.in_scope and assessment.crs.value == 1
    assert "teclistamab" in assessment.scope_reason


def test_entered_in_error_and_not_done_are_ignored():
    chart = car_t_chart()
    chart.temp(39.5, hours_ago=1)
    chart.resources[-1]["status"] = "entered-in-error"
    chart.infusion(NOREPINEPHRINE, started_hours_ago=2, rate=(0.1, "ug/kg/min"))
    chart.resources[-1]["status"] = "not-done"
    assert graded(chart).crs.value == 0


# ---- decisions.md 7: never a grade from a source that could not be read --------------------------------

def test_unreadable_resource_makes_the_grade_a_lower_bound():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.o2_flow(3, hours_ago=1)
    chart.resources[-1]["valueQuantity"]["code"] = "furlongs"
    chart.resources[-1]["valueQuantity"]["unit"] = "furlongs"
    assessment = graded(chart)
    assert assessment.crs.value == 1 and assessment.crs.at_least
    assert assessment.crs.text == "CRS grade at least 1"
    assert any("o2flow1" in m for m in assessment.crs.missing)


def test_invalid_fhir_resource_is_reported_not_dropped():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    chart.resources[-1]["status"] = "done-ish"
    assessment = graded(chart)
    assert [u.reference for u in assessment.unreadable] == ["Observation/edge-temp1"]
    assert assessment.crs.at_least


def test_unread_medication_source_makes_scope_unknown():
    from cds_service.clinical.model import Unreadable

    chart = Chart("edge", NOW, "Test", "Pat", "female", 50)
    assessment = assess(chart.resources, NOW, unread_sources=[
        Unreadable("prefetch:medications", "FHIR server answered 500", "MedicationAdministration")])
    assert not assessment.assessable and assessment.crs.value is None


def test_now_must_be_timezone_aware():
    with pytest.raises(ValueError):
        assess([], datetime(2026, 1, 1))


def test_assessment_does_not_depend_on_the_clock():
    chart = car_t_chart()
    chart.temp(38.5, hours_ago=1)
    first = graded(chart).to_json()
    later = assess(chart.resources, NOW).to_json()
    assert first == later
    assert first["now"] == "2026-11-21T12:00:00Z"


def test_fever_waiver_needs_the_treatment_after_the_fever():
    chart = car_t_chart()
    chart.give(TOCILIZUMAB, hours_ago=40, dose_mg=560)
    chart.temp(39.0, hours_ago=30)
    chart.temp(37.0, hours_ago=1)
    chart.o2_device(NON_REBREATHER, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 0 and "possible-masked-crs" in flag_codes(crs)


def test_earlier_fever_and_antipyretic_in_a_bispecific_step_up_episode_keep_the_waiver():
    chart = Chart("edge", NOW, "Test", "Pat", "female", 60)
    chart.weight(70, days_ago=1)
    chart.iec(TECLISTAMAB, days_ago=6, route="SC", dose_mg=0.06)
    chart.temp(38.8, hours_ago=24 * 5)
    chart.give(ACETAMINOPHEN, hours_ago=24 * 5 - 1, dose_mg=650)
    chart.iec(TECLISTAMAB, days_ago=2, route="SC", dose_mg=0.3)
    chart.o2_device(NON_REBREATHER, hours_ago=1)
    assert graded(chart).crs.value == 3


# ---- What is read: only what some rule looks at ----------------------------------------------------------

def test_observations_outside_every_rule_window_are_not_read():
    chart = car_t_chart(days_since_infusion=5)
    chart.bp(70, 40, hours_ago=20)               # older than the 12 h hypotension window
    chart.resources[-1]["status"] = "bogus"      # so it would be reported if it were read
    chart.temp(39.0, hours_ago=60)               # after the infusion: the fever waiver looks back this far
    chart.give(ACETAMINOPHEN, hours_ago=59, dose_mg=650)
    chart.o2_device(NON_REBREATHER, hours_ago=1)
    assessment = graded(chart)
    assert assessment.unreadable == [] and assessment.crs.value == 3


def test_an_unreadable_temperature_since_the_infusion_is_still_reported():
    chart = car_t_chart(days_since_infusion=5)
    chart.temp(39.0, hours_ago=60)
    chart.resources[-1]["status"] = "bogus"
    assert [u.reference for u in graded(chart).unreadable] == ["Observation/edge-temp1"]


def test_out_of_scope_patients_have_no_observation_read():
    chart = Chart("edge", NOW, "Test", "Pat", "female", 50)
    chart.temp(39.0, hours_ago=1)
    chart.resources[-1]["status"] = "bogus"
    assessment = graded(chart)
    assert not assessment.in_scope and assessment.unreadable == []


def test_15_hypotension_or_hypoxia_carries_an_attribution_flag():
    chart = car_t_chart()
    chart.temp(38.9, hours_ago=1)
    chart.o2_device(NON_REBREATHER, hours_ago=1)
    crs = graded(chart).crs
    assert crs.value == 3 and "attribution" in flag_codes(crs)
    fever_only = car_t_chart()
    fever_only.temp(38.9, hours_ago=1)
    assert "attribution" not in flag_codes(graded(fever_only).crs)


def test_21_no_grade_5_from_a_live_service():
    chart = car_t_chart()
    chart.resources[0]["deceasedDateTime"] = "2026-11-21T11:00:00Z"
    chart.temp(39.5, hours_ago=2)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.5, "ug/kg/min"))
    chart.infusion(PHENYLEPHRINE, started_hours_ago=3, rate=(2, "ug/kg/min"))
    chart.o2_device(VENTILATOR, hours_ago=2)
    chart.consciousness("unarousable", hours_ago=2)
    assessment = graded(chart)
    assert (assessment.crs.value, assessment.icans.value) == (4, 4)
