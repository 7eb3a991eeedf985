"""The benchmark's yardstick: a bare Flask app that does the least a CDS service must do.

It reads the request body, parses it with the same JSON library the service uses (``json.loads``)
and answers one fixed card. Served by the same gunicorn settings against the same bodies, its
throughput is what the service could reach if its own work cost nothing.

    gunicorn --pythonpath benchmarks 'reference_app:create_app()'
"""
from __future__ import annotations

import json

from flask import Flask, Response, request

CARD = {"cards": [{
    "uuid": "00000000-0000-4000-8000-000000000000",
    "summary": "Reference card",
    "indicator": "info",
    "source": {"label": "benchmark reference", "topic": {"code": "reference"}},
}]}
ANSWER = json.dumps(CARD, separators=(",", ":"))


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/cds-services")
    def discovery():
        return Response('{"services":[]}', mimetype="application/json")

    @app.post("/cds-services/<service_id>")
    def call(service_id: str):
        body = json.loads(request.get_data(cache=False))
        if not isinstance(body, dict):
            return Response('{"error":"not an object"}', status=400, mimetype="application/json")
        return Response(ANSWER, mimetype="application/json")

    return app
