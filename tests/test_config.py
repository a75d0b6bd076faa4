"""Settings: read once, validated at init_app, every error names its key."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_oauth_verify import ConfigurationError, OAuthVerify, Settings
from flask_oauth_verify.config import KNOWN_KEYS, UnknownSettingWarning, shown_url

BASE = {"OAUTH_VERIFY_ISSUER": "https://issuer.example.test", "OAUTH_VERIFY_AUDIENCE": "api"}


def settings(**overrides: Any) -> Settings:
    config = {**BASE, **{f"OAUTH_VERIFY_{k}": v for k, v in overrides.items()}}
    return Settings.from_config({k: v for k, v in config.items() if v is not None})


def test_defaults_are_the_documented_safe_ones() -> None:
    s = settings()
    assert s.algorithms == ("RS256",)
    assert s.jwks_cache_ttl == 600
    assert s.jwks_refresh_cooldown == 30
    assert s.jwks_max_staleness == 86400
    assert s.http_timeout == (2.0, 5.0)
    assert s.token_locations == ("header",)
    assert s.strategy == "jwks"
    assert s.verify_audience is True
    assert None in s.allowed_types and "at+jwt" in s.allowed_types
    assert s.refused_claims == ("at_hash", "c_hash", "cnf")
    assert s.require_client_id is False


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"ISSUER": None}, "OAUTH_VERIFY_ISSUER"),
        ({"AUDIENCE": None}, "OAUTH_VERIFY_AUDIENCE"),
        ({"ALGORITHMS": ["none"]}, "OAUTH_VERIFY_ALGORITHMS"),
        ({"ALGORITHMS": ["NONE"]}, "OAUTH_VERIFY_ALGORITHMS"),
        ({"ALGORITHMS": ["RS256", "HS256"]}, "OAUTH_VERIFY_ALGORITHMS"),
        ({"ALGORITHMS": []}, "OAUTH_VERIFY_ALGORITHMS"),
        ({"ALGORITHMS": ["XX999"]}, "OAUTH_VERIFY_ALGORITHMS"),
        ({"ISSUER": "http://issuer.example.com"}, "OAUTH_VERIFY_ALLOW_INSECURE_HTTP"),
        ({"JWKS_URI": "ftp://keys"}, "OAUTH_VERIFY_JWKS_URI"),
        ({"JWKS": {"nokeys": 1}}, "OAUTH_VERIFY_JWKS"),
        ({"STRATEGY": "magic"}, "OAUTH_VERIFY_STRATEGY"),
        ({"STRATEGY": "introspection"}, "OAUTH_VERIFY_INTROSPECTION_CLIENT_ID"),
        ({"TOKEN_LOCATIONS": ["cookie"]}, "OAUTH_VERIFY_TOKEN_LOCATIONS"),
        ({"LEEWAY": "30"}, "OAUTH_VERIFY_LEEWAY"),
        ({"LEEWAY": -1}, "OAUTH_VERIFY_LEEWAY"),
        ({"VERIFY_AUDIENCE": "no"}, "OAUTH_VERIFY_VERIFY_AUDIENCE"),
        ({"CLAIM_MAP": {"tenant": ["x"]}}, "OAUTH_VERIFY_CLAIM_MAP"),
        ({"PROVIDER": "nobody"}, "OAUTH_VERIFY_PROVIDER"),
        ({"REQUIRE_CLIENT_ID": "maybe"}, "OAUTH_VERIFY_REQUIRE_CLIENT_ID"),
        ({"PREFETCH_KEYS": 2}, "OAUTH_VERIFY_PREFETCH_KEYS"),
        ({"METRICS": "enabled"}, "OAUTH_VERIFY_METRICS"),
        ({"HEALTH_ROUTE": "health"}, "OAUTH_VERIFY_HEALTH_ROUTE"),
        ({"HEALTH_ROUTE": 1}, "OAUTH_VERIFY_HEALTH_ROUTE"),
        ({"METRICS_ENDPOINT": "/metrics"}, "OAUTH_VERIFY_METRICS_ENDPOINT"),
        ({"REALM": "API — prod"}, "OAUTH_VERIFY_REALM"),
        ({"REALM": "api\r\nX-Injected: 1"}, "OAUTH_VERIFY_REALM"),
        ({"REFUSED_CLAIMS": [""]}, "OAUTH_VERIFY_REFUSED_CLAIMS"),
        ({"USER_ID_PREFIX": ["usr_", 3]}, "OAUTH_VERIFY_USER_ID_PREFIX"),
    ],
)
def test_bad_settings_fail_at_init_app_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    app = Flask(__name__)
    config = {**BASE, **{f"OAUTH_VERIFY_{k}": v for k, v in overrides.items()}}
    app.config.update({k: v for k, v in config.items() if v is not None})
    with pytest.raises(ConfigurationError, match=key):
        OAuthVerify(app)
    assert "oauth_verify" not in app.extensions


def test_a_key_set_given_and_located_for_one_issuer_is_refused() -> None:
    """JWKS wins over JWKS_URI: an app setting both would have its URL ignored."""
    jwks: dict[str, Any] = {"keys": []}
    other = "https://other.example.test"
    for located in ("JWKS_URI", "JWKS_URI_FALLBACKS"):
        url = "https://issuer.example.test/keys"
        one_issuer = {located: url if located == "JWKS_URI" else [url]}
        with pytest.raises(
            ConfigurationError, match=f"OAUTH_VERIFY_JWKS and OAUTH_VERIFY_{located}"
        ):
            settings(JWKS=jwks, **one_issuer)
        by_issuer = {BASE["OAUTH_VERIFY_ISSUER"]: jwks, other: jwks}
        with pytest.raises(ConfigurationError, match=re.escape(f"set of {other};")):
            settings(ISSUER=[*by_issuer], JWKS=by_issuer, **{located: {other: one_issuer[located]}})
    # An empty entry (turning a profile's fallbacks off) locates nothing.
    assert settings(JWKS=jwks, JWKS_URI_FALLBACKS={BASE["OAUTH_VERIFY_ISSUER"]: []}).static_jwks
    # Pinned for one issuer, located for the other: no contradiction.
    mixed = settings(
        ISSUER=[BASE["OAUTH_VERIFY_ISSUER"], other],
        JWKS={BASE["OAUTH_VERIFY_ISSUER"]: jwks},
        JWKS_URI={other: "https://other.example.test/keys"},
    )
    assert mixed.jwks_uris == {other: "https://other.example.test/keys"}
    # A profile's own URL under pinned keys is no contradiction either.
    cognito = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC"
    pinned = settings(
        PROVIDER="cognito", ISSUER=cognito, AUDIENCE=None, ALLOWED_CLIENT_IDS=["c"], JWKS=jwks
    )
    assert pinned.static_jwks == jwks


def test_a_max_ttl_below_the_min_ttl_names_both_keys() -> None:
    app = Flask(__name__)
    app.config.update(
        {**BASE, "OAUTH_VERIFY_JWKS_MIN_TTL": 7200, "OAUTH_VERIFY_JWKS_MAX_TTL": 3600}
    )
    with pytest.raises(ConfigurationError) as raised:
        OAuthVerify(app)
    message = str(raised.value)
    assert "OAUTH_VERIFY_JWKS_MAX_TTL (3600 s)" in message
    assert "OAUTH_VERIFY_JWKS_MIN_TTL (7200 s)" in message
    equal = Flask(__name__)
    equal.config.update(
        {**BASE, "OAUTH_VERIFY_JWKS_MIN_TTL": 600, "OAUTH_VERIFY_JWKS_MAX_TTL": 600}
    )
    OAuthVerify(equal)  # a fixed lifetime is allowed


def test_several_issuers_need_a_jwks_uri_per_issuer() -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_JWKS_URI"):
        settings(ISSUER=["https://a.example", "https://b.example"], JWKS_URI="https://a.example/k")
    s = settings(
        ISSUER=["https://a.example", "https://b.example"],
        JWKS_URI={"https://a.example": "https://a.example/k"},
    )
    assert s.jwks_uri_for("https://a.example") == "https://a.example/k"
    assert s.jwks_uri_for("https://b.example") is None


def test_audience_check_can_only_be_turned_off_explicitly() -> None:
    s = settings(AUDIENCE=None, VERIFY_AUDIENCE=False)
    assert s.verify_audience is False and s.audiences == ()


def test_loopback_http_is_allowed_and_other_http_needs_the_flag() -> None:
    assert settings(ISSUER="http://127.0.0.1:8080").issuers == ("http://127.0.0.1:8080",)
    assert settings(ISSUER="http://localhost:1").issuers == ("http://localhost:1",)
    s = settings(ISSUER="http://issuer.internal", ALLOW_INSECURE_HTTP=True)
    assert s.allow_insecure_http


@pytest.mark.parametrize(
    "issuer", ["https://as.example.com/?tenant=1", "https://as.example.com/t#x", "https://a.b/t?"]
)
def test_an_issuer_with_a_query_or_fragment_is_refused(issuer: str) -> None:
    """RFC 8414 §2: an issuer identifier has no query or fragment (discovery
    would drop them and fetch another issuer's metadata)."""
    with pytest.raises(ConfigurationError, match="query or fragment"):
        settings(ISSUER=issuer)


def test_the_settings_repr_shows_no_credential_of_a_url_or_of_an_unknown_key() -> None:
    """A URL's user-info (a password, or an API key as the user name) and
    query, in a field and in what was given; and the value of a key that is
    no setting (a mistyped secret): a repr ends up in logs and tracebacks."""
    with pytest.warns(UnknownSettingWarning):
        shown = repr(
            settings(
                ISSUER=["https://issuer.example.test", "https://other.example.test"],
                JWKS_URI={
                    "https://issuer.example.test": "https://keys.example.test/j?api_key=QK-1",
                    "https://other.example.test": "https://sk_live_UN-2@keys.example.test/j",
                },
                INTROSPECTION_ENDPOINT="https://rs:PW-3@as.example.test/introspect",
                INTROSPECTION_CLIENT_ID="rs",
                INTROSPECTION_CLIENT_SECRET="CS-4",
                HTTP_PROXY="http://ops:PX-5@proxy.internal:3128",
                INTROSPECTION_CLIENT_SECRT="TY-6",
            )
        )
    for secret in ("QK-1", "sk_live_UN-2", "PW-3", "CS-4", "PX-5", "TY-6", "ops", "rs:"):
        assert secret not in shown, secret
    # where each goes stays visible, and that something was hidden
    assert "'https://keys.example.test/j?***'" in shown
    assert "'https://***@keys.example.test/j'" in shown
    assert "'https://***@as.example.test/introspect'" in shown
    assert "'http://***@proxy.internal:3128'" in shown
    assert "'INTROSPECTION_CLIENT_SECRT': '***'" in shown


_WITH_CREDENTIALS = "rs:PW-7@as.example.test/x?api_key=QK-8"


@pytest.mark.parametrize(
    "overrides",
    [
        {"JWKS_URI": f"ftp://{_WITH_CREDENTIALS}"},
        {"JWKS_URI": _WITH_CREDENTIALS},  # no scheme at all
        {"JWKS_URI": f"https:/{_WITH_CREDENTIALS}"},
        {"JWKS_URI": f"https://{_WITH_CREDENTIALS} "},
        {"INTROSPECTION_ENDPOINT": f"ftp://{_WITH_CREDENTIALS}"},
        {"JWKS_URI_FALLBACKS": {"https://issuer.example.test": [_WITH_CREDENTIALS]}},
        {"ISSUER": f"https://{_WITH_CREDENTIALS}"},  # a query: no issuer
        {"ISSUER": "https://rs:PW-7@as.example.test/"},  # user-info: no issuer either
        {"JWKS_URI": {f"https://{_WITH_CREDENTIALS}": "https://keys.example.test/j"}},
        {"ISSUER": "https://rs:PW-7@as.example.test/{tid}/", "ALLOWED_TENANTS": ["t"]},
        {
            "JWKS_URI": {"https://login.example.test/{tid}/": f"https://{_WITH_CREDENTIALS}{{x}}"},
            "ISSUER": "https://login.example.test/{tid}/",
            "ALLOWED_TENANTS": ["t"],
        },
    ],
)
def test_a_refused_url_is_named_without_its_credentials(overrides: dict[str, Any]) -> None:
    """The first key of ``overrides`` is the one refused."""
    introspection = {"STRATEGY": "auto", "INTROSPECTION_CLIENT_ID": "rs"}
    with pytest.raises(ConfigurationError) as caught:
        settings(**overrides, **introspection, INTROSPECTION_CLIENT_SECRET="s")
    message = str(caught.value)
    assert f"OAUTH_VERIFY_{next(iter(overrides))}" in message
    assert "PW-7" not in message and "QK-8" not in message
    assert not re.search(r"\brs:", message)  # nor the user name
    assert "***@" in message


def test_masking_keeps_what_holds_no_credential() -> None:
    """An ``@`` in a URL's path or in a setting that is no URL is no user-info."""
    assert shown_url("https://idp.example.test/@realm/keys") == (
        "https://idp.example.test/@realm/keys"
    )
    assert shown_url("https://idp.example.test/@realm/keys", masked=True) == (
        "https://idp.example.test/@realm/keys"
    )
    assert "audiences=('api@example',)" in repr(settings(AUDIENCE="api@example"))


def test_a_static_key_set_shows_no_secret_member_in_the_settings_repr() -> None:
    """A key set holds public keys only; one pasted with its private parts
    (or an HMAC secret, ``k``) must not print them."""
    secret_jwks = {
        "keys": [
            {"kty": "RSA", "kid": "r", "n": "N-PUBLIC", "e": "AQAB", "d": "D-9", "p": "P-9"},
            {"kty": "oct", "kid": "h", "k": "K-9"},
        ]
    }
    with contextlib.suppress(ConfigurationError):  # refused or not: never printed
        shown = repr(settings(JWKS=secret_jwks))
        for secret in ("D-9", "P-9", "K-9"):
            assert secret not in shown
        assert "N-PUBLIC" in shown


@pytest.mark.parametrize(
    "url",
    [
        "https://keys.example.test:notaport/jwks",
        "https://keys.example.test:99999/jwks",
        "https://keys.example.test:+443/jwks",
        " https://keys.example.test/jwks",
        "https://keys.example.test/jwks ",
        "https://keys.example.test/jw\nks",
        "https://keys.example.test/my keys",
    ],
)
@pytest.mark.parametrize("key", ["JWKS_URI", "HTTP_PROXY"])
def test_a_url_that_cannot_be_what_was_meant_is_refused_at_init(url: str, key: str) -> None:
    """A port that is none fails every fetch (InvalidURL: every request gets
    503); space or a control character around or in a URL is a pasting
    mistake that fetches another path. Each is refused where it is made."""
    if key == "HTTP_PROXY":
        url = url.replace("https://keys.example.test", "http://proxy.internal")
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key}"):
        settings(**{key: url})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "LOCALHOST"])
