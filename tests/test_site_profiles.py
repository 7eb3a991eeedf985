"""Site profiles: one deployment serving several sites, each chosen by the authenticated client's
issuer (and tenant), with its own EHR dialect, codes, protocol and time zone."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.app import create_app
from cds_service.examples import prefetch_for
from cds_service.hooks.registry import ORACLE_MAX_COUNT, VITAL_SIGNS_KEYS, prefetch_templates
from cds_service.scenarios import YESCARTA, Chart
from cds_service.settings import Settings, SettingsError
from cds_service.site import Sites
from cds_service.terminology import load_terminology

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "/cds-services/crs-icans-assessment"
ROWS = "urn:oid:1.2.840.114350.1.13.0.1.7.2.707679"
HOSPITAL_A, HOSPITAL_B, CLOUD = "https://epic-a.example.org", "https://oracle-b.example.org", "https://cloud.example.org"
KEYS = {iss: ec.generate_private_key(ec.SECP384R1()) for iss in (HOSPITAL_A, HOSPITAL_B, CLOUD)}


# ---- Template dialects ---------------------------------------------------------------------------

def test_each_ehr_kind_has_its_template_dialect():
    terms = load_terminology()
    generic, epic, oracle = (prefetch_templates(terms, ehr) for ehr in ("generic", "epic", "oracle-health"))
    assert "_include=MedicationAdministration:medication" in generic["medications"]
    for key in ("temperatures", "bloodPressures", "oxygen", "assessments"):
        assert "_sort=-date" in generic[key] and "category=" not in generic[key]
        assert ("&category=vital-signs" in epic[key]) == (key in VITAL_SIGNS_KEYS) and "_sort=-date" in epic[key]
        count = int(oracle[key].rsplit("_count=", 1)[1])
        assert "_sort" not in oracle[key] and count <= ORACLE_MAX_COUNT
    for templates in (epic, oracle):
        assert "_include" not in templates["medications"]
    assert int(oracle["medications"].rsplit("_count=", 1)[1]) <= ORACLE_MAX_COUNT


def test_the_install_sheet_prints_templates_and_scopes():
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "prefetch", "--ehr", "epic", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    sheet = json.loads(result.stdout)
    assert sheet["ehr"] == "epic"
    epic = prefetch_templates(load_terminology(), "epic")
    for service in sheet["services"]:
        assert service["prefetch"] == {key: epic[key] for key in service["prefetch"]} and service["prefetch"]
    assert sheet["scopes"] == ["patient/Medication.read", "patient/MedicationAdministration.read",
                               "patient/MedicationRequest.read", "patient/Observation.read", "patient/Patient.read"]


# ---- Choosing the site ----------------------------------------------------------------------------

def _site_terms(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ValueSet-site-temperature.json").write_text(json.dumps({
        "resourceType": "ValueSet", "id": "site-temperature", "url": "http://crs-cds.org/fhir/ValueSet/body-temperature",
        "compose": {"include": [{"system": ROWS, "concept": [{"code": "6", "display": "Temperature"}]}]}}))
    return folder


def _settings(tmp_path: Path) -> Settings:
    def jwk(iss):
        return {**ECAlgorithm.to_jwk(KEYS[iss].public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}

    return Settings(
        feedback_db=str(tmp_path / "feedback.sqlite3"), quiet_when_normal=False,
        trusted_issuers={HOSPITAL_A: {"jwks": {"keys": [jwk(HOSPITAL_A)]}},
                         HOSPITAL_B: {"jwks": {"keys": [jwk(HOSPITAL_B)]}},
                         CLOUD: {"jwks": {"keys": [jwk(CLOUD)]}, "tenants": ["north", "south"]}},
        profiles={
            "hospital-a": {"iss": HOSPITAL_A, "ehr": "epic", "terminology_dirs": [str(_site_terms(tmp_path / "a"))],
                           "time_zone": "America/Chicago"},
            "hospital-b": {"iss": HOSPITAL_B, "ehr": "oracle-health"},
            "cloud-north": {"iss": CLOUD, "tenant": "north", "terminology_dirs": [str(tmp_path / "a")]},
        })


def test_the_site_is_chosen_by_issuer_then_tenant_else_the_default(tmp_path):
    sites = Sites.from_settings(_settings(tmp_path))
    assert sites.for_client(HOSPITAL_A).name == "hospital-a" and sites.for_client(HOSPITAL_A).ehr == "epic"
    assert str(sites.for_client(HOSPITAL_A).zone) == "America/Chicago"
    assert sites.for_client(HOSPITAL_B).ehr == "oracle-health"
    assert sites.for_client(CLOUD, "north").name == "cloud-north"
    assert sites.for_client(CLOUD, "south").name == "default" and sites.for_client("https://other").name == "default"


@pytest.mark.parametrize("profile, words", [
    ({"ehr": "epic"}, "iss"), ({"iss": "x", "ehr": "cerner"}, "ehr must be one of"),
    ({"iss": "x", "time_zone": "Nowhere/Land"}, "time_zone"), ({"iss": "x", "protocol": "p.json"}, "unknown keys protocol"),
])
def test_a_bad_profile_stops_start_up_naming_it(tmp_path, profile, words):
    with pytest.raises(SettingsError, match=words):
        Sites.from_settings(Settings(profiles={"site-x": profile}))


def _chart(now: datetime) -> tuple[str, list[dict]]:
    """Febrile in a site temperature row only (39.3 in the flowsheet row "6")."""
    name = f"profiles-{uuid.uuid4().hex[:8]}"
    chart = Chart(name, now, "Profile", "Pat", "female", 44)
    chart.iec(YESCARTA, days_ago=2)
    chart.ice(10, hours_ago=1)
    chart._observation("t", "vital-signs", {"coding": [{"system": ROWS, "code": "6", "display": "Temperature"}]},
                       chart._at(1), valueQuantity={"value": 39.3, "unit": "Cel", "code": "Cel"})
    return name, chart.resources


def _token(iss: str, aud: str, tenant: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()),
              **({"tenant": tenant} if tenant else {})}
    return jwt.encode(claims, KEYS[iss], algorithm="ES384", headers={"typ": "JWT", "kid": "k1"})


def test_the_same_chart_is_read_with_each_client_s_own_codes(tmp_path, serve_app):
    """Hospital A's ValueSets know its temperature row; hospital B's do not, nor the cloud's south
    tenant: each client's prefetch (built with its own site's templates) is graded with its own codes."""
    service = serve_app(create_app(_settings(tmp_path)))
    sites = service.state.sites
    now = datetime.now(timezone.utc).replace(microsecond=0)
    summaries = {}
    for iss, tenant in ((HOSPITAL_A, None), (HOSPITAL_B, None), (CLOUD, "north"), (CLOUD, "south")):
        name, resources = _chart(now)
        site = sites.for_client(iss, tenant)
        body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                "context": {"patientId": name, "userId": "Practitioner/1"},
                "prefetch": prefetch_for(resources, name, site.templates)}
        answer = service.post(SERVICE, body, headers={"Authorization": f"Bearer {_token(iss, service.base + SERVICE, tenant)}"})
        assert answer.status_code == 200, answer.text
        summaries[(iss, tenant)] = answer.json()["cards"][0]["summary"]
    assert summaries[(HOSPITAL_A, None)].startswith("CRS grade 1")
    assert summaries[(CLOUD, "north")].startswith("CRS grade 1")
    assert summaries[(HOSPITAL_B, None)].startswith("No CRS")
    assert summaries[(CLOUD, "south")].startswith("No CRS")
