"""The fast paths of verification give the same answers as the general ones.

The verified-token cache checks a hit against its key source (same key set
object, within its soft TTL) instead of resolving the key again; a JWT's
usual claims take a fast check; :class:`ContextBuilder` maps claims with
prepared paths. Each must behave exactly like the general path it shortcuts.
No timings here: the figures live in ``benchmarks/`` and the docs.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import pytest
from flask import Flask, abort, g
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_oauth_verify import (
    current_auth,
    get_auth,
    require_scope,
    require_token,
    verify_request,
)
from flask_oauth_verify.claims import claim_path
from flask_oauth_verify.config import Settings
from flask_oauth_verify.context import AuthContext, ContextBuilder, build_context
from flask_oauth_verify.errors import InvalidTokenError, OAuthVerifyError
from flask_oauth_verify.events import (
    SECURITY_LOGGER,
    SecurityEvents,
    security_event,
    token_validated,
)
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, TokenIssuer, auth_header
from flask_oauth_verify.verification import JWTVerifier, _b64decode

from .conftest import FakeClock, make_app
from .test_jwks import JWKS, JwksRoute, build, get

# -- the verified-token cache against its key source ---------------------------


@pytest.fixture
def jwks_route(served_tokens: TokenIssuer, issuer_server: IssuerServer) -> JwksRoute:
    """The controllable ``/jwks`` route of :mod:`tests.test_jwks`."""
    route = JwksRoute(served_tokens)
    issuer_server.route(JWKS, route)
    return route


def _verified_once(tokens: TokenIssuer, clock: FakeClock) -> tuple[Flask, str]:
    """An app on the JWKS route and a two-hour token it has verified once."""
    app = build(tokens, clock)
    token = tokens.mint(expires_in=7200, now=clock.now)
    assert get(app, token).status_code == 200
    return app, token


def test_a_process_that_only_sees_hits_still_refreshes_its_keys(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, jwks_route: JwksRoute, clock: FakeClock
) -> None:
    app, token = _verified_once(served_tokens, clock)
    fetched = issuer_server.hits[JWKS]
    for _ in range(5):
        assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == fetched, "hits within the soft TTL fetch nothing"
    clock.advance(601)  # past JWKS_CACHE_TTL (600 s, less jitter)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == fetched + 1, "the first hit past the TTL refreshes"
    for _ in range(5):
        assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == fetched + 1
    assert len(get_state(app).token_cache) == 1


def test_a_hit_after_a_rotation_that_keeps_its_key(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, jwks_route: JwksRoute, clock: FakeClock
) -> None:
    app, old = _verified_once(served_tokens, clock)
    served_tokens.rotate()  # the old key stays published
    clock.advance(601)
    assert get(app, old).status_code == 200, "verified again with the key still in the set"
    new = served_tokens.mint(expires_in=7200, now=clock.now)
    assert get(app, new).status_code == 200
    assert len(get_state(app).token_cache) == 2


def test_an_entry_stored_against_a_replaced_key_set_is_checked_again(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, jwks_route: JwksRoute, clock: FakeClock
) -> None:
    # The race the entry's key_set guards against: a refresh swaps the set
    # (and empties the cache) while a request verifies with the old key,
    # whose entry is then stored after the emptying. Replayed here by
    # putting the old entry back after the refresh.
    app, token = _verified_once(served_tokens, clock)
    state = get_state(app)
    [(digest, entry)] = list(state.token_cache._entries.items())
    served_tokens.rotate(drop_old=True)  # the key of `token` leaves the set
    with app.app_context():
        state.keys.refresh(served_tokens.issuer)
    assert len(state.token_cache) == 0, "a changed key set empties the cache"
    state.token_cache.put(digest, entry)
    assert entry.source.keys is not entry.key_set
    response = get(app, token)
    assert response.status_code == 401, "the key left its set: the stale entry is refused"
    assert len(state.token_cache) == 0, "and dropped"


def test_an_outage_beyond_max_staleness_stops_cached_tokens(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, jwks_route: JwksRoute, clock: FakeClock
) -> None:
    from flask_oauth_verify.testing import Reply

    app = build(served_tokens, clock, JWKS_MAX_STALENESS=1200)
    token = served_tokens.mint(expires_in=7200, now=clock.now)
    assert get(app, token).status_code == 200
    jwks_route.reply = Reply(500, {"error": "down"})
    clock.advance(601)
    assert get(app, token).status_code == 200, "the last good keys are served"
    clock.advance(1200)
    response = get(app, token)
    assert response.status_code == 503, "no usable keys: a cached token is not served either"


@pytest.mark.parametrize("route", ["/protected", "/verify-request"])
def test_a_hit_refuses_a_token_issued_in_the_future_after_the_clock_steps_back(
    tokens: TokenIssuer, clock: FakeClock, route: str
) -> None:
    """A cached token gets the answer verifying it would give: with ``iat``
    (and no ``nbf``) ahead of a clock stepped back beyond the leeway, 401."""
    app = make_app(tokens.config(audience="api"), clock=clock)

    @app.get("/verify-request")
    def checked_in_the_view() -> str:
        verify_request()
        return "ok"

    token = tokens.mint(tokens.claims(now=clock.now, nbf=None))
    client = app.test_client()
    assert client.get(route, headers=auth_header(token)).status_code == 200
    clock.advance(-120)  # LEEWAY is 30 s by default
    response = client.get(route, headers=auth_header(token))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    clock.advance(120)
    assert client.get(route, headers=auth_header(token)).status_code == 200


def test_static_key_set_hits(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(audience="api"))
    token = tokens.mint()
    for _ in range(3):
        assert get(app, token).status_code == 200
    assert len(get_state(app).token_cache) == 1
    stranger = TokenIssuer(issuer=tokens.issuer, audience="api")
    stranger.current_kid = tokens.current_kid  # same kid, another key
    stranger._keys = {tokens.current_kid: stranger._keys[next(iter(stranger._keys))]}
    assert get(app, stranger.mint()).status_code == 401


# -- the plain-header fast path of verify_request == extract_token -------------


def _cached(app: Flask, token: str) -> None:
    assert get(app, token).status_code == 200
    assert len(get_state(app).token_cache) == 1, "the token is in the verified-token cache"


#: (Authorization header with TOKEN for the token, query, form) -> status, error
UNUSUAL_REQUESTS = [
    ("Bearer TOKEN", {"access_token": "x"}, None, 400, "invalid_request"),
    ("Bearer TOKEN", {"access_token": "TOKEN"}, None, 400, "invalid_request"),
    ("Bearer TOKEN", None, {"access_token": "x"}, 400, "invalid_request"),
    ("Bearer TOKEN, Bearer other", None, None, 400, "invalid_request"),
    ("Bearer TOKEN extra", None, None, 400, "invalid_request"),
    ("Basic TOKEN", None, None, 401, "unauthorized"),
    ("Bearer  TOKEN", None, None, 200, None),
    ("bearer TOKEN", None, None, 200, None),
    ("BEARER TOKEN", None, None, 200, None),
    ("Bearer TOKEN ", None, None, 200, None),
]


@pytest.mark.parametrize(("header", "query", "form", "status", "error"), UNUSUAL_REQUESTS)
def test_a_cached_token_in_an_unusual_request_gets_the_general_answer(
    tokens: TokenIssuer,
    header: str,
    query: dict[str, str] | None,
    form: dict[str, str] | None,
    status: int,
    error: str | None,
) -> None:
    app = make_app(tokens.config(audience="api"))

    @app.post("/protected")
    @require_token
    def protected_post() -> dict[str, object]:
        return {"subject": current_auth.subject}

    token = tokens.mint()
    _cached(app, token)
    response = app.test_client().open(
        "/protected",
        method="POST" if form else "GET",
        headers={"Authorization": header.replace("TOKEN", token)},
        query_string={k: v.replace("TOKEN", token) for k, v in (query or {}).items()},
        data=form,
    )
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    if error is not None:
        assert body["error"] == error
    else:
        assert body["subject"] == "user_1"


def _header_cases(tokens: TokenIssuer) -> list[str]:
    """Authorization values around a valid token: each takes the fast path first."""
    good = tokens.mint()
    header, payload, signature = good.split(".")
    expired = tokens.mint(expires_in=-3600)
    return [
        f"Bearer {good}",
        f"bearer {good}",
        f"Bearer {good} extra",
        f"Bearer {good}\t",
        f"Bearer {header}.{payload}.{signature[:-2]}é",
        f"Bearer {header}.{payload}.{signature[:-1]}~",
        f"Bearer {header}.{payload}.{signature}=",
        f"Bearer {header}.{payload}.{signature}==",
        f"Bearer {header}.{payload}.sig nature",
        f"Bearer {header}.{payload}",
        f"Bearer {header}..{signature}",
        f"Bearer {expired}",
        "Bearer a.b.c",
        "Bearer opaque-token",
        "Bearer ",
        "Bearer  ",
        "Bearer \x00",
        f"Bearer {header}.{payload}.{signature}{'A' * 16384}",
        "Bearer " + "A" * 20000,
    ]


@pytest.mark.parametrize("strategy", ["jwks", "auto", "both"])
def test_the_plain_header_fast_path_answers_like_the_general_path(
    served_tokens: TokenIssuer, strategy: str
) -> None:
    client_id, secret = served_tokens.introspection_credentials
    config = served_tokens.config(
        audience="api",
        STRATEGY=strategy,
        INTROSPECTION_CLIENT_ID=client_id,
        INTROSPECTION_CLIENT_SECRET=secret,
    )
    fast = make_app(config, name="fast")
    general = make_app(config, name="general")
    get_state(general).header_tokens = False  # extract_token for every request
    for value in _header_cases(served_tokens):
        for attempt in ("first", "again (a cached token is answered by the wrapper)"):
            answers = []
            for app in (fast, general):
                response = app.test_client().get("/protected", headers={"Authorization": value})
                challenge = response.headers.get("WWW-Authenticate")
                answers.append((response.status_code, response.get_json(), challenge))
            assert answers[0] == answers[1], (value, attempt)


def test_a_cached_header_token_does_not_count_where_headers_are_not_read(
    tokens: TokenIssuer,
) -> None:
    app = make_app(tokens.config(audience="api", TOKEN_LOCATIONS=["query"]))
    token = tokens.mint()
    client = app.test_client()
    assert client.get("/protected", query_string={"access_token": token}).status_code == 200
    assert len(get_state(app).token_cache) == 1
    response = client.get("/protected", headers=auth_header(token))
    assert response.status_code == 401, "a header token is no token with TOKEN_LOCATIONS=query"
    assert response.get_json()["error"] == "unauthorized", "no token at all"


def test_a_cached_jwt_still_goes_to_introspection_on_a_both_route(
    served_tokens: TokenIssuer,
) -> None:
    tokens = served_tokens
    client_id, secret = tokens.introspection_credentials
    app = make_app(
        tokens.config(
            audience="api",
            INTROSPECTION_CLIENT_ID=client_id,
            INTROSPECTION_CLIENT_SECRET=secret,
        )
    )

    @app.get("/revocable")
    @require_token(strategy="both")
    def revocable() -> dict[str, object]:
        return {"ok": True}

    token = tokens.mint()
    _cached(app, token)
    assert app.test_client().get("/revocable", headers=auth_header(token)).status_code == 200
    tokens.revoke(token)
    assert get(app, token).status_code == 200, "the jwks route serves the cached token"
    response = app.test_client().get("/revocable", headers=auth_header(token))
    assert response.status_code == 401, "the introspection half still runs on every request"


# -- the decorator's own cache hit == the general path -------------------------


def _hit_app(tokens: TokenIssuer, **extra: Any) -> Flask:
    """An app whose views show what a view can read of its request's check."""
    app = make_app(tokens.config(audience="api", **extra))

    @app.get("/who")
    @require_token
    def who() -> dict[str, object]:
        again = verify_request(scopes="read:users")  # reuses the check, never verifies twice
        return {
            "same": g.auth is get_auth() is again and current_auth.subject == g.auth.subject,
            "subject": g.auth.subject,
            "scopes": sorted(g.auth.scopes),
        }

    @app.get("/write")
    @require_scope("write:users")
    def write() -> dict[str, object]:
        return {"subject": g.auth.subject}

    @app.get("/either")
    @require_scope("write:users", "read:users", any_of=True)
    def either() -> dict[str, object]:
        return {"subject": g.auth.subject}

    return app