def test_loopback_addresses_are_loopback(host: str) -> None:
    assert settings(ISSUER=f"http://{host}:8080").issuers == (f"http://{host}:8080",)


@pytest.mark.parametrize(
    "host",
    [
        "127.attacker.example",
        "127.0.0.1.nip.io",
        "127.1",
        "localhost.attacker.example",
        "::ffff:7f00:1",
        "::ffff:127.0.0.1",  # loopback to Python 3.13, not to 3.12: one rule for both
    ],
)
def test_names_that_only_look_like_loopback_need_the_flag(host: str) -> None:
    """A DNS name that starts with ``127.`` resolves wherever its owner likes."""
    authority = f"[{host}]" if ":" in host else host
    with pytest.raises(ConfigurationError, match="https"):
        settings(ISSUER=f"http://{authority}/")
    with pytest.raises(ConfigurationError, match="https"):
        settings(ISSUER="https://issuer.example", JWKS_URI=f"http://{authority}/keys")


YES_NO = {
    "ALLOW_INSECURE_HTTP": "allow_insecure_http",
    "PREFETCH_KEYS": "prefetch_keys",
    "SECURITY_HEADERS": "security_headers",
    "METRICS": "metrics",
    "METRICS_CLIENT_ID_LABEL": "metrics_client_id_label",
    "REQUIRE_CLIENT_ID": "require_client_id",
}


