"""The feedback store: a real SQLite file, several instances and threads (PostgreSQL: test_scaleout.py)."""
from __future__ import annotations

import json
import sqlite3
import threading
from types import SimpleNamespace

import pytest


from cds_service import feedback as feedback_module
from cds_service.feedback import FeedbackError, FeedbackStore, cmd_feedback_report, format_report

SERVICE = "crs-icans-grading"
_connect = sqlite3.connect  # the tests' own reads, unaffected when a test patches sqlite3.connect
TS = "2026-11-21T12:00:00.5Z"


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "feedback.sqlite3")


@pytest.fixture
def stores():
    opened: list[FeedbackStore] = []

    def open_store(path: str, **kwargs) -> FeedbackStore:
        store = FeedbackStore(path, **kwargs)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def accepted(card: str, *suggestions: str, ts: str = TS) -> dict:
    return {"card": card, "outcome": "accepted", "outcomeTimestamp": ts,
            "acceptedSuggestions": [{"id": s} for s in suggestions]}


def overridden(card: str, ts: str = TS, **extra) -> dict:
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": ts, **extra}


def by_topic(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["service"], row["topic"]): row for row in rows}


def reasons(row: dict) -> dict[str, int]:
    return {r["code"]: r["count"] for r in row["override_reasons"]}


def card_topic_rows(path: str) -> set[tuple[str, str]]:
    conn = _connect(path)
    try:
        return set(conn.execute("SELECT card_uuid, topic FROM card_topic"))
    finally:
        conn.close()


def test_schema_is_wal_at_the_newest_migration(db, stores):
    stores(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("initial_schema",)]
    conn.close()


def test_feedback_survives_closing_and_reopening(db):
    first = FeedbackStore(db)
    first.remember_cards(SERVICE, "hook-1", [("card-a", "crs-grade"), ("card-b", "icans-grade")])
    assert first.record_feedback(SERVICE, [accepted("card-a", "sugg-1"),
                                           overridden("card-b", overrideReason={"reason": {
                                               "system": "http://example.org/reasons", "code": "not-cart"}})]) == (2, 0)
    first.close()

    second = FeedbackStore(db)
    try:
        rows = by_topic(second.report())
        assert rows[(SERVICE, "crs-grade")]["accepted"] == 1
        assert rows[(SERVICE, "icans-grade")]["overridden"] == 1
        assert reasons(rows[(SERVICE, "icans-grade")]) == {"not-cart": 1}
        # A later instance adding to the same file sees the earlier rows as duplicates.
        assert second.record_feedback(SERVICE, [accepted("card-a", "sugg-1")]) == (0, 1)
    finally:
        second.close()


def test_same_payload_twice_is_a_duplicate(db, stores):
    store = stores(db)
    payload = [accepted("card-a", "s2", "s1"),
               overridden("card-b", overrideReason={"reason": {"system": "sys", "code": "c1"}, "userComment": "x"})]
    assert store.record_feedback(SERVICE, payload) == (2, 0)
    assert store.record_feedback(SERVICE, payload) == (0, 2)
    # Suggestion order does not matter; a repeat inside one request is a duplicate too.
    assert store.record_feedback(SERVICE, [accepted("card-a", "s1", "s2"), accepted("card-c"),
                                           accepted("card-c")]) == (1, 2)


def test_what_makes_feedback_different(db, stores):
    store = stores(db)
    assert store.record_feedback(SERVICE, [overridden("card-a")]) == (1, 0)
    assert store.record_feedback("other-service", [overridden("card-a")]) == (1, 0)
    assert store.record_feedback(SERVICE, [overridden("card-a", ts="2026-11-21T12:05:00Z")]) == (1, 0)
    assert store.record_feedback(SERVICE, [overridden("card-a", overrideReason={
        "reason": {"system": "sys", "code": "c1"}})]) == (1, 0)
    assert store.record_feedback(SERVICE, [overridden("card-a", overrideReason={
        "reason": {"system": "sys", "code": "c2"}})]) == (1, 0)
    assert store.record_feedback(SERVICE, [accepted("card-a", "s1")]) == (1, 0)
    assert store.record_feedback(SERVICE, [accepted("card-a", "s2")]) == (1, 0)
    # Only the comment differs: still the same feedback.
    assert store.record_feedback(SERVICE, [overridden("card-a", overrideReason={
        "reason": {"system": "sys", "code": "c1"}, "userComment": "changed my mind"})]) == (0, 1)


