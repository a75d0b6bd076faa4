"""Concurrency and load: many threads and processes on one key store.

Counts asserted here are requests the JWKS server received; the clock is
the fake one of the other key-store tests, so nothing waits for real time.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import (
    IssuerServer,
    Reply,
    Request,
    TokenIssuer,
    auth_header,
    b64url,
)

from .conftest import (
    FakeClock,
    JSONHandler,
    RedisServer,
    add_views,
    in_forked_child,
    make_app,
    wait_until,
)

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
    options.setdefault("HTTP_TIMEOUT", (0.5, 0.5))
    app.config.update(tokens.config(audience="api", **options))
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


# -- Redis stalls while a worker holds the fetch lock ------------------------------


def redis_command(server: RedisServer, *words: str) -> bytes:
    command = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(command.encode())
        return sock.recv(65536)


def redis_gets(server: RedisServer) -> int:
    """How many GET commands the Redis server has run."""
    stats = redis_command(server, "INFO", "commandstats").decode()
    for line in stats.splitlines():
        if line.startswith("cmdstat_get:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


def test_a_lock_redis_could_not_release_is_released_when_it_answers(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """Redis stalls (a failover, a slow fork) while worker A fetches: A's
    writes and its unlock fail, and the lock stayed in Redis for its whole
    lifetime (twice the request budget): every other worker that needed the
    keys (cold, or a new kid) waited that long for a fetch long finished. A
    releases it as soon as Redis answers again."""
    gate = threading.Event()

    def held_jwks(_request: Request) -> Reply:
        gate.wait(10)
        return Reply(200, served_tokens.jwks())

    issuer_server.route(JWKS, held_jwks)
    clock = FakeClock()
    # A 22 s lock lifetime: far longer than this test waits for the release.
    options = {"HTTP_TIMEOUT": (5, 5)}
    a, b = (redis_app(served_tokens, redis_url, clock, **options) for _ in range(2))
    token = served_tokens.mint()
    outcome: list[int] = []
    first = threading.Thread(target=lambda: outcome.append(status(a, token)))
    first.start()
    assert issuer_server.wait_for_hits(JWKS, 1)
    # Writes stall past the client's socket timeout (0.5 s), then Redis is back.
    assert redis_command(redis_server, "CLIENT", "PAUSE", "1500", "WRITE").startswith(b"+OK")
    gate.set()
    first.join(10)
    assert outcome == [200]
    lock = get_state(b).keys.shared_key("jwks-lock", served_tokens.issuer)
    shared = get_state(b).cache
    assert wait_until(lambda: not shared.locked(lock, 22), every=0.05), (
        "the fetch lock outlived the fetch"
    )
    assert status(b, token) == 200
    assert issuer_server.hits[JWKS] == 2  # A's copy never reached Redis: B fetched


def _hold_first(path: str, answer: Callable[[], Any]) -> tuple[threading.Event, Any]:
    """A handler for ``path`` that holds its first request until the event is set."""
    gate = threading.Event()
    served = [0]

    def first_held(_request: Request) -> Reply:
        served[0] += 1
        if served[0] == 1:
            gate.wait(10)
        return Reply(200, answer())

    return gate, first_held


def _flush_while_b_waits(
    a: Flask, b: Flask, token: str, path: str, gate: threading.Event, servers: Any
) -> dict[str, int]:
    """A's fetch hangs at ``path``; B waits for it; Redis is flushed; then A
    goes on. The statuses of A and B."""
    issuer_server, redis_server = servers
    outcome: dict[str, int] = {}
    first = threading.Thread(target=lambda: outcome.update(a=status(a, token)))
    first.start()
    assert issuer_server.wait_for_hits(path, 1)  # A holds the lock, its fetch hangs
    gets = redis_gets(redis_server)
    second = threading.Thread(target=lambda: outcome.update(b=status(b, token)))
    second.start()
    assert wait_until(lambda: redis_gets(redis_server) > gets + 5, every=0.05), "B polls A's lock"
    assert redis_command(redis_server, "FLUSHALL").startswith(b"+OK")
    second.join(10)
    gate.set()
    first.join(10)
    return outcome


def test_a_cache_flushed_while_a_worker_waits_for_a_fetch_is_no_503(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """Cold worker B waits for worker A's fetch; Redis is flushed (or
    restarted empty) meanwhile, so A's lock and every trace of its fetch are
    gone. B answered 503 "another worker's fetch produced no keys"; it now
    fetches itself."""
    gate, handler = _hold_first(JWKS, served_tokens.jwks)
    issuer_server.route(JWKS, handler)
    clock = FakeClock()
    a, b = (redis_app(served_tokens, redis_url, clock, HTTP_TIMEOUT=(5, 5)) for _ in range(2))
    servers = (issuer_server, redis_server)
    outcome = _flush_while_b_waits(a, b, served_tokens.mint(), JWKS, gate, servers)
    assert outcome == {"a": 200, "b": 200}
    assert issuer_server.hits[JWKS] == 2


def test_a_cache_flushed_while_a_worker_waits_for_discovery_is_no_503(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """The same for a discovered key set: cold worker B waits for A's fetch
    (its discovery hangs), Redis is flushed meanwhile; B discovers and
    fetches itself."""
    document = "/.well-known/openid-configuration"
    gate, handler = _hold_first(document, served_tokens.metadata)
    issuer_server.route(document, handler)
    clock = FakeClock()

    def discovering_app() -> Flask:
        app = Flask(f"worker-{uuid.uuid4().hex[:6]}")
        app.config.update(
            TESTING=True,
            CACHE_TYPE="RedisCache",
            CACHE_REDIS_URL=redis_url,
            CACHE_OPTIONS=REDIS_OPTIONS,
        )
        config = served_tokens.config(audience="api", HTTP_TIMEOUT=(5, 5))
        del config["OAUTH_VERIFY_JWKS_URI"]  # found by discovery
        app.config.update(config)
        OAuthVerify().init_app(app, cache=Cache(app), clock=clock)
        add_views(app)
        return app

    servers = (issuer_server, redis_server)
    outcome = _flush_while_b_waits(
        discovering_app(), discovering_app(), served_tokens.mint(), document, gate, servers
    )
    assert outcome == {"a": 200, "b": 200}
    assert issuer_server.hits[document] == 2


# -- a fork while a fetch is under way ---------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_fetch_fetches_for_itself(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """A process forked while one of its threads fetched keys (a
    ``multiprocessing`` fork, a pre-fork server whose master runs threads)
    inherited the call under way and the fetch lock, with no thread to finish
    them: every request of the child waited for the lock's lifetime, then
    503, forever. The child now has no call under way and no lock."""
    gate = threading.Event()
    first = threading.Lock()

    def jwks(_request: Request) -> Reply:
        if first.acquire(blocking=False):  # only the parent's fetch is held
            gate.wait(10)
        return Reply(200, served_tokens.jwks())

    issuer_server.route(JWKS, jwks)
    app = local_app(served_tokens, clock)
    token = served_tokens.mint()
    parent = threading.Thread(target=lambda: status(app, token))
    parent.start()
    assert issuer_server.wait_for_hits(JWKS, 1)
    try:  # the child: the parent's fetch is not its own
        codes = in_forked_child(lambda: [status(app, token) for _ in range(2)], timeout=60)
    finally:
        gate.set()
        parent.join(10)
    assert codes == [200, 200]
    assert issuer_server.hits[JWKS] == 2


class _PortsSeen(JSONHandler):
    """An introspection endpoint (every token active) that notes the client
    port of each request; kept-alive connections (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    ports: list[int]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.ports.append(self.client_address[1])
        self.send_json({"active": True, "sub": "user_1", "client_id": "c"})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_worker_forked_without_the_fork_hooks_uses_connections_of_its_own() -> None:
    """uWSGI forks its workers with C ``fork()`` and runs no
    ``os.register_at_fork`` hook (unless ``--py-call-osafterfork``): the
    workers kept the master's pooled connection, one socket for all, and
    read each other's introspection answers (a revoked token was accepted
    as another caller's). A process now notices it is not the one that
    pooled them and resets before its first call. (The master and its worker
    are ``tests/hookless_fork.py``, a process of their own.)"""
    ports: list[int] = []

    class Handler(_PortsSeen):
        pass

    Handler.ports = ports
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/introspect"
        script = Path(__file__).with_name("hookless_fork.py")
        run = subprocess.run(  # noqa: S603 - our own script
            [sys.executable, str(script), endpoint],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == [200, 200, 200]
    master, worker, master_again = ports
    assert master_again == master  # the master keeps its kept-alive connection
    assert worker != master  # the worker opened its own


# -- a worker waiting for another worker's fetch -----------------------------------


def test_a_worker_waits_for_one_fetch_of_another_not_for_a_free_lock(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """Cold worker B finds worker A fetching (the issuer is down). A, under
    load, fails and fetches again at once, taking the lock back before B's
    next poll. B waited until it saw the lock free, so for as long as A kept
    fetching (up to the lock lifetime, 16 s by default), far past the
    documented one request budget. It now waits for the fetch it found
    under way, then answers with that fetch's failure."""
    b = redis_app(served_tokens, redis_url, clock, HTTP_TIMEOUT=(5, 5))
    cache = get_state(b).cache
    lock = get_state(b).keys.shared_key("jwks-lock", served_tokens.issuer)
    attempt = get_state(b).keys.shared_key("jwks-attempt", served_tokens.issuer)
    elsewhere = {"pid": 1, "host": "another-machine"}
    cache.set(lock, {"at": time.time(), **elsewhere}, 60)
    outcome: list[int] = []
    waiter = threading.Thread(target=lambda: outcome.append(status(b, served_tokens.mint())))
    before = redis_gets(redis_server)
    waiter.start()
    # B polls the lock (a GET every 20 ms): it is waiting for A's fetch.
    assert wait_until(lambda: redis_gets(redis_server) >= before + 10, every=0.05)
    # A's fetch fails; A's next request takes the lock again at once.
    cache.set(attempt, {"at": clock(), "error": "timed out", "answered": False}, 60)
    cache.set(lock, {"at": time.time() + 0.001, **elsewhere}, 60)
    waiter.join(10)
    try:
        assert not waiter.is_alive(), "B kept waiting while A fetched again"
        assert outcome == [503]
        assert issuer_server.hits[JWKS] == 0  # B never fetched itself
    finally:
        cache.delete(lock)
        waiter.join(30)


# -- memory under a flood of forged jku URLs ---------------------------------------


def test_a_flood_of_long_jku_urls_keeps_no_url_whole(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refused ``jku`` is remembered for a cooldown (4,096 of them) and
    has a circuit breaker (1,024): both kept the URL itself, so a flood of
    forged tokens naming 11 KB paths of the allowlisted host grew each
    process by about 65 MB (measured: RSS 51 -> 116 MB). They key on the
    URL's digest now (51 -> 73 MB, most of it the header cache)."""
    app = local_app(served_tokens, clock, ALLOWED_JKU_HOSTS=["127.0.0.1"], ALLOW_INSECURE_HTTP=True)
    client = app.test_client()
    caplog.set_level(logging.CRITICAL, "flask_oauth_verify")  # pytest keeps every record

    def forged(count: int) -> None:
        for _ in range(count):
            jku = f"{issuer_server.url}/{uuid.uuid4().hex}{'a' * 11_000}"
            header = {"alg": "RS256", "kid": "k", "jku": jku}
            claims = {"iss": served_tokens.issuer, "aud": "api", "exp": 2_000_000_000}
            token = f"{b64url(header)}.{b64url(claims)}.{'A' * 342}"
            response = client.get("/protected", headers=auth_header(token))
            assert response.status_code == 401
        # the test server's own record of each request is not the app's memory
        issuer_server.requests.clear()
        issuer_server.hits.clear()

    # Multiples of the header cache's size (512, emptied when full): it holds
    # as many headers after each round, so its churn cancels out.
    forged(512)
    tracemalloc.start()
    try:
        forged(512)
        gc.collect()  # refusals leave exception cycles behind
        before = tracemalloc.get_traced_memory()[0]
        forged(512)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_500_000, f"{grown} bytes kept for 512 more refused jku URLs"
