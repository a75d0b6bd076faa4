"""The attack corpus against a real app: every crafted request gets its 4xx.

The app's key set (an RS256 key, an ES256 key and a 1024-bit RSA key that
must be skipped) is served by a real HTTP server on 127.0.0.1; a second
server plays the attacker, and must never receive a single request. For
every case the status, the JSON body, ``WWW-Authenticate`` and the absence
of ``g.auth`` are checked (see ``tests/attack_corpus.py`` for the cases).
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify, require_scope, require_token
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .attack_corpus import CORPUS, Attack, Kit, Probe, _weak_rsa_key

#: The RFC 6750 challenge ``error`` for each body ``error`` (None: no attribute).
CHALLENGE_ERRORS: dict[str | None, str | None] = {
    "unauthorized": None,
    "invalid_request": "invalid_request",
    "invalid_token": "invalid_token",
    "token_expired": "invalid_token",
    "token_not_active": "invalid_token",
    "insufficient_scope": "insufficient_scope",
}


class CorpusEnv:
    """The servers, the kit and the app the corpus runs against."""

    def __init__(self) -> None:
        self.attacker = IssuerServer()
        self.server = IssuerServer()
        self.issuer = TokenIssuer(audience="api")
        rsa_kid = self.issuer.current_kid
        ec_kid = self.issuer.add_key("ES256")
        weak_kid = self.issuer.add_key("RS256", kid="weak-1024", key=_weak_rsa_key())
        self.issuer.serve(self.server)
        self.kit = Kit(
            self.issuer,
            attacker_url=self.attacker.url,
            rsa_kid=rsa_kid,
            ec_kid=ec_kid,
            weak_kid=weak_kid,
        )
        # Everything an attacker could want fetched, ready to be served.
        attacker_jwks = {"keys": [self.kit.attacker_jwk()]}
        for path in ("/jwks", "/.well-known/openid-configuration", "/cert.pem"):
            self.attacker.route(path, Reply(200, attacker_jwks))
        self.seen_auth: list[Any] = []
        self.app = self._app()

    def _app(self) -> Flask:
        app = Flask("attacks")
        app.config.update(TESTING=True, **self.issuer.config(audience="api", HTTP_TIMEOUT=2))
        OAuthVerify(app)

        @app.route("/protected", methods=["GET", "POST"])
        @require_token
        def protected() -> dict[str, Any]:
            return {"subject": g.auth.subject, "scopes": sorted(g.auth.scopes)}

        @app.route("/read", methods=["GET", "POST"])
        @require_scope("read:users")
        def read() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        @app.after_request
        def record(response: Any) -> Any:
            self.seen_auth.append(g.get("auth"))
            return response

        return app

    def close(self) -> None:
        self.server.close()
        self.attacker.close()


@pytest.fixture(scope="module")
def env() -> Iterator[CorpusEnv]:
    corpus_env = CorpusEnv()
    yield corpus_env
    corpus_env.close()


def send(client: FlaskClient, probe: Probe) -> TestResponse:
    """Send ``probe`` through the test client (headers verbatim, repeated ones kept)."""
    return client.open(
        probe.path,
        method=probe.method,
        headers=list(probe.headers),
        query_string=probe.query or None,
        data=dict(probe.form) if probe.form is not None else None,
    )


def check_refusal(response: TestResponse, case: Attack) -> None:
    """The documented error response: JSON body and RFC 6750 challenge."""
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    assert set(body) == {"error", "message"}
    assert body["error"] == case.error
    assert isinstance(body["message"], str) and body["message"]
    challenge = response.www_authenticate
    assert challenge.type == "bearer"
    assert challenge.parameters.get("realm") == "api"
    expected = CHALLENGE_ERRORS[case.error]
    if expected is None:
        assert "error" not in challenge.parameters
        assert "error_description" not in challenge.parameters
    else:
        assert challenge.parameters.get("error") == expected
        assert challenge.parameters.get("error_description")
    if case.status == 403:
        assert challenge.parameters.get("scope") == "read:users"
    assert response.headers.get("Cache-Control") == "no-store"


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_attack(env: CorpusEnv, case: Attack, caplog: pytest.LogCaptureFixture) -> None:
    probe = case.build(env.kit)
    env.seen_auth.clear()
    with caplog.at_level(logging.ERROR, logger="flask_oauth_verify"):
        response = send(env.app.test_client(), probe)
    # The fail-closed safety net (an unexpected exception -> 401) must not be
    # what refused the token: every case has a deliberate, documented path.
    assert not [r for r in caplog.records if r.exc_info], "unexpected exception"
    assert response.status_code == case.status, (case.name, response.get_json())
    assert len(env.seen_auth) == 1
    if case.status == 200:
        assert response.get_json()["subject"] == "user_1"
        assert env.seen_auth[0] is not None
    else:
        check_refusal(response, case)
    if case.status in (400, 401):
        assert env.seen_auth[0] is None, "g.auth was set for an invalid token"
    # Header keys are never followed: the attacker's server saw nothing, and
    # the issuer's server only ever served its key set.
    assert sum(env.attacker.hits.values()) == 0
    assert set(env.server.hits) <= {"/jwks"}


def test_corpus_is_large_and_covers_every_class() -> None:
    names = [case.name for case in CORPUS]
    assert len(names) == len(set(names))
    refusals = [case for case in CORPUS if case.status != 200]
    assert len(refusals) >= 60
    categories = collections.Counter(case.category for case in CORPUS)
    for category in (
        "alg none", "hmac confusion", "header keys", "crit", "b64", "jwe", "segments",
        "base64", "json", "kid", "same kid", "ecdsa", "weak key", "claims", "typ", "scope",
        "unicode", "header", "control",
    ):  # fmt: skip
        assert categories[category] >= 1, category


def test_unknown_kids_do_not_cause_a_refetch_storm(served_tokens: TokenIssuer) -> None:
    """Fifty tokens with random kids cost at most one forced refetch."""
    app = Flask("kid_storm")
    app.config.update(TESTING=True, **served_tokens.config(audience="api"))
    OAuthVerify(app)

    @app.get("/protected")
    @require_token
    def protected() -> str:
        return "ok"

    assert served_tokens.server is not None
    client = app.test_client()
    assert client.get("/protected", headers=auth_header(served_tokens.mint())).status_code == 200
    assert served_tokens.server.hits["/jwks"] == 1
    for _ in range(50):
        token = served_tokens.mint(headers={"kid": uuid.uuid4().hex})
        response = client.get("/protected", headers=auth_header(token))
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_token"
    assert served_tokens.server.hits["/jwks"] <= 2
    # Genuine tokens still pass after the storm.
    assert client.get("/protected", headers=auth_header(served_tokens.mint())).status_code == 200


def test_weak_key_is_skipped_not_fatal(env: CorpusEnv) -> None:
    """The 1024-bit key is dropped from the set; the other keys keep working."""
    status = OAuthVerify.key_status(env.app.extensions["oauth_verify"].extension, env.app)
    skipped = [reason for entry in status for reason in entry.skipped]
    assert any(env.kit.weak_kid in reason for reason in skipped)
    response = send(env.app.test_client(), Kit.bearer(env.kit.token()))
    assert response.status_code == 200