def test_all_override_reason_forms(db, stores):
    store = stores(db)
    store.remember_cards(SERVICE, "hook-1", [(f"card-{i}", "crs-grade") for i in range(6)])
    items = [
        # CDS Hooks 2.0, as the Sandbox sends it (no display).
        overridden("card-0", overrideReason={"reason": {"system": "sys", "code": "patient-declined"}}),
        # With display and comment.
        overridden("card-1", overrideReason={"reason": {"system": "sys", "code": "patient-declined",
                                                        "display": "Patient declined"},
                                             "userComment": "family wants to wait"}),
        # The older Sandbox form.
        overridden("card-2", overrideReason={"code": "not-cart", "system": "sys"}),
        # overrideReasons: a list of either form, and of bare Codings.
        overridden("card-3", overrideReasons=[{"reason": {"system": "sys", "code": "not-cart"}},
                                              {"system": "sys", "code": "already-treated", "display": "Already"}]),
        overridden("card-4", overrideReasons={"reason": {"system": "sys", "code": "already-treated"}}),
        # Overridden without any reason.
        overridden("card-5"),
    ]
    assert store.record_feedback(SERVICE, items) == (6, 0)
    row = by_topic(store.report())[(SERVICE, "crs-grade")]
    assert row["overridden"] == 6 and row["accepted"] == 0
    assert reasons(row) == {"patient-declined": 2, "not-cart": 2, "already-treated": 2}
    displays = {r["code"]: r["display"] for r in row["override_reasons"]}
    assert displays == {"patient-declined": "Patient declined", "not-cart": None, "already-treated": "Already"}
    text = format_report([row])
    assert 'patient-declined "Patient declined" (2)' in text and "not-cart (2)" in text
    assert row["comments"] == 1 and row["latest_comments"] == [{"comment": "family wants to wait",
                                                                 "outcomeTimestamp": TS}]
    assert '"family wants to wait"' in text


def test_epic_reasons_and_comments_are_stored_and_reported(db, stores):
    """Epic sends one object: {reason, userComment}, or the reason built in Epic in an extension."""
    store = stores(db)
    store.remember_cards(SERVICE, "hook-1", [(f"card-{i}", "crs-grade") for i in range(5)])
    items = [
        overridden("card-0", ts="2026-11-21T12:00:01Z", overrideReasons={
            "reason": {"code": "contraindicated", "display": "bad", "system": "http://example.org/override"},
            "userComment": "User Entered Free Text"}),
        overridden("card-1", ts="2026-11-21T12:00:02Z", overrideReasons={
            "extension": {"com.epic.cdshooks.feedback.overrideReason.reasonCategory": "45",
                          "com.epic.cdshooks.feedback.overrideReason.reasonDisplay": "Does not meet criteria",
                          "com.epic.cdshooks.feedback.overrideReason.reasonTitle": "Does not meet criteria"},
            "userComment": "grade already charted\n  by the ICU team"}),
        # The title alone, and a numeric category.
        overridden("card-2", ts="2026-11-21T12:00:03Z", overrideReasons={"extension": {
            "com.epic.cdshooks.feedback.overrideReason.reasonCategory": 45,
            "com.epic.cdshooks.feedback.overrideReason.reasonTitle": "Does not meet criteria"}}),
        overridden("card-3", ts="2026-11-21T12:00:04Z", overrideReasons={"userComment": "third"}),
        overridden("card-4", ts="2026-11-21T12:00:05Z", overrideReasons={"userComment": "fourth"}),
    ]
    assert store.record_feedback(SERVICE, items) == (5, 0)
    row = by_topic(store.report())[(SERVICE, "crs-grade")]
    assert row["override_reasons"] == [
        {"code": "45", "system": "com.epic.cdshooks.feedback.overrideReason.reasonCategory",
         "display": "Does not meet criteria", "count": 2},
        {"code": "contraindicated", "system": "http://example.org/override", "display": "bad", "count": 1}]
    assert row["comments"] == 4
    assert [c["comment"] for c in row["latest_comments"]] == ["fourth", "third",
                                                              "grade already charted\n  by the ICU team"]
    text = format_report([row])
    assert "4 comments" in text and '"grade already charted by the ICU team"' in text
    assert "User Entered Free Text" not in text  # the latest 3 only


