"""Charts shaped as real EHRs send them (tests/vendor_charts/*.json), graded three ways.

Each fixture copies a published example's shape (Epic, Oracle Health, Synthea, SMART, HL7 R4) and
states the grades ASTCT 2019 and decisions.md give it. Every fixture is graded:

- ``cli``: ``crs-cds grade FILE --now NOW --json`` as a subprocess, on a Bundle of the chart's
  resources (or, when the fixture is about the prefetch itself, a hook-request file holding it);
- ``prefetch``: the service over real HTTP with the prefetch a CDS client sends: the fixture's own
  prefetch keys where it has them, the others made by running the discovery templates against a real
  FHIR server (sekmet) holding the chart; no ``fhirServer``;
- ``fetch``: the service over real HTTP with no prefetch and ``fhirServer`` = sekmet.

sekmet validates what it stores, so the two shapes it refuses (a time with no zone, an STU3
element) are served as sent by a small search server instead, which also plays a server whose pages
overlap (sekmet's never do); the fixture says so ("servedAsSent").

The service reads the real clock, so for the HTTP modes every FHIR dateTime/instant of the fixture
is moved by (real now - the fixture's "now"), each string keeping its own form (Z, an offset, or no
zone at all). Resource ids get a per-run suffix, since the test session shares one sekmet.

And the identity test: every built-in scenario and every fixture through the CLI and through the
service with full prefetch, requiring the same grades, "at least" flags and unreadable reasons.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request, prefetch_for
from cds_service.fhir.prefetch import render_template
from cds_service.scenarios import SCENARIOS
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = Path(__file__).resolve().parent / "vendor_charts"
CHART_FILES = sorted(CHART_DIR.glob("*.json"))
SERVICE = "/cds-services/crs-icans-assessment"
MAIN_TOPIC = "crsIcansAssessment"
MODES = ("cli", "prefetch", "fetch")
CLI_FHIR_BASE = "https://fhir.example-hospital.org/api/FHIR/R4"


def load_chart(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---- Moving times: every FHIR dateTime/instant with a time part, keeping its own form ---------------

FHIR_DATETIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}(?::\d{2})?)(?P<frac>\.\d+)?(?P<zone>Z|[+-]\d{2}:\d{2})?")


def shift_time(text: str, delta: timedelta) -> str:
    """``text`` moved by ``delta`` if it is a FHIR dateTime/instant with a time, in the same form
    (same zone or offset, or none; same precision); any other string unchanged. Dates without a
    time (birthDate) are left alone: a day's shift changes nobody's age bracket here."""
    match = FHIR_DATETIME.fullmatch(text)
    if not match:
        return text
    time_part = match["time"]
    seconds = len(time_part) == 8
    frac = match["frac"] or ""
    zone = match["zone"]
    local = datetime.fromisoformat(f"{match['date']}T{time_part if seconds else time_part + ':00'}{frac[:7]}")
    # The wall clock moves by delta whatever the zone: an offset stays the offset, Z stays Z.
    moved = local + delta
    out = moved.strftime("%Y-%m-%dT%H:%M:%S" if seconds else "%Y-%m-%dT%H:%M")
    if frac:
        digits = len(frac) - 1
        out += "." + f"{moved.microsecond:06d}"[:digits].ljust(digits, "0")
    return out + (zone or "")


def shift_times(value, delta: timedelta):
    """A deep copy of a JSON value with every FHIR dateTime/instant string moved by ``delta``."""
    if isinstance(value, dict):
        return {k: shift_times(v, delta) for k, v in value.items()}
    if isinstance(value, list):
        return [shift_times(v, delta) for v in value]
    if isinstance(value, str):
        return shift_time(value, delta)
    return value


@pytest.mark.parametrize("text, hours, expected", [
    ("2026-11-21T12:00:00Z", 1, "2026-11-21T13:00:00Z"),
    ("2026-11-20T21:30:00-05:00", 3, "2026-11-21T00:30:00-05:00"),
    ("2026-11-21T08:15:00", -10, "2026-11-20T22:15:00"),
    ("2026-11-21T08:15:00.123Z", 24, "2026-11-22T08:15:00.123Z"),
    ("2026-11-21T08:15+01:00", 0.5, "2026-11-21T08:45+01:00"),
    ("2026-12-31T23:30:00+14:00", 1, "2027-01-01T00:30:00+14:00"),
    ("1964-03-02", 5000, "1964-03-02"),
    ("eTeb5h20023", 5, "eTeb5h20023"),
    ("urn:uuid:2026-11-21T12:00:00Z", 1, "urn:uuid:2026-11-21T12:00:00Z"),
])
def test_shift_time_keeps_each_string_form(text, hours, expected):
    assert shift_time(text, timedelta(hours=hours)) == expected


def test_shift_times_moves_nested_times_and_nothing_else():
    resource = {"resourceType": "Observation", "id": "2026-11-21", "effectiveDateTime": "2026-11-21T08:00:00-06:00",
                "meta": {"lastUpdated": "2026-11-21T14:00:00.000Z"}, "valueQuantity": {"value": 38.5},
                "component": [{"valueDateTime": "2026-11-21T07:00:00"}], "note": [{"text": "at 2026-11-21T07:00"}]}
    moved = shift_times(resource, timedelta(days=10, minutes=5))
    assert moved["effectiveDateTime"] == "2026-12-01T08:05:00-06:00"
    assert moved["meta"]["lastUpdated"] == "2026-12-01T14:05:00.000Z"
    assert moved["component"][0]["valueDateTime"] == "2026-12-01T07:05:00"
    assert moved["id"] == "2026-11-21" and moved["note"][0]["text"] == "at 2026-11-21T07:00"
    assert moved["valueQuantity"] == {"value": 38.5}
    assert resource["effectiveDateTime"] == "2026-11-21T08:00:00-06:00"  # the input is not changed


# ---- The chart as stored: resources, Synthea transactions, unique ids per run ------------------------

def source_transaction(chart: dict) -> dict | None:
    """The chart's own transaction Bundle (Synthea) when it comes as one."""
    resources = chart["resources"]
    if len(resources) == 1 and resources[0].get("resourceType") == "Bundle" and resources[0].get("type") == "transaction":
        return resources[0]
    return None


