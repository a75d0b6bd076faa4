"""The shape of :class:`Settings`: one field per key, each default written
once (the field's), and the health, metrics and development keys read from
their fields rather than from ``Settings.raw``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from flask_oauth_verify import ConfigurationError, Settings
from flask_oauth_verify.config import KNOWN_KEYS
from flask_oauth_verify.metrics import metrics_registry
from flask_oauth_verify.testing import TokenIssuer

from .conftest import make_app

BASE = {"OAUTH_VERIFY_ISSUER": "https://issuer.example.test", "OAUTH_VERIFY_AUDIENCE": "api"}

#: keys whose field has another name (the Settings docstring lists them)
RENAMED = {
    "ISSUER": "issuers",
    "AUDIENCE": "audiences",
    "JWKS": "static_jwks",
    "JWKS_URI": "jwks_uris",
}
#: keys without a field of their own (the Settings docstring says why)
WITHOUT_FIELD = {"REQUIRE_EMAIL_VERIFIED"}


def settings(**overrides: Any) -> Settings:
    return Settings.from_config({**BASE, **{f"OAUTH_VERIFY_{k}": v for k, v in overrides.items()}})


def plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def test_every_field_but_raw_holds_one_key_and_every_key_but_one_has_a_field() -> None:
    fields = {field.name for field in dataclasses.fields(Settings)} - {"raw"}
    keys = {RENAMED.get(key, key.lower()) for key in KNOWN_KEYS - WITHOUT_FIELD}
    assert fields == keys


def test_a_minimal_configuration_gives_every_field_its_declared_default() -> None:
    """``_build`` takes each default from its field: the two cannot differ."""
    made = settings()
    checked = 0
    for field in dataclasses.fields(Settings):
        if field.name == "raw":
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue  # issuers, audiences: required
        assert plain(getattr(made, field.name)) == plain(default), field.name
        checked += 1
    assert checked == len(dataclasses.fields(Settings)) - 3


def test_the_health_metrics_and_development_keys_reach_their_fields() -> None:
    registry = CollectorRegistry()
    issuer = object()
    made = settings(
        HEALTH_PROBE_INTERVAL=5,
        HEALTH_REQUIRE_CACHE="yes",
        METRICS_REGISTRY=registry,
        DEV_ISSUER=issuer,
    )
    assert made.health_probe_interval == 5.0
    assert made.health_require_cache is True
    assert made.metrics_registry is registry
    assert made.dev_issuer is issuer


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        (-1, "OAUTH_VERIFY_HEALTH_PROBE_INTERVAL must be at least 0."),
        ("soon", "OAUTH_VERIFY_HEALTH_PROBE_INTERVAL must be a number, not 'soon'."),
        (True, "OAUTH_VERIFY_HEALTH_PROBE_INTERVAL must be a number, not True."),
        (float("inf"), "OAUTH_VERIFY_HEALTH_PROBE_INTERVAL must be a finite number, not inf."),
    ],
)
def test_a_bad_probe_interval_is_refused_by_the_settings(interval: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        settings(HEALTH_PROBE_INTERVAL=interval)
    assert str(raised.value) == message


def test_the_health_checker_reads_the_health_fields(tokens: TokenIssuer) -> None:
    app = make_app(
        tokens.config(HEALTH_ROUTE=True, HEALTH_PROBE_INTERVAL=0, HEALTH_REQUIRE_CACHE="on")
    )
    state = app.extensions["oauth_verify"]
    assert (state.health.probe_interval, state.health.require_cache) == (0.0, True)
    defaults = make_app(tokens.config(HEALTH_ROUTE=True), name="defaults")
    checker = defaults.extensions["oauth_verify"].health
    assert (checker.probe_interval, checker.require_cache) == (30.0, False)


def test_the_metrics_registry_is_read_from_its_field(tokens: TokenIssuer) -> None:
    registry = CollectorRegistry()
    app = make_app(tokens.config(METRICS=True, METRICS_REGISTRY=registry))
    assert app.extensions["oauth_verify"].settings.metrics_registry is registry
    assert metrics_registry(app) is registry
