"""Provider profiles end to end, against local emulators of each provider.

Every emulator is a real HTTP server on 127.0.0.1 serving the provider's
documented key, introspection and token paths (tests/provider_emulators.py).
An app configured with only ``PROVIDER`` + ``ISSUER`` + ``AUDIENCE`` (plus
the one documented extra key where a provider needs it) must accept the
provider's access tokens with the right ``g.auth`` and refuse the
provider's own pitfalls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import requests
from flask import Flask, g
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server

from flask_oauth_verify import (
    ConfigurationError,
    InsufficientScopeError,
    OAuthVerify,
    Settings,
    require_organization,
    require_scope,
    require_token,
    require_user,
)
from flask_oauth_verify.context import AuthContext
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.providers import PROFILES, apply_profile, profile_named
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import FakeClock, in_forked_child
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
    basic,
)

# -- helpers ------------------------------------------------------------------------


def auth_fields(auth: AuthContext) -> dict[str, Any]:
    return {
        "subject": auth.subject,
        "client_id": auth.client_id,
        "scopes": sorted(auth.scopes),
        "organization_id": auth.organization_id,
        "user_id": auth.user_id,
        "service_name": auth.service_name,
        "token_type": auth.token_type,
        "issuer": auth.issuer,
        "strategy": auth.strategy,
    }


def provider_app(
    config: Mapping[str, Any], *, ext: OAuthVerify | None = None, clock: Any = None
) -> Flask:
    """An app with the extension and views using every decorator."""
    app = Flask("provider_app")
    app.config.update(TESTING=True, **config)
    (ext or OAuthVerify()).init_app(app, clock=clock)

    @app.get("/whoami")
    @require_token
    def whoami() -> dict[str, Any]:
        return auth_fields(g.auth)

    @app.get("/introspected")
    @require_token(strategy="introspection")
    def introspected() -> dict[str, Any]:
        return auth_fields(g.auth)

    @app.get("/scoped/<scope>")
    def scoped(scope: str) -> dict[str, Any]:
        @require_scope(scope)
        def inner() -> dict[str, Any]:
            return auth_fields(g.auth)

        return inner()

    @app.get("/org")
    @require_organization
    def org() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    @app.get("/me")
    @require_user
    def me() -> dict[str, Any]:
        return {"user_id": g.auth.user_id}

    return app


def call(app: Flask, token: str, path: str = "/whoami") -> tuple[int, dict[str, Any]]:
    response = app.test_client().get(path, headers=auth_header(token))
    return response.status_code, response.get_json() or {}


def refused(app: Flask, token: str, path: str = "/whoami", error: str = "invalid_token") -> None:
    response = app.test_client().get(path, headers=auth_header(token))
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error"] == error
    # RFC 6750 knows only invalid_token for every 401 of a sent token
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def settings(provider: str, issuer: str | list[str], **extra: Any) -> Settings:
    config = {"OAUTH_VERIFY_PROVIDER": provider, "OAUTH_VERIFY_ISSUER": issuer}
    config.update({f"OAUTH_VERIFY_{k}": v for k, v in extra.items()})
    return Settings.from_config(config)


@pytest.fixture
def server() -> Iterator[IssuerServer]:
    with IssuerServer() as srv:
        yield srv


# -- the profiles as data -----------------------------------------------------------

PRODUCTION = [
    (
        "scalekit",
        "https://your-env.scalekit.com",
        {
            "jwks": "https://your-env.scalekit.com/keys",
            "introspection": "https://your-env.scalekit.com/oauth/introspect",
        },
    ),
    (
        "supertokens",
        "https://api.example.com/auth",
        {
            "jwks": "https://api.example.com/authjwt/jwks.json",
            "introspection": "https://api.example.com/auth/oauth/introspect",
        },
    ),
    (
        "voxkey",
        "https://your-domain.com/oauth2/6f1d2c3b-4a59",
        {
            "jwks": "https://your-domain.com/oauth2/6f1d2c3b-4a59/oidc/jwks",
            "introspection": "https://your-domain.com/oauth2/6f1d2c3b-4a59/introspect",
        },
    ),
    (
        "beyond_identity",
        "https://auth-us.beyondidentity.com/v1/tenants/T1/realms/R1/applications/A1",
        {
            "jwks": None,
            "introspection": "https://auth-us.beyondidentity.com/v1/tenants/T1/realms/R1/introspect",
        },
    ),
    (
        "auth0",
        "https://acme.eu.auth0.com/",
        {"jwks": "https://acme.eu.auth0.com/.well-known/jwks.json"},
    ),
    (
        "okta",
        "https://dev-1234.okta.com/oauth2/default",
        {
            "jwks": "https://dev-1234.okta.com/oauth2/default/v1/keys",
            "introspection": "https://dev-1234.okta.com/oauth2/default/v1/introspect",
        },
    ),
    (
        "entra_id",
        "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0",
        {"jwks": "https://login.microsoftonline.com/common/discovery/v2.0/keys"},
    ),
    (
        "keycloak",
        "https://sso.example.com/realms/acme",
        {
            "jwks": "https://sso.example.com/realms/acme/protocol/openid-connect/certs",
            "introspection": (
                "https://sso.example.com/realms/acme/protocol/openid-connect/token/introspect"
            ),
        },
    ),
    (
        "cognito",
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
        {
            "jwks": (
                "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123"
                "/.well-known/jwks.json"
            )
        },
    ),
]


def minimal(provider: str) -> dict[str, Any]:
    """The documented extra key(s) a provider needs beyond ISSUER/AUDIENCE."""
    if provider == "cognito":
        return {"ALLOWED_CLIENT_IDS": ["app-client"]}
    return {"AUDIENCE": "api"}


@pytest.mark.parametrize(("provider", "issuer", "expected"), PRODUCTION)
def test_provider_plus_issuer_and_audience_is_all_a_user_writes(
    provider: str, issuer: str, expected: dict[str, str | None]
) -> None:
    s = settings(provider, issuer, **minimal(provider))
    assert s.provider == provider
    assert s.jwks_uri_for(issuer) == expected["jwks"]
    if "introspection" in expected:
        assert s.introspection_endpoint == expected["introspection"]


def test_every_profile_is_tested_against_a_production_issuer() -> None:
    assert {p for p, _i, _e in PRODUCTION} | {"generic"} == set(PROFILES)


def test_profile_specific_defaults() -> None:
    st = settings("supertokens", "https://api.example.com/auth", AUDIENCE="api")
    assert st.required_claim_values == {"stt": 1}
    assert set(st.required_claims) == {"stt", "scp", "client_id"}
    assert (st.introspection_body, st.introspection_auth) == ("json", "none")
    bi = settings(
        "beyond_identity",
        "https://auth-eu.beyondidentity.com/v1/tenants/T1/realms/R1/applications/A1",
        AUDIENCE="api",
    )
    assert bi.allowed_jku_hosts == ("auth-eu.beyondidentity.com",)
    assert bi.issuer_claims == {"bi_t": "T1", "bi_r": "R1"}
    assert bi.provider_params["tenant"] == "T1"
    cognito = settings(
        "cognito",
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
        ALLOWED_CLIENT_IDS=["c1"],
    )
    assert cognito.verify_audience is False
    assert cognito.required_claim_values == {"token_use": "access"}
    assert cognito.provider_params["region"] == "eu-west-1"
    assert cognito.provider_params["user_pool_id"] == "eu-west-1_AbCdEf123"
    entra = settings("entra_id", "https://login.microsoftonline.com/T/v2.0", AUDIENCE="api")
    assert entra.claim_map["organization_id"] == ("tid",)  # Entra's oid is the user's object id
    assert entra.claim_map["scopes"] == ("scp", "roles")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("Entra", "entra_id"), ("azure-ad", "entra_id"), ("Beyond-Identity", "beyond_identity"),
     ("AWS_Cognito", "cognito"), ("SCALEKIT", "scalekit")],
)  # fmt: skip
def test_profile_names_are_forgiving(name: str, canonical: str) -> None:
    assert profile_named(name).name == canonical


def test_every_profile_key_is_overridable_key_by_key() -> None:
    issuer = "https://your-env.scalekit.com"
    s = settings(
        "scalekit",
        issuer,
        AUDIENCE="api",
        JWKS_URI="https://keys.example.com/jwks",
        USER_ID_PREFIX="usr-",
        CLAIM_MAP={"organization_id": ["custom_claims.org"]},
    )
    assert s.jwks_uri_for(issuer) == "https://keys.example.com/jwks"
    assert s.introspection_endpoint == f"{issuer}/oauth/introspect"  # untouched
    assert s.user_id_prefix == "usr-"
    # A mapping merges entry by entry: the profile's scopes mapping stays.
    assert s.claim_map["organization_id"] == ("custom_claims.org",)
    assert s.claim_map["scopes"] == ("scopes", "scope", "permissions")


@pytest.mark.parametrize(("given", "required"), [("true", True), ("no", False)])
def test_require_email_verified_reads_environment_text_like_every_yes_no_setting(
    given: str, required: bool
) -> None:
    """The configuration page promises ``"true"``/``"no"``... for every yes/no
    setting; this one, read by the profiles, refused them."""
    st = settings(
        "supertokens", "https://api.example.com/auth", AUDIENCE="api", REQUIRE_EMAIL_VERIFIED=given
    )
    assert ("email_verified" in st.required_claim_values) is required


def test_required_claim_values_merge_and_none_removes_an_entry() -> None:
    st = settings(
        "supertokens",
        "https://api.example.com/auth",
        AUDIENCE="api",
        REQUIRED_CLAIM_VALUES={"tId": "public"},
        REQUIRE_EMAIL_VERIFIED=True,
    )
    assert st.required_claim_values == {"stt": 1, "tId": "public", "email_verified": True}
    kc = settings(
        "keycloak",
        "https://sso.example.com/realms/acme",
        AUDIENCE="api",
        REQUIRED_CLAIM_VALUES={"typ": None},
    )
    assert kc.required_claim_values == {}


def test_several_issuers_get_a_key_set_each() -> None:
    a, b = "https://a.okta.com/oauth2/default", "https://a.okta.com/oauth2/aus2"
    s = settings("okta", [a, b], AUDIENCE="api://default")
    assert s.jwks_uri_for(a) == f"{a}/v1/keys"
    assert s.jwks_uri_for(b) == f"{b}/v1/keys"


@pytest.mark.parametrize(
    ("provider", "issuer", "extra", "named"),
    [
        ("cognito", "https://cognito-idp.eu-west-1.amazonaws.com/p", {}, "ALLOWED_CLIENT_IDS"),
        (
            "cognito",
            "https://cognito-idp.eu-west-1.amazonaws.com/p",
            {"ALLOWED_CLIENT_IDS": ["c"], "AUDIENCE": "api"},
            "OAUTH_VERIFY_VERIFY_AUDIENCE",
        ),
        ("okta", "https://dev-1.okta.com", {"AUDIENCE": "api"}, "custom authorization server"),
        ("beyond_identity", "https://auth-us.beyondidentity.com/v1/x", {"AUDIENCE": "a"}, "realms"),
        ("voxkey", "https://vox.example.com/realm-a", {"AUDIENCE": "a"}, "PROVIDER_PARAMS"),
        ("nobody", "https://issuer.example.com", {"AUDIENCE": "a"}, "OAUTH_VERIFY_PROVIDER"),
        ("supertokens", "https://api.example.com/auth",
         {"AUDIENCE": "a", "REQUIRE_EMAIL_VERIFIED": "maybe"}, "REQUIRE_EMAIL_VERIFIED"),
    ],
)  # fmt: skip
def test_profile_contradictions_fail_at_start_up_naming_the_key(
    provider: str, issuer: str, extra: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        settings(provider, issuer, **extra)


@pytest.mark.parametrize("value", [["bi_t"], {"": "x"}, "bi_t"])
def test_issuer_claims_must_be_a_mapping(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_ISSUER_CLAIMS"):
        settings("generic", "https://issuer.example.com", AUDIENCE="a", ISSUER_CLAIMS=value)


def test_issuers_with_different_introspection_endpoints_need_one_chosen(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two Keycloak realms: one app introspects at one endpoint, which does not
    know the other realm's tokens. Refused when introspection is in use (a
    strategy, or credentials of any kind), and so is a templated realm; a
    JWT-only app is left alone; an endpoint the app names is its choice."""
    realms = ["https://sso.example.com/realms/a", "https://sso.example.com/realms/b"]
    secret = {"INTROSPECTION_CLIENT_ID": "rs", "INTROSPECTION_CLIENT_SECRET": "x"}
    for extra in (
        {"STRATEGY": "both", **secret},
        {"STRATEGY": "jwks", **secret},
        {"INTROSPECTION_AUTH": "bearer", "INTROSPECTION_TOKEN": "t"},
    ):
        with pytest.raises(ConfigurationError, match="different introspection endpoints"):
            settings("keycloak", realms, AUDIENCE="api", **extra)
    templated = [realms[0], "https://sso.example.com/realms/{realm}"]
    for issuers in (templated, templated[::-1]):
        with pytest.raises(ConfigurationError, match="templated OAUTH_VERIFY_ISSUER"):
            settings(
                "keycloak",
                issuers,
                AUDIENCE="api",
                ALLOWED_TENANTS=["t1"],
                JWKS_URI={templated[1]: "https://sso.example.com/keys"},
                STRATEGY="both",
                **secret,
            )
    with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
        jwks_only = settings("keycloak", realms, AUDIENCE="api")
    assert jwks_only.jwks_uri_for(realms[1]) == f"{realms[1]}/protocol/openid-connect/certs"
    assert not caplog.records
    chosen = settings(
        "keycloak",
        realms,
        AUDIENCE="api",
        STRATEGY="both",
        INTROSPECTION_CLIENT_ID="rs",
        INTROSPECTION_CLIENT_SECRET="x",
        INTROSPECTION_ENDPOINT="https://sso.example.com/introspect",
    )
    assert chosen.introspection_endpoint == "https://sso.example.com/introspect"
    one = settings("keycloak", realms[:1], AUDIENCE="api", STRATEGY="both",
                   INTROSPECTION_CLIENT_ID="rs", INTROSPECTION_CLIENT_SECRET="x")  # fmt: skip
    assert one.introspection_endpoint == f"{realms[0]}/protocol/openid-connect/token/introspect"


