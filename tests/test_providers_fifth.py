"""Provider profiles, fifth round: what a token grants, how introspection
credentials are written, issuer spellings no token carries, and the health
of keys that come from each token's ``jku``.

Every provider is a real HTTP server on 127.0.0.1 (tests/provider_emulators.py).
"""

from __future__ import annotations

import ast
import base64
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask, g

from flask_oauth_verify import ConfigurationError, OAuthVerify, require_token
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import FakeClock
from .provider_emulators import Auth0, BeyondIdentity, EntraID, Scalekit, VoxKey, basic
from .test_providers import call, provider_app

DOCS = Path(__file__).parents[1] / "docs" / "providers"


@pytest.fixture
def server() -> Iterator[IssuerServer]:
    with IssuerServer() as srv:
        yield srv


def documented_claim_map(page: str, section: str) -> dict[str, Any]:
    """The ``OAUTH_VERIFY_CLAIM_MAP = {...}`` a provider guide shows in ``section``."""
    text = (DOCS / page).read_text()
    start = text.index(section)
    found = re.search(r"OAUTH_VERIFY_CLAIM_MAP = (\{.*?\})", text[start:])
    assert found is not None, f"{page}: no CLAIM_MAP setting under {section!r}"
    value = ast.literal_eval(found.group(1))
    assert isinstance(value, dict)
    return value


# -- 1. which claims are scopes -------------------------------------------------------


def test_auth0_counts_the_granted_scope_not_every_permission_of_the_user(
    server: IssuerServer,
) -> None:
    """With RBAC, ``permissions`` lists every permission of the user; a client
    granted only ``read:messages`` must not pass ``delete:messages``."""
    a0 = Auth0(server)
    app = provider_app(a0.config())
    token = a0.user_token(
        scope="openid profile read:messages", permissions=["read:messages", "delete:messages"]
    )
    status, body = call(app, token, "/scoped/delete:messages")
    assert (status, body["error"]) == (403, "insufficient_scope")
    status, body = call(app, token, "/scoped/read:messages")
    assert status == 200, body
    assert body["scopes"] == ["openid", "profile", "read:messages"]
    # a client-credentials token: its scope is its grant
    status, body = call(app, a0.m2m_token(), "/scoped/read:reports")
    assert (status, body["scopes"]) == (200, ["read:reports"])


def test_auth0_permissions_count_only_with_the_documented_opt_in(server: IssuerServer) -> None:
    """docs/providers/auth0.rst's setting merges over the profile: permissions
    become scopes, ``client_id`` and ``organization_id`` stay the profile's."""
    a0 = Auth0(server)
    claim_map = documented_claim_map("auth0.rst", "Permissions as scopes")
    assert claim_map == {"scopes": ["scope", "permissions"]}
    token = a0.user_token(
        scope="openid read:messages", permissions=["read:messages", "delete:messages"]
    )
    assert call(provider_app(a0.config()), token, "/scoped/delete:messages")[0] == 403
    app = provider_app(a0.config(CLAIM_MAP=claim_map))
    status, body = call(app, token, "/scoped/delete:messages")
    assert status == 200, body
    assert body["scopes"] == ["delete:messages", "openid", "read:messages"]
    assert (body["client_id"], body["organization_id"]) == ("spa-client-id", "org_Hd5g7kL2mN8pQ1rS")


def test_entra_delegated_roles_opt_out_documented(server: IssuerServer) -> None:
    """The profile counts ``roles`` (a delegated token's are the user's app
    roles); the guide's ``scp``-only mapping leaves them out."""
    entra = EntraID(server)
    token = entra.v2_token(scp="Orders.Read", roles=["Orders.Admin"])
    status, body = call(provider_app(entra.config()), token, "/scoped/Orders.Admin")
    assert status == 200, body  # unchanged default
    claim_map = documented_claim_map("entra-id.rst", "Delegated tokens and")
    assert claim_map == {"scopes": ["scp"]}
    app = provider_app(entra.config(CLAIM_MAP=claim_map))
    assert call(app, token, "/scoped/Orders.Admin")[0] == 403
    status, body = call(app, token, "/scoped/Orders.Read")
    assert (status, body["scopes"]) == (200, ["Orders.Read"])
    assert body["organization_id"] == entra.home


