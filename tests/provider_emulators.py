"""Local emulators of the supported authorization servers.

Each emulator is a real HTTP server on 127.0.0.1 (an :class:`IssuerServer`)
that serves the provider's *documented* paths — key set, introspection,
token endpoint where the tests need one — and mints tokens in the
provider's documented shapes, including the shapes a resource server must
refuse (a SuperTokens session token, a Cognito ID token, ...). Introspection
handlers accept only the provider's documented request format, so a request
in the wrong shape fails the test instead of passing by accident.

The shapes follow the providers' public documentation (see
``../shared/reference`` for Scalekit, SuperTokens, VoxKey and Beyond
Identity).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, b64url

__all__ = [
    "Auth0",
    "BeyondIdentity",
    "Cognito",
    "Emulator",
    "EntraID",
    "Keycloak",
    "Okta",
    "Scalekit",
    "SuperTokens",
    "VoxKey",
    "basic",
]


def basic(client_id: str, secret: str) -> str:
    """The ``Authorization`` value of HTTP Basic credentials."""
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def b64decode(segment: str) -> bytes:
    """Decode one base64url segment of a compact JWS."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _header(request: Request, name: str) -> str:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _content_type(request: Request) -> str:
    return _header(request, "Content-Type").split(";")[0].strip().lower()


class Emulator:
    """Common parts: one signing key, a real server, token minting.

    :param server: the server to add the provider's routes to.
    :param issuer_path: the issuer's path on the server (may be empty).
    :param kid: the key id the provider uses in its key set.
    """

    #: the ``OAUTH_VERIFY_PROVIDER`` value
    provider: ClassVar[str] = "generic"
    #: the audience (API identifier) the emulator's tokens carry
    audience: ClassVar[str | list[str]] = "https://api.example.com"
    #: client credentials of the resource server at introspection
    client_id: ClassVar[str] = "resource-server"
    #: (an instance may hold another: a test of a secret's encoding)
    client_secret: str = "rs-secret"

    def __init__(
        self, server: IssuerServer, issuer_path: str = "", *, kid: str | None = None
    ) -> None:
        self.server = server
        self.issuer = server.url + issuer_path
        self.signer = TokenIssuer(issuer=self.issuer)
        if kid is not None:
            old = self.signer.current_kid
            self.signer.add_key("RS256", kid=kid, key=self.signer.key(old))
            self.signer.current_kid = kid
            self.signer.remove_key(old)
        #: tokens the introspection endpoint knows as active
        self.active: dict[str, dict[str, Any]] = {}
        #: introspection requests as received
        self.introspections: list[Request] = []

    # -- tokens ---------------------------------------------------------------

    def times(self, lifetime: int = 3600) -> dict[str, int]:
        """``iat``/``nbf``/``exp`` for a token issued now."""
        now = int(time.time())
        return {"iat": now, "nbf": now, "exp": now + lifetime}

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        headers: Mapping[str, Any] | None = None,
        typ: str | None = "JWT",
    ) -> str:
        """Sign ``claims`` with the provider's key; the token is then active."""
        token = self.signer.mint(dict(claims), headers=headers, typ=typ)
        self.active[token] = dict(claims)
        return token

    def config(self, **extra: Any) -> dict[str, Any]:
        """The whole configuration an app writes for this provider."""
        config: dict[str, Any] = {
            "OAUTH_VERIFY_PROVIDER": self.provider,
            "OAUTH_VERIFY_ISSUER": self.issuer,
            "OAUTH_VERIFY_AUDIENCE": self.audience,
        }
        config.update({f"OAUTH_VERIFY_{k}": v for k, v in extra.items()})
        return {k: v for k, v in config.items() if v is not None}

    def jwks_reply(self, _request: Request) -> Reply:
        """The key set, cacheable for ten minutes."""
        return Reply(200, self.signer.jwks(), {"Cache-Control": "public, max-age=600"})

    def answer(self, token: str | None) -> Reply:
        """The RFC 7662 answer for ``token``."""
        claims = self.active.get(token or "")
        if claims is None or claims.get("exp", 0) <= time.time():
            return Reply(200, {"active": False})
        return Reply(200, {"active": True, **self.answer_claims(claims)})

    def answer_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """What the provider's active answer says about a token (all claims)."""
        return dict(claims)

    def form_basic_introspection(self, request: Request) -> Reply:
        """RFC 7662 as most providers document it: a form, HTTP Basic."""
        self.introspections.append(request)
        if (
            request.method != "POST"
            or _content_type(request) != "application/x-www-form-urlencoded"
        ):
            return Reply(400, {"error": "invalid_request"})
        if _header(request, "Authorization") != basic(self.client_id, self.client_secret):
            return Reply(401, {"error": "invalid_client"}, {"WWW-Authenticate": "Basic"})
        return self.answer(request.form().get("token"))


