"""Hostile requests through real HTTP: bodies built to stall or bloat a worker, numbers out of range,
broken chunked framing, slow bodies, credentials that must not reach the log. Each is answered with
a 400 (never a 500 or no answer), appears in the call log line, and leaves the service answering.

Run against the development server (werkzeug, ``serve_app``) and against gunicorn with the shipped
configuration, whose body reader is a different piece of code."""
from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from datetime import datetime, timezone

import pytest
import requests

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.scenarios import by_name
from cds_service.settings import Settings

SERVICE = "/cds-services/crs-icans-assessment"
FEEDBACK = SERVICE + "/feedback"
SCENARIO = "crs3-norepi-vaso"


@pytest.fixture
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def service(serve_app, tmp_path):
    return serve_app(create_app(Settings(feedback_db=str(tmp_path / "feedback.sqlite3"), auth_enabled=False,
                                         body_read_timeout_seconds=1.0)))


@pytest.fixture
def gunicorn(gunicorn_service):
    return gunicorn_service(CRS_CDS_AUTH_ENABLED="false", CRS_CDS_BODY_READ_TIMEOUT_SECONDS="1",
                            CRS_CDS_WORKERS="1", CRS_CDS_THREADS="4")


def call_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name == "crs_cds.hooks" and r.getMessage().startswith('{"event": ')]


def raw_exchange(base: str, head: bytes, body_parts: list[bytes] = (), pause: float = 0.0,
                 wait: float = 15.0) -> bytes:
    """Send a request byte-exactly over a socket; the server's answer (up to ``wait`` seconds)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return answer


def status_of(answer: bytes) -> int | None:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def chunked_head(path: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def a_normal_call_is_answered(base: str, now: datetime) -> None:
    answer = requests.post(base + SERVICE, json=hook_request(by_name(SCENARIO), now), timeout=30)
    assert answer.status_code == 200 and answer.json()["cards"], answer.text[:500]


# -- bodies built to cost seconds and gigabytes -------------------------------------------------------

def test_five_megabytes_of_nulls_is_a_400(service, caplog):
    body = b'{"feedback": [' + b",".join([b"null"] * 1_000_000) + b"]}"
    assert len(body) < service.state.settings.max_body_bytes
    with caplog.at_level(logging.INFO):
        answer = service.post(FEEDBACK, body)
    assert answer.status_code == 400
    assert "more than" in answer.json()["issue"][0]["diagnostics"]
    [line] = [line for line in call_lines(caplog) if line["event"] == "feedback"]
    assert line["outcome"] == "400" and "more than" in line["reason"]


def test_two_megabytes_of_integers_in_a_hook_call_is_a_400(service, now, caplog):
    body = hook_request(by_name(SCENARIO), now)
    body["prefetch"]["flood"] = "@@"
    text = json.dumps(body).replace('"@@"', "[" + ",".join(["7"] * 1_000_000) + "]")
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, text)
    assert answer.status_code == 400, answer.text[:300]
    [line] = [line for line in call_lines(caplog) if line["event"] == "hook-call"]
    assert line["outcome"] == "400" and "more than" in line["reason"]


def test_a_feedback_body_of_many_invalid_items_is_refused_at_its_first_violation(service):
    # Within the shape limits, each item breaks the schema: jsonschema is asked for one error only.
    body = {"feedback": [{"card": 1, "outcome": "maybe"}] * 500, "x": [[None] * 1000] * 40}
    answer = service.post(FEEDBACK, body)
    assert answer.status_code == 400
    assert answer.json()["issue"][0]["diagnostics"].startswith("feedback.feedback.0")


@pytest.mark.parametrize("where, build, expected", [
    ("depth", lambda: {"feedback": [], "x": json.loads("[" * 100 + "]" * 100)}, "levels deep"),
    ("string", lambda: {"feedback": [], "x": "a" * 300_000}, "characters"),
    ("members", lambda: {"feedback": [], "x": {f"k{i}": i for i in range(3000)}}, "members"),
])
def test_shape_limits_are_a_400_naming_the_place(service, where, build, expected):
    answer = service.post(FEEDBACK, build())
    assert answer.status_code == 400
    diagnostics = answer.json()["issue"][0]["diagnostics"]
    assert expected in diagnostics and diagnostics.startswith("x")


# -- numbers out of range ---------------------------------------------------------------------------------

def _with_a_huge_value(body: dict) -> tuple[str, str]:
    """The first Observation's valueQuantity.value made a 400-digit integer; (JSON text, its path)."""
    for key, bundle in body["prefetch"].items():
        for index, entry in enumerate((bundle or {}).get("entry", [])):
            if "valueQuantity" in entry.get("resource", {}):
                entry["resource"]["valueQuantity"]["value"] = "@@"
                path = f"prefetch.{key}.entry.{index}.resource.valueQuantity.value"
                return json.dumps(body).replace('"@@"', "9" * 400), path
    raise AssertionError("the scenario has no valueQuantity")


