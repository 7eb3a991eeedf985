"""Resources out of a FHIR Bundle (any type) or NDJSON text."""
from __future__ import annotations

import json
from typing import Any


class BundleError(ValueError):
    """The input is not a FHIR Bundle, a resource or NDJSON of resources."""


def resources_in(data: Any) -> list[dict]:
    """The resources of a Bundle (collection, searchset, transaction...), or a lone resource."""
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise BundleError("not a FHIR resource: expected a JSON object with a resourceType")
    if data["resourceType"] != "Bundle":
        return [data]
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise BundleError("Bundle.entry must be an array")
    resources = []
    for position, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None:
            continue  # e.g. a DELETE request entry in a transaction
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise BundleError(f"Bundle.entry[{position}].resource is not a FHIR resource")
        resources.extend(resources_in(resource) if resource["resourceType"] == "Bundle" else [resource])
    return resources


def parse_resources_text(text: str) -> list[dict]:
    """A JSON Bundle/resource, or NDJSON (one resource per line)."""
    stripped = text.strip()
    if not stripped:
        raise BundleError("the file is empty")
    try:
        return resources_in(json.loads(stripped))
    except json.JSONDecodeError as whole_error:
        lines = [line for line in stripped.splitlines() if line.strip()]
        if len(lines) < 2:
            raise BundleError(f"not valid JSON: {whole_error.msg} at line {whole_error.lineno}") from None
        resources = []
        for number, line in enumerate(lines, start=1):
            try:
                resources.extend(resources_in(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BundleError(f"NDJSON line {number} is not valid JSON: {exc.msg}") from None
        return resources
