"""Metadata discovery (OpenID Connect Discovery, RFC 8414) against real servers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask

from flask_oauth_verify.cache import SharedCache
from flask_oauth_verify.config import Settings
from flask_oauth_verify.discovery import Discovery, metadata_urls
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.fetch import Fetcher, FetchError
from flask_oauth_verify.introspection import discover_endpoint
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, make_app

OIDC = "/.well-known/openid-configuration"
RFC8414 = "/.well-known/oauth-authorization-server"


def make_discovery(
    issuer: str, clock: FakeClock, cache: SharedCache | None = None, **options: Any
) -> Discovery:
    config = {
        "OAUTH_VERIFY_ISSUER": issuer,
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_HTTP_TIMEOUT": (0.5, 0.5),
        **{f"OAUTH_VERIFY_{k}": v for k, v in options.items()},
    }
    settings = Settings.from_config(config)
    return Discovery(settings, cache or SharedCache(None), Fetcher(settings, clock), clock)


def metadata(issuer: str, **extra: Any) -> dict[str, Any]:
    return {"issuer": issuer, "jwks_uri": issuer.rstrip("/") + "/jwks", **extra}


def test_metadata_urls_for_an_issuer_without_a_path() -> None:
    assert metadata_urls("https://h.example") == [
        "https://h.example/.well-known/openid-configuration",
        "https://h.example/.well-known/oauth-authorization-server",
    ]
    assert metadata_urls("https://h.example/") == metadata_urls("https://h.example")


def test_metadata_urls_for_an_issuer_with_a_path() -> None:
    assert metadata_urls("https://h.example/tenant/v2/") == [
        "https://h.example/tenant/v2/.well-known/openid-configuration",
        "https://h.example/.well-known/oauth-authorization-server/tenant/v2",
        "https://h.example/.well-known/openid-configuration/tenant/v2",
        "https://h.example/tenant/v2/.well-known/oauth-authorization-server",
    ]


def test_openid_connect_discovery_is_tried_first(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    issuer_server.route(RFC8414, Reply(200, metadata(issuer, jwks_uri="https://other/jwks")))
    discovery = make_discovery(issuer, clock)
    assert discovery.endpoint(issuer, "jwks_uri") == issuer + "/jwks"
    assert issuer_server.hits[RFC8414] == 0


def test_rfc8414_is_used_when_there_is_no_openid_configuration(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(
        RFC8414, Reply(200, metadata(issuer, introspection_endpoint=issuer + "/introspect"))
    )
    discovery = make_discovery(issuer, clock)
    assert discovery.endpoint(issuer, "introspection_endpoint") == issuer + "/introspect"
    assert (issuer_server.hits[OIDC], issuer_server.hits[RFC8414]) == (1, 1)


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("/realms/acme/.well-known/openid-configuration", "appended OIDC"),
        ("/.well-known/oauth-authorization-server/realms/acme", "inserted RFC 8414"),
        ("/.well-known/openid-configuration/realms/acme", "inserted OIDC"),
        # Okta's custom authorization servers, django-oauth-toolkit
        ("/realms/acme/.well-known/oauth-authorization-server", "appended RFC 8414"),
    ],
)
def test_issuers_with_a_path_use_each_documented_form(
    issuer_server: IssuerServer, clock: FakeClock, path: str, served: str
) -> None:
    issuer = issuer_server.url + "/realms/acme"
    issuer_server.route(path, Reply(200, metadata(issuer)))
    discovery = make_discovery(issuer, clock)
    assert discovery.endpoint(issuer, "jwks_uri") == issuer + "/jwks", served
    assert issuer_server.hits[path] == 1


def test_metadata_naming_another_issuer_is_refused(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata("https://attacker.example")))
    issuer_server.route(RFC8414, Reply(200, metadata(issuer + "/")))
    discovery = make_discovery(issuer, clock)
    with pytest.raises(FetchError, match="another issuer"):
        discovery.metadata(issuer)


def test_mix_up_refusal_ends_in_503_and_no_key_is_fetched(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer_server.route(OIDC, Reply(200, metadata("https://attacker.example")))
    config = served_tokens.config(audience="api")
    del config["OAUTH_VERIFY_JWKS_URI"]
    app = make_app(config, clock=clock)
    response = app.test_client().get("/protected", headers=auth_header(served_tokens.mint()))
    assert response.status_code == 503
    assert response.json == {
        "error": "temporarily_unavailable",
        "message": "Token verification is temporarily unavailable.",
    }
    assert issuer_server.hits["/jwks"] == 0


def test_a_down_issuer_costs_one_request_not_three(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url + "/tenant"
    issuer_server.route("/tenant" + OIDC, Reply(503, {"error": "down"}))
    discovery = make_discovery(issuer, clock)
    with pytest.raises(FetchError, match="503"):
        discovery.metadata(issuer)
    assert issuer_server.hits["/tenant" + OIDC] == 1
    assert issuer_server.hits[RFC8414 + "/tenant"] == 0
    assert issuer_server.hits[OIDC + "/tenant"] == 0


def test_non_json_and_missing_documents_let_the_next_form_be_tried(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, b"<html>", {"Content-Type": "text/html"}))
    issuer_server.route(RFC8414, Reply(200, metadata(issuer)))
    assert make_discovery(issuer, clock).endpoint(issuer, "jwks_uri") == issuer + "/jwks"


def test_metadata_is_cached_for_hours_then_refreshed(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    discovery = make_discovery(issuer, clock)
    for _ in range(5):
        discovery.metadata(issuer)
    clock.advance(5 * 3600)
    discovery.metadata(issuer)
    assert issuer_server.hits[OIDC] == 1
    issuer_server.route(OIDC, Reply(200, metadata(issuer, jwks_uri=issuer + "/v2/jwks")))
    clock.advance(3600 + 1)  # past six hours, jitter included
    assert discovery.endpoint(issuer, "jwks_uri") == issuer + "/v2/jwks"
    assert issuer_server.hits[OIDC] == 2


def test_failed_refresh_keeps_the_last_good_metadata(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    discovery = make_discovery(issuer, clock, JWKS_REFRESH_COOLDOWN=30)
    discovery.metadata(issuer)
    issuer_server.route(OIDC, Reply(500, {"error": "down"}))
    clock.advance(6 * 3600 + 1)
    assert discovery.endpoint(issuer, "jwks_uri") == issuer + "/jwks"
    assert issuer_server.hits[OIDC] == 2
    assert "500" in discovery.last_error[issuer]
    # Not retried on every call: only after the cooldown.
    for _ in range(5):
        discovery.metadata(issuer)
    assert issuer_server.hits[OIDC] == 2
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    clock.advance(31)
    discovery.metadata(issuer)
    assert issuer_server.hits[OIDC] == 3
    assert issuer not in discovery.last_error


@pytest.mark.parametrize(
    "unusable",
    ["http://keys.example.com/jwks", ["https://a.example/jwks"], None],
    ids=["plain http to another host", "a list", "missing"],
)
def test_metadata_with_an_unusable_jwks_uri_is_fetched_again_after_the_cooldown(
    issuer_server: IssuerServer, clock: FakeClock, unusable: Any
) -> None:
    """Not after DISCOVERY_CACHE_TTL (six hours): an issuer that publishes
    an http jwks_uri behind a TLS proxy, then fixes it, is picked up at once."""
    issuer = issuer_server.url
    broken = {k: v for k, v in metadata(issuer, jwks_uri=unusable).items() if v is not None}
    issuer_server.route(OIDC, Reply(200, broken))
    discovery = make_discovery(issuer, clock, JWKS_REFRESH_COOLDOWN=30)
    for _ in range(3):  # the same answer, without a fetch per call
        if unusable is None:
            assert discovery.endpoint(issuer, "jwks_uri") is None
        else:
            with pytest.raises(FetchError):
                discovery.endpoint(issuer, "jwks_uri")
    assert issuer_server.hits[OIDC] == 1
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))  # fixed
    clock.advance(31)
    assert discovery.endpoint(issuer, "jwks_uri") == issuer + "/jwks"
    assert issuer_server.hits[OIDC] == 2
    clock.advance(3600)  # a good copy is kept for hours again
    discovery.endpoint(issuer, "jwks_uri")
    assert issuer_server.hits[OIDC] == 2


def test_an_issuer_without_an_introspection_endpoint_is_not_fetched_again_and_again(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """Looking for the introspection endpoint issuer by issuer passes over
    one that publishes none (Entra, Auth0): its good metadata stays cached
    for DISCOVERY_CACHE_TTL, not fetched again after every cooldown."""
    second = IssuerServer()
    try:
        first_issuer, second_issuer = issuer_server.url, second.url
        issuer_server.route(OIDC, Reply(200, metadata(first_issuer)))
        endpoint = f"{second_issuer}/introspect"
        second.route(OIDC, Reply(200, metadata(second_issuer, introspection_endpoint=endpoint)))
        discovery = make_discovery(first_issuer, clock, JWKS_REFRESH_COOLDOWN=30)
        for _ in range(10):
            assert discover_endpoint(discovery, [first_issuer, second_issuer]) == endpoint
            clock.advance(61)
        assert (issuer_server.hits[OIDC], second.hits[OIDC]) == (1, 1)
    finally:
        second.close()


def test_errors_are_not_cached(issuer_server: IssuerServer, clock: FakeClock) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(500, {}))
    discovery = make_discovery(issuer, clock)
    with pytest.raises(FetchError):
        discovery.metadata(issuer)
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    assert discovery.metadata(issuer)["issuer"] == issuer


def test_last_good_metadata_is_bounded_by_max_staleness(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    discovery = make_discovery(issuer, clock, JWKS_MAX_STALENESS=8 * 3600)
    discovery.metadata(issuer)
    issuer_server.route(OIDC, Reply(500, {}))
    clock.advance(8 * 3600 + 1)
    with pytest.raises(FetchError):
        discovery.metadata(issuer)


def test_workers_share_one_copy(issuer_server: IssuerServer, clock: FakeClock) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(200, metadata(issuer)))
    shared = SharedCache(None)  # one backend, as Redis would be for two workers
    first = make_discovery(issuer, clock, shared)
    second = make_discovery(issuer, clock, shared)
    assert first.metadata(issuer) == second.metadata(issuer)
    assert issuer_server.hits[OIDC] == 1


def test_concurrent_cold_lookups_make_one_request(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    gate = threading.Event()

    def slow(_request: Any) -> Reply:
        gate.wait(10)
        return Reply(200, metadata(issuer))

    issuer_server.route(OIDC, slow)
    discovery = make_discovery(issuer, clock)
    results: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(discovery.endpoint(issuer, "jwks_uri")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    assert issuer_server.wait_for_hits(OIDC, 1)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [issuer + "/jwks"] * 8
    assert issuer_server.hits[OIDC] == 1


def test_endpoints_must_follow_the_fetch_policy(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(
        OIDC,
        Reply(200, metadata(issuer, jwks_uri="http://keys.example.com/jwks", registration=5)),
    )
    discovery = make_discovery(issuer, clock)
    with pytest.raises(FetchError, match="plain http"):
        discovery.endpoint(issuer, "jwks_uri")
    with pytest.raises(FetchError, match="not a string"):
        discovery.endpoint(issuer, "registration")
    assert discovery.endpoint(issuer, "introspection_endpoint") is None


def test_a_templated_issuer_is_never_discovered(clock: FakeClock) -> None:
    discovery = make_discovery("https://login.example/t1", clock)
    with pytest.raises(FetchError, match="templated"):
        discovery.metadata("https://login.example/{tenantid}/v2.0")


def test_keys_are_found_through_discovery_end_to_end(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(audience="api")
    del config["OAUTH_VERIFY_JWKS_URI"]
    app: Flask = make_app(config, clock=clock)
    client = app.test_client()
    for _ in range(3):
        response = client.get("/protected", headers=auth_header(served_tokens.mint()))
        assert response.status_code == 200
    assert (issuer_server.hits[OIDC], issuer_server.hits["/jwks"]) == (1, 1)
    state = get_state(app)
    assert state.discovery.endpoint(served_tokens.issuer, "introspection_endpoint") == (
        served_tokens.issuer + "/introspect"
    )


@pytest.mark.parametrize(
    "answer",
    [Reply(404, {"error": "not found"}), Reply(200, b"<html>", {"Content-Type": "text/html"})],
    ids=["404", "html"],
)
def test_an_issuer_answering_no_metadata_at_cold_start_is_asked_once_a_second(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock, answer: Reply
) -> None:
    """Such answers never open the circuit: without pacing, every request of a
    cold worker was a discovery attempt (two documents each)."""
    for path in (OIDC, RFC8414):
        issuer_server.route(path, answer)
    config = served_tokens.config(audience="api")
    del config["OAUTH_VERIFY_JWKS_URI"]
    client = make_app(config, clock=clock).test_client()
    for _ in range(10):
        response = client.get("/protected", headers=auth_header(served_tokens.mint()))
        assert response.status_code == 503
    assert (issuer_server.hits[OIDC], issuer_server.hits[RFC8414]) == (1, 1)

    issuer_server.route(OIDC, Reply(200, metadata(served_tokens.issuer)))
    clock.advance(1.1)
    response = client.get("/protected", headers=auth_header(served_tokens.mint()))
    assert response.status_code == 200
    assert issuer_server.hits[OIDC] == 2


def test_a_discovery_failure_says_whether_the_server_answered(
    issuer_server: IssuerServer, clock: FakeClock
) -> None:
    issuer = issuer_server.url
    issuer_server.route(OIDC, Reply(404, {}))
    issuer_server.route(RFC8414, Reply(200, metadata("https://attacker.example")))
    with pytest.raises(FetchError) as answered:
        make_discovery(issuer, clock).metadata(issuer)
    assert answered.value.answered
    issuer_server.route(OIDC, Reply(503, {}))
    with pytest.raises(FetchError) as outage:
        make_discovery(issuer, clock).metadata(issuer)
    assert not outage.value.answered


def test_the_names_tried_share_one_budget(issuer_server: IssuerServer, clock: FakeClock) -> None:
    """Each metadata name answered slowly and wrongly must not add a budget:
    the names tried share one (``HTTP_TIMEOUT`` 0.2 + 0.8 s here)."""
    asked: list[str] = []

    def slow_not_found(request: Request) -> Reply:
        asked.append(request.path)
        time.sleep(0.6)  # the server's own slowness, not a synchronisation
        return Reply(404, {})

    issuer = issuer_server.url + "/tenant"
    issuer_server.route("/tenant" + OIDC, slow_not_found)
    issuer_server.route(RFC8414 + "/tenant", slow_not_found)
    issuer_server.route(OIDC + "/tenant", Reply(200, metadata(issuer)))
    with pytest.raises(FetchError):
        make_discovery(issuer, clock, HTTP_TIMEOUT=(0.2, 0.8)).metadata(issuer)
    assert asked == ["/tenant" + OIDC, RFC8414 + "/tenant"], "the second with what was left"
    assert issuer_server.hits[OIDC + "/tenant"] == 0, "nothing left of the budget"
