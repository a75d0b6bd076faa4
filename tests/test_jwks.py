"""The key store end to end: real JWKS servers on 127.0.0.1, a fake clock.

Every number asserted here is a count of requests the JWKS server received:
the issue's promise is about how often the issuer is called (once per TTL,
once per rotation, a handful under a flood of unknown kids, never while the
circuit is open) and that no request fails while good keys exist.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cachelib import SimpleCache
from flask import Flask
from flask_caching import Cache
from joserfc import jwt
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify import jwks as jwks_module
from flask_oauth_verify.config import ConfigurationError
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, add_views, free_port, make_app, wait_until

JWKS = "/jwks"


class JwksRoute:
    """The ``/jwks`` route, controllable by the test.

    :attr:`gate` (set = open) holds requests without dropping them, so a
    test can keep a fetch in flight and then let it complete; :attr:`reply`
    replaces the key set with any answer (an outage); :attr:`headers` are
    added to the key set's response.
    """

    def __init__(self, tokens: TokenIssuer) -> None:
        self.tokens = tokens
        self.gate = threading.Event()
        self.gate.set()
        self.reply: Reply | None = None
        self.headers: dict[str, str] = {}
        self.conditional: list[str | None] = []

    def __call__(self, request: Request) -> Reply:
        self.gate.wait(10)
        self.conditional.append(request.headers.get("If-None-Match"))
        if self.reply is not None:
            return self.reply
        return Reply(200, self.tokens.jwks(), self.headers)


@pytest.fixture
def route(served_tokens: TokenIssuer, issuer_server: IssuerServer) -> JwksRoute:
    jwks = JwksRoute(served_tokens)
    issuer_server.route(JWKS, jwks)
    return jwks


def build(tokens: TokenIssuer, clock: FakeClock, cache: Any = None, **options: Any) -> Flask:
    options.setdefault("HTTP_TIMEOUT", (0.3, 0.3))
    return make_app(tokens.config(audience="api", **options), clock=clock, cache=cache)


def get(app: Flask, token: str) -> TestResponse:
    return app.test_client().get("/protected", headers=auth_header(token))


def unknown_kid_token(tokens: TokenIssuer, kid: str | None = None) -> str:
    """A token signed by the current key but naming a kid nobody publishes."""
    return tokens.mint(headers={"kid": kid or f"random-{uuid.uuid4().hex}"})


def assert_503(response: TestResponse) -> None:
    assert response.status_code == 503
    assert response.json == {
        "error": "temporarily_unavailable",
        "message": "Token verification is temporarily unavailable.",
    }
    assert int(response.headers["Retry-After"]) >= 1
    assert 'error="temporarily_unavailable"' in response.headers["WWW-Authenticate"]


# -- caching policy -------------------------------------------------------------


def test_keys_are_fetched_once_and_reused(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    for _ in range(20):
        assert get(app, served_tokens.mint()).status_code == 200
    assert issuer_server.hits[JWKS] == 1


def test_a_signing_key_published_again_for_encryption_under_its_kid_verifies(
    served_tokens: TokenIssuer, route: JwksRoute, clock: FakeClock
) -> None:
    """RFC 7517 §4.5 allows the same kid on a use=enc key: not a clash (was 503)."""
    published = served_tokens.jwks()
    published["keys"].append({**published["keys"][0], "use": "enc"})
    route.reply = Reply(200, published)
    assert get(build(served_tokens, clock), served_tokens.mint()).status_code == 200


def _twin(tokens: TokenIssuer, alg: str) -> TokenIssuer:
    """The same issuer signing with a key of ``alg`` published under the current kid."""
    twin = TokenIssuer(tokens.issuer, alg=alg, audience="api")
    generated = twin.current_kid
    twin.current_kid = twin.add_key(alg, kid=tokens.current_kid, key=twin.key())
    twin.remove_key(generated)
    return twin


def test_keys_of_different_types_may_share_a_kid(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    """RFC 7517 §4.5's example: an RSA and an EC key under one kid, told apart by alg.

    Was a duplicate kid: the whole set refused, every token 503.
    """
    ec_twin = _twin(served_tokens, "ES256")
    published = served_tokens.jwks()
    published["keys"] += ec_twin.jwks()["keys"]
    route.reply = Reply(200, published)
    app = build(served_tokens, clock, ALGORITHMS=["RS256", "ES256"])
    assert get(app, served_tokens.mint()).status_code == 200
    assert get(app, ec_twin.mint()).status_code == 200
    forged = _twin(served_tokens, "ES256").mint()  # same kid and alg, another EC key
    assert get(app, forged).status_code == 401
    assert issuer_server.hits[JWKS] == 1, "a shared kid is no unknown kid"
    # Two keys an allowed algorithm fits both of stay ambiguous: refused whole.
    published["keys"] += _twin(served_tokens, "RS256").jwks()["keys"]
    route.reply = Reply(200, published)
    fresh_app = build(served_tokens, clock, ALGORITHMS=["RS256", "ES256"])
    assert_503(get(fresh_app, ec_twin.mint()))


def test_soft_ttl_with_jitter(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, JWKS_CACHE_TTL=600)
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    clock.advance(539)  # jitter takes at most 10 % off the TTL
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 1
    clock.advance(62)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 2


def assert_refreshed_between(
    app: Flask,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    still_fresh: float,
    due: float,
) -> None:
    """The key set fetched once is still fresh ``still_fresh`` s later and
    fetched again by ``due`` s."""
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    clock.advance(still_fresh)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 1
    clock.advance(due - still_fresh)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 2


@pytest.mark.parametrize(
    ("settings", "still_fresh", "due"),
    [
        # the app's own TTL is not raised to JWKS_MIN_TTL (meant for max-age)
        ({"JWKS_CACHE_TTL": 10}, 8.9, 10.1),
        ({"JWKS_CACHE_TTL": 7200, "JWKS_MAX_TTL": 3600}, 3239, 3601),  # capped
    ],
)
def test_own_cache_ttl_is_kept_within_the_maximum_only(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    settings: dict[str, float],
    still_fresh: float,
    due: float,
) -> None:
    app = build(served_tokens, clock, **settings)
    assert_refreshed_between(app, served_tokens, issuer_server, clock, still_fresh, due)


@pytest.mark.parametrize(
    ("headers", "still_fresh", "due"),
    [
        ({"Cache-Control": "public, max-age=120"}, 107, 121),
        ({"Cache-Control": "max-age=300", "Age": "100"}, 179, 201),
        ({"Cache-Control": "max-age=5"}, 53, 61),  # raised to JWKS_MIN_TTL
        ({"Cache-Control": "no-store"}, 53, 61),
        ({"Cache-Control": "max-age=99999999"}, 3239, 3601),  # lowered to JWKS_MAX_TTL
        ({"Cache-Control": "private"}, 539, 601),  # no max-age: JWKS_CACHE_TTL
    ],
)
def test_cache_control_max_age_is_clamped(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    headers: dict[str, str],
    still_fresh: float,
    due: float,
) -> None:
    route.headers = headers
    app = build(served_tokens, clock, JWKS_MIN_TTL=60, JWKS_MAX_TTL=3600, JWKS_CACHE_TTL=600)
    assert_refreshed_between(app, served_tokens, issuer_server, clock, still_fresh, due)


def test_conditional_requests_with_etag(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    served: list[int] = []

    def conditional(request: Request) -> Reply:
        if request.headers.get("If-None-Match") == '"v1"':
            served.append(304)
            return Reply(304, b"", {"ETag": '"v1"', "Cache-Control": "max-age=600"})
        served.append(200)
        return Reply(200, served_tokens.jwks(), {"ETag": '"v1"', "Cache-Control": "max-age=600"})

    issuer_server.route(JWKS, conditional)
    app = build(served_tokens, clock)
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    clock.advance(601)
    assert get(app, token).status_code == 200
    clock.advance(30)
    assert get(app, token).status_code == 200, "a 304 renews the TTL"
    assert served == [200, 304]
    (status,) = get_state(app).keys.status()
    assert status.last_error is None and status.fresh


def test_stale_keys_are_served_while_one_refresh_runs(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, HTTP_TIMEOUT=(5, 5))
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    clock.advance(601)
    route.gate.clear()
    leader: list[int] = []
    thread = threading.Thread(target=lambda: leader.append(get(app, token).status_code))
    thread.start()
    assert issuer_server.wait_for_hits(JWKS, 2)
    # The refresh is held at the server; every other request is served now.
    for _ in range(10):
        assert get(app, token).status_code == 200
    assert not route.gate.is_set() and thread.is_alive()
    route.gate.set()
    thread.join(10)
    assert leader == [200]
    assert issuer_server.hits[JWKS] == 2


def test_failed_refresh_keeps_last_good_keys_and_retries_after_cooldown(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, JWKS_REFRESH_COOLDOWN=30)
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    route.reply = Reply(500, {"error": "down"})
    clock.advance(601)
    for _ in range(10):
        assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 2, "one failed refresh, not one per request"
    (status,) = get_state(app).keys.status()
    assert status.last_error == "HTTP status 500"
    assert status.kids == (served_tokens.current_kid,)
    clock.advance(31)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 3
    route.reply = None
    clock.advance(31)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 4
    (status,) = get_state(app).keys.status()
    assert status.last_error is None and status.fresh


def test_last_known_good_is_bounded_by_max_staleness(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, JWKS_MAX_STALENESS=3600)
    assert get(app, served_tokens.mint()).status_code == 200
    route.reply = Reply(500, {})
    clock.advance(3000)
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200
    clock.advance(601)
    assert_503(get(app, served_tokens.mint(now=clock.now)))


def test_errors_are_never_cached(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    route.reply = Reply(500, {})
    assert_503(get(app, served_tokens.mint()))
    route.reply = None
    assert get(app, served_tokens.mint()).status_code == 200, "no waiting for a TTL"
    assert issuer_server.hits[JWKS] == 2


# -- outages ------------------------------------------------------------------------


def _outage(kind: str, tokens: TokenIssuer, server: IssuerServer, route: JwksRoute) -> None:
    """Make the JWKS endpoint fail in one of the ways the issue lists."""
    leaked = tokens.jwks()
    leaked["keys"][0]["d"] = "AQAB"
    twin = tokens.jwks()
    twin["keys"].append(dict(twin["keys"][0]))
    elsewhere = f"http://localhost:{server.port}{JWKS}"  # another origin, same server
    replies = {
        "500": Reply(500, {"error": "down"}),
        "garbage": Reply(200, b"\x89PNG garbage"),
        "html": Reply(200, b"<html>sign in</html>", {"Content-Type": "text/html"}),
        "huge": Reply(200, {"keys": [], "pad": "x" * (600 * 1024)}),
        "not a set": Reply(200, {"keys": "none"}),
        "redirect": Reply(302, b"", {"Location": elsewhere}),
        "private key": Reply(200, leaked),
        "duplicate kid": Reply(200, twin),
    }
    if kind == "hang":
        server.hold(JWKS)
    else:
        route.reply = replies[kind]


OUTAGES = [
    "hang",
    "500",
    "garbage",
    "html",
    "huge",
    "not a set",
    "redirect",
    "private key",
    "duplicate kid",
]


@pytest.mark.parametrize("kind", OUTAGES)
def test_cold_start_with_the_issuer_down_is_503_never_401_or_500(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    kind: str,
) -> None:
    app = build(served_tokens, clock)
    _outage(kind, served_tokens, issuer_server, route)
    assert_503(get(app, served_tokens.mint()))
    (status,) = get_state(app).keys.status()
    assert status.kids == () and status.last_error


def test_cold_start_with_nothing_listening_is_503(
    served_tokens: TokenIssuer, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, JWKS_URI=f"http://127.0.0.1:{free_port()}/jwks")
    assert_503(get(app, served_tokens.mint()))


@pytest.mark.parametrize("kind", OUTAGES)
def test_outage_after_warm_up_every_request_succeeds(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    kind: str,
) -> None:
    app = build(served_tokens, clock)
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    _outage(kind, served_tokens, issuer_server, route)
    clock.advance(601)
    statuses = [get(app, token).status_code for _ in range(10)]
    assert statuses == [200] * 10
    assert issuer_server.hits[JWKS] == 2
    (status,) = get_state(app).keys.status()
    assert status.last_error


def test_concurrent_cold_start_requests_share_one_failed_attempt(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, HTTP_TIMEOUT=(5, 5))
    issuer_server.hold(JWKS)
    token = served_tokens.mint()
    responses: list[TestResponse] = []
    threads = [threading.Thread(target=lambda: responses.append(get(app, token))) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert issuer_server.wait_for_hits(JWKS, 1)
    flights = get_state(app).keys._flights
    assert wait_until(lambda: flights.followers(served_tokens.issuer) == 7)
    issuer_server.release(JWKS)  # the held request is dropped: the fetch fails
    for thread in threads:
        thread.join(10)
    assert len(responses) == 8
    for response in responses:
        assert_503(response)
    assert issuer_server.hits[JWKS] == 1


def test_concurrent_cold_start_requests_share_one_fetch(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, HTTP_TIMEOUT=(5, 5))
    route.gate.clear()
    token = served_tokens.mint()
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(get(app, token).status_code))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    assert issuer_server.wait_for_hits(JWKS, 1)
    flights = get_state(app).keys._flights
    assert wait_until(lambda: flights.followers(served_tokens.issuer) == 7)
    route.gate.set()
    for thread in threads:
        thread.join(10)
    assert statuses == [200] * 8
    assert issuer_server.hits[JWKS] == 1


def test_circuit_breaker_stops_calls_and_sets_retry_after(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, CIRCUIT_BREAKER_FAILURES=2, CIRCUIT_BREAKER_RESET=30)
    route.reply = Reply(502, {})
    token = served_tokens.mint(expires_in=7200)
    assert_503(get(app, token))
    assert_503(get(app, token))
    assert issuer_server.hits[JWKS] == 2
    for _ in range(5):
        response = get(app, token)
        assert_503(response)
        assert response.headers["Retry-After"] == "31"
    assert issuer_server.hits[JWKS] == 2, "an open circuit makes no request"
    route.reply = None
    clock.advance(31)
    assert get(app, token).status_code == 200
    assert issuer_server.hits[JWKS] == 3


# -- rotation and unknown kids --------------------------------------------------------


def test_unknown_kid_refreshes_once_then_the_request_succeeds(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    old = served_tokens.mint()
    assert get(app, old).status_code == 200
    served_tokens.rotate()
    new = served_tokens.mint()
    assert get(app, new).status_code == 200, "the request that saw the new kid succeeds"
    assert get(app, old).status_code == 200, "the old key is still published"
    assert issuer_server.hits[JWKS] == 2


def test_concurrent_requests_with_a_new_kid_wait_for_one_fetch(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # followers wait for the held fetch however slow this machine is
    monkeypatch.setattr(jwks_module, "_KID_WAIT", 60.0)
    app = build(served_tokens, clock, HTTP_TIMEOUT=(5, 5))
    assert get(app, served_tokens.mint()).status_code == 200
    served_tokens.rotate()
    new = served_tokens.mint()
    route.gate.clear()
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(get(app, new).status_code))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    assert issuer_server.wait_for_hits(JWKS, 2)
    flights = get_state(app).keys._flights
    assert wait_until(lambda: flights.followers(served_tokens.issuer) == 7)
    route.gate.set()
    for thread in threads:
        thread.join(10)
    assert statuses == [200] * 8, "zero failed requests across the rotation"
    assert issuer_server.hits[JWKS] == 2


def _in_threads(count: int, call: Callable[[], int]) -> tuple[list[int], list[threading.Thread]]:
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(call())) for _ in range(count)]
    for thread in threads:
        thread.start()
    return statuses, threads


def test_unknown_kids_do_not_wait_out_a_hung_refresh(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With keys to serve, an unknown kid waits for another request's refresh
    for _KID_WAIT at most: forged kids held every worker thread for a hung
    issuer's whole timeout, valid tokens queued behind them."""
    monkeypatch.setattr(jwks_module, "_KID_WAIT", 0.05)
    app = build(served_tokens, clock, HTTP_TIMEOUT=(5, 20))
    assert get(app, served_tokens.mint()).status_code == 200
    route.gate.clear()  # the issuer hangs from now on
    led, leader = _in_threads(1, lambda: get(app, unknown_kid_token(served_tokens)).status_code)
    assert issuer_server.wait_for_hits(JWKS, 2)
    statuses, followers = _in_threads(
        4, lambda: get(app, unknown_kid_token(served_tokens)).status_code
    )
    for thread in followers:
        thread.join(5)  # the hung fetch lasts 10 s (the route's gate)
    assert not any(thread.is_alive() for thread in followers)
    assert statuses == [401] * 4
    assert get_state(app).keys._flights.running(served_tokens.issuer), "still fetching"
    assert get(app, served_tokens.mint()).status_code == 200
    route.gate.set()
    leader[0].join(10)
    assert led == [401] and issuer_server.hits[JWKS] == 2


