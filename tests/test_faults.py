"""Fault injection: the issuer, the cache and introspection misbehave for real.

Every fault is produced by a real server on 127.0.0.1 (an
:class:`IssuerServer` that holds, fails, flaps or answers garbage; a raw
socket server that trickles its body or never answers; a real
``redis-server`` that is stopped, flushed or replaced by a black hole). For
each fault the documented outcome must hold (DESIGN.md, ``docs/keys.rst``):

* keys already known (warm) -> requests keep succeeding on the last good keys;
* nothing known yet (cold) -> 503 ``temporarily_unavailable`` with
  ``Retry-After``, never a 500;
* a cache outage is a cache miss, never a failed request;

and no request waits longer than the configured budget. ``HTTP_TIMEOUT`` is
set short here; the elapsed time around each request is compared with that
budget plus a margin. That is a bound on hanging (a correctness property),
not a performance goal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask_caching import Cache
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.config import Settings
from flask_oauth_verify.fetch import Fetcher, FetchError
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, RedisServer, add_views, free_port

CONNECT, READ = 0.25, 0.5
#: One outgoing call may take at most connect + read (the fetch deadline).
BUDGET = CONNECT + READ
#: Scheduling slack on a loaded CI machine; far below any real hang.
MARGIN = 2.0
REDIS_TIMEOUT = 0.3
TTL = 600
#: Far enough to pass the soft TTL (with its jitter) and the refresh cooldown.
STALE = TTL + 60


# -- servers that misbehave at the socket level -----------------------------------


class RawServer:
    """A TCP server on 127.0.0.1 whose connection handling a test scripts.

    :param handle: called in its own thread with each accepted connection
        and the server's stop event.
    """

    def __init__(self, handle: Callable[[socket.socket, threading.Event], None]) -> None:
        self._handle = handle
        self.stop = threading.Event()
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._handle(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        for conn in self._open:
            conn.close()
        self._sock.close()


def black_hole(conn: socket.socket, stop: threading.Event) -> None:
    """Accept and never answer (a hung Redis or issuer)."""
    stop.wait(30)


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    """Answer 200 with a JSON content type, then one byte every 50 ms, forever."""
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    while not stop.wait(0.05):  # the fault itself: a server that trickles
        conn.sendall(b" ")


def drip_headers(conn: socket.socket, stop: threading.Event) -> None:
    """The status line and headers, one byte at a time: no read ever times out."""
    conn.recv(65536)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    for byte in head * 50:
        if stop.wait(0.05):
            return
        conn.sendall(bytes([byte]))


def dripping_body(head: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """Answer ``head`` at once, then a body one byte every 50 ms: each read gets its byte."""

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(head + b"\r\n")
        while not stop.wait(0.05):
            conn.sendall(b" ")

    return drip


_DRIPPED = b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
#: A body under the size cap on a kept-alive connection.
drip_small_body = dripping_body(b"HTTP/1.1 200 OK\r\n" + _DRIPPED)
#: The same, on a connection the answer closes: http.client hands the socket
#: over to the response and forgets it (HTTPConnection.sock is None), so
#: the deadline must still find it there.
drip_closing_body = dripping_body(b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + _DRIPPED)
#: HTTP/1.0: every answer closes its connection.
drip_http10_body = dripping_body(b"HTTP/1.0 200 OK\r\n" + _DRIPPED)


def unparsable_redirect(conn: socket.socket, stop: threading.Event) -> None:
    """A 302 whose Location requests cannot even build a request for."""
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: 0\r\n\r\n"
    )
    stop.wait(5)


@pytest.fixture
def raw_server() -> Iterator[
    Callable[[Callable[[socket.socket, threading.Event], None]], RawServer]
]:
    servers: list[RawServer] = []

    def start(handle: Callable[[socket.socket, threading.Event], None]) -> RawServer:
        server = RawServer(handle)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# -- helpers ----------------------------------------------------------------------


def fault_app(
    config: dict[str, Any],
    clock: FakeClock,
    *,
    cache_config: dict[str, Any] | None = None,
    name: str = "faults",
) -> Flask:
    """An app with short timeouts, the core test views and (optionally) Redis."""
    app = Flask(name)
    app.config.update(
        {
            "TESTING": True,
            "OAUTH_VERIFY_HTTP_TIMEOUT": (CONNECT, READ),
            "OAUTH_VERIFY_JWKS_CACHE_TTL": TTL,
            **config,  # may override the two above
        }
    )
    cache = None
    if cache_config is not None:
        app.config.update(cache_config)
        cache = Cache(app)
    OAuthVerify().init_app(app, cache=cache, clock=clock)
    add_views(app)
    return app


def redis_cache(url: str) -> dict[str, Any]:
    """Flask-Caching settings for a Redis backend with socket timeouts."""
    return {
        "CACHE_TYPE": "RedisCache",
        "CACHE_REDIS_URL": url,
        "CACHE_OPTIONS": {
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
        },
    }


def timed(app: Flask, token: str) -> tuple[TestResponse, float]:
    """GET /protected with ``token``; return the response and the seconds it took."""
    started = time.monotonic()
    response = app.test_client().get("/protected", headers=auth_header(token))
    return response, time.monotonic() - started


def assert_ok(response: TestResponse) -> None:
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["subject"] == "user_1"


def assert_unavailable(response: TestResponse) -> None:
    """The documented 503: JSON body, challenge and ``Retry-After``."""
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"] == "temporarily_unavailable"
    assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1


def concurrently(count: int, call: Callable[[], tuple[TestResponse, float]]) -> list[Any]:
    """Run ``call`` in ``count`` threads at once; return their results."""
    results: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(count)

    def worker() -> None:
        start.wait()
        result = call()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * BUDGET + 4 * MARGIN)
    assert len(results) == count, "a request hung"
    return results


@pytest.fixture
def issuer(served_tokens: TokenIssuer) -> TokenIssuer:
    return served_tokens


def server_of(tokens: TokenIssuer) -> IssuerServer:
    assert tokens.server is not None
    return tokens.server


# -- the issuer is slow -------------------------------------------------------------


def test_slow_issuer_cold_gives_503_within_the_budget(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    server_of(issuer).hold("/jwks")
    app = fault_app(issuer.config(), clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


def test_slow_issuer_cold_concurrent_requests_share_one_wait(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    server = server_of(issuer)
    server.hold("/jwks")
    app = fault_app(issuer.config(), clock)
    token = issuer.mint()
    results = concurrently(8, lambda: timed(app, token))
    for response, elapsed in results:
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN
    assert server.hits["/jwks"] <= 2  # a single flight, not one fetch per request


def test_slow_issuer_warm_keeps_serving_last_good_keys(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock)
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])
    server.hold("/jwks")
    clock.advance(STALE)
    results = concurrently(8, lambda: timed(app, token))
    for response, elapsed in results:
        assert_ok(response)
        assert elapsed <= BUDGET + MARGIN
    # After the failed refresh, requests neither wait nor refetch for a while.
    response, elapsed = timed(app, token)
    assert_ok(response)
    assert elapsed <= MARGIN
    assert server.hits["/jwks"] == 2


def test_an_unknown_kid_right_after_a_failed_refresh_asks_the_issuer_once(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    """The due refresh of the request timed out; the unknown kid then forced a
    second fetch from the same hanging issuer: one request waited two budgets."""
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock)
    assert_ok(timed(app, issuer.mint(expires_in=10 * 86400))[0])
    server.hold("/jwks")
    clock.advance(STALE)
    unknown = issuer.mint(headers={"kid": "new-key"}, expires_in=10 * 86400)
    response, elapsed = timed(app, unknown)
    assert response.status_code == 401, response.get_json()
    assert server.hits["/jwks"] == 2  # the first fetch and the due refresh: no forced one
    assert elapsed <= BUDGET + MARGIN
    server.release()
    new = issuer.rotate()  # the issuer is back, with a new key
    clock.advance(31)  # past JWKS_REFRESH_COOLDOWN: a forced refresh is allowed again
    assert_ok(timed(app, issuer.mint(expires_in=10 * 86400))[0])
    assert server.hits["/jwks"] == 3
    assert issuer.current_kid == new


def test_slow_discovery_cold_gives_503_within_two_budgets(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    server = server_of(issuer)
    server.hold("/.well-known/openid-configuration")
    server.hold("/.well-known/oauth-authorization-server")
    config = issuer.config()
    del config["OAUTH_VERIFY_JWKS_URI"]  # discover it
    app = fault_app(config, clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= 2 * BUDGET + MARGIN


def test_trickling_issuer_is_cut_at_the_deadline(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    slow = raw_server(trickle)
    app = fault_app(issuer.config(JWKS_URI=f"{slow.url}/jwks"), clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


@pytest.mark.parametrize(
    "handle",
    [drip_headers, drip_small_body, drip_closing_body, drip_http10_body],
    ids=["headers", "body", "body, connection close", "body, HTTP/1.0"],
)
def test_dripping_issuer_is_cut_at_the_deadline(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
    handle: Callable[[socket.socket, threading.Event], None],
) -> None:
    """A byte every 50 ms keeps every read alive; only the overall deadline ends it."""
    slow = raw_server(handle)
    app = fault_app(issuer.config(JWKS_URI=f"{slow.url}/jwks"), clock)
    for _ in range(2):  # the stuck fetch must not wedge the next one either
        response, elapsed = timed(app, issuer.mint())
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN


def test_a_call_cut_on_a_kept_alive_connection_is_not_sent_again_unwatched(
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    """A kept-alive connection found closed unanswered is sent once more on
    a new one; not when the deadline closed it: the second connection was
    made after the watcher had fired, so nothing cut it (a server dripping
    its status line held a 0.5 s call for as long as it dripped)."""
    body = b'{"keys": []}'

    def answer_once_then_hang(conn: socket.socket, stop: threading.Event) -> None:
        if not conn.recv(65536):
            return
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        conn.recv(65536)  # the second request on the kept-alive connection:
        stop.wait(30)  # never answered

    server = raw_server(answer_once_then_hang)
    fetcher = Fetcher(
        Settings.from_config(
            {
                "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
                "OAUTH_VERIFY_AUDIENCE": "api",
                "OAUTH_VERIFY_HTTP_TIMEOUT": (2, 2),
            }
        )
    )
    try:
        assert fetcher.get_json(f"{server.url}/jwks", breaker="endpoint").data == {"keys": []}
        started = time.monotonic()
        with pytest.raises(FetchError):
            fetcher.get_json(f"{server.url}/jwks", breaker="endpoint", budget=0.5)
        assert time.monotonic() - started <= 0.5 + MARGIN
        assert server.connections == 1  # no second connection after the cut
    finally:
        fetcher.close()


def negative_chunk(conn: socket.socket, stop: threading.Event) -> None:
    """A chunked body whose chunk size is negative (urllib3 raises a bare ValueError)."""
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n-5\r\n{}\r\n0\r\n\r\n"
    )
    stop.wait(5)


def test_a_body_framed_wrongly_is_the_issuer_failing_not_our_error(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not logged at ERROR with a traceback as "failed unexpectedly" (which
    reads as a bug of ours): a failed call of the issuer's, like a reset."""
    bad = raw_server(negative_chunk)
    app = fault_app(issuer.config(JWKS_URI=f"{bad.url}/jwks"), clock)
    with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
        response, _elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert bad.connections >= 1
    assert not [r for r in caplog.records if "unexpectedly" in r.getMessage() or r.exc_info]
    assert any("reading the body failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "handle", [drip_headers, drip_closing_body], ids=["headers", "body, connection close"]
)
def test_dripping_introspection_endpoint_is_cut_at_the_deadline(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
    handle: Callable[[socket.socket, threading.Event], None],
) -> None:
    slow = raw_server(handle)
    app = fault_app(introspection_config(issuer, f"{slow.url}/introspect"), clock)
    response, elapsed = timed(app, issuer.mint_opaque())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


