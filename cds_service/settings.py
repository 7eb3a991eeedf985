"""One settings object for the service: defaults, then a JSON settings file, then CRS_CDS_* variables.

Every setting is documented in README.md ("Configuration"). Environment variables use the field
name in upper case (``CRS_CDS_FHIR_BUDGET_SECONDS=1.5``); lists are comma-separated.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "CRS_CDS_"


class SettingsError(ValueError):
    """A settings file or variable that cannot be used."""


@dataclass
class Settings:
    # Clinical content
    protocol_file: str | None = None          # site protocol overriding the default protocol
    terminology_dirs: list[str] = field(default_factory=list)  # extra ValueSet folders (local codes)
    # FHIR access
    fhir_timeout_seconds: float = 1.5          # per HTTP request to a FHIR server
    fhir_budget_seconds: float = 2.0           # all FHIR fetching for one hook call
    fhir_max_pages: int = 10                   # pages followed per prefetch key
    fhir_max_resources_per_key: int = 5000     # resources kept per prefetch key
    allowed_fhir_servers: list[str] = field(default_factory=list)  # base URLs (used when auth is off)
    # HTTP edge
    max_body_bytes: int = 5 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    external_base_url: str | None = None       # the URL clients call, when behind a proxy
    # Storage
    feedback_db: str = "crs-cds-feedback.sqlite3"
    # Card links
    guideline_url: str = "https://doi.org/10.1016/j.bbmt.2018.12.758"

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
            values.update(data)
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