class Scalekit(Emulator):
    """Scalekit environment: ``/keys`` (``snk_`` kids), ``/oauth/introspect``."""

    provider = "scalekit"
    audience = "api.yourcompany.com"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, kid="snk_58327480989122566")
        server.route("/keys", self.jwks_reply)
        server.route("/oauth/introspect", self.form_basic_introspection)

    def m2m_token(self, **overrides: Any) -> str:
        """A client-credentials token of an organization's API client."""
        claims = {
            "iss": self.issuer,
            "sub": "m2morg_69038819013296423",
            "aud": [self.audience],
            "client_id": "m2morg_69038819013296423",
            "oid": "org_59615193906282635",
            "scopes": ["deploy:applications", "read:deployments"],
            "custom_claims": {"service_name": "billing-worker", "client_type": "m2m"},
            "jti": "tkn_" + uuid.uuid4().hex,
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)

    def user_token(self, **overrides: Any) -> str:
        """A token that acts for a user of an organization."""
        claims = {
            "iss": self.issuer,
            "sub": "user_69038819013296500",
            "aud": [self.audience],
            "client_id": "skc_app_1",
            "oid": "org_59615193906282635",
            "scope": "openid read:deployments",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)


class SuperTokens(Emulator):
    """SuperTokens backend: issuer ``<API domain>/auth``.

    Keys at ``<API domain>/auth/jwt/jwks.json``, introspection at
    ``<API domain>/auth/oauth/introspect`` with a JSON body
    ``{"token": ...}`` and no client authentication.
    """

    provider = "supertokens"
    audience = "https://api.example.com"
    oauth_client = "stcl_4b7f1e0c"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, "/auth", kid="d-1719837393530")
        server.route("/auth/jwt/jwks.json", self.jwks_reply)
        server.route("/auth/oauth/introspect", self.json_introspection)

    def json_introspection(self, request: Request) -> Reply:
        """``POST`` a JSON object ``{"token": ...}`` (no client auth)."""
        self.introspections.append(request)
        body = request.json()
        if _content_type(request) != "application/json" or not isinstance(body, dict):
            return Reply(400, {"error": "invalid_request"})
        return self.answer(body.get("token"))

    def token(self, stt: int = 1, **overrides: Any) -> str:
        """An OAuth2 access token (``stt`` 1), or another type by ``stt``."""
        claims = {
            "iss": self.issuer,
            "sub": "fa7a0841-b533-4478-95533-0fde890c3483",
            "aud": [self.audience],
            "client_id": self.oauth_client,
            "scp": ["offline_access", "read:posts"],
            "stt": stt,
            "sessionHandle": "c5f0d9a8-17de-4e1b-96b3-aaa6b8c0f0c3",
            "tId": "public",
            "jti": uuid.uuid4().hex,
            **self.times(),
        }
        claims.update(overrides)
        return self.sign({k: v for k, v in claims.items() if v is not None})

    def session_token(self) -> str:
        """A SuperTokens *session* access token (``stt: 0``): same keys, not OAuth."""
        return self.token(stt=0, client_id=None, scp=None)


