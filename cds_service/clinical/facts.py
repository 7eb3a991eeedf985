"""From FHIR resources to facts: the mapping of what EHRs send to the ASTCT inputs.

Resources are plain R4 JSON dicts, read strictly for what the rules need and nothing else
(decisions.md section 10): a reading is unreadable only when a value a rule reads (code, value,
unit, status, time, device, drug, dose, rate) is missing or malformed. Elements no rule reads,
even ones R4 does not have (an STU3 ``context`` on an Observation), are noted, never a reason to
drop a reading. A relevant resource that cannot be read becomes an ``Unreadable`` entry, never a
silent gap. Nothing is remembered between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Protocol as Interface

from ..terminology import LOINC, SNOMED, Terminology, codeable_codes, codeable_texts
from .fhir_read import (
    UnreadableValue,
    effective_interval,
    effective_without_zone,
    finite_number,
    medication_concept,
    parse_date,
    parse_datetime,
    quantity_in,
    referenced_medication,
    resource_key,
)
from .model import DrugEvent, Facts, Reading, Unreadable
from .protocol import Protocol

# Observation kinds recognised by ValueSet, in the order they are tried (most specific first).
OBSERVATION_VALUESETS = [
    ("map", "mean-arterial-pressure"),
    ("sbp", "systolic-blood-pressure"),
    ("temperature", "body-temperature"),
    ("o2_flow", "oxygen-flow-rate"),
    ("o2_device", "oxygen-delivery-method"),
    ("weight", "body-weight"),
    ("ferritin", "ferritin"),
    ("crp", "c-reactive-protein"),
    ("bp_panel", "blood-pressure-panel"),
    # ICANS domains have no LOINC: the project's CodeSystem codes them, and a site adds its rows.
    ("ice", "icans-ice-score"),
    ("capd", "icans-capd-score"),
    ("consciousness", "icans-consciousness"),
    ("seizure", "icans-seizure"),
    ("motor_weakness", "icans-motor-weakness"),
    ("cerebral_edema", "icans-cerebral-edema"),
]
ICANS_KINDS = ("ice", "capd", "consciousness", "seizure", "motor_weakness", "cerebral_edema")
# Coded ICANS answers are recognised by these ValueSets (a site's answer codes join them); each
# code stands for one of the project's answers, which the protocol maps to a grade.
ICANS_ANSWER_VALUESETS = {"consciousness": "icans-consciousness-levels", "seizure": "icans-seizure-findings",
                          "cerebral_edema": "icans-cerebral-edema-findings"}
KIND_PRIORITY = {kind: rank for rank, (kind, _) in enumerate(OBSERVATION_VALUESETS)}
COMPONENT_KINDS = {"sbp", "map", "o2_flow"}  # read from Observation.component (BP panel, pulse oximetry)
QUANTITY_UNITS = {"temperature": "Cel", "sbp": "mmHg", "map": "mmHg", "o2_flow": "L/min", "weight": "kg",
                  "ferritin": "ng/mL", "crp": "mg/L"}
LABEL_UNITS = {"temperature": "°C", "sbp": "mmHg", "map": "mmHg", "o2_flow": "L/min", "weight": "kg",
               "ferritin": "ng/mL", "crp": "mg/L"}
# Medication categories (ValueSet ids) a MedicationAdministration may fall in.
MEDICATION_VALUESETS = (
    "iec-therapies", "car-t-products", "t-cell-engagers", "car-t-early-steroid-products",
    "tocilizumab", "anti-cytokine-therapies", "systemic-corticosteroids", "antipyretics",
    "vasopressors", "vasopressin", "inotropes", "gm-csf", "g-csf", "sedatives",
)
# Oxygen devices by ASTCT tier; the highest tier a device name matches wins.
DEVICE_TIERS = [
    (4, "oxygen-device-positive-pressure"),
    (3, "oxygen-device-high-flow"),
    (2, "oxygen-device-low-flow"),
    (0, "oxygen-device-room-air"),
]
STANDARD_SYSTEMS = {LOINC, SNOMED}
IGNORED_OBSERVATION_STATUSES = {"entered-in-error", "cancelled", "registered"}
IGNORED_ADMINISTRATION_STATUSES = {"entered-in-error", "not-done"}
OBSERVATION_STATUSES = {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                        "entered-in-error", "unknown"}
ADMINISTRATION_STATUSES = {"in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped",
                           "unknown"}


class Horizon(Interface):
    def admits(self, kind: str, start: datetime, end: datetime) -> bool: ...


# The R4 elements of the resources read; any other top-level element is noted and ignored.
R4_ELEMENTS = {
    "Observation": frozenset((
        "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
        "modifierExtension", "identifier", "basedOn", "partOf", "status", "category", "code", "subject",
        "focus", "encounter", "effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant",
        "issued", "performer", "valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean",
        "valueInteger", "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime",
        "valuePeriod", "dataAbsentReason", "interpretation", "note", "bodySite", "method", "specimen",
        "device", "referenceRange", "hasMember", "derivedFrom", "component")),
    "MedicationAdministration": frozenset((
        "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
        "modifierExtension", "identifier", "instantiates", "partOf", "status", "statusReason", "category",
        "medicationCodeableConcept", "medicationReference", "subject", "context", "supportingInformation",
        "effectiveDateTime", "effectivePeriod", "performer", "reasonCode", "reasonReference", "request",
        "device", "note", "dosage", "eventHistory")),
}


def unique_resources(resources: Iterable[Mapping]) -> tuple[list[Mapping], int]:
    """Each resource once (decisions.md 10: overlapping pages, a key and its ``_include``): by type
    and id, the newest version kept (``meta.lastUpdated``, else the first seen). Resources without
    an id are all kept. Returns the resources and how many copies were dropped."""
    chosen: dict[tuple[str, str], Mapping] = {}
    out: list[Mapping | tuple[str, str]] = []
    dropped = 0
    for resource in resources:
        if not isinstance(resource, dict):
            continue
        identity = resource.get("id")
        if not isinstance(identity, str) or not identity:
            out.append(resource)
            continue
        key = (str(resource.get("resourceType")), identity)
        if key not in chosen:
            chosen[key] = resource
            out.append(key)
            continue
        dropped += 1
        if _last_updated(resource) > _last_updated(chosen[key]):
            chosen[key] = resource
    return [chosen[item] if isinstance(item, tuple) else item for item in out], dropped


_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def _last_updated(resource: Mapping) -> datetime:
    meta = resource.get("meta")
    try:
        return parse_datetime(meta.get("lastUpdated")) if isinstance(meta, dict) else _EPOCH
    except UnreadableValue:
        return _EPOCH


@dataclass(frozen=True)
class _Administration:
    """One MedicationAdministration as read: the drug, its times, dose and infusion rate."""

    agent: str
    categories: frozenset[str]
    start: datetime
    end: datetime | None
    status: str
    reference: str
    label: str
    dose_mg: float | None
    rate: float | None     # dosage.rate[x], when charted
    instant: bool          # effectiveDateTime: one moment, not a period

    def event(self, start: datetime, end: datetime) -> DrugEvent:
        return DrugEvent(self.agent, self.categories, start, end, self.status, self.reference, self.label,
                         self.dose_mg)


@lru_cache(maxsize=64)
def observation_code_index(terminology: Terminology) -> dict[tuple[str, str], str]:
    """(system, code) -> observation kind, built once per terminology (first ValueSet wins)."""
    index: dict[tuple[str, str], str] = {}
    for kind, valueset in reversed(OBSERVATION_VALUESETS):
        index.update(dict.fromkeys(terminology[valueset].codes, kind))
    return index


class FactExtractor:
    def __init__(self, terminology: Terminology, protocol: Protocol, now: datetime, zone: tzinfo = timezone.utc):
        self.terms = terminology
        self.protocol = protocol
        self.now = now
        self.zone = zone
        self.facts = Facts()
        self.medications: dict[str, Mapping] = {}
        self.code_index = observation_code_index(terminology)
        self.horizon: Horizon | None = None

    # ---- entry point -------------------------------------------------------------------------
    def extract(self, resources: Iterable[Mapping], horizon_for: Callable[[Facts], Horizon | None] | None = None) -> Facts:
        """Patient and MedicationAdministrations first; then, when ``horizon_for`` is given, the
        Observations it admits (none when it returns None: the patient is out of scope), so a long
        chart costs only what the rules will look at."""
        resources, self.facts.duplicates = unique_resources(resources)
        self.medications = {resource_key(r): r for r in resources if r.get("resourceType") == "Medication"}
        administrations = []
        for resource in resources:
            kind = resource.get("resourceType")
            if kind == "MedicationAdministration":
                administration = self._administration(resource)
                if administration is not None:
                    administrations.append(administration)
            elif kind == "Patient" and self.facts.patient_id is None:
                self._patient(resource)
        self.facts.drugs.extend(self._drug_events(administrations))
        self.horizon = horizon_for(self.facts) if horizon_for else None
        if horizon_for is not None and self.horizon is None:
            return self.facts
        for resource in resources:
            if resource.get("resourceType") == "Observation":
                self._observation(resource)
        return self.facts

    def _unreadable(self, resource: Mapping, reason: str) -> None:
        self.facts.unreadable.append(self._unreadable_entry(resource, reason))

    @staticmethod
    def _unreadable_entry(resource: Mapping, reason: str) -> Unreadable:
        return Unreadable(resource_key(resource), reason, resource.get("resourceType", "?"))

    def _problem_in_shape(self, resource: Mapping) -> str | None:
        """What of a relevant resource's shape stops it from being read: an extension that changes
        its meaning, or a status outside R4's. Elements R4 does not have are noted, not fatal."""
        kind = resource.get("resourceType")
        unknown = [key for key in resource if key not in R4_ELEMENTS[kind] and not key.startswith("_")]
        for key in unknown:
            self.facts.note_ignored(f"{kind}.{key}"[:80])
        if resource.get("modifierExtension"):
            return "has a modifierExtension, which may change its meaning"
        statuses = OBSERVATION_STATUSES if kind == "Observation" else ADMINISTRATION_STATUSES
        return _status_problem(resource, statuses)

    def _time(self, resource: Mapping) -> tuple[datetime, datetime | None]:
        """effective[x], a time written without a zone read in the site's zone and noted."""
        interval = effective_interval(resource, self.zone)
        if effective_without_zone(resource):
            self.facts.zoneless.append(resource_key(resource))
        return interval

    # ---- Patient -----------------------------------------------------------------------------
    def _patient(self, patient: Mapping) -> None:
        self.facts.patient_id = patient.get("id")
        if patient.get("birthDate"):
            try:
                self.facts.birth_date = parse_date(patient["birthDate"])
            except UnreadableValue as exc:
                self._unreadable(patient, f"birthDate: {exc}")

    # ---- Observations ------------------------------------------------------------------------
    def _observation_kind(self, code: Mapping | None) -> str | None:
        codes = codeable_codes(code)
        kinds = [self.code_index[c] for c in codes if c in self.code_index]
        if kinds:
            return min(kinds, key=KIND_PRIORITY.__getitem__)
        if any(system in STANDARD_SYSTEMS for system, _ in codes):
            return None  # a standard code that is not one of ours: another concept, not a name match
        for kind, valueset in OBSERVATION_VALUESETS:
            if self.terms[valueset].agent_for_text(codeable_texts(code)):
                return kind
        return None

    def _observation_kinds(self, obs: Mapping) -> tuple[str | None, list[tuple[str, Mapping]]]:
        """The Observation's kind (by its code) and its components' kinds, with the components."""
        kind = self._observation_kind(obs.get("code"))
        components = obs.get("component")
        components = [c for c in components if isinstance(c, dict)] if isinstance(components, list) else []
        component_kinds = [(self._component_kind(c.get("code")), c) for c in components]
        return kind, [(k, c) for k, c in component_kinds if k]

    def _observation(self, obs: Mapping) -> None:
        """An Observation of a kind the rules read, inside the horizon of one of its kinds: its
        readings, or why it cannot be read. Statuses entered-in-error, cancelled and registered
        never count; preliminary, final, amended, corrected and unknown do."""
        kind, component_kinds = self._observation_kinds(obs)
        if kind is None and not component_kinds:
            return
        status = obs.get("status")
        if isinstance(status, str) and status in IGNORED_OBSERVATION_STATUSES:
            return
        try:
            start, end = effective_interval(obs, self.zone)
        except UnreadableValue as exc:
            self._unreadable(obs, str(exc))  # no time: it cannot be placed in or out of a window
            return
        end = end or start
        kinds = ([kind] if kind and kind != "bp_panel" else []) + [k for k, _ in component_kinds]
        if self.horizon is not None and not any(self.horizon.admits(k, start, end) for k in kinds or [kind]):
            return
        if start > self.now:
            return  # documented in the future relative to the assessment: not yet a fact
        problem = self._problem_in_shape(obs)
        if problem:
            self._unreadable(obs, problem)
            return
        if effective_without_zone(obs):
            self.facts.zoneless.append(resource_key(obs))
        if kind == "bp_panel" and not any(k in ("sbp", "map") for k, _ in component_kinds):
            self._unreadable(obs, "blood pressure panel without a systolic component")
        elif kind and kind != "bp_panel":
            component_kinds.insert(0, (kind, obs))
        for reading_kind, holder in component_kinds:
            if holder.get("dataAbsentReason") is not None:
                continue  # the EHR says why there is no value: nothing was measured
            try:
                value, label, flow_decides = self._value(reading_kind, holder)
            except UnreadableValue as exc:
                self._unreadable(obs, f"{reading_kind.replace('_', ' ')}: {exc}")
                continue
            self.facts.readings.append(Reading(reading_kind, value, start, end, resource_key(obs), label,
                                               flow_decides))

    def _component_kind(self, code: Mapping | None) -> str | None:
        kinds = {self.code_index.get(c) for c in codeable_codes(code)} & COMPONENT_KINDS
        return min(kinds, key=KIND_PRIORITY.__getitem__) if kinds else None

    def _value(self, kind: str, holder: Mapping) -> tuple[object, str, bool]:
        if kind in QUANTITY_UNITS:
            value = round(quantity_in(holder.get("valueQuantity"), QUANTITY_UNITS[kind]), 2)
            return value, f"{_human(kind)} {value:g} {LABEL_UNITS[kind]}", False
        if kind == "o2_device":
            return self._device(holder)
        if kind in ("ice", "capd"):
            score = holder.get("valueInteger")
            if score is None and isinstance(holder.get("valueQuantity"), dict):
                score = holder["valueQuantity"].get("value")
            number = finite_number(score, "score")
            if number != int(number) or number < 0:
                raise UnreadableValue(f"score must be a whole number, got {str(score)[:20]!r}")
            return int(number), f"{kind.upper()} score {int(number)}", False
        if kind == "motor_weakness":
            present = holder.get("valueBoolean")
            if not isinstance(present, bool):
                raise UnreadableValue("motor weakness needs valueBoolean")
            return present, "deep focal motor weakness" if present else "no focal motor weakness", False
        # consciousness, seizure, cerebral_edema: coded answers from the project CodeSystem
        answers = self.terms[ICANS_ANSWER_VALUESETS[kind]]
        answer = answers.agent_for_code(codeable_codes(holder.get("valueCodeableConcept")))
        if answer is None:
            raise UnreadableValue(f"answer must be a code of ValueSet {answers.id}")
        return answer, f"{_human(kind)}: {answer.replace('-', ' ')}", False

    def _device(self, holder: Mapping) -> tuple[int, str, bool]:
        codeable = holder.get("valueCodeableConcept")
        texts = [holder["valueString"]] if isinstance(holder.get("valueString"), str) else []
        names = [*codeable_texts(codeable), *texts]
        # Codes decide before names: a code's display ("Blow by oxygen mask") may contain another
        # tier's name ("oxygen mask").
        for by_code in (True, False):
            for tier, valueset in DEVICE_TIERS:
                concept = self.terms[valueset]
                found = (concept.agent_for_code(codeable_codes(codeable)) if by_code
                         else concept.agent_for_text(names))
                if found:
                    cannula = self.terms["oxygen-device-nasal-cannula"]
                    is_cannula = (cannula.agent_for_code(codeable_codes(codeable)) if by_code
                                  else cannula.agent_for_text(names)) is not None
                    return tier, f"oxygen device: {names[0] if names else found}", is_cannula and tier in (2, 3)
        raise UnreadableValue(f"oxygen device not recognised: {names or codeable_codes(codeable)}")

    # ---- MedicationAdministrations -----------------------------------------------------------
    def _administration(self, admin: Mapping) -> _Administration | None:
        """A MedicationAdministration of a drug the rules read, in a status that counts; None
        otherwise, or when it cannot be read (then it is listed as unreadable)."""
        codeable, texts = medication_concept(admin, self.medications)
        categories = self.terms.categories(MEDICATION_VALUESETS, codeable, texts)
        if not categories:
            if codeable is None and not texts:
                missing = referenced_medication(admin)
                self._unreadable(admin, f"its medication ({missing}) could not be read" if missing
                                 else "its medication could not be resolved")
            return None
        status = admin.get("status")
        if isinstance(status, str) and status in IGNORED_ADMINISTRATION_STATUSES:
            return None
        try:
            problem = self._problem_in_shape(admin)
            if problem:
                raise UnreadableValue(problem)
            start, end = self._time(admin)
            dosage = admin.get("dosage")
            if dosage is not None and not isinstance(dosage, dict):
                raise UnreadableValue("dosage is not an object")
            rate, dose_mg = _rate(dosage), _dose_mg(dosage)
        except UnreadableValue as exc:
            self._unreadable(admin, str(exc))
            return None
        agent = next(iter(categories.values()))
        label = agent + (f" {dose_mg:g} mg" if dose_mg is not None else "")
        return _Administration(agent, frozenset(categories), start, end, status, resource_key(admin), label,
                               dose_mg, rate, "effectiveDateTime" in admin)

    def _drug_events(self, administrations: list[_Administration]) -> list[DrugEvent]:
        """When each drug ran. A period runs from start to end; an open one runs until now only
        while in progress, otherwise it counts at its start. Infusions charted as events (one
        moment and a rate each) are joined into runs (``_infusion_runs``)."""
        events: list[DrugEvent] = []
        infusion_events: dict[str, list[_Administration]] = {}
        for given in administrations:
            if given.instant and given.rate is not None:
                infusion_events.setdefault(given.agent, []).append(given)
                continue
            end = given.end
            if end is None:
                end = max(given.start, self.now) if given.status == "in-progress" else given.start
            if given.status == "stopped" and end < given.start:
                continue  # stopped before it started
            events.append(given.event(given.start, end))
        for charted in infusion_events.values():
            events.extend(self._infusion_runs(sorted(charted, key=lambda a: a.start)))
        return events

    def _infusion_runs(self, charted: list[_Administration]) -> list[DrugEvent]:
        """When an infusion is charted as events of one drug (begin bag, rate changes), then an
        event with a rate above zero starts or continues it, and it runs until the next event with
        rate 0 or status stopped or on-hold, or at most ``infusion_carry_hours`` after the last
        event (and not past now).  Source: decisions.md 10."""
        carry = timedelta(hours=self.protocol["infusion_carry_hours"])
        runs: list[DrugEvent] = []
        first: _Administration | None = None
        for event in charted:
            ends = event.rate <= 0 or event.status in ("stopped", "on-hold")
            if first is not None and ends:
                runs.append(first.event(first.start, event.start))
                first = None
            elif first is None and not ends:
                first = event
        if first is not None:
            last = charted[-1].start
            runs.append(first.event(first.start, max(first.start, min(last + carry, self.now))))
        return runs


