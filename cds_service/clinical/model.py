"""The clinical core's value types: facts read from FHIR, grades with evidence, recommendations."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone, tzinfo
from typing import Any

INDICATOR_RANK = {"info": 0, "warning": 1, "critical": 2}


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def clock(moment: datetime, tz: tzinfo | None = None, now: datetime | None = None) -> str:
    """A time as a clinician reads it, in the site's time zone with its abbreviation: "14:05 CET"
    on the day of ``now``, "04 Dec 14:05 CET" on another day."""
    local = moment.astimezone(tz or timezone.utc)
    if now is not None and now.astimezone(tz or timezone.utc).date() == local.date():
        return local.strftime("%H:%M %Z")
    return local.strftime("%d %b %H:%M %Z")


@dataclass(frozen=True)
class Evidence:
    """One fact that decided something: which resource, what it said, when."""

    reference: str
    text: str
    time: datetime | None = None
    when: str = "at"  # how the time reads: "temperature 39.4 °C at ...", "norepinephrine running since ..."

    @property
    def sentence(self) -> str:
        return self.phrase()

    def phrase(self, tz: tzinfo | None = None, now: datetime | None = None) -> str:
        """What and when, in words: "temperature 39.4 °C at 14:05 CET"."""
        return f"{self.text} {self.when} {clock(self.time, tz, now)}" if self.time else self.text

    def to_json(self) -> dict:
        out = {"reference": self.reference, "text": self.text}
        if self.time:
            out["time"] = iso(self.time)
        return out


@dataclass(frozen=True)
class Reading:
    """A value taken from an Observation (or one of its components).

    ``kind`` is one of: temperature (Cel), sbp (mmHg), o2_flow (L/min), o2_device (ASTCT tier),
    weight (kg), ferritin (ng/mL), crp (mg/L), ice, capd, consciousness, seizure,
    motor_weakness, cerebral_edema.
    """

    kind: str
    value: Any
    start: datetime
    end: datetime
    reference: str
    label: str
    flow_decides: bool = False  # oxygen devices: a nasal cannula, whose tier the flow decides

    @property
    def time(self) -> datetime:
        return self.end

    def evidence(self, text: str | None = None) -> Evidence:
        return Evidence(self.reference, text or self.label, self.end)


@dataclass(frozen=True)
class DrugEvent:
    """A MedicationAdministration: which agent, its value-set categories, when it ran."""

    agent: str
    categories: frozenset[str]
    start: datetime
    end: datetime
    status: str
    reference: str
    label: str
    dose_mg: float | None = None

    def running_at(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end

    def evidence(self, text: str | None = None, when: str = "at") -> Evidence:
        return Evidence(self.reference, text or self.label, self.start, when)


@dataclass(frozen=True)
class Unreadable:
    """A resource or a whole source that could not be read. Never silently dropped."""

    reference: str
    reason: str
    source: str  # "Observation", "MedicationAdministration", "Patient"

    def to_json(self) -> dict:
        return {"reference": self.reference, "reason": self.reason, "source": self.source}


@dataclass
class Facts:
    patient_id: str | None = None
    birth_date: date | None = None
    readings: list[Reading] = field(default_factory=list)
    drugs: list[DrugEvent] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    # How the chart was read, for the call log and the card: copies dropped, resources whose times
    # had no zone (read in the site's), elements no rule reads that R4 does not have either.
    duplicates: int = 0
    zoneless: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def reading_notes(self) -> dict:
        """What the call log says of the reading: copies dropped, times without a zone, elements
        ignored (only those that occurred)."""
        notes = {"duplicates": self.duplicates, "timesWithoutZone": len(set(self.zoneless)),
                 "ignoredElements": dict(self.ignored)}
        return {name: value for name, value in notes.items() if value}

    def note_ignored(self, element: str) -> None:
        self.ignored[element] = self.ignored.get(element, 0) + 1

    def of_kind(self, kind: str) -> list[Reading]:
        return [r for r in self.readings if r.kind == kind]

    def drugs_in(self, category: str) -> list[DrugEvent]:
        return [d for d in self.drugs if category in d.categories]

    def unreadable_sources(self) -> list[str]:
        return sorted({u.source for u in self.unreadable})


@dataclass(frozen=True)
class Flag:
    """Something the clinician must review, raised by a rule; it does not change the grade."""

    code: str
    text: str
    evidence: tuple[Evidence, ...] = ()

    def to_json(self) -> dict:
        out: dict = {"code": self.code, "text": self.text}
        if self.evidence:
            out["evidence"] = [e.to_json() for e in self.evidence]
        return out


@dataclass
class Grade:
    """A CRS or ICANS grade: the value, the rule that decided it and the facts behind it.

    ``value`` None means not assessable or out of scope (``reason`` says why). ``at_least`` means a
    source could not be read, so the true grade may be higher.
    """

    syndrome: str
    value: int | None
    reason: str
    rule: str
    window: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    at_least: bool = False
    missing: list[str] = field(default_factory=list)
    components: dict[str, int] = field(default_factory=dict)  # CRS: hypotension and hypoxia tiers

    @property
    def text(self) -> str:
        """"CRS grade 2"; "No CRS" rather than grade 0 (decisions.md 8); "at least N" when a source was
        not read (decisions.md 7)."""
        if self.value is None:
            return f"{self.syndrome} not graded"
        if self.value == 0 and not self.at_least:
            return f"No {self.syndrome}"
        prefix = "at least " if self.at_least else ""
        return f"{self.syndrome} grade {prefix}{self.value}"

    def to_json(self) -> dict:
        out: dict = {"grade": self.value, "text": self.text, "reason": self.reason, "rule": self.rule}
        if self.window:
            out["window"] = self.window
        out["atLeast"] = self.at_least
        if self.missing:
            out["missing"] = self.missing
        out["evidence"] = [e.to_json() for e in self.evidence]
        out["flags"] = [f.to_json() for f in self.flags]
        return out


@dataclass(frozen=True)
class MedicationOrder:
    """A concrete order the protocol recommends (rendered as a MedicationRequest suggestion)."""

    agent: str
    dose_mg: float | None
    route: str
    every_hours: int | None
    text: str
    duration_days: int | None = None  # a bounded order: how many days it runs

    @property
    def label(self) -> str:
        """Drug and dose, short enough for a suggestion button."""
        dose = f" {self.dose_mg:g} mg" if self.dose_mg is not None else ""
        every = f" q{self.every_hours}h" if self.every_hours else ""
        days = f" x {self.duration_days} days" if self.duration_days else ""
        return f"{self.agent}{dose} {self.route.split(' ')[0]}{every}{days}"

    def to_json(self) -> dict:
        out: dict = {"agent": self.agent, "route": self.route, "text": self.text}
        if self.dose_mg is not None:
            out["doseMg"] = self.dose_mg
        if self.every_hours:
            out["everyHours"] = self.every_hours
        if self.duration_days:
            out["durationDays"] = self.duration_days
        return out


@dataclass
class Recommendation:
    """One piece of advice: management for a grade, a dose, or a pitfall rule that fired."""

    topic: str
    indicator: str
    title: str
    detail: list[str]
    source: str
    order: MedicationOrder | None = None
    evidence: list[Evidence] = field(default_factory=list)
    target: str | None = None      # order checks: the draft order this advice is about
    remove_target: bool = False    # order checks: suggest removing that draft order
    replace_target: bool = False   # order checks: ``order`` replaces the draft order (corrected dose)
    target_label: str | None = None  # order checks: the draft order in words ("tocilizumab 900 mg")
    links: tuple[dict, ...] = ()   # the literature cited, {"label", "url"}

    def to_json(self) -> dict:
        out: dict = {"topic": self.topic, "indicator": self.indicator, "title": self.title,
                     "detail": self.detail, "source": self.source}
        if self.order:
            out["order"] = self.order.to_json()
        if self.target:
            out["target"] = self.target
            out["removeTarget"] = self.remove_target
            out["replaceTarget"] = self.replace_target
        if self.evidence:
            out["evidence"] = [e.to_json() for e in self.evidence]
        if self.links:
            out["links"] = [dict(link) for link in self.links]
        return out


@dataclass
class Assessment:
    now: datetime
    protocol: str
    in_scope: bool
    scope_reason: str
    crs: Grade
    icans: Grade
    patient_id: str | None = None
    iec_therapy: Evidence | None = None
    recommendations: list[Recommendation] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    assessable: bool = True  # False: whether the patient is in scope could not be told
    iec_car_t: bool = False  # the latest IEC therapy is a CAR-T product (not a T-cell engager)
    situation: Any = field(default=None, repr=False, compare=False)  # scope.Situation, for order checks
    reading: dict = field(default_factory=dict, compare=False)  # how the chart was read (Facts.reading_notes)
    tz: Any = field(default=None, repr=False, compare=False)  # the site's time zone, for the words

    @property
    def indicator(self) -> str:
        return max((r.indicator for r in self.recommendations), key=INDICATOR_RANK.__getitem__, default="info")

    def recommendation(self, topic: str) -> Recommendation | None:
        return next((r for r in self.recommendations if r.topic == topic), None)

    def to_json(self) -> dict:
        out: dict = {
            "now": iso(self.now),
            "protocol": self.protocol,
            "inScope": self.in_scope,
            "assessable": self.assessable,
            "scopeReason": self.scope_reason,
            "crs": self.crs.to_json(),
            "icans": self.icans.to_json(),
            "indicator": self.indicator,
            "recommendations": [r.to_json() for r in self.recommendations],
            "unreadable": [u.to_json() for u in self.unreadable],
        }
        if self.patient_id:
            out["patientId"] = self.patient_id
        if self.iec_therapy:
            out["iecTherapy"] = self.iec_therapy.to_json()
        return out
