"""CDS Hooks feedback and card topics in the service's database (``storage.py``), and a report of
it by card topic.

* ``card_topic``: which card uuid had which topic (card type), written by ``remember_cards`` in
  the hook call, before its answer leaves (the feedback may reach any instance, any time after).
* ``feedback`` (+ ``feedback_reason``): each feedback item, written in one transaction by
  ``record_feedback``. Clients may send the same feedback more than once (spec 1.6); a unique index
  with ``ON CONFLICT DO NOTHING`` turns repeats into counted duplicates.

The topic of a feedback item is looked up when the report is made, so feedback that arrives before
its card's topic row (another instance still answering) still lands in the right group.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from .storage import (StorageError, card_topic, describe_url, feedback, feedback_reason, insert_ignoring_duplicates,
                      make_engine, prepare_database)

log = logging.getLogger("crs_cds.feedback")

MAX_COMMENT_CHARS = 500


class FeedbackError(StorageError):
    """A feedback database that cannot be used; the message is one line for a person."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FeedbackStore:
    """Feedback and card topics: one synchronous write per request, no thread, no queue.

    ``where``: an Engine, a database URL, or a SQLite file path (prepared when given as a URL or path)."""

    def __init__(self, where: Engine | str):
        if isinstance(where, Engine):
            self.engine, self._owned = where, False
        else:
            try:
                prepare_database(str(where) if "://" in str(where) else _file_url(str(where)))
                self.engine = make_engine(str(where))
            except StorageError as exc:
                raise FeedbackError(str(exc)) from None
            self._owned = True
        self._topic_insert = insert_ignoring_duplicates(self.engine, card_topic)
        self._feedback_insert = insert_ignoring_duplicates(self.engine, feedback).returning(feedback.c.id)

    def close(self) -> None:
        if self._owned:
            self.engine.dispose()

    def remember_cards(self, service_id: str, hook_instance: str, cards: list[tuple[str, str]]) -> None:
        """Store (card uuid, topic code) rows now, in one transaction."""
        if not cards:
            return
        seen_at = _utc_now()
        rows = [{"service_id": service_id, "card_uuid": uuid, "topic": topic, "hook_instance": hook_instance,
                 "seen_at": seen_at} for uuid, topic in cards]
        with self.engine.begin() as connection:
            connection.execute(self._topic_insert, rows)

    def record_feedback(self, service_id: str, items: list[dict]) -> tuple[int, int]:
        """Store schema-validated feedback items in one transaction; return (stored, duplicates)."""
        received_at = _utc_now()
        prepared = [_prepare(item) for item in items]
        stored = duplicates = 0
        with self.engine.begin() as connection:
            for card, outcome, timestamp, suggestions, reasons, comment in prepared:
                reason_key = json.dumps(sorted([system, code] for system, code, _ in reasons))
                new_id = connection.execute(self._feedback_insert, {
                    "service_id": service_id, "card": card, "outcome": outcome, "outcome_timestamp": timestamp,
                    "accepted_suggestions": json.dumps(suggestions), "reason_key": reason_key,
                    "user_comment": comment, "received_at": received_at}).scalar()
                if new_id is None:
                    duplicates += 1
                    continue
                stored += 1
                if reasons:
                    connection.execute(feedback_reason.insert(), [
                        {"feedback_id": new_id, "system": system, "code": code, "display": display}
                        for system, code, display in reasons])
        return stored, duplicates

    def report(self) -> list[dict]:
        with self.engine.connect() as connection:
            return _report(connection)


def _file_url(path: str) -> str:
    from .storage import sqlite_url

    return sqlite_url(path)


def _prepare(item: dict) -> tuple[str, str, str, list[str], list[tuple[str, str, str | None]], str | None]:
    suggestions = sorted({s["id"] for s in item.get("acceptedSuggestions") or []
                          if isinstance(s, dict) and isinstance(s.get("id"), str)})
    reasons, comments = _override_reasons(item)
    comment = "\n".join(comments)[:MAX_COMMENT_CHARS] or None
    return item["card"], item["outcome"], item["outcomeTimestamp"], suggestions, reasons, comment


# Epic's acknowledgement reasons built in Epic arrive in an extension object (fhir.epic.com, CDS
# Hooks, Feedback): the category is the code, the display or title its words.
EPIC_REASON = "com.epic.cdshooks.feedback.overrideReason."
EPIC_REASON_CODE = EPIC_REASON + "reasonCategory"


def _override_reasons(item: dict) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(system, code, display) codings and user comments from any of the forms clients send.

    * CDS Hooks 2.0: ``overrideReason: {reason: Coding, userComment}``
    * older Sandbox: ``overrideReason: {code, system}``
    * ``overrideReasons``: a list (or one object, as Epic sends it) of either of the above, or of
      bare Codings;
    * Epic's reasons built in Epic: ``{extension: {"com.epic.cdshooks.feedback.overrideReason.
      reasonCategory": "45", "...reasonDisplay": "Does not meet criteria", "...reasonTitle": ...},
      userComment}``, stored with the extension's name as the system.
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
        for coding in _codings(source):
            code = coding.get("code")
            if isinstance(code, (str, int)) and not isinstance(code, bool) and str(code).strip():
                system = coding.get("system") if isinstance(coding.get("system"), str) else ""
                display = coding.get("display")
                display = display if isinstance(display, str) and display else None
                key = (system, str(code).strip())
                if reasons.get(key) is None:
                    reasons[key] = display
        comment = source.get("userComment")
        if isinstance(comment, str) and comment.strip():
            comments.append(comment.strip())
    return [(system, code, display) for (system, code), display in reasons.items()], comments


