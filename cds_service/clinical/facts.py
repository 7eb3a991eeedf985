"""From FHIR resources to facts: the mapping of what EHRs send to the ASTCT inputs.

Resources are plain R4 JSON dicts. Only the ones that matter (by code or name) are validated with
fhir.resources, which is what keeps a chart with thousands of Observations fast. A relevant
resource that cannot be read becomes an ``Unreadable`` entry, never a silent gap.
"""
from __future__ import annotations

import hashlib
import marshal
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Protocol as Interface

from pydantic import ValidationError

from ..terminology import IEC_TOXICITY, LOINC, SNOMED, Terminology, codeable_codes, codeable_texts
from .fhir_read import (
    UnreadableValue,
    effective_interval,
    medication_concept,
    parse_date,
    quantity_in,
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
]
# ICANS domains have no LOINC: they are coded in the project's CodeSystem.
ICANS_CODES = {
    "ice-score": "ice",
    "capd-score": "capd",
    "consciousness": "consciousness",
    "seizure": "seizure",
    "motor-weakness": "motor_weakness",
    "cerebral-edema": "cerebral_edema",
}
# Coded ICANS answers are recognised by these ValueSets; the protocol maps each answer to a grade.
ICANS_ANSWER_VALUESETS = {"consciousness": "icans-consciousness-levels", "seizure": "icans-seizure-findings",
                          "cerebral_edema": "icans-cerebral-edema-findings"}
KIND_PRIORITY = {kind: rank for rank, kind in enumerate([k for k, _ in OBSERVATION_VALUESETS] + list(ICANS_CODES.values()))}
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
# fhir.resources checks a code's shape, not its value set: statuses are checked here.
OBSERVATION_STATUSES = {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                        "entered-in-error", "unknown"}
ADMINISTRATION_STATUSES = {"in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped",
                           "unknown"}


def _fhir_models():
    # Imported lazily: fhir.resources costs ~0.3 s to import and only relevant resources need it.
    from fhir.resources.R4B.medicationadministration import MedicationAdministration
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient

    return {"Observation": Observation, "MedicationAdministration": MedicationAdministration,
            "Patient": Patient}


class Horizon(Interface):
    def admits(self, kind: str, start: datetime, end: datetime) -> bool: ...


