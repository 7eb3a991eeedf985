"""Shared fixtures.

``fhir_server``: a real FHIR R4 server (sekmet-fhir) for the whole test session, on a free
loopback port, with its data in a temporary folder. Install it with ``make fhir-server``; the
Makefile passes its path in ``CRS_CDS_SEKMET``. Tests share the server, so each test module should
use its own patient ids (e.g. with a uuid in them).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEKMET = Path(".fhir-venv") / "bin" / "sekmet"
STARTUP_SECONDS = 30.0


def _sekmet_executable() -> Path | None:
    candidates = []
    configured = os.environ.get("CRS_CDS_SEKMET")
    if configured:
        path = Path(configured)
        candidates += [path] if path.is_absolute() else [REPO_ROOT / path, Path.cwd() / path]
    candidates.append(REPO_ROOT / DEFAULT_SEKMET)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class FhirServer:
    """A running sekmet-fhir server: ``base_url`` (ends in /fhir) and ``load(bundle)``."""

    def __init__(self, base_url: str, process: subprocess.Popen, log_path: Path):
        self.base_url = base_url
        self.process = process
        self.log_path = log_path

    def load(self, bundle: dict) -> dict:
        """POST a transaction (or batch) Bundle; asserts a 2xx answer and returns the response Bundle."""
        response = requests.post(self.base_url, json=bundle, timeout=30,
                                 headers={"Content-Type": "application/fhir+json",
                                          "Accept": "application/fhir+json"})
        assert 200 <= response.status_code < 300, (
            f"loading the Bundle into sekmet failed: {response.status_code} {response.text[:2000]}")
        return response.json()

    def load_resources(self, resources: list[dict]) -> dict:
        """The resources as one transaction of PUTs with their own ids."""
        return self.load({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]})

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory):
    executable = _sekmet_executable()
    if executable is None:
        pytest.fail("sekmet-fhir is not installed: run `make fhir-server` (or set CRS_CDS_SEKMET to the "
                    "sekmet executable); the FHIR integration tests need a real FHIR server", pytrace=False)
    workdir = tmp_path_factory.mktemp("sekmet")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    config = workdir / "sekmet.yaml"
    config.write_text(
        f"base_url: {base_url}\n"
        "host: 127.0.0.1\n"
        f"port: {port}\n"
        f"data_dir: {workdir / 'data'}\n"
        "simulator:\n  enabled: false\n"
        "log_inbound: false\n",
        encoding="utf-8",
    )
    log_path = workdir / "sekmet.log"
    env = dict(os.environ, SEKMET_CONFIG=str(config))
    with open(log_path, "wb") as log:
        # cwd in the temp folder: anything sekmet writes next to itself stays out of the checkout.
        process = subprocess.Popen([str(executable), "serve"], cwd=workdir, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"sekmet exited with code {process.returncode} before answering; log tail:\n"
                            f"{_tail(log_path)}", pytrace=False)
            try:
                if requests.get(f"{base_url}/metadata", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sekmet did not answer {base_url}/metadata within {STARTUP_SECONDS:.0f} s; "
                            f"log tail:\n{_tail(log_path)}", pytrace=False)
            time.sleep(0.1)
        yield FhirServer(base_url, process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# -- small real HTTP servers for fault injection --------------------------------------------------

class SeenRequest:
    def __init__(self, method: str, path: str, headers: dict[str, str]):
        self.method = method
        self.path = path
        self.headers = headers  # lower-case names


class LocalHttpServer:
    """A real HTTP server on 127.0.0.1 in a thread, answering with ``handler(request, server)``.

    The handler returns ``(status, body)`` or ``(status, body, headers)`` (body: bytes, str or a
    JSON-able object, sent as application/fhir+json), or ``None`` after writing the answer itself
    through ``request.raw`` (a ``BaseHTTPRequestHandler``). ``stop`` is an Event set at teardown:
    wait on it instead of sleeping, so slow handlers end with the test.
    """

    def __init__(self, handler):
        import json as _json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.requests: list[SeenRequest] = []
        self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                seen = SeenRequest("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
                seen.raw = self
                owner.requests.append(seen)
                try:
                    answer = handler(seen, owner)
                    if answer is None:
                        return
                    status, body, *rest = answer
                    headers = rest[0] if rest else {}
                    if not isinstance(body, (bytes, str)):
                        body = _json.dumps(body)
                    data = body.encode() if isinstance(body, str) else body
                    self.send_response(status)
                    self.send_header("Content-Type", headers.pop("Content-Type", "application/fhir+json"))
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_POST = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.origin = f"http://{host}:{port}"
        self.base_url = f"{self.origin}/fhir"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def local_http():
    """Factory: ``local_http(handler)`` starts a LocalHttpServer, stopped after the test."""
    servers: list[LocalHttpServer] = []

    def start(handler) -> LocalHttpServer:
        server = LocalHttpServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# -- the CDS service itself on a loopback port ---------------------------------------------------

class RunningService:
    """A Flask app served by a real HTTP server (werkzeug) on 127.0.0.1, in a thread."""

    def __init__(self, app):
        import threading

        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def state(self):
        return self.app.config["CRS_CDS"]

    def post(self, path: str, body, headers: dict[str, str] | None = None, **kwargs) -> requests.Response:
        import json as _json

        data = body if isinstance(body, (str, bytes)) else _json.dumps(body)
        return requests.post(self.base + path, data=data, timeout=30,
                             headers={"Content-Type": "application/json", **(headers or {})}, **kwargs)

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs) -> requests.Response:
        return requests.get(self.base + path, headers=headers or {}, timeout=30, **kwargs)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _serving():
    running: list[RunningService] = []

    def serve(app) -> RunningService:
        service = RunningService(app)
        running.append(service)
        return service

    return serve, running


@pytest.fixture
def serve_app():
    """Factory: ``serve_app(app)`` serves a Flask app on a loopback port until the test ends."""
    serve, running = _serving()
    yield serve
    for service in running:
        service.close()


@pytest.fixture(scope="module")
def serve_app_module():
    """``serve_app`` for module-scoped fixtures: the server lives until the module ends."""
    serve, running = _serving()
    yield serve
    for service in running:
        service.close()


@pytest.fixture
def summary_fetched_by_the_service(serve_app, tmp_path, fhir_server):
    """Factory: ``summary(patient_id, terminology_dirs)``, the main card's summary of a patient-view
    call with no prefetch, the service fetching everything from sekmet with those site ValueSets
    (a card even when nothing is wrong)."""
    import uuid

    from cds_service.app import create_app
    from cds_service.settings import Settings

    def summary(patient: str, terminology_dirs: list[str]) -> str:
        service = serve_app(create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False,
                                                terminology_dirs=terminology_dirs, fhir_budget_seconds=10,
                                                fhir_timeout_seconds=10, quiet_when_normal=False)))
        answer = service.post("/cds-services/crs-icans-assessment", {
            "hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": fhir_server.base_url,
            "context": {"patientId": patient, "userId": "Practitioner/1"}})
        assert answer.status_code == 200, answer.text
        return answer.json()["cards"][0]["summary"]

    return summary


# -- fuzzing: how many cases each run generated, shown at the end of every pytest run ---------------

FUZZ_COUNTS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def fuzz_counts(pytestconfig) -> dict:
    """``{run name: generated cases}``, filled by the fuzz tests and printed by pytest_terminal_summary."""
    return pytestconfig.stash.setdefault(FUZZ_COUNTS, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(FUZZ_COUNTS, None)
    if counts:
        terminalreporter.write_sep("-", f"fuzz cases generated: {sum(counts.values())}")
        for name, count in sorted(counts.items()):
            terminalreporter.write_line(f"{name}: {count}")


# -- real servers in their own processes: gunicorn, nginx, PostgreSQL (tests/servers.py) ----------

from servers import Gunicorn, Postgres  # noqa: E402


@pytest.fixture
def gunicorn_service(tmp_path):
    """Factory: ``gunicorn_service(**CRS_CDS_variables)`` starts the service under gunicorn."""
    started: list[Gunicorn] = []

    def start(name: str = "gunicorn", **env: str) -> Gunicorn:
        server = Gunicorn(tmp_path, {k: str(v) for k, v in env.items()}, name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server
    server.close()
