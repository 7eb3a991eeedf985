"""The benchmark's request bodies, built once with the project's own chart builder.

A  patient-view, out of scope (no IEC therapy), small prefetch: the scenario ``no-iec-therapy``.
B  patient-view, an ICU patient 3 days after CAR-T: 72 h of vitals every 15 minutes (temperature, BP
   panel, SpO2 with an O2-flow component, oxygen device: 1,152 Observations), weight, ICE scores,
   ferritin and CRP, 40 MedicationAdministrations and the CAR-T infusion, all in the prefetch.
C  order-sign for the B patient with three draft MedicationRequests (sargramostim, dexamethasone,
   ondansetron), with B's prefetch.
D  B with no prefetch: ``fhirServer`` points at a FHIR server loaded with B's transaction Bundle.
B-cold  B as a chart the service has never seen: COLD_VARIANTS copies of B (``fresh_ids``), every
   resource id, reference, fullUrl and the patient id made new, rotated by the load generator, which
   also writes a fresh value for CALL_TAG into every id at every call: no two calls send the same ids.
Mix  chart opens as a hospital makes them (``mix_bodies``): 85% out of scope (A's shape, each a
   patient of its own, some with a few more non-IEC medications), 12% B-cold, 3% B reopened unchanged.

The prefetch is what ``cds_service.examples.prefetch_for`` answers for the discovery templates, i.e.
searchset Bundles newest first. For B and C the templates' ``_count`` is dropped, so the client sends
every match (as a client that follows the pages itself would): all 1,165 Observations are in the
prefetch, whatever page sizes the templates ask for.
"""
from __future__ import annotations

import copy
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cds_service.examples import prefetch_for
from cds_service.hooks.registry import SERVICES_BY_ID, prefetch_templates
from cds_service.scenarios import (ACETAMINOPHEN, DEXAMETHASONE, NASAL_CANNULA, NOREPINEPHRINE, ROOM_AIR,
                                   TOCILIZUMAB, VASOPRESSIN, YESCARTA, Chart, Drug, Scenario, by_name)
from cds_service.terminology import load_terminology
from loadgen import CALL_TAG

PATIENT_VIEW = "crs-icans-assessment"
ORDER_SIGN = "crs-order-safety-sign"
ICU_PATIENT = "bench-icu-72h"

SARGRAMOSTIM = Drug("Leukine (sargramostim) 250 mcg/m2 IV daily")
ONDANSETRON = Drug("ondansetron 8 mg IV")

# CALL_TAG is written into every id of a cold body; the load generator replaces it at each call with
# a value of its own (letters and digits), so that no two calls carry the same ids.
COLD_VARIANTS = 50           # B-cold: distinct copies of B in the rotation
MIX_SHARES = {"out of scope": 85, "B-cold": 12, "B": 3}   # Mix: bodies per 100 in the rotation


@dataclass
class Workload:
    name: str
    title: str
    service_id: str
    body: dict
    expect_cards: bool          # False: the answer must be exactly {"cards": []}
    path: Path | None = None    # the body as written to disk; for a rotation, the list of its bodies' files
    size: int = 0               # its size in bytes (a rotation: the mean of its bodies')
    # A rotation: the bodies the load generator sends in turn (``body`` is the first), whether each
    # must have cards, and what they are (for the report)
    variants: list[dict] = field(default_factory=list)
    variant_cards: list[bool] = field(default_factory=list)
    makeup: str = ""

    @property
    def url_path(self) -> str:
        return f"/cds-services/{self.service_id}"

    @property
    def rotation(self) -> bool:
        return bool(self.variants)


# ---- the B chart ---------------------------------------------------------------------------------------

