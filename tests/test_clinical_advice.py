"""The advice a CAR-T team signs (decisions.md revision 2, sections 3, 5, 6 and 8): each test
states a finding the earlier advice got wrong, the corrected text or order, and that the wrong one
is gone."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from cds_service.clinical import assess
from cds_service.clinical.orders import review_orders
from cds_service.hooks.cards import assessment_cards, finding_cards
from cds_service.scenarios import (
    DEXAMETHASONE, PHENYLEPHRINE, SCENARIOS, TECLISTAMAB, TOCILIZUMAB, VENTILATOR, YESCARTA,
    Chart, Drug,
)
from cds_service.terminology import load_terminology

from charts import treated_chart, with_crs

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
KYMRIAH = Drug("Kymriah (tisagenlecleucel)")
BLINATUMOMAB = Drug("Blincyto (blinatumomab)", "t-cell-engagers", "1597258")
METHYLPREDNISOLONE = Drug("methylprednisolone sodium succinate", "systemic-corticosteroids", "6902")
CPAP = ("oxygen-device-positive-pressure", "47545007", "CPAP")
TERMS = load_terminology()


def chart(product=YESCARTA, weight: float | None = 70, age: int | None = 55, days: float = 3) -> Chart:
    return treated_chart("adv", product, weight, age, days)


def rec(assessment, topic):
    return assessment.recommendation(topic)


def everything(assessment) -> str:
    """Every word a clinician reads: titles, details, and the rendered cards."""
    cards = assessment_cards(assessment, TERMS, quiet_when_normal=False)
    return "\n".join([r.title + "\n" + "\n".join(r.detail) for r in assessment.recommendations]
                     + [c["summary"] + "\n" + c["detail"] + "\n" + " ".join(s["label"] for s in c.get("suggestions", []))
                        for c in cards])


# ---- Tocilizumab: timing is not a limit; refractory CRS is defined ----------------------------------

def test_5_hours_after_the_first_dose_is_timing_not_refractory():
    c = with_crs(chart(), 3)
    c.give(TOCILIZUMAB, hours_ago=5, dose_mg=560)
    a = assess(c.resources, NOW)
    toci = rec(a, "tocilizumab")
    assert toci.order is None
    assert "last dose 07:00 UTC; next dose possible from 15:00 UTC if no improvement" in toci.title
    assert rec(a, "refractory-crs") is None
    text = everything(a)
    assert "Refractory" not in text and "anakinra" not in text and "Tocilizumab now" not in text


def test_refractory_only_by_its_definition_after_24_hours_of_tocilizumab_and_steroids():
    c = with_crs(chart(), 3)
    c.temp(39.5, hours_ago=30)
    c.give(TOCILIZUMAB, hours_ago=26, dose_mg=560)
    c.give(DEXAMETHASONE, hours_ago=20, dose_mg=10)  # steroid for CRS started 20 h ago: not yet refractory
    assert rec(assess(c.resources, NOW), "refractory-crs") is None
    c.give(DEXAMETHASONE, hours_ago=25, dose_mg=10)
    assert "more than 24 h after the first tocilizumab" in rec(assess(c.resources, NOW), "refractory-crs").detail[0]


def test_at_a_limit_no_tocilizumab_now_and_the_limit_is_named():
    c = with_crs(chart(), 3)
    for hours in (60, 50, 40, 30):
        c.give(TOCILIZUMAB, hours_ago=hours, dose_mg=560)
    a = assess(c.resources, NOW)
    assert rec(a, "tocilizumab").title == "No more tocilizumab: limit reached (4 doses this episode, maximum 4)"
    assert "give tocilizumab" not in a_summary(a) and "Tocilizumab now" not in everything(a)
    refractory = rec(a, "refractory-crs")
    assert "anakinra 100 mg IV/SC every 6 h (adult) or siltuximab 11 mg/kg IV once" in refractory.detail[1]


def a_summary(assessment) -> str:
    return assessment_cards(assessment, TERMS)[0]["summary"]


def test_no_tocilizumab_now_right_after_a_dose():
    c = with_crs(chart(), 2)
    c.give(TOCILIZUMAB, hours_ago=1, dose_mg=560)
    a = assess(c.resources, NOW)
    assert "Tocilizumab now" not in everything(a) and "give tocilizumab" not in a_summary(a).lower()
    assert rec(a, "tocilizumab-delay") is None


def test_under_2_years_tocilizumab_is_off_label():
    c = with_crs(chart(weight=9, age=1), 3)
    assert any("approved from 2 years (off-label below)" in d for d in rec(assess(c.resources, NOW), "tocilizumab").detail)
    assert not any("off-label" in d for d in rec(assess(with_crs(chart(weight=15, age=3), 3).resources, NOW),
                                                  "tocilizumab").detail)


def test_no_weight_states_the_mg_per_kg_rule_and_no_number():
    toci = rec(assess(with_crs(chart(weight=None), 2).resources, NOW), "tocilizumab")
    assert toci.order is None and "weigh the patient" in toci.title
    assert "Dose 8 mg/kg (12 mg/kg under 30 kg), max 800 mg" in toci.detail[0]


# ---- Children: weight-based steroids and levetiracetam ----------------------------------------------

def test_an_8_kg_infant_gets_weight_based_dexamethasone_not_10_mg():
    c = chart(weight=8, age=0, product=KYMRIAH)
    c.capd(10, hours_ago=1)  # ICANS 3
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert (steroid.order.agent, steroid.order.dose_mg, steroid.order.every_hours) == ("dexamethasone", 4.0, 6)
    assert steroid.title == "Start dexamethasone 4 mg IV every 6 h"
    assert any("0.5 mg/kg x 8 kg = 4 mg" in d and "pediatric weight-based dose: confirm with your pediatric protocol"
               in d for d in steroid.detail)
    assert "dexamethasone 10 mg" not in everything(assess(c.resources, NOW))


def test_a_20_kg_child_gets_methylprednisolone_30_mg_per_kg_not_1000_mg():
    c = chart(weight=20, age=6, product=KYMRIAH)
    c.consciousness("unarousable", hours_ago=1)  # ICANS 4
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert (steroid.order.agent, steroid.order.dose_mg) == ("methylprednisolone", 600)
    assert "1000 mg" not in steroid.title and steroid.order.dose_mg != 1000


def test_a_child_with_crs_4_gets_15_mg_per_kg_every_12_hours_for_3_days():
    steroid = rec(assess(with_crs(chart(weight=20, age=6), 4).resources, NOW), "corticosteroid")
    assert (steroid.order.dose_mg, steroid.order.every_hours, steroid.order.duration_days) == (300, 12, 3)


def test_a_child_without_weight_gets_mg_per_kg_text_and_no_order():
    c = chart(weight=None, age=5, product=KYMRIAH)
    c.capd(10, hours_ago=1)
    a = assess(c.resources, NOW)
    steroid = rec(a, "corticosteroid")
    assert steroid.order is None
    assert "dexamethasone 0.5 mg/kg (max 10 mg) IV every 6 h" in steroid.title and "weigh the patient" in steroid.title
    levetiracetam = next(d for d in rec(a, "icans-management").detail if "levetiracetam" in d)
    assert levetiracetam.startswith("levetiracetam 10 mg/kg BID (max 750 mg a dose")


def test_unknown_age_under_40_kg_is_dosed_as_a_child():
    c = chart(weight=30, age=None)
    c.ice(5, hours_ago=1)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert steroid.order.dose_mg == 10  # 0.5 mg/kg x 30 kg = 15, capped at the adult 10 mg
    assert any("pediatric weight-based dose" in d for d in steroid.detail)


def test_child_levetiracetam_is_weight_based():
    c = chart(weight=25, age=8, product=KYMRIAH)
    c.capd(5, hours_ago=1)
    detail = rec(assess(c.resources, NOW), "icans-management").detail
    assert any(d.startswith("levetiracetam 250 mg BID (10 mg/kg x 25 kg") for d in detail)
    assert not any("500-750" in d for d in detail)


# ---- ICANS care is cumulative -------------------------------------------------------------------------

def test_icans_4_status_epilepticus_gets_seizure_care_and_everything_below():
    c = chart()
    c.seizure("seizure-prolonged", hours_ago=1)
    detail = rec(assess(c.resources, NOW), "icans-management").detail
    for line in ("status epilepticus: benzodiazepine, then levetiracetam load per institutional protocol",
                 "levetiracetam 500-750 mg BID", "neurology consult; EEG; brain MRI (CT if not feasible)",
                 "aspiration precautions; no CNS depressants but antiseizure drugs", "ICE q12h and at any change",
                 "ICU", "repeat imaging every 2-3 days while grade >= 3"):
        assert line in detail, line


def test_icans_4_cerebral_edema_measures():
    c = chart()
    c.cerebral_edema("edema-diffuse", hours_ago=1)
    detail = rec(assess(c.resources, NOW), "icans-management").detail
    assert any(d.startswith("cerebral edema: hyperventilation, hyperosmolar therapy") for d in detail)
    assert not any(d.startswith("status epilepticus") for d in detail)


def test_icans_2_neurology_consult_aspiration_and_cns_depressants():
    c = chart()
    c.ice(5, hours_ago=1)
    detail = rec(assess(c.resources, NOW), "icans-management").detail
    assert "neurology consult; EEG; brain MRI (CT if not feasible)" in detail
    assert "aspiration precautions; no CNS depressants but antiseizure drugs" in detail


def test_no_mechanical_ventilation_suggested_to_an_intubated_patient():
    c = chart()
    c.consciousness("unarousable", hours_ago=1)
    assert "consider mechanical ventilation for airway protection" in rec(assess(c.resources, NOW),
                                                                            "icans-management").detail
    c.o2_device(VENTILATOR, hours_ago=1)
    assert "mechanical ventilation" not in " ".join(rec(assess(c.resources, NOW), "icans-management").detail)


# ---- Orders: bounded, never duplicated --------------------------------------------------------------

def test_no_duplicate_dexamethasone_for_a_patient_already_on_it():
    c = chart()
    c.ice(5, hours_ago=3)
    c.give(DEXAMETHASONE, hours_ago=2, dose_mg=10)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert steroid.order is None and steroid.title == "Continue dexamethasone 10 mg IV every 6 h"
    cards = assessment_cards(assess(c.resources, NOW), TERMS)
    assert not any("dexamethasone" in s["label"] for card in cards for s in card.get("suggestions", []))


def test_a_weaker_running_regimen_gets_the_escalation_as_an_order():
    c = with_crs(chart(), 4, hours_ago=3)
    c.give(DEXAMETHASONE, hours_ago=2, dose_mg=10)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert steroid.order.agent == "methylprednisolone" and steroid.title.startswith("Escalate to")


METHYLPREDNISOLONE = Drug("methylprednisolone sodium succinate injection", "systemic-corticosteroids")


@pytest.mark.parametrize("story, doses, grade, title, ordered", [
    # Dexamethasone 10 mg every 12 h at CRS 3: the weaker regimen; escalate to every 6 h, with an order.
    ("q12h running", [(DEXAMETHASONE, 15, 10), (DEXAMETHASONE, 3, 10)], 3,
     "Escalate to dexamethasone 10 mg IV every 6 h", True),
    # Methylprednisolone 1000 mg given at CRS 3: stronger than dexamethasone q6h; continue it, no second steroid.
    ("MP 1000 running", [(METHYLPREDNISOLONE, 4, 1000)], 3, "Continue methylprednisolone 1000 mg IV daily", False),
    # Methylprednisolone 500 mg q12h at ICANS 4 (MP 1000 daily recommended): ranked higher; continue it.
    ("MP 500 q12h running", [(METHYLPREDNISOLONE, 14, 500), (METHYLPREDNISOLONE, 2, 500)], "icans4",
     "Continue methylprednisolone 500 mg IV every 12 h for 3 days", False),
    # Dexamethasone q6h, the next dose 30 minutes late: still the same regimen, no duplicate order.
    ("q6h, next dose late", [(DEXAMETHASONE, 12.5, 10), (DEXAMETHASONE, 6.5, 10)], 3,
     "Continue dexamethasone 10 mg IV every 6 h", False),
])
def test_a_running_steroid_regimen_is_continued_only_when_at_least_as_strong(story, doses, grade, title, ordered):
    c = chart()
    c.temp(39.0, hours_ago=20)   # the fever before the steroids: they treat CRS/ICANS
    if grade == "icans4":
        c.consciousness("unarousable", hours_ago=1)
    else:
        with_crs(c, grade, hours_ago=1)
    for drug, hours_ago, mg in doses:
        c.give(drug, hours_ago=hours_ago, dose_mg=mg)
    steroid = rec(assess(c.resources, NOW), "corticosteroid")
    assert steroid.title == title, story
    assert (steroid.order is not None) == ordered, story


def test_crs_2_dexamethasone_only_when_hypotension_persists_after_tocilizumab():
    """Hypotension only before the dose, then a normal pressure: no steroid; still low after: the order."""
    def crs2(after_sbp: int):
        c = chart()
        c.temp(38.8, hours_ago=4)
        c.bp(84, 50, hours_ago=3.5)
        c.give(TOCILIZUMAB, hours_ago=3, dose_mg=560)
        c.bp(after_sbp, 60, hours_ago=1)
        return assess(c.resources, NOW)
    recovered = crs2(112)
    assert recovered.crs.value == 2 and rec(recovered, "corticosteroid") is None
    persisting = crs2(86)
    assert persisting.crs.value == 2 and rec(persisting, "corticosteroid").order.agent == "dexamethasone"


def test_fever_over_3_days_is_a_continuing_course_not_the_first_fever_ever():
    def fevers(*hours_ago: float):
        c = chart(days=6)
        for hours in hours_ago:
            c.temp(38.6, hours_ago=hours)
        toci = rec(assess(c.resources, NOW), "tocilizumab")
        return toci is not None and toci.order is not None
    assert not fevers(100, 1)                    # a fever 4 days ago, none since, one now
    assert fevers(100, 80, 60, 40, 20, 1)        # febrile every day for over 3 days


@pytest.mark.parametrize("age, weight, adult_dose", [(3, 12, False), (45, 70, True), (None, 30, False)])
def test_refractory_anakinra_at_the_adult_fixed_dose_only_for_adults(age, weight, adult_dose):
    c = with_crs(chart(age=age, weight=weight), 3, hours_ago=1)
    for hours in (30, 21, 12, 3):
        c.give(TOCILIZUMAB, hours_ago=hours, dose_mg=8 * weight)
    text = " ".join(rec(assess(c.resources, NOW), "refractory-crs").detail)
    assert ("anakinra 100 mg" in text) == adult_dose and ("pediatric protocol" in text) != adult_dose


def test_the_crs_4_order_runs_3_days_and_the_taper_is_text():
    from cds_service.hooks.cards import medication_request

    steroid = rec(assess(with_crs(chart(), 4).resources, NOW), "corticosteroid")
    request = medication_request(steroid.order, "adv", TERMS)
    repeat = request["dosageInstruction"][0]["timing"]["repeat"]
    assert repeat["boundsDuration"] == {"value": 3, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}
    assert "250 mg" not in request["dosageInstruction"][0]["text"]


# ---- Grading: home positive pressure, documented MAP, stopped infusions ------------------------------

@pytest.mark.parametrize("age, grade", [(55, 2), (12, 2), (9, 1)])
def test_documented_map_below_65_is_hypotension_over_10_years(age, grade):
    c = chart(age=age)
    c.temp(38.6, hours_ago=1)
    c.mean_bp(60, hours_ago=2)
    c.bp(100, 40, hours_ago=2)  # SBP normal: a MAP is never computed from SBP and DBP
    assert assess(c.resources, NOW).crs.value == grade


def test_map_is_never_computed_from_systolic_and_diastolic():
    c = chart()
    c.temp(38.6, hours_ago=1)
    c.bp(92, 40, hours_ago=2)  # a computed MAP would be 57
    assert assess(c.resources, NOW).crs.value == 1


def test_a_stopped_infusion_is_not_said_to_be_running():
    c = chart()
    c.temp(39.0, hours_ago=1)
    c.infusion(PHENYLEPHRINE, started_hours_ago=6, rate=(1, "ug/kg/min"), stopped_hours_ago=4)
    a = assess(c.resources, NOW)
    [evidence] = [e for e in a.crs.evidence if "phenylephrine" in e.text]
    assert "phenylephrine running" not in evidence.phrase()
    assert evidence.phrase(timezone.utc, NOW) == "phenylephrine stopped 08:00 UTC; started at 06:00 UTC"


# ---- Pitfalls ---------------------------------------------------------------------------------------

def test_masked_crs_card_does_not_say_counted_as_crs_nor_offer_grade_0():
    c = chart()
    c.give(DEXAMETHASONE, hours_ago=30, dose_mg=10)
    c.bp(80, 40, hours_ago=1)
    c.ice(10, hours_ago=1)
    a = assess(c.resources, NOW)
    assert rec(a, "possible-masked-crs")
    text = everything(a)
    assert "Counted as CRS" not in text and "grade 0" not in text and "Record CRS" not in text


def test_no_antifungal_advice_for_a_bispecifics_required_premedication():
    c = Chart("adv", NOW, "Test", "Pat", "male", 60)
    c.weight(70, days_ago=1)
    c.give(DEXAMETHASONE, hours_ago=49, dose_mg=16)  # label-required premedication, 1 h before the dose
    c.iec(TECLISTAMAB, days_ago=2, route="SC", dose_mg=0.06)
    c.temp(38.5, hours_ago=2)
    assert rec(assess(c.resources, NOW), "antifungal-prophylaxis") is None
    c.give(DEXAMETHASONE, hours_ago=1, dose_mg=10)  # after the fever: treats CRS
    assert rec(assess(c.resources, NOW), "antifungal-prophylaxis")


def test_crs_1_conditional_text_not_shown_when_the_trigger_is_met():
    c = chart(days=6)
    for hours in (80, 60, 40, 20):   # febrile every day for over 3 days
        c.temp(38.6, hours_ago=hours)
    c.temp(38.4, hours_ago=1)
    a = assess(c.resources, NOW)
    assert rec(a, "tocilizumab").detail[0].startswith("Tocilizumab indicated: CRS grade 1 with fever since")
    assert not any(d.startswith("Tocilizumab if fever") for d in rec(a, "crs-management").detail)


def test_crs_1_conditional_text_not_beside_no_tocilizumab_in_concurrent_icans():
    c = chart()
    c.temp(38.6, hours_ago=1)
    c.ice(5, hours_ago=1)
    a = assess(c.resources, NOW)
    assert rec(a, "concurrent-icans")
    assert "Tocilizumab if fever" not in everything(a)


def test_no_concurrent_icans_card_without_a_crs_grade():
    c = chart(days=45)  # outside the CRS window: no CRS grade
    c.ice(5, hours_ago=1)
    a = assess(c.resources, NOW)
    assert a.crs.value is None and a.icans.value == 2
    assert rec(a, "concurrent-icans") is None
    assert rec(a, "corticosteroid").order.agent == "dexamethasone"


def test_bispecific_next_dose_is_held_from_crs_2():
    c = Chart("adv", NOW, "Test", "Pat", "male", 60)
    c.weight(70, days_ago=1)
    c.iec(TECLISTAMAB, days_ago=1, route="SC", dose_mg=0.3)
    with_crs(c, 2)
    detail = rec(assess(c.resources, NOW), "crs-management").detail
    assert "Hold the next teclistamab step-up or treatment dose until CRS resolves (product label)" in detail


@pytest.mark.parametrize("grade, line", [(3, "Interrupt the blinatumomab infusion until CRS resolves"),
                                         (4, "Stop the blinatumomab infusion")])
def test_blinatumomab_interrupted_at_crs_3_stopped_at_4(grade, line):
    c = Chart("adv", NOW, "Test", "Pat", "male", 60)
    c.weight(70, days_ago=1)
    c.iec(BLINATUMOMAB, days_ago=1, route="IV")
    with_crs(c, grade)
    assert any(d.startswith(line) for d in rec(assess(c.resources, NOW), "crs-management").detail)


def test_hlh_regimen_is_named_weight_based_for_children():
    c = with_crs(chart(weight=20, age=6), 2)
    c.ferritin(15000, hours_ago=2)
    hlh = rec(assess(c.resources, NOW), "hlh-mas")
    assert "tocilizumab and corticosteroids together from the outset (dexamethasone 10 mg IV every 6 h" in hlh.detail[1]
    adult = with_crs(chart(), 2)
    adult.ferritin(15000, hours_ago=2)
    a = assess(adult.resources, NOW)
    assert "(dexamethasone 10 mg IV every 6 h, unless the grade calls for more)" in rec(a, "hlh-mas").detail[1]
    assert rec(a, "corticosteroid").order.agent == "dexamethasone"


def test_background_lines_do_not_delay_and_grading_frequency():
    lines = rec(assess(with_crs(chart(), 2).resources, NOW), "background").detail
    assert lines == ["grade CRS/ICANS twice daily and at any change",
                     "do not delay tocilizumab or steroids for efficacy concerns"]


# ---- Order checks -----------------------------------------------------------------------------------

def draft(drug: Drug, dose_mg: float | None = None, order_id: str = "draft1", status: str = "draft") -> dict:
    order = {"resourceType": "MedicationRequest", "id": order_id, "status": status, "intent": "order",
             "medicationCodeableConcept": drug.concept(), "subject": {"reference": "Patient/adv"}}
    if dose_mg is not None:
        order["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": dose_mg, "unit": "mg",
                                                                           "system": "http://unitsofmeasure.org",
                                                                           "code": "mg"}}]}]
    return order


def test_a_fifth_tocilizumab_order_offers_removal_and_refractory_options_not_a_dose():
    c = with_crs(chart(), 3)
    for hours in (60, 50, 40, 30):
        c.give(TOCILIZUMAB, hours_ago=hours, dose_mg=560)
    assessment, [finding] = review_orders([draft(TOCILIZUMAB, 560)], c.resources, NOW)
    assert finding.remove_target and finding.order is None
    assert "Computed dose" not in " ".join(finding.detail)
    assert any("anakinra" in d and "siltuximab" in d for d in finding.detail)
    [card] = finding_cards([finding], assessment, TERMS)
    assert [s["label"] for s in card["suggestions"]] == ["Remove the tocilizumab 560 mg order"]


def test_steroid_ordered_the_evening_before_a_scheduled_car_t_is_flagged():
    patient = Chart("adv", NOW, "Test", "Pat", "male", 50)
    patient.resources.append(draft(KYMRIAH, order_id="cart1", status="active"))  # scheduled for tomorrow
    [finding] = review_orders([draft(DEXAMETHASONE, 10)], patient.resources, NOW)[1]
    assert finding.topic == "steroid-premedication" and "a CAR-T product is ordered" in finding.detail[0]


def test_order_suggestion_labels_name_the_drug_and_dose_not_a_reference():
    c = with_crs(chart(), 2)
    assessment, findings = review_orders([draft(TOCILIZUMAB, 900, order_id="request-123")], c.resources, NOW)
    [card] = finding_cards(findings, assessment, TERMS)
    labels = [s["label"] for s in card["suggestions"]]
    assert labels == ["Change to tocilizumab 560 mg IV"]
    assert all(len(label) < 80 and "MedicationRequest" not in label for label in labels)


# ---- Cards: short, said once, quiet when normal, local time, cited ------------------------------------

SCENARIO_NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def scenario_answers():
    for scenario in SCENARIOS:
        assessment = assess(scenario.build(SCENARIO_NOW), SCENARIO_NOW)
        yield scenario.name, assessment, assessment_cards(assessment, TERMS, protocol_url="https://cds.example/protocol")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\*\*|_|^- |⚠", "", text, flags=re.M)
    return [s.strip().lower() for s in re.split(r"(?<=[.;:])\s+|\n", text) if len(s.strip()) > 25]


def test_every_scenarios_cards_are_short_grade_first_and_say_nothing_twice():
    for name, assessment, cards in scenario_answers():
        if not cards:
            continue
        main = cards[0]
        assert len(main["summary"]) < 140, name
        assert not re.search(r"grade 0\b", main["summary"] + main["detail"]), name
        assert len(main["detail"]) < 1700, (name, len(main["detail"]))
        seen: dict[str, int] = {}
        for card in cards:
            for sentence in _sentences(card["detail"]):
                if "sources:" in sentence or "](https://" in sentence:
                    continue
                seen[sentence] = seen.get(sentence, 0) + 1
        assert not [s for s, n in seen.items() if n > 1], (name, [s for s, n in seen.items() if n > 1])
        for card in cards:
            for suggestion in card.get("suggestions", []):
                assert len(suggestion["label"]) < 80 and "MedicationRequest/" not in suggestion["label"], name
            assert any(link["url"].startswith("https://doi.org/") for link in card["links"]), name
            assert any(link["url"] == "https://cds.example/protocol" for link in card["links"]), name


def test_most_main_cards_stay_under_1200_characters():
    lengths = {name: len(cards[0]["detail"]) for name, _, cards in scenario_answers() if cards}
    under = [name for name, n in lengths.items() if n < 1200]
    assert len(under) >= len(lengths) - 6, lengths


def test_no_seed_in_anything_a_clinician_reads():
    from pathlib import Path

    import cds_service

    package = Path(cds_service.__file__).parent
    for path in [*package.glob("clinical/*.json"), *package.glob("clinical/*.py"), *package.glob("hooks/*.py"),
                 *(package.parent / "cards").glob("*.json")]:
        assert not re.search(r"\bseeds? \d", path.read_text(encoding="utf-8")), path
    for name, assessment, cards in scenario_answers():
        dumped = json.dumps(cards) + json.dumps(assessment.to_json())
        assert "seed " not in dumped and "protocol rule 6" not in dumped, name


def test_quiet_when_normal_and_one_short_card_when_no_icans_assessment():
    normal = chart()
    normal.temp(37.0, hours_ago=1)
    normal.ice(10, hours_ago=2)
    a = assess(normal.resources, NOW)
    assert assessment_cards(a, TERMS) == []
    [card] = assessment_cards(a, TERMS, quiet_when_normal=False)
    assert card["summary"] == "No CRS, no ICANS" and "grade 0" not in card["detail"]
    unassessed = chart()
    unassessed.temp(37.0, hours_ago=1)
    [card] = assessment_cards(assess(unassessed.resources, NOW), TERMS)
    assert card["indicator"] == "info" and "no ICANS assessment in the last 12 h" in card["summary"]
    assert len(card["detail"]) < 200


def test_times_are_in_the_site_time_zone_with_its_abbreviation():
    c = with_crs(chart(), 2)
    c.give(TOCILIZUMAB, hours_ago=5, dose_mg=560)
    a = assess(c.resources, NOW, zone=ZoneInfo("Europe/Berlin"))
    toci = rec(a, "tocilizumab")
    assert "last dose 08:00 CET; next dose possible from 16:00 CET" in toci.title
    main = assessment_cards(a, TERMS)[0]
    assert "UTC" not in main["detail"] and "CET" in main["detail"]


def test_evidence_in_words_and_references_only_in_structured_data():
    a = assess(with_crs(chart(), 3).resources, NOW)
    main = assessment_cards(a, TERMS)[0]
    assert "norepinephrine running since 10:00 UTC" in main["detail"]
    assert "Observation/" not in main["detail"] and "MedicationAdministration/" not in main["detail"]
    assert any(e["reference"].startswith("MedicationAdministration/") for e in a.crs.to_json()["evidence"])


def test_summary_is_the_grade_then_the_one_action_due_now():
    a = assess(with_crs(chart(), 3).resources, NOW)
    assert assessment_cards(a, TERMS)[0]["summary"] == "CRS grade 3, no ICANS: give tocilizumab 560 mg IV now"


def test_the_card_carrying_the_tocilizumab_order_is_critical():
    cards = assessment_cards(assess(with_crs(chart(), 2).resources, NOW), TERMS)
    carrying = [c for c in cards if any("tocilizumab" in s["label"] for s in c.get("suggestions", []))]
    assert carrying and all(c["indicator"] == "critical" for c in carrying)


# ---- The protocol: a document made from its data, a schema checked at load ---------------------------

def test_the_committed_protocol_document_matches_the_protocol_data():
    from pathlib import Path

    from cds_service.clinical.protocol import default_protocol, protocol_markdown

    document = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
    assert document.read_text(encoding="utf-8") == protocol_markdown(default_protocol()), \
        "regenerate: crs-cds protocol show --markdown > docs/protocol.md"


def test_every_rule_a_card_cites_is_in_the_protocol_document():
    from cds_service.clinical.protocol import default_protocol, protocol_markdown

    document = protocol_markdown(default_protocol())
    cited = set()
    for _, assessment, cards in scenario_answers():
        for r in assessment.recommendations:
            cited |= set(re.findall(r", rule ([\w.\[\]-]+)", r.source))
    assert cited
    for rule in cited:
        assert f"`{rule}`" in document, rule


@pytest.mark.parametrize("site, message", [
    ({"tocilizumab": {"max_dose": 600}}, "unknown key 'tocilizumab.max_dose'"),
    ({"tocilizumab": {"max_dose_mg": "800"}}, "key 'tocilizumab.max_dose_mg': '800' is not of type 'number'"),
    ({"tocilizumab": {"max_doses_per_24h": 0}}, "key 'tocilizumab.max_doses_per_24h': 0 is less than the minimum of 1"),
    ({"infusion_carry_hours": 0}, "key 'infusion_carry_hours': 0 is less than or equal to the minimum of 0"),
    ({"crs_management": {"3": {"steroid": "dex-typo"}}}, "no steroid regimen 'dex-typo'"),
    ({"hlh": {"source": "seed 000"}}, "no citation 'seed 000'"),
])
def test_a_site_protocol_with_an_unknown_key_wrong_type_or_range_is_refused(tmp_path, site, message):
    from cds_service.clinical import Protocol, ProtocolError

    path = tmp_path / "site-protocol.json"
    path.write_text(json.dumps(site))
    with pytest.raises(ProtocolError) as error:
        Protocol.load(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_a_bad_site_protocol_stops_start_up(tmp_path):
    from cds_service.app import create_app
    from cds_service.clinical import ProtocolError
    from cds_service.settings import Settings

    path = tmp_path / "site-protocol.json"
    path.write_text(json.dumps({"tocilizumab": {"max_dose": 600}}))
    with pytest.raises(ProtocolError, match="unknown key 'tocilizumab.max_dose'"):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), auth_enabled=False, protocol_file=str(path)))


def test_the_shipped_protocol_and_its_infusion_carry_hours_pass_the_schema():
    from cds_service.clinical.protocol import default_protocol

    assert default_protocol()["infusion_carry_hours"] > 0
