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
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, g
from joserfc import jwt
from joserfc.jwk import OctKey

from flask_oauth_verify import ConfigurationError, OAuthVerify, Settings, require_token
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .attack_corpus import _self_signed_cert
from .provider_emulators import (
    Auth0,
    BeyondIdentity,
    Cognito,
    EntraID,
    Keycloak,
    Okta,
    Scalekit,
    SuperTokens,
    VoxKey,
)
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


def java_base64url(number: int) -> str:
    """What ``Base64.getUrlEncoder().encodeToString(big.toByteArray())`` writes:
    a two's-complement sign byte (``0x00`` before a modulus with its top bit
    set) and ``=`` padding."""
    return base64.urlsafe_b64encode(number.to_bytes(number.bit_length() // 8 + 1, "big")).decode()


# -- SuperTokens ----------------------------------------------------------------------


def test_supertokens_key_set_of_a_java_core_with_padded_base64url(server: IssuerServer) -> None:
    """Older SuperTokens cores publish ``n`` and ``e`` with Java's padded URL
    encoder over ``BigInteger.toByteArray()``; every key was skipped as
    unreadable and every token refused."""
    st = SuperTokens(server)
    private = st.signer.key().private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    numbers = private.public_key().public_numbers()
    n = java_base64url(numbers.n)
    assert n.endswith("=") and n.startswith("A")  # the sign byte, the padding
    key = published_key(st, n=n, e=java_base64url(numbers.e))
    server.route("/auth/jwt/jwks.json", Reply(200, {"keys": [key]}))
    app = provider_app(st.config())
    status, body = call(app, st.token())
    assert (status, body.get("client_id")) == (200, st.oauth_client), body


def test_supertokens_with_another_api_base_path(server: IssuerServer) -> None:
    """``apiBasePath = "/identity"``: ``iss`` is ``<API domain>/identity``, the SDK
    serves keys and introspection below it; the profile found the keys but
    introspected at ``<API domain>/identity/auth/oauth/introspect`` (404: 503)."""
    st = SuperTokens(server)
    issuer = f"{server.url}/identity"
    server.route("/identity/jwt/jwks.json", st.jwks_reply)
    server.route("/identity/oauth/introspect", st.json_introspection)
    app = provider_app(st.config(ISSUER=issuer))
    token = st.token(iss=issuer)
    assert call(app, token)[0] == 200
    status, body = call(app, token, "/introspected")
    assert (status, body.get("strategy")) == (200, "introspection"), body
    assert st.introspections[-1].path == "/identity/oauth/introspect"


def test_supertokens_token_of_a_client_that_asked_for_no_audience(server: IssuerServer) -> None:
    """SuperTokens (Ory Hydra underneath) puts in ``aud`` only the audiences the
    client asked for: none gives ``aud: []``, plus an ``ext`` object."""
    st = SuperTokens(server)
    token = st.token(aud=[], ext={}, gid="g-1", rsub="fa7a0841-b533-4478-95533-0fde890c3483")
    refused(provider_app(st.config()), token)
    by_client = provider_app(
        st.config(AUDIENCE=None, VERIFY_AUDIENCE=False, ALLOWED_CLIENT_IDS=[st.oauth_client])
    )
    status, body = call(by_client, token)
    assert (status, body.get("client_id")) == (200, st.oauth_client), body
    refused(by_client, st.token(aud=[], client_id="stcl_another"))


# -- VoxKey ---------------------------------------------------------------------------


def test_voxkey_introspection_answer_names_no_audience(server: IssuerServer) -> None:
    """VoxKey's documented answer has no ``aud``: introspection alone cannot tell
    a token for another API of the realm; ``strategy="both"`` (as the page says)
    checks the JWT's ``aud`` and then asks about revocation."""
    vk = VoxKey(server)
    app = provider_app(
        vk.config(
            INTROSPECTION_CLIENT_ID=vk.client_id, INTROSPECTION_CLIENT_SECRET=vk.client_secret
        )
    )

    @app.get("/both")
    @require_token(strategy="both")
    def both() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    other_api = vk.user_token(aud=f"{server.url}/api/v1/another-api")
    assert call(app, other_api, "/introspected")[0] == 200  # nothing to compare
    refused(app, other_api, "/both")
    token = vk.user_token()
    assert call(app, token, "/both") == (200, {"subject": "user_abc123"})
    vk.active.pop(token)  # revoked
    refused(app, token, "/both")


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


def test_auth0_rfc9068_token_profile(server: IssuerServer) -> None:
    """Auth0's "RFC 9068" access token profile: ``client_id`` instead of ``azp``,
    ``typ: at+jwt``, ``jti``; a client-credentials token's subject is
    ``<client id>@clients``, with no ``gty`` to say so."""
    a0 = Auth0(server)
    app = provider_app(a0.config())
    user = _claims(a0.user_token(sub="auth0|123456", jti="73WakrfVbNJBaAmhQtEeDv"))
    for auth0_only in ("azp", "permissions", "org_id"):
        del user[auth0_only]
    user["client_id"] = "my_client_id"
    status, body = call(app, a0.sign(user, typ="at+jwt"))
    assert status == 200, body
    assert (body["client_id"], body["user_id"]) == ("my_client_id", "auth0|123456")
    machine = {**user, "sub": "my_client_id@clients", "aud": a0.audience, "scope": "read:admin"}
    status, body = call(app, a0.sign(machine, typ="at+jwt"))
    assert (status, body["user_id"], body["client_id"]) == (200, None, "my_client_id"), body
    refused(app, a0.sign(machine, typ="at+jwt"), "/me", "missing_user_context")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "at+jwt", "application/at+jwt"])
