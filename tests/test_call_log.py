"""The one log line per hook call: who called (the JWT's iss), which call, how it ended, how long it
took, which cards and grades; never a token, a JWT or the patient's data."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.app import create_app
from cds_service.examples import hook_request
from cds_service.scenarios import by_name
from cds_service.settings import Settings

ISS = "https://ehr.example.org/cds-client"
KEY = ec.generate_private_key(ec.SECP384R1())
SERVICE = "/cds-services/crs-icans-assessment"
FHIR_TOKEN = "fhir-access-token-7c41d2-never-logged"
SCENARIO = "crs3-norepi-vaso"


def signed(aud: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISS, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}, KEY,
                      algorithm="ES384", headers={"kid": "k1", "typ": "JWT"})


LINE_KEYS = ["event", "service", "hookInstance", "iss", "outcome", "ms", "cards", "grades", "sources", "read", "scope",
             "lenient", "reason"]


def hook_call_lines(caplog) -> list[dict]:
    texts = [r.getMessage() for r in caplog.records
             if r.name == "crs_cds.hooks" and '"event": "hook-call"' in r.getMessage()]
    lines = [json.loads(text) for text in texts]
    for text, line in zip(texts, lines):
        assert text == json.dumps(line) and list(line) == LINE_KEYS  # json.dumps's own text, every key
    return lines


@pytest.mark.parametrize("value", ["plain", 'a "quote", a \\ and a\nnewline', "caf\u00e9 \u2014 \U0001f600", "\udc00",
                                   None, [], ["crsGrade", "icansGrade"], {"crs": 3, "icans": 1},
                                   {"medications": "prefetch"}, 7.25, 3, True, [None, {"a": [1.0]}]])
def test_each_value_of_the_line_is_written_as_json_dumps_writes_it(value):
    from cds_service.hooks.api import _json

    assert _json(value) == json.dumps(value)


def patient_strings(now: datetime) -> list[str]:
    """Text from the chart that must not reach the log: the patient's name and birth date."""
    patient = next(r for r in by_name(SCENARIO).resources(now) if r["resourceType"] == "Patient")
    return [patient["name"][0]["family"], *patient["name"][0]["given"], patient["birthDate"]]


@pytest.fixture
def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def fhir(local_http):
    """A FHIR server for the one key the request leaves out (so the FHIR token is really used)."""
    return local_http(lambda request, server: (200, {"resourceType": "Bundle", "type": "searchset", "total": 0}))