def test_a_hit_answered_by_the_decorator_sets_the_same_request_context(
    tokens: TokenIssuer,
) -> None:
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    first = app.test_client().get("/who", headers=auth_header(token))
    assert len(get_state(app).token_cache) == 1
    again = app.test_client().get("/who", headers=auth_header(token))
    assert first.status_code == again.status_code == 200
    assert (
        first.get_json()
        == again.get_json()
        == {
            "same": True,
            "subject": "user_1",
            "scopes": ["read:users"],
        }
    )


def test_scopes_of_a_cached_token_are_checked_on_every_hit(tokens: TokenIssuer) -> None:
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    _cached(app, token)
    for _ in range(2):
        refused = app.test_client().get("/write", headers=auth_header(token))
        assert refused.status_code == 403
        assert refused.get_json()["error"] == "insufficient_scope"
        assert 'scope="write:users"' in refused.headers["WWW-Authenticate"]
        either = app.test_client().get("/either", headers=auth_header(token))
        assert either.status_code == 200, "any_of: one of the scopes is enough"


def test_a_views_own_error_on_a_hit_is_raised_once(tokens: TokenIssuer) -> None:
    app = _hit_app(tokens)
    calls: list[int] = []

    @app.get("/conflict")
    @require_token
    def conflict() -> dict[str, object]:
        calls.append(1)
        abort(409)

    token = tokens.mint()
    _cached(app, token)
    response = app.test_client().get("/conflict", headers=auth_header(token))
    assert response.status_code == 409, "the view's answer, not a refusal"
    assert calls == [1], "the view ran once"


