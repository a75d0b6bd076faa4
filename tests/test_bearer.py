"""Bearer token extraction (RFC 6750 §2, RFC 7235)."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_oauth_verify.testing import TokenIssuer

from .conftest import make_app


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(client: object, tokens: TokenIssuer, scheme: str) -> None:
    app = make_app(tokens.config())
    response = app.test_client().get(
        "/protected", headers={"Authorization": f"{scheme} {tokens.mint()}"}
    )
    assert response.status_code == 200


def test_no_header_is_401_without_error_attribute(client: object, app: Flask) -> None:
    response = app.test_client().get("/protected")
    assert response.status_code == 401
    assert response.json == {
        "error": "unauthorized",
        "message": "A bearer access token is required.",
    }
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Digest x", "Token abc"])
def test_other_schemes_count_as_no_bearer_token(app: Flask, value: str) -> None:
    response = app.test_client().get("/protected", headers={"Authorization": value})
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "unauthorized"


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer    ", "Bearer a b", "Bearer a\tb"])
def test_malformed_header_is_400_invalid_request(app: Flask, value: str) -> None:
    response = app.test_client().get("/protected", headers={"Authorization": value})
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


def test_token_sent_two_ways_is_400(app: Flask, tokens: TokenIssuer) -> None:
    token = tokens.mint()
    client = app.test_client()
    both = client.get(
        f"/protected?access_token={token}", headers={"Authorization": f"Bearer {token}"}
    )
    assert both.status_code == 400
    form = client.get(
        "/protected",
        headers={"Authorization": f"Bearer {token}"},
        data={"access_token": token},
        content_type="application/x-www-form-urlencoded",
    )
    assert form.status_code == 400


def test_two_authorization_headers_are_400(app: Flask, tokens: TokenIssuer) -> None:
    token = tokens.mint()
    response = app.test_client().get(
        "/protected",
        headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")],
    )
    assert response.status_code == 400


def test_query_token_is_ignored_unless_enabled(tokens: TokenIssuer) -> None:
    token = tokens.mint()
    default = make_app(tokens.config())
    assert default.test_client().get(f"/protected?access_token={token}").status_code == 401
    enabled = make_app(tokens.config(TOKEN_LOCATIONS=["header", "query"]), name="q")
    assert enabled.test_client().get(f"/protected?access_token={token}").status_code == 200


def test_form_token_when_enabled(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(TOKEN_LOCATIONS=["form"]))

    @app.post("/submit")
    def submit() -> str:
        from flask_oauth_verify import verify_request

        context = verify_request()
        return context.subject or "" if context else ""

    response = app.test_client().post("/submit", data={"access_token": tokens.mint()})
    assert response.status_code == 200 and response.text == "user_1"


@pytest.mark.parametrize("token", ["abc$def", "tök.en.x", "a,b.c.d", "<script>"])
def test_characters_outside_b64token_are_invalid_token(app: Flask, token: str) -> None:
    response = app.test_client().get(
        "/protected", headers={"Authorization": f"Bearer {token}".encode().decode("latin-1")}
    )
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
