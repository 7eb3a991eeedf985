"""The SMART on FHIR timeline app: ``/smart/launch`` (EHR and standalone launch), ``/smart/callback``
and ``/smart/timeline``. It reads FHIR through the hooks' reading path and grades with the
clinical core; it keeps tokens on the server (``oauth.SessionStore``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, redirect, request

from ..fhir.client import FhirClient
from ..settings import Settings
from ..site import Site
from . import oauth
from .render import page, timeline_page
from .timeline import HourMemo, build_timeline, read_chart

log = logging.getLogger("crs_cds.smart")
COOKIE = "crs_smart"
blueprint = Blueprint("smart", __name__, url_prefix="/smart")


@dataclass
class SmartState:
    settings: Settings
    site: Site
    templates: dict[str, str]
    fhir_client: FhirClient
    clients: dict[str, oauth.SmartClient]
    sessions: oauth.SessionStore
    hours: HourMemo


def init_app(app: Flask, settings: Settings, site: Site, templates: dict[str, str], fhir_client: FhirClient) -> None:
    app.config["CRS_CDS_SMART"] = SmartState(settings, site, templates, fhir_client, oauth.smart_clients(settings),
                                             oauth.SessionStore(), HourMemo())
    app.register_blueprint(blueprint)


def launch_url(settings: Settings, url_root: str) -> str:
    """Where the card's SMART link points: ``smart_launch_url``, else this service's /smart/launch."""
    if settings.smart_launch_url:
        return settings.smart_launch_url
    return f"{(settings.external_base_url or url_root).rstrip('/')}/smart/launch"


def _state() -> SmartState:
    return current_app.config["CRS_CDS_SMART"]


def _html(body: str, status: int = 200, title: str = "CRS/ICANS timeline") -> Response:
    response = Response(page(title, body), status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                                   "frame-ancestors *")
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _problem(message: str, status: int, relaunch: str | None = None) -> Response:
    body = f'<h1>CRS/ICANS timeline</h1><p id="problem" role="alert">{escape(message)}</p>'
    if relaunch:
        body += f'<p><a id="relaunch" href="{escape(relaunch)}">Launch again</a></p>'
    return _html(body, status)


def _set_cookie(response: Response, sid: str, state: SmartState) -> None:
    secure = request.is_secure or (state.settings.external_base_url or "").startswith("https:")
    samesite = state.settings.smart_cookie_samesite
    response.set_cookie(COOKIE, sid, httponly=True, secure=secure or samesite == "None", samesite=samesite,
                        path="/smart")


def _base(state: SmartState) -> str:
    return (state.settings.external_base_url or request.url_root).rstrip("/")


@blueprint.get("/launch")
def launch():
    """EHR launch (``iss`` and ``launch``) or standalone launch (``iss`` alone)."""
    state = _state()
    iss = oauth.normal_iss(request.args.get("iss", ""))
    launch_token = request.args.get("launch") or None
    client = state.clients.get(iss)
    if client is None:
        log.warning("SMART launch refused: unknown iss")
        return _problem("This EHR (iss) is not registered with the CRS/ICANS timeline app.", 400)
    try:
        config = oauth.discover(iss, state.settings.fhir_timeout_seconds * 2, state.fhir_client.session)
    except oauth.LaunchError as error:
        return _problem(error.message, error.status)
    scope = client.scope or (oauth.SCOPES_EHR if launch_token else oauth.SCOPES_STANDALONE)
    redirect_uri = client.redirect_uri or f"{_base(state)}/smart/callback"
    verifier, challenge = oauth.pkce_pair()
    launch_state = oauth.new_state()
    sid = request.cookies.get(COOKIE)
    session = state.sessions.get(sid)
    if session is None:
        sid, session = state.sessions.new()
    session.pending[launch_state] = {"iss": iss, "verifier": verifier, "redirect_uri": redirect_uri,
                                     "token_endpoint": config["token_endpoint"], "created": time.time()}
    response = redirect(oauth.authorize_url(config["authorization_endpoint"], client, redirect_uri, scope,
                                            launch_state, challenge, launch_token), 302)
    response.headers["Cache-Control"] = "no-store"
    _set_cookie(response, sid, state)
    log.info("SMART %s launch started", "EHR" if launch_token else "standalone")
    return response


@blueprint.get("/callback")
def callback():
    state = _state()
    sid = request.cookies.get(COOKIE)
    session = state.sessions.get(sid)
    given_state = request.args.get("state", "")
    if session is None or not given_state:
        return _problem("No launch is waiting for this answer (no session or no state): launch the app again "
                        "from the EHR.", 400)
    pending = oauth.take_pending(session, given_state)
    if pending is None:
        log.warning("SMART callback refused: state does not match a pending launch")
        return _problem("The authorization answer does not match a launch of this browser (state mismatch); "
                        "launch the app again from the EHR.", 400)
    if request.args.get("error"):
        return _problem(f"The EHR did not authorise the app ({request.args.get('error')[:60]}).", 403)
    code = request.args.get("code")
    if not code:
        return _problem("The EHR's answer has no authorization code.", 400)
    client = state.clients.get(pending["iss"])
    if client is None:
        return _problem("This EHR (iss) is no longer registered.", 400)
    try:
        tokens = oauth.exchange_code(pending["token_endpoint"], client, code, pending["redirect_uri"],
                                     pending["verifier"], state.settings.fhir_timeout_seconds * 2,
                                     state.fhir_client.session)
    except oauth.LaunchError as error:
        return _problem(error.message, error.status)
    # A new session id once signed in: an id seen before the login never carries the token.
    state.sessions.drop(sid)
    new_sid, fresh = state.sessions.new()
    oauth.sign_in(fresh, pending["iss"], tokens)
    response = redirect(f"{_base(state)}/smart/timeline", 302)
    response.headers["Cache-Control"] = "no-store"
    _set_cookie(response, new_sid, state)
    log.info("SMART launch completed")
    return response


@blueprint.get("/timeline")
def timeline():
    state = _state()
    session = state.sessions.get(request.cookies.get(COOKIE))
    if session is None or not session.signed_in:
        return _problem("Not signed in: open the timeline from the patient's chart in the EHR.", 401)
    relaunch = f"{_base(state)}/smart/launch?{urlencode({'iss': session.iss})}"
    if session.expired:
        session.access_token = None
        return _problem("The EHR's authorisation for this session has expired: launch the app again.", 401, relaunch)
    now = datetime.fromtimestamp(int(time.time()), timezone.utc)
    resources, missing, unread = read_chart(session.iss, session.patient, session.access_token, now, state.site,
                                            state.templates, state.fhir_client, state.settings)
    hours = request.args.get("hours", "")
    window = int(hours) if hours.isdigit() and 0 < int(hours) <= 24 * 90 else None
    built = build_timeline(resources, missing, unread, now, state.site, window, state.hours, session.iss)
    if built.patient_id == "?":
        built.patient_id = session.patient
    built.card_episode = _moment(session.episode_start)
    status = 200 if built.start is not None or not built.medications_missing else 502
    response = Response(timeline_page(built, state.site.protocol.label), status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors *"
    return response


def _moment(text: str | None) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None