def stall_400_body(conn: socket.socket, stop: threading.Event) -> None:
    """A 400 with a JSON body announced and never sent."""
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n"
    )
    stop.wait(30)


def test_introspection_400_whose_body_stalls_is_an_outage_that_opens_the_circuit(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    """The body of a 400 is read for its OAuth error code; when it stalls,
    the call failed like a stalled 200, and the circuit opens (it counted as
    an answer: every request waited the read timeout, the circuit never
    opened)."""
    slow = raw_server(stall_400_body)
    config = introspection_config(
        issuer, f"{slow.url}/introspect", CIRCUIT_BREAKER_FAILURES=2, CIRCUIT_BREAKER_RESET=60
    )
    app = fault_app(config, clock)
    for _ in range(4):
        response, elapsed = timed(app, issuer.mint_opaque())
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN
    assert slow.connections == 2  # then the open circuit answers at once


def test_introspection_redirect_that_cannot_be_parsed_is_503(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    """An upstream oddity, never a client with a bad token (it used to be 401)."""
    odd = raw_server(unparsable_redirect)
    app = fault_app(introspection_config(issuer, f"{odd.url}/introspect"), clock)
    response, _elapsed = timed(app, issuer.mint_opaque())
    assert_unavailable(response)


def test_issuer_that_accepts_and_never_answers(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    hole = raw_server(black_hole)
    app = fault_app(issuer.config(JWKS_URI=f"{hole.url}/jwks"), clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


# -- the issuer is down -----------------------------------------------------------


def test_issuer_down_cold_gives_503_and_opens_the_circuit(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    app = fault_app(issuer.config(JWKS_URI=f"http://127.0.0.1:{free_port()}/jwks"), clock)
    token = issuer.mint()
    for _ in range(8):
        response, elapsed = timed(app, token)
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN
    # The circuit is open now: the client is told to come back after it resets.
    response, _ = timed(app, token)
    assert 1 <= int(response.headers["Retry-After"]) <= 31


def test_issuer_down_warm_serves_last_good_keys_until_max_staleness(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock)
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])
    server.close()
    for _ in range(5):
        clock.advance(STALE)
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + MARGIN
    # A kid that the last good set does not hold is refused, not a 503.
    unknown = issuer.mint(headers={"kid": "rotated-while-down"}, expires_in=10 * 86400)
    response, elapsed = timed(app, unknown)
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"
    assert elapsed <= BUDGET + MARGIN
    # Past JWKS_MAX_STALENESS (24 h) the old keys are no longer trusted.
    clock.advance(86400)
    response, elapsed = timed(app, token)
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


# -- the issuer flaps or answers garbage ------------------------------------------


def test_flapping_issuer(issuer: TokenIssuer, clock: FakeClock) -> None:
    server = server_of(issuer)
    replies = [
        lambda: Reply(200, issuer.jwks()),
        lambda: Reply(500, {"error": "server_error"}),
        lambda: Reply(200, b"<html>maintenance</html>", {"Content-Type": "text/html"}),
        lambda: Reply(503, "busy"),
        lambda: Reply(200, b'{"keys": [', {"Content-Type": "application/json"}),
    ]
    calls = iter(range(10**6))

    def flapping(_request: Request) -> Reply:
        return replies[next(calls) % len(replies)]()

    server.route("/jwks", flapping)
    app = fault_app(issuer.config(), clock)
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])  # fetch #1 succeeds
    for _ in range(12):
        clock.advance(STALE)
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + MARGIN
    # A rotation is picked up by the first successful fetch after it.
    new_kid = issuer.rotate()
    fresh = issuer.mint(expires_in=10 * 86400)
    accepted = False
    for _ in range(2 * len(replies)):
        clock.advance(STALE)
        response, elapsed = timed(app, fresh)
        assert elapsed <= BUDGET + MARGIN
        assert response.status_code in (200, 401), response.get_json()
        if response.status_code == 200:
            accepted = True
            break
    assert accepted, f"the new key {new_kid} was never accepted"
    assert_ok(timed(app, token)[0])  # the old key is still published


GARBAGE = {
    "not JSON": Reply(200, b"\x00\xffgarbage", {"Content-Type": "application/json"}),
    "HTML page": Reply(200, b"<html><body>login</body></html>", {"Content-Type": "text/html"}),
    "truncated JSON": Reply(200, b'{"keys": [{"kty": "RSA"', {"Content-Type": "application/json"}),
    "JSON array": Reply(200, [1, 2, 3]),
    "keys not a list": Reply(200, {"keys": "all of them"}),
    "private key material": Reply(
        200, {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x", "alg": "HS256"}]}
    ),
    "HTTP 500": Reply(500, {"error": "server_error"}),
    "HTTP 404": Reply(404, {"error": "not_found"}),
    "redirect to another origin": Reply(302, b"", {"Location": "http://127.0.0.2:9/jwks"}),
    "redirect loop": Reply(302, b"", {"Location": "/jwks"}),
    "huge body": Reply(200, {"keys": [], "pad": "x" * (2 * 1024 * 1024)}),
    "deeply nested JSON": Reply(
        200, b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}
    ),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_from_the_issuer_cold(issuer: TokenIssuer, clock: FakeClock, kind: str) -> None:
    server_of(issuer).route("/jwks", GARBAGE[kind])
    app = fault_app(issuer.config(), clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_from_the_issuer_warm(issuer: TokenIssuer, clock: FakeClock, kind: str) -> None:
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock)
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])
    server.route("/jwks", GARBAGE[kind])
    for _ in range(3):
        clock.advance(STALE)
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + MARGIN
    assert server.hits["/jwks"] >= 2  # the garbage really was fetched