class VoxKey(Emulator):
    """VoxKey realm: ``/oauth2/{realm}/oidc/jwks``, ``/introspect``, ``/token``."""

    provider = "voxkey"
    realm = "6f1d2c3b-4a59-4e8f-9a0b-1c2d3e4f5a6b"
    service_client = ("svc-reporting", "svc-secret")

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, f"/oauth2/{self.realm}", kid="vk-2024-01")
        self.resource = f"{server.url}/api/v1/{self.realm}"
        base = f"/oauth2/{self.realm}"
        server.route(f"{base}/oidc/jwks", self.jwks_reply)
        server.route(f"{base}/introspect", self.form_basic_introspection)
        server.route(f"{base}/token", self.token_endpoint)

    def config(self, **extra: Any) -> dict[str, Any]:
        """The API's resource indicator is its audience."""
        return super().config(AUDIENCE=self.resource, **extra)

    def token_endpoint(self, request: Request) -> Reply:
        """Client credentials grant (form, secret in the body)."""
        form = request.form()
        if form.get("grant_type") != "client_credentials":
            return Reply(400, {"error": "unsupported_grant_type"})
        if (form.get("client_id"), form.get("client_secret")) != self.service_client:
            return Reply(401, {"error": "invalid_client"})
        claims = {
            "iss": self.issuer,
            "sub": form["client_id"],
            "client_id": form["client_id"],
            "aud": form.get("resource", self.resource),
            "scope": form.get("scope", ""),
            "jti": uuid.uuid4().hex,
            **self.times(900),
        }
        token = self.sign(claims)
        return Reply(200, {"access_token": token, "token_type": "Bearer", "expires_in": 900})

    def answer_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """VoxKey's documented answer: sub, client_id, scope, exp, iat."""
        return {k: claims[k] for k in ("sub", "client_id", "scope", "exp", "iat") if k in claims}

    def user_token(self, **overrides: Any) -> str:
        """A user's token for the API."""
        claims = {
            "iss": self.issuer,
            "sub": "user_abc123",
            "client_id": "your-app",
            "aud": self.resource,
            "scope": "openid profile read:posts",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)