def test_scalekit_permissions_explained_and_opt_out_documented(server: IssuerServer) -> None:
    sk = Scalekit(server)
    token = sk.user_token(scope="openid profile", permissions=["projects:create"])
    assert call(provider_app(sk.config()), token, "/scoped/projects:create")[0] == 200
    text = (DOCS / "scalekit.rst").read_text()
    assert "Why ``permissions`` counts as scopes" in text
    claim_map = documented_claim_map("scalekit.rst", "Why ``permissions`` counts as scopes")
    app = provider_app(sk.config(CLAIM_MAP=claim_map))
    assert call(app, token, "/scoped/projects:create")[0] == 403
    assert call(app, sk.m2m_token(), "/whoami")[0] == 200


# -- 2. HTTP Basic credentials raw or form-encoded --------------------------------------

#: a Base64-alphabet secret: + / = change under form encoding
SECRET = "q8Zr+Kx/9vT1mW3eLp0c4Ab7=="


def introspecting_app(emulator: VoxKey | BeyondIdentity, **extra: Any) -> Flask:
    config = emulator.config(
        INTROSPECTION_CLIENT_ID=emulator.client_id,
        INTROSPECTION_CLIENT_SECRET=emulator.client_secret,
        **extra,
    )
    return provider_app(config)


def a_token(emulator: VoxKey | BeyondIdentity) -> str:
    return emulator.user_token() if isinstance(emulator, VoxKey) else emulator.token()


@pytest.mark.parametrize("kind", [VoxKey, BeyondIdentity])
def test_voxkey_and_beyond_identity_get_raw_basic_credentials(
    server: IssuerServer, kind: type[VoxKey | BeyondIdentity]
) -> None:
    """Both document ``{client_id}:{client_secret}`` Base64-encoded as they are."""
    emulator = kind(server)
    emulator.client_secret = SECRET  # the emulators compare the raw pair
    app = introspecting_app(emulator)
    assert app.extensions["oauth_verify"].settings.introspection_basic_encoding == "raw"
    status, body = call(app, a_token(emulator), "/introspected")
    assert status == 200, body
    sent = emulator.introspections[-1].headers["Authorization"]
    assert sent == basic(emulator.client_id, SECRET)


@pytest.mark.parametrize("kind", [VoxKey, BeyondIdentity])
def test_a_form_setting_wins_over_the_profile(
    server: IssuerServer, kind: type[VoxKey | BeyondIdentity]
) -> None:
    emulator = kind(server)
    emulator.client_secret = SECRET
    app = introspecting_app(emulator, INTROSPECTION_BASIC_ENCODING="form")
    assert call(app, a_token(emulator), "/introspected")[0] == 503  # 401 from the server
    sent = emulator.introspections[-1].headers["Authorization"]
    assert sent == basic(emulator.client_id, quote(SECRET, safe=""))


def test_the_generic_profile_encodes_as_set(server: IssuerServer) -> None:
    """Default "form" (RFC 6749 §2.3.1); "raw" as they are: a ':' in the
    secret is fine (the id ends at the first), and UTF-8 beyond latin-1."""
    cases = [
        (None, "s3c:r%t+/=", quote("s3c:r%t+/=", safe="")),
        ("form", "s3c:r%t+/=", quote("s3c:r%t+/=", safe="")),
        ("raw", "s3c:r%t+/=", "s3c:r%t+/="),
        ("raw", "pässwörd€", "pässwörd€"),
    ]
    for encoding, secret, seen in cases:
        vk = VoxKey(server)
        config = vk.config(
            PROVIDER="generic",
            JWKS_URI=f"{vk.issuer}/oidc/jwks",
            INTROSPECTION_ENDPOINT=f"{vk.issuer}/introspect",
            INTROSPECTION_CLIENT_ID=vk.client_id,
            INTROSPECTION_CLIENT_SECRET=secret,
            INTROSPECTION_BASIC_ENCODING=encoding,
        )
        vk.client_secret = seen  # what the server finds inside the Basic value
        status, body = call(provider_app(config), vk.user_token(), "/introspected")
        assert status == 200, (encoding, secret, body)
        value = vk.introspections[-1].headers["Authorization"].removeprefix("Basic ")
        assert base64.b64decode(value).decode() == f"{vk.client_id}:{seen}"


