"""One settings object for the service: defaults, then a JSON settings file, then CRS_CDS_* variables.

Every setting is documented in README.md ("Configuration"). Environment variables use the field
name in upper case (``CRS_CDS_FHIR_BUDGET_SECONDS=1.5``); lists are comma-separated, objects are JSON.
Keys of the settings file that begin with ``_`` (e.g. ``"_comment"``) are ignored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "CRS_CDS_"
# The EHR kinds a site (the settings' ``ehr`` or a profile's) can name: each has its own prefetch
# template dialect and suggestion actions.
EHR_KINDS = ("generic", "epic", "oracle-health")


class SettingsError(ValueError):
    """A settings file or variable that cannot be used."""


@dataclass
class Settings:
    """The service's settings (README, "Configuration").

    Client authentication (``cds_service.hooks.auth``):

    - ``auth_enabled``: require a CDS Hooks client JWT (``Authorization: Bearer``) on discovery,
      service calls and feedback. Default True. False is for local development only and is logged
      as a WARNING at start-up.
    - ``trusted_issuers_file``: a JSON file of trusted CDS clients, keyed by ``iss`` (format in
      ``cds_service.hooks.auth``); ``trusted_issuers`` holds the same structure inline. Both may be
      used (an ``iss`` may not appear in both). With auth enabled and no issuer, start-up fails.
    - ``jwt_leeway_seconds``: clock skew allowed on ``exp``, ``iat`` and ``nbf``.
    - ``jti_db``: a SQLite file for seen ``jti`` values, shared by every worker process; when unset
      each process keeps its own in-memory replay cache.
    - ``external_base_url``: the service's base URL as clients call it (scheme, host and any path
      prefix in front of ``/cds-services``). The expected JWT ``aud`` is this plus the request path;
      when unset it is the URL the request arrived on (from its Host header). Set it in production.
    - ``allowed_fhir_servers``: the FHIR base URLs the service may call when auth is off (with auth
      on, each trusted issuer lists its own ``fhir_servers``). Empty with auth off: loopback only.
    """

    # Clinical content
    protocol_file: str | None = None          # site protocol overriding the default protocol
    terminology_dirs: list[str] = field(default_factory=list)  # extra ValueSet folders (local codes)
    time_zone: str = "UTC"                     # IANA name: times without a zone are read in it; cards show it
    ehr: str = "generic"                       # generic, epic or oracle-health: template dialect, suggestion actions
    profiles: dict[str, Any] = field(default_factory=dict)  # per-client sites, by iss (and tenant)
    quiet_when_normal: bool = True             # no card for an in-scope patient with no CRS, no ICANS, no pitfall
    # FHIR access
    fhir_timeout_seconds: float = 1.5          # per HTTP request to a FHIR server
    fhir_budget_seconds: float = 2.0           # all FHIR fetching for one hook call
    fhir_max_pages: int = 10                   # pages followed per prefetch key
    fhir_max_resources_per_key: int = 5000     # resources kept per prefetch key
    allowed_fhir_servers: list[str] = field(default_factory=list)  # base URLs (used when auth is off)
    # Client authentication (JWT, CDS Hooks 2.0 "Trusting CDS Clients")
    auth_enabled: bool = True
    trusted_issuers_file: str | None = None   # JSON: {"<iss>": {...}} (see cds_service.hooks.auth)
    trusted_issuers: dict[str, Any] = field(default_factory=dict)  # the same structure, inline
    jwt_leeway_seconds: int = 60               # clock skew allowed on exp/iat/nbf
    jti_db: str | None = None                  # SQLite replay cache shared by workers (else in memory)
    # HTTP edge
    max_body_bytes: int = 5 * 1024 * 1024      # nginx's client_max_body_size must agree (deploy/nginx.conf)
    body_read_timeout_seconds: float = 10.0    # the whole request body, from the first read
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    external_base_url: str | None = None       # the URL clients call, when behind a proxy
    # Storage
    feedback_db: str = "crs-cds-feedback.sqlite3"  # the SQLite file used when database_url is unset
    database_url: str | None = None            # e.g. postgresql+psycopg://crs@db/crs: feedback, card topics, jti
    # Serving (the shipped gunicorn configuration, cds_service/gunicorn_conf.py)
    workers: int = 2                           # processes
    threads: int = 8                           # threads per process: a call waiting on FHIR holds one
    worker_timeout_seconds: int = 30           # a worker silent this long is killed (and logged)
    # Card links
    guideline_url: str = "https://doi.org/10.1016/j.bbmt.2018.12.758"
    # SMART timeline app (cds_service.smart)
    smart_clients: dict[str, Any] = field(default_factory=dict)  # {"<iss>": {"client_id", ...}}
    smart_link_enabled: bool = True            # the assessment card links to the app
    smart_launch_url: str | None = None        # default: external_base_url + /smart/launch
    smart_link_clients: list[str] = field(default_factory=list)  # CDS client iss given the link (empty: all)
    smart_fhir_budget_seconds: float = 10.0    # all FHIR fetching for one timeline page
    smart_fhir_max_pages: int = 50             # pages followed per search for the timeline
    smart_cookie_samesite: str = "Lax"         # "None" (with https) when the EHR embeds the app in a frame

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> "Settings":
        values: dict[str, Any] = {}
        env = os.environ if env is None else env
        path = path or env.get(ENV_PREFIX + "CONFIG")  # CRS_CDS_CONFIG names a settings file
        if path:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
            if not isinstance(data, dict):
                raise SettingsError(f"settings file {path} must hold a JSON object")
            values.update({key: value for key, value in data.items() if not key.startswith("_")})
        known = {f.name: f for f in fields(cls)}
        for name in known:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update(overrides)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(unknown)}")
        settings = cls()
        for name, value in values.items():
            setattr(settings, name, _coerce(name, value, getattr(settings, name), known[name].type))
        return settings


def _coerce(name: str, value: Any, default: Any, declared: Any) -> Any:
    declared = str(declared)
    try:
        if declared.startswith("dict"):
            if isinstance(value, str):  # an environment variable: JSON
                value = json.loads(value)
            if isinstance(value, dict):
                return value
            raise ValueError("expected a JSON object")
        if declared.startswith("list"):
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError("expected a list of strings")
        if declared == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if declared == "int":
            return int(value)
        if declared == "float":
            return float(value)
        if value is None or isinstance(value, str):
            return value
        raise ValueError("expected a string")
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: {exc} (got {value!r})") from None
