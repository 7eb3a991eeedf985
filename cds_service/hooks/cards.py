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
from ..terminology import IEC_TOXICITY, RXNORM, UCUM, Terminology

ASSESSMENT = "crs-icans-assessment"
PROFILE_BASE = "http://crs-cds.org/fhir/StructureDefinition/"
MEDICATION_VALUESETS_FOR_ORDERS = ("tocilizumab", "systemic-corticosteroids", "g-csf")
LABEL_LIMIT = 80  # characters: a suggestion's label is a button

# The suggestion actions each EHR kind is offered, as (resource type, action type); None: any.
# Epic applies only MedicationRequest/ServiceRequest create and delete and Condition create (its
# CDS Hooks documentation): no Observation create, no update. Oracle Health documents no
# suggestions at all (patient-view only, in its beta): whatever it applies, a draft order is
# replaced by delete + create, the two actions every client that applies orders supports, never
# by an update (a full resource the client must merge into its own draft).
EHR_ACTIONS: dict[str, frozenset[tuple[str, str]] | None] = {
    "generic": None,
    "epic": frozenset({("MedicationRequest", "create"), ("MedicationRequest", "delete"),
                       ("ServiceRequest", "create"), ("ServiceRequest", "delete"), ("Condition", "create")}),
    "oracle-health": frozenset({(kind, action) for kind in ("MedicationRequest", "ServiceRequest", "Condition",
                                                            "Observation") for action in ("create", "delete")}),
}
# The systems Epic takes for a suggested medication order, best first: an item of the site's
# preference list (the site's own order, with its dose), then RxNorm or NDC, named by OID.
EPIC_PREFERENCE_LIST = "urn:com.epic.cdshooks.action.code.system.preference-list-item"
EPIC_ORDERABLE_SYSTEMS = {EPIC_PREFERENCE_LIST: EPIC_PREFERENCE_LIST,
                          RXNORM: "urn:oid:2.16.840.1.113883.6.88",
                          "http://hl7.org/fhir/sid/ndc": "urn:oid:2.16.840.1.113883.6.69",
                          "urn:oid:2.16.840.1.113883.6.69": "urn:oid:2.16.840.1.113883.6.69"}


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


def _card(template: CardTemplate, summary: str, indicator: str, detail: str, suggestions: list[dict],
          links: list[dict] | None = None) -> dict:
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
    links = [dict(link) for link in template.links] if links is None else links
    if links:
        card["links"] = links
    return card


# ---- Markdown ------------------------------------------------------------------------------------

# Flags that a recommendation of their own already says: not repeated under the grade.
FLAGS_WITH_THEIR_OWN_ADVICE = {"fever-masked", "possible-masked-crs"}


def _grade_markdown(grade: Grade, assessment: Assessment) -> list[str]:
    """The grade, its reason, and its deciding evidence in words (what and when), on one line."""
    evidence = [e.phrase(assessment.tz, assessment.now) for e in grade.evidence]
    head = f"**{grade.text}**" + (": " + "; ".join(evidence) if evidence else f": {grade.reason}" if grade.value else "")
    lines = [head]
    said_elsewhere = FLAGS_WITH_THEIR_OWN_ADVICE | (
        {"attribution"} if assessment.recommendation("infection-workup") else set())  # its line says it
    lines += [f"- ⚠ {flag.text}" for flag in grade.flags if flag.code not in said_elsewhere]
    return lines


def _missing_line(assessment: Assessment) -> list[str]:
    """The sources that could not be read, named once for both grades (decisions.md 7)."""
    missing: list[str] = []
    for grade in (assessment.crs, assessment.icans):
        missing += [m for m in grade.missing if m not in missing] if grade.at_least else []
    if not missing:
        return []
    sources = [m for m in missing if m.startswith("prefetch:")]  # whole sources: every one is named
    shown = sources + [m for m in missing if m not in sources][:max(0, 5 - len(sources))]
    return ["- ⚠ Some data could not be read, so the grade may be higher: " + "; ".join(shown)]


def _recommendation_line(rec: Recommendation, seen: set[str]) -> str | None:
    """One bullet: the title in bold, then the details not said before in this answer."""
    details = [d for d in rec.detail if _norm(d) not in seen]
    seen.update(_norm(d) for d in details)
    if _norm(rec.title) in seen and not details:
        return None
    seen.add(_norm(rec.title))
    body = "; ".join(d.rstrip(".") for d in details)
    return f"- **{rec.title}**" + (f": {body}." if body else "")