def test_an_error_on_the_hit_path_is_refused_never_500(tokens: TokenIssuer) -> None:
    now = [1_800_000_000.0]
    broken = [False]

    def clock() -> float:
        if broken[0]:
            raise OSError("clock unavailable")
        return now[0]

    app = make_app(tokens.config(audience="api"), clock=clock)
    token = tokens.mint(now=now[0])
    _cached(app, token)
    broken[0] = True
    response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 401, "the general path decides: refused, fail closed"
    assert response.get_json()["error"] == "invalid_token"
    assert "WWW-Authenticate" in response.headers


def test_every_hit_is_still_an_event(tokens: TokenIssuer) -> None:
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    seen: list[str | None] = []

    def on_validated(sender: Flask, record: dict[str, Any]) -> None:
        seen.append(record.get("subject"))

    with token_validated.connected_to(on_validated, app):
        for _ in range(3):
            assert app.test_client().get("/who", headers=auth_header(token)).status_code == 200
    assert seen == ["user_1"] * 3, "a hit with a listener takes the path that emits"


def test_a_listener_connected_after_the_hits_began_hears_the_next_hit(
    tokens: TokenIssuer,
) -> None:
    """The hit reads the signals' live receivers, not what they were at start-up."""
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    client = app.test_client()
    for _ in range(3):  # a miss, then hits with nobody listening
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    heard: list[str] = []

    def on_any(sender: Flask, event: str, record: dict[str, Any]) -> None:
        heard.append(event)

    def on_validated(sender: Flask, record: dict[str, Any]) -> None:
        heard.append("validated")

    with security_event.connected_to(on_any, app):
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert heard == ["token_validated"]
    with token_validated.connected_to(on_validated, app):
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert heard == ["token_validated", "validated"]
    assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert len(heard) == 2, "nobody listens any more"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(getattr(record, "event", "?"))


