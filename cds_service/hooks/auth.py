"""CDS client authentication: the JWT each CDS Hooks call carries, and the FHIR server allowlist.

CDS Hooks 2.0 ("Trusting CDS Clients") and the cds-hooks.org best practices ("JWT"): every call
(discovery, service call, feedback; not a CORS preflight) carries ``Authorization: Bearer <JWT>``,
signed with the client's private key. This module checks it:

- header: ``alg`` among the issuer's algorithms (``none`` and ``HS*`` never), ``typ`` ``JWT``
  (any case), ``kid`` present and found in the issuer's keys; a ``jku``, when present, must be
  on the issuer's ``jku_allowed`` list (a ``jku`` that is not is refused and never fetched);
- claims: ``iss`` trusted; ``aud`` the URL actually called (string, or a list holding it);
  ``exp`` and ``iat`` present, with ``jwt_leeway_seconds`` of clock skew, ``iat`` not in the future,
  a lifetime (``exp - iat``) of at most an hour; ``jti`` present and not seen before;
  ``tenant`` among the issuer's ``tenants`` when it lists some. No ``sub`` is required.
- signature: with the key of that ``kid`` (inline keys, else the issuer's JWK Set URL).

Any failure is a bare 401 (:class:`~cds_service.errors.Unauthorized`); the reason goes to the log
with ``iss``, ``kid`` and ``jti`` (the best practices allow those), never the token itself.

Trusted issuers (setting ``trusted_issuers_file``, a JSON file, and/or ``trusted_issuers`` inline
in the settings file), keyed by ``iss``; keys beginning with ``_`` are comments::

    {
      "https://ehr.example.org/fhir": {
        "jwks_url": "https://ehr.example.org/.well-known/jwks.json",  # optional
        "jwks": {"keys": [{"kty": "EC", "crv": "P-384", "kid": "...", "x": "...", "y": "..."}]},
                                             # optional: public keys exchanged out of band
        "jku_allowed": ["https://ehr.example.org/.well-known/jwks.json"],  # default []
        "tenants": ["hospital-a"],           # optional: when given, the tenant claim must be one
        "fhir_servers": ["https://ehr.example.org/fhir/r4"],  # fhirServer bases this client may name
        "algorithms": ["ES384", "RS384"]     # optional; this is the default
      }
    }

Each issuer needs a source of keys: ``jwks``, ``jwks_url`` or ``jku_allowed``. Key URLs must be
``https`` (``http`` only on a loopback host, for development). ``algorithms`` may hold RS256/384/512,
PS256/384/512 and ES256/384/512; ``none`` or an ``HS*`` algorithm fails the start-up.

FHIR server allowlist (:meth:`Authenticator.fhir_server_allowed`): the ``fhirServer`` of a call
must lie within one of the calling issuer's ``fhir_servers`` (with auth off: the setting
``allowed_fhir_servers``, or, when that is empty, a loopback host: 127.0.0.1, localhost, [::1]).
Within means same scheme, host and port, and the base path as a whole-segment prefix, trailing
slashes ignored (``https://ehr.example.org/fhir`` covers ``.../fhir/`` and ``.../fhir/r4``, not
``.../fhir2`` nor ``https://ehr.example.org.evil.com``). URLs with user info, a query, a fragment,
``.``/``..`` segments, backslashes or blanks never match.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote, urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..errors import Unauthorized
from ..redact import strip_credentials
from ..settings import Settings, SettingsError

log = logging.getLogger("crs_cds.auth")

DEFAULT_ALGORITHMS = ("ES384", "RS384")
_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_RSA_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
SUPPORTED_ALGORITHMS = frozenset(_RSA_ALGORITHMS | set(_EC_CURVES))

JWKS_TIMEOUT_SECONDS = 2.0        # per JWK Set request (connect and read)
JWKS_MIN_REFRESH_SECONDS = 60.0   # at most one fetch per URL (and issuer) in this time
JWKS_MAX_AGE_SECONDS = 3600.0     # a JWK Set older than this is re-fetched (rate limit applies)
JWKS_MAX_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024
MAX_TOKEN_LIFETIME_SECONDS = 3600  # best practices: JWTs live "no more than an hour"
MIN_RSA_BITS = 2048
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_ISSUER_FIELDS = {"jwks_url", "jwks", "jku_allowed", "tenants", "fhir_servers", "algorithms"}
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class AuthConfigError(SettingsError):
    """Trusted-issuer or authentication settings that cannot be used (start-up fails)."""


class _Refused(Exception):
    """Why a call is not authenticated: for the log only (never holds the token)."""


# -- URLs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseUrl:
    """A normalised http(s) URL: scheme, host, port and path segments (no trailing slash)."""

    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]

    def covers(self, other: "BaseUrl") -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port) \
            and other.segments[:len(self.segments)] == self.segments


def parse_base_url(url: Any) -> BaseUrl | None:
    """``url`` as a :class:`BaseUrl`, or None when it is not a plain http(s) base URL."""
    if not isinstance(url, str):
        return None
    # Every hook call checks its fhirServer (~8 us to parse), and an EHR sends one or a few: those
    # are remembered (a BaseUrl is immutable). Not a long one: the cache would hold what a caller sent.
    return _remembered_base_url(url) if len(url) <= _REMEMBERED_URL_LENGTH else _parsed_base_url(url)


_REMEMBERED_URL_LENGTH = 2048


def _parsed_base_url(url: str) -> BaseUrl | None:
    url = url.strip()
    if not url or any(ch in url for ch in "\\@?#") or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    path = parts.path.rstrip("/")
    if path and not path.startswith("/"):
        return None
    segments = tuple(path.split("/")[1:]) if path else ()
    for segment in segments:
        decoded = unquote(segment)
        if not segment or decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            return None
    return BaseUrl(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), segments)


_remembered_base_url = lru_cache(maxsize=1024)(_parsed_base_url)


def url_within(url: Any, bases: Iterable[BaseUrl]) -> bool:
    """True when ``url`` lies within one of ``bases`` (see the module docstring)."""
    target = parse_base_url(url)
    return target is not None and any(base.covers(target) for base in bases)


def is_loopback(url: Any) -> bool:
    target = parse_base_url(url)
    return target is not None and target.host in _LOOPBACK_HOSTS


def _key_url(value: Any, where: str) -> str:
    """A JWK Set URL from the configuration: https (http only on a loopback host), no user info."""
    bad = not isinstance(value, str) or not value or any(ord(ch) <= 0x20 or ch == "\\" for ch in value)
    try:
        parts = urlsplit(value) if not bad else None
    except ValueError:
        bad = True
    if bad or parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise AuthConfigError(f"{where}: {value!r} is not an http(s) URL")
    if parts.scheme.lower() != "https" and parts.hostname.lower() not in _LOOPBACK_HOSTS:
        raise AuthConfigError(f"{where}: {value!r} must use https (http only on a loopback host)")
    return value


# -- keys -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Key:
    kid: str
    alg: str | None   # the JWK's own "alg", when it names one
    public_key: Any   # a cryptography public key

    def suits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if alg in _RSA_ALGORITHMS:
            return isinstance(self.public_key, rsa.RSAPublicKey)
        curve = _EC_CURVES.get(alg)
        return curve is not None and isinstance(self.public_key, ec.EllipticCurvePublicKey) \
            and isinstance(self.public_key.curve, curve)


def _parse_jwk(jwk: Any) -> _Key:
    """One public signing key of a JWK Set; ValueError says why it cannot be used."""
    if not isinstance(jwk, dict):
        raise ValueError("a key is not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("a key has no kid")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"key {kid!r} is not a signing key (use={jwk.get('use')!r})")
    if "d" in jwk:
        raise ValueError(f"key {kid!r} holds a private key; a JWK Set must hold public keys only")
    alg = jwk.get("alg")
    if alg is not None and alg not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"key {kid!r} has an unsupported alg {alg!r}")
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            public_key = ECAlgorithm.from_jwk(jwk)
        elif kty == "RSA":
            public_key = RSAAlgorithm.from_jwk(jwk)
        else:
            raise ValueError(f"key {kid!r} has an unsupported kty {kty!r}")
    except (jwt.PyJWTError, KeyError, TypeError) as exc:
        raise ValueError(f"key {kid!r} cannot be read ({type(exc).__name__})") from None
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise ValueError(f"key {kid!r} is an RSA key of {public_key.key_size} bits (at least {MIN_RSA_BITS})")
    if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError(f"key {kid!r} is not a public key")
    return _Key(kid, alg, public_key)


def _parse_jwks(jwks: Any, strict: bool, where: str) -> dict[str, _Key]:
    """The usable keys of a JWK Set by kid. ``strict``: any unusable key is an error (config)."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError(f"{where} is not a JWK Set (an object with a \"keys\" list)")
    keys: dict[str, _Key] = {}
    for jwk in jwks["keys"]:
        try:
            key = _parse_jwk(jwk)
        except ValueError as exc:
            if strict:
                raise ValueError(f"{where}: {exc}") from None
            log.warning("%s: key skipped: %s", where, exc)
            continue
        if key.kid in keys:
            if strict:
                raise ValueError(f"{where}: kid {key.kid!r} appears twice")
            log.warning("%s: kid %r appears twice; the first is used", where, key.kid)
            continue
        keys[key.kid] = key
    return keys