def _norm(text: str) -> str:
    return text.strip().rstrip(".").lower()


def _sources_line(recs: Iterable[Recommendation], protocol_url: str | None, protocol: str = "") -> str:
    """The literature cited, once each; a protocol choice as "rule <key>" of the protocol named once."""
    parts: list[str] = []
    rules: list[str] = []
    for rec in recs:
        for part in rec.source.split("; "):
            if ", rule " in part:
                rule = part.rsplit(", rule ", 1)[1]
                protocol = protocol or part.rsplit(", rule ", 1)[0]
                if rule not in rules:
                    rules.append(rule)
            elif part and part not in parts:
                parts.append(part)
    text = "Sources: " + "; ".join(parts) + "." if parts else ""
    if rules:
        text += f" {protocol}, " + ("rules " if len(rules) > 1 else "rule ") + ", ".join(rules) + "."
    if protocol_url:
        text += f" [Protocol]({protocol_url})."
    return f"_{text.strip()}_" if text.strip() else ""


def _main_footer(assessment: Assessment, shown: list[Recommendation], protocol_url: str | None) -> str:
    """The IEC therapy, then the protocol and the rules of it the card applied; the literature the
    card cites is in its links (authors, journal, doi)."""
    rules: list[str] = []
    for rec in shown:
        for part in rec.source.split("; "):
            if ", rule " in part and part.rsplit(", rule ", 1)[1] not in rules:
                rules.append(part.rsplit(", rule ", 1)[1])
    text = f"_{assessment.scope_reason}. {assessment.protocol}"
    if rules:
        text += (", rules " if len(rules) > 1 else ", rule ") + ", ".join(rules)
    text += f" ([document]({protocol_url}))._" if protocol_url else "._"
    return text


def _links(template: CardTemplate, recs: Iterable[Recommendation], protocol_url: str | None) -> list[dict]:
    links = [dict(link) for link in template.links]
    urls = {link["url"] for link in links}
    for rec in recs:
        for link in rec.links:
            if link["url"] not in urls:
                urls.add(link["url"])
                links.append({"label": link["label"], "url": link["url"], "type": "absolute"})
    if protocol_url and protocol_url not in urls:
        links.append({"label": "The protocol these cards follow (thresholds, doses, rules)", "url": protocol_url,
                      "type": "absolute"})
    return links


# ---- FHIR resources for suggestions ---------------------------------------------------------------

def medication_request(order: MedicationOrder, patient_id: str | None, terminology: Terminology,
                       based_on: dict | None = None, ehr: str = "generic") -> dict:
    """The suggested order. At Epic the order's details (dose included) come from the site's own
    order record, whatever the resource says: the dose is in the suggestion's words too."""
    coding = (_epic_orderable_coding(order.agent, terminology) if ehr == "epic" else None) or next(
        (terminology[vs].coding_for(order.agent) for vs in MEDICATION_VALUESETS_FOR_ORDERS
         if "code" in terminology[vs].coding_for(order.agent)), {"display": order.agent})
    concept: dict = {"text": order.agent}
    if "code" in coding:
        concept["coding"] = [coding]
    dosage: dict = {"text": order.text, "route": {"text": order.route}}
    if order.every_hours:
        repeat: dict = {"frequency": 1, "period": order.every_hours, "periodUnit": "h"}
        if order.duration_days:  # a bounded order (methylprednisolone 500 mg q12h for 3 days)
            repeat["boundsDuration"] = {"value": order.duration_days, "unit": "days", "system": UCUM, "code": "d"}
        dosage["timing"] = {"repeat": repeat}
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


def _epic_orderable_coding(agent: str, terminology: Terminology) -> dict | None:
    """The Coding Epic orders the agent by: a concept of the drug's ValueSet (shipped, or a site's
    file in ``terminology_dirs``) in the site's preference list, else its RxNorm or NDC code, by
    OID; None when the ValueSets have none. A concept stands for the agent when its display is
    the agent's name or names it (``Tocilizumab IV for CRS``)."""
    found: dict[str, dict] = {}
    for vs in MEDICATION_VALUESETS_FOR_ORDERS:
        concept = terminology[vs]
        for (system, code), named in concept.codes.items():
            if system in EPIC_ORDERABLE_SYSTEMS and system not in found and (
                    named == agent or concept.agent_for_text([named]) == agent):
                found[system] = {"system": EPIC_ORDERABLE_SYSTEMS[system], "code": code, "display": agent}
    return next((found[system] for system in EPIC_ORDERABLE_SYSTEMS if system in found), None)


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
    suggestion = {"label": _label(label), "uuid": _new_id(), "actions": [action]}  # one action each (Epic)
    if recommended:
        suggestion["isRecommended"] = True
    return suggestion


