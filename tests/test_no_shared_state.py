"""No state carried between requests can change a grade.

Resource ids and versions are the sender's to choose: two EHRs (or two tenants of one) can send
the same ``Observation/obs-1`` with ``meta.versionId`` "1" and the same ``lastUpdated`` and mean
entirely different things. Two charts reuse every id, versionId and lastUpdated with different
content (febrile with a vasopressor, afebrile with none), and are sent one after the other to one
running service, with authentication on: from the same issuer, from two issuers, from two tenants
of one issuer, in both orders. Each must be graded exactly as it is when sent alone to a fresh app.
"""
from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.app import create_app
from cds_service.examples import prefetch_for
from cds_service.hooks.registry import SERVICES_BY_ID, prefetch_templates
from cds_service.settings import Settings
from cds_service.terminology import load_terminology

SERVICE_ID = "crs-icans-assessment"
SERVICE = f"/cds-services/{SERVICE_ID}"
MAIN_TOPIC = "crsIcansAssessment"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
IEC = "http://crs-cds.org/fhir/CodeSystem/iec-toxicity"

ISSUER_A = "https://ehr-a.example.org"
ISSUER_B = "https://ehr-b.example.org"
TENANTED = "https://cloud-ehr.example.org"
KEYS = {iss: ec.generate_private_key(ec.SECP384R1()) for iss in (ISSUER_A, ISSUER_B, TENANTED)}


def _jwk(iss: str) -> dict:
    return {**ECAlgorithm.to_jwk(KEYS[iss].public_key(), as_dict=True), "kid": "k1", "alg": "ES384", "use": "sig"}


TRUSTED = {ISSUER_A: {"jwks": {"keys": [_jwk(ISSUER_A)]}},
           ISSUER_B: {"jwks": {"keys": [_jwk(ISSUER_B)]}},
           TENANTED: {"jwks": {"keys": [_jwk(TENANTED)]}, "tenants": ["hospital-a", "hospital-b"]}}


def token(iss: str, aud: str, tenant: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    if tenant:
        claims["tenant"] = tenant
    return jwt.encode(claims, KEYS[iss], algorithm="ES384", headers={"typ": "JWT", "kid": "k1"})


# ---- Two charts, the same ids, versions and lastUpdated -----------------------------------------------

def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _observation(oid: str, code: dict, when: str, meta: dict, patient: str, **value) -> dict:
    return {"resourceType": "Observation", "id": oid, "meta": dict(meta), "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": code, "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": when, **value}


def chart(kind: str, ids: str, now: datetime) -> list[dict]:
    """``febrile``: 39.2 °C, SBP 80, norepinephrine running, ICE 10 (CRS 3, ICANS 0).
    ``afebrile``: 36.9 °C, SBP 124, ondansetron given, ICE 6 (no CRS, ICANS 2).
    Every resource id, versionId and lastUpdated is the same in both."""
    febrile = kind == "febrile"
    patient = f"{ids}-pat"
    meta = {"versionId": "1", "lastUpdated": _iso(now - timedelta(minutes=10))}
    two_hours_ago = _iso(now - timedelta(hours=2))
    resources = [
        {"resourceType": "Patient", "id": patient, "meta": dict(meta), "gender": "female", "birthDate": "1966-04-12"},
        {"resourceType": "MedicationAdministration", "id": f"{ids}-ma-1", "meta": dict(meta), "status": "completed",
         "medicationCodeableConcept": {"text": "axicabtagene ciloleucel (Yescarta) suspension for IV infusion"},
         "subject": {"reference": f"Patient/{patient}"},
         "effectivePeriod": {"start": _iso(now - timedelta(days=3, minutes=30)), "end": _iso(now - timedelta(days=3))}},
        _observation(f"{ids}-obs-1", {"coding": [{"system": LOINC, "code": "8310-5", "display": "Body temperature"}]},
                     two_hours_ago, meta, patient,
                     valueQuantity={"value": 39.2 if febrile else 36.9, "unit": "Cel", "system": UCUM, "code": "Cel"}),
        _observation(f"{ids}-obs-2", {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]},
                     two_hours_ago, meta, patient,
                     valueQuantity={"value": 80 if febrile else 124, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}),
        _observation(f"{ids}-obs-3", {"coding": [{"system": IEC, "code": "ice-score", "display": "ICE score"}]},
                     _iso(now - timedelta(hours=1)), meta, patient, valueInteger=10 if febrile else 6),
        _observation(f"{ids}-obs-4", {"coding": [{"system": LOINC, "code": "29463-7", "display": "Body weight"}]},
                     _iso(now - timedelta(days=1)), meta, patient,
                     valueQuantity={"value": 70, "unit": "kg", "system": UCUM, "code": "kg"}),
    ]
    if febrile:
        resources.append({
            "resourceType": "MedicationAdministration", "id": f"{ids}-ma-2", "meta": dict(meta), "status": "in-progress",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "7512", "display": "norepinephrine"}],
                                          "text": "norepinephrine 4 mg in dextrose 5% 250 mL infusion"},
            "subject": {"reference": f"Patient/{patient}"},
            "effectivePeriod": {"start": _iso(now - timedelta(hours=3))},
            "dosage": {"route": {"text": "IV"},
                       "rateQuantity": {"value": 0.1, "unit": "mcg/kg/min", "system": UCUM, "code": "ug/kg/min"}}})
    else:
        resources.append({
            "resourceType": "MedicationAdministration", "id": f"{ids}-ma-2", "meta": dict(meta), "status": "completed",
            "medicationCodeableConcept": {"text": "ondansetron 4 mg IV"},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": _iso(now - timedelta(hours=3)),
            "dosage": {"route": {"text": "IV"}, "dose": {"value": 4, "unit": "mg", "system": UCUM, "code": "mg"}}})
    return resources


