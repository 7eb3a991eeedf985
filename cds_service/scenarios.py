"""The scenario library: clinical vignettes as FHIR R4 resources, each with the grades it must get.

Every scenario builds its chart relative to ``now`` (``now - 3 h``), so it never goes stale: the same
scenario is graded the same today and next year. Each has its own Patient (id = the scenario name)
and resource ids prefixed with that name, so all scenarios can be loaded into one FHIR server side
by side (``Scenario.bundle(now)`` is a transaction Bundle of PUTs).

Expected values follow the clinical decisions (decisions.md, then reference.md sections 1-2 and 5),
not the engine: a scenario whose expectation the engine does not meet is an engine bug, not a
scenario to bend.

Codes are taken from the project's own ValueSets and CodeSystem in ``fhir_profiles/`` (a code not in
them raises at import), plus the few LOINC codes reference.md section 4a verifies that no ValueSet
needs (diastolic BP, SpO2, FiO2). Drugs without a verified RxNorm code are sent as text only, as
real EHR feeds often do.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Callable

from .paths import shipped_dir
from .terminology import IEC_TOXICITY, LOINC, UCUM

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
LOCAL_FORMULARY = "http://hospital.example.org/fhir/CodeSystem/formulary"
# Stable namespace for urn:uuid fullUrls (uuid5 of scenario name + Type/id).
_UUID_NAMESPACE = uuid.UUID("6f1f3a52-3c2e-5b8e-9a40-7c2d9e1b0c11")

# LOINC codes no ValueSet holds (reference.md 4a: verified in US Core).
_DIASTOLIC = (LOINC, "8462-4", "Diastolic blood pressure")
_SPO2 = (LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry")
_SAO2 = (LOINC, "2708-6", "Oxygen saturation in Arterial blood")


# ---- Codes, read from fhir_profiles/ -----------------------------------------------------------------

@lru_cache(maxsize=None)
def _profile(filename: str) -> dict:
    return json.loads((shipped_dir("fhir_profiles") / filename).read_text(encoding="utf-8"))


def _vs_coding(valueset: str, code: str) -> dict:
    """The coding for ``code`` as ValueSet-``valueset``.json lists it (system and display)."""
    for include in _profile(f"ValueSet-{valueset}.json").get("compose", {}).get("include", []):
        for concept in include.get("concept", []):
            if concept["code"] == code:
                return {"system": include["system"], "code": code, "display": concept["display"]}
    raise KeyError(f"code {code!r} is not in ValueSet {valueset}")


def _iec_coding(code: str) -> dict:
    """A coding from the project CodeSystem iec-toxicity (ICANS domains and answers)."""
    for concept in _profile("CodeSystem-iec-toxicity.json")["concept"]:
        if concept["code"] == code:
            return {"system": IEC_TOXICITY, "code": code, "display": concept["display"]}
    raise KeyError(f"code {code!r} is not in CodeSystem iec-toxicity")


def _concept(coding: dict | None, text: str) -> dict:
    return {"coding": [coding], "text": text} if coding else {"text": text}


def _quantity(value: float, unit: str, code: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


# ---- Drugs ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drug:
    """How a drug arrives: its display text and, where the ValueSet has a verified RxNorm code, that code."""

    text: str
    valueset: str | None = None
    rxnorm: str | None = None
    local_code: tuple[str, str] | None = None  # (code, display) in a hospital formulary system

    def concept(self) -> dict:
        codings = []
        if self.rxnorm:
            codings.append(_vs_coding(self.valueset, self.rxnorm))
        if self.local_code:
            codings.append({"system": LOCAL_FORMULARY, "code": self.local_code[0], "display": self.local_code[1]})
        return {"coding": codings, "text": self.text} if codings else {"text": self.text}


# IEC therapies: no verified RxNorm codes for CAR-T products or most bispecifics (reference.md 4c).
YESCARTA = Drug("Yescarta (axicabtagene ciloleucel) suspension for IV infusion")
YESCARTA_LOCAL = Drug("axicabtagene ciloleucel", local_code=("CART-0012", "AXICABTAGENE CILOLEUCEL IV SUSP"))
KYMRIAH = Drug("Kymriah (tisagenlecleucel)")
TECARTUS = Drug("Tecartus (brexucabtagene autoleucel)")
CARVYKTI = Drug("Carvykti (ciltacabtagene autoleucel)")
ABECMA = Drug("Abecma (idecabtagene vicleucel)")
BREYANZI = Drug("Breyanzi (lisocabtagene maraleucel)")
TECLISTAMAB = Drug("teclistamab-cqyv")
# Treatments and vasoactive drugs, with the ValueSets' verified RxNorm ingredient codes.
TOCILIZUMAB = Drug("Actemra (tocilizumab) IV", "tocilizumab", "612865")
DEXAMETHASONE = Drug("dexamethasone sodium phosphate injection", "systemic-corticosteroids", "3264")
DEXAMETHASONE_PO = Drug("dexamethasone tablet", "systemic-corticosteroids", "3264")
ACETAMINOPHEN = Drug("acetaminophen tablet", "antipyretics", "161")
DIPHENHYDRAMINE = Drug("diphenhydramine")
NOREPINEPHRINE = Drug("norepinephrine in dextrose 5% infusion", "vasopressors", "7512")
PHENYLEPHRINE = Drug("phenylephrine in sodium chloride 0.9% infusion", "vasopressors", "8163")
VASOPRESSIN = Drug("vasopressin in sodium chloride 0.9% infusion", "vasopressin", "11149")
PROPOFOL = Drug("propofol infusion")

# Oxygen devices (SNOMED, from the oxygen-device ValueSets) and the text a flowsheet shows.
NASAL_CANNULA = ("oxygen-device-low-flow", "336623009", "Nasal cannula")
BLOW_BY = ("oxygen-device-low-flow", "425478008", "Blow-by O2")
HFNC = ("oxygen-device-high-flow", "426854004", "High-flow nasal cannula (HFNC)")
NON_REBREATHER = ("oxygen-device-high-flow", "427591007", "Non-rebreather mask")
BIPAP_MASK = ("oxygen-device-positive-pressure", "706226000", "BiPAP via full face mask")
VENTILATOR = ("oxygen-device-positive-pressure", "449071006", "Mechanical ventilator (ETT)")
ROOM_AIR = (None, None, "Room air")  # the room-air ValueSet matches by name only
CPAP = ("oxygen-device-positive-pressure", "47545007", "CPAP (home machine)")


# ---- The chart builder -----------------------------------------------------------------------------------

def _birth_date(today: date, years: int, extra_days: int = 150) -> date:
    """A birth date making the patient ``years`` old today, well clear of a birthday."""
    anchor = today - timedelta(days=extra_days)
    try:
        return anchor.replace(year=anchor.year - years)
    except ValueError:  # 29 February in a non-leap year
        return anchor.replace(year=anchor.year - years, day=28)


class Chart:
    """One patient's chart, written as a clinical vignette: each method adds one resource.

    Ids are ``{scenario}-{kind}{n}`` (``crs3-norepi-vaso-temp1``), numbered in the order the vignette
    adds them, so they are stable. Times are given as ``hours_ago`` (or ``days_ago``) from ``now``.
    """

    def __init__(self, name: str, now: datetime, family: str, given: str, gender: str, age: int,
                 tz: timezone = timezone.utc):
        self.name, self.now, self.tz = name, now, tz
        self.subject = {"reference": f"Patient/{name}", "display": f"{given} {family}"}
        self._counts: dict[str, int] = {}
        self.resources: list[dict] = [{
            "resourceType": "Patient",
            "id": name,
            "identifier": [{"system": "http://hospital.example.org/fhir/mrn", "value": f"MRN-{name}"}],
            "active": True,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "gender": gender,
            "birthDate": _birth_date(now.date(), age).isoformat(),
        }]

    # -- plumbing --
    def _id(self, kind: str) -> str:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        return f"{self.name}-{kind}{self._counts[kind]}"

    def _at(self, hours_ago: float = 0, days_ago: float = 0) -> str:
        moment = (self.now - timedelta(days=days_ago, hours=hours_ago)).astimezone(self.tz).replace(microsecond=0)
        return moment.isoformat().replace("+00:00", "Z")

    def _observation(self, kind: str, category: str, code: dict, when: str, **value) -> dict:
        obs = {
            "resourceType": "Observation",
            "id": self._id(kind),
            "status": "final",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category,
                                      "display": category.replace("-", " ").title()}]}],
            "code": code,
            "subject": self.subject,
            "effectiveDateTime": when,
            **value,
        }
        self.resources.append(obs)
        return obs

    def _loinc(self, valueset: str, code: str, text: str | None = None) -> dict:
        coding = _vs_coding(valueset, code)
        return _concept(coding, text or coding["display"])

    # -- vital signs --
    def weight(self, kg: float, days_ago: float) -> None:
        self._observation("weight", "vital-signs", self._loinc("body-weight", "29463-7"), self._at(days_ago=days_ago),
                          valueQuantity=_quantity(kg, "kg", "kg"))

    def temp(self, value: float, hours_ago: float, fahrenheit: bool = False) -> None:
        unit = _quantity(value, "°F", "[degF]") if fahrenheit else _quantity(value, "°C", "Cel")
        self._observation("temp", "vital-signs", self._loinc("body-temperature", "8310-5"), self._at(hours_ago),
                          valueQuantity=unit)

    def bp(self, systolic: int, diastolic: int, hours_ago: float) -> None:
        """Blood pressure as US Core sends it: the 85354-9 panel with systolic/diastolic components."""
        def component(coding: dict, value: int) -> dict:
            return {"code": _concept(coding, coding["display"]), "valueQuantity": _quantity(value, "mmHg", "mm[Hg]")}
        system, code, display = _DIASTOLIC
        self._observation("bp", "vital-signs", self._loinc("blood-pressure-panel", "85354-9", "Blood pressure"),
                          self._at(hours_ago),
                          component=[component(_vs_coding("systolic-blood-pressure", "8480-6"), systolic),
                                     component({"system": system, "code": code, "display": display}, diastolic)])

    def mean_bp(self, mmhg: int, hours_ago: float) -> None:
        """A documented mean arterial pressure (LOINC 8478-0), as a monitor charts it."""
        self._observation("map", "vital-signs", self._loinc("mean-arterial-pressure", "8478-0", "MAP"),
                          self._at(hours_ago), valueQuantity=_quantity(mmhg, "mmHg", "mm[Hg]"))

    def o2_device(self, device: tuple, hours_ago: float) -> None:
        """Method of oxygen delivery (LOINC 107117-4) with a SNOMED device from the ValueSets."""
        valueset, code, text = device
        value = _concept(_vs_coding(valueset, code) if code else None, text)
        self._observation("o2device", "vital-signs", self._loinc("oxygen-delivery-method", "107117-4"),
                          self._at(hours_ago), valueCodeableConcept=value)

    def o2_flow(self, l_per_min: float, hours_ago: float) -> None:
        """Inhaled oxygen flow rate as its own Observation (LOINC 3151-8)."""
        self._observation("o2flow", "vital-signs", self._loinc("oxygen-flow-rate", "3151-8"), self._at(hours_ago),
                          valueQuantity=_quantity(l_per_min, "L/min", "L/min"))

    def spo2(self, percent: int, hours_ago: float, flow: float | None = None) -> None:
        """Pulse oximetry (59408-5 + 2708-6), with the O2 flow as a component as US Core allows."""
        code = {"coding": [dict(zip(("system", "code", "display"), c)) for c in (_SPO2, _SAO2)],
                "text": "SpO2"}
        extra = {}
        if flow is not None:
            flow_code = self._loinc("oxygen-flow-rate", "3151-8")
            extra["component"] = [{"code": flow_code, "valueQuantity": _quantity(flow, "L/min", "L/min")}]
        self._observation("spo2", "vital-signs", code, self._at(hours_ago),
                          valueQuantity=_quantity(percent, "%", "%"), **extra)

    # -- laboratory --
    def ferritin(self, ng_per_ml: float, hours_ago: float) -> None:
        self._observation("ferritin", "laboratory", self._loinc("ferritin", "2276-4", "Ferritin"), self._at(hours_ago),
                          valueQuantity=_quantity(ng_per_ml, "ng/mL", "ng/mL"))

    def crp(self, mg_per_l: float, hours_ago: float) -> None:
        self._observation("crp", "laboratory", self._loinc("c-reactive-protein", "1988-5", "CRP"), self._at(hours_ago),
                          valueQuantity=_quantity(mg_per_l, "mg/L", "mg/L"))

    # -- ICANS assessments (project CodeSystem iec-toxicity) --
    def _icans(self, kind: str, category: str, code: str, hours_ago: float, **value) -> None:
        coding = _iec_coding(code)
        self._observation(kind, category, _concept(coding, coding["display"]), self._at(hours_ago), **value)

    def ice(self, score: int, hours_ago: float) -> None:
        self._icans("ice", "survey", "ice-score", hours_ago, valueInteger=score)

    def ice_not_performed(self, hours_ago: float) -> None:
        """The ICE score could not be done (the patient cannot take part): no value, a reason."""
        self._icans("ice", "survey", "ice-score", hours_ago,
                    dataAbsentReason={"coding": [{"system": DATA_ABSENT_REASON, "code": "not-performed",
                                                  "display": "Not Performed"}],
                                      "text": "Unable to perform ICE: patient unarousable"})

    def capd(self, score: int, hours_ago: float) -> None:
        self._icans("capd", "survey", "capd-score", hours_ago, valueInteger=score)

    def _answer(self, kind: str, category: str, question: str, answer: str, hours_ago: float) -> None:
        coding = _iec_coding(answer)
        self._icans(kind, category, question, hours_ago, valueCodeableConcept=_concept(coding, coding["display"]))

    def consciousness(self, answer: str, hours_ago: float) -> None:
        self._answer("loc", "exam", "consciousness", answer, hours_ago)

    def seizure(self, answer: str, hours_ago: float) -> None:
        self._answer("seizure", "exam", "seizure", answer, hours_ago)

    def cerebral_edema(self, answer: str, hours_ago: float) -> None:
        self._answer("edema", "imaging", "cerebral-edema", answer, hours_ago)

    def motor_weakness(self, present: bool, hours_ago: float) -> None:
        self._icans("motor", "exam", "motor-weakness", hours_ago, valueBoolean=present)

    # -- medication administrations --
    def _administration(self, kind: str, drug: Drug, status: str, timing: dict, dosage: dict,
                        contained: bool = False) -> dict:
        admin = {"resourceType": "MedicationAdministration", "id": self._id(kind), "status": status}
        if contained:
            admin["contained"] = [{"resourceType": "Medication", "id": "med", "code": drug.concept()}]
            admin["medicationReference"] = {"reference": "#med", "display": drug.text}
        else:
            admin["medicationCodeableConcept"] = drug.concept()
        admin.update({"subject": self.subject, **timing, "dosage": dosage})
        self.resources.append(admin)
        return admin

    def iec(self, drug: Drug, days_ago: float, status: str = "completed", contained: bool = False,
            dose: str = "single IV infusion of the CAR-positive viable T cells", route: str = "IV",
            dose_mg: float | None = None) -> dict:
        """The IEC therapy: a CAR-T infusion over 30 minutes (effectivePeriod) or a bispecific injection."""
        if route == "IV":
            start = self._at(days_ago=days_ago, hours_ago=0.5)
            timing = {"effectivePeriod": {"start": start, "end": self._at(days_ago=days_ago)}}
        else:
            timing = {"effectiveDateTime": self._at(days_ago=days_ago)}
        dosage = {"text": dose, "route": {"text": route}}
        if dose_mg is not None:
            dosage["dose"] = _quantity(dose_mg, "mg", "mg")
        return self._administration("iec", drug, status, timing, dosage, contained)

    def give(self, drug: Drug, hours_ago: float, dose_mg: float, route: str = "IV") -> None:
        """A bolus or short infusion, charted at one instant (effectiveDateTime)."""
        self._administration("med", drug, "completed", {"effectiveDateTime": self._at(hours_ago)},
                             {"route": {"text": route}, "dose": _quantity(dose_mg, "mg", "mg")})

    def infusion(self, drug: Drug, started_hours_ago: float, rate: tuple[float, str],
                 stopped_hours_ago: float | None = None) -> None:
        """A continuous infusion over effectivePeriod; still running (in-progress, no end) unless stopped."""
        period = {"start": self._at(started_hours_ago)}
        if stopped_hours_ago is not None:
            period["end"] = self._at(stopped_hours_ago)
        value, unit = rate
        self._administration("drip", drug, "in-progress" if stopped_hours_ago is None else "completed",
                             {"effectivePeriod": period},
                             {"route": {"text": "IV"}, "rateQuantity": _quantity(value, unit, unit)})

    def infusion_event(self, drug: Drug, hours_ago: float, rate: tuple[float, str], status: str = "completed") -> dict:
        """An infusion charted as events (begin bag, rate change, stop), as some EHRs do: one
        administration at one moment with the rate from then on (0 stops it)."""
        value, unit = rate
        return self._administration("event", drug, status, {"effectiveDateTime": self._at(hours_ago)},
                                    {"route": {"text": "IV"}, "rateQuantity": _quantity(value, unit, unit)})


# ---- The Scenario type ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A clinical vignette and the grades and recommendation topics decisions.md requires for it.

    ``expected_crs`` / ``expected_icans`` None means not graded (out of scope / outside the window).
    """

    name: str
    title: str
    description: str
    expected_crs: int | None
    expected_icans: int | None
    build: Callable[[datetime], list[dict]] = field(repr=False, compare=False)
    expected_topics: frozenset[str] = frozenset()
    absent_topics: frozenset[str] = frozenset()

    def resources(self, now: datetime) -> list[dict]:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return self.build(now)

    def bundle(self, now: datetime, base_url: str | None = None) -> dict:
        """A FHIR R4 transaction Bundle that PUTs every resource at ``{Type}/{id}``.

        ``fullUrl`` is ``{base_url}/{Type}/{id}`` when the server base is given, else a stable
        ``urn:uuid`` (both are absolute, as R4 requires; references inside use ``Type/id``).
        """
        entries = []
        for resource in self.resources(now):
            key = f"{resource['resourceType']}/{resource['id']}"
            full_url = (f"{base_url.rstrip('/')}/{key}" if base_url
                        else f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{self.name}/{key}')}")
            entries.append({"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": key}})
        return {"resourceType": "Bundle", "id": self.name, "type": "transaction", "entry": entries}