def test_typ_with_or_without_the_media_type_prefix(server: IssuerServer, typ: str) -> None:
    """``typ`` is a media type; ``application/`` may be written (RFC 7515 §4.1.9):
    ``application/at+jwt`` was accepted but ``application/jwt`` refused."""
    a0 = Auth0(server)
    app = provider_app(a0.config())
    assert call(app, a0.sign(_claims(a0.user_token()), typ=typ))[0] == 200


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


def test_scalekit_api_client_token_with_top_level_custom_claims(server: IssuerServer) -> None:
    """An API client created with an ``audience`` and ``custom_claims``: its
    tokens carry them at the top level; keys at ``/.well-known/jwks.json``
    (the path of Scalekit's API-auth guide for agents)."""
    sk = Scalekit(server)
    server.routes.pop("/keys")
    server.route("/.well-known/jwks.json", sk.jwks_reply)
    app = provider_app(sk.config(AUDIENCE="deployment-api.acmecorp.com"))
    claims = _claims(sk.m2m_token(aud=["deployment-api.acmecorp.com"]))
    del claims["custom_claims"]
    claims.update(
        service_name="inventory-deployer",
        client_type="ci",
        github_repository="acmecorp/inventory-service",
        environment="production_us",
    )
    status, body = call(app, sk.sign(claims))
    assert status == 200, body
    assert (body["service_name"], body["token_type"]) == ("inventory-deployer", "ci")
    assert (body["organization_id"], body["user_id"]) == ("org_59615193906282635", None)
    nested = sk.m2m_token(aud=["deployment-api.acmecorp.com"], service_name="top-level")
    assert call(app, nested)[1]["service_name"] == "billing-worker"  # the guide's shape first
    refused(app, sk.m2m_token())  # another API's audience
    no_audience = _claims(sk.m2m_token())
    del no_audience["aud"]  # a client created without an audience
    refused(app, sk.sign(no_audience))
    by_client = provider_app(
        sk.config(AUDIENCE=None, VERIFY_AUDIENCE=False, ALLOWED_CLIENT_IDS=[claims["client_id"]])
    )
    assert call(by_client, sk.sign(no_audience))[0] == 200
    refused(by_client, sk.sign({**no_audience, "client_id": "m2morg_another"}))


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


# -- tokens for another API ------------------------------------------------------------


def test_every_provider_refuses_a_token_for_another_api(server: IssuerServer) -> None:
    """Same issuer, same keys, another ``aud``: 401 for every profile that checks
    ``aud``; Cognito, which has none, checks the app client instead."""
    other = "https://another-api.example.com"
    sk, st, vk = Scalekit(server), SuperTokens(server), VoxKey(server)
    refused(provider_app(sk.config()), sk.m2m_token(aud=[other]))
    refused(provider_app(st.config()), st.token(aud=[other]))
    refused(provider_app(vk.config()), vk.user_token(aud=other))
    entra, kc, okta, cg = EntraID(server), Keycloak(server), Okta(server), Cognito(server)
    app = provider_app(entra.config())
    refused(app, entra.v2_token(aud="00000003-0000-0000-c000-000000000000"))  # Graph
    refused(app, entra.v1_token(aud="https://graph.microsoft.com"))
    refused(provider_app(kc.config()), kc.token(aud=["account"]))
    refused(provider_app(okta.config()), okta.token(aud="api://another"))
    refused(provider_app(cg.config()), cg.access_token(client_id="another-app-client"))
    # the controls: each provider's own token passes on the same server
    for control_app, token in (
        (provider_app(st.config()), st.token()),
        (provider_app(kc.config()), kc.token()),
        (provider_app(cg.config()), cg.access_token()),
    ):
        assert call(control_app, token)[0] == 200


