"""Credentials out of anything logged: ``user:password@`` in URLs, Authorization values."""
from __future__ import annotations

import re
from typing import Any

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")


def strip_credentials(value: Any) -> Any:
    """``http://user:pass@host/x`` -> ``http://[credentials]@host/x``; other values unchanged."""
    if isinstance(value, str) and "@" in value:
        return _URL_CREDENTIALS.sub(r"\1[credentials]@", value)
    return value


__all__ = ["strip_credentials"]