@pytest.mark.parametrize("key", sorted(YES_NO))
@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (0, False),
        ("true", True),
        ("1", True),
        (" YES ", True),
        ("on", True),
        (1, True),
    ],
)
def test_yes_no_settings_read_text_from_the_environment_as_meant(
    key: str, given: Any, meant: bool
) -> None:
    """``bool("false")`` is True: an environment variable must not turn a setting on."""
    assert getattr(settings(**{key: given}), YES_NO[key]) is meant


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("", None),
        ("off", None),
        (" False ", None),
        ("0", None),
        ("true", "/health/token-validation"),
        ("on", "/health/token-validation"),
        ("/ops/auth", "/ops/auth"),
    ],
)
def test_health_route_reads_text_from_the_environment_as_meant(
    given: str, meant: str | None
) -> None:
    """``HEALTH_ROUTE=off`` in the environment is no route, not an error or a path."""
    assert settings(HEALTH_ROUTE=given).health_route == meant


def test_insecure_http_written_as_false_text_does_not_allow_http() -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_ALLOW_INSECURE_HTTP"):
        settings(ISSUER="http://issuer.internal", ALLOW_INSECURE_HTTP="false")


def test_settings_are_immutable() -> None:
    s = settings()
    with pytest.raises(AttributeError):
        s.leeway = 5  # type: ignore[misc]


