"""CDS Hooks feedback, stored in SQLite, and a report of it by card topic.

Two kinds of rows are kept:

* ``card_topic``: which card uuid had which topic (card type), written by ``remember_cards`` on the
  hook-call path. That call only queues the rows; one background writer thread per process writes
  them in batches, so a hook call never waits on the disk.
* ``feedback`` (+ ``feedback_reason``): each feedback item, written synchronously in one transaction
  by ``record_feedback``. Clients may send the same feedback more than once (spec 1.6); a UNIQUE
  index with ``INSERT OR IGNORE`` turns repeats into counted duplicates.

The topic of a feedback item is looked up when the report is made, so feedback that arrives before
its card's topic row has been written still lands in the right group.

Connections are opened per operation (and one for the writer thread), WAL mode lets readers and one
writer work at once, and ``timeout=`` makes a writer wait for another process's lock instead of
failing. That is what makes one database file usable from several threads and gunicorn workers.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("crs_cds.feedback")

SCHEMA_VERSION = 1
MAX_COMMENT_CHARS = 500
BATCH_ROWS = 200            # the writer writes when this many card rows are waiting ...
BATCH_DELAY_SECONDS = 0.5   # ... or when the oldest waiting row is this old
MAX_PENDING_ROWS = 50_000   # past this, card rows are dropped (and logged) rather than held in memory
WRITE_ATTEMPTS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS card_topic (
    service_id    TEXT NOT NULL,
    card_uuid     TEXT NOT NULL,
    topic         TEXT NOT NULL,
    hook_instance TEXT,
    seen_at       TEXT NOT NULL,
    PRIMARY KEY (service_id, card_uuid)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS feedback (
    id                   INTEGER PRIMARY KEY,
    service_id           TEXT NOT NULL,
    card                 TEXT NOT NULL,
    outcome              TEXT NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
    outcome_timestamp    TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,   -- JSON array of suggestion uuids, sorted
    reason_key           TEXT NOT NULL,   -- JSON array of [system, code], sorted ('[]' when none)
    user_comment         TEXT,            -- at most MAX_COMMENT_CHARS characters
    received_at          TEXT NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS feedback_once
    ON feedback (service_id, card, outcome, outcome_timestamp, accepted_suggestions, reason_key);

CREATE TABLE IF NOT EXISTS feedback_reason (
    feedback_id INTEGER NOT NULL REFERENCES feedback (id),
    system      TEXT NOT NULL,            -- '' when the client sent no system
    code        TEXT NOT NULL,
    display     TEXT,
    PRIMARY KEY (feedback_id, system, code)
) WITHOUT ROWID;
"""


