"""What a site decides about reading and grading: its EHR, protocol, codes, time zone and templates.

One deployment can serve several sites (two hospitals, or a test and a production EHR): each
``profiles`` entry of the settings is a site, chosen by the authenticated client's issuer (and
tenant, where given); any other client gets the deployment default, made of the top-level
settings. Loaded the same way for the service and for ``crs-cds grade``, so both read alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .clinical.protocol import Protocol
from .hooks.registry import prefetch_templates
from .settings import EHR_KINDS, Settings, SettingsError
from .terminology import Terminology, load_terminology

PROFILE_FIELDS = {"iss", "tenant", "ehr", "protocol_file", "terminology_dirs", "time_zone"}


@dataclass(frozen=True)
class Site:
    name: str
    ehr: str                    # "generic", "epic" or "oracle-health": template dialect, suggestion actions
    protocol: Protocol
    terminology: Terminology
    zone: tzinfo
    templates: dict[str, str]   # every prefetch key's template, in the EHR's dialect

    @classmethod
    def load(cls, name: str, ehr: str, protocol_file: str | None, terminology_dirs: list[str],
             time_zone_name: str) -> "Site":
        """Raises ProtocolError for a protocol file, SettingsError for an EHR kind or a time zone,
        and FileNotFoundError or ValueError for a terminology folder that cannot be used."""
        if ehr not in EHR_KINDS:
            raise SettingsError(f"{name}: ehr must be one of {', '.join(EHR_KINDS)}, got {ehr!r}")
        terminology = load_terminology(tuple(terminology_dirs))
        return cls(name, ehr, Protocol.load(protocol_file), terminology, time_zone(time_zone_name),
                   prefetch_templates(terminology, ehr))

    @classmethod
    def from_settings(cls, settings: Settings) -> "Site":
        """The deployment default: the top-level settings."""
        return cls.load("default", settings.ehr, settings.protocol_file, settings.terminology_dirs,
                        settings.time_zone)


@dataclass(frozen=True)
class Sites:
    default: Site
    by_client: dict[tuple[str, str | None], Site]

    def for_client(self, iss: str | None, tenant: str | None = None) -> Site:
        """The issuer and tenant's own profile, else the issuer's, else the deployment default."""
        if iss is None:
            return self.default
        return self.by_client.get((iss, tenant)) or self.by_client.get((iss, None)) or self.default

    def named(self, name: str) -> Site | None:
        return next((s for s in (self.default, *self.by_client.values()) if s.name == name), None)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Sites":
        default = Site.from_settings(settings)
        by_client: dict[tuple[str, str | None], Site] = {}
        for name, profile in settings.profiles.items():
            where = f"setting profiles.{name}"
            if name == "default":
                raise SettingsError(f"{where}: 'default' names the deployment's own settings; choose another name")
            if not isinstance(profile, dict) or not isinstance(profile.get("iss"), str):
                raise SettingsError(f"{where}: must be an object with the client's iss")
            unknown = sorted(set(profile) - PROFILE_FIELDS)
            if unknown:
                raise SettingsError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(PROFILE_FIELDS))})")
            key = (profile["iss"], profile.get("tenant"))
            if key in by_client:
                raise SettingsError(f"{where}: another profile has the same iss and tenant")
            by_client[key] = Site.load(
                name, profile.get("ehr", settings.ehr), profile.get("protocol_file", settings.protocol_file),
                profile.get("terminology_dirs", settings.terminology_dirs),
                profile.get("time_zone", settings.time_zone))
        return cls(default, by_client)


def time_zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"setting time_zone: {name!r} is not an IANA time zone name") from None