def stored_resources(chart: dict) -> list[dict]:
    """The chart's resources as a FHIR server stores them: a transaction's urn:uuid references
    resolved to ``Type/id`` (each entry's resource keeps its own id)."""
    transaction = source_transaction(chart)
    if transaction is None:
        return copy.deepcopy(chart["resources"])
    names = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in transaction["entry"]}

    def resolve(value):
        if isinstance(value, dict):
            return {k: (names.get(v, v) if k == "reference" and isinstance(v, str) else resolve(v))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return [resolve(e["resource"]) for e in transaction["entry"]]


def patient_id(chart: dict) -> str:
    return next(r["id"] for r in stored_resources(chart) if r["resourceType"] == "Patient")


def with_unique_ids(value, suffix: str):
    """A copy with every resource id (``Type/id``), reference, urn:uuid and ``{patientId}`` made
    unique for this run: ``id`` -> ``id-suffix``, urn:uuid:X -> a uuid5 of (suffix, X). Contained
    resources and their ``#`` references keep their local ids."""
    ids: set[tuple[str, str]] = set()
    uuids: dict[str, str] = {}

    def collect(node, top: bool):
        if isinstance(node, dict):
            if top and "resourceType" in node and "id" in node and node["resourceType"] != "Bundle":
                ids.add((node["resourceType"], node["id"]))
            for key, item in node.items():
                if key == "contained":
                    continue
                collect(item, key in ("resource",) or (top and key == "resources"))
            for key, item in node.items():
                if isinstance(item, str) and item.startswith("urn:uuid:"):
                    uuids.setdefault(item, f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, suffix + item)}")
        elif isinstance(node, list):
            for item in node:
                collect(item, top)

    collect(value, True)
    uuid_ids = {old[len("urn:uuid:"):]: new[len("urn:uuid:"):] for old, new in uuids.items()}

    def new_id(resource_type: str, old: str) -> str:
        if old in uuid_ids:
            return uuid_ids[old]
        return f"{old}-{suffix}" if (resource_type, old) in ids else old

    def rewrite_string(text: str) -> str:
        if text in uuids:
            return uuids[text]
        match = re.fullmatch(r"(.*?)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})", text)
        if match and (match[2], match[3]) in ids and (match[1] == "" or match[1].endswith("/")):
            return f"{match[1]}{match[2]}/{new_id(match[2], match[3])}"
        return text

    def rewrite(node, in_contained: bool = False):
        if isinstance(node, dict):
            out = {}
            for key, item in node.items():
                if key == "id" and isinstance(item, str) and "resourceType" in node and not in_contained:
                    out[key] = new_id(node["resourceType"], item)
                elif key == "contained":
                    out[key] = [rewrite(c, True) for c in item]
                elif isinstance(item, str):
                    out[key] = rewrite_string(item)
                else:
                    out[key] = rewrite(item, in_contained and key not in ("resource",))
            return out
        if isinstance(node, list):
            return [rewrite(item, in_contained) for item in node]
        if isinstance(node, str):
            return rewrite_string(node)
        return node

    return rewrite(value)


