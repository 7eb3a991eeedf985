"""Tocilizumab dose from the latest weight, and the dose limits (decisions.md section 5)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .model import DrugEvent, MedicationOrder, Reading
from .protocol import Protocol
from .scope import Situation


@dataclass(frozen=True)
class TocilizumabDose:
    weight: Reading
    mg_per_kg: float
    unrounded_mg: float
    dose_mg: float
    capped: bool

    @property
    def text(self) -> str:
        cap = " (capped at the maximum)" if self.capped else ""
        return (f"{self.dose_mg:g} mg: {self.mg_per_kg:g} mg/kg x {self.weight.value:g} kg = "
                f"{self.unrounded_mg:g} mg{cap}")


def latest_weight(s: Situation) -> Reading | None:
    """When a body weight was documented in the last 30 days, then the most recent one is the
    dosing weight; otherwise there is none and no dose is given.  Source: decisions.md 2, 5."""
    since = s.now - timedelta(days=s.protocol["weight_window_days"])
    weights = [r for r in s.facts.of_kind("weight") if since <= r.end <= s.now and r.value > 0]
    return max(weights, key=lambda r: r.end, default=None)


def tocilizumab_dose(s: Situation) -> TocilizumabDose | None:
    """When a recent weight exists, then tocilizumab is 8 mg/kg (12 mg/kg under 30 kg), rounded to
    the nearest 10 mg, at most 800 mg.  Source: Actemra prescribing information; decisions.md 5."""
    weight = latest_weight(s)
    if weight is None:
        return None
    rules = s.protocol["tocilizumab"]
    per_kg = rules["mg_per_kg_low_weight"] if weight.value < rules["low_weight_below_kg"] else rules["mg_per_kg"]
    unrounded = round(per_kg * weight.value, 1)
    step = rules["round_to_mg"]
    rounded = math.floor(unrounded / step + 0.5) * step
    dose = min(rounded, rules["max_dose_mg"])
    return TocilizumabDose(weight, per_kg, unrounded, float(dose), dose < rounded)


@dataclass
class TocilizumabHistory:
    """Tocilizumab given in this episode: the limit reached (if any) and, apart from it, the 8-hour
    timing between doses, which is not a limit."""

    episode_doses: list[DrugEvent]
    doses_24h: list[DrugEvent]
    limit: str | None = None              # which dose limit is reached: no further dose
    next_possible: datetime | None = None  # inside 8 h of the last dose: from when the next one may go
    at_episode_limit: bool = False
    details: list[str] = field(default_factory=list)

    @property
    def last(self) -> DrugEvent | None:
        return self.episode_doses[-1] if self.episode_doses else None

    @property
    def blocked(self) -> bool:
        """No dose now: a limit is reached or the last dose was under 8 h ago."""
        return self.limit is not None or self.next_possible is not None


def tocilizumab_history(s: Situation) -> TocilizumabHistory:
    """When 3 doses were given in 24 h, or 4 in this CRS episode (every dose since the IEC
    therapy), then a limit is reached and no further dose is suggested. When the last dose was
    under 8 h ago, then that is timing, not a limit: the next dose is possible from 8 h after it.
    Source: Actemra prescribing information; decisions.md 5 (rev. 2, timing and limits)."""
    rules = s.protocol["tocilizumab"]
    doses = sorted((d for d in s.facts.drugs_in("tocilizumab") if s.episode.start <= d.start <= s.now),
                   key=lambda d: d.start)
    day_ago = s.now - timedelta(hours=24)
    history = TocilizumabHistory(doses, [d for d in doses if d.start > day_ago])
    if len(doses) >= rules["max_doses_per_episode"]:
        history.limit = f"{len(doses)} doses this episode, maximum {rules['max_doses_per_episode']}"
        history.at_episode_limit = True
    elif len(history.doses_24h) >= rules["max_doses_per_24h"]:
        history.limit = f"{len(history.doses_24h)} doses in 24 h, maximum {rules['max_doses_per_24h']}"
    elif doses and s.now - doses[-1].start < timedelta(hours=rules["min_hours_between_doses"]):
        history.next_possible = doses[-1].start + timedelta(hours=rules["min_hours_between_doses"])
    return history


# ---- Children: weight-based steroids and levetiracetam --------------------------------------------

def is_child(s: Situation) -> bool | None:
    """When the patient is under 18 years, or of unknown age and under 40 kg, then steroids and
    levetiracetam are dosed by weight. None: age and weight both unknown, so it cannot be told.
    Source: decisions.md 5 (rev. 2, children); Mahadeo et al., Nat Rev Clin Oncol 2019."""
    rules = s.protocol["pediatric"]
    if s.age is not None:
        return s.age[0] < rules["adult_age_years"]
    weight = latest_weight(s)
    if weight is None:
        return None
    return weight.value < rules["unknown_age_below_kg"]


@dataclass(frozen=True)
class SteroidDose:
    """A corticosteroid regimen for this patient: the words, and the order when one may be given."""

    key: str
    drug: str
    dose_mg: float | None
    every_hours: int
    text: str
    order: MedicationOrder | None
    after_text: str | None = None


def _per_kg(s: Situation, per_kg: float, maximum: float, weight: Reading) -> tuple[float, str]:
    step = s.protocol["pediatric"]["round_to_mg"]
    raw = per_kg * weight.value
    rounded = round(round(raw / step) * step, 1)
    if rounded > maximum:
        return maximum, f"{per_kg:g} mg/kg x {weight.value:g} kg = {rounded:g} mg, capped at {maximum:g} mg"
    return rounded, f"{per_kg:g} mg/kg x {weight.value:g} kg = {rounded:g} mg, max {maximum:g} mg"


def steroid_dose(s: Situation, key: str) -> SteroidDose:
    """When the patient is a child (is_child), then the regimen's dose is weight-based and never
    above the adult dose (dexamethasone 0.5 mg/kg, max 10 mg; methylprednisolone 30 mg/kg/day, max
    1000 mg, or 15 mg/kg q12h, max 500 mg, at CRS 4), labelled for confirmation; without a weight
    the regimen is given in mg/kg with no number and no order. An adult gets the regimen's dose.
    Source: decisions.md 5 (rev. 2, children); Mahadeo et al., Nat Rev Clin Oncol 2019."""
    regimen = s.protocol["steroid_regimens"][key]
    drug, route, every = regimen["drug"], regimen["route"], regimen["every_hours"]
    days = regimen.get("order_days")
    child = is_child(s)
    if child is False or not regimen.get("pediatric_mg_per_kg"):
        order = MedicationOrder(drug, float(regimen["dose_mg"]), route, every, regimen["text"], days)
        return SteroidDose(key, drug, float(regimen["dose_mg"]), every, regimen["text"], order, regimen.get("after_text"))
    per_kg, maximum = regimen["pediatric_mg_per_kg"], float(regimen["dose_mg"])
    label = s.protocol["pediatric"]["label"]
    span = f" for {days} days" if days else ""
    weight = latest_weight(s)
    after = regimen.get("after_text") and "then taper per your pediatric protocol"
    if child is None:
        text = (f"{regimen['text']} if an adult; age and weight unknown: if a child, {per_kg:g} mg/kg "
                f"(max {maximum:g} mg) every {every} h{span}. Record the age or weight")
        return SteroidDose(key, drug, None, every, text, None, regimen.get("after_text"))
    if weight is None:
        text = (f"{drug} {per_kg:g} mg/kg (max {maximum:g} mg) {route} every {every} h{span} ({label}); "
                f"no weight in the last {s.protocol['weight_window_days']} days: weigh the patient")
        return SteroidDose(key, drug, None, every, text, None, after)
    dose, how = _per_kg(s, per_kg, maximum, weight)
    text = f"{drug} {dose:g} mg {route} every {every} h{span} ({how}; {label})"
    order = MedicationOrder(drug, dose, route, every, f"{drug} {dose:g} mg {route} every {every} h{span}", days)
    return SteroidDose(key, drug, dose, every, text, order, after)


def levetiracetam_text(s: Situation) -> str:
    """When ICANS is graded, then seizure prophylaxis with levetiracetam: 500-750 mg twice daily
    for adults; 10 mg/kg twice daily (max 750 mg a dose) for children, labelled; without a weight
    the rule in mg/kg.  Source: ASCO 2021; decisions.md 5 (ICANS, children)."""
    rules = s.protocol["levetiracetam"]
    if is_child(s) is False:
        return rules["adult_text"]
    label = s.protocol["pediatric"]["label"]
    weight = latest_weight(s)
    if is_child(s) is None:
        return (f"{rules['adult_text']} if an adult; if a child, "
                f"{rules['pediatric_mg_per_kg']:g} mg/kg twice daily (max {rules['max_mg']:g} mg a dose)")
    if weight is None:
        return (f"levetiracetam {rules['pediatric_mg_per_kg']:g} mg/kg BID (max "
                f"{rules['max_mg']:g} mg a dose; {label}); weigh the patient")
    dose, how = _per_kg(s, rules["pediatric_mg_per_kg"], float(rules["max_mg"]), weight)
    return f"levetiracetam {dose:g} mg BID ({how}; {label})"


def refractory_first_options(protocol: Protocol, s: Situation | None) -> list[str]:
    """The first options for refractory CRS. Anakinra's fixed dose is an adult's: a child, or a
    patient who may be one (or whose chart was not graded), is told the pediatric protocol's dose.
    Source: decisions.md 5 (refractory CRS; children), reference.md 3d."""
    child = is_child(s) if s is not None else None
    return protocol["refractory_options"]["first" if child is False else "first_child"]