class BeyondIdentity(Emulator):
    """Beyond Identity realm: keys only through the token's ``jku``.

    Serves the application's key set (``Cache-Control: max-age``) and the
    realm's introspection endpoint, which accepts HTTP Basic client
    credentials or a bearer token holding ``tokens:introspect`` for the
    audience ``beyondidentity``.
    """

    provider = "beyond_identity"
    tenant = "00011f1183c67b69"
    realm = "19a95130480dfe32"
    application = "4d1a51d6-7b7e-4c8b-a1d5-3c9c6f3b2e10"
    app_client = "Yx8VvKq3bR1_app_client"
    resource_server = "http://myexampleapi"

    def __init__(self, server: IssuerServer) -> None:
        base = f"/v1/tenants/{self.tenant}/realms/{self.realm}"
        super().__init__(server, f"{base}/applications/{self.application}", kid="bi-key-1")
        self.jwks_path = f"{base}/applications/{self.application}/.well-known/jwks.json"
        self.jku = server.url + self.jwks_path
        self.api_token = "bi-api-token-" + uuid.uuid4().hex
        server.route(self.jwks_path, self.jwks_reply)
        server.route(f"{base}/introspect", self.introspection)

    def raw_token(self, headers: Mapping[str, Any], **overrides: Any) -> str:
        """A token with a header no JOSE library would write (e.g. a bad ``jku``)."""
        claims = json.loads(b64decode(self.token(**overrides).split(".")[1]))
        header = {"alg": "RS256", "kid": self.signer.current_kid, "typ": "JWT", **headers}
        signing_input = f"{b64url(header)}.{b64url(claims)}".encode()
        private = self.signer.key().private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input.decode()}.{b64url(signature)}"
        self.active[token] = claims
        return token

    def config(self, **extra: Any) -> dict[str, Any]:
        """Application id or resource-server identifier; http jku in tests only."""
        extra.setdefault("ALLOW_INSECURE_HTTP", True)
        return super().config(AUDIENCE=[self.app_client, self.resource_server], **extra)

    def introspection(self, request: Request) -> Reply:
        """Form body; Basic app credentials or a ``tokens:introspect`` bearer."""
        self.introspections.append(request)
        if _content_type(request) != "application/x-www-form-urlencoded":
            return Reply(400, {"error": "invalid_request"})
        authorization = _header(request, "Authorization")
        allowed = (
            basic(self.client_id, self.client_secret),
            f"Bearer {self.api_token}",
        )
        if authorization not in allowed:
            return Reply(401, {"error": "invalid_client"})
        return self.answer(request.form().get("token"))

    #: the documented answer has no bi_t/bi_r; set True to include them
    answer_has_targets = False

    def answer_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """Beyond Identity's documented answer (no ``bi_t``/``bi_r``)."""
        names = ["bi_ty", "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "azp"]
        names += ["bi_p", "bi_s", "bi_x"]
        if self.answer_has_targets:
            names += ["bi_t", "bi_r"]
        return {k: claims[k] for k in names if k in claims}

    def token(self, *, jku: str | None = "", **overrides: Any) -> str:
        """An access token; ``jku`` defaults to the application's key set."""
        claims = {
            "bi_ty": "authorization_code",
            "iss": self.issuer,
            "sub": "7a8cce58fd160449",
            "aud": [self.app_client, self.resource_server],
            "jti": "cKigHwlWRW5h3Dv4CCMBICiqf-j1i1yJ",
            "scope": "myapp:read myapp:write",
            "azp": f"tenants/{self.tenant}/realms/{self.realm}/applications/{self.application}",
            "bi_p": f"tenants/{self.tenant}/realms/{self.realm}/identities/7a8cce58fd160449",
            "bi_s": "",
            "bi_t": self.tenant,
            "bi_r": self.realm,
            "bi_x": "c6EBNy5gJnhfSmDr1Q70fzfw5v7kpssL",
            **self.times(),
        }
        claims.update(overrides)
        headers = {} if jku is None else {"jku": jku or self.jku}
        return self.sign({k: v for k, v in claims.items() if v is not None}, headers=headers)


class Auth0(Emulator):
    """Auth0 tenant: issuer with a trailing slash, ``/.well-known/jwks.json``."""

    provider = "auth0"
    audience = "https://api.example.com"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, "/", kid="Wq8g0rKk0nQ0bM9c2o7a1")
        server.route("/.well-known/jwks.json", self.jwks_reply)

    def user_token(self, **overrides: Any) -> str:
        """A user's token, for an organization.

        RBAC on, with "Add Permissions in the Access Token": ``scope`` holds
        what the client requested and the user may do (read and write),
        ``permissions`` every permission of the user (delete too).
        """
        claims = {
            "iss": self.issuer,
            "sub": "auth0|64b7f2d0c1a2b3c4d5e6f7a8",
            "aud": [self.audience, f"{self.issuer}userinfo"],
            "azp": "spa-client-id",
            "scope": "openid profile email read:messages write:messages",
            "permissions": ["read:messages", "write:messages", "delete:messages"],
            "org_id": "org_Hd5g7kL2mN8pQ1rS",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims, typ="at+jwt")

    def m2m_token(self, **overrides: Any) -> str:
        """A client-credentials token (``gty``, subject ``<client>@clients``)."""
        claims = {
            "iss": self.issuer,
            "sub": "m2m-client-id@clients",
            "aud": self.audience,
            "azp": "m2m-client-id",
            "gty": "client-credentials",
            "scope": "read:reports",
            "permissions": ["read:reports"],
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims, typ="at+jwt")