def _codings(source: dict) -> list[dict]:
    """The Codings one override reason holds: its ``reason``, itself (a bare Coding), or Epic's extension."""
    reason = source.get("reason")
    codings: list[dict] = [reason if isinstance(reason, dict) else source]
    extension = source.get("extension")
    if isinstance(extension, dict) and EPIC_REASON_CODE in extension:
        words = [extension.get(EPIC_REASON + name) for name in ("reasonDisplay", "reasonTitle")]
        codings.append({"system": EPIC_REASON_CODE, "code": extension[EPIC_REASON_CODE],
                        "display": next((w for w in words if isinstance(w, str) and w.strip()), None)})
    return codings


_GROUPS = text(
    "SELECT f.service_id, COALESCE(t.topic, 'unknown'), f.outcome, COUNT(*) "
    "FROM feedback f LEFT JOIN card_topic t ON t.service_id = f.service_id AND t.card_uuid = f.card "
    "GROUP BY f.service_id, COALESCE(t.topic, 'unknown'), f.outcome")
_REASONS = text(
    "SELECT f.service_id, COALESCE(t.topic, 'unknown'), r.system, r.code, MAX(r.display), COUNT(*) "
    "FROM feedback_reason r JOIN feedback f ON f.id = r.feedback_id "
    "LEFT JOIN card_topic t ON t.service_id = f.service_id AND t.card_uuid = f.card "
    "GROUP BY f.service_id, COALESCE(t.topic, 'unknown'), r.system, r.code")


_COMMENTS = text(
    "SELECT f.service_id, COALESCE(t.topic, 'unknown'), f.user_comment, f.outcome_timestamp "
    "FROM feedback f LEFT JOIN card_topic t ON t.service_id = f.service_id AND t.card_uuid = f.card "
    "WHERE f.user_comment IS NOT NULL ORDER BY f.outcome_timestamp DESC, f.id DESC")
LATEST_COMMENTS = 3  # per card topic, in the report


def _report(connection) -> list[dict]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for service, topic, outcome, count in connection.execute(_GROUPS):
        row = groups.setdefault((service, topic), {"service": service, "topic": topic, "accepted": 0,
                                                   "overridden": 0, "override_reasons": [], "comments": 0,
                                                   "latest_comments": []})
        row[outcome] = count
    for service, topic, system, code, display, count in connection.execute(_REASONS):
        groups[(service, topic)]["override_reasons"].append(
            {"code": code, "system": system or None, "display": display, "count": count})
    for service, topic, comment, at in connection.execute(_COMMENTS):
        row = groups[(service, topic)]
        row["comments"] += 1
        if len(row["latest_comments"]) < LATEST_COMMENTS:
            row["latest_comments"].append({"comment": comment, "outcomeTimestamp": at})
    for row in groups.values():
        row["override_reasons"].sort(key=lambda r: (-r["count"], r["code"], r["system"] or ""))
    return [groups[key] for key in sorted(groups)]


def _reason_label(reason: dict) -> str:
    label = reason["code"]
    if reason.get("display"):
        label += f' "{reason["display"]}"'
    return f"{label} ({reason['count']})"


def _one_line(comment: str, limit: int = 100) -> str:
    words = " ".join(comment.split())
    return words if len(words) <= limit else words[:limit - 1].rstrip() + "…"


def format_report(rows: Iterable[dict]) -> str:
    """A plain-text table: service, card topic, accepted, overridden, override reasons; then the
    users' comments per card topic: how many, and the latest few."""
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

    table = [render(header), render(tuple("-" * len(h) for h in header))] + [render(line) for line in lines]
    commented = [row for row in rows if row.get("comments")]
    if commented:
        table += ["", f"USER COMMENTS (latest {LATEST_COMMENTS} per card topic)"]
        for row in commented:
            table.append(f"{row['service']}  {row['topic']}: {row['comments']} "
                         + ("comment" if row["comments"] == 1 else "comments"))
            table += [f'  {c["outcomeTimestamp"]}  "{_one_line(c["comment"])}"' for c in row["latest_comments"]]
    return "\n".join(table)


def read_report(where: str | os.PathLike) -> list[dict]:
    """The report from an existing database (a SQLite file path or a database URL), read only:
    nothing is created or migrated."""
    where = str(where)
    if "://" in where:
        url, shown = where, describe_url(where)
    else:
        file = Path(where)
        if not file.is_file():
            raise FeedbackError(f"no feedback database at {file}")
        url, shown = f"sqlite:///file:{file.resolve()}?mode=ro&uri=true", str(file)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            tables = set(connection.dialect.get_table_names(connection))
            if not {"feedback", "feedback_reason", "card_topic"} <= tables:
                raise FeedbackError(f"{shown} is not a crs-cds feedback database")
            return _report(connection)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).splitlines()[0]
        raise FeedbackError(f"cannot read feedback database {shown}: {reason}") from None
    finally:
        engine.dispose()


def cmd_feedback_report(args) -> int:
    """``crs-cds feedback-report``: ``args.db`` is the database (path or URL), ``args.json`` selects JSON.

    Raises FeedbackError (the caller maps it to its own CLI error) when the database is missing or unusable.
    """
    rows = read_report(args.db)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_report(rows))
    return 0


__all__ = ["FeedbackError", "FeedbackStore", "cmd_feedback_report", "format_report", "read_report"]
