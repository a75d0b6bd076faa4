"""Reading the bearer token from a request (RFC 6750 §2, RFC 7235 §2.1).

By default only the ``Authorization`` header is read (§2.1). The form body
(§2.2) and the query parameter (§2.3) can be enabled with
``OAUTH_VERIFY_TOKEN_LOCATIONS``; whatever is enabled, a token sent in more
than one way is a malformed request (§2: "clients MUST NOT use more than one
method"), as is ``Bearer`` without a token.
"""

from __future__ import annotations

import re
import string
from typing import Any

from flask import Request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from .config import Settings
from .errors import InvalidRequestError, InvalidTokenError

__all__ = ["extract_token", "is_b64token", "may_name_access_token", "plain_header_token"]

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
# Checked with bytes.translate (a C loop) rather than a regex, which costs
# ~15 ns per character: 10 µs on a 0.7 KB token, 100 µs on an 8 KB one.
_B64TOKEN_CHARS = string.ascii_letters.encode() + string.digits.encode() + b"-._~+/"

#: A ``Bearer`` credential after a comma: a second ``Authorization`` header
#: folded into the first by the WSGI server (``Basic ..., Bearer ...``).
_LATER_BEARER = re.compile(r",\s*bearer(?:\s|$)", re.IGNORECASE)


def _spelling(char: str) -> str:
    """``char`` as a regex, plain or percent-encoded (either case of hex digit)."""
    code = f"{ord(char):02x}"
    high, low = code[0], code[1]
    return f"(?:{re.escape(char)}|%{high}[{low.lower()}{low.upper()}])"


#: ``access_token`` with any of its characters percent-encoded
#: (``access%5Ftoken``, ``%61ccess_token``): what Werkzeug decodes to the name.
_ENCODED_NAME = re.compile("".join(_spelling(char) for char in "access_token"))


def may_name_access_token(query_string: str) -> bool:
    """Whether the raw query string may hold an ``access_token`` parameter,
    its name written plainly or percent-encoded (a ``%`` is rare in a query,
    so the regex runs seldom)."""
    if "access_token" in query_string:
        return True
    return "%" in query_string and _ENCODED_NAME.search(query_string) is not None


def is_b64token(token: str) -> bool:
    """Whether ``token`` matches ``b64token`` (same as ``[A-Za-z0-9-._~+/]+=*``)."""
    try:
        body = token.encode("ascii").rstrip(b"=")
    except UnicodeEncodeError:
        return False
    return bool(body) and not body.translate(None, _B64TOKEN_CHARS)


def plain_header_token(environ: dict[str, Any]) -> str | None:
    """The token of the usual request, read with the least work; else ``None``.

    The usual request carries ``Authorization: Bearer <token>`` (one space),
    no ``access_token`` in the query string and no body. For such a request
    whose token is a ``b64token`` (which the caller checks, or knows from a
    cache hit on a token that passed :func:`extract_token` before),
    :func:`extract_token` returns exactly the string returned here. Any other
    request returns ``None`` and takes :func:`extract_token`, which decides
    every case.
    """
    value: str | None = environ.get("HTTP_AUTHORIZATION")
    if value is None or not value.startswith(("Bearer ", "bearer ")):
        return None
    query = environ.get("QUERY_STRING")
    if environ.get("CONTENT_TYPE") or (query and may_name_access_token(query)):
        return None
    return value[7:]


def _from_header(value: str) -> str | None:
    """The token of an ``Authorization`` header value (``None``: another scheme)."""
    # A WSGI server folds repeated headers into one environ entry joined by
    # ", "; such a value fails the single-token checks below (400).
    # OWS is SP and HTAB only (RFC 9110 §5.6.3): str.strip() would also take
    # \x0b, \x1c-\x1f, \x85 and NBSP for white space around the credentials.
    scheme, _, rest = value.strip(" \t").partition(" ")
    if scheme[:6].lower() == "bearer" and scheme[6:7].isspace():
        # RFC 9110 §11.4: one or more SP after the scheme, never HTAB (nor a
        # NBSP, a vertical tab...): a malformed Bearer header, not another scheme.
        raise InvalidRequestError(reason="a character other than a space after the Bearer scheme")
    if scheme.lower() != "bearer":
        if _LATER_BEARER.search(value):
            raise InvalidRequestError(reason="several Authorization headers")
        return None  # another scheme: no bearer token was sent
    token = rest.strip(" ")
    if not token:
        raise InvalidRequestError(reason="Bearer scheme without a token")
    if " " in token or "\t" in token:
        raise InvalidRequestError(reason="Authorization header has extra parts")
    return token


