"""A site's own flowsheet rows join through a ValueSet file alone (terminology_dirs), with no code
change: the discovery templates ask for them, the service fetches them from a real FHIR server
(sekmet), and the rules read them."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cds_service.scenarios import Chart, YESCARTA

FLOWSHEET = "urn:oid:1.2.840.114350.1.13.0.1.7.2.707679"  # an Epic-style flowsheet row system
ICE_ROW = "3041802"
O2_DEVICE_ROW = "3040103"
ANSWER_ROW = "1120100"


def _site_valueset(folder: Path, valueset_id: str, system: str, code: str, display: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"ValueSet-site-{valueset_id}.json").write_text(json.dumps({
        "resourceType": "ValueSet", "id": f"site-{valueset_id}", "url": f"http://crs-cds.org/fhir/ValueSet/{valueset_id}",
        "compose": {"include": [{"system": system, "concept": [{"code": code, "display": display}]}]}}))


@pytest.fixture(scope="module")
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def patient(fhir_server, now) -> str:
    """Day 3 after axi-cel: 39.1 °C, on BiPAP and with an ICE score of 5, both charted in site rows
    only (no LOINC, no project code), and a level of consciousness in a site answer list."""
    name = f"site-rows-{uuid.uuid4().hex[:8]}"
    chart = Chart(name, now, "Row", "Site", "female", 55)
    chart.iec(YESCARTA, days_ago=3)
    chart.weight(70, days_ago=1)
    chart.temp(39.1, hours_ago=1)
    rows = [
        ("ice", {"coding": [{"system": FLOWSHEET, "code": ICE_ROW, "display": "ICE"}], "text": "ICE"},
         {"valueInteger": 5}),
        ("o2", {"coding": [{"system": FLOWSHEET, "code": O2_DEVICE_ROW, "display": "O2 Device"}], "text": "O2 Device"},
         {"valueString": "BiPAP"}),
        ("loc", {"coding": [{"system": FLOWSHEET, "code": "3041805", "display": "Arousal"}], "text": "Arousal"},
         {"valueCodeableConcept": {"coding": [{"system": FLOWSHEET, "code": ANSWER_ROW, "display": "To voice"}]}}),
    ]
    for kind, code, value in rows:
        chart._observation(kind, "vital-signs", code, chart._at(0.5), **value)
    fhir_server.load_resources(chart.resources)
    return name


def test_site_rows_are_unseen_without_their_valuesets(summary_fetched_by_the_service, patient):
    summary = summary_fetched_by_the_service(patient, [])
    assert summary.startswith("CRS grade 1, no ICANS"), summary


def test_site_rows_graded_right_after_adding_only_valueset_files(summary_fetched_by_the_service, tmp_path, patient):
    site = tmp_path / "site-terminology"
    _site_valueset(site, "icans-ice-score", FLOWSHEET, ICE_ROW, "ICE score")
    _site_valueset(site, "oxygen-delivery-method", FLOWSHEET, O2_DEVICE_ROW, "O2 device")
    summary = summary_fetched_by_the_service(patient, [str(site)])
    assert summary.startswith("CRS grade 4, ICANS grade 2"), summary   # BiPAP; ICE 5


def test_a_site_answer_list_joins_the_project_answers(summary_fetched_by_the_service, tmp_path, patient):
    """Awakens to voice (ICANS 2) charted in a site row with a site answer code."""
    site = tmp_path / "site-terminology"
    _site_valueset(site, "icans-consciousness", FLOWSHEET, "3041805", "Level of arousal")
    _site_valueset(site, "icans-consciousness-levels", FLOWSHEET, ANSWER_ROW, "Awakens to voice")
    summary = summary_fetched_by_the_service(patient, [str(site)])
    assert summary.startswith("CRS grade 1, ICANS grade 2"), summary