# -- the provider pages' own code, as written -----------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "providers"


def python_blocks(page: str, section: str) -> list[str]:
    """The ``.. code-block:: python`` blocks under ``section`` of a provider page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    if f"\n{section}\n" not in text:
        return []
    body = text.split(f"\n{section}\n", 1)[1]
    body = re.split(r"\n[^\n]+\n-{3,}\n", body, maxsplit=1)[0]  # up to the next section
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:(?:   [^\n]*)?\n)+)", body + "\n")
    return [textwrap.dedent(block) for block in blocks]


def run_page_app(
    page: str, replace: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> Flask:
    """Run the page's copy-paste app with its URLs pointed at the local server.

    ``extra`` adds settings the page does not write (a test-only switch, a
    key set URL the profile would take from the real provider).
    """
    (source,) = python_blocks(page, "Copy-paste app")
    for production, local in replace.items():
        assert production in source, (page, production)
        source = source.replace(production, local)
    source = source.replace("app.config.update(", "app.config.update(**EXTRA,", 1)
    namespace: dict[str, Any] = {"__name__": f"docs_{page.replace('-', '_')[:-4]}"}
    namespace["EXTRA"] = dict(extra or {})
    exec(compile(source, str(DOCS / page), "exec"), namespace)  # noqa: S102 - our own docs
    app = namespace["app"]
    assert isinstance(app, Flask)
    return app


def send(app: Flask, token: str, path: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    response = app.test_client().open(path, method=method, headers=auth_header(token))
    return response.status_code, response.get_json() or {}


def test_scalekit_page_app(server: IssuerServer) -> None:
    sk = Scalekit(server)
    app = run_page_app("scalekit.rst", {"https://your-env.scalekit.com": sk.issuer})
    assert send(app, sk.m2m_token(), "/deploy", "POST") == (
        200,
        {"organization_id": "org_59615193906282635", "service": "billing-worker"},
    )
    assert send(app, sk.user_token(), "/customers")[0] == 200
    assert send(app, sk.user_token(), "/projects") == (200, {"user_id": sk_user(sk)})
    assert send(app, sk.m2m_token(), "/projects")[0] == 401
    assert send(app, sk.user_token(), "/deploy", "POST")[0] == 403


def sk_user(sk: Scalekit) -> str:
    return str(_claims(sk.user_token())["sub"])


def test_supertokens_page_app(server: IssuerServer) -> None:
    st = SuperTokens(server)
    app = run_page_app("supertokens.rst", {"https://api.example.com": server.url})
    aud = [server.url]
    token = st.token(aud=aud, client_id="<CLIENT_ID>")
    status, body = send(app, token, "/posts")
    assert (status, body.get("client")) == (200, "<CLIENT_ID>"), body
    assert send(app, st.token(aud=aud), "/posts")[0] == 401  # another client
    assert send(app, st.token(aud=aud, client_id="<CLIENT_ID>", stt=2), "/posts")[0] == 401
    allowed = st.token(aud=aud, client_id="<CLIENT_ID>", scp=["delete:account"])
    assert send(app, allowed, "/account", "DELETE")[0] == 200
    assert isinstance(st.introspections[-1].json(), dict)  # strategy="both" asked


def test_voxkey_page_app(server: IssuerServer) -> None:
    vk = VoxKey(server)
    app = run_page_app("voxkey.rst", {"https://your-domain.com": server.url})
    status, body = send(app, vk.user_token(), "/api/posts")
    assert (status, body.get("subject")) == (200, "user_abc123"), body
    assert send(app, vk.user_token(scope="openid profile"), "/api/posts")[0] == 403


def test_beyond_identity_page_app(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = run_page_app(
        "beyond-identity.rst",
        {
            "https://auth-us.beyondidentity.com": server.url,
            "<client id>": bi.client_id,
            "<client secret>": bi.client_secret,
        },
        {"OAUTH_VERIFY_ALLOW_INSECURE_HTTP": True},  # the emulator is plain http
    )
    assert send(app, bi.token(), "/items") == (200, {"user": "7a8cce58fd160449"})
    assert send(app, bi.token(), "/payments", "POST")[0] == 200
    assert bi.introspections, "the payments route introspects"
    assert send(app, bi.token(scope="myapp:read"), "/payments", "POST")[0] == 403


def test_auth0_page_app(server: IssuerServer) -> None:
    a0 = Auth0(server)
    app = run_page_app("auth0.rst", {"https://acme.eu.auth0.com/": a0.issuer})
    assert send(app, a0.user_token(), "/messages") == (
        200,
        {"user": "auth0|64b7f2d0c1a2b3c4d5e6f7a8", "client": "spa-client-id"},
    )
    assert send(app, a0.user_token(), "/org/settings") == (
        200,
        {"organization_id": "org_Hd5g7kL2mN8pQ1rS"},
    )
    assert send(app, a0.m2m_token(), "/org/settings")[0] == 401


def test_okta_page_app(server: IssuerServer) -> None:
    okta = Okta(server)
    app = run_page_app("okta.rst", {"https://dev-1234.okta.com": server.url})
    assert send(app, okta.token(), "/orders") == (
        200,
        {"user": "alice@example.com", "okta_uid": "00u1a2b3c4d5e6f7g8h9"},
    )


def test_entra_page_app(server: IssuerServer) -> None:
    entra = EntraID(server)
    issuers = [entra.v2, entra.v1]
    app = run_page_app(
        "entra-id.rst",
        {
            "https://login.microsoftonline.com": server.url,
            "https://sts.windows.net": f"{server.url}/sts.windows.net",
        },
        # the profile's key set is Microsoft's; the emulator serves its own
        {"OAUTH_VERIFY_JWKS_URI": {issuer: entra.keys_url for issuer in issuers}},
    )
    assert send(app, entra.v2_token(), "/orders") == (
        200,
        {"tenant": entra.home, "user": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ"},
    )
    assert send(app, entra.app_token(), "/orders") == (200, {"tenant": entra.home, "user": None})
    assert send(app, entra.v1_token(scp="Orders.Read"), "/orders")[0] == 200
    assert send(app, entra.v2_token(entra.partner), "/orders")[0] == 401  # not listed


def test_keycloak_page_app(server: IssuerServer) -> None:
    kc = Keycloak(server)
    app = run_page_app("keycloak.rst", {"https://sso.example.com": server.url})
    assert send(app, kc.token(), "/orders") == (
        200,
        {"user": "f:0a1b2c3d:alice", "client": "web-app"},
    )
    assert send(app, kc.token(), "/orders/7", "DELETE") == (200, {"deleted": 7})
    reader = kc.token(realm_access={"roles": ["default-roles-acme"]})
    assert send(app, reader, "/orders/7", "DELETE")[0] == 403


def test_cognito_page_app(server: IssuerServer) -> None:
    cg = Cognito(server)
    app = run_page_app("cognito.rst", {"https://cognito-idp.eu-west-1.amazonaws.com": server.url})
    assert send(app, cg.access_token(), "/orders") == (
        200,
        {"user": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "groups": ["admins"]},
    )
    assert send(app, cg.id_token(), "/orders")[0] == 401


def test_generic_page_app(server: IssuerServer) -> None:
    issuer = TokenIssuer()
    issuer.serve(server)
    app = run_page_app(
        "generic.rst",
        {"https://auth.example.com": issuer.issuer, "https://api.example.com": "api"},
    )
    token = issuer.mint(scopes=["read:reports"], tenant={"id": "t-1"})
    assert send(app, token, "/reports") == (200, {"client": "client-1", "organization_id": "t-1"})


@pytest.mark.parametrize(
    "page", sorted(p.name for p in DOCS.glob("*.rst") if p.name != "index.rst")
)
def test_every_settings_block_builds_an_app(server: IssuerServer, page: str) -> None:
    """Each page's "Settings to write" block is a configuration init_app accepts."""
    sections = ("Settings to write", "Single-tenant API", "Multi-tenant API: templated issuers")
    blocks = [block for section in sections for block in python_blocks(page, section)]
    assert blocks, page
    for block in blocks:
        namespace: dict[str, Any] = {}
        exec(compile(block, str(DOCS / page), "exec"), namespace)  # noqa: S102 - our own docs
        config = {k: v for k, v in namespace.items() if k.startswith("OAUTH_VERIFY_")}
        app = Flask(f"settings_{page[:-4]}")
        app.config.update(config)
        OAuthVerify(app)  # no ConfigurationError