def _topics(*names: str) -> frozenset[str]:
    return frozenset(names)


# ---- The vignettes -----------------------------------------------------------------------------------------
# Each builder reads as the chart a clinician would see. Unless a scenario is about a missing weight,
# the patient has a recent weight.

def _no_iec_therapy(now: datetime) -> list[dict]:
    c = Chart("no-iec-therapy", now, "Haddad", "Samir", "male", 67)
    c.weight(84, days_ago=1)
    c.temp(39.1, hours_ago=2)
    c.bp(82, 44, hours_ago=3)
    c.infusion(NOREPINEPHRINE, started_hours_ago=2.5, rate=(0.12, "ug/kg/min"))
    c.o2_device(NASAL_CANNULA, hours_ago=2)
    c.o2_flow(4, hours_ago=2)
    return c.resources


def _car_t_not_done(now: datetime) -> list[dict]:
    c = Chart("car-t-infusion-not-done", now, "Lindqvist", "Maja", "female", 52)
    c.weight(66, days_ago=2)
    admin = c.iec(KYMRIAH, days_ago=2, status="not-done")
    admin["statusReason"] = [{"text": "Infusion deferred: active Gram-negative bacteremia"}]
    c.temp(38.8, hours_ago=3)
    c.bp(96, 58, hours_ago=3)
    return c.resources


