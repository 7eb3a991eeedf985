"""What each EHR kind is offered in the cards (suggestion actions, order codes, doses in words), and
feedback in each shape EHRs send it; all through real HTTP.

Epic applies only MedicationRequest/ServiceRequest create and delete and Condition create, one
action per suggestion, and takes a suggested order's dose from its own order record; Oracle Health
documents no suggestions (patient-view only); a generic client gets every action."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.medicationrequest import MedicationRequest
from jwt.algorithms import ECAlgorithm

from cds_service.app import create_app
from cds_service.examples import hook_request, prefetch_for
from cds_service.feedback import format_report, read_report
from cds_service.hooks.api import schema_validator
from cds_service.clinical.model import MedicationOrder, Recommendation
from cds_service.hooks.cards import EPIC_PREFERENCE_LIST, _order_suggestions
from cds_service.hooks.registry import SERVICES_BY_ID, prefetch_templates
from cds_service.scenarios import by_name
from cds_service.settings import Settings
from cds_service.terminology import RXNORM, load_terminology

KINDS = ("generic", "epic", "oracle-health")
ASSESS, SIGN = "/cds-services/crs-icans-assessment", "/cds-services/crs-order-safety-sign"
EPIC_ACTIONS = {("MedicationRequest", "create"), ("MedicationRequest", "delete"), ("ServiceRequest", "create"),
                ("ServiceRequest", "delete"), ("Condition", "create")}
RXNORM_OID = "urn:oid:2.16.840.1.113883.6.88"


@pytest.fixture(scope="module")
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def services(tmp_path_factory, serve_app_module):
    """One deployment per EHR kind (the top-level ``ehr`` setting); authentication off."""
    folder = tmp_path_factory.mktemp("ehr-kinds")
    return {kind: serve_app_module(create_app(Settings(feedback_db=str(folder / f"{kind}.sqlite3"),
                                                       auth_enabled=False, ehr=kind)))
            for kind in KINDS}


def request_for(kind: str, scenario: str, now: datetime, service_id: str = "crs-icans-assessment") -> dict:
    """The scenario's hook request with its prefetch made by the EHR kind's own templates."""
    chart = by_name(scenario)
    body = hook_request(chart, now, service_id)
    templates = prefetch_templates(load_terminology(), kind)
    body["prefetch"] = prefetch_for(chart.resources(now), chart.name,
                                    {key: templates[key] for key in SERVICES_BY_ID[service_id].prefetch_keys})
    return body


def tocilizumab_draft(order_id: str, dose_mg: float) -> dict:
    return {"resourceType": "MedicationRequest", "id": order_id, "status": "draft", "intent": "order",
            "subject": {"reference": "Patient/crs3-norepi-vaso"}, "medicationCodeableConcept": {"text": "tocilizumab"},
            "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {
                "value": dose_mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}]}]}


def order_sign(kind: str, now: datetime, draft: dict) -> dict:
    body = request_for(kind, "crs3-norepi-vaso", now, "crs-order-safety-sign")
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}
    return body


def cards_of(service, path: str, body: dict) -> list[dict]:
    answer = service.post(path, body)
    assert answer.status_code == 200, answer.text
    errors = list(schema_validator("response").iter_errors(answer.json()))
    assert not errors, errors[0].message
    return answer.json()["cards"]


def suggestions(cards: list[dict]) -> list[dict]:
    return [s for card in cards for s in card.get("suggestions", [])]


def action_kinds(cards: list[dict]) -> set[tuple[str, str]]:
    """(resource type, action type) of every action offered."""
    found = set()
    for suggestion in suggestions(cards):
        for action in suggestion["actions"]:
            kind = action["resource"]["resourceType"] if "resource" in action else action["resourceId"].split("/")[0]
            found.add((kind, action["type"]))
    return found


def dose_words(request: dict) -> str:
    return f'{request["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"]:g} mg'


def check_suggestions(kind: str, cards: list[dict]) -> list[dict]:
    """Every suggestion: one action, a label under 80 characters; every resource valid R4B FHIR, and
    every dosed MedicationRequest's dose in its label, in its action's words and in its card's text.
    Returns the suggested MedicationRequests."""
    requests_ = []
    for card in cards:
        for suggestion in card.get("suggestions", []):
            assert len(suggestion["label"]) < 80 and len(suggestion["actions"]) == 1
            [action] = suggestion["actions"]
            if "resource" not in action:
                continue
            resource = action["resource"]
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            if resource["resourceType"] != "MedicationRequest":
                continue
            MedicationRequest.model_validate(resource)
            requests_.append(resource)
            if resource["dosageInstruction"][0].get("doseAndRate"):
                dose = dose_words(resource)
                assert dose in suggestion["label"] and dose in action["description"], (kind, suggestion)
                assert dose in card["detail"] or dose in card["summary"], (kind, card["detail"])
    return requests_


# ---- patient-view: CRS 3 on norepinephrine and vasopressin ---------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_crs3_card_offers_the_actions_the_ehr_applies(services, now, kind):
    cards = cards_of(services[kind], ASSESS, request_for(kind, "crs3-norepi-vaso", now))
    main = cards[0]
    assert main["summary"].startswith("CRS grade 3, ICANS grade 1") and "tocilizumab" in main["summary"]
    orders = check_suggestions(kind, cards)
    assert {o["medicationCodeableConcept"]["text"] for o in orders} == {"tocilizumab", "dexamethasone"}
    labels = [s["label"] for s in main["suggestions"]]
    if kind == "epic":
        assert action_kinds(cards) <= EPIC_ACTIONS
        assert action_kinds(cards) == {("MedicationRequest", "create")}  # no grade to record, no update
        assert not any(label.startswith("Record") for label in labels)
        toci = next(o for o in orders if o["medicationCodeableConcept"]["text"] == "tocilizumab")
        assert toci["medicationCodeableConcept"]["coding"] == [
            {"system": RXNORM_OID, "code": "612865", "display": "tocilizumab"}]
        assert f"set tocilizumab {dose_words(toci)} IV; dexamethasone 10 mg IV q6h." in main["detail"]
        assert all("the order opens with the site's default" in a["description"]
                   for s in main["suggestions"] for a in s["actions"])
    else:  # generic and Oracle Health: the orders and the grades to record, as always
        assert action_kinds(cards) == {("MedicationRequest", "create"), ("Observation", "create")}
        assert "Record CRS grade 3" in labels and "Record ICANS grade 1" in labels
        assert all(o["medicationCodeableConcept"]["coding"][0]["system"] == RXNORM for o in orders)
        assert "site's default dose" not in main["detail"]


def test_epic_gets_the_generic_orders_without_the_grade_observations(services, now):
    def offered(kind: str) -> list[tuple[str, bool]]:
        cards = cards_of(services[kind], ASSESS, request_for(kind, "crs3-norepi-vaso", now))
        return [(s["label"], s.get("isRecommended", False)) for s in suggestions(cards)]

    generic, epic = offered("generic"), offered("epic")
    assert epic == [(label, recommended) for label, recommended in generic if not label.startswith("Record")]
    assert len(epic) == 2


# ---- order-sign: a tocilizumab order above the computed dose ---------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_a_tocilizumab_order_is_corrected_with_the_actions_the_ehr_applies(services, now, kind):
    cards = cards_of(services[kind], SIGN, order_sign(kind, now, tocilizumab_draft("t1", 1000)))
    [card] = cards
    assert card["source"]["topic"]["code"] == "tocilizumabOrderCheck" and "800 mg" in card["summary"]
    [order] = check_suggestions(kind, cards)
    dose = dose_words(order)
    if kind == "generic":  # as always: the draft updated in place
        [suggestion] = card["suggestions"]
        [action] = suggestion["actions"]
        assert action["type"] == "update" and action["resource"]["id"] == "t1"
        assert suggestion["label"] == f"Change to tocilizumab {dose} IV"
        return
    # Epic and Oracle Health: no update; the draft removed and the corrected order created, both
    # pre-selected, one action each.
    assert action_kinds(cards) == {("MedicationRequest", "delete"), ("MedicationRequest", "create")}
    remove, create = card["suggestions"]
    assert remove["actions"] == [{"type": "delete", "resourceId": "MedicationRequest/t1",
                                  "description": f"Remove the tocilizumab 1000 mg order (replaced by "
                                                 f"tocilizumab {dose} IV over 1 hour)"}]
    assert remove["label"] == "Remove the tocilizumab 1000 mg order"
    assert create["label"] == f"Order instead: tocilizumab {dose} IV"
    assert remove["isRecommended"] and create["isRecommended"]
    assert "id" not in create["actions"][0]["resource"]
    assert create["actions"][0]["description"].startswith(f"Order tocilizumab {dose} IV over 1 hour instead of "
                                                          "the tocilizumab 1000 mg order")
    if kind == "epic":
        assert action_kinds(cards) <= EPIC_ACTIONS
        assert f"- Suggested orders open with the site's default dose: set tocilizumab {dose} IV." in card["detail"]
        assert create["actions"][0]["resource"]["medicationCodeableConcept"]["coding"][0]["system"] == RXNORM_OID


@pytest.mark.parametrize("kind", KINDS)
def test_a_gm_csf_order_is_removed_and_filgrastim_offered_at_every_ehr(services, now, kind):
    draft = {"resourceType": "MedicationRequest", "id": "gm-1", "status": "draft", "intent": "order",
             "subject": {"reference": "Patient/crs3-norepi-vaso"},
             "medicationCodeableConcept": {"text": "Leukine (sargramostim) 250 mcg/m2 IV"}}
    cards = cards_of(services[kind], SIGN, order_sign(kind, now, draft))
    [card] = [c for c in cards if c["source"]["topic"]["code"] == "gmCsfAfterIec"]
    [remove, instead] = card["suggestions"]
    assert remove["actions"][0] == {"type": "delete", "description": "Remove the sargramostim order",
                                    "resourceId": "MedicationRequest/gm-1"}
    assert instead["actions"][0]["type"] == "create" and instead["label"] == "Order instead: filgrastim SC"
    # No dose to set: filgrastim is dosed per local protocol.
    assert "site's default" not in instead["actions"][0]["description"] and "site's default" not in card["detail"]
    check_suggestions(kind, [card])


def test_a_long_order_label_keeps_the_drug_and_dose_under_80_characters():
    order = MedicationOrder("methylprednisolone sodium succinate (Solu-Medrol)", 1000, "IV infusion", 24,
                            "methylprednisolone 1000 mg IV every 24 h for 3 days", 3)
    rec = Recommendation("steroid", "warning", "Steroids", [], "", order, target="MedicationRequest/d1",
                         replace_target=True, target_label="methylprednisolone sodium succinate (Solu-Medrol) 250 mg "
                                                           "IV every 6 h for 3 days")
    terms = load_terminology()
    for kind in KINDS:
        offered = _order_suggestions([rec], SimpleNamespace(patient_id="p"), terms, kind)
        assert all(len(s["label"]) < 80 for s in offered)
        create = next(s for s in offered if s["actions"][0]["type"] in ("create", "update"))
        assert create["label"].endswith("1000 mg IV q24h x 3 days")
        MedicationRequest.model_validate(create["actions"][0]["resource"])


# ---- Epic: the site's orderable code ---------------------------------------------------------------

EPIC_ISS, OTHER_ISS = "https://epic.example.org/api/FHIR/R4", "https://other.example.org"
KEYS = {iss: ec.generate_private_key(ec.SECP384R1()) for iss in (EPIC_ISS, OTHER_ISS)}


def _token(iss: str, aud: str) -> str:
    issued = int(time.time())
    return jwt.encode({"iss": iss, "aud": aud, "iat": issued, "exp": issued + 300, "jti": str(uuid.uuid4())},
                      KEYS[iss], algorithm="ES384", headers={"typ": "JWT", "kid": "k1"})


def _preference_list(folder: Path) -> Path:
    """The site's preference-list items for tocilizumab and dexamethasone, in the drugs' ValueSets."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, url, code, display in (
            ("toci", "http://crs-cds.org/fhir/ValueSet/tocilizumab", "PL-4410", "Tocilizumab IV infusion for CRS"),
            ("dexa", "http://crs-cds.org/fhir/ValueSet/systemic-corticosteroids", "PL-2001", "dexamethasone")):
        include = {"system": EPIC_PREFERENCE_LIST, "concept": [{"code": code, "display": display}]}
        (folder / f"ValueSet-site-{name}.json").write_text(json.dumps({
            "resourceType": "ValueSet", "id": f"site-{name}", "url": url, "compose": {"include": [include]}}))
    return folder


