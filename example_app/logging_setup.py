"""JSON security-event logging for the example app (one line per decision)."""

from __future__ import annotations

import json
import logging
import sys


class JSONFormatter(logging.Formatter):
    """Print each security event as one JSON object (no token is ever in it)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message plus its structured ``security`` fields."""
        fields = getattr(record, "security", {})
        return json.dumps({"level": record.levelname, "message": record.getMessage(), **fields},
                          default=str)  # fmt: skip


def configure_security_log() -> None:
    """Send ``flask_oauth_verify.security`` events to stderr as JSON lines."""
    logger = logging.getLogger("flask_oauth_verify.security")
    if any(isinstance(h.formatter, JSONFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