class _KeySet:
    def __init__(self) -> None:
        self.keys: dict[str, _Key] | None = None
        self.fetched_at: float | None = None
        self.last_attempt: float | None = None
        self.lock = threading.Lock()


class JwksCache:
    """Remote JWK Sets, per (issuer, URL): fetched on first use, re-fetched when a ``kid`` is
    unknown or the set is older than ``max_age``, never more than once per ``min_refresh`` seconds
    per URL, and kept (served) when the key server cannot be reached."""

    def __init__(self, session: requests.Session | None = None, clock: Callable[[], float] = time.monotonic,
                 timeout: float = JWKS_TIMEOUT_SECONDS, min_refresh: float = JWKS_MIN_REFRESH_SECONDS,
                 max_age: float = JWKS_MAX_AGE_SECONDS):
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self.clock = clock
        self.timeout = timeout
        self.min_refresh = min_refresh
        self.max_age = max_age
        self._sets: dict[tuple[str, str], _KeySet] = {}
        self._lock = threading.Lock()

    def key(self, iss: str, url: str, kid: str) -> _Key | None:
        with self._lock:
            entry = self._sets.setdefault((iss, url), _KeySet())
        with entry.lock:
            now = self.clock()
            stale = entry.keys is None or now - entry.fetched_at >= self.max_age
            if (stale or kid not in entry.keys) and (
                    entry.last_attempt is None or now - entry.last_attempt >= self.min_refresh):
                self._refresh(entry, url, now)
            return (entry.keys or {}).get(kid)

    def _refresh(self, entry: _KeySet, url: str, now: float) -> None:
        entry.last_attempt = now
        try:
            keys = _parse_jwks(self._get(url), strict=False, where=f"JWK Set {strip_credentials(url)}")
        except (ValueError, requests.RequestException) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            kept = f"keeping {len(entry.keys)} cached key(s)" if entry.keys else "no keys cached"
            log.warning("JWK Set %s could not be fetched (%s); %s", strip_credentials(url), reason, kept)
            return
        entry.keys, entry.fetched_at = keys, now
        log.info("JWK Set %s fetched: %d key(s)", strip_credentials(url), len(keys))

    def _get(self, url: str) -> Any:
        with self.session.get(url, timeout=(self.timeout, self.timeout), stream=True, allow_redirects=False,
                              headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            deadline = time.monotonic() + self.timeout
            chunks, size = [], 0
            for chunk in response.iter_content(16 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > JWKS_MAX_BYTES:
                    raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ValueError("too slow")
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not JSON") from None


# -- replay (jti) caches ------------------------------------------------------------------------------

class MemoryReplayCache:
    """Seen ``(iss, jti)`` pairs until their token expires, in this process's memory.

    With several gunicorn workers each worker has its own cache, so a token replayed to another
    worker is not caught: the service uses its database instead (:func:`database_replay_cache`).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._next_purge = 0.0

    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        now = self.clock()
        with self._lock:
            if now >= self._next_purge:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                self._next_purge = now + 60
            until = self._seen.get((iss, jti))
            if until is not None and until > now:
                return False
            self._seen[(iss, jti)] = expires_at
            return True


def database_replay_cache(where) -> Any:
    """The replay cache in a database: an Engine (the service's), or a SQLite file path (``jti_db``)."""
    from ..storage import DatabaseReplayCache, StorageError, make_engine, prepare_database, sqlite_url

    if isinstance(where, str):
        try:
            prepare_database(sqlite_url(where))
            where = make_engine(sqlite_url(where))
        except StorageError as exc:
            raise AuthConfigError(f"jti_db {where}: cannot be used ({exc})") from None
    return DatabaseReplayCache(where)


# -- trusted issuers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustedIssuer:
    iss: str
    jwks_url: str | None = None
    keys: dict[str, _Key] = field(default_factory=dict)   # inline (out-of-band) keys
    jku_allowed: frozenset[str] = frozenset()
    tenants: frozenset[str] | None = None
    fhir_servers: tuple[BaseUrl, ...] = ()
    algorithms: frozenset[str] = frozenset(DEFAULT_ALGORITHMS)


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AuthConfigError(f"{where} must be a list of non-empty strings")
    return value


def _issuer(iss: str, entry: Any) -> TrustedIssuer:
    where = f"trusted issuer {iss!r}"
    if not iss:
        raise AuthConfigError("a trusted issuer has an empty iss")
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where} must be a JSON object")
    entry = {k: v for k, v in entry.items() if not k.startswith("_")}
    unknown = sorted(set(entry) - _ISSUER_FIELDS)
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(_ISSUER_FIELDS))})")
    algorithms = _string_list(entry.get("algorithms", list(DEFAULT_ALGORITHMS)), f"{where}: algorithms")
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise AuthConfigError(f"{where}: algorithm {alg!r} is not allowed: CDS Hooks forbids 'none' and "
                                  "symmetric (HMAC, HS*) signatures; use ES384 or RS384")
        if alg not in SUPPORTED_ALGORITHMS:
            raise AuthConfigError(f"{where}: unsupported algorithm {alg!r} "
                                  f"(supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))})")
    if not algorithms:
        raise AuthConfigError(f"{where}: algorithms is empty")
    jwks_url = entry.get("jwks_url")
    if jwks_url is not None:
        jwks_url = _key_url(jwks_url, f"{where}: jwks_url")
    jku_allowed = [_key_url(u, f"{where}: jku_allowed")
                   for u in _string_list(entry.get("jku_allowed", []), f"{where}: jku_allowed")]
    keys: dict[str, _Key] = {}
    if "jwks" in entry:
        try:
            keys = _parse_jwks(entry["jwks"], strict=True, where=f"{where}: jwks")
        except ValueError as exc:
            raise AuthConfigError(str(exc)) from None
        if not keys:
            raise AuthConfigError(f"{where}: jwks holds no keys")
    if not (keys or jwks_url or jku_allowed):
        raise AuthConfigError(f"{where} has no keys: give jwks, jwks_url or jku_allowed")
    tenants = None
    if "tenants" in entry:
        tenants = frozenset(_string_list(entry["tenants"], f"{where}: tenants"))
        if not tenants:
            raise AuthConfigError(f"{where}: tenants is empty (leave it out to accept any tenant)")
    fhir_servers = []
    for url in _string_list(entry.get("fhir_servers", []), f"{where}: fhir_servers"):
        parsed = parse_base_url(url)
        if parsed is None:
            raise AuthConfigError(f"{where}: fhir_servers: {url!r} is not an http(s) base URL "
                                  "(no user info, query or fragment)")
        fhir_servers.append(parsed)
    return TrustedIssuer(iss, jwks_url, keys, frozenset(jku_allowed), tenants, tuple(fhir_servers),
                         frozenset(algorithms))


