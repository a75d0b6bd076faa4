"""Spring Authorization Server's token shapes, with the settings its guide gives.

Spring Authorization Server (a Java server, not run here) issues JWT access
tokens whose ``aud`` is the client's id, with no ``client_id`` claim and no
``typ`` header; its ID tokens have the same ``aud`` and carry ``azp``; its
introspection endpoint answers ``active: true`` for a refresh token with
only ``client_id``, ``iat`` and ``exp``. The tokens and answers below have
those shapes (its ``JwtGenerator`` and introspection endpoint), signed and
served by a real issuer on 127.0.0.1; the settings are read from
``docs/providers/generic.rst``, so the guide is what is tested.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g

from flask_oauth_verify import OAuthVerify, require_token, require_user
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import guide_settings

GUIDE = Path(__file__).parents[1] / "docs" / "providers" / "generic.rst"
API = "https://api.example.com"


@pytest.fixture
def issuer() -> Iterator[TokenIssuer]:
    with IssuerServer() as server:
        tokens = TokenIssuer(alg="RS256", audience=API)
        tokens.serve(server)
        yield tokens


def access_claims(issuer: TokenIssuer, subject: str, client: str, **extra: Any) -> dict[str, Any]:
    """What Spring Authorization Server's JwtGenerator puts in an access token."""
    now = int(time.time())
    claims = {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": client,  # one audience, written as a string
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "scope": ["orders:read"],
    }
    claims.update(extra)
    return claims


def id_token_claims(issuer: TokenIssuer, subject: str, client: str) -> dict[str, Any]:
    """... and in an ID token of a code flow (no nbf, no scope)."""
    now = int(time.time())
    return {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": client,
        "iat": now,
        "exp": now + 1800,
        "jti": str(uuid.uuid4()),
        "azp": client,
        "nonce": "n-0S6_WzA2Mj",
        "sid": "session-1",
        "auth_time": now - 10,
    }


def spring_app(issuer: TokenIssuer, settings: dict[str, Any], **extra: Any) -> Flask:
    app = Flask("spring_as")
    app.config.update(TESTING=True)
    app.config.update(issuer.config(**extra))
    app.config.update({k: v for k, v in settings.items() if k != "OAUTH_VERIFY_ISSUER"})
    OAuthVerify(app)

    @app.get("/whoami")
    @require_token
    def whoami() -> dict[str, Any]:
        auth = g.auth
        return {"client": auth.client_id, "user": auth.user_id, "scopes": sorted(auth.scopes)}

    @app.get("/mine")
    @require_user
    def mine() -> dict[str, Any]:
        return {"user": g.auth.user_id}

    return app


def test_the_guide_settings_tell_clients_from_users_and_refuse_id_tokens(
    issuer: TokenIssuer,
) -> None:
    settings = guide_settings(GUIDE, "Where the server cannot change")
    client = spring_app(issuer, settings).test_client()
    machine = issuer.mint(access_claims(issuer, "orders-batch", "orders-batch"), typ=None)
    answer = client.get("/whoami", headers=auth_header(machine))
    assert answer.status_code == 200, answer.json
    assert answer.json == {"client": "orders-batch", "user": None, "scopes": ["orders:read"]}
    refused = client.get("/mine", headers=auth_header(machine))
    assert refused.status_code == 401
    assert refused.json is not None and refused.json["error"] == "missing_user_context"

    alice = issuer.mint(access_claims(issuer, "alice", "orders-web"), typ=None)
    assert client.get("/whoami", headers=auth_header(alice)).json == {
        "client": "orders-web",
        "user": "alice",
        "scopes": ["orders:read"],
    }
    assert client.get("/mine", headers=auth_header(alice)).json == {"user": "alice"}

    id_token = issuer.mint(id_token_claims(issuer, "alice", "orders-web"), typ=None)
    for path in ("/whoami", "/mine"):
        response = client.get(path, headers=auth_header(id_token))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    stranger = issuer.mint(access_claims(issuer, "mallory", "other-client"), typ=None)
    assert client.get("/whoami", headers=auth_header(stranger)).status_code == 401


