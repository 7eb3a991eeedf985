"""``crs-cds codes survey`` against a real FHIR server (sekmet) holding a chart in a site's local
codes: what it lists, what it writes, and that the written ValueSets make the chart graded right."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cds_service.scenarios import LOCAL_FORMULARY, Chart, YESCARTA, Drug

ROOT = Path(__file__).resolve().parent.parent
ROWS = "urn:oid:1.2.840.114350.1.13.0.1.7.2.707679"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def site_chart(fhir_server) -> tuple[str, datetime]:
    """Day 3 after axi-cel, charted in site rows: 39.4 in a local temperature row, BiPAP in a local
    O2-device row, an ICE score of 5, a norepinephrine drip under a local formulary code, and a sodium
    no rule reads."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    name = f"survey-{uuid.uuid4().hex[:8]}"
    chart = Chart(name, now, "Survey", "Site", "male", 61)
    chart.iec(YESCARTA, days_ago=3)
    def row(kind, code, display, **value):
        chart._observation(kind, "vital-signs", {"coding": [{"system": ROWS, "code": code, "display": display}],
                                                 "text": display}, chart._at(1), **value)
    row("t", "6", "Temp", valueQuantity={"value": 39.4, "unit": "Cel", "code": "Cel",
                                         "system": "http://unitsofmeasure.org"})
    row("t", "6", "Temp", valueQuantity={"value": 38.9, "unit": "Cel", "code": "Cel",
                                         "system": "http://unitsofmeasure.org"})
    row("dev", "3040103", "O2 Device", valueString="BiPAP")
    row("ice", "3041802", "ICE Score", valueInteger=5)
    row("na", "3100", "Sodium", valueQuantity={"value": 138, "unit": "mmol/L"})
    chart.infusion_event(Drug("norepinephrine 4 mg in 250 mL D5W", local_code=("NE-DRIP", "NOREPINEPHRINE DRIP")),
                         2, (0.05, "ug/kg/min"))
    fhir_server.load_resources(chart.resources)
    return name, now


def test_the_survey_lists_codes_with_counts_concepts_and_what_to_review(fhir_server, site_chart, tmp_path):
    patient, _ = site_chart
    out = tmp_path / "site-valuesets"
    result = run("codes", "survey", "--fhir-server", fhir_server.base_url, "--patient", patient,
                 "--write-valuesets", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    print(text)
    lines = {line.split()[1]: line for line in text.splitlines() if line.strip()[:1].isdigit()}
    # Read by their names, but never fetched by the templates, which ask by code: add the codes.
    assert lines[f"{ROWS}|6"].split()[0] == "2" and "body-temperature (by name; add the code)" in lines[f"{ROWS}|6"]
    assert "oxygen-delivery-method (by name; add the code)" in lines[f"{ROWS}|3040103"]
    assert "icans-ice-score (by name; add the code)" in lines[f"{ROWS}|3041802"]
    assert f"{ROWS}|3100" in text.split("not read:")[1]   # sodium: listed, not for review
    assert "vasopressors (by name; add the code)" in lines[f"{LOCAL_FORMULARY}|NE-DRIP"]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["ValueSet-site-body-temperature.json", "ValueSet-site-icans-ice-score.json",
                       "ValueSet-site-oxygen-delivery-method.json", "ValueSet-site-vasopressors.json"]
    temperature = json.loads((out / "ValueSet-site-body-temperature.json").read_text())
    assert temperature["url"] == "http://crs-cds.org/fhir/ValueSet/body-temperature"
    assert temperature["compose"]["include"] == [{"system": ROWS, "concept": [{"code": "6", "display": "Temp"}]}]


def test_the_written_valuesets_make_the_site_chart_graded(fhir_server, site_chart, tmp_path,
                                                        summary_fetched_by_the_service):
    patient, _ = site_chart
    out = tmp_path / "site-valuesets"
    assert run("codes", "survey", "--fhir-server", fhir_server.base_url, "--patient", patient,
               "--write-valuesets", str(out)).returncode == 0
    # Nothing of the site rows is asked for without them.
    assert summary_fetched_by_the_service(patient, []).startswith("No CRS, no ICANS")
    assert summary_fetched_by_the_service(patient, [str(out)]).startswith("CRS grade 4, ICANS grade 2")


def test_the_survey_reads_an_export_file_and_refuses_a_bad_call(tmp_path):
    chart = Chart("survey-file", datetime(2026, 11, 21, tzinfo=timezone.utc), "F", "G", "female", 40)
    chart.temp(38.5, hours_ago=1)
    chart._observation("sz", "exam", {"coding": [{"system": ROWS, "code": "77", "display": "Seizure activity"}]},
                       chart._at(1), valueString="none")
    path = tmp_path / "export.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in chart.resources) + "\n")
    result = run("codes", "survey", str(path))
    assert result.returncode == 0 and "http://loinc.org|8310-5" in result.stdout and "body-temperature" in result.stdout
    review = result.stdout.split("not read, relevant by name: review:")[1]
    assert f"{ROWS}|77" in review and "-> icans-seizure" in review
    bad = run("codes", "survey", str(path), "--fhir-server", "http://127.0.0.1:9/fhir")
    assert bad.returncode == 2 and "not both" in bad.stderr
