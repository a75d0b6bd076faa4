"""Health check: keys, cache and introspection, 200 healthy / 503 unhealthy."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from flask import Flask
from flask_caching import Cache
from joserfc import jwt

from flask_oauth_verify import ConfigurationError, OAuthVerify
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, RedisServer, free_port, in_forked_child, make_app

ROUTE = "/health/token-validation"


def health(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get(ROUTE)
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert isinstance(body, dict)
    return response.status_code, body


def test_healthy_with_a_static_key_set(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(HEALTH_ROUTE=True))
    status, body = health(app)
    assert status == 200
    assert body["status"] == "healthy"
    assert "error" not in body
    [issuer] = body["checks"]["keys"]["issuers"]
    assert issuer == {
        "issuer": tokens.issuer,
        "source": "static",
        "keys": 1,
        "age_seconds": None,
        "status": "ok",
    }
    assert body["checks"]["cache"] == {"status": "ok", "backend": "in-process"}
    assert body["checks"]["introspection"] == {"status": "not_configured"}


def test_keys_are_counted_not_kids(tokens: TokenIssuer, served_tokens: TokenIssuer) -> None:
    """A key without a kid, and two keys under one kid, count: health said
    503 "no usable key" for a set whose one key has no kid while its tokens
    verified."""
    kidless = tokens.jwks()
    del kidless["keys"][0]["kid"]
    app = make_app(tokens.config(HEALTH_ROUTE=True, JWKS=kidless))
    no_kid = jwt.encode({"alg": "RS256"}, tokens.claims(), tokens.key(), algorithms=["RS256"])
    assert app.test_client().get("/protected", headers=auth_header(no_kid)).status_code == 200
    status, body = health(app)
    assert status == 200, body
    assert body["checks"]["keys"]["issuers"][0]["keys"] == 1
    assert get_state(app).keys.status()[0].usable_keys == 1

    ec_twin = TokenIssuer(served_tokens.issuer, alg="ES256")
    published = served_tokens.jwks()
    published["keys"].append({**ec_twin.jwks()["keys"][0], "kid": served_tokens.current_kid})
    assert served_tokens.server is not None
    served_tokens.server.route("/jwks", Reply(200, published))
    shared = make_app(served_tokens.config(HEALTH_ROUTE=True, ALGORITHMS=["RS256", "ES256"]))
    get_state(shared).keys.prefetch()
    status, body = health(shared)
    assert status == 200, body
    assert body["checks"]["keys"]["issuers"][0]["keys"] == 2


def test_route_is_opt_in_and_its_path_configurable(tokens: TokenIssuer) -> None:
    assert make_app(tokens.config()).test_client().get(ROUTE).status_code == 404
    app = make_app(tokens.config(HEALTH_ROUTE="/ops/auth-health"))
    assert app.test_client().get("/ops/auth-health").status_code == 200
    assert app.test_client().get(ROUTE).status_code == 404


def test_flips_to_503_when_the_issuer_is_down_and_no_keys_are_cached_and_back(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = make_app(served_tokens.config(HEALTH_ROUTE=True), clock=clock)
    issuer_server.route("/jwks", Reply(503, "maintenance"))

    status, body = health(app)
    assert status == 503
    assert body["status"] == "unhealthy"
    issuer_url = served_tokens.issuer
    assert body["error"] == (
        f"no keys for {issuer_url}: keys of {issuer_url} unavailable: HTTP status 503"
    )
    [issuer] = body["checks"]["keys"]["issuers"]
    assert issuer["status"] == "unavailable" and issuer["keys"] == 0
    # requests fail closed the same way
    token = served_tokens.mint(now=clock())
    assert app.test_client().get("/protected", headers=auth_header(token)).status_code == 503

    served_tokens.serve(issuer_server)  # the issuer is back
    status, body = health(app)
    assert status == 200
    assert body["checks"]["keys"]["issuers"][0]["keys"] == 1
    assert body["checks"]["keys"]["issuers"][0]["age_seconds"] == 0
    assert app.test_client().get("/protected", headers=auth_header(token)).status_code == 200


def test_refused_connections_make_it_unhealthy(tokens: TokenIssuer, clock: FakeClock) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    config = {**tokens.config(HEALTH_ROUTE=True, JWKS_URI=dead)}
    config.pop("OAUTH_VERIFY_JWKS")
    status, body = health(make_app(config, clock=clock))
    assert status == 503
    assert "connection failed" in body["error"]


def test_never_fetches_more_than_the_refresh_policy(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = make_app(served_tokens.config(HEALTH_ROUTE=True), clock=clock)
    for _ in range(5):
        assert health(app)[0] == 200
    assert issuer_server.hits["/jwks"] == 1  # fresh keys: no fetch per health call
    clock.advance(601)  # past JWKS_CACHE_TTL: one refresh, as a request would do
    for _ in range(5):
        assert health(app)[0] == 200
    assert issuer_server.hits["/jwks"] == 2


def test_an_outage_is_retried_no_faster_than_the_circuit_breaker(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(HEALTH_ROUTE=True, CIRCUIT_BREAKER_FAILURES=2)
    app = make_app(config, clock=clock)
    issuer_server.route("/jwks", Reply(500, "down"))
    for _ in range(6):
        status, body = health(app)
        assert status == 503
    assert issuer_server.hits["/jwks"] == 2
    assert "circuit open" in body["error"]


def test_stale_keys_are_healthy_with_a_warning(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = make_app(served_tokens.config(HEALTH_ROUTE=True), clock=clock)
    assert health(app)[0] == 200
    issuer_server.route("/jwks", Reply(500, "down"))
    clock.advance(700)
    status, body = health(app)
    assert status == 200
    assert body["status"] == "healthy"
    [issuer] = body["checks"]["keys"]["issuers"]
    assert issuer["status"] == "stale"
    assert issuer["age_seconds"] == 700
    assert body["checks"]["keys"]["status"] == "stale"
    assert "refresh failed (HTTP status 500)" in body["warnings"][0]


def test_health_method_needs_no_request(tokens: TokenIssuer) -> None:
    app = Flask(__name__)
    app.config.update(tokens.config())
    oauth = OAuthVerify(app)
    report = oauth.health(app)
    assert report.healthy and report.status == "healthy" and report.status_code == 200
    assert report.checks["keys"]["status"] == "ok"
    with app.app_context():
        assert oauth.health().healthy


def test_cache_backend_reachability_with_real_redis(
    tokens: TokenIssuer, redis_url: str, redis_server: RedisServer
) -> None:
    def build(**extra: Any) -> Flask:
        app = Flask(f"redis-{len(extra)}")
        app.config.update(
            tokens.config(HEALTH_ROUTE=True, **extra),
            CACHE_TYPE="RedisCache",
            CACHE_REDIS_URL=redis_url,
        )
        cache = Cache(app)
        OAuthVerify(app, cache=cache)
        return app

    lenient = build()
    strict = build(HEALTH_REQUIRE_CACHE=True)
    status, body = health(lenient)
    assert status == 200
    assert body["checks"]["cache"] == {"status": "ok", "backend": "RedisCache"}
    redis_server.stop()
    try:
        status, body = health(lenient)
        assert status == 200  # a cache outage costs speed, not correctness
        assert body["checks"]["cache"]["status"] == "unreachable"
        assert "cache backend RedisCache unreachable" in body["warnings"][0]
        status, body = health(strict)
        assert status == 503
        assert "cache backend RedisCache unreachable" in body["error"]
    finally:
        redis_server.start()
    assert health(strict)[0] == 200


def introspection_app(
    issuer: TokenIssuer, server: IssuerServer, clock: FakeClock, **extra: Any
) -> Flask:
    config = issuer.config(
        HEALTH_ROUTE=True,
        STRATEGY="introspection",
        INTROSPECTION_ENDPOINT=f"{server.url}/introspect",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
        **extra,
    )
    return make_app(config, clock=clock)


def test_introspection_endpoint_probed_at_most_once_per_interval(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = introspection_app(served_tokens, issuer_server, clock)
    status, body = health(app)
    assert status == 200
    assert body["checks"]["keys"] == {"status": "not_used"}
    assert body["checks"]["introspection"] == {
        "status": "ok",
        "endpoint": f"{issuer_server.url}/introspect",
    }
    probe = issuer_server.requests[-1]
    assert probe.method == "GET" and not probe.body  # no token, no credentials sent
    assert "Authorization" not in probe.headers

    issuer_server.route("/introspect", Reply(502, "bad gateway"))
    assert health(app)[0] == 200  # the last probe is still current
    assert issuer_server.hits["/introspect"] == 1
    clock.advance(31)
    status, body = health(app)
    assert status == 503
    assert body["error"] == "introspection endpoint unreachable: HTTP status 502"
    assert issuer_server.hits["/introspect"] == 2

    served_tokens.serve(issuer_server)
    clock.advance(31)
    assert health(app)[0] == 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_failed_probes_never_open_the_circuit_the_requests_use(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """An endpoint that answers RFC 7662 POSTs but 500 to the probe's GET: the
    probes made the requests' circuit breaker open, and good tokens got 503."""
    answer = issuer_server.routes["/introspect"]
    issuer_server.route(
        "/introspect", lambda r: answer(r) if r.method == "POST" else Reply(500, {"error": "x"})
    )
    app = introspection_app(served_tokens, issuer_server, clock, HEALTH_PROBE_INTERVAL=0)
    failures = get_state(app).settings.circuit_breaker_failures
    for _ in range(failures + 2):  # each poll probes, well within CIRCUIT_BREAKER_RESET
        assert health(app)[0] == 503
    token = served_tokens.mint_opaque()
    response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 200, response.get_json()
    posts = [r for r in issuer_server.requests if r.path == "/introspect" and r.method == "POST"]
    assert len(posts) == 1


