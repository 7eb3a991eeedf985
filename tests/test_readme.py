"""The README, command by command, on a fresh copy of this checkout.

Every ``sh`` block of README.md is run here. The checkout's tracked and new files are copied into a
temporary folder (what a clone holds), the quick start's own commands make a new virtual
environment there and ``pip install .`` into it (once for this module: every later block uses that
install), and each block then runs in ``bash`` from that folder, as written, except for these
substitutions, each named where it is made:

- port 8080 becomes a free port (8080 may be taken on the machine running the tests);
- the FHIR servers of the examples (``http://127.0.0.1:8081/fhir``, ``https://fhir.example.org/r4``
  and its patients 12345 and 67890) become the test session's sekmet server and two scenario patients;
- ``make test`` runs as ``make -n test`` (running the test suite inside itself would recurse): the
  test checks that it runs ruff, mypy and pytest, in that order;
- the production block needs root and changes the machine (apt-get, /etc, /opt, the system's nginx
  and PostgreSQL): each of its lines is run with the same programs and files under a temporary
  folder instead (``_production_line`` says how for each); only ``apt-get`` is not run (``make test``
  installs those packages).

A line this module does not know fails the test: a new command in the README needs a runner here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from cds_service.scenarios import by_name
from cds_service.settings import Settings

from servers import NGINX, POSTGRES_BIN, Postgres, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
SURVEYED = ("crs3-norepi-vaso",)   # stands in for the README's patient 12345
SITE_ROWS = "urn:oid:1.2.840.114350.1.13.0.1.7.2.707679"   # an Epic-style flowsheet row system


def readme_blocks() -> list[str]:
    return [textwrap.dedent(body) for _, body in BLOCK.findall(README.read_text(encoding="utf-8"))]


def command_lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def block_starting(prefix: str) -> str:
    found = [b for b in readme_blocks() if b.startswith(prefix)]
    assert len(found) == 1, f"README: expected one sh block starting {prefix!r}, found {len(found)}"
    return found[0]


KNOWN_BLOCKS = {
    "python3 -m venv .venv": "quick start",
    "make test": "tests",
    ".venv/bin/crs-cds scenarios requests": "serve and call",
    ".venv/bin/crs-cds prefetch": "install sheet",
    ".venv/bin/crs-cds codes survey": "codes survey",
    ".venv/bin/crs-cds scenarios load": "CDS Hooks Sandbox",
    "apt-get update": "production",
}


def test_every_readme_shell_block_has_a_runner_here():
    blocks = readme_blocks()
    assert len(blocks) == len(KNOWN_BLOCKS)
    for block in blocks:
        assert sum(block.startswith(prefix) for prefix in KNOWN_BLOCKS) == 1, f"no runner for:\n{block}"


def test_the_readme_is_for_installers_not_history():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert not re.search(r"\bissues?\b|decisions\.md", text, re.IGNORECASE)


def test_the_configuration_table_lists_every_setting():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Configuration"):text.index("## Production deployment")]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
    assert sorted(listed) == sorted(f.name for f in fields(Settings))


def test_the_shipped_settings_template_loads():
    from cds_service import cli

    template = Path(cli.__file__).parent / "settings.example.json"
    settings = Settings.load(template, env={})
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
    assert settings.external_base_url == "https://cds.example.org" and settings.auth_enabled


# ---- A fresh copy, installed by the quick start ------------------------------------------------------

def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CRS_CDS_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR")}
    return {**env, **extra}


def bash(script: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """A README block in bash, stopping at the first failing command; its process group is ended
    whatever happens (a server it left running included)."""
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=_clean_env(**env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def substitute(text: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in text, f"README no longer holds {old!r}: update tests/test_readme.py"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The checkout's files as a clone has them (tracked and new, not ignored ones)."""
    target = tmp_path_factory.mktemp("readme") / "crs-cds"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def quick_start(clone) -> subprocess.CompletedProcess:
    """The quick start as written: venv, pip install . (from PyPI), write the scenarios, grade one."""
    return bash(block_starting("python3 -m venv .venv"), clone, timeout=600)


def test_quick_start_installs_and_grades_a_scenario(quick_start, clone):
    assert quick_start.returncode == 0, quick_start.stderr[-3000:]
    assert (clone / ".venv" / "bin" / "crs-cds").exists()
    assert (clone / "scenarios" / "crs3-norepi-vaso.json").exists()
    assert "CRS grade 3" in quick_start.stdout and "ICANS grade 1" in quick_start.stdout


