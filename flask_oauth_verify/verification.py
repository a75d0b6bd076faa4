"""JWT access-token verification (RFC 7515, RFC 7519, RFC 8725, RFC 9068).

Pure code: a token string and a key resolver in, verified claims or an
exception out. No Flask request, no network (the resolver may do I/O behind
its interface). The order of checks is chosen so that the cheap rejections
come first and nothing from the payload is trusted before the signature is:

1. size cap and exactly three segments (compact JWS only; a five-segment
   JWE or anything else is refused before any decoding);
2. the protected header: strict base64url, a JSON object without duplicate
   members, ``alg`` in the allowlist, no ``crit`` (we implement no
   extension, so every critical one is unknown, RFC 7515 §4.1.11), no
   ``b64``/``enc``/``zip``, no ``cty`` of ``JWT`` (a nested token),
   ``typ`` in the allowlist; ``jku``, ``x5u``,
   ``jwk`` and ``x5c`` are never used to find a key;
3. the unverified ``iss`` must be one of the configured issuers before any
   key is looked up or fetched (so a token cannot make us fetch anything);
4. the key of that issuer with the header's ``kid``, and only a verifier
   bound to both the key type and ``alg`` (no RSA/HMAC confusion);
5. the signature;
6. then the claims: ``iss`` exact, ``exp`` required, ``nbf``/``iat`` with
   leeway, ``aud``, required claims and values, allowed client ids.
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from json.scanner import make_scanner
from typing import Any, Protocol, TypeGuard, cast

from .claims import claim_path
from .config import Settings
from .errors import InvalidTokenError, TokenExpired, TokenNotActive
from .issuers import IssuerMatcher, is_template
from .keys import PreparedKey
from .strictjson import STRICT_DECODER

__all__ = ["JWSHeader", "JWTVerifier", "KeyResolver", "Vouched", "finite_number", "looks_like_jws"]

_REFUSED_HEADERS = ("crit", "b64", "enc", "zip")
#: The ``cty`` media type of a nested JWT (RFC 7519 §5.2; ``JWT`` or
#: ``application/jwt``, see :func:`media_type`).
_NESTED_CTY = "application/jwt"
_MAX_KID_LENGTH = 512
_HEADER_CACHE_SIZE = 512
_BASE64_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
#: The value of each base64url character, by its byte (the canonical check).
_B64URL_VALUES = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
#: Segment length % 4 -> (bits the last character must not set, padding).
_LAST_CHARACTER = {2: (0x0F, b"=="), 3: (0x03, b"=")}
#: Integers strictly inside these bounds convert to finite floats (the fast
#: claims check); anything outside takes the exact path (:func:`_is_number`).
_INT_HIGH = 2**1023
_INT_LOW = -_INT_HIGH
#: The last second of year 9999: an ``exp`` beyond it is no date in seconds
#: (an issuer writing milliseconds makes a token that would never expire).
LATEST_EXP = 253_402_300_799
#: ``claims.get(name, _ABSENT)``: tells a missing claim from ``"nbf": null``.
_ABSENT: Any = object()
#: Values (lower case) of a ``typ`` *claim* that name a token other than an
#: access token: Keycloak signs its ID tokens (``"ID"``) with the access
#: tokens' keys and answers introspection of its refresh (``"Refresh"``,
#: ``"Offline"``) tokens with their claims; its access tokens say ``"Bearer"``.
_OTHER_TOKEN_TYPS = frozenset({"id", "refresh", "offline", "logout"})


@dataclasses.dataclass(frozen=True, slots=True)
class JWSHeader:
    """The checked protected header of a token."""

    alg: str
    kid: str | None
    typ: str | None
    raw: Mapping[str, Any]


#: What a resolver returns: the key, then two values that vouch for it, opaque
#: to the verifier (the key store's source and key set: what a hit of the
#: verified-token cache re-checks).
Vouched = tuple[PreparedKey, Any, Any]


class KeyResolver(Protocol):
    """Finds the verification key of an issuer (implemented by the key store)."""

    def resolve_vouched(self, issuer: str, header: JWSHeader) -> Vouched:
        """Return the key for ``header`` from ``issuer``'s key set, and what vouches for it.

        :raises InvalidTokenError: when no such key exists.
        :raises UpstreamError: when the keys cannot be had at all.
        """
        ...


def _invalid(reason: str) -> InvalidTokenError:
    return InvalidTokenError(reason=reason)


def _id_token(claim: str) -> InvalidTokenError:
    """The refusal of a token holding ``claim`` (of ``REFUSED_CLAIMS``)."""
    if claim == "cnf":
        return InvalidTokenError(
            reason="claim 'cnf' binds the token to a key its client must prove (DPoP or "
            "mutual TLS), which a Bearer request cannot"
        )
    return InvalidTokenError(
        reason=f"claim {claim!r} marks an ID token, which is not an access token"
    )


def _b64decode(segment: str, what: str) -> bytes:
    """Strict base64url (RFC 7515 §2: no padding, URL-safe alphabet only)."""
    try:
        raw = segment.encode("ascii")
    except UnicodeEncodeError:
        raise _invalid(f"{what} is not base64url") from None
    # bytes.translate is a C table lookup (str.translate with a dict is not);
    # deleting "+", "/" and "=" first shows whether the segment had any.
    standard = raw.translate(_BASE64_FROM_URLSAFE, b"+/=")
    remainder = len(raw) % 4
    if len(standard) != len(raw) or remainder == 1:
        raise _invalid(f"{what} is not base64url")
    if remainder:
        # Canonical only (RFC 4648 §3.5): the unused low bits of the last
        # character must be zero, or one token would have many spellings.
        unused, padding = _LAST_CHARACTER[remainder]
        if _B64URL_VALUES.get(raw[-1], 0) & unused:
            raise _invalid(f"{what} is not canonical base64url")
        standard += padding
    try:
        return binascii.a2b_base64(standard, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{what} is not base64url") from None


_DECODER = STRICT_DECODER


# The decoder's scanner, called directly for the usual text (an object from
# the first character to the last): the same parse as _DECODER.decode()
# without its two whitespace regex matches; anything else takes decode().
_SCAN: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, _DECODER))


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        # RFC 7519 §7.2: the JSON is UTF-8 (no other encoding, no BOM).
        text = data.decode("utf-8")
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:  # leading whitespace, or not JSON at all
            end = -1
        if end != len(text):  # ditto, or trailing whitespace / extra data
            value = _DECODER.decode(text)
    except (ValueError, UnicodeDecodeError):
        raise _invalid(f"{what} is not a JSON object without duplicate members") from None
    except RecursionError:  # the parser's own depth limit (about 1,000 on Python 3.11)
        raise _invalid(f"{what} nests too deeply to be read") from None
    if not isinstance(value, dict):
        raise _invalid(f"{what} is not a JSON object")
    return value


def looks_like_jws(token: str) -> bool:
    """Whether ``token`` has the shape of a compact JWS (``auto`` strategy)."""
    if token.count(".") != 2:
        return False
    header = token.split(".", 1)[0]
    return header.startswith("eyJ")


class _Members(list[tuple[str, Any]]):
    """A JSON object's members in order, names repeated as sent."""