class FeedbackError(Exception):
    """A feedback database that cannot be used; the message is one line for a person."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Stores alive in this process, so a fork (gunicorn --preload) can give each child a fresh writer.
_STORES: "weakref.WeakSet[FeedbackStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit(ref: "weakref.ref[FeedbackStore]") -> None:
    store = ref()
    if store is not None:
        store.close()


class FeedbackStore:
    """Feedback and card topics in one SQLite file. Safe to share between threads and processes."""

    def __init__(self, path: str, *, timeout: float = 10.0):
        if not path or str(path) == ":memory:" or str(path).startswith("file::memory:"):
            raise FeedbackError("the feedback database must be a file (connections are opened per operation)")
        self.path = str(path)
        self.timeout = timeout
        self._init_schema()
        self._init_writer_state()
        self._closed = False
        _STORES.add(self)
        atexit.register(_close_at_exit, weakref.ref(self))

    # ----------------------------------------------------------------- connections and schema

    def _connect(self, *, synchronous: str = "FULL") -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every transaction below is explicit.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _init_schema(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise FeedbackError(f"cannot open feedback database {self.path}: {exc}") from None
            try:
                # Switching to WAL needs a moment with no other connection; retry if several
                # workers start at once. Once the file is in WAL mode this is a no-op.
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    conn.execute("ROLLBACK")
                    raise FeedbackError(f"feedback database {self.path} has schema version {version}; "
                                        f"this version of crs-cds knows up to {SCHEMA_VERSION}")
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise FeedbackError(f"cannot prepare feedback database {self.path}: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise FeedbackError(f"cannot prepare feedback database {self.path}: {exc}") from None
            finally:
                conn.close()

    # ----------------------------------------------------------------- card topics (hot path)

    def _init_writer_state(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[str, str, str, str | None, str]] = []
        self._oldest_pending: float | None = None   # monotonic time the oldest waiting row arrived
        self._accepted_rows = 0     # rows ever queued
        self._finished_rows = 0     # rows written (or given up on) by the writer
        self._dropped_rows = 0
        self._flush_requested = False
        self._stopping = False
        self._writer: threading.Thread | None = None

    def _reset_after_fork(self) -> None:
        # In a forked child the parent's writer thread does not exist and the locks may be held.
        # The parent still owns and writes its queued rows, so the child starts empty.
        self._init_writer_state()

    def remember_cards(self, service_id: str, hook_instance: str, cards: list[tuple[str, str]]) -> None:
        """Queue (card uuid, topic code) rows; returns at once, the background writer stores them."""
        if not cards:
            return
        seen_at = _utc_now()
        rows = [(service_id, uuid, topic, hook_instance, seen_at) for uuid, topic in cards]
        with self._cond:
            if self._closed or self._stopping:
                log.warning("feedback store closed; %d card topic rows not recorded", len(rows))
                return
            if len(self._pending) + len(rows) > MAX_PENDING_ROWS:
                self._dropped_rows += len(rows)
                log.warning("card topic queue full (%d rows waiting); %d rows dropped, %d in all",
                            len(self._pending), len(rows), self._dropped_rows)
                return
            was_empty = not self._pending
            self._pending.extend(rows)
            self._accepted_rows += len(rows)
            if was_empty:
                self._oldest_pending = time.monotonic()
            if self._writer is None:
                self._writer = threading.Thread(target=self._run_writer, name="crs-cds-feedback-writer",
                                                daemon=True)
                self._writer.start()
            elif was_empty or len(self._pending) >= BATCH_ROWS:
                self._cond.notify_all()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every card row queued before this call is written. True if that happened in time."""
        with self._cond:
            target = self._accepted_rows
            if self._finished_rows >= target:
                return True
            self._flush_requested = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._finished_rows >= target, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Write what is queued, stop the writer thread. Safe to call more than once."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout)
            if writer.is_alive():
                log.warning("feedback writer did not finish within %s s; queued card topics may be lost", timeout)

    def _next_batch(self) -> list[tuple] | None:
        """Block until a batch is due; None when stopping with nothing left."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._pending:
                    due = self._oldest_pending is not None and now - self._oldest_pending >= BATCH_DELAY_SECONDS
                    if due or len(self._pending) >= BATCH_ROWS or self._flush_requested or self._stopping:
                        batch = self._pending[:BATCH_ROWS]
                        del self._pending[:BATCH_ROWS]
                        self._oldest_pending = now if self._pending else None
                        return batch
                    self._cond.wait(self._oldest_pending + BATCH_DELAY_SECONDS - now)
                elif self._stopping:
                    return None
                else:
                    self._cond.wait()

    def _run_writer(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                for attempt in range(1, WRITE_ATTEMPTS + 1):
                    try:
                        if conn is None:
                            # Losing the last card topics on power failure is acceptable; feedback is FULL.
                            conn = self._connect(synchronous="NORMAL")
                        conn.execute("BEGIN IMMEDIATE")
                        conn.executemany("INSERT OR IGNORE INTO card_topic "
                                         "(service_id, card_uuid, topic, hook_instance, seen_at) "
                                         "VALUES (?, ?, ?, ?, ?)", batch)
                        conn.execute("COMMIT")
                        break
                    except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                        if conn is not None:
                            try:
                                conn.close()
                            except sqlite3.Error:
                                pass
                            conn = None
                        if attempt == WRITE_ATTEMPTS:
                            log.exception("cannot write %d card topic rows to %s; dropped", len(batch), self.path)
                            with self._cond:
                                self._dropped_rows += len(batch)
                        else:
                            time.sleep(0.1 * attempt)
                with self._cond:
                    self._finished_rows += len(batch)
                    if not self._pending:
                        self._flush_requested = False
                    self._cond.notify_all()
        finally:
            if conn is not None:
                conn.close()

    # ----------------------------------------------------------------- feedback (synchronous)

    def record_feedback(self, service_id: str, items: list[dict]) -> tuple[int, int]:
        """Store schema-validated feedback items in one transaction; return (stored, duplicates)."""
        received_at = _utc_now()
        prepared = [_prepare(item) for item in items]
        stored = duplicates = 0
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for card, outcome, timestamp, suggestions, reasons, comment in prepared:
                    reason_key = json.dumps(sorted([system, code] for system, code, _ in reasons))
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO feedback (service_id, card, outcome, outcome_timestamp, "
                        "accepted_suggestions, reason_key, user_comment, received_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (service_id, card, outcome, timestamp, json.dumps(suggestions), reason_key,
                         comment, received_at))
                    if cursor.rowcount != 1:
                        duplicates += 1
                        continue
                    stored += 1
                    conn.executemany("INSERT INTO feedback_reason (feedback_id, system, code, display) "
                                     "VALUES (?, ?, ?, ?)",
                                     [(cursor.lastrowid, system, code, display) for system, code, display in reasons])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
        return stored, duplicates

    # ----------------------------------------------------------------- report

    def report(self) -> list[dict]:
        conn = self._connect()
        try:
            return _report(conn)
        finally:
            conn.close()


def _prepare(item: dict) -> tuple[str, str, str, list[str], list[tuple[str, str, str | None]], str | None]:
    suggestions = sorted({s["id"] for s in item.get("acceptedSuggestions") or []
                          if isinstance(s, dict) and isinstance(s.get("id"), str)})
    reasons, comments = _override_reasons(item)
    comment = "\n".join(comments)[:MAX_COMMENT_CHARS] or None
    return item["card"], item["outcome"], item["outcomeTimestamp"], suggestions, reasons, comment


def _override_reasons(item: dict) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(system, code, display) codings and user comments from any of the forms clients send.

    * CDS Hooks 2.0: ``overrideReason: {reason: Coding, userComment}``
    * older Sandbox: ``overrideReason: {code, system}``
    * ``overrideReasons``: a list (or one object) of either of the above, or of bare Codings.
    """
    sources: list[dict] = []
    for key in ("overrideReason", "overrideReasons"):
        value = item.get(key)
        if isinstance(value, dict):
            sources.append(value)
        elif isinstance(value, list):
            sources.extend(v for v in value if isinstance(v, dict))
    reasons: dict[tuple[str, str], str | None] = {}
    comments: list[str] = []
    for source in sources:
        coding = source.get("reason") if isinstance(source.get("reason"), dict) else source
        code = coding.get("code")
        if isinstance(code, str) and code.strip():
            system = coding.get("system") if isinstance(coding.get("system"), str) else ""
            display = coding.get("display") if isinstance(coding.get("display"), str) and coding["display"] else None
            key = (system, code.strip())
            if reasons.get(key) is None:
                reasons[key] = display
        comment = source.get("userComment")
        if isinstance(comment, str) and comment.strip():
            comments.append(comment.strip())
    return [(system, code, display) for (system, code), display in reasons.items()], comments


