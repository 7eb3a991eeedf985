"""Ready-made hook requests for people trying the service: a scenario's chart, answered the way a
CDS client answers the discovery prefetch templates (searchset Bundles, newest first)."""
from __future__ import annotations

import re
import uuid
from datetime import datetime
from urllib.parse import parse_qs

from .hooks.registry import SERVICES_BY_ID, prefetch_templates
from .scenarios import Scenario
from .terminology import codeable_codes, load_terminology

PATIENT_VIEW = "crs-icans-assessment"


def _matches(resource: dict, query: str, patient_id: str) -> bool:
    """What a FHIR server returns for one of our templates (patient, code list), done locally."""
    resource_type, _, params = query.partition("?")
    if resource.get("resourceType") != resource_type:
        return False
    subject = (resource.get("subject") or {}).get("reference", "")
    if subject != f"Patient/{patient_id}":
        return False
    wanted = parse_qs(params).get("code")
    if not wanted:
        return True
    codes = {tuple(c.split("|", 1)) for c in wanted[0].split(",")}
    return bool(codes & set(codeable_codes(resource.get("code"))))


def _newest_first(resource: dict) -> str:
    return resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start") or ""


def _as_stored(resource: dict) -> dict:
    """A resource as a FHIR server returns it: with its version and last update in meta."""
    stored = dict(resource)
    stored.setdefault("meta", {"versionId": "1", "lastUpdated": _newest_first(resource) or "2026-01-01T00:00:00Z"})
    return stored


def prefetch_for(resources: list[dict], patient_id: str, templates: dict[str, str]) -> dict:
    prefetch = {}
    for key, template in templates.items():
        query = template.replace("{{context.patientId}}", patient_id)
        if "?" not in query:
            found = next((r for r in resources if f"{r['resourceType']}/{r['id']}" == query), None)
            prefetch[key] = _as_stored(found) if found else None
            continue
        count = int(re.search(r"_count=(\d+)", query).group(1)) if "_count=" in query else None
        hits = sorted((r for r in resources if _matches(r, query, patient_id)), key=_newest_first, reverse=True)
        hits = [_as_stored(r) for r in (hits[:count] if count else hits)]
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                         "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['id'])}",
                                    "resource": r, "search": {"mode": "match"}} for r in hits]}
    return prefetch


def hook_request(scenario: Scenario, now: datetime, service_id: str = PATIENT_VIEW) -> dict:
    service = SERVICES_BY_ID[service_id]
    templates = prefetch_templates(load_terminology())
    resources = scenario.resources(now)
    return {
        "hook": service.hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": scenario.name},
        "prefetch": prefetch_for(resources, scenario.name, {k: templates[k] for k in service.prefetch_keys}),
    }


def gm_csf_order_sign_request(now: datetime, scenario: Scenario) -> dict:
    """order-sign for an in-scope patient with a GM-CSF draft order, shaped as the CDS Hooks
    Sandbox sends it (no Bundle.type, no intent, category as a single object)."""
    request = hook_request(scenario, now, "crs-order-safety-sign")
    request["context"]["draftOrders"] = {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "MedicationRequest", "id": "request-123", "status": "draft",
        "subject": {"reference": f"Patient/{scenario.name}"}, "category": {"text": "inpatient"},
        "medicationCodeableConcept": {"text": "Leukine (sargramostim) 250 mcg/m2 IV daily"},
        "authoredOn": now.date().isoformat()}}]}
    return request


__all__ = ["hook_request", "prefetch_for", "gm_csf_order_sign_request"]
