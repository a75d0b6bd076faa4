"""The "after" examples of docs/migrating.rst, run against a local issuer.

Each test reads a code block of the page (marked ``# after: <name>``) and
checks what the page says about it, so the page cannot drift from the
library's behaviour.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Blueprint, Flask, g
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from flask_oauth_verify import ConfigurationError, OAuthVerify, require_token
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer

PAGE = Path(__file__).parents[1] / "docs" / "migrating.rst"
AUDIENCE = "https://api.example.test"
ALL = ["items:read", "items:write", "admin", "bp:read"]


def page_block(name: str) -> dict[str, Any]:
    """Execute the page's Python block marked ``# after: <name>``; its namespace."""
    text = PAGE.read_text()
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:[ ]+.*\n|\n)+)", text):
        code = textwrap.dedent(match.group(1))
        if code.lstrip().startswith(f"# after: {name}\n"):
            namespace: dict[str, Any] = {"__name__": f"migrating_{name}"}
            exec(code, namespace)  # noqa: S102 (our own docs)
            return namespace
    raise AssertionError(f"no block '# after: {name}' in {PAGE}")


@pytest.fixture
def issuer(issuer_server: IssuerServer) -> TokenIssuer:
    made = TokenIssuer(audience=AUDIENCE)
    made.serve(issuer_server)
    return made


def call(app: Flask, path: str, header: str | None, method: str = "GET") -> Any:
    headers = {"Authorization": header} if header is not None else {}
    return app.test_client().open(path, method=method, headers=headers)


def bearer(token: str) -> str:
    return f"Bearer {token}"


# -- what changes whatever you leave -------------------------------------------


def plain_app(issuer: TokenIssuer, **settings: Any) -> Flask:
    app = Flask("plain")
    app.config.update(issuer.config(audience=AUDIENCE, **settings))
    OAuthVerify(app)

    @app.get("/p")
    @require_token
    def p() -> dict[str, Any]:
        try:
            g.auth.claims["x"] = 1
        except TypeError:
            return {"read_only": True, "sub": g.auth.subject}
        return {"read_only": False}

    return app


def test_default_leeway_is_30_seconds_and_capped(issuer: TokenIssuer) -> None:
    app = plain_app(issuer)
    assert call(app, "/p", bearer(issuer.mint(expires_in=-20))).status_code == 200
    assert call(app, "/p", bearer(issuer.mint(expires_in=-40))).status_code == 401
    with pytest.raises(ConfigurationError):
        plain_app(issuer, LEEWAY=301)


def test_hmac_algorithms_refused_at_start(issuer: TokenIssuer) -> None:
    with pytest.raises(ConfigurationError):
        plain_app(issuer, ALGORITHMS=["HS256"])


def test_stricter_checks_by_default(issuer: TokenIssuer) -> None:
    app = plain_app(issuer)
    assert call(app, "/p", bearer(issuer.mint(typ="JWT"))).status_code == 200
    for token in (
        issuer.mint(typ="JWT", at_hash="x"),  # an ID token
        issuer.mint(cnf={"jkt": "x"}),  # sender-constrained
        issuer.mint(typ="dpop+jwt"),
        issuer.mint(audience=None, aud=None),
    ):
        response = call(app, "/p", bearer(token))
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_token"


def test_sub_not_required_by_default_and_claims_read_only(issuer: TokenIssuer) -> None:
    response = call(plain_app(issuer), "/p", bearer(issuer.mint(subject=None)))
    assert response.status_code == 200
    assert response.get_json() == {"read_only": True, "sub": None}


def test_kid_rules(issuer: TokenIssuer) -> None:
    app = plain_app(issuer, JWKS_REFRESH_COOLDOWN=30)
    assert call(app, "/p", bearer(issuer.mint())).status_code == 200
    issuer.rotate()  # published: one forced refetch
    assert call(app, "/p", bearer(issuer.mint())).status_code == 200
    issuer.rotate()  # published too, but inside the cooldown
    assert call(app, "/p", bearer(issuer.mint())).status_code == 401


# -- custom error responses ----------------------------------------------------


