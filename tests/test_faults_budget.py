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
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from flask import Flask

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.discovery import metadata_urls
from flask_oauth_verify.fetch import FetchError
from flask_oauth_verify.testing import IssuerServer, Reply, Request, TokenIssuer, auth_header

from .conftest import FakeClock, add_views, free_port
from .provider_emulators import Keycloak
from .test_faults import (
    BUDGET,
    MARGIN,
    RawServer,
    assert_ok,
    assert_unavailable,
    fault_app,
    redis_cache,
    timed,
)
from .test_providers import provider_app

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
    :param seconds: how long a slow answer takes.
    """

    def __init__(self, slow: Callable[[str], bool], seconds: float = SLOW) -> None:
        self.slow = slow
        self.seconds = seconds
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
            if piece is not pieces[-1] and stop.wait(self.seconds / 2):  # the fault: slow
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


def test_a_fallback_cut_short_by_the_budget_after_an_answer_is_paced(clock: FakeClock) -> None:
    """JWKS_URI answers a slow 404 and its fallback is cut off by what is
    left of the shared budget: the 404 stands, and the next requests are
    paced. The cut-off call made the fetch an outage that no circuit opens
    for, so every request asked both locations again."""
    server = IssuerServer()
    try:
        issuer = TokenIssuer(issuer="https://issuer.example.test")

        connect, read = 0.25, 2.0
        budget = connect + read

        def slow_not_found(_request: Request) -> Reply:
            # the fault: well within the read timeout, past half the budget
            time.sleep(0.6 * budget)
            return Reply(404, {"error": "not_found"})

        server.route("/a", slow_not_found)
        server.route("/b", slow_not_found)
        config = _jwt_config(
            issuer,
            JWKS_URI=f"{server.url}/a",
            JWKS_URI_FALLBACKS=[f"{server.url}/b"],
            HTTP_TIMEOUT=(connect, read),
        )
        app = fault_app(config, clock)
        for _ in range(4):
            response, _elapsed = timed(app, issuer.mint())
            assert_unavailable(response)
        assert (server.hits["/a"], server.hits["/b"]) == (1, 1)
    finally:
        server.close()


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
        # every metadata name, once
        assert one_round == len(metadata_urls(server.url + "/realm")), dict(server.hits)
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


def test_the_pacing_runs_from_the_answer_not_from_the_start_of_the_round(
    clock: FakeClock,
) -> None:
    """Each metadata document is answered 404 slowly (the app's clock moves
    on as the issuer answers): the second runs from the last answer, so the
    next request does not ask again. It ran from the start of the round: a
    round that took a second left the next request nothing of it, the slow
    issuer was asked at every request, and the budget the issuers after it
    share went to it every time."""
    server = IssuerServer()
    try:
        issuer = server.url + "/realm"

        def slow_not_found(_request: Request) -> Reply:
            clock.advance(0.5)  # the fault: each answer takes half the interval
            return Reply(404, {"error": "not_found"})

        for url in metadata_urls(issuer):
            server.route(urlsplit(url).path, slow_not_found)
        app = fault_app(_introspection_config([issuer]), clock)
        response, _elapsed = timed(app, "opaque-token-0000-abcdefghijklmnop")
        assert_unavailable(response)
        one_round = sum(server.hits.values())
        # 0.5 s per name from the first request to the last answer
        assert one_round == len(metadata_urls(issuer)), dict(server.hits)
        response, _elapsed = timed(app, "opaque-token-0001-abcdefghijklmnop")
        assert_unavailable(response)
        assert sum(server.hits.values()) == one_round, dict(server.hits)
        clock.advance(1.0)  # a second after the answer: asked again
        response, _elapsed = timed(app, "opaque-token-0002-abcdefghijklmnop")
        assert_unavailable(response)
        assert sum(server.hits.values()) == 2 * one_round, dict(server.hits)
    finally:
        server.close()


def test_a_round_cut_short_by_its_budget_after_answers_is_paced(clock: FakeClock) -> None:
    """Slow 404s use up the round's shared budget before its last metadata
    name: the answers heard stand, and the next requests are paced. The
    cut-off call (no status) made the round an outage, so every opaque token
    asked every name again."""
    server = IssuerServer()
    try:
        issuer = server.url + "/realm"
        names = metadata_urls(issuer)

        connect, read = 0.25, 1.5  # answers well within the read timeout
        budget = connect + read

        def slow_not_found(_request: Request) -> Reply:
            time.sleep(budget / (len(names) - 0.5))  # the fault: the last name gets little
            return Reply(404, {"error": "not_found"})

        for url in names:
            server.route(urlsplit(url).path, slow_not_found)
        config = {**_introspection_config([issuer]), "OAUTH_VERIFY_HTTP_TIMEOUT": (connect, read)}
        app = fault_app(config, clock)
        for number in range(4):
            response, _elapsed = timed(app, f"opaque-token-{number:04d}-abcdefghijklmnop")
            assert_unavailable(response)
        assert server.hits[urlsplit(names[0]).path] == 1, dict(server.hits)
        assert sum(server.hits.values()) <= len(names), dict(server.hits)
    finally:
        server.close()


def _attempt_records(redis_url: str) -> dict[bytes, int]:
    """The shared records of answered discovery failures, with their
    remaining lifetimes (milliseconds)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {key: client.pttl(key) for key in client.scan_iter("*discovery-attempt*")}
    finally:
        client.close()