def _day45_icans_only(now: datetime) -> list[dict]:
    c = Chart("day45-icans-only", now, "Nakamura", "Kenji", "male", 63)
    c.weight(71, days_ago=3)
    c.iec(CARVYKTI, days_ago=45)
    c.temp(38.3, hours_ago=4)  # day 45: CRS is out of its 30-day window, fever or not
    c.ice(6, hours_ago=1)
    c.consciousness("awakens-to-voice", hours_ago=1)
    return c.resources


def _crs0_afebrile(now: datetime) -> list[dict]:
    c = Chart("crs0-afebrile-day2", now, "Moreau", "Claire", "female", 58)
    c.weight(64, days_ago=2)
    c.iec(KYMRIAH, days_ago=2)
    c.temp(37.9, hours_ago=5)  # 37.9 °C is not fever: ASTCT's threshold is >= 38.0
    c.temp(37.3, hours_ago=1)
    c.bp(118, 72, hours_ago=1)
    c.o2_device(ROOM_AIR, hours_ago=1)
    c.spo2(97, hours_ago=1)
    c.ice(10, hours_ago=2)
    return c.resources


def _crs1_fever(now: datetime) -> list[dict]:
    c = Chart("crs1-fever-day1", now, "Adeyemi", "Tunde", "male", 49)
    c.weight(88, days_ago=1)
    c.iec(YESCARTA_LOCAL, days_ago=1.1)
    c.temp(38.6, hours_ago=1)
    c.give(ACETAMINOPHEN, hours_ago=0.5, dose_mg=650, route="PO")
    c.bp(112, 68, hours_ago=1)
    c.o2_device(ROOM_AIR, hours_ago=1)
    c.spo2(96, hours_ago=1)
    c.ice(10, hours_ago=1)
    return c.resources