def test_a_templated_issuer_asks_for_its_key_set_url() -> None:
    with pytest.raises(ConfigurationError, match="needs OAUTH_VERIFY_JWKS_URI"):
        settings(
            "keycloak", "https://sso.example.com/realms/{realm}", AUDIENCE="a", ALLOWED_TENANTS="*"
        )
    s = settings(
        "keycloak",
        ["https://sso.example.com/realms/{realm}", "https://sso.example.com/realms/main"],
        AUDIENCE="a",
        ALLOWED_TENANTS=["t1"],
        JWKS_URI={"https://sso.example.com/realms/{realm}": "https://sso.example.com/keys"},
    )
    assert (
        s.jwks_uri_for("https://sso.example.com/realms/{realm}") == "https://sso.example.com/keys"
    )
    # the app's mapping merges into the profile's per-issuer URLs
    assert s.jwks_uri_for("https://sso.example.com/realms/main") == (
        "https://sso.example.com/realms/main/protocol/openid-connect/certs"
    )


def test_voxkey_params_can_be_given_when_the_issuer_is_custom() -> None:
    s = settings(
        "voxkey",
        "https://login.example.com",
        AUDIENCE="a",
        PROVIDER_PARAMS={"domain": "https://vox.example.com", "realm": "r1"},
    )
    assert (
        s.jwks_uri_for("https://login.example.com") == "https://vox.example.com/oauth2/r1/oidc/jwks"
    )


