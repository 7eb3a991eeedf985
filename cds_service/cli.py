"""The ``crs-cds`` command."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from .settings import EHR_KINDS

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A one-line problem for the user; exits with status 2."""


def _now(text: str | None) -> datetime:
    if not text:
        return datetime.now(timezone.utc)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--now must be an ISO 8601 date-time, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cmd_grade(args: argparse.Namespace) -> int:
    """Grade one patient from a file, read as the service reads a hook call: a FHIR Bundle or
    NDJSON (its resources, each once; a next page or a failed search in it makes the grades
    "at least"), or a CDS Hooks request (its prefetch, and its fhirServer for what is missing)."""
    from .clinical import assess
    from .clinical.report import as_text
    from .fhir.bundle import BundleError, parse_json_text

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    settings = _settings(args.config)
    if args.protocol:
        settings.protocol_file = args.protocol
    site = _site(settings)
    now = _now(args.now)
    try:
        data = parse_json_text(text)
        if _is_hook_request(data):
            resources, unread = _hook_request_resources(data, site, settings, now)
        else:
            resources, unread = _file_resources(data, path.name)
    except BundleError as exc:
        raise CliError(f"{path}: {exc}") from None
    assessment = assess(resources, now, site.protocol, site.terminology, unread, zone=site.zone)
    if args.json:
        print(json.dumps(assessment.to_json(), indent=2, ensure_ascii=False))
    else:
        print(as_text(assessment))
    return 0


def cmd_protocol_show(args: argparse.Namespace) -> int:
    """The protocol in force (the default, or a site file merged over it), checked, as JSON or as
    the readable Markdown document the cards link to."""
    from .clinical.protocol import Protocol, ProtocolError, protocol_markdown

    try:
        protocol = Protocol.load(args.protocol)
    except ProtocolError as exc:
        raise CliError(str(exc)) from None
    if args.markdown:
        sys.stdout.write(protocol_markdown(protocol))
    else:
        print(json.dumps(protocol.data, indent=2, ensure_ascii=False))
    return 0


def _is_hook_request(data) -> bool:
    return isinstance(data, dict) and "resourceType" not in data and "hook" in data and "context" in data


def _file_resources(data, name: str):
    from .clinical.model import Unreadable
    from .fhir.bundle import SearchContents, search_contents, searched_type

    contents = SearchContents(data, False, None) if isinstance(data, list) else search_contents(data)
    source = searched_type(data)
    unread = []
    if contents.failed:
        unread.append(Unreadable(f"file:{name}", "it holds an error OperationOutcome: a search in it failed", source))
    if contents.next_url:
        unread.append(Unreadable(f"file:{name}", "the Bundle has further pages (a next link) that were not read",
                                 source))
    return contents.resources, unread


def _hook_request_resources(request: dict, site, settings, now: datetime):
    """The patient-view service's reading of a hook request: its scope shortcut, prefetch keys,
    fetches from the request's fhirServer, and 412 when required data cannot be had."""
    from .errors import PreconditionFailed
    from .fhir.client import FhirClient
    from .fhir.prefetch import prefetched_only
    from .hooks.registry import SERVICES, gather

    service = next(s for s in SERVICES if s.hook == "patient-view")
    try:
        call = gather(service, request, site, now, FhirClient(settings), settings)
    except PreconditionFailed as exc:
        raise CliError(f"required data cannot be had (a service answers 412): {exc.message}") from None
    if isinstance(call, str):  # out of scope by the medications alone: grade those
        key = service.scope_key
        assert key is not None  # only a service with a scope key answers out of scope early
        return prefetched_only({key: site.templates[key]}, request) or [], []
    return call.resources, call.unread


def _settings(path: str | None):
    from .settings import Settings, SettingsError

    try:
        return Settings.load(path)
    except SettingsError as exc:
        raise CliError(str(exc)) from None


