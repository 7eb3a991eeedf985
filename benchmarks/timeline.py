"""How long the SMART timeline takes for 30 days of hourly data, in Debian's Chromium.

    .venv/bin/python benchmarks/timeline.py [--runs 5]

Starts sekmet (``make fhir-server``) with the 30-day chart of benchmarks/timeline_chart.py, the
stand-in EHR of tests/smart_ehr.py, and the app on loopback; launches the app in Chromium
(Playwright, /usr/bin/chromium), then prints one line per measure, each the median of ``--runs``
navigations (Navigation Timing, navigation start to the load event):

- the browser alone: the page the app rendered, served to Chromium from memory (parse, SVG layout,
  paint); this is the "renders in the browser" figure;
- end to end, cold: the first launch (OAuth redirects, token exchange, FHIR reads through the
  stand-in EHR, the engine's grade at each of the ~720 hour ends, rendering), timed once;
- end to end, warm: /smart/timeline again (FHIR reads, hour grades from the app's memo except the
  last hour, rendering), with the server's share (request start to response start).

Not a test: nothing is asserted. Client, app and sekmet share the machine's cores.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).resolve().parent)]

from cds_service.app import create_app  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.smart.timeline import read_chart  # noqa: E402
from smart_ehr import CLIENT_ID, FakeEhr  # noqa: E402
from timeline_chart import HOURS, PATIENT, chart_30_days, transaction  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TIMING = """() => { const n = performance.getEntriesByType('navigation')[0];
  return {total: n.loadEventEnd - n.startTime, server: n.responseStart - n.requestStart,
          size: n.transferSize}; }"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_sekmet(workdir: Path) -> tuple[subprocess.Popen, str]:
    executable = Path(os.environ.get("CRS_CDS_SEKMET") or REPO / ".fhir-venv" / "bin" / "sekmet")
    if not executable.exists():
        sys.exit(f"sekmet-fhir not found at {executable}: run `make fhir-server`")
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    config = workdir / "sekmet.yaml"
    config.write_text(f"base_url: {base}\nhost: 127.0.0.1\nport: {port}\ndata_dir: {workdir / 'data'}\n"
                      "simulator:\n  enabled: false\nlog_inbound: false\n", encoding="utf-8")
    log = open(workdir / "sekmet.log", "wb")
    process = subprocess.Popen([str(executable), "serve"], cwd=workdir, env=dict(os.environ, SEKMET_CONFIG=str(config)),
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/metadata", timeout=1).status_code == 200:
                return process, base
        except requests.RequestException:
            time.sleep(0.1)
    process.terminate()
    sys.exit("sekmet did not start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        sys.exit(f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    now = datetime.now(timezone.utc).replace(microsecond=0)
    resources = chart_30_days(now)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        sekmet, fhir_base = start_sekmet(workdir)
        ehr = server = None
        try:
            answer = requests.post(fhir_base, json=transaction(resources), timeout=300,
                                   headers={"Content-Type": "application/fhir+json"})
            answer.raise_for_status()
            ehr = FakeEhr(fhir_base)
            app = create_app(Settings(feedback_db=str(workdir / "feedback.sqlite3"), auth_enabled=False,
                                      smart_clients={ehr.iss: {"client_id": CLIENT_ID}},
                                      smart_fhir_budget_seconds=120, fhir_timeout_seconds=60))
            server = make_server("127.0.0.1", 0, app, threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_port}"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM,
                                            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                launch = f"{base}/smart/launch?{urlencode({'iss': ehr.iss, 'launch': ehr.launch_for(PATIENT)})}"
                started = time.perf_counter()
                page.goto(launch, timeout=600_000)
                first = time.perf_counter() - started
                html = page.content()
                points = page.locator("g.point").count()
                end_to_end = []
                for _ in range(args.runs):
                    page.goto(f"{base}/smart/timeline", timeout=600_000)
                    end_to_end.append(page.evaluate(TIMING))
                page.route(f"{base}/rendered-copy", lambda route: route.fulfill(body=html, content_type="text/html"))
                browser_only = []
                for _ in range(args.runs):
                    page.goto(f"{base}/rendered-copy")
                    browser_only.append(page.evaluate(TIMING))
                browser.close()
            # The FHIR reading alone, as the page does it (sekmet here runs as one process, so the
            # four searches the page runs in parallel are answered one after another).
            state = app.config["CRS_CDS_SMART"]
            token = next(iter(ehr.tokens))
            reads = []
            for _ in range(args.runs):
                started = time.perf_counter()
                read_chart(ehr.iss, PATIENT, token, datetime.now(timezone.utc), state.site, state.templates,
                           state.fhir_client, state.settings)
                reads.append(time.perf_counter() - started)
        finally:
            if server is not None:
                server.shutdown()
            if ehr is not None:
                ehr.close()
            sekmet.terminate()
            sekmet.wait(timeout=10)

    def median(rows, key):
        return statistics.median(row[key] for row in rows)

    print(f"timeline, 30 days hourly ({len(resources)} resources, {HOURS} h, {points} points, "
          f"{len(html) // 1024} KiB of HTML), median of {args.runs}:")
    print(f"  browser, navigation to load of the rendered page: {median(browser_only, 'total'):.0f} ms")
    print(f"  end to end, cold (first launch: OAuth redirects, token exchange, FHIR reads, every hour graded): "
          f"{first:.2f} s")
    print(f"  end to end, warm (/smart/timeline again: FHIR reads, hour grades remembered): "
          f"{median(end_to_end, 'total') / 1000:.2f} s (server {median(end_to_end, 'server') / 1000:.2f} s, "
          f"of which FHIR reads {statistics.median(reads):.2f} s)")


if __name__ == "__main__":
    main()
