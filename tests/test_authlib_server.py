"""End to end against an independently written authorization server.

Authlib's own :class:`~authlib.integrations.flask_oauth2.AuthorizationServer`
(client-credentials grant, RFC 7662 introspection endpoint, RFC 7009
revocation endpoint, RFC 8414 metadata) runs in a thread on 127.0.0.1 under
werkzeug's server. A real OAuth client (Authlib's ``OAuth2Session`` on
``requests``) obtains tokens from it; our app introspects them; the client
revokes them and our app refuses them.
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from flask import Flask, Response, jsonify
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from flask_oauth_verify.testing import auth_header

from .conftest import FakeClock, make_app

API_CLIENT = ("api-client", "api-secret")
#: RFC 6749 §2.3.1 makes us form-encode Basic credentials; Authlib's server
#: decodes them, so a secret with ':', '%41', '/' and a space must survive.
RESOURCE_SERVER = ("resource-server", "rs:s3cr%41t/ +x")
OTHER_SERVER = ("other-server", "other-secret")


@dataclasses.dataclass
class Client(ClientMixin):  # type: ignore[misc]
    """A registered client (Authlib's model interface, kept in memory)."""

    client_id: str
    client_secret: str
    scope: str = ""
    grant_types: tuple[str, ...] = ()
    auth_methods: tuple[str, ...] = ("client_secret_basic", "client_secret_post")

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in self.auth_methods

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclasses.dataclass
class Token(TokenMixin):  # type: ignore[misc]
    """An issued access token (opaque: a random string)."""

    access_token: str
    client: Client
    scope: str
    expires_in: int
    issued_at: float = dataclasses.field(default_factory=time.time)
    token_type: str = "Bearer"
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return bool(client.client_id == self.client.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> None:
        return None

    def get_client(self) -> Client:
        return self.client


class AuthlibIssuer:
    """Authlib's authorization server, served for real on 127.0.0.1."""

    def __init__(self) -> None:
        self.clients = {
            API_CLIENT[0]: Client(
                *API_CLIENT, scope="read:users write:users", grant_types=("client_credentials",)
            ),
            RESOURCE_SERVER[0]: Client(*RESOURCE_SERVER),
            OTHER_SERVER[0]: Client(*OTHER_SERVER),
        }
        self.tokens: dict[str, Token] = {}
        self.calls: Counter[str] = Counter()
        self.app = Flask("authlib_authorization_server")
        self.server = AuthorizationServer(self.app, self.clients.get, self._save_token)
        self.server.register_grant(ClientCredentialsGrant)
        self.server.register_endpoint(self._introspection_endpoint())
        self.server.register_endpoint(self._revocation_endpoint())
        self._routes()
        self._httpd = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _save_token(self, token: dict[str, Any], request: Any) -> None:
        self.tokens[token["access_token"]] = Token(
            access_token=token["access_token"],
            client=request.client,
            scope=token.get("scope", ""),
            expires_in=int(token["expires_in"]),
        )

    def _introspection_endpoint(self) -> IntrospectionEndpoint:
        issuer = self

        class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
            CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")

            def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
                issuer.calls["introspect"] += 1
                return issuer.tokens.get(token_string)

            def check_permission(self, token: Token, client: Client, request: Any) -> bool:
                # only our resource server may introspect
                return client.client_id == RESOURCE_SERVER[0]

            def introspect_token(self, token: Token) -> dict[str, Any]:
                return {
                    "active": True,
                    "client_id": token.client.client_id,
                    "token_type": token.token_type,
                    "scope": token.get_scope(),
                    "sub": token.client.client_id,
                    "aud": "api",
                    "iss": issuer.url,
                    "exp": int(token.issued_at + token.expires_in),
                    "iat": int(token.issued_at),
                }

        return Introspection(self.server)

    def _revocation_endpoint(self) -> RevocationEndpoint:
        issuer = self

        class Revocation(RevocationEndpoint):  # type: ignore[misc]
            def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
                return issuer.tokens.get(token_string)

            def revoke_token(self, token: Token, request: Any) -> None:
                issuer.calls["revoke"] += 1
                token.revoked = True

        return Revocation(self.server)

    def _routes(self) -> None:
        server = self.server

        @self.app.post("/oauth/token")
        def token() -> Response:
            return server.create_token_response()  # type: ignore[no-any-return]

        @self.app.post("/oauth/introspect")
        def introspect() -> Response:
            return server.create_endpoint_response("introspection")  # type: ignore[no-any-return]

        @self.app.post("/oauth/revoke")
        def revoke() -> Response:
            return server.create_endpoint_response("revocation")  # type: ignore[no-any-return]

        @self.app.get("/.well-known/oauth-authorization-server")
        def metadata() -> Response:
            return jsonify(self.metadata())

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 metadata, validated by Authlib's own model."""
        document = AuthorizationServerMetadata(
            {
                "issuer": self.url,
                "token_endpoint": f"{self.url}/oauth/token",
                "introspection_endpoint": f"{self.url}/oauth/introspect",
                "revocation_endpoint": f"{self.url}/oauth/revoke",
                "response_types_supported": ["token"],
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "introspection_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
            }
        )
        document.validate()
        return dict(document)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def authlib_issuer(monkeypatch: pytest.MonkeyPatch) -> Iterator[AuthlibIssuer]:
    # Authlib 1.6 refuses http even on 127.0.0.1 without it (1.9 allows loopback).
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    issuer = AuthlibIssuer()
    yield issuer
    issuer.close()


def oauth_client(issuer: AuthlibIssuer, scope: str = "read:users") -> OAuth2Session:
    """The API client, talking OAuth to the authorization server."""
    return OAuth2Session(*API_CLIENT, scope=scope)


def fetch_token(issuer: AuthlibIssuer, scope: str = "read:users") -> tuple[OAuth2Session, str]:
    session = oauth_client(issuer, scope)
    token = session.fetch_token(f"{issuer.url}/oauth/token", grant_type="client_credentials")
    assert token["token_type"].lower() == "bearer"
    return session, str(token["access_token"])


def resource_app(
    issuer: AuthlibIssuer,
    credentials: tuple[str, str] = RESOURCE_SERVER,
    clock: FakeClock | None = None,
    **extra: Any,
) -> FlaskClient:
    """Our resource server: introspection, endpoint found by RFC 8414 discovery."""
    config: dict[str, Any] = {
        "OAUTH_VERIFY_ISSUER": issuer.url,
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_STRATEGY": "introspection",
        "OAUTH_VERIFY_INTROSPECTION_CLIENT_ID": credentials[0],
        "OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET": credentials[1],
    }
    config.update({f"OAUTH_VERIFY_{k}": v for k, v in extra.items()})
    return make_app(config, clock=clock).test_client()


def test_client_credentials_token_is_accepted_then_refused_after_revocation(
    authlib_issuer: AuthlibIssuer,
) -> None:
    session, access_token = fetch_token(authlib_issuer, "read:users write:users")
    client = resource_app(authlib_issuer)
    response = client.get("/protected", headers=auth_header(access_token))
    assert response.status_code == 200
    assert response.json == {
        "subject": API_CLIENT[0],
        "organization_id": None,
        "scopes": ["read:users", "write:users"],
        "strategy": "introspection",
    }
    assert client.get("/read", headers=auth_header(access_token)).status_code == 200
    assert authlib_issuer.calls["introspect"] == 2
    revoked = session.revoke_token(
        f"{authlib_issuer.url}/oauth/revoke", token=access_token, token_type_hint="access_token"
    )
    assert revoked.status_code == 200
    assert authlib_issuer.calls["revoke"] == 1
    response = client.get("/protected", headers=auth_header(access_token))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_scopes_granted_by_the_server_drive_require_scope(authlib_issuer: AuthlibIssuer) -> None:
    _session, write_only = fetch_token(authlib_issuer, "write:users")
    response = resource_app(authlib_issuer).get("/read", headers=auth_header(write_only))
    assert response.status_code == 403
    assert 'scope="read:users"' in response.headers["WWW-Authenticate"]


def test_client_secret_post_and_auto_strategy(authlib_issuer: AuthlibIssuer) -> None:
    _session, access_token = fetch_token(authlib_issuer)
    client = resource_app(authlib_issuer, INTROSPECTION_AUTH="client_secret_post", STRATEGY="auto")
    response = client.get("/protected", headers=auth_header(access_token))
    assert response.status_code == 200
    assert response.json is not None and response.json["strategy"] == "introspection"


def test_revocation_within_the_cache_ttl(authlib_issuer: AuthlibIssuer, clock: FakeClock) -> None:
    session, access_token = fetch_token(authlib_issuer)
    client = resource_app(authlib_issuer, clock=clock, INTROSPECTION_CACHE_TTL=30)
    assert client.get("/protected", headers=auth_header(access_token)).status_code == 200
    session.revoke_token(f"{authlib_issuer.url}/oauth/revoke", token=access_token)
    assert client.get("/protected", headers=auth_header(access_token)).status_code == 200
    assert authlib_issuer.calls["introspect"] == 1
    clock.advance(30)
    assert client.get("/protected", headers=auth_header(access_token)).status_code == 401
    assert authlib_issuer.calls["introspect"] == 2


def test_unknown_expired_and_unpermitted_tokens_are_inactive(
    authlib_issuer: AuthlibIssuer,
) -> None:
    _session, access_token = fetch_token(authlib_issuer)
    client = resource_app(authlib_issuer)
    assert client.get("/protected", headers=auth_header("not-issued-here")).status_code == 401
    # Authlib answers {"active": false} to a resource server it does not permit.
    other = resource_app(authlib_issuer, OTHER_SERVER)
    assert other.get("/protected", headers=auth_header(access_token)).status_code == 401
    authlib_issuer.tokens[access_token].issued_at -= 10 * 24 * 3600 + 1
    assert client.get("/protected", headers=auth_header(access_token)).status_code == 401
    assert authlib_issuer.calls["introspect"] == 3


@pytest.mark.parametrize(
    "extra",
    [
        {"INTROSPECTION_CLIENT_SECRET": "wrong"},  # Authlib: 401 invalid_client
        {"INTROSPECTION_BODY": "json"},  # Authlib reads a form only: 400
    ],
)
def test_misconfigured_resource_server_gets_503_not_401(
    authlib_issuer: AuthlibIssuer, extra: dict[str, Any]
) -> None:
    _session, access_token = fetch_token(authlib_issuer)
    response = resource_app(authlib_issuer, **extra).get(
        "/protected", headers=auth_header(access_token)
    )
    assert response.status_code == 503
    assert response.json is not None and response.json["error"] == "temporarily_unavailable"
    assert "Retry-After" in response.headers
