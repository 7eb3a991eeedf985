"""Workload D's own share: one patient-view call without prefetch, against a bare parallel
fetch-and-parse of the same six queries, both in this process against the same sekmet.

    .venv/bin/python benchmarks/fetch_share.py [--rounds 12]

The call goes through ``cds_service.wsgi:app`` (the Flask test client, no HTTP server in front);
the bare fetch GETs each query exactly as the service sends it (``run.service_queries``) from six
threads and parses the answers with ``json``. Rounds alternate; the medians are printed. What the
call costs beyond the fetch is the service's own share of D; the rest is sekmet answering.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="crs-cds-fetch-share-"))
    os.environ.update(CRS_CDS_AUTH_ENABLED="false", CRS_CDS_FEEDBACK_DB=str(folder / "feedback.sqlite3"))
    logging.disable(logging.WARNING)  # start-up's auth-off warnings
    import requests

    import run
    import workloads
    from cds_service.wsgi import app

    logging.getLogger().handlers[0].setStream(open(folder / "calls.log", "w", encoding="utf-8"))
    server, base_url = run.start_sekmet(run.ensure_sekmet(), folder)
    try:
        server.wait_ready()
        now = datetime.now(timezone.utc)
        run.load_into_fhir(base_url, workloads.icu_transaction(now))
        workload = {w.name: w for w in workloads.build_workloads(now, base_url)}["D"]
        urls = list(run.service_queries(base_url, workload.body["context"], now).values())
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=len(urls)))
        client = app.test_client()

        def fetch(url: str) -> dict:
            return session.get(url, headers={"Accept": "application/fhir+json"}, timeout=30).json()

        def call() -> None:
            answer = client.post(workload.url_path, json=workload.body)
            if answer.status_code != 200 or "could not be read" in answer.get_data(as_text=True):
                raise SystemExit(f"the call answered {answer.status_code}: {answer.get_data(as_text=True)[:300]}")

        call(), call()  # the first open reads and validates every resource once
        bare, whole = [], []
        with ThreadPoolExecutor(len(urls)) as pool:
            for _ in range(args.rounds):
                started = time.perf_counter()
                list(pool.map(fetch, urls))
                bare.append(time.perf_counter() - started)
                started = time.perf_counter()
                call()
                whole.append(time.perf_counter() - started)
        print(f"workload D, {len(urls)} queries, median of {args.rounds} rounds: bare parallel fetch and parse "
              f"{median(bare) * 1000:.0f} ms; the service's call {median(whole) * 1000:.0f} ms; "
              f"its own share {(median(whole) - median(bare)) * 1000:.0f} ms")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
