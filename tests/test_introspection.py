"""RFC 7662 introspection against a real endpoint on 127.0.0.1.

The endpoint is :class:`flask_oauth_verify.testing.TokenIssuer` served by an
:class:`IssuerServer`: it issues opaque tokens, revokes them between
requests, checks the client authentication method and body format, and is
made to fail in each way the client must survive.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import pytest
from flask import Flask, g
from flask.testing import FlaskClient
from flask_caching import Cache
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify, require_scope, require_token
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.introspection import Introspector, answer_scope
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, add_views, free_port, make_app

INTROSPECT = "/introspect"
LOGGER = "flask_oauth_verify.introspection"


@pytest.fixture
def issuer(issuer_server: IssuerServer) -> TokenIssuer:
    """An issuer (ES256: fast keys) with discovery, JWKS and introspection served."""
    tokens = TokenIssuer(alg="ES256", audience="api")
    tokens.serve(issuer_server)
    return tokens


def intro_config(issuer: TokenIssuer, **extra: Any) -> dict[str, Any]:
    """Settings for introspection with the server's default credentials."""
    client_id, secret = issuer.introspection_credentials
    values: dict[str, Any] = {
        "STRATEGY": "introspection",
        "INTROSPECTION_CLIENT_ID": client_id,
        "INTROSPECTION_CLIENT_SECRET": secret,
    }
    values.update(extra)
    return issuer.config(**values)


def add_strategy_views(app: Flask) -> None:
    """Per-route strategies on top of the core views."""

    @app.get("/introspected")
    @require_token(strategy="introspection")
    def introspected() -> dict[str, Any]:
        return {"subject": g.auth.subject, "strategy": g.auth.strategy}

    @app.get("/introspected-scope")
    @require_scope("read:users", strategy="introspection")
    def introspected_scope() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    @app.get("/both")
    @require_token(strategy="both")
    def both() -> dict[str, Any]:
        return {"subject": g.auth.subject, "strategy": g.auth.strategy}


def server_of(issuer: TokenIssuer) -> IssuerServer:
    assert issuer.server is not None
    return issuer.server


def hits(issuer: TokenIssuer) -> int:
    return server_of(issuer).hits[INTROSPECT]


def last_introspection(issuer: TokenIssuer) -> Request:
    return [r for r in server_of(issuer).requests if r.path == INTROSPECT][-1]


def assert_503(response: TestResponse) -> None:
    assert response.status_code == 503
    assert response.json == {
        "error": "temporarily_unavailable",
        "message": "Token verification is temporarily unavailable.",
    }
    assert int(response.headers["Retry-After"]) >= 1
    assert 'error="temporarily_unavailable"' in response.headers["WWW-Authenticate"]


def assert_401(response: TestResponse, error: str = "invalid_token") -> None:
    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error"] == error
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")


def scripted(issuer: TokenIssuer, body: Callable[[dict[str, Any]], Any]) -> None:
    """Answer introspection with ``body(claims)`` for any token."""
    claims = issuer.claims(scopes=["read:users"], organization_id="org_1")
    server_of(issuer).route(INTROSPECT, lambda _r: Reply(200, body(dict(claims))))


# -- the happy path and the request on the wire --------------------------------


def test_opaque_token_maps_to_the_same_auth_context(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer))
    token = issuer.mint_opaque(
        subject="user_7", scopes=["read:users", "write:users"], organization_id="org_9"
    )
    response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 200
    assert response.json == {
        "subject": "user_7",
        "organization_id": "org_9",
        "scopes": ["read:users", "write:users"],
        "strategy": "introspection",
    }
    assert app.test_client().get("/read", headers=auth_header(token)).status_code == 200


def test_request_is_a_form_post_with_hint_and_basic_auth(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer))
    token = issuer.mint_opaque()
    assert app.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    sent = last_introspection(issuer)
    assert sent.method == "POST"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.form() == {"token": token, "token_type_hint": "access_token"}
    scheme, _, encoded = sent.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "resource-server:rs-secret"


def test_endpoint_discovered_or_configured(issuer: TokenIssuer) -> None:
    server = server_of(issuer)
    server.route("/oauth/introspect", issuer._introspection_handler)
    configured = make_app(
        intro_config(issuer, INTROSPECTION_ENDPOINT=f"{server.url}/oauth/introspect")
    )
    token = issuer.mint_opaque()
    assert configured.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    assert server.hits["/oauth/introspect"] == 1
    assert server.hits["/.well-known/openid-configuration"] == 0
    discovered = make_app(intro_config(issuer))
    assert discovered.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    assert server.hits[INTROSPECT] == 1
    assert server.hits["/.well-known/openid-configuration"] == 1


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "bearer", "none"])
@pytest.mark.parametrize("body", ["form", "json"])
def test_each_client_auth_method_and_body_format(
    issuer: TokenIssuer, method: str, body: str
) -> None:
    issuer.introspection_auth = method
    issuer.introspection_body = body
    app = make_app(
        intro_config(
            issuer,
            INTROSPECTION_AUTH=method,
            INTROSPECTION_BODY=body,
            INTROSPECTION_TOKEN=issuer.introspection_bearer,
        )
    )
    token = issuer.mint_opaque(subject="user_5")
    response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["subject"] == "user_5"
    sent = last_introspection(issuer)
    params: Mapping[str, Any] = sent.json() if body == "json" else sent.form()
    assert params["token"] == token
    authorization = sent.headers.get("Authorization")
    if body == "json":
        assert sent.headers["Content-Type"] == "application/json"
        assert "token_type_hint" not in params
    else:
        assert params["token_type_hint"] == "access_token"
    if method == "client_secret_basic":
        assert authorization is not None and authorization.startswith("Basic ")
        assert "client_secret" not in params
    elif method == "client_secret_post":
        assert authorization is None
        assert (params["client_id"], params["client_secret"]) == ("resource-server", "rs-secret")
    elif method == "bearer":
        assert authorization == f"Bearer {issuer.introspection_bearer}"
        assert "client_id" not in params
    else:
        assert authorization is None
        assert params["client_id"] == "resource-server"
        assert "client_secret" not in params


