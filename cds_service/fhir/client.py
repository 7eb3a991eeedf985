"""A small FHIR REST client for fetching prefetch queries from an EHR's FHIR server.

All the queries of one hook call are fetched in parallel under one overall time budget. Each key
ends as a :class:`FetchOutcome`: its resources, or ``None`` with a human reason when it failed.
Paging follows ``link[relation=next]`` within page and resource limits; a key cut short is
returned with ``complete=False``.

Security: the bearer token goes only to the origin (scheme, host, port) of the FHIR server base
URL; it never appears in an error text, a log line or an exception message (errors are scrubbed).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote, urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from cds_service.metrics import record_fhir_fetch
from cds_service.settings import Settings

log = logging.getLogger(__name__)

MAX_WORKERS = 8
_CHUNK = 64 * 1024
# One answer, decoded. A page of even 5000 resources is far smaller; past this, the server is
# broken or hostile, and holding (then parsing) all of it could exhaust the process's memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# Characters left as they are in a relative query; everything else is percent-encoded.
_PATH_SAFE = "$:@!*'(),;=-._~"
_NAME_SAFE = ":.-_~"
_VALUE_SAFE = ":/,@!$'()*;?-._~"


@dataclass
class FetchOutcome:
    """What one key gave. ``resources is None`` means failed; ``complete`` False means cut short."""

    key: str
    resources: list[dict] | None
    error: str | None
    complete: bool
    pages: int
    seconds: float

    @property
    def failed(self) -> bool:
        return self.resources is None


class _FetchError(Exception):
    """A reason a request could not give a usable page (message is safe: no token, no URL)."""


def resource_type_of(query: str) -> str:
    """The resource type a relative query is about: the part before ``?`` or ``/``."""
    head = query.split("?", 1)[0]
    return head.split("/", 1)[0]


def encode_query(query: str) -> str:
    """A relative query made URL-safe: ``|``, spaces, non-ASCII... percent-encoded.

    Existing escapes are kept (decoded then encoded again). A raw ``+`` is taken literally
    (``%2B``), as in a time zone offset; ``&`` and the first ``=`` of each part stay delimiters.
    """
    path, sep, params = query.partition("?")
    path = "/".join(quote(unquote(segment), safe=_PATH_SAFE) for segment in path.split("/"))
    if not sep:
        return path
    parts = []
    for part in params.split("&"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        parts.append(quote(unquote(name), safe=_NAME_SAFE) + eq + quote(unquote(value), safe=_VALUE_SAFE))
    return path + "?" + "&".join(parts)


def join_url(base_url: str, query: str) -> str:
    """``base_url.rstrip('/') + '/' + query`` with the query encoded; absolute URLs pass through."""
    if _is_absolute(query):
        return query
    return base_url.rstrip("/") + "/" + encode_query(query.lstrip("/"))


def origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _is_absolute(query: str) -> bool:
    return query.lower().startswith(("http://", "https://"))


def _kind_and_description(base_url: str, query: str) -> tuple[str, str, str]:
    """("read" | "search" | "operation", resource type, "Observation search")."""
    relative = query
    if _is_absolute(query):
        base = base_url.rstrip("/") + "/"
        relative = query[len(base):] if query.startswith(base) else ""
    path = relative.split("?", 1)[0].strip("/")
    segments = [s for s in path.split("/") if s]
    rtype = segments[0] if segments else "FHIR"
    if not relative:
        return "search", rtype, "FHIR page"
    if any(s.startswith("$") for s in segments):
        return "operation", rtype, f"{rtype} operation"
    is_read = "?" not in relative and (
        (len(segments) == 2 and not segments[1].startswith("_"))
        or (len(segments) == 4 and segments[2] == "_history")
    )
    if is_read:
        return "read", rtype, f"{rtype} read"
    return "search", rtype, f"{rtype} search"


def _scrub(text: str | None, token: str | None) -> str | None:
    if text and token and token in text:
        return text.replace(token, "[redacted]")
    return text


def is_error_outcome(outcome: dict) -> bool:
    """An OperationOutcome that reports an error (severity error or fatal)."""
    issues = outcome.get("issue")
    if not isinstance(issues, list):
        return False
    return any(isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in issues)


def _issue_codes(outcome: dict) -> str:
    codes = sorted({i.get("code") for i in outcome.get("issue") or [] if isinstance(i, dict)
                    and i.get("severity") in ("error", "fatal") and isinstance(i.get("code"), str)})
    return f" ({', '.join(codes)})" if codes else ""


def next_link(bundle: dict) -> str | None:
    """The URL of a Bundle's ``link[relation=next]``, if any."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"] or None
    return None