class Okta(Emulator):
    """Okta custom authorization server ``/oauth2/default``."""

    provider = "okta"
    audience = "api://default"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, "/oauth2/default", kid="zYp9xO8wq7vU6t5s4r3")
        server.route("/oauth2/default/v1/keys", self.jwks_reply)
        server.route("/oauth2/default/v1/introspect", self.form_basic_introspection)

    def answer_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """Okta's introspection answer: RFC 7662 names (``scope``, ``client_id``)."""
        answer = {
            k: claims[k] for k in ("sub", "aud", "iss", "exp", "iat", "jti", "uid") if k in claims
        }
        answer.update(
            scope=" ".join(claims.get("scp", [])),
            client_id=claims.get("cid"),
            username=claims.get("sub"),
            token_type="Bearer",
        )
        return answer

    def token(self, **overrides: Any) -> str:
        """A user's access token (``scp`` array, ``cid``, ``uid``)."""
        claims = {
            "ver": 1,
            "jti": "AT." + uuid.uuid4().hex,
            "iss": self.issuer,
            "aud": self.audience,
            "cid": "0oa1b2c3d4e5f6g7h8i9",
            "uid": "00u1a2b3c4d5e6f7g8h9",
            "scp": ["openid", "email", "orders:read"],
            "sub": "alice@example.com",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign({k: v for k, v in claims.items() if v is not None}, typ=None)


class EntraID(Emulator):
    """Microsoft Entra ID: tenant-named issuers, one shared ("common") key set.

    v2 issuer ``<host>/{tenantid}/v2.0``; v1 issuer
    ``<host>/sts.windows.net/{tenantid}/`` (the real one is on
    ``sts.windows.net``).
    """

    provider = "entra_id"
    api_client = "6e74172b-be56-4843-9ff4-e66a39bb12e3"
    app_id_uri = "api://orders-api"
    home = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    partner = "4d7c1a52-0b6e-4f3a-9e21-6c8d5b7a9f10"
    #: the tenant of every personal Microsoft account: no organization
    consumers = "9188040d-6c67-4c5b-b112-36a304b66dad"
    stranger = "f8cdef31-a31e-4b4a-93e4-5f571e91255a"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, kid="nOo3ZDrODXEK1jKWhXslHR_KXEg")
        self.keys_url = f"{server.url}/common/discovery/v2.0/keys"
        self.v2 = f"{server.url}/{{tenantid}}/v2.0"
        self.v1 = f"{server.url}/sts.windows.net/{{tenantid}}/"
        server.route("/common/discovery/v2.0/keys", self.jwks_reply)

    def config(self, **extra: Any) -> dict[str, Any]:
        """Multi-tenant: both issuer templates, two allowed tenants."""
        extra.setdefault("ISSUER", [self.v2, self.v1])
        extra.setdefault("ALLOWED_TENANTS", [self.home, self.partner])
        issuers = extra["ISSUER"] if isinstance(extra["ISSUER"], list) else [extra["ISSUER"]]
        extra.setdefault("JWKS_URI", {issuer: self.keys_url for issuer in issuers})
        config = super().config(**extra)
        config["OAUTH_VERIFY_AUDIENCE"] = [self.api_client, self.app_id_uri]
        return config

    def v2_token(self, tenant: str | None = None, **overrides: Any) -> str:
        """A delegated v2 token (``scp`` string, ``azp``, ``tid``)."""
        tid = tenant or self.home
        claims = {
            "aud": self.api_client,
            "iss": self.v2.replace("{tenantid}", tid),
            "azp": "0ce8a2f0-2c0d-4f1b-bd3e-7c9a0b4f3e21",
            "azpacr": "0",
            "name": "Alice",
            "oid": "00000000-0000-0000-66f3-3332eca7ea81",
            "preferred_username": "alice@contoso.com",
            "scp": "access_as_user Orders.Read",
            "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
            "tid": tid,
            "ver": "2.0",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)

    def app_token(self, tenant: str | None = None, **overrides: Any) -> str:
        """An app-only v2 token (``roles``, no ``scp``)."""
        tid = tenant or self.home
        claims = {
            "aud": self.api_client,
            "iss": self.v2.replace("{tenantid}", tid),
            "azp": "daemon-app-0000-0000-000000000001",
            "oid": "7c0b1e52-0e0b-4a2a-9a5d-b0b5a2f1f0c9",
            "sub": "7c0b1e52-0e0b-4a2a-9a5d-b0b5a2f1f0c9",
            "roles": ["Orders.Read.All"],
            "idtyp": "app",
            "tid": tid,
            "ver": "2.0",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)

    def v1_token(self, tenant: str | None = None, **overrides: Any) -> str:
        """A delegated v1 token (``appid``, App ID URI audience)."""
        tid = tenant or self.home
        claims = {
            "aud": self.app_id_uri,
            "iss": self.v1.replace("{tenantid}", tid),
            "appid": "1950a258-227b-4e31-a9cf-717495945fc2",
            "oid": "00000000-0000-0000-66f3-3332eca7ea81",
            "scp": "user_impersonation",
            "sub": "l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA",
            "tid": tid,
            "ver": "1.0",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims)


