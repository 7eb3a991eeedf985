"""Static checks of the FHIR R4 terminology and profiles in fhir_profiles/.

Every JSON file must parse with its fhir.resources R4B model, canonical URLs must agree with ids
and file names, and no ValueSet may carry a code that reference.md section 4 does not mark as
verified.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

PROFILES_DIR = Path(__file__).resolve().parent.parent / "fhir_profiles"
BASE = "http://crs-cds.org/fhir"
MATCH_NAME_URL = f"{BASE}/StructureDefinition/match-name"
MATCH_AGENT_URL = f"{BASE}/StructureDefinition/match-agent"
IEC_TOXICITY_URL = f"{BASE}/CodeSystem/iec-toxicity"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

ALL_FILES = sorted(PROFILES_DIR.rglob("*.json"))
EXAMPLE_FILES = sorted((PROFILES_DIR / "examples").glob("*.json"))


def _rel(path: Path) -> str:
    return path.relative_to(PROFILES_DIR).as_posix()


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _resources(resource_type: str) -> dict[str, tuple[Path, dict]]:
    """Definition resources (not examples) of one type, keyed by id."""
    found = {}
    for path in ALL_FILES:
        if path.parent != PROFILES_DIR:
            continue
        data = _load(path)
        if data.get("resourceType") == resource_type:
            found[data["id"]] = (path, data)
    return found


VALUE_SETS = _resources("ValueSet")

# The engine loads these ValueSets by id.
REQUIRED_VALUE_SET_IDS = {
    "body-temperature", "systolic-blood-pressure", "blood-pressure-panel", "oxygen-flow-rate",
    "oxygen-delivery-method", "oxygen-device-room-air", "oxygen-device-low-flow",
    "oxygen-device-high-flow", "oxygen-device-positive-pressure", "oxygen-device-nasal-cannula",
    "body-weight", "ferritin", "c-reactive-protein",
    "vasopressors", "vasopressin", "inotropes", "antipyretics", "tocilizumab",
    "anti-cytokine-therapies", "systemic-corticosteroids", "car-t-products",
    "car-t-early-steroid-products", "t-cell-engagers", "iec-therapies", "gm-csf", "g-csf",
    "sedatives",
    "icans-consciousness-levels", "icans-seizure-findings", "icans-cerebral-edema-findings",
}

EXPECTED_IEC_TOXICITY_CODES = {
    "ice-score", "capd-score",
    "consciousness", "awakens-spontaneously", "awakens-to-voice", "awakens-to-tactile",
    "unarousable",
    "seizure", "seizure-none", "seizure-rapidly-resolving", "seizure-prolonged",
    "motor-weakness",
    "cerebral-edema", "edema-none", "edema-focal", "edema-diffuse",
    "crs-grade", "icans-grade",
}

# Codes marked "verified" in the clinical reference (reference.md) section 4 (4a LOINC, 4b SNOMED CT,
# 4c RxNorm). A code outside this list must not appear in a ValueSet until it is verified there.
VERIFIED_CODES = {
    LOINC: {
        "8310-5", "8480-6", "8462-4", "85354-9", "8478-0", "8867-4", "59408-5", "2708-6",
        "3151-8", "3150-0", "19994-3", "107117-4", "9279-1", "29463-7", "1988-5", "2276-4",
        "20567-4", "3255-7", "14804-9", "2532-0", "26881-3", "9269-2",
        # Not in reference.md: "Blood pressure systolic and diastolic", the panel Synthea and the
        # SMART sample data send, with the same display in public LOINC ConceptMaps and FHIR examples.
        "55284-4",
    },
    SNOMED: {
        "336623009", "466713001", "425478008", "371907003", "426854004", "1259025002",
        "336602003", "371908008", "427591007", "428285009", "465433006", "429253002",
        "47545007", "467645007", "706226000", "243142003", "1186618000", "425826004",
        "447837008", "1258985005", "40617009", "449071006", "26412008",
    },
    RXNORM: {
        "612865", "72435", "3264", "6902", "5492", "161", "5640", "7512", "3992", "8163",
        "3628", "11149", "3616", "68442", "338036", "114477", "1193326", "1597258",
    },
}


def _include_codes(value_set: dict) -> set[tuple[str, str]]:
    return {
        (include.get("system"), concept["code"])
        for include in value_set.get("compose", {}).get("include", [])
        for concept in include.get("concept", [])
    }


def _match_names(value_set: dict) -> list[str]:
    names = []
    for ext in value_set.get("extension", []):
        if ext["url"] == MATCH_NAME_URL:
            names.append(ext["valueString"])
        elif ext["url"] == MATCH_AGENT_URL:
            names += [e["valueString"] for e in ext["extension"] if e["url"] == "name"]
    return names


def test_profiles_folder_is_not_empty():
    assert ALL_FILES, f"no JSON files under {PROFILES_DIR}"
    assert EXAMPLE_FILES, "no example instances under fhir_profiles/examples"


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_file_parses_with_r4b_model(path: Path):
    try:
        data = _load(path)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{_rel(path)}: invalid JSON: {exc}")
    resource_type = data.get("resourceType")
    assert resource_type, f"{_rel(path)}: no resourceType"
    try:
        model = get_fhir_model_class(resource_type)
    except Exception as exc:  # unknown resource type
        pytest.fail(f"{_rel(path)}: unknown resourceType {resource_type!r}: {exc}")
    try:
        model.model_validate(data)
    except Exception as exc:
        pytest.fail(f"{_rel(path)}: does not validate as {resource_type}: {exc}")


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_file_name_matches_resource_type_and_id(path: Path):
    data = _load(path)
    assert path.name == f"{data['resourceType']}-{data['id']}.json", _rel(path)


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_file_is_pretty_printed_with_two_spaces(path: Path):
    text = path.read_text(encoding="utf-8")
    expected = json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    assert text == expected, f"{_rel(path)}: not 2-space pretty-printed JSON"


def test_required_value_sets_exist():
    missing = REQUIRED_VALUE_SET_IDS - set(VALUE_SETS)
    assert not missing, f"missing ValueSets: {sorted(missing)}"


@pytest.mark.parametrize("vs_id", sorted(VALUE_SETS))
def test_value_set_url_id_and_file_name_agree(vs_id: str):
    path, vs = VALUE_SETS[vs_id]
    assert path.name == f"ValueSet-{vs_id}.json"
    assert vs["url"] == f"{BASE}/ValueSet/{vs_id}", _rel(path)
    assert vs["version"] == "0.1.0", _rel(path)
    assert vs["status"] == "active", _rel(path)
    assert vs.get("description"), _rel(path)


@pytest.mark.parametrize("vs_id", sorted(VALUE_SETS))
def test_value_set_include_concepts_have_display(vs_id: str):
    path, vs = VALUE_SETS[vs_id]
    for include in vs.get("compose", {}).get("include", []):
        for concept in include.get("concept", []):
            assert concept.get("display"), (
                f"{_rel(path)}: {include.get('system')}#{concept.get('code')} has no display"
            )


@pytest.mark.parametrize("vs_id", sorted(VALUE_SETS))
def test_value_set_codes_are_verified(vs_id: str):
    path, vs = VALUE_SETS[vs_id]
    for system, code in _include_codes(vs):
        if system == IEC_TOXICITY_URL:
            continue  # checked against the CodeSystem below
        assert system in VERIFIED_CODES, f"{_rel(path)}: unexpected system {system}"
        assert code in VERIFIED_CODES[system], (
            f"{_rel(path)}: {system}#{code} is not marked verified in reference.md section 4"
        )


@pytest.mark.parametrize("vs_id", sorted(VALUE_SETS))
def test_value_set_includes_resolve_locally(vs_id: str):
    path, vs = VALUE_SETS[vs_id]
    known = {data["url"] for _, data in VALUE_SETS.values()}
    for include in vs.get("compose", {}).get("include", []):
        # several valueSet entries in one include would mean their intersection: one per include
        assert len(include.get("valueSet", [])) <= 1, f"{_rel(path)}: include intersects ValueSets"
        for canonical in include.get("valueSet", []):
            assert canonical in known, f"{_rel(path)}: included {canonical} not in fhir_profiles/"


@pytest.mark.parametrize("vs_id", sorted(VALUE_SETS))
def test_value_set_match_names_are_lower_case_and_unique(vs_id: str):
    path, vs = VALUE_SETS[vs_id]
    for ext in vs.get("extension", []):
        assert ext["url"] in (MATCH_NAME_URL, MATCH_AGENT_URL), f"{_rel(path)}: unexpected extension {ext['url']}"
    names = _match_names(vs)
    assert all(name and name == name.lower() and name == name.strip() for name in names), _rel(path)
    assert len(names) == len(set(names)), f"{_rel(path)}: duplicate match names"
    assert names or vs.get("compose"), f"{_rel(path)}: neither codes nor names"


def test_vasopressin_is_not_counted_as_a_vasopressor():
    _, vasopressors = VALUE_SETS["vasopressors"]
    assert (RXNORM, "11149") not in _include_codes(vasopressors)
    assert not {"vasopressin", "vasostrict", "pitressin"} & set(_match_names(vasopressors))
    assert not {"dobutamine", "milrinone"} & set(_match_names(vasopressors))


def test_gm_csf_and_g_csf_names_do_not_overlap():
    _, gm = VALUE_SETS["gm-csf"]
    _, g = VALUE_SETS["g-csf"]
    assert not set(_match_names(gm)) & set(_match_names(g))


def test_code_system_has_exactly_the_expected_codes():
    code_systems = _resources("CodeSystem")
    assert set(code_systems) == {"iec-toxicity"}
    path, cs = code_systems["iec-toxicity"]
    assert cs["url"] == IEC_TOXICITY_URL, _rel(path)
    assert cs["content"] == "complete" and cs["caseSensitive"] is True
    codes = [concept["code"] for concept in cs["concept"]]
    assert len(codes) == len(set(codes)), "duplicate codes in iec-toxicity"
    assert set(codes) == EXPECTED_IEC_TOXICITY_CODES
    assert all(concept.get("display") and concept.get("definition") for concept in cs["concept"])


def test_local_codes_in_value_sets_exist_in_code_system():
    _, cs = _resources("CodeSystem")["iec-toxicity"]
    displays = {concept["code"]: concept["display"] for concept in cs["concept"]}
    for path, vs in VALUE_SETS.values():
        for include in vs.get("compose", {}).get("include", []):
            if include.get("system") != IEC_TOXICITY_URL:
                continue
            for concept in include["concept"]:
                assert concept["code"] in displays, f"{_rel(path)}: unknown {concept['code']}"
                assert concept["display"] == displays[concept["code"]], _rel(path)


def test_structure_definition_urls_match_ids():
    for sd_id, (path, sd) in _resources("StructureDefinition").items():
        assert sd["url"] == f"{BASE}/StructureDefinition/{sd_id}", _rel(path)
        assert sd["fhirVersion"] == "4.0.1", _rel(path)
        assert sd["derivation"] == "constraint", _rel(path)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=_rel)
def test_example_declares_a_profile_in_the_folder(path: Path):
    example = _load(path)
    profiles = example.get("meta", {}).get("profile", [])
    assert profiles, f"{_rel(path)}: no meta.profile"
    definitions = {sd["url"]: sd for _, sd in _resources("StructureDefinition").values()}
    for profile in profiles:
        assert profile in definitions, f"{_rel(path)}: profile {profile} not in fhir_profiles/"
        sd = definitions[profile]
        assert example["resourceType"] == sd["type"], _rel(path)
        # light conformance check of the parts the profiles constrain
        for element in sd["differential"]["element"]:
            pattern = element.get("patternCodeableConcept")
            if element["path"] == "Observation.code" and pattern:
                codings = {(c.get("system"), c.get("code")) for c in example["code"]["coding"]}
                for coding in pattern["coding"]:
                    assert (coding["system"], coding["code"]) in codings, _rel(path)
            if element["path"] == "Observation.value[x]" and "minValueInteger" in element:
                value = example["valueInteger"]
                assert element["minValueInteger"] <= value <= element["maxValueInteger"], _rel(path)
