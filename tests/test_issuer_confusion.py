"""Multi-issuer and templated-issuer confusion (Entra ID multi-tenant).

Each token below is signed with the real key of a configured issuer, served
by a real IssuerServer: only the issuer rules stand between it and the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from flask_oauth_verify import ConfigurationError, Settings
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer

from .provider_emulators import EntraID
from .test_providers import call, provider_app, refused


@pytest.fixture
def server() -> Iterator[IssuerServer]:
    with IssuerServer() as srv:
        yield srv


HOME = EntraID.home
PARTNER = EntraID.partner


@pytest.mark.parametrize(
    ("tenant", "claims"),
    [
        (HOME, {"tid": PARTNER}),  # iss names home, tid says partner (both allowed)
        (PARTNER, {"tid": HOME}),
        (HOME, {"tid": None}),  # no tid
        (HOME, {"tid": [HOME]}),
        (HOME, {"tid": None, "tenant_id": HOME}),  # only the claim the profile does not read
        (HOME.upper(), {"tid": HOME.upper()}),  # allowed tenants compare exactly
        (HOME.upper(), {"tid": HOME}),
        (HOME, {"tid": HOME + " "}),
        (HOME.replace("f", "\uff46"), {"tid": HOME.replace("f", "\uff46")}),  # fullwidth f
    ],
)
def test_entra_iss_tenant_and_tid_must_agree(
    server: IssuerServer, tenant: str, claims: dict[str, Any]
) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config())
    refused(app, entra.v2_token(tenant, **claims))
    refused(app, entra.v1_token(tenant, **claims))
    assert call(app, entra.v2_token(HOME))[0] == 200


def test_entra_organization_is_the_tid_never_the_oid(server: IssuerServer) -> None:
    entra = EntraID(server)
    app = provider_app(entra.config())
    status, body = call(app, entra.v2_token(HOME, oid=PARTNER), "/org")
    assert (status, body["organization_id"]) == (200, HOME)


@pytest.mark.parametrize(
    "allowed",
    [
        ["*"],  # "*" means every tenant only alone; in a list it matched nothing
        "72f988bf-86f1-41af-91ab-2d7cd011db47,9188040d-6c67-4c5b-b112-36a304b66dad",
        [HOME, "tenant/one"],
        [".."],
        ["%2F"],
        [HOME.replace("f", "\uff46")],
    ],
)
def test_an_allowed_tenant_no_iss_can_name_is_refused_at_start_up(allowed: Any) -> None:
    """Such an entry silently refused every token of that tenant."""
    with pytest.raises(ConfigurationError, match="ALLOWED_TENANTS"):
        Settings.from_config(
            {
                "OAUTH_VERIFY_PROVIDER": "entra_id",
                "OAUTH_VERIFY_ISSUER": "https://login.microsoftonline.com/{tenantid}/v2.0",
                "OAUTH_VERIFY_AUDIENCE": "api",
                "OAUTH_VERIFY_ALLOWED_TENANTS": allowed,
            }
        )


def test_allowed_tenants_star_and_real_ids_still_start(server: IssuerServer) -> None:
    entra = EntraID(server)
    for allowed in ("*", HOME, [HOME, PARTNER, "contoso.onmicrosoft.com", "a_b~c"]):
        assert call(provider_app(entra.config(ALLOWED_TENANTS=allowed)), entra.v2_token())[0] == 200


def test_the_same_kid_in_two_issuers_sets_never_crosses(server: IssuerServer) -> None:
    """Issuer B publishes a key under A's kid: B's key never verifies a token
    claiming A, nor A's a token claiming B."""
    with IssuerServer() as other:
        a = TokenIssuer(issuer=server.url)
        b = TokenIssuer(issuer=other.url)
        b.current_kid = b.add_key("RS256", kid=a.current_kid)
        server.route("/jwks", lambda _r: Reply(200, a.jwks()))
        other.route("/jwks", lambda _r: Reply(200, b.jwks()))
        app = provider_app(
            {
                "OAUTH_VERIFY_ISSUER": [server.url, other.url],
                "OAUTH_VERIFY_AUDIENCE": "api",
                "OAUTH_VERIFY_JWKS_URI": {
                    server.url: f"{server.url}/jwks",
                    other.url: f"{other.url}/jwks",
                },
            }
        )

        def token(signer: TokenIssuer, iss: str) -> str:
            return signer.mint({"aud": "api", "sub": "s", "iss": iss, "exp": 2**32})

        assert call(app, token(a, server.url))[0] == 200
        assert call(app, token(b, other.url))[0] == 200  # both sets cached now
        refused(app, token(b, server.url))
        refused(app, token(a, other.url))


