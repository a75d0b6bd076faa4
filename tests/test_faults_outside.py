"""Faults of the outside world, third pass: the gaps ``test_faults.py`` left.

Real servers on 127.0.0.1 (an :class:`IssuerServer`, a real ``redis-server``)
misbehave; every request must still get the documented 401/503 with a JSON
body and a challenge, never a 500 or a hang, and the process must recover
once the fault is over.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask

from flask_oauth_verify.cache import SharedCache, cache_key
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.fetch import Fetcher, FetchError
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer

from .attack_corpus import _self_signed_cert
from .conftest import FakeClock, RedisServer
from .test_faults import (
    BUDGET,
    MARGIN,
    REDIS_TIMEOUT,
    STALE,
    TTL,
    RawServer,
    assert_ok,
    assert_unavailable,
    fault_app,
    introspection_config,
    redis_cache,
    server_of,
    timed,
)
from .test_fetch import make_fetcher

#: Deep enough that pickling the document for the cache fails
#: (RecursionError), shallow enough that it decodes.
TOO_DEEP = 600


@pytest.fixture
def issuer(served_tokens: TokenIssuer) -> TokenIssuer:
    return served_tokens


def nested(depth: int, member: str = "junk", **document: Any) -> bytes:
    """``document`` as JSON with one more member holding ``depth`` nested arrays."""
    text = json.dumps({**document, member: "@"})
    return text.replace('"@"', "[" * depth + "]" * depth).encode()


def json_reply(body: bytes) -> Reply:
    return Reply(200, body, {"Content-Type": "application/json"})


def assert_cleanly_unavailable(app: Flask, token: str, caplog: pytest.LogCaptureFixture) -> None:
    """The documented 503 within the budget; no traceback, no token in the log."""
    with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
        response, elapsed = timed(app, token)
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN
    assert not [record for record in caplog.records if record.exc_info]
    assert token not in caplog.text


# -- documents nested too deep ----------------------------------------------------


def test_a_document_nested_too_deep_is_not_json(issuer_server: IssuerServer) -> None:
    fetcher: Fetcher = make_fetcher()
    issuer_server.route("/deep", json_reply(nested(TOO_DEEP, keys=[])))
    issuer_server.route("/fine", json_reply(nested(63, keys=[])))
    with pytest.raises(FetchError, match="not JSON") as caught:
        fetcher.get_json(issuer_server.url + "/deep")
    assert caught.value.answered  # a wrong answer, not an outage
    assert fetcher.get_json(issuer_server.url + "/fine").data["keys"] == []


def test_a_deeply_nested_introspection_answer_is_503_not_401(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    """An answer that cannot be cached was an 'internal error': 401 for an
    active token (and a traceback) instead of the endpoint's garbage 503."""
    server = server_of(issuer)
    token = issuer.mint_opaque()
    answer = nested(TOO_DEEP, **issuer.introspect(token))
    server.route("/introspect", json_reply(answer))
    config = introspection_config(issuer, f"{server.url}/introspect", INTROSPECTION_CACHE_TTL=60)
    app = fault_app(config, clock, cache_config=redis_cache(redis_url))
    response, elapsed = timed(app, token)
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN
    issuer.serve(server)  # the fault ends: the usual routes again
    assert_ok(timed(app, token)[0])


