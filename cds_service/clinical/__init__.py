"""The clinical core: pure functions from FHIR resources and a time to ASTCT grades and advice.

It knows nothing of HTTP, Flask or CDS Hooks. Start at ``assess``.
"""
from .assess import assess, never_in_scope, no_iec_therapy_reason, out_of_scope_reason
from .model import Assessment, Grade, Recommendation, Unreadable
from .protocol import Protocol, ProtocolError, default_protocol

__all__ = ["assess", "never_in_scope", "no_iec_therapy_reason", "out_of_scope_reason", "Assessment", "Grade",
           "Recommendation", "Unreadable", "Protocol", "ProtocolError", "default_protocol"]