def icu_chart(now: datetime) -> list[dict]:
    """72 h of ICU charting after axi-cel: fever from day 0.25, hypotension and vasopressors in the
    last 12 h, nasal cannula oxygen in the last 24 h, tocilizumab and dexamethasone."""
    c = Chart(ICU_PATIENT, now, "Benchmark", "Bea", "female", 58)
    noise = random.Random(20240521)  # the same chart every run
    c.weight(82, days_ago=3.2)
    c.iec(YESCARTA, days_ago=3)
    for step in range(288):  # every 15 minutes for 72 h, newest 6 minutes ago
        hours_ago = 0.1 + step * 0.25
        on_oxygen = hours_ago <= 24
        febrile = hours_ago <= 66
        c.temp(round((38.3 if febrile else 36.9) + noise.uniform(-0.2, 1.1 if febrile else 0.3), 1), hours_ago)
        if hours_ago <= 12:
            c.bp(noise.randint(84, 98), noise.randint(44, 58), hours_ago)
        else:
            c.bp(noise.randint(108, 126), noise.randint(64, 78), hours_ago)
        c.o2_device(NASAL_CANNULA if on_oxygen else ROOM_AIR, hours_ago)
        c.spo2(noise.randint(93, 97) if on_oxygen else noise.randint(95, 99), hours_ago,
               flow=2 if on_oxygen else None)
    for hours_ago in range(2, 72, 12):
        c.ice(10, hours_ago)
    for hours_ago in (60, 36, 12):
        c.ferritin(noise.randint(900, 4200), hours_ago)
        c.crp(noise.randint(60, 190), hours_ago)
    _icu_medications(c)
    return c.resources


def _icu_medications(c: Chart) -> None:
    """40 MedicationAdministrations: titrated norepinephrine (12) and vasopressin (3) with the last
    segment of each still running, tocilizumab (3), dexamethasone q6h (5), acetaminophen q4h (17)."""
    for start in range(12, 0, -1):  # a new administration at each hourly rate change
        rate = (round(0.04 + 0.01 * (12 - start), 2), "ug/kg/min")
        c.infusion(NOREPINEPHRINE, started_hours_ago=start, rate=rate,
                   stopped_hours_ago=None if start == 1 else start - 1)
    for start in (6, 4, 2):
        c.infusion(VASOPRESSIN, started_hours_ago=start, rate=(0.03, "U/min"),
                   stopped_hours_ago=None if start == 2 else start - 2)
    for hours_ago in (48, 36, 20):
        c.give(TOCILIZUMAB, hours_ago=hours_ago, dose_mg=656)
    for hours_ago in (30, 24, 18, 12, 6):
        c.give(DEXAMETHASONE, hours_ago=hours_ago, dose_mg=10)
    for hours_ago in range(66, 0, -4):
        c.give(ACETAMINOPHEN, hours_ago=hours_ago, dose_mg=650, route="PO")


ICU_SCENARIO = Scenario(ICU_PATIENT, "Benchmark ICU patient", "72 h of ICU charting 3 days after CAR-T.",
                        None, None, icu_chart)


# ---- hook requests ---------------------------------------------------------------------------------------

def _templates(service_id: str, whole_result_sets: bool) -> dict[str, str]:
    templates = prefetch_templates(load_terminology())
    chosen = {key: templates[key] for key in SERVICES_BY_ID[service_id].prefetch_keys}
    if whole_result_sets:
        chosen = {key: re.sub(r"&_count=\d+", "", template) for key, template in chosen.items()}
    return chosen


def _request(service_id: str, patient_id: str) -> dict:
    return {"hook": SERVICES_BY_ID[service_id].hook, "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/benchmark", "patientId": patient_id}}


def with_prefetch(service_id: str, resources: list[dict], patient_id: str, whole_result_sets: bool) -> dict:
    request = _request(service_id, patient_id)
    request["prefetch"] = prefetch_for(resources, patient_id, _templates(service_id, whole_result_sets))
    return request


def draft_orders(patient_id: str, now: datetime) -> dict:
    """Three draft MedicationRequests as an order-sign ``draftOrders`` Bundle."""
    orders = [(SARGRAMOSTIM, "250 mcg/m2 IV once daily"), (DEXAMETHASONE, "10 mg IV every 6 hours"),
              (ONDANSETRON, "8 mg IV every 8 hours as needed for nausea")]
    entries = []
    for number, (drug, instruction) in enumerate(orders, start=1):
        entries.append({"resource": {
            "resourceType": "MedicationRequest", "id": f"bench-draft-{number}", "status": "draft",
            "intent": "order", "subject": {"reference": f"Patient/{patient_id}"},
            "medicationCodeableConcept": drug.concept(), "authoredOn": now.date().isoformat(),
            "dosageInstruction": [{"text": instruction}]}})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# ---- cold charts ---------------------------------------------------------------------------------------

