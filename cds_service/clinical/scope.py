"""Who is in scope, and the treatment episode the grades belong to (decisions.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo

from .model import DrugEvent, Facts, clock
from .protocol import Protocol


@dataclass(frozen=True)
class Episode:
    """The IEC therapy the patient is being watched after.

    Administrations less than one CRS risk window apart (step-up doses of a T-cell engager, a
    split CAR-T infusion) form one episode; fever waivers and tocilizumab counts look back to its
    first administration.
    """

    first: DrugEvent
    latest: DrugEvent
    administrations: tuple[DrugEvent, ...]
    crs_in_scope: bool
    icans_in_scope: bool

    @property
    def start(self) -> datetime:
        return self.first.start

    def is_car_t(self) -> bool:
        return any("car-t-products" in a.categories for a in self.administrations)

    def has_early_steroid_product(self) -> bool:
        return any("car-t-early-steroid-products" in a.categories for a in self.administrations)


def find_episode(facts: Facts, now: datetime, protocol: Protocol) -> Episode | None:
    """When an IEC therapy (CAR-T or T-cell engager) was given, completed or in progress,
    within the ICANS risk window (60 days), then the patient is in scope; CRS only within the CRS
    risk window (30 days) of the most recent administration.  Source: decisions.md section 1.
    """
    scope = protocol["scope"]
    given = sorted(
        (d for d in facts.drugs_in("iec-therapies")
         if d.status in scope["in_scope_statuses"] and d.start <= now),
        key=lambda d: d.start,
    )
    if not given:
        return None
    latest = given[-1]
    since = now - latest.start
    crs_window = timedelta(days=scope["crs_risk_window_days"])
    icans_window = timedelta(days=scope["icans_risk_window_days"])
    if since > icans_window:
        return None
    episode = [latest]
    for earlier in reversed(given[:-1]):
        if episode[0].start - earlier.start >= crs_window:
            break
        episode.insert(0, earlier)
    return Episode(episode[0], latest, tuple(episode), since <= crs_window, since <= icans_window)


def age_on(birth_date: date | None, moment: datetime) -> tuple[int, int] | None:
    """(completed years, days) of age at ``moment``; None when the birth date is unknown."""
    if birth_date is None:
        return None
    today = moment.date()
    years = today.year - birth_date.year - ((today.month, today.day) < (birth_date.month, birth_date.day))
    return years, (today - birth_date).days


@dataclass(frozen=True)
class Situation:
    """Everything a rule may look at: the facts, the time of the assessment, the protocol, the
    episode and the patient's age. ``now`` is always given, never read from a clock."""

    facts: Facts
    now: datetime
    protocol: Protocol
    episode: Episode
    age: tuple[int, int] | None
    tz: tzinfo = timezone.utc  # the site's time zone: only for the words, never for a rule

    def at(self, moment: datetime) -> str:
        """A time in the site's time zone, as a card says it."""
        return clock(moment, self.tz, self.now)

    def window_start(self, name: str) -> datetime:
        return self.now - self.protocol.window(name)

    def readings(self, kind: str, window: str) -> list:
        """Readings of one kind documented inside a named window (overlapping it counts)."""
        start = self.window_start(window)
        return [r for r in self.facts.of_kind(kind) if r.end >= start and r.start <= self.now]

    def drugs(self, category: str, since: datetime) -> list[DrugEvent]:
        """Administrations in a category that ran at any time between ``since`` and now."""
        return [d for d in self.facts.drugs_in(category) if d.end >= since and d.start <= self.now]

    def window_text(self, name: str) -> str:
        return f"last {self.protocol['windows_hours'][name]} h"


@dataclass(frozen=True)
class ObservationHorizon:
    """How far back each kind of Observation matters to some rule; older ones are not read.

    Temperatures, ferritin and CRP look back to the start of the episode (fever waiver, grade 1
    tocilizumab triggers, HLH); weight 30 days; the rest their assessment window (oxygen plus the
    device/flow pairing slack). Positive-pressure devices from before the therapy are read too,
    for the home-CPAP flag."""

    since: dict
    also_before: dict

    def admits(self, kind: str, start: datetime, end: datetime) -> bool:
        if kind in self.also_before and end < self.also_before[kind]:
            return True
        since = self.since.get(kind)
        return since is None or end >= since


def observation_horizon(protocol: Protocol, episode: Episode, now: datetime) -> ObservationHorizon:
    def window(name: str) -> datetime:
        return now - protocol.window(name)

    pairing = timedelta(minutes=protocol["oxygen"]["device_flow_pairing_minutes"])
    icans = window("icans")
    return ObservationHorizon(
        since={
            "temperature": min(episode.start, window("fever")),
            "sbp": window("hypotension"),
            "map": window("hypotension"),
            "o2_flow": window("oxygen") - pairing,
            "o2_device": window("oxygen") - pairing,
            "weight": now - timedelta(days=protocol["weight_window_days"]),
            "ferritin": episode.start,
            "crp": episode.start,
            **dict.fromkeys(("ice", "capd", "consciousness", "seizure", "motor_weakness", "cerebral_edema"), icans),
        },
        also_before={"o2_device": episode.start},
    )
