"""The exception tree and the default RFC 6750 error response.

Every failure of token verification is one of these exceptions. Each is a
:class:`werkzeug.exceptions.HTTPException`, so Flask turns it into a response
and an application can customise one case with
``@app.errorhandler(TokenExpired)``: Flask picks the most specific handler.

The JSON body is ``{"error": "<code>", "message": "<human text>"}`` and the
``WWW-Authenticate`` header follows RFC 6750 §3. The precise internal reason
(``reason``) is for logs only; the public description stays generic so that
an attacker learns nothing from it.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterable
from types import TracebackType
from typing import Any, ClassVar

from flask import Response, current_app, has_app_context
from werkzeug.exceptions import HTTPException

__all__ = [
    "InsufficientScopeError",
    "InvalidRequestError",
    "InvalidTokenError",
    "MissingContextError",
    "MissingOrganizationContext",
    "MissingTokenError",
    "MissingUserContext",
    "OAuthVerifyError",
    "TokenExpired",
    "TokenNotActive",
    "UpstreamError",
    "default_error_response",
]

DEFAULT_REALM = "api"


class AnsweredByFlask(HTTPException):
    """Flask's own answer to a request no view runs for (a CORS preflight
    reaching a ``before_request`` that verifies), raised to end the request.

    Internal: :meth:`~flask_oauth_verify.OAuthVerify.init_app` registers a
    handler that returns the carried response, so it is answered even with
    ``TRAP_HTTP_EXCEPTIONS`` on (Flask then hands every ``HTTPException`` to
    the error handlers, and a bare ``abort(response)`` has none: a 500).
    """

    def __init__(self, response: Response) -> None:
        super().__init__(response=response)

    @staticmethod
    def answer(error: AnsweredByFlask) -> Any:
        """The response it carries (the registered error handler)."""
        return error.get_response()


def _printable_ascii(value: str) -> str:
    """``value`` reduced to printable ASCII, the only characters a header
    value can carry safely (a WSGI server encodes headers as Latin-1, and one
    it cannot encode breaks the response: no answer at all).

    Control characters become a space, so that a header can never be split;
    accented letters lose their accent (``é`` -> ``e``); any other character
    becomes ``?``.
    """
    if value.isascii() and value.isprintable():
        return value
    out = []
    for ch in unicodedata.normalize("NFKD", value):
        if " " <= ch <= "~":
            out.append(ch)
        elif ch < " " or ch == "\x7f" or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(" ")
        elif not unicodedata.combining(ch):
            out.append("?")
    return "".join(out)


def _quote(value: str) -> str:
    """Return ``value`` as an RFC 7230 quoted-string of printable ASCII.

    Backslash and double quote are escaped; control characters become a
    space and non-ASCII characters are replaced (:func:`_printable_ascii`).
    """
    cleaned = _printable_ascii(value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_rfc6750(value: str) -> str:
    """Return ``value`` quoted for an RFC 6750 ``error_description`` or
    ``scope`` attribute, whose values MUST NOT include characters outside
    ``%x20-21 / %x23-5B / %x5D-7E``: besides :func:`_quote`'s rules, a double
    quote becomes ``'`` and a backslash ``/`` (a client may not unescape)."""
    return '"' + _printable_ascii(value).replace('"', "'").replace("\\", "/") + '"'