def test_cognito_audience_check_can_be_forced_back_on() -> None:
    s = settings(
        "cognito",
        "https://cognito-idp.eu-west-1.amazonaws.com/p",
        ALLOWED_CLIENT_IDS=["c"],
        AUDIENCE="c",
        VERIFY_AUDIENCE=True,
    )
    assert s.verify_audience is True


def test_apply_profile_leaves_the_given_mapping_alone() -> None:
    given = {"PROVIDER": "okta", "ISSUER": "https://o.okta.com/oauth2/default", "AUDIENCE": "a"}
    before = dict(given)
    merged = apply_profile(given)
    assert given == before
    assert merged["JWKS_URI"] == "https://o.okta.com/oauth2/default/v1/keys"


# -- issuer templates (config) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "extra", "named"),
    [
        ("https://{tenant}.example.com/v2.0", {}, "host"),
        ("https://login.example.com/x{tenantid}/v2.0", {}, "whole"),
        ("https://login.example.com/{tenantid}/{tenantid}", {}, "repeats"),
        ("https://login.example.com/{tenantid/v2.0", {}, "balanced"),
        ("https://login.example.com/{tenantid}/v2.0", {"JWKS_URI": None}, "OAUTH_VERIFY_JWKS_URI"),
        ("https://login.example.com/{tenantid}/v2.0", {"ALLOWED_TENANTS": None}, "ALLOWED_TENANTS"),
        (
            "https://login.example.com/{tenantid}/v2.0",
            {"JWKS_URI": "https://login.example.com/{tenantid}/keys"},
            "placeholders",
        ),
    ],
)
def test_bad_issuer_templates_fail_at_start_up(
    issuer: str, extra: dict[str, Any], named: str
) -> None:
    config: dict[str, Any] = {
        "OAUTH_VERIFY_ISSUER": issuer,
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_JWKS_URI": "https://login.example.com/common/keys",
        "OAUTH_VERIFY_ALLOWED_TENANTS": "*",
    }
    config.update({f"OAUTH_VERIFY_{k}": v for k, v in extra.items()})
    with pytest.raises(ConfigurationError, match=named):
        Settings.from_config({k: v for k, v in config.items() if v is not None})


# -- Scalekit ------------------------------------------------------------------------


def test_scalekit_m2m_and_user_tokens(server: IssuerServer) -> None:
    sk = Scalekit(server)
    app = provider_app(sk.config())
    status, body = call(app, sk.m2m_token())
    assert status == 200, body
    assert body == {
        "subject": "m2morg_69038819013296423",
        "client_id": "m2morg_69038819013296423",
        "scopes": ["deploy:applications", "read:deployments"],
        "organization_id": "org_59615193906282635",
        "user_id": None,
        "service_name": "billing-worker",
        "token_type": "m2m",
        "issuer": sk.issuer,
        "strategy": "jwks",
    }
    status, body = call(app, sk.user_token(), "/me")
    assert (status, body) == (200, {"user_id": "user_69038819013296500"})
    assert call(app, sk.m2m_token(), "/org") == (200, {"organization_id": "org_59615193906282635"})
    assert call(app, sk.m2m_token(), "/scoped/deploy:applications")[0] == 200
    response = app.test_client().get("/scoped/admin", headers=auth_header(sk.m2m_token()))
    assert response.status_code == 403
    assert 'scope="admin"' in response.headers["WWW-Authenticate"]
    refused(app, sk.m2m_token(), "/me", "missing_user_context")
    refused(app, sk.m2m_token(oid=None), "/org", "missing_organization_context")
    refused(app, sk.m2m_token(aud=["other-api"]))
    assert server.hits["/keys"] == 1  # fetched once, from the documented path


def test_scalekit_introspection(server: IssuerServer) -> None:
    sk = Scalekit(server)
    app = provider_app(
        sk.config(
            INTROSPECTION_CLIENT_ID=sk.client_id, INTROSPECTION_CLIENT_SECRET=sk.client_secret
        )
    )
    token = sk.m2m_token()
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    assert body["strategy"] == "introspection"
    assert body["organization_id"] == "org_59615193906282635"
    assert body["service_name"] == "billing-worker"
    request = sk.introspections[-1]
    assert request.headers["Authorization"] == basic(sk.client_id, sk.client_secret)
    assert request.form()["token"] == token
    sk.active.clear()  # revoked at Scalekit
    refused(app, token, "/introspected")


def test_scalekit_user_ids_of_both_documented_shapes(server: IssuerServer) -> None:
    """Scalekit's user ids are ``usr_…``; its verification guide's samples use ``user_…``."""
    sk = Scalekit(server)
    app = provider_app(sk.config())
    for subject in ("usr_987654321098765432", "user_69038819013296500"):
        assert call(app, sk.user_token(sub=subject), "/me") == (200, {"user_id": subject})
    refused(app, sk.user_token(sub="conn_1;google|1"), "/me", "missing_user_context")


def test_scalekit_permissions_are_scopes(server: IssuerServer) -> None:
    """User tokens carry RBAC ``permissions``; ``@require_scope`` checks them."""
    sk = Scalekit(server)
    app = provider_app(sk.config())
    token = sk.user_token(scope=None, permissions=["projects:create", "projects:read"])
    assert call(app, token, "/scoped/projects:create")[0] == 200
    response = app.test_client().get("/scoped/tasks:assign", headers=auth_header(token))
    assert response.status_code == 403


def test_scalekit_id_token_is_refused(server: IssuerServer) -> None:
    """The environment's ID token: same issuer, same keys, ``aud`` the client id.

    Scalekit's ID tokens always carry ``at_hash`` and ``c_hash``, which no
    access token can.
    """
    sk = Scalekit(server)
    client = "skc_12205605011849527"
    app = provider_app(sk.config(AUDIENCE=client))
    assert call(app, sk.user_token(aud=[client]))[0] == 200  # the user's access token
    id_token = sk.sign(
        {
            "iss": sk.issuer,
            "azp": client,
            "aud": [client],
            "amr": ["conn_17576372041941092"],
            "sub": "usr_987654321098765432",
            "oid": "org_59615193906282635",
            "at_hash": "HK6E_P6Dh8Y93mRNtsDB1Q",
            "c_hash": "HK6E_P6Dh8Y93mRNtsDB1Q",
            "email": "john.doe@acmecorp.com",
            **sk.times(),
        }
    )
    refused(app, id_token)
    refused(app, id_token, "/org")


# -- SuperTokens ------------------------------------------------------------------------


def test_supertokens_oauth_token_passes_with_scp_scopes(server: IssuerServer) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config())
    status, body = call(app, st.token())
    assert status == 200, body
    assert body["scopes"] == ["offline_access", "read:posts"]
    assert body["client_id"] == st.oauth_client
    assert body["user_id"] == "fa7a0841-b533-4478-95533-0fde890c3483"
    assert server.hits["/auth/jwt/jwks.json"] == 1
    assert server.hits["/authjwt/jwks.json"] == 1  # the documented path, tried first


def test_supertokens_keys_at_the_documented_path(server: IssuerServer) -> None:
    st = SuperTokens(server)
    server.routes.pop("/auth/jwt/jwks.json")
    server.route("/authjwt/jwks.json", st.jwks_reply)
    app = provider_app(st.config())
    assert call(app, st.token())[0] == 200
    assert call(app, st.token())[0] == 200
    assert server.hits["/authjwt/jwks.json"] == 1
    assert server.hits["/auth/jwt/jwks.json"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        Reply(401, {"message": "unauthorised"}),
        Reply(200, "<html>API docs</html>", {"Content-Type": "text/html"}),
        Reply(200, {"status": "OK"}),
    ],
    ids=["401", "html-page", "json-not-a-key-set"],
)
def test_supertokens_fallback_when_the_documented_path_answers_something_else(
    server: IssuerServer, answer: Reply
) -> None:
    """Whatever the unused documented path answers, the SDK path's keys are found."""
    st = SuperTokens(server)
    server.route("/authjwt/jwks.json", answer)
    app = provider_app(st.config())
    assert call(app, st.token())[0] == 200
    assert server.hits["/auth/jwt/jwks.json"] == 1