def test_a_worker_whose_clock_is_ahead_paces_the_others_no_longer_than_the_interval(
    redis_url: str, clock: FakeClock
) -> None:
    """A worker 30 s ahead (within the skew the shared cache tolerates) sees
    the issuer answer 404; the issuer then publishes its metadata. Another
    worker is paced for a second from reading the record, then asks; the
    record lives about that second, and the success deletes it. Its time,
    from that worker's future, counted as "now" at every reading, and the
    record lived a minute: the others were refused for the skew (30 s)."""
    server = IssuerServer()  # every path: 404
    try:
        config = _introspection_config([server.url])
        ahead = FakeClock(clock.now + 30)
        first = fault_app(config, ahead, cache_config=redis_cache(redis_url), name="worker1")
        second = fault_app(config, clock, cache_config=redis_cache(redis_url), name="worker2")
        response, _elapsed = timed(first, "opaque-token-0000-abcdefghijklmnop")
        assert_unavailable(response)
        one_round = sum(server.hits.values())
        assert one_round == 2, dict(server.hits)
        lifetimes = list(_attempt_records(redis_url).values())
        assert len(lifetimes) == 1 and 0 < lifetimes[0] <= 1000, lifetimes
        metadata = {"issuer": server.url, "introspection_endpoint": f"{server.url}/introspect"}
        server.route("/.well-known/openid-configuration", Reply(200, metadata))
        server.route("/introspect", Reply(200, {"active": False}))
        response, _elapsed = timed(second, "opaque-token-0001-abcdefghijklmnop")
        assert_unavailable(response)  # paced: the other worker's failure
        assert sum(server.hits.values()) == one_round, dict(server.hits)
        clock.advance(1.0)  # a second after reading it: asked, and found
        response, _elapsed = timed(second, "opaque-token-0002-abcdefghijklmnop")
        assert response.status_code == 401, response.get_json()
        assert server.hits["/.well-known/openid-configuration"] == 2, dict(server.hits)
        assert _attempt_records(redis_url) == {}
    finally:
        server.close()


# -- a call cut off by the shared budget is no outage ------------------------------