@pytest.mark.parametrize("value", ["RAW", "base64", "", None, ["raw"], 1])
def test_a_bad_encoding_fails_at_init_app_naming_the_key(
    server: IssuerServer, value: object
) -> None:
    vk = VoxKey(server)
    app = Flask("bad_encoding")
    app.config.update(vk.config())
    app.config["OAUTH_VERIFY_INTROSPECTION_BASIC_ENCODING"] = value
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_INTROSPECTION_BASIC_ENCODING"):
        OAuthVerify(app)


def test_raw_refuses_a_client_id_with_a_colon_at_init_app(server: IssuerServer) -> None:
    """The first ':' of raw Basic credentials ends the id: refused, unless the
    id is sent another way."""
    vk = VoxKey(server)
    creds = {"INTROSPECTION_CLIENT_ID": "urn:client:rs", "INTROSPECTION_CLIENT_SECRET": "s"}
    app = Flask("colon")
    app.config.update(vk.config(**creds))
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_INTROSPECTION_BASIC_ENCODING"):
        OAuthVerify(app)
    for other in (
        {"INTROSPECTION_BASIC_ENCODING": "form"},
        {"INTROSPECTION_AUTH": "client_secret_post"},
    ):
        ok = Flask("colon_ok")
        ok.config.update(vk.config(**creds, **other))
        OAuthVerify(ok)


# -- 3. Entra issuer spellings no token carries -----------------------------------------

TID = "72f988bf-86f1-41af-91ab-2d7cd011db47"


#: (issuer, whether a start-up warning is due)
ENTRA_SPELLINGS = [
    (f"https://login.microsoftonline.com/{TID}/v2.0/", True),
    ("https://login.microsoftonline.com/{tenantid}/v2.0/", True),
    (f"https://login.chinacloudapi.cn/{TID}/v2.0/", True),
    (f"https://sts.windows.net/{TID}", True),
    ("https://sts.windows.net/{tenantid}", True),
    (f"https://sts.chinacloudapi.cn/{TID}", True),
    (f"https://login.microsoftonline.com/{TID}/v2.0", False),
    ("https://login.microsoftonline.com/{tenantid}/v2.0", False),
    (f"https://sts.windows.net/{TID}/", False),
    ("https://sts.windows.net/{tenantid}/", False),
]


def test_entra_warns_about_a_slash_out_of_place(caplog: pytest.LogCaptureFixture) -> None:
    """v2.0 ``iss`` never ends with '/', v1.0 ``iss`` always does: written
    the other way, every token is refused, so start-up says so."""
    for issuer, warned in ENTRA_SPELLINGS:
        caplog.clear()
        app = Flask("entra_slash")
        app.config.update(
            OAUTH_VERIFY_PROVIDER="entra_id",
            OAUTH_VERIFY_ISSUER=issuer,
            OAUTH_VERIFY_AUDIENCE="api://orders",
            OAUTH_VERIFY_ALLOWED_TENANTS=[TID],
        )
        with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
            OAuthVerify(app)
        messages = [r.getMessage() for r in caplog.records if "looks wrong" in r.getMessage()]
        assert bool(messages) is warned, (issuer, messages)
        if warned:
            assert "trailing slash" in messages[0], messages


# -- 4. health of keys that come from each token's jku ----------------------------------