def test_custom_error_block_keeps_headers(issuer: TokenIssuer, issuer_server: IssuerServer) -> None:
    ns = page_block("authlib")
    app = ns["create_app"](issuer.issuer, AUDIENCE, "rs-secret")
    page_block_into(app, "errors")
    response = call(app, "/items", bearer(issuer.mint(scopes=["x"])))
    assert response.status_code == 403
    assert response.get_json() == {
        "error": "insufficient_scope",
        "error_description": "The access token lacks a required scope.",
    }
    assert 'scope="items:read"' in response.headers["WWW-Authenticate"]
    assert response.headers["Cache-Control"] == "no-store"
    assert call(app, "/items", "Bearer").status_code == 400
    issuer_server.route("/introspect", Reply(503, {"error": "down"}))
    down = call(app, "/introspected", bearer("opaque-" + "x" * 30))
    assert down.status_code == 503
    assert down.get_json()["error"] == "temporarily_unavailable"
    assert down.headers["Retry-After"]


def page_block_into(app: Flask, name: str) -> None:
    text = PAGE.read_text()
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:[ ]+.*\n|\n)+)", text):
        code = textwrap.dedent(match.group(1))
        if code.lstrip().startswith(f"# after: {name}\n"):
            exec(code, {"app": app})  # noqa: S102 (our own docs)
            return
    raise AssertionError(name)


# -- Authlib --------------------------------------------------------------------


@pytest.fixture
def authlib_app(issuer: TokenIssuer) -> Flask:
    app: Flask = page_block("authlib")["create_app"](issuer.issuer, AUDIENCE, "rs-secret")
    return app


def test_authlib_scope_semantics(authlib_app: Flask, issuer: TokenIssuer) -> None:
    read_only = bearer(issuer.mint(scopes=["items:read"]))
    assert call(authlib_app, "/items", read_only).get_json() == {"sub": "user_1"}
    assert call(authlib_app, "/items", read_only, "POST").status_code == 403  # "a b": all
    both = bearer(issuer.mint(scopes=["items:read", "items:write"]))
    assert call(authlib_app, "/items", both, "POST").status_code == 200
    superuser = bearer(issuer.mint(scopes=["superuser"]))
    assert call(authlib_app, "/admin", superuser).status_code == 200  # ["a", "b"]: any
    denied = call(authlib_app, "/admin", read_only)
    assert denied.status_code == 403
    assert denied.headers["WWW-Authenticate"].endswith('scope="admin superuser"')


def test_authlib_errors_change(authlib_app: Flask, issuer: TokenIssuer) -> None:
    missing = call(authlib_app, "/items", None)
    assert (missing.status_code, missing.get_json()["error"]) == (401, "unauthorized")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    token = issuer.mint(scopes=ALL)
    for header in ("Bearer", f"Bearer {token} extra"):
        response = call(authlib_app, "/items", header)
        assert (response.status_code, response.get_json()["error"]) == (400, "invalid_request")
    assert call(authlib_app, "/items", f"bearer {token}").status_code == 200
    basic = "Basic dXNlcjpwYXNz"
    assert call(authlib_app, "/me-optional", basic).get_json() == {"anonymous": True}
    assert call(authlib_app, "/items", basic).status_code == 401
    expired = call(authlib_app, "/items", bearer(issuer.mint(scopes=ALL, expires_in=-3600)))
    assert (expired.status_code, expired.get_json()["error"]) == (401, "token_expired")
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    early = call(authlib_app, "/items", bearer(issuer.mint(scopes=ALL, nbf=int(time.time()) + 120)))
    assert (early.status_code, early.get_json()["error"]) == (401, "token_not_active")


def test_authlib_strictness_kept_by_the_settings(authlib_app: Flask, issuer: TokenIssuer) -> None:
    assert (
        call(authlib_app, "/items", bearer(issuer.mint(scopes=ALL, typ="JWT"))).status_code == 401
    )
    for missing in ("sub", "client_id", "jti"):
        extra: dict[str, Any] = {"subject": None} if missing == "sub" else {missing: None}
        token = issuer.mint(scopes=ALL, **extra)
        assert call(authlib_app, "/items", bearer(token)).status_code == 401, missing
    # LEEWAY = 0 as in the example
    assert (
        call(authlib_app, "/items", bearer(issuer.mint(scopes=ALL, expires_in=-5))).status_code
        == 401
    )
    # scp counts as scopes
    assert call(authlib_app, "/items", bearer(issuer.mint(scp=["items:read"]))).status_code == 200