def test_basic_credentials_are_form_encoded(issuer: TokenIssuer) -> None:
    # RFC 6749 §2.3.1: a secret with ':' or '%' must survive the Basic encoding.
    issuer.introspection_credentials = ("rs:1 é", "p%ss:w/rd +x")
    issuer.introspection_auth = "client_secret_basic"
    app = make_app(intro_config(issuer))
    token = issuer.mint_opaque()
    assert app.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    encoded = last_introspection(issuer).headers["Authorization"].split(" ", 1)[1]
    user, password = base64.b64decode(encoded).decode().split(":")
    assert (unquote(user), unquote(password)) == issuer.introspection_credentials


# -- revocation and caching ----------------------------------------------------


def test_revoked_opaque_token_refused_on_the_next_request_without_cache(
    issuer: TokenIssuer,
) -> None:
    client = make_app(intro_config(issuer)).test_client()
    token = issuer.mint_opaque()
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    issuer.revoke(token)
    assert_401(client.get("/protected", headers=auth_header(token)))
    assert hits(issuer) == 2


def test_revoked_token_refused_once_the_cache_ttl_has_passed(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    client = make_app(intro_config(issuer, INTROSPECTION_CACHE_TTL=60), clock=clock).test_client()
    token = issuer.mint_opaque()
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    issuer.revoke(token)
    clock.advance(59)
    # The documented trade-off: within the TTL the cached answer still holds.
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1
    clock.advance(1)
    assert_401(client.get("/protected", headers=auth_header(token)))
    assert hits(issuer) == 2


@pytest.mark.parametrize("token_cache_size", [10_000, 0])
def test_a_clock_stepped_back_does_not_stretch_the_cache_ttl(
    issuer: TokenIssuer, clock: FakeClock, token_cache_size: int
) -> None:
    """Reuse deadlines were wall-clock times: after a step back of an hour, a
    revoked token's cached answer held for the TTL plus the hour."""
    config = intro_config(issuer, INTROSPECTION_CACHE_TTL=60, TOKEN_CACHE_SIZE=token_cache_size)
    client = make_app(config, clock=clock).test_client()
    token = issuer.mint_opaque(expires_in=4 * 3600, now=clock.now - 2 * 3600)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1
    issuer.revoke(token)
    clock.advance(-3600)
    clock.advance(61)
    assert_401(client.get("/protected", headers=auth_header(token)))
    assert hits(issuer) == 2


@pytest.mark.parametrize("token_cache_size", [10_000, 0])
def test_answers_are_cached_without_a_cache_backend(
    issuer: TokenIssuer, clock: FakeClock, token_cache_size: int
) -> None:
    # Without a backend the answer lives in this process: in the
    # introspector's memo, or (TOKEN_CACHE_SIZE = 0: no memo) in the
    # per-process LocalCache; either way for the TTL on our clock.
    config = intro_config(issuer, INTROSPECTION_CACHE_TTL=60, TOKEN_CACHE_SIZE=token_cache_size)
    client = make_app(config, clock=clock).test_client()
    token = issuer.mint_opaque(expires_in=3600, now=clock.now)
    for _ in range(3):
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1
    issuer.revoke(token)
    clock.advance(60)
    assert_401(client.get("/protected", headers=auth_header(token)))
    assert hits(issuer) == 2


def test_introspection_answers_beyond_the_bound_are_asked_again(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    config = intro_config(issuer, INTROSPECTION_CACHE_TTL=60, TOKEN_CACHE_SIZE=2)
    client = make_app(config, clock=clock).test_client()
    opaque = [issuer.mint_opaque(expires_in=3600, now=clock.now) for _ in range(3)]
    for token in opaque:
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 3
    assert client.get("/protected", headers=auth_header(opaque[2])).status_code == 200
    assert hits(issuer) == 3, "the newest answer is still held"
    issuer.revoke(opaque[0])
    assert_401(client.get("/protected", headers=auth_header(opaque[0])))
    assert hits(issuer) == 4, "the oldest answer was dropped: the endpoint is asked again"


def test_cache_ttl_never_outlives_the_token(issuer: TokenIssuer, clock: FakeClock) -> None:
    config = intro_config(issuer, INTROSPECTION_CACHE_TTL=300, LEEWAY=0)
    client = make_app(config, clock=clock).test_client()
    token = issuer.mint_opaque(expires_in=20, now=clock.now)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    clock.advance(10)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1
    clock.advance(11)
    # The entry lasted min(300, exp - now): the endpoint is asked again, and
    # the (fake) time is past exp.
    assert_401(client.get("/protected", headers=auth_header(token)), "token_expired")
    assert hits(issuer) == 2


def test_a_repeated_opaque_token_reuses_its_context_until_the_answer_expires(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    app = Flask("context-reuse")
    app.config.update(TESTING=True, **intro_config(issuer, INTROSPECTION_CACHE_TTL=60))
    oauth = OAuthVerify()
    oauth.init_app(app, clock=clock)
    add_views(app)
    checked: list[str] = []

    @oauth.claims_check
    def remember(claims: Mapping[str, Any]) -> bool:
        checked.append(claims["sub"])
        return True

    client = app.test_client()
    token = issuer.mint_opaque(subject="user_a", expires_in=3600, now=clock.now)
    for _ in range(3):
        response = client.get("/protected", headers=auth_header(token))
        assert response.status_code == 200
        assert response.json is not None and response.json["subject"] == "user_a"
    assert (hits(issuer), checked) == (1, ["user_a"]), "built once, reused twice"
    clock.advance(60)  # the cached answer's deadline
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert (hits(issuer), checked) == (2, ["user_a", "user_a"]), "asked and built again"


def test_inactive_answers_cached_only_with_a_negative_ttl(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    positive_only = make_app(intro_config(issuer, INTROSPECTION_CACHE_TTL=60), clock=clock)
    for _ in range(2):
        assert_401(positive_only.test_client().get("/protected", headers=auth_header("unknown-1")))
    assert hits(issuer) == 2
    negative = make_app(
        intro_config(issuer, INTROSPECTION_NEGATIVE_CACHE_TTL=10), clock=clock, name="neg"
    )
    for _ in range(3):
        assert_401(negative.test_client().get("/protected", headers=auth_header("unknown-2")))
    assert hits(issuer) == 3
    clock.advance(10)
    assert_401(negative.test_client().get("/protected", headers=auth_header("unknown-2")))
    assert hits(issuer) == 4


def test_results_never_leak_between_tokens(issuer: TokenIssuer, clock: FakeClock) -> None:
    app = Flask("leak")
    app.config.update(CACHE_TYPE="SimpleCache")
    cache = Cache(app)
    app.config.update(TESTING=True, **intro_config(issuer, INTROSPECTION_CACHE_TTL=300))
    OAuthVerify().init_app(app, cache=cache, clock=clock)
    add_views(app)
    client = app.test_client()
    first = issuer.mint_opaque(subject="user_a", organization_id="org_a", scopes=["a"])
    second = issuer.mint_opaque(subject="user_b", organization_id="org_b", scopes=["b"])
    for _ in range(2):
        for token, who in ((first, "a"), (second, "b")):
            response = client.get("/protected", headers=auth_header(token))
            assert response.json == {
                "subject": f"user_{who}",
                "organization_id": f"org_{who}",
                "scopes": [who],
                "strategy": "introspection",
            }
    assert hits(issuer) == 2
    for near_miss in (first + "x", first[:-1], second.upper(), "unknown"):
        assert_401(client.get("/protected", headers=auth_header(near_miss)))
    # A revoked token is refused after the TTL while its neighbour stays cached.
    issuer.revoke(first)
    clock.advance(300)
    assert_401(client.get("/protected", headers=auth_header(first)))
    # The shared cache holds hashes only, never a token.
    stored = cache.cache._cache
    assert stored, "results were cached"
    for key, value in stored.items():
        for token in (first, second):
            assert token not in key
            assert token not in repr(value)
    assert any("oauth_verify:introspection:" in key for key in stored)
    # The key every worker and version shares: who answers, then the
    # token's SHA-256 in hex.
    scope = answer_scope(get_state(app).settings)
    digest = hashlib.sha256(second.encode()).hexdigest()
    assert f"oauth_verify:introspection:{scope}:{digest}" in stored


# -- strict handling of the response -------------------------------------------


@pytest.mark.parametrize(
    "active", ["true", 1, "yes", None, [True], {"value": True}, False, "missing"]
)
def test_only_json_true_is_active(issuer: TokenIssuer, active: Any) -> None:
    def body(claims: dict[str, Any]) -> dict[str, Any]:
        if active != "missing":
            claims["active"] = active
        return claims

    scripted(issuer, body)
    app = make_app(intro_config(issuer))
    assert_401(app.test_client().get("/protected", headers=auth_header("some-token")))
    assert hits(issuer) == 1


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(claims: dict[str, Any]) -> dict[str, Any]:
        claims["active"] = True
        claims[name] = value
        return claims

    return change


def _drop(*names: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(claims: dict[str, Any]) -> dict[str, Any]:
        claims["active"] = True
        for name in names:
            claims.pop(name, None)
        return claims

    return change


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        (_set("iss", "https://evil.example.test"), 401, "invalid_token"),
        (_set("iss", 42), 401, "invalid_token"),
        (_set("aud", "other-api"), 401, "invalid_token"),
        (_set("aud", ["other", "api"]), 200, None),
        (_set("aud", []), 401, "invalid_token"),
        (_set("exp", 1_000_000), 401, "token_expired"),
        (_set("exp", "tomorrow"), 401, "invalid_token"),
        (_set("exp", None), 401, "invalid_token"),
        (_set("nbf", 99_999_999_999), 401, "token_not_active"),
        (_set("iat", 99_999_999_999), 401, "invalid_token"),
        (_set("token_type", "refresh_token"), 401, "invalid_token"),
        (_set("token_type", "DPoP"), 401, "invalid_token"),
        (_set("token_type", "bearer"), 200, None),
        (_set("token_type", "urn:ietf:params:oauth:token-type:access_token"), 200, None),
        # Keycloak answers for its refresh and ID tokens carry typ, not token_type.
        (_set("typ", "Refresh"), 401, "invalid_token"),
        (_set("typ", "Offline"), 401, "invalid_token"),
        (_set("typ", "ID"), 401, "invalid_token"),
        (_set("typ", "Bearer"), 200, None),
        (_set("token_use", "refresh_token"), 401, "invalid_token"),
        (_set("token_use", "access_token"), 200, None),
        (_set("scope", ["read:users"]), 200, None),
        (_set("scope", 5), 401, "invalid_token"),
        # RFC 7662 §2.2: only "active" is required; exp/aud/iss optional.
        (_drop("iss", "aud", "exp", "nbf", "iat"), 200, None),
    ],
)
def test_response_claims_are_checked_like_jwt_claims(
    issuer: TokenIssuer,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    status: int,
    error: str | None,
) -> None:
    scripted(issuer, change)
    app = make_app(intro_config(issuer))
    response = app.test_client().get("/read", headers=auth_header("some-token"))
    assert response.status_code == status, response.json
    if error is not None:
        assert_401(response, error)


def test_required_claims_apply_to_introspection(issuer: TokenIssuer) -> None:
    scripted(issuer, _drop("exp"))
    app = make_app(intro_config(issuer, REQUIRED_CLAIMS=["exp"]))
    assert_401(app.test_client().get("/protected", headers=auth_header("some-token")))


# -- strategies ----------------------------------------------------------------


def test_per_route_strategies_on_a_jwks_app(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer, STRATEGY="jwks"))
    add_strategy_views(app)
    client = app.test_client()
    opaque = issuer.mint_opaque(subject="user_o", scopes=["read:users"])
    assert_401(client.get("/protected", headers=auth_header(opaque)))
    assert hits(issuer) == 0
    response = client.get("/introspected", headers=auth_header(opaque))
    assert response.json == {"subject": "user_o", "strategy": "introspection"}
    assert client.get("/introspected-scope", headers=auth_header(opaque)).status_code == 200
    unscoped = issuer.mint_opaque(scopes=["other"])
    response = client.get("/introspected-scope", headers=auth_header(unscoped))
    assert response.status_code == 403
    assert response.json is not None and response.json["error"] == "insufficient_scope"


def test_async_view_with_introspection(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer, STRATEGY="jwks"))

    @app.get("/async")
    @require_scope("read:users", strategy="introspection")
    async def async_view() -> dict[str, Any]:
        return {"subject": g.auth.subject, "strategy": g.auth.strategy}

    token = issuer.mint_opaque(subject="user_async", scopes=["read:users"])
    response = app.test_client().get("/async", headers=auth_header(token))
    assert response.json == {"subject": "user_async", "strategy": "introspection"}
    issuer.revoke(token)
    assert_401(app.test_client().get("/async", headers=auth_header(token)))


def test_auto_sends_jwts_to_jwks_and_opaque_tokens_to_introspection(
    issuer: TokenIssuer,
) -> None:
    client = make_app(intro_config(issuer, STRATEGY="auto")).test_client()
    jwt = client.get("/protected", headers=auth_header(issuer.mint(subject="user_j")))
    assert jwt.json is not None and jwt.json["strategy"] == "jwks"
    assert hits(issuer) == 0
    opaque = client.get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert opaque.json is not None and opaque.json["strategy"] == "introspection"
    assert hits(issuer) == 1


def test_both_refuses_a_revoked_jwt_that_jwks_alone_accepts(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer, STRATEGY="jwks"))
    add_strategy_views(app)
    client = app.test_client()
    token = issuer.mint(subject="user_b")
    response = client.get("/both", headers=auth_header(token))
    assert response.json == {"subject": "user_b", "strategy": "jwks"}
    assert hits(issuer) == 1
    issuer.revoke(token)
    assert_401(client.get("/both", headers=auth_header(token)))
    assert hits(issuer) == 2
    # The local check alone cannot see the revocation: why "both" exists.
    assert client.get("/protected", headers=auth_header(token)).status_code == 200