def health(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/health/token-validation")
    return response.status_code, response.get_json()


def test_beyond_identity_health_never_discovers_and_reports_jku_keys(
    server: IssuerServer,
) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config(HEALTH_ROUTE=True))
    status, body = health(app)
    assert status == 200, body
    [entry] = body["checks"]["keys"]["issuers"]
    assert (entry["issuer"], entry["source"], entry["status"], entry["keys"]) == (
        bi.issuer,
        "jku",
        "per_token",
        0,
    )
    assert call(app, bi.token())[0] == 200
    status, body = health(app)
    assert status == 200, body
    [entry] = body["checks"]["keys"]["issuers"]
    assert (entry["status"], entry["keys"]) == ("ok", 1)
    assert [(j["source"], j["keys"], j["status"]) for j in entry["jku"]] == [(bi.jku, 1, "ok")]
    assert body["checks"]["keys"]["status"] == "ok"
    # requests never use discovery for this profile, and nor does the check
    assert not [path for path in server.hits if "well-known/openid" in path]
    assert not [path for path in server.hits if "oauth-authorization-server" in path]
    # a static key set comes first for requests, and for the check as before
    static = provider_app(bi.config(HEALTH_ROUTE=True, JWKS=bi.signer.jwks()))
    status, body = health(static)
    assert status == 200, body
    [entry] = body["checks"]["keys"]["issuers"]
    assert (entry["source"], entry["status"], entry["keys"]) == ("static", "ok", 1)


def test_a_forged_jku_never_makes_the_health_check_fail(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config(HEALTH_ROUTE=True))
    forged = bi.token(jku=f"{server.url}/v1/tenants/x/realms/y/nothing-here.json")
    assert call(app, forged)[0] == 401  # the host answers 404: the token's claim
    status, body = health(app)
    assert status == 200, body
    [entry] = body["checks"]["keys"]["issuers"]
    assert (entry["status"], entry["jku"]) == ("per_token", [])


def test_a_failing_jku_refresh_is_stale_and_healthy(server: IssuerServer, clock: FakeClock) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config(HEALTH_ROUTE=True), clock=clock)
    token = bi.token()
    assert call(app, token)[0] == 200
    assert health(app)[1]["checks"]["keys"]["issuers"][0]["status"] == "ok"
    server.route(bi.jwks_path, Reply(500, "down"))
    clock.advance(700)  # past the key set's max-age=600, within the token's hour
    assert call(app, token)[0] == 200  # the last good keys
    status, body = health(app)
    assert status == 200, body
    [entry] = body["checks"]["keys"]["issuers"]
    assert entry["status"] == "stale"
    assert entry["jku"][0]["status"] == "stale"
    assert body["checks"]["keys"]["status"] == "stale"
    assert any("from jku" in w for w in body["warnings"])


@pytest.mark.parametrize(
    ("server_reads", "app_sends", "accepted"),
    [("raw", "raw", True), ("raw", "form", False), ("form", "form", True), ("form", "raw", False)],
)
def test_the_testing_issuer_reads_basic_credentials_one_way_when_told(
    server_reads: str, app_sends: str, accepted: bool
) -> None:
    tokens = TokenIssuer()
    tokens.introspection_credentials = ("resource-server", "Zm9v+YmFy/YmF6==")
    tokens.introspection_basic_encoding = server_reads
    with IssuerServer() as server:
        tokens.serve(server)
        app = Flask("basic-encoding")
        app.config.update(
            tokens.config(
                audience="api",
                STRATEGY="introspection",
                INTROSPECTION_CLIENT_ID="resource-server",
                INTROSPECTION_CLIENT_SECRET="Zm9v+YmFy/YmF6==",
                INTROSPECTION_BASIC_ENCODING=app_sends,
            )
        )
        OAuthVerify(app)

        @app.get("/me")
        @require_token
        def me() -> Any:
            return {"subject": g.auth.subject}

        answer = app.test_client().get("/me", headers=auth_header(tokens.mint_opaque()))
    assert answer.status_code == (200 if accepted else 503)
