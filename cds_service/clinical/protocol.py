"""The protocol: every window, threshold, dose and limit the rules use, as data.

The default ships as ``default_protocol.json``. A site protocol file (JSON) overrides any value
by key; nested objects merge, anything else replaces. Cards name the protocol and its version.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

DEFAULT_PROTOCOL_PATH = Path(__file__).with_name("default_protocol.json")


class ProtocolError(ValueError):
    """The protocol file cannot be read or lacks a required value."""


def _deep_merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Protocol:
    data: dict

    @property
    def label(self) -> str:
        return f"{self.data['name']} v{self.data['version']}"

    def __getitem__(self, key: str) -> Any:
        try:
            return self.data[key]
        except KeyError:
            raise ProtocolError(f"protocol has no {key!r}") from None

    def window(self, name: str) -> timedelta:
        return timedelta(hours=self["windows_hours"][name])

    @classmethod
    def load(cls, site_file: str | Path | None = None, overrides: Mapping | None = None) -> "Protocol":
        data = _read(DEFAULT_PROTOCOL_PATH)
        if site_file:
            data = _deep_merge(data, _read(Path(site_file)))
        if overrides:
            data = _deep_merge(data, overrides)
        return cls(data)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"cannot read protocol file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"protocol file {path} must hold a JSON object")
    return data


def default_protocol() -> Protocol:
    return Protocol.load()
