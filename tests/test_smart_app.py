"""The SMART timeline app end to end, in Debian's Chromium driven by Playwright.

``FakeEhr`` (tests/smart_ehr.py) stands in for an EHR: a minimal hand-written OAuth 2.0 / SMART App Launch
authorization server (``.well-known/smart-configuration``, ``/authorize`` that approves at once,
``/token`` that checks the PKCE verifier) with the EHR's FHIR endpoint in front of sekmet (the
bearer token checked, next-page links rewritten to the EHR's address, refusals on demand). It is
not a real EHR's server; it checks what a real one would refuse.
"""
from __future__ import annotations

import base64
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.scenarios import by_name
from cds_service.settings import Settings
from smart_ehr import CLIENT_ID, SECRET, FakeEhr

CHROMIUM = "/usr/bin/chromium"


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Debian's Chromium is missing ({CHROMIUM}): install it with "
                    "`apt-get update && apt-get install -y chromium` (`make test` does)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install '.[test]'` (never `playwright install`)", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def loaded(fhir_server, now):
    for name in ("crs3-norepi-vaso", "concurrent-icans-crs1"):
        fhir_server.load(by_name(name).bundle(now))
    return fhir_server


@pytest.fixture
def ehr(loaded):
    server = FakeEhr(loaded.base_url)
    yield server
    server.close()


def app_for(ehr: FakeEhr, tmp_path: Path, confidential: bool = False, **settings):
    client = {"client_id": CLIENT_ID}
    if confidential:
        client["client_secret"] = SECRET
    return create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False,
                               smart_clients={ehr.iss: client}, **settings))


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    yield context.new_page()
    context.close()


def bands(page, lane: str) -> list[dict]:
    return page.eval_on_selector_all(
        f'g.band[data-lane="{lane}"]',
        "els => els.map(e => ({grade: e.dataset.grade, atLeast: e.dataset.atLeast, waived: e.dataset.waived, "
        "from: e.dataset.from, to: e.dataset.to, count: e.dataset.count, title: e.querySelector('title').textContent}))")


def grade_at(page_bands: list[dict], moment: datetime) -> str | None:
    """The band's grade for the hour that ends at ``moment`` (or the last hour)."""
    for band in page_bands:
        if datetime.fromisoformat(band["from"]) <= moment <= datetime.fromisoformat(band["to"]):
            return band["grade"]
    return None


def first_hour_end_after(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0) + timedelta(hours=1) if (moment.minute or moment.second) else moment


def launch(page, app, ehr: FakeEhr, patient: str):
    return page.goto(f"{app.base}/smart/launch?{urlencode({'iss': ehr.iss, 'launch': ehr.launch_for(patient)})}")


# -- the launch and the timeline --------------------------------------------------------------------