# -- several issuers: each key set is looked for at its own issuer ---------------------


def test_each_issuer_falls_back_to_its_own_key_paths() -> None:
    """With two SuperTokens back ends, each falls back to *its own* SDK path.

    The fallbacks were rendered from the first issuer only and used for
    every issuer: the second issuer's key set was fetched from the first
    issuer's host, so its tokens were checked with another issuer's keys
    (and refused).
    """
    with IssuerServer() as one, IssuerServer() as two:
        first, second = SuperTokens(one), SuperTokens(two)
        app = provider_app(first.config(ISSUER=[first.issuer, second.issuer]))
        assert call(app, first.token())[0] == 200
        status, body = call(app, second.token())
        assert (status, body.get("issuer")) == (200, second.issuer), body
        assert one.hits["/auth/jwt/jwks.json"] == 1
        assert two.hits["/auth/jwt/jwks.json"] == 1


def test_fallbacks_of_several_issuers_are_given_per_issuer() -> None:
    issuers = ["https://a.example.com", "https://b.example.com"]
    base = {"OAUTH_VERIFY_ISSUER": issuers, "OAUTH_VERIFY_AUDIENCE": "api"}
    with pytest.raises(ConfigurationError, match="JWKS_URI_FALLBACKS is one list"):
        Settings.from_config(
            {**base, "OAUTH_VERIFY_JWKS_URI_FALLBACKS": ["https://a.example.com/k"]}
        )
    with pytest.raises(ConfigurationError, match="names issuers not in"):
        Settings.from_config(
            {**base, "OAUTH_VERIFY_JWKS_URI_FALLBACKS": {"https://c.example.com": ["https://c/k"]}}
        )
    nothing: tuple[list[str], tuple[str, ...]] = ([], ())
    for none in nothing:  # a profile's fallbacks turned off, for every issuer
        quiet = Settings.from_config({**base, "OAUTH_VERIFY_JWKS_URI_FALLBACKS": none})
        assert quiet.jwks_uri_fallbacks_for(issuers[1]) == ()
    chosen = Settings.from_config(
        {**base, "OAUTH_VERIFY_JWKS_URI_FALLBACKS": {issuers[1]: "https://b.example.com/k"}}
    )
    assert chosen.jwks_uri_fallbacks_for(issuers[0]) == ()
    assert chosen.jwks_uri_fallbacks_for(issuers[1]) == ("https://b.example.com/k",)
    one = Settings.from_config(
        {
            "OAUTH_VERIFY_PROVIDER": "scalekit",
            "OAUTH_VERIFY_ISSUER": "https://env.scalekit.com",
            "OAUTH_VERIFY_AUDIENCE": "api",
        }
    )
    assert one.jwks_uri_fallbacks_for("https://env.scalekit.com") == (
        "https://env.scalekit.com/.well-known/jwks",
        "https://env.scalekit.com/.well-known/jwks.json",
    )