class Keycloak(Emulator):
    """Keycloak realm ``acme``: ``/realms/acme/protocol/openid-connect/...``."""

    provider = "keycloak"
    audience = "orders-api"
    realm = "acme"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, f"/realms/{self.realm}", kid="kc-rsa-1")
        base = f"/realms/{self.realm}/protocol/openid-connect"
        server.route(f"{base}/certs", self.jwks_reply)
        server.route(f"{base}/token/introspect", self.form_basic_introspection)
        #: holds the private half of the realm's encryption key (to forge with)
        self.encryption_holder = TokenIssuer(issuer=self.issuer)
        (published,) = self.encryption_holder.jwks()["keys"]
        self.encryption_key = {**published, "use": "enc", "alg": "RSA-OAEP"}

    def jwks_reply(self, _request: Request) -> Reply:
        """The realm's keys as Keycloak serves them: its encryption key beside
        the signing keys, and ``Cache-Control: no-cache``."""
        keys = self.signer.jwks()
        return Reply(
            200,
            {"keys": [*keys["keys"], self.encryption_key]},
            {"Cache-Control": "no-cache"},
        )

    def answer_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """Keycloak answers with the token's claims plus ``client_id``, ``username``."""
        return {
            **claims,
            "client_id": claims.get("azp"),
            "username": claims.get("preferred_username"),
            "token_type": "Bearer",
        }

    def token(self, **overrides: Any) -> str:
        """A user's access token (``typ: Bearer``)."""
        claims = {
            "jti": uuid.uuid4().hex,
            "iss": self.issuer,
            "aud": [self.audience, "account"],
            "sub": "f:0a1b2c3d:alice",
            "typ": "Bearer",
            "azp": "web-app",
            "sid": "2c3d4e5f",
            "scope": "openid profile orders:read",
            "realm_access": {"roles": ["default-roles-acme", "orders-admin"]},
            "resource_access": {"orders-api": {"roles": ["reader"]}},
            "preferred_username": "alice",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign({k: v for k, v in claims.items() if v is not None})

    def service_account_token(self) -> str:
        """A client-credentials token of the ``batch`` client's service account."""
        return self.token(
            sub="6b2e7c1a-service",
            azp="batch",
            client_id="batch",
            preferred_username="service-account-batch",
            scope="orders:read",
        )

    def id_token(self) -> str:
        """An ID token: same keys and issuer, ``typ: ID``, aud = the client."""
        return self.token(typ="ID", aud=self.audience, scope=None, nonce="n-0S6_WzA2Mj")


class Cognito(Emulator):
    """Cognito user pool: ``/<pool>/.well-known/jwks.json``; access tokens have no aud."""

    provider = "cognito"
    region = "eu-west-1"
    pool = "eu-west-1_AbCdEf123"
    app_client = "7ap8l1c2l3i4e5n6t7i8d9x0"

    def __init__(self, server: IssuerServer) -> None:
        super().__init__(server, f"/{self.pool}", kid="abcdEFGHijklMNOPqrstUVWXyz0123456789+/=")
        server.route(f"/{self.pool}/.well-known/jwks.json", self.jwks_reply)

    def config(self, **extra: Any) -> dict[str, Any]:
        """Cognito: no AUDIENCE, the allowed app clients instead."""
        extra.setdefault("ALLOWED_CLIENT_IDS", [self.app_client])
        config = super().config(**extra)
        config.pop("OAUTH_VERIFY_AUDIENCE")
        return config

    def access_token(self, **overrides: Any) -> str:
        """A user's access token (``token_use: access``, ``client_id``)."""
        claims = {
            "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "cognito:groups": ["admins"],
            "iss": self.issuer,
            "version": 2,
            "client_id": self.app_client,
            "origin_jti": uuid.uuid4().hex,
            "event_id": uuid.uuid4().hex,
            "token_use": "access",
            "scope": "aws.cognito.signin.user.admin orders/read",
            "auth_time": int(time.time()),
            "jti": uuid.uuid4().hex,
            "username": "alice",
            **self.times(),
        }
        claims.update(overrides)
        return self.sign(claims, typ=None)

    def id_token(self) -> str:
        """An ID token: ``token_use: id``, ``aud`` = the app client, no ``client_id``."""
        claims = {
            "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "aud": self.app_client,
            "email_verified": True,
            "token_use": "id",
            "auth_time": int(time.time()),
            "iss": self.issuer,
            "cognito:username": "alice",
            "email": "alice@example.com",
            **self.times(),
        }
        return self.sign(claims, typ=None)
