"""Nothing read in one call changes another: resources are read afresh each time, whatever their
ids and versions; the service's one memo (out of scope) is keyed by content."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

from cds_service.clinical import assess
from cds_service.clinical.facts import extract_facts
from cds_service.clinical.protocol import default_protocol
from cds_service.scenarios import NOREPINEPHRINE, YESCARTA, Chart
from cds_service.terminology import Terminology

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def _stored(resource: dict, version: str) -> dict:
    return {**resource, "meta": {"versionId": version, "lastUpdated": "2026-11-21T11:00:00Z"}}


def _temperatures(resources: list[dict]) -> list[float]:
    facts = extract_facts(resources, NOW, Terminology.load(), default_protocol())
    return [r.value for r in facts.readings if r.kind == "temperature"]


def _chart(temp_c: float) -> tuple[list[dict], dict]:
    chart = Chart("memo", NOW, "Test", "Pat", "female", 50)
    chart.iec(YESCARTA, days_ago=2)
    chart.temp(temp_c, hours_ago=1)
    resources = chart.resources
    observation = next(r for r in resources if r["resourceType"] == "Observation")
    return resources, observation


def test_a_new_version_of_an_observation_is_read_again():
    resources, observation = _chart(38.2)
    first = _stored(observation, "1")
    assert _temperatures([first]) == [38.2]
    assert _temperatures([first]) == [38.2]  # remembered: the same answer
    amended = _stored(copy.deepcopy(observation), "2")
    amended["valueQuantity"]["value"] = 40.1
    assert _temperatures([amended]) == [40.1]


def test_an_observation_without_a_version_is_read_every_time():
    """No versionId/lastUpdated: nothing names its content, so nothing is remembered for it."""
    resources, observation = _chart(38.2)
    assert _temperatures([observation]) == [38.2]
    observation["valueQuantity"]["value"] = 39.6
    assert _temperatures([observation]) == [39.6]


def test_what_counts_is_decided_per_call_not_remembered():
    """The same remembered Observation is a fact at one moment and not yet at an earlier one."""
    resources, observation = _chart(39.0)
    stored = [_stored(r, "1") if r is observation else r for r in resources]
    later = assess(stored, NOW)
    earlier = assess(stored, NOW.replace(hour=10))  # before the temperature was taken
    assert later.crs.value == 1
    assert earlier.crs.value == 0


def test_each_terminology_reads_for_itself(tmp_path):
    """A site's codes change what an Observation is: one terminology's readout is not another's."""
    local = {"resourceType": "ValueSet", "id": "body-temperature",
             "url": "http://crs-cds.org/fhir/ValueSet/body-temperature", "status": "active",
             "compose": {"include": [{"system": "http://hospital.example.org/flowsheet",
                                      "concept": [{"code": "TEMP-CORE", "display": "core temperature"}]}]}}
    (tmp_path / "ValueSet-body-temperature.json").write_text(json.dumps(local))
    site = Terminology.load([tmp_path])
    resources, observation = _chart(39.4)
    coded = _stored(observation, "1")
    coded["code"] = {"coding": [{"system": "http://hospital.example.org/flowsheet", "code": "TEMP-CORE"}]}
    shipped_reading = extract_facts([coded], NOW, Terminology.load(), default_protocol()).readings
    site_reading = extract_facts([coded], NOW, site, default_protocol()).readings
    assert shipped_reading == []
    assert [r.value for r in site_reading] == [39.4]