def test_empty_key_set_refuses_tokens_without_503(issuer: TokenIssuer, clock: FakeClock) -> None:
    """A reachable issuer that publishes no usable key: the token is invalid."""
    server_of(issuer).route("/jwks", Reply(200, {"keys": []}))
    app = fault_app(issuer.config(), clock)
    response, elapsed = timed(app, issuer.mint())
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"
    assert elapsed <= BUDGET + MARGIN


# -- Redis misbehaves -------------------------------------------------------------


def test_redis_down_warm_and_cold(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    warm = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url), name="warm")
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(warm, token)[0])
    redis_server.stop()
    try:
        cold = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url), name="cold")
        for app in (warm, cold, warm, cold):
            response, elapsed = timed(app, token)
            assert_ok(response)
            assert elapsed <= BUDGET + 2 * REDIS_TIMEOUT + MARGIN
        clock.advance(STALE)  # a refresh is due while Redis is down
        for app in (warm, cold):
            response, elapsed = timed(app, token)
            assert_ok(response)
            assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
    finally:
        redis_server.start()
    response, _ = timed(warm, token)  # and after Redis is back
    assert_ok(response)


def test_redis_that_never_answers(
    issuer: TokenIssuer,
    clock: FakeClock,
    raw_server: Callable[[Callable[[socket.socket, threading.Event], None]], RawServer],
) -> None:
    hole = raw_server(black_hole)
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(f"redis://{hole.url[7:]}/0"))
    token = issuer.mint(expires_in=10 * 86400)
    for _ in range(3):
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
    clock.advance(STALE)
    response, elapsed = timed(app, token)
    assert_ok(response)
    assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
    assert hole.connections >= 1  # the black hole really was asked


