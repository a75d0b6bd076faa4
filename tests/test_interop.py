"""Tokens signed by an independent JOSE implementation (PyJWT) are accepted.

PyJWT shares no code with joserfc: this checks that our prepared verifiers
(PKCS#1 v1.5, PSS with a digest-length salt, raw R||S ECDSA, Ed25519) agree
with another standards-following signer, over a JWKS served for real.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from flask_oauth_verify.testing import IssuerServer, Reply, auth_header

from .conftest import make_app

ALGORITHMS: dict[str, Any] = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


def public_jwk(alg: str, private_key: Any) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(private_key.public_key()))
    jwk.update(kid=f"pyjwt-{alg}", alg=alg, use="sig")
    return jwk


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_pyjwt_signed_access_tokens_are_accepted(alg: str, issuer_server: IssuerServer) -> None:
    private_key = ALGORITHMS[alg]()
    issuer_server.route("/keys", Reply(200, {"keys": [public_jwk(alg, private_key)]}))
    app = make_app(
        {
            "OAUTH_VERIFY_ISSUER": issuer_server.url,
            "OAUTH_VERIFY_AUDIENCE": "https://api.example.com",
            "OAUTH_VERIFY_JWKS_URI": f"{issuer_server.url}/keys",
            "OAUTH_VERIFY_ALGORITHMS": [alg],
        }
    )
    now = int(time.time())
    claims = {
        "iss": issuer_server.url,
        "sub": "user_42",
        "aud": "https://api.example.com",
        "iat": now,
        "exp": now + 300,
        "scope": "read:users write:users",
        "client_id": "interop-client",
        "jti": "abc",
    }
    token = jwt.encode(
        claims, private_key, algorithm=alg, headers={"kid": f"pyjwt-{alg}", "typ": "at+jwt"}
    )
    client = app.test_client()
    response = client.get("/protected", headers=auth_header(token))
    assert response.status_code == 200, response.json
    assert response.json is not None
    assert response.json["scopes"] == ["read:users", "write:users"]
    tampered = jwt.encode({**claims, "sub": "admin"}, ALGORITHMS[alg](), algorithm=alg,
                          headers={"kid": f"pyjwt-{alg}"})  # fmt: skip
    assert client.get("/protected", headers=auth_header(tampered)).status_code == 401
