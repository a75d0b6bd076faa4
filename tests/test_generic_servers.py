"""ORY Hydra, Zitadel and Duende IdentityServer, with the settings their guide gives.

None of these servers can run here (Go, .NET). Each stand-in below serves,
on 127.0.0.1, the discovery document, key set, tokens and introspection
answers of the shapes the server's source gives (Hydra v2 and fosite;
Zitadel and zitadel/oidc; Duende IdentityServer's token service and
introspection endpoint), and the app is configured with the settings of
``docs/providers/generic.rst``, only its URLs replaced by the stand-in's.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

import pytest
from flask import Flask, g
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify, require_token, require_user
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import guide_settings

GUIDE = Path(__file__).parents[1] / "docs" / "providers" / "generic.rst"
Answers = dict[str, dict[str, Any]]


def server_app(settings: dict[str, Any], **local: Any) -> Flask:
    """An app with the guide's settings, the stand-in's URLs over them."""
    app = Flask("generic_server")
    app.config.update(TESTING=True, **settings)
    app.config.update({f"OAUTH_VERIFY_{k}": v for k, v in local.items()})
    OAuthVerify(app)

    @app.get("/whoami")
    @require_token
    def whoami() -> dict[str, Any]:
        auth = g.auth
        return {
            "client": auth.client_id,
            "user": auth.user_id,
            "organization": auth.organization_id,
            "scopes": sorted(auth.scopes),
        }

    @app.get("/mine")
    @require_user
    def mine() -> dict[str, Any]:
        return {"user": g.auth.user_id}

    return app


def ask(app: Flask, token: str, path: str = "/whoami") -> TestResponse:
    return app.test_client().get(path, headers=auth_header(token))


def who(app: Flask, token: str) -> Any:
    response = ask(app, token)
    assert response.status_code == 200, response.json
    return response.json


def refused(app: Flask, token: str) -> bool:
    response = ask(app, token)
    return response.status_code == 401 and response.headers["WWW-Authenticate"].startswith(
        "Bearer "
    )


def at_hash(token: str) -> str:
    """OpenID Connect's at_hash of ``token`` (RS256: the left half of its SHA-256)."""
    digest = hashlib.sha256(token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def introspection(
    answers: Answers, authorized: Callable[[Request], bool]
) -> Callable[[Request], Reply]:
    """An RFC 7662 endpoint answering from ``answers`` to authorized callers."""

    def endpoint(request: Request) -> Reply:
        if not authorized(request):
            return Reply(401, {"error": "invalid_client"})
        return Reply(200, answers.get(request.form().get("token", ""), {"active": False}))

    return endpoint


def basic_credentials(request: Request, decode: Callable[[str], str]) -> tuple[str, str]:
    value = request.headers.get("Authorization", "")
    if not value.startswith("Basic "):
        return "", ""
    user, _, password = base64.b64decode(value[6:]).decode().partition(":")
    return decode(user), decode(password)


def key_set(issuer: TokenIssuer) -> Callable[[Request], Reply]:
    return lambda _request: Reply(200, issuer.jwks())


def now() -> int:
    return int(time.time())


# -- ORY Hydra ---------------------------------------------------------------------

HYDRA_API = "https://api.example.com"


class Hydra:
    """Hydra v2: public and admin ports; introspection on the admin port only."""

    def __init__(self, public: IssuerServer, admin: IssuerServer) -> None:
        self.keys = TokenIssuer(public.url)
        self.kid = str(uuid.uuid4())
        self.keys.current_kid = self.keys.add_key("RS256", kid=self.kid)
        self.issuer = public.url
        self.admin = admin
        self.answers: Answers = {}
        metadata = {  # no introspection_endpoint: it is on the admin API
            "issuer": self.issuer,
            "jwks_uri": f"{public.url}/.well-known/jwks.json",
            "token_endpoint": f"{public.url}/oauth2/token",
            "authorization_endpoint": f"{public.url}/oauth2/auth",
        }
        public.route("/.well-known/openid-configuration", Reply(200, metadata))
        public.route("/.well-known/jwks.json", key_set(self.keys))
        # no client authentication there (and none sent with the guide's settings)
        unauthenticated = introspection(self.answers, lambda r: "Authorization" not in r.headers)
        admin.route("/admin/oauth2/introspect", unauthenticated)

    def claims(self, sub: str, client: str, aud: list[str], **ext: Any) -> dict[str, Any]:
        """fosite's JWT access-token claims (scp, ext, aud as requested)."""
        issued = now()
        return {
            "aud": aud,
            "client_id": client,
            "exp": issued + 3600,
            "ext": ext,
            "iat": issued,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "nbf": issued,
            "scp": ["read:reports"],
            "sub": sub,
        }

    def jwt(self, claims: dict[str, Any]) -> str:
        return self.keys.mint(claims, typ="JWT")

    def opaque(self, claims: dict[str, Any], use: str = "access_token") -> str:
        token = f"ory_{'at' if use == 'access_token' else 'rt'}_{secrets.token_urlsafe(32)}"
        answer = {k: v for k, v in claims.items() if k not in ("scp", "jti")}
        scope = " ".join(claims["scp"])
        self.answers[token] = {"active": True, **answer, "scope": scope, "token_use": use}
        self.answers[token]["token_type"] = "Bearer"
        return token

    def app(self) -> Flask:
        return server_app(
            guide_settings(GUIDE, "Hydra (v2) issues"),
            ISSUER=self.issuer,
            INTROSPECTION_ENDPOINT=f"{self.admin.url}/admin/oauth2/introspect",
        )


@pytest.fixture
def hydra() -> Iterator[Hydra]:
    with IssuerServer() as public, IssuerServer() as admin:
        yield Hydra(public, admin)


def test_hydra_jwt_and_opaque_tokens_with_the_guide_settings(hydra: Hydra) -> None:
    app = hydra.app()
    alice = hydra.claims("alice", "reports-web", [HYDRA_API], org_id="org-7")
    service = hydra.claims("reports-batch", "reports-batch", [HYDRA_API])
    for token in (hydra.jwt(alice), hydra.opaque(alice)):
        assert who(app, token) == {
            "client": "reports-web",
            "user": "alice",
            "organization": "org-7",
            "scopes": ["read:reports"],
        }
    for token in (hydra.jwt(service), hydra.opaque(service)):
        assert who(app, token)["user"] is None
        assert ask(app, token, "/mine").status_code == 401
    # aud is [] unless the client is registered for the API and asked for it
    unasked = hydra.claims("alice", "reports-web", [])
    assert refused(app, hydra.jwt(unasked))
    assert refused(app, hydra.opaque(unasked))
    assert refused(app, hydra.opaque(alice, use="refresh_token"))
    assert refused(app, "ory_at_unknown")
    id_token = {**alice, "aud": ["reports-web"], "at_hash": at_hash("x"), "rat": now()}
    del id_token["scp"], id_token["client_id"]
    assert refused(app, hydra.jwt(id_token))


def test_hydra_opaque_tokens_need_the_admin_endpoint(hydra: Hydra) -> None:
    """Why the guide names the endpoint: discovery does not give it."""
    settings = guide_settings(GUIDE, "Hydra (v2) issues")
    del settings["OAUTH_VERIFY_INTROSPECTION_ENDPOINT"]
    app = server_app(settings, ISSUER=hydra.issuer)
    token = hydra.opaque(hydra.claims("alice", "reports-web", [HYDRA_API]))
    assert ask(app, token).status_code == 503
    assert hydra.admin.hits.get("/admin/oauth2/introspect", 0) == 0


# -- Zitadel ---------------------------------------------------------------------------

PROJECT = "269870436183162883"
WEB_APP = "269870436183228419@myproject"
ORGANIZATION = "269870436183031811"
RESOURCE_OWNER = "urn:zitadel:iam:user:resourceowner:id"


class Zitadel:
    """Zitadel: aud = project and client ids; introspection with Basic (URL-decoded)."""

    def __init__(self, server: IssuerServer) -> None:
        self.keys = TokenIssuer(server.url)
        self.issuer = server.url
        self.answers: Answers = {}
        settings = guide_settings(GUIDE, "Zitadel's ``aud`` holds")
        self.api_app = settings["OAUTH_VERIFY_INTROSPECTION_CLIENT_ID"]
        self.secret = settings["OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET"]
        metadata = {
            "issuer": self.issuer,
            "jwks_uri": f"{server.url}/oauth/v2/keys",
            "introspection_endpoint": f"{server.url}/oauth/v2/introspect",
            "introspection_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "private_key_jwt",
            ],
        }
        server.route("/.well-known/openid-configuration", Reply(200, metadata))
        server.route("/oauth/v2/keys", key_set(self.keys))
        credentials = (self.api_app, self.secret)
        server.route(
            "/oauth/v2/introspect",
            introspection(self.answers, lambda r: basic_credentials(r, unquote) == credentials),
        )

    def access(self, sub: str, aud: list[str], **extra: Any) -> dict[str, Any]:
        """zitadel/oidc's access-token claims: no scope, no client_id, no azp."""
        issued = now()
        claims = {"iss": self.issuer, "sub": sub, "aud": aud, "exp": issued + 3600}
        claims.update(iat=issued, nbf=issued, jti=str(issued), **extra)
        return claims

    def id_token(self, sub: str, client: str, access_token: str | None = None) -> str:
        """An ID token: the project in aud too; at_hash only beside an access token."""
        issued = now()
        claims: dict[str, Any] = {"iss": self.issuer, "sub": sub, "aud": [client, PROJECT]}
        claims["azp"] = client
        claims.update(exp=issued + 3600, iat=issued, auth_time=issued, nonce="n-0S6_WzA2Mj")
        if access_token is not None:
            claims["at_hash"] = at_hash(access_token)
        return self.keys.mint(claims, typ="JWT")

    def jwt(self, claims: dict[str, Any]) -> str:
        return self.keys.mint(claims, typ="JWT")

    def opaque(self, claims: dict[str, Any], client: str, scope: str) -> str:
        """Its introspection answer: the token's claims, client_id and scope."""
        token = secrets.token_urlsafe(48)
        self.answers[token] = {"active": True, **claims, "client_id": client, "scope": scope}
        self.answers[token]["token_type"] = "Bearer"
        return token

    def app(self, **changed: Any) -> Flask:
        settings = guide_settings(GUIDE, "Zitadel's ``aud`` holds")
        settings.update({f"OAUTH_VERIFY_{k}": v for k, v in changed.items()})
        return server_app(settings, ISSUER=self.issuer)


