"""The patient's course, hour by hour: read through the hooks' reading path, graded by the engine.

Nothing here grades: each hour's CRS and ICANS grades are ``clinical.assess`` at that hour's end,
given the chart as it stood then; the lanes show the facts the core read (``extract_facts``).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ..clinical import assess
from ..clinical.facts import extract_facts
from ..clinical.fhir_read import UnreadableValue, effective_interval
from ..clinical.model import DrugEvent, Grade, Reading, Unreadable
from ..clinical.scope import find_episode
from ..fhir.client import FhirClient
from ..fhir.prefetch import resolve_prefetch
from ..settings import Settings
from ..site import Site
from ..terminology import codeable_codes

# What each search of the hooks' prefetch templates holds, as the page names it when it fails.
PARTS = {
    "patient": "Patient (age)",
    "temperatures": "temperatures",
    "bloodPressures": "blood pressures",
    "oxygen": "oxygen (devices, flows, SpO2)",
    "assessments": "ICANS assessments, weight and labs",
    "medications": "medication administrations (IEC therapy, vasopressors, tocilizumab, steroids, antipyretics)",
    "referenced medications": "medications named by reference",
}
DOSE_CATEGORIES = (("tocilizumab", "tocilizumab"), ("systemic-corticosteroids", "corticosteroid"),
                   ("antipyretics", "antipyretic"))
PRESSOR_CATEGORIES = ("vasopressors", "vasopressin")
ICANS_KINDS = ("ice", "capd", "consciousness", "seizure", "motor_weakness", "cerebral_edema")
SHOWN_VALUESETS = ("mean-arterial-pressure",)  # read by this app alone, for display


@dataclass
class HourGrade:
    end: datetime
    crs: Grade
    icans: Grade
    pressors: list[str]

    @staticmethod
    def waived(grade: Grade) -> bool:
        return "fever waiver" in grade.rule or any(f.code == "fever-masked" for f in grade.flags) \
            or "afebrile after treatment" in grade.reason


@dataclass
class Timeline:
    patient_id: str
    now: datetime
    zone: Any
    start: datetime | None = None             # the first IEC administration of the episode
    view_start: datetime | None = None        # where the page begins: the episode's start or a chosen window
    window_hours: int | None = None
    hours: list[HourGrade] = field(default_factory=list)
    readings: dict[str, list[Reading]] = field(default_factory=dict)
    maps: list[tuple[datetime, float, str]] = field(default_factory=list)  # MAP where charted
    doses: list[tuple[str, DrugEvent]] = field(default_factory=list)
    pressors: list[DrugEvent] = field(default_factory=list)
    iec: list[DrugEvent] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it could not be read
    unreadable: list[Unreadable] = field(default_factory=list)
    no_episode_reason: str | None = None
    patient_name: str | None = None
    card_episode: datetime | None = None      # the episode the card that opened the app graded (appContext)

    @property
    def medications_missing(self) -> bool:
        return "medications" in self.missing


def read_chart(iss: str, patient: str, token: str, now: datetime, site: Site, templates: dict[str, str],
               client: FhirClient, settings: Settings) -> tuple[list[dict], dict[str, str], list[Unreadable]]:
    """The hooks' prefetch searches, run against the EHR's FHIR server with the app's token: the
    same templates, client, paging and error handling as a hook call that came without prefetch.
    Returns the resources, the parts that failed (key -> reason) and their Unreadable entries."""
    request = {"context": {"patientId": patient}, "fhirServer": iss,
               "fhirAuthorization": {"access_token": token, "token_type": "Bearer"}}
    days = max(site.protocol["scope"]["crs_risk_window_days"], site.protocol["scope"]["icans_risk_window_days"])
    since = now - timedelta(days=days)  # the whole episode, not only what the grade at `now` reads
    cutoffs = {key: since for key in ("temperatures", "bloodPressures", "oxygen", "assessments")}
    budget = replace(settings, fhir_budget_seconds=settings.smart_fhir_budget_seconds,
                     fhir_max_pages=settings.smart_fhir_max_pages)
    gathered = resolve_prefetch(templates, request, client, budget, required=(), cutoffs=cutoffs)
    missing = {}
    for failure in gathered.failures:
        key = failure.reference.removeprefix("prefetch:")
        missing[key] = failure.reason
    for key, source in gathered.sources.items():
        if source == "failed" and key not in missing:
            missing[key] = "could not be read"
    return gathered.resources, missing, gathered.failures


def _observation_time(resource: dict, zone) -> datetime | None:
    try:
        return effective_interval(resource, zone)[0]
    except UnreadableValue:
        return None  # the engine says why; such an Observation is in every hour's chart


class HourMemo:
    """The hour grades already computed, keyed by everything they depend on: the content of the
    chart as it stood at that hour's end (every resource but the Observations, and the Observations
    charted by then, as hashes of their JSON), the hour, the parts that could not be read and the
    site rules; plus the FHIR server it came from. Never by a resource id or a session: two charts
    that reuse ids are graded each as if alone. Bounded; the oldest entries go first.

    Why: the engine's grade at one moment reads every temperature since the IEC therapy, so an
    episode of H hours costs H full assessments; a reload, or the next hour, then costs only the
    hours whose chart changed."""

    def __init__(self, size: int = 20_000):
        self.size = size
        self._entries: OrderedDict[tuple, HourGrade] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> HourGrade | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, value: HourGrade) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _digest(resource: dict) -> bytes:
    return hashlib.sha256(json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode()).digest()


def build_timeline(resources: list[dict], missing: dict[str, str], unread: list[Unreadable], now: datetime,
                   site: Site, window_hours: int | None = None, memo: HourMemo | None = None,
                   source: str = "") -> Timeline:
    """Grades at each hour's end from the first IEC administration (or ``window_hours`` before
    ``now``, whichever is later) to ``now``, and the facts to draw."""
    zone = site.zone
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    timeline = Timeline(patient.get("id") if patient else "?", now, zone, missing=dict(missing),
                        window_hours=window_hours)
    if patient:
        names = patient.get("name") or []
        if names and isinstance(names[0], dict):
            given = " ".join(g for g in names[0].get("given") or [] if isinstance(g, str))
            timeline.patient_name = " ".join(p for p in (given, names[0].get("family") or "") if p) or None
    facts = extract_facts(resources, now, site.terminology, site.protocol, zone=zone)
    timeline.unreadable = list(facts.unreadable) + list(unread)
    episode = find_episode(facts, now, site.protocol)
    if episode is None:
        timeline.no_episode_reason = ("the medication administrations could not be read, so the IEC therapy "
                                      "cannot be placed" if timeline.medications_missing
                                      else "no IEC therapy in the protocol's risk window")
        return timeline
    timeline.start = episode.first.start
    view = timeline.start if window_hours is None else max(timeline.start, now - timedelta(hours=window_hours))
    timeline.view_start = view
    timeline.iec = [d for d in episode.administrations if d.end >= view]
    for kind in ("temperature", "sbp", "o2_flow", "o2_device", *ICANS_KINDS):
        timeline.readings[kind] = sorted((r for r in facts.of_kind(kind) if r.end >= view), key=lambda r: r.end)
    timeline.maps = _mean_arterial_pressures(resources, zone, view, now,
                                             set(site.terminology["mean-arterial-pressure"].codes))
    for category, label in DOSE_CATEGORIES:
        timeline.doses += [(label, d) for d in facts.drugs_in(category) if d.start >= view]
    timeline.doses.sort(key=lambda item: item[1].start)
    timeline.pressors = [d for d in facts.drugs if set(PRESSOR_CATEGORIES) & d.categories and d.end >= view]

    # The chart as it stood at each hour's end: Observations charted by then (the engine ignores
    # later ones anyway; leaving them out only saves it the reading), everything else whole.
    observations, others = [], []
    for resource in resources:
        (observations if resource.get("resourceType") == "Observation" else others).append(resource)
    timed = sorted(((_observation_time(o, zone), i) for i, o in enumerate(observations)),
                   key=lambda pair: (pair[0] is not None, pair[0] or now))
    untimed = [observations[i] for when, i in timed if when is None]
    timed = [(when, observations[i]) for when, i in timed if when is not None]
    times = [when for when, _ in timed]
    prefixes: list[bytes] = []
    fixed = b""
    if memo is not None:
        # What the chart held at each hour's end, as hashes: the resources graded whole (sorted,
        # so the order the server sent them in does not matter), then the Observations in time order.
        fixed = hashlib.sha256(b"".join(sorted(_digest(r) for r in others + untimed))).digest()
        running = hashlib.sha256()
        digests = [_digest(o) for _, o in timed]
        order = sorted(range(len(timed)), key=lambda i: (times[i], digests[i]))
        timed = [timed[i] for i in order]
        times = [times[i] for i in order]
        prefixes = [b""]
        for i in order:
            running.update(digests[i])
            prefixes.append(running.digest())
    rules = (source, site.protocol.label, id(site.protocol), id(site.terminology), str(zone),
             tuple(sorted((u.reference, u.reason) for u in unread)))
    first_hour = view.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    ends = []
    moment = first_hour
    while moment < now:
        ends.append(moment)
        moment += timedelta(hours=1)
    ends.append(now)
    for end in ends:
        upto = bisect.bisect_right(times, end)
        key = (rules, fixed, prefixes[upto], end) if memo is not None else None
        hour = memo.get(key) if memo is not None else None
        if hour is None:
            chart = others + untimed + [o for _, o in timed[:upto]]
            assessment = assess(chart, end, site.protocol, site.terminology, unread, zone=zone)
            running = sorted({d.agent for d in timeline.pressors if d.running_at(end)})
            hour = HourGrade(end, assessment.crs, assessment.icans, running)
            if memo is not None:
                memo.put(key, hour)
        timeline.hours.append(hour)
    return timeline


def _mean_arterial_pressures(resources: list[dict], zone, since: datetime, now: datetime,
                             codes: set[tuple[str, str]]) -> list[tuple]:
    """MAP where the chart has it (a component of a blood pressure panel, or its own Observation):
    shown only, no rule reads it."""
    found = []
    for resource in resources:
        if resource.get("resourceType") != "Observation" or resource.get("status") in ("entered-in-error", "cancelled"):
            continue
        holders = [resource] + [c for c in resource.get("component") or [] if isinstance(c, dict)]
        for holder in holders:
            if not codes.intersection(codeable_codes(holder.get("code"))):
                continue
            quantity = holder.get("valueQuantity") or {}
            value = quantity.get("value")
            when = _observation_time(resource, zone)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and when and since <= when <= now:
                found.append((when, float(value), f"Observation/{resource.get('id')}"))
    return sorted(found)
