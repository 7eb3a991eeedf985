"""SMART App Launch 2.0 for the timeline app: client settings per issuer, discovery, PKCE, the
token exchange, and a server-side session store (tokens never reach the browser).

The browser holds one opaque, random, HttpOnly cookie; everything else (the pending ``state`` and
PKCE verifier, then the access token and the patient) lives here, keyed by that cookie's value.
"""
from __future__ import annotations

import base64
import hashlib
import secrets
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

import requests

from ..settings import Settings, SettingsError

SCOPES_EHR = "launch openid fhirUser patient/Observation.rs patient/MedicationAdministration.rs patient/Patient.r"
SCOPES_STANDALONE = SCOPES_EHR.replace("launch ", "launch/patient ", 1)
SESSION_IDLE_SECONDS = 8 * 3600     # a session nobody used for this long is forgotten
PENDING_SECONDS = 600               # a launch must come back from the authorization server within this
DEFAULT_TOKEN_SECONDS = 300         # when the token response has no expires_in: assume a short life


class LaunchError(Exception):
    """A launch or callback that cannot go on; ``message`` is safe to show (no token, no secret)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SmartClient:
    """How this app is registered with one EHR's authorization server (setting ``smart_clients``)."""

    iss: str
    client_id: str
    client_secret: str | None = None   # confidential client (client_secret_basic); None: public client
    redirect_uri: str | None = None    # default: <base>/smart/callback
    scope: str | None = None           # default: SCOPES_EHR / SCOPES_STANDALONE

    def __repr__(self) -> str:  # never the secret
        return f"SmartClient(iss={self.iss!r}, client_id={self.client_id!r}, confidential={bool(self.client_secret)})"


def normal_iss(iss: str) -> str:
    return iss.strip().rstrip("/")