def test_supertokens_fallback_is_remembered(server: IssuerServer, clock: Any) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config(), clock=clock)
    assert call(app, st.token())[0] == 200
    clock.advance(700)  # past the soft TTL: refresh from the location that worked
    assert call(app, st.token())[0] == 200
    assert server.hits["/authjwt/jwks.json"] == 1
    assert server.hits["/auth/jwt/jwks.json"] == 2


@pytest.mark.parametrize(
    "stt",
    [0, 2, True, "1", 1.5, None],
    ids=["session", "id-token", "true", "string", "float", "absent"],
)
def test_supertokens_refuses_every_token_but_stt_1(server: IssuerServer, stt: Any) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config())
    assert call(app, st.token())[0] == 200  # control: same keys, stt 1
    refused(app, st.token(stt=stt))


def test_supertokens_session_token_is_refused(server: IssuerServer) -> None:
    st = SuperTokens(server)
    refused(provider_app(st.config()), st.session_token())


def test_supertokens_requires_scp_and_client_id(server: IssuerServer) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config())
    refused(app, st.token(scp=None))
    refused(app, st.token(client_id=None))


def test_supertokens_allowed_clients_and_verified_email(server: IssuerServer) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config(ALLOWED_CLIENT_IDS=[st.oauth_client], REQUIRE_EMAIL_VERIFIED=True))
    assert call(app, st.token(email_verified=True))[0] == 200
    refused(app, st.token(email_verified=True, client_id="stcl_other"))
    refused(app, st.token())  # no email_verified claim
    refused(app, st.token(email_verified=False))
    refused(app, st.token(email_verified="true"))


def test_supertokens_introspection_sends_a_json_body(server: IssuerServer) -> None:
    st = SuperTokens(server)
    app = provider_app(st.config())
    token = st.token()
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    request = st.introspections[-1]
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.json() == {"token": token}
    assert "Authorization" not in request.headers
    # a session token is active at SuperTokens, but it is not an OAuth token
    refused(app, st.session_token(), "/introspected")


# -- VoxKey --------------------------------------------------------------------------


def test_voxkey_m2m_token_from_the_token_endpoint(server: IssuerServer) -> None:
    vk = VoxKey(server)
    app = provider_app(vk.config())
    client_id, secret = vk.service_client
    answer = requests.post(
        f"{vk.issuer}/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
            "scope": "users:read users:write",
            "resource": vk.resource,
        },
        timeout=5,
    )
    assert answer.status_code == 200
    token = answer.json()["access_token"]
    status, body = call(app, token, "/scoped/users:read")
    assert status == 200, body
    assert body["scopes"] == ["users:read", "users:write"]
    assert body["user_id"] is None  # the client acts for itself
    assert server.hits[f"/oauth2/{vk.realm}/oidc/jwks"] == 1
    assert (
        app.test_client().get("/scoped/posts:delete", headers=auth_header(token)).status_code == 403
    )


def test_voxkey_user_token_audience_and_introspection(server: IssuerServer) -> None:
    vk = VoxKey(server)
    app = provider_app(
        vk.config(
            INTROSPECTION_CLIENT_ID=vk.client_id, INTROSPECTION_CLIENT_SECRET=vk.client_secret
        )
    )
    token = vk.user_token()
    assert call(app, token)[1]["user_id"] == "user_abc123"
    refused(app, vk.user_token(aud=f"{server.url}/api/v1/other-realm"))
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    assert body["scopes"] == ["openid", "profile", "read:posts"]
    assert st_basic(vk.introspections[-1]) == basic(vk.client_id, vk.client_secret)
    vk.active.pop(token)  # revoked (RFC 7009)
    refused(app, token, "/introspected")


def st_basic(request: Any) -> str:
    return str(request.headers.get("Authorization", ""))


# -- Beyond Identity ---------------------------------------------------------------------


def test_beyond_identity_offline_validation_through_jku(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config())
    status, body = call(app, bi.token())
    assert status == 200, body
    assert body["scopes"] == ["myapp:read", "myapp:write"]
    assert body["user_id"] == "7a8cce58fd160449"
    assert call(app, bi.token(aud=[bi.resource_server]))[0] == 200
    assert call(app, bi.token(aud=bi.app_client))[0] == 200
    # Cache-Control: max-age=600 -> the key set is fetched once
    assert server.hits[bi.jwks_path] == 1


def test_beyond_identity_refuses_a_jku_host_not_allowlisted(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config())
    with IssuerServer() as attacker:
        attacker.route("/jwks.json", bi.jwks_reply)  # even the right keys
        for jku in (
            f"http://localhost:{attacker.port}/jwks.json",
            f"https://evil.example.com/{bi.jwks_path}",
            f"https://127.0.0.1.evil.example.com/{bi.jwks_path}",
            f"http://user@127.0.0.1:{server.port}{bi.jwks_path}",
        ):
            refused(app, bi.token(jku=jku))
        for jku in (f"ftp://127.0.0.1/{bi.jwks_path}", "not a url", f"//127.0.0.1{bi.jwks_path}"):
            refused(app, bi.raw_token({"jku": jku}))
        refused(app, bi.token(jku=None))  # no jku at all
        assert attacker.hits["/jwks.json"] == 0
    assert server.hits[bi.jwks_path] == 0