def _label(text: str, what: str | None = None) -> str:
    """Under LABEL_LIMIT characters; when too long, ``what`` (the drug and dose) alone, without the verb."""
    for label in (text, what):
        if label and len(label) < LABEL_LIMIT:
            return label
    return (what or text)[:LABEL_LIMIT - 2].rstrip() + "…"


def _order_suggestions(recs: Iterable[Recommendation], assessment: Assessment, terminology: Terminology,
                       ehr: str = "generic") -> list[dict]:
    suggestions = []
    for rec in recs:
        if rec.target and rec.remove_target:
            what = rec.target_label or "draft"
            suggestions.append(_suggestion(f"Remove the {what} order", "delete",
                                           f"Remove the {what} order", resource_id=rec.target, recommended=True))
        if rec.order is None:
            continue
        request = medication_request(rec.order, assessment.patient_id, terminology, ehr=ehr)
        set_dose = (" (set this dose: the order opens with the site's default)"
                    if ehr == "epic" and rec.order.dose_mg is not None else "")
        if rec.target and rec.replace_target and ehr == "generic":
            request["id"] = rec.target.split("/", 1)[1]
            suggestions.append(_suggestion(_label(f"Change to {rec.order.label}", rec.order.label), "update",
                                           f"Change the {rec.target_label or 'draft'} order to {rec.order.text}",
                                           request))
        elif rec.target and rec.replace_target:
            # No update at Epic or Oracle Health: the draft is removed and the new order created, two
            # suggestions of one action each (Epic applies one action per suggestion), both
            # pre-selected so that the correction is taken whole.
            what = rec.target_label or "draft"
            suggestions.append(_suggestion(f"Remove the {what} order", "delete",
                                           f"Remove the {what} order (replaced by {rec.order.text})",
                                           resource_id=rec.target, recommended=True))
            suggestions.append(_suggestion(_label(f"Order instead: {rec.order.label}", rec.order.label), "create",
                                           f"Order {rec.order.text} instead of the {what} order{set_dose}",
                                           request, recommended=True))
        else:
            verb = "Order instead" if rec.target else "Order"
            suggestions.append(_suggestion(_label(f"{verb}: {rec.order.label}", rec.order.label), "create",
                                           f"{verb} {rec.order.text}{set_dose}", request,
                                           recommended=not rec.target))
    return suggestions


def _offered(suggestions: list[dict], ehr: str) -> list[dict]:
    """The suggestions whose every action the EHR kind applies (EHR_ACTIONS)."""
    allowed = EHR_ACTIONS[ehr]
    if allowed is None:
        return suggestions

    def kind(action: dict) -> str:
        return action["resource"]["resourceType"] if "resource" in action else action["resourceId"].split("/", 1)[0]

    return [s for s in suggestions if all((kind(a), a["type"]) in allowed for a in s["actions"])]


def _dose_line(recs: Iterable[Recommendation], ehr: str) -> list[str]:
    """At Epic, where a suggested order opens with the site's default dose: the doses, in the card."""
    doses = [rec.order.label for rec in recs if rec.order is not None and rec.order.dose_mg is not None]
    if ehr != "epic" or not doses:
        return []
    return ["- Suggested orders open with the site's default dose: set " + "; ".join(doses) + "."]


# ---- Cards ---------------------------------------------------------------------------------------

def is_normal(assessment: Assessment) -> bool:
    """No CRS, no ICANS, every source read and no pitfall: nothing to say (decisions.md 8)."""
    grades = [g for g in (assessment.crs, assessment.icans) if g.value is not None]
    return (bool(grades) and all(g.value == 0 and not g.at_least for g in grades)
            and not assessment.unreadable and not assessment.recommendations
            and all(f.code == "no-icans-assessment" for g in grades for f in g.flags))


