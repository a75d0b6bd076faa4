"""The configuration page, read as a contract: every documented default is the
real one, and a value of the wrong kind is a ``ConfigurationError`` naming its
key at ``init_app`` (never another exception, never a surprise in a request).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from flask_oauth_verify import ConfigurationError, Settings
from flask_oauth_verify.testing import IssuerServer, TokenIssuer

from .conftest import FakeClock, make_app

PAGE = (Path(__file__).parents[1] / "docs" / "configuration.rst").read_text()

#: keys without a ``Settings`` field of their own name, or whose field holds
#: the value in another shape; checked by the tests below or elsewhere.
NOT_A_FIELD = {
    "ISSUER": "issuers",
    "AUDIENCE": "audiences",
    "JWKS_URI": "jwks_uris",
    "JWKS": "static_jwks",
}


def documented_defaults() -> dict[str, Any]:
    """``{key: default}`` for every entry whose default is a Python literal."""
    found: dict[str, Any] = {}
    entries = re.findall(
        r"^\.\. data:: OAUTH_VERIFY_(\w+)\n(?:.*\n)*?\n   Default: (.*)$", PAGE, re.M
    )
    for key, text in entries:
        match = re.fullmatch(r"``(.+?)``\.?(?: \(.*\)\.?)?", text.strip())
        if match is None:
            continue  # "(required)", "discovered", "see :doc:`views`"
        try:
            found[key] = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            continue
    return found


def normalised(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(normalised(item) for item in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hasattr(value, "items"):
        return dict(value)
    return value


def test_every_documented_default_is_the_real_default(tokens: TokenIssuer) -> None:
    """A minimal configuration gives each field the default the page states."""
    defaults = documented_defaults()
    assert len(defaults) > 40  # the parse found the entries
    settings = Settings.from_config(
        {"OAUTH_VERIFY_ISSUER": tokens.issuer, "OAUTH_VERIFY_AUDIENCE": "api"}
    )
    checked = 0
    for key, default in defaults.items():
        field = NOT_A_FIELD.get(key, key.lower())
        if not hasattr(settings, field):
            continue  # read from Settings.raw (HEALTH_*, METRICS_ENDPOINT, ...)
        actual = getattr(settings, field)
        if key == "JWKS_URI_FALLBACKS":  # stored per issuer
            actual = actual.get(tokens.issuer, ())
        if isinstance(actual, set | frozenset):  # a set, documented as a list
            actual, default = sorted(actual, key=repr), sorted(default, key=repr)
        assert normalised(actual) == normalised(default), key
        checked += 1
    assert checked > 35


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("INTROSPECTION_ENDPOINT", 5),  # was an AttributeError from urlsplit
        ("JWKS_URI", {"https://issuer.example.test": 5}),
        ("ORGANIZATION_COLUMN", None),  # was scoping on a column called "None"
        ("ORGANIZATION_COLUMN", ""),
        ("ORGANIZATION_COLUMN", ["organization_id"]),
        ("USER_COLUMN", None),
        ("USER_COLUMN", 5),
        ("INTROSPECTION_CLIENT_ID", 5),
        ("INTROSPECTION_CLIENT_ID", ["rs"]),
        ("INTROSPECTION_TOKEN", b"token"),
        ("ALLOWED_JKU_HOSTS", "https://keys.example.com"),  # a URL: never matched
        ("ALLOWED_JKU_HOSTS", ["keys.example.com:443"]),
        ("ALLOWED_JKU_HOSTS", ["keys.example.com/jwks"]),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_naming_the_key(
    tokens: TokenIssuer, key: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key}"):
        make_app(tokens.config(audience="api", **{key: value}))


def test_a_secret_of_the_wrong_kind_is_refused_without_echoing_it(tokens: TokenIssuer) -> None:
    secret = b"s3cr3t-value"
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET") as e:
        make_app(tokens.config(audience="api", INTROSPECTION_CLIENT_SECRET=secret))
    assert "s3cr3t" not in str(e.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HEALTH_PROBE_INTERVAL", "30s"),
        ("HEALTH_PROBE_INTERVAL", float("nan")),
        ("HEALTH_PROBE_INTERVAL", -1),
        ("HEALTH_REQUIRE_CACHE", "maybe"),
    ],
)
def test_health_keys_fail_at_start_up_without_the_route(
    tokens: TokenIssuer, key: str, value: object
) -> None:
    """The health checker is made on first use (``oauth.health_check()`` in an
    app's own view): a wrong value used to surface there, in a request."""
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key}"):
        make_app(tokens.config(audience="api", **{key: value}))


@pytest.mark.parametrize(
    "hosts", [["keys.example.com"], "Keys.Example.com", ["127.0.0.1"], ["::1"], ["localhost"]]
)
def test_jku_hosts_take_host_names_and_addresses(tokens: TokenIssuer, hosts: object) -> None:
    app = make_app(tokens.config(audience="api", ALLOWED_JKU_HOSTS=hosts))
    assert app.extensions["oauth_verify"].settings.allowed_jku_hosts