_LENIENT_DECODER = json.JSONDecoder(object_pairs_hook=_Members)


def unsecured_jws(token: str) -> bool:
    """Whether ``token`` is a JWS whose header names no signature algorithm.

    Read as leniently as other JOSE parsers read a header (Keycloak's among
    them): one or more dots, either base64 alphabet with or without padding,
    white space or a byte order mark around the JSON, a member named twice.
    A header that decodes to a JSON object with ``alg`` missing, or any
    ``alg`` member that is not a string or is ``none`` (RFC 7518 §3.6, in
    any case, with spaces): an unsecured JWT, never an access token.
    Anything else — an opaque token, a JWS with some ``alg`` — is not.
    """
    if "." not in token:
        return False
    segment = token.split(".", 1)[0].rstrip("=").replace("-", "+").replace("_", "/")
    try:
        raw = binascii.a2b_base64(segment + "=" * (-len(segment) % 4))
        members = _LENIENT_DECODER.decode(raw.decode("utf-8-sig").strip())
    except (ValueError, RecursionError):  # binascii.Error and UnicodeError included
        return False
    if not isinstance(members, _Members):
        return False
    algs = [value for name, value in members if name == "alg"]
    return not algs or any(
        not isinstance(alg, str) or alg.strip().lower() == "none" for alg in algs
    )