def assessment_cards(assessment: Assessment, terminology: Terminology, quiet_when_normal: bool = True,
                     protocol_url: str | None = None, ehr: str = "generic") -> list[dict]:
    """The patient-view cards: one assessment card, plus one card per pitfall that fired. Quiet
    when normal: no card, or one short card asking for an ICANS assessment when none is recent.
    ``ehr`` (a site's EHR kind) decides which suggestion actions are offered (EHR_ACTIONS)."""
    if not assessment.in_scope:
        return []
    main = card_templates()[ASSESSMENT]
    if quiet_when_normal and is_normal(assessment):
        missing = [f for g in (assessment.crs, assessment.icans) for f in g.flags if f.code == "no-icans-assessment"]
        if not missing:
            return []
        crs = assessment.crs.text if assessment.crs.value is not None else "CRS not graded"
        return [_card(main, f"{crs}; no ICANS assessment in the last 12 h: assess ICE (CAPD under 12)", "info",
                      missing[0].text, [], _links(main, [], protocol_url))]
    shown = [r for r in assessment.recommendations if r.topic in main.recommendation_topics]
    seen: set[str] = set()
    detail = (_grade_markdown(assessment.crs, assessment) + _grade_markdown(assessment.icans, assessment)
              + _missing_line(assessment))
    lines = [line for rec in shown for line in [_recommendation_line(rec, seen)] if line]
    # Background (work-up, monitoring) on one line (decisions.md 8).
    background = [line for line in lines if line.startswith(("- **Infection**", "- **Also**"))]
    if len(background) == 2:
        merged = background[0].rstrip(".") + "; " + background[1].split("**: ", 1)[1]
        lines = [line for line in lines if line not in background] + [merged.replace("**Infection**", "**Also**")]
    lines += _dose_line(shown, ehr)
    if lines:
        detail += ["", *lines]
    detail += ["", _main_footer(assessment, shown, protocol_url)]
    suggestions = _order_suggestions(shown, assessment, terminology, ehr)
    for grade, code, profile in ((assessment.crs, "crs-grade", "crs-grade-observation"),
                                 (assessment.icans, "icans-grade", "icans-grade-observation")):
        if grade.value and not grade.at_least:  # never "record grade 0" (decisions.md 8)
            suggestions.append(_suggestion(f"Record {grade.text}", "create", f"Record {grade.text} as an Observation",
                                           grade_observation(grade, code, profile, assessment)))
    indicator = max((r.indicator for r in shown), key=["info", "warning", "critical"].index, default="info")
    cards = [_card(main, headline(assessment), indicator, "\n".join(detail), _offered(suggestions, ehr),
                   _links(main, shown, protocol_url))]
    cards += finding_cards([r for r in assessment.recommendations if r not in shown], assessment, terminology,
                           protocol_url, seen, ehr)
    return cards


def add_app_link(cards: list[dict], url: str, app_context: str | None = None) -> None:
    """The SMART timeline app as a ``smart`` link on the assessment card (the EHR adds iss and
    launch); ``app_context``, for EHRs that pass it to the app, names the episode the card graded."""
    topic = card_templates()[ASSESSMENT].topic["code"]
    link = {"label": "CRS/ICANS timeline", "url": url, "type": "smart"}
    if app_context:
        link["appContext"] = app_context
    for card in cards:
        if card["source"]["topic"]["code"] == topic:
            card.setdefault("links", []).append(dict(link))


def finding_cards(recs: Iterable[Recommendation], assessment: Assessment, terminology: Terminology,
                  protocol_url: str | None = None, seen: set[str] | None = None,
                  ehr: str = "generic") -> list[dict]:
    """One card per pitfall or order-check finding, holding only that pitfall (nothing the other
    cards of the answer already say)."""
    seen = set() if seen is None else seen
    cards = []
    for rec in recs:
        template = template_for_topic(rec.topic)
        details = [d for d in rec.detail if _norm(d) not in seen]
        seen.update(_norm(d) for d in details)
        detail = [f"- {d}" for d in details] + _dose_line([rec], ehr) + ["", _sources_line([rec], protocol_url)]
        cards.append(_card(template, rec.title, rec.indicator, "\n".join(detail),
                           _offered(_order_suggestions([rec], assessment, terminology, ehr), ehr),
                           _links(template, [rec], protocol_url)))
    return cards