def test_authlib_optional_and_blueprint(authlib_app: Flask, issuer: TokenIssuer) -> None:
    assert call(authlib_app, "/me-optional", None).get_json() == {"anonymous": True}
    assert call(authlib_app, "/me-optional", bearer(issuer.mint())).get_json() == {"sub": "user_1"}
    assert call(authlib_app, "/me-optional", "Bearer not-a-jwt").status_code == 401
    assert call(authlib_app, "/bp/thing", None).status_code == 401
    assert call(authlib_app, "/bp/thing", bearer(issuer.mint(scopes=["x"]))).status_code == 403
    assert (
        call(authlib_app, "/bp/thing", bearer(issuer.mint(scopes=["bp:read"]))).status_code == 200
    )


def test_authlib_introspection_checks_the_answer(authlib_app: Flask, issuer: TokenIssuer) -> None:
    good = bearer(issuer.mint_opaque(scopes=["items:read"]))
    assert call(authlib_app, "/introspected", good).get_json() == {"sub": "user_1"}
    other = bearer(issuer.mint_opaque(scopes=["items:read"], audience="https://other.test"))
    assert call(authlib_app, "/introspected", other).status_code == 401
    early = bearer(issuer.mint_opaque(scopes=["items:read"], nbf=int(time.time()) + 120))
    assert call(authlib_app, "/introspected", early).get_json()["error"] == "token_not_active"
    assert call(authlib_app, "/introspected", bearer("x" * 43)).status_code == 401


def test_authlib_mixed_and_roles(issuer: TokenIssuer) -> None:
    app = plain_app(issuer)
    page_block("authlib-mixed")["register_mixed"](app)
    for scopes, status in (
        (["reports:read", "audit"], 200),
        (["admin"], 200),
        (["reports:read"], 403),
    ):
        assert call(app, "/reports", bearer(issuer.mint(scopes=scopes))).status_code == status
    assert call(app, "/staff", bearer(issuer.mint(roles=["staff"]))).status_code == 200
    assert call(app, "/staff", bearer(issuer.mint(roles=["guest"]))).status_code == 403


# -- PyJWT ----------------------------------------------------------------------


@pytest.fixture
def pyjwt_app(issuer: TokenIssuer) -> Flask:
    app: Flask = page_block("pyjwt")["create_app"](issuer.issuer, AUDIENCE)
    return app


def test_pyjwt_body_kept_and_challenge_added(pyjwt_app: Flask, issuer: TokenIssuer) -> None:
    missing = call(pyjwt_app, "/items", None)
    assert missing.status_code == 401
    assert missing.get_json() == {
        "code": "authorization_header_missing",
        "description": "A bearer access token is required.",
    }
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert call(pyjwt_app, "/items", "Bearer").get_json()["code"] == "invalid_header"
    assert call(pyjwt_app, "/items", "Bearer").status_code == 400
    denied = call(pyjwt_app, "/items", bearer(issuer.mint(scopes=["other"])))
    assert (denied.status_code, denied.get_json()["code"]) == (403, "Unauthorized")
    expired = call(pyjwt_app, "/items", bearer(issuer.mint(scopes=ALL, expires_in=-20)))
    assert expired.get_json()["code"] == "token_expired"
    assert (
        call(pyjwt_app, "/items", bearer(issuer.mint(scopes=ALL, expires_in=-5))).status_code == 200
    )


def test_pyjwt_settings(pyjwt_app: Flask, issuer: TokenIssuer) -> None:
    assert call(pyjwt_app, "/whoami", bearer(issuer.mint(subject=None))).status_code == 401
    # CLAIM_MAP {"scopes": ["scope"]}: scp no longer counts
    assert call(pyjwt_app, "/items", bearer(issuer.mint(scp=["items:read"]))).status_code == 403
    id_token = issuer.mint(scopes=ALL, typ="JWT", at_hash="x", nonce="n")
    assert call(pyjwt_app, "/items", bearer(id_token)).status_code == 401


def test_pyjwt_jwks_down_is_503(issuer: TokenIssuer, issuer_server: IssuerServer) -> None:
    issuer_server.route("/jwks", Reply(500, {"error": "down"}))
    app = page_block("pyjwt")["create_app"](issuer.issuer, AUDIENCE)
    response = call(app, "/items", bearer(issuer.mint(scopes=ALL)))
    assert (response.status_code, response.get_json()["code"]) == (503, "temporarily_unavailable")
    assert response.headers["Retry-After"]