def _crs1_teclistamab(now: datetime) -> list[dict]:
    # Times charted in US Central (UTC-05:00 in summer), as many US EHRs send them.
    c = Chart("crs1-teclistamab-cqyv", now, "Whitfield", "Dorothy", "female", 68, tz=timezone(timedelta(hours=-5)))
    c.weight(70, days_ago=2)
    # Label-required premedication, 1 h before step-up dose 1: not a CRS treatment.
    c.give(DEXAMETHASONE_PO, hours_ago=31, dose_mg=16, route="PO")
    c.give(ACETAMINOPHEN, hours_ago=31, dose_mg=650, route="PO")
    c.give(DIPHENHYDRAMINE, hours_ago=31, dose_mg=50, route="PO")
    c.iec(TECLISTAMAB, days_ago=30 / 24, route="SC", dose_mg=4.2, dose="step-up dose 1: 0.06 mg/kg SC")
    c.temp(101.3, hours_ago=2, fahrenheit=True)  # 38.5 °C
    c.bp(124, 78, hours_ago=2)
    c.spo2(97, hours_ago=2)
    c.ice(10, hours_ago=2)
    return c.resources


def _crs2_hypotension(now: datetime) -> list[dict]:
    c = Chart("crs2-hypotension-fluids", now, "Kowalski", "Piotr", "male", 45)
    c.weight(77, days_ago=3)
    c.iec(KYMRIAH, days_ago=3)
    c.temp(38.9, hours_ago=3)
    c.bp(84, 50, hours_ago=2)  # before a 1 L saline bolus
    c.bp(94, 56, hours_ago=0.5)  # after it: responded to fluids, no vasopressor
    c.o2_device(ROOM_AIR, hours_ago=0.5)
    c.ice(10, hours_ago=1)
    return c.resources


def _crs2_nc_6(now: datetime) -> list[dict]:
    c = Chart("crs2-nasal-cannula-6lpm", now, "Oliveira", "Ana", "female", 61)
    c.weight(62, days_ago=2)
    c.iec(BREYANZI, days_ago=4)
    c.temp(38.4, hours_ago=2)
    c.bp(108, 64, hours_ago=1)
    c.o2_device(NASAL_CANNULA, hours_ago=1)
    c.spo2(93, hours_ago=1, flow=6)  # exactly 6 L/min: still low flow
    c.ice(10, hours_ago=1)
    return c.resources


def _crs2_hfnc_4(now: datetime) -> list[dict]:
    c = Chart("crs2-hfnc-device-4lpm", now, "Brennan", "Siobhan", "female", 55)
    c.weight(69, days_ago=1)
    c.iec(YESCARTA, days_ago=3)
    c.temp(38.7, hours_ago=3)
    c.bp(110, 66, hours_ago=2)
    c.o2_device(HFNC, hours_ago=2)  # labelled high-flow, but running at 4 L/min: flow decides
    c.o2_flow(4, hours_ago=2)
    c.ice(10, hours_ago=2)
    return c.resources


def _crs2_child_blow_by(now: datetime) -> list[dict]:
    c = Chart("crs2-child-blow-by", now, "Rossi", "Giulia", "female", 3)
    c.weight(14.5, days_ago=1)
    c.iec(KYMRIAH, days_ago=4)
    c.temp(38.8, hours_ago=2)
    c.bp(92, 54, hours_ago=2)  # normal for a 3-year-old (threshold 76)
    c.o2_device(BLOW_BY, hours_ago=1)
    c.capd(0, hours_ago=2)
    return c.resources


def _crs2_child_sbp80(now: datetime) -> list[dict]:
    c = Chart("crs2-child-6y-sbp80", now, "Haile", "Dawit", "male", 6)
    c.weight(21, days_ago=1)
    c.iec(KYMRIAH, days_ago=4)
    c.temp(38.6, hours_ago=4)
    c.bp(80, 46, hours_ago=2)  # 6 years: hypotension is SBP < 70 + 2 x 6 = 82
    c.o2_device(ROOM_AIR, hours_ago=2)
    c.capd(0, hours_ago=2)
    return c.resources