def test_beyond_identity_refuses_a_jku_that_is_no_ascii_url_quietly(
    server: IssuerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A URI is ASCII (RFC 3986): a ``jku`` with a lone surrogate (the JSON
    escape ``\\ud800``) could not be encoded to key the refused-URL memory and
    each such token logged an ERROR with a traceback (a log flood); a
    non-ASCII one was fetched."""
    bi = BeyondIdentity(server)
    app = provider_app(bi.config())
    with caplog.at_level(logging.ERROR):
        for path in ("/jwks\ud800", "/jwks\u00e9"):
            refused(app, bi.raw_token({"jku": f"{server.url}{bi.jwks_path}{path}"}))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert server.hits[bi.jwks_path] == 0
    assert call(app, bi.token())[0] == 200


def test_beyond_identity_http_jku_needs_the_test_only_switch(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config(ALLOW_INSECURE_HTTP=False))
    refused(app, bi.token())  # production: https on port 443 only
    assert server.hits[bi.jwks_path] == 0


def test_beyond_identity_jku_sources_stay_bounded(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    clock = FakeClock()
    app = provider_app(bi.config(), clock=clock)
    forged = [f"/v1/nothing-here/{n}" for n in range(80)]
    for _round in range(2):
        for path in forged:  # anyone can name any path of the allowlisted host
            status, body = call(app, bi.token(jku=f"{server.url}{path}"))
            # The host answers 404: the token names no key set (401), the issuer is up.
            assert (status, body["error"]) == (401, "invalid_token")
    # Each URL was asked once: the second round was refused without a fetch.
    assert all(server.hits[path] <= 1 for path in forged)
    assert call(app, bi.token())[0] == 200  # the real key set is still admitted at once
    sources = get_state(app).keys.status()
    assert len(sources) <= 66
    assert [s.source for s in sources if s.kids] == [bi.jku]


def test_forged_jku_paths_cost_one_fetch_per_cooldown(server: IssuerServer) -> None:
    """Each forged token naming a new path of the allowlisted host cost one
    fetch, before any signature check, and its request waited for it: a
    flood made the API hammer the identity provider. Now one failed new
    ``jku`` of an issuer per cooldown is fetched; the real one (the
    issuer's own well-known key set) is never held back by the flood."""
    bi = BeyondIdentity(server)
    clock = FakeClock()
    app = provider_app(bi.config(JWKS_REFRESH_COOLDOWN=30), clock=clock)
    forged = [f"/v1/forged/{n}" for n in range(50)]
    for path in forged:
        status, body = call(app, bi.token(jku=f"{server.url}{path}"))
        assert (status, body["error"]) == (401, "invalid_token")
    assert sum(server.hits[path] for path in forged) == 1
    assert call(app, bi.token())[0] == 200, "the real key set, fetched cold, at once"
    clock.advance(31)  # the cooldown is over: the next new path is asked again
    assert call(app, bi.token(jku=f"{server.url}/v1/forged/late"))[0] == 401
    assert server.hits["/v1/forged/late"] == 1


def test_a_templated_issuers_own_jku_is_never_paced(server: IssuerServer) -> None:
    """With a templated ``ISSUER`` the exemption was built from the template
    text (``…/{tenant}/…/.well-known/jwks.json``), which no token names: one
    forged token per cooldown held back every tenant's own key set."""
    bi = BeyondIdentity(server)
    config = bi.config(
        PROVIDER="generic",
        ALLOWED_JKU_HOSTS=["127.0.0.1"],
        ISSUER=bi.issuer.replace(bi.tenant, "{tenant}"),
        ALLOWED_TENANTS=[bi.tenant, "0002222222222222"],
        ISSUER_PLACEHOLDER_CLAIMS={"tenant": "bi_t"},
        JWKS_URI=f"{server.url}/v1/shared/jwks.json",  # required for a template
    )
    app = provider_app(config, clock=FakeClock())
    assert call(app, bi.token(jku=f"{server.url}/v1/forged/1"))[0] == 401
    assert call(app, bi.token())[0] == 200, "the tenant's own well-known key set"


def test_with_any_tenant_a_templated_well_known_jku_is_paced(server: IssuerServer) -> None:
    """With ``ALLOWED_TENANTS="*"`` every made-up tenant's well-known key set
    passed for the issuer's own: forged tokens each cost a fetch again."""
    bi = BeyondIdentity(server)
    config = bi.config(
        PROVIDER="generic",
        ALLOWED_JKU_HOSTS=["127.0.0.1"],
        ISSUER=bi.issuer.replace(bi.tenant, "{tenant}"),
        ALLOWED_TENANTS="*",
        ISSUER_PLACEHOLDER_CLAIMS={"tenant": "bi_t"},
        JWKS_URI=f"{server.url}/v1/shared/jwks.json",
    )
    app = provider_app(config, clock=FakeClock())
    paths = [
        f"/v1/tenants/{n:016d}/realms/{bi.realm}/applications/{bi.application}"
        "/.well-known/jwks.json"
        for n in range(10)
    ]
    for path in paths:
        assert call(app, bi.token(jku=f"{server.url}{path}"))[0] == 401
    assert sum(server.hits[path] for path in paths) == 1


def test_a_child_forked_during_a_new_jku_fetch_fetches_its_own(server: IssuerServer) -> None:
    """The child inherited the issuer's "new jku fetch under way" mark with
    no thread to clear it: every new jku of the issuer was refused for good."""
    bi = BeyondIdentity(server)
    server.route("/v1/keys/other.json", bi.jwks_reply)  # a genuine jku of another shape
    clock = FakeClock()
    app = provider_app(bi.config(), clock=clock)
    server.hold("/v1/forged/slow")
    first = threading.Thread(target=call, args=(app, bi.token(jku=f"{server.url}/v1/forged/slow")))
    first.start()
    try:
        assert server.wait_for_hits("/v1/forged/slow", 1)

        def in_the_child() -> int:
            clock.advance(100)  # past any cooldown
            return call(app, bi.token(jku=f"{server.url}/v1/keys/other.json"))[0]

        assert in_forked_child(in_the_child, timeout=20) == 200
    finally:
        server.release("/v1/forged/slow")
        first.join(timeout=30)


def test_concurrent_forged_jku_paths_start_one_fetch(server: IssuerServer) -> None:
    """Pacing began only once a fetch had failed: forged tokens arriving
    while the first one's fetch was under way each started their own."""
    bi = BeyondIdentity(server)
    app = provider_app(bi.config(), clock=FakeClock())
    server.hold("/v1/forged/slow")
    first = threading.Thread(target=call, args=(app, bi.token(jku=f"{server.url}/v1/forged/slow")))
    first.start()
    try:
        assert server.wait_for_hits("/v1/forged/slow", 1)
        for number in range(5):
            status, body = call(app, bi.token(jku=f"{server.url}/v1/forged/{number}"))
            assert (status, body["error"]) == (401, "invalid_token")
        assert call(app, bi.token())[0] == 200, "the real key set is not held back"
    finally:
        server.release("/v1/forged/slow")
        first.join(timeout=30)
    assert sum(server.hits[f"/v1/forged/{n}"] for n in range(5)) == 0


def test_beyond_identity_forged_jku_outages_leave_the_issuer_available(
    server: IssuerServer,
) -> None:
    """A forged ``jku`` naming a path of the host that fails (5xx) is an
    outage of that URL alone: asked once per cooldown, on its own breaker."""
    bi = BeyondIdentity(server)
    server.route("/broken", Reply(502, "bad gateway"))
    app = provider_app(bi.config(INTROSPECTION_AUTH="bearer", INTROSPECTION_TOKEN=bi.api_token))
    for _ in range(10):  # more than CIRCUIT_BREAKER_FAILURES (5)
        status, body = call(app, bi.token(jku=f"{server.url}/broken"))
        assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert server.hits["/broken"] == 1
    assert call(app, bi.token())[0] == 200  # the real key set, same origin
    assert call(app, bi.token(), path="/introspected")[0] == 200


def test_beyond_identity_forged_jku_pages_leave_the_issuer_available(
    server: IssuerServer,
) -> None:
    """Pages of the issuer's host that are not key sets never trip its circuit.

    A forged ``jku`` naming the host's HTML page used to count as an outage
    of the host: a few of them opened the circuit breaker that introspection
    and every real key set of that host share, and real tokens got 503.
    """
    bi = BeyondIdentity(server)
    server.route("/landing", Reply(200, "<html>hi</html>", {"Content-Type": "text/html"}))
    app = provider_app(bi.config(INTROSPECTION_AUTH="bearer", INTROSPECTION_TOKEN=bi.api_token))
    for n in range(6):  # more than CIRCUIT_BREAKER_FAILURES (5)
        status, body = call(app, bi.token(jku=f"{server.url}/landing?{n}"))
        assert (status, body["error"]) == (401, "invalid_token")
    assert call(app, bi.token())[0] == 200  # first fetch of the real key set
    assert call(app, bi.token(), path="/introspected")[0] == 200


@pytest.mark.parametrize(
    "claims",
    [
        {"bi_r": "another-realm"},
        {"bi_t": "another-tenant"},
        {"bi_r": None},
        {"aud": ["someone-else"]},
        {"nbf": None},
    ],
    ids=["realm", "tenant", "no-realm", "audience", "no-nbf"],
)
def test_beyond_identity_claims_must_match_the_application(
    server: IssuerServer, claims: dict[str, Any]
) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config())
    assert call(app, bi.token())[0] == 200
    refused(app, bi.token(**claims))


def test_beyond_identity_nbf_and_exp(server: IssuerServer) -> None:
    bi = BeyondIdentity(server)
    app = provider_app(bi.config())
    times = bi.times()
    refused(
        app, bi.token(nbf=times["iat"] + 3600, exp=times["iat"] + 7200), error="token_not_active"
    )
    past = times["iat"] - 7200
    refused(app, bi.token(iat=past, nbf=past, exp=past + 3600), error="token_expired")


@pytest.mark.parametrize("method", ["client_secret_basic", "bearer"])
def test_beyond_identity_introspection(server: IssuerServer, method: str) -> None:
    bi = BeyondIdentity(server)
    extra: dict[str, Any] = {"INTROSPECTION_AUTH": method}
    if method == "bearer":
        extra["INTROSPECTION_TOKEN"] = bi.api_token
    else:
        extra.update(
            INTROSPECTION_CLIENT_ID=bi.client_id, INTROSPECTION_CLIENT_SECRET=bi.client_secret
        )
    app = provider_app(bi.config(**extra))
    token = bi.token()
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    request = bi.introspections[-1]
    assert request.path == f"/v1/tenants/{bi.tenant}/realms/{bi.realm}/introspect"
    expected = (
        f"Bearer {bi.api_token}" if method == "bearer" else basic(bi.client_id, bi.client_secret)
    )
    assert request.headers["Authorization"] == expected
    assert request.form()["token"] == token
    assert body["scopes"] == ["myapp:read", "myapp:write"]
    assert body["user_id"] == "7a8cce58fd160449"
    # The documented answer carries no bi_t/bi_r: its iss names tenant and realm.
    other_app = bi.issuer.replace(bi.realm, "another-realm")
    refused(app, bi.token(iss=other_app, bi_r="another-realm"), "/introspected")
    bi.answer_has_targets = True  # an answer that does carry them is checked
    assert call(app, bi.token(), "/introspected")[0] == 200
    refused(app, bi.token(bi_r="another-realm"), "/introspected")
    bi.active.clear()
    refused(app, token, "/introspected")


# -- Auth0 --------------------------------------------------------------------------


def test_auth0_user_and_m2m_tokens(server: IssuerServer) -> None:
    a0 = Auth0(server)
    app = provider_app(a0.config())
    status, body = call(app, a0.user_token())
    assert status == 200, body
    # scope only: the user's permissions hold delete:messages, the client was
    # not granted it
    assert body["scopes"] == ["email", "openid", "profile", "read:messages", "write:messages"]
    assert call(app, a0.user_token(), "/scoped/delete:messages")[0] == 403
    assert body["client_id"] == "spa-client-id"
    assert body["organization_id"] == "org_Hd5g7kL2mN8pQ1rS"
    assert body["user_id"] == "auth0|64b7f2d0c1a2b3c4d5e6f7a8"
    status, body = call(app, a0.m2m_token())
    assert status == 200, body
    assert (body["client_id"], body["user_id"], body["scopes"]) == (
        "m2m-client-id",
        None,
        ["read:reports"],
    )
    assert server.hits["/.well-known/jwks.json"] == 1


def test_auth0_pitfalls(server: IssuerServer) -> None:
    a0 = Auth0(server)
    app = provider_app(a0.config())
    refused(app, a0.user_token(aud="spa-client-id"))  # an ID token's audience
    refused(app, a0.user_token(iss=a0.issuer.rstrip("/")))  # Auth0's iss ends with '/'
    refused(app, a0.user_token(aud=["https://other-api.example.com"]))


# -- Okta ---------------------------------------------------------------------------


def test_okta_custom_authorization_server(server: IssuerServer) -> None:
    okta = Okta(server)
    app = provider_app(
        okta.config(
            INTROSPECTION_CLIENT_ID=okta.client_id, INTROSPECTION_CLIENT_SECRET=okta.client_secret
        )
    )
    status, body = call(app, okta.token())
    assert status == 200, body
    assert body["scopes"] == ["email", "openid", "orders:read"]
    assert body["client_id"] == "0oa1b2c3d4e5f6g7h8i9"
    assert body["user_id"] == "alice@example.com"
    m2m = okta.token(sub="0oa1b2c3d4e5f6g7h8i9", uid=None, scp=["orders:read"])
    assert call(app, m2m)[1]["user_id"] is None
    refused(app, okta.token(aud="0oa1b2c3d4e5f6g7h8i9", scp=None, nonce="n"))  # an ID token
    assert server.hits["/oauth2/default/v1/keys"] == 1
    token = okta.token()
    status, body = call(app, token, "/introspected")
    assert status == 200, body
    # the answer uses RFC 7662 names: scope (string) and client_id
    assert (body["scopes"], body["client_id"]) == (
        ["email", "openid", "orders:read"],
        "0oa1b2c3d4e5f6g7h8i9",
    )
    assert okta.introspections[-1].path == "/oauth2/default/v1/introspect"


# -- Microsoft Entra ID -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "keys_host"),
    [
        ("https://login.microsoftonline.com/{tenantid}/v2.0", "login.microsoftonline.com"),
        ("https://sts.windows.net/{tenantid}/", "login.microsoftonline.com"),
        ("https://login.chinacloudapi.cn/{tenantid}/v2.0", "login.chinacloudapi.cn"),
        ("https://sts.chinacloudapi.cn/{tenantid}/", "login.chinacloudapi.cn"),
        (
            "https://login.partner.microsoftonline.cn/{tenantid}/v2.0",
            "login.partner.microsoftonline.cn",
        ),
        ("https://login.microsoftonline.us/{tenantid}/v2.0", "login.microsoftonline.us"),
        ("https://login.microsoftonline.us/{tenantid}/", "login.microsoftonline.us"),
    ],
)
def test_entra_keys_come_from_the_issuers_own_cloud(issuer: str, keys_host: str) -> None:
    """National clouds sign with keys of their own: every Azure China token
    was refused as signed by an unknown key (the global key set)."""
    s = settings("entra_id", issuer, AUDIENCE="api", ALLOWED_TENANTS="*")
    assert s.jwks_uri_for(issuer) == f"https://{keys_host}/common/discovery/v2.0/keys"


