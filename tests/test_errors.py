"""Errors: JSON bodies, RFC 6750 challenges, overridable per class."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Blueprint, Flask, g

from flask_oauth_verify import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    MissingTokenError,
    OAuthVerify,
    TokenExpired,
    UpstreamError,
    require_token,
)
from flask_oauth_verify.errors import OAuthVerifyError
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app


@pytest.mark.parametrize(
    ("error", "status", "code", "challenge_error"),
    [
        (MissingTokenError(), 401, "unauthorized", None),
        (InvalidRequestError(), 400, "invalid_request", "invalid_request"),
        (InvalidTokenError(), 401, "invalid_token", "invalid_token"),
        (TokenExpired(), 401, "token_expired", "invalid_token"),
        (
            InsufficientScopeError(scopes=["a", "b"]),
            403,
            "insufficient_scope",
            "insufficient_scope",
        ),
        (UpstreamError(retry_after=7), 503, "temporarily_unavailable", "temporarily_unavailable"),
    ],
)
def test_each_error_has_status_body_and_challenge(
    error: OAuthVerifyError, status: int, code: str, challenge_error: str | None
) -> None:
    assert error.status_code == status
    body = json.loads(error.get_body())
    assert body["error"] == code and body["message"]
    challenge = error.challenge("api")
    assert challenge.startswith('Bearer realm="api"')
    if challenge_error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{challenge_error}"' in challenge


def test_scope_is_named_in_the_403_challenge() -> None:
    assert (
        'scope="read:users write:users"'
        in InsufficientScopeError(scopes=["read:users", "write:users"]).challenge()
    )


def test_retry_after_on_503() -> None:
    headers = dict(UpstreamError(retry_after=12).get_headers())
    assert headers["Retry-After"] == "12"


def test_quoted_string_escaping_cannot_break_the_header() -> None:
    error = InvalidTokenError('bad "token" \\ with\r\nnewline')
    challenge = error.challenge('re"alm')
    assert "\r" not in challenge and "\n" not in challenge
    assert 'realm="re\\"alm"' in challenge
    # RFC 6750 §3: error_description never holds '"' or '\\' at all.
    assert "error_description=\"bad 'token' / with  newline\"" in challenge


def test_internal_reason_is_not_sent(client: object, tokens: TokenIssuer) -> None:
    app = make_app(tokens.config())
    response = app.test_client().get(
        "/protected", headers=auth_header(tokens.mint(expires_in=-3600))
    )
    assert response.status_code == 401
    assert "exp is in the past" not in response.get_data(as_text=True)


def test_app_overrides_one_case_with_errorhandler(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config())

    @app.errorhandler(TokenExpired)
    def expired(error: TokenExpired) -> tuple[dict[str, str], int]:
        return {"custom": "expired"}, 401

    client = app.test_client()
    expired_response = client.get("/protected", headers=auth_header(tokens.mint(expires_in=-600)))
    assert expired_response.json == {"custom": "expired"}
    other = client.get("/protected", headers=auth_header("abc.def.ghi"))
    assert other.json is not None and other.json["error"] == "invalid_token"


def test_realm_comes_from_settings(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(REALM="billing"))
    response = app.test_client().get("/protected")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="billing"'


def test_a_custom_handlers_challenge_names_the_apps_realm(tokens: TokenIssuer) -> None:
    """``error.challenge()`` without an argument, in a handler of the app's own."""
    app = make_app(tokens.config(REALM="billing"))

    @app.errorhandler(TokenExpired)
    def expired(error: TokenExpired) -> Any:
        return {"custom": "expired"}, 401, {"WWW-Authenticate": error.challenge()}

    response = app.test_client().get(
        "/protected", headers=auth_header(tokens.mint(expires_in=-600))
    )
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="billing", ')
    assert TokenExpired().challenge() == TokenExpired().challenge("api")  # outside any app


def test_errors_are_httpexceptions_handled_without_the_extension() -> None:
    app = Flask(__name__)

    @app.get("/")
    def view() -> str:
        raise InvalidTokenError()

    response = app.test_client().get("/")
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")