def test_a_log_level_changed_at_run_time_applies_to_the_next_hit(tokens: TokenIssuer) -> None:
    """Raising the security logger to INFO after hits began logs the next hit;
    ``logging.disable`` silences it again (the hit reads logging's own cache)."""
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    client = app.test_client()
    logger = logging.getLogger(SECURITY_LOGGER)
    records = _Records()
    logger.addHandler(records)
    level = logger.level
    try:
        logger.setLevel(logging.WARNING)
        for _ in range(3):
            assert client.get("/who", headers=auth_header(token)).status_code == 200
        assert records.events == []
        logger.setLevel(logging.INFO)
        assert client.get("/who", headers=auth_header(token)).status_code == 200
        assert records.events == ["token_validated"]
        logging.disable(logging.INFO)
        assert client.get("/who", headers=auth_header(token)).status_code == 200
        logging.disable(logging.NOTSET)
        assert records.events == ["token_validated"]
        assert client.get("/who", headers=auth_header(token)).status_code == 200
        assert records.events == ["token_validated"] * 2
    finally:
        logging.disable(logging.NOTSET)
        logger.setLevel(level)
        logger.removeHandler(records)


class _SwitchedLogger(logging.Logger):
    """A logger class whose ``isEnabledFor`` answers from elsewhere too."""

    switched_on = False

    def isEnabledFor(self, level: int) -> bool:
        return self.switched_on or super().isEnabledFor(level)