def test_entra_personal_accounts_are_no_organization(server: IssuerServer) -> None:
    """Every personal Microsoft account's token carries the one consumers
    tenant as ``tid``: two unrelated people shared one organization_id, so
    ``@require_organization`` and the tenant scoping put them together."""
    entra = EntraID(server)
    app = provider_app(entra.config(ALLOWED_TENANTS=[entra.home, entra.consumers]))
    status, body = call(app, entra.v2_token(entra.consumers))
    assert (status, body["organization_id"]) == (200, None)
    response = app.test_client().get("/org", headers=auth_header(entra.v2_token(entra.consumers)))
    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error"] == "missing_organization_context"
    status, body = call(app, entra.v2_token(entra.home))
    assert (status, body["organization_id"]) == (200, entra.home)


def test_entra_multi_tenant_tokens(server: IssuerServer) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config())
    status, body = call(app, entra.v2_token())
    assert status == 200, body
    assert body["organization_id"] == entra.home
    assert body["scopes"] == ["Orders.Read", "access_as_user"]
    assert body["client_id"] == "0ce8a2f0-2c0d-4f1b-bd3e-7c9a0b4f3e21"
    assert body["user_id"] == "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ"
    assert body["issuer"] == f"{server.url}/{entra.home}/v2.0"
    status, body = call(app, entra.v2_token(entra.partner))
    assert (status, body["organization_id"]) == (200, entra.partner)
    status, body = call(app, entra.app_token())
    assert (status, body["scopes"], body["user_id"]) == (200, ["Orders.Read.All"], None)
    status, body = call(app, entra.v1_token())
    assert status == 200, body
    assert body["client_id"] == "1950a258-227b-4e31-a9cf-717495945fc2"
    assert body["scopes"] == ["user_impersonation"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_entra_id_token_is_refused(server: IssuerServer, version: str) -> None:
    """An ID token of the API's own app registration: same issuer, keys, ``aud``.

    It names no client (access tokens carry ``azp`` or ``appid``), and may
    carry the user's app ``roles``; it must not pass as an access token.
    """
    en = EntraID(server)
    app = provider_app(en.config())
    tid = en.home
    issuer = (en.v2 if version == "v2" else en.v1).replace("{tenantid}", tid)
    id_token = en.sign(
        {
            "aud": en.api_client,
            "iss": issuer,
            "oid": "00000000-0000-0000-66f3-3332eca7ea81",
            "preferred_username": "alice@contoso.com",
            "roles": ["Orders.Admin"],
            "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
            "tid": tid,
            "nonce": "123523",
            "ver": "2.0" if version == "v2" else "1.0",
            **en.times(),
        }
    )
    refused(app, id_token)
    refused(app, id_token, "/org")
    refused(app, id_token, "/scoped/Orders.Admin")
    assert call(app, en.v2_token())[0] == 200
    assert call(app, en.v1_token())[0] == 200


def test_entra_token_from_another_tenant_is_refused(server: IssuerServer) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config())
    refused(app, entra.v2_token(entra.stranger))
    refused(app, entra.v1_token(entra.stranger))
    assert (
        call(provider_app(entra.config(ALLOWED_TENANTS="*")), entra.v2_token(entra.stranger))[0]
        == 200
    )