def test_long_comments_are_truncated(db, stores):
    store = stores(db)
    store.record_feedback(SERVICE, [overridden("card-a", overrideReason={"userComment": "x" * 5000})])
    conn = sqlite3.connect(db)
    comment, received = conn.execute("SELECT user_comment, received_at FROM feedback").fetchone()
    conn.close()
    assert comment == "x" * feedback_module.MAX_COMMENT_CHARS
    assert received.endswith("Z")


def test_report_groups_by_topic_and_marks_unknown_cards(db, stores):
    store = stores(db)
    store.remember_cards(SERVICE, "hook-1", [("card-a", "crs-grade"), ("card-b", "crs-grade")])
    store.remember_cards(SERVICE, "hook-2", [("card-c", "tocilizumab-dose")])
    store.remember_cards("icans-service", "hook-3", [("card-d", "icans-grade")])
    # Feedback may arrive before the topic rows are written: the topic is joined at report time.
    store.record_feedback(SERVICE, [accepted("card-a", "s1"), overridden("card-b"), accepted("card-c", "s1"),
                                    overridden("card-zzz", overrideReason={"reason": {"system": "s", "code": "r"}})])
    store.record_feedback("icans-service", [overridden("card-d")])
    rows = store.report()
    assert [(r["service"], r["topic"]) for r in rows] == sorted((r["service"], r["topic"]) for r in rows)
    table = by_topic(rows)
    assert (table[(SERVICE, "crs-grade")]["accepted"], table[(SERVICE, "crs-grade")]["overridden"]) == (1, 1)
    assert table[(SERVICE, "tocilizumab-dose")]["accepted"] == 1
    assert table[(SERVICE, "unknown")]["overridden"] == 1
    assert reasons(table[(SERVICE, "unknown")]) == {"r": 1}
    assert table[("icans-service", "icans-grade")]["overridden"] == 1
    assert set(table) == {(SERVICE, "crs-grade"), (SERVICE, "tocilizumab-dose"), (SERVICE, "unknown"),
                          ("icans-service", "icans-grade")}


def test_a_card_uuid_is_looked_up_within_its_service(db, stores):
    store = stores(db)
    store.remember_cards("service-1", "hook-1", [("card-a", "crs-grade")])
    store.record_feedback("service-2", [overridden("card-a")])
    assert by_topic(store.report()).keys() == {("service-2", "unknown")}


def test_card_topics_are_in_the_database_when_remember_cards_returns(db):
    store = FeedbackStore(db)
    for i in range(7):
        store.remember_cards(SERVICE, f"hook-{i}", [(f"card-{i}", "crs-grade")])
        # No queue, no thread: another connection sees the row at once.
        assert (f"card-{i}", "crs-grade") in card_topic_rows(db)
    store.remember_cards(SERVICE, "hook-empty", [])
    store.close()
    store.close()  # idempotent
    assert len(card_topic_rows(db)) == 7


def test_remembering_a_card_twice_keeps_the_first_topic(db, stores):
    store = stores(db)
    store.remember_cards(SERVICE, "hook-1", [("card-a", "crs-grade")])
    store.remember_cards(SERVICE, "hook-1", [("card-a", "crs-grade")])
    assert card_topic_rows(db) == {("card-a", "crs-grade")}