def test_ehr_launch_with_pkce_renders_the_crs3_course(ehr, page, serve_app, tmp_path, now):
    app = serve_app(app_for(ehr, tmp_path))
    answer = launch(page, app, ehr, "crs3-norepi-vaso")
    assert answer.status == 200, page.content()[:2000]
    assert page.url == f"{app.base}/smart/timeline"

    # The authorization request: PKCE S256, aud = iss, the scopes, a long random state.
    asked = ehr.authorize_requests[-1]
    assert asked["aud"] == ehr.iss and asked["code_challenge_method"] == "S256"
    assert asked["scope"] == ("launch openid fhirUser patient/Observation.rs patient/MedicationAdministration.rs "
                              "patient/Patient.r")
    assert len(base64.urlsafe_b64decode(asked["state"] + "==")) * 8 >= 128
    assert ehr.token_requests[-1]["client_id"] == CLIENT_ID and not ehr.token_requests[-1]["basic"]

    # Tokens stay on the server: one opaque HttpOnly cookie, no token in the page.
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["crs_smart"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Lax"
    html = page.content()
    for token in ehr.tokens:
        assert token not in html and token != cookies[0]["value"]

    # Grade bands at the right hours: fever 2 h ago with norepinephrine + vasopressin running -> CRS 3
    # from the hour that ends after the fever; CRS 0 before; ICANS 1 from the ICE 9 (2 h ago).
    fever = now - timedelta(hours=2)
    crs = bands(page, "crs")
    assert grade_at(crs, now) == "3"
    assert grade_at(crs, first_hour_end_after(fever)) == "3"
    assert grade_at(crs, first_hour_end_after(fever) - timedelta(hours=1)) == "0"
    assert grade_at(crs, now - timedelta(days=2)) == "0"
    assert all(b["atLeast"] == "false" for b in crs)
    icans = bands(page, "icans")
    assert grade_at(icans, now) == "1" and grade_at(icans, first_hour_end_after(fever) - timedelta(hours=1)) == "0"
    assert "CRS grade 3" in page.inner_text("#current") and "ICANS grade 1" in page.inner_text("#current")
    # Vasopressors: norepinephrine from 5 h ago, vasopressin from 3 h ago: two at the end.
    pressors = bands(page, "pressors")
    assert pressors[-1]["count"] == "2" and "norepinephrine" in pressors[-1]["title"] and "vasopressin" in pressors[-1]["title"]
    # Dose markers: tocilizumab 14 h ago, the CAR-T infusion 5 days ago.
    doses = page.eval_on_selector_all("g.dose", "els => els.map(e => [e.dataset.dose, e.dataset.time])")
    assert ["tocilizumab", (now - timedelta(hours=14)).isoformat()] in doses
    assert any(kind == "IEC therapy" for kind, _ in doses)
    # Source readings on hover/focus: a temperature point names its Observation.
    point = page.locator('g.point[data-kind="temperature"]').first
    assert "39.4" in point.locator("title").text_content() and "crs3-norepi-vaso-temp1" in point.locator("title").text_content()
    assert point.get_attribute("tabindex") == "0"
    assert not page.locator(".missing").count()

    shot = tmp_path / "timeline-crs3-norepi-vaso.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # A chosen window: the last 24 hours, graded the same.
    assert page.goto(f"{app.base}/smart/timeline?hours=24").status == 200
    crs = bands(page, "crs")
    assert datetime.fromisoformat(crs[0]["from"]) <= now - timedelta(hours=23)
    assert datetime.fromisoformat(crs[0]["from"]) >= now - timedelta(hours=25)
    assert grade_at(crs, first_hour_end_after(fever)) == "3" and crs[-1]["grade"] == "3"
    shot = tmp_path / "timeline-crs3-norepi-vaso-24h.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_concurrent_icans_course_shows_icans_2_and_the_antipyretic(ehr, page, serve_app, tmp_path, now):
    app = serve_app(app_for(ehr, tmp_path))
    assert launch(page, app, ehr, "concurrent-icans-crs1").status == 200
    icans = bands(page, "icans")
    ice = now - timedelta(hours=1)  # ICE 5 and "awakens to voice" 1 h ago: ICANS 2
    assert grade_at(icans, now) == "2"
    assert grade_at(icans, first_hour_end_after(ice) - timedelta(hours=1)) == "0"
    assert grade_at(bands(page, "crs"), now) == "1"
    doses = page.eval_on_selector_all("g.dose", "els => els.map(e => [e.dataset.dose, e.dataset.time])")
    assert ["antipyretic", (now - timedelta(hours=19)).isoformat()] in doses
    assert page.locator('g.point[data-kind="ice"]').count() == 1
    assert page.locator('g.point[data-kind="consciousness"]').count() == 1
    shot = tmp_path / "timeline-concurrent-icans-crs1.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert page.goto(f"{app.base}/smart/timeline?hours=96").status == 200
    shot = tmp_path / "timeline-concurrent-icans-crs1-96h.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_standalone_launch_as_a_confidential_client(ehr, page, serve_app, tmp_path):
    ehr.confidential = True
    ehr.launch_for("crs3-norepi-vaso")  # the patient the EHR's picker would choose
    app = serve_app(app_for(ehr, tmp_path, confidential=True))
    answer = page.goto(f"{app.base}/smart/launch?{urlencode({'iss': ehr.iss})}")
    assert answer.status == 200, page.content()[:2000]
    assert ehr.authorize_requests[-1]["scope"].startswith("launch/patient openid fhirUser ")
    assert "launch" not in ehr.authorize_requests[-1]
    assert ehr.token_requests[-1]["basic"] and "client_id" not in ehr.token_requests[-1]
    assert bands(page, "crs")[-1]["grade"] == "3"


# -- refusals ---------------------------------------------------------------------------------------

def test_a_wrong_state_is_refused(ehr, page, serve_app, tmp_path):
    ehr.tamper_state = True
    app = serve_app(app_for(ehr, tmp_path))
    answer = launch(page, app, ehr, "crs3-norepi-vaso")
    assert answer.status == 400
    assert "state mismatch" in page.inner_text("#problem")
    assert not ehr.token_requests  # the code was never exchanged


def test_an_unknown_iss_is_refused(ehr, page, serve_app, tmp_path):
    app = serve_app(app_for(ehr, tmp_path))
    answer = page.goto(f"{app.base}/smart/launch?{urlencode({'iss': 'http://127.0.0.1:9/fhir', 'launch': 'x'})}")
    assert answer.status == 400
    assert "not registered" in page.inner_text("#problem")
    assert not ehr.authorize_requests


def test_an_expired_token_asks_for_a_new_launch(ehr, page, serve_app, tmp_path):
    ehr.expires_in = 1
    app = serve_app(app_for(ehr, tmp_path))
    assert launch(page, app, ehr, "crs3-norepi-vaso").status == 200
    time.sleep(1.2)
    answer = page.reload()
    assert answer.status == 401
    assert "expired" in page.inner_text("#problem")
    assert page.get_attribute("#relaunch", "href").startswith(f"{app.base}/smart/launch?iss=")
    assert page.locator("#timeline").count() == 0


def test_the_timeline_needs_a_session(ehr, serve_app, tmp_path):
    app = serve_app(app_for(ehr, tmp_path))
    answer = requests.get(f"{app.base}/smart/timeline", timeout=10)
    assert answer.status_code == 401 and "Not signed in" in answer.text


def test_observations_refused_show_which_parts_are_missing(ehr, page, serve_app, tmp_path, now):
    ehr.refuse = {"Observation": 500}
    app = serve_app(app_for(ehr, tmp_path))
    assert launch(page, app, ehr, "crs3-norepi-vaso").status == 200
    missing = page.eval_on_selector_all("[data-missing-part]", "els => els.map(e => e.dataset.missingPart)")
    assert sorted(missing) == ["assessments", "bloodPressures", "oxygen", "oxygenDevices", "temperatures"]
    assert "answered 500" in page.inner_text(".missing")
    assert page.locator('text[data-missing="temperatures"]').count() == 1
    assert page.locator('g.point[data-kind="temperature"]').count() == 0
    # No wrong picture: the grades say "at least", never a bare 0.
    crs = bands(page, "crs")
    assert crs and all(b["atLeast"] == "true" for b in crs)
    # Medications still came: the doses are drawn.
    assert page.locator('g.dose[data-dose="tocilizumab"]').count() == 1


def test_a_fhir_server_that_refuses_everything_draws_no_timeline(ehr, page, serve_app, tmp_path):
    ehr.refuse = {"*": 401}
    app = serve_app(app_for(ehr, tmp_path))
    answer = launch(page, app, ehr, "crs3-norepi-vaso")
    assert answer.status == 502
    missing = page.eval_on_selector_all("[data-missing-part]", "els => els.map(e => e.dataset.missingPart)")
    assert "medications" in missing and "temperatures" in missing
    assert "answered 401" in page.inner_text(".missing")
    assert "cannot be placed" in page.inner_text("#no-episode")
    assert page.locator("#timeline").count() == 0


# -- the card's link --------------------------------------------------------------------------------

def test_the_assessment_card_links_to_the_app(tmp_path, serve_app, now):
    body = hook_request(by_name("crs3-norepi-vaso"), now)
    on = serve_app(create_app(Settings(feedback_db=str(tmp_path / "a.sqlite3"), auth_enabled=False,
                                       external_base_url="https://cds.example.org/crs")))
    cards = on.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    links = [link for card in cards for link in card.get("links", []) if link["type"] == "smart"]
    context = json.loads(links[0].pop("appContext"))   # the episode the card graded: the CAR-T infusion
    iec = next(r for r in by_name("crs3-norepi-vaso").resources(now) if r.get("id", "").endswith("iec1"))
    assert datetime.fromisoformat(context["episodeStart"]) == datetime.fromisoformat(
        iec["effectivePeriod"]["start"].replace("Z", "+00:00"))
    assert links == [{"label": "CRS/ICANS timeline", "url": "https://cds.example.org/crs/smart/launch", "type": "smart"}]
    assert cards[0]["source"]["topic"]["code"] == "crsIcansAssessment" and links[0] in cards[0]["links"]

    off = serve_app(create_app(Settings(feedback_db=str(tmp_path / "b.sqlite3"), auth_enabled=False,
                                        smart_link_enabled=False)))
    cards = off.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    assert not [link for card in cards for link in card.get("links", []) if link["type"] == "smart"]

    only_for_an_ehr = serve_app(create_app(Settings(feedback_db=str(tmp_path / "d.sqlite3"), auth_enabled=False,
                                                    smart_link_clients=["https://ehr.example.org"])))
    cards = only_for_an_ehr.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    assert cards and not [link for card in cards for link in card.get("links", []) if link["type"] == "smart"]

    elsewhere = serve_app(create_app(Settings(feedback_db=str(tmp_path / "c.sqlite3"), auth_enabled=False,
                                              smart_launch_url="https://apps.example.org/timeline/launch",
                                              ehr="oracle-health")))
    cards = elsewhere.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    assert {"label": "CRS/ICANS timeline", "url": "https://apps.example.org/timeline/launch",
            "type": "smart"} in cards[0]["links"]   # Oracle Health passes no appContext: none is sent


def test_the_episode_the_card_named_is_said_when_a_newer_one_is_shown(ehr, page, serve_app, tmp_path, now):
    app = serve_app(app_for(ehr, tmp_path))
    ehr.app_context = json.dumps({"episodeStart": "2026-01-02T08:00:00+00:00"})
    assert launch(page, app, ehr, "crs3-norepi-vaso").status == 200
    assert "graded the episode that began" in page.inner_text("#other-episode")
    iec = next(r for r in by_name("crs3-norepi-vaso").resources(now) if r.get("id", "").endswith("iec1"))
    ehr.app_context = json.dumps({"episodeStart": iec["effectivePeriod"]["start"].replace("Z", "+00:00")})
    page.context.clear_cookies()
    assert launch(page, app, ehr, "crs3-norepi-vaso").status == 200
    assert page.locator("#other-episode").count() == 0


# -- the hour grades' memo --------------------------------------------------------------------------

def test_hour_grades_are_remembered_by_content_never_by_ids(now):
    from copy import deepcopy

    from cds_service.site import Site
    from cds_service.smart.timeline import HourMemo, build_timeline

    site = Site.from_settings(Settings())
    memo = HourMemo()
    chart = by_name("crs3-norepi-vaso").resources(now)
    first = build_timeline(chart, {}, [], now, site, memo=memo, source="ehr")
    assert len(memo) == len(first.hours)
    afebrile = deepcopy(chart)  # the same ids, the fever charted as 37.0 instead
    fever = next(r for r in afebrile if r["id"] == "crs3-norepi-vaso-temp1")
    fever["valueQuantity"]["value"] = 37.0
    second = build_timeline(afebrile, {}, [], now, site, memo=memo, source="ehr")
    alone = build_timeline(afebrile, {}, [], now, site)
    assert first.hours[-1].crs.value == 3 and second.hours[-1].crs.value == 0
    assert [(h.end, h.crs.value, h.icans.value) for h in second.hours] == \
           [(h.end, h.crs.value, h.icans.value) for h in alone.hours]
    # The hours before the fever's reading were the same chart: graded once.
    assert len(memo) < 2 * len(first.hours)
    again = build_timeline(chart, {}, [], now, site, memo=memo, source="ehr")
    assert [h.crs.value for h in again.hours] == [h.crs.value for h in first.hours]


def test_the_fever_waiver_and_at_least_are_drawn(now):
    from cds_service.site import Site
    from cds_service.smart.render import timeline_page
    from cds_service.smart.timeline import build_timeline

    site = Site.from_settings(Settings())
    built = build_timeline(by_name("crs3-fever-masked-hfnc").resources(now), {}, [], now, site)
    html = timeline_page(built, site.protocol.label)
    # Afebrile after tocilizumab, on high-flow oxygen: CRS 3 with the fever waived, drawn as "3w".
    assert 'data-lane="crs" data-grade="3" data-at-least="false" data-waived="true"' in html
    assert ">3w</text>" in html and "fever waived after treatment" in html

    from cds_service.clinical.model import Unreadable
    failed = [Unreadable("prefetch:bloodPressures", "FHIR server answered 500 for Observation search", "Observation")]
    built = build_timeline(by_name("crs3-fever-masked-hfnc").resources(now), {"bloodPressures": "answered 500"},
                           failed, now, site)
    html = timeline_page(built, site.protocol.label)
    assert 'data-lane="crs" data-grade="3" data-at-least="true"' in html and ">≥3w</text>" in html
    assert 'data-missing="bloodPressures"' in html and 'data-missing-part="bloodPressures"' in html