@pytest.fixture
def zitadel() -> Iterator[Zitadel]:
    with IssuerServer() as server:
        yield Zitadel(server)


def test_zitadel_tokens_with_the_guide_settings(zitadel: Zitadel) -> None:
    app = zitadel.app()
    alice = zitadel.access("2698704111", [WEB_APP, PROJECT], **{RESOURCE_OWNER: ORGANIZATION})
    jwt_token = zitadel.jwt(alice)
    assert who(app, jwt_token) == {
        "client": None,  # its JWT access tokens name no client ...
        "user": "2698704111",
        "organization": ORGANIZATION,
        "scopes": [],  # ... and no scope
    }
    scope = "openid profile urn:zitadel:iam:user:resourceowner"
    answer = who(app, zitadel.opaque(alice, WEB_APP, scope))
    assert (answer["client"], answer["user"]) == (WEB_APP, "2698704111")
    assert answer["organization"] == ORGANIZATION and "openid" in answer["scopes"]
    # ID tokens carry the project in aud: refused, with or without at_hash
    assert refused(app, zitadel.id_token("2698704111", WEB_APP, access_token=jwt_token))
    assert refused(app, zitadel.id_token("2698704111", WEB_APP))
    # a machine user without the project's aud scope: aud is its own client id
    assert refused(app, zitadel.jwt(zitadel.access("2698705001", ["billing-bot"])))
    # ... with it: accepted, and it counts as acting for a user (as documented)
    machine = zitadel.access("2698705001", [PROJECT])
    assert who(app, zitadel.jwt(machine))["user"] == "2698705001"
    assert who(app, zitadel.opaque(machine, "billing-bot", ""))["user"] == "2698705001"
    assert refused(app, "refresh-" + secrets.token_urlsafe(16))  # Zitadel: active false