def _crs2_no_weight(now: datetime) -> list[dict]:
    c = Chart("crs2-no-weight", now, "Castillo", "Ramon", "male", 59)
    c.weight(81, days_ago=40)  # the only weight, from the apheresis visit: too old to dose from
    c.iec(YESCARTA, days_ago=5)
    c.temp(38.5, hours_ago=2)
    c.bp(114, 70, hours_ago=2)
    c.o2_device(NASAL_CANNULA, hours_ago=1)
    c.o2_flow(3, hours_ago=1)
    c.ice(10, hours_ago=2)
    return c.resources


def _crs3_norepi_vaso(now: datetime) -> list[dict]:
    c = Chart("crs3-norepi-vaso", now, "Okafor", "Daniel", "male", 61)
    c.weight(78, days_ago=4)
    c.iec(YESCARTA, days_ago=5)
    c.give(TOCILIZUMAB, hours_ago=14, dose_mg=620)
    c.temp(39.4, hours_ago=2)
    c.bp(78, 42, hours_ago=6)
    c.infusion(NOREPINEPHRINE, started_hours_ago=5, rate=(0.15, "ug/kg/min"))
    c.infusion(VASOPRESSIN, started_hours_ago=3, rate=(0.04, "U/min"))  # vasopressin never adds a count
    c.bp(96, 58, hours_ago=1)
    c.o2_device(NASAL_CANNULA, hours_ago=1)
    c.o2_flow(2, hours_ago=1)
    c.ice(9, hours_ago=2)
    return c.resources


def _crs3_vasopressin_alone(now: datetime) -> list[dict]:
    c = Chart("crs3-vasopressin-alone", now, "Petrov", "Irina", "female", 57)
    c.weight(73, days_ago=2)
    c.iec(ABECMA, days_ago=2)
    c.temp(38.8, hours_ago=3)
    c.bp(84, 48, hours_ago=3)
    c.infusion(VASOPRESSIN, started_hours_ago=2, rate=(0.03, "U/min"))
    c.bp(102, 60, hours_ago=0.5)
    c.ice(10, hours_ago=1)
    return c.resources


def _crs3_fever_masked(now: datetime) -> list[dict]:
    c = Chart("crs3-fever-masked-hfnc", now, "Schmidt", "Jonas", "male", 64)
    c.weight(80, days_ago=3)
    c.iec(YESCARTA, days_ago=3)
    c.temp(39.2, hours_ago=30)  # CRS fever after the CAR-T ...
    c.give(TOCILIZUMAB, hours_ago=28, dose_mg=640)  # ... then tocilizumab: fever no longer required
    c.temp(37.4, hours_ago=8)
    c.temp(37.1, hours_ago=1)
    c.bp(104, 62, hours_ago=1)
    c.o2_device(HFNC, hours_ago=1)
    c.o2_flow(40, hours_ago=1)
    c.spo2(92, hours_ago=1)
    c.ice(10, hours_ago=1)
    return c.resources


def _crs3_refractory(now: datetime) -> list[dict]:
    c = Chart("crs3-refractory-four-doses", now, "Yilmaz", "Elif", "female", 54)
    c.weight(68, days_ago=3)
    c.iec(TECARTUS, days_ago=5)
    c.temp(39.6, hours_ago=50)
    for hours_ago in (48, 38, 28, 10):  # the 4th tocilizumab dose of this episode
        c.give(TOCILIZUMAB, hours_ago=hours_ago, dose_mg=540)
    for hours_ago in (30, 24, 18, 12, 6):  # dexamethasone 10 mg q6h
        c.give(DEXAMETHASONE, hours_ago=hours_ago, dose_mg=10)
    c.infusion(NOREPINEPHRINE, started_hours_ago=20, rate=(0.1, "ug/kg/min"))
    c.temp(37.3, hours_ago=2)
    c.bp(88, 50, hours_ago=1)
    c.ice(10, hours_ago=2)
    return c.resources


def _crs4_norepi_phenylephrine(now: datetime) -> list[dict]:
    c = Chart("crs4-norepi-phenylephrine", now, "Andersen", "Erik", "male", 71)
    c.weight(86, days_ago=2)
    c.iec(BREYANZI, days_ago=6, contained=True)  # medicationReference to a contained Medication
    c.give(TOCILIZUMAB, hours_ago=10, dose_mg=690)
    c.temp(39.0, hours_ago=3)
    c.infusion(NOREPINEPHRINE, started_hours_ago=6, rate=(0.2, "ug/kg/min"))
    c.infusion(PHENYLEPHRINE, started_hours_ago=2, rate=(1.0, "ug/kg/min"))
    c.bp(86, 44, hours_ago=1)
    c.o2_device(NASAL_CANNULA, hours_ago=1)
    c.o2_flow(4, hours_ago=1)
    c.ice(8, hours_ago=1)
    return c.resources


def _crs4_bipap(now: datetime) -> list[dict]:
    c = Chart("crs4-bipap", now, "Mensah", "Akosua", "female", 66)
    c.weight(74, days_ago=2)
    c.iec(CARVYKTI, days_ago=7)
    c.temp(38.9, hours_ago=4)
    c.o2_device(NASAL_CANNULA, hours_ago=7)
    c.o2_flow(4, hours_ago=7)
    c.o2_device(BIPAP_MASK, hours_ago=1)
    c.spo2(91, hours_ago=1)
    c.bp(106, 60, hours_ago=1)
    c.ice(9, hours_ago=2)
    return c.resources


def _concurrent_icans(now: datetime) -> list[dict]:
    c = Chart("concurrent-icans-crs1", now, "Dubois", "Marc", "male", 60)
    c.weight(75, days_ago=2)
    c.iec(YESCARTA, days_ago=6)
    for hours_ago, value in ((80, 38.3), (60, 38.6), (40, 38.4), (20, 38.7), (2, 38.5)):
        c.temp(value, hours_ago=hours_ago)  # fever for over 3 days: grade 1 alone would consider tocilizumab
    c.give(ACETAMINOPHEN, hours_ago=19, dose_mg=650, route="PO")
    c.bp(116, 70, hours_ago=2)
    c.o2_device(ROOM_AIR, hours_ago=2)
    c.ice(5, hours_ago=1)
    c.consciousness("awakens-to-voice", hours_ago=1)
    return c.resources


