"""JSON security-event logging for the example app (one line per decision)."""

from __future__ import annotations

import json
import logging
import sys


class JSONFormatter(logging.Formatter):
    """Print each record as one JSON object (no token is ever in it)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message plus its structured ``security`` fields."""
        fields = getattr(record, "security", {})
        line = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps({**line, **fields}, default=str)


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
