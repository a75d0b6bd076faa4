"""JSON security-event logging for the example app (one line per decision)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from flask import g, has_request_context, request


class JSONFormatter(logging.Formatter):
    """Print each record as one JSON object (no token is ever in it)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message plus its structured ``security`` fields; for
        the other records (the tenancy audit trail), when and for whom."""
        fields = getattr(record, "security", None)
        line: dict[str, object] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if fields is None:
            line["timestamp"] = datetime.fromtimestamp(record.created, UTC).isoformat()
            line.update(_request_fields())
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps({**line, **(fields or {})}, default=str)


def _request_fields() -> dict[str, object]:
    """The request a record was written in, and who made it (no token)."""
    if not has_request_context():
        return {}
    found: dict[str, object] = {"method": request.method, "path": request.path}
    auth = g.get("auth")
    if auth is not None:
        found.update(subject=auth.subject, organization_id=auth.organization_id)
    return found


class _Not(logging.Filter):
    """Drop the records of one logger (they have a handler of their own)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.excluded = name

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(self.excluded)


def configure_security_log() -> None:
    """Send the library's log to stderr as JSON lines.

    * ``flask_oauth_verify.security``: every decision (INFO and up);
    * the rest of ``flask_oauth_verify`` at WARNING and up: key fetch
      failures, configuration warnings, and the tenancy audit trail (each
      ``unscoped()`` read, each refused cross-tenant write). The package
      installs a ``NullHandler``, so without a handler of the app's own
      these records go nowhere.
    """
    security = _attach("flask_oauth_verify.security", logging.INFO)
    security.setLevel(logging.INFO)
    _attach("flask_oauth_verify", logging.WARNING, _Not("flask_oauth_verify.security"))
    # Python warnings (SQLAlchemy's SAWarning) as JSON lines too, not raw text
    logging.captureWarnings(True)
    _attach("py.warnings", logging.WARNING)


def _attach(name: str, level: int, only: logging.Filter | None = None) -> logging.Logger:
    logger = logging.getLogger(name)
    if any(isinstance(h.formatter, JSONFormatter) for h in logger.handlers):
        return logger  # idempotent: one line per record
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.setLevel(level)
    if only is not None:
        handler.addFilter(only)
    logger.addHandler(handler)
    return logger