def test_hits_follow_a_replaced_logger_and_a_custom_logger_class(tokens: TokenIssuer) -> None:
    """The hit trusts logging's level cache only for a standard logger, and
    follows ``events.logger`` when it is replaced after start-up."""
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    client = app.test_client()
    events = get_state(app).events
    custom = _SwitchedLogger("hot-path-switched")
    custom.setLevel(logging.WARNING)
    custom.propagate = False
    records = _Records()
    custom.addHandler(records)
    for _ in range(2):  # a miss and a hit with the standard logger, quiet
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    events.logger = custom
    for _ in range(2):
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert records.events == [], "quiet: its cache says so"
    _SwitchedLogger.switched_on = True
    try:
        for _ in range(2):
            assert client.get("/who", headers=auth_header(token)).status_code == 200
    finally:
        _SwitchedLogger.switched_on = False
    assert records.events == ["token_validated"] * 2
    loud = logging.getLogger("hot-path-loud")
    loud.setLevel(logging.INFO)
    loud.propagate = False
    heard = _Records()
    loud.addHandler(heard)
    assert loud.isEnabledFor(logging.INFO)  # its cache answers True
    events.logger = loud
    assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert heard.events == ["token_validated"]


def test_a_copy_of_the_events_object_leaves_the_apps_hits_alone(tokens: TokenIssuer) -> None:
    """A copy (or a subclass that sets attributes early) gets its own quiet signs."""
    app = _hit_app(tokens)
    token = tokens.mint(scopes=["read:users"])
    client = app.test_client()
    events = get_state(app).events
    loud = logging.getLogger("hot-path-copy-loud")
    loud.setLevel(logging.INFO)
    loud.propagate = False
    heard = _Records()
    loud.addHandler(heard)
    events.logger = loud
    quiet = logging.getLogger("hot-path-copy-quiet")
    quiet.setLevel(logging.WARNING)
    assert not quiet.isEnabledFor(logging.INFO)  # its cache says "quiet"
    clone = copy.copy(events)
    assert clone.quiet_signs is not events.quiet_signs
    clone.logger = quiet
    for _ in range(3):
        assert client.get("/who", headers=auth_header(token)).status_code == 200
    assert heard.events == ["token_validated"] * 3

    class Early(SecurityEvents):
        def __init__(self) -> None:
            self.metrics = None  # before the base class set anything up
            super().__init__()

    assert Early().quiet_signs[1] is security_event.receivers


# -- base64url: the one-translate check == the definition ---------------------


def _canonical_base64url(segment: str) -> bytes | None:
    """RFC 7515 §2 base64url, written plainly: unpadded, and the one spelling."""
    if any(c in segment for c in "+/=") or len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == segment else None


@settings(max_examples=3000, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=. é\x00~"
        ),
        max_size=14,
    )
)
def test_base64url_decoding_is_strict_and_canonical(segment: str) -> None:
    try:
        decoded: bytes | None = _b64decode(segment, "segment")
    except InvalidTokenError:
        decoded = None
    assert decoded == _canonical_base64url(segment)


# -- the JWT claims check: fast path == general path ---------------------------

NOW = 1_800_000_000.0