def test_the_documented_column_settings_reach_the_settings(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(audience="api", ORGANIZATION_COLUMN="tenant", USER_COLUMN="owner"))
    settings = app.extensions["oauth_verify"].settings
    assert (settings.organization_column, settings.user_column) == ("tenant", "owner")


@pytest.mark.parametrize(("ttl", "refetched_after"), [(None, 21600), (100, 100)])
def test_discovery_cache_ttl_is_how_long_metadata_is_kept(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    ttl: int | None,
    refetched_after: int,
) -> None:
    """Documented default 21600 s; the introspection endpoint is discovered,
    so each request reads the metadata and shows when it is fetched again."""
    extra = {} if ttl is None else {"DISCOVERY_CACHE_TTL": ttl}
    config = served_tokens.config(
        audience="api",
        STRATEGY="introspection",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
        **extra,
    )
    config.pop("OAUTH_VERIFY_JWKS_URI")
    client = make_app(config, clock=clock).test_client()
    token = served_tokens.mint_opaque(expires_in=10**6, now=clock.now)
    headers = {"Authorization": f"Bearer {token}"}
    discovery = "/.well-known/openid-configuration"

    assert client.get("/protected", headers=headers).status_code == 200
    assert issuer_server.hits[discovery] == 1
    clock.advance(refetched_after * 0.85)  # within the TTL, less its 10 % jitter
    assert client.get("/protected", headers=headers).status_code == 200
    assert issuer_server.hits[discovery] == 1
    clock.advance(refetched_after * 0.2)
    assert client.get("/protected", headers=headers).status_code == 200
    assert issuer_server.hits[discovery] == 2


@pytest.mark.parametrize(
    ("placeholder_claims", "claims", "status"),
    [
        (None, {"tenant": "t1"}, 200),  # not listed: the claim of its own name
        (None, {}, 401),
        (None, {"tenant": "t2"}, 401),
        ({"tenant": "tid"}, {"tid": "t1"}, 200),
        ({"tenant": "tid"}, {"tid": "t2", "tenant": "t1"}, 401),
    ],
)
def test_issuer_placeholder_claims_bind_the_tenant_to_a_claim(
    placeholder_claims: dict[str, str] | None, claims: dict[str, Any], status: int
) -> None:
    tenant = TokenIssuer(issuer="https://issuer.example.test/t1", audience="api")
    config = tenant.config(
        audience="api",
        ALLOWED_TENANTS=["t1"],
        ISSUER_PLACEHOLDER_CLAIMS=placeholder_claims,
    )
    config["OAUTH_VERIFY_ISSUER"] = "https://issuer.example.test/{tenant}"
    client = make_app(config).test_client()
    token = tenant.mint(**claims)
    assert (
        client.get("/protected", headers={"Authorization": f"Bearer {token}"}).status_code == status
    )


@pytest.mark.parametrize(("refused", "status"), [(None, 401), ([], 200), (["nonce"], 200)])
def test_refused_claims_none_keeps_the_id_token_check(
    tokens: TokenIssuer, refused: list[str] | None, status: int
) -> None:
    """``None`` used to turn the check off silently, as ``[]`` does."""
    client = make_app(tokens.config(audience="api", REFUSED_CLAIMS=refused)).test_client()
    token = tokens.mint(at_hash="aGFzaA")
    assert (
        client.get("/protected", headers={"Authorization": f"Bearer {token}"}).status_code == status
    )


@pytest.mark.parametrize("off", ["off", "", "false", "no", "0", False, None])
def test_a_metrics_endpoint_spelled_off_needs_no_metrics(tokens: TokenIssuer, off: object) -> None:
    """The route settings take the yes/no spellings; "off" used to count as
    a route asked for without ``METRICS``, a ConfigurationError."""
    app = make_app(tokens.config(audience="api", METRICS_ENDPOINT=off))
    assert app.test_client().get("/metrics").status_code == 404


def test_a_metrics_endpoint_without_metrics_is_still_refused(tokens: TokenIssuer) -> None:
    for route in ("/metrics", True, "on"):
        with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_METRICS_ENDPOINT"):
            make_app(tokens.config(audience="api", METRICS_ENDPOINT=route))


@pytest.mark.parametrize(
    "key", ["REFUSED_CLAIMS", "REQUIRED_CLAIMS", "ALLOWED_CLIENT_IDS", "ISSUER", "ALGORITHMS"]
)
def test_an_empty_string_is_refused_naming_the_key(tokens: TokenIssuer, key: str) -> None:
    """An empty environment variable used to become ``("",)``: for
    ``REFUSED_CLAIMS`` the ID-token check silently off."""
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key}"):
        make_app(tokens.config(audience="api", **{key: ""}))


def test_an_empty_audience_is_no_audience(tokens: TokenIssuer) -> None:
    """Required (it was taken as the audience ``""``), unless the check is off."""
    config = tokens.config(audience="api")
    config["OAUTH_VERIFY_AUDIENCE"] = ""
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_AUDIENCE is required"):
        make_app(config)
    app = make_app({**config, "OAUTH_VERIFY_VERIFY_AUDIENCE": False})
    token = tokens.mint(aud=None)
    assert (
        app.test_client()
        .get("/protected", headers={"Authorization": f"Bearer {token}"})
        .status_code
        == 200
    )