def _refusals(app: Flask, tokens: TokenIssuer) -> dict[int, object]:
    """One refusal of each status the tree answers with: 400, 401, 403, 503."""
    from flask_oauth_verify import require_scope

    @app.get("/admin")
    @require_scope("admin")
    def admin() -> str:
        return "ok"

    client = app.test_client()
    return {
        400: client.get("/protected", headers={"Authorization": "Bearer "}),
        401: client.get("/protected"),
        403: client.get("/admin", headers=auth_header(tokens.mint(scopes=["read:users"]))),
    }


@pytest.mark.parametrize("generic", [Exception, 500, "HTTPException"])
def test_every_status_of_the_tree_gets_the_librarys_response(
    tokens: TokenIssuer, generic: object
) -> None:
    """An app's generic handler must not take over 400/403/503 refusals: the
    handler was filed under the base class's 401 alone, so a 403 reached
    ``@app.errorhandler(Exception)`` and came back as a 500."""
    from werkzeug.exceptions import HTTPException

    app = make_app(tokens.config(REALM="my-realm"))
    key = HTTPException if generic == "HTTPException" else generic

    @app.errorhandler(key)  # type: ignore[arg-type]
    def boom(_error: Exception) -> tuple[str, int]:
        return "generic handler", 500

    for status, response in _refusals(app, tokens).items():
        assert response.status_code == status  # type: ignore[attr-defined]
        assert response.is_json  # type: ignore[attr-defined]
        challenge = response.headers["WWW-Authenticate"]  # type: ignore[attr-defined]
        assert 'realm="my-realm"' in challenge


def test_a_503_gets_the_librarys_response_under_a_generic_handler(
    served_tokens: TokenIssuer,
) -> None:
    issuer = served_tokens
    app = make_app(issuer.config(JWKS_URI="http://127.0.0.1:9/jwks", REALM="my-realm"))

    @app.errorhandler(Exception)
    def boom(_error: Exception) -> tuple[str, int]:
        return "generic handler", 500

    response = app.test_client().get("/protected", headers=auth_header(issuer.mint()))
    assert response.status_code == 503 and response.is_json
    assert "Retry-After" in response.headers
    assert 'realm="my-realm"' in response.headers["WWW-Authenticate"]


def test_a_subclass_defined_after_init_app_keeps_the_librarys_response(
    tokens: TokenIssuer,
) -> None:
    """A refusal class with a status of its own, defined after ``init_app``
    (raised by a claims check, as the docs allow), reached the app's generic
    ``Exception`` handler: the handler was filed only under the statuses of
    the classes that existed at ``init_app``."""
    app = Flask(__name__)
    app.config.update(tokens.config())
    oauth = OAuthVerify(app)

    class AccountLocked(OAuthVerifyError):
        code = 423
        error = "account_locked"
        default_description = "The account is locked."

    @oauth.claims_check
    def not_locked(claims: Any) -> bool:
        if claims.get("locked"):
            raise AccountLocked(reason="locked by an administrator")
        return True

    @app.errorhandler(Exception)
    def boom(_error: Exception) -> tuple[str, int]:
        return "generic handler", 500

    @app.get("/me")
    @require_token
    def me() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    # a blueprint's own catch-all is looked at before the app's
    api = Blueprint("api", __name__, url_prefix="/api")
    api.register_error_handler(Exception, boom)
    api.add_url_rule("/me", view_func=require_token(lambda: {"subject": g.auth.subject}))
    app.register_blueprint(api)

    client = app.test_client()
    locked = client.get("/api/me", headers=auth_header(tokens.mint(locked=True)))
    assert (locked.status_code, locked.is_json) == (423, True), locked.text
    response = client.get("/me", headers=auth_header(tokens.mint(locked=True)))
    assert response.status_code == 423
    assert response.json == {"error": "account_locked", "message": "The account is locked."}
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="api"')
    assert client.get("/me", headers=auth_header(tokens.mint())).status_code == 200