def test_keycloak_introspection_answer_keeps_the_user(server: IssuerServer) -> None:
    """Keycloak's introspection answer adds ``client_id`` (and ``username``) for
    every token: a user's token introspected lost its ``user_id``, because
    ``client_id`` was taken for the service-account mapper's claim."""
    kc = Keycloak(server)
    app = provider_app(
        kc.config(
            INTROSPECTION_CLIENT_ID=kc.client_id, INTROSPECTION_CLIENT_SECRET=kc.client_secret
        )
    )
    user, service = kc.token(), kc.service_account_token()
    for path in ("/whoami", "/introspected"):
        assert call(app, user, path)[1]["user_id"] == "f:0a1b2c3d:alice", path
        assert call(app, service, path)[1]["user_id"] is None, path
    # without the profile scope (no user name): the service-account mapper's claim decides
    assert call(app, kc.token(preferred_username=None))[1]["user_id"] == "f:0a1b2c3d:alice"
    bare_service = kc.token(preferred_username=None, clientId="batch", azp="batch")
    assert call(app, bare_service)[1]["user_id"] is None


def test_keycloak_organizations_as_the_keycloak_page_says(server: IssuerServer) -> None:
    """The built-in organization claim is no string; a string claim of one's own is."""
    kc = Keycloak(server)
    app = provider_app(kc.config())
    token = kc.token(organization=["acme"], org_id="acme")
    assert call(app, token, "/org") == (200, {"organization_id": "acme"})
    mapped = provider_app(kc.config(CLAIM_MAP={"organization_id": ["organization"]}))
    refused(mapped, kc.token(organization=["acme"]), "/org")
    refused(mapped, kc.token(organization={"acme": {"id": "42c3e46f"}}), "/org")
