"""JWT verification through real requests: every check, every documented code."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from flask import Flask
from joserfc import jwt

from flask_oauth_verify.testing import TokenIssuer, auth_header, b64url
from flask_oauth_verify.verification import LATEST_EXP

from .conftest import make_app


def call(app: Flask, token: str) -> tuple[int, dict[str, Any], str]:
    response = app.test_client().get("/protected", headers=auth_header(token))
    return response.status_code, response.json or {}, response.headers.get("WWW-Authenticate", "")


def test_valid_token_sets_every_auth_field(app: Flask, tokens: TokenIssuer) -> None:
    token = tokens.mint(scopes=["read:users", "write:users"], organization_id="org_1")
    status, body, _ = call(app, token)
    assert status == 200
    assert body == {
        "subject": "user_1",
        "organization_id": "org_1",
        "scopes": ["read:users", "write:users"],
        "strategy": "jwks",
    }


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": -100}, "token_expired"),
        ({"nbf": 600}, "token_not_active"),
        ({"iat": 600}, "invalid_token"),
        ({"iss": "https://evil.example.test"}, "invalid_token"),
        ({"iss": "https://issuer.example.test/"}, "invalid_token"),
        ({"iss": "HTTPS://ISSUER.EXAMPLE.TEST"}, "invalid_token"),
        ({"aud": "other-api"}, "invalid_token"),
        ({"aud": []}, "invalid_token"),
        ({"aud": {"api": True}}, "invalid_token"),
        ({"aud": None}, "invalid_token"),
        ({"exp": None}, "invalid_token"),
        ({"exp": "9999999999"}, "invalid_token"),
        ({"exp": True}, "invalid_token"),
        ({"nbf": "0"}, "invalid_token"),
        ({"scope": 42}, "invalid_token"),
        ({"oid": {"id": "org"}}, "invalid_token"),
    ],
)
def test_bad_claims_are_refused_with_the_documented_code(
    app: Flask, tokens: TokenIssuer, claims: dict[str, Any], code: str
) -> None:
    now = int(time.time())
    payload = tokens.claims(scopes=["read:users"])
    for name, value in claims.items():
        if name in ("exp", "nbf", "iat") and isinstance(value, int) and not isinstance(value, bool):
            value = now + value
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    status, body, challenge = call(app, tokens.mint(payload))
    assert status == 401
    assert body["error"] == code
    assert 'error="invalid_token"' in challenge


def test_aud_list_containing_the_audience_is_accepted(app: Flask, tokens: TokenIssuer) -> None:
    status, _, _ = call(app, tokens.mint(audience=["other", "api"]))
    assert status == 200


def test_leeway_applies_to_exp(tokens: TokenIssuer) -> None:
    payload = tokens.claims()
    payload["exp"] = int(time.time()) - 5
    token = tokens.mint(payload)
    assert call(make_app(tokens.config(LEEWAY=60)), token)[0] == 200
    assert call(make_app(tokens.config(LEEWAY=0), name="strict"), token)[1]["error"] == (
        "token_expired"
    )


@pytest.mark.parametrize(
    ("exp", "status"),
    [
        (LATEST_EXP, 200),  # the last second of the year 9999
        (LATEST_EXP + 1, 401),
        (int(time.time() * 1000) + 3_600_000, 401),  # milliseconds: would never expire
        (float(LATEST_EXP) + 0.5, 401),
    ],
    ids=["9999-12-31", "10000-01-01", "milliseconds", "fraction beyond"],
)
def test_an_exp_beyond_any_date_in_seconds_is_refused(
    app: Flask, tokens: TokenIssuer, exp: float, status: int
) -> None:
    payload = tokens.claims()
    payload["exp"] = exp
    answer = call(app, tokens.mint(payload))
    assert answer[0] == status, answer
    if status == 401:
        assert answer[1]["error"] == "invalid_token"


@pytest.mark.parametrize("typ", [None, "JWT", "at+jwt", "application/at+JWT"])
def test_access_token_types_are_accepted(app: Flask, tokens: TokenIssuer, typ: str | None) -> None:
    assert call(app, tokens.mint(typ=typ))[0] == 200


def _header_of(token: str) -> dict[str, Any]:
    segment = token.split(".")[0]
    header: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return header


@pytest.mark.parametrize("member", ["kid", "typ"])
def test_a_null_header_member_is_refused_not_taken_for_an_absent_one(
    tokens: TokenIssuer, member: str
) -> None:
    """RFC 7515 §4.1.4/§4.1.9: a kid or typ that is present is a string. With
    a one-key set an absent kid finds the only key, and no typ is accepted
    by default, so "kid": null and "typ": null passed as if absent."""
    app = make_app(tokens.config())  # the issuer's one key, static
    assert len(tokens.jwks()["keys"]) == 1
    assert call(app, tokens.mint())[0] == 200
    token = tokens.mint(headers={member: None})
    assert _header_of(token)[member] is None
    status, body, _ = call(app, token)
    assert (status, body["error"]) == (401, "invalid_token")


def test_the_test_issuer_mints_any_header_it_is_asked_for(app: Flask, tokens: TokenIssuer) -> None:
    """``typ=None`` leaves typ out (the signing library added "JWT", so the
    typ-less case above was never run) and ``headers=`` takes any member, as
    the testing page says: unknown names, ``crit``, a kid of the wrong type."""
    untyped = tokens.mint(typ=None)
    assert "typ" not in _header_of(untyped)
    assert call(app, untyped)[0] == 200
    custom = tokens.mint(headers={"x-trace": "abc"})
    assert _header_of(custom)["x-trace"] == "abc"
    assert call(app, custom)[0] == 200
    for forged in ({"crit": ["exp"], "exp": 1}, {"kid": 123}, {"kid": None}, {"typ": None}):
        token = tokens.mint(headers=forged)
        assert _header_of(token).items() >= forged.items()
        status, body, _ = call(app, token)
        assert (status, body["error"]) == (401, "invalid_token")


@pytest.mark.parametrize("typ", ["dpop+jwt", "id_token+jwt", "logout+jwt", "JWE"])
def test_other_types_are_refused(app: Flask, tokens: TokenIssuer, typ: str) -> None:
    status, body, _ = call(app, tokens.mint(typ=typ))
    assert (status, body["error"]) == (401, "invalid_token")


@pytest.mark.parametrize("allowed", [["at+jwt"], ["application/at+jwt"], ["AT+JWT"]])
def test_allowed_types_compare_as_media_types(tokens: TokenIssuer, allowed: list[str]) -> None:
    """RFC 7515 §4.1.9: a ``typ`` without ``/`` means ``application/`` + it, so
    either spelling of RFC 9068's type allows both; other types stay refused."""
    app = make_app(tokens.config(audience="api", ALLOWED_TYPES=allowed))
    for typ in ("at+jwt", "application/at+jwt", "Application/AT+JWT"):
        assert call(app, tokens.mint(typ=typ))[0] == 200, typ
    for refused in ("JWT", "application/jwt", "jwt+at", "application/", "", None):
        assert call(app, tokens.mint(typ=refused))[0] == 401, refused