def test_make_test_runs_lint_then_pytest(clone):
    # Substituted: `make -n test` (the suite running itself would recurse).
    assert block_starting("make test").strip() == "make test"
    result = subprocess.run(["make", "-n", "test"], cwd=clone, env=_clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ruff = result.stdout.index("ruff check cds_service tests benchmarks")
    mypy = result.stdout.index("mypy cds_service")
    assert ruff < mypy < result.stdout.index("-m pytest")


def _readme_card() -> tuple[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    summary = re.search(r"^> \*\*(.+?)\*\* \(critical\)$", text, re.MULTILINE).group(1)
    labels = re.findall(r"\[([^\]]+)\]", re.search(r"^> Suggestions: (.+)$", text, re.MULTILINE).group(1))
    return summary, labels


def test_serve_and_call_answers_with_the_card_the_readme_shows(quick_start, clone):
    assert quick_start.returncode == 0
    port = str(free_port())
    script = substitute(block_starting(".venv/bin/crs-cds scenarios requests"), ("8080", port))
    result = bash(script, clone, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout[result.stdout.index('{"cards"'):].splitlines()[0])
    card = answer["cards"][0]
    summary, labels = _readme_card()
    assert card["summary"] == summary
    assert [s["label"] for s in card["suggestions"]] == labels
    assert (clone / "requests" / "order-sign-gm-csf.json").exists()
    with socket.socket() as probe:  # `kill %1` stopped the server
        assert probe.connect_ex(("127.0.0.1", int(port))) != 0


def test_install_sheet_for_epic_and_oracle_health(quick_start, clone):
    assert quick_start.returncode == 0
    result = bash(block_starting(".venv/bin/crs-cds prefetch"), clone)
    assert result.returncode == 0, result.stderr
    epic, oracle = result.stdout.split("Prefetch templates for ")[1:]
    assert epic.startswith("epic") and "category=vital-signs" in epic
    assert oracle.startswith("oracle-health") and "_sort" not in oracle and "_count=500" not in oracle
    assert epic.count("FHIR scopes (SMART v2): ") == 1 and "patient/Observation.rs" in epic


@pytest.fixture(scope="module")
def loaded_fhir(quick_start, clone, fhir_server) -> str:
    """The Sandbox block's first line: every scenario loaded into a FHIR server (the session's sekmet)."""
    line = command_lines(block_starting(".venv/bin/crs-cds scenarios load"))[0]
    result = bash(substitute(line, ("http://127.0.0.1:8081/fhir", fhir_server.base_url)), clone, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "loaded crs3-norepi-vaso" in result.stdout
    return fhir_server.base_url


def test_codes_survey_of_two_patients_writes_site_valuesets(loaded_fhir, clone, fhir_server):
    # The second patient is charted in a site's own flowsheet row (an ICE score), as at a real site.
    site_patient = f"readme-site-{uuid.uuid4().hex[:8]}"
    taken = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")
    fhir_server.load_resources([
        {"resourceType": "Patient", "id": site_patient, "birthDate": "1965-01-01"},
        {"resourceType": "Observation", "id": f"{site_patient}-ice", "status": "final",
         "code": {"coding": [{"system": SITE_ROWS, "code": "3041802", "display": "ICE Score"}], "text": "ICE Score"},
         "subject": {"reference": f"Patient/{site_patient}"}, "effectiveDateTime": taken, "valueInteger": 5}])
    script = substitute(block_starting(".venv/bin/crs-cds codes survey"),
                        ("https://fhir.example.org/r4", loaded_fhir),
                        ("--patient 12345", f"--patient {SURVEYED[0]}"), ("--patient 67890", f"--patient {site_patient}"))
    result = bash(script, clone)
    assert result.returncode == 0, result.stderr
    assert "http://loinc.org|8310-5" in result.stdout  # body temperature, mapped
    assert f"{SITE_ROWS}|3041802" in result.stdout  # the site row, to review
    written = list((clone / "site-valuesets").glob("*.json"))
    assert written and any("3041802" in path.read_text() for path in written)


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 30, **kwargs) -> requests.Response:
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        try:
            return requests.get(url, timeout=2, **kwargs)
        except requests.RequestException:
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds} s"
            time.sleep(0.2)


def _start(script: str, cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", "-c", script], cwd=cwd, env=_clean_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_sandbox_settings_serve_with_authentication_on(loaded_fhir, clone, tmp_path):
    line = command_lines(block_starting(".venv/bin/crs-cds scenarios load"))[1]
    port = free_port()
    server = _start(substitute(line, ("8080", str(port))), clone, tmp_path / "serve.log")
    try:
        assert _wait_for(f"http://127.0.0.1:{port}/healthz", server).status_code == 200
        # The Sandbox's key is trusted (examples/dev-settings.json): a call without its JWT is refused.
        assert requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=5).status_code == 401
    finally:
        _stop(server)


# ---- Production, as root on Debian: the same steps under a temporary folder -------------------------

def _production_line(line: str, work: Path, clone: Path, ports: dict[str, int], pg: Postgres) -> str | None:
    """The command run for one README line (None: not run, with the reason in the comment)."""
    paths = (("/etc/crs-cds", str(work / "etc")), ("/etc/ssl/crs-cds", str(work / "ssl")),
             ("/opt/crs-cds", str(clone / ".venv")))

    def moved(text: str) -> str:
        for old, new in paths:
            text = text.replace(old, new)
        return text

    if line.startswith("apt-get "):
        return None  # needs root and changes the machine; `make test` installs these packages
    if line.startswith("pg_lsclusters"):
        return None  # the system's cluster is left alone: the fixture started a private one (pg)
    if line.startswith("runuser -u postgres -- psql "):
        return substitute(line, ("runuser -u postgres -- psql ", f"psql -h 127.0.0.1 -p {pg.port} -U postgres "))
    if line.startswith("python3 -m venv /opt/crs-cds && "):
        # The quick start's environment stands in for /opt/crs-cds; the production extra is installed into it.
        return substitute(line, ("python3 -m venv /opt/crs-cds && /opt/crs-cds/bin/pip", ".venv/bin/pip"))
    if line.startswith("mkdir -p /etc/crs-cds"):
        return moved(line) + (  # then the edits the README asks for: the database and the issuers file
            f" && sed -i -e 's/127.0.0.1:5432/127.0.0.1:{pg.port}/' -e 's|/etc/crs-cds|{work / 'etc'}|'"
            f" {work / 'etc' / 'settings.json'}")
    if line.startswith("CRS_CDS_CONFIG="):  # in the foreground of its own process group, so it can be stopped
        return substitute(moved(line), ("127.0.0.1:8080", f"127.0.0.1:{ports['gunicorn']}"), (" --daemon", ""))
    if line.startswith("mkdir -p /etc/ssl/crs-cds"):
        return moved(line)
    if line.startswith("cp deploy/nginx.conf"):
        return None  # the system's nginx is left alone: _private_nginx runs the same site file
    if line.startswith("until curl"):
        return substitute(line, ("cds.example.org:443:", f"cds.example.org:{ports['nginx']}:"),
                          ("https://cds.example.org/", f"https://cds.example.org:{ports['nginx']}/"),
                          ("sleep 1", "sleep 0.2"))
    if "crs-cds feedback-report" in line:
        return moved(line)
    raise AssertionError(f"no runner for the production line: {line}")


def _private_nginx(work: Path, ports: dict[str, int]) -> tuple[Path, list[str]]:
    """deploy/nginx.conf as shipped but for its addresses and certificate paths, in an nginx of its own."""
    site = substitute((REPO_ROOT / "deploy" / "nginx.conf").read_text(),
                      ("listen 443 ssl;", f"listen 127.0.0.1:{ports['nginx']} ssl;"),
                      ("server 127.0.0.1:8080", f"server 127.0.0.1:{ports['gunicorn']}"),
                      ("/etc/ssl/crs-cds", str(work / "ssl")))
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "crs-cds.conf").write_text(site)
    temps = "".join(f"  {kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'logs' / 'error.log'};\nevents {{}}\n"
        f"http {{\n  access_log off;\n{temps}  include {prefix / 'crs-cds.conf'};\n}}\n")
    user = "daemon off; user root;" if os.geteuid() == 0 else "daemon off;"
    return prefix, [str(NGINX), "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", user]


