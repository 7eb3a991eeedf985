"""The engine's lookups come from fhir_profiles/ only, and a site can add its own codes."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from cds_service.clinical import assess
from cds_service.clinical.facts import (
    DEVICE_TIERS, ICANS_ANSWER_VALUESETS, MEDICATION_VALUESETS, OBSERVATION_VALUESETS,
)
from cds_service.clinical.protocol import default_protocol
from cds_service.hooks.registry import OBSERVATION_KEYS
from cds_service.smart.timeline import SHOWN_VALUESETS
from cds_service.scenarios import YESCARTA, Chart
from cds_service.terminology import RXNORM, Terminology

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "fhir_profiles"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def test_every_valueset_is_used_by_the_engine_a_profile_or_another_valueset():
    used = {vs for _, vs in OBSERVATION_VALUESETS} | set(MEDICATION_VALUESETS) | {vs for _, vs in DEVICE_TIERS}
    used |= {vs for valuesets in OBSERVATION_KEYS.values() for vs in valuesets} | {"oxygen-device-nasal-cannula"}
    used |= set(ICANS_ANSWER_VALUESETS.values())
    used |= set(SHOWN_VALUESETS)  # the SMART timeline app's, shown only
    for path in PROFILES.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        if '"resourceType": "ValueSet"' in text:
            data = json.loads(text)
            used |= {url.rsplit("/", 1)[-1] for inc in data.get("compose", {}).get("include", [])
                     for url in inc.get("valueSet", [])}
        if '"resourceType": "StructureDefinition"' in text:
            used |= set(re.findall(r"http://crs-cds.org/fhir/ValueSet/([a-z0-9-]+)", text))
    shipped = {p.stem.removeprefix("ValueSet-") for p in PROFILES.glob("ValueSet-*.json")}
    assert shipped - used == set(), "ValueSets nothing uses"
    assert used - shipped == set(), "ValueSets used but not shipped"


def test_no_code_lists_in_python():
    """Codes live in fhir_profiles/: no RxNorm/LOINC/SNOMED code literal in the engine's source."""
    pattern = re.compile(r"[\"'](\d{4,9}|\d{3,6}-\d)[\"']")
    for path in (ROOT / "cds_service").rglob("*.py"):
        if path.name == "scenarios.py":
            continue  # test data, built from the ValueSets and reference.md
        assert not pattern.findall(path.read_text(encoding="utf-8")), path


def test_a_site_adds_local_codes_without_touching_shipped_files(tmp_path):
    local = {"resourceType": "ValueSet", "id": "vasopressors", "url": "http://crs-cds.org/fhir/ValueSet/vasopressors",
             "status": "active",
             "compose": {"include": [{"system": "http://hospital.example.org/formulary",
                                      "concept": [{"code": "NE-DRIP-7", "display": "norepinephrine"}]}]}}
    (tmp_path / "ValueSet-vasopressors.json").write_text(json.dumps(local))
    terms = Terminology.load([tmp_path])
    coded = {"coding": [{"system": "http://hospital.example.org/formulary", "code": "NE-DRIP-7"}]}
    assert terms.match("vasopressors", coded) == "norepinephrine"
    assert terms.match("vasopressors", {"coding": [{"system": RXNORM, "code": "7512"}]}) == "norepinephrine"
    assert Terminology.load().match("vasopressors", coded) is None

    chart = Chart("site", NOW, "Test", "Pat", "male", 50)
    chart.iec(YESCARTA, days_ago=2)
    chart.temp(38.5, hours_ago=1)
    chart.resources.append({"resourceType": "MedicationAdministration", "id": "local-ne", "status": "in-progress",
                            "medicationCodeableConcept": coded, "subject": {"reference": "Patient/site"},
                            "effectivePeriod": {"start": "2026-11-21T10:00:00Z"}})
    assert assess(chart.resources, NOW).crs.value == 0 + 1  # unknown code alone: fever only
    assert assess(chart.resources, NOW, terminology=terms).crs.value == 3


def test_names_match_whole_words_case_insensitively():
    terms = Terminology.load()
    assert terms.match("vasopressors", {"text": "NOREPINEPHRINE 8 mg/250 mL"}) == "norepinephrine"
    assert terms.match("vasopressors", {"text": "Levophed"}) == "norepinephrine"
    assert terms.match("vasopressors", {"text": "vasopressin"}) is None
    assert terms.match("t-cell-engagers", {"coding": [{"display": "TECLISTAMAB-CQYV 90 mg/mL"}]}) == "teclistamab"
    assert terms.match("car-t-products", None, ["Kymriah"]) == "tisagenlecleucel"
    assert terms.match("gm-csf", {"text": "filgrastim"}) is None
    assert terms.match("vasopressors", {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.88", "code": "3992"}]}) \
        == "epinephrine"


def test_every_coded_icans_answer_has_a_grade_in_the_protocol():
    terms = Terminology.load()
    icans = default_protocol()["icans"]
    tables = {"consciousness": icans["consciousness_grades"], "seizure": icans["seizure_grades"],
              "cerebral_edema": icans["cerebral_edema_grades"]}
    for kind, valueset in ICANS_ANSWER_VALUESETS.items():
        assert {code for _, code in terms[valueset].codes} == set(tables[kind]), kind


def test_one_pass_categories_agree_with_matching_each_valueset():
    from cds_service.scenarios import SCENARIOS

    terms = Terminology.load()
    now = NOW
    seen = 0
    for scenario in SCENARIOS:
        for resource in scenario.resources(now):
            if resource["resourceType"] != "MedicationAdministration":
                continue
            codeable = resource.get("medicationCodeableConcept") or resource["contained"][0]["code"]
            one_by_one = {vs: terms.match(vs, codeable) for vs in MEDICATION_VALUESETS}
            assert terms.categories(tuple(MEDICATION_VALUESETS), codeable) == \
                {vs: agent for vs, agent in one_by_one.items() if agent}
            seen += 1
    assert seen > 50