BI = (
    "https://auth-{region}.beyondidentity.com/v1/tenants/{tenant}/realms/{realm}/applications/{app}"
)


def beyond_identity(*issuers: str) -> Settings:
    return Settings.from_config(
        {
            "OAUTH_VERIFY_PROVIDER": "beyond_identity",
            "OAUTH_VERIFY_ISSUER": list(issuers),
            "OAUTH_VERIFY_AUDIENCE": "api",
            "OAUTH_VERIFY_INTROSPECTION_CLIENT_ID": "rs",
            "OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET": "secret",
        }
    )


@pytest.mark.parametrize(
    ("second", "key"),
    [
        ({"region": "us", "tenant": "t1", "realm": "r2"}, "ISSUER_CLAIMS"),
        ({"region": "us", "tenant": "t2", "realm": "r1"}, "ISSUER_CLAIMS"),
        ({"region": "eu", "tenant": "t1", "realm": "r1"}, "ALLOWED_JKU_HOSTS"),
    ],
)
def test_beyond_identity_issuers_of_two_realms_are_refused_at_start_up(
    second: dict[str, str], key: str
) -> None:
    """bi_t/bi_r and the jku host were read from the first issuer only: every
    token of the second application was refused, with a per-request log line."""
    first = BI.format(region="us", tenant="t1", realm="r1", app="a1")
    with pytest.raises(ConfigurationError, match=key):
        beyond_identity(first, BI.format(app="a2", **second))


def test_beyond_identity_applications_of_one_realm_share_the_settings() -> None:
    one = beyond_identity(
        BI.format(region="us", tenant="t1", realm="r1", app="a1"),
        BI.format(region="us", tenant="t1", realm="r1", app="a2"),
    )
    assert dict(one.issuer_claims) == {"bi_t": "t1", "bi_r": "r1"}
    assert one.allowed_jku_hosts == ("auth-us.beyondidentity.com",)


def tenant_app(server: IssuerServer, allowed: Any, strategy: str = "introspection") -> Any:
    """A templated issuer (``tid``), one introspection endpoint for every tenant."""
    return provider_app(
        {
            "OAUTH_VERIFY_ISSUER": f"{server.url}/{{tenantid}}",
            "OAUTH_VERIFY_AUDIENCE": "api",
            "OAUTH_VERIFY_JWKS_URI": f"{server.url}/jwks",
            "OAUTH_VERIFY_ISSUER_PLACEHOLDER_CLAIMS": {"tenantid": "tid"},
            "OAUTH_VERIFY_ALLOWED_TENANTS": allowed,
            "OAUTH_VERIFY_INTROSPECTION_ENDPOINT": f"{server.url}/introspect",
            "OAUTH_VERIFY_INTROSPECTION_CLIENT_ID": "rs",
            "OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET": "secret",
            "OAUTH_VERIFY_STRATEGY": strategy,
            "OAUTH_VERIFY_CLAIM_MAP": {"organization_id": ["tid"]},
        }
    )


def test_an_introspection_answer_without_iss_is_no_tenant_of_the_allowlist(
    server: IssuerServer,
) -> None:
    """RFC 7662 makes ``iss`` optional; an active answer without it named a
    tenant nowhere the allowlist looks, and ``g.auth.organization_id`` became
    whatever its ``tid`` said."""
    signer = TokenIssuer(issuer=server.url)
    answer: dict[str, Any] = {}
    server.route("/jwks", lambda _r: Reply(200, signer.jwks()))
    server.route("/introspect", lambda _r: Reply(200, answer))
    answer.update(active=True, sub="u", tid="stranger", scope="read", client_id="c", exp=2**32)
    refused(tenant_app(server, ["home"]), "opaque-token")
    answer.update(iss=f"{server.url}/stranger")
    refused(tenant_app(server, ["home"]), "opaque-token")
    answer.update(iss=f"{server.url}/home", tid="home")
    status, body = call(tenant_app(server, ["home"]), "opaque-token")
    assert (status, body["organization_id"]) == (200, "home")
    # every tenant accepted: nothing to check, an answer without iss is fine
    del answer["iss"]
    assert call(tenant_app(server, "*"), "opaque-token")[0] == 200
    # "both": the answer only confirms a JWT whose own iss named an allowed tenant
    claims = {"aud": "api", "sub": "u", "iss": f"{server.url}/home", "tid": "home", "exp": 2**32}
    jwt = signer.mint(claims)
    assert call(tenant_app(server, ["home"], "both"), jwt)[0] == 200