def test_signature_from_another_key_with_the_same_kid_is_refused(
    app: Flask, tokens: TokenIssuer
) -> None:
    other = TokenIssuer(issuer=tokens.issuer)
    forged = other.mint(kid=other.current_kid, headers={"kid": tokens.current_kid})
    status, body, _ = call(app, forged)
    assert (status, body["error"]) == (401, "invalid_token")


def test_tampered_payload_is_refused(app: Flask, tokens: TokenIssuer) -> None:
    header, _payload, signature = tokens.mint(scopes=["read:users"]).split(".")
    claims = tokens.claims(scopes=["admin"])
    status, _, _ = call(app, f"{header}.{b64url(claims)}.{signature}")
    assert status == 401


def test_alg_none_and_alg_not_allowed_are_refused(app: Flask, tokens: TokenIssuer) -> None:
    claims = b64url(tokens.claims())
    for alg in ("none", "None", "NONE", "HS256", "ES256", "PS256"):
        header = b64url({"alg": alg, "kid": tokens.current_kid, "typ": "JWT"})
        assert call(app, f"{header}.{claims}.")[0] == 401


def test_required_claims_and_values(tokens: TokenIssuer) -> None:
    app = make_app(
        tokens.config(REQUIRED_CLAIMS=["jti", "custom.nested"], REQUIRED_CLAIM_VALUES={"stt": 1})
    )
    good = tokens.mint(custom={"nested": "x"}, stt=1)
    assert call(app, good)[0] == 200
    assert call(app, tokens.mint(stt=1))[0] == 401
    assert call(app, tokens.mint(custom={"nested": "x"}, stt=True))[0] == 401
    assert call(app, tokens.mint(custom={"nested": "x"}, stt="1"))[0] == 401


def test_allowed_client_ids(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(ALLOWED_CLIENT_IDS=["client-1"]))
    assert call(app, tokens.mint())[0] == 200
    assert call(app, tokens.mint(client_id="client-2"))[0] == 401