def test_a_call_cut_off_by_the_shared_budget_does_not_open_the_circuit(
    raw_servers: list[RawServer], clock: FakeClock
) -> None:
    """Issuers [A, B]: A answers its first metadata document slowly (most of
    the budget the search shares), so B's is asked with what is left and
    cut off. B's origin circuit is the one its keys are fetched under: a
    few opaque tokens opened it that way, and B's valid JWTs got 503."""
    slow = SlowNotFound(lambda path: path == "/.well-known/openid-configuration", seconds=0.45)
    first = RawServer(slow)
    raw_servers.append(first)
    tokens = TokenIssuer(alg="ES256", audience="api")
    server = tokens.serve()
    metadata_path = "/.well-known/openid-configuration"
    try:
        server.hold(metadata_path)  # B answers later than what A leaves
        config = {
            **_introspection_config([first.url, tokens.issuer]),
            "OAUTH_VERIFY_STRATEGY": "auto",
            "OAUTH_VERIFY_ALGORITHMS": tokens.algorithms,
            "OAUTH_VERIFY_CIRCUIT_BREAKER_FAILURES": 2,
            "OAUTH_VERIFY_CIRCUIT_BREAKER_RESET": 300,
        }
        app = fault_app(config, clock)
        for number in range(2):
            clock.advance(1.0)  # past A's pacing: A spends the budget each time
            response, elapsed = timed(app, f"opaque-token-{number:04d}-abcdefghijklmnop")
            assert_unavailable(response)
            assert elapsed <= BUDGET + MARGIN
            assert server.wait_for_hits(metadata_path, number + 1, timeout=MARGIN)
        assert slow.paths[metadata_path] == 2, slow.paths
        server.release(metadata_path)
        response, _elapsed = timed(app, tokens.mint())
        assert_ok(response)
    finally:
        server.close()


def test_a_timeout_within_the_full_budget_still_counts(clock: FakeClock) -> None:
    """The other side: a server that does not answer within a whole budget
    is an outage (the circuit opens), and a call cut off by a shortened
    budget while the circuit is half-open leaves the trial to the next
    call, the circuit neither closed nor opened again."""
    server = IssuerServer()
    try:
        server.hold("/doc")
        config = {
            **_introspection_config([server.url]),
            "OAUTH_VERIFY_CIRCUIT_BREAKER_FAILURES": 1,
            "OAUTH_VERIFY_CIRCUIT_BREAKER_RESET": 30,
        }
        app = fault_app(config, clock)
        fetcher = app.extensions["oauth_verify"].fetcher
        url = f"{server.url}/doc"
        with pytest.raises(FetchError, match="timed out"):
            fetcher.get_json(url)
        breaker = fetcher.breaker(url)
        assert breaker.is_open
        clock.advance(31)  # half-open
        with pytest.raises(FetchError, match="timed out"):
            fetcher.get_json(url, budget=BUDGET / 4)
        assert not breaker.is_open, "the trial is not spent"
        with pytest.raises(FetchError, match="timed out"):
            fetcher.get_json(url)
        assert breaker.is_open
        assert server.hits["/doc"] == 3, dict(server.hits)
    finally:
        server.close()


def test_a_call_given_half_the_budget_that_times_out_counts(clock: FakeClock) -> None:
    """A hung location reached with at least half the budget left (a slow
    first fallback spent the rest) is down: its circuit opens, else every
    request would wait for it again."""
    server = IssuerServer()
    try:
        server.hold("/doc")
        config = {
            **_introspection_config([server.url]),
            "OAUTH_VERIFY_CIRCUIT_BREAKER_FAILURES": 1,
            # a read timeout well above the budget given below: the watchdog
            # cuts the call off, not the socket
            "OAUTH_VERIFY_HTTP_TIMEOUT": (0.25, 2.0),
        }
        app = fault_app(config, clock)
        fetcher = app.extensions["oauth_verify"].fetcher
        url = f"{server.url}/doc"
        with pytest.raises(FetchError, match="timed out"):
            fetcher.get_json(url, budget=fetcher.budget * 0.6)
        assert fetcher.breaker(url).is_open
    finally:
        server.close()


# -- Retry-After on a cold start with the key set's circuit open ------------------


def test_cold_retry_after_names_an_open_fallback_circuit(clock: FakeClock) -> None:
    """JWKS_URI answers 404 (not an outage), its fallback on another origin
    refuses connections: once the fallback's circuit is open, the 503 says
    when its next trial goes out."""
    issuer = TokenIssuer(issuer="https://issuer.example.test")
    server = IssuerServer()
    try:
        server.route("/wrong", Reply(404, {}))
        config = _jwt_config(
            issuer,
            JWKS_URI=f"{server.url}/wrong",
            JWKS_URI_FALLBACKS=[f"http://127.0.0.1:{free_port()}/jwks"],
            CIRCUIT_BREAKER_FAILURES=2,
            CIRCUIT_BREAKER_RESET=300,
        )
        app = fault_app(config, clock)
        seen = []
        for _ in range(4):
            seen += _retry_afters(app, issuer.mint(), 1)
            clock.advance(2)  # past the pacing of an answered failure
        assert seen[-1] >= 290, seen
    finally:
        server.close()