def test_the_production_entry_point_serves_and_freezes_start_up_objects(tmp_path):
    """``gunicorn 'cds_service.wsgi:app'``: the module builds the app from the environment and
    moves what start-up built out of the garbage collector's reach."""
    script = ("import gc, json; from cds_service.wsgi import app; "
              "r = app.test_client().get('/cds-services'); "
              "print(json.dumps([r.status_code, len(r.get_json()['services']), gc.get_freeze_count()]))")
    env = dict(os.environ, CRS_CDS_AUTH_ENABLED="false", CRS_CDS_FEEDBACK_DB=str(tmp_path / "feedback.sqlite"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    status, services, frozen = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == 200 and services == 3
    assert frozen > 10_000


def test_the_memo_is_bounded_and_forgets_the_oldest_first():
    from cds_service.hooks.memo import ContentMemo

    memo, computed = ContentMemo(size=10), []

    def compute(value):
        computed.append(value["id"])
        return value["id"].upper()

    values = [{"resourceType": "Observation", "id": f"o{n}"} for n in range(25)]
    assert [memo(v, compute) for v in values] == [f"O{n}" for n in range(25)]
    assert len(memo.results) <= 10
    computed.clear()
    assert memo(values[-1], compute) == "O24" and computed == []     # the newest is still there
    assert memo(values[0], compute) == "O0" and computed == ["o0"]   # the oldest was dropped
    assert memo({**values[-1], "status": "final"}, compute) == "O24" and computed == ["o0", "o24"]  # other content


def test_an_observation_outside_every_window_is_not_read():
    """A long chart costs only what some rule's window admits: a malformed blood pressure from
    before the 12 h window is not read (nor reported), one inside it is reported."""
    chart = Chart("window-read", NOW, "Test", "Pat", "female", 50)
    chart.iec(YESCARTA, days_ago=5)
    chart.bp(70, 40, hours_ago=20)      # older than the 12 h hypotension window
    chart.bp(85, 50, hours_ago=1)
    old, recent = [r for r in chart.resources if r["resourceType"] == "Observation"]
    for reading in (old, recent):
        for component in reading["component"]:
            component["valueQuantity"]["value"] = "low"
    result = assess(chart.resources, NOW)
    assert [u.reference for u in result.unreadable] == [f"Observation/{recent['id']}"]


def test_two_servers_resources_sharing_an_id_and_version_are_not_confused():
    """Two EHRs may both have Observation/1 version 1: a different patient or time is another resource."""
    resources, observation = _chart(38.2)
    mine = _stored({**observation, "id": "1"}, "1")
    theirs = copy.deepcopy(mine)
    theirs["subject"] = {"reference": "Patient/someone-else"}
    theirs["valueQuantity"]["value"] = 40.3
    assert _temperatures([mine]) == [38.2]
    assert _temperatures([theirs]) == [40.3]


def _in_scope(resources: list[dict], now: datetime = NOW) -> bool:
    return assess(resources, now).in_scope


def test_an_administration_edited_in_place_is_read_again():
    """The status is part of the key: an infusion entered in error under the same version (a server
    that edits in place) stops counting at once."""
    chart = Chart("memo-status", NOW, "Test", "Pat", "female", 50)
    infusion = _stored(chart.iec(YESCARTA, days_ago=2), "1")
    assert _in_scope([infusion]) and _in_scope([infusion])
    assert not _in_scope([{**infusion, "status": "entered-in-error"}])


def test_an_administration_s_drug_corrected_under_the_same_version_is_read_as_corrected():
    """Administrations are remembered by content, not by version: a CAR-T infusion first charted as
    another drug and corrected in place (same versionId and lastUpdated) brings the patient into scope."""
    chart = Chart("memo-drug", NOW, "Test", "Pat", "female", 50)
    infusion = _stored(chart.iec(YESCARTA, days_ago=2), "1")
    mischarted = {**infusion, "medicationCodeableConcept": {"text": "ondansetron 8 mg IV"}}
    assert not _in_scope([mischarted]) and not _in_scope([mischarted])
    assert _in_scope([infusion])


def test_an_administration_edited_in_place_is_read_as_it_is_now():
    """The same versionId and lastUpdated, other content: an element no rule reads (a route
    written as a string) is ignored, a dose no rule can read (a string) is reported."""
    chart = Chart("edited-in-place", NOW, "Test", "Pat", "female", 50)
    infusion = _stored(chart.iec(YESCARTA, days_ago=2), "1")
    odd_route = {**infusion, "dosage": {**infusion["dosage"], "route": "IV"}}
    bad_dose = {**infusion, "dosage": {**infusion["dosage"], "dose": {"value": "one bag", "unit": "mg"}}}
    for _ in range(2):
        for readable in (infusion, odd_route):
            facts = extract_facts([readable], NOW, Terminology.load(), default_protocol())
            assert facts.unreadable == [] and len(facts.drugs) == 1
        facts = extract_facts([bad_dose], NOW, Terminology.load(), default_protocol())
        assert [u.reference for u in facts.unreadable] == [f"MedicationAdministration/{infusion['id']}"]
        assert "dose" in facts.unreadable[0].reason and facts.drugs == []


def test_an_administration_naming_a_medication_elsewhere_is_read_every_time():
    """Its drug is another resource of the same request, which may change under the same version of
    the administration: such an administration is never remembered."""
    chart = Chart("memo-reference", NOW, "Test", "Pat", "female", 50)
    given = _stored(chart.iec(YESCARTA, days_ago=2), "1")
    given.pop("medicationCodeableConcept")
    given["medicationReference"] = {"reference": "Medication/m1"}
    car_t = {"resourceType": "Medication", "id": "m1", "code": {"text": YESCARTA.text}}
    antiemetic = {"resourceType": "Medication", "id": "m1", "code": {"text": "ondansetron 8 mg IV"}}
    assert _in_scope([given, car_t])
    assert not _in_scope([given, antiemetic])
    assert _in_scope([given, car_t])


def test_a_remembered_open_infusion_runs_until_each_call_s_now():
    """An in-progress infusion without an end runs until the assessment's moment: decided per call."""
    from datetime import timedelta

    chart = Chart("memo-open", NOW, "Test", "Pat", "female", 50)
    chart.iec(YESCARTA, days_ago=2)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=3, rate=(0.1, "ug/kg/min"))
    stored = [_stored(r, "1") for r in chart.resources]
    for moment in (NOW, NOW + timedelta(hours=1)):
        facts = extract_facts(stored, moment, Terminology.load(), default_protocol())
        [drip] = [d for d in facts.drugs if "vasopressors" in d.categories]
        assert drip.end == moment


def test_content_hashes_tell_apart_every_difference_json_can_carry():
    from cds_service.hooks.memo import content_hash

    base = {"resourceType": "MedicationAdministration", "status": "completed", "dosage": {"dose": {"value": 1}}}
    same = json.loads(json.dumps(base))
    assert content_hash(same) == content_hash(base)
    variants = [
        {**base, "status": "in-progress"},
        {**base, "dosage": {"dose": {"value": 1.0}}},   # 1 and 1.0 are equal in Python, not in content
        {**base, "dosage": {"dose": {"value": True}}},  # nor are True and 1
        {**base, "dosage": {"dose": {"value": "1"}}},
        {**base, "dosage": {"dose": [{"value": 1}]}},
        {**base, "note": None},
    ]
    hashes = {content_hash(v) for v in variants} | {content_hash(base)}
    assert len(hashes) == len(variants) + 1


# ---- The out-of-scope answer remembered by the medications key's content --------------------------

SHIPPED = Terminology.load()  # one object, as in a running service: what is remembered is per terminology


def _out_of_scope(chart: Chart, now: datetime, protocol=None, terminology=SHIPPED) -> str | None:
    from cds_service.hooks.registry import SERVICES_BY_ID, out_of_scope, prefetch_templates

    medications = {"resourceType": "Bundle", "type": "searchset",
                   "entry": [{"resource": r} for r in chart.resources if r["resourceType"] == "MedicationAdministration"]}
    request = {"prefetch": {"medications": json.loads(json.dumps(medications))}}  # a fresh parse, as each call has
    return out_of_scope(SERVICES_BY_ID["crs-icans-assessment"], request, prefetch_templates(terminology), now,
                        protocol or default_protocol(), terminology)


def test_the_same_medications_are_in_scope_at_one_time_and_not_at_another():
    """Only "no IEC therapy at all" is remembered: an infusion 61 days ago is out of scope now and
    was in scope two days ago; one charted for tomorrow is out of scope now and in scope later."""
    for days_ago, in_scope_at in ((61, NOW.replace(day=19)), (-1, NOW.replace(day=23))):
        chart = Chart(f"memo-scope-{days_ago}", NOW, "Test", "Pat", "female", 50)
        chart.iec(YESCARTA, days_ago=days_ago)
        chart.infusion(NOREPINEPHRINE, started_hours_ago=2, rate=(0.1, "ug/kg/min"))
        for _ in range(2):  # the second time from whatever was remembered
            assert _out_of_scope(chart, NOW) == "no IEC therapy in the last 60 days"
            assert _out_of_scope(chart, in_scope_at) is None


def test_a_car_t_infusion_added_to_remembered_medications_is_seen():
    chart = Chart("memo-added", NOW, "Test", "Pat", "female", 50)
    chart.infusion(NOREPINEPHRINE, started_hours_ago=2, rate=(0.1, "ug/kg/min"))
    assert _out_of_scope(chart, NOW) == _out_of_scope(chart, NOW) == "no IEC therapy in the last 60 days"
    chart.iec(YESCARTA, days_ago=2)
    assert _out_of_scope(chart, NOW) is None


def test_what_is_remembered_is_per_terminology_and_per_in_scope_statuses(tmp_path):
    """A site's own CAR-T code, and a site protocol counting stopped infusions: the same medications
    read under the shipped terminology and protocol first must not decide for the site."""
    local = {"resourceType": "ValueSet", "id": "car-t-products", "url": "http://crs-cds.org/fhir/ValueSet/car-t-products",
             "status": "active", "compose": {"include": [{"system": "http://hospital.example.org/formulary",
                                                          "concept": [{"code": "CART-77", "display": "site CAR-T"}]}]}}
    (tmp_path / "ValueSet-car-t-products.json").write_text(json.dumps(local))
    chart = Chart("memo-site", NOW, "Test", "Pat", "female", 50)
    infusion = chart.iec(YESCARTA, days_ago=2)
    infusion["medicationCodeableConcept"] = {"coding": [{"system": "http://hospital.example.org/formulary", "code": "CART-77"}]}
    assert _out_of_scope(chart, NOW) == "no IEC therapy in the last 60 days"
    assert _out_of_scope(chart, NOW, terminology=Terminology.load([tmp_path])) is None

    stopped = Chart("memo-stopped", NOW, "Test", "Pat", "female", 50)
    stopped.iec(YESCARTA, days_ago=2, status="stopped")
    from cds_service.clinical.protocol import Protocol
    counting_stopped = Protocol.load(overrides={"scope": {"in_scope_statuses": [
        *default_protocol()["scope"]["in_scope_statuses"], "stopped"]}})
    assert _out_of_scope(stopped, NOW) == "no IEC therapy in the last 60 days"
    assert _out_of_scope(stopped, NOW, protocol=counting_stopped) is None


def _scope_both_ways(request: dict, now: datetime, terminology=SHIPPED) -> tuple[str | None, str | None]:
    """The remembered answer and the one read afresh, as the full call would read it."""
    from cds_service.clinical import out_of_scope_reason
    from cds_service.fhir.prefetch import prefetched_only
    from cds_service.hooks.registry import SERVICES_BY_ID, out_of_scope, prefetch_templates

    service, templates = SERVICES_BY_ID["crs-icans-assessment"], prefetch_templates(terminology)
    remembered = out_of_scope(service, request, templates, now, default_protocol(), terminology)
    resources = prefetched_only({"medications": templates["medications"]}, request)
    afresh = None if resources is None else out_of_scope_reason(resources, now, default_protocol(), terminology)
    return remembered, afresh


def test_every_scenario_is_in_or_out_of_scope_alike_remembered_or_read_afresh():
    from datetime import timedelta

    from cds_service.examples import hook_request
    from cds_service.scenarios import SCENARIOS

    for scenario in SCENARIOS:
        request = hook_request(scenario, NOW)
        for later in (timedelta(0), timedelta(days=29), timedelta(days=61), timedelta(days=-3), timedelta(0)):
            remembered, afresh = _scope_both_ways(json.loads(json.dumps(request)), NOW + later)
            assert remembered == afresh, (scenario.name, later)


def test_a_new_search_bundle_around_the_same_medications_is_remembered_alike():
    """A server makes each search Bundle anew (id, meta, timestamp, self link): what is remembered
    is the entries and the next-page link."""
    from cds_service.examples import hook_request
    from cds_service.hooks.registry import _never_in_scope_memo, prefetch_templates
    from cds_service.scenarios import by_name

    request = hook_request(by_name("no-iec-therapy"), NOW)
    memo = _never_in_scope_memo(prefetch_templates(SHIPPED)["medications"], SHIPPED,
                                tuple(default_protocol()["scope"]["in_scope_statuses"]))
    for search in range(4):
        request["prefetch"]["medications"].update(
            id=f"search-{search}", meta={"lastUpdated": f"2026-11-21T12:00:0{search}Z"},
            timestamp=f"2026-11-21T12:00:0{search}Z",
            link=[{"relation": "self", "url": f"https://ehr.example.org/fhir/MedicationAdministration?s={search}"}])
        assert _scope_both_ways(request, NOW) == ("no IEC therapy in the last 60 days",) * 2
        if search == 0:
            remembered = len(memo.results)
    assert len(memo.results) == remembered  # the later searches found the first one's answer


def test_remembered_medications_that_change_are_read_again():
    """The same out-of-scope medications, then with a next page, an error in the search, or their
    Medication turned into a CAR-T product: each time the answer read afresh, never the remembered one."""
    from cds_service.examples import hook_request
    from cds_service.scenarios import by_name

    request = hook_request(by_name("no-iec-therapy"), NOW)
    medications = request["prefetch"]["medications"]
    assert _scope_both_ways(request, NOW)[0] == "no IEC therapy in the last 60 days"
    paged = {**medications, "link": [{"relation": "next", "url": "https://ehr.example.org/fhir/page2"}]}
    failed = {**medications, "entry": [*medications["entry"], {"resource": {
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}}]}
    given = {"resourceType": "MedicationAdministration", "id": "given", "status": "completed",
             "medicationReference": {"reference": "Medication/product"},
             "subject": {"reference": "Patient/no-iec-therapy"}, "effectiveDateTime": "2026-11-20T12:00:00Z"}
    antiemetic = {"resourceType": "Medication", "id": "product", "code": {"text": "ondansetron 8 mg IV"}}
    car_t = {**antiemetic, "code": {"text": YESCARTA.text}}
    with_antiemetic = {**medications, "entry": [*medications["entry"], {"resource": given}, {"resource": antiemetic}]}
    with_car_t = {**medications, "entry": [*medications["entry"], {"resource": given}, {"resource": car_t}]}
    assert _scope_both_ways({"prefetch": {"medications": with_antiemetic}}, NOW)[0] == "no IEC therapy in the last 60 days"
    for changed in (paged, failed, with_car_t):
        assert _scope_both_ways({"prefetch": {"medications": changed}}, NOW) == (None, None)
