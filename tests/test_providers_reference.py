"""Provider tokens and key sets in the exact shapes the providers publish.

tests/test_providers.py checks each profile against an emulator; this file
builds what a real authorization server sends, field by field, where it
differs from what :class:`TokenIssuer` writes: key sets without ``alg`` and
with ``x5c``/``x5t``/``issuer`` members, headers with ``x5t``, a ``typ`` of
``JWT``, the documented alternative key paths, refresh tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import OctKey

from flask_oauth_verify.testing import IssuerServer, Reply, Request

from .attack_corpus import _self_signed_cert
from .provider_emulators import Auth0, Cognito, EntraID, Keycloak, Okta, Scalekit
from .test_providers import call, provider_app, refused


@pytest.fixture
def server() -> Iterator[IssuerServer]:
    with IssuerServer() as srv:
        yield srv


def certificate(emulator: Any) -> tuple[str, str]:
    """``x5c[0]`` and ``x5t`` of a self-signed certificate for the signing key."""
    private = emulator.signer.key().private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    der = _self_signed_cert(private)
    sha1 = hashes.Hash(hashes.SHA1())  # noqa: S303 - x5t is SHA-1 by definition
    sha1.update(der)
    x5t = base64.urlsafe_b64encode(sha1.finalize()).rstrip(b"=").decode()
    return base64.b64encode(der).decode(), x5t


def published_key(emulator: Any, **members: Any) -> dict[str, Any]:
    """The emulator's public key as a provider publishes it (``None`` drops a member)."""
    key = dict(emulator.signer.jwks()["keys"][0])
    key.update(members)
    return {k: v for k, v in key.items() if v is not None}


def _claims(token: str) -> dict[str, Any]:
    """The claims of one of the emulator's tokens (to sign them again differently)."""
    segment = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


# -- Microsoft Entra ID ---------------------------------------------------------------


def test_entra_key_set_as_published_without_alg(server: IssuerServer) -> None:
    """Entra's common keys carry no ``alg``; they carry ``x5t``, ``x5c`` and
    ``issuer`` (a template); v1 token headers carry ``x5t`` beside ``kid``."""
    entra = EntraID(server)
    x5c, x5t = certificate(entra)
    key = published_key(
        entra,
        alg=None,
        x5t=x5t,
        x5c=[x5c],
        issuer="https://login.microsoftonline.com/{tenantid}/v2.0",
        cloud_instance_name="microsoftonline.com",
    )
    server.route("/common/discovery/v2.0/keys", Reply(200, {"keys": [key]}))
    app = provider_app(entra.config())
    status, body = call(app, entra.v2_token())
    assert status == 200, body
    v1 = entra.sign(_claims(entra.v1_token()), headers={"x5t": x5t})
    status, body = call(app, v1)
    assert (status, body.get("organization_id")) == (200, entra.home), body


# -- Auth0 ----------------------------------------------------------------------------


def test_auth0_default_profile_token_typ_jwt_and_x5c_keys(server: IssuerServer) -> None:
    """Auth0's default ("Auth0") token profile writes ``typ: JWT``; its key set
    has ``x5c``/``x5t``/``alg``."""
    a0 = Auth0(server)
    x5c, x5t = certificate(a0)
    server.route(
        "/.well-known/jwks.json", Reply(200, {"keys": [published_key(a0, x5c=[x5c], x5t=x5t)]})
    )
    app = provider_app(a0.config())
    token = a0.sign(_claims(a0.user_token()), typ="JWT")
    status, body = call(app, token)
    assert status == 200, body
    assert body["organization_id"] == "org_Hd5g7kL2mN8pQ1rS"
    m2m = a0.sign(_claims(a0.m2m_token()), typ="JWT")
    status, body = call(app, m2m)
    assert (status, body["user_id"], body["client_id"]) == (200, None, "m2m-client-id")


# -- Keycloak -------------------------------------------------------------------------