def _top_resources(body: dict) -> list[dict]:
    """The resources a hook request carries: each prefetch value (a Bundle's entries, or one
    resource) and the context's draft orders. Contained resources are not among them."""
    found = []
    holders = list((body.get("prefetch") or {}).values())
    holders.append((body.get("context") or {}).get("draftOrders"))
    for value in holders:
        if not isinstance(value, dict):
            continue
        if value.get("resourceType") == "Bundle":
            found += [e["resource"] for e in value.get("entry") or [] if isinstance(e.get("resource"), dict)]
        else:
            found.append(value)
    return found


def _renamed_reference(reference: str, ids: dict[tuple[str, str], str]) -> str:
    """``Type/id``, ``Type/id/_history/n`` or an absolute URL ending so, with the id renamed."""
    parts = reference.split("/")
    at = len(parts) - 4 if len(parts) >= 4 and parts[-2] == "_history" else len(parts) - 2
    if at < 0 or (parts[at], parts[at + 1]) not in ids:
        return reference
    parts[at + 1] = ids[(parts[at], parts[at + 1])]
    return "/".join(parts)


def fresh_ids(body: dict, tag: str) -> dict:
    """A copy of a hook request as another patient's chart: every resource's id, every reference to
    one, each entry's fullUrl, the patient id (and the Patient's identifiers) and the hookInstance
    made new with ``tag`` (letters, digits and '-'). Contents, times and meta are left alone, so the
    copy is graded as the original is."""
    body = copy.deepcopy(body)
    context = body["context"]
    patient = context["patientId"]
    ids = {("Patient", patient): f"{patient}-{tag}"}
    resources = _top_resources(body)
    for resource in resources:
        ids[(resource["resourceType"], resource["id"])] = f"{resource['id']}-{tag}"
    full_urls = {}
    for value in (body.get("prefetch") or {}).values():
        for entry in (value or {}).get("entry") or []:
            if "fullUrl" in entry:
                new = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, tag + entry['fullUrl'])}"
                full_urls[entry["fullUrl"]] = entry["fullUrl"] = new
    for resource in resources:
        resource["id"] = ids[(resource["resourceType"], resource["id"])]
        if resource["resourceType"] == "Patient":
            for identifier in resource.get("identifier") or []:
                if "value" in identifier:
                    identifier["value"] = f"{identifier['value']}-{tag}"

    def walk(value: object) -> None:
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str):
                value["reference"] = full_urls.get(reference) or _renamed_reference(reference, ids)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(body)
    context["patientId"] = ids[("Patient", patient)]
    body["hookInstance"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{body.get('hookInstance')}/{tag}"))
    return body


def cold_tag(variant: int) -> str:
    """The ids' tag of a cold body: the variant's number, then CALL_TAG for the load generator."""
    return f"v{variant:03d}{CALL_TAG}"


def out_of_scope_chart(number: int, now: datetime) -> list[dict]:
    """A chart of A's shape (fever, hypotension on norepinephrine, oxygen; no IEC therapy) for a
    patient of its own; one in two with one to three more non-IEC medications."""
    c = Chart(f"bench-opd-{number:03d}", now, "Outpatient", f"P{number}", "male" if number % 2 else "female",
              40 + number % 40)
    c.weight(60 + number % 30, days_ago=1)
    c.temp(round(38.5 + (number % 10) / 10, 1), hours_ago=2)
    c.bp(80 + number % 10, 44, hours_ago=3)
    c.infusion(NOREPINEPHRINE, started_hours_ago=2.5, rate=(0.12, "ug/kg/min"))
    c.o2_device(NASAL_CANNULA, hours_ago=2)
    c.o2_flow(2 + number % 4, hours_ago=2)
    extra = [(ACETAMINOPHEN, 650, "PO"), (ONDANSETRON, 8, "IV"), (DEXAMETHASONE, 10, "IV")]
    for drug, dose, route in extra[:number % 2 and 1 + number % 3]:
        c.give(drug, hours_ago=1 + number % 5, dose_mg=dose, route=route)
    return c.resources


def mix_bodies(now: datetime, b: dict) -> tuple[list[dict], list[bool]]:
    """The Mix rotation, MIX_SHARES in 100 bodies spread out: out-of-scope charts each for a new
    patient (fresh ids at every call too), B-cold copies, and B itself (a chart reopened unchanged).
    Returns the bodies and whether each must have cards."""
    bodies: list[tuple[dict, bool]] = []
    for number in range(MIX_SHARES["out of scope"]):
        chart = with_prefetch(PATIENT_VIEW, out_of_scope_chart(number, now), f"bench-opd-{number:03d}",
                              whole_result_sets=False)
        bodies.append((fresh_ids(chart, f"m{number:03d}{CALL_TAG}"), False))
    bodies += [(fresh_ids(b, f"m{number:03d}{CALL_TAG}"), True) for number in range(MIX_SHARES["B-cold"])]
    bodies += [(b, True)] * MIX_SHARES["B"]
    random.Random(7).shuffle(bodies)
    return [body for body, _ in bodies], [cards for _, cards in bodies]


def build_workloads(now: datetime, fhir_base_url: str) -> list[Workload]:
    small = by_name("no-iec-therapy")
    icu = ICU_SCENARIO.resources(now)
    a = with_prefetch(PATIENT_VIEW, small.resources(now), small.name, whole_result_sets=False)
    b = with_prefetch(PATIENT_VIEW, icu, ICU_PATIENT, whole_result_sets=True)
    c = with_prefetch(ORDER_SIGN, icu, ICU_PATIENT, whole_result_sets=True)
    c["context"]["draftOrders"] = draft_orders(ICU_PATIENT, now)
    d = _request(PATIENT_VIEW, ICU_PATIENT)
    d["fhirServer"] = fhir_base_url
    cold = [fresh_ids(b, cold_tag(variant)) for variant in range(COLD_VARIANTS)]
    mix, mix_cards = mix_bodies(now, b)
    shares = ", ".join(f"{share}% {name}" for name, share in MIX_SHARES.items())
    return [
        Workload("A", "patient-view, out of scope, small prefetch", PATIENT_VIEW, a, expect_cards=False),
        Workload("B", "patient-view, ICU 72 h, full prefetch", PATIENT_VIEW, b, expect_cards=True),
        Workload("C", "order-sign, 3 draft orders, B's prefetch", ORDER_SIGN, c, expect_cards=True),
        Workload("D", "patient-view, B's data from fhirServer", PATIENT_VIEW, d, expect_cards=True),
        Workload("B-cold", "B as a new chart at every call (fresh patient and resource ids)", PATIENT_VIEW,
                 cold[0], expect_cards=True, variants=cold, variant_cards=[True] * len(cold),
                 makeup=f"{len(cold)} copies of B, fresh ids at every call"),
        Workload("Mix", f"chart opens: {shares}", PATIENT_VIEW, mix[0], expect_cards=mix_cards[0],
                 variants=mix, variant_cards=mix_cards,
                 makeup=f"{len(mix)} bodies: {shares}; fresh ids at every call but B's"),
    ]


def write_bodies(workloads: list[Workload], folder: Path) -> None:
    """Each body to a file; a rotation's bodies each to its own, listed one a line in ``path``."""
    for workload in workloads:
        if not workload.rotation:
            workload.path = folder / f"workload-{workload.name}.json"
            workload.path.write_text(json.dumps(workload.body, separators=(",", ":")), encoding="utf-8")
            workload.size = workload.path.stat().st_size
            continue
        paths = []
        for number, body in enumerate(workload.variants):
            paths.append(folder / f"workload-{workload.name}-{number:03d}.json")
            paths[-1].write_text(json.dumps(body, separators=(",", ":")), encoding="utf-8")
        workload.path = folder / f"workload-{workload.name}.list"
        workload.path.write_text("".join(f"{path}\n" for path in paths), encoding="utf-8")
        workload.size = round(sum(path.stat().st_size for path in paths) / len(paths))


def with_call_tag(text: str, value: str) -> str:
    """A cold body's text as the load generator sends it, CALL_TAG made ``value``."""
    return text.replace(CALL_TAG, value)


def icu_transaction(now: datetime) -> dict:
    """B's chart as a FHIR transaction Bundle (PUTs with the chart's ids) for the FHIR server."""
    return ICU_SCENARIO.bundle(now)


def resource_counts(workload: Workload) -> str:
    """'1165 Observation, 41 MedicationAdministration, 1 Patient' for a prefetched body; what a
    rotation holds."""
    if workload.rotation:
        return workload.makeup
    counts: dict[str, int] = {}
    for value in (workload.body.get("prefetch") or {}).values():
        if not value:
            continue
        for resource in ([e["resource"] for e in value.get("entry", [])] if value["resourceType"] == "Bundle"
                         else [value]):
            counts[resource["resourceType"]] = counts.get(resource["resourceType"], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no prefetch"