def test_epic_orders_by_the_site_preference_list_item(tmp_path, serve_app, now):
    """One deployment, one site terminology with preference-list items: the Epic client's profile
    orders by them; the other client (generic) keeps the RxNorm code."""
    def jwk(iss):
        return {**ECAlgorithm.to_jwk(KEYS[iss].public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}

    service = serve_app(create_app(Settings(
        feedback_db=str(tmp_path / "feedback.sqlite3"), terminology_dirs=[str(_preference_list(tmp_path / "site"))],
        trusted_issuers={iss: {"jwks": {"keys": [jwk(iss)]}} for iss in KEYS},
        profiles={"epic-site": {"iss": EPIC_ISS, "ehr": "epic"}})))
    codings = {}
    for iss, kind in ((EPIC_ISS, "epic"), (OTHER_ISS, "generic")):
        answer = service.post(ASSESS, request_for(kind, "crs3-norepi-vaso", now),
                              headers={"Authorization": f"Bearer {_token(iss, service.base + ASSESS)}"})
        assert answer.status_code == 200, answer.text
        orders = check_suggestions(kind, answer.json()["cards"])
        codings[kind] = {o["medicationCodeableConcept"]["text"]: o["medicationCodeableConcept"]["coding"]
                         for o in orders}
    assert codings["epic"] == {
        "tocilizumab": [{"system": EPIC_PREFERENCE_LIST, "code": "PL-4410", "display": "tocilizumab"}],
        "dexamethasone": [{"system": EPIC_PREFERENCE_LIST, "code": "PL-2001", "display": "dexamethasone"}]}
    assert codings["generic"] == {
        "tocilizumab": [{"system": RXNORM, "code": "612865", "display": "tocilizumab"}],
        "dexamethasone": [{"system": RXNORM, "code": "3264", "display": "dexamethasone"}]}


# ---- Feedback, in each shape clients send it ---------------------------------------------------------

REASON = {"system": "http://crs-cds.org/fhir/CodeSystem/override-reason", "code": "already-addressed",
          "display": "Already addressed"}
EPIC_EXTENSION = {"com.epic.cdshooks.feedback.overrideReason.reasonCategory": "45",
                  "com.epic.cdshooks.feedback.overrideReason.reasonDisplay": "Does not meet criteria",
                  "com.epic.cdshooks.feedback.overrideReason.reasonTitle": "Does not meet criteria"}
SHAPES = {
    # CDS Hooks 2.0: one overrideReason {reason, userComment}; clients also send an array of them.
    "cds-hooks-2.0": {"overrideReason": {"reason": REASON, "userComment": "charted by the ICU team"}},
    "array": {"overrideReasons": [{"reason": REASON, "userComment": "charted by the ICU team"}]},
    # Epic, a reason sent by the service: one object.
    "epic-object": {"overrideReasons": {"reason": REASON, "userComment": "charted by the ICU team"}},
    # Epic, a reason built in Epic: in an extension.
    "epic-extension": {"overrideReasons": {"extension": EPIC_EXTENSION, "userComment": "patient on trial protocol"}},
    # A bare Coding (the older Sandbox).
    "bare-coding": {"overrideReasons": [REASON]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_feedback_in_each_shape_is_stored_and_reported(tmp_path, serve_app, now, shape):
    db = tmp_path / "feedback.sqlite3"
    service = serve_app(create_app(Settings(feedback_db=str(db), auth_enabled=False, ehr="epic")))
    [card, *_] = cards_of(service, ASSESS, request_for("epic", "crs3-norepi-vaso", now))
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-06T05:00:00Z", **SHAPES[shape]}
    answer = service.post(ASSESS + "/feedback", {"feedback": [item]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": 1, "duplicates": 0}

    [row] = read_report(db)
    assert (row["topic"], row["overridden"]) == (card["source"]["topic"]["code"], 1)
    [reason] = row["override_reasons"]
    comment = {"bare-coding": None, "epic-extension": "patient on trial protocol"}.get(shape, "charted by the ICU team")
    if shape == "epic-extension":
        assert reason == {"system": "com.epic.cdshooks.feedback.overrideReason.reasonCategory", "code": "45",
                          "display": "Does not meet criteria", "count": 1}
    else:
        assert reason == {**REASON, "count": 1}
    assert row["comments"] == (0 if comment is None else 1)
    assert [c["comment"] for c in row["latest_comments"]] == ([] if comment is None else [comment])

    # And as the operator reads it: `crs-cds feedback-report`.
    printed = subprocess.run([sys.executable, "-m", "cds_service.cli", "feedback-report", "--db", str(db)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert f'{reason["code"]} "{reason["display"]}" (1)' in printed
    if comment:
        assert "1 comment" in printed and f'"{comment}"' in printed
    else:
        assert "USER COMMENTS" not in printed
    assert printed.strip() == format_report([row])


def test_feedback_with_override_reasons_of_another_type_is_400(tmp_path, serve_app):
    service = serve_app(create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False)))
    for reasons in ("not a reason", 45, [["a", "list"]], {"reason": {"system": "s"}}):
        item = {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-12-06T05:00:00Z",
                "overrideReasons": reasons}
        answer = service.post(ASSESS + "/feedback", {"feedback": [item]})
        assert answer.status_code == 400, (reasons, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