def load_trusted_issuers(settings: Settings) -> dict[str, TrustedIssuer]:
    """The trusted issuers of ``trusted_issuers_file`` and ``trusted_issuers``; AuthConfigError if bad."""
    sources: list[tuple[str, Any]] = []
    if settings.trusted_issuers_file:
        path = Path(settings.trusted_issuers_file)
        try:
            sources.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise AuthConfigError(f"cannot read trusted_issuers_file {path}: {exc}") from None
    if settings.trusted_issuers:
        sources.append(("the trusted_issuers setting", settings.trusted_issuers))
    issuers: dict[str, TrustedIssuer] = {}
    for where, data in sources:
        if not isinstance(data, dict):
            raise AuthConfigError(f"{where} must hold a JSON object keyed by iss")
        for iss, entry in data.items():
            if iss.startswith("_"):
                continue
            if iss in issuers:
                raise AuthConfigError(f"trusted issuer {iss!r} is configured twice")
            issuers[iss] = _issuer(iss, entry)
    return issuers


# -- the authenticator --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthenticatedClient:
    """The CDS client a call came from (after its JWT was verified)."""

    iss: str
    tenant: str | None
    jti: str
    issuer: TrustedIssuer


def _short(value: Any, limit: int = 200) -> Any:
    """A value fit for a log line: cut at ``limit`` characters, any URL's credentials removed."""
    value = strip_credentials(value)
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value if value is None or isinstance(value, (str, int, float)) else type(value).__name__


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Authenticator:
    """Checks the JWT of each call and decides which FHIR servers may be contacted."""

    def __init__(self, enabled: bool, issuers: dict[str, TrustedIssuer] | None = None, *,
                 leeway: int = 60, external_base_url: str | None = None,
                 allowed_fhir_servers: Iterable[BaseUrl] = (), jwks: JwksCache | None = None,
                 replay: Any = None):
        self.enabled = enabled
        self.issuers = issuers or {}
        self.leeway = leeway
        self.external_base_url = external_base_url.rstrip("/") if external_base_url else None
        self.allowed_fhir_servers = tuple(allowed_fhir_servers)
        self.jwks = jwks or JwksCache()
        self.replay = replay or MemoryReplayCache()

    @classmethod
    def from_settings(cls, settings: Settings, database: Any = None) -> "Authenticator":
        """``database``: the service's Engine, which holds the replay cache unless ``jti_db`` names a
        SQLite file of its own; with neither, each process keeps its own cache in memory."""
        allowed = []
        for url in settings.allowed_fhir_servers:
            parsed = parse_base_url(url)
            if parsed is None:
                raise SettingsError(f"allowed_fhir_servers: {url!r} is not an http(s) base URL")
            allowed.append(parsed)
        if settings.external_base_url is not None and parse_base_url(settings.external_base_url) is None:
            raise SettingsError(f"external_base_url {settings.external_base_url!r} is not an http(s) base URL")
        if not settings.auth_enabled:
            log.warning("AUTHENTICATION IS DISABLED (auth_enabled=false): any caller can use this service "
                        "and its FHIR access. For local development only; never in production.")
            if not allowed:
                log.warning("auth is off and allowed_fhir_servers is empty: only loopback FHIR servers "
                            "(127.0.0.1, localhost, [::1]) will be contacted")
            return cls(False, leeway=settings.jwt_leeway_seconds, external_base_url=settings.external_base_url,
                       allowed_fhir_servers=allowed)
        issuers = load_trusted_issuers(settings)
        if not issuers:
            raise AuthConfigError("auth_enabled is true but no trusted issuers are configured: set "
                                  "trusted_issuers_file (or trusted_issuers); for local development only, "
                                  "auth_enabled=false turns authentication off")
        if not 0 <= settings.jwt_leeway_seconds <= 600:
            raise AuthConfigError(f"jwt_leeway_seconds must be 0 to 600, got {settings.jwt_leeway_seconds}")
        if settings.jti_db:
            replay, where = database_replay_cache(settings.jti_db), settings.jti_db
        elif database is not None:
            from ..storage import describe_url

            replay, where = database_replay_cache(database), describe_url(str(database.url))
        else:
            replay, where = MemoryReplayCache(), "in memory (per process)"
        if not settings.external_base_url:
            log.warning("external_base_url is not set: the expected JWT aud is built from each request's Host "
                        "header; set external_base_url in production")
        log.info("client authentication on; trusted issuers: %s; jti cache: %s",
                 ", ".join(sorted(strip_credentials(iss) for iss in issuers)),
                 where)
        return cls(True, issuers, leeway=settings.jwt_leeway_seconds, external_base_url=settings.external_base_url,
                   allowed_fhir_servers=allowed, replay=replay)

    # -- JWT ----------------------------------------------------------------------------------------

    def expected_audience(self, request) -> str:
        """The URL the caller called: ``external_base_url`` + path, else the request URL, no query."""
        if self.external_base_url:
            return self.external_base_url + request.path
        return request.base_url

    def authenticate(self, request) -> AuthenticatedClient | None:
        """The verified client of a Flask request (None when auth is off); raises Unauthorized."""
        if not self.enabled:
            return None
        seen: dict[str, Any] = {}
        token = None
        try:
            header = request.headers.get("Authorization")
            if not header:
                raise _Refused("no Authorization header")
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer":  # no part of the value is logged: it may be a password
                token = None
                raise _Refused("Authorization scheme is not Bearer")
            client = self._verify(token, self.expected_audience(request), seen)
        except _Refused as refused:
            reason = str(refused)
            if token and len(token) >= 8:
                reason = reason.replace(token, "[token]")
            log.warning(json.dumps({"event": "auth-refused", "method": request.method, "path": request.path,
                                    "reason": reason, **{k: _short(v) for k, v in seen.items()}}))
            raise Unauthorized() from None
        log.debug(json.dumps({"event": "auth-ok", "path": request.path, "iss": client.iss,
                              "tenant": client.tenant, "jti": _short(client.jti)}))
        return client

    def _verify(self, token: str, audience: str, seen: dict[str, Any]) -> AuthenticatedClient:
        if not token:
            raise _Refused("empty Bearer token")
        if len(token) > MAX_TOKEN_CHARS or not _COMPACT_JWS.fullmatch(token):
            raise _Refused("malformed token (not a compact JWS)")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _Refused(f"malformed token ({type(exc).__name__})") from None
        alg, kid, jku = header.get("alg"), header.get("kid"), header.get("jku")
        iss = unverified.get("iss")
        seen.update(iss=iss, kid=kid, alg=alg, jti=unverified.get("jti"))
        if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
            raise _Refused(f"forbidden alg {_short(alg)!r}")
        if not isinstance(header.get("typ"), str) or header["typ"].upper() != "JWT":
            raise _Refused(f"typ is {_short(header.get('typ'))!r}, not JWT")
        if not isinstance(kid, str) or not kid:
            raise _Refused("no kid in the header")
        if not isinstance(iss, str) or iss not in self.issuers:
            raise _Refused("iss is missing or not a trusted issuer")
        issuer = self.issuers[iss]
        if alg not in issuer.algorithms:
            raise _Refused(f"alg {_short(alg)!r} is not allowed for this issuer")
        if jku is not None and (not isinstance(jku, str) or jku not in issuer.jku_allowed):
            raise _Refused(f"jku {_short(jku)!r} is not on the issuer's jku_allowed list (not fetched)")
        key = issuer.keys.get(kid)
        if key is None:
            url = jku or issuer.jwks_url
            key = self.jwks.key(iss, url, kid) if url else None
        if key is None:
            raise _Refused("unknown kid")
        if not key.suits(alg):
            raise _Refused(f"key {kid!r} does not suit alg {alg}")
        try:
            claims = jwt.decode(token, key.public_key, algorithms=[alg], audience=audience, issuer=iss,
                                leeway=self.leeway,
                                options={"require": ["iss", "aud", "exp", "iat", "jti"], "verify_sub": False})
        except jwt.InvalidAudienceError:
            raise _Refused(f"aud does not name this endpoint ({audience})") from None
        except jwt.PyJWTError as exc:
            raise _Refused(f"{type(exc).__name__}: {exc}") from None
        exp, iat, jti = claims["exp"], claims["iat"], claims["jti"]
        if not (_number(exp) and _number(iat)):
            raise _Refused("exp and iat must be numbers")
        if iat > time.time() + self.leeway:  # PyJWT checks it too; kept for any 2.x version
            raise _Refused("iat is in the future")
        if exp - iat > MAX_TOKEN_LIFETIME_SECONDS:
            raise _Refused(f"token lifetime {exp - iat:.0f} s is over {MAX_TOKEN_LIFETIME_SECONDS} s")
        if not isinstance(jti, str) or not jti:
            raise _Refused("jti must be a non-empty string")
        tenant = claims.get("tenant")
        if issuer.tenants is not None and (not isinstance(tenant, str) or tenant not in issuer.tenants):
            seen["tenant"] = tenant
            raise _Refused("tenant is missing or not allowed for this issuer")
        if not self.replay.first_use(iss, jti, float(exp) + self.leeway):
            raise _Refused("jti already used (replay)")
        return AuthenticatedClient(iss, tenant if isinstance(tenant, str) else None, jti, issuer)

    # -- FHIR servers -------------------------------------------------------------------------------

    def fhir_server_allowed(self, fhir_server: Any, client: AuthenticatedClient | None) -> bool:
        """May the service send requests (and the access token) to ``fhir_server``?

        With auth on: when it lies within the calling issuer's ``fhir_servers``. With auth off:
        within ``allowed_fhir_servers``, or, when that setting is empty, on a loopback host.
        A request without ``fhirServer`` contacts nothing, so it is allowed.
        """
        if fhir_server is None or (isinstance(fhir_server, str) and not fhir_server.strip()):
            return True
        if self.enabled:
            allowed = client is not None and url_within(fhir_server, client.issuer.fhir_servers)
            why = f"not within the fhir_servers of issuer {client.iss if client else None}"
        elif self.allowed_fhir_servers:
            allowed = url_within(fhir_server, self.allowed_fhir_servers)
            why = "not within allowed_fhir_servers"
        else:
            allowed = is_loopback(fhir_server)
            why = "not a loopback host (auth is off and allowed_fhir_servers is empty)"
        if not allowed:
            log.warning(json.dumps({"event": "fhir-server-refused", "fhirServer": _short(fhir_server),
                                    "reason": why + "; no FHIR request made, the prefetch is used alone"}))
        return allowed
