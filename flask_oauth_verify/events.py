"""Security events: one structured log record per decision.

Records go to the ``flask_oauth_verify.security`` logger with their fields in
``extra`` (JSON-ready: a JSON formatter or structlog prints them as they
are). The token itself is never part of a record: only its ``jti`` or a
short hash. When the logger is disabled for INFO, the hot path pays one
``isEnabledFor`` check and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from flask import has_request_context, request

from .context import AuthContext
from .errors import OAuthVerifyError

__all__ = ["SECURITY_LOGGER", "SecurityEvents", "token_fingerprint"]

SECURITY_LOGGER = "flask_oauth_verify.security"


def token_fingerprint(token: str) -> str:
    """A short, non-reversible identifier of a token for logs (12 hex chars)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _request_fields() -> dict[str, Any]:
    if not has_request_context():
        return {}
    return {
        "ip": request.remote_addr,
        "user_agent": request.headers.get("User-Agent"),
        "method": request.method,
        "path": request.path,
    }


class SecurityEvents:
    """Emits security events to the log (and to listeners).

    :param logger: the logger; ``flask_oauth_verify.security`` by default.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(SECURITY_LOGGER)
        self.listeners: list[Any] = []

    def enabled(self, level: int = logging.INFO) -> bool:
        """Whether a record at ``level`` would be emitted or heard."""
        return bool(self.listeners) or self.logger.isEnabledFor(level)

    def emit(self, event: str, fields: Mapping[str, Any], level: int = logging.INFO) -> None:
        """Emit ``event`` with ``fields`` (plus the request's fields)."""
        if not self.enabled(level):
            return
        record = {"event": event, **_request_fields(), **fields}
        for listener in list(self.listeners):
            listener(event, record)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, event, extra={"security": record, **_safe_extra(record)})

    def validated(self, context: AuthContext, token: str) -> None:
        """A token passed every check."""
        if not self.enabled():
            return
        self.emit(
            "token_validated",
            {
                "subject": context.subject,
                "client_id": context.client_id,
                "organization_id": context.organization_id,
                "strategy": context.strategy,
                "jti": context.token_id,
                "token_hash": token_fingerprint(token),
            },
        )

    def failed(self, error: OAuthVerifyError, token: str | None) -> None:
        """A request was refused; ``reason`` is the precise internal reason."""
        level = logging.ERROR if error.status_code >= 500 else logging.WARNING
        if not self.enabled(level):
            return
        event = {
            "unauthorized": "missing_token",
            "insufficient_scope": "insufficient_scope",
        }.get(error.error, "token_validation_failed")
        fields: dict[str, Any] = {
            "error": error.error,
            "status": error.status_code,
            "reason": error.reason,
        }
        if token is not None:
            fields["token_hash"] = token_fingerprint(token)
        self.emit(event, fields, level)


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _safe_extra(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in _RESERVED}
