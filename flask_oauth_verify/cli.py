"""The ``flask oauth-verify`` command group.

* ``inspect [TOKEN|-]`` — verify a token step by step (header, issuer, key,
  signature, each claim, scopes) with this app's settings and say which
  check fails and why. The token itself is never printed; pass ``-`` (or
  nothing) to read it from standard input and keep it out of shell history.
* ``keys`` — fetch and list each issuer's key set: kids, key types,
  algorithms, sizes, age, source.
* ``discover`` — the resolved endpoints: metadata, JWKS, introspection.
* ``mint`` — a token from the development issuer, and only when the app
  declares one in ``OAUTH_VERIFY_DEV_ISSUER`` (a
  :class:`flask_oauth_verify.testing.TokenIssuer`).

Exit status: 0 success (a valid token), 1 the token is refused or an
endpoint is unreachable, 2 a usage or configuration problem.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import sys
from collections.abc import Mapping
from typing import Any, TypeGuard

import click
from flask.cli import with_appcontext

from .bearer import is_b64token
from .claims import claim_path
from .config import STRATEGIES, Settings, shown_url
from .context import AuthContext
from .discovery import metadata_urls
from .errors import OAuthVerifyError, UpstreamError
from .events import one_line
from .extension import _AppState, get_state
from .fetch import FetchError
from .keys import PreparedKey, PreparedKeySet
from .providers import profile_named
from .verification import LATEST_EXP, JWSHeader

__all__ = ["cli"]

_PASS, _FAIL, _INFO = "PASS", "FAIL", "info"
_SHOWN_CLAIMS = ("iss", "sub", "aud", "client_id", "azp", "jti", "scope", "scp", "scopes", "oid")


@click.group("oauth-verify")
def cli() -> None:
    """Inspect and operate flask_oauth_verify."""


# -- helpers ----------------------------------------------------------------------


def _show(value: Any, limit: int = 80) -> str:
    """A printable, escaped rendering of an untrusted value (no control chars)."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float) -> str:
    seconds = abs(int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def _when(timestamp: float, now: float) -> str:
    """``timestamp`` as a UTC date and how far from ``now``; the raw number
    when no date can show it (an issuer writing milliseconds, say)."""
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
        relative = (
            f"in {_duration(timestamp - now)}"
            if timestamp >= now
            else (f"{_duration(now - timestamp)} ago")
        )
    except (OverflowError, ValueError, OSError):
        hint = " - milliseconds, not seconds?" if abs(timestamp) > 1e11 else ""
        return f"{timestamp!r} (seconds since 1970, beyond any date{hint})"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({relative})"


def _shown_url(url: str | None) -> str | None:
    """``url`` with ``***`` in place of its user-info password, query and
    fragment: a configured URL may carry a credential there, and command
    output is pasted into tickets."""
    return shown_url(url, masked=True)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except RecursionError:  # thousands of nested brackets: refused, not a traceback
        raise ValueError("JSON nested too deeply") from None


def _read_line() -> str:
    """A line of standard input. Bytes that are not UTF-8 (a stray byte from
    a file or the clipboard) are kept as surrogates, as in ``sys.argv``:
    the token is then refused for them, where a strict decoder raised."""
    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:  # replaced by a text-only stream
        return sys.stdin.readline()
    line: bytes = binary.readline()
    return line.decode("utf-8", "surrogateescape")


def _read_token(token: str | None) -> str:
    if token is None or token == "-":  # noqa: S105 - "-" means standard input
        token = _read_line()
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        raise click.UsageError("No token given (pass it as an argument or on standard input).")
    return token


# -- inspect ----------------------------------------------------------------------


class _Refused(Exception):
    """A step failed: stop the structural checks."""


@dataclasses.dataclass
class _Report:
    """The steps printed by ``inspect``; the first failure is the verdict."""

    failures: list[str] = dataclasses.field(default_factory=list)

    def step(self, outcome: str, name: str, message: str) -> None:
        click.echo(f"  [{outcome}] {name:<13} {message}")
        if outcome == _FAIL:
            self.failures.append(message)

    def fail(self, name: str, message: str) -> _Refused:
        self.step(_FAIL, name, message)
        return _Refused(message)


def _explain_header(raw: Mapping[str, Any], reason: str, state: _AppState) -> str:
    settings = state.settings
    alg = raw.get("alg")
    allowed = ", ".join(settings.algorithms)
    if isinstance(alg, str) and alg.lower() == "none":
        return "alg is 'none': the token is unsigned, and unsigned tokens are never accepted."
    if isinstance(alg, str) and alg.startswith("HS"):
        return (
            f"The token is signed with {one_line(alg)}, an HMAC (shared-secret) algorithm; "
            f"this API verifies public-key signatures only ({allowed}, OAUTH_VERIFY_ALGORITHMS). "
            "An HMAC token here is a misconfigured issuer or an algorithm-confusion attack."
        )
    if not isinstance(alg, str) or alg not in settings.algorithms:
        return (
            f"The token is signed with {_show(alg)}, but this API accepts only {allowed} "
            "(OAUTH_VERIFY_ALGORITHMS)."
        )
    for name in ("crit", "b64", "enc", "zip"):
        if name in raw:
            return (
                f"The header carries {name!r}, a JOSE extension this verifier does not "
                "implement; RFC 7515 requires such a token to be refused."
            )
    typ = raw.get("typ")
    if typ is not None:
        types = ", ".join("(none)" if t is None else t for t in settings.allowed_types)
        return (
            f"typ {_show(typ)} is not an access-token type (accepted: {types}; "
            "OAUTH_VERIFY_ALLOWED_TYPES). An ID token or another kind of token was sent "
            "instead of an access token."
        )
    return f"The header was refused: {reason}."


def _check_header(report: _Report, segment: str, state: _AppState) -> JWSHeader:
    try:
        raw = _b64json(segment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise report.fail("header", "The header is not base64url-encoded JSON.") from None
    if not isinstance(raw, dict):
        raise report.fail("header", "The header is not a JSON object.")
    try:
        header = state.verifier.header(segment)
    except OAuthVerifyError as exc:
        raise report.fail("header", _explain_header(raw, str(exc.reason), state)) from None
    report.step(
        _PASS,
        "header",
        f"alg {header.alg}, kid {_show(header.kid)}, typ {_show(header.typ)}",
    )
    ignored = [name for name in ("jku", "x5u", "jwk", "x5c") if name in raw]
    if ignored:
        report.step(
            _INFO, "header", f"key-carrying header(s) {', '.join(ignored)} ignored by design"
        )
    return header


def _check_payload(report: _Report, segment: str) -> dict[str, Any]:
    try:
        payload = _b64json(segment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise report.fail("payload", "The payload is not base64url-encoded JSON.") from None
    if not isinstance(payload, dict):
        raise report.fail("payload", "The payload is not a JSON object of claims.")
    shown = ", ".join(f"{k}={_show(payload[k], 60)}" for k in _SHOWN_CLAIMS if k in payload)
    report.step(_INFO, "claims", shown or "(no registered claims)")
    return payload


def _check_issuer(report: _Report, payload: Mapping[str, Any], state: _AppState) -> str:
    try:
        issuer = state.verifier.unverified_issuer(payload)
    except OAuthVerifyError as exc:
        iss = payload.get("iss")
        trusted = ", ".join(state.settings.issuers)
        if iss is None:
            message = f"The token has no iss claim; this API trusts {trusted}."
        elif not isinstance(iss, str):
            message = "The iss claim is not a string."
        else:
            message = (
                f"iss {_show(iss)} is not a trusted issuer; this API trusts {trusted} "
                "(OAUTH_VERIFY_ISSUER, compared exactly — a trailing slash matters). "
                f"({exc.reason})"
            )
        raise report.fail("iss", message) from None
    report.step(_PASS, "iss", f"{_show(payload.get('iss'))} is a trusted issuer")
    return issuer


def _key_set_summary(state: _AppState, issuer: str) -> str:
    for status in state.keys.status():
        if status.issuer == issuer:
            kids = ", ".join(_show(k) for k in status.kids) or "none"
            age = "" if status.age is None else f", fetched {_duration(status.age)} ago"
            return f"{_shown_url(status.source) or 'key set'}{age}; it holds kids: {kids}"
    return "no key set loaded"


def _check_key(report: _Report, issuer: str, header: JWSHeader, state: _AppState) -> PreparedKey:
    try:
        key = state.keys.resolve(issuer, header)
    except UpstreamError as exc:
        raise report.fail(
            "key",
            f"The key set of {issuer} cannot be fetched ({exc.reason}); every request "
            "is answered 503 temporarily_unavailable until it can.",
        ) from None
    except OAuthVerifyError as exc:
        summary = _key_set_summary(state, issuer)
        if header.kid is None:
            message = (
                f"The token has no kid and the key set ({summary}) holds several keys, so "
                "the signing key cannot be chosen."
            )
        elif "kid" in str(exc.reason):
            message = (
                f"No key with kid {_show(header.kid)} in the key set of {issuer} ({summary}). "
                "The token was signed with a key the issuer does not publish: rotated away, "
                "another environment or issuer, or a forged token."
            )
        else:
            message = f"The signing key cannot be used: {exc.reason}."
        raise report.fail("key", message) from None
    if key.verifier(header.alg) is None:
        raise report.fail(
            "key",
            f"Key {_show(key.kid)} is a {_key_kind(key)} key and cannot verify {header.alg} "
            "signatures (key and algorithm do not match: the mark of an algorithm-"
            "confusion attempt).",
        )
    report.step(_PASS, "key", f"kid {_show(key.kid)}: {_key_kind(key)}")
    return key


def _key_kind(key: PreparedKey) -> str:
    curve = f" {key.crv}" if key.crv else ""
    return f"{key.kty}{curve}, {key.size} bits"


def _check_signature(report: _Report, token: str, header: JWSHeader, key: PreparedKey) -> None:
    head, payload, signature = token.split(".")
    verify = key.verifier(header.alg)
    assert verify is not None
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (ValueError, binascii.Error):
        raise report.fail("signature", "The signature is not base64url.") from None
    if not verify(f"{head}.{payload}".encode("ascii"), raw):
        raise report.fail(
            "signature",
            f"The signature does not verify with key {_show(key.kid)} ({header.alg}): the "
            "token was altered after signing, or signed by another key under the same kid.",
        )
    report.step(_PASS, "signature", f"verifies with {header.alg}")


def _check_times(report: _Report, claims: Mapping[str, Any], state: _AppState, now: float) -> None:
    leeway = state.settings.leeway
    exp = claims.get("exp")
    if not _is_number(exp):
        report.step(_FAIL, "exp", "The token has no numeric exp claim; access tokens must expire.")
    elif exp + leeway <= now:
        report.step(_FAIL, "exp", f"The token expired at {_when(exp, now)} (leeway {leeway:g} s).")
    elif exp > LATEST_EXP:
        report.step(
            _FAIL,
            "exp",
            f"The exp claim {exp!r} lies beyond the year 9999: the issuer writes "
            "milliseconds, not seconds, and the token would never expire.",
        )
    else:
        report.step(_PASS, "exp", f"expires at {_when(exp, now)}")
    nbf = claims.get("nbf")
    if nbf is not None and not _is_number(nbf):
        report.step(_FAIL, "nbf", "The nbf claim is not a number.")
    elif nbf is not None and nbf - leeway > now:
        report.step(
            _FAIL,
            "nbf",
            f"The token is not valid before {_when(nbf, now)} (leeway {leeway:g} s): it was "
            "minted for later, or the issuer's clock is ahead of this server's.",
        )
    elif nbf is not None:
        report.step(_PASS, "nbf", f"valid since {_when(nbf, now)}")
    iat = claims.get("iat")
    if iat is not None and not _is_number(iat):
        report.step(_FAIL, "iat", "The iat claim is not a number.")
    elif iat is not None and iat - leeway > now:
        report.step(
            _FAIL,
            "iat",
            f"The token claims to be issued at {_when(iat, now)}, in the future "
            f"(leeway {leeway:g} s): the issuer's clock is ahead of this server's.",
        )
    elif iat is not None:
        report.step(_PASS, "iat", f"issued at {_when(iat, now)}")


def _check_audience(report: _Report, claims: Mapping[str, Any], state: _AppState) -> None:
    settings = state.settings
    if not settings.verify_audience:
        report.step(_INFO, "aud", "audience check is off (OAUTH_VERIFY_VERIFY_AUDIENCE)")
        return
    wanted = ", ".join(settings.audiences)
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud
    if aud is None:
        report.step(_FAIL, "aud", f"The token has no aud claim; this API is {wanted}.")
    elif not isinstance(values, list) or not all(isinstance(a, str) for a in values):
        report.step(_FAIL, "aud", "The aud claim is not a string or a list of strings.")
    elif not set(values) & set(settings.audiences):
        report.step(
            _FAIL,
            "aud",
            f"The token is for audience {_show(aud)}, but this API is {wanted} "
            "(OAUTH_VERIFY_AUDIENCE): it was issued for a different API.",
        )
    else:
        report.step(_PASS, "aud", f"{_show(aud)} names this API")


def _check_required(report: _Report, claims: Mapping[str, Any], state: _AppState) -> None:
    settings = state.settings
    for name in settings.required_claims:
        if claim_path(claims, name) is None:
            report.step(
                _FAIL,
                name,
                f"The required claim {name!r} is missing (OAUTH_VERIFY_REQUIRED_CLAIMS).",
            )
        else:
            report.step(_PASS, name, "present (required)")
    for name, expected in settings.required_claim_values.items():
        actual = claim_path(claims, name)
        if actual != expected or type(actual) is not type(expected):
            report.step(
                _FAIL,
                name,
                f"The claim {name!r} is {_show(actual)}, but {_show(expected)} is required "
                "(OAUTH_VERIFY_REQUIRED_CLAIM_VALUES).",
            )
        else:
            report.step(_PASS, name, f"has the required value {_show(expected)}")
    if settings.allowed_client_ids:
        client = next(
            (
                claim_path(claims, path)
                for path in settings.claim_map["client_id"]
                if claim_path(claims, path) is not None
            ),
            None,
        )
        if client not in settings.allowed_client_ids:
            report.step(
                _FAIL,
                "client",
                f"The client {_show(client)} is not one of the allowed clients "
                "(OAUTH_VERIFY_ALLOWED_CLIENT_IDS).",
            )
        else:
            report.step(_PASS, "client", f"{_show(client)} is an allowed client")


def _check_claims(
    report: _Report, claims: dict[str, Any], state: _AppState, now: float
) -> AuthContext | None:
    before = len(report.failures)
    _check_times(report, claims, state, now)
    _check_audience(report, claims, state)
    _check_required(report, claims, state)
    if len(report.failures) > before:
        return None
    try:
        # The verifier's own verdict, in case a check is not explained above.
        state.verifier.check_claims(claims, now)
        state.run_claims_checks(claims)
        context = state.context_builder.build(claims, "jwks", False)
    except OAuthVerifyError as exc:
        report.step(_FAIL, "claims", f"The claims were refused: {exc.reason}.")
        return None
    return context


def _check_scopes(
    report: _Report, context: AuthContext, scopes: tuple[str, ...], any_of: bool
) -> None:
    held = " ".join(one_line(scope) for scope in sorted(context.scopes)) or "(none)"
    if not scopes:
        report.step(_INFO, "scopes", held)
        return
    if context.has_scopes(*scopes, any_of=any_of):
        report.step(_PASS, "scopes", f"holds {' '.join(scopes)} (token has: {held})")
        return
    missing = [s for s in scopes if s not in context.scopes]  # the view's: RFC 6749 text
    need = "any one of" if any_of else "all of"
    report.step(
        _FAIL,
        "scopes",
        f"The view needs {need} {' '.join(scopes)}; the token lacks {' '.join(missing)} "
        f"(it has: {held}). Answer: 403 insufficient_scope.",
    )


def _describe_context(report: _Report, context: AuthContext) -> None:
    report.step(
        _INFO,
        "context",
        f"subject={_show(context.subject)} client_id={_show(context.client_id)} "
        f"organization_id={_show(context.organization_id)} user_id={_show(context.user_id)} "
        f"token_type={_show(context.token_type)}",
    )


def _inspect_jwt(report: _Report, token: str, state: _AppState, now: float) -> AuthContext | None:
    head, payload_segment, _signature = token.split(".")
    header = _check_header(report, head, state)
    payload = _check_payload(report, payload_segment)
    issuer = _check_issuer(report, payload, state)
    key = _check_key(report, issuer, header, state)
    _check_signature(report, token, header, key)
    return _check_claims(report, payload, state, now)


def _inspect_introspection(report: _Report, token: str, state: _AppState) -> AuthContext | None:
    try:
        context = state.authenticate(token, "introspection")
    except UpstreamError as exc:
        report.step(
            _FAIL,
            "introspect",
            f"The introspection endpoint gave no usable answer ({exc.reason}); requests "
            "get 503 temporarily_unavailable — a problem of this server, not of the token.",
        )
        return None
    except OAuthVerifyError as exc:
        reason = str(exc.reason)
        if "not active" in reason:
            message = (
                "The authorization server says the token is not active: revoked, expired, "
                "or never issued by it."
            )
        else:
            message = f"The introspection answer was refused: {reason}."
        report.step(_FAIL, "introspect", message)
        return None
    report.step(_PASS, "introspect", "the authorization server says the token is active")
    return context


def _structure(report: _Report, token: str, state: _AppState) -> bool:
    """Whether the token is a compact JWS; explain what it is otherwise."""
    limit = state.settings.max_token_bytes
    if len(token) > limit:
        raise report.fail(
            "size",
            f"The token is {len(token)} bytes long; OAUTH_VERIFY_MAX_TOKEN_BYTES allows {limit}.",
        )
    if not is_b64token(token):
        raise report.fail("format", _not_b64token(token))
    dots = token.count(".")
    if dots == 2:
        report.step(_PASS, "format", f"compact JWS (three segments), {len(token)} bytes")
        return True
    if dots == 4:
        said = "The token has five segments: it is an encrypted JWT (JWE)."
        known = _no_introspection(state.settings)
        if known:
            raise report.fail("format", f"{said} {known}.")
        raise report.fail(
            "format",
            f"{said} This API verifies signed JWTs (JWS) only; configure the authorization "
            "server to issue signed access tokens.",
        )
    report.step(_INFO, "format", f"not a JWT ({dots + 1} segment(s)): an opaque token")
    return False


def _not_b64token(token: str) -> str:
    """Why ``token`` is not a bearer token, naming the first character that
    cannot be in one by its position and kind only (never the token)."""
    body = token.rstrip("=")
    position, char = next(
        ((i, c) for i, c in enumerate(body) if not is_b64token(c)), (len(body), "=")
    )
    if "\udc80" <= char <= "\udcff":
        kind = "a byte that is not UTF-8 text"
    elif not char.isascii():
        kind = "a non-ASCII character"
    elif not char.isprintable():
        kind = "a control character"
    elif char == " ":
        kind = "a space"
    elif char == "=":
        kind = "an '=' before the end"
    else:
        kind = f"the character {char!r}"
    return (
        f"The token holds {kind} at position {position + 1}, which no bearer token can "
        "(RFC 6750 b64token: letters, digits, '-._~+/', then '=' padding), so this API "
        "refuses it. Was a stray byte or character copied with it?"
    )


@cli.command("inspect")
@click.argument("token", required=False)
@click.option("--scope", "scopes", multiple=True, help="A scope the view requires (repeatable).")
@click.option("--any-scope", is_flag=True, help="One of the --scope values is enough.")
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    help="Verify as this strategy (default: OAUTH_VERIFY_STRATEGY).",
)
@with_appcontext
def inspect_command(
    token: str | None, scopes: tuple[str, ...], any_scope: bool, strategy: str | None
) -> None:
    """Verify TOKEN step by step and explain the first check that fails.

    TOKEN may be '-' (or omitted) to read it from standard input. The token
    is never printed.
    """
    state = get_state()
    token = _read_token(token)
    now = state.clock()
    chosen = strategy or state.settings.strategy
    report = _Report()
    click.echo(f"Token sha256:{_fingerprint(token)} (strategy {chosen})")
    context: AuthContext | None = None
    try:
        is_jws = _structure(report, token, state)
        if chosen == "introspection" or (chosen == "auto" and not is_jws):
            known = _no_introspection(state.settings)
            if known:
                raise report.fail("introspect", f"{known}.")
            context = _inspect_introspection(report, token, state)
        elif not is_jws:
            raise report.fail("format", _not_a_jwt(chosen, state.settings))
        else:
            context = _inspect_jwt(report, token, state, now)
            # "both": the JWT must also still be active (revocation).
            if (
                context is not None
                and chosen == "both"
                and _inspect_introspection(report, token, state) is None
            ):
                context = None
    except _Refused:
        context = None
    if context is not None:
        _describe_context(report, context)
        _check_scopes(report, context, scopes, any_scope)
    _verdict(report, context is not None)


def _not_a_jwt(strategy: str, settings: Settings) -> str:
    """Why an opaque token fails a JWT strategy, and what to do about it."""
    said = f"The token is not a JWT and strategy {strategy!r} verifies JWTs locally."
    known = _no_introspection(settings)
    if known:
        return f"{said} {known}."
    return (
        f"{said} An opaque token needs introspection (OAUTH_VERIFY_STRATEGY 'auto' or "
        "'introspection')."
    )


def _no_introspection(settings: Settings) -> str | None:
    """What a token that is no signed JWT is, for a provider without introspection.

    ``None`` when the profile has an introspection endpoint or the app set one.
    """
    if settings.introspection_endpoint is not None:
        return None
    return profile_named(settings.provider).opaque_tokens


def _fingerprint(token: str) -> str:
    from .events import short_token_hash

    return short_token_hash(token)


def _verdict(report: _Report, verified: bool) -> None:
    if verified and not report.failures:
        click.echo("Result: VALID — this token would be accepted.")
        return
    first = report.failures[0] if report.failures else "The token was refused."
    click.echo(f"Result: REJECTED — {first}")
    sys.exit(1)


# -- keys ---------------------------------------------------------------------------


def _key_rows(keys: PreparedKeySet) -> list[dict[str, Any]]:
    return [
        {
            "kid": key.kid,
            "kty": key.kty,
            "crv": key.crv,
            "algorithms": sorted(key.verifiers),
            "size": key.size,
            "thumbprint": key.thumbprint,
        }
        for key in keys.keys
    ]


@cli.command("keys")
@click.option("--refresh", is_flag=True, help="Fetch the key sets now, ignoring the TTL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
def keys_command(refresh: bool, as_json: bool) -> None:
    """Fetch and list each issuer's key set (kids, algorithms, sizes, age, source)."""
    state = get_state()
    # Neither raises for an unreachable issuer: each says what failed.
    errors = state.keys.refresh() if refresh else state.keys.prefetch()
    failed = False
    output = []
    for status in state.keys.status():
        keys: PreparedKeySet | None = None
        if status.usable_keys:
            try:
                keys = state.keys.key_set(status.issuer)
            except UpstreamError:
                keys = None
        error = errors.get(status.issuer) or status.last_error
        failed = failed or keys is None
        output.append(
            {
                "issuer": status.issuer,
                "source": _shown_url(status.source),
                "age_seconds": None if status.age is None else round(status.age, 1),
                "fresh": status.fresh,
                "error": error,
                "keys": _key_rows(keys) if keys else [],
                "skipped": list(status.skipped),
            }
        )
    if as_json:
        click.echo(json.dumps(output, indent=2))
    else:
        for entry in output:
            _print_key_set(entry)
    if failed:
        sys.exit(1)


def _print_key_set(entry: Mapping[str, Any]) -> None:
    click.echo(f"Issuer {entry['issuer']}")
    if entry["source"] == "static":
        click.echo("  source: static key set (OAUTH_VERIFY_JWKS)")
    else:
        age = entry["age_seconds"]
        when = "never fetched" if age is None else f"fetched {_duration(age)} ago"
        fresh = ", fresh" if entry["fresh"] else ", due for refresh"
        fresh = "" if age is None else fresh
        click.echo(f"  source: {one_line(entry['source'] or '(unknown)')} ({when}{fresh})")
    if entry["error"]:
        click.echo(f"  error: {one_line(entry['error'])}")
    if not entry["keys"]:
        click.echo("  no usable keys")
    for key in entry["keys"]:
        kind = key["kty"] + (f" {key['crv']}" if key["crv"] else "")
        click.echo(
            f"  kid {_show(key['kid'])}: {kind}, {key['size']} bits, "
            f"algorithms {', '.join(key['algorithms'])}, thumbprint {key['thumbprint']}"
        )
    for skipped in entry["skipped"]:
        click.echo(f"  skipped {one_line(skipped)}")


# -- discover -----------------------------------------------------------------------


def _discover_issuer(state: _AppState, issuer: str) -> tuple[bool, bool]:
    """Print the resolved endpoints of ``issuer``.

    :returns: whether its keys can be found (when the strategy needs them),
        and whether an introspection endpoint is configured or discovered.
    """
    settings = state.settings
    click.echo(f"Issuer {issuer}")
    metadata: Mapping[str, Any] = {}
    try:
        metadata = state.discovery.metadata(issuer)
        click.echo("  metadata: found (tried in order: " + ", ".join(metadata_urls(issuer)) + ")")
    except FetchError as exc:
        click.echo(f"  metadata: not available ({one_line(exc.reason)})")
    ok = True
    if settings.static_jwks is not None:
        click.echo("  jwks_uri: not used, static key set (OAUTH_VERIFY_JWKS)")
    elif settings.jwks_uri_for(issuer):
        click.echo(
            f"  jwks_uri: {_shown_url(settings.jwks_uri_for(issuer))} (OAUTH_VERIFY_JWKS_URI)"
        )
    elif isinstance(metadata.get("jwks_uri"), str):
        refused = _refused_endpoint(state, issuer, "jwks_uri")
        click.echo(f"  jwks_uri: {one_line(metadata['jwks_uri'])} (discovered){refused}")
        ok = not refused or settings.strategy == "introspection"
    elif settings.strategy == "introspection":
        click.echo("  jwks_uri: not found (not used: strategy 'introspection')")
    else:
        click.echo("  jwks_uri: NOT FOUND — set OAUTH_VERIFY_JWKS_URI or fix discovery")
        ok = False
    introspection = True
    if settings.introspection_endpoint:
        click.echo(
            f"  introspection_endpoint: {_shown_url(settings.introspection_endpoint)} "
            "(OAUTH_VERIFY_INTROSPECTION_ENDPOINT)"
        )
    elif isinstance(metadata.get("introspection_endpoint"), str):
        endpoint = one_line(metadata["introspection_endpoint"])
        refused = _refused_endpoint(state, issuer, "introspection_endpoint")
        click.echo(f"  introspection_endpoint: {endpoint} (discovered){refused}")
        introspection = not refused
    else:
        click.echo("  introspection_endpoint: not published")
        introspection = False
    for name in ("token_endpoint", "revocation_endpoint", "userinfo_endpoint"):
        if isinstance(metadata.get(name), str):
            click.echo(f"  {name}: {one_line(metadata[name])}")
    return ok, introspection


def _refused_endpoint(state: _AppState, issuer: str, name: str) -> str:
    """``""`` when the fetch policy accepts the discovered ``name``, else why not."""
    try:
        state.discovery.endpoint(issuer, name)
    except FetchError as exc:
        return f" — REFUSED: {one_line(exc.reason)}"
    return ""


@cli.command("discover")
@with_appcontext
def discover_command() -> None:
    """Show the resolved endpoints of each issuer (metadata, JWKS, introspection)."""
    state = get_state()
    settings = state.settings
    click.echo(f"provider profile: {settings.provider}; strategy: {settings.strategy}")
    results = [_discover_issuer(state, issuer) for issuer in settings.issuers]
    # One endpoint (configured, or the first an issuer publishes) serves all.
    needs_introspection = settings.strategy in ("introspection", "auto", "both")
    if needs_introspection and not any(found for _ok, found in results):
        click.echo(
            f"No introspection endpoint, which strategy {settings.strategy!r} needs: set "
            "OAUTH_VERIFY_INTROSPECTION_ENDPOINT or fix discovery."
        )
        sys.exit(1)
    if not all(ok for ok, _found in results):
        sys.exit(1)


# -- mint ---------------------------------------------------------------------------


def _parse_claim(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r} is not NAME=VALUE", param_hint="--claim")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


@cli.command("mint")
@click.option("--sub", "subject", default="user_dev", show_default=True, help="Subject.")
@click.option("--scope", "scopes", multiple=True, help="A scope (repeatable).")
@click.option("--org", "organization_id", help="Organization id (oid claim).")
@click.option("--aud", "audience", help="Audience (default: the app's first).")
@click.option("--client-id", default="dev-client", show_default=True, help="client_id claim.")
@click.option("--expires-in", default=3600, show_default=True, help="Lifetime in seconds.")
@click.option("--claim", "claims", multiple=True, help="Extra claim NAME=VALUE (JSON value).")
@with_appcontext
def mint_command(
    subject: str,
    scopes: tuple[str, ...],
    organization_id: str | None,
    audience: str | None,
    client_id: str,
    expires_in: int,
    claims: tuple[str, ...],
) -> None:
    """Mint a token with the development issuer (OAUTH_VERIFY_DEV_ISSUER only).

    Prints only the token, so that ``TOKEN=$(flask oauth-verify mint ...)``
    works; notes go to standard error.
    """
    from .testing import TokenIssuer

    state = get_state()
    issuer = state.settings.dev_issuer
    if not isinstance(issuer, TokenIssuer):
        click.echo(
            "Refusing to mint: this app declares no development issuer. Set "
            "OAUTH_VERIFY_DEV_ISSUER to a flask_oauth_verify.testing.TokenIssuer in a "
            "development configuration only; a production API verifies tokens, it never "
            "mints them.",
            err=True,
        )
        sys.exit(2)
    if issuer.issuer not in state.settings.issuers:
        click.echo(
            f"note: this app does not trust {issuer.issuer} (OAUTH_VERIFY_ISSUER); "
            "it will refuse this token.",
            err=True,
        )
    payload = issuer.claims(
        subject=subject,
        audience=audience or (state.settings.audiences[0] if state.settings.audiences else None),
        scopes=scopes or None,
        organization_id=organization_id,
        expires_in=expires_in,
        now=state.clock(),
        client_id=client_id,
    )
    # --claim entries are claims, whatever their name ("subject", "kid" and
    # "headers" are claims here, never arguments of mint()).
    payload.update(_parse_claim(text) for text in claims)
    token = issuer.mint(payload)
    click.echo(f"minted by {issuer.issuer}, kid {issuer.current_kid}", err=True)
    click.echo(token)