class _VersionMemo:
    """A pure function's results by resource version, for the same chart comes back on every chart
    open. A FHIR version is immutable: type, id, versionId and lastUpdated name its content on one
    server; the subject and effective time are in the key too, so that two EHRs' resources that
    share an id and version ("Observation/1", version "1") are never taken for each other, and the
    status, so that a server that edits a resource in place without a new version cannot hide an
    Observation entered in error or cancelled.
    ``by_content``: a resource without them is keyed by a hash of its content (``content_hash``,
    worth it only when the function costs more); ``by_version=False``: every resource is.
    Bounded: past ``size`` entries the older half is dropped."""

    def __init__(self, size: int, by_content: bool, by_version: bool = True):
        self.size = size
        self.by_content = by_content
        self.by_version = by_version
        self.results: dict[object, object] = {}
        self.lock = threading.Lock()

    def key(self, resource: Mapping):
        meta = resource.get("meta")
        if (self.by_version and isinstance(meta, dict) and meta.get("versionId") and meta.get("lastUpdated")
                and resource.get("id")):
            subject, period = resource.get("subject"), resource.get("effectivePeriod")
            key = (resource.get("resourceType"), resource["id"], meta["versionId"], meta["lastUpdated"],
                   resource.get("status"), subject.get("reference") if isinstance(subject, dict) else None,
                   resource.get("effectiveDateTime") or resource.get("effectiveInstant")
                   or ((period.get("start"), period.get("end")) if isinstance(period, dict) else None))
        elif self.by_content:
            return content_hash(resource)
        else:
            return None
        try:
            hash(key)  # a version tuple of malformed values (a dict as the id) is no key
        except TypeError:
            return None
        return key

    def __call__(self, resource: Mapping, compute: Callable):
        try:
            key = self.key(resource)
        except (TypeError, ValueError, RecursionError):  # content that cannot be hashed
            key = None
        if key is None:
            return compute(resource)
        found = self.results.get(key, _MISSING)
        if found is not _MISSING:
            return found
        result = compute(resource)
        self.results[key] = result
        if len(self.results) > self.size:
            with self.lock:
                for old in list(self.results)[:len(self.results) - self.size // 2]:
                    self.results.pop(old, None)
        return result


_MISSING = object()


def content_hash(resource: Mapping) -> bytes:
    """A digest of a parsed JSON value that differs whenever its content does. marshal writes the
    values exactly (True is not 1, 1 is not 1.0) in ~5 us for a MedicationAdministration, against
    ~15 us for a JSON encoding. Format 2: later formats write back-references that depend on how
    many references to a string exist elsewhere, so the same content could hash apart. Equal
    content in another key order gives another digest, which only costs a miss. Raises
    ValueError for what JSON does not hold."""
    return hashlib.blake2b(marshal.dumps(resource, 2), digest_size=16).digest()


_validation_memo = _VersionMemo(size=50_000, by_content=True)


def _validate(resource: Mapping) -> str | None:
    model = _fhir_models().get(resource.get("resourceType"))
    if model is None:
        return None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"invalid FHIR {resource.get('resourceType')}: {where}: {first.get('msg')}"
    except (TypeError, ValueError) as exc:
        return f"invalid FHIR {resource.get('resourceType')}: {exc}"
    return None


def validation_error(resource: Mapping) -> str | None:
    """None if the resource is valid FHIR (R4B model), else a one-line reason."""
    return _validation_memo(resource, _validate)


@lru_cache(maxsize=8)
def _readout_memo(terminology: Terminology) -> _VersionMemo:
    """Observation readouts by version, per terminology (a site's ValueSets change what is read).
    About 0.65 KB each: 20,000 (~13 MB a worker) hold the windows of some fifteen ICU charts; past
    that, a readout is made again (~12 us, the validation memo still holding)."""
    return _VersionMemo(size=20_000, by_content=False)


@lru_cache(maxsize=8)
def _administration_memo(terminology: Terminology) -> _VersionMemo:
    """MedicationAdministration readouts by content, never by version alone: they decide whether
    the patient is in scope at all, a drug corrected in place under the same version must be read
    as corrected, and they are few (a hash ~5 us against ~20 us for the readout)."""
    return content_memo(size=5_000)


def content_memo(size: int) -> _VersionMemo:
    """A bounded memo of a pure function of one JSON object, keyed by a hash of its content."""
    return _VersionMemo(size=size, by_content=True, by_version=False)


# An administration's validity by its content too, like its readout: one edited in place into
# invalid FHIR under the same version must be reported, not taken as valid from before.
_administration_validation = content_memo(size=5_000)


@dataclass(frozen=True)
class AdministrationReadout:
    """One MedicationAdministration as read, remembered by its content: the drug, its times and
    dose when it counts (``timing`` None: not a drug the rules read, a status that never counts,
    or ``problem``). Till when an open infusion runs depends on ``now``, so that is decided per
    call."""

    timing: tuple[datetime, datetime | None] | None = None
    agent: str = ""
    categories: frozenset[str] = frozenset()
    status: str = "unknown"
    reference: str = ""
    label: str = ""
    dose_mg: float | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ObservationContent:
    """What an Observation inside the horizon says: its readings, or why it does not count."""

    ignored: bool = False             # its status says it never counts
    problem: str | None = None        # the whole resource cannot be read
    readings: tuple[Reading, ...] = ()
    unreadable: tuple[Unreadable, ...] = ()


@dataclass
class ObservationReadout:
    """One Observation version as read, whenever it is read. Its kinds and time come first and are
    cheap; its content (FHIR validation, values: ~0.2 ms) is read only once some call's horizon
    admits it, then kept. Whether it counts (the horizon, ``now``) is decided per call."""

    horizon_kinds: tuple[str, ...]
    parsed: tuple[datetime, datetime | None] | None  # the effective time; None when it cannot be read
    content: ObservationContent | None = None


@lru_cache(maxsize=8)
def observation_code_index(terminology: Terminology) -> dict[tuple[str, str], str]:
    """(system, code) -> observation kind, built once per terminology (first ValueSet wins)."""
    index: dict[tuple[str, str], str] = {}
    for kind, valueset in reversed(OBSERVATION_VALUESETS):
        index.update(dict.fromkeys(terminology[valueset].codes, kind))
    index.update({(IEC_TOXICITY, code): kind for code, kind in ICANS_CODES.items()})
    return index


class FactExtractor:
    def __init__(self, terminology: Terminology, protocol: Protocol, now: datetime):
        self.terms = terminology
        self.protocol = protocol
        self.now = now
        self.facts = Facts()
        self.medications: dict[str, Mapping] = {}
        self.code_index = observation_code_index(terminology)
        self.horizon: Horizon | None = None

    # ---- entry point -------------------------------------------------------------------------
    def extract(self, resources: Iterable[Mapping], horizon_for: Callable[[Facts], Horizon | None] | None = None) -> Facts:
        """Patient and MedicationAdministrations first; then, when ``horizon_for`` is given, the
        Observations it admits (none when it returns None: the patient is out of scope), so a long
        chart costs only what the rules will look at."""
        resources = [r for r in resources if isinstance(r, dict)]
        self.medications = {resource_key(r): r for r in resources if r.get("resourceType") == "Medication"}
        for resource in resources:
            kind = resource.get("resourceType")
            if kind == "MedicationAdministration":
                self._administration(resource)
            elif kind == "Patient" and self.facts.patient_id is None:
                self._patient(resource)
        self.horizon = horizon_for(self.facts) if horizon_for else None
        if horizon_for is not None and self.horizon is None:
            return self.facts
        for resource in resources:
            if resource.get("resourceType") == "Observation":
                self._observation(resource)
        return self.facts

    def _worth_reading(self, timing: tuple | None, kinds: tuple[str, ...]) -> bool:
        """Inside the horizon of at least one of its kinds (an unparseable time is read, to be reported)."""
        if self.horizon is None or timing is None:
            return True
        start, end = timing
        return any(self.horizon.admits(kind, start, end or start) for kind in kinds)

    def _unreadable(self, resource: Mapping, reason: str) -> None:
        self.facts.unreadable.append(self._unreadable_entry(resource, reason))

    @staticmethod
    def _unreadable_entry(resource: Mapping, reason: str) -> Unreadable:
        return Unreadable(resource_key(resource), reason, resource.get("resourceType", "?"))

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

    def _observation(self, obs: Mapping) -> None:
        readout = _readout_memo(self.terms)(obs, self._observation_readout)
        if readout is None or not self._worth_reading(readout.parsed, readout.horizon_kinds):
            return
        if readout.content is None:
            readout.content = self._observation_content(obs)
        content = readout.content
        if content.ignored:
            return
        if content.problem:
            self._unreadable(obs, content.problem)
            return
        if readout.parsed[0] > self.now:
            return  # documented in the future relative to the assessment: not yet a fact
        self.facts.readings.extend(content.readings)
        self.facts.unreadable.extend(content.unreadable)

    def _observation_kinds(self, obs: Mapping) -> tuple[str | None, list[tuple[str, Mapping]]]:
        """The Observation's kind (by its code) and its components' kinds, with the components."""
        kind = self._observation_kind(obs.get("code"))
        components = [c for c in obs.get("component") or [] if isinstance(c, dict)]
        component_kinds = [(self._component_kind(c.get("code")), c) for c in components]
        return kind, [(k, c) for k, c in component_kinds if k]

    def _observation_readout(self, obs: Mapping) -> ObservationReadout | None:
        """Kinds and time; None when it is none of the kinds the rules read."""
        kind, component_kinds = self._observation_kinds(obs)
        if kind is None and not component_kinds:
            return None
        kinds = ([kind] if kind and kind != "bp_panel" else []) + [k for k, _ in component_kinds]
        try:
            parsed = effective_interval(obs)
        except UnreadableValue:
            parsed = None  # read in full, to be reported
        return ObservationReadout(tuple(kinds or [kind]), parsed)

    def _observation_content(self, obs: Mapping) -> ObservationContent:
        status = obs.get("status")
        if isinstance(status, str) and status in IGNORED_OBSERVATION_STATUSES:
            return ObservationContent(ignored=True)
        problem = validation_error(obs) or _status_problem(obs, OBSERVATION_STATUSES)
        if problem:
            return ObservationContent(problem=problem)
        try:
            start, end = effective_interval(obs)
        except UnreadableValue as exc:
            return ObservationContent(problem=str(exc))
        end = end or start
        # Read again, not kept from the readout: nothing remembered may hold on to a request's dicts.
        kind, component_kinds = self._observation_kinds(obs)
        readings, unreadable = [], []
        if kind == "bp_panel" and not any(k in ("sbp", "map") for k, _ in component_kinds):
            unreadable.append(self._unreadable_entry(obs, "blood pressure panel without a systolic component"))
        elif kind and kind != "bp_panel":
            component_kinds.insert(0, (kind, obs))
        for reading_kind, holder in component_kinds:
            if holder.get("dataAbsentReason") is not None:
                continue  # the EHR says why there is no value: nothing was measured
            try:
                value, label, flow_decides = self._value(reading_kind, holder)
            except UnreadableValue as exc:
                unreadable.append(self._unreadable_entry(obs, f"{reading_kind.replace('_', ' ')}: {exc}"))
                continue
            readings.append(Reading(reading_kind, value, start, end, resource_key(obs), label, flow_decides))
        return ObservationContent(readings=tuple(readings), unreadable=tuple(unreadable))

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
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score) or score < 0:
                raise UnreadableValue(f"score must be a whole number, got {score!r}")
            return int(score), f"{kind.upper()} score {int(score)}", False
        if kind == "motor_weakness":
            present = holder.get("valueBoolean")
            if not isinstance(present, bool):
                raise UnreadableValue("motor weakness needs valueBoolean")
            return present, "deep focal motor weakness" if present else "no focal motor weakness", False
        # consciousness, seizure, cerebral_edema: coded answers from the project CodeSystem
        answers = self.terms[ICANS_ANSWER_VALUESETS[kind]]
        for system, code in codeable_codes(holder.get("valueCodeableConcept")):
            if (system, code) in answers.codes:
                return code, f"{_human(kind)}: {code.replace('-', ' ')}", False
        raise UnreadableValue(f"answer must be a code of ValueSet {answers.id}")

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
    def _administration(self, admin: Mapping) -> None:
        if isinstance(admin.get("medicationReference"), dict):
            readout = self._administration_readout(admin)  # the Medication it points to is in this request
        else:
            readout = _administration_memo(self.terms)(admin, self._administration_readout)
        if readout.problem:
            self._unreadable(admin, readout.problem)
        if readout.timing is None:
            return  # not a drug the rules read, a status that never counts, or unreadable
        start, end = readout.timing
        if end is None:
            # An open period is running now only while in progress; otherwise it counts at its start.
            end = max(start, self.now) if readout.status == "in-progress" else start
        if readout.status == "stopped" and end < start:
            return  # stopped before it started
        self.facts.drugs.append(DrugEvent(readout.agent, readout.categories, start, end, readout.status,
                                          readout.reference, readout.label, readout.dose_mg))

    def _administration_readout(self, admin: Mapping) -> AdministrationReadout:
        codeable, texts = medication_concept(admin, self.medications)
        categories = self.terms.categories(MEDICATION_VALUESETS, codeable, texts)
        if not categories:
            unresolved = codeable is None and not texts
            return AdministrationReadout(problem="medication could not be resolved" if unresolved else None)
        status = admin.get("status")
        if isinstance(status, str) and status in IGNORED_ADMINISTRATION_STATUSES:
            return AdministrationReadout()  # any other status is checked below
        problem = _administration_validation(admin, _validate) or _status_problem(admin, ADMINISTRATION_STATUSES)
        if problem:
            return AdministrationReadout(problem=problem)
        try:
            timing = effective_interval(admin)
        except UnreadableValue as exc:
            return AdministrationReadout(problem=str(exc))
        agent = next(iter(categories.values()))
        dose_mg = None
        dosage = admin.get("dosage")
        dose = dosage.get("dose") if isinstance(dosage, dict) else None
        if dose is not None:
            try:
                dose_mg = quantity_in(dose, "mg")
            except UnreadableValue:
                dose_mg = None  # a dose in mL or units does not stop the drug from counting
        label = agent + (f" {dose_mg:g} mg" if dose_mg is not None else "")
        return AdministrationReadout(timing, agent, frozenset(categories), status, resource_key(admin), label, dose_mg)


def _status_problem(resource: Mapping, allowed: set[str]) -> str | None:
    status = resource.get("status")
    if isinstance(status, str) and status in allowed:
        return None
    return f"status {repr(status)[:60]} is not a {resource.get('resourceType')} status"


def _human(kind: str) -> str:
    return {"sbp": "systolic BP", "map": "MAP", "o2_flow": "O2 flow", "crp": "CRP", "cerebral_edema": "cerebral edema"}.get(
        kind, kind.replace("_", " "))


def extract_facts(resources: Iterable[Mapping], now: datetime, terminology: Terminology,
                  protocol: Protocol, horizon_for: Callable[[Facts], Horizon | None] | None = None) -> Facts:
    return FactExtractor(terminology, protocol, now).extract(resources, horizon_for)
