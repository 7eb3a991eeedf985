"""``crs-cds codes survey``: which codes a site's charts use, and which of them the service reads.

For onboarding: given a few patients on the site's FHIR server (or an export), list every
Observation and medication code with its count and display, the concept it maps to (the ValueSet
the engine reads it by), and the unmapped ones that look relevant by their name. ``write_valuesets``
turns the relevant unmapped ones into site ValueSet files, to review and drop into
``terminology_dirs``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .clinical.facts import MEDICATION_VALUESETS, OBSERVATION_VALUESETS, STANDARD_SYSTEMS
from .clinical.fhir_read import medication_concept, resource_key
from .terminology import VALUESET_BASE, Terminology, codeable_codes, codeable_texts

# Words in a code's display that suggest a concept the rules read, and the ValueSet a site row with
# that display most likely belongs in (first match wins; reviewed by a person before use).
RELEVANT_WORDS = [
    (r"\btemp", "body-temperature"),
    (r"\bsystolic|\bsbp\b", "systolic-blood-pressure"),
    (r"\bblood pressure\b|\bbp\b", "blood-pressure-panel"),
    (r"\bmean arterial|\bmap\b", None),
    (r"\b(o2|oxygen)\b.*\b(device|delivery|method|mode)\b|\bdelivery device\b", "oxygen-delivery-method"),
    (r"\b(o2|oxygen)\b.*\bflow\b|\bflow rate\b|\blpm\b", "oxygen-flow-rate"),
    (r"\bspo2\b|\bsat(uration)?\b|\boximetry\b", "pulse-oximetry"),
    (r"\bweight\b|\bwt\b", "body-weight"),
    (r"\bferritin\b", "ferritin"),
    (r"\bcrp\b|c-reactive", "c-reactive-protein"),
    (r"\bice\b|encephalopathy", "icans-ice-score"),
    (r"\bcapd\b|pediatric delirium", "icans-capd-score"),
    (r"\bconscious|\barous|\bloc\b|\brass\b", "icans-consciousness"),
    (r"\bseizure", "icans-seizure"),
    (r"\bmotor\b|\bweakness\b", "icans-motor-weakness"),
    (r"\bedema\b|\bintracranial\b|\bicp\b", "icans-cerebral-edema"),
]
# Medication words worth a look when no ValueSet matched them.
RELEVANT_DRUG_WORDS = r"\b(pressor|vaso|phrine|dopamine|car-?t|cel\b|leucel|mab\b|steroid|sone\b|solone\b|tocil|" \
                      r"acetaminophen|paracetamol|ibuprofen|csf|stim)"
# The umbrella ValueSets: a code is written into the specific one below them.
UMBRELLAS = {"iec-therapies", "anti-cytokine-therapies"}


@dataclass
class CodeRow:
    """One code (or, with no code, one text) as found in the charts."""

    resource_type: str
    system: str
    code: str
    display: str
    count: int = 0
    concept: str | None = None      # the ValueSet the engine reads it by
    by_name: bool = False           # matched by its name only: worth adding the code
    guess: str | None = None        # unmapped but relevant: the ValueSet it likely belongs in
    patients: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"{self.system}|{self.code}" if self.code else f"(text) {self.display}"


def survey(resources: Iterable[dict], terminology: Terminology) -> list[CodeRow]:
    """Every Observation code and every medication of the resources, counted and mapped."""
    resources = [r for r in resources if isinstance(r, dict)]
    medications = {resource_key(r): r for r in resources if r.get("resourceType") == "Medication"}
    rows: dict[tuple, CodeRow] = {}
    for resource in resources:
        kind = resource.get("resourceType")
        if kind == "Observation":
            codeable = resource.get("code")
        elif kind in ("MedicationAdministration", "MedicationRequest"):
            codeable, texts = medication_concept(resource, medications)
            if codeable is None and texts:
                codeable = {"text": texts[0]}
        else:
            continue
        for row in _rows_of(kind, codeable, terminology):
            key = (row.resource_type, row.system, row.code, row.display if not row.code else "")
            found = rows.setdefault(key, row)
            found.count += 1
            subject = resource.get("subject")
            if isinstance(subject, dict) and isinstance(subject.get("reference"), str):
                found.patients.add(subject["reference"])
    return sorted(rows.values(), key=lambda r: (r.resource_type, r.concept is None, -r.count, r.label))


def _rows_of(kind: str, codeable: object, terminology: Terminology) -> list[CodeRow]:
    texts = codeable_texts(codeable)
    display = texts[-1] if texts else ""
    codes = codeable_codes(codeable)
    if not codes:
        return [_mapped(CodeRow(_group(kind), "", "", display), kind, None, texts, terminology)]
    coding = codeable.get("coding") if isinstance(codeable, dict) else []
    displays = {(c.get("system"), str(c.get("code")).strip()): c.get("display") for c in coding
                if isinstance(c, dict)} if isinstance(coding, list) else {}
    rows = []
    for system, code in codes:
        own = displays.get((system, code)) or display
        rows.append(_mapped(CodeRow(_group(kind), system, code, own or ""), kind, (system, code), texts, terminology))
    return rows


def _group(kind: str) -> str:
    return "Observation" if kind == "Observation" else "Medication"


def _mapped(row: CodeRow, kind: str, code: tuple[str, str] | None, texts: list[str],
            terminology: Terminology) -> CodeRow:
    valuesets = [vs for _, vs in OBSERVATION_VALUESETS] + ["pulse-oximetry"] if kind == "Observation" \
        else [vs for vs in MEDICATION_VALUESETS if vs not in UMBRELLAS]
    for valueset in valuesets:
        concept = terminology[valueset]
        if code is not None and code in concept.codes:
            row.concept = valueset
            return row
    standard_code = code is not None and code[0] in STANDARD_SYSTEMS
    for valueset in valuesets if not (kind == "Observation" and standard_code) else ():  # as the engine reads
        if terminology[valueset].agent_for_text(texts):
            row.concept, row.by_name = valueset, True
            return row
    words = " ".join(texts).lower()
    if kind == "Observation":
        row.guess = next((vs or "(not read by the rules)" for pattern, vs in RELEVANT_WORDS
                          if re.search(pattern, words)), None)
    elif re.search(RELEVANT_DRUG_WORDS, words):
        row.guess = "(review: a drug the rules may read)"
    return row


def report(rows: list[CodeRow]) -> str:
    """The survey as text: mapped codes, then the unmapped ones worth a look, then the rest."""
    lines = []
    for group in ("Observation", "Medication"):
        mine = [r for r in rows if r.resource_type == group]
        lines.append(f"{group} codes: {len(mine)} ({sum(r.count for r in mine)} resources)")
        sections = [
            ("read by the service", [r for r in mine if r.concept]),
            ("not read, relevant by name: review", [r for r in mine if not r.concept and r.guess]),
            ("not read", [r for r in mine if not r.concept and not r.guess]),
        ]
        for title, chosen in sections:
            if not chosen:
                continue
            lines.append(f"  {title}:")
            for row in chosen:
                by_name = " (by name; add the code)" if row.code else " (by name)"
                where = row.concept + (by_name if row.by_name else "") if row.concept \
                    else (f"-> {row.guess}" if row.guess else "")
                lines.append(f"    {row.count:6d}  {row.label:55}  {row.display[:40]:40}  {where}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_valuesets(rows: list[CodeRow], folder: Path) -> list[Path]:
    """One site ValueSet file per shipped ValueSet that gains codes: the relevant unmapped
    Observation codes (by their guessed concept) and the codes of drugs matched by name only."""
    additions: dict[str, list[CodeRow]] = {}
    for row in rows:
        if not row.code:
            continue
        if row.concept and row.by_name:
            additions.setdefault(row.concept, []).append(row)
        elif not row.concept and row.guess and not row.guess.startswith("("):
            additions.setdefault(row.guess, []).append(row)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for valueset, chosen in sorted(additions.items()):
        includes: dict[str, list[dict]] = {}
        for row in chosen:
            includes.setdefault(row.system, []).append({"code": row.code, "display": row.display or row.code})
        resource = {
            "resourceType": "ValueSet", "id": f"site-{valueset}", "url": f"{VALUESET_BASE}{valueset}",
            "status": "draft",
            "description": "Site codes found by crs-cds codes survey: REVIEW each one before use (is this row "
                           "really this concept, in these units?), then put this file in a terminology_dirs folder.",
            "compose": {"include": [{"system": system, "concept": concepts}
                                    for system, concepts in sorted(includes.items())]},
        }
        path = folder / f"ValueSet-site-{valueset}.json"
        path.write_text(json.dumps(resource, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def fetch_patients(server: str, token: str | None, patients: list[str], settings) -> tuple[list[dict], list[str]]:
    """Every Observation, MedicationAdministration (with its Medications) and MedicationRequest of
    these patients, all pages; and the queries that failed, with why."""
    from .fhir.client import FhirClient

    queries = {}
    for patient in patients:
        queries[f"{patient} Observation"] = f"Observation?patient={patient}&_count=200"
        queries[f"{patient} MedicationAdministration"] = (
            f"MedicationAdministration?patient={patient}&_include=MedicationAdministration:medication&_count=200")
        queries[f"{patient} MedicationRequest"] = f"MedicationRequest?patient={patient}&_count=200"
    resources, failures = [], []
    with FhirClient(settings) as client:
        for name, outcome in client.fetch(server, queries, token, settings.fhir_budget_seconds).items():
            if outcome.resources is None or not outcome.complete:
                failures.append(f"{name}: {outcome.error or 'cut short'}")
            resources += outcome.resources or []
    return resources, failures
