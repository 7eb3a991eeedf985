"""The protocol: every window, threshold, dose and limit the rules use, as data.

The default ships as ``default_protocol.json``. A site protocol file (JSON) overrides any value
by key; nested objects merge, anything else replaces. Cards name the protocol and its version.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
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
        """The default protocol, a site file merged over it, then ``overrides``; the result is
        checked against ``protocol.schema.json`` (ProtocolError naming the key and the file)."""
        data = _read(DEFAULT_PROTOCOL_PATH)
        layers: list[tuple[str, Mapping]] = []
        if site_file:
            site = _read(Path(site_file))
            layers.append((str(site_file), site))
            data = _deep_merge(data, site)
        if overrides:
            layers.append(("overrides", overrides))
            data = _deep_merge(data, overrides)
        validate(data, layers)
        return cls(data)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"cannot read protocol file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"protocol file {path} must hold a JSON object")
    return data


SCHEMA_PATH = Path(__file__).with_name("protocol.schema.json")


@lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def _where(path: list, layers: list[tuple[str, Mapping]]) -> str:
    """The file that set the value at ``path``: the last layer holding it, else the default file."""
    for name, layer in reversed(layers):
        node: Any = layer
        for part in path:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            return name
    return str(DEFAULT_PROTOCOL_PATH)


def _key(path: list) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def validate(data: Mapping, layers: list[tuple[str, Mapping]] = ()) -> None:
    """When a protocol has an unknown key, a value of the wrong type or out of range, or names a
    regimen or citation it does not define, then it cannot be used: ProtocolError names the key
    and the file that set it.  Source: the protocol schema shipped in the package."""
    layers = list(layers)
    errors = sorted(_schema_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        error = errors[0]
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            if unknown:
                path = path + [unknown[0]]
                raise ProtocolError(f"protocol file {_where(path, layers)}: unknown key {_key(path)!r}")
        raise ProtocolError(f"protocol file {_where(path, layers)}: key {_key(path)!r}: {error.message}")
    regimens = data["steroid_regimens"]
    references = [(["hlh", "steroid"], data["hlh"]["steroid"])]
    for table in ("crs_management", "icans_management"):
        for grade, row in data[table].items():
            for field in ("steroid", "early_steroid_product_steroid"):
                if row.get(field):
                    references.append(([table, grade, field], row[field]))
    for path, name in references:
        if name not in regimens:
            raise ProtocolError(f"protocol file {_where(path, layers)}: key {_key(path)!r}: no steroid regimen "
                                f"{name!r} in steroid_regimens")
    citations = data["citations"]
    for path, value in _sources(data, []):
        for key in [value] if isinstance(value, str) else value:
            if key not in citations:
                raise ProtocolError(f"protocol file {_where(path, layers)}: key {_key(path)!r}: no citation {key!r} "
                                    "in citations")


def _sources(node: Any, path: list):
    """(path, value) of every citation reference: a ``source`` key or a key ending in ``_source``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "citations":
                continue
            if key == "source" or key.endswith("_source"):
                yield path + [key], value
            else:
                yield from _sources(value, path + [key])
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _sources(item, path + [index])


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
    "concurrent_icans": "Concurrent ICANS: corticosteroids first, no tocilizumab",
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
