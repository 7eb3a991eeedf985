"""Resources out of a FHIR Bundle (any type) or NDJSON text."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .client import is_error_outcome, next_link


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


def parse_json_text(text: str) -> Any:
    """A JSON document, or NDJSON (one resource per line) as a list of resources."""
    stripped = text.strip()
    if not stripped:
        raise BundleError("the file is empty")
    try:
        return json.loads(stripped)
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


def parse_resources_text(text: str) -> list[dict]:
    """The resources of a JSON Bundle/resource, or of NDJSON (one resource per line)."""
    data = parse_json_text(text)
    return data if isinstance(data, list) else resources_in(data)


@dataclass
class SearchContents:
    """What a search result (or any Bundle) holds for the reading: its resources, whether an entry
    is an error OperationOutcome (the search failed), and a next page that was not read. Outcomes
    of severity information or warning (Epic's "no results") are not resources and not failures."""

    resources: list[dict]
    failed: bool
    next_url: str | None


def search_contents(data: Any) -> SearchContents:
    found = resources_in(data)
    failed = any(r["resourceType"] == "OperationOutcome" and is_error_outcome(r) for r in found)
    next_url = next((url for bundle in _bundles(data) if (url := next_link(bundle))), None)
    return SearchContents([r for r in found if r["resourceType"] != "OperationOutcome"], failed, next_url)


def _bundles(data: Any):
    """The Bundle itself and every Bundle nested in its entries."""
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        yield data
        entries = data.get("entry")
        for entry in entries if isinstance(entries, list) else ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
                yield from _bundles(resource)


def searched_type(bundle: Any) -> str:
    """The resource type a search Bundle's self link searched for; "Bundle" when it does not say."""
    links = bundle.get("link") if isinstance(bundle, dict) else None
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("relation") == "self" and isinstance(link.get("url"), str):
            name = urlsplit(link["url"]).path.rstrip("/").rsplit("/", 1)[-1]
            if name[:1].isupper() and name.isalpha():
                return name
    return "Bundle"
