"""Typed errors, mapped to HTTP statuses only at the edge (the hooks layer)."""
from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status`` is the HTTP status the edge answers with; ``message`` is safe to show."""

    status = 500
    code = "exception"  # FHIR OperationOutcome issue type
    kind = "error"      # a short, fixed word for metrics and logs (refusals by reason)

    def __init__(self, message: str, *, expression: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.expression = expression
        if kind is not None:
            self.kind = kind


class BadRequest(ServiceError):
    """The request itself is wrong: malformed JSON, schema violation, wrong hook for the service."""

    status = 400
    code = "invalid"
    kind = "bad-request"


class Unauthorized(ServiceError):
    """The caller did not authenticate (no, bad or untrusted JWT).

    The edge answers 401 with an empty body and a bare ``WWW-Authenticate: Bearer``: the reason
    is logged, never sent (CDS Hooks best practices: "401 without details").
    """

    status = 401
    code = "login"
    kind = "unauthorized"

    def __init__(self, message: str = "authentication required"):
        super().__init__(message)


class NotFound(ServiceError):
    status = 404
    code = "not-found"
    kind = "not-found"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "too-costly"
    kind = "body-too-large"


class PreconditionFailed(ServiceError):
    """Required FHIR data cannot be had (no prefetch and no usable FHIR server)."""

    status = 412
    code = "incomplete"
    kind = "fhir-data-missing"


class DependencyDown(ServiceError):
    status = 503
    code = "transient"
    kind = "dependency-down"