times = st.one_of(
    st.none(),
    st.integers(min_value=int(NOW) - 200, max_value=int(NOW) + 200),
    st.sampled_from([2**1023 - 1, 2**1023, 2**1024, -(2**1023), 10**400, -(10**400), 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=NOW - 200, max_value=NOW + 200),
    st.booleans(),
    st.text(max_size=3),
)
audiences = st.one_of(
    st.none(),
    st.sampled_from(["api", "other", ""]),
    st.lists(st.sampled_from(["api", "other", 1]), max_size=3),
    st.integers(),
)


def _outcome(check: Any, claims: Mapping[str, Any]) -> tuple[str, str] | None:
    try:
        check(claims, NOW)
    except OAuthVerifyError as exc:
        return type(exc).__name__, exc.reason or ""
    return None


@pytest.mark.parametrize(
    "extra",
    [{}, {"REQUIRED_CLAIMS": ["sub"], "ALLOWED_CLIENT_IDS": ["client-1"]}, {"LEEWAY": 30}],
)
@settings(max_examples=300, deadline=None)
@given(exp=times, nbf=times, iat=times, aud=audiences, sub=st.sampled_from([None, "u"]))
def test_fast_claims_check_agrees_with_check_claims(
    extra: dict[str, Any], exp: Any, nbf: Any, iat: Any, aud: Any, sub: Any
) -> None:
    config = {
        "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_JWKS": {"keys": []},
        **{f"OAUTH_VERIFY_{k}": v for k, v in extra.items()},
    }
    verifier = JWTVerifier(Settings.from_config(config))
    values = {"exp": exp, "nbf": nbf, "iat": iat, "aud": aud, "sub": sub, "client_id": "client-1"}
    claims = {k: v for k, v in values.items() if v is not None}
    expected = _outcome(verifier.check_claims, claims)
    assert _outcome(verifier._check_jwt_claims, claims) == expected


# -- ContextBuilder == the mapping rules, written plainly ----------------------


def _reference(claims: Mapping[str, Any], settings: Settings, strategy: str) -> AuthContext:
    """The documented mapping, one claim_path() at a time (slow and plain)."""
    mapping = settings.claim_map
    strings: dict[str, str | None] = {}
    for field in ("subject", "client_id", "token_type", "organization_id", "service_name"):
        strings[field] = None
        for path in mapping[field]:
            value = claim_path(claims, path)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidTokenError(reason=f"claim {path!r} ({field}) is not a string")
            strings[field] = value
            break
    scopes: set[str] = set()
    for path in mapping["scopes"]:
        value = claim_path(claims, path)
        if value is None:
            continue
        if isinstance(value, str):
            scopes.update(item for item in value.split(" ") if item)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            if any(not item or " " in item for item in value):
                raise InvalidTokenError(reason=f"claim {path!r} holds a malformed scope")
            scopes.update(value)
        else:
            raise InvalidTokenError(reason=f"claim {path!r} (scopes) has the wrong type")
    subject, client_id = strings["subject"], strings["client_id"]
    if subject is None:
        user = False
    elif settings.user_id_rule is not None:
        user = bool(settings.user_id_rule(claims))
    elif settings.user_id_prefix is not None:
        user = subject.startswith(settings.user_id_prefix)
    else:
        user = claims.get("gty") != "client-credentials" and subject != client_id

    def number(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)

    aud = claims.get("aud")
    if aud is None:
        audience: tuple[str, ...] = ()
    elif isinstance(aud, str):
        audience = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audience = tuple(aud)
    else:
        raise InvalidTokenError(reason="claim 'aud' is not a string or a list of strings")
    iss, jti = claims.get("iss"), claims.get("jti")
    return AuthContext(
        subject=subject,
        client_id=client_id,
        scopes=frozenset(scopes),
        organization_id=strings["organization_id"],
        user_id=subject if user else None,
        service_name=strings["service_name"],
        token_type=strings["token_type"] or "unknown",
        issuer=iss if isinstance(iss, str) else None,
        audience=audience,
        expires_at=number(claims.get("exp")),
        issued_at=number(claims.get("iat")),
        claims=dict(claims),
        strategy=strategy,
        token_id=jti if isinstance(jti, str) else None,
    )


scalars = st.one_of(
    st.none(), st.sampled_from(["a", "b c", "", " x", "org"]), st.integers(), st.booleans()
)
scope_values = st.one_of(
    scalars,
    st.lists(st.sampled_from(["read", "write", "", "a b", 3]), max_size=3),
)
nested = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["service_name", "client_type", "org"]), scalars, max_size=3),
    st.integers(),
)
claim_sets = st.fixed_dictionaries(
    {},
    optional={
        "sub": scalars,
        "client_id": scalars,
        "azp": scalars,
        "cid": scalars,
        "scope": scope_values,
        "scopes": scope_values,
        "scp": scope_values,
        "oid": scalars,
        "org_id": scalars,
        "gty": st.sampled_from(["client-credentials", "password"]),
        "custom_claims": nested,
        "custom_claims.org": scalars,  # a claim named like a path wins over it
        "iss": scalars,
        "aud": st.one_of(st.none(), st.sampled_from(["api"]), st.lists(scalars, max_size=2)),
        "exp": st.one_of(st.integers(), st.floats(min_value=0, max_value=2e9), st.booleans()),
        "iat": st.one_of(st.integers(), st.floats(min_value=0, max_value=2e9)),
        "jti": scalars,
        # for the namespaced and odd claim names of the last claim map
        "uid": scalars,
        "permissions": scope_values,
        "https://api.example.test/org": scalars,
        "https://api": st.one_of(
            scalars,
            st.fixed_dictionaries({"example": st.fixed_dictionaries({"test/org": scalars})}),
        ),
        "o'rg\"\\\n)": scalars,
    },
)
CLAIM_MAPS: list[dict[str, Any]] = [
    {},
    {"USER_ID_PREFIX": "a"},
    {"CLAIM_MAP": {"organization_id": ["custom_claims.org", "oid"], "scopes": ["scp"]}},
    {"USER_ID_RULE": lambda claims: "gty" in claims},
    {
        "USER_ID_PREFIX": ("user_", "a"),
        "CLAIM_MAP": {
            "subject": ["uid", "sub"],
            "organization_id": ["https://api.example.test/org", "o'rg\"\\\n)"],
            "scopes": ["permissions", "scope"],
        },
    },
]


