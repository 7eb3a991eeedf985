#!/usr/bin/env python3
"""Benchmark crs-cds under gunicorn against a bare Flask reference, in one command.

    python3 benchmarks/run.py [--quick] [--runs 3] [--duration 10]

Steps: install what is missing (wrk, else hey, else a Python generator; gunicorn; sekmet-fhir), build
the request bodies (benchmarks/workloads.py), start sekmet, the service and the reference under the
same gunicorn settings on 127.0.0.1, check every answer once (every body of a rotation: B-cold,
Mix), measure each workload against the reference with the same bodies, at 16 and at 1 connection, time the service's FHIR queries against sekmet, measure memory drift
over many calls, stop everything, print a markdown report and write it to benchmarks/results.md.
Read benchmarks/README.md for what is measured and why.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the service's code joins once its source is chosen (``use_source``)

import loadgen  # noqa: E402  (after the path set-up above)

GUNICORN_REQUIREMENT = "gunicorn>=23,<28"
CONNECTIONS = 16
DEGRADED_MARKER = "could not be read"   # the card line when a data source failed (grade "at least")
READY_SECONDS = 60
TARGETS = {  # as printed; _verdict() applies them
    "A": "≥ 85% of reference",
    "B": "≥ 50% of reference, p99 ≤ 50 ms",
    "C": "≥ 70% of reference",
    "D": "p50 ≤ 1.3 × slowest FHIR query",
    "B-cold": "p50 at 1 conn ≤ 3 × reference's",
    "Mix": "none (reported)",
}
COLD_TARGET = 3.0  # B-cold's p50 at 1 connection ÷ the reference's for the same bodies
MEMORY_TARGET = 10.0  # % drift


SEKMET_WORKERS = 6  # one per query a no-prefetch patient-view makes (see start_sekmet)


class BenchmarkError(RuntimeError):
    """Stops the benchmark with a message (a wrong answer, a server that would not start...)."""


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---- options ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    runs: int
    duration: float          # seconds per timed run at 16 connections
    single_duration: float   # seconds per run at 1 connection
    warmup: float
    query_repeats: int
    memory_counts: tuple[int, int]
    memory_budget: float     # seconds the long memory run may take before falling back to A
    workers: int
    quick: bool
    output: Path
    loadgen: str
    keep_going: bool
    revision: str | None     # benchmark this git revision instead of the working tree
    source: Path = REPO      # where the service's code is served from
    extra_gunicorn_flags: list[str] = field(default_factory=list)  # set once gunicorn is known

    @property
    def gunicorn_flags(self) -> list[str]:
        return ["-w", str(self.workers), "--threads", "1", "-k", "sync"]


def parse_args(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs for a smoke check (a few seconds each)")
    parser.add_argument("--runs", type=int, default=None, help="repeat each workload N times, report medians")
    parser.add_argument("--duration", type=float, default=None, help="seconds per timed run (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers (default 2, one per core)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "hey", "python"), default="auto")
    parser.add_argument("--ref", metavar="REVISION", default=None,
                        help="benchmark a git revision (e.g. HEAD, HEAD~3) instead of the working tree")
    parser.add_argument("--keep-going", action="store_true",
                        help="record answers other than 200 and go on, instead of stopping (the default)")
    parser.add_argument("--memory-budget", type=float, default=240.0,
                        help="longest the 20,000-call memory run may take on B before A is used instead")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown report file (default benchmarks/results.md; results-quick.md with --quick)")
    args = parser.parse_args(argv)
    quick = args.quick
    duration = args.duration or (3.0 if quick else 10.0)
    return Plan(
        runs=args.runs or 1,
        duration=duration,
        single_duration=max(2.0, duration / 2),
        warmup=1.0 if quick else 2.0,
        query_repeats=5 if quick else 20,
        memory_counts=(100, 1000) if quick else (1000, 20000),
        memory_budget=args.memory_budget,
        workers=args.workers,
        quick=quick,
        output=args.output or HERE / ("results-quick.md" if quick else "results.md"),
        loadgen=args.loadgen,
        keep_going=args.keep_going,
        revision=args.ref,
    )


# ---- step 1: tools ---------------------------------------------------------------------------------------

def _command_ok(command: list[str], **kwargs) -> bool:
    say("$ " + " ".join(command))
    try:
        return subprocess.run(command, stdout=subprocess.DEVNULL, **kwargs).returncode == 0
    except OSError:
        return False


def ensure_project_importable() -> None:
    missing = [name for name in ("flask", "fhir.resources", "jsonschema", "requests")
               if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        raise BenchmarkError(f"{sys.executable} lacks the service's dependencies ({', '.join(missing)}): run "
                             "`make bench` (it uses .venv), or `pip install .` into this Python first")


def ensure_load_generator(choice: str) -> loadgen.LoadGenerator:
    """wrk from Debian (installed if missing and we may), else hey, else the Python generator."""
    if choice != "auto":
        if choice != "python" and not loadgen.installed(choice):
            raise BenchmarkError(f"--loadgen {choice}: {choice} is not installed")
        return loadgen.generator_named(choice)
    if loadgen.installed("wrk"):
        return loadgen.Wrk()
    apt_ok = False
    if os.geteuid() == 0 and shutil.which("apt-get"):
        apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        apt_ok = _command_ok(["apt-get", "update"], env=apt_env)
        if apt_ok and _command_ok(["apt-get", "install", "-y", "wrk"], env=apt_env) and loadgen.installed("wrk"):
            return loadgen.Wrk()
        if apt_ok and not loadgen.installed("hey"):
            _command_ok(["apt-get", "install", "-y", "hey"], env=apt_env)
    else:
        say("not root (or no apt-get): wrk cannot be installed")
    if loadgen.installed("hey"):
        say("wrk unavailable: falling back to hey")
        return loadgen.Hey()
    say("neither wrk nor hey available: falling back to the pure-Python load generator (slower; ratios still hold)")
    return loadgen.PythonLoad()


def ensure_gunicorn(plan: Plan) -> str:
    """gunicorn in this Python environment, installed with pip when missing or out of range.

    Newer gunicorns open a control socket in ~/.gunicorn; the benchmark's servers (two at once)
    do without it, so they neither share it nor touch the home folder."""
    def version() -> str | None:
        try:
            return importlib.metadata.version("gunicorn")
        except importlib.metadata.PackageNotFoundError:
            return None

    found = version()
    if found is None or not (23 <= int(found.split(".")[0]) < 28):
        if not _command_ok([sys.executable, "-m", "pip", "install", "--quiet", GUNICORN_REQUIREMENT]):
            raise BenchmarkError(f"could not install {GUNICORN_REQUIREMENT} into {sys.executable}")
        importlib.invalidate_caches()
        found = version()
    usage = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True).stdout
    if "--no-control-socket" in usage:
        plan.extra_gunicorn_flags = ["--no-control-socket"]
    return found or "?"


def ensure_sekmet() -> Path:
    """The repo's sekmet-fhir (``make fhir-server`` installs it into .fhir-venv)."""
    configured = os.environ.get("CRS_CDS_SEKMET")
    executable = Path(configured) if configured else REPO / ".fhir-venv" / "bin" / "sekmet"
    if not executable.is_file():
        if not _command_ok(["make", "fhir-server", f"PYTHON={sys.executable}"], cwd=REPO):
            raise BenchmarkError("`make fhir-server` failed: sekmet-fhir is needed for workload D")
        executable = REPO / ".fhir-venv" / "bin" / "sekmet"
    return executable


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def use_source(plan: Plan, workdir: Path) -> str:
    """Serve (and build the bodies with) the working tree, or a git revision exported to workdir.
    Returns what is benchmarked, for the report."""
    if plan.revision:
        target = workdir / "source"
        target.mkdir()
        archive = subprocess.run(["git", "archive", "--format=tar", plan.revision], cwd=REPO, capture_output=True)
        if archive.returncode != 0:
            raise BenchmarkError(f"git archive {plan.revision} failed: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        plan.source = target
    sys.path.insert(0, str(plan.source))
    if plan.revision:
        return f"git revision {plan.revision} ({_git('rev-parse', '--short', plan.revision)})"
    dirty = _git("status", "--porcelain", "--", "cds_service", "fhir_profiles", "cards", "setup.cfg")
    head = _git("rev-parse", "--short", "HEAD") or "?"
    return f"working tree at {head}" + (" with uncommitted changes" if dirty else "")


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU clock ticks utime+stime+cutime+cstime) for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # ended meanwhile
            table[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
    return table


def tree_ticks(root: int) -> int:
    """CPU clock ticks of a process and its live descendants: a finished child is in its parent's
    cutime, a live one is read directly, so each is counted once."""
    table = process_table()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(table[pid][1] for pid in tree if pid in table)


# ---- step 2: servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A process we started (in its own session, so Ctrl-C reaches us, not it), stopped by its PID."""

    def __init__(self, name: str, command: list[str], ready_url: str, log_path: Path, cwd: Path,
                 env: dict[str, str] | None = None):
        self.name, self.ready_url, self.log_path = name, ready_url, log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"{self.name} exited ({self.process.returncode}) before it was ready:\n"
                                     + self.log_tail())
            try:
                if requests.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise BenchmarkError(f"{self.name} did not answer {self.ready_url} within {READY_SECONDS} s:\n"
                             + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_quiet(self, limit: float = 180.0) -> None:
        """Wait until the process (and its children) use under 5% of a CPU: sekmet goes on answering
        queries the service gave up on after a load run."""
        deadline, step = time.monotonic() + limit, 0.25
        last = tree_ticks(self.process.pid)
        while time.monotonic() < deadline:
            time.sleep(step)
            now = tree_ticks(self.process.pid)
            if now - last <= step * os.sysconf("SC_CLK_TCK") * 0.05:
                return
            last = now
        raise BenchmarkError(f"{self.name} still busy {limit:.0f} s after a load run")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # gunicorn's master stops its workers on SIGTERM
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class Gunicorn(Server):
    """A gunicorn master; its workers are its child processes."""

    def __init__(self, name: str, app: str, chdir: Path, plan: Plan, workdir: Path, env: dict[str, str]):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workers = plan.workers
        command = [sys.executable, "-m", "gunicorn", *plan.gunicorn_flags, *plan.extra_gunicorn_flags,
                   "-b", f"127.0.0.1:{self.port}",
                   "--chdir", str(chdir), app]
        super().__init__(name, command, f"{self.base_url}/cds-services", workdir / f"{name}.log", chdir, env)

    def wait_ready(self) -> None:
        super().wait_ready()
        deadline = time.monotonic() + READY_SECONDS
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_idle(self, limit: float = 180.0) -> None:
        """Wait until the workers have worked off what a load run left queued: a load generator
        stops with requests in flight, and sync workers still answer them, which would slow the
        next run down. A discovery GET queues behind them; once one answers quickly, all is done."""
        import requests

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                requests.get(self.ready_url, timeout=max(1.0, deadline - started))
            except requests.RequestException:
                pass
            if time.monotonic() - started < 0.05:
                return
        raise BenchmarkError(f"{self.name} still busy {limit:.0f} s after a load run")

    def worker_pids(self) -> list[int]:
        return sorted(pid for pid, (ppid, _) in process_table().items() if ppid == self.process.pid)

    def memory_kb(self, field_name: str) -> dict[int, int]:
        """``VmHWM`` (peak) or ``VmRSS`` (now) of each worker, in kB."""
        found = {}
        for pid in self.worker_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field_name + ":"):
                        found[pid] = int(line.split()[1])
            except OSError:
                pass
        return found

    def reset_peak_rss(self) -> bool:
        """Start each worker's VmHWM afresh (``clear_refs`` 5); False where the kernel refuses."""
        ok = True
        for pid in self.worker_pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                ok = False
        return ok


