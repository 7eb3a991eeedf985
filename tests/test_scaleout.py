"""Scale-out, proven on loopback: a private PostgreSQL cluster, two instances of the service under
gunicorn (the shipped configuration) sharing it, and nginx (the shipped site file) balancing them.

What must hold: a token used at one instance is refused at the other; feedback sent to any instance
is counted once in one report; killing an instance mid-load costs only the calls it was answering;
slow clients (slowloris) and hostile bodies leave normal calls answered.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.examples import hook_request
from cds_service.scenarios import by_name
from servers import Gunicorn, Nginx

ISS = "https://ehr.example.org/cds-client"
KEY = ec.generate_private_key(ec.SECP384R1())
SERVICE = "/cds-services/crs-icans-assessment"
SCENARIO = "crs3-norepi-vaso"


class Cluster:
    def __init__(self, workdir, postgres):
        self.workdir = workdir
        self.postgres = postgres
        issuers = workdir / "issuers.json"
        jwk = {**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
        issuers.write_text(json.dumps({ISS: {"jwks": {"keys": [jwk]}}}))
        self.env = {"CRS_CDS_DATABASE_URL": postgres.url, "CRS_CDS_TRUSTED_ISSUERS_FILE": str(issuers),
                    "CRS_CDS_WORKERS": "2", "CRS_CDS_THREADS": "4"}
        self.instances = [Gunicorn(workdir, dict(self.env), f"instance-{n}") for n in (1, 2)]
        self.nginx = Nginx(workdir, [i.base.removeprefix("http://") for i in self.instances])
        self.now = datetime.now(timezone.utc).replace(microsecond=0)
        self.body = hook_request(by_name(SCENARIO), self.now)

    def headers(self, base: str) -> dict[str, str]:
        # No external_base_url: the aud is the URL called, as each instance sees it (nginx passes Host).
        now = int(time.time())
        token = jwt.encode({"iss": ISS, "aud": base + SERVICE, "iat": now, "exp": now + 300,
                            "jti": str(uuid.uuid4())}, KEY, algorithm="ES384", headers={"kid": "k1", "typ": "JWT"})
        return {"Authorization": f"Bearer {token}"}

    def call(self, base: str | None = None, timeout: float = 30) -> requests.Response:
        base = base or self.nginx.base
        body = dict(self.body, hookInstance=str(uuid.uuid4()))
        return requests.post(base + SERVICE, json=body, headers=self.headers(base), timeout=timeout)

    def close(self):
        self.nginx.close()
        for instance in self.instances:
            instance.close()


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    made = Cluster(tmp_path_factory.mktemp("scaleout"), postgres)
    yield made
    made.close()


def test_both_instances_are_ready_on_the_shared_database(cluster):
    for instance in cluster.instances:
        ready = requests.get(instance.base + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok"}
    assert cluster.call().status_code == 200


def test_a_token_replayed_to_another_instance_is_refused(cluster):
    first, second = cluster.instances
    nginx = cluster.nginx.base
    # The same token, and the same audience for both instances: nginx's address.
    headers = cluster.headers(nginx)
    body = dict(cluster.body, hookInstance=str(uuid.uuid4()))
    host = {"Host": nginx.removeprefix("http://")}
    assert requests.post(first.base + SERVICE, json=body, headers={**headers, **host}, timeout=30).status_code == 200
    assert requests.post(second.base + SERVICE, json=body, headers={**headers, **host}, timeout=30).status_code == 401
    assert requests.post(nginx + SERVICE, json=body, headers=headers, timeout=30).status_code == 401
    assert requests.post(first.base + SERVICE, json=body, headers={**headers, **host}, timeout=30).status_code == 401


def test_feedback_sent_to_any_instance_appears_once_in_one_report(cluster):
    answers = [cluster.call(base) for base in (cluster.instances[0].base, cluster.instances[1].base)]
    for answer in answers:
        assert answer.status_code == 200
    cards = [card for answer in answers for card in answer.json()["cards"]]
    assert len(cards) >= 2
    topics = {}
    for card in cards:
        topics[card["source"]["topic"]["code"]] = topics.get(card["source"]["topic"]["code"], 0) + 1
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    targets = [cluster.instances[0].base, cluster.instances[1].base, cluster.nginx.base]
    for index, card in enumerate(cards):
        item = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": stamp}
        # Each item sent twice, to two different instances: stored once, once a duplicate.
        for base in (targets[index % 3], targets[(index + 1) % 3]):
            path = SERVICE + "/feedback"
            answer = requests.post(base + path, json={"feedback": [item]}, timeout=30,
                                   headers={"Host": cluster.nginx.base.removeprefix("http://"),
                                            **_feedback_headers(cluster, path)})
            assert answer.status_code == 200, answer.text
    report = subprocess.run([sys.executable, "-m", "cds_service.cli", "feedback-report", "--json", "--db",
                             cluster.postgres.url], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rows = {row["topic"]: row for row in json.loads(report.stdout)}
    assert "unknown" not in rows  # every card's topic was written before its answer left
    for topic, count in topics.items():
        assert rows[topic]["accepted"] == count


def _feedback_headers(cluster, path: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": cluster.nginx.base + path, "iat": now, "exp": now + 300,
                        "jti": str(uuid.uuid4())}, KEY, algorithm="ES384", headers={"kid": "k1", "typ": "JWT"})
    return {"Authorization": f"Bearer {token}"}


def test_metrics_through_nginx_sum_every_worker(cluster):
    metrics = requests.get(cluster.nginx.base + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'crs_cds_calls_total{outcome="ok",service="crs-icans-assessment",status="200"}' in metrics.text
    assert "crs_cds_call_seconds_bucket" in metrics.text


# -- hostile clients through nginx ----------------------------------------------------------------------

def _slowloris(port: int, stop: threading.Event, closed_by_server: list[bool]) -> None:
    """Headers at one byte a second until nginx gives up on us (or the test ends)."""
    request = (f"POST {SERVICE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               "X-Padding: " + "a" * 64 + "\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            for byte in request:
                if stop.wait(1.0):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    closed_by_server.append(True)
                    return
                sock.setblocking(False)
                try:
                    if sock.recv(1024) == b"":
                        closed_by_server.append(True)
                        return
                except BlockingIOError:
                    pass
                except OSError:
                    closed_by_server.append(True)
                    return
                finally:
                    sock.setblocking(True)
    except OSError:
        closed_by_server.append(True)


def _slow_body(cluster, stop: threading.Event, answers: list[int | None]) -> None:
    """A client with a valid token whose body comes a byte a second."""
    host = cluster.nginx.base.removeprefix("http://")
    token = cluster.headers(cluster.nginx.base)["Authorization"]
    head = (f"POST {SERVICE} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
    with socket.create_connection(("127.0.0.1", cluster.nginx.port), timeout=20) as sock:
        sock.sendall(head)
        while not stop.wait(1.0):
            try:
                sock.send(b" ")
            except OSError:
                break
        sock.settimeout(5)
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    answers.append(int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None)


def test_slowloris_leaves_normal_calls_answered(cluster):
    stop = threading.Event()
    closed: list[bool] = []
    slow_answers: list[int | None] = []
    attackers = [threading.Thread(target=_slowloris, args=(cluster.nginx.port, stop, closed)) for _ in range(10)]
    attackers += [threading.Thread(target=_slow_body, args=(cluster, stop, slow_answers)) for _ in range(2)]
    for attacker in attackers:
        attacker.start()
    try:
        statuses = []
        deadline = time.monotonic() + 7  # past nginx's 5 s client_header_timeout
        while time.monotonic() < deadline:
            statuses.append(cluster.call(timeout=10).status_code)
            time.sleep(0.2)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(10)
    assert statuses and set(statuses) == {200}, statuses
    assert len(closed) == 10  # nginx closed every slow connection (client_header_timeout)
    # The slow bodies never reached an instance: nginx holds them, and ends them at its own pace.
    assert len(slow_answers) == 2 and all(status in (None, 408) for status in slow_answers), slow_answers


def test_a_token_as_long_as_the_service_allows_passes_nginx_and_gunicorn(cluster):
    from cds_service.hooks.auth import MAX_TOKEN_CHARS

    answer = requests.post(cluster.nginx.base + SERVICE, json={}, timeout=10,
                           headers={"Authorization": "Bearer " + "a" * (MAX_TOKEN_CHARS - 10)})
    assert answer.status_code == 401  # the service's refusal: not nginx's 400 nor gunicorn's 431


def _raw(port: int, data: bytes, wait: float = 15) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def test_hostile_bodies_through_nginx_leave_normal_calls_answered(cluster):
    nginx = cluster.nginx
    path = SERVICE + "/feedback"
    host = nginx.base.removeprefix("http://")
    nulls = b'{"feedback": [' + b",".join([b"null"] * 1_000_000) + b"]}"
    assert requests.post(nginx.base + path, data=nulls, headers=_feedback_headers(cluster, path),
                         timeout=60).status_code == 400
    huge = json.dumps(cluster.body).replace('"hook"', '"n": ' + "9" * 400 + ', "hook"', 1)
    assert requests.post(nginx.base + SERVICE, data=huge, headers=cluster.headers(nginx.base),
                         timeout=30).status_code == 400
    too_big = b'{"feedback": [], "x": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert requests.post(nginx.base + path, data=too_big, headers=_feedback_headers(cluster, path),
                         timeout=60).status_code == 413  # nginx's client_max_body_size
    chunked = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
               "Content-Type: application/json\r\n\r\n").encode()
    for framing in (b"zz\r\n{}\r\n0\r\n\r\n", b"-5\r\n{}\r\n0\r\n\r\n", b"100000000000000000000\r\n{}"):
        assert _raw(nginx.port, chunked + framing) in (400, 413)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: cluster.call().status_code, range(12)))
    assert set(statuses) == {200}


# -- last: an instance killed mid-load --------------------------------------------------------------------

def test_a_killed_worker_leaves_a_trace_in_the_log(cluster):
    instance = cluster.instances[1]
    [victim, *_] = instance.worker_pids()
    import os
    import signal

    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and f'"event": "worker-exit", "pid": {victim}' not in instance.log_text():
        time.sleep(0.1)
    assert f'"event": "worker-exit", "pid": {victim}' in instance.log_text()
    assert f"Worker (pid:{victim}) was sent SIGKILL" in instance.log_text()  # gunicorn's own line
    while time.monotonic() < deadline and len(instance.worker_pids()) < 2:
        time.sleep(0.1)  # gunicorn starts a new worker
    assert cluster.call().status_code == 200


def test_an_instance_killed_mid_load_costs_only_its_in_flight_calls(cluster):
    concurrency = 4
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    cards: list[str] = []

    def load():
        while not stop.is_set():
            try:
                answer = cluster.call(timeout=30)
                status = answer.status_code
            except requests.RequestException:
                status = 0
            with lock:
                results.append((time.monotonic(), status))
                if status == 200:
                    cards.extend(card["uuid"] for card in answer.json()["cards"])

    workers = [threading.Thread(target=load) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        cluster.instances[1].kill()
        killed_at = time.monotonic()
        time.sleep(4)
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    failures = [status for _, status in results if status != 200]
    after = [status for at, status in results if at > killed_at + 1]
    assert len(results) > 20
    # At most one call per client thread was in flight on the killed instance; every other call
    # (and every call after) was answered by the surviving one.
    assert len(failures) <= concurrency, failures
    assert after and set(after) == {200}
    # Every card that reached a client has its topic in the database (none was queued in memory).
    import sqlalchemy

    engine = sqlalchemy.create_engine(cluster.postgres.url)
    with engine.connect() as connection:
        stored = {row[0] for row in connection.execute(sqlalchemy.text("SELECT card_uuid FROM card_topic"))}
    engine.dispose()
    assert cards and set(cards) <= stored
