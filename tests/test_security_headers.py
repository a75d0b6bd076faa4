"""Security headers (opt-in): on protected responses and on every refusal."""

from __future__ import annotations

from flask import Flask, Response
from werkzeug.test import TestResponse

from flask_oauth_verify import TokenExpired, require_scope, require_token
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import FakeClock, make_app

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def assert_secured(response: TestResponse) -> None:
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code)


def build(tokens: TokenIssuer, clock: FakeClock, *, on: bool = True) -> Flask:
    app = make_app(tokens.config(SECURITY_HEADERS=on), clock=clock)

    @app.get("/public")
    def public() -> str:
        return "hello"

    @app.get("/cacheable")
    @require_token
    def cacheable() -> Response:
        response = Response("data")
        response.headers["Cache-Control"] = "public, max-age=600"
        return response

    @app.get("/optional")
    @require_token(optional=True)
    def optional() -> str:
        return "maybe"

    @app.get("/async")
    @require_scope("read:users")
    async def async_view() -> str:
        return "async"

    return app


def test_protected_responses_carry_the_headers(tokens: TokenIssuer, clock: FakeClock) -> None:
    client = build(tokens, clock).test_client()
    token = tokens.mint(now=clock(), scopes=["read:users"])
    for path in ("/protected", "/cacheable", "/async"):
        response = client.get(path, headers=auth_header(token))
        assert response.status_code == 200
        assert_secured(response)  # a view's own "public" caching is overridden
    optional = client.get("/optional")
    assert optional.status_code == 200
    assert_secured(optional)


def test_every_kind_of_refusal_carries_the_headers(tokens: TokenIssuer, clock: FakeClock) -> None:
    client = build(tokens, clock).test_client()
    expired = tokens.mint(now=clock() - 7200, expires_in=60)
    cases = [
        ({}, "/protected", 401),
        ({"Authorization": "Bearer "}, "/protected", 400),
        (auth_header(expired), "/protected", 401),
        (auth_header("garbage"), "/protected", 401),
        (auth_header(tokens.mint(now=clock())), "/read", 403),
    ]
    for headers, path, status in cases:
        response = client.get(path, headers=headers)
        assert response.status_code == status
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        assert_secured(response)


def test_unprotected_routes_are_left_alone(tokens: TokenIssuer, clock: FakeClock) -> None:
    response = build(tokens, clock).test_client().get("/public")
    assert response.status_code == 200
    assert "X-Frame-Options" not in response.headers
    assert "X-Content-Type-Options" not in response.headers
    assert "Cache-Control" not in response.headers


def test_off_by_default(tokens: TokenIssuer, clock: FakeClock) -> None:
    client = build(tokens, clock, on=False).test_client()
    ok = client.get("/cacheable", headers=auth_header(tokens.mint(now=clock())))
    assert ok.headers["Cache-Control"] == "public, max-age=600"
    assert "X-Frame-Options" not in ok.headers
    refused = client.get("/protected")
    assert "X-Frame-Options" not in refused.headers
    assert "X-Content-Type-Options" not in refused.headers


def test_an_apps_own_error_handler_still_gets_the_headers(
    tokens: TokenIssuer, clock: FakeClock
) -> None:
    app = build(tokens, clock)

    @app.errorhandler(TokenExpired)
    def expired(error: TokenExpired) -> tuple[dict[str, str], int]:
        return {"error": "token_expired", "message": "Log in again."}, 401

    expired_token = tokens.mint(now=clock() - 7200, expires_in=60)
    response = app.test_client().get("/protected", headers=auth_header(expired_token))
    assert response.status_code == 401
    assert response.get_json() == {"error": "token_expired", "message": "Log in again."}
    assert_secured(response)


def test_a_views_explicit_frame_policy_is_kept(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = build(tokens, clock)

    @app.get("/embeddable")
    @require_token
    def embeddable() -> Response:
        response = Response("widget")
        response.headers["X-Frame-Options"] = "SAMEORIGIN"
        return response

    token = tokens.mint(now=clock())
    response = app.test_client().get("/embeddable", headers=auth_header(token))
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