def test_without_the_guide_settings_a_client_token_would_count_as_a_user(
    issuer: TokenIssuer,
) -> None:
    """Why the guide's settings are needed: the trap they close."""
    bare = {"OAUTH_VERIFY_AUDIENCE": ["orders-web", "orders-batch"]}
    client = spring_app(issuer, bare).test_client()
    machine = issuer.mint(access_claims(issuer, "orders-batch", "orders-batch"), typ=None)
    answer = client.get("/whoami", headers=auth_header(machine)).json
    assert answer is not None and answer["user"] == "orders-batch"
    id_token = issuer.mint(id_token_claims(issuer, "alice", "orders-web"), typ=None)
    assert client.get("/whoami", headers=auth_header(id_token)).status_code == 200


def test_customized_tokens_need_only_the_usual_settings(issuer: TokenIssuer) -> None:
    """With the guide's token customizer: aud is the API, client_id is named,
    typ is at+jwt; the top of the guide's settings are enough."""
    client = spring_app(issuer, {"OAUTH_VERIFY_AUDIENCE": API}).test_client()
    machine = issuer.mint(
        access_claims(issuer, "orders-batch", API, client_id="orders-batch"), typ="at+jwt"
    )
    assert client.get("/whoami", headers=auth_header(machine)).json == {
        "client": "orders-batch",
        "user": None,
        "scopes": ["orders:read"],
    }
    assert client.get("/mine", headers=auth_header(machine)).status_code == 401
    alice = issuer.mint(access_claims(issuer, "alice", API, client_id="orders-web"), typ="at+jwt")
    assert client.get("/mine", headers=auth_header(alice)).json == {"user": "alice"}
    id_token = issuer.mint(id_token_claims(issuer, "alice", "orders-web"), typ=None)
    assert client.get("/whoami", headers=auth_header(id_token)).status_code == 401


def test_introspection_refuses_its_refresh_token_answers(issuer: TokenIssuer) -> None:
    """Its access-token answers carry aud; its refresh-token answers do not."""
    now = int(time.time())
    answers = {
        "access-ref": {
            "active": True,
            "sub": "alice",
            "aud": ["orders-web"],
            "nbf": now,
            "scope": "orders:read",
            "iss": issuer.issuer,
            "exp": now + 300,
            "iat": now,
            "jti": "j-1",
            "client_id": "orders-web",
            "token_type": "Bearer",
        },
        "refresh-ref": {"active": True, "client_id": "orders-web", "iat": now, "exp": now + 3600},
    }

    def like_spring(request: Request) -> Reply:
        return Reply(200, answers.get(request.form()["token"], {"active": False}))

    assert issuer.server is not None
    issuer.server.route("/introspect", like_spring)
    client_id, secret = issuer.introspection_credentials
    introspecting = {
        "STRATEGY": "introspection",
        "INTROSPECTION_ENDPOINT": f"{issuer.server.url}/introspect",
        "INTROSPECTION_CLIENT_ID": client_id,
        "INTROSPECTION_CLIENT_SECRET": secret,
    }
    settings = guide_settings(GUIDE, "Where the server cannot change")
    client = spring_app(issuer, settings, **introspecting).test_client()
    access = client.get("/whoami", headers=auth_header("access-ref"))
    assert access.json == {"client": "orders-web", "user": "alice", "scopes": ["orders:read"]}
    refresh = client.get("/whoami", headers=auth_header("refresh-ref"))
    assert refresh.status_code == 401
    assert refresh.json is not None and refresh.json["error"] == "invalid_token"
    unguarded = dict(settings, OAUTH_VERIFY_INTROSPECTION_REQUIRE_AUDIENCE=False)
    loose = spring_app(issuer, unguarded, **introspecting).test_client()
    assert loose.get("/whoami", headers=auth_header("refresh-ref")).status_code == 200
