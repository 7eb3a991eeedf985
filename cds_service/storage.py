"""The service's shared state in one SQL database: SQLite (a file, the embedded default) or
PostgreSQL (``database_url``, for several instances behind a load balancer).

Tables: ``card_topic`` (which card had which topic), ``feedback`` and ``feedback_reason``, and
``seen_jti`` (the JWT replay cache). Every write is one short transaction made by the request that
needs it, before its answer leaves; nothing is queued in memory.

The schema is Alembic's (``cds_service/migrations``): ``prepare_database`` brings a database to the
newest revision, once per start (gunicorn's master does it before forking, see gunicorn_conf.py), and
is safe to run from several processes at once (a write transaction on SQLite, an advisory lock on
PostgreSQL, around Alembic).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (CheckConstraint, Column, Engine, Float, ForeignKey, Index, Integer, MetaData, Table, Text,
                        create_engine, event, text)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

log = logging.getLogger("crs_cds.storage")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_ADVISORY_LOCK = 0x63727363  # "crsc": serialises schema migrations on PostgreSQL

metadata = MetaData()

card_topic = Table(
    "card_topic", metadata,
    Column("service_id", Text, primary_key=True),
    Column("card_uuid", Text, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("hook_instance", Text),
    Column("seen_at", Text, nullable=False),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service_id", Text, nullable=False),
    Column("card", Text, nullable=False),
    Column("outcome", Text, CheckConstraint("outcome IN ('accepted', 'overridden')"), nullable=False),
    Column("outcome_timestamp", Text, nullable=False),
    Column("accepted_suggestions", Text, nullable=False),  # JSON array of suggestion uuids, sorted
    Column("reason_key", Text, nullable=False),            # JSON array of [system, code], sorted
    Column("user_comment", Text),
    Column("received_at", Text, nullable=False),
    Index("feedback_once", "service_id", "card", "outcome", "outcome_timestamp", "accepted_suggestions",
          "reason_key", unique=True),
)

feedback_reason = Table(
    "feedback_reason", metadata,
    Column("feedback_id", Integer, ForeignKey("feedback.id"), primary_key=True),
    Column("system", Text, primary_key=True),   # '' when the client sent no system
    Column("code", Text, primary_key=True),
    Column("display", Text),
)

seen_jti = Table(
    "seen_jti", metadata,
    Column("iss", Text, primary_key=True),
    Column("jti", Text, primary_key=True),
    Column("expires_at", Float, nullable=False),
    Index("seen_jti_expiry", "expires_at"),
)


class StorageError(Exception):
    """A database that cannot be used; the message is one line for a person (no password)."""


def database_url(settings) -> str:
    """``database_url``, else the SQLite file ``feedback_db``."""
    if settings.database_url:
        return settings.database_url
    return sqlite_url(settings.feedback_db)


def sqlite_url(path: str) -> str:
    if not path or str(path) == ":memory:" or str(path).startswith("file::memory:"):
        raise StorageError("the SQLite database must be a file (every worker process opens it)")
    return "sqlite:///" + str(Path(path).resolve())


def describe_url(url: str) -> str:
    """The URL fit for a log line: no password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by its scheme only
        return url.split(":", 1)[0] + ":..."


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    if "://" not in url:  # a bare path: a SQLite file
        url = sqlite_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"database_url cannot be parsed ({type(exc).__name__})") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StorageError("the SQLite database must be a file (every worker process opens it)")
        engine = create_engine(parsed, connect_args={"timeout": 10, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connection(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # transactions below are begun explicitly
            cursor = dbapi_connection.cursor()
            # WAL (set once, by prepare_database) with NORMAL: a commit survives the process; the
            # last ones may be lost on power failure.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):
            # Take the write lock first: a transaction that reads then writes never fails to upgrade.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         pool_recycle=1800, connect_args={"connect_timeout": 5})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def prepare_database(settings_or_url: Any, *, timeout: float = 30.0) -> None:
    """Create or migrate the schema to Alembic's newest revision. Safe from many processes at once."""
    url = settings_or_url if isinstance(settings_or_url, str) else database_url(settings_or_url)
    from alembic.util import CommandError

    engine = make_engine(url, pool_size=1)
    try:
        upgrade(engine, timeout=timeout)
    except CommandError as exc:  # e.g. a revision this version does not know: a newer crs-cds made it
        raise StorageError(f"database {describe_url(str(engine.url))}: unknown schema revision "
                           f"({str(exc).splitlines()[0]}); is it from a newer crs-cds?") from None
    except OperationalError as exc:
        raise StorageError(f"database {describe_url(str(engine.url))} cannot be prepared: "
                           f"{str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__}") from None
    finally:
        engine.dispose()


def upgrade(engine: Engine, *, timeout: float = 30.0) -> None:
    from alembic import command
    from alembic.config import Config

    if logging.getLogger("alembic").level == logging.NOTSET:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # not two INFO lines per worker start
    if is_sqlite(engine):
        _sqlite_wal(engine, timeout)
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, one process at a time
        if not is_sqlite(engine):
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _sqlite_wal(engine: Engine, timeout: float) -> None:
    """Write-ahead logging, set once per file (it persists). Switching needs a moment with no other
    connection: several processes starting at once retry instead of failing."""
    deadline = time.monotonic() + timeout
    while True:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # noqa: BLE001 - sqlite3.OperationalError: database is locked
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise StorageError(f"cannot switch {engine.url.database} to WAL: {exc}") from None
            time.sleep(0.05)
        finally:
            raw.close()


def insert_ignoring_duplicates(engine_or_connection, table: Table):
    """INSERT ... ON CONFLICT DO NOTHING in the database's dialect."""
    if engine_or_connection.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert(table).on_conflict_do_nothing()


class DatabaseReplayCache:
    """Seen ``(iss, jti)`` pairs in the database, shared by every worker and instance using it.

    One transaction: drop the pair if it has expired, insert it unless present. The primary key
    makes the check and the insert one atomic step (a second instance inserting the same pair at the
    same moment waits for the first, then finds it)."""

    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self.clock = clock
        self._next_purge = 0.0
        self._insert = insert_ignoring_duplicates(engine, seen_jti).returning(seen_jti.c.jti)

    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        now = self.clock()
        c = seen_jti.c
        with self.engine.begin() as connection:
            if now >= self._next_purge:
                self._next_purge = now + 60
                connection.execute(seen_jti.delete().where(c.expires_at <= now))
            else:
                connection.execute(seen_jti.delete().where(c.iss == iss, c.jti == jti, c.expires_at <= now))
            inserted = connection.execute(self._insert, {"iss": iss, "jti": jti, "expires_at": expires_at}).first()
        return inserted is not None


def ping(engine: Engine) -> None:
    """Raises when the database cannot be reached (``/readyz``)."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
        connection.rollback()


__all__ = ["DatabaseReplayCache", "StorageError", "database_url", "describe_url", "make_engine", "metadata",
           "ping", "prepare_database", "sqlite_url", "upgrade"]