def test_unique_ids_rewrite_ids_references_and_urn_uuids_consistently():
    chart = {"resources": [
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Medication", "id": "m1"},
        {"resourceType": "MedicationAdministration", "id": "a1", "subject": {"reference": "Patient/p1"},
         "medicationReference": {"reference": "Medication/m1"},
         "contained": [{"resourceType": "Medication", "id": "m1"}], "partOf": [{"reference": "#m1"}]},
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p2"}}],
        "prefetch": {"medications": {"resourceType": "Bundle", "entry": [
            {"fullUrl": "{fhirServer}/MedicationAdministration/a1", "resource": {"resourceType": "Medication", "id": "m1"}}]}}}
    out = with_unique_ids(chart, "r9")
    patient, medication, admin, observation = out["resources"]
    assert (patient["id"], medication["id"], admin["id"]) == ("p1-r9", "m1-r9", "a1-r9")
    assert admin["subject"]["reference"] == "Patient/p1-r9"
    assert admin["medicationReference"]["reference"] == "Medication/m1-r9"
    assert admin["contained"][0]["id"] == "m1" and admin["partOf"][0]["reference"] == "#m1"
    assert observation["subject"]["reference"] == "Patient/p2"  # not a resource of the chart
    entry = out["prefetch"]["medications"]["entry"][0]
    assert entry["fullUrl"] == "{fhirServer}/MedicationAdministration/a1-r9" and entry["resource"]["id"] == "m1-r9"
    synthea = {"resources": [{"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:aaaa", "resource": {"resourceType": "Patient", "id": "aaaa"}},
        {"fullUrl": "urn:uuid:bbbb", "resource": {"resourceType": "Observation", "id": "bbbb",
                                                  "subject": {"reference": "urn:uuid:aaaa"}}}]}]}
    first, again = with_unique_ids(synthea, "r1"), with_unique_ids(synthea, "r2")
    p_entry, o_entry = first["resources"][0]["entry"]
    assert p_entry["fullUrl"] == o_entry["resource"]["subject"]["reference"] != "urn:uuid:aaaa"
    assert p_entry["fullUrl"] == f"urn:uuid:{p_entry['resource']['id']}"
    assert again["resources"][0]["entry"][0]["fullUrl"] != p_entry["fullUrl"]


def fill_placeholders(value, fhir_base: str, pid: str):
    text = json.dumps(value).replace("{fhirServer}", fhir_base).replace("{patientId}", pid)
    return json.loads(text)


# ---- Requests, grades from cards and from the CLI -----------------------------------------------------