def _possible_masked_crs(now: datetime) -> list[dict]:
    c = Chart("possible-masked-crs-prophylaxis", now, "Fischer", "Hannah", "female", 52)
    c.weight(63, days_ago=3)
    c.iec(YESCARTA, days_ago=3)
    for hours_ago in (48, 24):  # prophylactic dexamethasone (ZUMA-1 cohort 6 style), before any fever
        c.give(DEXAMETHASONE_PO, hours_ago=hours_ago, dose_mg=10, route="PO")
    c.temp(37.6, hours_ago=6)
    c.temp(37.8, hours_ago=1)
    c.bp(84, 48, hours_ago=2)
    c.bp(86, 50, hours_ago=1)
    c.ice(10, hours_ago=1)
    return c.resources


def _hlh_mas(now: datetime) -> list[dict]:
    c = Chart("hlh-mas-ferritin", now, "Ivanova", "Olga", "female", 62)
    c.weight(59, days_ago=2)
    c.iec(TECARTUS, days_ago=6)
    c.temp(39.6, hours_ago=3)
    c.ferritin(18500, hours_ago=6)
    c.crp(212, hours_ago=6)
    c.bp(102, 58, hours_ago=2)
    c.o2_device(NON_REBREATHER, hours_ago=2)  # masks are high flow whatever the flow
    c.o2_flow(15, hours_ago=2)
    c.ice(9, hours_ago=2)
    return c.resources


def _icans1(now: datetime) -> list[dict]:
    c = Chart("icans1-ice8", now, "Tanaka", "Yuki", "female", 47)
    c.weight(58, days_ago=1)
    c.iec(KYMRIAH, days_ago=5)
    c.temp(38.2, hours_ago=40)  # fever two days ago, none since, never treated
    c.temp(37.2, hours_ago=2)
    c.bp(120, 74, hours_ago=2)
    c.ice(8, hours_ago=1)
    c.consciousness("awakens-spontaneously", hours_ago=1)
    return c.resources


def _icans3_ice0(now: datetime) -> list[dict]:
    c = Chart("icans3-ice0-awake", now, "Gallagher", "Sean", "male", 56)
    c.weight(83, days_ago=2)
    c.iec(YESCARTA, days_ago=7)
    c.temp(37.5, hours_ago=2)
    c.bp(126, 80, hours_ago=2)
    c.ice(0, hours_ago=1)  # eyes open, global aphasia: awake, so grade 3 (not 4)
    c.seizure("seizure-none", hours_ago=1)
    c.motor_weakness(False, hours_ago=1)
    return c.resources


def _icans3_child_capd(now: datetime) -> list[dict]:
    c = Chart("icans3-child-capd10", now, "Nguyen", "Minh", "male", 8)
    c.weight(25, days_ago=1)
    c.iec(KYMRIAH, days_ago=6)
    c.temp(38.2, hours_ago=3)
    c.bp(98, 60, hours_ago=3)
    c.capd(10, hours_ago=1)  # CAPD >= 9 is grade 3 under 12 years
    return c.resources


def _icans4_unarousable(now: datetime) -> list[dict]:
    c = Chart("icans4-unarousable", now, "Romero", "Lucia", "female", 59)
    c.weight(67, days_ago=2)
    c.iec(YESCARTA, days_ago=5)
    c.temp(38.6, hours_ago=2)
    c.bp(112, 66, hours_ago=2)
    c.o2_device(NASAL_CANNULA, hours_ago=1)
    c.o2_flow(2, hours_ago=1)
    c.consciousness("unarousable", hours_ago=1)
    c.ice_not_performed(hours_ago=1)
    c.seizure("seizure-none", hours_ago=1)
    c.cerebral_edema("edema-none", hours_ago=3)
    return c.resources


def _icans4_intubated(now: datetime) -> list[dict]:
    c = Chart("icans4-intubated-seizure", now, "Kaur", "Harpreet", "female", 50)
    c.weight(61, days_ago=2)
    c.iec(YESCARTA, days_ago=6)
    c.temp(38.4, hours_ago=3)
    c.seizure("seizure-prolonged", hours_ago=5)  # status epilepticus ...
    c.o2_device(VENTILATOR, hours_ago=4)  # ... intubated for airway protection
    c.infusion(PROPOFOL, started_hours_ago=4, rate=(30, "ug/kg/min"))
    c.consciousness("unarousable", hours_ago=2)  # on propofol: not used for grading
    c.bp(104, 62, hours_ago=2)
    return c.resources


def _home_cpap(now: datetime) -> list[dict]:
    c = Chart("home-cpap-sleep-apnea", now, "Novak", "Pavel", "male", 63)
    c.weight(104, days_ago=1)
    for nights_ago in (6, 5, 4):  # obstructive sleep apnea: CPAP every night before admission
        c.o2_device(CPAP, hours_ago=24 * (nights_ago + 3))
    c.iec(YESCARTA, days_ago=3)
    c.temp(38.4, hours_ago=2)
    c.o2_device(CPAP, hours_ago=5)  # his own machine overnight
    c.spo2(95, hours_ago=1)
    c.bp(128, 76, hours_ago=1)
    c.ice(10, hours_ago=1)
    return c.resources


def _crs2_map(now: datetime) -> list[dict]:
    c = Chart("crs2-documented-map", now, "Okafor", "Ngozi", "female", 58)
    c.weight(71, days_ago=1)
    c.iec(BREYANZI, days_ago=4)
    c.temp(38.7, hours_ago=2)
    c.bp(96, 44, hours_ago=2)  # systolic above 90 ...
    c.mean_bp(61, hours_ago=2)  # ... but the arterial line's documented MAP is below 65
    c.o2_device(ROOM_AIR, hours_ago=2)
    c.ice(10, hours_ago=1)
    return c.resources


def _infant_icans3(now: datetime) -> list[dict]:
    c = Chart("infant-icans3-weight-based", now, "Lindqvist", "Elsa", "female", 1)
    c.weight(9, days_ago=1)
    c.iec(KYMRIAH, days_ago=5)
    c.temp(38.3, hours_ago=2)
    c.bp(92, 55, hours_ago=2)
    c.capd(11, hours_ago=1)
    return c.resources


def _crs3_toci_5h(now: datetime) -> list[dict]:
    c = Chart("crs3-tocilizumab-5h-ago", now, "Rossi", "Giulia", "female", 57)
    c.weight(66, days_ago=2)
    c.iec(CARVYKTI, days_ago=6)
    c.temp(39.3, hours_ago=7)
    c.give(TOCILIZUMAB, hours_ago=5, dose_mg=530)  # the first dose of the episode
    c.give(DEXAMETHASONE, hours_ago=5, dose_mg=10)
    c.o2_device(NON_REBREATHER, hours_ago=1)
    c.ice(10, hours_ago=1)
    return c.resources


