"""The clinical core: pure functions from FHIR resources and a time to ASTCT grades and advice.

It knows nothing of HTTP, Flask or CDS Hooks. Start at ``assess``.
"""
from .assess import assess
from .model import Assessment, Grade, Recommendation, Unreadable
from .protocol import Protocol, ProtocolError, default_protocol

__all__ = ["assess", "Assessment", "Grade", "Recommendation", "Unreadable", "Protocol", "ProtocolError",
           "default_protocol"]
