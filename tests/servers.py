"""Real servers in their own processes, on loopback, for the tests and the benchmarks: the service
under gunicorn (the shipped configuration), nginx (the shipped site file), a private PostgreSQL."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 30.0


class ServerError(RuntimeError):
    """A server that could not be started; the message says why (and what to install)."""


def _fail(message: str):
    raise ServerError(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_free_port = free_port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, seconds: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            _fail(f"{url}: the server exited with code {process.returncode}; log tail:\n{_tail(log_path)}",
                        pytrace=False)
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            _fail(f"{url} did not answer within {seconds:.0f} s; log tail:\n{_tail(log_path)}")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen, seconds: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=seconds)


class Gunicorn:
    """The service under gunicorn with the shipped configuration (cds_service/gunicorn_conf.py)."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str = "gunicorn",
                 args: tuple[str, ...] = ("-c", "python:cds_service.gunicorn_conf")):
        import sys

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        metrics_dir = workdir / f"{name}-metrics"
        metrics_dir.mkdir(exist_ok=True)
        # The checkout's code, as in the test process itself (not a copy installed earlier).
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CRS_CDS_BIND": f"127.0.0.1:{self.port}",
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", *(a.replace("{bind}", f"127.0.0.1:{self.port}") for a in args)],
                cwd=workdir,
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_http(self.base + "/healthz", self.process, self.log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def kill(self) -> None:
        """SIGKILL to the master and its workers at once: the instance dies mid-call."""
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        stop_process(self.process)


NGINX = Path("/usr/sbin/nginx")
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


class Nginx:
    """A private nginx running the shipped site file (deploy/nginx.conf) on a loopback port:
    TLS is replaced by plain HTTP on 127.0.0.1, the upstream by ``backends``; every other line as shipped."""

    def __init__(self, workdir: Path, backends: list[str]):
        if not NGINX.is_file():
            _fail(f"{NGINX} is missing: install Debian's nginx (`apt-get install -y nginx`; "
                        "`make test` does it)")
        self.dir = workdir / "nginx"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        site = []
        for line in (REPO_ROOT / "deploy" / "nginx.conf").read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("server 127.0.0.1:8080"):
                site += [f"    server {backend} max_fails=1 fail_timeout=5s;" for backend in backends]
            elif stripped == "listen 443 ssl;":
                site.append(f"    listen 127.0.0.1:{self.port};")
            elif stripped.startswith("ssl_"):
                continue
            else:
                site.append(line)
        (self.dir / "site.conf").write_text("\n".join(site) + "\n")
        temp = self.dir / "temp"
        temp.mkdir(exist_ok=True)
        (self.dir / "nginx.conf").write_text(
            f"worker_processes 1;\npid {self.dir / 'nginx.pid'};\nerror_log {self.dir / 'logs' / 'error.log'} info;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  access_log {self.dir / 'logs' / 'access.log'};\n"
            + "".join(f"  {kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"  include {self.dir / 'site.conf'};\n}}\n")
        self.log_path = self.dir / "logs" / "error.log"
        with open(self.dir / "stderr.log", "ab") as log:
            self.process = subprocess.Popen([str(NGINX), "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir),
                                             "-g", "daemon off; user root;" if os.geteuid() == 0 else "daemon off;"],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_http(self.base + "/healthz", self.process, self.dir / "stderr.log")

    def close(self) -> None:
        stop_process(self.process)


class Postgres:
    """A private PostgreSQL 15 cluster in a temporary folder on a free loopback port (initdb runs as
    the ``postgres`` user when the tests run as root: initdb refuses root)."""

    def __init__(self):
        initdb = POSTGRES_BIN / "initdb"
        if not initdb.is_file():
            _fail(f"{initdb} is missing: the PostgreSQL 15 server binaries are needed "
                        "(`apt-get install -y postgresql`; `make test` does it)")
        import pwd
        import shutil
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="crs-cds-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
            pwd.getpwnam("postgres")
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run([*self.as_user, str(initdb), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, cwd=self.dir)
        subprocess.run([*self.as_user, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
                        str(self.dir / "log"), "-w", "-o",
                        f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, cwd=self.dir)

    def close(self) -> None:
        import shutil

        if not self.dir.exists():
            return  # stopped already
        subprocess.run([*self.as_user, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
