"""A stand-in for an EHR's SMART authorization server and FHIR endpoint, for the SMART app's tests
and benchmark: a minimal hand-written OAuth 2.0 / SMART App Launch server on 127.0.0.1
(``.well-known/smart-configuration``, ``/authorize`` that approves at once, ``/token`` that checks the
PKCE verifier and the client), with the EHR's FHIR endpoint in front of a real FHIR server (the
bearer token checked, next-page links rewritten to the EHR's address, refusals on demand). It is
not a real EHR's server; it checks what a real one would refuse.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import requests

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
        self.app_context: str | None = None  # passed to the app in the token response, as EHRs do
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
        context = {"appContext": self.app_context} if self.app_context else {}
        return h._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in,
                             "scope": issued["scope"], "patient": issued["patient"], **context},
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
