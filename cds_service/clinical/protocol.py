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

    def cite(self, keys) -> str:
        """The literature behind a rule, in words: the short form of each citation key."""
        keys = [keys] if isinstance(keys, str) else list(keys or ())
        table = self.data.get("citations", {})
        return "; ".join(table[k]["short"] if k in table else k for k in keys)

    def links(self, keys) -> tuple[dict, ...]:
        """The citations with a URL (a doi) as card links."""
        keys = [keys] if isinstance(keys, str) else list(keys or ())
        table = self.data.get("citations", {})
        return tuple({"label": table[k]["text"], "url": table[k]["url"]} for k in keys
                     if k in table and table[k].get("url"))

    def rule(self, name: str) -> str:
        """A choice of this protocol, cited by its name, version and rule."""
        return f"{self.label}, rule {name}"

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


# ---- The protocol as a readable document -------------------------------------------------------------

SECTION_TITLES = {
    "scope": "Who is in scope",
    "windows_hours": "Assessment windows (hours)",
    "hypotension_sbp_thresholds": "Hypotension: systolic blood pressure by age",
    "mean_arterial_pressure": "Hypotension: documented mean arterial pressure",
    "oxygen": "Oxygen support",
    "icans": "ICANS grading",
    "tocilizumab": "Tocilizumab dose, timing and limits",
    "crs_grade_1_tocilizumab_triggers": "CRS grade 1: when tocilizumab is indicated",
    "pediatric": "Children: weight-based doses",
    "steroid_regimens": "Corticosteroid regimens",
    "levetiracetam": "Seizure prophylaxis",
    "crs_management": "CRS management by grade",
    "icans_management": "ICANS management by grade (cumulative)",
    "refractory_options": "Refractory CRS",
    "hlh": "HLH/MAS",
    "bispecific_hold": "T-cell engagers: holding the next dose",
    "background": "Background advice",
    "order_checks": "Order checks",
    "citations": "Sources cited",
}


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(str(v) for v in value) if value else "(none)"
    return str(value)


def _markdown_lines(value: Any, path: str, depth: int) -> list[str]:
    indent = "  " * depth
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            rule = f"{path}.{key}" if path else key
            if isinstance(item, (dict, list)) and not (isinstance(item, list) and all(
                    not isinstance(v, (dict, list)) for v in item)):
                lines.append(f"{indent}- `{rule}`:")
                lines += _markdown_lines(item, rule, depth + 1)
            else:
                lines.append(f"{indent}- `{rule}`: {_value_text(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for index, item in enumerate(value):
            lines.append(f"{indent}- row {index + 1}:")
            lines += _markdown_lines(item, f"{path}[{index}]", depth + 1)
        return lines
    return [f"{indent}- `{path}`: {_value_text(value)}"]


def protocol_markdown(protocol: "Protocol") -> str:
    """The protocol as a Markdown document made from its data alone: every rule by the name the
    cards cite it by (``rule tocilizumab.max_doses_per_24h``), and the literature with its links."""
    data = protocol.data
    lines = [f"# {data['name']}", "", f"Version {data['version']}. Generated from the protocol data "
             "(`crs-cds protocol show --markdown`); do not edit by hand. Cards cite a choice of this protocol "
             "as \"<name> v<version>, rule <key>\", the key being the one shown here.", ""]
    for key, value in data.items():
        if key in ("name", "version", "citations"):
            continue
        lines += [f"## {SECTION_TITLES.get(key, key.replace('_', ' ').capitalize())}", ""]
        lines += _markdown_lines({key: value}, "", 0) + [""]
    lines += [f"## {SECTION_TITLES['citations']}", ""]
    for key, citation in data.get("citations", {}).items():
        link = f" <{citation['url']}>" if citation.get("url") else ""
        lines.append(f"- `{key}`: {citation['text']}.{link}")
    return "\n".join(lines) + "\n"