def test_a_400_digit_integer_in_value_quantity_is_a_400_naming_the_field(service, now, caplog):
    text, path = _with_a_huge_value(hook_request(by_name(SCENARIO), now))
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, text)
    assert answer.status_code == 400, answer.text[:300]
    issue = answer.json()["issue"][0]
    assert issue["diagnostics"].startswith(path) and "out of range" in issue["diagnostics"]
    assert issue["expression"] == [path]
    [line] = [line for line in call_lines(caplog) if line["event"] == "hook-call"]
    assert line["outcome"] == "400" and path in line["reason"]
    a_normal_call_is_answered(service.base, now)


@pytest.mark.parametrize("number", ["1" + "0" * 400, "-" + "9" * 19, "1e400", "-1e999"])
def test_numbers_out_of_range_anywhere_are_a_400(service, now, number):
    body = hook_request(by_name(SCENARIO), now)
    body["context"]["extra"] = {"n": "@@"}
    answer = service.post(SERVICE, json.dumps(body).replace('"@@"', number))
    assert answer.status_code == 400
    assert answer.json()["issue"][0]["diagnostics"].startswith("context.extra.n: number out of range")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_constants_are_a_400(service, constant):
    answer = service.post(FEEDBACK, '{"feedback": [], "x": %s}' % constant)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["issue"][0]["diagnostics"]


# -- chunked framing and slow bodies, on both servers ---------------------------------------------------

FRAMINGS = {
    "size-zz": [b"zz\r\n{}\r\n0\r\n\r\n"],
    "size-negative": [b"-5\r\n{}\r\n0\r\n\r\n"],
    "size-2^80": [b"100000000000000000000\r\n{\"feedback\": []"],
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
@pytest.mark.parametrize("server", ["werkzeug", "gunicorn"])
def test_malformed_chunked_framing_is_a_400(request, server, framing, now):
    base = (request.getfixturevalue("service") if server == "werkzeug" else request.getfixturevalue("gunicorn")).base
    answer = raw_exchange(base, chunked_head(FEEDBACK), FRAMINGS[framing])
    assert status_of(answer) == 400, answer[:300]
    a_normal_call_is_answered(base, now)


@pytest.mark.parametrize("server", ["werkzeug", "gunicorn"])
def test_a_body_sent_a_byte_at_a_time_is_cut_off_with_a_400(request, server, now):
    target = request.getfixturevalue("service") if server == "werkzeug" else request.getfixturevalue("gunicorn")
    head = (f"POST {FEEDBACK} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode()
    # 40 bytes at 0.1 s: 4 s of sending against a 1 s body deadline (no single read ever times out).
    answer = raw_exchange(target.base, head, [b"{"] + [b" "] * 39, pause=0.1)
    assert status_of(answer) == 400, answer[:300]
    assert b"not received within 1 s" in answer
    a_normal_call_is_answered(target.base, now)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_body_of_nulls_does_not_bloat_a_gunicorn_worker(gunicorn):
    [worker] = gunicorn.worker_pids()
    body = b'{"feedback": [' + b",".join([b"null"] * 1_000_000) + b"]}"
    requests.post(gunicorn.base + FEEDBACK, data=b'{"feedback": []}', timeout=30)  # warm
    before = _rss_kib(worker)
    for _ in range(3):
        assert requests.post(gunicorn.base + FEEDBACK, data=body, timeout=60).status_code == 400
    # Parsing 5 MB of nulls costs tens of megabytes at most; jsonschema walking every null cost 1.46 GB.
    assert _rss_kib(worker) - before < 150 * 1024


def test_gunicorn_logs_every_refusal_in_the_call_line(gunicorn, now):
    text, path = _with_a_huge_value(hook_request(by_name(SCENARIO), now))
    assert requests.post(gunicorn.base + SERVICE, data=text, timeout=30).status_code == 400
    assert status_of(raw_exchange(gunicorn.base, chunked_head(SERVICE), FRAMINGS["size-zz"])) == 400
    a_normal_call_is_answered(gunicorn.base, now)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line[line.index("{"):]) for line in gunicorn.log_text().splitlines()
                 if '"event": "hook-call"' in line]
        if len(lines) >= 3:
            break
        time.sleep(0.1)
    assert [line["outcome"] for line in lines] == ["400", "400", "ok"]
    assert path in lines[0]["reason"] and "framing" in lines[1]["reason"]
    metrics = requests.get(gunicorn.base + "/metrics", timeout=10).text
    assert 'crs_cds_refusals_total{reason="number-out-of-range"} 1.0' in metrics
    assert 'crs_cds_refusals_total{reason="body-framing"} 1.0' in metrics