EXPECTED = {"febrile": (3, 0), "afebrile": (0, 2)}


def request_for(kind: str, ids: str, now: datetime) -> dict:
    service = SERVICES_BY_ID[SERVICE_ID]
    templates = prefetch_templates(load_terminology())
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": f"{ids}-pat"},
            "prefetch": prefetch_for(chart(kind, ids, now), f"{ids}-pat",
                                     {k: templates[k] for k in service.prefetch_keys})}


def outcome(answer) -> dict:
    """The grades, "at least" flags and headline of the answer."""
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    main = next((c for c in cards if c["source"].get("topic", {}).get("code") == MAIN_TOPIC), None)
    assert main is not None, cards
    summary = main["summary"]
    grades = {}
    for syndrome in ("CRS", "ICANS"):
        found = re.search(rf"\b{syndrome} grade (at least )?(\d)", summary)
        grades[syndrome] = (int(found[2]), bool(found[1])) if found else (0 if re.search(rf"\b[Nn]o {syndrome}\b", summary) else None,
                                                                         False)
    return {"crs": grades["CRS"], "icans": grades["ICANS"], "summary": summary,
            "cardTypes": sorted(c["source"].get("topic", {}).get("code", "") for c in cards)}


# ---- The service, as clients call it ------------------------------------------------------------------

SENDERS = {
    "same-issuer": ({"iss": ISSUER_A}, {"iss": ISSUER_A}),
    "two-issuers": ({"iss": ISSUER_A}, {"iss": ISSUER_B}),
    "two-tenants": ({"iss": TENANTED, "tenant": "hospital-a"}, {"iss": TENANTED, "tenant": "hospital-b"}),
}


@pytest.fixture
def make_service(serve_app, tmp_path):
    def make():
        return serve_app(create_app(Settings(feedback_db=str(tmp_path / f"fb-{uuid.uuid4().hex}.sqlite3"),
                                             trusted_issuers=TRUSTED, fhir_budget_seconds=5,
                                             fhir_timeout_seconds=4, quiet_when_normal=False)))
    return make


def send(service, body: dict, sender: dict):
    headers = {"Authorization": f"Bearer {token(sender['iss'], service.base + SERVICE, sender.get('tenant'))}"}
    return service.post(SERVICE, body, headers=headers)


def alone(make_service, kind: str, sender: dict, now: datetime) -> dict:
    """The chart sent alone to a fresh app, with ids of its own (no other chart ever used them)."""
    return outcome(send(make_service(), request_for(kind, uuid.uuid4().hex[:10], now), sender))


@pytest.mark.parametrize("order", [("febrile", "afebrile"), ("afebrile", "febrile")], ids=["febrile-first",
                                                                                          "afebrile-first"])
@pytest.mark.parametrize("senders", list(SENDERS), ids=list(SENDERS))
def test_a_chart_reusing_ids_and_versions_is_graded_as_if_alone(make_service, senders, order):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    first_sender, second_sender = SENDERS[senders]
    baseline = {order[0]: alone(make_service, order[0], first_sender, now),
                order[1]: alone(make_service, order[1], second_sender, now)}
    for kind, result in baseline.items():  # the baseline itself is right by ASTCT
        assert (result["crs"][0], result["icans"][0]) == EXPECTED[kind], (kind, result)
        assert not result["crs"][1] and not result["icans"][1], (kind, result)

    shared_ids = uuid.uuid4().hex[:10]
    service = make_service()
    first = outcome(send(service, request_for(order[0], shared_ids, now), first_sender))
    second = outcome(send(service, request_for(order[1], shared_ids, now), second_sender))
    assert first == baseline[order[0]], f"{order[0]} sent first: {first} != alone {baseline[order[0]]}"
    assert second == baseline[order[1]], (
        f"{order[1]} sent after {order[0]} with the same ids/versions ({senders}): {second} != alone "
        f"{baseline[order[1]]}")


def test_the_two_charts_really_share_every_id_version_and_timestamp():
    now = datetime.now(timezone.utc).replace(microsecond=0)
    a, b = chart("febrile", "x", now), chart("afebrile", "x", now)
    assert [(r["resourceType"], r["id"], r["meta"]) for r in a] == [(r["resourceType"], r["id"], r["meta"]) for r in b]
    assert a != b