def test_zitadel_id_tokens_pass_without_the_refused_claims(zitadel: Zitadel) -> None:
    """Why the guide refuses azp and nonce: an ID token without at_hash passed."""
    app = zitadel.app(REFUSED_CLAIMS=["at_hash", "c_hash", "cnf"])
    assert who(app, zitadel.id_token("2698704111", WEB_APP))["user"] == "2698704111"


# -- Duende IdentityServer ---------------------------------------------------------------


class Duende:
    """Duende IdentityServer: aud = API resources; introspection by the API resource."""

    def __init__(self, server: IssuerServer) -> None:
        self.keys = TokenIssuer(server.url)
        self.keys.current_kid = self.keys.add_key("RS256", kid=secrets.token_hex(16).upper())
        self.issuer = server.url
        self.answers: Answers = {}
        settings = guide_settings(GUIDE, "Duende IdentityServer issues")
        self.resource = settings["OAUTH_VERIFY_AUDIENCE"]
        # a secret needing form-encoding in Basic (RFC 6749 §2.3.1), as it decodes it
        self.secret = "s3cr3t+/=:%"
        metadata = {
            "issuer": self.issuer,
            "jwks_uri": f"{server.url}/.well-known/openid-configuration/jwks",
            "introspection_endpoint": f"{server.url}/connect/introspect",
        }
        server.route("/.well-known/openid-configuration", Reply(200, metadata))
        server.route("/.well-known/openid-configuration/jwks", key_set(self.keys))
        credentials = (self.resource, self.secret)
        server.route(
            "/connect/introspect",
            introspection(
                self.answers, lambda r: basic_credentials(r, unquote_plus) == credentials
            ),
        )

    def claims(self, client: str, aud: list[str] | None, sub: str | None = None) -> dict[str, Any]:
        """Its access-token claims: scope as an array, aud only for API resources."""
        issued = now()
        claims: dict[str, Any] = {"iss": self.issuer, "nbf": issued, "iat": issued}
        claims["exp"] = issued + 3600
        if aud is not None:
            claims["aud"] = aud[0] if len(aud) == 1 else aud
        claims.update(scope=["orders.read"], client_id=client, jti=secrets.token_hex(16))
        if sub is not None:
            claims.update(sub=sub, auth_time=issued, idp="local", amr=["pwd"])
        return claims

    def jwt(self, claims: dict[str, Any]) -> str:
        return self.keys.mint(claims, typ="at+jwt")

    def reference(self, claims: dict[str, Any]) -> str:
        token = secrets.token_hex(32).upper()
        scope = " ".join(claims["scope"])
        self.answers[token] = {**claims, "active": True, "scope": scope}
        self.answers[token]["token_type"] = "access_token"
        return token

    def app(self) -> Flask:
        return server_app(
            guide_settings(GUIDE, "Duende IdentityServer issues"),
            ISSUER=self.issuer,
            INTROSPECTION_CLIENT_SECRET=self.secret,
        )


