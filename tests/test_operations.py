"""Operations: /healthz, /readyz (the database reachable), /metrics, and a schema prepared by
several processes at once without a failure (the WAL switch race)."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import requests

from cds_service.app import create_app
from cds_service.settings import Settings


def test_readyz_follows_the_database(serve_app, postgres):
    service = serve_app(create_app(Settings(database_url=postgres.url, auth_enabled=False)))
    assert service.get("/healthz").json() == {"status": "ok"}
    assert service.get("/readyz").json() == {"status": "ok", "database": "ok"}
    postgres.close()
    answer = service.get("/readyz")
    assert answer.status_code == 503 and answer.json()["database"] == "unreachable"
    assert service.get("/healthz").status_code == 200  # alive, though not ready


def test_metrics_count_calls_and_refusals(serve_app, tmp_path):
    service = serve_app(create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), auth_enabled=False)))
    before = requests.get(service.base + "/metrics", timeout=10).text
    assert service.post("/cds-services/crs-icans-assessment/feedback", "[1, 2]").status_code == 400
    after = requests.get(service.base + "/metrics", timeout=10).text

    def value(text: str, series: str) -> float:
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    assert value(after, 'crs_cds_refusals_total{reason="not-json"}') == value(before, 'crs_cds_refusals_total{reason="not-json"}') + 1
    series = 'crs_cds_calls_total{outcome="refused",service="feedback",status="400"}'
    assert value(after, series) == value(before, series) + 1


RACE = """
import sys
from cds_service.storage import prepare_database
prepare_database(sys.argv[1])
"""


def test_processes_preparing_a_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    for attempt in range(4):
        path = tmp_path / f"race-{attempt}.sqlite3"
        runs = [subprocess.Popen([sys.executable, "-c", RACE, f"sqlite:///{path}"], stderr=subprocess.PIPE)
                for _ in range(6)]
        errors = [run.communicate(timeout=60)[1].decode() for run in runs]
        assert [run.returncode for run in runs] == [0] * 6, errors
        connection = sqlite3.connect(path)
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [("initial_schema",)]
        connection.close()
