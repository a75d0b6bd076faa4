"""Concurrency and load: many threads and processes on one key store.

Counts asserted here are requests the JWKS server received; the clock is
the fake one of the other key-store tests, so nothing waits for real time.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any

from flask import Flask
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import FakeClock, add_views, make_app

JWKS = "/jwks"
REDIS_OPTIONS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}


def local_app(tokens: TokenIssuer, clock: FakeClock, **options: Any) -> Flask:
    return make_app(tokens.config(audience="api", HTTP_TIMEOUT=(0.5, 0.5), **options), clock=clock)


def redis_app(tokens: TokenIssuer, url: str, clock: FakeClock, **options: Any) -> Flask:
    """One "worker": its own app and key store, on the shared Redis."""
    app = Flask(f"worker-{uuid.uuid4().hex[:6]}")
    app.config.update(
        TESTING=True, CACHE_TYPE="RedisCache", CACHE_REDIS_URL=url, CACHE_OPTIONS=REDIS_OPTIONS
    )
    app.config.update(tokens.config(audience="api", HTTP_TIMEOUT=(0.5, 0.5), **options))
    OAuthVerify().init_app(app, cache=Cache(app), clock=clock)
    add_views(app)
    return app


def status(app: Flask, token: str) -> int:
    return app.test_client().get("/protected", headers=auth_header(token)).status_code


def burst(app: Flask, token: str, threads: int = 16, each: int = 5) -> list[int]:
    """``threads`` concurrent clients, ``each`` requests apiece: the statuses."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        runs = [
            pool.submit(lambda: [status(app, token) for _ in range(each)]) for _ in range(threads)
        ]
        return [code for run in runs for code in run.result()]


# -- a cold process whose issuer answers with no key set ---------------------------

NOT_A_KEY_SET = {
    "404": Reply(404, {"error": "not_found"}),
    "HTML": Reply(200, b"<html>login</html>", {"Content-Type": "text/html"}),
    "private key": Reply(200, {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}),
}


def test_cold_answers_without_a_key_set_are_fetched_once_a_second(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """A 4xx or a page that is no key set never opens the circuit: without a
    pause a cold process under load fetched once per request (hundreds a
    second per worker). Now one fetch, then 503 at once for a second."""
    token = served_tokens.mint()
    for kind, reply in NOT_A_KEY_SET.items():
        issuer_server.route(JWKS, reply)
        before = issuer_server.hits[JWKS]
        app = local_app(served_tokens, clock)
        assert set(burst(app, token)) == {503}, kind
        assert issuer_server.hits[JWKS] == before + 1, kind
        clock.advance(1.01)
        assert status(app, token) == 503
        assert issuer_server.hits[JWKS] == before + 2, kind
    # The issuer mends: the next fetch (a second later) succeeds.
    issuer_server.route(JWKS, lambda _request: Reply(200, served_tokens.jwks()))
    assert status(app, token) == 503  # still inside the second
    clock.advance(1.01)
    assert set(burst(app, token)) == {200}


def test_cold_answer_without_a_key_set_is_shared_by_the_workers(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    redis_url: str,
) -> None:
    issuer_server.route(JWKS, NOT_A_KEY_SET["404"])
    workers = [redis_app(served_tokens, redis_url, clock) for _ in range(4)]
    token = served_tokens.mint()
    for app in workers:
        assert set(burst(app, token, threads=4, each=3)) == {503}
    assert issuer_server.hits[JWKS] == 1
    clock.advance(1.01)
    issuer_server.route(JWKS, lambda _request: Reply(200, served_tokens.jwks()))
    for app in workers:
        assert set(burst(app, token, threads=4, each=3)) == {200}
    assert issuer_server.hits[JWKS] == 2
