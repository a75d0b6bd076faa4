"""Faults that multiplied a request's wait or its outgoing calls.

Real servers on 127.0.0.1 answer slowly, wrongly, or not at all; a request
must wait at most the documented budget (one fetch budget for the key set
locations, one for discovery), an answered failure must be paced (not one
round of metadata requests per request), and a 503 must say when to come
back. ``docs/keys.rst`` ("Outages", "Fixed values") and
``docs/introspection.rst`` describe each outcome.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer

from .conftest import FakeClock, free_port
from .test_faults import (
    BUDGET,
    MARGIN,
    RawServer,
    assert_unavailable,
    fault_app,
    redis_cache,
    timed,
)

#: How long a slow server takes to answer: most of one budget, so a second
#: answer as slow cannot fit in what is left of it.
SLOW = 0.6
_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
)


def _read_request(conn: socket.socket) -> bytes:
    """The request line and headers (the requests here have no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _path(request: bytes) -> str:
    parts = request.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 else ""


class SlowNotFound:
    """A raw server's handler: 404 to every path, the slow ones in pieces
    (each read within the read timeout, the whole answer in :data:`SLOW`).

    :param slow: whether the answer to a path is slow.
    """

    def __init__(self, slow: Callable[[str], bool]) -> None:
        self.slow = slow
        self.paths: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket, stop: threading.Event) -> None:
        path = _path(_read_request(conn))
        with self._lock:
            self.paths[path] += 1
        if not self.slow(path):
            conn.sendall(_NOT_FOUND)
            return
        pieces = (_NOT_FOUND[:5], _NOT_FOUND[5:20], _NOT_FOUND[20:])
        for piece in pieces:
            conn.sendall(piece)
            if piece is not pieces[-1] and stop.wait(SLOW / 2):  # the fault: a slow server
                return


@pytest.fixture
def raw_servers() -> Iterator[list[RawServer]]:
    servers: list[RawServer] = []
    yield servers
    for server in servers:
        server.close()


def _jwt_config(issuer: TokenIssuer, **extra: Any) -> dict[str, Any]:
    config = issuer.config()
    config.pop("OAUTH_VERIFY_JWKS", None)
    config.update({f"OAUTH_VERIFY_{name}": value for name, value in extra.items()})
    return config


def _introspection_config(issuers: list[str]) -> dict[str, Any]:
    return {
        "OAUTH_VERIFY_ISSUER": issuers,
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_STRATEGY": "introspection",
        "OAUTH_VERIFY_INTROSPECTION_CLIENT_ID": "rs",
        "OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET": "secret",
    }


# -- one budget for every key set location -----------------------------------------


def test_key_set_fallbacks_share_one_budget(raw_servers: list[RawServer], clock: FakeClock) -> None:
    """JWKS_URI and its fallbacks each answer a slow 404: the locations share
    one budget (the first spends most of it), so a cold request waits one
    budget, not one per location, and the rest are never asked."""
    handler = SlowNotFound(lambda _path: True)
    server = RawServer(handler)
    raw_servers.append(server)
    issuer = TokenIssuer(issuer="https://issuer.example.test")
    config = _jwt_config(
        issuer,
        JWKS_URI=f"{server.url}/a",
        JWKS_URI_FALLBACKS=[f"{server.url}/{name}" for name in "bcd"],
    )
    app = fault_app(config, clock)
    response, elapsed = timed(app, issuer.mint())
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN
    assert handler.paths["/a"] == 1
    assert handler.paths["/c"] == handler.paths["/d"] == 0, handler.paths


# -- one budget for the introspection endpoint's search ---------------------------


def test_introspection_endpoint_search_shares_one_budget(
    raw_servers: list[RawServer], clock: FakeClock
) -> None:
    """Issuers whose first metadata document answers a slow 404: the search
    for the introspection endpoint shares one budget across the issuers, so
    the later issuers are not asked once it is spent."""
    handler = SlowNotFound(lambda path: path.endswith("/.well-known/openid-configuration"))
    server = RawServer(handler)
    raw_servers.append(server)
    issuers = [f"{server.url}/tenant{number}" for number in range(4)]
    app = fault_app(_introspection_config(issuers), clock)
    response, elapsed = timed(app, "opaque-token-abcdefghijklmnop")
    assert_unavailable(response)
    assert elapsed <= 2 * BUDGET + MARGIN
    assert handler.paths["/tenant0/.well-known/openid-configuration"] == 1
    later = [path for path in handler.paths if "tenant2" in path or "tenant3" in path]
    assert later == [], handler.paths