def test_redis_flushed_mid_run(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    """Two workers share Redis; a FLUSHALL mid-run loses nothing that matters."""
    server = server_of(issuer)
    workers = [
        fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url), name=f"w{i}")
        for i in range(2)
    ]
    token = issuer.mint(expires_in=10 * 86400)
    for app in workers:
        assert_ok(timed(app, token)[0])
    assert server.hits["/jwks"] == 1  # the second worker used the shared copy
    redis_server.flush()
    for app in workers:
        assert_ok(timed(app, token)[0])
    clock.advance(STALE)
    redis_server.flush()
    for app in workers:
        assert_ok(timed(app, token)[0])
    # A rotation right after a flush: the new kid is fetched and shared again.
    issuer.rotate()
    redis_server.flush()
    fresh = issuer.mint(expires_in=10 * 86400)
    for app in workers:
        clock.advance(1)  # the workers share one fake clock; real fetches differ in time
        response, elapsed = timed(app, fresh)
        assert_ok(response)
        assert elapsed <= BUDGET + MARGIN
    assert server.hits["/jwks"] <= 5


def test_redis_restarted_mid_run(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])
    for _ in range(2):
        redis_server.stop()
        try:
            clock.advance(STALE)
            response, elapsed = timed(app, token)
            assert_ok(response)
            assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
        finally:
            redis_server.start()
        clock.advance(STALE)
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN


