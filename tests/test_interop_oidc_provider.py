"""Against an independent authorization server: oidc-provider, for real.

``panva/node-oidc-provider`` (OpenID Certified, Node.js) runs as a process
on 127.0.0.1 (``tests/interop/oidc_provider/provider.mjs``) and issues
client-credentials access tokens the way it does in production: JWTs
(``typ: at+jwt``) for resources that ask for them (RFC 8707 resource
indicators), opaque tokens otherwise, with RFC 7662 introspection and
RFC 7009 revocation. The extension finds everything through the
provider's discovery document, as a user's app would.

Needs ``node`` and the pinned package (``npm ci --prefix
tests/interop/oidc_provider``, which ``scripts/test`` runs when ``npm`` is
there); skipped without them, failed in CI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, g
from joserfc.jwk import ECKey, OKPKey, RSAKey

from flask_oauth_verify import OAuthVerify, require_scope, require_token

from .conftest import ServerProcess, free_port, need_service, wait_until

PROVIDER_DIR = Path(__file__).parent / "interop" / "oidc_provider"
API = "https://api.example.test"
OTHER_API = "https://other.example.test"
OPAQUE_API = "https://opaque.example.test"
CLIENT = ("svc", "svc-secret")
INTROSPECTOR = ("rs-introspector", "rs:sec/ret+x=%y")


class OidcProvider(ServerProcess):
    """oidc-provider on 127.0.0.1, restartable with other signing keys."""

    def __init__(self, node: str, directory: Path) -> None:
        self.node = node
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.keys_file = directory / "jwks.json"
        self.log = directory / "provider.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *kids: str) -> None:
        """Start with a fresh RSA key per ``kid``, the first one signing
        RS256 and PS256 tokens, and one P-256 and one Ed25519 key."""
        keys: list[Any] = [
            RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"}) for kid in kids
        ]
        keys.append(ECKey.generate_key("P-256", parameters={"kid": "ec-1", "use": "sig"}))
        keys.append(OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1", "use": "sig"}))
        self.keys_file.write_text(json.dumps({"keys": [k.as_dict(private=True) for k in keys]}))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own script
                [self.node, str(PROVIDER_DIR / "provider.mjs")],
                cwd=PROVIDER_DIR,
                env={
                    "PATH": os.environ.get("PATH", ""),
                    "PORT": str(self.port),
                    "JWKS_FILE": str(self.keys_file),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(self._answers, timeout=30, every=0.05):
            self.stop()
            pytest.fail(f"oidc-provider did not start: {self.log.read_text()[-2000:]}")

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.issuer}/jwks", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def token(self, resource: str | None = API, scope: str = "read:things") -> str:
        """A client-credentials access token from the token endpoint."""
        form = {"grant_type": "client_credentials", "scope": scope}
        if resource is not None:
            form["resource"] = resource
        response = requests.post(f"{self.issuer}/token", data=form, auth=CLIENT, timeout=5)
        response.raise_for_status()
        return str(response.json()["access_token"])

    def revoke(self, token: str) -> None:
        response = requests.post(
            f"{self.issuer}/token/revocation", data={"token": token}, auth=CLIENT, timeout=5
        )
        response.raise_for_status()


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OidcProvider]:
    node = shutil.which("node")
    if node is None or not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        need_service("node with oidc-provider (npm ci --prefix tests/interop/oidc_provider)")
    assert node is not None
    server = OidcProvider(node, tmp_path)
    server.start("key-1")
    yield server
    server.stop()


def api(provider: OidcProvider, **settings: Any) -> Flask:
    """The API as the generic-provider guide sets it up: issuer and audience."""
    app = Flask("oidc-provider-api")
    app.config.update(
        OAUTH_VERIFY_ISSUER=provider.issuer,
        OAUTH_VERIFY_AUDIENCE=[API, OPAQUE_API],
        OAUTH_VERIFY_INTROSPECTION_CLIENT_ID=INTROSPECTOR[0],
        OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET=INTROSPECTOR[1],
    )
    app.config.update({f"OAUTH_VERIFY_{name}": value for name, value in settings.items()})
    OAuthVerify(app)

    def context() -> dict[str, Any]:
        auth = g.auth
        return {
            "subject": auth.subject,
            "client_id": auth.client_id,
            "scopes": sorted(auth.scopes),
            "issuer": auth.issuer,
            "audience": list(auth.audience),
            "strategy": auth.strategy,
            "user_id": auth.user_id,
        }

    app.add_url_rule("/me", "me", require_token(context))
    app.add_url_rule("/read", "read", require_scope("read:things")(context))
    app.add_url_rule("/admin", "admin", require_scope("admin:things")(context))
    app.add_url_rule(
        "/introspected", "introspected", require_token(strategy="introspection")(context)
    )
    return app


def call(app: Flask, path: str, token: str) -> Any:
    return app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})


def test_its_jwt_access_tokens_are_verified_and_mapped(provider: OidcProvider) -> None:
    app = api(provider)
    token = provider.token(scope="read:things write:things")
    response = call(app, "/read", token)
    assert response.status_code == 200
    assert response.json == {
        "subject": "svc",
        "client_id": "svc",
        "scopes": ["read:things", "write:things"],
        "issuer": provider.issuer,
        "audience": [API],
        "strategy": "jwks",
        "user_id": None,  # a client-credentials token acts for no user
    }
    refused = call(app, "/admin", token)
    assert refused.status_code == 403
    assert refused.json is not None and refused.json["error"] == "insufficient_scope"
    assert 'scope="admin:things"' in refused.headers["WWW-Authenticate"]


@pytest.mark.parametrize("alg", ["PS256", "ES256", "EdDSA"])
def test_its_tokens_signed_with_each_algorithm_are_verified(
    provider: OidcProvider, alg: str
) -> None:
    """Signatures made by another JOSE implementation (panva/jose): the
    ECDSA ``R || S`` encoding, PSS, Ed25519; each allowed only when listed."""
    resource = f"https://{alg.lower()}.example.test"
    token = provider.token(resource=resource)
    allowed = api(provider, AUDIENCE=resource, ALGORITHMS=["RS256", alg])
    response = call(allowed, "/read", token)
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["audience"] == [resource]
    refused = call(api(provider, AUDIENCE=resource), "/read", token)  # RS256 only, the default
    assert refused.status_code == 401


def test_its_tokens_for_another_resource_and_tampered_ones_are_refused(
    provider: OidcProvider,
) -> None:
    app = api(provider)
    other = call(app, "/me", provider.token(resource=OTHER_API))
    assert other.status_code == 401
    assert other.json is not None and other.json["error"] == "invalid_token"
    assert other.headers["WWW-Authenticate"].startswith("Bearer ")
    header, payload, signature = provider.token().split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert call(app, "/me", f"{header}.{payload}.{flipped}").status_code == 401


def test_its_opaque_tokens_are_introspected_until_revoked(provider: OidcProvider) -> None:
    app = api(provider, STRATEGY="auto")
    token = provider.token(resource=OPAQUE_API)
    assert token.count(".") == 0
    response = call(app, "/read", token)
    assert response.status_code == 200
    assert response.json is not None
    assert (response.json["strategy"], response.json["audience"]) == ("introspection", [OPAQUE_API])
    provider.revoke(token)
    assert call(app, "/read", token).status_code == 401  # no introspection cache by default


def test_a_jwt_it_will_not_introspect_is_refused_not_an_outage(
    provider: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """oidc-provider answers 400 ``unsupported_token_type`` when asked to
    introspect a JWT: that token is refused, the service is not down."""
    app = api(provider)
    token = provider.token()
    assert call(app, "/me", token).status_code == 200
    with caplog.at_level(logging.INFO):
        response = call(app, "/introspected", token)
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_new_signing_key_is_used_without_restarting_the_api(provider: OidcProvider) -> None:
    app = api(provider)
    before = provider.token()
    assert call(app, "/me", before).status_code == 200
    provider.stop()
    provider.start("key-2")  # key-1 is gone: rotated out
    after = provider.token()
    assert call(app, "/me", after).status_code == 200  # unknown kid: the key set is refetched
    refused = call(app, "/me", before)
    assert refused.status_code == 401  # key-1 left the set: its tokens are no longer trusted