def test_a_child_forked_during_a_probe_probes_for_itself(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """The probe lock is held for the whole probe (an HTTP call): a process
    forked while a thread probed inherited it held, with no thread to
    release it, and every health request of the child hung."""
    gate = threading.Event()
    first = threading.Lock()

    def introspect(_request: Request) -> Reply:
        if first.acquire(blocking=False):  # only the parent's probe is held
            gate.wait(10)
        return Reply(405, {"error": "method_not_allowed"})

    issuer_server.route("/introspect", introspect)
    app = introspection_app(served_tokens, issuer_server, clock)
    parent = threading.Thread(target=lambda: health(app))
    parent.start()
    assert issuer_server.wait_for_hits("/introspect", 1)
    try:  # the child: the parent's probe is not its own
        codes = in_forked_child(lambda: [health(app)[0]])
    finally:
        gate.set()
        parent.join(10)
    assert codes == [200], "the child's health check hung on the parent's probe lock"
    assert issuer_server.hits["/introspect"] == 2


def test_discovered_introspection_endpoint(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(
        HEALTH_ROUTE=True,
        STRATEGY="auto",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
    )
    status, body = health(make_app(config, clock=clock))
    assert status == 200
    assert body["checks"]["introspection"]["endpoint"] == f"{issuer_server.url}/introspect"
    assert body["checks"]["keys"]["status"] == "ok"


@pytest.mark.parametrize("interval", [-1, "soon", True])
def test_bad_probe_interval_fails_at_init(tokens: TokenIssuer, interval: object) -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_HEALTH_PROBE_INTERVAL"):
        make_app(tokens.config(HEALTH_ROUTE=True, HEALTH_PROBE_INTERVAL=interval))


def test_urls_with_credentials_are_shown_without_them(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """The route answers anonymous callers: a credential in a configured URL
    (user-info, an API key in the query) must not be in its answer."""
    host = issuer_server.url.split("://", 1)[1]
    config = served_tokens.config(
        HEALTH_ROUTE=True,
        JWKS_URI=f"http://keys:KEY-PASS@{host}/jwks?api_key=KEY-K",
        INTROSPECTION_ENDPOINT=f"http://rs:INTRO-PASS@{host}/introspect?key=INTRO-K",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
    )
    app = make_app(config, clock=clock)
    response = app.test_client().get(ROUTE)
    text = response.get_data(as_text=True)
    for secret in ("KEY-PASS", "KEY-K", "INTRO-PASS", "INTRO-K", "rs-secret"):
        assert secret not in text
    body = response.get_json()
    assert body["checks"]["keys"]["issuers"][0]["source"] == f"{issuer_server.url}/jwks"
    assert body["checks"]["introspection"]["endpoint"] == f"{issuer_server.url}/introspect"