def test_a_hung_fallback_beside_a_404_of_the_same_origin_opens_the_circuit(
    clock: FakeClock,
) -> None:
    """JWKS_URI answers 404 at once, its fallback on the same origin never
    answers: the 404 is no proof that the fallback is up, so its timeouts
    open the origin's circuit and the next requests get 503 at once, not
    after another whole budget each."""
    issuer = TokenIssuer(issuer="https://issuer.example.test")
    server = IssuerServer()
    try:
        server.hold("/jwks")
        config = _jwt_config(
            issuer,
            JWKS_URI=f"{server.url}/wrong",
            JWKS_URI_FALLBACKS=[f"{server.url}/jwks"],
            CIRCUIT_BREAKER_FAILURES=2,
            CIRCUIT_BREAKER_RESET=300,
        )
        app = fault_app(config, clock)
        for _ in range(2):
            response, _elapsed = timed(app, issuer.mint())
            assert_unavailable(response)
            clock.advance(2)  # past the pacing of a failed fetch
        response, elapsed = timed(app, issuer.mint())
        assert_unavailable(response)
        assert elapsed < BUDGET / 2, "the open circuit answers at once"
        assert int(response.headers["Retry-After"]) >= 290
        assert server.hits["/jwks"] == 2, dict(server.hits)
    finally:
        server.close()


class _Beta(Keycloak):
    realm = "beta"


@contextmanager
def _two_realms(
    clock: FakeClock, reset: int
) -> Iterator[tuple[IssuerServer, Keycloak, Keycloak, Flask]]:
    """Keycloak realms acme and beta on one server (one origin circuit), and
    an app that accepts both; held URLs are released at the end."""
    server = IssuerServer()
    try:
        acme, beta = Keycloak(server), _Beta(server)
        config = acme.config(
            ISSUER=[acme.issuer, beta.issuer],
            HTTP_TIMEOUT=(0.3, 0.3),
            CIRCUIT_BREAKER_FAILURES=3,
            CIRCUIT_BREAKER_RESET=reset,
        )
        yield server, acme, beta, provider_app(config, clock=clock)
    finally:
        server.release()
        server.close()


@pytest.mark.parametrize("reset", [30, 10])
def test_a_hung_realm_does_not_keep_another_realm_of_its_server_from_new_keys(
    clock: FakeClock, reset: int
) -> None:
    """Two Keycloak realms on one server share the origin's circuit. Realm
    acme's certs hang; realm beta's answer and beta rotates its key. acme's
    clients retry at the Retry-After they got and took every half-open trial,
    so beta's new kid was refused for as long as acme stayed hung; and with
    a reset shorter than JWKS_REFRESH_COOLDOWN (30 s), beta's refused forced
    refresh took the whole cooldown (and the mark shared with other workers)
    although it made no call, so beta never asked in time for a trial."""
    with _two_realms(clock, reset) as (server, acme, beta, flask_app):
        app = flask_app.test_client()
        assert app.get("/whoami", headers=auth_header(beta.token())).status_code == 200
        server.hold("/realms/acme/protocol/openid-connect/certs")
        for _ in range(3):
            assert app.get("/whoami", headers=auth_header(acme.token())).status_code == 503
        beta.signer.add_key("RS256", kid="kc-rsa-2")
        beta.signer.current_kid = "kc-rsa-2"
        rotated = beta.token()
        answers = []
        for _ in range(3):
            clock.advance(reset + 1)
            acme_status = app.get("/whoami", headers=auth_header(acme.token())).status_code
            answers.append(app.get("/whoami", headers=auth_header(rotated)).status_code)
            assert acme_status == 503
        assert 200 in answers, answers
        assert server.hits["/realms/beta/protocol/openid-connect/certs"] == 2