# -- introspection misbehaves -----------------------------------------------------


def introspection_config(issuer: TokenIssuer, endpoint: str, **extra: Any) -> dict[str, Any]:
    client_id, secret = issuer.introspection_credentials
    settings: dict[str, Any] = {
        "STRATEGY": "introspection",
        "INTROSPECTION_ENDPOINT": endpoint,
        "INTROSPECTION_CLIENT_ID": client_id,
        "INTROSPECTION_CLIENT_SECRET": secret,
        **extra,
    }
    return issuer.config(**settings)


def test_introspection_endpoint_down(issuer: TokenIssuer, clock: FakeClock) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/introspect"
    app = fault_app(introspection_config(issuer, endpoint), clock)
    token = issuer.mint_opaque()
    for _ in range(7):  # past the circuit breaker's threshold
        response, elapsed = timed(app, token)
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN


def test_introspection_endpoint_slow(issuer: TokenIssuer, clock: FakeClock) -> None:
    server = server_of(issuer)
    server.hold("/introspect")
    app = fault_app(introspection_config(issuer, f"{server.url}/introspect"), clock)
    token = issuer.mint_opaque()
    results = concurrently(4, lambda: timed(app, token))
    for response, elapsed in results:
        assert_unavailable(response)
        assert elapsed <= BUDGET + MARGIN