def _site(settings):
    from .clinical.protocol import ProtocolError
    from .settings import SettingsError
    from .site import Site

    try:
        return Site.from_settings(settings)
    except (ProtocolError, SettingsError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None


def cmd_scenarios_write(args: argparse.Namespace) -> int:
    from .scenarios import SCENARIOS

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    now = _now(args.now)
    for scenario in SCENARIOS:
        target = folder / f"{scenario.name}.json"
        target.write_text(json.dumps(scenario.bundle(now), indent=2) + "\n", encoding="utf-8")
        print(f"{target}  CRS {scenario.expected_crs}  ICANS {scenario.expected_icans}  {scenario.title}")
    return 0


def cmd_scenarios_list(args: argparse.Namespace) -> int:
    from .scenarios import SCENARIOS

    for scenario in SCENARIOS:
        print(f"{scenario.name:40} CRS {str(scenario.expected_crs):4} ICANS {str(scenario.expected_icans):4} "
              f"{scenario.title}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Development server. Production: gunicorn (see README, "Production deployment")."""
    from .app import configure_logging, create_app
    from .clinical.protocol import ProtocolError
    from .settings import SettingsError

    handler = configure_logging()
    try:
        app = create_app(_settings(args.config), call_lines_to=handler)
    except (SettingsError, ProtocolError) as exc:  # e.g. auth on and no trusted issuers; a bad site protocol
        raise CliError(str(exc)) from None
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


def cmd_scenarios_load(args: argparse.Namespace) -> int:
    """Load every scenario into a FHIR R4 server as one transaction Bundle each."""
    import requests

    from .scenarios import SCENARIOS

    base = args.fhir_server.rstrip("/")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if args.bearer:
        headers["Authorization"] = f"Bearer {args.bearer}"
    now = _now(args.now)
    failures = 0
    with requests.Session() as session:
        for scenario in SCENARIOS:
            try:
                answer = session.post(base, json=scenario.bundle(now), headers=headers, timeout=args.timeout)
                ok = answer.status_code < 300
                status = str(answer.status_code)
            except requests.RequestException as exc:
                ok, status = False, type(exc).__name__
            failures += not ok
            print(f"{'loaded' if ok else 'FAILED'} {scenario.name:40} {status}  Patient/{scenario.name}")
    if failures:
        raise CliError(f"{failures} of {len(SCENARIOS)} scenarios could not be loaded into {base}")
    return 0


def cmd_scenarios_requests(args: argparse.Namespace) -> int:
    """Write ready-made patient-view hook requests (with full prefetch) for the scenarios."""
    from .examples import gm_csf_order_sign_request, hook_request
    from .scenarios import SCENARIOS, by_name

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    now = _now(args.now)
    try:
        chosen = [by_name(name) for name in args.names] if args.names else SCENARIOS
    except KeyError as exc:
        raise CliError(str(exc.args[0])) from None
    for scenario in chosen:
        target = folder / f"{scenario.name}.json"
        target.write_text(json.dumps(hook_request(scenario, now), indent=2) + "\n", encoding="utf-8")
        print(f"{target}  (patient-view)")
    target = folder / "order-sign-gm-csf.json"
    target.write_text(json.dumps(gm_csf_order_sign_request(now, by_name("crs1-fever-day1")), indent=2) + "\n",
                      encoding="utf-8")
    print(f"{target}  (order-sign)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crs-cds", description="CRS/ICANS (ASTCT) grading and CDS Hooks service")
    commands = parser.add_subparsers(dest="command", required=True)

    grade = commands.add_parser("grade", help="grade one patient from a FHIR Bundle, NDJSON or a hook request file")
    grade.add_argument("file")
    grade.add_argument("--now", help="assessment time, ISO 8601 (default: the current time)")
    grade.add_argument("--json", action="store_true", help="print the assessment as JSON")
    grade.add_argument("--protocol", help="a site protocol file (overrides the settings' protocol_file)")
    grade.add_argument("--config", help="a JSON settings file, as the service's (default: CRS_CDS_CONFIG)")
    grade.set_defaults(handler=cmd_grade)

    protocol = commands.add_parser("protocol", help="the clinical protocol (default or site file)")
    protocol_commands = protocol.add_subparsers(dest="protocol_command", required=True)
    show = protocol_commands.add_parser("show", help="print the protocol in force, checked against its schema")
    show.add_argument("--protocol", help="a site protocol file overriding the default protocol")
    show.add_argument("--markdown", action="store_true", help="as the readable Markdown document")
    show.set_defaults(handler=cmd_protocol_show)

    scenarios = commands.add_parser("scenarios", help="the built-in clinical scenario library")
    scenario_commands = scenarios.add_subparsers(dest="scenario_command", required=True)
    listing = scenario_commands.add_parser("list", help="list the scenarios and their expected grades")
    listing.set_defaults(handler=cmd_scenarios_list)
    write = scenario_commands.add_parser("write", help="write each scenario as a transaction Bundle file")
    write.add_argument("dir")
    write.add_argument("--now", help="time the scenarios are built around (default: now)")
    write.set_defaults(handler=cmd_scenarios_write)

    load = scenario_commands.add_parser("load", help="load the scenarios into a FHIR R4 server")
    load.add_argument("--fhir-server", required=True, help="the server's base URL")
    load.add_argument("--bearer", help="an access token for the server")
    load.add_argument("--now", help="time the scenarios are built around (default: now)")
    load.add_argument("--timeout", type=float, default=30.0, help="seconds per transaction (default 30)")
    load.set_defaults(handler=cmd_scenarios_load)
    requests_ = scenario_commands.add_parser("requests", help="write patient-view hook requests with prefetch")
    requests_.add_argument("dir")
    requests_.add_argument("names", nargs="*", help="scenario names (default: all)")
    requests_.add_argument("--now", help="time the scenarios are built around (default: now)")
    requests_.set_defaults(handler=cmd_scenarios_requests)

    serve = commands.add_parser("serve", help="run the CDS Hooks service (development server)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--config", help="a JSON settings file (see README, Configuration)")
    serve.set_defaults(handler=cmd_serve)

    codes = commands.add_parser("codes", help="the codes a site's charts use (onboarding)")
    code_commands = codes.add_subparsers(dest="codes_command", required=True)
    survey = code_commands.add_parser("survey", help="list Observation and medication codes, mapped or not")
    survey.add_argument("files", nargs="*", help="FHIR Bundle or NDJSON exports (instead of a FHIR server)")
    survey.add_argument("--fhir-server", help="the FHIR server's base URL")
    survey.add_argument("--bearer", help="an access token for the server (or CRS_CDS_SURVEY_TOKEN)")
    survey.add_argument("--patient", action="append", default=[], help="a patient id (repeat for several)")
    survey.add_argument("--config", help="a JSON settings file (the site's terminology_dirs)")
    survey.add_argument("--write-valuesets", metavar="DIR", help="write site ValueSet files to review")
    survey.add_argument("--timeout", type=float, default=60.0, help="seconds for all the queries (default 60)")
    survey.set_defaults(handler=cmd_codes_survey)

    sheet = commands.add_parser("prefetch", help="the install sheet: each service's prefetch templates and FHIR scopes")
    sheet.add_argument("--ehr", choices=EHR_KINDS,
                       help="the template dialect (default: the settings' ehr)")
    sheet.add_argument("--config", help="a JSON settings file (the site's codes join the templates)")
    sheet.add_argument("--json", action="store_true")
    sheet.set_defaults(handler=cmd_prefetch)

    settings_ = commands.add_parser("settings", help="the settings file")
    settings_commands = settings_.add_subparsers(dest="settings_command", required=True)
    example = settings_commands.add_parser("example", help="print the production settings template")
    example.set_defaults(handler=cmd_settings_example)

    report = commands.add_parser("feedback-report", help="accepted and overridden counts per card topic")
    report.add_argument("--db", help="a SQLite file or a database URL (default: database_url, else feedback_db)")
    report.add_argument("--config", help="a JSON settings file")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=cmd_feedback_report)
    return parser


def cmd_prefetch(args: argparse.Namespace) -> int:
    """What an integration engineer enters in the EHR for each service: the prefetch templates in
    the EHR's dialect and the FHIR scopes the service needs."""
    from .hooks.registry import KEY_SCOPES, MEDICATION_SCOPES, SERVICES

    settings = _settings(args.config)
    if args.ehr:
        settings.ehr = args.ehr
    site = _site(settings)
    keys = list(dict.fromkeys(key for service in SERVICES for key in service.prefetch_keys))
    scopes = sorted({scope for key in keys for scope in KEY_SCOPES[key][:1]} | {MEDICATION_SCOPES[0]})
    sheet = {"ehr": site.ehr, "services": [{"id": s.id, "hook": s.hook, "prefetch": {k: site.templates[k]
                                                                                    for k in s.prefetch_keys}}
                                           for s in SERVICES],
             "scopes": scopes, "scopesV2": sorted({KEY_SCOPES[key][1] for key in keys} | {MEDICATION_SCOPES[1]})}
    if args.json:
        print(json.dumps(sheet, indent=2))
        return 0
    print(f"Prefetch templates for {site.ehr} (the same for every service unless listed otherwise)")
    first = sheet["services"][0]
    for key, template in first["prefetch"].items():
        print(f"\n{key}:\n  {template}")
    for service in sheet["services"]:
        print(f"\nservice {service['id']} ({service['hook']}): keys {', '.join(service['prefetch'])}")
    print(f"\nFHIR scopes (SMART v1): {' '.join(sheet['scopes'])}")
    print(f"FHIR scopes (SMART v2): {' '.join(sheet['scopesV2'])}")
    return 0


def cmd_codes_survey(args: argparse.Namespace) -> int:
    """Which codes the charts use and which of them the service reads (onboarding a site)."""
    import os

    from .fhir.bundle import BundleError, parse_resources_text
    from .survey import fetch_patients, report, survey, write_valuesets

    if bool(args.files) == bool(args.fhir_server):
        raise CliError("give export files, or --fhir-server with --patient ids, not both")
    if args.fhir_server and not args.patient:
        raise CliError("--fhir-server needs at least one --patient id")
    settings = _settings(args.config)
    site = _site(settings)
    resources: list[dict] = []
    failures: list[str] = []
    for name in args.files:
        try:
            resources += parse_resources_text(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, BundleError) as exc:
            raise CliError(f"cannot read {name}: {exc}") from None
    if args.fhir_server:
        settings.fhir_budget_seconds = settings.fhir_timeout_seconds = args.timeout
        settings.fhir_max_pages, settings.fhir_max_resources_per_key = 100, 100_000
        token = args.bearer or os.environ.get("CRS_CDS_SURVEY_TOKEN")
        resources, failures = fetch_patients(args.fhir_server.rstrip("/"), token, args.patient, settings)
    rows = survey(resources, site.terminology)
    print(report(rows), end="")
    for failure in failures:
        print(f"not read: {failure}", file=sys.stderr)
    if args.write_valuesets:
        for path in write_valuesets(rows, Path(args.write_valuesets)):
            print(f"wrote {path} (review it before use)")
    return 1 if failures else 0


def cmd_settings_example(args: argparse.Namespace) -> int:
    """The settings template shipped in the package (cds_service/settings.example.json)."""
    sys.stdout.write((Path(__file__).parent / "settings.example.json").read_text(encoding="utf-8"))
    return 0


def cmd_feedback_report(args: argparse.Namespace) -> int:
    from .feedback import FeedbackError, cmd_feedback_report as report

    if not args.db:  # the service's database: database_url, else the SQLite file feedback_db
        settings = _settings(args.config)
        args.db = settings.database_url or settings.feedback_db
    try:
        return report(args)
    except FeedbackError as exc:
        raise CliError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"crs-cds: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