def test_both_app_wide_and_its_failure_modes(issuer: TokenIssuer) -> None:
    client = make_app(intro_config(issuer, STRATEGY="both")).test_client()
    # An opaque token fails the local JWT check before any call goes out.
    assert_401(client.get("/protected", headers=auth_header(issuer.mint_opaque())))
    assert hits(issuer) == 0
    # A forged JWT never reaches the endpoint either.
    forged = TokenIssuer(issuer=issuer.issuer, alg="ES256").mint()
    assert_401(client.get("/protected", headers=auth_header(forged)))
    assert hits(issuer) == 0
    # A valid JWT with the endpoint down: 503, never a silent pass.
    server_of(issuer).route(INTROSPECT, Reply(500, {"error": "boom"}))
    assert_503(client.get("/protected", headers=auth_header(issuer.mint())))


# -- failures: 503, logged, never 401 or 500 -----------------------------------


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (Reply(500, {"error": "server_error"}), "server_error"),
        (Reply(502, "<html>bad gateway</html>"), "server_error"),
        (Reply(503, b""), "server_error"),
        (Reply(200, "<html>login page</html>"), "invalid_response"),
        (Reply(200, ["active", True]), "invalid_response"),
        (Reply(200, "true"), "invalid_response"),
        (Reply(401, {"error": "invalid_client"}), "credentials_rejected"),
        (Reply(403, {"error": "forbidden"}), "credentials_rejected"),
        (Reply(400, {"error": "invalid_request"}), "request_rejected"),
        (Reply(404, {"error": "not_found"}), "request_rejected"),
        (Reply(200, {"error": "invalid_client"}), "request_rejected"),
        (Reply(429, {"error": "slow_down"}, {"Retry-After": "1"}), "rate_limited"),
        (Reply(408, b""), "rate_limited"),
        (Reply(302, b"", {"Location": "https://elsewhere.example.test/"}), "redirect_refused"),
    ],
)
def test_endpoint_failures_give_503_and_say_which(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, reply: Reply, kind: str
) -> None:
    server_of(issuer).route(INTROSPECT, reply)
    app = make_app(intro_config(issuer))
    token = issuer.mint_opaque()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = app.test_client().get("/protected", headers=auth_header(token))
    assert_503(response)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert f"({kind})" in messages[0]
    assert "not a problem with the client's token" in messages[0]
    assert token not in caplog.text