def _from_query(request: Request) -> str | None:
    """The ``access_token`` query parameter (the caller checked the raw query
    may name one)."""
    values = request.args.getlist("access_token")
    if len(values) > 1:
        raise InvalidRequestError(reason="several access_token query parameters")
    if values and not values[0]:
        raise InvalidRequestError(reason="empty access_token query parameter")
    return values[0] if values else None


#: Methods whose request body has defined semantics: the only ones a form
#: token may come with (RFC 6750 §2.2: never ``GET``).
_FORM_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _from_form(request: Request, environ: dict[str, Any], enabled: bool) -> str | None:
    # Cheap environ reads first: most requests carry no Content-Type at all.
    if not environ.get("CONTENT_TYPE") or request.method not in _FORM_METHODS:
        return None  # request.method: upper case, as Flask routes it ("post" is POST)
    if request.mimetype != "application/x-www-form-urlencoded":
        return None
    try:
        length, limit = request.content_length, request.max_form_memory_size
        if length is not None and (limit is None or length <= limit):
            # The form is then parsed from a cached copy: the view can still
            # read the raw body (after request.form, get_data() returns b"").
            request.get_data(cache=True)
        form = request.form
    except RequestEntityTooLarge:
        # Beyond the app's MAX_CONTENT_LENGTH / MAX_FORM_MEMORY_SIZE: a body that
        # cannot be read holds no token we read; the view meets the limit itself.
        if not enabled:
            return None
        raise InvalidRequestError(reason="request body too large to read a form token") from None
    except (BadRequest, OSError):
        # The client hung up mid-body (werkzeug's ClientDisconnected) or sent
        # broken chunked framing (the server's OSError): the same, a body that
        # cannot be read holds no token; the view meets the broken body itself.
        if not enabled:
            return None
        raise InvalidRequestError(reason="request body could not be read") from None
    values = form.getlist("access_token")
    if len(values) > 1:
        raise InvalidRequestError(reason="several access_token form fields")
    if values and not values[0]:
        raise InvalidRequestError(reason="empty access_token form field")
    return values[0] if values else None


def extract_token(request: Request, settings: Settings) -> str | None:
    """Return the bearer token of ``request``, or ``None`` if none was sent.

    :param request: the current request.
    :param settings: gives ``TOKEN_LOCATIONS``.
    :raises InvalidRequestError: token sent two ways, empty, or malformed header.
    :raises InvalidTokenError: the token has characters a bearer token cannot have.
    """
    environ = request.environ
    # The common request has a header token, no query token and no body: two
    # dict reads decide that the query and the form need no parsing.
    value: str | None = environ.get("HTTP_AUTHORIZATION")
    header = _from_header(value) if value is not None else None
    query = _from_query(request) if may_name_access_token(environ.get("QUERY_STRING", "")) else None
    form = (
        _from_form(request, environ, "form" in settings.token_locations)
        if environ.get("CONTENT_TYPE")
        else None
    )
    if query is None and form is None:
        if header is None:
            return None
        token: str | None = header if "header" in settings.token_locations else None
    else:
        if (header is not None) + (query is not None) + (form is not None) > 1:
            raise InvalidRequestError(reason="token sent in more than one way")
        # A token in a location that is not enabled counts as no token at all.
        token = _enabled(settings.token_locations, header, query, form)
    if token is None:
        return None
    if not is_b64token(token):
        raise InvalidTokenError(reason="token has characters outside the b64token syntax")
    return token


def _enabled(
    locations: tuple[str, ...], header: str | None, query: str | None, form: str | None
) -> str | None:
    """The token from the first enabled location that has one."""
    token = None
    for location in locations:
        if location == "header":
            token = header
        elif location == "query":
            token = query
        else:
            token = form
        if token is not None:
            break
    return token