def test_a_deeply_nested_key_set_fails_like_garbage_without_a_traceback(
    issuer: TokenIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_of(issuer)
    server.route("/jwks", json_reply(nested(TOO_DEEP, **issuer.jwks())))
    app = fault_app(issuer.config(), clock)
    token = issuer.mint()
    assert_cleanly_unavailable(app, token, caplog)
    assert "not JSON" in caplog.text
    server.route("/jwks", Reply(200, issuer.jwks()))  # the fault ends
    clock.advance(2)  # past the one-second pause after an answer that is no key set
    assert_ok(timed(app, token)[0])


# -- times from the future in the shared cache --------------------------------------

#: Ten years ahead: a foreign value under our key, or a machine whose clock is wrong.
FUTURE = 10 * 365 * 86400.0


def shared_backend(app: Flask) -> Any:
    """The Flask-Caching backend of ``app`` (a cachelib ``RedisCache``)."""
    return next(iter(app.extensions["cache"].values()))


def test_times_from_the_future_in_redis_are_not_believed(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    """A key set 'fetched' in ten years was adopted as fresh until then, and a
    forced refresh 'made' then held every later one off: once the values were
    gone the process still never fetched again, so a key the issuer removed
    stayed trusted and its new key was 401."""
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    old = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, old)[0])
    backend = shared_backend(app)
    later = clock() + FUTURE
    record = backend.get(get_state(app).keys.shared_key("jwks", issuer.issuer))
    assert isinstance(record, dict)
    backend.set(
        get_state(app).keys.shared_key("jwks", issuer.issuer),
        {**record, "fetched_at": later},
        timeout=0,
    )
    backend.set(
        get_state(app).keys.shared_key("jwks-forced", issuer.issuer), {"at": later}, timeout=0
    )
    backend.set(
        get_state(app).keys.shared_key("jwks-attempt", issuer.issuer),
        {"at": later, "error": "x"},
        timeout=0,
    )
    clock.advance(STALE)
    assert_ok(timed(app, old)[0])  # a due refresh reads the record
    unknown = timed(app, issuer.mint(headers={"kid": "unknown"}))[0]  # a forced refresh
    assert unknown.status_code == 401, unknown.get_json()
    # The fault ends; the issuer then drops the old key for a new one.
    redis_server.flush()
    issuer.rotate(drop_old=True)
    clock.advance(STALE)
    response, elapsed = timed(app, old)
    assert response.status_code == 401, response.get_json()
    assert elapsed <= BUDGET + MARGIN
    assert_ok(timed(app, issuer.mint())[0])
    assert server.hits["/jwks"] >= 2