def _warm_workers(tokens: TokenIssuer, clock: FakeClock) -> tuple[Flask, Flask]:
    """Two workers sharing one cache, each with the keys (a slow fetch allowed)."""
    shared = SimpleCache()
    workers = tuple(build(tokens, clock, cache=shared, HTTP_TIMEOUT=(5, 20)) for _ in range(2))
    for worker in workers:
        assert get(worker, tokens.mint()).status_code == 200
    return workers[0], workers[1]


def test_unknown_kids_do_not_wait_out_another_workers_hung_refresh(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same across workers sharing a cache: the fetch lock's holder hangs."""
    monkeypatch.setattr(jwks_module, "_KID_WAIT", 0.05)
    first, second = _warm_workers(served_tokens, clock)
    route.gate.clear()
    led, leader = _in_threads(1, lambda: get(first, unknown_kid_token(served_tokens)).status_code)
    assert issuer_server.wait_for_hits(JWKS, 2)
    statuses, waiting = _in_threads(
        1, lambda: get(second, unknown_kid_token(served_tokens)).status_code
    )
    waiting[0].join(5)  # the hung fetch lasts 10 s (the route's gate)
    assert not waiting[0].is_alive() and statuses == [401]
    # Having stopped waiting once, the worker does not wait again while that
    # fetch hangs (it waited a second per made-up kid, one after another).
    store = get_state(second).keys
    waits: list[str] = []
    real_wait = store.cache.wait_unlocked

    def counted(key: str, timeout: float, *, wait: float) -> bool:
        waits.append(key)
        return real_wait(key, timeout, wait=wait)

    monkeypatch.setattr(store.cache, "wait_unlocked", counted)
    for _ in range(3):
        clock.advance(1.5)
        assert get(second, unknown_kid_token(served_tokens)).status_code == 401
    assert waits == []
    route.gate.set()
    leader[0].join(10)
    assert led == [401] and issuer_server.hits[JWKS] == 2


def test_a_worker_that_stopped_waiting_takes_the_rotated_key_from_the_shared_copy(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real rotation while the issuer answers slowly: the worker that gave up
    waiting for the other's fetch refused the new kid for a whole cooldown."""
    monkeypatch.setattr(jwks_module, "_KID_WAIT", 0.05)
    first, second = _warm_workers(served_tokens, clock)
    served_tokens.rotate()
    new = served_tokens.mint()
    route.gate.clear()  # the issuer is slow to answer
    led, leader = _in_threads(1, lambda: get(first, new).status_code)
    assert issuer_server.wait_for_hits(JWKS, 2)
    assert get(second, new).status_code == 401  # stopped waiting
    route.gate.set()
    leader[0].join(10)
    assert led == [200]
    clock.advance(0.3)  # _SHARED_RECHECK later
    assert get(second, new).status_code == 200, "from the shared copy"
    assert issuer_server.hits[JWKS] == 2, "one fetch for the rotation"


def test_the_cooldown_after_a_failed_fetch_runs_from_the_failure(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    """A fetch that took 10 s to fail: the next unknown kid 25 s later (35 s
    after it started) asked the issuer again, and waited again."""
    app = build(served_tokens, clock, JWKS_REFRESH_COOLDOWN=30)
    assert get(app, served_tokens.mint(expires_in=7200)).status_code == 200

    def slow_failure(_request: Request) -> Reply:
        clock.advance(10)
        return Reply(500, {"error": "down"})

    issuer_server.route(JWKS, slow_failure)
    assert get(app, unknown_kid_token(served_tokens)).status_code == 401
    assert issuer_server.hits[JWKS] == 2
    clock.advance(25)
    assert get(app, unknown_kid_token(served_tokens)).status_code == 401
    assert issuer_server.hits[JWKS] == 2, "within the cooldown after the failure"
    clock.advance(6)
    assert get(app, unknown_kid_token(served_tokens)).status_code == 401
    assert issuer_server.hits[JWKS] == 3


def test_flood_of_unknown_kids_causes_one_fetch_per_cooldown(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, JWKS_REFRESH_COOLDOWN=30)
    good = served_tokens.mint(expires_in=7200)
    assert get(app, good).status_code == 200
    for _ in range(100):
        response = get(app, unknown_kid_token(served_tokens))
        assert response.status_code == 401
        assert response.json is not None and response.json["error"] == "invalid_token"
    assert issuer_server.hits[JWKS] == 2, "one forced refresh, then the cooldown"
    assert get(app, good).status_code == 200
    clock.advance(31)
    for _ in range(20):
        assert get(app, unknown_kid_token(served_tokens)).status_code == 401
    assert issuer_server.hits[JWKS] == 3


def test_concurrent_flood_of_unknown_kids(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    assert get(app, served_tokens.mint()).status_code == 200
    statuses: list[int] = []

    def flood() -> None:
        for _ in range(25):
            statuses.append(get(app, unknown_kid_token(served_tokens)).status_code)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [401] * 200
    assert issuer_server.hits[JWKS] == 2, "one forced fetch for 200 concurrent unknown kids"


def test_a_removed_key_stops_being_trusted(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    old_kid = served_tokens.current_kid
    old = served_tokens.mint(expires_in=7200)
    assert get(app, old).status_code == 200
    assert get(app, old).status_code == 200  # now in the verified-token cache
    assert len(get_state(app).token_cache) == 1
    served_tokens.rotate(drop_old=True)
    new = served_tokens.mint(expires_in=7200)
    assert get(app, new).status_code == 200  # a forced refresh learns the new set
    assert len(get_state(app).token_cache) == 1, "the cache was emptied, then the new token"
    response = get(app, old)
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    assert old_kid not in get_state(app).keys.status()[0].kids
    assert issuer_server.hits[JWKS] == 2


def test_a_key_removed_at_the_soft_ttl_stops_being_trusted(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    old = served_tokens.mint(expires_in=7200)
    assert get(app, old).status_code == 200
    served_tokens.rotate(drop_old=True)
    clock.advance(601)
    assert get(app, old).status_code == 401
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200


def no_kid_token(tokens: TokenIssuer, now: float) -> str:
    header = {"alg": "RS256", "typ": "at+jwt"}
    return jwt.encode(header, tokens.claims(now=now), tokens.key(), algorithms=["RS256"])


def test_token_without_kid(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    assert get(app, no_kid_token(served_tokens, clock.now)).status_code == 200, (
        "one key: a token without kid may use it"
    )
    served_tokens.rotate()
    clock.advance(601)
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200
    hits = issuer_server.hits[JWKS]
    assert get(app, no_kid_token(served_tokens, clock.now)).status_code == 401
    assert issuer_server.hits[JWKS] == hits, "an ambiguous token causes no fetch"


def test_key_headers_in_the_token_are_never_followed(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    with IssuerServer() as attacker:
        attacker.route(JWKS, Reply(200, {"keys": []}))
        token = served_tokens.mint(headers={"jku": attacker.url + JWKS, "x5u": attacker.url})
        assert get(app, token).status_code == 200
        assert attacker.hits[JWKS] == 0


# -- several issuers ----------------------------------------------------------------


@pytest.fixture
def second_issuer() -> Any:
    server = IssuerServer()
    tokens = TokenIssuer(audience="api")
    tokens.serve(server)
    yield tokens, server
    server.close()


def test_keys_are_namespaced_per_issuer(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    second_issuer: tuple[TokenIssuer, IssuerServer],
    clock: FakeClock,
) -> None:
    other, other_server = second_issuer
    config: dict[str, object] = {
        "OAUTH_VERIFY_ISSUER": [served_tokens.issuer, other.issuer],
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_JWKS_URI": {
            served_tokens.issuer: served_tokens.issuer + JWKS,
            other.issuer: other.issuer + JWKS,
        },
    }
    app = make_app(config, clock=clock)
    assert get(app, served_tokens.mint()).status_code == 200
    assert get(app, other.mint()).status_code == 200
    # A token that claims issuer B but is signed with (and names) A's key.
    claims = other.claims()
    forged = served_tokens.mint(claims)
    assert get(app, forged).status_code == 401
    # Unknown issuer: refused before any key is looked up or fetched.
    before = (issuer_server.hits[JWKS], other_server.hits[JWKS])
    stranger = served_tokens.mint({**served_tokens.claims(), "iss": "https://evil.example"})
    for _ in range(20):
        assert get(app, stranger).status_code == 401
    assert (issuer_server.hits[JWKS], other_server.hits[JWKS]) == before
    statuses = {s.issuer: s for s in get_state(app).keys.status()}
    assert statuses[served_tokens.issuer].kids == (served_tokens.current_kid,)
    assert statuses[other.issuer].kids == (other.current_kid,)


def test_static_key_sets_are_per_issuer(clock: FakeClock) -> None:
    first = TokenIssuer(issuer="https://a.example.test")
    second = TokenIssuer(issuer="https://b.example.test")
    config: dict[str, object] = {
        "OAUTH_VERIFY_ISSUER": [first.issuer, second.issuer],
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_JWKS": {first.issuer: first.jwks(), second.issuer: second.jwks()},
    }
    app = make_app(config, clock=clock)
    assert get(app, first.mint()).status_code == 200
    assert get(app, second.mint()).status_code == 200
    crossed = first.mint(second.claims())
    assert get(app, crossed).status_code == 401
    one_set = dict(config, OAUTH_VERIFY_JWKS=first.jwks())
    with pytest.raises(ConfigurationError, match="several"):
        make_app(one_set, clock=clock)


# -- operations API ------------------------------------------------------------------


def test_prefetch_flag_warms_the_keys_at_start(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    app = build(served_tokens, clock, PREFETCH_KEYS=True)
    assert issuer_server.hits[JWKS] == 1
    assert get(app, served_tokens.mint()).status_code == 200
    assert issuer_server.hits[JWKS] == 1


def test_prefetch_never_crashes_the_app(
    served_tokens: TokenIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    with caplog.at_level(logging.WARNING, "flask_oauth_verify"):
        app = build(served_tokens, clock, PREFETCH_KEYS=True, JWKS_URI=dead)
    assert "Prefetching the keys" in caplog.text
    outcome = OAuthVerify().prefetch_keys(app)
    assert list(outcome) == [served_tokens.issuer]
    assert outcome[served_tokens.issuer] is not None
    assert "connection failed" in str(outcome[served_tokens.issuer])
    assert_503(get(app, served_tokens.mint()))


def test_refresh_keys_ignores_ttl_and_cooldown(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    oauth = OAuthVerify()
    app = Flask("refresh")
    app.config.update(served_tokens.config(audience="api"))
    oauth.init_app(app, clock=clock)
    add_views(app)
    assert get(app, served_tokens.mint()).status_code == 200
    assert get(app, unknown_kid_token(served_tokens)).status_code == 401  # cooldown starts
    assert oauth.refresh_keys(app) == {served_tokens.issuer: None}
    assert issuer_server.hits[JWKS] == 3
    route.reply = Reply(500, {})
    outcome = oauth.refresh_keys(app, served_tokens.issuer)
    assert outcome == {served_tokens.issuer: "HTTP status 500"}
    assert get(app, served_tokens.mint()).status_code == 200, "last good keys kept"
    with pytest.raises(ValueError, match="not a configured issuer"):
        oauth.refresh_keys(app, "https://other.example")


def test_key_status_reports_age_kids_and_last_error(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    oauth = OAuthVerify()
    app = Flask("status")
    app.config.update(served_tokens.config(audience="api"))
    oauth.init_app(app, clock=clock)
    (before,) = oauth.key_status(app)
    assert (before.kids, before.age, before.fresh, before.fetches) == ((), None, False, 0)
    assert before.source == served_tokens.issuer + JWKS
    oauth.prefetch_keys(app)
    clock.advance(42)
    (status,) = oauth.key_status(app)
    assert status.issuer == served_tokens.issuer
    assert status.kids == (served_tokens.current_kid,)
    assert status.age == pytest.approx(42)
    assert status.fresh and status.last_error is None and status.fetches == 1
    assert status.expires_in is not None and 490 <= status.expires_in <= 558
    route.reply = Reply(503, {})
    clock.advance(600)
    oauth.prefetch_keys(app)
    (stale,) = oauth.key_status(app)
    assert stale.last_error == "HTTP status 503"
    assert stale.kids == (served_tokens.current_kid,)
    assert stale.age == pytest.approx(642)
    assert issuer_server.hits[JWKS] == 2


# -- sharing through the cache backend ----------------------------------------------


@pytest.mark.parametrize(
    ("storer", "adopter", "max_age"),
    [
        ({"JWKS_CACHE_TTL": 3600}, {"JWKS_CACHE_TTL": 60}, None),
        ({}, {"JWKS_CACHE_TTL": 60, "JWKS_MAX_TTL": 60}, 86400),
    ],
    ids=["own-default-ttl", "own-max-ttl"],
)
def test_an_app_applies_its_own_ttl_to_a_copy_another_app_stored(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    route: JwksRoute,
    clock: FakeClock,
    storer: dict[str, Any],
    adopter: dict[str, Any],
    max_age: int | None,
) -> None:
    """Two services on one cache with different TTL settings: the one with the
    shorter TTL drops a removed key within its own TTL, not the other's."""
    if max_age is not None:
        route.headers = {"Cache-Control": f"max-age={max_age}"}
    backend = SimpleCache()
    long_lived = build(served_tokens, clock, cache=backend, **storer)
    short_lived = build(served_tokens, clock, cache=backend, **adopter)
    old = served_tokens.mint()
    assert get(long_lived, old).status_code == 200
    assert get(short_lived, old).status_code == 200
    assert issuer_server.hits[JWKS] == 1, "the second app adopted the first one's copy"
    (status,) = get_state(short_lived).keys.status()
    assert status.expires_in is not None and status.expires_in <= 60
    served_tokens.rotate(drop_old=True)
    clock.advance(61)
    assert get(short_lived, old).status_code == 401, "refetched within its own TTL"
    assert issuer_server.hits[JWKS] > 1


def test_two_apps_on_one_cache_share_fetches_and_rotations(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    backend = SimpleCache()  # one backend, as Redis is for several workers
    first = build(served_tokens, clock, cache=backend)
    second = build(served_tokens, clock, cache=backend)
    assert get(first, served_tokens.mint()).status_code == 200
    assert get(second, served_tokens.mint()).status_code == 200
    assert issuer_server.hits[JWKS] == 1
    served_tokens.rotate()
    new = served_tokens.mint()
    assert get(first, new).status_code == 200
    assert get(second, new).status_code == 200, "adopts the copy the other worker fetched"
    assert issuer_server.hits[JWKS] == 2
    # The forced-refresh cooldown is shared too.
    assert get(first, unknown_kid_token(served_tokens)).status_code == 401
    clock.advance(1)
    assert get(second, unknown_kid_token(served_tokens)).status_code == 401
    assert issuer_server.hits[JWKS] == 2
    record = backend.get(get_state(first).keys.shared_key("jwks", served_tokens.issuer))
    assert set(record) == {"jwks", "fetched_at", "ttl", "max_age", "etag", "uri"}
    assert record["uri"] == served_tokens.issuer + JWKS


def test_flask_caching_backend_is_reached_outside_an_app_context(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, route: JwksRoute, clock: FakeClock
) -> None:
    cache = Cache()
    app = Flask("cached")
    app.config.update(served_tokens.config(audience="api", PREFETCH_KEYS=True))
    app.config.update(CACHE_TYPE="SimpleCache")
    cache.init_app(app)
    OAuthVerify().init_app(app, cache=cache, clock=clock)  # prefetches without a context
    with app.app_context():
        record = cache.get(get_state(app).keys.shared_key("jwks", served_tokens.issuer))
    assert record is not None and record["jwks"] == served_tokens.jwks()
    assert issuer_server.hits[JWKS] == 1