def test_a_realm_that_yields_its_trial_is_told_when_it_may_try_again(
    clock: FakeClock,
) -> None:
    """While the hung realm yields the half-open trial to a realm that is
    waiting, its 503 said Retry-After 5 (as if no circuit were open) and
    key_status() said the circuit was closed."""
    with _two_realms(clock, 30) as (server, acme, beta, flask_app):
        app = flask_app.test_client()
        assert app.get("/whoami", headers=auth_header(beta.token())).status_code == 200
        server.hold("/realms/acme/protocol/openid-connect/certs")
        for _ in range(3):
            app.get("/whoami", headers=auth_header(acme.token()))
        beta.signer.add_key("RS256", kid="kc-rsa-2")
        beta.signer.current_kid = "kc-rsa-2"
        clock.advance(31)
        app.get("/whoami", headers=auth_header(acme.token()))  # the trial, which fails
        hits = server.hits["/realms/acme/protocol/openid-connect/certs"]
        assert app.get("/whoami", headers=auth_header(beta.token())).status_code == 401
        clock.advance(31)  # the wait is over; beta's turn
        retry_afters = []
        for _ in range(3):
            response = app.get("/whoami", headers=auth_header(acme.token()))
            assert response.status_code == 503
            retry_afters.append(int(response.headers["Retry-After"]))
            clock.advance(5)
        assert retry_afters == [30, 25, 20]
        assert server.hits["/realms/acme/protocol/openid-connect/certs"] == hits
        with flask_app.app_context():
            statuses = flask_app.extensions["oauth_verify"].extension.key_status(flask_app)
            (status,) = [s for s in statuses if s.issuer == acme.issuer]
        assert status.circuit_open


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


def test_a_jwt_does_not_inherit_a_discovery_cut_short_by_the_endpoint_search() -> None:
    """The introspection endpoint search reaches issuer B with what issuer A's
    slow 404s left of its shared budget, and is cut off; a JWT of B arriving
    meanwhile has a whole budget of its own and gets its keys (before: it
    waited for the search's discovery of B and got its failure, a 503)."""
    slow_issuer = IssuerServer()
    tokens = TokenIssuer(audience="api")
    server = tokens.serve()
    search_reached_b = threading.Event()

    def slow_not_found(_request: Request) -> Reply:
        time.sleep(0.7)  # the fault: a slow answer (most of the budget, twice)
        return Reply(404, {"error": "nope"})

    def slow_metadata(_request: Request) -> Reply:
        search_reached_b.set()
        time.sleep(0.8)  # slower than what the search has left, within a budget
        return Reply(200, tokens.metadata())

    try:
        for path in metadata_urls(slow_issuer.url)[:2]:
            slow_issuer.route(urlsplit(path).path, slow_not_found)
        server.route("/.well-known/openid-configuration", slow_metadata)
        app = Flask("cut-search")
        app.config.update(
            TESTING=True,
            OAUTH_VERIFY_ISSUER=[slow_issuer.url, tokens.issuer],
            OAUTH_VERIFY_AUDIENCE="api",
            OAUTH_VERIFY_ALGORITHMS=tokens.algorithms,
            OAUTH_VERIFY_STRATEGY="auto",
            OAUTH_VERIFY_ALLOW_INSECURE_HTTP=True,
            OAUTH_VERIFY_HTTP_TIMEOUT=(0.5, 1.5),
            OAUTH_VERIFY_INTROSPECTION_CLIENT_ID="rs",
            OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET="secret",
        )
        OAuthVerify(app)
        add_views(app)
        searched: list[int] = []
        search = threading.Thread(
            target=lambda: searched.append(
                app.test_client()
                .get("/protected", headers=auth_header(tokens.mint_opaque()))
                .status_code
            )
        )
        search.start()
        assert search_reached_b.wait(10)
        answer = app.test_client().get("/protected", headers=auth_header(tokens.mint()))
        search.join(10)
        assert answer.status_code == 200, answer.get_json()
        assert searched == [503]  # the search itself ran out of budget
    finally:
        slow_issuer.close()
        server.close()
