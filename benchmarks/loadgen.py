"""HTTP load generators behind one interface: wrk (preferred), hey, or a pure-Python fallback.

``generator.run(url, body_path, connections, seconds, marker)`` POSTs one JSON body for a fixed time
and returns a :class:`LoadResult`. Every generator counts answers that are not 200; wrk and the
Python generator also count 200 answers whose body holds ``marker`` (a degraded answer).

A ``body_path`` ending in ``.list`` is a rotation: body files, one a line, sent in turn; wherever a
body holds CALL_TAG, each call writes a value of its own there (``call_tags``), so that no two calls
send the same ids. wrk (post.lua) and the Python generator do both; hey sends the first body only.
"""
from __future__ import annotations

import http.client
import itertools
import os
import re
import secrets
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

WRK_SCRIPT = Path(__file__).with_name("post.lua")
CALL_TAG = "CALLTAG0"   # in a rotation's bodies: replaced at each call (letters and digits, valid in FHIR ids)
_RUNS = itertools.count(1)
_PROCESS = secrets.token_hex(2)


def run_seed() -> str:
    """A prefix no other load run of this benchmark uses, for its calls' tags."""
    return f"r{_PROCESS}x{next(_RUNS)}"


def is_rotation(body_path: Path) -> bool:
    return body_path.suffix == ".list"