def _read_body(response: requests.Response, deadline: float, description: str) -> bytes:
    """The (decoded) body, read until the deadline and up to ``MAX_RESPONSE_BYTES``.

    ``read1`` returns as soon as any bytes arrive, so the deadline is checked however slowly the
    server sends: a server that drips its answer a byte at a time never trips the read timeout, and
    with ``iter_content`` (which waits for a whole chunk) it would hold this thread, and so a slot
    of the shared pool, long after the hook call has answered.
    """
    too_large = f"FHIR server sent more than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB for {description}"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise _FetchError(too_large)
    read1 = getattr(response.raw, "read1", None)  # urllib3 2
    chunks = (iter(lambda: read1(_CHUNK, decode_content=True), b"") if read1 is not None
              else response.iter_content(_CHUNK))
    parts, size = [], 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _FetchError(too_large)
        if time.monotonic() >= deadline:
            raise _FetchError(f"time budget exhausted while reading {description}")
    return b"".join(parts)


class FhirClient:
    """Fetches relative FHIR queries from a FHIR server, in parallel, within one time budget.

    One client is meant to live as long as the app: it keeps a ``requests.Session`` (connection
    reuse) and a small thread pool (created on first use, re-created after a fork).
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=MAX_WORKERS * 2,
                                                    max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if self._own_session:
            self.session.close()

    def __enter__(self) -> "FhirClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._executor_pid != os.getpid():
                # Threads do not survive a fork (e.g. gunicorn --preload): start a fresh pool.
                self._executor = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="fhir-fetch")
                self._executor_pid = os.getpid()
            return self._executor

    # -- fetching --------------------------------------------------------------------------------

    def fetch(self, base_url: str, queries: dict[str, str], token: str | None,
              budget_seconds: float | None = None,
              enough: dict[str, Callable[[list[dict]], bool]] | None = None) -> dict[str, FetchOutcome]:
        """Fetch every query (relative to ``base_url``) in parallel; returns by the deadline.

        ``enough[key](page)`` True stops paging that key after ``page`` (it holds all that is needed)."""
        enough = enough or {}
        start = time.monotonic()
        budget = self.settings.fhir_budget_seconds if budget_seconds is None else float(budget_seconds)
        deadline = start + max(0.0, budget)
        if not queries:
            return {}
        token = token or None
        pool = self._pool()
        futures: dict[str, Future] = {
            key: pool.submit(self._fetch_key, base_url, key, query, token, start, deadline, enough.get(key))
            for key, query in queries.items()
        }
        wait(list(futures.values()), timeout=max(0.0, deadline - time.monotonic()))
        results: dict[str, FetchOutcome] = {}
        for key, future in futures.items():
            _, _, description = _kind_and_description(base_url, queries[key])
            if future.done() and not future.cancelled():
                try:
                    results[key] = future.result()
                except Exception as exc:  # a bug, not the server: never let it escape as a 200
                    log.error("FHIR fetch of key %s failed unexpectedly: %s", key, type(exc).__name__)
                    results[key] = FetchOutcome(key, None, f"unexpected error ({type(exc).__name__}) "
                                                f"during {description}", False, 0, time.monotonic() - start)
            else:
                future.cancel()  # not started yet: never starts; running: stops at its next check
                results[key] = FetchOutcome(key, None, f"time budget exhausted ({budget:.1f} s) "
                                            f"during {description}", False, 0, time.monotonic() - start)
        record_fhir_fetch(time.monotonic() - start, sum(1 for outcome in results.values() if outcome.failed))
        return results

    def _fetch_key(self, base_url: str, key: str, query: str, token: str | None,
                   start: float, deadline: float, enough: Callable[[list[dict]], bool] | None = None) -> FetchOutcome:
        kind, rtype, description = _kind_and_description(base_url, query)
        settings = self.settings
        origin = origin_of(base_url)
        resources: list[dict] = []
        pages = 0

        def done(complete: bool = True, error: str | None = None) -> FetchOutcome:
            return FetchOutcome(key, resources, _scrub(error, token), complete, pages, time.monotonic() - start)

        def failed(error: str) -> FetchOutcome:
            return FetchOutcome(key, None, _scrub(error, token), False, pages, time.monotonic() - start)

        try:
            url: str | None = join_url(base_url, query)
        except Exception:
            return failed(f"cannot build a URL for {description}")
        if origin_of(url) != origin:
            return failed(f"{description} points to another server than fhirServer; not fetched")

        while url is not None:
            if time.monotonic() >= deadline:
                if pages == 0:
                    return failed(f"time budget exhausted before {description}")
                return done(False, f"time budget exhausted after {pages} page(s) of {description}")
            if pages >= settings.fhir_max_pages:
                return done(False, f"{description} stopped after {pages} pages (page limit)")
            if pages and len(resources) >= settings.fhir_max_resources_per_key:
                return done(False, f"{description} stopped at {len(resources)} resources (resource limit)")
            try:
                body = self._get_json(url, token, deadline, description, read_missing_ok=(kind == "read"))
            except _FetchError as exc:
                if pages == 0:
                    return failed(str(exc))
                return done(False, f"{exc} (page {pages + 1}; earlier pages kept)")
            if body is None:  # 404/410 on a read: the resource is not there
                pages += 1
                return done()

            rtype_answered = body["resourceType"]
            if rtype_answered == "OperationOutcome" and rtype != "OperationOutcome":
                if kind == "operation" and not is_error_outcome(body):
                    pages += 1
                    return done()  # an operation that only had something to say, and no data
                return failed(f"FHIR server answered an OperationOutcome{_issue_codes(body)} for {description}")
            if rtype_answered != "Bundle" or (kind == "read" and rtype == "Bundle"):
                if kind == "search":
                    return failed(f"FHIR server answered a {rtype_answered}, not a Bundle, for {description}")
                if kind == "read" and rtype_answered != rtype:
                    return failed(f"FHIR server answered a {rtype_answered} for {description}")
                pages += 1
                resources.append(body)
                return done()

            entries = body.get("entry") or []
            if not isinstance(entries, list):
                return failed(f"FHIR server sent a Bundle with a malformed entry list for {description}")
            page: list[dict] = []
            for entry in entries:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                    continue
                if resource["resourceType"] == "OperationOutcome":
                    if is_error_outcome(resource):
                        return failed(f"FHIR server reported an error{_issue_codes(resource)} in {description}")
                    continue  # informational/warning outcome (e.g. an ignored search parameter)
                page.append(resource)
            pages += 1
            room = settings.fhir_max_resources_per_key - len(resources)
            if len(page) > room:
                kept = page[:max(0, room)]
                resources.extend(kept)
                if enough is not None and kept and enough(kept):
                    return done()  # newest first, and what was kept already reaches back far enough
                return done(False, f"{description} stopped at {len(resources)} resources (resource limit)")
            resources.extend(page)

            next_url = next_link(body)
            if next_url is None or (enough is not None and enough(page)):
                break
            url = urljoin(url, next_url)
            if origin_of(url) != origin:
                # Never send the bearer token elsewhere; without it the page is of no use either.
                return done(False, f"the next page of {description} is on another server; not followed")
        return done()

    def _get_json(self, url: str, token: str | None, deadline: float, description: str,
                  read_missing_ok: bool) -> dict | None:
        """One GET: the parsed FHIR resource, or None for a missing resource on a read."""
        remaining = deadline - time.monotonic()
        timeout = min(self.settings.fhir_timeout_seconds, remaining)
        if timeout <= 0:
            raise _FetchError(f"time budget exhausted before {description}")
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with self.session.get(url, headers=headers, timeout=(timeout, timeout), stream=True,
                                  allow_redirects=False) as response:
                status = response.status_code
                if read_missing_ok and status in (404, 410):
                    return None
                if status in (401, 403):
                    raise _FetchError(f"FHIR server answered {status} for {description} "
                                      "(access token missing, expired or not authorised)")
                if not 200 <= status < 300:
                    raise _FetchError(f"FHIR server answered {status} for {description}")
                raw = _read_body(response, deadline, description)
        except requests.Timeout:
            raise _FetchError(f"{description} timed out after {timeout:.1f} s") from None
        except requests.ConnectionError as exc:
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):  # a read timeout mid-body
                raise _FetchError(f"{description} timed out after {timeout:.1f} s") from None
            raise _FetchError(f"could not connect to the FHIR server for {description}") from None
        except requests.RequestException as exc:
            raise _FetchError(f"request for {description} failed ({type(exc).__name__})") from None
        except ReadTimeoutError:  # from read1 (urllib3's own exceptions: requests wraps only iter_content)
            raise _FetchError(f"{description} timed out after {timeout:.1f} s") from None
        except Urllib3Error as exc:  # e.g. the connection reset mid-body, a broken gzip stream
            raise _FetchError(f"request for {description} failed ({type(exc).__name__})") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _FetchError(f"FHIR server sent invalid JSON for {description}") from None
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise _FetchError(f"FHIR server sent JSON that is not a FHIR resource for {description}")
        return body