SCENARIOS: list[Scenario] = [
    # ---- out of scope ----
    Scenario("no-iec-therapy", "Septic shock, no IEC therapy",
             "Febrile and on norepinephrine, but never received CAR-T or a T-cell engager: out of scope, no card.",
             None, None, _no_iec_therapy,
             absent_topics=_topics("crs-management", "tocilizumab", "infection-workup")),
    Scenario("car-t-infusion-not-done", "CAR-T infusion not done",
             "The tisagenlecleucel infusion was charted not-done (deferred for bacteremia); fever is not CRS "
             "and the patient is out of scope.",
             None, None, _car_t_not_done, absent_topics=_topics("crs-management", "tocilizumab")),
    Scenario("day45-icans-only", "Day 45 after cilta-cel: ICANS only",
             "Delayed neurotoxicity 45 days after ciltacabtagene autoleucel: outside the 30-day CRS window "
             "(not graded despite fever) but inside the 60-day ICANS window (ICE 6, awakens to voice).",
             None, 2, _day45_icans_only,
             expected_topics=_topics("icans-management", "corticosteroid"),
             absent_topics=_topics("tocilizumab", "crs-management", "infection-workup")),
    # ---- CRS 0 / 1 ----
    Scenario("crs0-afebrile-day2", "Day 2 after tisa-cel, afebrile",
             "Maximum temperature 37.9 °C (below the 38.0 °C threshold), normotensive on room air, ICE 10.",
             0, 0, _crs0_afebrile,
             absent_topics=_topics("crs-management", "infection-workup", "tocilizumab", "icans-management",
                                   "possible-masked-crs")),
    Scenario("crs1-fever-day1", "Fever on day 1 after axi-cel",
             "38.6 °C the day after axicabtagene ciloleucel (charted under a local formulary code), "
             "normotensive on room air: CRS grade 1, supportive care and infection work-up.",
             1, 0, _crs1_fever,
             expected_topics=_topics("crs-management", "infection-workup"),
             absent_topics=_topics("tocilizumab", "tocilizumab-delay", "corticosteroid", "fever-masked")),
    Scenario("crs1-teclistamab-cqyv", "Fever after teclistamab step-up dose",
             "101.3 °F (38.5 °C) a day after teclistamab-cqyv step-up dose 1 with label-required dexamethasone "
             "premedication: CRS grade 1; the premedication is not a CRS treatment.",
             1, 0, _crs1_teclistamab,
             expected_topics=_topics("crs-management", "infection-workup"),
             absent_topics=_topics("tocilizumab", "corticosteroid", "antifungal-prophylaxis")),
    # ---- CRS 2 ----
    Scenario("crs2-hypotension-fluids", "Fever with fluid-responsive hypotension",
             "38.9 °C and SBP 84 that responds to a saline bolus, no vasopressor, no tocilizumab yet: CRS 2, "
             "tocilizumab now and do not delay.",
             2, 0, _crs2_hypotension,
             expected_topics=_topics("crs-management", "tocilizumab", "tocilizumab-delay", "infection-workup"),
             absent_topics=_topics("corticosteroid", "concurrent-icans")),
    Scenario("crs2-nasal-cannula-6lpm", "Nasal cannula at exactly 6 L/min",
             "Febrile on a nasal cannula at 6 L/min (flow charted on the pulse-oximetry observation): "
             "low flow is <= 6 L/min, so CRS 2.",
             2, 0, _crs2_nc_6, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("crs2-hfnc-device-4lpm", "High-flow cannula running at 4 L/min",
             "Device charted as high-flow nasal cannula but at 4 L/min: flow decides over the label, CRS 2.",
             2, 0, _crs2_hfnc_4, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("crs2-child-blow-by", "3-year-old on blow-by oxygen",
             "Febrile 3-year-old after tisagenlecleucel needing blow-by oxygen: low flow, CRS 2; tocilizumab "
             "12 mg/kg under 30 kg.",
             2, 0, _crs2_child_blow_by, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("crs2-child-6y-sbp80", "6-year-old with SBP 80",
             "Febrile 6-year-old with SBP 80 mmHg and no vasopressor: below the age threshold 70 + 2 x 6 = 82, "
             "so CRS 2.",
             2, 0, _crs2_child_sbp80, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("crs2-no-weight", "Tocilizumab indicated, no recent weight",
             "CRS 2 (fever, nasal cannula 3 L/min) with the only weight 40 days old: tocilizumab is indicated "
             "but no dose is computed; the card asks for a weight.",
             2, 0, _crs2_no_weight, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    # ---- CRS 3 ----
    Scenario("crs3-norepi-vaso", "Norepinephrine plus vasopressin",
             "39.4 °C on norepinephrine with vasopressin added: 1 vasopressor with or without vasopressin, CRS 3.",
             3, 1, _crs3_norepi_vaso,
             expected_topics=_topics("crs-management", "tocilizumab", "tocilizumab-delay", "corticosteroid"),
             absent_topics=_topics("concurrent-icans")),
    Scenario("crs3-vasopressin-alone", "Vasopressin as the only vasopressor",
             "Febrile after idecabtagene vicleucel with vasopressin as the sole vasopressor: still one "
             "vasopressor, CRS 3.",
             3, 0, _crs3_vasopressin_alone,
             expected_topics=_topics("tocilizumab", "tocilizumab-delay", "corticosteroid")),
    Scenario("crs3-fever-masked-hfnc", "Afebrile after tocilizumab, on HFNC 40 L/min",
             "Fever after axi-cel, then tocilizumab; now afebrile but on high-flow nasal cannula 40 L/min: fever "
             "is waived, CRS 3 driven by hypoxia.",
             3, 0, _crs3_fever_masked,
             expected_topics=_topics("fever-masked", "tocilizumab", "corticosteroid", "infection-workup")),
    Scenario("crs3-refractory-four-doses", "Four tocilizumab doses, still on norepinephrine",
             "After 4 tocilizumab doses this episode and dexamethasone q6h, still on norepinephrine (CRS 3): the "
             "episode limit is reached, no tocilizumab order; refractory options.",
             3, 0, _crs3_refractory,
             expected_topics=_topics("tocilizumab", "refractory-crs", "corticosteroid", "antifungal-prophylaxis",
                                     "fever-masked"),
             absent_topics=_topics("tocilizumab-delay")),
    Scenario("hlh-mas-ferritin", "Ferritin 18,500 on a non-rebreather",
             "39.6 °C on a non-rebreather mask with ferritin 18,500 ng/mL after brexucabtagene autoleucel: CRS 3 "
             "and possible IEC-associated HLH/MAS.",
             3, 1, _hlh_mas,
             expected_topics=_topics("hlh-mas", "tocilizumab", "corticosteroid", "tocilizumab-delay")),
    # ---- CRS 4 ----
    Scenario("crs4-norepi-phenylephrine", "Norepinephrine plus phenylephrine",
             "Febrile on norepinephrine and phenylephrine at once (liso-cel charted as a contained Medication): "
             "multiple vasopressors, CRS 4; tocilizumab 10 h ago.",
             4, 1, _crs4_norepi_phenylephrine,
             expected_topics=_topics("crs-management", "tocilizumab", "corticosteroid"),
             absent_topics=_topics("tocilizumab-delay")),
    Scenario("crs4-bipap", "Febrile on BiPAP",
             "Escalated from nasal cannula to BiPAP with fever after cilta-cel: positive pressure, CRS 4.",
             4, 1, _crs4_bipap,
             expected_topics=_topics("tocilizumab", "tocilizumab-delay", "corticosteroid")),
    # ---- Pitfalls without a CRS grade of their own ----
    Scenario("concurrent-icans-crs1", "ICANS 2 with CRS 1",
             "Fever for over 3 days (CRS 1) with ICE 5 and awakening to voice (ICANS 2): steroids first, no "
             "tocilizumab, which may worsen neurotoxicity.",
             1, 2, _concurrent_icans,
             expected_topics=_topics("concurrent-icans", "corticosteroid", "icans-management", "infection-workup"),
             absent_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("possible-masked-crs-prophylaxis", "Hypotension after prophylactic dexamethasone",
             "Prophylactic dexamethasone after axi-cel before any fever, now SBP 84 without fever: no CRS grade "
             "(prophylaxis is not a waiver) but a warning to evaluate possible masked CRS.",
             0, 0, _possible_masked_crs,
             expected_topics=_topics("possible-masked-crs"),
             absent_topics=_topics("tocilizumab", "fever-masked", "infection-workup", "crs-management",
                                   "antifungal-prophylaxis")),  # prophylaxis: not a steroid for CRS/ICANS
    # ---- ICANS ----
    Scenario("icans1-ice8", "ICE 8, afebrile",
             "ICE 8 and awakens spontaneously on day 5 after tisa-cel, afebrile for 40 h: ICANS 1, no steroids.",
             0, 1, _icans1,
             expected_topics=_topics("icans-management"),
             absent_topics=_topics("corticosteroid", "concurrent-icans", "tocilizumab")),
    Scenario("icans3-ice0-awake", "ICE 0 while awake",
             "Awake with global aphasia, ICE 0: ICANS 3 (grade 4 needs unarousability); afebrile, so steroids "
             "and no tocilizumab.",
             0, 3, _icans3_ice0,
             expected_topics=_topics("concurrent-icans", "corticosteroid", "icans-management"),
             absent_topics=_topics("tocilizumab")),
    Scenario("icans3-child-capd10", "8-year-old with CAPD 10",
             "Febrile 8-year-old after tisagenlecleucel with CAPD 10: CAPD >= 9 is ICANS 3 under 12 years; with "
             "CRS 1, steroids and no tocilizumab.",
             1, 3, _icans3_child_capd,
             expected_topics=_topics("concurrent-icans", "corticosteroid"),
             absent_topics=_topics("tocilizumab")),
    Scenario("icans4-unarousable", "Unarousable, ICE not possible",
             "Unarousable (ICE not performed) with fever on 2 L/min nasal cannula: ICANS 4 with CRS 2, so "
             "tocilizumab and high-dose methylprednisolone together.",
             2, 4, _icans4_unarousable,
             expected_topics=_topics("tocilizumab", "corticosteroid", "icans-management"),
             absent_topics=_topics("concurrent-icans")),
    Scenario("icans4-intubated-seizure", "Status epilepticus, intubated",
             "Prolonged seizure, intubated and on propofol, febrile: ICANS 4; the ventilator still counts as "
             "positive pressure (CRS 4, flagged as possible airway protection).",
             4, 4, _icans4_intubated,
             expected_topics=_topics("tocilizumab", "corticosteroid", "icans-management")),
    # ---- decisions.md revision 2 ----
    Scenario("home-cpap-sleep-apnea", "Febrile on his home CPAP",
             "CPAP every night before axi-cel (sleep apnea), now febrile on the same CPAP overnight: the home "
             "device is not counted toward grade 4 (CRS 1), and the card says so.",
             1, 0, _home_cpap, expected_topics=_topics("crs-management", "infection-workup"),
             absent_topics=_topics("tocilizumab", "corticosteroid")),
    Scenario("crs2-documented-map", "Documented MAP 61 with SBP 96",
             "Fever with a documented mean arterial pressure of 61 mmHg (SBP 96): hypotension over 10 years, CRS 2.",
             2, 0, _crs2_map, expected_topics=_topics("tocilizumab", "tocilizumab-delay")),
    Scenario("infant-icans3-weight-based", "1-year-old, 9 kg, CAPD 11",
             "Febrile infant after tisagenlecleucel with CAPD 11 (ICANS 3, CRS 1): dexamethasone by weight "
             "(0.5 mg/kg), levetiracetam 10 mg/kg, no tocilizumab.",
             1, 3, _infant_icans3, expected_topics=_topics("concurrent-icans", "corticosteroid", "icans-management"),
             absent_topics=_topics("tocilizumab")),
    Scenario("crs3-tocilizumab-5h-ago", "Tocilizumab 5 hours ago, now on a non-rebreather",
             "The first tocilizumab dose 5 h ago and dexamethasone: the next dose is possible from 8 h after it "
             "if no improvement; not refractory CRS.",
             3, 0, _crs3_toci_5h, expected_topics=_topics("tocilizumab", "corticosteroid", "antifungal-prophylaxis"),
             absent_topics=_topics("refractory-crs", "tocilizumab-delay")),
]

_BY_NAME = {s.name: s for s in SCENARIOS}
assert len(_BY_NAME) == len(SCENARIOS), "scenario names must be unique"


def by_name(name: str) -> Scenario:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no scenario {name!r}; known: {', '.join(_BY_NAME)}") from None
