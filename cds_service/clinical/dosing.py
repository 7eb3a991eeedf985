"""Tocilizumab dose from the latest weight, and the dose limits (decisions.md section 5)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .model import DrugEvent, Reading
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
    the nearest 10 mg, at most 800 mg.  Source: seeds 000-003; Actemra label; decisions.md 5."""
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
    """Tocilizumab given in this episode, and the limit (if any) that forbids another dose now."""

    episode_doses: list[DrugEvent]
    doses_24h: list[DrugEvent]
    blocked: str | None = None
    next_allowed: datetime | None = None
    at_episode_limit: bool = False
    details: list[str] = field(default_factory=list)

    @property
    def last(self) -> DrugEvent | None:
        return self.episode_doses[-1] if self.episode_doses else None


def tocilizumab_history(s: Situation) -> TocilizumabHistory:
    """When the last dose was under 8 h ago, or 3 doses were given in 24 h, or 4 in this CRS
    episode (every dose since the IEC therapy), then no further dose is suggested.
    Source: seeds 001, 002; NCCN; decisions.md 5 (limits)."""
    rules = s.protocol["tocilizumab"]
    doses = sorted((d for d in s.facts.drugs_in("tocilizumab") if s.episode.start <= d.start <= s.now),
                   key=lambda d: d.start)
    day_ago = s.now - timedelta(hours=24)
    history = TocilizumabHistory(doses, [d for d in doses if d.start > day_ago])
    if len(doses) >= rules["max_doses_per_episode"]:
        history.blocked = f"{len(doses)} doses already given this episode (maximum {rules['max_doses_per_episode']})"
        history.at_episode_limit = True
    elif len(history.doses_24h) >= rules["max_doses_per_24h"]:
        history.blocked = f"{len(history.doses_24h)} doses in the last 24 h (maximum {rules['max_doses_per_24h']})"
        history.next_allowed = history.doses_24h[0].start + timedelta(hours=24)
    elif doses and s.now - doses[-1].start < timedelta(hours=rules["min_hours_between_doses"]):
        history.blocked = (f"last dose {doses[-1].start:%Y-%m-%d %H:%M} UTC, under "
                           f"{rules['min_hours_between_doses']} h ago")
        history.next_allowed = doses[-1].start + timedelta(hours=rules["min_hours_between_doses"])
    return history