def rotation_paths(body_path: Path) -> list[Path]:
    return [Path(line) for line in body_path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    bad_status: int          # answers other than 200
    degraded: int | None     # 200 answers holding the marker (None: not checked)
    socket_errors: int
    statuses: dict[int, int] = field(default_factory=dict)  # the answers other than 200, by status

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def status_text(self) -> str:
        return ", ".join(f"{n} × {code}" for code, n in sorted(self.statuses.items()))


class LoadGenerator:
    name = "?"

    def describe(self) -> str:
        return self.name

    def run(self, url: str, body_path: Path, connections: int, seconds: float,
            marker: str | None = None) -> LoadResult:
        raise NotImplementedError


def _run_tool(command: list[str], env: dict | None, seconds: float) -> str:
    """Run a load tool in its own process group; kill it if this script is interrupted."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds + 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed (exit {process.returncode}):\n{output[-2000:]}")
    return output


class Wrk(LoadGenerator):
    """wrk with post.lua: the script sets the body, counts statuses and the marker, and prints one
    ``BENCH key=value ...`` line with the totals and percentiles (in microseconds)."""

    name = "wrk"

    def describe(self) -> str:
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        return version.split(" [")[0].strip() or "wrk"

    def run(self, url, body_path, connections, seconds, marker=None):
        threads = min(2, connections)
        env = dict(os.environ, BENCH_BODY=str(body_path), BENCH_MARKER=marker or "")
        if is_rotation(body_path):
            env.update(BENCH_BODIES=str(body_path), BENCH_TAG=CALL_TAG, BENCH_SEED=run_seed())
        output = _run_tool(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                            "--latency", "--timeout", "30s", "-s", str(WRK_SCRIPT), url], env, seconds)
        found = re.search(r"^BENCH (.*)$", output, re.MULTILINE)
        if not found:
            raise RuntimeError(f"wrk printed no BENCH line:\n{output[-2000:]}")
        pairs = dict(pair.split("=", 1) for pair in found.group(1).split())
        statuses: Counter = Counter()
        for item in pairs.pop("statuses").split(","):
            if item != "-":
                code, n = item.split(":")
                statuses[int(code)] += int(n)
        values = {k: int(v) for k, v in pairs.items()}
        return LoadResult(values["requests"], values["duration_us"] / 1e6, values["p50_us"] / 1000,
                          values["p99_us"] / 1000, values["bad_status"], values["degraded"] if marker else None,
                          values["connect"] + values["read"] + values["write"] + values["timeout"], dict(statuses))


class Hey(LoadGenerator):
    name = "hey"

    def run(self, url, body_path, connections, seconds, marker=None):
        if is_rotation(body_path):  # hey sends one body: the rotation's first, tagged once
            first = rotation_paths(body_path)[0]
            body_path = first.with_name(first.stem + "-hey.json")
            body_path.write_text(first.read_text(encoding="utf-8").replace(CALL_TAG, run_seed()), encoding="utf-8")
        output = _run_tool(["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-m", "POST",
                            "-T", "application/json", "-D", str(body_path), "-t", "30", url], None, seconds)

        def number(pattern: str) -> float:
            found = re.search(pattern, output)
            if not found:
                raise RuntimeError(f"cannot read {pattern!r} in hey's output:\n{output[-2000:]}")
            return float(found.group(1))

        statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
        errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", output.split("Error distribution:")[-1],
                                                re.MULTILINE)) if "Error distribution:" in output else 0
        total = sum(statuses.values())
        return LoadResult(total, number(r"Total:\s+([\d.]+) secs"), number(r"50% in ([\d.]+) secs") * 1000,
                          number(r"99% in ([\d.]+) secs") * 1000, total - statuses.get(200, 0), None, errors,
                          {code: n for code, n in statuses.items() if code != 200})


class PythonLoad(LoadGenerator):
    """Threads with http.client: the last resort, and the generator for an exact number of calls.

    It shares the GIL and the two cores with nothing but itself, yet is far slower than wrk: its
    absolute numbers understate the server, but the ratio to the reference stays meaningful."""

    name = "python (http.client threads)"

    def run(self, url, body_path, connections, seconds, marker=None):
        return self.call(url, body_path, connections, seconds=seconds, marker=marker)

    def call(self, url: str, body_path: Path, connections: int, *, seconds: float | None = None,
             count: int | None = None, marker: str | None = None) -> LoadResult:
        """POST the body for ``seconds``, or exactly ``count`` times, over ``connections`` threads."""
        parts = urlsplit(url)
        paths = rotation_paths(body_path) if is_rotation(body_path) else [body_path]
        bodies = [path.read_bytes().split(CALL_TAG.encode()) for path in paths]
        seed = run_seed().encode()
        needle = marker.encode() if marker else None
        lock = threading.Lock()
        latencies: list[float] = []
        tally = {"issued": 0, "bad": 0, "degraded": 0, "errors": 0}
        statuses: Counter = Counter()
        started = time.monotonic()
        deadline = started + seconds if seconds is not None else None

        def another() -> bool:
            with lock:
                if count is not None:
                    if tally["issued"] >= count:
                        return False
                    tally["issued"] += 1
                    return True
            return time.monotonic() < deadline

        def worker(number: int) -> None:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            mine: list[float] = []
            turn = number * len(bodies) // connections
            while another():
                pieces = bodies[turn % len(bodies)]
                turn += 1
                body = pieces[0] if len(pieces) == 1 else (b"%st%dn%d" % (seed, number, turn)).join(pieces)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
                begun = time.perf_counter()
                try:
                    connection.request("POST", parts.path, body, headers)
                    response = connection.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    connection.close()
                    with lock:
                        tally["errors"] += 1
                    continue
                mine.append(time.perf_counter() - begun)
                if response.status != 200:
                    with lock:
                        tally["bad"] += 1
                        statuses[response.status] += 1
                elif needle and needle in data:
                    with lock:
                        tally["degraded"] += 1
            connection.close()
            with lock:
                latencies.extend(mine)

        workers = [threading.Thread(target=worker, args=(number,), daemon=True) for number in range(connections)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.monotonic() - started
        ordered = sorted(latencies) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
        return LoadResult(len(latencies), elapsed, statistics.median(ordered) * 1000, p99 * 1000,
                          tally["bad"], tally["degraded"] if marker else None, tally["errors"], dict(statuses))


def installed(name: str) -> bool:
    return shutil.which(name) is not None


def generator_named(name: str) -> LoadGenerator:
    return {"wrk": Wrk, "hey": Hey, "python": PythonLoad}[name]()
