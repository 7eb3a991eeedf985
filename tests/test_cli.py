"""The crs-cds command, run as a user runs it (a subprocess), and from an installed wheel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cds_service.scenarios import by_name

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-21T12:00:00Z"


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenarios")
    result = run("scenarios", "write", str(folder), "--now", NOW)
    assert result.returncode == 0, result.stderr
    return folder


def test_grade_prints_grades_evidence_and_recommendations(scenario_dir):
    result = run("grade", str(scenario_dir / "crs3-norepi-vaso.json"), "--now", NOW)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("CRS grade 3, ICANS grade 1")
    assert "norepinephrine running since" in result.stdout
    assert "Recommendations:" in result.stdout and "tocilizumab" in result.stdout


def test_grade_json_has_the_documented_shape(scenario_dir):
    result = run("grade", str(scenario_dir / "concurrent-icans-crs1.json"), "--now", NOW, "--json")
    data = json.loads(result.stdout)
    assert data["crs"]["grade"] == 1 and data["icans"]["grade"] == 2
    assert isinstance(data["recommendations"], list) and data["recommendations"]
    assert "tocilizumab" not in {r["topic"] for r in data["recommendations"]}


def test_out_of_scope_json_gives_null_grades_with_a_reason(scenario_dir):
    data = json.loads(run("grade", str(scenario_dir / "no-iec-therapy.json"), "--now", NOW, "--json").stdout)
    assert data["crs"]["grade"] is None and data["icans"]["grade"] is None
    assert "no IEC therapy" in data["crs"]["reason"]


def test_ndjson_input(tmp_path):
    resources = by_name("crs4-bipap").resources(__import__("datetime").datetime.fromisoformat(NOW.replace("Z", "+00:00")))
    path = tmp_path / "patient.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    data = json.loads(run("grade", str(path), "--now", NOW, "--json").stdout)
    assert data["crs"]["grade"] == 4


@pytest.mark.parametrize("content, message", [
    ("", "empty"), ("{not json", "not valid JSON"), ('{"hello": 1}', "not a FHIR resource"),
    ('{"resourceType": "Bundle", "entry": "x"}', "Bundle.entry"),
])
def test_bad_files_get_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run("grade", str(path))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_file_and_bad_now_exit_2(tmp_path):
    assert run("grade", str(tmp_path / "nope.json")).returncode == 2
    path = tmp_path / "b.json"
    path.write_text('{"resourceType": "Bundle", "type": "collection"}')
    result = run("grade", str(path), "--now", "yesterday")
    assert result.returncode == 2 and "--now" in result.stderr


def test_installed_wheel_carries_its_data_and_works_from_another_directory(tmp_path, scenario_dir):
    """pip install of the built wheel (not editable), run from a folder far from the source."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("crs_cds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cds_service/fhir_profiles/ValueSet-vasopressors.json" in names
    assert "cds_service/cards/crs-icans-assessment.json" in names
    assert "cds_service/clinical/default_protocol.json" in names
    assert "cds_service/hooks/schemas/request.json" in names
    assert "cds_service/hooks/openapi.json" in names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "crs-cds"
    result = subprocess.run([sys.executable, str(script), "grade", str(scenario_dir / "crs2-child-blow-by.json"),
                             "--now", NOW, "--json"], capture_output=True, text=True, cwd=elsewhere, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["crs"]["grade"] == 2
    located = subprocess.run([sys.executable, "-c", "import cds_service; print(cds_service.__file__)"],
                             capture_output=True, text=True, cwd=elsewhere, env=env)
    assert located.stdout.startswith(str(target))
    openapi = subprocess.run([sys.executable, "-c", "from cds_service.hooks.openapi import openapi_document as d; "
                              "print(sorted(d()['components']['schemas']['CdsServiceRequest']['$defs']))"],
                             capture_output=True, text=True, cwd=elsewhere, env=env)
    assert openapi.returncode == 0 and "patient-view" in openapi.stdout, openapi.stderr


def test_scenarios_load_into_a_real_fhir_server(fhir_server):
    result = run("scenarios", "load", "--fhir-server", fhir_server.base_url, "--now", NOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("loaded ") == len(__import__("cds_service.scenarios").scenarios.SCENARIOS)
    import requests

    patient = requests.get(f"{fhir_server.base_url}/Patient/crs3-norepi-vaso", timeout=10)
    assert patient.status_code == 200 and patient.json()["id"] == "crs3-norepi-vaso"


def test_scenarios_load_reports_an_unreachable_server():
    result = run("scenarios", "load", "--fhir-server", "http://127.0.0.1:9/fhir", "--timeout", "2")
    assert result.returncode == 2 and "could not be loaded" in result.stderr


def test_feedback_report_command(tmp_path):
    from cds_service.feedback import FeedbackStore

    db = tmp_path / "feedback.sqlite3"
    store = FeedbackStore(str(db))
    store.remember_cards("crs-icans-assessment", "h1", [("card-1", "crsIcansAssessment")])
    store.record_feedback("crs-icans-assessment", [{"card": "card-1", "outcome": "overridden",
                                                   "overrideReason": {"reason": {"code": "already-addressed",
                                                                                 "system": "x"}},
                                                   "outcomeTimestamp": "2026-11-21T12:00:00Z"}])
    store.close()
    result = run("feedback-report", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert "crsIcansAssessment" in result.stdout and "already-addressed" in result.stdout
    assert run("feedback-report", "--db", str(tmp_path / "missing.sqlite3")).returncode == 2


def test_grade_stops_on_a_site_protocol_with_an_unknown_key(scenario_dir, tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"tocilizumab": {"max_dose": 600}}))
    result = run("grade", str(scenario_dir / "crs3-norepi-vaso.json"), "--now", NOW, "--protocol", str(site))
    assert result.returncode != 0 and result.stdout == ""
    assert "unknown key 'tocilizumab.max_dose'" in result.stderr and str(site) in result.stderr


def test_protocol_show_markdown_prints_the_document():
    result = run("protocol", "show", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# crs-cds default protocol") and "`tocilizumab.max_doses_per_24h`: 3" in result.stdout


# ---- The CLI reads as the service does ------------------------------------------------------------

def _chart_resources(name: str) -> list[dict]:
    from datetime import datetime

    return by_name(name).resources(datetime.fromisoformat(NOW.replace("Z", "+00:00")))


def _searchset(resources: list[dict], *extra_links: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "self", "url": "http://ehr.example/fhir/Observation?patient=p"}, *extra_links],
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def _grade_json(tmp_path: Path, data, *args: str, env: dict | None = None) -> dict:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    result = run("grade", str(path), "--now", NOW, "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_searchset_with_a_next_link_grades_at_least(tmp_path):
    bundle = _searchset(_chart_resources("crs3-norepi-vaso"),
                        {"relation": "next", "url": "http://ehr.example/fhir/Observation?page=2"})
    data = _grade_json(tmp_path, bundle)
    assert data["crs"]["grade"] == 3 and data["crs"]["atLeast"] is True
    assert any("next link" in m for m in data["crs"]["missing"])


def test_an_error_outcome_in_the_file_grades_at_least_and_an_informational_one_does_not(tmp_path):
    def outcome(severity: str) -> dict:
        return {"resourceType": "OperationOutcome",
                "issue": [{"severity": severity, "code": "not-found", "diagnostics": "No results were found"}]}

    resources = _chart_resources("crs3-norepi-vaso")
    failed = _grade_json(tmp_path, _searchset([*resources, outcome("error")]))
    assert failed["crs"]["grade"] == 3 and failed["crs"]["atLeast"] is True
    fine = _grade_json(tmp_path, _searchset([*resources, outcome("information")]))
    assert fine["crs"]["grade"] == 3 and fine["crs"]["atLeast"] is False


def test_a_resource_twice_in_the_file_counts_once(tmp_path):
    resources = _chart_resources("crs3-norepi-vaso")
    once = _grade_json(tmp_path, _searchset(resources))
    twice = _grade_json(tmp_path, _searchset(resources + resources))
    assert twice["crs"] == once["crs"] and twice["recommendations"] == once["recommendations"]


def test_the_site_settings_decide_codes_protocol_and_time_zone(tmp_path):
    """--config (or CRS_CDS_CONFIG): the site's ValueSets, protocol and time zone, as the service."""
    resources = _chart_resources("crs1-fever-day1")
    for resource in resources:
        if resource["resourceType"] == "Observation" and "8310-5" in json.dumps(resource.get("code")):
            resource["code"] = {"coding": [{"system": "http://hospital.example.org/flowsheet", "code": "T-CORE"}]}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    assert _grade_json(tmp_path, bundle)["crs"]["grade"] == 0   # the flowsheet row means nothing yet
    site = tmp_path / "site-terms"
    site.mkdir()
    (site / "ValueSet-body-temperature.json").write_text(json.dumps({
        "resourceType": "ValueSet", "id": "body-temperature", "url": "http://crs-cds.org/fhir/ValueSet/body-temperature",
        "compose": {"include": [{"system": "http://hospital.example.org/flowsheet",
                                 "concept": [{"code": "T-CORE", "display": "Core temperature"}]}]}}))
    protocol = tmp_path / "site-protocol.json"
    protocol.write_text(json.dumps({"name": "Site CAR-T protocol", "version": "7"}))
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"terminology_dirs": [str(site)], "protocol_file": str(protocol),
                                    "time_zone": "Europe/Paris"}))
    data = _grade_json(tmp_path, bundle, "--config", str(settings))
    assert data["crs"]["grade"] == 1 and data["protocol"] == "Site CAR-T protocol v7"
    by_env = _grade_json(tmp_path, bundle, env={**os.environ, "CRS_CDS_CONFIG": str(settings)})
    assert by_env["crs"] == data["crs"]


def test_a_bad_time_zone_or_settings_file_is_one_line_and_exit_2(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"time_zone": "Mars/Olympus"}))
    path = tmp_path / "b.json"
    path.write_text('{"resourceType": "Bundle", "type": "collection"}')
    result = run("grade", str(path), "--config", str(settings))
    assert result.returncode == 2 and "time_zone" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_hook_request_file_is_read_as_the_service_reads_it(tmp_path):
    from datetime import datetime

    from cds_service.examples import hook_request

    request = hook_request(by_name("crs3-norepi-vaso"), datetime.fromisoformat(NOW.replace("Z", "+00:00")))
    data = _grade_json(tmp_path, request)
    assert data["crs"]["grade"] == 3 and data["crs"]["atLeast"] is False
    del request["prefetch"]["oxygen"]   # no fhirServer to fetch it from: the service answers 412
    path = tmp_path / "no-oxygen.json"
    path.write_text(json.dumps(request))
    result = run("grade", str(path), "--now", NOW)
    assert result.returncode == 2 and "412" in result.stderr and "oxygen" in result.stderr