def grades_from_cards(status: int, body: dict | None) -> dict:
    """What the patient-view answer says: grades and "at least" from the main card's summary, every
    card's text (for mentions) and the unreadable sources the card lists."""
    if status != 200:
        return {"status": status, "crs": None, "icans": None, "crsAtLeast": False, "icansAtLeast": False,
                "text": json.dumps(body)[:2000] if body is not None else "", "missing": []}
    cards = body.get("cards", [])
    text = "\n".join(f"{c.get('summary', '')}\n{c.get('detail', '')}" for c in cards)
    main = next((c for c in cards if c.get("source", {}).get("topic", {}).get("code") == MAIN_TOPIC), None)
    out = {"status": status, "crs": None, "icans": None, "crsAtLeast": False, "icansAtLeast": False, "text": text,
           "missing": []}
    if main is None:
        return out
    for syndrome in ("CRS", "ICANS"):
        found = re.search(rf"\b{syndrome} grade (at least )?(\d)", main["summary"])
        if found:
            out[syndrome.lower()] = int(found[2])
            out[f"{syndrome.lower()}AtLeast"] = bool(found[1])
        elif re.search(rf"\b[Nn]o {syndrome}\b", main["summary"]):
            out[syndrome.lower()] = 0
    out["missing"] = re.findall(r"Some data could not be read, so the grade may be higher: (.*)", main.get("detail", ""))
    return out


def grades_from_cli(result: subprocess.CompletedProcess) -> dict:
    if result.returncode != 0:
        return {"status": f"exit {result.returncode}", "crs": None, "icans": None, "crsAtLeast": False,
                "icansAtLeast": False, "text": result.stderr[-2000:], "missing": []}
    data = json.loads(result.stdout)
    return {"status": 200, "crs": data["crs"]["grade"], "icans": data["icans"]["grade"],
            "crsAtLeast": data["crs"]["atLeast"], "icansAtLeast": data["icans"]["atLeast"],
            "text": json.dumps(data, ensure_ascii=False),
            "missing": _missing_once(data)}


def _missing_once(data: dict) -> list[str]:
    """The unread sources as the card names them: once for both grades, every whole source first."""
    missing: list[str] = []
    for grade in (data["crs"], data["icans"]):
        if grade["atLeast"]:
            missing += [m for m in grade.get("missing", []) if m not in missing]
    sources = [m for m in missing if m.startswith("prefetch:")]
    shown = sources + [m for m in missing if m not in sources][:max(0, 5 - len(sources))]
    return ["; ".join(shown)] if missing else []