def _dose_mg(dosage: dict | None) -> float | None:
    """dosage.dose in mg; None when not charted or in another unit (mL, units: the drug still
    counts). A dose that is not a Quantity with a number is unreadable."""
    dose = dosage.get("dose") if dosage else None
    if dose is None:
        return None
    if not isinstance(dose, dict):
        raise UnreadableValue("dosage.dose is not a Quantity")
    finite_number(dose.get("value"), "dosage.dose")
    try:
        return quantity_in(dose, "mg")
    except UnreadableValue:
        return None


def _rate(dosage: dict | None) -> float | None:
    """dosage.rate[x] as a number (its unit does not matter: only whether it is above zero)."""
    if not isinstance(dosage, dict):
        return None
    if "rateQuantity" in dosage:
        quantity = dosage["rateQuantity"]
        return finite_number(quantity.get("value") if isinstance(quantity, dict) else None, "dosage rate")
    if "rateRatio" in dosage:
        ratio = dosage["rateRatio"]
        numerator = ratio.get("numerator") if isinstance(ratio, dict) else None
        return finite_number(numerator.get("value") if isinstance(numerator, dict) else None, "dosage rate")
    return None


def _status_problem(resource: Mapping, allowed: set[str]) -> str | None:
    status = resource.get("status")
    if isinstance(status, str) and status in allowed:
        return None
    return f"status {repr(status)[:60]} is not a {resource.get('resourceType')} status"


def _human(kind: str) -> str:
    return {"sbp": "systolic BP", "map": "MAP", "o2_flow": "O2 flow", "crp": "CRP", "cerebral_edema": "cerebral edema"}.get(
        kind, kind.replace("_", " "))


def extract_facts(resources: Iterable[Mapping], now: datetime, terminology: Terminology,
                  protocol: Protocol, horizon_for: Callable[[Facts], Horizon | None] | None = None,
                  zone: tzinfo = timezone.utc) -> Facts:
    return FactExtractor(terminology, protocol, now, zone).extract(resources, horizon_for)
