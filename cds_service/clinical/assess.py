"""One patient, one moment: FHIR resources in, CRS and ICANS grades with recommendations out."""
from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from typing import Iterable, Mapping

from ..terminology import Terminology, load_terminology
from .crs import grade_crs
from .facts import extract_facts
from .icans import grade_icans
from .model import Assessment, Facts, Flag, Grade, Unreadable, clock
from .protocol import Protocol, default_protocol
from .recommend import recommend
from .scope import Situation, age_on, find_episode, observation_horizon


def _not_graded(syndrome: str, reason: str) -> Grade:
    return Grade(syndrome, None, reason, "crs-cds protocol: scope")


def assess(resources: Iterable[Mapping], now: datetime, protocol: Protocol | None = None,
           terminology: Terminology | None = None, unread_sources: Iterable[Unreadable] = (),
           grade: bool = True, zone: tzinfo = timezone.utc) -> Assessment:
    """Grade a patient from their FHIR resources at ``now`` (timezone-aware).

    ``unread_sources`` lists whole sources the caller could not read (a failed fetch, an
    OperationOutcome in a prefetch key): grades become "at least N" and name them.
    ``zone``: the site's time zone, in which times written without one are read (and flagged).
    ``grade=False`` only tells whether, and since when, the patient is in scope (no Observation is
    read; both grades are None), for callers that need no more. The cards give times in ``zone``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    protocol = protocol or default_protocol()
    terminology = terminology or load_terminology()
    def horizon_for(facts):
        episode = find_episode(facts, now, protocol)
        return observation_horizon(protocol, episode, now) if episode and grade else None

    facts = extract_facts(resources, now, terminology, protocol, horizon_for, zone)
    facts.unreadable.extend(unread_sources)
    reading = facts.reading_notes()
    episode = find_episode(facts, now, protocol)
    if episode is None:
        medication_unread = _medication_unread(facts)
        reason = "IEC therapy history could not be read" if medication_unread else no_iec_therapy_reason(protocol)
        return Assessment(now, protocol.label, False, reason, _not_graded("CRS", reason),
                          _not_graded("ICANS", reason), facts.patient_id, unreadable=facts.unreadable,
                          assessable=not medication_unread, reading=reading)
    latest = episode.latest
    scope_reason = f"{latest.agent} {clock(latest.start, zone, now)} (day {(now - episode.start).days})"
    if not grade:
        reason = "not graded: no check needed the grades"
        return Assessment(now, protocol.label, True, scope_reason, _not_graded("CRS", reason),
                          _not_graded("ICANS", reason), facts.patient_id, latest.evidence(f"{latest.agent} given"),
                          unreadable=facts.unreadable, iec_car_t="car-t-products" in latest.categories,
                          reading=reading, tz=zone)
    situation = Situation(facts, now, protocol, episode, age_on(facts.birth_date, now), zone)
    icans = grade_icans(situation) if episode.icans_in_scope else _not_graded("ICANS", "outside the ICANS window")
    if episode.crs_in_scope:
        crs = grade_crs(situation, icans.value)
    else:
        crs = _not_graded("CRS", f"more than {protocol['scope']['crs_risk_window_days']} days since the IEC therapy")
    for grade in (crs, icans):
        if grade.value is not None and facts.unreadable:
            grade.at_least = True
            grade.missing = [f"{u.reference}: {u.reason}" for u in facts.unreadable]
    graded = next((g for g in (crs, icans) if g.value is not None), None)
    if graded is not None and facts.zoneless:
        graded.flags.append(zoneless_flag(facts, zone))
    return Assessment(now, protocol.label, True, scope_reason, crs, icans, facts.patient_id,
                      latest.evidence(f"{latest.agent} given"), recommend(situation, crs, icans), facts.unreadable,
                      iec_car_t="car-t-products" in latest.categories, situation=situation, reading=reading,
                      tz=zone)


def out_of_scope_reason(administrations: Iterable[Mapping], now: datetime, protocol: Protocol,
                        terminology: Terminology) -> str | None:
    """Why the patient is out of scope, told from their MedicationAdministrations alone (the
    cheap first look at a chart); None when in scope, or when the medication history cannot be
    read: then only ``assess`` can answer."""
    facts = extract_facts(administrations, now, terminology, protocol, horizon_for=_no_observations)
    if find_episode(facts, now, protocol) is not None or _medication_unread(facts):
        return None
    return no_iec_therapy_reason(protocol)


def never_in_scope(administrations: Iterable[Mapping], now: datetime, protocol: Protocol,
                   terminology: Terminology) -> bool:
    """Out of scope whatever the time: no administration of an IEC therapy in an in-scope status,
    ever, and every administration readable. The answer depends on the administrations' content,
    the terminology and the protocol's in-scope statuses alone (``now`` only ends open infusions
    here), so a caller may remember it by them."""
    facts = extract_facts(administrations, now, terminology, protocol, horizon_for=_no_observations)
    statuses = protocol["scope"]["in_scope_statuses"]
    return not _medication_unread(facts) and not any(d.status in statuses for d in facts.drugs_in("iec-therapies"))


def zoneless_flag(facts: Facts, zone: tzinfo) -> Flag:
    """Times written without a zone were read in the site's: say so, once (decisions.md 10)."""
    shown = ", ".join(sorted(set(facts.zoneless))[:3]) + (" and others" if len(set(facts.zoneless)) > 3 else "")
    return Flag("time-without-zone", f"times charted without a time zone were read as {zone} ({shown})")


def _no_observations(facts) -> None:
    return None


def _medication_unread(facts) -> bool:
    return any(u.source == "MedicationAdministration" for u in facts.unreadable)


def no_iec_therapy_reason(protocol: Protocol) -> str:
    return f"no IEC therapy in the last {protocol['scope']['icans_risk_window_days']} days"