def test_init_app_twice_is_refused() -> None:
    app = Flask(__name__)
    app.config.update(BASE)
    ext = OAuthVerify(app)
    with pytest.raises(RuntimeError, match="already registered"):
        ext.init_app(app)


def test_provider_profile_fills_defaults_and_app_keys_win() -> None:
    s = settings(PROVIDER="scalekit")
    assert s.jwks_uri_for("https://issuer.example.test") == "https://issuer.example.test/keys"
    s = settings(PROVIDER="scalekit", JWKS_URI="https://issuer.example.test/other")
    assert s.jwks_uri_for("https://issuer.example.test") == "https://issuer.example.test/other"


def test_user_id_prefix_takes_one_prefix_or_several() -> None:
    assert settings(USER_ID_PREFIX="user_").user_id_prefix == "user_"
    several = settings(USER_ID_PREFIX=["usr_", "user_"]).user_id_prefix
    assert several == ("usr_", "user_")
    nothing: list[Any] = ["", []]
    for none in nothing:  # no prefix at all: the generic rule, as None
        assert settings(USER_ID_PREFIX=none).user_id_prefix is None


def test_the_known_keys_are_the_documented_ones() -> None:
    """The typo warning's list and the configuration page name the same keys."""
    page = (Path(__file__).parents[1] / "docs" / "configuration.rst").read_text()
    documented = set(re.findall(r"^\.\. data:: OAUTH_VERIFY_(\w+)", page, re.M))
    assert documented == KNOWN_KEYS