@pytest.mark.parametrize("extra", CLAIM_MAPS)
@settings(max_examples=300, deadline=None)
@given(claims=claim_sets, strategy=st.sampled_from(["jwks", "introspection"]))
def test_context_builder_follows_the_mapping_rules(
    extra: dict[str, Any], claims: dict[str, Any], strategy: str
) -> None:
    config = {
        "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_JWKS": {"keys": []},
        **{f"OAUTH_VERIFY_{k}": v for k, v in extra.items()},
    }
    settings_ = Settings.from_config(config)
    try:
        expected: AuthContext | str = _reference(claims, settings_, strategy)
    except InvalidTokenError as exc:
        expected = exc.reason or ""
    try:
        built: AuthContext | str = ContextBuilder(settings_).build(dict(claims), strategy, True)
    except InvalidTokenError as exc:
        built = exc.reason or ""
    assert built == expected
    if isinstance(built, AuthContext):
        assert build_context(claims, settings_, strategy=strategy) == built
        assert hash(built) == hash(expected) if _hashable(built) else True


def _hashable(context: AuthContext) -> bool:
    try:
        hash(context)
    except TypeError:
        return False
    return True


def test_a_built_context_is_frozen(tokens: TokenIssuer) -> None:
    settings_ = Settings.from_config(tokens.config(audience="api"))
    context = build_context(tokens.claims(scopes=["read"], organization_id="org"), settings_)
    assert type(context) is AuthContext, "built as a _Building, finished as an AuthContext"
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.subject = "someone else"  # type: ignore[misc]
    with pytest.raises(TypeError):
        context.claims["sub"] = "someone else"  # type: ignore[index]
    assert dataclasses.replace(context, subject="x").subject == "x"
    assert context.scopes == {"read"} and context.organization_id == "org"
    assert "claims" not in repr(context) and not math.isnan(context.expires_at or 0)