@pytest.mark.parametrize(
    "iss",
    [
        "{url}/{stranger}/v2.0",  # tid says home, iss names another tenant
        "{url}/{home}/extra/v2.0",
        "{url}/{home}/v2.0/",
        "{url}/{{tenantid}}/v2.0",  # the template itself
        "{url}/../v2.0",
        "{url}/%2E%2E/v2.0",
        "{url}/a%2Fb/v2.0",
        "{url}/{home}/v2.0?x=1",
        "{url}//v2.0",
    ],
)
def test_entra_iss_must_match_the_template_and_the_tid(server: IssuerServer, iss: str) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config(ALLOWED_TENANTS="*"))
    forged = iss.format(url=server.url, home=entra.home, stranger=entra.stranger)
    refused(app, entra.v2_token(iss=forged))


def test_entra_key_sources_stay_bounded(server: IssuerServer) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config(ALLOWED_TENANTS="*"))
    tenants = [f"00000000-0000-0000-0000-{n:012d}" for n in range(40)]
    for tid in tenants:
        assert call(app, entra.v2_token(tid))[0] == 200
        assert call(app, entra.v1_token(tid))[0] == 200
    state = get_state(app)
    with app.app_context():
        names = sorted(s.issuer for s in state.keys.status())
    assert names == sorted([entra.v1, entra.v2])  # one source per configured template
    assert server.hits["/common/discovery/v2.0/keys"] == 2  # once per template, not per tenant
    # an issuer that is not configured never causes a fetch
    refused(app, entra.v2_token(iss=f"{server.url}/{entra.home}/v3.0"))
    assert server.hits["/common/discovery/v2.0/keys"] == 2


def test_entra_single_tenant_needs_no_tenant_list(server: IssuerServer) -> None:
    entra = EntraID(server)
    issuer = f"{server.url}/{entra.home}/v2.0"
    app = provider_app(entra.config(ISSUER=issuer, ALLOWED_TENANTS=None))
    assert call(app, entra.v2_token())[0] == 200
    refused(app, entra.v2_token(entra.partner))


# -- Keycloak -----------------------------------------------------------------------------


def test_keycloak_user_service_account_and_id_token(server: IssuerServer) -> None:
    kc = Keycloak(server)
    app = provider_app(
        kc.config(
            INTROSPECTION_CLIENT_ID=kc.client_id, INTROSPECTION_CLIENT_SECRET=kc.client_secret
        )
    )
    status, body = call(app, kc.token())
    assert status == 200, body
    assert body["scopes"] == ["openid", "orders:read", "profile"]
    assert body["client_id"] == "web-app"
    assert body["user_id"] == "f:0a1b2c3d:alice"
    status, body = call(app, kc.service_account_token())
    assert (status, body["client_id"], body["user_id"]) == (200, "batch", None)
    refused(app, kc.id_token())  # same keys and issuer, typ ID
    assert server.hits["/realms/acme/protocol/openid-connect/certs"] == 1
    assert call(app, kc.token(), "/introspected")[0] == 200
    assert kc.introspections[-1].path == "/realms/acme/protocol/openid-connect/token/introspect"


def test_keycloak_tokens_without_an_audience_are_refused_by_introspection_too(
    server: IssuerServer,
) -> None:
    """Keycloak leaves ``aud`` out when a token has no audience (no Audience
    mapper), and its introspection answer is the token's own claims: the
    JWT route refused such a token, the introspection route accepted it."""
    kc = Keycloak(server)
    credentials = {"INTROSPECTION_CLIENT_ID": kc.client_id}
    credentials["INTROSPECTION_CLIENT_SECRET"] = kc.client_secret
    app = provider_app(kc.config(**credentials))
    no_audience = kc.token(aud=None, azp="some-other-spa")
    refused(app, no_audience)
    refused(app, no_audience, "/introspected")
    refused(app, kc.token(aud=["account"]), "/introspected")
    assert call(app, kc.token(), "/introspected")[0] == 200
    lenient = provider_app(kc.config(INTROSPECTION_REQUIRE_AUDIENCE=False, **credentials))
    assert call(lenient, no_audience, "/introspected")[0] == 200  # the app may opt out


def test_keycloak_key_set_with_its_encryption_key_and_no_cache(server: IssuerServer) -> None:
    """Keycloak's certs: an RSA-OAEP key (``use: enc``) beside the signing
    key, ``Cache-Control: no-cache``. The signing key verifies, the key set is
    kept (no fetch per token), and the encryption key vouches for nothing."""
    kc = Keycloak(server)
    app = provider_app(kc.config())
    certs = f"/realms/{kc.realm}/protocol/openid-connect/certs"
    for _ in range(3):
        assert call(app, kc.token())[0] == 200
    assert server.hits[certs] == 1
    claims = {"iss": kc.issuer, "aud": kc.audience, "sub": "x", "typ": "Bearer", **kc.times()}
    signed_with_encryption_key = kc.encryption_holder.mint(claims, typ="JWT")
    refused(app, signed_with_encryption_key)


def test_keycloak_roles_and_organization_through_dotted_claim_paths(server: IssuerServer) -> None:
    kc = Keycloak(server)
    app = provider_app(
        kc.config(
            CLAIM_MAP={
                "scopes": ["scope", "realm_access.roles"],
                "organization_id": ["tenant.id"],
            }
        )
    )
    # a Hardcoded claim / User Attribute mapper with claim name "tenant.id"
    # (Keycloak nests a dotted claim name); its Organization Membership mapper
    # writes no single id (tests/test_providers_reference.py)
    status, body = call(app, kc.token(tenant={"id": "acme-corp"}), "/scoped/orders-admin")
    assert status == 200, body
    assert "orders-admin" in body["scopes"] and "orders:read" in body["scopes"]
    assert body["organization_id"] == "acme-corp"
    assert body["client_id"] == "web-app"  # the profile's other mappings stay
    refused(app, kc.token(), "/org", "missing_organization_context")


# -- Cognito ------------------------------------------------------------------------------


def test_cognito_access_tokens_and_pitfalls(server: IssuerServer) -> None:
    cg = Cognito(server)
    app = provider_app(cg.config())
    status, body = call(app, cg.access_token())
    assert status == 200, body
    assert body["client_id"] == cg.app_client
    assert body["scopes"] == ["aws.cognito.signin.user.admin", "orders/read"]
    assert body["user_id"] == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    m2m = cg.access_token(sub=cg.app_client, username=None, scope="orders/read")
    assert call(app, m2m)[1]["user_id"] is None
    refused(app, cg.id_token())
    refused(app, cg.access_token(client_id="another-app-client"))
    refused(app, cg.access_token(token_use="id"))
    assert server.hits[f"/{cg.pool}/.well-known/jwks.json"] == 1


# -- claims checks ---------------------------------------------------------------------------


def test_claims_check_refuses_with_401_or_the_error_it_raises(
    server: IssuerServer,
) -> None:
    sk = Scalekit(server)
    ext = OAuthVerify()
    seen: list[Mapping[str, Any]] = []

    @ext.claims_check
    def only_billing(claims: Mapping[str, Any]) -> bool:
        seen.append(claims)
        return bool(claims.get("custom_claims", {}).get("service_name") == "billing-worker")

    @ext.claims_check
    def no_admin_from_m2m(claims: Mapping[str, Any]) -> None:
        if "admin" in claims.get("scopes", []):
            raise InsufficientScopeError(scopes=["admin"], reason="m2m clients never get admin")

    @ext.claims_check
    def explodes(claims: Mapping[str, Any]) -> None:
        if claims.get("oid") == "org_boom":
            raise KeyError("bug in the check")

    app = provider_app(sk.config(), ext=ext)
    assert call(app, sk.m2m_token())[0] == 200
    assert seen[-1]["oid"] == "org_59615193906282635"
    refused(app, sk.m2m_token(custom_claims={"service_name": "other"}))
    response = app.test_client().get("/whoami", headers=auth_header(sk.m2m_token(scopes=["admin"])))
    assert response.status_code == 403
    assert response.get_json()["error"] == "insufficient_scope"
    refused(app, sk.m2m_token(oid="org_boom"))  # a failing check refuses, never a 500