class OAuthVerifyError(HTTPException):
    """Base class of every error this package raises for a request.

    :param description: the public, human-readable message (generic); the
        class's :attr:`default_description` when ``None``.
    :param reason: the precise internal reason, logged but never sent.
    :param realm: the ``realm`` of the ``WWW-Authenticate`` challenge;
        when ``None``, the app's ``OAUTH_VERIFY_REALM`` (set by the
        extension's error handler), else ``"api"``.
    """

    #: HTTP status of the response.
    code: int = 401
    #: The ``error`` member of the JSON body.
    error: ClassVar[str] = "invalid_token"
    #: The ``error`` attribute of the ``WWW-Authenticate`` challenge
    #: (RFC 6750 §3.1 codes); ``None`` leaves it out.
    challenge_error: ClassVar[str | None] = "invalid_token"
    #: The public description used when none is given.
    default_description: ClassVar[str] = "The access token is invalid."

    def __init__(
        self,
        description: str | None = None,
        *,
        reason: str | None = None,
        realm: str | None = None,
    ) -> None:
        super().__init__(description or self.default_description)
        self.reason = reason or self.description
        self.realm = realm

    @property
    def status_code(self) -> int:
        """The HTTP status code (alias of :attr:`code`)."""
        return int(self.code or 500)

    def challenge(self, realm: str | None = None) -> str:
        """Build the RFC 6750 ``WWW-Authenticate`` header value.

        :param realm: the protection space; falls back to the error's own
            realm, then to the current app's ``OAUTH_VERIFY_REALM``, then to
            ``"api"``.
        """
        parts = [f"realm={_quote(realm or self.realm or _app_realm() or DEFAULT_REALM)}"]
        if self.challenge_error is not None:
            parts.append(f"error={_quote(self.challenge_error)}")
            parts.append(f"error_description={_quote_rfc6750(str(self.description))}")
        parts.extend(self._extra_challenge_params())
        return "Bearer " + ", ".join(parts)

    def _extra_challenge_params(self) -> list[str]:
        return []

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return {"error": self.error, "message": str(self.description)}

    def get_headers(self, environ: Any = None, scope: Any = None) -> list[tuple[str, str]]:
        """Headers of the response: JSON content type and the challenge."""
        return [
            ("Content-Type", "application/json"),
            ("WWW-Authenticate", self.challenge()),
            ("Cache-Control", "no-store"),
        ]

    def get_body(self, environ: Any = None, scope: Any = None) -> str:
        """The serialised JSON body."""
        return json.dumps(self.body())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.error!r}, reason={self.reason!r})"


class MissingTokenError(OAuthVerifyError):
    """No bearer token was sent (RFC 6750 §3.1: no ``error`` attribute)."""

    code = 401
    error = "unauthorized"
    challenge_error = None
    default_description = "A bearer access token is required."


class InvalidRequestError(OAuthVerifyError):
    """The request is malformed: token sent twice, empty, unparsable header."""

    code = 400
    error = "invalid_request"
    challenge_error = "invalid_request"
    default_description = "The request carries a malformed access token."


class InvalidTokenError(OAuthVerifyError):
    """The token is malformed, forged, mis-addressed or otherwise invalid."""

    code = 401
    error = "invalid_token"
    challenge_error = "invalid_token"
    default_description = "The access token is invalid."


class TokenExpired(InvalidTokenError):
    """The token's ``exp`` has passed (beyond the leeway)."""

    error = "token_expired"
    default_description = "The access token has expired."


class TokenNotActive(InvalidTokenError):
    """The token's ``nbf`` is still in the future (beyond the leeway)."""

    error = "token_not_active"
    default_description = "The access token is not active yet."


class MissingContextError(OAuthVerifyError):
    """The token is valid but lacks the context the view needs."""

    code = 401
    challenge_error = "invalid_token"


class MissingOrganizationContext(MissingContextError):
    """The view needs an organization and the token carries none."""

    error = "missing_organization_context"
    default_description = "The access token carries no organization."


class MissingUserContext(MissingContextError):
    """The view needs a user and the token acts for none."""

    error = "missing_user_context"
    default_description = "The access token does not act for a user."


class InsufficientScopeError(OAuthVerifyError):
    """The token is valid but lacks a required scope (RFC 6750 §3.1).

    :param scopes: the scopes the view requires; named in the challenge.
    """

    code = 403
    error = "insufficient_scope"
    challenge_error = "insufficient_scope"
    default_description = "The access token lacks a required scope."

    def __init__(
        self,
        description: str | None = None,
        *,
        scopes: Iterable[str] = (),
        reason: str | None = None,
        realm: str | None = None,
    ) -> None:
        super().__init__(description, reason=reason, realm=realm)
        self.scopes = tuple(scopes)

    def _extra_challenge_params(self) -> list[str]:
        if not self.scopes:
            return []
        return [f"scope={_quote_rfc6750(' '.join(self.scopes))}"]