# -- header limits agree with the token limit -----------------------------------------------------------

def test_gunicorn_takes_a_token_as_long_as_the_service_allows(gunicorn_service, tmp_path):
    from cds_service.hooks.auth import MAX_TOKEN_CHARS

    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({"https://ehr.example.org": {"jwks_url": "https://ehr.example.org/jwks"}}))
    server = gunicorn_service(CRS_CDS_TRUSTED_ISSUERS_FILE=str(issuers), CRS_CDS_WORKERS="1")
    long_token = "a" * (MAX_TOKEN_CHARS - 10)
    answer = requests.post(server.base + SERVICE, json={}, timeout=10,
                           headers={"Authorization": f"Bearer {long_token}"})
    assert answer.status_code == 401  # the service's refusal (not a JWT), not gunicorn's 431


# -- nothing secret in the log ------------------------------------------------------------------------------

def test_credentials_in_urls_and_authorization_headers_never_reach_the_log(serve_app, tmp_path, now, caplog):
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True), "kid": "k1",
           "alg": "ES384"}
    issuers = {"https://user:issuer-s3cret@ehr.example.org": {"jwks": {"keys": [jwk]}}}
    with caplog.at_level(logging.DEBUG):
        svc = serve_app(create_app(Settings(feedback_db=str(tmp_path / "f.sqlite3"), trusted_issuers=issuers)))
        for header in ("Basic dXNlcjpwYXNzd29yZC1zM2NyZXQ=", "dXNlcjpwYXNzd29yZC1zM2NyZXQ=",
                       "Token pa55w0rd-s3cret-value"):
            assert svc.post(SERVICE, {}, headers={"Authorization": header}).status_code == 401
            assert svc.get("/cds-services", headers={"Authorization": header}).status_code == 401
    open_service = serve_app(create_app(Settings(feedback_db=str(tmp_path / "g.sqlite3"), auth_enabled=False)))
    body = hook_request(by_name(SCENARIO), now)
    body["fhirServer"] = "http://fhir-user:fhir-s3cret@fhir.example.org/fhir"
    with caplog.at_level(logging.DEBUG):
        assert open_service.post(SERVICE, body).status_code == 200
    for secret in ("s3cret", "dXNlcjpwYXNz", "pa55w0rd", "fhir-user"):
        assert secret not in caplog.text
    assert "[credentials]@fhir.example.org" in caplog.text  # the URL is logged, without its credentials
    assert '"outcome": "401"' in caplog.text  # refused clients are in the call line too
    assert '{"event": "discovery", "outcome": "401", "reason": "unauthorized"}' in caplog.text


# -- a slow FHIR server does not starve calls that do not need it ----------------------------------------

def test_a_slow_fhir_server_does_not_hold_up_calls_that_came_with_their_prefetch(gunicorn_service, local_http, now):
    from concurrent.futures import ThreadPoolExecutor

    def slow(request, server):
        server.stop.wait(3)  # every FHIR answer takes 3 s
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": 0}

    fhir = local_http(slow)
    server = gunicorn_service(CRS_CDS_AUTH_ENABLED="false", CRS_CDS_WORKERS="1", CRS_CDS_THREADS="8",
                              CRS_CDS_FHIR_TIMEOUT_SECONDS="5", CRS_CDS_FHIR_BUDGET_SECONDS="5")
    fetching = hook_request(by_name(SCENARIO), now)
    del fetching["prefetch"]["oxygen"]
    fetching["fhirServer"] = fhir.base_url
    with ThreadPoolExecutor(4) as pool:
        slow_calls = [pool.submit(requests.post, server.base + SERVICE, json=dict(fetching, hookInstance=str(uuid.uuid4())),
                                  timeout=30) for _ in range(4)]
        deadline = time.monotonic() + 20
        while len(fhir.requests) < 4 and time.monotonic() < deadline:  # all four wait on the FHIR server
            time.sleep(0.05)
        assert len(fhir.requests) == 4
        for _ in range(5):  # one worker process: these run beside the four, on other threads
            a_normal_call_is_answered(server.base, now)
        assert not any(call.done() for call in slow_calls)
        assert [call.result().status_code for call in slow_calls] == [200] * 4
