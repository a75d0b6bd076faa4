"""Security events: one structured record per decision, as logs and signals.

Every decision the extension takes is one *event*:

=============================  =======  ==========================================
event                          level    when
=============================  =======  ==========================================
``token_validated``            INFO     a token passed every check
``token_validation_failed``    WARNING  a token was refused (``reason`` says why)
``missing_token``              INFO     a protected view was called without one
``insufficient_scope``         WARNING  a valid token lacks a required scope
``missing_context``            WARNING  a valid token lacks the organization/user
``keys_refreshed``             INFO     a key set was fetched
``keys_refresh_failed``        WARNING  fetching a key set failed
``stale_keys_served``          WARNING  the last good keys are used in an outage
``introspection_failed``       ERROR    the introspection endpoint failed
=============================  =======  ==========================================

(503 refusals are logged at ERROR.) Each record goes to the
``flask_oauth_verify.security`` logger with its fields in ``extra`` — both as
one ``security`` dict and as top-level record attributes — so a JSON
formatter or structlog prints it as it is. The same record is sent as a
:mod:`blinker` signal: :data:`security_event` for every event, and one signal
per event name (:data:`token_validated`, ...), with the Flask app as sender.

The token itself is never part of a record: only its ``jti`` or a short,
non-reversible hash. When the logger is disabled for the level and no signal
has receivers, the hot path pays three dict reads (:attr:`SecurityEvents.quiet_signs`).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from blinker import Namespace, Signal
from flask import current_app, g, has_app_context, has_request_context, request

from .context import AuthContext, request_auth
from .errors import InsufficientScopeError, OAuthVerifyError, withheld_exc_info

#: For the library's own faults (a receiver that raised), not security events.
_logger = logging.getLogger("flask_oauth_verify")

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "EVENTS",
    "SECURITY_LOGGER",
    "SecurityEvents",
    "insufficient_scope",
    "introspection_failed",
    "keys_refresh_failed",
    "keys_refreshed",
    "missing_context",
    "missing_token",
    "security_event",
    "short_token_hash",
    "stale_keys_served",
    "token_validated",
    "token_validation_failed",
]

SECURITY_LOGGER = "flask_oauth_verify.security"

_signals = Namespace()

#: Sent for every event: ``receiver(app, event=name, record=record)``.
security_event: Signal = _signals.signal("oauth-verify-security-event")
#: ``receiver(app, record=record)`` when a token passed every check.
token_validated: Signal = _signals.signal("oauth-verify-token-validated")
#: ``receiver(app, record=record)`` when a token was refused.
token_validation_failed: Signal = _signals.signal("oauth-verify-token-validation-failed")
#: ``receiver(app, record=record)`` when a protected view got no token.
missing_token: Signal = _signals.signal("oauth-verify-missing-token")
#: ``receiver(app, record=record)`` when a valid token lacked a scope.
insufficient_scope: Signal = _signals.signal("oauth-verify-insufficient-scope")
#: ``receiver(app, record=record)`` when a valid token lacked org/user context.
missing_context: Signal = _signals.signal("oauth-verify-missing-context")
#: ``receiver(app, record=record)`` after a key set was fetched.
keys_refreshed: Signal = _signals.signal("oauth-verify-keys-refreshed")
#: ``receiver(app, record=record)`` when fetching a key set failed.
keys_refresh_failed: Signal = _signals.signal("oauth-verify-keys-refresh-failed")
#: ``receiver(app, record=record)`` when the last good keys are used in an outage.
stale_keys_served: Signal = _signals.signal("oauth-verify-stale-keys-served")
#: ``receiver(app, record=record)`` when the introspection endpoint failed.
introspection_failed: Signal = _signals.signal("oauth-verify-introspection-failed")

#: Event name -> (signal, default level). Events not listed here (for
#: example the metrics-only ``introspection_request``) are DEBUG and have no
#: signal of their own, but still go through :data:`security_event`.
EVENTS: Mapping[str, tuple[Signal, int]] = {
    "token_validated": (token_validated, logging.INFO),
    "token_validation_failed": (token_validation_failed, logging.WARNING),
    "missing_token": (missing_token, logging.INFO),
    "insufficient_scope": (insufficient_scope, logging.WARNING),
    "missing_context": (missing_context, logging.WARNING),
    "keys_refreshed": (keys_refreshed, logging.INFO),
    "keys_refresh_failed": (keys_refresh_failed, logging.WARNING),
    "stale_keys_served": (stale_keys_served, logging.WARNING),
    "introspection_failed": (introspection_failed, logging.ERROR),
}

_NO_SIGNAL = Signal("oauth-verify-unnamed")
_MAX_FIELD = 128
_MAX_HEADER_SEGMENT = 2048


def short_token_hash(token: str) -> str:
    """A short, non-reversible identifier of a token for logs (12 hex chars).

    :param token: the bearer token.
    """
    # surrogatepass: a string read with surrogateescape (a stray byte on the
    # command line) hashes too, instead of raising UnicodeEncodeError.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _unverified_kid(token: str) -> str | None:
    """The ``kid`` of a compact JWS header, for the log only (never trusted)."""
    segment = token.partition(".")[0]
    if not segment or len(segment) > _MAX_HEADER_SEGMENT or token.count(".") != 2:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid[:_MAX_FIELD] if isinstance(kid, str) else None


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _request_fields() -> dict[str, Any]:
    """Who asked for what. ``remote_addr`` is the client once ``ProxyFix`` ran."""
    if not has_request_context():
        return {}
    agent = request.headers.get("User-Agent")
    return {
        "ip": request.remote_addr,
        "user_agent": agent[:256] if agent else None,
        "method": request.method,
        "path": request.path,
    }


def _context_fields(context: AuthContext) -> dict[str, Any]:
    return {
        "subject": context.subject,
        "client_id": context.client_id,
        "organization_id": context.organization_id,
        "token_type": context.token_type,
        "jti": context.token_id,
    }


def _event_name(error: OAuthVerifyError) -> str:
    if error.error == "unauthorized":
        return "missing_token"
    if error.error == "insufficient_scope":
        return "insufficient_scope"
    if error.error in ("missing_organization_context", "missing_user_context"):
        return "missing_context"
    return "token_validation_failed"


#: :attr:`SecurityEvents.quiet_signs`: the logger's level cache and the
#: receivers of :data:`security_event` and :data:`token_validated`.
QuietSigns = list[dict[Any, Any]]
#: What :meth:`SecurityEvents._take_quiet_signs` reads.
_QUIET_INPUTS = frozenset({"quiet_signs", "logger", "metrics"})


def _new_quiet_signs() -> QuietSigns:
    """Quiet signs that say "ask" until taken from a logger."""
    return [{}, security_event.receivers, token_validated.receivers]


class SecurityEvents:
    """Emits security events to the log, to signal receivers and to metrics.

    One instance per app (``app.extensions["oauth_verify"].events``).

    :param logger: the logger; ``flask_oauth_verify.security`` by default.
    :param sender: the signal sender when no app context is active (the app).
    """

    def __init__(self, logger: logging.Logger | None = None, *, sender: Any = None) -> None:
        #: Three live dictionaries that tell, without a call, that
        #: :meth:`enabled` is false (see :meth:`_take_quiet_signs`); one list,
        #: changed in place, so that what holds it (the app state) stays current.
        self.quiet_signs: QuietSigns = _new_quiet_signs()
        self.logger = logger or logging.getLogger(SECURITY_LOGGER)
        self.sender = sender
        #: The app's :class:`~flask_oauth_verify.metrics.Metrics`, when on.
        self.metrics: Metrics | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("logger", "metrics") and self.__dict__.keys() >= _QUIET_INPUTS:
            self._take_quiet_signs()

    def __copy__(self) -> SecurityEvents:
        """A copy with its own :attr:`quiet_signs` (never the app's list)."""
        clone = object.__new__(type(self))
        clone.__setstate__(self.__dict__)
        return clone

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore ``state`` (a copy, pickle) with fresh, live :attr:`quiet_signs`."""
        self.__dict__.update(state)
        self.__dict__["quiet_signs"] = _new_quiet_signs()
        if self.__dict__.keys() >= _QUIET_INPUTS:
            self._take_quiet_signs()

    # -- cheap checks for the hot path ----------------------------------------

    def wants(self, event: str, level: int = logging.INFO) -> bool:
        """Whether a record of ``event`` would be logged or heard by a receiver."""
        if self.logger.isEnabledFor(level) or security_event.receivers:
            return True
        signal = EVENTS.get(event)
        return bool(signal and signal[0].receivers)

    def enabled(self, level: int = logging.INFO) -> bool:
        """Whether :meth:`validated` has anything to do (log, signal or metrics)."""
        # Called once per verified request: no further calls, no lookups.
        return (
            self.metrics is not None
            or self.logger.isEnabledFor(level)
            or bool(security_event.receivers)
            or bool(token_validated.receivers)
        )

    def _take_quiet_signs(self) -> None:
        """Point :attr:`quiet_signs` at this logger's level cache (or at none).

        ``levels.get(logging.INFO) is False`` and both receiver dictionaries
        empty mean ``not enabled()``; anything else means "ask
        :meth:`enabled`". ``levels`` is the logger's own cache of
        ``isEnabledFor`` answers, which :mod:`logging` empties whenever a
        level changes anywhere (``setLevel``, ``logging.disable``) and
        :meth:`enabled` fills again; the receiver dictionaries are the
        signals' own, which :mod:`blinker` changes in place. With metrics on,
        or a logger whose ``isEnabledFor`` is not the standard one (a custom
        logger class may answer from elsewhere), ``levels`` is an empty
        dictionary nobody fills: always ask. Taken again whenever
        :attr:`logger` or :attr:`metrics` is set.
        """
        logger = self.logger
        levels = getattr(logger, "_cache", None)
        if (
            self.metrics is not None
            or type(levels) is not dict
            or getattr(type(logger), "isEnabledFor", None) is not logging.Logger.isEnabledFor
        ):
            levels = {}
        self.quiet_signs[0] = levels

    # -- emitting -------------------------------------------------------------

    def emit(self, event: str, fields: Mapping[str, Any], level: int | None = None) -> None:
        """Emit ``event`` with ``fields`` (plus the request's fields).

        Used by the key store and the introspection client through their
        ``on_event`` hook.

        :param event: the event name (see the module docstring).
        :param fields: JSON-ready fields; never a token.
        :param level: the log level; the event's default when ``None``.
        """
        if self.metrics is not None:
            self.metrics.observe_event(event, fields)
        if level is None:
            level = EVENTS[event][1] if event in EVENTS else logging.DEBUG
        if not self.wants(event, level):
            return
        record: dict[str, Any] = {"event": event, "timestamp": _timestamp()}
        record.update(_request_fields())
        record.update({k: v for k, v in fields.items() if v is not None})
        self._send(event, record)
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level,
                "%s%s",
                event,
                _summary(record),
                extra={"security": record, **_safe_extra(record)},
            )

    def _send(self, event: str, record: dict[str, Any]) -> None:
        signal = EVENTS.get(event, (_NO_SIGNAL, 0))[0]
        if not (signal.receivers or security_event.receivers):
            return
        sender = current_app._get_current_object() if has_app_context() else self.sender  # type: ignore[attr-defined]
        if signal.receivers:
            _send_isolated(signal, sender, record=dict(record))
        if security_event.receivers:
            _send_isolated(security_event, sender, event=event, record=dict(record))

    def validated(
        self,
        context: AuthContext,
        token: str | None,
        *,
        strategy: str | None = None,
        started: float | None = None,
    ) -> None:
        """A token passed every check.

        :param context: the verified context.
        :param token: the token (only its hash and header ``kid`` are logged).
        :param strategy: the strategy requested (``None``: the app's default).
        :param started: :func:`time.perf_counter` when the check began (metrics).
        """
        if self.metrics is not None:
            self.metrics.validated(context, strategy, token, _elapsed(started))
        if not self.wants("token_validated"):
            return
        fields = _context_fields(context)
        fields["strategy"] = context.strategy
        if token is not None:
            fields["kid"] = _unverified_kid(token)
            fields["token_hash"] = short_token_hash(token)
        self.emit("token_validated", fields, logging.INFO)

    def failed(
        self,
        error: OAuthVerifyError,
        token: str | None,
        *,
        strategy: str | None = None,
        started: float | None = None,
    ) -> None:
        """A request was refused; ``reason`` is the precise internal reason.

        :param error: the refusal (its ``reason`` is logged, never sent).
        :param token: the token if one was read (only its hash is logged).
        :param strategy: the strategy requested (``None``: the app's default).
        :param started: :func:`time.perf_counter` when the check began (metrics).
        """
        if has_request_context():
            g._oauth_verify_refused = True  # the security headers apply to this response
        if self.metrics is not None:
            self.metrics.refused(error, strategy, token, _elapsed(started))
        event = _event_name(error)
        level = logging.ERROR if error.status_code >= 500 else EVENTS[event][1]
        if not self.wants(event, level):
            return
        fields: dict[str, Any] = {
            "error": error.error,
            "status": error.status_code,
            "reason": error.reason,
        }
        if strategy is not None:
            fields["strategy"] = strategy
        if isinstance(error, InsufficientScopeError) and error.scopes:
            fields["required_scopes"] = list(error.scopes)
        if event != "token_validation_failed":
            # A token was verified earlier in this request: say whose it was.
            context = request_auth()
            if context is not None:
                fields.update(_context_fields(context))
                fields["scopes"] = sorted(context.scopes)
        if token is not None:
            fields["kid"] = _unverified_kid(token)
            fields["token_hash"] = short_token_hash(token)
        self.emit(event, fields, level)


def _send_isolated(signal: Signal, sender: Any, **fields: Any) -> None:
    """``signal.send()``, each receiver on its own: a receiver that raises
    (a blocklist whose Redis is down) is logged and the others still run.
    The request's own outcome never depends on a receiver."""
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **fields)
        except Exception as exc:
            _logger.error(
                "A receiver of %s raised; ignored (the request goes on).",
                getattr(signal, "name", "a signal"),
                exc_info=withheld_exc_info(exc),
            )


def _elapsed(started: float | None) -> float | None:
    return None if not started else time.perf_counter() - started


def _summary(record: Mapping[str, Any]) -> str:
    """The human part of the message: the reason and the key identifiers."""
    parts: list[str] = []
    reason = record.get("reason")
    if reason:
        parts.append(f": {one_line(str(reason))}")
    details = [
        f"{name}={one_line(str(record[name]))}"
        for name in ("error", "status", "issuer", "subject", "client_id", "organization_id")
        if record.get(name) is not None
    ]
    if details:
        parts.append(" (" + ", ".join(details) + ")")
    return "".join(parts)


def one_line(text: str) -> str:
    """``text`` from outside (a token's claims, an issuer's words) fit for a
    plain-text log line or a terminal: control and other non-printable
    characters escaped, so no value can start a forged line or move the
    cursor."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "security",
}


def _safe_extra(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's fields that can become ``LogRecord`` attributes."""
    return {key: value for key, value in record.items() if key not in _RESERVED}