def run_cli(path: Path, now: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "grade", str(path), "--now", now, "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def new_request(pid: str, **fields) -> dict:
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": pid}, **fields}


def full_prefetch(chart: dict, templates: dict[str, str], fhir_base: str) -> dict:
    """Every prefetch key as a client holding the whole chart answers it (the Medications the
    administrations name by reference as _include entries), then the fixture's own keys over it."""
    resources = stored_resources(chart)
    pid = patient_id(chart)
    unique = {}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for resource in resources:  # a server holds each resource once, with its version and an instant
        resource.setdefault("meta", {"versionId": "1", "lastUpdated": stamp})
        unique[(resource["resourceType"], resource["id"])] = resource
    prefetch = prefetch_for(list(unique.values()), pid, templates)
    medications = [r for r in unique.values() if r["resourceType"] == "Medication"]
    if medications and isinstance(prefetch.get("medications"), dict):
        prefetch["medications"]["entry"] += [{"fullUrl": f"{fhir_base}/Medication/{m['id']}", "resource": m,
                                              "search": {"mode": "include"}} for m in medications]
    for key, value in chart.get("prefetch", {}).items():
        prefetch[key] = fill_placeholders(value, fhir_base, pid)
    return prefetch


def cli_input(chart: dict, templates: dict[str, str], folder: Path, name: str) -> Path:
    """The CLI's file: the chart's own transaction (Synthea), a Bundle of its resources, or a
    hook-request file when the fixture is about the prefetch itself."""
    path = folder / f"{name}.json"
    if "prefetch" in chart:
        body = new_request(patient_id(chart), prefetch=full_prefetch(chart, templates, CLI_FHIR_BASE))
    else:
        body = source_transaction(chart) or {"resourceType": "Bundle", "type": "collection",
                                             "entry": [{"resource": r} for r in chart["resources"]]}
    path.write_text(json.dumps(body, indent=1), encoding="utf-8")
    return path


def client_prefetch(fhir_base: str, templates: dict[str, str], context: dict) -> dict:
    """What a CDS client that honours the discovery templates sends: each template run on the FHIR server."""
    prefetch = {}
    for key, template in templates.items():
        query = render_template(template, context)
        path, _, params = query.partition("?")
        encoded = "&".join(f"{p.split('=', 1)[0]}={quote(p.split('=', 1)[1], safe=',:/')}"
                           for p in params.split("&") if p) if params else ""
        answer = requests.get(f"{fhir_base}/{path}" + (f"?{encoded}" if encoded else ""), timeout=30,
                              headers={"Accept": "application/fhir+json"})
        prefetch[key] = answer.json() if answer.status_code == 200 else None
    return prefetch


def expectation(chart: dict, mode: str) -> dict:
    return {**chart["expected"], **chart.get("expectedByMode", {}).get(mode, {})}


def check(got: dict, expected: dict, label: str) -> None:
    said = (f"{label}: expected CRS {expected['crs']} ICANS {expected['icans']} at-least={expected['atLeast']}; "
            f"got status {got['status']}, CRS {got['crs']}{' (at least)' if got['crsAtLeast'] else ''}, "
            f"ICANS {got['icans']}{' (at least)' if got['icansAtLeast'] else ''}; missing: {got['missing']}; "
            f"text: {got['text'][:600]}")
    assert got["status"] == 200, said
    assert (got["crs"], got["icans"]) == (expected["crs"], expected["icans"]), said
    assert got["crsAtLeast"] == expected["atLeast"], said
    if not expected["atLeast"]:
        assert not got["icansAtLeast"], said
    for mention in expected.get("mentions", []):
        assert mention in got["text"], f"{label}: the answer does not mention {mention!r}; " + said


# ---- Fixtures: the service, sekmet, discovery templates --------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_app_module):
    folder = tmp_path_factory.mktemp("vendor-svc")
    return serve_app_module(create_app(Settings(feedback_db=str(folder / "feedback.sqlite3"),
                                                fhir_budget_seconds=10, fhir_timeout_seconds=8,
                                                auth_enabled=False, quiet_when_normal=False)))  # grades shown


@pytest.fixture(scope="module")
def templates(service) -> dict[str, str]:
    discovery = requests.get(service.base + "/cds-services", timeout=10).json()
    entry = next(s for s in discovery["services"] if s["id"] == "crs-icans-assessment")
    return entry["prefetch"]


@pytest.fixture(scope="module")
def run_suffix() -> str:
    return uuid.uuid4().hex[:8]


def load_into(fhir_server, chart: dict) -> str:
    """The chart into sekmet as one transaction; returns the Patient's id on the server."""
    transaction = source_transaction(chart)
    if transaction is not None:
        answer = fhir_server.load(transaction)
        for entry, result in zip(transaction["entry"], answer.get("entry", [])):
            if entry["resource"]["resourceType"] == "Patient":
                location = result["response"]["location"]
                return location.split("Patient/", 1)[1].split("/", 1)[0]
        raise AssertionError("the transaction answer names no Patient")
    unique = {}
    for resource in chart["resources"]:
        unique[(resource["resourceType"], resource["id"])] = resource
    fhir_server.load({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{fhir_server.base_url}/{t}/{i}", "resource": r, "request": {"method": "PUT", "url": f"{t}/{i}"}}
        for (t, i), r in unique.items()]})
    return patient_id(chart)