def test_a_mistyped_key_is_warned_about_with_the_close_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logged, and a Python warning too: an app that configured no logging
    (a fresh Flask app) saw nothing, and the check stayed silently off."""
    with (
        caplog.at_level(logging.WARNING, logger="flask_oauth_verify"),
        pytest.warns(UnknownSettingWarning) as warned,
    ):
        settings(REQUIRED_CLAIM_VALUE={"stt": 1}, LEEWAY=5)
    [record] = caplog.records
    [warning] = warned
    for message in (record.getMessage(), str(warning.message)):
        assert "OAUTH_VERIFY_REQUIRED_CLAIM_VALUE is not a setting" in message
        assert "did you mean OAUTH_VERIFY_REQUIRED_CLAIM_VALUES?" in message


@pytest.mark.parametrize(
    ("typo", "missing"),
    [("AUDIANCE", "AUDIENCE"), ("ISSUERS", "ISSUER"), ("ISSUER_URL", "ISSUER")],
)
def test_a_missing_required_key_names_its_likely_typo(typo: str, missing: str) -> None:
    config = {"OAUTH_VERIFY_ISSUER": "https://issuer.example", "OAUTH_VERIFY_AUDIENCE": "api"}
    del config[f"OAUTH_VERIFY_{missing}"]
    config[f"OAUTH_VERIFY_{typo}"] = "x"
    with (
        pytest.warns(UnknownSettingWarning),
        pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{typo} is set: a typo"),
    ):
        Settings.from_config(config)


def test_a_strategy_typo_names_the_value_given() -> None:
    with pytest.raises(ConfigurationError, match="not 'jwk'"):
        settings(STRATEGY="jwk")


def test_known_keys_raise_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
        settings(LEEWAY=5, TOKEN_CACHE_SIZE=10, PROVIDER="auth0", REALM="api")
    assert not [r for r in caplog.records if "is not a setting" in r.getMessage()]