class UpstreamError(OAuthVerifyError):
    """Keys or introspection are unreachable and nothing cached can decide.

    :param retry_after: seconds sent in the ``Retry-After`` header.
    """

    code = 503
    error = "temporarily_unavailable"
    challenge_error = "temporarily_unavailable"
    default_description = "Token verification is temporarily unavailable."

    def __init__(
        self,
        description: str | None = None,
        *,
        retry_after: int = 30,
        reason: str | None = None,
        realm: str | None = None,
    ) -> None:
        super().__init__(description, reason=reason, realm=realm)
        self.retry_after = max(1, int(retry_after))

    def get_headers(self, environ: Any = None, scope: Any = None) -> list[tuple[str, str]]:
        """Headers of the response, with ``Retry-After``."""
        return [*super().get_headers(environ, scope), ("Retry-After", str(self.retry_after))]


def default_error_response(error: OAuthVerifyError) -> Response:
    """Turn an :class:`OAuthVerifyError` into the JSON + challenge response.

    Registered by :meth:`~flask_oauth_verify.OAuthVerify.init_app` for the whole hierarchy.

    :param error: the error raised while verifying the request.
    """
    response = Response(error.get_body(), status=error.status_code)
    for name, value in error.get_headers():
        response.headers[name] = value
    return response


def _app_realm() -> str | None:
    """The current app's configured realm (a custom error handler that calls
    :meth:`OAuthVerifyError.challenge` gets it without passing it)."""
    if not has_app_context():
        return None
    state = current_app.extensions.get("oauth_verify")  # extension.EXTENSION_KEY
    settings = getattr(state, "settings", None)
    realm = getattr(settings, "realm", None)
    return realm if isinstance(realm, str) else None


# -- logging an unexpected exception ----------------------------------------------


class _Withheld(Exception):
    """Stands in for an exception in a log record; see :func:`withheld_exc_info`."""


@functools.lru_cache(maxsize=64)
def _stand_in_type(module: str, qualname: str) -> type[_Withheld]:
    # Named and placed like the original, so the log's last line reads
    # "ValueError: (message withheld)" and a log service groups it as one.
    namespace = {"__module__": module, "__qualname__": qualname}
    return type(qualname.rpartition(".")[2], (_Withheld,), namespace)


def withheld_exc_info(
    exc: BaseException,
) -> tuple[type[BaseException], BaseException, TracebackType | None]:
    """``exc_info`` for logging ``exc`` without its message.

    An unexpected exception's message may quote the token or a credential
    (an app's ``USER_ID_RULE`` that raises with the ``Authorization``
    header, a library echoing its input or a URL with ``?api_key=``). The
    log keeps each exception's type and traceback frames (where it was
    raised), for ``exc`` and the exceptions chained to it, and replaces
    every message (and note) with ``(message withheld)``.

    :param exc: the exception being handled.
    """
    originals: dict[int, BaseException] = {}
    stand_ins: dict[int, BaseException] = {}
    pending = [exc]
    while pending:  # iterative, and a cycle of contexts ends it
        current = pending.pop()
        if id(current) in stand_ins:
            continue
        originals[id(current)] = current
        # str(): a class may carry anything there, and this must never raise
        kind = _stand_in_type(str(type(current).__module__), str(type(current).__qualname__))
        stand_ins[id(current)] = kind("(message withheld)").with_traceback(current.__traceback__)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    for key, original in originals.items():
        linked = stand_ins[key]
        cause, context = original.__cause__, original.__context__
        linked.__cause__ = None if cause is None else stand_ins[id(cause)]
        linked.__context__ = None if context is None else stand_ins[id(context)]
        linked.__suppress_context__ = original.__suppress_context__  # after __cause__
    first = stand_ins[id(exc)]
    return type(first), first, first.__traceback__
