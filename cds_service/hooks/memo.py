"""The service's one memo: answers that depend on a request's content alone, remembered by it.

The clinical core remembers nothing between calls. The service keeps this one for the commonest
chart open, a patient never given IEC therapy whose EHR sends the same medications every time:
keyed by a digest of the content itself, never by the ids or versions a sender chooses, so no
chart (from this client or another) can answer for a different one.
"""
from __future__ import annotations

import hashlib
import marshal
import threading
from typing import Callable, Generic, TypeVar

Result = TypeVar("Result")


def content_hash(value: object) -> bytes:
    """A digest of a parsed JSON value that differs whenever its content does. marshal writes the
    values exactly (True is not 1, 1 is not 1.0). Format 2: later formats write back-references
    that depend on how many references to a string exist elsewhere, so the same content could hash
    apart. Equal content in another key order gives another digest, which only costs a miss.
    Raises ValueError for what JSON does not hold."""
    return hashlib.blake2b(marshal.dumps(value, 2), digest_size=16).digest()


class ContentMemo(Generic[Result]):
    """A bounded memo of a pure function of one JSON value, keyed by a hash of its content. Past
    ``size`` entries the older half is dropped."""

    def __init__(self, size: int):
        self.size = size
        self.results: dict[bytes, Result] = {}
        self.lock = threading.Lock()

    def __call__(self, value: object, compute: Callable[[object], Result]) -> Result:
        try:
            key = content_hash(value)
        except (TypeError, ValueError, RecursionError):  # content that cannot be hashed
            return compute(value)
        found = self.results.get(key, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        result = compute(value)
        self.results[key] = result
        if len(self.results) > self.size:
            with self.lock:
                for old in list(self.results)[:len(self.results) - self.size // 2]:
                    self.results.pop(old, None)
        return result


_MISSING = object()