def test_a_fetch_lock_taken_in_the_future_is_broken(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    """A lock value with no expiry naming a time ten years ahead was 'live'
    for ten years: every cold request waited for it, then was 503."""
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    lock = {"at": time.time() + FUTURE, "pid": 1, "host": "elsewhere"}
    shared_backend(app).set(
        get_state(app).keys.shared_key("jwks-lock", issuer.issuer), lock, timeout=0
    )
    assert_ok(timed(app, issuer.mint())[0])


def test_discovery_metadata_from_the_future_is_not_adopted(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    server = server_of(issuer)
    config = {**issuer.config(), "OAUTH_VERIFY_JWKS_URI": None}
    app = fault_app(config, clock, cache_config=redis_cache(redis_url))
    stale = {**issuer.metadata(), "jwks_uri": f"{server.url}/gone"}
    record = {"metadata": stale, "fetched_at": clock() + FUTURE}
    shared_backend(app).set(cache_key("discovery", issuer.issuer), record, timeout=0)
    assert_ok(timed(app, issuer.mint())[0])
    assert server.hits["/gone"] == 0


# -- key sets whose keys say two things ------------------------------------------------


def x5c_of(private: rsa.RSAPrivateKey) -> str:
    """``x5c[0]`` of a self-signed certificate for ``private``'s public key."""
    return base64.b64encode(_self_signed_cert(private)).decode()


@pytest.mark.parametrize("x5c", ["own", "another key's", "not base64", "not a certificate"])
def test_a_key_whose_x5c_certifies_another_key_is_skipped(
    issuer: TokenIssuer, clock: FakeClock, x5c: str
) -> None:
    """RFC 7517 §4.7: the first certificate MUST hold the key the other
    members give. One that does not was used all the same."""
    own = issuer.key().private_key
    assert isinstance(own, rsa.RSAPrivateKey)
    chain = {
        "own": [x5c_of(own)],
        "another key's": [x5c_of(rsa.generate_private_key(65537, 2048))],
        "not base64": ["not base64!"],
        "not a certificate": [base64.b64encode(b"\x30\x03\x02\x01\x01").decode()],
    }[x5c]
    published = issuer.jwks()
    published["keys"][0]["x5c"] = chain
    server_of(issuer).route("/jwks", Reply(200, published))
    app = fault_app(issuer.config(), clock)
    response, _elapsed = timed(app, issuer.mint())
    if x5c == "own":
        assert_ok(response)
        return
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    (status,) = app.extensions["oauth_verify"].keys.status()
    assert status.kids == ()
    assert "x5c" in status.skipped[0]


# -- header values that only look like numbers --------------------------------------


def answering(head: bytes, body: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """A raw server's handler: read the request, send ``head`` + ``body``, close."""

    def handle(conn: socket.socket, _stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + head + b"Connection: close\r\n\r\n" + body)
        conn.shutdown(socket.SHUT_RDWR)

    return handle


#: A Latin-1 byte that str.isdigit() takes for a digit ('²') and int() refuses.
SUPERSCRIPT_TWO = b"\xb2"


@pytest.mark.parametrize(
    "head",
    [
        b"Cache-Control: max-age=600\r\nAge: " + SUPERSCRIPT_TWO + b"\r\n",
        b"Content-Length: " + SUPERSCRIPT_TWO + b"\r\n",
    ],
    ids=["age", "content-length"],
)
def test_a_header_number_that_is_not_ascii_never_spoils_a_key_set(
    issuer: TokenIssuer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
) -> None:
    """It was an 'internal error' (a ValueError and its traceback): 503 for
    a good key set, for as long as the issuer sent the header."""
    body = json.dumps(issuer.jwks()).encode()
    handler = answering(b"Content-Type: application/json\r\n" + head, body)
    with contextlib.closing(RawServer(handler)) as server:
        config = {**issuer.config(), "OAUTH_VERIFY_JWKS_URI": server.url + "/jwks"}
        app = fault_app(config, clock)
        with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
            assert_ok(timed(app, issuer.mint())[0])
    assert not [record for record in caplog.records if record.exc_info]


def test_a_content_length_that_is_not_ascii_from_the_introspection_endpoint(
    issuer: TokenIssuer,
    clock: FakeClock,
) -> None:
    """The ValueError reached the decorator's last resort: 401 for an active token."""
    token = issuer.mint_opaque()
    body = json.dumps(issuer.introspect(token)).encode()
    head = b"Content-Type: application/json\r\nContent-Length: " + SUPERSCRIPT_TWO + b"\r\n"
    with contextlib.closing(RawServer(answering(head, body))) as server:
        app = fault_app(introspection_config(issuer, server.url + "/introspect"), clock)
        assert_ok(timed(app, token)[0])


def test_an_etag_in_redis_that_cannot_be_sent_back_is_dropped(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    """Adopted, an ETag with CR LF inside made every conditional refresh of
    the process fail before it was sent, for good: a rotation was never
    picked up, even once the value was gone."""
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    assert_ok(timed(app, issuer.mint())[0])
    backend = shared_backend(app)
    record = backend.get(get_state(app).keys.shared_key("jwks", issuer.issuer))
    assert isinstance(record, dict)
    clock.advance(STALE)
    garbage = {**record, "etag": '"v1"\r\nX-Injected: 1', "fetched_at": clock()}
    backend.set(get_state(app).keys.shared_key("jwks", issuer.issuer), garbage, timeout=0)
    assert_ok(timed(app, issuer.mint())[0])  # adopts the record
    redis_server.flush()  # the fault ends
    issuer.rotate(drop_old=True)
    clock.advance(STALE)
    assert_ok(timed(app, issuer.mint())[0])


def test_a_key_set_url_in_redis_that_is_no_string_never_turns_a_503_into_a_401(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    token = issuer.mint(expires_in=10 * 86400)
    assert_ok(timed(app, token)[0])
    backend = shared_backend(app)
    record = backend.get(get_state(app).keys.shared_key("jwks", issuer.issuer))
    assert isinstance(record, dict)
    clock.advance(STALE)
    garbage = {**record, "uri": ["not", "a", "URL"], "fetched_at": clock()}
    backend.set(get_state(app).keys.shared_key("jwks", issuer.issuer), garbage, timeout=0)
    assert_ok(timed(app, token)[0])  # adopts the record
    server.route("/jwks", Reply(500, {"error": "down"}))
    clock.advance(2 * 86400)  # past JWKS_MAX_STALENESS: nothing left to serve
    response, elapsed = timed(app, token)
    assert_unavailable(response)
    assert elapsed <= BUDGET + MARGIN


@pytest.mark.parametrize(
    "foreign",
    [{"keys": [{"kty": b"RSA"}]}, {"keys": [], "x": {1, 2}}, {"keys": [], 1: "int key"}],
    ids=["bytes", "set", "non-string key"],
)
def test_a_key_set_in_redis_that_is_not_json_is_ignored(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, foreign: dict[Any, Any]
) -> None:
    """A record whose key set could not be hashed as JSON raised a TypeError on
    every read: every cold request was 503 while the issuer was up (it was never
    asked), a warm worker never refreshed, and the key status (``/metrics``)
    raised."""
    server = server_of(issuer)
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    backend = shared_backend(app)
    record = {"jwks": foreign, "fetched_at": clock(), "ttl": TTL, "uri": f"{server.url}/jwks"}
    backend.set(get_state(app).keys.shared_key("jwks", issuer.issuer), record, timeout=0)
    assert_ok(timed(app, issuer.mint())[0])  # a cold worker: fetched from the issuer
    assert server.hits["/jwks"] == 1
    statuses = get_state(app).keys.status()
    assert [s.kids for s in statuses] == [tuple(k["kid"] for k in issuer.jwks()["keys"])]
    backend.set(
        get_state(app).keys.shared_key("jwks", issuer.issuer),
        {**record, "fetched_at": clock() + 1},
        timeout=0,
    )
    issuer.rotate(drop_old=True)
    clock.advance(STALE)  # a warm worker's due refresh meets the record, then fetches
    assert_ok(timed(app, issuer.mint())[0])
    assert server.hits["/jwks"] == 2


@pytest.mark.parametrize(
    "max_age",
    [10**400, -(10**400), float("nan"), float("inf"), True, "60", None],
    ids=["huge", "-huge", "nan", "inf", "bool", "str", "none"],
)
def test_an_odd_max_age_in_redis_never_stops_refreshes(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, max_age: Any
) -> None:
    """The shared record's ``max_age`` is read on every adoption: an int beyond
    the float range raised OverflowError there, so no worker on the cache
    refreshed again (cold ones 503, warm ones refused a rotated key)."""
    server = server_of(issuer)
    warm = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    assert_ok(timed(warm, issuer.mint())[0])
    backend = shared_backend(warm)
    key = get_state(warm).keys.shared_key("jwks", issuer.issuer)
    record = backend.get(key)
    assert isinstance(record, dict)
    backend.set(key, {**record, "max_age": max_age, "fetched_at": clock()}, timeout=0)
    cold = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    assert_ok(timed(cold, issuer.mint())[0])
    issuer.rotate(drop_old=True)
    clock.advance(STALE)
    assert_ok(timed(warm, issuer.mint())[0])
    assert_ok(timed(cold, issuer.mint())[0])
    assert server.hits["/jwks"] >= 2


def test_a_fetch_lock_naming_a_pid_beyond_any_is_broken(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str
) -> None:
    """A lock of this machine is checked with kill(pid, 0): a pid beyond any
    raised OverflowError, each cold request a 503 and a traceback."""
    app = fault_app(issuer.config(), clock, cache_config=redis_cache(redis_url))
    lock = {"at": time.time(), "pid": 2**70, "host": socket.gethostname()}
    shared_backend(app).set(
        get_state(app).keys.shared_key("jwks-lock", issuer.issuer), lock, timeout=0
    )
    assert_ok(timed(app, issuer.mint())[0])


@pytest.mark.parametrize("pid", [0, -1])
def test_a_lock_naming_a_process_group_is_not_held(pid: int) -> None:
    """kill(0, 0) and kill(-1, 0) ask about process groups, which exist: such
    a lock was 'held' by a live process for its whole lifetime."""
    cache = SharedCache(None)
    cache.set("lock", {"at": time.time(), "pid": pid, "host": socket.gethostname()}, 60)
    assert not cache.locked("lock", 60)


# -- answers that break HTTP in every way, then the fault ends ------------------------

#: 50 MB of spaces: about 50 KB gzipped, far past HTTP_MAX_BYTES once inflated.
INFLATED = 50 * 1024 * 1024
_JSON = b"Content-Type: application/json\r\n"


def _length(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def _chunked(body: bytes, size: int = 0x4000) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def _bombs() -> dict[str, bytes]:
    gzipped = gzip.compress(b" " * INFLATED)
    deflated = zlib.compress(b" " * INFLATED)
    oversized = b" " * (600 * 1024)
    return {
        "gzip bomb": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Encoding: gzip\r\n"
        + _length(gzipped)
        + b"\r\n"
        + gzipped,
        "gzip bomb, no length": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n"
        + gzipped,
        "deflate bomb": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Encoding: deflate\r\n"
        + _length(deflated)
        + b"\r\n"
        + deflated,
        "gzip twice": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Encoding: gzip, gzip\r\nConnection: close\r\n\r\n"
        + gzip.compress(gzipped),
        "not gzip": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789",
        "chunked past the cap": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + _chunked(oversized),
        "chunk size not hex": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        "HTTP/1.0 past the cap": b"HTTP/1.0 200 OK\r\n" + _JSON + b"\r\n" + oversized,
        "length longer than the body": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Length: 5000\r\n\r\n"
        + b'{"keys": [',
        "two lengths": b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
        + b"{}",
        "103 early hints only": b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
        "204": b"HTTP/1.1 204 No Content\r\n\r\n",
        "HTTP/0.9": b'{"keys": []}',
        "status line garbage": b"HTTP/1.1 abc OK\r\n\r\n",
        "redirect to http elsewhere": b"HTTP/1.1 301 Moved\r\n"
        + b"Location: http://keys.example.com/jwks\r\nContent-Length: 0\r\n\r\n",
        "redirect to file": b"HTTP/1.1 302 Found\r\n"
        + b"Location: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n",
        "redirect without location": b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
        "200 headers": b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(200))
        + b"Content-Length: 2\r\n\r\n{}",
    }


BOMBS = _bombs()


class Switchable:
    """A raw server's handler: the fault while ``faulty``, else the key set."""

    def __init__(self, fault: Callable[[socket.socket], None], jwks: dict[str, Any]) -> None:
        self.fault = fault
        self.faulty = True
        self.body = json.dumps(jwks).encode()

    def __call__(self, conn: socket.socket, _stop: threading.Event) -> None:
        conn.recv(65536)
        if self.faulty:
            self.fault(conn)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + _JSON + _length(self.body) + b"\r\n" + self.body)


def _send(answer: bytes) -> Callable[[socket.socket], None]:
    def fault(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client may hang up on a bomb
            conn.sendall(answer)
        conn.shutdown(socket.SHUT_RDWR)

    return fault


def _reset_mid_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + _JSON + b"Content-Length: 5000\r\n\r\n" + b'{"keys": [')
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST


def _close_without_answer(conn: socket.socket) -> None:
    conn.close()


FAULTS: dict[str, Callable[[socket.socket], None]] = {
    **{name: _send(answer) for name, answer in BOMBS.items()},
    "reset mid-body": _reset_mid_body,
    "closed without an answer": _close_without_answer,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_answer_is_503_then_the_keys_come_when_it_ends(
    issuer: TokenIssuer, clock: FakeClock, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Switchable(FAULTS[fault], issuer.jwks())
    with contextlib.closing(RawServer(handler)) as server:
        config = {**issuer.config(), "OAUTH_VERIFY_JWKS_URI": server.url + "/jwks"}
        app = fault_app(config, clock)
        token = issuer.mint()
        assert_cleanly_unavailable(app, token, caplog)
        handler.faulty = False  # the fault ends
        clock.advance(STALE)  # past any pause, cooldown or open circuit
        assert_ok(timed(app, token)[0])


# -- a kept-alive connection the server closes as we reuse it -------------------------


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP request (headers and a Content-Length body); b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def keep_alive_then_close(body: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """Answer the first request of a connection and keep it open; close it,
    unanswered, when the next request arrives (an idle timeout that fires
    just as the client reuses the connection)."""

    def handle(conn: socket.socket, _stop: threading.Event) -> None:
        if not _read_request(conn):
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + _JSON + _length(body) + b"\r\n" + body)
        _read_request(conn)
        conn.close()

    return handle


def test_a_pooled_connection_closed_by_the_server_is_no_failure() -> None:
    body = b'{"keys": []}'
    with contextlib.closing(RawServer(keep_alive_then_close(body))) as server:
        fetcher = make_fetcher()
        for _ in range(3):
            assert fetcher.get_json(server.url + "/jwks").data == {"keys": []}
        assert server.connections == 3


def test_introspection_on_a_connection_the_server_closed_is_no_503(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    """Node's 5 s keep-alive timeout and the like: the request sent on the
    pooled connection as the server closed it failed, a 503 for a valid token."""
    first, second = issuer.mint_opaque(), issuer.mint_opaque()
    body = json.dumps(issuer.introspect(first)).encode()
    with contextlib.closing(RawServer(keep_alive_then_close(body))) as server:
        app = fault_app(introspection_config(issuer, server.url + "/introspect"), clock)
        assert_ok(timed(app, first)[0])
        assert_ok(timed(app, second)[0])


# -- caching headers with absurd values -----------------------------------------------


class Publishing:
    """A raw server's handler: the issuer's current key set, with ``head``."""

    def __init__(self, issuer: TokenIssuer, head: bytes) -> None:
        self.issuer = issuer
        self.head = head
        self.hits = 0

    def __call__(self, conn: socket.socket, _stop: threading.Event) -> None:
        conn.recv(65536)
        self.hits += 1
        body = json.dumps(self.issuer.jwks()).encode()
        answer = b"HTTP/1.1 200 OK\r\n" + _JSON + self.head + _length(body)
        conn.sendall(answer + b"Connection: close\r\n\r\n" + body)
        conn.shutdown(socket.SHUT_RDWR)


NINES = b"9" * 400


@pytest.mark.parametrize(
    "head",
    [
        b"Cache-Control: max-age=" + NINES + b"\r\nAge: " + NINES + b"\r\n",
        b"Cache-Control: max-age=" + NINES + b"\r\nExpires: Fri, 31 Dec 99999 23:59:59 GMT\r\n",
        b"Cache-Control: max-age=5\r\nAge: " + NINES + b"\r\n",
        b"Cache-Control: max-age=-1, s-maxage=abc\r\nExpires: 0\r\nDate: garbage\r\n",
    ],
    ids=["huge-max-age-and-age", "huge-max-age", "huge-age", "negative-max-age"],
)
def test_absurd_caching_headers_keep_the_ttl_within_its_bounds(
    issuer: TokenIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    """max-age and Age of 400 digits each made the TTL NaN: the store failed
    (a ValueError, 503 and a traceback), and a NaN TTL never ran out."""
    handler = Publishing(issuer, head)
    with contextlib.closing(RawServer(handler)) as server:
        config = {**issuer.config(), "OAUTH_VERIFY_JWKS_URI": server.url + "/jwks"}
        app = fault_app(config, clock)
        old = issuer.mint(expires_in=10 * 86400)
        with caplog.at_level(logging.WARNING, logger="flask_oauth_verify"):
            assert_ok(timed(app, old)[0])
        assert not [record for record in caplog.records if record.exc_info]
        issuer.rotate(drop_old=True)
        new = issuer.mint(expires_in=10 * 86400)
        clock.advance(2 * 86400)  # past JWKS_MAX_TTL (1 day): refreshed by now
        assert timed(app, old)[0].status_code == 401  # its key left the set
        assert_ok(timed(app, new)[0])


# -- a Redis that trickles its replies ---------------------------------------------------


class TricklingProxy:
    """A raw server's handler: a proxy to Redis whose replies, while
    ``trickling``, come one byte every 50 ms (each read gets its byte well
    within the socket timeout), for at most 15 s, then at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.trickling = False

    def __call__(self, conn: socket.socket, stop: threading.Event) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))
        threading.Thread(target=self._forward, args=(conn, upstream), daemon=True).start()
        with contextlib.suppress(OSError), upstream:
            while reply := upstream.recv(65536):
                until = time.monotonic() + 15
                for index in range(len(reply)):
                    if not self.trickling or time.monotonic() > until:
                        conn.sendall(reply[index:])
                        break
                    if stop.wait(0.05):  # the fault itself: a reply that trickles
                        return
                    conn.sendall(reply[index : index + 1])

    @staticmethod
    def _forward(conn: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while request := conn.recv(65536):
                upstream.sendall(request)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)


def test_a_redis_trickling_its_replies_is_cut_like_an_http_server(
    issuer: TokenIssuer, clock: FakeClock, redis_url: str, redis_server: RedisServer
) -> None:
    """A socket timeout bounds each read only: a key set record trickled a
    byte at a time held each request for a minute."""
    proxy = TricklingProxy(redis_server.port)
    with contextlib.closing(RawServer(proxy)) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        app = fault_app(issuer.config(), clock, cache_config=redis_cache(url))
        token = issuer.mint(expires_in=10 * 86400)
        assert_ok(timed(app, token)[0])
        proxy.trickling = True
        clock.advance(STALE)  # the refresh reads the shared copy
        response, elapsed = timed(app, token)
        assert_ok(response)
        assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
        cold = fault_app(issuer.config(), clock, cache_config=redis_cache(url), name="cold")
        response, elapsed = timed(cold, token)
        assert_ok(response)
        assert elapsed <= BUDGET + 4 * REDIS_TIMEOUT + MARGIN