def test_token_without_kid_needs_exactly_one_key(tokens: TokenIssuer) -> None:
    issuer = TokenIssuer(issuer="https://one.example.test")
    no_kid = jwt.encode({"alg": "RS256"}, issuer.claims(), issuer.key(), algorithms=["RS256"])
    header = json.loads(base64.urlsafe_b64decode(no_kid.split(".")[0] + "=="))
    assert "kid" not in header
    assert call(make_app(issuer.config()), no_kid)[0] == 200
    issuer.add_key("RS256")
    assert call(make_app(issuer.config(), name="two"), no_kid)[0] == 401


def test_oversized_token_is_refused_before_decoding(app: Flask, tokens: TokenIssuer) -> None:
    big = tokens.mint(padding="x" * 20000)
    status, body, _ = call(app, big)
    assert (status, body["error"]) == (401, "invalid_token")


def test_jwe_and_wrong_segment_counts_are_refused(app: Flask) -> None:
    for token in ("a.b.c.d.e", "a.b", "abc", "a.b.c.d", "..", "...."):
        assert call(app, token)[0] == 401


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA", "Ed25519", "RS512"])
def test_each_algorithm_verifies_against_a_served_jwks(alg: str) -> None:
    issuer = TokenIssuer(alg=alg)
    server = issuer.serve()
    try:
        app = make_app(issuer.config())
        assert call(app, issuer.mint(scopes=["s"]))[0] == 200
        other = TokenIssuer(alg=alg)
        forged = other.mint(headers={"kid": issuer.current_kid})
        assert call(app, forged)[0] == 401
        assert server.hits["/jwks"] >= 1
    finally:
        server.close()


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_a_null_time_claim_is_refused_not_taken_for_absent(
    app: Flask, tokens: TokenIssuer, name: str
) -> None:
    payload = tokens.claims()
    payload[name] = None
    status, body, _ = call(app, tokens.mint(payload))
    assert (status, body["error"]) == (401, "invalid_token")
    assert body["message"]  # a JSON body, as every refusal
    payload.pop(name)
    assert call(app, tokens.mint(payload))[0] == 200  # absent is fine


@pytest.mark.parametrize("claim", ["at_hash", "c_hash"])
def test_an_id_token_claim_is_refused(app: Flask, tokens: TokenIssuer, claim: str) -> None:
    """OpenID Connect puts at_hash/c_hash in ID tokens only; an ID token is no access token."""
    payload = {**tokens.claims(), claim: "HK6E_P6Dh8Y93mRNtsDB1Q"}
    status, body, _ = call(app, tokens.mint(payload))
    assert (status, body["error"]) == (401, "invalid_token")


@pytest.mark.parametrize(
    "cnf",
    [
        {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
        {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"},
    ],
    ids=["DPoP", "mutual TLS"],
)
def test_a_sender_constrained_token_sent_as_bearer_is_refused(
    app: Flask, tokens: TokenIssuer, cnf: dict[str, str]
) -> None:
    """A token bound to a key its client must prove (RFC 9449, RFC 8705) cannot
    be checked in a Bearer request: accepted, a stolen one would be replayed."""
    status, body, _ = call(app, tokens.mint(cnf=cnf))
    assert (status, body["error"]) == (401, "invalid_token")
    lenient = make_app(tokens.config(REFUSED_CLAIMS=["at_hash", "c_hash"]), name="lenient")
    assert call(lenient, tokens.mint(cnf=cnf))[0] == 200  # an app may opt out


def test_refused_claims_are_configurable(tokens: TokenIssuer) -> None:
    lenient = make_app(tokens.config(REFUSED_CLAIMS=[]), name="lenient")
    assert call(lenient, tokens.mint(at_hash="x"))[0] == 200
    strict = make_app(tokens.config(REFUSED_CLAIMS=["nonce"]), name="strict")
    assert call(strict, tokens.mint(nonce="n"))[0] == 401
    assert call(strict, tokens.mint(at_hash="x"))[0] == 200  # the list replaces the default


def test_require_client_id(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(REQUIRE_CLIENT_ID=True))
    assert call(app, tokens.mint(client_id="client-1"))[0] == 200
    payload = tokens.claims()
    for name in ("client_id", "azp", "cid"):
        payload.pop(name, None)
    status, body, _ = call(app, tokens.mint(payload))
    assert (status, body["error"]) == (401, "invalid_token")
    assert call(app, tokens.mint({**payload, "client_id": 7}))[0] == 401  # not a string
