"""The services this CDS Hooks server offers: declared once, driving discovery and dispatch.

To find what a service does, read its declaration in ``SERVICES`` and its handler just above.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Callable

from ..clinical import assess, never_in_scope, no_iec_therapy_reason, out_of_scope_reason
from ..clinical.model import Assessment, Unreadable
from ..clinical.orders import review_orders
from ..clinical.protocol import Protocol
from ..errors import BadRequest, PreconditionFailed
from ..fhir.bundle import BundleError, resources_in
from ..fhir.client import FhirClient
from ..fhir.prefetch import prefetched_only, resolve_prefetch, search_content
from ..terminology import Terminology
from .cards import assessment_cards, finding_cards
from .memo import ContentMemo

log = logging.getLogger("crs_cds.hooks")

# What each Observation prefetch key asks for, by ValueSet (a site's local codes join automatically).
OBSERVATION_KEYS = {
    "temperatures": ("body-temperature",),
    "bloodPressures": ("systolic-blood-pressure", "blood-pressure-panel", "mean-arterial-pressure"),
    "oxygen": ("oxygen-flow-rate", "pulse-oximetry"),
    # The delivery method has its own key, read further back: CPAP/BiPAP charted in the 7 days
    # before the first IEC dose is the patient's home device (decisions.md 3).
    "oxygenDevices": ("oxygen-delivery-method",),
    "assessments": ("body-weight", "ferritin", "c-reactive-protein", "icans-ice-score", "icans-capd-score",
                    "icans-consciousness", "icans-seizure", "icans-motor-weakness", "icans-cerebral-edema"),
}
PAGE_SIZES = {"temperatures": 1000, "bloodPressures": 200, "oxygen": 300, "oxygenDevices": 200, "assessments": 200}


@dataclass
class HookCall:
    """One validated hook request with its FHIR data gathered."""

    service: "ServiceDeclaration"
    request: dict
    resources: list[dict]
    unread: list[Unreadable]
    now: datetime
    protocol: Protocol
    terminology: Terminology
    zone: tzinfo                               # the site's time zone: zoneless times, and the cards' words
    notes: dict = field(default_factory=dict)  # for the call's log line
    quiet_when_normal: bool = True             # no card for a normal in-scope patient
    protocol_url: str | None = None            # where the protocol document is served, for card links
    episode_start: datetime | None = None      # the IEC episode graded (for the SMART link's appContext)
    ehr: str = "generic"                       # the site's EHR kind: which suggestion actions it applies

    @property
    def context(self) -> dict:
        return self.request["context"]


@dataclass(frozen=True)
class ServiceDeclaration:
    id: str
    hook: str
    title: str
    description: str
    handler: Callable[[HookCall], list[dict]]
    prefetch_keys: tuple[str, ...]
    required_keys: frozenset[str]
    usage_requirements: str | None = None
    # A prefetch key that alone can show the patient is out of scope (no IEC therapy). When the
    # client sent it whole and it shows none, the answer is no cards, and the other keys are not
    # needed: neither read nor fetched, and their absence is no reason for a 412.
    scope_key: str | None = None

    def discovery(self, templates: dict[str, str]) -> dict:
        entry = {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                 "prefetch": {key: templates[key] for key in self.prefetch_keys}}
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


VITAL_SIGNS_KEYS = ("temperatures", "bloodPressures", "oxygen")  # US Core vital-signs category
ORACLE_MAX_COUNT = 200


def prefetch_templates(terminology: Terminology, ehr: str = "generic") -> dict[str, str]:
    """Prefetch templates with only root-level context tokens (Epic, Oracle Health and the Sandbox
    all support these). A template cannot carry a date, so searches are narrowed by code, sorted
    newest first with a page size, and split by concept so that a client or this service can run
    them in parallel, each usually in one page; ``prefetch_cutoffs`` says how far back each one
    matters, so paging stops there.

    Dialects: Epic searches vital signs by category (``category=vital-signs``); Oracle Health takes
    no ``_sort`` on Observation and at most ``_count=200``; neither is asked for ``_include`` (the
    service fetches the Medications that administrations name by reference itself)."""
    def codes(valuesets) -> list[str]:
        return sorted({f"{system}|{code}" for vs in valuesets for (system, code) in terminology[vs].codes})

    templates = {"patient": "Patient/{{context.patientId}}"}
    for key, valuesets in OBSERVATION_KEYS.items():
        query = "Observation?patient={{context.patientId}}"
        if ehr == "epic" and key in VITAL_SIGNS_KEYS:
            query += "&category=vital-signs"
        query += f"&code={','.join(codes(valuesets))}"
        if ehr == "oracle-health":
            query += f"&_count={min(PAGE_SIZES[key], ORACLE_MAX_COUNT)}"
        else:
            query += f"&_sort=-date&_count={PAGE_SIZES[key]}"
        templates[key] = query
    count = ORACLE_MAX_COUNT if ehr == "oracle-health" else 500
    # Medications named by reference come with their administrations where the server supports it.
    include = "&_include=MedicationAdministration:medication" if ehr == "generic" else ""
    templates["medications"] = f"MedicationAdministration?patient={{{{context.patientId}}}}{include}&_count={count}"
    # The order hooks read the patient's open medication orders: a CAR-T product ordered (scheduled)
    # makes a corticosteroid order premedication (decisions.md 6 rule 8).
    templates["medicationRequests"] = ("MedicationRequest?patient={{context.patientId}}"
                                       "&status=active,on-hold,draft&_count=200")
    return templates


# The FHIR scopes each key's search needs (SMART v1 and v2 spellings).
KEY_SCOPES = {
    "patient": ("patient/Patient.read", "patient/Patient.r"),
    "medications": ("patient/MedicationAdministration.read", "patient/MedicationAdministration.rs"),
    "medicationRequests": ("patient/MedicationRequest.read", "patient/MedicationRequest.rs"),
    **{key: ("patient/Observation.read", "patient/Observation.rs") for key in OBSERVATION_KEYS},
}
MEDICATION_SCOPES = ("patient/Medication.read", "patient/Medication.rs")  # Medications named by reference


def prefetch_cutoffs(protocol: Protocol, now: datetime) -> dict[str, datetime]:
    """How far back each newest-first key is read by some rule (see clinical.scope.observation_horizon)."""
    pairing = timedelta(minutes=protocol["oxygen"]["device_flow_pairing_minutes"])
    episode_days = timedelta(days=protocol["scope"]["crs_risk_window_days"])
    return {
        "temperatures": now - episode_days,
        "bloodPressures": now - protocol.window("hypotension"),
        "oxygen": now - protocol.window("oxygen") - pairing,
        "oxygenDevices": now - episode_days - timedelta(days=protocol["home_positive_pressure_days_before"]),
        "assessments": now - max(episode_days, timedelta(days=protocol["weight_window_days"])),
    }


def _assess_or_412(call: HookCall) -> Assessment:
    assessment = assess(call.resources, call.now, call.protocol, call.terminology, call.unread, zone=call.zone)
    if not assessment.assessable:
        raise PreconditionFailed("the patient's medication administrations could not be read, so whether "
                                 "IEC therapy was given cannot be told: "
                                 + "; ".join(f"{u.reference}: {u.reason}" for u in assessment.unreadable))
    call.notes["grades"] = {"crs": assessment.crs.value, "icans": assessment.icans.value}
    call.notes["read"] = assessment.reading or None
    if assessment.situation is not None:
        call.episode_start = assessment.situation.episode.start
    return assessment


def out_of_scope(service: ServiceDeclaration, request: dict, templates: dict[str, str], now: datetime,
                 protocol: Protocol, terminology: Terminology) -> str | None:
    """Why the patient is out of scope, when the service's scope key alone shows it; else None (in
    scope, the key not sent whole, or unreadable: the full call decides, with its 412s).

    Most chart opens are of patients never given IEC therapy, whose EHR sends the same medications
    at every open: that answer, which no clock changes, is remembered by what the key holds (its
    entries and next-page link, not the search Bundle's own id or time)."""
    if service.scope_key is None:
        return None
    scope_templates = {service.scope_key: templates[service.scope_key]}
    prefetch = request.get("prefetch")
    sent = search_content(prefetch.get(service.scope_key)) if isinstance(prefetch, dict) else None
    if isinstance(sent, dict):
        def never(value: dict) -> bool:
            resources = prefetched_only(scope_templates, {"prefetch": {service.scope_key: value}})
            return resources is not None and never_in_scope(resources, now, protocol, terminology)

        memo = _never_in_scope_memo(scope_templates[service.scope_key], terminology,
                                    tuple(protocol["scope"]["in_scope_statuses"]))
        if memo(sent, never):
            return no_iec_therapy_reason(protocol)
    resources = prefetched_only(scope_templates, request)
    return None if resources is None else out_of_scope_reason(resources, now, protocol, terminology)


@lru_cache(maxsize=64)
def _never_in_scope_memo(template: str, terminology: Terminology, in_scope_statuses: tuple[str, ...]):
    """One per everything ``never_in_scope`` depends on besides the key's content."""
    return ContentMemo(size=5_000)


def gather(service: ServiceDeclaration, request: dict, site, now: datetime, client: FhirClient, settings,
           server_allowed: bool = True) -> HookCall | str:
    """The hook call with its FHIR data gathered (prefetch, then fetches) as the ``site`` (a
    ``cds_service.site.Site``: protocol, codes, time zone, templates) reads it, or why the patient
    is out of scope when the scope key alone shows it. The one way a hook request is read, by the
    service and by ``crs-cds grade``. Raises PreconditionFailed when required data cannot be had."""
    unconcerned = out_of_scope(service, request, site.templates, now, site.protocol, site.terminology)
    if unconcerned is not None:  # most chart opens: answered from one key, before the others
        return unconcerned
    wanted = {key: site.templates[key] for key in service.prefetch_keys}
    gathered = resolve_prefetch(wanted, request, client, settings, set(service.required_keys),
                                server_allowed=server_allowed, cutoffs=prefetch_cutoffs(site.protocol, now))
    call = HookCall(service, request, gathered.resources, gathered.failures, now, site.protocol, site.terminology,
                    site.zone, ehr=site.ehr)
    call.notes["sources"] = gathered.sources
    return call


def patient_view(call: HookCall) -> list[dict]:
    """CRS and ICANS grades with evidence, dosing and pitfalls; no card when out of scope."""
    assessment = _assess_or_412(call)
    return assessment_cards(assessment, call.terminology, call.quiet_when_normal, call.protocol_url, call.ehr)


def _draft_resources(call: HookCall) -> list[dict]:
    draft = call.context["draftOrders"]
    if "type" not in draft:
        call.notes["lenient"] = "draftOrders without Bundle.type"
    try:
        return resources_in(draft)
    except BundleError as error:
        raise BadRequest(f"context.draftOrders: {error}", expression="context.draftOrders") from None


def order_sign(call: HookCall) -> list[dict]:
    """GM-CSF after IEC therapy, steroid premedication before CAR-T, tocilizumab order checks."""
    return _order_checks(call, selections=None)


def order_select(call: HookCall) -> list[dict]:
    """The same checks as order-sign, on the selected orders only."""
    return _order_checks(call, selections=call.context["selections"])


def _order_checks(call: HookCall, selections: list[str] | None) -> list[dict]:
    # An unread MedicationRequest source changes no grade (it only hides a scheduled CAR-T): noted
    # in the call's log line, not passed to the grading.
    orders_unread = [u for u in call.unread if u.reference == "prefetch:medicationRequests"]
    if orders_unread:
        call.notes["medicationRequests"] = "unread: " + orders_unread[0].reason
    unread = [u for u in call.unread if u not in orders_unread]
    assessment, findings = review_orders(_draft_resources(call), call.resources, call.now, selections,
                                         call.protocol, call.terminology, unread, zone=call.zone)
    if not assessment.assessable:
        raise PreconditionFailed("the patient's medication administrations could not be read")
    call.notes["grades"] = {"crs": assessment.crs.value, "icans": assessment.icans.value}
    call.notes["read"] = assessment.reading or None
    return finding_cards(findings, assessment, call.terminology, call.protocol_url, ehr=call.ehr)


ALL_KEYS = ("patient", *OBSERVATION_KEYS, "medications")
REQUIRED = frozenset(ALL_KEYS) - {"patient"}
ORDER_KEYS = (*ALL_KEYS, "medicationRequests")  # fetched when not prefetched; not required (no grade needs it)

SERVICES = [
    ServiceDeclaration(
        id="crs-icans-assessment",
        hook="patient-view",
        title="CRS and ICANS grading after CAR-T or T-cell engager therapy",
        description="Grades cytokine release syndrome and ICANS by the ASTCT 2019 consensus for patients within "
                    "30/60 days of CAR-T or bispecific T-cell engager therapy, with the evidence, weight-based "
                    "tocilizumab and corticosteroid dosing, and pitfalls (e.g. tocilizumab in concurrent ICANS). "
                    "Silent for other patients.",
        handler=patient_view, prefetch_keys=ALL_KEYS, required_keys=REQUIRED, scope_key="medications",
        usage_requirements="Needs read access to Patient, Observation (vital signs, weight, ferritin, ICANS "
                           "assessments coded in http://crs-cds.org/fhir/CodeSystem/iec-toxicity) and "
                           "MedicationAdministration."),
    ServiceDeclaration(
        id="crs-order-safety-sign",
        hook="order-sign",
        title="CAR-T/T-cell engager order safety (sign)",
        description="At signing: warns on GM-CSF after IEC therapy (suggests removing it or ordering filgrastim), "
                    "steroid premedication before CAR-T, and tocilizumab orders outside the protocol's dose and "
                    "limits (with the computed dose).",
        handler=order_sign, prefetch_keys=ORDER_KEYS, required_keys=REQUIRED),
    ServiceDeclaration(
        id="crs-order-safety-select",
        hook="order-select",
        title="CAR-T/T-cell engager order safety (select)",
        description="The order-sign checks, run as orders are selected, on the selected orders only.",
        handler=order_select, prefetch_keys=ORDER_KEYS, required_keys=REQUIRED),
]
SERVICES_BY_ID = {service.id: service for service in SERVICES}