# -- an answered discovery failure is paced --------------------------------------


def test_a_failed_introspection_discovery_is_paced_across_workers(
    redis_url: str, clock: FakeClock
) -> None:
    """The issuer publishes no metadata (404): one round of metadata requests
    per second for all workers together, not one per opaque token; the
    requests meanwhile get the documented 503."""
    server = IssuerServer()  # every path: 404
    try:
        config = _introspection_config([server.url + "/realm"])
        first = fault_app(config, clock, cache_config=redis_cache(redis_url), name="worker1")
        second = fault_app(config, clock, cache_config=redis_cache(redis_url), name="worker2")
        for number in range(10):
            response, _elapsed = timed(first, f"opaque-token-{number:04d}-abcdefghijklmnop")
            assert_unavailable(response)
        one_round = sum(server.hits.values())
        assert one_round == 3, dict(server.hits)  # the three metadata names, once
        response, _elapsed = timed(second, "opaque-token-other-worker-abcdefghijklmnop")
        assert_unavailable(response)
        assert sum(server.hits.values()) == one_round, dict(server.hits)
        clock.advance(1.0)  # the interval is over: asked again, once
        for number in range(5):
            response, _elapsed = timed(second, f"opaque-token-{number:04d}-later-abcdefghijk")
            assert_unavailable(response)
        assert sum(server.hits.values()) == 2 * one_round, dict(server.hits)
    finally:
        server.close()


# -- Retry-After on a cold start with the key set's circuit open ------------------


def _retry_afters(app: Any, token: str, count: int) -> list[int]:
    seen = []
    for _ in range(count):
        response, _elapsed = timed(app, token)
        assert_unavailable(response)
        seen.append(int(response.headers["Retry-After"]))
    return seen


def test_cold_retry_after_names_the_configured_key_set_circuit(clock: FakeClock) -> None:
    """JWKS_URI on another host than the issuer, down, cold: once its circuit
    is open, the 503 says when the next trial goes out, not the fixed 5 s."""
    issuer = TokenIssuer(issuer="https://issuer.example.test")
    config = _jwt_config(
        issuer,
        JWKS_URI=f"http://127.0.0.1:{free_port()}/jwks",
        CIRCUIT_BREAKER_FAILURES=2,
        CIRCUIT_BREAKER_RESET=300,
    )
    app = fault_app(config, clock)
    seen = _retry_afters(app, issuer.mint(), 4)
    assert seen[-1] >= 299, seen


def test_cold_retry_after_names_the_discovered_key_set_circuit(
    served_tokens: TokenIssuer, clock: FakeClock
) -> None:
    """The same with a discovered ``jwks_uri`` on another host."""
    server = served_tokens.server
    assert server is not None
    down = f"http://127.0.0.1:{free_port()}/jwks"
    metadata = {**served_tokens.metadata(), "jwks_uri": down}
    server.route("/.well-known/openid-configuration", lambda _r: Reply(200, metadata))
    config = served_tokens.config(CIRCUIT_BREAKER_FAILURES=2, CIRCUIT_BREAKER_RESET=300)
    del config["OAUTH_VERIFY_JWKS_URI"]  # discovered
    app = fault_app(config, clock)
    seen = _retry_afters(app, served_tokens.mint(), 4)
    assert seen[-1] >= 299, seen


# -- 103 Early Hints (a documented limitation) ------------------------------------


def test_early_hints_fail_the_fetch_and_never_desync_a_connection(
    raw_servers: list[RawServer], clock: FakeClock
) -> None:
    """A 103 before the 200 is read as the answer (``http.client`` skips only
    100 Continue): the fetch fails like any answer that is no key set (503,
    never a 500), and the connection is closed, so the 200 behind the hint
    never answers a later request (docs/keys.rst, "Wrong answers")."""
    issuer = TokenIssuer(issuer="https://issuer.example.test")
    body = json.dumps(issuer.jwks()).encode()
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )

    def hinted(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set() and _read_request(conn):  # keep-alive: answer each
            conn.sendall(answer)

    server = RawServer(hinted)
    raw_servers.append(server)
    app = fault_app(_jwt_config(issuer, JWKS_URI=f"{server.url}/jwks"), clock)
    token = issuer.mint()
    for _ in range(2):
        response, _elapsed = timed(app, token)
        assert_unavailable(response)
        clock.advance(2.0)  # past the pacing of an answer that is no key set
    assert server.connections == 2