def smart_clients(settings: Settings) -> dict[str, SmartClient]:
    """The ``smart_clients`` setting, checked at start-up (a bad entry stops the service)."""
    clients = {}
    for iss, entry in (settings.smart_clients or {}).items():
        parts = urlsplit(iss)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"smart_clients: {iss!r} is not an http(s) FHIR base URL")
        if not isinstance(entry, dict) or not isinstance(entry.get("client_id"), str) or not entry["client_id"]:
            raise SettingsError(f"smart_clients[{iss!r}]: needs a client_id")
        unknown = set(entry) - {"client_id", "client_secret", "redirect_uri", "scope"}
        if unknown:
            raise SettingsError(f"smart_clients[{iss!r}]: unknown keys {', '.join(sorted(unknown))}")
        for key in ("client_secret", "redirect_uri", "scope"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise SettingsError(f"smart_clients[{iss!r}].{key}: expected a string")
        clients[normal_iss(iss)] = SmartClient(normal_iss(iss), entry["client_id"], entry.get("client_secret"),
                                               entry.get("redirect_uri"), entry.get("scope"))
    if settings.smart_cookie_samesite not in ("Lax", "Strict", "None"):
        raise SettingsError("smart_cookie_samesite: expected Lax, Strict or None")
    return clients


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636: a 64-character verifier (384 random bits)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return verifier, challenge


def new_state() -> str:
    """256 random bits (SMART asks for at least 122)."""
    return secrets.token_urlsafe(32)


def discover(iss: str, timeout: float, session: requests.Session | None = None) -> dict:
    """``{iss}/.well-known/smart-configuration``: the authorization and token endpoints."""
    http = session or requests
    url = f"{iss}/.well-known/smart-configuration"
    config = _json_object(lambda: http.get(url, headers={"Accept": "application/json"}, timeout=timeout,
                                           allow_redirects=False), "the EHR's SMART configuration")
    for key in ("authorization_endpoint", "token_endpoint"):
        value = config.get(key)
        if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
            raise LaunchError(f"the EHR's SMART configuration has no usable {key}", 502)
    methods = config.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise LaunchError("the EHR's authorization server does not support PKCE S256", 502)
    return config


def _json_object(send: Callable[[], requests.Response], what: str) -> dict:
    """The JSON object an EHR endpoint answers with 200, or a LaunchError (502) saying what went wrong."""
    try:
        response = send()
    except requests.RequestException as exc:
        raise LaunchError(f"could not reach {what} ({type(exc).__name__})", 502) from None
    if response.status_code != 200:
        raise LaunchError(f"{what} answered {response.status_code}", 502)
    try:
        answer = response.json()
    except ValueError:
        raise LaunchError(f"{what} did not answer JSON", 502) from None
    if not isinstance(answer, dict):
        raise LaunchError(f"{what} did not answer a JSON object", 502)
    return answer


def authorize_url(endpoint: str, client: SmartClient, redirect_uri: str, scope: str, state: str,
                  challenge: str, launch: str | None) -> str:
    params = {"response_type": "code", "client_id": client.client_id, "redirect_uri": redirect_uri,
              "scope": scope, "state": state, "aud": client.iss, "code_challenge": challenge,
              "code_challenge_method": "S256"}
    if launch:
        params["launch"] = launch
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"


def exchange_code(token_endpoint: str, client: SmartClient, code: str, redirect_uri: str, verifier: str,
                  timeout: float, session: requests.Session | None = None) -> dict:
    """The authorization code for tokens (public client: client_id in the body; confidential:
    HTTP Basic with the client secret). Returns the token response (checked)."""
    http = session or requests
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    auth = None
    if client.client_secret:
        auth = (client.client_id, client.client_secret)
    else:
        data["client_id"] = client.client_id
    tokens = _json_object(lambda: http.post(token_endpoint, data=data, auth=auth, timeout=timeout,
                                            allow_redirects=False, headers={"Accept": "application/json"}),
                          "the EHR's token endpoint")
    if not isinstance(tokens.get("access_token"), str) or not tokens["access_token"]:
        raise LaunchError("the EHR's token response has no access_token", 502)
    if str(tokens.get("token_type", "")).lower() != "bearer":
        raise LaunchError("the EHR's token response is not a Bearer token", 502)
    if not isinstance(tokens.get("patient"), str) or not tokens["patient"]:
        raise LaunchError("the EHR gave no patient in context: launch the app from a patient's chart", 400)
    return tokens


@dataclass
class Session:
    """One browser's state. ``pending``: launches on their way (state -> launch data)."""

    pending: dict[str, dict] = field(default_factory=dict)
    iss: str | None = None
    patient: str | None = None
    access_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0
    scope: str | None = None
    episode_start: str | None = None  # from the card link's appContext, when the EHR passed it
    touched: float = field(default_factory=time.time)

    @property
    def signed_in(self) -> bool:
        return self.access_token is not None

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


class SessionStore:
    """Sessions in this process's memory, keyed by the opaque cookie value.

    One process only: behind gunicorn with several workers, run the app's routes with one worker or
    sticky sessions (README, "SMART timeline app")."""

    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session()
        with self._lock:
            self._forget_idle()
            self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or time.time() - session.touched > SESSION_IDLE_SECONDS:
                self._sessions.pop(sid, None)
                return None
            session.touched = time.time()
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def _forget_idle(self) -> None:
        limit = time.time() - SESSION_IDLE_SECONDS
        for sid in [s for s, session in self._sessions.items() if session.touched < limit]:
            del self._sessions[sid]


def take_pending(session: Session, state: str) -> dict | None:
    """The launch this ``state`` belongs to (used once), if it is this browser's and fresh."""
    match = next((s for s in session.pending if secrets.compare_digest(s.encode(), state.encode())), None)
    if match is None:
        return None
    launch = session.pending.pop(match)
    return launch if time.time() - launch["created"] <= PENDING_SECONDS else None


def sign_in(session: Session, iss: str, tokens: dict[str, Any]) -> None:
    expires_in = tokens.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) \
        else DEFAULT_TOKEN_SECONDS
    session.pending.clear()
    session.iss = iss
    session.patient = tokens["patient"]
    session.access_token = tokens["access_token"]
    session.scope = tokens.get("scope") if isinstance(tokens.get("scope"), str) else None
    session.episode_start = _episode_named(tokens.get("appContext"))
    session.expires_at = time.time() + lifetime


def _episode_named(app_context: Any) -> str | None:
    """The episode start a card's appContext names (``{"episodeStart": ISO}``), else None."""
    try:
        named = json.loads(app_context) if isinstance(app_context, str) else None
    except ValueError:
        return None
    start = named.get("episodeStart") if isinstance(named, dict) else None
    return start if isinstance(start, str) and len(start) <= 40 else None
