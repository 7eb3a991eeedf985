"""The SMART timeline app end to end, in Debian's Chromium driven by Playwright.

``FakeEhr`` below stands in for an EHR: a minimal hand-written OAuth 2.0 / SMART App Launch
authorization server (``.well-known/smart-configuration``, ``/authorize`` that approves at once,
``/token`` that checks the PKCE verifier) with the EHR's FHIR endpoint in front of sekmet (the
bearer token checked, next-page links rewritten to the EHR's address, refusals on demand). It is
not a real EHR's server; it checks what a real one would refuse.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.scenarios import by_name
from cds_service.settings import Settings

CHROMIUM = "/usr/bin/chromium"
CLIENT_ID = "crs-timeline-test"
SECRET = "s3cret-for-the-confidential-client"


class FakeEhr:
    """Authorization server + FHIR front for sekmet, on 127.0.0.1 (see the module docstring)."""

    def __init__(self, sekmet_base: str):
        owner = self
        self.sekmet_base = sekmet_base.rstrip("/")
        self.codes: dict[str, dict] = {}
        self.tokens: dict[str, str] = {}        # access token -> patient
        self.launches: dict[str, str] = {}      # launch id -> patient
        self.authorize_requests: list[dict] = []
        self.token_requests: list[dict] = []
        self.expires_in = 3600
        self.tamper_state = False
        self.confidential = False
        self.refuse: dict[str, int] = {}        # resource type (or "*") -> HTTP status for FHIR reads
        self.bad_tokens_seen = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type="application/json", headers=None):
                data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                owner._get(self)

            def do_POST(self):
                owner._post(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.iss = f"{self.origin}/fhir"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()

    def launch_for(self, patient: str) -> str:
        launch = secrets.token_urlsafe(8)
        self.launches[launch] = patient
        return launch

    # -- endpoints ---------------------------------------------------------------------------------
    def _get(self, h):
        url = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/fhir/.well-known/smart-configuration":
            return h._send(200, {"authorization_endpoint": f"{self.origin}/authorize",
                                 "token_endpoint": f"{self.origin}/token",
                                 "code_challenge_methods_supported": ["S256"],
                                 "capabilities": ["launch-ehr", "launch-standalone", "client-public",
                                                  "client-confidential-symmetric", "context-ehr-patient"]})
        if url.path == "/authorize":
            self.authorize_requests.append(query)
            problems = []
            if query.get("response_type") != "code" or query.get("client_id") != CLIENT_ID:
                problems.append("client")
            if query.get("aud") != self.iss:
                problems.append("aud")
            if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
                problems.append("pkce")
            scopes = set(query.get("scope", "").split())
            launch = query.get("launch")
            if launch is not None:
                patient = self.launches.get(launch)
                if patient is None or "launch" not in scopes:
                    problems.append("launch")
            else:
                patient = next(iter(self.launches.values()), None)  # the patient picker's choice
                if "launch/patient" not in scopes:
                    problems.append("launch/patient")
            if problems:
                return h._send(400, {"error": "invalid_request", "problems": problems})
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": query["code_challenge"], "redirect_uri": query["redirect_uri"],
                                "patient": patient, "scope": query.get("scope")}
            state = "forged-" + secrets.token_urlsafe(24) if self.tamper_state else query["state"]
            target = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': state})}"
            return h._send(302, b"", headers={"Location": target})
        if url.path.startswith("/fhir/"):
            return self._fhir(h)
        return h._send(404, {"error": "not found"})

    def _post(self, h):
        url = urlsplit(h.path)
        if url.path != "/token":
            return h._send(404, {"error": "not found"})
        length = int(h.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(h.rfile.read(length).decode()).items()}
        basic = h.headers.get("Authorization", "")
        self.token_requests.append({**{k: v for k, v in form.items() if k != "code_verifier"},
                                    "basic": basic.startswith("Basic ")})
        issued = self.codes.pop(form.get("code", ""), None)
        if issued is None or form.get("grant_type") != "authorization_code":
            return h._send(400, {"error": "invalid_grant"})
        if form.get("redirect_uri") != issued["redirect_uri"]:
            return h._send(400, {"error": "invalid_grant", "error_description": "redirect_uri"})
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not secrets.compare_digest(challenge, issued["challenge"]):
            return h._send(400, {"error": "invalid_grant", "error_description": "PKCE verifier"})
        if self.confidential:
            expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
            if basic != expected:
                return h._send(401, {"error": "invalid_client"})
        elif form.get("client_id") != CLIENT_ID:
            return h._send(401, {"error": "invalid_client"})
        token = secrets.token_urlsafe(24)
        self.tokens[token] = issued["patient"]
        return h._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in,
                             "scope": issued["scope"], "patient": issued["patient"]},
                       headers={"Cache-Control": "no-store"})

    def _fhir(self, h):
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            self.bad_tokens_seen += 1
            return h._send(401, {"resourceType": "OperationOutcome",
                                 "issue": [{"severity": "error", "code": "login"}]}, "application/fhir+json")
        rtype = urlsplit(h.path).path.split("/")[2] if h.path.count("/") >= 2 else ""
        status = self.refuse.get(rtype) or self.refuse.get("*")
        if status:
            return h._send(status, {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "exception"}]}, "application/fhir+json")
        answer = requests.get(self.sekmet_base + h.path[len("/fhir"):], timeout=20,
                              headers={"Accept": "application/fhir+json"})
        body = answer.text.replace(self.sekmet_base, self.iss)
        return h._send(answer.status_code, body, "application/fhir+json")


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
    assert sorted(missing) == ["assessments", "bloodPressures", "oxygen", "temperatures"]
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
    assert links == [{"label": "CRS/ICANS timeline", "url": "https://cds.example.org/crs/smart/launch", "type": "smart"}]
    assert cards[0]["source"]["topic"]["code"] == "crsIcansAssessment" and links[0] in cards[0]["links"]

    off = serve_app(create_app(Settings(feedback_db=str(tmp_path / "b.sqlite3"), auth_enabled=False,
                                        smart_link_enabled=False)))
    cards = off.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    assert not [link for card in cards for link in card.get("links", []) if link["type"] == "smart"]

    elsewhere = serve_app(create_app(Settings(feedback_db=str(tmp_path / "c.sqlite3"), auth_enabled=False,
                                              smart_launch_url="https://apps.example.org/timeline/launch")))
    cards = elsewhere.post("/cds-services/crs-icans-assessment", body).json()["cards"]
    assert {"label": "CRS/ICANS timeline", "url": "https://apps.example.org/timeline/launch",
            "type": "smart"} in cards[0]["links"]