def test_keycloak_realm_keys_and_refresh_token(server: IssuerServer) -> None:
    """A realm's certs hold its RS256 signing key and an RSA-OAEP ``enc`` key;
    its refresh tokens are HS512 (``typ: Refresh``), its ID tokens ``typ: ID``."""
    kc = Keycloak(server)
    x5c, x5t = certificate(kc)
    signing = published_key(kc, x5c=[x5c], x5t=x5t)
    encryption = published_key(kc, kid="kc-enc-1", use="enc", alg="RSA-OAEP")
    server.route(
        f"/realms/{kc.realm}/protocol/openid-connect/certs",
        Reply(200, {"keys": [signing, encryption]}),
    )
    app = provider_app(kc.config())
    assert call(app, kc.token())[0] == 200
    secret = OctKey.generate_key(512)
    refresh_claims = {
        "exp": _claims(kc.token())["exp"],
        "iat": _claims(kc.token())["iat"],
        "jti": "5c3a0d6e-refresh",
        "iss": kc.issuer,
        "aud": kc.issuer,
        "sub": "f:0a1b2c3d:alice",
        "typ": "Refresh",
        "azp": "web-app",
        "sid": "2c3d4e5f",
        "scope": "openid profile orders:read",
    }
    refresh = jwt.encode(
        {"alg": "HS512", "typ": "JWT", "kid": "0b5b4e7e-hmac"},
        refresh_claims,
        secret,
        algorithms=["HS512"],
    )
    refused(app, refresh)
    refused(app, kc.token(typ="Refresh"))
    refused(app, kc.token(typ="Offline"))


# -- Okta -----------------------------------------------------------------------------


def test_okta_client_credentials_token(server: IssuerServer) -> None:
    """Okta's client-credentials token: ``sub`` = ``cid``, no ``uid``."""
    okta = Okta(server)
    app = provider_app(okta.config())
    token = okta.token(sub="0oa1b2c3d4e5f6g7h8i9", uid=None, scp=["orders:read"])
    status, body = call(app, token, "/scoped/orders:read")
    assert (status, body["user_id"], body["client_id"]) == (200, None, "0oa1b2c3d4e5f6g7h8i9")


# -- Cognito --------------------------------------------------------------------------


def test_cognito_client_credentials_token(server: IssuerServer) -> None:
    """Cognito's M2M token: ``sub`` = ``client_id``, resource-server scopes."""
    cg = Cognito(server)
    app = provider_app(cg.config())
    token = cg.access_token(
        sub=cg.app_client,
        username=None,
        **{"cognito:groups": None, "origin_jti": None, "event_id": None, "auth_time": None},
        scope="orders-api/orders.read orders-api/orders.write",
    )
    status, body = call(app, token)
    assert status == 200, body
    assert (body["user_id"], body["client_id"]) == (None, cg.app_client)
    assert body["scopes"] == ["orders-api/orders.read", "orders-api/orders.write"]


# -- Scalekit -------------------------------------------------------------------------


def test_scalekit_keys_at_the_well_known_path_of_the_verification_guide(
    server: IssuerServer,
) -> None:
    """Scalekit's verification guide points its JWKS client at
    ``<env>/.well-known/jwks``; the M2M guide at ``<env>/keys``."""
    sk = Scalekit(server)
    server.routes.pop("/keys")
    server.route("/.well-known/jwks", sk.jwks_reply)
    app = provider_app(sk.config())
    status, body = call(app, sk.m2m_token())
    assert status == 200, body
    assert body["organization_id"] == "org_59615193906282635"
    assert (server.hits["/keys"], server.hits["/.well-known/jwks"]) == (1, 1)


def test_scalekit_introspection_as_the_guide_writes_it(server: IssuerServer) -> None:
    """The guide's request: a form with ``token`` and ``token_type_hint``."""
    sk = Scalekit(server)

    def open_introspection(request: Request) -> Reply:
        sk.introspections.append(request)
        return sk.answer(request.form().get("token"))

    server.route("/oauth/introspect", open_introspection)
    app = provider_app(sk.config(INTROSPECTION_AUTH="none"))
    token = sk.m2m_token()
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    form = sk.introspections[-1].form()
    assert form["token"] == token