@pytest.fixture
def duende() -> Iterator[Duende]:
    with IssuerServer() as server:
        yield Duende(server)


def test_duende_tokens_with_the_guide_settings(duende: Duende) -> None:
    app = duende.app()
    machine = duende.claims("m2m", [duende.resource])
    person = duende.claims("web", [duende.resource, "urn:billing-api"], sub="818727")
    for token in (duende.jwt(machine), duende.reference(machine)):
        assert who(app, token) == {
            "client": "m2m",
            "user": None,
            "organization": None,
            "scopes": ["orders.read"],
        }
    for token in (duende.jwt(person), duende.reference(person)):
        assert who(app, token)["user"] == "818727"
    # with EmitStaticAudienceClaim, beside the API resources
    static = f"{duende.issuer}/resources"
    assert who(app, duende.jwt(duende.claims("m2m", [duende.resource, static])))["client"] == "m2m"
    # API scopes alone (no API resource): only the static audience, or none
    assert refused(app, duende.jwt(duende.claims("m2m", [static])))
    assert refused(app, duende.jwt(duende.claims("m2m", None)))
    issued = now()
    id_token: dict[str, Any] = {"iss": duende.issuer, "aud": "web", "sub": "818727"}
    id_token.update(iat=issued, nbf=issued, exp=issued + 300, at_hash=at_hash("x"), nonce="n")
    assert refused(app, duende.keys.mint(id_token, typ="JWT"))
