"""Key rotation and the key-set cache (fourth pass): real JWKS servers on
127.0.0.1, a real Redis shared by several apps (the workers), a fake clock.

Every scenario is a rotation an issuer really performs (a new key, a key
removed, new material under an old ``kid``, a set emptied, an outage past
the staleness bound) and checks what the docs (``keys.rst``) promise about
when each worker accepts or refuses the tokens involved.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from joserfc.jwk import RSAKey

from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer

from .conftest import FakeClock, RedisServer
from .test_jwks import JWKS, assert_503, build, get
from .test_shared_cache import redis_app, status_of


@pytest.fixture
def redis(redis_server: RedisServer, redis_url: str) -> RedisServer:
    """The session Redis, running and empty (``redis_url`` flushes it)."""
    return redis_server


def workers(
    tokens: TokenIssuer, redis: RedisServer, clock: FakeClock, **options: Any
) -> tuple[Flask, Flask]:
    """Two apps on one Redis and one clock: two workers of a deployment."""
    return (
        redis_app(tokens, redis.url, clock, **options),
        redis_app(tokens, redis.url, clock, **options),
    )


class Switch:
    """The ``/jwks`` route: the issuer's key set, or :attr:`reply` when set."""

    def __init__(self, tokens: TokenIssuer, server: IssuerServer) -> None:
        self.tokens = tokens
        self.reply: Reply | None = None
        server.route(JWKS, self)

    def __call__(self, _request: Request) -> Reply:
        return self.reply if self.reply is not None else Reply(200, self.tokens.jwks())


class Conditional:
    """The ``/jwks`` route with an ``ETag`` (the current kid): a 304 to a
    matching ``If-None-Match``, with ``Cache-Control`` only if ``on_304``."""

    def __init__(
        self, tokens: TokenIssuer, server: IssuerServer, cache_control: str, *, on_304: bool
    ) -> None:
        self.tokens = tokens
        self.cache_control = cache_control
        self.on_304 = on_304
        self.seen: list[int] = []
        server.route(JWKS, self)

    def __call__(self, request: Request) -> Reply:
        headers = {"ETag": f'"{self.tokens.current_kid}"', "Cache-Control": self.cache_control}
        if request.headers.get("If-None-Match") == headers["ETag"]:
            self.seen.append(304)
            if not self.on_304:
                del headers["Cache-Control"]
            return Reply(304, b"", headers)
        self.seen.append(200)
        return Reply(200, self.tokens.jwks(), headers)


