"""Where a call's own time goes: one workload called in-process through the production WSGI app
(``cds_service.wsgi``, no HTTP server, the call log line written to a file), with parts of the
service taken out one at a time, next to the bare reference app on the same body.

    .venv/bin/python benchmarks/breakdown.py            # workload A, the out-of-scope chart open
    .venv/bin/python benchmarks/breakdown.py --workload B --calls 200

A diagnostic, not the benchmark: no gunicorn, no load generator, and a part "taken out" is
replaced by doing nothing, so the answers are not checked. The rows are medians of rounds that
alternate between the variants, so that a machine slowing down shifts them all alike.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("A", "B", "C"), default="A")
    parser.add_argument("--calls", type=int, default=1500, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    return parser.parse_args(argv)


def environ_for(path: str, body: bytes) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8080",
            "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0)}


def call(app, path: str, body: bytes) -> None:
    statuses = []
    answer = app(environ_for(path, body), lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(answer)
    getattr(answer, "close", lambda: None)()
    if not statuses[0].startswith("200"):
        raise SystemExit(f"the call answered {statuses[0]}")


def microseconds_per_call(app, path: str, body: bytes, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call(app, path, body)
    return (time.perf_counter() - started) / calls * 1e6


@contextmanager
def replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="crs-cds-breakdown-"))
    os.environ.update(CRS_CDS_AUTH_ENABLED="false", CRS_CDS_FEEDBACK_DB=str(folder / "feedback.sqlite3"))
    logging.disable(logging.WARNING)  # start-up's auth-off warnings; INFO, the call line, stays on
    from cds_service.wsgi import app  # the production entry: logging configured, start-up heap frozen
    logging.disable(logging.NOTSET)
    log_file = open(folder / "calls.log", "w", encoding="utf-8")
    logging.getLogger().handlers[0].setStream(log_file)

    import reference_app
    from cds_service.hooks import api
    from workloads import build_workloads

    workload = {w.name: w for w in build_workloads(datetime.now(timezone.utc), "http://127.0.0.1:9/fhir")}[args.workload]
    body = json.dumps(workload.body, separators=(",", ":")).encode()  # as the benchmark sends it
    reference = reference_app.create_app()
    no_parts = {
        "without the call log line": (api, "_log_call", lambda *args: None),
        "without request validation": (api, "validate_hook_request", lambda *args: None),
    }
    if workload.name == "A":  # out of scope: the same empty answer, told without looking
        no_parts["without the scope check (medications key)"] = (api, "out_of_scope", lambda *args: "out of scope")
    timings: dict[str, list[float]] = {"service": [], **{label: [] for label in no_parts}, "reference": []}
    for warm in (app, reference):
        microseconds_per_call(warm, workload.url_path, body, max(20, args.calls // 10))
    for _ in range(args.rounds):
        timings["service"].append(microseconds_per_call(app, workload.url_path, body, args.calls))
        for label, (owner, name, stand_in) in no_parts.items():
            with replaced(owner, name, stand_in):
                timings[label].append(microseconds_per_call(app, workload.url_path, body, args.calls))
        timings["reference"].append(microseconds_per_call(reference, workload.url_path, body, args.calls))

    service = median(timings["service"])
    print(f"workload {workload.name}: {workload.title}; {len(body) / 1024:.1f} KB body; "
          f"median of {args.rounds} rounds of {args.calls} calls, in-process")
    print("| Variant | us per call | Part's cost |\n|---|---:|---:|")
    for label, values in timings.items():
        value = median(values)
        cost = "" if label in ("service", "reference") else f"{service - value:.0f}"
        print(f"| {label} | {value:.0f} | {cost} |")
    print(f"reference / service: {median(timings['reference']) / service:.0%}")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