@pytest.mark.parametrize(
    "reply",
    [
        Reply(500, {"error": "server_error"}),
        Reply(200, b"<html>oops</html>", {"Content-Type": "text/html"}),
        Reply(200, b"not json", {"Content-Type": "application/json"}),
        Reply(200, [True]),
        Reply(200, {"active": True, "pad": "x" * (2 * 1024 * 1024)}),
        Reply(401, {"error": "invalid_client"}),
        # a member named twice: parsers disagree on which one wins
        Reply(200, b'{"active": false, "active": true}', {"Content-Type": "application/json"}),
        Reply(200, b'{"active": true, "exp": NaN}', {"Content-Type": "application/json"}),
    ],
    ids=["500", "html", "not-json", "array", "huge", "401", "duplicate-member", "nan"],
)
def test_introspection_endpoint_garbage(
    issuer: TokenIssuer, clock: FakeClock, reply: Reply
) -> None:
    server = server_of(issuer)
    server.route("/introspect", reply)
    app = fault_app(introspection_config(issuer, f"{server.url}/introspect"), clock)
    response, elapsed = timed(app, issuer.mint_opaque())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


def test_introspection_down_does_not_affect_jwts_under_auto(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/introspect"
    app = fault_app(introspection_config(issuer, endpoint, STRATEGY="auto"), clock)
    response, _ = timed(app, issuer.mint())
    assert_ok(response)  # a JWT goes to the JWKS path
    response, elapsed = timed(app, issuer.mint_opaque())
    assert_unavailable(response)  # an opaque token needs the endpoint
    assert elapsed <= BUDGET + MARGIN


def test_inactive_answer_is_401_not_503(issuer: TokenIssuer, clock: FakeClock) -> None:
    server = server_of(issuer)
    app = fault_app(introspection_config(issuer, f"{server.url}/introspect"), clock)
    token = issuer.mint_opaque()
    assert_ok(timed(app, token)[0])
    issuer.revoke(token)
    response, _ = timed(app, token)
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"
    assert json.loads(response.data)["message"]


def test_a_failing_introspection_endpoint_never_closes_the_origin_to_key_fetching(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    """Anyone can send opaque tokens: an introspection endpoint that fails for
    them opens its own circuit, not the one the same origin's key set uses."""
    server = server_of(issuer)
    server.route("/introspect", Reply(502, "bad gateway"))
    app = fault_app(
        introspection_config(issuer, f"{server.url}/introspect", STRATEGY="auto"), clock
    )
    for _ in range(8):  # past CIRCUIT_BREAKER_FAILURES
        response, _elapsed = timed(app, issuer.mint_opaque())
        assert_unavailable(response)
    assert server.hits["/introspect"] == 5  # its circuit opened
    assert server.hits["/jwks"] == 0
    response, _elapsed = timed(app, issuer.mint())  # a JWT: keys fetched cold
    assert_ok(response)
    assert server.hits["/jwks"] == 1