@pytest.mark.parametrize("depth", [65, 100_000])
def test_an_answer_nested_too_deeply_is_logged_as_such(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    """Past our own limit, or past the JSON parser's: both said "non-JSON body"
    (the second one)."""
    deep = b'{"active": true, "x": ' + b"[" * depth + b"]" * depth + b"}"
    server_of(issuer).route(INTROSPECT, Reply(200, deep))
    app = make_app(intro_config(issuer))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert_503(app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque())))
    [message] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "answer is not JSON (nested deeper than 64 levels)" in message


def test_a_token_the_endpoint_will_not_introspect_is_refused_not_an_outage(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """oidc-provider answers ``400 unsupported_token_type`` for any token
    shaped like a JWT: a decision on that token (401), not a configuration
    error of ours (it was a 503 with an ERROR record, so a stranger's junk
    JWT made the service look broken), and the circuit stays closed."""

    def like_oidc_provider(request: Request) -> Reply:
        token = request.form()["token"]
        if token.count(".") == 2:
            return Reply(
                400,
                {
                    "error": "unsupported_token_type",
                    "error_description": "Structured JWT Tokens cannot be introspected",
                },
            )
        return Reply(200, issuer.introspect(token))

    server_of(issuer).route(INTROSPECT, like_oidc_provider)
    client = make_app(intro_config(issuer)).test_client()
    with caplog.at_level(logging.INFO):
        for _ in range(8):  # more than CIRCUIT_BREAKER_THRESHOLD
            response = client.get("/protected", headers=auth_header(issuer.mint()))
            assert_401(response)
            assert response.json == {
                "error": "invalid_token",
                "message": "The access token is invalid.",
            }
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    opaque = issuer.mint_opaque()
    assert client.get("/protected", headers=auth_header(opaque)).status_code == 200


def _segment(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _spelled(header: bytes | dict[str, Any], claims: dict[str, Any], *, tail: str = ".") -> str:
    """An unsigned token: ``header`` (JSON, or the raw bytes as written), the claims."""
    return f"{_segment(header)}.{_segment(claims)}{tail}"


#: Unsecured headers in the spellings a lenient JOSE parser (Keycloak's) reads.
UNSECURED: dict[str, Callable[[dict[str, Any]], str]] = {
    "alg none": lambda c: _spelled({"alg": "none"}, c),
    "NONE": lambda c: _spelled({"alg": "NONE", "typ": "JWT"}, c),
    "no alg": lambda c: _spelled({"typ": "JWT"}, c),
    "alg null": lambda c: _spelled({"alg": None}, c),
    "alg a list": lambda c: _spelled({"alg": ["RS256"]}, c),
    "white space": lambda c: _spelled(b'{ "alg": "none" }', c),
    "new line": lambda c: _spelled(b'{\n"alg":"none"}', c),
    "byte order mark": lambda c: _spelled(b'\xef\xbb\xbf{"alg":"none"}', c),
    "escaped": lambda c: _spelled(b'{"alg":"n\\u006fne"}', c),
    "spaces in alg": lambda c: _spelled(b'{"alg":" none "}', c),
    "one dot": lambda c: _spelled(b'{"alg":"none"}', c, tail=""),
    "trailing dots": lambda c: _spelled(b'{"alg":"none"}', c, tail=".."),
    "no alg, one dot": lambda c: _spelled(b'{"typ":"JWT"}', c, tail=""),
    "alg twice": lambda c: _spelled(b'{"alg":"RS256","alg":"none"}', c),
    "standard alphabet": lambda c: (
        _spelled(b'{"alg":"none","x":"?>?"}', c).replace("_", "/").replace("-", "+")
    ),
}


@pytest.mark.parametrize("spelling", sorted(UNSECURED))
def test_an_unsecured_jwt_is_refused_before_the_endpoint_is_asked(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, spelling: str
) -> None:
    """Keycloak answers ``400 invalid_request`` ("Failed to introspect token")
    for a JWT whose header names no signature algorithm, however its lenient
    parser reads the header: any client could turn it into a 503 with ERROR
    records. Such a token is never an access token, so it is refused without
    asking, under every strategy (an opaque token, a JWT with an algorithm,
    a first segment that is no JSON object, still go to the endpoint)."""
    claims = issuer.claims(scopes=["read:users"])
    unsecured = UNSECURED[spelling](claims)
    assert len(unsecured) < 4096 and " " not in unsecured

    def like_keycloak(request: Request) -> Reply:
        token = request.form()["token"]
        if token == unsecured:
            return Reply(
                400, {"error": "invalid_request", "error_description": "Failed to introspect token"}
            )
        return Reply(200, issuer.introspect(token))

    server_of(issuer).route(INTROSPECT, like_keycloak)
    with caplog.at_level(logging.INFO):
        for strategy in ("introspection", "auto", "both"):
            client = make_app(intro_config(issuer, STRATEGY=strategy)).test_client()
            assert_401(client.get("/protected", headers=auth_header(unsecured)))
            assert hits(issuer) == 0, strategy
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    client = make_app(intro_config(issuer)).test_client()
    for token in (issuer.mint_opaque(), issuer.mint()):  # what is no unsecured JWT is asked
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    not_json = f"{_segment(b'not json')}.{_segment(claims)}."
    assert_401(client.get("/protected", headers=auth_header(not_json)))
    assert hits(issuer) == 3


@pytest.mark.parametrize(
    ("status", "sent", "expected"),
    [
        (429, "120", 120),
        (503, "45", 45),
        (429, "86400", 300),  # capped: a day would park every client
        (429, "soon", 5),  # not a delay: our own
        (429, "1", 5),  # never shorter than our own
        (429, "0000300", 300),  # leading zeros are allowed (RFC 9110 §5.6.1 delay-seconds)
        (500, "120", 5),  # only 429 and 503 say when to come back
    ],
)
def test_the_endpoints_retry_after_is_passed_on(
    issuer: TokenIssuer, status: int, sent: str, expected: int
) -> None:
    """A rate-limited (429) or unavailable (503) endpoint says when to come
    back; the 503 our clients get said 5 s whatever it asked."""
    server_of(issuer).route(INTROSPECT, Reply(status, {"error": "x"}, {"Retry-After": sent}))
    app = make_app(intro_config(issuer))
    response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert_503(response)
    assert response.headers["Retry-After"] == str(expected)


def test_an_open_circuit_waits_as_long_as_the_endpoint_asked(issuer: TokenIssuer) -> None:
    """Once 429s opened the endpoint's circuit, the 503 said the breaker's
    own reset (30 s) and the trial call went out then, before the 120 s the
    endpoint asked for."""
    server_of(issuer).route(INTROSPECT, Reply(429, {"error": "x"}, {"Retry-After": "120"}))
    clock = FakeClock()
    app = make_app(intro_config(issuer, CIRCUIT_BREAKER_RESET=30), clock=clock)
    client = app.test_client()
    for _ in range(8):  # past CIRCUIT_BREAKER_FAILURES (5): the circuit opens
        response = client.get("/protected", headers=auth_header(issuer.mint_opaque()))
        assert_503(response)
        assert int(response.headers["Retry-After"]) in (120, 121)  # the breaker rounds up
    calls = hits(issuer)
    clock.advance(60)  # past the breaker's reset, not the endpoint's wait
    assert_503(client.get("/protected", headers=auth_header(issuer.mint_opaque())))
    assert hits(issuer) == calls, "no trial call before the endpoint's 120 s"


def test_an_http_date_retry_after_is_passed_on_as_seconds(issuer: TokenIssuer) -> None:
    when = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=90), usegmt=True
    )
    server_of(issuer).route(INTROSPECT, Reply(429, {"error": "x"}, {"Retry-After": when}))
    app = make_app(intro_config(issuer))
    response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert_503(response)
    assert 80 <= int(response.headers["Retry-After"]) <= 91