def finite_number(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a JSON number a float can hold (not a bool, not
    infinite, not an integer beyond the float range such as ``10**400``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        return False


_is_number = finite_number


def _check_typ_claim(typ: Any) -> None:
    """Refuse a ``typ`` claim that names an ID, refresh or logout token."""
    if type(typ) is str and typ.lower() in _OTHER_TOKEN_TYPS:
        raise InvalidTokenError(
            reason=f"claim 'typ' {typ[:16]!r} marks a token that is not an access token"
        )


def media_type(typ: str | None) -> str | None:
    """A ``typ`` value as the media type it names (RFC 7515 §4.1.9): lower
    case, with ``application/`` prepended when it has no ``/`` — so ``at+jwt``
    and ``application/at+jwt`` are one type (RFC 9068 §4 names both)."""
    if typ is None:
        return None
    typ = typ.lower()
    return typ if "/" in typ else "application/" + typ


def _same_value(actual: Any, expected: Any) -> bool:
    # 1 == True in Python; a claim that must be 1 must not accept true.
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    return type(actual) is type(expected) and actual == expected


class JWTVerifier:
    """Verifies compact JWS access tokens against one app's settings.

    Everything derivable from the settings is prepared once here, so that
    :meth:`verify` does only per-token work.

    :param settings: the app's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._max_bytes = settings.max_token_bytes
        self._algorithms = frozenset(settings.algorithms)
        self._types = frozenset(media_type(t) for t in settings.allowed_types)
        # Exact issuers only: a template is never matched literally.
        self._issuers = frozenset(i for i in settings.issuers if not is_template(i))
        self._issuer_matcher: IssuerMatcher | None = None
        if len(self._issuers) != len(settings.issuers) or settings.issuer_claims:
            self._issuer_matcher = IssuerMatcher(
                settings.issuers,
                settings.issuer_placeholder_claims,
                settings.allowed_tenants,
                settings.issuer_claims,
            )
        self._audiences = frozenset(settings.audiences)
        self._verify_audience = settings.verify_audience
        self._leeway = settings.leeway
        self._required = tuple(settings.required_claims)
        self._required_values = tuple(settings.required_claim_values.items())
        self._client_ids = frozenset(settings.allowed_client_ids)
        self._client_paths = settings.claim_map["client_id"]
        self._require_client = settings.require_client_id
        self._refused = settings.refused_claims
        # Required claims, values and client ids are rare: skip them as a whole.
        self._extra_checks = bool(
            self._required or self._required_values or self._client_ids or self._require_client
        )
        self._headers: dict[str, JWSHeader] = {}

    def header(self, segment: str) -> JWSHeader:
        """Decode and check the protected header (cached by its encoding)."""
        cached = self._headers.get(segment)
        if cached is not None:
            return cached
        header = self._parse_header(segment)
        if len(self._headers) >= _HEADER_CACHE_SIZE:
            self._headers.clear()
        self._headers[segment] = header
        return header

    def _parse_header(self, segment: str) -> JWSHeader:
        raw = _json_object(_b64decode(segment, "header"), "header")
        alg = raw.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid(f"alg {str(alg)[:32]!r} is not allowed")
        for name in _REFUSED_HEADERS:
            if name in raw:
                raise _invalid(f"header parameter {name!r} is not supported")
        cty = raw.get("cty")
        if isinstance(cty, str) and media_type(cty.split(";", 1)[0].strip(" \t")) == _NESTED_CTY:
            # RFC 7519 §5.2: the payload is another JWT. We verify no nested
            # tokens: never read such a payload as this token's claims. (The
            # type without parameters or surrounding space: RFC 9110 §8.3.1.)
            raise _invalid("cty says the payload is a nested JWT")
        # A member that is present must be a string (RFC 7515 §4.1.4, §4.1.9):
        # "typ": null or "kid": null is no absent member (as "nbf": null is not).
        typ = raw.get("typ")
        if "typ" in raw and not isinstance(typ, str):
            raise _invalid("typ is not a string")
        if media_type(typ) not in self._types:
            raise _invalid(f"typ {str(typ)[:32]!r} is not an access-token type")
        kid = raw.get("kid")
        if "kid" in raw and (not isinstance(kid, str) or len(kid) > _MAX_KID_LENGTH):
            raise _invalid("kid is not a short string")
        return JWSHeader(alg=alg, kid=kid, typ=typ, raw=raw)

    def unverified_issuer(self, payload: Mapping[str, Any], *, answer: bool = False) -> str:
        """The configured issuer of the payload's ``iss``, before any key lookup.

        An exact match returns ``iss``; for a templated issuer
        (:mod:`flask_oauth_verify.issuers`) the ``iss`` must match the whole
        template, each placeholder must equal its claim (``tid``) and be an
        allowed tenant, and the *template* is returned: it names the one key
        source every tenant shares. Claims bound to the issuer
        (``ISSUER_CLAIMS``) must match too.

        :param answer: ``True`` for an RFC 7662 introspection answer, which
            need only carry the issuer-bound claims when it has them (its
            ``iss`` already names them); a JWT must carry every one.
        """
        matcher = self._issuer_matcher
        if matcher is None:
            issuer = payload.get("iss")
            if isinstance(issuer, str) and issuer in self._issuers:
                return issuer
            raise _invalid("iss is not a configured issuer")
        return matcher.check(payload, answer=answer)

    def verify(
        self, token: str, resolver: KeyResolver, now: float
    ) -> tuple[dict[str, Any], PreparedKey, JWSHeader]:
        """Verify ``token`` and return its claims, the key and the header.

        :param token: the compact JWS from the request.
        :param resolver: finds keys (the app's key store).
        :param now: the current time, seconds since the epoch.
        :raises InvalidTokenError: (or a subclass) when the token is not valid.
        :raises UpstreamError: when keys cannot be had at all.
        """
        claims, header, _issuer, vouched = self.verify_token(token, resolver, now)
        return claims, vouched[0], header

    def verify_token(
        self, token: str, resolver: KeyResolver, now: float
    ) -> tuple[dict[str, Any], JWSHeader, str, Vouched]:
        """Same as :meth:`verify`: the claims, the header, the configured issuer
        the key came from, and the resolver's answer (the key and what vouches
        for it).

        The issuer is what :meth:`unverified_issuer` returned (the template,
        for a templated issuer): the key source of the token.
        """
        if len(token) > self._max_bytes:
            raise _invalid(f"token longer than {self._max_bytes} bytes")
        if token.count(".") != 2:
            raise _invalid("not a compact JWS (three segments)")
        header_segment, payload_segment, signature_segment = token.split(".")
        header = self._headers.get(header_segment) or self.header(header_segment)
        payload = _json_object(_b64decode(payload_segment, "payload"), "payload")
        issuer = payload.get("iss")  # unverified_issuer(), its usual case inlined
        if self._issuer_matcher is not None or type(issuer) is not str:
            issuer = self.unverified_issuer(payload)
        elif issuer not in self._issuers:
            raise _invalid("iss is not a configured issuer")
        vouched = resolver.resolve_vouched(issuer, header)
        key = vouched[0]
        verify = key.verifiers.get(header.alg)  # PreparedKey.verifier(), inlined
        if verify is None:
            raise _invalid(f"key {key.kid!r} is not usable with {header.alg}")
        signature = _b64decode(signature_segment, "signature")
        signing_input = token[: len(header_segment) + 1 + len(payload_segment)].encode("ascii")
        if not verify(signing_input, signature):
            raise _invalid("signature does not verify")
        self._check_jwt_claims(payload, now)
        return payload, header, issuer, vouched

    def _check_jwt_claims(self, claims: Mapping[str, Any], now: float) -> None:
        """:meth:`check_claims` of a JWT, with a fast path for the usual token.

        The usual token has integer ``exp``/``nbf``/``iat`` and a string
        ``aud``; when every one of those passes here, the outcome is the one
        :meth:`check_claims` would reach. Anything else (a float, a bool, a
        huge integer, a failed check) goes through :meth:`check_claims`,
        which names the exact reason.
        """
        get = claims.get
        exp = get("exp")
        nbf = get("nbf", _ABSENT)  # "nbf": null is not an absent nbf: slow path
        iat = get("iat", _ABSENT)
        leeway = self._leeway
        if not (
            type(exp) is int
            and _INT_LOW < exp <= LATEST_EXP
            and exp + leeway > now
            and (nbf is _ABSENT or (type(nbf) is int and _INT_LOW < nbf < _INT_HIGH))
            and (nbf is _ABSENT or nbf - leeway <= now)
            and (iat is _ABSENT or (type(iat) is int and _INT_LOW < iat < _INT_HIGH))
            and (iat is _ABSENT or iat - leeway <= now)
        ):
            self.check_claims(claims, now)
            return
        if self._verify_audience:
            aud = get("aud")
            if type(aud) is not str or aud not in self._audiences:
                self._check_audience(aud)
        for name in self._refused:
            if name in claims:
                raise _id_token(name)
        typ = get("typ")
        if typ is not None:
            _check_typ_claim(typ)
        if self._extra_checks:
            self._check_extra(claims)

    def check_claims(
        self,
        claims: Mapping[str, Any],
        now: float,
        *,
        require_exp: bool = True,
        require_audience: bool = True,
        extra: bool = True,
    ) -> None:
        """Check the registered and configured claims of verified ``claims``.

        Also used for introspection responses (which carry the same claims).

        :param require_exp: refuse claims without ``exp`` (JWTs). With
            ``False`` (introspection, where RFC 7662 §2.2 makes ``exp``
            optional) ``exp`` is checked only when present.
        :param require_audience: refuse claims without ``aud`` when the
            audience is checked. With ``False`` ``aud`` is checked only when
            present.
        :param extra: apply ``REQUIRED_CLAIMS``, ``REQUIRED_CLAIM_VALUES`` and
            the client checks. ``False`` for an introspection answer that only
            confirms a verified JWT is still active (``strategy="both"``):
            the JWT's own claims passed them.
        :raises InvalidTokenError: (or a subclass) naming the failed check.
        """
        if require_exp or "exp" in claims:
            exp = claims.get("exp")
            if not _is_number(exp):
                raise _invalid("exp is missing or not a number")
            if exp + self._leeway <= now:
                raise TokenExpired(reason="exp is in the past")
            if exp > LATEST_EXP:
                raise _invalid("exp is beyond the year 9999 (milliseconds, not seconds?)")
        self.check_time_claims(claims, now)
        if self._verify_audience and (require_audience or "aud" in claims):
            self._check_audience(claims.get("aud"))
        for name in self._refused:
            if name in claims:
                raise _id_token(name)
        typ = claims.get("typ")
        if typ is not None:
            _check_typ_claim(typ)
        if self._extra_checks and extra:
            self._check_extra(claims)

    def _check_extra(self, claims: Mapping[str, Any]) -> None:
        """Required claims, required values and allowed client ids."""
        for name in self._required:
            if claim_path(claims, name) is None:
                raise _invalid(f"required claim {name!r} is missing")
        for name, expected in self._required_values:
            if not _same_value(claim_path(claims, name), expected):
                raise _invalid(f"claim {name!r} does not have the required value")
        if self._client_ids:
            self._check_client(claims)
        elif self._require_client and self._client_of(claims) is None:
            raise _invalid("the token names no client (an ID token is not an access token)")

    def check_time_claims(self, claims: Mapping[str, Any], now: float) -> None:
        """Check ``nbf`` and ``iat`` (when present) against ``now`` with leeway.

        A claim that is present must be a number: ``"nbf": null`` is refused,
        not taken for a missing ``nbf``.
        """
        nbf = claims.get("nbf", _ABSENT)
        if nbf is not _ABSENT:
            if not _is_number(nbf):
                raise _invalid("nbf is not a number")
            if nbf - self._leeway > now:
                raise TokenNotActive(reason="nbf is in the future")
        iat = claims.get("iat", _ABSENT)
        if iat is not _ABSENT:
            if not _is_number(iat):
                raise _invalid("iat is not a number")
            if iat - self._leeway > now:
                raise _invalid("iat is in the future")

    def _check_audience(self, aud: Any) -> None:
        if isinstance(aud, str):
            if aud in self._audiences:
                return
        elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            if not self._audiences.isdisjoint(aud):
                return
        else:
            raise _invalid("aud is missing or malformed")
        raise _invalid("aud names none of the configured audiences")

    def _client_of(self, claims: Mapping[str, Any]) -> str | None:
        """The client id per the claim map (its first claim present), if a string."""
        for path in self._client_paths:
            value = claim_path(claims, path)
            if value is not None:
                return value if isinstance(value, str) else None
        return None

    def _check_client(self, claims: Mapping[str, Any]) -> None:
        if self._client_of(claims) not in self._client_ids:
            raise _invalid("client id is not an allowed client")