def _report(conn: sqlite3.Connection) -> list[dict]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for service, topic, outcome, count in conn.execute(
            "SELECT f.service_id, COALESCE(t.topic, 'unknown'), f.outcome, COUNT(*) "
            "FROM feedback f LEFT JOIN card_topic t ON t.service_id = f.service_id AND t.card_uuid = f.card "
            "GROUP BY 1, 2, 3"):
        row = groups.setdefault((service, topic), {"service": service, "topic": topic, "accepted": 0,
                                                   "overridden": 0, "override_reasons": []})
        row[outcome] = count
    for service, topic, system, code, display, count in conn.execute(
            "SELECT f.service_id, COALESCE(t.topic, 'unknown'), r.system, r.code, MAX(r.display), COUNT(*) "
            "FROM feedback_reason r JOIN feedback f ON f.id = r.feedback_id "
            "LEFT JOIN card_topic t ON t.service_id = f.service_id AND t.card_uuid = f.card "
            "GROUP BY 1, 2, 3, 4"):
        groups[(service, topic)]["override_reasons"].append(
            {"code": code, "system": system or None, "display": display, "count": count})
    for row in groups.values():
        row["override_reasons"].sort(key=lambda r: (-r["count"], r["code"], r["system"] or ""))
    return [groups[key] for key in sorted(groups)]


def _reason_label(reason: dict) -> str:
    label = reason["code"]
    if reason.get("display"):
        label += f' "{reason["display"]}"'
    return f"{label} ({reason['count']})"


def format_report(rows: Iterable[dict]) -> str:
    """A plain-text table: service, card topic, accepted, overridden, override reasons."""
    rows = list(rows)
    if not rows:
        return "No feedback recorded."
    header = ("SERVICE", "CARD TOPIC", "ACCEPTED", "OVERRIDDEN", "OVERRIDE REASONS")
    lines = [(row["service"], row["topic"], str(row["accepted"]), str(row["overridden"]),
              ", ".join(_reason_label(r) for r in row["override_reasons"]) or "-") for row in rows]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(4)]

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2].rjust(widths[2]),
                          cells[3].rjust(widths[3]), cells[4]]).rstrip()

    return "\n".join([render(header), render(tuple("-" * len(h) for h in header))] + [render(line) for line in lines])


def read_report(path: str | os.PathLike) -> list[dict]:
    """The report from an existing database, opened read-only (nothing is created or migrated)."""
    file = Path(path)
    if not file.is_file():
        raise FeedbackError(f"no feedback database at {file}")
    try:
        conn = sqlite3.connect(file.resolve().as_uri() + "?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise FeedbackError(f"cannot open feedback database {file}: {exc}") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise FeedbackError(f"{file} is not a crs-cds feedback database")
        if version > SCHEMA_VERSION:
            raise FeedbackError(f"{file} has feedback schema version {version}; "
                                f"this version of crs-cds knows up to {SCHEMA_VERSION}")
        return _report(conn)
    except sqlite3.DatabaseError as exc:
        raise FeedbackError(f"cannot read feedback database {file}: {exc}") from None
    finally:
        conn.close()


def cmd_feedback_report(args) -> int:
    """``crs-cds feedback-report``: ``args.db`` is the database path, ``args.json`` selects JSON output.

    Raises FeedbackError (the caller maps it to its own CLI error) when the file is missing or unusable.
    """
    rows = read_report(args.db)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_report(rows))
    return 0


__all__ = ["FeedbackError", "FeedbackStore", "cmd_feedback_report", "format_report", "read_report"]
