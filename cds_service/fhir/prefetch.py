"""Prefetch: render a service's templates, use what the CDS client sent, fetch what is missing.

CDS Hooks 2.0 prefetch rules, key by key (spec-notes 1.3 and pitfall 1):

- key present with a resource or a Bundle: use it (a paginated searchset: fetch the next pages);
- key present and ``null``: the client found no data; that is an answer, not a failure;
- key present with an OperationOutcome (or error outcomes in its Bundle): that key failed at the
  client; fetch it ourselves when we can;
- key absent: the client did not (or could not) run it; fetch it from ``fhirServer`` with the
  ``fhirAuthorization`` bearer token, all missing keys in one parallel call under one budget.

When a *required* key can be had neither way the service must answer 412: ``PreconditionFailed``.
Anything else that fails is recorded as an :class:`Unreadable` so the caller can say so.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Iterable
from urllib.parse import quote

from cds_service.clinical.fhir_read import UnreadableValue, parse_datetime, referenced_medication
from cds_service.clinical.model import Unreadable
from cds_service.errors import PreconditionFailed
from cds_service.fhir.bundle import BundleError, search_contents
from cds_service.fhir.client import FetchOutcome, FhirClient, next_link, resource_type_of

_TOKEN = re.compile(r"\{\{(.*?)\}\}")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}
# Substituted values are percent-encoded; "/" stays so that {{context.userId}} can be a read.
_VALUE_SAFE = "/"


def render_template(template: str, context: dict, user_id: str | None = None) -> str | None:
    """The template with its ``{{...}}`` tokens filled from the context, or None if one cannot be.

    Tokens: ``{{context.<field>}}`` for root-level string/integer context fields, and
    ``{{userPractitionerId}}``, ``{{userPractitionerRoleId}}``, ``{{userPatientId}}``,
    ``{{userRelatedPersonId}}`` from ``context.userId`` (or ``user_id`` when given).
    """
    if not isinstance(template, str):
        return None
    context = context if isinstance(context, dict) else {}
    if user_id is None and isinstance(context.get("userId"), str):
        user_id = context["userId"]
    parts = _template_parts(template)
    if len(parts) == 1:
        return template
    rendered = list(parts)
    for position in range(1, len(parts), 2):  # odd positions are the tokens
        value = _token_value(parts[position].strip(), context, user_id)
        if value is None:
            return None
        rendered[position] = _quoted(value)
    return "".join(rendered)


@lru_cache(maxsize=4096)
def _quoted(value: str) -> str:
    return quote(value, safe=_VALUE_SAFE)


@lru_cache(maxsize=512)
def _template_parts(template: str) -> tuple[str, ...]:
    """Text and tokens alternating (tokens at odd positions), split once per template."""
    return tuple(_TOKEN.split(template))


def _token_value(token: str, context: dict, user_id: str | None) -> str | None:
    if token.startswith("context."):
        name = token[len("context."):]
        if not name or "." in name or "(" in name:
            return None  # only root-level fields are tokens in CDS Hooks 2.0
        value = context.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        value = str(value)
        return value or None
    if token in _USER_TOKENS:
        if not user_id or "/" not in user_id:
            return None
        user_type, _, user_ref_id = user_id.partition("/")
        if user_type != _USER_TOKENS[token] or not user_ref_id or "/" in user_ref_id:
            return None
        return user_ref_id
    return None


@dataclass
class PrefetchResult:
    resources: list[dict] = field(default_factory=list)
    failures: list[Unreadable] = field(default_factory=list)  # one per failed or incomplete key
    sources: dict[str, str] = field(default_factory=dict)     # key -> "prefetch" | "fetched" | "failed"
    fetch_seconds: float = 0.0

    @property
    def failed_keys(self) -> list[str]:
        return [key for key, source in self.sources.items() if source == "failed"]


@dataclass
class _Key:
    name: str
    template: str
    rendered: str | None
    resources: list[dict] = field(default_factory=list)
    source: str = "prefetch"
    failure: str | None = None   # a reason when the key failed or is incomplete
    fetch: str | None = None     # query (relative) or next-page URL (absolute) to fetch
    continuation: bool = False   # ``fetch`` continues a prefetched page
    absent: bool = False         # the client did not send this key at all

    @cached_property
    def resource_type(self) -> str:
        for candidate in (self.rendered, self.template):
            if candidate and "{{" not in resource_type_of(candidate):
                return resource_type_of(candidate) or "unknown"
        return "unknown"


def only_since(query: str, cutoff: datetime) -> str:
    """An Observation search of our own limited to what the rules read: the server sends (and the
    service parses) only ``date >= cutoff``, in one page where paging would have stopped there."""
    if resource_type_of(query) != "Observation" or "?" not in query:
        return query
    return f"{query}&date=ge{cutoff.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def reaches_back(resources: list[dict], cutoff: datetime) -> bool:
    """This page is newest-first and reaches past ``cutoff``: older pages are not needed.

    A server that ignored ``_sort`` gives no such guarantee, so an unsorted page never ends paging."""
    times = []
    for resource in resources:
        period = resource.get("effectivePeriod")
        when = resource.get("effectiveDateTime") or (period.get("start") if isinstance(period, dict) else None)
        try:
            times.append(parse_datetime(when))
        except UnreadableValue:
            return False
    newest_first = all(a >= b for a, b in zip(times, times[1:]))
    return bool(times) and newest_first and times[-1] < cutoff


def resolve_prefetch(templates: dict[str, str], request: dict, client: FhirClient, settings: Any,
                     required: Iterable[str] = frozenset(), server_allowed: bool = True,
                     cutoffs: dict[str, datetime] | None = None) -> PrefetchResult:
    """The resources for a service's prefetch templates, from the request and from fhirServer.

    ``cutoffs``: for newest-first searches, how far back a key's data is needed; a page that
    already reaches past it ends the paging.

    Raises ``PreconditionFailed`` naming the keys when a key in ``required`` was not prefetched
    and there is no FHIR server to fetch it from. A key that was tried and failed (an
    OperationOutcome, a failed fetch) is returned in ``failures`` for the caller to judge.

    ``server_allowed`` False (the caller's allowlist refused ``fhirServer``): no request is made
    and the access token is not used; the prefetch is used alone, as if there were no fhirServer.
    """
    required = set(required)
    prefetch = request.get("prefetch")
    prefetch = prefetch if isinstance(prefetch, dict) else {}
    context = request.get("context") if isinstance(request.get("context"), dict) else {}
    server = request.get("fhirServer")
    server = server.strip() if isinstance(server, str) and server.strip() else None
    authorization = request.get("fhirAuthorization")
    token = authorization.get("access_token") if isinstance(authorization, dict) else None
    token = token if isinstance(token, str) and token else None
    refused = server is not None and not server_allowed
    if refused:
        server, token = None, None
    no_server = ("the fhirServer is not an allowed FHIR server for this client (not contacted)" if refused
                 else "no fhirServer to fetch it from")

    keys = [_Key(name, template, render_template(template, context)) for name, template in templates.items()]
    for key in keys:
        if key.name in prefetch:
            _use_prefetched(key, prefetch[key.name])
            if key.continuation and cutoffs and key.name in cutoffs and reaches_back(key.resources, cutoffs[key.name]):
                key.fetch, key.continuation, key.failure = None, False, None  # the first page is enough
        else:
            key.failure, key.absent = "not prefetched", True
            _plan_fetch(key)

    # What needs the FHIR server, and what cannot be had at all.
    wanted = [key for key in keys if key.fetch is not None]
    if wanted and server is None:
        for key in wanted:
            if not key.continuation:
                key.source = "failed"
            key.failure = f"{key.failure}; {no_server}" if key.continuation else f"{key.failure} and {no_server}"
            key.fetch = None
        wanted = []
    for key in wanted:
        if not key.continuation and cutoffs and key.name in cutoffs:
            key.fetch = only_since(key.fetch, cutoffs[key.name])
    # 412 is for data that could not even be asked for; a source that was tried and failed is
    # passed on as unread, so the grade says "at least N" and names it (decisions.md 7).
    unobtainable = [key for key in keys if key.absent and key.source == "failed" and key.fetch is None
                    and key.name in required]
    if unobtainable:
        raise PreconditionFailed(_precondition_message(unobtainable), expression="prefetch")

    result = PrefetchResult()
    if wanted:
        started = time.monotonic()
        enough = {name: (lambda page, cutoff=cutoff: reaches_back(page, cutoff))
                  for name, cutoff in (cutoffs or {}).items()}
        outcomes = client.fetch(server, {key.name: key.fetch for key in wanted}, token,
                                settings.fhir_budget_seconds, enough)
        result.fetch_seconds = time.monotonic() - started
        for key in wanted:
            _apply_outcome(key, outcomes[key.name], settings)

    for key in keys:
        result.sources[key.name] = key.source
        if key.failure is not None:
            result.failures.append(Unreadable(reference=f"prefetch:{key.name}", reason=key.failure,
                                              source=key.resource_type))
        result.resources += key.resources
    if server is not None:
        _fetch_named_medications(result, client, server, token, settings)
    return result


_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def _fetch_named_medications(result: PrefetchResult, client: FhirClient, server: str, token: str | None,
                             settings: Any) -> None:
    """Medications that administrations name only by reference (``Medication/123``, no display),
    absent from what was gathered: fetched in one search, in what is left of the time budget.
    One that cannot be had leaves only its administrations unreadable (decisions.md 10)."""
    have = {f"Medication/{r.get('id')}" for r in result.resources if r.get("resourceType") == "Medication"}
    wanted = sorted({
        key for r in result.resources if r.get("resourceType") == "MedicationAdministration"
        and not _displayed(r) and (key := referenced_medication(r)) and key not in have
        and _FHIR_ID.match(key.split("/", 1)[1])})
    budget = settings.fhir_budget_seconds - result.fetch_seconds
    if not wanted or budget <= 0:
        return
    started = time.monotonic()
    query = "Medication?_id=" + ",".join(key.split("/", 1)[1] for key in wanted)
    outcome = client.fetch(server, {"referenced medications": query}, token, budget)["referenced medications"]
    result.fetch_seconds += time.monotonic() - started
    result.resources += [r for r in outcome.resources or () if r.get("resourceType") == "Medication"]
    result.sources["referenced medications"] = "fetched" if outcome.resources is not None else "failed"


def _displayed(administration: dict) -> bool:
    reference = administration.get("medicationReference")
    return isinstance(reference, dict) and isinstance(reference.get("display"), str) and bool(reference["display"].strip())


def prefetched_only(templates: dict[str, str], request: dict) -> list[dict] | None:
    """The resources for these templates when the CDS client sent every key whole (present, not an
    error, no further page); else None. Never contacts a FHIR server."""
    prefetch = request.get("prefetch")
    if not isinstance(prefetch, dict):
        return None
    resources = []
    for name, template in templates.items():
        if name not in prefetch:
            return None
        key = _Key(name, template, rendered=None)  # no fetch is planned: the query is never needed
        _use_prefetched(key, prefetch[name])
        if key.failure is not None:
            return None
        resources += key.resources
    return resources


def search_content(value: Any) -> Any:
    """What of a prefetched search result decides what is read from it: a Bundle's entries and its
    next-page link, not its id, meta, total, timestamp or other links, which a server makes anew
    for every search. ``_use_prefetched`` reads the same from either (for a template that does not
    search Bundles themselves)."""
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return value
    next_url = next_link(value)
    return {"resourceType": "Bundle", "entry": value.get("entry"),
            "link": [{"relation": "next", "url": next_url}] if next_url else []}


def _use_prefetched(key: _Key, value: Any) -> None:
    """Take a prefetched value; on a client-side failure plan a fetch instead."""
    if value is None:
        key.resources, key.source, key.failure = [], "prefetch", None
        return
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        key.failure = "prefetched value is not a FHIR resource"
        _plan_fetch(key)
        return
    if value["resourceType"] == "OperationOutcome" and key.resource_type != "OperationOutcome":
        key.failure = "the CDS client's prefetch failed (OperationOutcome)"
        _plan_fetch(key)
        return
    if value["resourceType"] != "Bundle" or key.resource_type == "Bundle":
        key.resources = [value]
        return
    try:
        contents = search_contents(value)
    except BundleError:
        key.failure = "prefetched Bundle is malformed"
        _plan_fetch(key)
        return
    if contents.failed:
        key.failure = "the CDS client's prefetch failed (OperationOutcome in the Bundle)"
        _plan_fetch(key)
        return
    key.resources = contents.resources
    if contents.next_url is not None:
        key.failure = "prefetched Bundle has more pages"
        key.fetch, key.continuation = contents.next_url, True


def _plan_fetch(key: _Key) -> None:
    key.resources, key.source = [], "failed"  # until a fetch gives it
    if key.rendered is None:
        key.failure = f"{key.failure}; the template cannot be filled from the hook context"
        return
    key.fetch, key.continuation = key.rendered, False


def _apply_outcome(key: _Key, outcome: FetchOutcome, settings: Any) -> None:
    if key.continuation:  # key.resources holds the prefetched first page
        if outcome.resources is None:
            key.failure = f"incomplete: further pages could not be fetched ({outcome.error})"
            return
        key.resources = key.resources + outcome.resources
        key.failure = None if outcome.complete else f"incomplete: {outcome.error or 'cut short'}"
        cap = settings.fhir_max_resources_per_key
        if len(key.resources) > cap:
            key.resources = key.resources[:cap]
            key.failure = f"incomplete: stopped at {cap} resources (resource limit)"
        return
    if outcome.resources is None:
        key.resources, key.source = [], "failed"
        key.failure = outcome.error or "the FHIR server fetch failed"
        return
    key.resources, key.source = outcome.resources, "fetched"
    key.failure = None if outcome.complete else f"incomplete: {outcome.error or 'cut short'}"


def _precondition_message(keys: list[_Key]) -> str:
    names = ", ".join(key.name for key in keys)
    reasons = "; ".join(f"{key.name}: {key.failure}" for key in keys)
    return f"required FHIR data could not be obtained for prefetch key(s) {names} ({reasons})"
