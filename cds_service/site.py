"""What a site's settings decide about reading and grading: its protocol, its codes, its time zone.

Loaded the same way for the service and for ``crs-cds grade``, so both read a chart alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .clinical.protocol import Protocol
from .settings import Settings, SettingsError
from .terminology import Terminology, load_terminology


@dataclass(frozen=True)
class Site:
    protocol: Protocol
    terminology: Terminology
    zone: tzinfo

    @classmethod
    def from_settings(cls, settings: Settings) -> "Site":
        """Raises ProtocolError for a protocol file, SettingsError for a time zone, and
        FileNotFoundError or ValueError for a terminology folder that cannot be used."""
        return cls(Protocol.load(settings.protocol_file), load_terminology(tuple(settings.terminology_dirs)),
                   time_zone(settings.time_zone))


def time_zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"setting time_zone: {name!r} is not an IANA time zone name") from None
