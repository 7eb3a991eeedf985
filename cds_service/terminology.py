"""Code and name lookups, loaded from the FHIR ValueSets in ``fhir_profiles/``.

Every code the engine recognises comes from those files; a site adds its own local codes or names
by dropping ValueSets with the same ``url`` into an extra folder (``extra_dirs``), which are merged
into the shipped ones.

A ValueSet names what it matches in two ways:
- ``compose.include[].concept``: codes (verified ones only); the concept display is the agent name;
- extensions: ``match-name`` (valueString) for a name, or ``match-agent`` (nested ``name``
  strings, the first being the agent) so that brand names count as the same agent as the generic.
Names match case-insensitively as whole words, so ``teclistamab-cqyv`` matches ``teclistamab``
and ``norepinephrine`` never matches ``epinephrine``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from .paths import shipped_dir

PROJECT_SD = "http://crs-cds.org/fhir/StructureDefinition/"
MATCH_NAME = PROJECT_SD + "match-name"
MATCH_AGENT = PROJECT_SD + "match-agent"
VALUESET_BASE = "http://crs-cds.org/fhir/ValueSet/"
IEC_TOXICITY = "http://crs-cds.org/fhir/CodeSystem/iec-toxicity"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"

# Real feeds also name the big terminologies by OID.
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "http://snomed.info/sct/": SNOMED,
    "http://loinc.org/": LOINC,
}


def canonical_system(system: str | None) -> str:
    system = system.strip() if isinstance(system, str) else ""
    return SYSTEM_ALIASES.get(system, system)


def codeable_texts(codeable: Mapping | None) -> list[str]:
    """Every human-readable string in a CodeableConcept: text and each coding display."""
    if not isinstance(codeable, dict):
        return []
    texts = [codeable.get("text")]
    coding = codeable.get("coding")
    texts += [c.get("display") for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []
    return [t for t in texts if isinstance(t, str) and t.strip()]


def codeable_codes(codeable: Mapping | None) -> list[tuple[str, str]]:
    if not isinstance(codeable, dict):
        return []
    coding = codeable.get("coding")
    if not isinstance(coding, list):  # a malformed coding (an object, a number) has no codes
        return []
    return [
        (canonical_system(c.get("system")), str(c.get("code")).strip())
        for c in coding
        if isinstance(c, dict) and c.get("code") is not None
    ]


@dataclass
class Concept:
    """One ValueSet, flattened: codes and names, each mapped to the agent it stands for."""

    id: str
    url: str
    title: str
    codes: dict[tuple[str, str], str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    includes: list[str] = field(default_factory=list)
    _pattern: re.Pattern | None = None

    def pattern(self) -> re.Pattern | None:
        if self._pattern is None and self.names:
            alternatives = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])")
        return self._pattern

    def agent_for_code(self, codes: Iterable[tuple[str, str]]) -> str | None:
        for key in codes:
            if key in self.codes:
                return self.codes[key]
        return None

    def agent_for_text(self, texts: Iterable[str]) -> str | None:
        pattern = self.pattern()
        if pattern is None:
            return None
        for text in texts:
            found = pattern.search(text.lower())
            if found:
                return self.names[found.group(1)]
        return None

    def coding_for(self, agent: str) -> dict:
        """A Coding for an agent: its verified code when the ValueSet has one, else text only."""
        for (system, code), named in self.codes.items():
            if named == agent:
                return {"system": system, "code": code, "display": agent}
        return {"display": agent}

    def match(self, codeable: Mapping | None, extra_texts: Iterable[str] = ()) -> str | None:
        """The agent this CodeableConcept (or free text) names, by code first, then by name."""
        return self.agent_for_code(codeable_codes(codeable)) or self.agent_for_text(
            [*codeable_texts(codeable), *[t for t in extra_texts if isinstance(t, str)]]
        )


class Terminology:
    """All ValueSets by id, with site additions merged in."""

    def __init__(self, concepts: dict[str, Concept], sources: list[str]):
        self.concepts = concepts
        self.sources = sources
        self._indexes: dict[tuple[str, ...], _CategoryIndex] = {}

    def __getitem__(self, valueset_id: str) -> Concept:
        try:
            return self.concepts[valueset_id]
        except KeyError:
            raise KeyError(f"no ValueSet {valueset_id!r} in {self.sources}") from None

    def match(self, valueset_id: str, codeable: Mapping | None, extra_texts: Iterable[str] = ()) -> str | None:
        return self[valueset_id].match(codeable, extra_texts)

    def categories(self, valueset_ids: tuple[str, ...], codeable: Mapping | None,
                   extra_texts: Iterable[str] = ()) -> dict[str, str]:
        """Every listed ValueSet the concept falls in, with the agent it names there: the same
        answer as ``match`` per ValueSet, in one code lookup and one pattern search."""
        index = self._category_index(valueset_ids)
        found: dict[str, str] = {}
        for key in codeable_codes(codeable):
            for valueset, agent in index.codes.get(key, ()):
                found.setdefault(valueset, agent)
        texts = [*codeable_texts(codeable), *[t for t in extra_texts if isinstance(t, str)]]
        missing = [vs for vs in valueset_ids if vs not in found]
        if missing and texts and index.pattern is not None:
            for text in texts:
                for name in index.pattern.findall(text.lower()):
                    for valueset, agent in index.names[name]:
                        found.setdefault(valueset, agent)
        return {vs: found[vs] for vs in valueset_ids if vs in found}

    def _category_index(self, valueset_ids: tuple[str, ...]) -> "_CategoryIndex":
        index = self._indexes.get(valueset_ids)
        if index is None:
            index = self._indexes[valueset_ids] = _CategoryIndex.build([self[vs] for vs in valueset_ids])
        return index

    def has_code(self, valueset_id: str, codeable: Mapping | None) -> bool:
        return self[valueset_id].agent_for_code(codeable_codes(codeable)) is not None

    @classmethod
    def load(cls, extra_dirs: Iterable[str | Path] = ()) -> "Terminology":
        dirs = [shipped_dir("fhir_profiles"), *[Path(d) for d in extra_dirs]]
        by_url: dict[str, Concept] = {}
        for folder in dirs:
            if not folder.is_dir():
                raise FileNotFoundError(f"terminology folder not found: {folder}")
            for path in sorted(folder.glob("ValueSet-*.json")):
                _merge(by_url, _read_valueset(path))
        _resolve_includes(by_url)
        return cls({c.id: c for c in by_url.values()}, [str(d) for d in dirs])


@dataclass
class _CategoryIndex:
    """Several ValueSets merged for one-pass matching: code or name -> [(ValueSet id, agent)]."""

    codes: dict[tuple[str, str], list[tuple[str, str]]]
    names: dict[str, list[tuple[str, str]]]
    pattern: re.Pattern | None

    @classmethod
    def build(cls, concepts: list[Concept]) -> "_CategoryIndex":
        codes: dict[tuple[str, str], list[tuple[str, str]]] = {}
        names: dict[str, list[tuple[str, str]]] = {}
        for concept in concepts:
            for key, agent in concept.codes.items():
                codes.setdefault(key, []).append((concept.id, agent))
            for name, agent in concept.names.items():
                names.setdefault(name, []).append((concept.id, agent))
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])") if names else None
        return cls(codes, names, pattern)


def _read_valueset(path: Path) -> Concept:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON ValueSet ({exc})") from exc
    if data.get("resourceType") != "ValueSet" or not data.get("url"):
        raise ValueError(f"{path}: not a ValueSet with a url")
    concept = Concept(id=data.get("id") or data["url"].rsplit("/", 1)[-1], url=data["url"],
                      title=data.get("title") or data.get("name") or data["url"])
    for ext in data.get("extension") or []:
        if ext.get("url") == MATCH_NAME and isinstance(ext.get("valueString"), str):
            name = ext["valueString"].strip().lower()
            concept.names[name] = name
        elif ext.get("url") == MATCH_AGENT:
            names = [e["valueString"].strip().lower() for e in ext.get("extension") or []
                     if e.get("url") == "name" and isinstance(e.get("valueString"), str)]
            for name in names:
                concept.names[name] = names[0]
    for include in (data.get("compose") or {}).get("include") or []:
        system = canonical_system(include.get("system"))
        for item in include.get("concept") or []:
            agent = (item.get("display") or item["code"]).strip().lower()
            concept.codes[(system, str(item["code"]).strip())] = agent
        concept.includes += include.get("valueSet") or []
    return concept


def _merge(by_url: dict[str, Concept], concept: Concept) -> None:
    existing = by_url.get(concept.url)
    if existing is None:
        by_url[concept.url] = concept
        return
    existing.codes.update(concept.codes)
    existing.names.update(concept.names)
    existing.includes += concept.includes
    existing._pattern = None


def _resolve_includes(by_url: dict[str, Concept]) -> None:
    def flatten(concept: Concept, seen: tuple[str, ...]) -> None:
        for url in concept.includes:
            if url in seen:
                raise ValueError(f"ValueSet include cycle through {url}")
            child = by_url.get(url)
            if child is None:
                raise ValueError(f"ValueSet {concept.url} includes unknown {url}")
            flatten(child, seen + (url,))
            concept.codes.update(child.codes)
            concept.names.update(child.names)
        concept.includes = []
        concept._pattern = None

    for concept in list(by_url.values()):
        flatten(concept, (concept.url,))
    for concept in by_url.values():
        # A code's agent is the generic its display names (so "Levophed" and 7512 are one agent).
        concept.codes = {key: concept.agent_for_text([display]) or display for key, display in concept.codes.items()}


@lru_cache(maxsize=64)
def load_terminology(extra_dirs: tuple[str, ...] = ()) -> Terminology:
    """The terminology for a set of site folders, loaded once per process."""
    return Terminology.load(extra_dirs)