def service_env(workdir: Path, fhir_base_url: str) -> dict[str, str]:
    """The service's fixed settings: only these CRS_CDS_* variables, none inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_CDS_")}
    env.update(CRS_CDS_AUTH_ENABLED="false", CRS_CDS_FEEDBACK_DB=str(workdir / "feedback.sqlite3"),
               CRS_CDS_ALLOWED_FHIR_SERVERS=fhir_base_url)
    return env


def start_service(plan: Plan, workdir: Path, fhir_base_url: str, name: str = "service") -> Gunicorn:
    server = Gunicorn(name, "cds_service.wsgi:app", plan.source, plan, workdir,
                      service_env(workdir, fhir_base_url))
    return server


def start_reference(plan: Plan, workdir: Path) -> Gunicorn:
    return Gunicorn("reference", "reference_app:create_app()", HERE, plan, workdir, dict(os.environ))


def start_sekmet(executable: Path, workdir: Path) -> tuple[Server, str]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    folder = workdir / "sekmet"
    folder.mkdir()
    config = folder / "sekmet.yaml"
    config.write_text(f"base_url: {base_url}\nhost: 127.0.0.1\nport: {port}\ndata_dir: {folder / 'data'}\n"
                      "simulator:\n  enabled: false\nlog_inbound: false\n", encoding="utf-8")
    # Several worker processes, as a production FHIR server answers parallel queries in parallel:
    # `sekmet serve` runs one, which answers the service's parallel fetches one at a time, and a
    # worker's event loop accepts several waiting connections at once, so with two workers one of
    # them often got three or four of the six queries to answer in turn.
    python = executable.parent / "python"
    command = [str(python), "-m", "uvicorn", "sekmet.main:app_factory", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(SEKMET_WORKERS), "--log-level", "warning"]
    server = Server("sekmet", command, f"{base_url}/metadata", folder / "sekmet.log", folder,
                    dict(os.environ, SEKMET_CONFIG=str(config)))
    return server, base_url


def load_into_fhir(base_url: str, bundle: dict) -> None:
    import requests

    response = requests.post(base_url, json=bundle, timeout=120,
                             headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    if not 200 <= response.status_code < 300:
        raise BenchmarkError(f"loading the ICU chart into sekmet failed: {response.status_code} "
                             f"{response.text[:1000]}")


# ---- step 3: one checked call per workload ---------------------------------------------------------------

def preflight(workloads, service: Gunicorn, reference: Gunicorn, notes: list[str]) -> dict[str, float]:
    """Each body once to each server: 200, and the service's answer the one the workload expects.
    A degraded answer (some data "could not be read") stops the benchmark for a prefetched workload;
    for D (data fetched from sekmet within the service's time budget) it is noted. Returns each
    workload's service latency in seconds (to size the timed runs)."""
    import requests

    summaries, latencies = {}, {}
    for workload in workloads:
        if workload.rotation:
            latencies[workload.name] = _preflight_rotation(workload, service, reference, summaries.get("B"))
            continue
        data = workload.path.read_bytes()
        for server in (reference, service):
            started = time.perf_counter()
            response = requests.post(server.base_url + workload.url_path, data=data, timeout=60,
                                     headers={"Content-Type": "application/json"})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise BenchmarkError(f"workload {workload.name}: {server.name} answered {response.status_code}: "
                                     f"{response.text[:1500]}")
        answer = response.json()
        cards = answer.get("cards")
        if not workload.expect_cards and answer != {"cards": []}:
            raise BenchmarkError(f"workload {workload.name}: expected {{\"cards\": []}}, got {response.text[:800]}")
        if workload.expect_cards and not cards:
            raise BenchmarkError(f"workload {workload.name}: expected cards, got {response.text[:800]}")
        summaries[workload.name], latencies[workload.name] = [card["summary"] for card in cards], elapsed
        say(f"  {workload.name}: 200 in {elapsed * 1000:.0f} ms, {len(cards)} card(s)"
            + (f": {summaries[workload.name][0]}" if cards else ""))
        if DEGRADED_MARKER in response.text:
            problem = f"workload {workload.name}: the checked call's answer says some data {DEGRADED_MARKER}"
            if workload.body.get("prefetch") is not None:
                raise BenchmarkError(problem)
            notes.append(f"{problem} ({_degraded_reason(response.text)}); its cards: {summaries[workload.name]}")
            say("  " + notes[-1])
    if "D" in summaries and DEGRADED_MARKER not in str(notes) and summaries["D"] != summaries["B"]:
        raise BenchmarkError("workload D (data from fhirServer) got other cards than B (same data prefetched):\n"
                             f"  B: {summaries['B']}\n  D: {summaries['D']}")
    return latencies


def _preflight_rotation(workload, service: Gunicorn, reference: Gunicorn, b_cards: list[str] | None) -> float:
    """Every body of a rotation once to the service, its tag made a value of its own: 200, no card
    for an out-of-scope chart, B's cards for a copy of B, nothing "could not be read"; the first
    body to the reference too. Returns the service's mean latency in seconds."""
    import requests

    from workloads import with_call_tag

    elapsed, in_scope = [], 0
    for number, (path, cards_wanted) in enumerate(zip(loadgen.rotation_paths(workload.path), workload.variant_cards)):
        data = with_call_tag(path.read_text(encoding="utf-8"), f"check{number}").encode()
        for server in ((reference, service) if number == 0 else (service,)):
            started = time.perf_counter()
            response = requests.post(server.base_url + workload.url_path, data=data, timeout=60,
                                     headers={"Content-Type": "application/json"})
            if response.status_code != 200:
                raise BenchmarkError(f"workload {workload.name}, body {number}: {server.name} answered "
                                     f"{response.status_code}: {response.text[:1500]}")
        elapsed.append(time.perf_counter() - started)
        cards = [card["summary"] for card in response.json().get("cards") or []]
        if DEGRADED_MARKER in response.text:
            raise BenchmarkError(f"workload {workload.name}, body {number}: the answer says some data "
                                 f"{DEGRADED_MARKER} ({_degraded_reason(response.text)})")
        if not cards_wanted and cards:
            raise BenchmarkError(f"workload {workload.name}, body {number}: expected no card, got {cards}")
        if cards_wanted and (not cards or (b_cards is not None and cards != b_cards)):
            raise BenchmarkError(f"workload {workload.name}, body {number} (a copy of B with new ids): other "
                                 f"cards than B's:\n  B: {b_cards}\n  this: {cards}")
        in_scope += bool(cards_wanted)
    say(f"  {workload.name}: {len(elapsed)} bodies, each 200 as expected ({in_scope} with B's cards, "
        f"{len(elapsed) - in_scope} out of scope), {statistics.mean(elapsed) * 1000:.0f} ms on average")
    return statistics.mean(elapsed)


def _degraded_reason(text: str) -> str:
    """The reason the card gives after the marker, e.g. 'prefetch:vitals: time budget exhausted ...'."""
    after = text.split(DEGRADED_MARKER, 1)[1]
    return after.split(":", 1)[1].split("\\n", 1)[0].strip(" .") if ":" in after else "no reason given"


# ---- step 4: measurements ---------------------------------------------------------------------------------

class CpuMeter:
    """The share of the machine's CPU time that went to processes other than the benchmark's own
    (this script, its load generators, servers and their workers) between ``start`` and ``share``.
    Another job on the machine moves every number; this says when it did."""

    def __init__(self) -> None:
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.started = (0.0, 0, 0)

    @staticmethod
    def _busy_ticks() -> int:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
        return user + nice + system + irq + softirq + steal

    def start(self) -> None:
        self.started = (time.monotonic(), self._busy_ticks(), tree_ticks(os.getpid()))

    def share(self) -> float:
        """Other processes' CPU since ``start``, in % of all CPUs."""
        began, busy, own = self.started
        seconds = time.monotonic() - began
        foreign = (self._busy_ticks() - busy) - (tree_ticks(os.getpid()) - own)
        return max(0.0, foreign / (seconds * self.cpus * os.sysconf("SC_CLK_TCK")) * 100) if seconds else 0.0


@dataclass
class WorkloadStats:
    service: list[loadgen.LoadResult] = field(default_factory=list)
    reference: list[loadgen.LoadResult] = field(default_factory=list)
    single: list[loadgen.LoadResult] = field(default_factory=list)  # the service at 1 connection
    reference_single: list[loadgen.LoadResult] = field(default_factory=list)  # the reference at 1 connection
    peak_rss_kb: int = 0
    foreign_cpu: float = 0.0  # the most CPU other processes took during one of its timed runs, in %

    @staticmethod
    def median(values) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def rps(self) -> float:
        return self.median([r.rps for r in self.service])

    @property
    def reference_rps(self) -> float:
        return self.median([r.rps for r in self.reference])

    @property
    def ratio(self) -> float:
        return self.median([s.rps / r.rps for s, r in zip(self.service, self.reference) if r.rps])

    @property
    def p50(self) -> float:
        return self.median([r.p50_ms for r in self.service])

    @property
    def p99(self) -> float:
        return self.median([r.p99_ms for r in self.service])

    @property
    def reference_p99(self) -> float:
        return self.median([r.p99_ms for r in self.reference])

    @property
    def single_p50(self) -> float:
        return self.median([r.p50_ms for r in self.single])

    @property
    def single_p99(self) -> float:
        return self.median([r.p99_ms for r in self.single])

    @property
    def reference_single_p50(self) -> float:
        return self.median([r.p50_ms for r in self.reference_single])

    @property
    def reference_single_p99(self) -> float:
        return self.median([r.p99_ms for r in self.reference_single])

    @property
    def single_ratio(self) -> float:
        """The service's p50 at 1 connection ÷ the reference's, per run, median."""
        return self.median([s.p50_ms / r.p50_ms for s, r in zip(self.single, self.reference_single) if r.p50_ms])

    @property
    def p50_ratio(self) -> float:
        """The service's p50 at 16 connections ÷ the reference's, per run, median."""
        return self.median([s.p50_ms / r.p50_ms for s, r in zip(self.service, self.reference) if r.p50_ms])

    def answers(self) -> str:
        """'all 200, complete', or what went wrong in the service's timed runs at 16 and at 1 connection."""
        if all(_answers(results) == OK_ANSWERS for results in (self.service, self.single)):
            return OK_ANSWERS
        return f"16 conn: {_answers(self.service)}; 1 conn: {_answers(self.single)}"


OK_ANSWERS = "all 200, complete"


def _answers(results: list[loadgen.LoadResult]) -> str:
    total = sum(r.requests for r in results)
    bad = sum(r.bad_status for r in results)
    degraded = sum(r.degraded or 0 for r in results)
    if not bad and not degraded:
        return OK_ANSWERS
    statuses: dict[int, int] = {}
    for result in results:
        for code, n in result.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    parts = [f"{n} × {code}" for code, n in sorted(statuses.items())]
    if degraded:
        parts.append(f"{degraded} × 200 degraded")
    return f"{', '.join(parts)} of {total}"


@dataclass
class QueryTiming:
    key: str
    resources: int
    median_ms: float
    more_pages: bool


@dataclass
class MemoryDrift:
    workload: str
    reason: str
    counts: tuple[int, int]
    early_kb: dict[int, int]
    late_kb: dict[int, int]

    @property
    def change(self) -> float:
        early, late = sum(self.early_kb.values()), sum(self.late_kb.values())
        return (late - early) / early * 100 if early else float("nan")


@dataclass
class Results:
    """Everything measured so far: a report can be written from it at any point."""

    plan: Plan
    generator: str = "?"
    gunicorn: str = "?"
    code: str = "?"
    workloads: list = field(default_factory=list)
    stats: dict[str, WorkloadStats] = field(default_factory=dict)
    timings: list[QueryTiming] = field(default_factory=list)
    parallel_ms: float | None = None  # the same queries at once from a bare client: D's floor here
    drift: MemoryDrift | None = None
    notes: list[str] = field(default_factory=list)
    aborted: str | None = None


def checked(result: loadgen.LoadResult, what: str, keep_going: bool, notes: list[str],
            need_answers: bool = True) -> loadgen.LoadResult:
    """Stop on answers other than 200 (or note them with --keep-going); stop when nothing completed."""
    if need_answers and result.requests == 0:
        raise BenchmarkError(f"{what}: no request completed")
    if result.bad_status:
        problem = f"{what}: {result.bad_status} of {result.requests} answers were not 200 ({result.status_text()})"
        if not keep_going:
            raise BenchmarkError(problem + "; rerun with --keep-going to measure the rest anyway")
        notes.append(problem)
        say("  " + problem)
    return result


def warm_up(generator, results: Results, service: Gunicorn, reference: Gunicorn, fhir: Server) -> None:
    for workload in results.workloads:
        for server in (reference, service):
            result = generator.run(server.base_url + workload.url_path, workload.path, CONNECTIONS,
                                   results.plan.warmup)
            server.wait_idle()
            fhir.wait_quiet()
            checked(result, f"warm-up {workload.name} on {server.name}", results.plan.keep_going, results.notes,
                    need_answers=False)


def measure_workloads(generator, results: Results, service: Gunicorn, reference: Gunicorn, fhir: Server,
                      latencies: dict[str, float]) -> None:
    """Per run and workload: the reference and the service at 16 connections, the service at 1.
    A slow workload (D waits on sekmet) runs longer, so that enough calls complete."""
    plan = results.plan
    meter = CpuMeter()
    for run in range(1, plan.runs + 1):
        for workload in results.workloads:
            entry = results.stats.setdefault(workload.name, WorkloadStats())
            if not service.reset_peak_rss() and not any("clear_refs" in n for n in results.notes):
                results.notes.append("the kernel refused clear_refs: peak RSS is cumulative over the workloads")
            seconds = max(plan.duration, 10 * latencies[workload.name])
            single_seconds = max(plan.single_duration, 5 * latencies[workload.name])

            def timed(server: Gunicorn, connections: int, length: float, marker: str | None, what: str):
                meter.start()
                result = generator.run(server.base_url + workload.url_path, workload.path, connections, length,
                                       marker)
                entry.foreign_cpu = max(entry.foreign_cpu, meter.share())
                server.wait_idle()
                fhir.wait_quiet()
                return checked(result, f"run {run}, workload {workload.name}, {what}", plan.keep_going,
                               results.notes)

            entry.reference.append(timed(reference, CONNECTIONS, seconds, None, "reference"))
            entry.service.append(timed(service, CONNECTIONS, seconds, DEGRADED_MARKER, "service"))
            entry.single.append(timed(service, 1, single_seconds, DEGRADED_MARKER, "service at 1 connection"))
            entry.reference_single.append(timed(reference, 1, single_seconds, None, "reference at 1 connection"))
            entry.peak_rss_kb = max([entry.peak_rss_kb, *service.memory_kb("VmHWM").values()])
            last, base = entry.service[-1], entry.reference[-1]
            say(f"  run {run} {workload.name}: {last.rps:8.1f} req/s vs reference {base.rps:8.1f} "
                f"({last.rps / base.rps:.0%}), p50 {last.p50_ms:.1f} ms, p99 {last.p99_ms:.1f} ms, "
                f"1 connection p50 {entry.single[-1].p50_ms:.1f} ms (reference "
                f"{entry.reference_single[-1].p50_ms:.1f} ms); answers at 16 connections: "
                f"{_answers([last])}, at 1: {_answers(entry.single[-1:])}")


def service_queries(base_url: str, context: dict, now: datetime) -> dict[str, str]:
    """The URLs of a no-prefetch patient-view's FHIR queries, exactly as the service sends them:
    its discovery templates rendered for the patient, and its own Observation searches stopped at
    the cutoff of what the rules read (prefetch.only_since)."""
    from cds_service.clinical.protocol import default_protocol
    from cds_service.fhir.client import join_url
    from cds_service.fhir.prefetch import only_since, render_template
    from cds_service.hooks.registry import SERVICES_BY_ID, prefetch_cutoffs, prefetch_templates
    from cds_service.terminology import load_terminology
    from workloads import PATIENT_VIEW

    templates = prefetch_templates(load_terminology())
    cutoffs = prefetch_cutoffs(default_protocol(), now.replace(microsecond=0))
    urls = {}
    for key in SERVICES_BY_ID[PATIENT_VIEW].prefetch_keys:
        query = render_template(templates[key], context)
        urls[key] = join_url(base_url, only_since(query, cutoffs[key]) if key in cutoffs else query)
    return urls


def time_fhir_queries(base_url: str, context: dict, repeats: int) -> tuple[list[QueryTiming], float]:
    """Each of the service's FHIR queries in D (``service_queries``), GET ``repeats`` times in a
    row with nothing else running. The service follows a ``next`` link only when the first page
    does not reach back far enough; the table says whether there was one.

    Then all of them at once, ``repeats`` times, from one thread each and parsed with ``json``, as
    the service fetches them but with nothing else: the median is the least any client could take
    for D on this machine, where the queries share sekmet's CPUs with each other."""
    import requests

    from cds_service.fhir.client import next_link

    urls = service_queries(base_url, context, datetime.now(timezone.utc))
    timings: list[QueryTiming] = []
    with requests.Session() as session:
        for key, url in urls.items():
            samples, body = [], {}
            for attempt in range(repeats + 1):  # the first GET warms sekmet up and is not counted
                started = time.perf_counter()
                response = session.get(url, headers={"Accept": "application/fhir+json"}, timeout=30)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise BenchmarkError(f"sekmet answered {response.status_code} for the {key} query")
                body = response.json()
                if attempt:
                    samples.append(elapsed * 1000)
            is_bundle = body.get("resourceType") == "Bundle"
            timings.append(QueryTiming(key, len(body.get("entry") or []) if is_bundle else 1,
                                       statistics.median(samples), bool(is_bundle and next_link(body))))
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=len(urls)))

        def fetch(url: str) -> dict:
            return session.get(url, headers={"Accept": "application/fhir+json"}, timeout=30).json()

        together = []
        with ThreadPoolExecutor(len(urls)) as pool:
            for attempt in range(repeats + 1):  # the first round opens the connections
                started = time.perf_counter()
                list(pool.map(fetch, urls.values()))
                if attempt:
                    together.append((time.perf_counter() - started) * 1000)
    return timings, statistics.median(together)