def test_concurrent_feedback_from_threads_and_stores(db, stores):
    shared = stores(db)
    separate = [stores(db) for _ in range(2)]
    errors: list[BaseException] = []
    results: list[tuple[int, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work(n: int) -> None:
        store = shared if n % 2 else separate[n % 4 // 2]
        try:
            start.wait()
            for i in range(25):
                # Every thread sends its own card, plus one card all threads send (duplicates).
                items = [overridden(f"card-{n}-{i}", overrideReason={"reason": {"system": "s", "code": f"r{i % 3}"}}),
                         accepted("card-shared", "s1", ts=f"2026-11-21T12:00:{i:02d}Z")]
                store.remember_cards(SERVICE, f"hook-{n}-{i}", [(f"card-{n}-{i}", "crs-grade")])
                result = store.record_feedback(SERVICE, items)
                with lock:
                    results.append(result)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sum(stored for stored, _ in results) == 8 * 25 + 25
    assert sum(dup for _, dup in results) == 7 * 25
    for store in [shared, *separate]:
        table = by_topic(shared.report())
    assert table[(SERVICE, "crs-grade")]["overridden"] == 200
    assert sum(reasons(table[(SERVICE, "crs-grade")]).values()) == 200
    assert table[(SERVICE, "unknown")]["accepted"] == 25


def test_several_stores_can_create_the_schema_at_once(tmp_path):
    path = str(tmp_path / "race.sqlite3")
    errors: list[BaseException] = []
    made: list[FeedbackStore] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        try:
            start.wait()
            made.append(FeedbackStore(path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(made) == 6
    for store in made:
        store.close()


def test_memory_databases_are_refused():
    with pytest.raises(FeedbackError):
        FeedbackStore(":memory:")


def test_a_newer_schema_is_refused(db, stores):
    stores(db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE alembic_version SET version_num = 'from_a_newer_version'")
    conn.commit()
    conn.close()
    with pytest.raises(FeedbackError, match="schema revision"):
        FeedbackStore(db)


def test_format_report_is_a_readable_table():
    rows = [{"service": SERVICE, "topic": "crs-grade", "accepted": 12, "overridden": 3,
             "override_reasons": [{"code": "not-cart", "system": "s", "display": None, "count": 2},
                                  {"code": "declined", "system": "s", "display": "Patient declined", "count": 1}]},
            {"service": SERVICE, "topic": "unknown", "accepted": 0, "overridden": 1, "override_reasons": []}]
    lines = format_report(rows).splitlines()
    assert lines[0].split() == ["SERVICE", "CARD", "TOPIC", "ACCEPTED", "OVERRIDDEN", "OVERRIDE", "REASONS"]
    assert lines[2].split()[:4] == [SERVICE, "crs-grade", "12", "3"]
    assert lines[2].endswith('not-cart (2), declined "Patient declined" (1)')
    assert lines[3].split() == [SERVICE, "unknown", "0", "1", "-"]
    assert format_report([]) == "No feedback recorded."


def test_cmd_feedback_report(db, stores, capsys, tmp_path):
    store = stores(db)
    store.remember_cards(SERVICE, "hook-1", [("card-a", "crs-grade")])
    store.record_feedback(SERVICE, [overridden("card-a", overrideReason={"reason": {"system": "s", "code": "r1"}})])

    assert cmd_feedback_report(SimpleNamespace(db=db, json=False)) == 0
    out = capsys.readouterr().out
    assert "crs-grade" in out and "r1 (1)" in out

    assert cmd_feedback_report(SimpleNamespace(db=db, json=True)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"service": SERVICE, "topic": "crs-grade", "accepted": 0, "overridden": 1,
                     "override_reasons": [{"code": "r1", "system": "s", "display": None, "count": 1}],
                     "comments": 0, "latest_comments": []}]

    missing = tmp_path / "missing.sqlite3"
    with pytest.raises(FeedbackError, match="no feedback database"):
        cmd_feedback_report(SimpleNamespace(db=str(missing), json=False))
    assert not missing.exists()  # the report never creates a database

    other = tmp_path / "other.sqlite3"
    other.write_text("not a database " * 100)
    with pytest.raises(FeedbackError):
        cmd_feedback_report(SimpleNamespace(db=str(other), json=False))
