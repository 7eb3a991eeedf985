"""Checks on draft medication orders: decisions.md section 6 rules 3 (GM-CSF), 8 (steroid
premedication before CAR-T) and 9 (tocilizumab order checks).

Draft orders are read leniently: real clients send single objects where R4 wants arrays, omit
``intent``, or reference a Medication elsewhere in the draft Bundle.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Iterable, Mapping

from ..terminology import Terminology, load_terminology
from .assess import assess
from .dosing import refractory_first_options, tocilizumab_dose, tocilizumab_history
from .facts import MEDICATION_VALUESETS
from .fhir_read import UnreadableValue, medication_concept, quantity_in, resource_key
from .model import Assessment, MedicationOrder, Recommendation, clock
from .protocol import Protocol, default_protocol

ORDER_TYPES = {"MedicationRequest", "MedicationOrder"}


@dataclass(frozen=True)
class DraftOrder:
    reference: str
    agent: str | None
    categories: frozenset[str]
    dose_mg: float | None
    resource: Mapping

    @property
    def words(self) -> str:
        """The order as a clinician names it: "tocilizumab 900 mg"."""
        dose = f" {self.dose_mg:g} mg" if self.dose_mg is not None else ""
        return f"{self.agent or 'medication'}{dose}"


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _dose_mg(order: Mapping) -> float | None:
    for instruction in _as_list(order.get("dosageInstruction")):
        if not isinstance(instruction, dict):
            continue
        for dose_and_rate in _as_list(instruction.get("doseAndRate")):
            if isinstance(dose_and_rate, dict) and dose_and_rate.get("doseQuantity"):
                try:
                    return quantity_in(dose_and_rate["doseQuantity"], "mg")
                except UnreadableValue:
                    return None
    return None


def read_draft_orders(resources: Iterable[Mapping], terminology: Terminology) -> list[DraftOrder]:
    """Every medication order in the draft Bundle, with the value-set categories its drug falls in."""
    resources = [r for r in resources if isinstance(r, dict)]
    medications = {resource_key(r): r for r in resources if r.get("resourceType") == "Medication"}
    orders = []
    for order in resources:
        if order.get("resourceType") not in ORDER_TYPES:
            continue
        codeable, texts = medication_concept(order, medications)
        matches = terminology.categories(MEDICATION_VALUESETS, codeable, texts)
        orders.append(DraftOrder(resource_key(order), next(iter(matches.values()), None), frozenset(matches),
                                 _dose_mg(order), order))
    return orders


def gm_csf_after_iec(order: DraftOrder, assessment: Assessment, protocol: Protocol) -> list[Recommendation]:
    """Rule 3. When GM-CSF (sargramostim) is ordered for a patient after IEC therapy, then warn,
    suggest removing the order, and, where neutropenia support is intended, filgrastim instead:
    G-CSF is permissible.  Source: Neelapu et al. 2018; NCCN; decisions.md 6 rule 3."""
    if "gm-csf" not in order.categories or not assessment.in_scope:
        return []
    checks = protocol["order_checks"]
    alternative = checks["gm_csf_alternative"]
    return [Recommendation(
        "gm-csf-after-iec", "warning", "Avoid GM-CSF (sargramostim) after IEC therapy: use G-CSF if needed",
        [f"IEC therapy: {assessment.scope_reason}.",
         "GM-CSF is avoided after CAR-T/T-cell engager therapy (it may worsen CRS and neurotoxicity); "
         "G-CSF (filgrastim, pegfilgrastim) is permissible."],
        protocol.cite(checks["gm_csf_source"]),
        MedicationOrder(alternative["agent"], None, alternative["route"], None, alternative["text"]),
        target=order.reference, remove_target=True, target_label=order.words,
        links=protocol.links(checks["gm_csf_source"]))]


def car_t_dose_near(scope: Assessment, drafts: list[DraftOrder], resources: list[Mapping], now: datetime,
                    protocol: Protocol, terminology: Terminology) -> str | None:
    """Why a CAR-T dose is scheduled or was just given (within 24 h), or None."""
    window = timedelta(hours=protocol["order_checks"]["steroid_premedication_window_hours"])
    if any("car-t-products" in d.categories for d in drafts):
        return "a CAR-T order is in this session"
    medications = {resource_key(r): r for r in resources if r.get("resourceType") == "Medication"}
    for request in resources:
        if request.get("resourceType") in ORDER_TYPES and request.get("status") in ("active", "draft", "on-hold"):
            codeable, texts = medication_concept(request, medications)
            if "car-t-products" in terminology.categories(("car-t-products",), codeable, texts):
                return "a CAR-T product is ordered"
    if scope.iec_car_t and scope.iec_therapy is not None and now - scope.iec_therapy.time <= window:
        return f"CAR-T given {clock(scope.iec_therapy.time, scope.tz, now)}"
    return None


def steroid_premedication(order: DraftOrder, assessment: Assessment, car_t_near: str | None,
                          protocol: Protocol) -> list[Recommendation]:
    """Rule 8. When a corticosteroid is ordered within 24 h before a scheduled or just-given
    CAR-T dose, then warn: no routine steroid premedication for CAR-T. T-cell engagers are the
    exception (their labels require premedication), and so is a steroid the current CRS/ICANS
    grade calls for.  Source: Neelapu et al. 2018; decisions.md 6 rule 8."""
    if "systemic-corticosteroids" not in order.categories or car_t_near is None:
        return []
    if assessment.recommendation("corticosteroid") or assessment.recommendation("concurrent-icans"):
        return []  # the steroid treats CRS/ICANS; it is not premedication
    return [Recommendation(
        "steroid-premedication", "warning", "Steroid premedication before CAR-T: not recommended",
        [f"{order.agent} ordered while {car_t_near}.",
         "Routine corticosteroid premedication is avoided with CAR-T cells (it may blunt their expansion); "
         "T-cell engagers are the exception.", "If this steroid treats CRS or ICANS, override with that reason."],
        protocol.cite(protocol["order_checks"]["steroid_premedication_source"]), target=order.reference,
        target_label=order.words, links=protocol.links(protocol["order_checks"]["steroid_premedication_source"]))]


def tocilizumab_order(order: DraftOrder, assessment: Assessment, protocol: Protocol) -> list[Recommendation]:
    """Rule 9. When tocilizumab is ordered above 800 mg, more than 10% away from 8 (or 12) mg/kg,
    within 8 h of the last dose, or while the concurrent-ICANS rule applies, then warn with the
    computed dose. When it would be a 4th dose in 24 h or a 5th in the episode (a limit), then
    offer to remove the order and name the refractory options, never a computed dose.
    Source: Actemra prescribing information; decisions.md 6 rule 9."""
    if "tocilizumab" not in order.categories or not assessment.in_scope:
        return []
    rules = protocol["tocilizumab"]
    situation = assessment.situation
    dose = tocilizumab_dose(situation)
    history = tocilizumab_history(situation)
    computed = dose.dose_mg if dose else None
    concurrent = assessment.recommendation("concurrent-icans") is not None
    at = situation.at
    problems: list[str] = []
    if history.limit:
        problems.append(f"limit reached: {history.limit}")
    if order.dose_mg is None:
        problems.append("the order has no dose in mg")
    elif order.dose_mg > rules["max_dose_mg"]:
        problems.append(f"{order.dose_mg:g} mg exceeds the {rules['max_dose_mg']} mg maximum")
    if not history.limit and order.dose_mg is not None and computed and \
            abs(order.dose_mg - computed) > computed * rules["order_dose_tolerance_fraction"]:
        problems.append(f"{order.dose_mg:g} mg differs from the computed {computed:g} mg by more than "
                        f"{rules['order_dose_tolerance_fraction']:.0%}")
    if history.next_possible and not history.limit:
        problems.append(f"last dose {at(history.last.start)}; next dose possible from "
                        f"{at(history.next_possible)} if no improvement")
    if concurrent:
        problems.append(f"{assessment.icans.text} with {assessment.crs.text.lower() if assessment.crs.value == 0 else assessment.crs.text}: "
                        "corticosteroids first, tocilizumab may worsen neurotoxicity")
    if not problems:
        return []
    detail = [p[0].upper() + p[1:] + "." for p in problems]
    sources = list(rules["source"]) if isinstance(rules["source"], list) else [rules["source"]]
    if history.limit:
        options = protocol["refractory_options"]
        first = refractory_first_options(protocol, assessment.situation)
        detail.append("Refractory CRS options instead: " + " or ".join(first) + "; then "
                      + ", ".join(options["then"]) + f" ({options['then_text']}).")
        return [Recommendation("tocilizumab-order-check", "warning", "Tocilizumab order: " + problems[0],
                               detail, protocol.cite(sources + ["asco"]) + "; " + protocol.rule("tocilizumab.max_doses_per_episode" if history.at_episode_limit
                                                                     else "tocilizumab.max_doses_per_24h"),
                               target=order.reference, remove_target=True, target_label=order.words,
                               links=protocol.links(sources))]
    detail.append(f"Computed dose: {dose.text}." if dose else
                  f"No weight in the last {protocol['weight_window_days']} days: no dose can be computed.")
    replacement = None
    if computed and order.dose_mg != computed and not concurrent and not history.blocked:
        replacement = MedicationOrder("tocilizumab", computed, "IV", None, f"tocilizumab {computed:g} mg {rules['route']}")
    return [Recommendation("tocilizumab-order-check", "warning", "Tocilizumab order: " + problems[0],
                           detail, protocol.cite(sources), replacement,
                           target=order.reference, replace_target=replacement is not None,
                           remove_target=concurrent, target_label=order.words, links=protocol.links(sources))]


def review_orders(draft_resources: Iterable[Mapping], patient_resources: Iterable[Mapping], now: datetime,
                  selections: Iterable[str] | None = None, protocol: Protocol | None = None,
                  terminology: Terminology | None = None, unread_sources=(),
                  zone: tzinfo = timezone.utc) -> tuple[Assessment, list[Recommendation]]:
    """Check draft orders (only the ``selections`` when given, as order-select asks) against the
    patient's record at ``now`` (its resources may hold the patient's MedicationRequests: a CAR-T
    product ordered is a scheduled dose). The patient is graded only when an order needs the grades
    (a tocilizumab order, or a steroid near a CAR-T dose); the GM-CSF check needs only the scope."""
    protocol = protocol or default_protocol()
    terminology = terminology or load_terminology()
    patient_resources = list(patient_resources)
    drafts = read_draft_orders(draft_resources, terminology)
    focus = set(selections) if selections else None
    chosen = [order for order in drafts if focus is None or order.reference in focus]
    scope = assess(patient_resources, now, protocol, terminology, unread_sources, grade=False, zone=zone)
    car_t_near = car_t_dose_near(scope, drafts, patient_resources, now, protocol, terminology) \
        if scope.assessable else None
    needs_grades = scope.in_scope and any(
        "tocilizumab" in o.categories or ("systemic-corticosteroids" in o.categories and car_t_near) for o in chosen)
    assessment = (assess(patient_resources, now, protocol, terminology, unread_sources, zone=zone) if needs_grades
                  else scope)
    findings: list[Recommendation] = []
    for order in chosen:
        findings += gm_csf_after_iec(order, assessment, protocol)
        findings += steroid_premedication(order, assessment, car_t_near, protocol)
        findings += tocilizumab_order(order, assessment, protocol)
    return assessment, findings