# -- flask-jwt-extended ------------------------------------------------------------


@pytest.fixture
def fje_app(issuer: TokenIssuer) -> Flask:
    app: Flask = page_block("fje")["create_app"](issuer.issuer, AUDIENCE)
    return app


def test_fje_statuses(fje_app: Flask, issuer: TokenIssuer) -> None:
    wrong_aud = call(fje_app, "/whoami", bearer(issuer.mint(audience="https://other.test")))
    assert wrong_aud.status_code == 401  # flask-jwt-extended: 422
    assert wrong_aud.get_json() == {"msg": "The access token is invalid.", "code": "invalid_token"}
    assert "WWW-Authenticate" in wrong_aud.headers
    assert call(fje_app, "/whoami", None).get_json()["code"] == "unauthorized"
    assert (
        call(fje_app, "/whoami", bearer(issuer.mint(expires_in=-60))).get_json()["code"]
        == "token_expired"
    )
    ok = call(fje_app, "/whoami", f"bearer {issuer.mint(scopes=['items:read'])}")
    assert ok.get_json() == {"sub": "user_1", "scope": "items:read", "name": "Alice"}
    assert call(fje_app, "/whoami", bearer(issuer.mint(subject=None))).status_code == 401
    assert call(fje_app, "/bp/thing", bearer(issuer.mint())).get_json() == {"sub": "user_1"}


def test_fje_claims_have_no_added_defaults(issuer: TokenIssuer) -> None:
    app = plain_app(issuer)

    @app.get("/claims")
    @require_token
    def claims() -> dict[str, Any]:
        return {"keys": sorted(g.auth.claims), "token_id": g.auth.token_id}

    body = call(app, "/claims", bearer(issuer.mint(jti="j-1"))).get_json()
    assert not {"type", "fresh"} & set(body["keys"])
    assert body["token_id"] == "j-1"


def test_fje_pem_needs_the_kid(issuer: TokenIssuer) -> None:
    pem = cast(RSAKey, issuer.key()).as_pem(private=False)
    jwk = RSAKey.import_key(pem).as_dict(private=False)
    create_app = page_block("fje")["create_app"]
    without_kid = create_app(issuer.issuer, AUDIENCE, jwks={"keys": [jwk]})
    token = issuer.mint()  # carries the issuer's kid
    assert call(without_kid, "/whoami", bearer(token)).status_code == 401
    no_kid_token = jose_jwt.encode({"alg": "RS256"}, issuer.claims(), issuer.key())
    assert call(without_kid, "/whoami", bearer(no_kid_token)).status_code == 200
    with_kid = create_app(
        issuer.issuer, AUDIENCE, jwks={"keys": [dict(jwk, kid=issuer.current_kid)]}
    )
    assert call(with_kid, "/whoami", bearer(token)).status_code == 200


def test_fje_blocklist(issuer: TokenIssuer) -> None:
    revoked: set[str] = set()
    oauth = OAuthVerify()

    @oauth.claims_check
    def not_revoked(claims: Any) -> bool:
        return claims.get("jti") not in revoked

    app = Flask("blocklist")
    app.config.update(issuer.config(audience=AUDIENCE))
    oauth.init_app(app)
    app.add_url_rule("/cached", "cached", require_token(lambda: {"ok": True}))
    bp = Blueprint("bp", "bp", url_prefix="/bp")
    bp.add_url_rule("/thing", "thing", lambda: {"ok": True})
    page_block("fje-blocklist")["protect_with_blocklist"](bp, revoked)
    app.register_blueprint(bp)

    token = issuer.mint()
    assert call(app, "/cached", bearer(token)).status_code == 200
    assert call(app, "/bp/thing", bearer(token)).status_code == 200
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    revoked.add(payload["jti"])
    # the claims_check outcome is cached with the token: still accepted
    assert call(app, "/cached", bearer(token)).status_code == 200
    # the per-request check of the page refuses it
    refused = call(app, "/bp/thing", bearer(token))
    assert (refused.status_code, refused.get_json()["error"]) == (401, "invalid_token")