def memory_drift(results: Results, workdir: Path, fhir_base_url: str, stack: ExitStack) -> MemoryDrift:
    """A fresh service; worker RSS after the first N calls and after M calls in all (exact counts, 4
    connections, the Python generator). B when M calls of B fit the time budget, else A."""
    plan = results.plan
    first, total = plan.memory_counts
    by_name = {w.name: w for w in results.workloads}
    b_rps = results.stats["B"].rps
    estimate = (total - first) / b_rps if b_rps > 0 else float("inf")
    if estimate <= plan.memory_budget:
        chosen, reason = by_name["B"], f"B ({total:,} calls take about {estimate:.0f} s)"
    else:
        chosen = by_name["A"]
        reason = (f"A, since {total:,} calls of B would take about {estimate / 60:.0f} min at {b_rps:.0f} req/s, "
                  f"over the {plan.memory_budget:.0f} s budget")
    say(f"memory drift on workload {reason}")
    server = start_service(plan, workdir, fhir_base_url, name="service-memory")
    stack.callback(server.stop)
    server.wait_ready()
    python_load = loadgen.PythonLoad()
    url = server.base_url + chosen.url_path
    checked(python_load.call(url, chosen.path, 4, count=first, marker=DEGRADED_MARKER),
            f"memory, first {first:,} calls", False, results.notes)
    early = server.memory_kb("VmRSS")
    checked(python_load.call(url, chosen.path, 4, count=total - first, marker=DEGRADED_MARKER),
            f"memory, next {total - first:,} calls", False, results.notes)
    late = server.memory_kb("VmRSS")
    server.stop()
    return MemoryDrift(chosen.name, reason, (first, total), early, late)


