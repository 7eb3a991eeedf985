"""Scale-out and slow clients, on loopback: one command, bounded loops, everything stopped after.

1. Throughput: a mixed workload (benchmarks/scaleout.lua) through nginx (deploy/nginx.conf) with one
   instance of the service behind it, then with two, side by side in one run. Each instance is
   gunicorn with the shipped configuration (1 worker, CRS_CDS_THREADS threads), all sharing one
   private PostgreSQL cluster. wrk reports calls/s and p99.
2. Slowloris: 10 connections sending headers a byte a second while a client makes normal calls one
   after another (each given 10 s); the normal calls' p50/p99 and failures:
   before: the old deployment (gunicorn -w 2 sync workers, no proxy, SQLite);
   after: nginx in front of the two instances.

    .venv/bin/python benchmarks/scaleout.py [--duration 10] [--connections 16] [--slowloris-seconds 15]

Needs root or a user that may run initdb (see tests/servers.py), nginx, wrk and the PostgreSQL 15
server binaries (make scaleout-bench installs them when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from servers import Gunicorn, Nginx, Postgres  # noqa: E402

from cds_service.examples import hook_request  # noqa: E402
from cds_service.scenarios import by_name  # noqa: E402

SERVICE = "/cds-services/crs-icans-assessment"


def write_bodies(folder: Path) -> dict:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    out_of_scope = hook_request(by_name("no-iec-therapy"), now)
    graded = hook_request(by_name("crs3-norepi-vaso"), now)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out_of_scope.json").write_text(json.dumps(out_of_scope))
    (folder / "graded.json").write_text(json.dumps(graded))
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted",
                              "outcomeTimestamp": now.isoformat().replace("+00:00", "Z")}]}
    (folder / "feedback.json").write_text(json.dumps(feedback))
    return graded


def wrk(url: str, bodies: Path, duration: int, connections: int) -> dict:
    env = dict(os.environ, BODIES_DIR=str(bodies))
    run = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
                          str(ROOT / "benchmarks" / "scaleout.lua"), url], capture_output=True, text=True, env=env,
                         timeout=duration + 60)
    out = run.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    to_ms = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": rate, "p50_ms": float(p50.group(1)) * to_ms[p50.group(2)],
            "p99_ms": float(p99.group(1)) * to_ms[p99.group(2)],
            "non_200": int(non_2xx.group(1)) if non_2xx else 0, "socket_errors": errors.group(1) if errors else "none"}


def slowloris(port: int, stop: threading.Event) -> None:
    request = (f"POST {SERVICE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + "X-Padding: " + "a" * 200 + "\r\n").encode()
    while not stop.is_set():  # a new connection whenever the server closes ours
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                for byte in request:
                    if stop.wait(1.0):
                        return
                    sock.send(bytes([byte]))
        except OSError:
            if stop.wait(0.5):
                return


def normal_calls_under_slowloris(base: str, port: int, body: dict, seconds: float) -> dict:
    stop = threading.Event()
    attackers = [threading.Thread(target=slowloris, args=(port, stop), daemon=True) for _ in range(10)]
    for attacker in attackers:
        attacker.start()
    time.sleep(2)  # the slow connections are open before the first normal call
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                ok = requests.post(base + SERVICE, json=body, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            latencies.append((time.monotonic() - started) * 1000)
            failures += not ok
            time.sleep(0.1)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(5)
    latencies.sort()
    return {"calls": len(latencies), "failed": failures, "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per instance")
    parser.add_argument("--rounds", type=int, default=2, help="1-then-2 pairs of wrk runs, alternated")
    parser.add_argument("--slowloris-seconds", type=float, default=15)
    args = parser.parse_args()
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"{tool} is missing: apt-get install -y {tool}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="crs-cds-scaleout-"))
    started: list = []
    try:
        postgres = Postgres()
        started.append(postgres)
        bodies = work / "bodies"
        graded = write_bodies(bodies)
        env = {"CRS_CDS_DATABASE_URL": postgres.url, "CRS_CDS_AUTH_ENABLED": "false", "CRS_CDS_WORKERS": "1",
               "CRS_CDS_THREADS": str(args.threads)}
        instances = [Gunicorn(work, dict(env), f"instance-{n}") for n in (1, 2)]
        started += instances
        one = Nginx(work / "one", [instances[0].base.removeprefix("http://")])
        two = Nginx(work / "two", [i.base.removeprefix("http://") for i in instances])
        started += [one, two]
        for proxy in (one, two):
            wrk(proxy.base + SERVICE, bodies, 2, args.connections)  # warm-up
        print(f"## Mixed workload through nginx, wrk -t2 -c{args.connections} -d{args.duration}s "
              f"(6 out-of-scope : 3 graded : 1 feedback), {args.threads} threads per instance\n")
        print("| Round | Behind nginx | calls/s | p50 ms | p99 ms | non-200 | socket errors |")
        print("|---|---|---|---|---|---|---|")
        ratios = []
        for round_ in range(1, args.rounds + 1):
            results = {}
            for label, proxy in (("1 instance", one), ("2 instances", two)):
                r = results[label] = wrk(proxy.base + SERVICE, bodies, args.duration, args.connections)
                print(f"| {round_} | {label} | {r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                      f"{r['non_200']} | {r['socket_errors']} |", flush=True)
            ratios.append(results["2 instances"]["rate"] / results["1 instance"]["rate"])
        print(f"\n2 instances / 1 instance, calls/s by round: {', '.join(f'{r:.2f}x' for r in ratios)}\n")

        old = Gunicorn(work, {"CRS_CDS_AUTH_ENABLED": "false", "CRS_CDS_FEEDBACK_DB": str(work / "old.sqlite3"),
                              "PROMETHEUS_MULTIPROC_DIR": ""}, "old-sync",
                       args=("-w", "2", "-k", "sync", "-b", "{bind}", "cds_service.wsgi:app"))
        started.append(old)
        before = normal_calls_under_slowloris(old.base, int(old.base.rsplit(":", 1)[1]), graded,
                                              args.slowloris_seconds)
        after = normal_calls_under_slowloris(two.base, two.port, graded, args.slowloris_seconds)
        print(f"## Normal calls under slowloris (10 connections, headers at 1 byte/s), {args.slowloris_seconds:g} s, "
              "one call at a time, 10 s timeout\n")
        print("| Deployment | calls | failed or timed out | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        print(f"| before: gunicorn -w 2 sync, no proxy | {before['calls']} | {before['failed']} | "
              f"{before['p50_ms']:.0f} | {before['p99_ms']:.0f} |")
        print(f"| after: nginx + 2 instances (gthread) | {after['calls']} | {after['failed']} | "
              f"{after['p50_ms']:.0f} | {after['p99_ms']:.0f} |")
        return 0
    finally:
        for server in reversed(started):
            server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