def on_real_clock(chart: dict) -> dict:
    """The chart moved so that its "now" is the real now."""
    delta = datetime.now(timezone.utc).replace(microsecond=0) - parse_instant(chart["now"])
    moved = dict(chart)
    moved["resources"] = shift_times(chart["resources"], delta)
    if "prefetch" in chart:
        moved["prefetch"] = shift_times(chart["prefetch"], delta)
    return moved


class AsSentServer:
    """A small FHIR search server over a real HTTP port that serves a chart's resources exactly as
    the EHR sent them, for shapes sekmet refuses to store (it validates): reads by id, and the
    searches the templates make (patient, code list), newest first, in one page."""

    def __init__(self, local_http, resources: list[dict], page_sizes: dict[str, int] | None = None):
        self.resources = {(r["resourceType"], r["id"]): r for r in resources}
        self.page_sizes = page_sizes or {}  # per type: pages of that size, each overlapping the last by one
        self.server = local_http(self._answer)
        self.base_url = self.server.base_url

    def _answer(self, request, server):
        from urllib.parse import parse_qs, urlsplit

        from cds_service.terminology import codeable_codes

        parts = urlsplit(request.path)
        path = parts.path[len("/fhir/"):] if parts.path.startswith("/fhir/") else parts.path.lstrip("/")
        if "/" in path:
            resource = self.resources.get(tuple(path.split("/", 1)))
            return (200, resource) if resource else (404, {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-found"}]})
        params = parse_qs(parts.query)
        patient = params.get("patient", [""])[0]
        codes = {tuple(c.split("|", 1)) for c in params["code"][0].split(",")} if "code" in params else None
        hits = [r for r in self.resources.values() if r["resourceType"] == path
                and (r.get("subject") or {}).get("reference") in (patient, f"Patient/{patient}")
                and (codes is None or codes & set(codeable_codes(r.get("code"))))]
        hits.sort(key=lambda r: r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start") or "",
                  reverse=True)
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(hits)}
        size = self.page_sizes.get(path)
        if size:
            offset = int(params.get("_offset", ["0"])[0])
            if offset + size < len(hits):
                bundle["link"] = [{"relation": "next", "url": f"{self.base_url}/{path}?patient={patient}"
                                                             f"&_count={size}&_offset={offset + size - 1}"}]
            hits = hits[offset:offset + size]
        bundle["entry"] = [{"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                            "search": {"mode": "match"}} for r in hits]
        return 200, bundle


def chart_server(chart: dict, fhir_server, local_http) -> tuple[str, str, AsSentServer | None]:
    """(FHIR base URL, patient id, the as-sent server if used) of a server holding the chart: sekmet,
    or for a shape sekmet refuses ("servedAsSent" in the fixture, saying why) a server serving it as sent."""
    if chart.get("servedAsSent"):
        server = AsSentServer(local_http, stored_resources(chart), chart.get("pageSize"))
        return server.base_url, patient_id(chart), server
    return fhir_server.base_url, load_into(fhir_server, chart), None


def live_chart(chart: dict, suffix: str) -> dict:
    """The chart moved to the real clock, with this run's ids."""
    return with_unique_ids(on_real_clock(chart), suffix)


# ---- Every fixture, three ways -------------------------------------------------------------------------

def test_every_fixture_is_complete():
    assert len(CHART_FILES) >= 18
    for path in CHART_FILES:
        chart = load_chart(path)
        for key in ("title", "shape", "story", "now", "expected", "resources"):
            assert chart.get(key), f"{path.name}: no {key}"
        assert chart["now"].endswith("Z")
        assert set(chart.get("expectedByMode", {})) <= set(MODES), path.name
        stored = stored_resources(chart)
        assert sum(r["resourceType"] == "Patient" for r in stored) == 1, path.name
        assert any(r["resourceType"] == "MedicationAdministration" and "axicabtagene" in json.dumps(r)
                   for r in stored), f"{path.name}: no IEC therapy"


@pytest.mark.parametrize("path", CHART_FILES, ids=lambda p: p.stem)
def test_cli(path, templates, tmp_path):
    chart = load_chart(path)
    got = grades_from_cli(run_cli(cli_input(chart, templates, tmp_path, path.stem), chart["now"]))
    check(got, expectation(chart, "cli"), f"{path.stem} [cli]")


@pytest.mark.parametrize("path", CHART_FILES, ids=lambda p: p.stem)
def test_service_with_client_prefetch(path, service, templates, fhir_server, local_http, run_suffix):
    chart = live_chart(load_chart(path), f"{run_suffix}p")
    base, pid, _ = chart_server(chart, fhir_server, local_http)
    context = {"userId": "Practitioner/example", "patientId": pid}
    prefetch = client_prefetch(base, templates, context)
    for key, value in chart.get("prefetch", {}).items():
        prefetch[key] = fill_placeholders(value, base, pid)
    answer = service.post(SERVICE, new_request(pid, prefetch=prefetch))
    got = grades_from_cards(answer.status_code, answer.json() if answer.content else None)
    check(got, expectation(chart, "prefetch"), f"{path.stem} [prefetch]")


@pytest.mark.parametrize("path", CHART_FILES, ids=lambda p: p.stem)
def test_service_fetching_from_the_fhir_server(path, service, fhir_server, local_http, run_suffix):
    chart = live_chart(load_chart(path), f"{run_suffix}f")
    base, pid, as_sent = chart_server(chart, fhir_server, local_http)
    answer = service.post(SERVICE, new_request(pid, fhirServer=base))
    got = grades_from_cards(answer.status_code, answer.json() if answer.content else None)
    check(got, expectation(chart, "fetch"), f"{path.stem} [fetch]")
    if as_sent is not None and chart.get("pageSize"):  # the overlapping pages were really read
        assert any("_offset=" in r.path for r in as_sent.server.requests), [r.path for r in as_sent.server.requests]


# ---- One reading path: the CLI and the service agree ----------------------------------------------------

def same_reading(cli: dict, svc: dict, label: str) -> None:
    keys = ("status", "crs", "icans", "crsAtLeast", "icansAtLeast", "missing")
    a = {k: cli[k] for k in keys}
    b = {k: svc[k] for k in keys}
    assert a == b, f"{label}: the CLI read {a}, the service {b}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_cli_and_service_agree_on_every_scenario(scenario, service, tmp_path):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    path = tmp_path / f"{scenario.name}.json"
    path.write_text(json.dumps(scenario.bundle(now)), encoding="utf-8")
    cli = grades_from_cli(run_cli(path, now.strftime("%Y-%m-%dT%H:%M:%SZ")))
    answer = service.post(SERVICE, hook_request(scenario, now))
    svc = grades_from_cards(answer.status_code, answer.json() if answer.content else None)
    if svc["status"] == 200 and svc["crs"] is None and svc["icans"] is None and cli["status"] == 200:
        # Out of scope: the service is silent ({"cards": []}), the CLI says "not graded".
        assert answer.json()["cards"] == [] and cli["crs"] is None and cli["icans"] is None, (cli, svc)
        return
    same_reading(cli, svc, scenario.name)


@pytest.mark.parametrize("path", CHART_FILES, ids=lambda p: p.stem)
def test_cli_and_service_agree_on_every_fixture(path, service, templates, tmp_path):
    chart = load_chart(path)
    cli = grades_from_cli(run_cli(cli_input(chart, templates, tmp_path, path.stem), chart["now"]))
    live = on_real_clock(chart)  # the same ids as the CLI's file: no server is involved
    answer = service.post(SERVICE, new_request(patient_id(live), prefetch=full_prefetch(live, templates, CLI_FHIR_BASE)))
    svc = grades_from_cards(answer.status_code, answer.json() if answer.content else None)
    # The service reads the real clock: compare the readings, not times printed in the reasons.
    for got in (cli, svc):
        got["missing"] = [re.sub(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?( ?[A-Z]{3,4}|Z)?", "<time>", m)
                          for m in got["missing"]]
    same_reading(cli, svc, path.stem)