def test_a_forced_refresh_refused_by_another_workers_cooldown_keeps_its_end(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    # A forged kid at one worker claims the shared cooldown; a real rotation
    # follows. The other worker refuses the new kid inside that cooldown (as
    # documented) but must take it as soon as that cooldown ends, not a whole
    # cooldown after its own refused attempt.
    first, second = workers(served_tokens, redis, clock)
    token = served_tokens.mint()
    assert [status_of(app, token) for app in (first, second)] == [200, 200]
    assert status_of(first, served_tokens.mint(headers={"kid": "forged"})) == 401
    assert issuer_server.hits[JWKS] == 2
    served_tokens.rotate()
    clock.advance(5)
    new = served_tokens.mint(now=clock.now)
    assert status_of(second, new) == 401, "inside the shared cooldown"
    assert issuer_server.hits[JWKS] == 2
    clock.advance(26)  # 31 s after the forced refresh: the cooldown is over
    assert status_of(second, new) == 200
    assert status_of(first, new) == 200
    assert issuer_server.hits[JWKS] == 3


def test_a_removed_key_leaves_every_worker_within_its_soft_ttl(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    first, second = workers(served_tokens, redis, clock)
    old = served_tokens.mint(expires_in=7200)
    for app in (first, second):
        assert status_of(app, old) == 200
        assert status_of(app, old) == 200  # a hit of the verified-token cache
    served_tokens.rotate(drop_old=True)
    assert status_of(first, served_tokens.mint()) == 200
    assert status_of(first, old) == 401, "at once in the worker that fetched"
    clock.advance(601)
    assert status_of(second, old) == 401, "at the soft TTL in the others"
    assert status_of(second, served_tokens.mint(now=clock.now)) == 200


def test_new_material_under_the_same_kid_replaces_the_old_at_the_soft_ttl(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = build(served_tokens, clock)
    kid = served_tokens.current_kid
    old = served_tokens.mint(expires_in=7200)
    assert get(app, old).status_code == 200
    assert get(app, old).status_code == 200
    served_tokens.add_key("RS256", kid=kid, key=RSAKey.generate_key(2048))
    new = served_tokens.mint(now=clock.now, expires_in=7200)
    assert get(app, new).status_code == 401, "a bad signature never forces a fetch"
    assert issuer_server.hits[JWKS] == 1
    clock.advance(601)
    assert get(app, old).status_code == 401, "the cached token went with its key"
    assert get(app, new).status_code == 200


def test_a_key_set_emptied_refuses_every_token_then_recovers(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    switch = Switch(served_tokens, issuer_server)
    app = build(served_tokens, clock)
    token = served_tokens.mint(expires_in=7200)
    assert get(app, token).status_code == 200
    switch.reply = Reply(200, {"keys": []})
    clock.advance(601)
    response = get(app, token)
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"
    switch.reply = None
    clock.advance(31)
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200


def test_past_the_staleness_bound_a_cached_token_gets_503_in_every_worker(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    switch = Switch(served_tokens, issuer_server)
    apps = workers(served_tokens, redis, clock, JWKS_MAX_STALENESS=3600)
    token = served_tokens.mint(expires_in=20000)
    for app in apps:
        assert status_of(app, token) == 200
        assert status_of(app, token) == 200
    switch.reply = Reply(503, {})
    for _ in range(36):  # 3564 s: within the bound, the last good keys
        clock.advance(99)
        assert [status_of(app, token) for app in apps] == [200, 200]
    clock.advance(37)  # 3601 s
    for app in apps:
        assert_503(get(app, token))


def test_304_answers_keep_every_worker_fresh_with_one_request_per_ttl(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    route = Conditional(served_tokens, issuer_server, "max-age=600", on_304=True)
    apps = workers(served_tokens, redis, clock)
    token = served_tokens.mint(expires_in=20000)
    for _ in range(5):
        assert [status_of(app, token) for app in apps] == [200, 200]
        clock.advance(601)
    assert route.seen == [200, 304, 304, 304, 304]


def test_a_304_without_cache_control_keeps_the_max_age_of_the_200(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    # RFC 9111 §4.3.4: a 304 updates only the header fields it carries. An
    # issuer whose 304s omit Cache-Control asked for max-age=60 all along: a
    # key it removes after a 304 stops being trusted within 60 s, not 600 s.
    route = Conditional(served_tokens, issuer_server, "max-age=60", on_304=False)
    app = build(served_tokens, clock)
    old = served_tokens.mint(expires_in=7200)
    assert get(app, old).status_code == 200
    clock.advance(61)
    assert get(app, old).status_code == 200
    assert route.seen == [200, 304]
    served_tokens.rotate(drop_old=True)
    clock.advance(61)
    assert get(app, old).status_code == 401
    assert route.seen[:3] == [200, 304, 200], "the refresh came at the 200's max-age"


# -- a wall clock stepped back (an NTP step, a VM resumed) ---------------------------

STEP = 3600.0


def test_a_clock_stepped_back_does_not_stretch_the_key_sets_ttl(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """The soft TTL ran on the wall clock: after a step back of an hour, a key
    the issuer removed stayed trusted for the TTL plus the hour (hits too)."""
    app = build(served_tokens, clock)
    old = served_tokens.mint(now=clock.now - 2 * STEP, expires_in=10 * STEP)
    assert get(app, old).status_code == 200
    assert get(app, old).status_code == 200  # a hit of the verified-token cache
    clock.advance(-STEP)
    served_tokens.rotate(drop_old=True)
    clock.advance(1)
    response = get(app, old)
    assert response.status_code == 401, "refreshed: the clock is before the fetch"
    assert issuer_server.hits[JWKS] >= 2
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200


def test_a_clock_stepped_back_does_not_stretch_the_refresh_cooldown(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """The cooldown after a forced refresh ran until the wall clock caught up
    with it again: after a step back of an hour, new keys were refused for it."""
    app = build(served_tokens, clock, JWKS_REFRESH_COOLDOWN=30)
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200
    bogus = served_tokens.mint(now=clock.now, headers={"kid": "bogus"})
    assert get(app, bogus).status_code == 401  # a forced refresh now
    clock.advance(60 - STEP)
    served_tokens.rotate(drop_old=True)
    assert get(app, served_tokens.mint(now=clock.now)).status_code == 200


def test_a_copy_from_a_machine_a_little_ahead_is_used_without_a_fetch(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """A shared copy "fetched" 30 s from now (another machine's clock ahead)
    is no clock stepped back here: ``shared_time`` counts it as fetched now,
    so the check against a clock stepped back (``fetched_at <= now``) lets it
    serve at once, without a fetch of this worker's own."""
    ahead = FakeClock(clock.now + 30)
    first = redis_app(served_tokens, redis.url, ahead)
    second = redis_app(served_tokens, redis.url, clock)
    token = served_tokens.mint(now=clock.now)
    assert status_of(first, token) == 200
    for _ in range(3):
        assert status_of(second, token) == 200
        assert status_of(second, served_tokens.mint(now=clock.now)) == 200
    assert issuer_server.hits[JWKS] == 1
