"""Client authentication (JWT) and the FHIR server allowlist, through real HTTP.

The service runs on a loopback port (``serve_app``); the CDS client's JWK Set is served by a real
local HTTP server (``local_http``); keys are made here (EC P-384 and RSA 2048), and tokens are
signed with them as a CDS client would. Every refusal must be a bare 401 (no body), whatever the
reason, and the reason must reach the log without the token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.hooks.auth import AuthConfigError, parse_base_url, url_within
from cds_service.scenarios import by_name
from cds_service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
ISS = "https://ehr.example.org"
TENANT_ISS = "https://tenant-ehr.example.org"
SERVICE = "/cds-services/crs-icans-assessment"
FHIR_TOKEN = "fhir-access-token-e9b1c0d4-do-not-log"

EC_KEY = ec.generate_private_key(ec.SECP384R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP384R1())   # the rotated-in key
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
IMPOSTOR = ec.generate_private_key(ec.SECP384R1())   # signs with someone else's kid
P256_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key, kid: str, alg: str) -> dict:
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**algorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(aud, *, iss: str = ISS, iat_offset: int = 0, lifetime: int = 300, **extra) -> dict:
    now = int(time.time()) + iat_offset
    return {"iss": iss, "aud": aud, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **extra}


def sign(payload: dict, key=EC_KEY, *, alg: str = "ES384", kid: str | None = "ec-1", **header) -> str:
    headers = {"typ": "JWT", **header}
    if kid is not None:
        headers["kid"] = kid
    token = jwt.encode(payload, key, algorithm=alg, headers=headers)
    if kid is None:  # PyJWT adds nothing by itself, but be sure
        assert "kid" not in jwt.get_unverified_header(token)
    return token


def hs256_with_public_key(payload: dict) -> str:
    """The classic key-confusion token: HMAC-signed with the client's *public* key as the secret."""
    secret = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode()) + "."
                     + b64(json.dumps(payload).encode()))
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class FakeClock:
    """Monotonic time for the JWK Set cache, moved by hand (rate limit and max age)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Env:
    """A key server, a FHIR server, and services made with a given trust configuration."""

    def __init__(self, local_http, serve_app, tmp_path: Path):
        self.serve_app = serve_app
        self.tmp_path = tmp_path
        self.keys = [public_jwk(EC_KEY, "ec-1", "ES384"), public_jwk(RSA_KEY, "rsa-1", "RS384")]
        self.key_server_down = False
        self.key_server = local_http(self._jwks)
        self.jwks_url = f"{self.key_server.origin}/jwks.json"
        self.evil_jku = f"{self.key_server.origin}/evil-jwks.json"
        self.fhir = local_http(self._fhir)
        self.clock = FakeClock()

    def _jwks(self, request, server):
        if self.key_server_down:
            return 503, {"error": "down"}, {"Content-Type": "application/json"}
        return 200, {"keys": self.keys}, {"Content-Type": "application/json"}

    @staticmethod
    def _fhir(request, server):
        path = request.path.split("?", 1)[0]
        if path.startswith("/fhir/Patient/"):
            return 200, {"resourceType": "Patient", "id": path.rsplit("/", 1)[-1]}
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": 0}

    def jwks_fetches(self) -> int:
        return sum(1 for r in self.key_server.requests if r.path == "/jwks.json")

    def issuer(self, **overrides) -> dict:
        return {"jwks_url": self.jwks_url, "jku_allowed": [self.jwks_url], "fhir_servers": [self.fhir.base_url],
                **overrides}

    def service(self, issuers: dict | None = None, **settings):
        if issuers is None:
            issuers = {ISS: self.issuer(), TENANT_ISS: self.issuer(tenants=["hospital-a"])}
        values = {"feedback_db": str(self.tmp_path / f"feedback-{uuid.uuid4().hex}.sqlite3"),
                  "trusted_issuers": issuers, "fhir_budget_seconds": 5, "fhir_timeout_seconds": 4, **settings}
        service = self.serve_app(create_app(Settings(**values)))
        if service.state.auth.enabled:
            service.state.auth.jwks.clock = self.clock
        return service


@pytest.fixture
def env(local_http, serve_app, tmp_path) -> Env:
    return Env(local_http, serve_app, tmp_path)


@pytest.fixture
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def full_request(now: datetime) -> dict:
    return hook_request(by_name("crs3-norepi-vaso"), now)


def assert_bare_401(answer) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.content == b""
    assert answer.headers["WWW-Authenticate"] == "Bearer"


# ---- Accepted ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, alg, kid", [(EC_KEY, "ES384", "ec-1"), (RSA_KEY, "RS384", "rsa-1")],
                         ids=["ES384", "RS384"])
def test_valid_tokens_are_accepted_on_discovery_service_and_feedback(env, now, key, alg, kid):
    service = env.service()
    discovery = service.get("/cds-services", headers=bearer(sign(claims(service.base + "/cds-services"), key,
                                                                   alg=alg, kid=kid)))
    assert discovery.status_code == 200 and discovery.json()["services"]
    call = service.post(SERVICE, full_request(now), headers=bearer(sign(claims(service.base + SERVICE), key,
                                                                         alg=alg, kid=kid)))
    assert call.status_code == 200, call.text
    card = call.json()["cards"][0]
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "accepted",
                              "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                              "outcomeTimestamp": "2026-11-21T12:00:00Z"}]}
    answer = service.post(SERVICE + "/feedback", feedback,
                          headers=bearer(sign(claims(service.base + SERVICE + "/feedback"), key, alg=alg, kid=kid)))
    assert answer.status_code == 200, answer.text
    assert env.jwks_fetches() == 1  # one JWK Set fetch served all three calls


def test_aud_as_a_list_holding_the_endpoint_and_a_jku_on_the_list_are_accepted(env):
    service = env.service()
    aud = [service.base + "/cds-services", "https://other.example.org/cds-services"]
    answer = service.get("/cds-services", headers=bearer(sign(claims(aud), jku=env.jwks_url)))
    assert answer.status_code == 200


def test_inline_keys_need_no_key_server(env):
    service = env.service({ISS: {"jwks": {"keys": [public_jwk(EC_KEY, "ec-1", "ES384")]}}})
    answer = service.get("/cds-services", headers=bearer(sign(claims(service.base + "/cds-services"))))
    assert answer.status_code == 200
    assert env.key_server.requests == []


def test_tenant_on_the_list_is_accepted(env):
    service = env.service()
    token = sign(claims(service.base + "/cds-services", iss=TENANT_ISS, tenant="hospital-a"))
    assert service.get("/cds-services", headers=bearer(token)).status_code == 200


def test_external_base_url_sets_the_expected_aud(env):
    service = env.service(external_base_url="https://cds.example.org/crs/")
    outside = sign(claims("https://cds.example.org/crs/cds-services"))
    assert service.get("/cds-services", headers=bearer(outside)).status_code == 200
    inside = sign(claims(service.base + "/cds-services"))  # the URL behind the proxy is not the one called
    assert_bare_401(service.get("/cds-services", headers=bearer(inside)))


# ---- Refused: a bare 401 each time ------------------------------------------------------------------

def _no_claim(name):
    def make(aud):
        payload = claims(aud)
        del payload[name]
        return bearer(sign(payload))
    return make


NEGATIVE = {  # case: (the Authorization header for the endpoint URL aud, the reason the log gives)
    "alg-none": (lambda aud: bearer(jwt.encode(claims(aud), None, algorithm="none",
                                               headers={"kid": "ec-1", "typ": "JWT"})), "forbidden alg 'none'"),
    "hs256-public-key-as-secret": (lambda aud: bearer(hs256_with_public_key(claims(aud))), "forbidden alg 'HS256'"),
    "missing-kid": (lambda aud: bearer(sign(claims(aud), kid=None)), "no kid"),
    "unknown-kid": (lambda aud: bearer(sign(claims(aud), kid="nobody")), "unknown kid"),
    "bad-signature": (lambda aud: bearer(sign(claims(aud), IMPOSTOR)), "InvalidSignatureError"),
    "tampered-payload": (lambda aud: bearer(_tampered(sign(claims(aud)))), "InvalidSignatureError"),
    "expired": (lambda aud: bearer(sign(claims(aud, iat_offset=-600))), "ExpiredSignatureError"),
    "iat-in-the-future": (lambda aud: bearer(sign(claims(aud, iat_offset=600))), "not yet valid (iat)"),
    "lifetime-over-an-hour": (lambda aud: bearer(sign(claims(aud, lifetime=2 * 3600))), "lifetime"),
    "wrong-aud": (lambda aud: bearer(sign(claims("https://elsewhere.example.org" + SERVICE))),
                  "aud does not name this endpoint"),
    "aud-of-another-service": (lambda aud: bearer(sign(claims(aud.replace("crs-icans-assessment",
                                                                          "crs-order-safety-sign")))),
                               "aud does not name this endpoint"),
    "aud-of-discovery": (lambda aud: bearer(sign(claims(aud.rsplit("/", 1)[0]))), "aud does not name this endpoint"),
    "unknown-iss": (lambda aud: bearer(sign(claims(aud, iss="https://evil.example.org"))), "not a trusted issuer"),
    "missing-jti": (_no_claim("jti"), 'missing the "jti"'),
    "missing-exp": (_no_claim("exp"), 'missing the "exp"'),
    "missing-iat": (_no_claim("iat"), 'missing the "iat"'),
    "missing-iss": (_no_claim("iss"), "iss is missing"),
    "missing-aud": (_no_claim("aud"), 'missing the "aud"'),
    "typ-not-jwt": (lambda aud: bearer(sign(claims(aud), typ="at+jwt")), "typ is 'at+jwt'"),
    "alg-not-allowed-for-issuer": (lambda aud: bearer(sign(claims(aud), P256_KEY, alg="ES256")),
                                   "not allowed for this issuer"),
    "key-of-another-type": (lambda aud: bearer(sign(claims(aud), RSA_KEY, alg="RS384", kid="ec-1")),
                            "does not suit alg RS384"),
    "tenant-not-allowed": (lambda aud: bearer(sign(claims(aud, iss=TENANT_ISS, tenant="hospital-b"))), "tenant"),
    "tenant-missing": (lambda aud: bearer(sign(claims(aud, iss=TENANT_ISS))), "tenant"),
    "malformed-token": (lambda aud: bearer("not-a-jwt"), "malformed"),
    "malformed-segments": (lambda aud: bearer("eyJhbGciOiJFUzM4NCJ9.!!!.xyz"), "malformed"),
    "empty-bearer": (lambda aud: {"Authorization": "Bearer "}, "empty Bearer"),
    "no-authorization-header": (lambda aud: {}, "no Authorization header"),
    "basic-scheme": (lambda aud: {"Authorization": "Basic dXNlcjpwYXNz"}, "not Bearer"),
    "token-scheme-with-a-valid-jwt": (lambda aud: {"Authorization": "Token " + sign(claims(aud))}, "not Bearer"),
}


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["aud"] = data["aud"] + "x"
    return ".".join([header, b64(json.dumps(data).encode()), signature])


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_refused_tokens_get_a_bare_401(env, now, case, caplog):
    service = env.service()
    make_headers, reason = NEGATIVE[case]
    headers = make_headers(service.base + SERVICE)
    with caplog.at_level(logging.WARNING, logger="crs_cds.auth"):
        answer = service.post(SERVICE, full_request(now), headers=headers)
    assert_bare_401(answer)
    refusals = [json.loads(r.getMessage()) for r in caplog.records if '"auth-refused"' in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0]["reason"], refusals
    token = headers.get("Authorization", "").partition(" ")[2]
    if len(token) > 8:
        assert token not in caplog.text


def test_jku_not_on_the_list_is_refused_and_never_fetched(env):
    service = env.service()
    token = sign(claims(service.base + "/cds-services"), jku=env.evil_jku)
    assert_bare_401(service.get("/cds-services", headers=bearer(token)))
    assert [r.path for r in env.key_server.requests if r.path != "/jwks.json"] == []
    # An issuer with keys out of band and no jku list refuses any jku too.
    inline = env.service({ISS: {"jwks": {"keys": [public_jwk(EC_KEY, "ec-1", "ES384")]}}})
    token = sign(claims(inline.base + "/cds-services"), jku=env.jwks_url)
    assert_bare_401(inline.get("/cds-services", headers=bearer(token)))
    assert env.key_server.requests == []


def test_a_replayed_jti_is_refused(env):
    service = env.service()
    token = sign(claims(service.base + "/cds-services"))
    assert service.get("/cds-services", headers=bearer(token)).status_code == 200
    assert_bare_401(service.get("/cds-services", headers=bearer(token)))
    # The same jti in a freshly signed token is a replay too.
    first = claims(service.base + "/cds-services")
    assert service.get("/cds-services", headers=bearer(sign(first))).status_code == 200
    again = {**claims(service.base + "/cds-services"), "jti": first["jti"]}
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(again))))


def test_the_sqlite_jti_cache_catches_a_replay_to_another_worker(env):
    db = str(env.tmp_path / "jti.sqlite3")
    worker_a, worker_b = env.service(jti_db=db), env.service(jti_db=db)
    token_a = sign(claims(worker_a.base + "/cds-services", jti="shared-jti"))
    assert worker_a.get("/cds-services", headers=bearer(token_a)).status_code == 200
    token_b = sign(claims(worker_b.base + "/cds-services", jti="shared-jti"))
    assert_bare_401(worker_b.get("/cds-services", headers=bearer(token_b)))


def test_unknown_service_and_feedback_need_authentication_first(env):
    service = env.service()
    assert_bare_401(service.post("/cds-services/nope", {"hook": "patient-view"}))
    assert_bare_401(service.post(SERVICE + "/feedback", {"feedback": []}))


def test_every_cds_hooks_route_needs_a_token(env):
    """Also a route added later: each one of the blueprint must be @authenticated."""
    service = env.service()
    routes = [rule for rule in service.app.url_map.iter_rules() if rule.endpoint.startswith("cds_hooks.")]
    assert len(routes) >= 3
    for rule in routes:
        path = rule.build(dict.fromkeys(rule.arguments, "crs-icans-assessment"))[1]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert_bare_401(requests.request(method, service.base + path, json={}, timeout=10))


def test_cors_preflight_needs_no_token_and_a_401_carries_cors_headers(env):
    service = env.service()
    origin = "https://sandbox.cds-hooks.org"
    answer = requests.options(service.base + SERVICE, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert answer.status_code == 200
    assert "authorization" in answer.headers["Access-Control-Allow-Headers"].lower()
    refused = service.get("/cds-services", headers={"Origin": origin})
    assert_bare_401(refused)
    assert refused.headers["Access-Control-Allow-Origin"] in ("*", origin)


# ---- The JWK Set cache ------------------------------------------------------------------------------

def test_key_rotation_new_kid_one_refresh_then_accepted(env):
    service = env.service()
    aud = service.base + "/cds-services"
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    assert env.jwks_fetches() == 1
    env.keys = [public_jwk(EC_KEY_2, "ec-2", "ES384")]  # the client rotates: ec-1 retired
    env.clock.advance(61)
    assert service.get("/cds-services", headers=bearer(sign(claims(aud), EC_KEY_2, kid="ec-2"))).status_code == 200
    assert env.jwks_fetches() == 2
    assert service.get("/cds-services", headers=bearer(sign(claims(aud), EC_KEY_2, kid="ec-2"))).status_code == 200
    assert env.jwks_fetches() == 2
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(aud)))))  # the retired key


def test_unknown_kids_refresh_at_most_once_a_minute(env):
    service = env.service()
    aud = service.base + "/cds-services"
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    env.clock.advance(61)
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(aud), kid="ghost-1"))))
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(aud), kid="ghost-2"))))
    assert env.jwks_fetches() == 2  # the first contact, then one refresh for both unknown kids
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    env.clock.advance(61)
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(aud), kid="ghost-3"))))
    assert env.jwks_fetches() == 3


def test_first_contact_with_two_unknown_kids_fetches_once(env):
    service = env.service()
    aud = service.base + "/cds-services"
    for kid in ("ghost-1", "ghost-2"):
        assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(aud), kid=kid))))
    assert env.jwks_fetches() == 1


def test_cached_keys_are_served_when_the_key_server_is_down(env):
    service = env.service()
    aud = service.base + "/cds-services"
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    env.key_server_down = True
    env.clock.advance(3601)  # the set is old: a refresh is tried, answered 503
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    assert env.jwks_fetches() == 2
    env.key_server.close()   # now nobody listens at all
    env.clock.advance(3601)
    started = time.monotonic()
    assert service.get("/cds-services", headers=bearer(sign(claims(aud)))).status_code == 200
    assert service.get("/cds-services", headers=bearer(sign(claims(aud), RSA_KEY, alg="RS384",
                                                            kid="rsa-1"))).status_code == 200
    assert time.monotonic() - started < 5


def test_no_keys_when_the_key_server_never_answered(env):
    env.key_server_down = True
    service = env.service()
    assert_bare_401(service.get("/cds-services", headers=bearer(sign(claims(service.base + "/cds-services")))))


# ---- The FHIR server allowlist ----------------------------------------------------------------------

def fetching_request(now: datetime, fhir_server: str, prefetch: bool) -> dict:
    body = full_request(now)
    if not prefetch:
        del body["prefetch"]
    body["fhirServer"] = fhir_server
    body["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                 "scope": "patient/*.read", "subject": "crs-cds"}
    return body


def test_fhir_server_not_allowed_for_the_issuer_is_never_contacted(env, now, caplog):
    service = env.service({ISS: env.issuer(fhir_servers=["https://ehr.example.org/fhir"])})
    token = lambda: bearer(sign(claims(service.base + SERVICE)))  # noqa: E731
    with caplog.at_level(logging.INFO):
        without = service.post(SERVICE, fetching_request(now, env.fhir.base_url, prefetch=False), headers=token())
        with_prefetch = service.post(SERVICE, fetching_request(now, env.fhir.base_url, prefetch=True),
                                     headers=token())
    assert without.status_code == 412
    outcome = without.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "not an allowed FHIR server" in outcome["issue"][0]["diagnostics"]
    assert with_prefetch.status_code == 200 and with_prefetch.json()["cards"]
    assert env.fhir.requests == []
    assert "fhir-server-refused" in caplog.text
    assert FHIR_TOKEN not in caplog.text


def test_allowed_fhir_server_is_fetched_with_the_access_token(env, now):
    service = env.service()
    answer = service.post(SERVICE, fetching_request(now, env.fhir.base_url + "/", prefetch=False),
                          headers=bearer(sign(claims(service.base + SERVICE))))
    assert answer.status_code == 200, answer.text
    assert env.fhir.requests
    assert {r.headers.get("authorization") for r in env.fhir.requests} == {f"Bearer {FHIR_TOKEN}"}


def test_lookalike_fhir_server_is_not_contacted(env, now):
    service = env.service()
    lookalike = env.fhir.base_url + "2"  # .../fhir2 is not within .../fhir
    answer = service.post(SERVICE, fetching_request(now, lookalike, prefetch=False),
                          headers=bearer(sign(claims(service.base + SERVICE))))
    assert answer.status_code == 412
    assert env.fhir.requests == []


def test_auth_off_uses_allowed_fhir_servers(env, now, caplog):
    with caplog.at_level(logging.WARNING, logger="crs_cds.auth"):
        service = env.service(auth_enabled=False, allowed_fhir_servers=["http://127.0.0.1:1/fhir"])
    assert "AUTHENTICATION IS DISABLED" in caplog.text
    answer = service.post(SERVICE, fetching_request(now, env.fhir.base_url, prefetch=False))
    assert answer.status_code == 412 and "not an allowed FHIR server" in answer.json()["issue"][0]["diagnostics"]
    assert env.fhir.requests == []


def test_auth_off_without_a_list_allows_loopback_only(env, now):
    service = env.service(auth_enabled=False)
    remote = service.post(SERVICE, fetching_request(now, "http://ehr.invalid/fhir", prefetch=False))
    assert remote.status_code == 412 and "not an allowed FHIR server" in remote.json()["issue"][0]["diagnostics"]
    local = service.post(SERVICE, fetching_request(now, env.fhir.base_url, prefetch=False))
    assert local.status_code == 200, local.text
    assert env.fhir.requests


@pytest.mark.parametrize("url, allowed", [
    ("https://ehr.example.org/fhir", True),
    ("https://ehr.example.org/fhir/", True),
    ("https://EHR.example.org:443/fhir//", True),          # trailing slashes do not count
    ("https://ehr.example.org//fhir", False),              # an empty segment never matches
    ("HTTPS://EHR.Example.org:443/fhir", True),
    ("https://ehr.example.org/fhir/r4", True),
    ("https://ehr.example.org/fhir2", False),
    ("https://ehr.example.org/fhi", False),
    ("https://ehr.example.org", False),
    ("https://ehr.example.org.evil.com/fhir", False),
    ("https://evil.com/ehr.example.org/fhir", False),
    ("https://ehr.example.org@evil.com/fhir", False),
    ("https://user@ehr.example.org/fhir", False),
    ("https://ehr.example.org\\@evil.com/fhir", False),
    ("http://ehr.example.org/fhir", False),
    ("https://ehr.example.org:8443/fhir", False),
    ("https://ehr.example.org/fhir/../admin", False),
    ("https://ehr.example.org/fhir/%2e%2e/admin", False),
    ("https://ehr.example.org/fhir?x=1", False),
    ("https://ehr.example.org/fhir#frag", False),
    ("https://ehr.example.org/fhir /x", False),
    ("ftp://ehr.example.org/fhir", False),
    ("", False),
    (None, False),
])
def test_fhir_server_matching(url, allowed):
    assert url_within(url, [parse_base_url("https://ehr.example.org/fhir/")]) is allowed


# ---- Nothing secret in the log ---------------------------------------------------------------------

def test_tokens_never_reach_the_log(env, now, caplog):
    service = env.service()
    caplog.set_level(logging.DEBUG)
    good = sign(claims(service.base + SERVICE))
    expired = sign(claims(service.base + SERVICE, iat_offset=-600))
    forged = sign(claims(service.base + SERVICE), IMPOSTOR)
    assert service.post(SERVICE, fetching_request(now, env.fhir.base_url, prefetch=False),
                        headers=bearer(good)).status_code == 200
    for token in (good, expired, forged):  # the first is now a replay
        assert_bare_401(service.post(SERVICE, full_request(now), headers=bearer(token)))
    assert_bare_401(service.post(SERVICE, full_request(now), headers={"Authorization": "Bearer " + "x" * 40}))
    text = caplog.text
    assert "auth-refused" in text and "ExpiredSignatureError" in text and "replay" in text
    for token in (good, expired, forged):
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature
    assert "x" * 40 not in text
    assert FHIR_TOKEN not in text


# ---- Start-up configuration --------------------------------------------------------------------------

def test_auth_on_without_trusted_issuers_fails_at_start(tmp_path):
    with pytest.raises(AuthConfigError, match="no trusted issuers"):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3")))


@pytest.mark.parametrize("algorithms", [["HS256"], ["ES384", "none"], ["hs384"], ["ES385"], []])
def test_forbidden_or_unknown_algorithms_fail_at_start(tmp_path, algorithms):
    issuers = {ISS: {"jwks_url": "https://ehr.example.org/jwks.json", "algorithms": algorithms}}
    with pytest.raises(AuthConfigError, match="algorithm"):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), trusted_issuers=issuers))


@pytest.mark.parametrize("entry, message", [
    ({"jwks_url": "http://ehr.example.org/jwks.json"}, "must use https"),
    ({"fhir_servers": ["https://ehr.example.org/fhir"]}, "has no keys"),
    ({"jwks_url": "https://ehr.example.org/jwks.json", "fhir_servers": ["https://ehr.example.org/fhir?x=1"]},
     "fhir_servers"),
    ({"jwks_url": "https://ehr.example.org/jwks.json", "tenants": []}, "tenants is empty"),
    ({"jwks_url": "https://ehr.example.org/jwks.json", "jwks_uri": "typo"}, "unknown field"),
    ({"jwks": {"keys": [{**public_jwk(EC_KEY, "ec-1", "ES384"), "d": "secret"}]}}, "private key"),
    ({"jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}}, "unsupported kty"),
])
def test_bad_issuer_entries_fail_at_start(tmp_path, entry, message):
    with pytest.raises(AuthConfigError, match=message):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), trusted_issuers={ISS: entry}))


def test_trusted_issuers_file_and_inline_merge_but_may_not_repeat(env, tmp_path):
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps({"_comment": "test", ISS: env.issuer()}), encoding="utf-8")
    service = env.service({TENANT_ISS: env.issuer(tenants=["hospital-a"])}, trusted_issuers_file=str(path))
    assert set(service.state.auth.issuers) == {ISS, TENANT_ISS}
    assert service.get("/cds-services", headers=bearer(sign(claims(service.base + "/cds-services")))).status_code == 200
    with pytest.raises(AuthConfigError, match="twice"):
        create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), trusted_issuers_file=str(path),
                            trusted_issuers={ISS: env.issuer()}))


def test_development_settings_trust_the_sandbox_only_with_es384(tmp_path):
    settings = Settings.load(REPO_ROOT / "examples" / "dev-settings.json", env={},
                             feedback_db=str(tmp_path / "f.sqlite3"))
    auth = create_app(settings).config["CRS_CDS"].auth
    assert auth.enabled
    sandbox = auth.issuers["https://sandbox.cds-hooks.org"]
    assert sandbox.algorithms == {"ES384"}
    assert sandbox.jku_allowed == {"https://sandbox.cds-hooks.org/.well-known/jwks.json"}
    assert "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f" in sandbox.keys
    raw = json.loads((REPO_ROOT / "examples" / "dev-settings.json").read_text(encoding="utf-8"))
    assert "DEVELOPMENT ONLY" in raw["_comment"]


def test_only_short_fhir_server_urls_are_remembered():
    """Each call's fhirServer is parsed once and remembered, but not a long one a caller could send
    to fill the memory of every worker."""
    from cds_service.hooks.auth import _remembered_base_url

    before = _remembered_base_url.cache_info().currsize
    short = "https://ehr.example.org/fhir/remembered-once"
    long = "https://ehr.example.org/fhir/" + "a" * 100_000
    assert parse_base_url(short) == parse_base_url(short) is not None
    assert parse_base_url(long) is not None and parse_base_url(long).segments[-1] == "a" * 100_000
    assert _remembered_base_url.cache_info().currsize == before + 1
