"""Recommendations into CDS Hooks cards, from the templates in ``cards/``.

One template per card type gives the stable ``source.topic`` (EHRs key overrides on it), links
and override reasons; the clinical core gives the words. Nothing null or empty is ever emitted.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from ..clinical.model import Assessment, Grade, MedicationOrder, Recommendation, iso
from ..clinical.report import SUMMARY_LIMIT, headline
from ..paths import shipped_dir
from ..terminology import IEC_TOXICITY, UCUM, Terminology

ASSESSMENT = "crs-icans-assessment"
PROFILE_BASE = "http://crs-cds.org/fhir/StructureDefinition/"
MEDICATION_VALUESETS_FOR_ORDERS = ("tocilizumab", "systemic-corticosteroids", "g-csf")


@dataclass(frozen=True)
class CardTemplate:
    type: str
    topic: dict
    source: dict
    recommendation_topics: tuple[str, ...]
    links: tuple[dict, ...]
    override_reasons: tuple[dict, ...]


@lru_cache(maxsize=1)
def card_templates() -> dict[str, CardTemplate]:
    templates = {}
    for path in sorted(shipped_dir("cards").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        templates[data["type"]] = CardTemplate(data["type"], data["topic"], data["source"],
                                               tuple(data["recommendationTopics"]), tuple(data.get("links", ())),
                                               tuple(data.get("overrideReasons", ())))
    return templates


def template_for_topic(topic: str) -> CardTemplate:
    for template in card_templates().values():
        if topic in template.recommendation_topics:
            return template
    raise KeyError(f"no card template shows recommendation topic {topic!r}")


def _new_id() -> str:
    return str(uuid.uuid4())


def _summary(text: str) -> str:
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1].rstrip() + "…"


def _card(template: CardTemplate, summary: str, indicator: str, detail: str, suggestions: list[dict]) -> dict:
    card = {
        "uuid": _new_id(),
        "summary": _summary(summary),
        "indicator": indicator,
        "detail": detail,
        "source": {**template.source, "topic": dict(template.topic)},
    }
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "any"  # Epic supports only "any"
    if template.override_reasons:
        card["overrideReasons"] = [dict(r) for r in template.override_reasons]
    if template.links:
        card["links"] = [dict(link) for link in template.links]
    return card


# ---- Markdown ------------------------------------------------------------------------------------

def _grade_markdown(grade: Grade) -> list[str]:
    head = f"**{grade.text}**: {grade.reason}"
    if grade.window:
        head += f" _(window: {grade.window})_"
    lines = [head]
    lines += [f"- {e.sentence} ({e.reference})" for e in grade.evidence]
    lines += [f"- ⚠ {flag.text}" for flag in grade.flags]
    if grade.at_least:
        lines.append("- ⚠ Some data could not be read, so the grade may be higher: " + "; ".join(grade.missing[:5]))
    return lines


def _recommendation_markdown(rec: Recommendation) -> list[str]:
    lines = [f"**{rec.title}** [{rec.source}]"]
    lines += [f"- {d}" for d in rec.detail]
    return lines


# ---- FHIR resources for suggestions ---------------------------------------------------------------

def medication_request(order: MedicationOrder, patient_id: str | None, terminology: Terminology,
                       based_on: dict | None = None) -> dict:
    coding = next((terminology[vs].coding_for(order.agent) for vs in MEDICATION_VALUESETS_FOR_ORDERS
                   if "code" in terminology[vs].coding_for(order.agent)), {"display": order.agent})
    concept: dict = {"text": order.agent}
    if "code" in coding:
        concept["coding"] = [coding]
    dosage: dict = {"text": order.text, "route": {"text": order.route}}
    if order.every_hours:
        dosage["timing"] = {"repeat": {"frequency": 1, "period": order.every_hours, "periodUnit": "h"}}
    if order.dose_mg is not None:
        dosage["doseAndRate"] = [{"doseQuantity": {"value": order.dose_mg, "unit": "mg", "system": UCUM,
                                                   "code": "mg"}}]
    request = {"resourceType": "MedicationRequest", "status": "draft", "intent": "order",
               "medicationCodeableConcept": concept, "dosageInstruction": [dosage]}
    if patient_id:
        request["subject"] = {"reference": f"Patient/{patient_id}"}
    if based_on:
        request.update(based_on)
    return request


def grade_observation(grade: Grade, code: str, profile: str, assessment: Assessment) -> dict:
    observation = {
        "resourceType": "Observation",
        "meta": {"profile": [PROFILE_BASE + profile]},
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey", "display": "Survey"}]}],
        "code": {"coding": [{"system": IEC_TOXICITY, "code": code, "display": f"{grade.syndrome} grade (ASTCT)"}],
                 "text": f"{grade.syndrome} grade (ASTCT 2019)"},
        "effectiveDateTime": iso(assessment.now),
        "valueInteger": grade.value,
        "method": {"text": assessment.protocol},
        "note": [{"text": f"{grade.text}: {grade.reason}. Computed by crs-cds; confirm clinically."}],
    }
    if assessment.patient_id:
        observation["subject"] = {"reference": f"Patient/{assessment.patient_id}"}
    derived = [{"reference": e.reference} for e in grade.evidence if e.reference.startswith("Observation/")]
    if derived:
        observation["derivedFrom"] = derived
    return observation


def _suggestion(label: str, action_type: str, description: str, resource: dict | None = None,
                resource_id: str | None = None, recommended: bool = False) -> dict:
    action: dict = {"type": action_type, "description": description}
    if resource is not None:
        action["resource"] = resource
    if resource_id:
        action["resourceId"] = resource_id
    suggestion = {"label": label, "uuid": _new_id(), "actions": [action]}  # one action each (Epic)
    if recommended:
        suggestion["isRecommended"] = True
    return suggestion


def _order_suggestions(recs: Iterable[Recommendation], assessment: Assessment, terminology: Terminology) -> list[dict]:
    suggestions = []
    for rec in recs:
        if rec.target and rec.remove_target:
            suggestions.append(_suggestion(f"Remove the order {rec.target}", "delete",
                                           f"Remove {rec.target}", resource_id=rec.target, recommended=True))
        if rec.order is None:
            continue
        request = medication_request(rec.order, assessment.patient_id, terminology)
        if rec.target and rec.replace_target:
            request["id"] = rec.target.split("/", 1)[1]
            suggestions.append(_suggestion(f"Change to {rec.order.text}", "update",
                                           f"Change {rec.target} to {rec.order.text}", request))
        else:
            verb = "Order instead" if rec.target else "Order"
            suggestions.append(_suggestion(f"{verb}: {rec.order.text}", "create", f"{verb} {rec.order.text}",
                                           request, recommended=not rec.target))
    return suggestions


# ---- Cards ---------------------------------------------------------------------------------------

def assessment_cards(assessment: Assessment, terminology: Terminology) -> list[dict]:
    """The patient-view cards: one assessment card, plus one card per pitfall that fired."""
    if not assessment.in_scope:
        return []
    main = card_templates()[ASSESSMENT]
    shown = [r for r in assessment.recommendations if r.topic in main.recommendation_topics]
    detail = _grade_markdown(assessment.crs) + [""] + _grade_markdown(assessment.icans)
    for rec in shown:
        detail += [""] + _recommendation_markdown(rec)
    detail += ["", f"_IEC therapy: {assessment.scope_reason}. {assessment.protocol}._"]
    suggestions = _order_suggestions(shown, assessment, terminology)
    for grade, code, profile in ((assessment.crs, "crs-grade", "crs-grade-observation"),
                                 (assessment.icans, "icans-grade", "icans-grade-observation")):
        if grade.value is not None and not grade.at_least:
            suggestions.append(_suggestion(f"Record {grade.text}", "create", f"Record {grade.text} as an Observation",
                                           grade_observation(grade, code, profile, assessment)))
    indicator = max((r.indicator for r in shown), key=["info", "warning", "critical"].index, default="info")
    cards = [_card(main, headline(assessment), indicator, "\n".join(detail), suggestions)]
    cards += finding_cards([r for r in assessment.recommendations if r not in shown], assessment, terminology)
    return cards


def add_app_link(cards: list[dict], url: str) -> None:
    """The SMART timeline app as a ``smart`` link on the assessment card (the EHR adds iss and launch)."""
    topic = card_templates()[ASSESSMENT].topic["code"]
    for card in cards:
        if card["source"]["topic"]["code"] == topic:
            card.setdefault("links", []).append({"label": "CRS/ICANS timeline", "url": url, "type": "smart"})


def finding_cards(recs: Iterable[Recommendation], assessment: Assessment, terminology: Terminology) -> list[dict]:
    """One card per pitfall or order-check finding."""
    cards = []
    for rec in recs:
        template = template_for_topic(rec.topic)
        detail = _recommendation_markdown(rec)[1:] + ["", f"_Source: {rec.source}. {assessment.protocol}._"]
        cards.append(_card(template, rec.title, rec.indicator, "\n".join(detail),
                           _order_suggestions([rec], assessment, terminology)))
    return cards