def test_claims_checks_run_only_on_verified_claims(server: IssuerServer) -> None:
    sk = Scalekit(server)
    ext = OAuthVerify()
    calls: list[str] = []

    @ext.claims_check
    def record(claims: Mapping[str, Any]) -> bool:
        calls.append(str(claims.get("sub")))
        return True

    app = provider_app(sk.config(), ext=ext)
    forger = TokenIssuer(issuer=sk.issuer)
    forger.add_key("RS256", kid="snk_58327480989122566")
    forger.current_kid = "snk_58327480989122566"
    forged = forger.mint(
        {"iss": sk.issuer, "sub": "forged", "aud": sk.audience, **sk.times()}, typ="JWT"
    )
    refused(app, forged)  # bad signature
    refused(app, sk.m2m_token(exp=1), error="token_expired")
    refused(app, sk.m2m_token(aud="nope"))
    assert calls == []
    assert call(app, sk.m2m_token())[0] == 200
    assert calls == ["m2morg_69038819013296423"]


def test_claims_check_runs_on_introspection_answers(server: IssuerServer) -> None:
    st = SuperTokens(server)
    ext = OAuthVerify()

    @ext.claims_check
    def public_tenant(claims: Mapping[str, Any]) -> bool:
        return claims.get("tId") == "public"

    app = provider_app(st.config(), ext=ext)
    assert call(app, st.token(), "/introspected")[0] == 200
    refused(app, st.token(tId="tenant-b"), "/introspected")


def test_required_claim_values_compare_types_strictly(server: IssuerServer) -> None:
    okta = Okta(server)
    app = provider_app(okta.config(REQUIRED_CLAIM_VALUES={"ver": 1, "uid": "00u1a2b3c4d5e6f7g8h9"}))
    assert call(app, okta.token())[0] == 200
    refused(app, okta.token(ver=True))
    refused(app, okta.token(ver="1"))
    refused(app, okta.token(ver=1.0))
    refused(app, okta.token(uid="00u-other"))


# -- generic: discovery, and Authlib's own authorization server ------------------------


def test_generic_profile_discovers_the_keys(server: IssuerServer) -> None:
    issuer = TokenIssuer()
    issuer.serve(server)
    app = provider_app(
        {
            "OAUTH_VERIFY_ISSUER": issuer.issuer,
            "OAUTH_VERIFY_AUDIENCE": "api",
            "OAUTH_VERIFY_PROVIDER": "generic",
        }
    )
    token = issuer.mint(scopes=["read:users"], organization_id="org_1")
    status, body = call(app, token)
    assert status == 200, body
    assert body["organization_id"] == "org_1"
    assert server.hits["/.well-known/openid-configuration"] == 1
    assert server.hits["/jwks"] == 1


class _AuthlibClient:
    """A registered OAuth client of the Authlib authorization server."""

    def __init__(self, client_id: str, secret: str, scopes: set[str]) -> None:
        self.client_id = client_id
        self.secret = secret
        self.scopes = scopes

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return client_secret == self.secret

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


@pytest.fixture
def authlib_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Callable[[], None]]]:
    """Authlib's authorization server issuing RFC 9068 JWT access tokens over HTTP."""
    from authlib.integrations.flask_oauth2 import AuthorizationServer
    from authlib.oauth2.rfc6749 import grants
    from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator

    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # http on 127.0.0.1 only
    key = RSAKey.generate_key(2048, parameters={"kid": "authlib-key-1", "use": "sig"})
    clients = {
        "reports": _AuthlibClient("reports", "reports-secret", {"read:users", "write:users"})
    }
    as_app = Flask("authlib_as")
    http = make_server("127.0.0.1", 0, as_app, threaded=True)
    issuer = f"http://127.0.0.1:{http.server_port}"

    class Generator(JWTBearerTokenGenerator):  # type: ignore[misc]
        def get_jwks(self) -> dict[str, Any]:
            # One private JWK as a dict: what every Authlib since 1.6 signs with.
            return key.as_dict(private=True)

        def get_audiences(self, client: Any, user: Any, scope: str) -> str:
            return "https://api.example.com"

        def get_extra_claims(
            self, client: Any, grant_type: str, user: Any, scope: str
        ) -> dict[str, Any]:
            return {"organization_id": "org_authlib"}

    server = AuthorizationServer(
        as_app, query_client=clients.get, save_token=lambda token, request: None
    )
    server.register_grant(grants.ClientCredentialsGrant)
    server.register_token_generator("default", Generator(issuer=issuer))

    @as_app.post("/token")
    def token() -> Any:
        return server.create_token_response()

    @as_app.get("/.well-known/oauth-authorization-server")
    def metadata() -> dict[str, Any]:
        return {
            "issuer": issuer,
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            "grant_types_supported": ["client_credentials"],
        }

    @as_app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return dict(KeySet([key]).as_dict(private=False))

    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield issuer, http.shutdown
    http.shutdown()
    thread.join(timeout=10)


def test_authlib_authorization_server_rfc9068_tokens_with_discovery(
    authlib_server: tuple[str, Callable[[], None]],
) -> None:
    from authlib.integrations.requests_client import OAuth2Session

    issuer, _stop = authlib_server
    app = provider_app(
        {"OAUTH_VERIFY_ISSUER": issuer, "OAUTH_VERIFY_AUDIENCE": "https://api.example.com"}
    )
    with OAuth2Session("reports", "reports-secret", scope="read:users admin") as client:
        fetched = client.fetch_token(f"{issuer}/token", grant_type="client_credentials")
    token = fetched["access_token"]
    status, body = call(app, token, "/scoped/read:users")
    assert status == 200, body
    assert body["subject"] == "reports"
    assert body["client_id"] == "reports"
    assert body["scopes"] == ["read:users"]  # "admin" was not granted
    assert body["organization_id"] == "org_authlib"
    assert body["user_id"] is None  # client credentials: the client is the subject
    assert (
        app.test_client().get("/scoped/write:users", headers=auth_header(token)).status_code == 403
    )
    other = provider_app({"OAUTH_VERIFY_ISSUER": issuer, "OAUTH_VERIFY_AUDIENCE": "another-api"})
    refused(other, token)


@pytest.mark.parametrize(
    ("provider", "issuer", "doubtful"),
    [
        ("auth0", "https://tenant.eu.auth0.com", True),
        ("auth0", "https://tenant.eu.auth0.com/", False),
        ("entra_id", "https://login.microsoftonline.com/common/v2.0", True),
        ("entra_id", "https://login.microsoftonline.com/organizations/v2.0", True),
        ("entra_id", "https://login.microsoftonline.com/{tenantid}/v2.0", False),
        ("entra_id", "https://sts.windows.net/{tenantid}/", False),  # v1: with the slash
        ("scalekit", "https://your-env.scalekit.com/", True),
        ("scalekit", "https://your-env.scalekit.com", False),
        ("okta", "https://dev-1234.okta.com/oauth2/default/", True),
        ("keycloak", "https://sso.example.com/realms/acme/", True),
        ("keycloak", "https://sso.example.com/realms/acme", False),
        ("cognito", "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123/", True),
        ("supertokens", "https://api.example.com/auth/", True),
        ("voxkey", "https://your-domain.com/oauth2/6f1d2c3b/", True),
    ],
)
def test_an_issuer_no_token_can_carry_is_a_warning_at_start_up(
    provider: str, issuer: str, doubtful: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted (it is not contradictory), but every token would be refused: say so."""
    caplog.set_level(logging.WARNING, logger="flask_oauth_verify")
    apply_profile({"PROVIDER": provider, "ISSUER": issuer, **minimal(provider)})
    warned = [r for r in caplog.records if "looks wrong for provider" in r.getMessage()]
    assert bool(warned) is doubtful