def test_wrong_credentials_are_a_503_that_names_the_settings(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(intro_config(issuer, INTROSPECTION_CLIENT_SECRET="wrong"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert_503(response)
    assert "INTROSPECTION_CLIENT_SECRET" in caplog.text or "_CLIENT_SECRET" in caplog.text
    assert hits(issuer) == 1


def test_an_oauth_error_answered_with_200_is_a_503_not_an_inactive_token(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    # No "active", an RFC 6749 §5.2 "error": the endpoint refused our
    # request (a gateway that answers everything with 200), not the token.
    server_of(issuer).route(
        INTROSPECT, lambda _r: Reply(200, {"error": "invalid_client", "error_description": "x"})
    )
    app = make_app(intro_config(issuer))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert_503(app.test_client().get("/protected", headers=auth_header("some-token")))
    assert "request_rejected" in caplog.text and "'invalid_client'" in caplog.text


def test_wrong_body_format_is_a_503(issuer: TokenIssuer) -> None:
    issuer.introspection_body = "json"  # a SuperTokens-like endpoint
    app = make_app(intro_config(issuer))  # sends a form
    assert_503(app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque())))


def test_timeout_gives_503(issuer: TokenIssuer, caplog: pytest.LogCaptureFixture) -> None:
    server = server_of(issuer)
    server.hold(INTROSPECT)
    app = make_app(intro_config(issuer, HTTP_TIMEOUT=0.3))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    server.release(INTROSPECT)
    assert_503(response)
    assert "(timeout)" in caplog.text


def test_refused_port_gives_503(issuer: TokenIssuer, caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/introspect"
    app = make_app(intro_config(issuer, INTROSPECTION_ENDPOINT=endpoint))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert_503(response)
    assert "(unreachable)" in caplog.text


@pytest.fixture
def closing_server() -> Iterator[str]:
    """A real listener on 127.0.0.1 that closes every connection unanswered."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _address = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/introspect"
    stop.set()
    # wake the blocking accept() so the thread sees the stop flag
    socket.create_connection(listener.getsockname(), timeout=5).close()
    thread.join(timeout=5)
    listener.close()


def test_connection_closed_without_answer_gives_503(
    issuer: TokenIssuer, closing_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(intro_config(issuer, INTROSPECTION_ENDPOINT=closing_server))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = app.test_client().get("/protected", headers=auth_header(issuer.mint_opaque()))
    assert_503(response)
    assert "(unreachable)" in caplog.text


def test_circuit_breaker_is_shared_with_the_fetch_policy(issuer: TokenIssuer) -> None:
    server_of(issuer).route(INTROSPECT, Reply(500, {"error": "down"}))
    config = intro_config(issuer, CIRCUIT_BREAKER_FAILURES=2, CIRCUIT_BREAKER_RESET=60)
    client = make_app(config).test_client()
    for _ in range(4):
        assert_503(client.get("/protected", headers=auth_header(issuer.mint_opaque())))
    assert hits(issuer) == 2  # the open circuit answers the rest at once


def test_recovers_after_an_outage_and_never_caches_failures(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    config = intro_config(issuer, INTROSPECTION_CACHE_TTL=60, INTROSPECTION_NEGATIVE_CACHE_TTL=60)
    client = make_app(config, clock=clock).test_client()
    token = issuer.mint_opaque()
    server_of(issuer).route(INTROSPECT, Reply(502, "down"))
    assert_503(client.get("/protected", headers=auth_header(token)))
    server_of(issuer).route(INTROSPECT, issuer._introspection_handler)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200


def test_missing_endpoint_and_missing_credentials_are_503(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    metadata = {k: v for k, v in issuer.metadata().items() if k != "introspection_endpoint"}
    server_of(issuer).route("/.well-known/openid-configuration", Reply(200, metadata))
    no_endpoint = make_app(intro_config(issuer))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert_503(no_endpoint.test_client().get("/protected", headers=auth_header("a-token")))
    assert "OAUTH_VERIFY_INTROSPECTION_ENDPOINT" in caplog.text
    caplog.clear()
    # Per-route introspection on an app whose own strategy needs no credentials.
    no_credentials = make_app(
        issuer.config(INTROSPECTION_ENDPOINT=f"{server_of(issuer).url}{INTROSPECT}"), name="x"
    )
    add_strategy_views(no_credentials)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = no_credentials.test_client().get("/introspected", headers=auth_header("tok"))
    assert_503(response)
    assert "INTROSPECTION_CLIENT_ID" in caplog.text
    assert hits(issuer) == 0


def test_oversized_token_is_refused_without_a_call(issuer: TokenIssuer) -> None:
    app = make_app(intro_config(issuer, MAX_TOKEN_BYTES=64))
    assert_401(app.test_client().get("/protected", headers=auth_header("a" * 65)))
    assert hits(issuer) == 0


# -- single flight ---------------------------------------------------------------


class Gate:
    """Holds introspection answers until opened (no sleeping in the test)."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.opened = threading.Event()
        self.issuer = issuer

    def __call__(self, request: Request) -> Reply:
        self.opened.wait(timeout=30)
        return self.issuer._introspection_handler(request)


class Coalesced:
    """Counts requests that joined another request's introspection call."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def __call__(self, event: str, _record: Mapping[str, Any]) -> None:
        if event == "introspection_coalesced":
            with self.cond:
                self.count += 1
                self.cond.notify_all()

    def watch(self, introspector: Introspector) -> None:
        """Hear the introspector's events (and pass them on)."""
        forward = introspector.on_event

        def hook(event: str, fields: Mapping[str, Any]) -> None:
            self(event, fields)
            if forward is not None:
                forward(event, fields)

        introspector.on_event = hook

    def wait_for(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.count >= count, timeout=10)


def run_concurrently(app: Flask, tokens: list[str]) -> tuple[list[threading.Thread], list[Any]]:
    """Threads (not started) that each GET /protected with one token."""
    results: list[Any] = [None] * len(tokens)

    def call(index: int, token: str) -> None:
        client: FlaskClient = app.test_client()
        response = client.get("/protected", headers=auth_header(token))
        results[index] = (response.status_code, response.json)

    threads = [
        threading.Thread(target=call, args=(i, token), daemon=True)
        for i, token in enumerate(tokens)
    ]
    return threads, results


def one_flight(app: Flask, server: IssuerServer, gate: Gate, token: str, count: int) -> list[Any]:
    """``count`` concurrent requests with ``token``: the first reaches the held
    endpoint, the others join its call, then the gate opens; their results."""
    coalesced = Coalesced()
    coalesced.watch(get_state(app).introspector)
    threads, results = run_concurrently(app, [token] * count)
    threads[0].start()
    assert server.wait_for_hits(INTROSPECT, 1)
    for thread in threads[1:]:
        thread.start()
    assert coalesced.wait_for(count - 1), "followers joined the leader's call"
    gate.opened.set()
    for thread in threads:
        thread.join(timeout=30)
    assert server.hits[INTROSPECT] == 1
    return results


@pytest.mark.parametrize("answer", ["active", "down"])
def test_concurrent_requests_for_one_token_make_one_call(issuer: TokenIssuer, answer: str) -> None:
    gate = Gate(issuer)
    server = server_of(issuer)
    if answer == "down":
        server.route(INTROSPECT, lambda r: (gate.opened.wait(30), Reply(500, "down"))[1])
    else:
        server.route(INTROSPECT, gate)
    app = make_app(intro_config(issuer))
    results = one_flight(app, server, gate, issuer.mint_opaque(subject="user_c"), 6)
    if answer == "active":
        assert results == [(200, results[0][1])] * 6
        assert results[0][1]["subject"] == "user_c"
    else:
        assert [status for status, _body in results] == [503] * 6


def test_concurrent_requests_for_different_tokens_stay_apart(issuer: TokenIssuer) -> None:
    gate = Gate(issuer)
    server = server_of(issuer)
    server.route(INTROSPECT, gate)
    app = make_app(intro_config(issuer))
    live = issuer.mint_opaque(subject="user_live", organization_id="org_live")
    revoked = issuer.mint_opaque(subject="user_gone")
    issuer.revoke(revoked)
    threads, results = run_concurrently(app, [live, revoked])
    for thread in threads:
        thread.start()
    assert server.wait_for_hits(INTROSPECT, 2)
    gate.opened.set()
    for thread in threads:
        thread.join(timeout=30)
    assert results[0][0] == 200
    assert results[0][1]["subject"] == "user_live"
    assert results[1][0] == 401


def test_a_worker_reusing_a_shared_answer_keeps_its_original_deadline(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    """Worker B adopts worker A's cached answer only until A's deadline.

    Each process keeps a copy of cached answers (so a hit skips the shared
    backend); the copy must never extend the revocation latency beyond
    ``INTROSPECTION_CACHE_TTL`` counted from the call that produced it.
    """

    def worker(name: str) -> Flask:
        return _redis_app(name, intro_config(issuer, INTROSPECTION_CACHE_TTL=60), redis_url, clock)

    first, second = worker("worker_a").test_client(), worker("worker_b").test_client()
    token = issuer.mint_opaque()
    assert first.get("/protected", headers=auth_header(token)).status_code == 200
    issuer.revoke(token)
    clock.advance(40)
    # B has never seen the token: it adopts A's answer from Redis, no call.
    assert second.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1
    clock.advance(19)
    assert second.get("/protected", headers=auth_header(token)).status_code == 200
    clock.advance(1)  # 60 s after A's call: both copies are over
    assert_401(second.get("/protected", headers=auth_header(token)))
    assert_401(first.get("/protected", headers=auth_header(token)))


def _redis_app(
    name: str, config: dict[str, Any], redis_url: str, clock: FakeClock | None = None
) -> Flask:
    """One API (or worker) with its own app, sharing the Redis at ``redis_url``."""
    app = Flask(name)
    app.config.update(
        TESTING=True,
        CACHE_TYPE="RedisCache",
        CACHE_REDIS_URL=redis_url,
        CACHE_OPTIONS={"socket_timeout": 1, "socket_connect_timeout": 1},
        **config,
    )
    OAuthVerify().init_app(app, cache=Cache(app), clock=clock)
    add_views(app)
    return app


def _without_iss_and_aud(tokens: TokenIssuer) -> None:
    """Answer like VoxKey's documented response: no ``iss``, no ``aud``."""

    def answer(request: Request) -> Reply:
        body = tokens.introspect(request.form()["token"])
        body.pop("iss", None)
        body.pop("aud", None)
        return Reply(200, body)

    server_of(tokens).route(INTROSPECT, answer)


def test_apis_of_other_servers_sharing_redis_never_reuse_each_others_answers(
    redis_url: str,
) -> None:
    # Two APIs, each trusting its own authorization server, one Redis. An
    # answer without "iss" (optional, RFC 7662 §2.2) cached by API A must
    # not let A's token into API B, whose server has never heard of it.
    servers = [IssuerServer(), IssuerServer()]
    try:
        a_tokens, b_tokens = TokenIssuer(alg="ES256"), TokenIssuer(alg="ES256")
        for tokens, server in zip((a_tokens, b_tokens), servers, strict=True):
            tokens.serve(server)
            _without_iss_and_aud(tokens)
        api_a = _redis_app("api_a", intro_config(a_tokens, INTROSPECTION_CACHE_TTL=60), redis_url)
        api_b = _redis_app("api_b", intro_config(b_tokens, INTROSPECTION_CACHE_TTL=60), redis_url)
        token = a_tokens.mint_opaque(subject="alice_of_a", scopes=["read:users"])
        assert api_a.test_client().get("/protected", headers=auth_header(token)).status_code == 200
        assert_401(api_b.test_client().get("/protected", headers=auth_header(token)))
        assert (hits(a_tokens), hits(b_tokens)) == (1, 1), "B asked its own server"
    finally:
        for server in servers:
            server.close()


def test_apis_asking_as_other_clients_keep_their_answers_apart(
    issuer: TokenIssuer, redis_url: str
) -> None:
    # A server may answer per calling client (RFC 7662 §4: it may refuse to
    # reveal a token to a client it was not issued for): an answer obtained
    # as one client is not reused for an API that authenticates as another.
    issuer.introspection_auth = "none"  # the endpoint answers both clients
    first = _redis_app("client_1", intro_config(issuer, INTROSPECTION_CACHE_TTL=60), redis_url)
    issuer.introspection_credentials = ("other-resource-server", "other-secret")
    second = _redis_app("client_2", intro_config(issuer, INTROSPECTION_CACHE_TTL=60), redis_url)
    token = issuer.mint_opaque()
    for client in (first.test_client(), second.test_client()):
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 2
    # ... while the same API's second worker shares the first one's answer.
    again = _redis_app(
        "client_2_worker", intro_config(issuer, INTROSPECTION_CACHE_TTL=60), redis_url
    )
    assert again.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 2


def test_apis_asking_with_other_bearer_credentials_keep_their_answers_apart(
    issuer: TokenIssuer, redis_url: str
) -> None:
    # With INTROSPECTION_AUTH = "bearer" the credential names the client
    # (INTROSPECTION_CLIENT_ID is usually unset): an answer obtained with one
    # credential is not reused for an API that presents another.
    issuer.introspection_auth = "bearer"

    def api(name: str, credential: str) -> Flask:
        config = intro_config(
            issuer,
            INTROSPECTION_AUTH="bearer",
            INTROSPECTION_TOKEN=credential,
            INTROSPECTION_CLIENT_ID=None,
            INTROSPECTION_CLIENT_SECRET=None,
            INTROSPECTION_CACHE_TTL=60,
        )
        return _redis_app(name, config, redis_url)

    issuer.introspection_bearer = "credential-of-a"
    api_a = api("bearer_a", "credential-of-a")
    api_b = api("bearer_b", "credential-of-b")  # the endpoint does not accept it
    token = issuer.mint_opaque()
    assert api_a.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    assert api_b.test_client().get("/protected", headers=auth_header(token)).status_code == 503
    assert hits(issuer) == 2, "B asked with its own credential"
    same = api("bearer_a_worker", "credential-of-a")  # A's second worker shares A's answer
    assert same.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 2


@pytest.mark.parametrize("exp", [10**400, -(10**400)], ids=["10**400", "-10**400"])
def test_an_exp_beyond_the_float_range_is_refused_not_an_internal_error(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, exp: int
) -> None:
    scripted(issuer, _set("exp", exp))
    app = make_app(intro_config(issuer, INTROSPECTION_CACHE_TTL=60))
    with caplog.at_level(logging.ERROR):
        assert_401(app.test_client().get("/protected", headers=auth_header("some-token")))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_an_answer_cached_by_an_api_with_a_longer_ttl_is_reused_only_for_our_ttl(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    # Reports (TTL 300) and payments (TTL 5) ask the same endpoint as the
    # same client and share a Redis: payments' documented revocation latency
    # is its own TTL, whoever cached the answer.
    def api(name: str, ttl: int) -> Flask:
        config = intro_config(
            issuer, INTROSPECTION_CACHE_TTL=ttl, INTROSPECTION_NEGATIVE_CACHE_TTL=ttl
        )
        return _redis_app(name, config, redis_url, clock)

    reports, payments = api("reports", 300).test_client(), api("payments", 5).test_client()
    token = issuer.mint_opaque(expires_in=3600, now=clock.now)
    assert reports.get("/protected", headers=auth_header(token)).status_code == 200
    assert payments.get("/protected", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1, "within both TTLs the shared answer serves both"
    issuer.revoke(token)
    clock.advance(5)
    assert_401(payments.get("/protected", headers=auth_header(token)))
    assert hits(issuer) == 2
    # An inactive answer cached for 300 s holds for payments' 5 s only, too.
    unknown = "unknown-token"
    assert_401(reports.get("/protected", headers=auth_header(unknown)))
    issuer.opaque[unknown] = issuer.claims(expires_in=3600, now=clock.now)
    clock.advance(5)
    assert payments.get("/protected", headers=auth_header(unknown)).status_code == 200