def test_production_deployment_steps(quick_start, clone, tmp_path):
    assert quick_start.returncode == 0
    for program in (NGINX, POSTGRES_BIN / "initdb", Path(shutil.which("openssl") or "/usr/bin/openssl")):
        assert program.exists(), f"{program} is missing: `make test` installs it (apt-get)"
    work = tmp_path
    ports = {"gunicorn": free_port(), "nginx": free_port()}
    pg = Postgres()
    running: list[subprocess.Popen] = []
    try:
        for line in command_lines(block_starting("apt-get update")):
            command = _production_line(line, work, clone, ports, pg)
            if command is None:
                continue
            if line.startswith("CRS_CDS_CONFIG="):
                gunicorn = _start(command, clone, work / "gunicorn.log")
                running.append(gunicorn)
                assert _wait_for(f"http://127.0.0.1:{ports['gunicorn']}/healthz", gunicorn).status_code == 200
                continue
            result = bash(command, clone, timeout=300)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            if line.startswith("mkdir -p /etc/ssl/crs-cds"):  # the certificate exists: nginx can start
                prefix, nginx = _private_nginx(work, ports)
                check = subprocess.run([*nginx[:-2], "-t"], capture_output=True, text=True)
                assert check.returncode == 0, check.stderr  # `nginx -t`
                running.append(subprocess.Popen(nginx, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL, start_new_session=True))
            if line.startswith("until curl"):  # through nginx over TLS: the service and its database are ready
                assert json.loads(result.stdout.strip()) == {"status": "ok", "database": "ok"}, result.stdout
        # The settings file is the shipped template, as edited: the service runs on PostgreSQL.
        settings = Settings.load(work / "etc" / "settings.json", env={})
        assert settings.database_url == f"postgresql+psycopg://crs:change-me@127.0.0.1:{pg.port}/crs"
    finally:
        for process in reversed(running):
            _stop(process)
        pg.close()


def test_scenario_patients_stand_in_for_the_readme_ones():
    assert all(by_name(name) for name in SURVEYED)
