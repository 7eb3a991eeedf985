"""Where the shipped data folders live, in a source checkout and in an installed wheel.

The wheel maps the top-level ``fhir_profiles/`` and ``cards/`` folders into the package
(``cds_service/fhir_profiles``, ``cds_service/cards``); a source checkout keeps them beside it.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data folder {name!r} not found next to {_PACKAGE}")