def make_service(serve_app, tmp_path, fhir, auth: bool):
    jwk = {**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
    settings = {"feedback_db": str(tmp_path / "feedback.sqlite3"), "auth_enabled": auth}
    if auth:
        settings["trusted_issuers"] = {ISS: {"jwks": {"keys": [jwk]}, "fhir_servers": [fhir.base_url]}}
    return serve_app(create_app(Settings(**settings)))


def request_with_a_fetch(now: datetime, fhir) -> dict:
    body = hook_request(by_name(SCENARIO), now)
    del body["prefetch"]["oxygen"]
    body["fhirServer"] = fhir.base_url
    body["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                 "scope": "patient/*.read", "subject": "cds-service"}
    return body


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
def test_the_call_line_has_the_caller_the_call_and_its_result_and_no_secret(serve_app, tmp_path, fhir, now,
                                                                             caplog, auth):
    service = make_service(serve_app, tmp_path, fhir, auth)
    body = request_with_a_fetch(now, fhir)
    token = signed(service.base + SERVICE)
    with caplog.at_level(logging.DEBUG):
        answer = service.post(SERVICE, body, headers={"Authorization": f"Bearer {token}"} if auth else {})
    assert answer.status_code == 200, answer.text
    assert fhir.requests and fhir.requests[0].headers["authorization"] == f"Bearer {FHIR_TOKEN}"
    [line] = hook_call_lines(caplog)
    assert line["iss"] == (ISS if auth else None)
    assert line["service"] == "crs-icans-assessment" and line["hookInstance"] == body["hookInstance"]
    assert line["outcome"] == "ok" and isinstance(line["ms"], (int, float)) and line["ms"] > 0
    cards = answer.json()["cards"]
    assert line["cards"] == [c["source"]["topic"]["code"] for c in cards] and line["cards"]
    assert line["grades"] == {"crs": 3, "icans": 1}
    assert line["sources"]["oxygen"] == "fetched"
    for secret in (token, token.split(".")[2], FHIR_TOKEN, *patient_strings(now)):
        assert secret not in caplog.text


def test_a_refused_call_line_names_the_status_and_the_reason_without_the_values(serve_app, tmp_path, fhir, now,
                                                                                caplog):
    service = make_service(serve_app, tmp_path, fhir, auth=False)
    body = hook_request(by_name(SCENARIO), now)
    body["fhirAuthorization"] = f"Bearer {FHIR_TOKEN}"  # a string, not the object CDS Hooks defines
    body["fhirServer"] = fhir.base_url
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, body)
    assert answer.status_code == 400
    assert "fhirAuthorization: must be of type object" in answer.json()["issue"][0]["diagnostics"]
    assert FHIR_TOKEN not in answer.text
    [line] = hook_call_lines(caplog)
    assert line["outcome"] == "400" and line["iss"] is None and "fhirAuthorization" in line["reason"]
    assert FHIR_TOKEN not in caplog.text

    caplog.clear()
    body = hook_request(by_name(SCENARIO), now)
    body["prefetch"]["patient"] = "a Patient as a string: " + " ".join(patient_strings(now))
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, body)
    assert answer.status_code == 400
    [line] = hook_call_lines(caplog)
    assert line["outcome"] == "400" and line["reason"].startswith("request.prefetch.patient: must be of type")
    for text in patient_strings(now):
        assert text not in caplog.text and text not in answer.text


def test_a_412_call_line(serve_app, tmp_path, fhir, now, caplog):
    service = make_service(serve_app, tmp_path, fhir, auth=False)
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": "p", "userId": "Practitioner/1"}}
    with caplog.at_level(logging.INFO):
        assert service.post(SERVICE, body).status_code == 412
    [line] = hook_call_lines(caplog)
    assert line["outcome"] == "412" and "medications" in line["reason"] and line["cards"] == []
    assert line["grades"] is None and line["iss"] is None


def test_an_out_of_scope_call_line_says_why_and_which_key_told(serve_app, tmp_path, fhir, now, caplog):
    service = make_service(serve_app, tmp_path, fhir, auth=False)
    body = hook_request(by_name("no-iec-therapy"), now)
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, body)
    assert answer.status_code == 200 and answer.json() == {"cards": []}
    [line] = hook_call_lines(caplog)
    assert line["outcome"] == "ok" and line["cards"] == [] and line["grades"] is None
    assert line["scope"] == "no IEC therapy in the last 60 days"
    assert line["sources"] == {"medications": "prefetch"}


def test_the_call_line_says_how_the_chart_was_read(serve_app, tmp_path, fhir, now, caplog):
    """Elements no rule reads (an STU3 ``context``), a resource sent twice, a time without a zone:
    read anyway, and counted in the line (names of elements only, never their values)."""
    service = make_service(serve_app, tmp_path, fhir, auth=False)
    body = hook_request(by_name(SCENARIO), now)
    entries = body["prefetch"]["temperatures"]["entry"]
    for entry in entries:
        entry["resource"]["context"] = {"reference": "Encounter/secret-encounter"}
    entries.append(json.loads(json.dumps(entries[0])))
    entries[0]["resource"]["effectiveDateTime"] = entries[0]["resource"]["effectiveDateTime"].replace("Z", "")
    with caplog.at_level(logging.INFO):
        answer = service.post(SERVICE, body)
    assert answer.status_code == 200
    [line] = hook_call_lines(caplog)
    assert line["read"] == {"duplicates": 1, "timesWithoutZone": 1, "ignoredElements": {"Observation.context": 1}}
    assert "secret-encounter" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        service.post(SERVICE, hook_request(by_name(SCENARIO), now))
    assert hook_call_lines(caplog)[0]["read"] is None


def test_the_line_formatter_writes_what_the_standard_one_does():
    """The time text is made once a second; each line still carries its own time and milliseconds."""
    from cds_service.app import LineFormatter

    ours, standard = LineFormatter(), logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    base = time.time()
    for offset in (0.0, 0.25, 0.999, 1.001, 61.5, 3600.0):
        record = logging.LogRecord("crs_cds.hooks", logging.INFO, __file__, 1, '{"event": "hook-call"}', None, None)
        record.created, record.msecs = base + offset, ((base + offset) % 1) * 1000
        assert ours.format(record) == standard.format(record)


def test_the_line_handler_writes_each_line_whole_to_any_stream(tmp_path):
    """Written and flushed to a file opened without line buffering; a line-buffered stream flushes at
    the newline itself. A record with an exception keeps its traceback."""
    from cds_service.app import LineFormatter, LineHandler

    for buffering in (1, -1):
        path = tmp_path / f"calls-{buffering}.log"
        with open(path, "w", buffering=buffering, encoding="utf-8") as stream:
            handler = LineHandler(stream)
            handler.setFormatter(LineFormatter())
            handler.handle(logging.LogRecord("crs_cds.hooks", logging.INFO, __file__, 1, '{"event": %s}', ('"x"',), None))
            assert path.read_text(encoding="utf-8").endswith(' INFO crs_cds.hooks {"event": "x"}\n')
            try:
                raise ValueError("the reason")
            except ValueError:
                import sys
                record = logging.LogRecord("crs_cds", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
            handler.handle(record)
            written = path.read_text(encoding="utf-8")
            assert " ERROR crs_cds failed\nTraceback (most recent call last):" in written
            assert written.endswith("ValueError: the reason\n")


LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def line_handler(stream=None):
    from cds_service.app import LineFormatter, LineHandler

    handler = LineHandler(stream)
    handler.setFormatter(LineFormatter())
    return handler


def test_the_direct_writer_writes_what_handle_would(tmp_path, monkeypatch):
    """``LineHandler.writer_for``: the very line (time to the millisecond included) that handle()
    writes for an INFO record of that logger, to line- and block-buffered streams alike."""
    message = '{"event": "hook-call", "scope": "no IEC therapy \\u00e9"}'
    for buffering in (1, -1):
        path = tmp_path / f"direct-{buffering}.log"
        with open(path, "w", buffering=buffering, encoding="utf-8") as stream:
            handler = line_handler(stream)
            logger = logging.Logger("crs_cds.hooks")  # a tree of its own: pytest's handlers sit on the root
            logger.addHandler(handler)
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, None, None)
            monkeypatch.setattr(time, "time", lambda: record.created)
            handler.writer_for(logger, otherwise=pytest.fail)(message)
            monkeypatch.undo()
            handler.handle(record)
            direct, through_logging = path.read_text(encoding="utf-8").splitlines(keepends=True)
        assert LINE_START.match(direct)
        assert direct == through_logging and direct.endswith(f" INFO crs_cds.hooks {message}\n")
    from cds_service.app import LineHandler

    with pytest.raises(TypeError):  # a formatter of its own: only handle() knows it
        LineHandler().writer_for(logger, otherwise=print)


@pytest.mark.parametrize("change", ["another handler on the way", "a filter on the logger", "no propagation",
                                    "another handler at the root", "a filter at the root", "the handler's level",
                                    "a filter on the handler", "another formatter", "the logger disabled"])
def test_the_direct_writer_leaves_it_to_logging_once_logging_would_do_more(tmp_path, change):
    """Anything that makes logging do more than this handler's write sends the line through logging."""
    root, hooks = logging.Logger("root"), logging.Logger("crs_cds.hooks")
    hooks.parent = middle = logging.Logger("crs_cds")
    middle.parent = root
    handler = line_handler(open(tmp_path / "calls.log", "w", encoding="utf-8"))
    root.addHandler(handler)
    through_logging: list[str] = []
    write = handler.writer_for(hooks, otherwise=through_logging.append)
    write("before")
    {"another handler on the way": lambda: middle.addHandler(logging.NullHandler()),
     "a filter on the logger": lambda: hooks.addFilter(lambda record: True),
     "no propagation": lambda: setattr(hooks, "propagate", False),
     "another handler at the root": lambda: root.addHandler(logging.NullHandler()),
     "a filter at the root": lambda: root.addFilter(lambda record: True),
     "the handler's level": lambda: handler.setLevel(logging.WARNING),
     "a filter on the handler": lambda: handler.addFilter(lambda record: True),
     "another formatter": lambda: handler.setFormatter(line_handler().formatter),
     "the logger disabled": lambda: setattr(hooks, "disabled", True)}[change]()
    write("after")
    handler.close()
    assert through_logging == ["after"]
    assert (tmp_path / "calls.log").read_text(encoding="utf-8").endswith(" INFO crs_cds.hooks before\n")


def test_a_failed_write_is_reported_as_logging_reports_it_and_the_call_goes_on(capsys):
    stream = open(os.devnull, "w", encoding="utf-8")
    handler = line_handler(stream)
    logger = logging.Logger("crs_cds.hooks")
    logger.addHandler(handler)
    stream.close()
    handler.writer_for(logger, otherwise=pytest.fail)('{"event": "hook-call"}')
    assert "--- Logging error ---" in capsys.readouterr().err


@pytest.mark.parametrize("host_logging", [False, True])
def test_the_production_entry_point_writes_the_call_line_where_logging_would(tmp_path, now, host_logging):
    """``cds_service.wsgi``: on stderr in the service's own format, straight from its handler; through
    logging, in the host's format, when the host configured logging before loading the app or does
    so later; none while the hooks logger is above INFO or filters the line out."""
    script = """
import logging, sys
from cds_service.hooks import api
from cds_service.wsgi import app
body, client, hooks = sys.stdin.read(), app.test_client(), logging.getLogger("crs_cds.hooks")
def call():
    answer = client.post("/cds-services/crs-icans-assessment", data=body, content_type="application/json")
    assert answer.status_code == 200 and answer.get_json() == {"cards": []}
print(app.config["CRS_CDS"].write_call_line is not api.log_call_line)
call()
hooks.setLevel(logging.WARNING); call(); hooks.setLevel(logging.NOTSET)
refuse = lambda record: False
hooks.addFilter(refuse); call(); hooks.removeFilter(refuse)
logging.basicConfig(force=True, stream=sys.stderr, level=logging.INFO, format="LATE|%(name)s|%(message)s")
call()
"""
    if host_logging:
        script = ("import logging, sys\nlogging.basicConfig(stream=sys.stderr, level=logging.INFO, "
                  "format='HOST|%(name)s|%(message)s')\n" + script)
    env = dict(os.environ, CRS_CDS_AUTH_ENABLED="false", CRS_CDS_FEEDBACK_DB=str(tmp_path / "feedback.sqlite3"))
    body = json.dumps(hook_request(by_name("no-iec-therapy"), now))
    done = subprocess.run([sys.executable, "-c", script], input=body, capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(not host_logging)
    first, later = [line.partition("{") for line in done.stderr.splitlines() if '"event": "hook-call"' in line]
    if host_logging:
        assert first[0] == "HOST|crs_cds.hooks|"
    else:
        assert LINE_START.match(first[0]) and LINE_START.sub("", first[0]) == "INFO crs_cds.hooks "
    assert later[0] == "LATE|crs_cds.hooks|"
    for _, brace, message in (first, later):
        assert json.loads(brace + message)["scope"] == "no IEC therapy in the last 60 days"
