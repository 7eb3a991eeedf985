"""The service's own OpenAPI 3.1 document, served at ``GET /openapi.json``.

``openapi.json`` beside this module is the document as kept in the repository and shipped in the
wheel. Its ``components.schemas`` entries that are only ``{"$ref": "schemas/<name>.json"}`` point at
the JSON Schemas the service validates with (``api.schema_validator``); :func:`openapi_document`
embeds those files there when the document is loaded, so the document and the validation cannot
drift apart (tests/test_openapi.py checks it).

Embedding a schema file as a component changes two things only, both needed because an OpenAPI
document is one JSON document: the file's ``$id`` is left out (an embedded ``$id`` would be a new
base URI that OpenAPI tools do not resolve), and its local references ``#/...`` become
``#/components/schemas/<Name>/...``. :func:`as_schema_file` undoes both. References from the rest of
the document into a file (``schemas/request.json#/$defs/patient-view``) become references into its
component. The repository file is a valid OpenAPI document as it is (its references resolve
relative to its own location); the served one is self-contained.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app

from .. import __version__

OPENAPI_FILE = Path(__file__).with_name("openapi.json")
SCHEMA_DIR = Path(__file__).with_name("schemas")
_FILE_REF_PREFIX = "schemas/"


def load_schema_file(name: str) -> dict:
    """A JSON Schema of ``schemas/`` (``name`` without ``.json``), parsed afresh."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _rebase_refs(node: Any, old: str, new: str) -> Any:
    """``node`` with every ``$ref`` that starts with ``old`` starting with ``new`` instead."""
    if isinstance(node, dict):
        return {key: (new + value[len(old):] if key == "$ref" and isinstance(value, str) and value.startswith(old)
                      else _rebase_refs(value, old, new)) for key, value in node.items()}
    if isinstance(node, list):
        return [_rebase_refs(item, old, new) for item in node]
    return node


def as_component(schema: dict, component: str) -> dict:
    """A schema file made a ``components.schemas`` entry named ``component``."""
    embedded = {key: value for key, value in schema.items() if key != "$id"}
    return _rebase_refs(embedded, "#/", f"#/components/schemas/{component}/")


def as_schema_file(component_schema: dict, component: str, schema_id: str) -> dict:
    """The inverse of :func:`as_component`: the schema file a component was made from."""
    restored = _rebase_refs(component_schema, f"#/components/schemas/{component}/", "#/")
    # "$id" goes back where the files keep it: right after "$schema".
    ordered = {}
    for key, value in restored.items():
        ordered[key] = value
        if key == "$schema":
            ordered["$id"] = schema_id
    ordered.setdefault("$id", schema_id)
    return ordered


def embedded_schema_files(raw: dict) -> dict[str, str]:
    """``{component name: schema file name}`` for the components that are a schema file."""
    found = {}
    for name, schema in raw.get("components", {}).get("schemas", {}).items():
        ref = schema.get("$ref") if isinstance(schema, dict) and set(schema) == {"$ref"} else None
        if isinstance(ref, str) and ref.startswith(_FILE_REF_PREFIX) and ref.endswith(".json"):
            found[name] = ref[len(_FILE_REF_PREFIX):-len(".json")]
    return found


def raw_document() -> dict:
    """``openapi.json`` as kept in the repository (schema files referenced, not embedded)."""
    return json.loads(OPENAPI_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _document() -> dict:
    document = raw_document()
    schemas = document["components"]["schemas"]
    for component, file_name in embedded_schema_files(document).items():
        schemas[component] = as_component(load_schema_file(file_name), component)
        # References into a file from elsewhere in the document ("schemas/request.json#/$defs/x")
        # now point into its component.
        document = _rebase_refs(document, f"{_FILE_REF_PREFIX}{file_name}.json#/",
                                f"#/components/schemas/{component}/")
        schemas = document["components"]["schemas"]
    document["info"]["version"] = __version__
    return document


def openapi_document(external_base_url: str | None = None) -> dict:
    """The self-contained document: every schema file embedded; ``servers`` when the base URL is known.

    Without ``external_base_url`` there is no ``servers`` entry: OpenAPI then takes the server
    the document was fetched from, which is right for this service (its routes sit beside it).
    """
    document = copy.deepcopy(_document())
    if external_base_url:
        document["servers"] = [{"url": external_base_url.rstrip("/")}]
    return document


openapi_blueprint = Blueprint("openapi", __name__)


@openapi_blueprint.get("/openapi.json")
def serve_openapi():
    # Served without client authentication, unlike every CDS Hooks route (the blueprint in api.py):
    # it holds only what the shipped package already publishes (routes, the JSON Schemas, the
    # status codes, the JWT scheme): no patient data, no prefetch templates, no trusted issuers
    # or other configuration. Tools that set up a CDS client (and API gateways, contract tests)
    # read it before they have a token. Discovery, which shows this deployment's services and
    # prefetch templates, stays behind the JWT.
    from .api import json_response

    state = current_app.config["CRS_CDS"]
    return json_response(openapi_document(state.settings.external_base_url))


__all__ = ["OPENAPI_FILE", "as_component", "as_schema_file", "embedded_schema_files", "load_schema_file",
           "openapi_blueprint", "openapi_document", "raw_document"]
