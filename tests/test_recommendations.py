"""Management, dosing, limits and pitfall rules (decisions.md sections 5-7)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from cds_service.clinical import Protocol, assess
from cds_service.clinical.orders import review_orders
from cds_service.scenarios import (
    ACETAMINOPHEN, DEXAMETHASONE, TECARTUS, TECLISTAMAB,
    TOCILIZUMAB, YESCARTA, Chart, Drug,
)

from charts import treated_chart, with_crs

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
KYMRIAH = Drug("Kymriah (tisagenlecleucel)")
SARGRAMOSTIM = Drug("Leukine (sargramostim) 250 mcg/m2")
FILGRASTIM = Drug("filgrastim", "g-csf", "68442")


def chart(product=YESCARTA, weight: float | None = 70, age: int = 55, days: float = 3) -> Chart:
    return treated_chart("rx", product, weight, age, days, gender="male")


crs = with_crs  # the findings of a CRS grade (with fever)


def rec(assessment, topic):
    return assessment.recommendation(topic)


# ---- Tocilizumab dose -------------------------------------------------------------------------------

@pytest.mark.parametrize("weight, dose, unrounded", [
    (70, 560, 560), (72.4, 580, 579.2), (71.9, 580, 575.2), (120, 800, 960), (100, 800, 800), (29.5, 350, 354),
    (30, 240, 240), (14.5, 170, 174),
])
def test_tocilizumab_dose_from_weight(weight, dose, unrounded):
    assessment = assess(crs(chart(weight=weight), 2).resources, NOW)
    toci = rec(assessment, "tocilizumab")
    assert toci.order.dose_mg == dose
    assert f"= {unrounded:g} mg" in toci.detail[0]
    assert toci.order.text.startswith(f"tocilizumab {dose} mg")


def test_tocilizumab_uses_the_most_recent_weight_within_30_days():
    c = crs(chart(weight=None), 2)
    c.weight(90, days_ago=20)
    c.weight(65, days_ago=1)
    assert rec(assess(c.resources, NOW), "tocilizumab").order.dose_mg == 520


def test_no_weight_in_30_days_means_no_dose_and_a_request_for_weight():
    c = crs(chart(weight=None), 3)
    c.weight(80, days_ago=31)
    toci = rec(assess(c.resources, NOW), "tocilizumab")
    assert toci.order is None
    assert "weigh the patient" in toci.title


# ---- Tocilizumab limits --------------------------------------------------------------------------------

def test_last_dose_under_8_hours_ago_blocks_a_new_dose():
    c = crs(chart(), 3)
    c.give(TOCILIZUMAB, hours_ago=5, dose_mg=560)
    assessment = assess(c.resources, NOW)
    toci = rec(assessment, "tocilizumab")
    # Timing, not a limit: when the next dose is possible, and no refractory card.
    assert toci.order is None
    assert toci.title == "Tocilizumab: last dose 07:00 UTC; next dose possible from 15:00 UTC if no improvement"
    assert rec(assessment, "refractory-crs") is None
    assert rec(assessment, "tocilizumab-delay") is None


def test_three_doses_in_24_hours_block_a_fourth():
    c = crs(chart(), 3)
    for hours in (23, 15, 9):
        c.give(TOCILIZUMAB, hours_ago=hours, dose_mg=560)
    toci = rec(assess(c.resources, NOW), "tocilizumab")
    assert toci.order is None and "limit reached (3 doses in 24 h, maximum 3)" in toci.title


def test_four_doses_in_the_episode_block_a_fifth():
    c = crs(chart(), 3)
    for hours in (60, 50, 40, 30):
        c.give(TOCILIZUMAB, hours_ago=hours, dose_mg=560)
    assessment = assess(c.resources, NOW)
    assert rec(assessment, "tocilizumab").order is None
    assert "4 doses this episode, maximum 4" in rec(assessment, "refractory-crs").detail[0]


def test_a_dose_9_hours_ago_allows_the_next():
    c = crs(chart(), 3)
    c.give(TOCILIZUMAB, hours_ago=9, dose_mg=560)
    assessment = assess(c.resources, NOW)
    assert rec(assessment, "tocilizumab").order.dose_mg == 560
    assert rec(assessment, "tocilizumab-delay") is None  # a dose within 12 h


# ---- Management per grade --------------------------------------------------------------------------------

def test_crs_1_supportive_care_and_no_tocilizumab_without_a_trigger():
    assessment = assess(crs(chart(), 1).resources, NOW)
    assert rec(assessment, "crs-management").indicator == "info"
    assert rec(assessment, "tocilizumab") is None
    assert rec(assessment, "infection-workup")


def test_crs_1_fever_over_3_days_triggers_tocilizumab():
    c = chart(days=6)
    for hours in (80, 60, 40, 20):   # febrile every day for over 3 days
        c.temp(38.6, hours_ago=hours)
    c.temp(38.4, hours_ago=1)
    toci = rec(assess(c.resources, NOW), "tocilizumab")
    assert toci.order and "over 3 days" in toci.detail[0]


def test_crs_1_high_fever_over_10_hours_despite_acetaminophen_triggers_tocilizumab():
    c = chart()
    c.give(ACETAMINOPHEN, hours_ago=14, dose_mg=1000)
    for hours in (13, 9, 5, 2):
        c.temp(39.3, hours_ago=hours)
    toci = rec(assess(c.resources, NOW), "tocilizumab")
    assert toci.order and "despite acetaminophen" in toci.detail[0]


def test_crs_2_tocilizumab_now_and_steroid_only_when_hypotension_persists_after_tocilizumab():
    first = assess(crs(chart(), 2).resources, NOW)
    assert rec(first, "tocilizumab").order and rec(first, "corticosteroid") is None
    assert any("q12h" in d or "every 12 h" in d for d in rec(first, "crs-management").detail)
    c = crs(chart(), 2)
    c.give(TOCILIZUMAB, hours_ago=10, dose_mg=560)
    later = assess(c.resources, NOW)
    steroid = rec(later, "corticosteroid")
    assert steroid.order.agent == "dexamethasone" and steroid.order.every_hours == 12


def test_crs_3_dexamethasone_every_6_hours_and_icu():
    assessment = assess(crs(chart(product=KYMRIAH), 3).resources, NOW)
    steroid = rec(assessment, "corticosteroid")
    assert (steroid.order.agent, steroid.order.dose_mg, steroid.order.every_hours) == ("dexamethasone", 10, 6)
    assert "ICU" in rec(assessment, "crs-management").detail[0]
    assert not any("consider methylprednisolone" in d for d in steroid.detail)


@pytest.mark.parametrize("product", [YESCARTA, TECARTUS])
def test_crs_3_axi_cel_or_brexu_cel_consider_methylprednisolone_1000(product):
    steroid = rec(assess(crs(chart(product=product), 3).resources, NOW), "corticosteroid")
    assert any("consider methylprednisolone 1000 mg IV daily" in d for d in steroid.detail)


def test_crs_4_high_dose_methylprednisolone():
    steroid = rec(assess(crs(chart(), 4).resources, NOW), "corticosteroid")
    assert (steroid.order.agent, steroid.order.dose_mg, steroid.order.every_hours) == ("methylprednisolone", 500, 12)
    assert steroid.order.duration_days == 3 and "for 3 days" in steroid.order.text  # bounded order
    assert "250 mg" not in steroid.order.text and "250 mg" not in steroid.title
    assert any(d.startswith("Then 250 mg q12h x 2 days, 125 mg q12h x 2 days, 60 mg q12h") for d in steroid.detail)


@pytest.mark.parametrize("ice, agent, every", [(5, "dexamethasone", 6), (1, "dexamethasone", 6)])
def test_icans_2_and_3_dexamethasone_every_6_hours(ice, agent, every):
    c = chart()
    c.ice(ice, hours_ago=1)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert (steroid.order.agent, steroid.order.every_hours) == (agent, every)


def test_icans_4_methylprednisolone_1000_daily_wins_over_crs_3_dexamethasone():
    c = crs(chart(), 3)
    c.consciousness("unarousable", hours_ago=1)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert (steroid.order.agent, steroid.order.dose_mg) == ("methylprednisolone", 1000)
    assert steroid.detail[0] == "For CRS 3, ICANS 4."


def test_icans_1_seizure_prophylaxis():
    c = chart()
    c.ice(8, hours_ago=1)
    management = rec(assess(c.resources, NOW), "icans-management")
    assert any("levetiracetam 500-750 mg" in d for d in management.detail)


def test_refractory_when_grade_3_persists_despite_tocilizumab_and_steroids():
    c = crs(chart(), 3)
    c.temp(39.5, hours_ago=40)
    c.give(TOCILIZUMAB, hours_ago=30, dose_mg=560)
    c.give(DEXAMETHASONE, hours_ago=28, dose_mg=10)
    refractory = rec(assess(c.resources, NOW), "refractory-crs")
    assert refractory.indicator == "critical"
    assert "anakinra 100 mg IV/SC every 6 h" in refractory.detail[1] and "siltuximab 11 mg/kg" in refractory.detail[1]
    assert "ruxolitinib" in refractory.detail[2] and "consider with the CAR-T team" in refractory.detail[2]


# ---- Pitfalls -------------------------------------------------------------------------------------------

def test_pitfall_1_concurrent_icans_steroids_first_and_no_tocilizumab():
    c = crs(chart(), 1)
    c.ice(5, hours_ago=1)
    assessment = assess(c.resources, NOW)
    assert (assessment.crs.value, assessment.icans.value) == (1, 2)
    assert rec(assessment, "tocilizumab") is None
    concurrent = rec(assessment, "concurrent-icans")
    assert "worsen neurotoxicity" in concurrent.detail[0] and "ASCO" in concurrent.detail[1]
    assert rec(assessment, "corticosteroid").order.agent == "dexamethasone"


def test_pitfall_1_with_crs_2_and_icans_2_give_both_without_waiting():
    c = crs(chart(), 2)
    c.ice(5, hours_ago=1)
    assessment = assess(c.resources, NOW)
    assert rec(assessment, "concurrent-icans") is None
    assert rec(assessment, "tocilizumab").order
    assert any("steroids do not wait" in d for d in rec(assessment, "corticosteroid").detail)


def test_pitfall_4_tocilizumab_delay_is_critical():
    assessment = assess(crs(chart(), 2).resources, NOW)
    delay = rec(assessment, "tocilizumab-delay")
    assert delay.indicator == "critical" and "1.7-fold" in delay.detail[0]
    assert assessment.indicator == "critical"


def test_pitfall_5_antifungal_after_steroids_for_crs():
    c = crs(chart(), 1)
    c.temp(38.9, hours_ago=8)
    c.give(DEXAMETHASONE, hours_ago=6, dose_mg=10)
    assert rec(assess(c.resources, NOW), "antifungal-prophylaxis")


def test_pitfall_7_ferritin_above_10000_flags_hlh():
    c = crs(chart(), 2)
    c.ferritin(12500, hours_ago=3)
    hlh = rec(assess(c.resources, NOW), "hlh-mas")
    assert "12500" in hlh.title and "together from the outset" in hlh.detail[1]
    c2 = crs(chart(), 2)
    c2.ferritin(9000, hours_ago=3)
    assert rec(assess(c2.resources, NOW), "hlh-mas") is None


# ---- Order checks (rules 3, 8, 9) -------------------------------------------------------------------------

def draft(drug: Drug, dose_mg: float | None = None, order_id: str = "draft1") -> dict:
    order = {"resourceType": "MedicationRequest", "id": order_id, "status": "draft", "intent": "order",
             "medicationCodeableConcept": drug.concept(), "subject": {"reference": "Patient/rx"}}
    if dose_mg is not None:
        order["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": dose_mg, "unit": "mg",
                                                                           "system": "http://unitsofmeasure.org",
                                                                           "code": "mg"}}]}]
    return order


def test_rule_3_gm_csf_after_iec_suggests_removal_and_filgrastim():
    _, findings = review_orders([draft(SARGRAMOSTIM)], chart().resources, NOW)
    [finding] = findings
    assert finding.topic == "gm-csf-after-iec" and finding.remove_target and finding.target == "MedicationRequest/draft1"
    assert finding.order.agent == "filgrastim"


def test_rule_3_g_csf_is_permissible_and_gm_csf_without_iec_is_silent():
    assert review_orders([draft(FILGRASTIM)], chart().resources, NOW)[1] == []
    no_iec = Chart("rx", NOW, "Test", "Pat", "male", 50)
    assert review_orders([draft(SARGRAMOSTIM)], no_iec.resources, NOW)[1] == []


def test_rule_8_steroid_premedication_with_car_t_but_not_with_bispecific():
    car_t = chart(days=0.2)
    [finding] = review_orders([draft(DEXAMETHASONE, 10)], car_t.resources, NOW)[1]
    assert finding.topic == "steroid-premedication"
    bispecific = Chart("rx", NOW, "Test", "Pat", "male", 50)
    bispecific.iec(TECLISTAMAB, days_ago=0.2, route="SC", dose_mg=0.06)
    assert review_orders([draft(DEXAMETHASONE, 16)], bispecific.resources, NOW)[1] == []


def test_rule_8_steroid_that_treats_crs_is_not_premedication():
    c = crs(chart(days=0.5), 3)
    assert review_orders([draft(DEXAMETHASONE, 10)], c.resources, NOW)[1] == []


def test_rule_8_car_t_ordered_in_the_same_session():
    no_iec = Chart("rx", NOW, "Test", "Pat", "male", 50)
    orders = [draft(DEXAMETHASONE, 10), draft(KYMRIAH, order_id="draft2")]
    findings = review_orders(orders, no_iec.resources, NOW)[1]
    assert [f.topic for f in findings] == ["steroid-premedication"]


@pytest.mark.parametrize("dose, problem", [(900, "exceeds the 800 mg maximum"), (700, "differs from the computed 560")])
def test_rule_9_tocilizumab_dose_checks(dose, problem):
    [finding] = review_orders([draft(TOCILIZUMAB, dose)], crs(chart(), 2).resources, NOW)[1]
    assert problem in finding.title + " ".join(finding.detail)
    assert finding.replace_target and finding.order.dose_mg == 560
    assert any("Computed dose: 560 mg" in d for d in finding.detail)


def test_rule_9_matching_dose_within_10_percent_is_silent():
    assert review_orders([draft(TOCILIZUMAB, 600)], crs(chart(), 2).resources, NOW)[1] == []


def test_rule_9_limits_and_concurrent_icans():
    c = crs(chart(), 2)
    c.give(TOCILIZUMAB, hours_ago=3, dose_mg=560)
    [finding] = review_orders([draft(TOCILIZUMAB, 560)], c.resources, NOW)[1]
    assert "next dose possible from 17:00 UTC" in finding.title and finding.order is None
    c2 = crs(chart(), 1)
    c2.ice(4, hours_ago=1)
    [finding] = review_orders([draft(TOCILIZUMAB, 560)], c2.resources, NOW)[1]
    assert any("neurotoxicity" in d for d in finding.detail) and finding.order is None


def test_order_select_checks_only_the_selections():
    orders = [draft(SARGRAMOSTIM, order_id="a"), draft(SARGRAMOSTIM, order_id="b")]
    findings = review_orders(orders, chart().resources, NOW, selections=["MedicationRequest/b"])[1]
    assert [f.target for f in findings] == ["MedicationRequest/b"]


def test_orders_read_leniently_medication_reference_into_the_bundle_and_single_objects():
    medication = {"resourceType": "Medication", "id": "m1", "code": {"text": "sargramostim"}}
    order = {"resourceType": "MedicationRequest", "id": "x", "status": "draft",
             "medicationReference": {"reference": "Medication/m1"}, "category": {"text": "inpatient"},
             "dosageInstruction": {"doseAndRate": {"doseQuantity": {"value": 250, "unit": "mcg"}}}}
    [finding] = review_orders([order, medication], chart().resources, NOW)[1]
    assert finding.topic == "gm-csf-after-iec"


# ---- The protocol as data -------------------------------------------------------------------------------

def test_a_site_protocol_overrides_values_and_is_named(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"name": "Hospital X CAR-T protocol", "version": "3",
                                "tocilizumab": {"max_doses_per_episode": 2},
                                "fever_threshold_celsius": 38.3}))
    protocol = Protocol.load(site)
    assert protocol["tocilizumab"]["mg_per_kg"] == 8  # untouched values stay
    c = crs(chart(), 3)
    c.give(TOCILIZUMAB, hours_ago=30, dose_mg=560)
    c.give(TOCILIZUMAB, hours_ago=20, dose_mg=560)
    assessment = assess(c.resources, NOW, protocol)
    assert assessment.protocol == "Hospital X CAR-T protocol v3"
    assert rec(assessment, "tocilizumab").order is None
    mild = chart()
    mild.temp(38.1, hours_ago=1)
    assert assess(mild.resources, NOW, protocol).crs.value == 0


def test_a_broken_site_protocol_is_a_clear_error(tmp_path):
    from cds_service.clinical import ProtocolError

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProtocolError, match="bad.json"):
        Protocol.load(bad)


def test_cards_say_which_protocol_made_them():
    assessment = assess(crs(chart(), 2).resources, NOW)
    assert assessment.to_json()["protocol"].startswith("crs-cds default protocol")


def test_order_checks_grade_the_patient_only_when_an_order_needs_it():
    c = crs(chart(), 3)
    gm_csf_only, _ = review_orders([draft(SARGRAMOSTIM)], c.resources, NOW)
    assert gm_csf_only.in_scope and gm_csf_only.crs.value is None
    with_tocilizumab, _ = review_orders([draft(SARGRAMOSTIM), draft(TOCILIZUMAB, 560, "t")], c.resources, NOW)
    assert with_tocilizumab.crs.value == 3