# ---- step 5: report ----------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPUs (nproc), {model}, Python {platform.python_version()}, Linux {platform.release()}"


def _kb(size: int) -> str:
    return f"{size / 1024:,.1f} KB" if size < 10240 else f"{size / 1024:,.0f} KB"


def _mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def _query_ratio(results: Results) -> float | None:
    d = results.stats.get("D")
    if not results.timings or d is None or not d.single:
        return None
    return d.single_p50 / max(t.median_ms for t in results.timings)


def _verdict(name: str, entry: WorkloadStats, results: Results) -> str:
    if entry.answers() != OK_ANSWERS:
        return "**FAIL** (answers)"
    if name == "A":
        return _mark(entry.ratio >= 0.85)
    if name == "B":
        return _mark(entry.ratio >= 0.50 and entry.p99 <= 50)
    if name == "C":
        return _mark(entry.ratio >= 0.70)
    if name == "B-cold":
        return _mark(entry.single_ratio <= COLD_TARGET) + f" ({entry.single_ratio:.2f}×)"
    if name == "Mix":
        return "—"
    ratio = _query_ratio(results)
    return "not measured" if ratio is None else _mark(ratio <= 1.3)


def render_report(results: Results) -> str:
    plan = results.plan
    kind = "quick smoke run" if plan.quick else f"{plan.runs} run(s), medians"
    lines = [f"### Benchmark {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({kind})", ""]
    if results.aborted:
        lines += [f"**ABORTED**: {results.aborted}", ""]
    lines += [
        f"Code: {results.code}. Machine: {machine()}. Server: gunicorn {results.gunicorn} "
        f"`{' '.join(plan.gunicorn_flags)}` on 127.0.0.1, the same for the service and the reference. "
        f"Load: {results.generator}, {CONNECTIONS} connections (`-t2 -c{CONNECTIONS}`) for ≥ {plan.duration:.0f} s "
        f"per run, then 1 connection for ≥ {plan.single_duration:.0f} s. Client, servers and sekmet share the "
        "machine: compare ratios, not absolute numbers.",
        "",
        "| Workload | Body | Service req/s | Reference req/s (same body) | Ratio | p50 ms | p99 ms "
        "| Reference p99 ms | p50 / p99 ms at 1 conn | Reference p50 / p99 ms at 1 conn | Peak RSS/worker "
        "| Answers | Target | Result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for workload in results.workloads:
        entry = results.stats.get(workload.name)
        if entry is None or not entry.service:
            lines.append(f"| {workload.name}: {workload.title} | {_body_size(workload)} |" + " |" * 10
                         + f" {TARGETS[workload.name]} | not measured |")
            continue
        single = f"{entry.single_p50:,.1f} / {entry.single_p99:,.1f}" if entry.single else ""
        reference_single = (f"{entry.reference_single_p50:,.1f} / {entry.reference_single_p99:,.1f}"
                            if entry.reference_single else "")
        lines.append(
            f"| {workload.name}: {workload.title} | {_body_size(workload)} | {entry.rps:,.1f} | "
            f"{entry.reference_rps:,.1f} | {entry.ratio:.0%} | {entry.p50:,.1f} | {entry.p99:,.1f} | "
            f"{entry.reference_p99:,.1f} | {single} | {reference_single} | {entry.peak_rss_kb / 1024:,.0f} MB | "
            f"{entry.answers()} | "
            f"{TARGETS[workload.name]} | {_verdict(workload.name, entry, results)} |")
    lines += ["", f"p50/p99 at {CONNECTIONS} connections unless marked; Ratio = service req/s ÷ reference req/s."]
    lines += _cold_lines(results)
    lines += _query_lines(results)
    lines += _memory_lines(results)
    measured = any(entry.service for entry in results.stats.values())
    notes = [*results.notes, _foreign_cpu_note(results)] if measured else results.notes
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def _body_size(workload) -> str:
    return f"{_kb(workload.size)} (mean of {len(workload.variants)})" if workload.rotation else _kb(workload.size)


def _cold_lines(results: Results) -> list[str]:
    """B-cold against the reference for the same bodies (the target) and against B; Mix."""
    cold, warm, mix = (results.stats.get(name) for name in ("B-cold", "B", "Mix"))
    if cold is None or not cold.single or not cold.reference_single:
        return []
    ratio = cold.single_ratio
    runs = ", ".join(f"{s.p50_ms / r.p50_ms:.2f}" for s, r in zip(cold.single, cold.reference_single) if r.p50_ms)
    line = (f"**Cold B**: B-cold's p50 at 1 connection is {cold.single_p50:.1f} ms, the reference's for the same "
            f"bodies {cold.reference_single_p50:.1f} ms (medians); measured back to back in each run, "
            f"service ÷ reference: {runs}, median **{ratio:.2f}×** (target ≤ {COLD_TARGET:.0f}×: "
            f"{'met' if ratio <= COLD_TARGET else '**not met**'}); at {CONNECTIONS} connections "
            f"{cold.p50:.1f} against {_median_p50(cold.reference):.1f} ms "
            f"({cold.p50_ratio:.2f}×, mostly queueing).")
    if warm is not None and warm.single:
        line += (f" The same chart reopened (B): p50 at 1 connection {warm.single_p50:.1f} ms "
                 f"({warm.single_ratio:.2f}× its reference), throughput {warm.ratio:.0%} of the reference against "
                 f"B-cold's {cold.ratio:.0%}; cold ÷ warm p50 at 1 connection: "
                 f"{cold.single_p50 / warm.single_p50:.2f}.")
    lines = ["", line]
    if mix is not None and mix.single:
        runs = ", ".join(f"{s.rps / r.rps:.0%}" for s, r in zip(mix.service, mix.reference) if r.rps)
        lines += ["", f"**Mix**: {mix.ratio:.0%} of the reference's throughput for the same bodies (runs: {runs}); "
                  "p50 / p99 at "
                  f"1 connection {mix.single_p50:.1f} / {mix.single_p99:.1f} ms (reference "
                  f"{mix.reference_single_p50:.1f} / {mix.reference_single_p99:.1f} ms), at {CONNECTIONS} "
                  f"connections {mix.p50:.1f} / {mix.p99:.1f} ms (reference p99 {mix.reference_p99:.1f} ms)."]
    return lines


def _median_p50(results: list[loadgen.LoadResult]) -> float:
    return statistics.median([r.p50_ms for r in results])


def _foreign_cpu_note(results: Results) -> str:
    busy = {name: entry.foreign_cpu for name, entry in results.stats.items() if entry.foreign_cpu >= 5}
    if not busy:
        return "other processes on the machine took under 5% of the CPUs during every timed run"
    return ("other processes on the machine took " + ", ".join(
        f"up to {share:.0f}% of the CPUs during {name}'s runs" for name, share in busy.items())
        + ": those numbers are disturbed")


def _query_lines(results: Results) -> list[str]:
    if not results.timings:
        return []
    slowest = max(results.timings, key=lambda t: t.median_ms)
    together = sum(t.median_ms for t in results.timings)
    ratio = _query_ratio(results)
    d = results.stats.get("D")
    lines = ["", f"**D against its FHIR queries**: the slowest single query is {slowest.median_ms:.1f} ms "
             f"({slowest.key}, {slowest.resources} resources; median of {results.plan.query_repeats} GETs in a "
             f"row to sekmet, nothing else running); all {len(results.timings)} queries one after another take "
             f"{together:.1f} ms."]
    if ratio is not None:
        lines[-1] += (f" D's p50 at 1 connection is {d.single_p50:.1f} ms = **{ratio:.2f}×** "
                      f"(target ≤ 1.3: {_mark(ratio <= 1.3)}); at {CONNECTIONS} connections "
                      f"{d.p50:.1f} ms ({d.p50 / slowest.median_ms:.1f}×, mostly queueing for "
                      f"{results.plan.workers} workers), and {d.single_p50 / together:.2f}× the sum of the "
                      "queries.")
    if results.parallel_ms is not None:
        lines[-1] += (f" A bare client sending all {len(results.timings)} at once (a thread each, parsed with "
                      f"json, nothing else running) takes {results.parallel_ms:.1f} ms, "
                      f"{results.parallel_ms / slowest.median_ms:.2f}× the slowest: the least D can take here, "
                      "as the queries share sekmet's CPUs")
        lines[-1] += f"; D's p50 is {d.single_p50 / results.parallel_ms:.2f}× that." if ratio is not None else "."
    lines += ["", "| Query (D, no prefetch) | Resources | Next page? | Median ms |", "|---|---:|---|---:|"]
    lines += [f"| {t.key} | {t.resources} | {'yes' if t.more_pages else 'no'} | {t.median_ms:.1f} |"
              for t in results.timings]
    return lines


def _memory_lines(results: Results) -> list[str]:
    drift = results.drift
    if drift is None:
        return []
    first, total = drift.counts
    per_worker = ", ".join(f"{kb / 1024:.0f} → {drift.late_kb.get(pid, 0) / 1024:.0f} MB"
                           for pid, kb in sorted(drift.early_kb.items()))
    return ["", f"**Memory drift** on workload {drift.reason}; a fresh service, 4 connections: worker RSS "
            f"after {first:,} calls {sum(drift.early_kb.values()) / 1024:.0f} MB, after {total:,} calls "
            f"{sum(drift.late_kb.values()) / 1024:.0f} MB: **{drift.change:+.1f}%** (per worker: {per_worker}; "
            f"target ≤ {MEMORY_TARGET:.0f}%: {_mark(abs(drift.change) <= MEMORY_TARGET)})."]


# ---- main ----------------------------------------------------------------------------------------------------

def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every server started is stopped


def benchmark(results: Results, stack: ExitStack) -> None:
    plan = results.plan
    say("step 1: tools")
    ensure_project_importable()
    generator = ensure_load_generator(plan.loadgen)
    results.generator, results.gunicorn = generator.describe(), ensure_gunicorn(plan)
    sekmet = ensure_sekmet()
    say(f"load generator: {results.generator}; gunicorn {results.gunicorn}; sekmet {sekmet}")
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crs-cds-bench-")))
    results.code = use_source(plan, workdir)
    say(f"service code: {results.code}")

    say("step 2: request bodies, FHIR server, service and reference")
    fhir, fhir_base_url = start_sekmet(sekmet, workdir)
    stack.callback(fhir.stop)
    service = start_service(plan, workdir, fhir_base_url)
    stack.callback(service.stop)
    reference = start_reference(plan, workdir)
    stack.callback(reference.stop)
    from workloads import build_workloads, icu_transaction, resource_counts, write_bodies

    now = datetime.now(timezone.utc).replace(microsecond=0)
    results.workloads = build_workloads(now, fhir_base_url)
    write_bodies(results.workloads, workdir)
    for workload in results.workloads:
        say(f"  body {workload.name}: {_kb(workload.size)} ({resource_counts(workload)})")
    fhir.wait_ready()
    load_into_fhir(fhir_base_url, icu_transaction(now))
    service.wait_ready()
    reference.wait_ready()

    say("step 3: one checked call per workload")
    latencies = preflight(results.workloads, service, reference, results.notes)

    say("step 4: measurements")
    results.timings, results.parallel_ms = time_fhir_queries(fhir_base_url, results.workloads[3].body["context"],
                                                             plan.query_repeats)
    warm_up(generator, results, service, reference, fhir)
    measure_workloads(generator, results, service, reference, fhir, latencies)
    if isinstance(generator, loadgen.Hey):
        results.notes.append("hey does not show answer bodies: degraded answers were looked for only in the "
                             "checked calls")
    service.stop()
    reference.stop()
    results.drift = memory_drift(results, workdir, fhir_base_url, stack)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    results = Results(plan)
    status = 0
    try:
        with ExitStack() as stack:  # stops every server we started, whatever happens
            benchmark(results, stack)
    except BenchmarkError as error:
        results.aborted, status = str(error), 1
    except KeyboardInterrupt:
        results.aborted, status = "interrupted", 130
    if results.aborted:
        say(f"ABORTED: {results.aborted}")
    if results.stats:
        report = render_report(results)
        print()
        print(report)
        plan.output.write_text(report, encoding="utf-8")
        say(f"written to {plan.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
