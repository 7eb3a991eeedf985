"""The benchmark's request bodies, built once with the project's own chart builder.

A  patient-view, out of scope (no IEC therapy), small prefetch: the scenario ``no-iec-therapy``.
B  patient-view, an ICU patient 3 days after CAR-T: 72 h of vitals every 15 minutes (temperature, BP
   panel, SpO2 with an O2-flow component, oxygen device: 1,152 Observations), weight, ICE scores,
   ferritin and CRP, 40 MedicationAdministrations and the CAR-T infusion, all in the prefetch.
C  order-sign for the B patient with three draft MedicationRequests (sargramostim, dexamethasone,
   ondansetron), with B's prefetch.
D  B with no prefetch: ``fhirServer`` points at a FHIR server loaded with B's transaction Bundle.

The prefetch is what ``cds_service.examples.prefetch_for`` answers for the discovery templates, i.e.
searchset Bundles newest first. For B and C the templates' ``_count`` is dropped, so the client sends
every match (as a client that follows the pages itself would): all 1,165 Observations are in the
prefetch, whatever page sizes the templates ask for.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cds_service.examples import prefetch_for
from cds_service.hooks.registry import SERVICES_BY_ID, prefetch_templates
from cds_service.scenarios import (ACETAMINOPHEN, DEXAMETHASONE, NASAL_CANNULA, NOREPINEPHRINE, ROOM_AIR,
                                   TOCILIZUMAB, VASOPRESSIN, YESCARTA, Chart, Drug, Scenario, by_name)
from cds_service.terminology import load_terminology

PATIENT_VIEW = "crs-icans-assessment"
ORDER_SIGN = "crs-order-safety-sign"
ICU_PATIENT = "bench-icu-72h"

SARGRAMOSTIM = Drug("Leukine (sargramostim) 250 mcg/m2 IV daily")
ONDANSETRON = Drug("ondansetron 8 mg IV")


@dataclass
class Workload:
    name: str
    title: str
    service_id: str
    body: dict
    expect_cards: bool          # False: the answer must be exactly {"cards": []}
    path: Path | None = None    # the body as written to disk
    size: int = 0               # its size in bytes

    @property
    def url_path(self) -> str:
        return f"/cds-services/{self.service_id}"


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


def build_workloads(now: datetime, fhir_base_url: str) -> list[Workload]:
    small = by_name("no-iec-therapy")
    icu = ICU_SCENARIO.resources(now)
    a = with_prefetch(PATIENT_VIEW, small.resources(now), small.name, whole_result_sets=False)
    b = with_prefetch(PATIENT_VIEW, icu, ICU_PATIENT, whole_result_sets=True)
    c = with_prefetch(ORDER_SIGN, icu, ICU_PATIENT, whole_result_sets=True)
    c["context"]["draftOrders"] = draft_orders(ICU_PATIENT, now)
    d = _request(PATIENT_VIEW, ICU_PATIENT)
    d["fhirServer"] = fhir_base_url
    return [
        Workload("A", "patient-view, out of scope, small prefetch", PATIENT_VIEW, a, expect_cards=False),
        Workload("B", "patient-view, ICU 72 h, full prefetch", PATIENT_VIEW, b, expect_cards=True),
        Workload("C", "order-sign, 3 draft orders, B's prefetch", ORDER_SIGN, c, expect_cards=True),
        Workload("D", "patient-view, B's data from fhirServer", PATIENT_VIEW, d, expect_cards=True),
    ]


def write_bodies(workloads: list[Workload], folder: Path) -> None:
    for workload in workloads:
        workload.path = folder / f"workload-{workload.name}.json"
        workload.path.write_text(json.dumps(workload.body, separators=(",", ":")), encoding="utf-8")
        workload.size = workload.path.stat().st_size


def icu_transaction(now: datetime) -> dict:
    """B's chart as a FHIR transaction Bundle (PUTs with the chart's ids) for the FHIR server."""
    return ICU_SCENARIO.bundle(now)


def resource_counts(workload: Workload) -> str:
    """'1165 Observation, 41 MedicationAdministration, 1 Patient' for a prefetched body."""
    counts: dict[str, int] = {}
    for value in (workload.body.get("prefetch") or {}).values():
        if not value:
            continue
        for resource in ([e["resource"] for e in value.get("entry", [])] if value["resourceType"] == "Bundle"
                         else [value]):
            counts[resource["resourceType"]] = counts.get(resource["resourceType"], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no prefetch"
