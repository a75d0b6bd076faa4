"""One key cache for every worker: a real Redis, real worker processes.

The in-process tests drive a Flask-Caching ``RedisCache`` with the fake
clock. The multi-process tests start several real worker processes (plain
processes each serving the app, and gunicorn with four workers) against one
JWKS server and one Redis, and count what the JWKS server receives during
bursts, a soft-TTL expiry, a key rotation, a flood of unknown kids and a
Redis outage. The workers' clocks are advanced through a test-only route,
so no test waits for real time to pass.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cachelib import SimpleCache
from flask import Flask
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.cache import SharedCache
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import (
    FakeClock,
    RedisServer,
    accepts_connections,
    add_views,
    free_port,
    wait_until,
)

JWKS = "/jwks"
ROOT = Path(__file__).resolve().parent.parent
REDIS_OPTIONS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}


def redis_config(url: str) -> dict[str, Any]:
    """Flask-Caching settings for a shared Redis, with socket timeouts."""
    return {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": url, "CACHE_OPTIONS": REDIS_OPTIONS}


@pytest.fixture
def redis(redis_server: RedisServer, redis_url: str) -> Iterator[RedisServer]:
    """The session Redis, running and empty; restarted if a test stopped it."""
    yield redis_server
    if redis_server.process is None:
        redis_server.start()


def redis_app(tokens: TokenIssuer, url: str, clock: FakeClock, **options: Any) -> Flask:
    app = Flask(f"redis-{uuid.uuid4().hex[:6]}")
    app.config.update(TESTING=True, **redis_config(url))
    app.config.update(tokens.config(audience="api", HTTP_TIMEOUT=(0.5, 0.5), **options))
    cache = Cache(app)
    OAuthVerify().init_app(app, cache=cache, clock=clock)
    add_views(app)
    return app


def status_of(app: Flask, token: str) -> int:
    return app.test_client().get("/protected", headers=auth_header(token)).status_code


# -- the shared cache over a real Redis ---------------------------------------------


def test_round_trip_add_and_lock(redis: RedisServer) -> None:
    app = Flask("roundtrip")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app)
    assert shared.get("oauth_verify:t:a") is None
    assert shared.set("oauth_verify:t:a", {"x": 1}, 60)
    assert shared.get("oauth_verify:t:a") == {"x": 1}
    assert shared.add("oauth_verify:t:b", 1, 60)
    assert not shared.add("oauth_verify:t:b", 2, 60)
    assert shared.lock("oauth_verify:t:lock", 10)
    assert not shared.lock("oauth_verify:t:lock", 10), "held by us (or another worker)"
    assert shared.locked("oauth_verify:t:lock", 10)
    shared.unlock("oauth_verify:t:lock")
    assert not shared.locked("oauth_verify:t:lock", 10)
    assert shared.ping()
    assert not shared.degraded


def test_a_backend_reading_from_a_replica_reads_our_own_writes_from_the_master(
    redis: RedisServer, tmp_path: Path
) -> None:
    """RedisSentinelCache reads from a replica: one that has not caught up
    (here a second, empty Redis) showed a lock just taken as free, so two
    workers both held it, and the health probe's own value as lost."""
    replica = RedisServer(redis.binary, tmp_path)
    replica.start()
    try:
        app = Flask("sentinel-like")
        app.config.update(redis_config(redis.url))
        cache = Cache(app)
        backend = app.extensions["cache"][cache]
        backend._read_client = type(backend._write_client).from_url(replica.url)
        first, second = SharedCache(cache, app=app), SharedCache(cache, app=app)
        assert first.lock("oauth_verify:t:replica-lock", 10)
        assert not second.lock("oauth_verify:t:replica-lock", 10)  # one holder only
        assert second.locked("oauth_verify:t:replica-lock", 10)
        assert second.ping() and not second.degraded
        assert backend._read_client.connection_pool.connection_kwargs["port"] == replica.port
    finally:
        replica.stop()


def test_a_lock_whose_expiry_was_lost_is_broken(redis: RedisServer) -> None:
    app = Flask("stale-lock")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app)
    # cachelib's add is SETNX then EXPIRE: a worker dying in between leaves a
    # lock without expiry. Its timestamp lets the others break it.
    shared.backend.set("oauth_verify:t:lock", {"at": time.time() - 3600, "pid": 1}, timeout=0)
    assert shared.lock("oauth_verify:t:lock", 10)
    assert shared.locked("oauth_verify:t:lock", 10)


def test_an_expired_lock_stays_visible_so_a_waiter_can_take_it_over(
    redis: RedisServer,
) -> None:
    """Redis keeps a lock past its lifetime: a waiter elsewhere must still see
    the lock a dead holder left (its lifetime over) to take it over. With the
    backend TTL equal to the lifetime the key vanished first, and the waiter
    read "released by a holder that finished" and gave up (503)."""
    import redis as redis_client

    app = Flask("lock-ttl")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app)
    assert shared.lock("oauth_verify:t:ttl", 5)
    client = redis_client.Redis.from_url(redis.url)
    (stored,) = client.keys("*oauth_verify:t:ttl")
    assert client.ttl(stored) > 5  # outlives the lock's 5 s lifetime
    # A holder on another machine, its lifetime over: a waiter takes over...
    gone = {"at": time.time() - 6, "pid": 1, "host": "another-machine"}
    shared.backend.set("oauth_verify:t:gone", gone, timeout=60)
    assert shared.take_abandoned("oauth_verify:t:gone", 5)
    # ...but never from a live holder, or after a release.
    live = {"at": time.time(), "pid": 1, "host": "another-machine"}
    shared.backend.set("oauth_verify:t:live", live, timeout=60)
    assert not shared.take_abandoned("oauth_verify:t:live", 5)
    assert not shared.take_abandoned("oauth_verify:t:released", 5)


def test_unlock_never_releases_a_lock_taken_over_by_another_worker(
    redis: RedisServer,
) -> None:
    app = Flask("lock-owner")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app)
    assert shared.lock("oauth_verify:t:owner", 5)
    # Our lock expired and another worker took it over meanwhile:
    theirs = {"at": time.time(), "pid": 1, "host": "another-machine"}
    shared.backend.set("oauth_verify:t:owner", theirs, timeout=60)
    shared.unlock("oauth_verify:t:owner")
    assert shared.get("oauth_verify:t:owner") == theirs


def test_stopped_redis_is_a_miss_with_one_warning_then_recovers(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask("outage")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app, retry=0)
    shared.set("oauth_verify:t:k", "before", 60)
    redis.stop()
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        assert shared.get("oauth_verify:t:k") == "before", "this process's own copy"
        assert shared.get("oauth_verify:t:missing") is None
        assert not shared.set("oauth_verify:t:k2", "during", 60)
        assert shared.get("oauth_verify:t:k2") == "during"
        assert shared.add("oauth_verify:t:lock", 1, 60), "locks become per-process"
        assert not shared.ping()
    warnings = [r for r in caplog.records if "falling back to per-process" in r.message]
    assert len(warnings) == 1
    assert shared.last_error is not None
    redis.start()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        assert shared.set("oauth_verify:t:k3", "after", 60)
    assert "recovered" in caplog.text
    assert shared.last_error is None


def _redis_command(server: RedisServer, *words: str) -> bytes:
    command = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(command.encode())
        return sock.recv(65536)


def test_a_read_only_redis_is_one_outage_not_a_recovery_every_retry(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica (or a full Redis) answers reads and refuses writes: one
    warning for the whole outage, no "recovered" until a write is stored."""
    app = Flask("read-only")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app, retry=0)
    assert shared.set("oauth_verify:t:k", "before", 60)
    assert _redis_command(redis, "REPLICAOF", "127.0.0.1", "1").startswith(b"+OK")
    try:
        with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
            for round_ in range(4):
                assert shared.get("oauth_verify:t:k") == "before"  # reads still work
                assert not shared.set(f"oauth_verify:t:w{round_}", round_, 60)
            key = "oauth_verify:t:lock"
            assert shared.lock(key, 15), "per process: Redis refused the add"
            # what the background release of that add does: a read, no delete
            assert shared._release(key, {"at": 1.0, "pid": 1, "host": "x"})
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "falling back" in m]) == 1, messages
        assert not [m for m in messages if "recovered" in m], messages
    finally:
        assert _redis_command(redis, "REPLICAOF", "NO", "ONE").startswith(b"+OK")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        assert shared.set("oauth_verify:t:after", 1, 60)
    assert "recovered" in caplog.text


def test_a_reading_worker_sees_recovery_and_the_next_outage(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that only reads (it adopts what others store) logs the
    recovery from an outage at its first read, and the next outage again."""
    app = Flask("reader")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app, retry=0)
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        for _ in range(2):
            redis.stop()
            assert shared.get("oauth_verify:t:k") is None
            redis.start()
            assert shared.get("oauth_verify:t:k") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "falling back" in m]) == 2, messages
    assert len([m for m in messages if "recovered" in m]) == 2, messages


def test_a_backend_whose_set_answers_none_is_no_outage(caplog: pytest.LogCaptureFixture) -> None:
    """Some backends answer ``set`` with ``None`` (Flask-Caching's
    SpreadSASLMemcachedCache); only an explicit ``False`` stored nothing."""

    class AnswersNone(SimpleCache):
        def set(self, key: str, value: Any, timeout: Any = None) -> None:
            super().set(key, value, timeout)

    shared = SharedCache(AnswersNone())
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        assert shared.set("oauth_verify:t:k", 1, 60)
        assert shared.get("oauth_verify:t:k") == 1
    assert not shared.degraded and not caplog.records


def test_a_lock_released_between_add_and_read_is_raced_for_again() -> None:
    """Under contention another worker may release the lock between our
    refused add and our read: no outage, the next add takes it."""

    class Contended(SimpleCache):
        refusals = 2  # released twice before our read

        def add(self, key: str, value: Any, timeout: Any = None) -> bool:
            if self.refusals:
                self.refusals -= 1
                return False  # held by another worker, just released
            return bool(super().add(key, value, timeout))

    shared = SharedCache(Contended())
    assert shared.lock("oauth_verify:t:lock", 15)
    assert not shared.degraded


def test_a_lock_whose_expire_failed_is_released_from_redis(redis: RedisServer) -> None:
    """cachelib's ``add`` is SETNX then EXPIRE: when EXPIRE fails (here an ACL
    forbids it; in life a stall past the socket timeout) the lock is in Redis
    with no expiry while the worker fetches under a per-process lock. Left
    there it held every other worker for its whole lifetime; it is removed
    as soon as Redis answers."""
    user = f"noexpire{uuid.uuid4().hex[:6]}"
    assert _redis_command(redis, "ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-expire")
    limited = Flask("limited")
    limited.config.update(redis_config(redis.url.replace("redis://", f"redis://{user}:pw@")))
    worker = SharedCache(Cache(limited), app=limited, retry=60)
    admin_app = Flask("admin")
    admin_app.config.update(redis_config(redis.url))
    other = SharedCache(Cache(admin_app), app=admin_app)
    key = f"oauth_verify:jwks-lock:{uuid.uuid4().hex}"
    try:
        assert worker.lock(key, 15), "taken per process once Redis refused"
        assert worker.degraded
        assert wait_until(lambda: other.get(key) is None, every=0.05), (
            "the half-taken lock stays in Redis"
        )
        assert other.lock(key, 15), "another worker is not held by it"
        worker.unlock(key)
        assert other.locked(key, 15), "and the first worker never releases the other's lock"
    finally:
        _redis_command(redis, "ACL", "DELUSER", user)


def test_a_backend_that_stores_nothing_is_an_outage_not_another_workers_lock(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """A file cache on a full or read-only disk answers every write with
    False (and logs its own error): its lock was read as "another worker is
    fetching", and every request was a 503 with the issuer up."""

    class FullDisk(SimpleCache):
        def set(self, key: str, value: Any, timeout: Any = None) -> bool:
            return False

        def add(self, key: str, value: Any, timeout: Any = None) -> bool:
            return False

    app = Flask("full-disk")
    app.config.update(TESTING=True, **served_tokens.config(audience="api"))
    OAuthVerify().init_app(app, cache=FullDisk(), clock=clock)
    add_views(app)
    assert [status_of(app, served_tokens.mint()) for _ in range(3)] == [200] * 3
    assert issuer_server.hits[JWKS] == 1
    assert get_state(app).cache.degraded


def test_a_failed_backend_is_left_alone_for_a_while(redis: RedisServer) -> None:
    app = Flask("backoff")
    app.config.update(redis_config(redis.url))
    shared = SharedCache(Cache(app), app=app, retry=60)
    redis.stop()
    assert shared.get("oauth_verify:t:x") is None
    assert shared.degraded
    redis.start()
    # Within the retry interval the backend is not called at all.
    assert not shared.set("oauth_verify:t:x", 1, 60)
    assert shared.get("oauth_verify:t:x") == 1


def test_redis_without_socket_timeouts_is_reported(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask("no-timeout")
    app.config.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL=redis.url)
    shared = SharedCache(Cache(app), app=app)
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        shared.get("oauth_verify:t:x")
    assert "socket_timeout" in caplog.text
    assert shared._call_deadline == 1.0
    caplog.clear()
    configured = Flask("with-timeout")
    configured.config.update(redis_config(redis.url))
    with caplog.at_level(logging.WARNING, "flask_oauth_verify.cache"):
        SharedCache(Cache(configured), app=configured).get("oauth_verify:t:x")
    assert "socket_timeout" not in caplog.text


# -- one process, Redis as the shared backend ---------------------------------------


def test_apps_on_one_redis_share_one_copy(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    first = redis_app(served_tokens, redis.url, clock)
    second = redis_app(served_tokens, redis.url, clock)
    assert status_of(first, served_tokens.mint()) == 200
    assert status_of(second, served_tokens.mint()) == 200
    assert issuer_server.hits[JWKS] == 1
    # Raw set and metadata in Redis; parsed keys only in the process.
    backend = next(iter(first.extensions["cache"].values()))
    stored = backend.get(get_state(first).keys.shared_key("jwks", served_tokens.issuer))
    assert stored["jwks"] == served_tokens.jwks()
    assert stored["uri"] == served_tokens.issuer + JWKS
    served_tokens.rotate()
    new = served_tokens.mint()
    assert status_of(first, new) == 200
    assert status_of(second, new) == 200
    assert issuer_server.hits[JWKS] == 2


def test_apps_with_other_key_set_urls_for_one_issuer_keep_their_own_keys(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """The shared copy is keyed by issuer: an app whose JWKS_URI names another
    key set of the same issuer (Entra's ``…/keys?appid=…`` beside the common
    keys) adopted its neighbour's keys and accepted tokens they sign."""
    own_app = served_tokens.jwks()
    issuer_server.route("/own", Reply(200, own_app))
    other = served_tokens.rotate(drop_old=True)  # a key the common set has, the app's not
    issuer_server.route("/common", Reply(200, served_tokens.jwks()))
    common = redis_app(served_tokens, redis.url, clock, JWKS_URI=served_tokens.issuer + "/common")
    own = redis_app(served_tokens, redis.url, clock, JWKS_URI=served_tokens.issuer + "/own")
    token = served_tokens.mint()  # signed with the common set's key
    assert served_tokens.current_kid == other
    assert status_of(common, token) == 200
    assert status_of(own, token) == 401  # not adopted from Redis: fetched from its own URL
    assert issuer_server.hits["/own"] >= 1


def test_apps_with_other_key_set_urls_for_one_issuer_never_wait_on_each_other(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """Two APIs of one issuer on one Redis, each with its own JWKS_URI: each
    has its own fetch lock and cooldowns. Before, a cold app waited for its
    neighbour's fetch of another URL and answered 503, and after a rotation
    the neighbour's forced refresh made it refuse its own new key (401)
    without a fetch, for the whole cooldown."""
    issuer_server.route("/a", Reply(200, served_tokens.jwks()))
    issuer_server.route("/b", Reply(200, served_tokens.jwks()))
    a = redis_app(served_tokens, redis.url, clock, JWKS_URI=served_tokens.issuer + "/a")
    b = redis_app(served_tokens, redis.url, clock, JWKS_URI=served_tokens.issuer + "/b")
    keys_a = get_state(a).keys
    issuer = served_tokens.issuer
    # A's fetch lock, live, as if A were fetching right now: B does not wait for it.
    with a.app_context():
        assert get_state(a).cache.lock(keys_a.shared_key("jwks-lock", issuer), 20)
    token = served_tokens.mint()
    assert status_of(b, token) == 200
    assert issuer_server.hits["/b"] == 1
    with a.app_context():
        get_state(a).cache.unlock(keys_a.shared_key("jwks-lock", issuer))
    assert status_of(a, token) == 200
    served_tokens.rotate()
    issuer_server.route("/a", Reply(200, served_tokens.jwks()))
    issuer_server.route("/b", Reply(200, served_tokens.jwks()))
    new = served_tokens.mint()
    assert status_of(a, new) == 200  # A's forced refresh, and A's cooldown
    assert status_of(b, new) == 200  # B's own forced refresh of its own URL
    assert issuer_server.hits["/a"] == 2 and issuer_server.hits["/b"] == 2


def test_a_worker_that_waited_for_a_refresh_the_holders_circuit_refused_may_force_its_own(
    redis: RedisServer,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 1's circuit for the issuer is open, worker 2's is closed. After
    a rotation, worker 1 holds the fetch lock for a forced refresh that its
    circuit refuses (no call); worker 2, waiting on that lock for the same new
    kid, found no new copy and had used up its own forced refresh: it refused
    the new key for the whole cooldown although nobody had fetched it."""
    first = redis_app(served_tokens, redis.url, clock)
    second = redis_app(served_tokens, redis.url, clock)
    assert status_of(first, served_tokens.mint()) == 200
    assert status_of(second, served_tokens.mint()) == 200
    breaker = get_state(first).fetcher.breaker(served_tokens.issuer + JWKS)
    for _ in range(get_state(first).settings.circuit_breaker_failures):
        breaker.record_failure()
    served_tokens.rotate()
    new = served_tokens.mint()
    waiting = threading.Event()
    answers: list[int] = []
    second_cache = get_state(second).cache
    wait_unlocked = second_cache.wait_unlocked

    def second_waits(key: str, timeout: float, *, wait: float) -> bool:
        waiting.set()
        return wait_unlocked(key, timeout, wait=wait)

    monkeypatch.setattr(second_cache, "wait_unlocked", second_waits)
    first_cache = get_state(first).cache
    delete = first_cache.delete

    def meanwhile(key: str) -> None:
        # Worker 1 gives its refused forced refresh back, still holding the lock.
        if "jwks-forced" in key and not answers:
            thread = threading.Thread(target=lambda: answers.append(status_of(second, new)))
            thread.start()
            assert waiting.wait(10), "worker 2 waits for worker 1's fetch"
            threads.append(thread)
        delete(key)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(first_cache, "delete", meanwhile)
    assert status_of(first, new) == 401  # refused by its open circuit: no call
    assert len(threads) == 1, "worker 1 gave its forced refresh back"
    threads[0].join(10)
    assert answers == [401]
    assert issuer_server.hits[JWKS] == 1, "one shared copy, no fetch since"
    clock.advance(2)
    assert status_of(second, new) == 200, "worker 2 forces its own refresh"
    assert issuer_server.hits[JWKS] == 2


def test_a_forced_refresh_that_called_a_location_keeps_the_cooldown_of_every_worker(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    """JWKS_URI answers 404 (the key set moved) and worker 1's circuit for its
    fallback (another host) is open: worker 1's forced refresh called JWKS_URI,
    then the fallback's circuit refused. It counted as "no call" and gave the
    cooldown and the shared mark back, so every worker called JWKS_URI once
    per cooldown instead of one call for all of them."""
    fallback = f"http://127.0.0.1:{free_port()}/jwks"  # nothing listens there
    issuer_server.route("/moved", Reply(200, served_tokens.jwks()))
    options = {"JWKS_URI": served_tokens.issuer + "/moved", "JWKS_URI_FALLBACKS": [fallback]}
    first = redis_app(served_tokens, redis.url, clock, **options)
    second = redis_app(served_tokens, redis.url, clock, **options)
    assert status_of(first, served_tokens.mint()) == 200
    assert status_of(second, served_tokens.mint()) == 200
    assert issuer_server.hits["/moved"] == 1
    breaker = get_state(first).fetcher.breaker(fallback)
    for _ in range(get_state(first).settings.circuit_breaker_failures):
        breaker.record_failure()
    issuer_server.route("/moved", Reply(404, {"error": "not found"}))
    served_tokens.rotate()
    new = served_tokens.mint()
    assert status_of(first, new) == 401
    assert issuer_server.hits["/moved"] == 2, "worker 1's forced refresh called JWKS_URI"
    assert status_of(second, new) == 401
    assert issuer_server.hits["/moved"] == 2, "within the cooldown of worker 1's call"
    clock.advance(2)
    assert status_of(first, new) == 401
    assert issuer_server.hits["/moved"] == 2, "worker 1's own cooldown holds too"


def test_requests_keep_succeeding_with_redis_stopped(
    redis: RedisServer,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = redis_app(served_tokens, redis.url, clock)
    token = served_tokens.mint(expires_in=7200)
    assert status_of(app, token) == 200
    redis.stop()
    with caplog.at_level(logging.WARNING, "flask_oauth_verify"):
        assert [status_of(app, token) for _ in range(5)] == [200] * 5
        clock.advance(601)  # the refresh now needs the (stopped) cache
        assert [status_of(app, token) for _ in range(5)] == [200] * 5
        served_tokens.rotate()
        assert status_of(app, served_tokens.mint(now=clock.now)) == 200
    assert "falling back to per-process caching" in caplog.text
    assert issuer_server.hits[JWKS] == 3
    assert get_state(app).cache.degraded


def test_a_flushed_redis_changes_nothing_until_the_ttl(
    redis: RedisServer, served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = redis_app(served_tokens, redis.url, clock)
    token = served_tokens.mint(expires_in=7200)
    assert status_of(app, token) == 200
    redis.flush()
    assert [status_of(app, token) for _ in range(5)] == [200] * 5
    assert issuer_server.hits[JWKS] == 1
    clock.advance(601)
    assert status_of(app, token) == 200
    assert issuer_server.hits[JWKS] == 2


# -- several worker processes --------------------------------------------------------


#: The app every worker process serves, written to a file for the workers
#: (plain processes and gunicorn) to import without the test suite.
WORKER_SOURCE = '''
import json
import logging
import os
import time

from flask import Flask, request
from cachelib import SimpleCache
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify, require_token


class OffsetClock:
    """Real time plus an offset the test moves forward through /_clock."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


def create_app():
    clock = OffsetClock()
    app = Flask("worker")
    app.config.update(json.loads(os.environ["WORKER_CONFIG"]))
    OAuthVerify().init_app(app, cache=Cache(app), clock=clock)

    @app.get("/protected")
    @require_token
    def protected():
        return {"pid": os.getpid()}

    @app.post("/_clock")
    def advance():
        clock.offset += float(request.args["advance"])
        return {"pid": os.getpid(), "offset": clock.offset}

    return app


def serve(count):
    """Fork ``count`` worker processes, each serving the app on its own port."""
    import signal
    import sys

    from werkzeug.serving import make_server

    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # a worker: build its own app after the fork, like gunicorn
            server = make_server("127.0.0.1", 0, create_app(), threaded=True)
            # one write(2) per line: lines of concurrent children never interleave
            os.write(1, f"{server.server_port}\\n".encode())
            server.serve_forever()
            os._exit(0)
        children.append(pid)

    def stop(*_args):
        for child in children:
            os.kill(child, signal.SIGTERM)
        for child in children:
            os.waitpid(child, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve(int(os.environ.get("WORKERS", "1")))
'''


@pytest.fixture
def worker_module(tmp_path: Path) -> Path:
    """The directory holding ``oauth_worker.py`` (see :data:`WORKER_SOURCE`)."""
    (tmp_path / "oauth_worker.py").write_text(WORKER_SOURCE)
    return tmp_path


def worker_env(config: dict[str, Any], directory: Path) -> dict[str, str]:
    path = os.pathsep.join([str(directory), str(ROOT)])
    return {**os.environ, "WORKER_CONFIG": json.dumps(config), "PYTHONPATH": path}


class Workers:
    """Several worker processes (forked from one parent) serving the worker app."""

    def __init__(self, config: dict[str, Any], directory: Path, count: int) -> None:
        self.log = directory / "workers.log"
        self._log_file = self.log.open("w")
        env = {**worker_env(config, directory), "WORKERS": str(count)}
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, str(directory / "oauth_worker.py")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
        )
        self.urls: list[str] = []
        assert self.process.stdout is not None
        for _ in range(count):
            line = self.process.stdout.readline()
            if not line.strip().isdigit():
                self.stop()
                raise RuntimeError(
                    f"workers did not start (read {line!r}, exit {self.process.poll()}): "
                    f"{self.log.read_text()}"
                )
            self.urls.append(f"http://127.0.0.1:{int(line)}")

    def advance(self, seconds: float) -> None:
        """Move every worker's clock forward."""
        for url in self.urls:
            requests.post(f"{url}/_clock", params={"advance": seconds}, timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log_file.close()


def burst(urls: list[str], token: str, per_url: int = 8) -> list[tuple[int, int | None]]:
    """``per_url`` concurrent requests to each URL; (status, worker pid) each."""

    def call(url: str) -> tuple[int, int | None]:
        response = requests.get(url + "/protected", headers=auth_header(token), timeout=30)
        pid = response.json().get("pid") if response.status_code == 200 else None
        return response.status_code, pid

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(call, [u for u in urls for _ in range(per_url)]))


def worker_config(tokens: TokenIssuer, redis_url: str) -> dict[str, Any]:
    config = tokens.config(audience="api", HTTP_TIMEOUT=[1, 2])
    config.update(redis_config(redis_url))
    return config


def random_kid_token(tokens: TokenIssuer) -> str:
    return tokens.mint(headers={"kid": f"random-{uuid.uuid4().hex}"})


@pytest.mark.slow
def test_worker_processes_share_one_key_cache(
    redis: RedisServer,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    worker_module: Path,
) -> None:
    config = worker_config(served_tokens, redis.url)
    workers = Workers(config, worker_module, 4)
    try:
        urls = workers.urls
        token = served_tokens.mint(expires_in=7200)

        # Cold start: 32 concurrent requests over 4 processes, one fetch.
        results = burst(urls, token)
        assert [s for s, _ in results] == [200] * 32
        assert len({pid for _, pid in results}) == 4
        assert issuer_server.hits[JWKS] == 1

        # Soft TTL over in every worker: one of them refreshes for all.
        workers.advance(601)
        assert [s for s, _ in burst(urls, token)] == [200] * 32
        assert issuer_server.hits[JWKS] == 2

        # Rotation mid-traffic: new tokens everywhere, one fetch, no failure.
        served_tokens.rotate()
        new = served_tokens.mint(expires_in=7200)
        assert [s for s, _ in burst(urls, new)] == [200] * 32
        assert [s for s, _ in burst(urls, token, per_url=2)] == [200] * 8
        assert issuer_server.hits[JWKS] == 3

        # A flood of unknown kids inside the cooldown: no fetch at all...
        flood = [random_kid_token(served_tokens) for _ in range(25)]
        statuses = [s for t in flood for s, _ in burst(urls, t, per_url=1)]
        assert statuses == [401] * 100
        assert issuer_server.hits[JWKS] == 3
        # ...and after it, one forced fetch shared by every worker.
        workers.advance(31)
        statuses = [s for t in flood for s, _ in burst(urls, t, per_url=1)]
        assert statuses == [401] * 100
        assert issuer_server.hits[JWKS] == 4

        # Redis stops mid-run: requests keep succeeding.
        redis.stop()
        assert [s for s, _ in burst(urls, new)] == [200] * 32
        assert issuer_server.hits[JWKS] == 4
        # A rotation during the outage: each worker fetches for itself.
        workers.advance(31)
        served_tokens.rotate()
        newest = served_tokens.mint(expires_in=7200)
        assert [s for s, _ in burst(urls, newest)] == [200] * 32
        assert issuer_server.hits[JWKS] == 4 + len(urls)
    finally:
        workers.stop()
    logs = workers.log.read_text()
    assert "falling back to per-process caching" in logs
    assert "Traceback" not in logs


@pytest.mark.slow
def test_a_worker_killed_mid_fetch_does_not_hold_the_others_back(
    redis: RedisServer,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    worker_module: Path,
    clock: FakeClock,
) -> None:
    """A worker killed while it holds the shared fetch lock (an OOM kill, a
    gunicorn timeout) leaves the lock behind. A cold worker on the same Redis
    used to wait out the lock's lifetime and answer 503 without asking the
    issuer itself; it now sees the holder is gone and fetches."""
    workers = Workers(worker_config(served_tokens, redis.url), worker_module, 1)
    token = served_tokens.mint(expires_in=7200)
    issuer_server.hold(JWKS)
    stuck = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        url = workers.urls[0]
        # Worker A takes the shared lock and hangs in its fetch...
        stuck.submit(requests.get, url + "/protected", headers=auth_header(token), timeout=30)
        assert issuer_server.wait_for_hits(JWKS, 1)
        pid = requests.post(f"{url}/_clock", params={"advance": 0}, timeout=10).json()["pid"]
        os.kill(pid, signal.SIGKILL)  # ...and dies there; its parent reaps it
        assert workers.process.wait(30) == 0
        lock = redis_app(served_tokens, redis.url, clock)
        with lock.app_context():
            held = get_state(lock).cache.get(
                get_state(lock).keys.shared_key("jwks-lock", served_tokens.issuer)
            )
        assert isinstance(held, dict) and held["pid"] == pid  # the lock outlived A
        issuer_server.release(JWKS)
        # Worker B, cold, same Redis: its lock wait would be 2 * 1 s + 2 s.
        app_b = redis_app(served_tokens, redis.url, clock)
        started = time.monotonic()
        assert status_of(app_b, token) == 200
        assert time.monotonic() - started < 4  # it did not wait the lock out
        assert issuer_server.hits[JWKS] == 2  # A's fetch, then B's own
    finally:
        issuer_server.release(JWKS)
        stuck.shutdown(wait=True)
        workers.stop()


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until a started server process accepts connections on ``port``."""

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError("gunicorn exited")
        return accepts_connections(port)

    if not wait_until(up, timeout=60, every=0.05):
        raise RuntimeError("gunicorn did not start")


@pytest.mark.slow
def test_gunicorn_workers_share_one_key_cache(
    redis: RedisServer,
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    worker_module: Path,
) -> None:
    config = worker_config(served_tokens, redis.url)
    config["OAUTH_VERIFY_PREFETCH_KEYS"] = True
    port = free_port()
    log = worker_module / "gunicorn.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(  # noqa: S603
            [
                sys.executable, "-m", "gunicorn", "--workers", "4", "--preload",
                "--graceful-timeout", "2", "--bind", f"127.0.0.1:{port}",
                "oauth_worker:create_app()",
            ],
            cwd=worker_module,
            env=worker_env(config, worker_module),
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
        try:
            wait_for_port(port, process)
            url = f"http://127.0.0.1:{port}"
            # --preload: the master prefetched once; the forked workers use it.
            assert issuer_server.hits[JWKS] == 1
            token = served_tokens.mint(expires_in=7200)
            results = burst([url], token, per_url=64)
            assert [s for s, _ in results] == [200] * 64
            assert issuer_server.hits[JWKS] == 1
            served_tokens.rotate()
            new = served_tokens.mint(expires_in=7200)
            assert [s for s, _ in burst([url], new, per_url=64)] == [200] * 64
            assert issuer_server.hits[JWKS] == 2
            redis.stop()
            assert [s for s, _ in burst([url], new, per_url=64)] == [200] * 64
            assert [s for s, _ in burst([url], token, per_url=16)] == [200] * 16
        finally:
            process.send_signal(signal.SIGTERM)  # graceful: no request cut mid-answer
            process.wait(30)
    assert "Traceback" not in log.read_text()


def test_status_never_adopts_a_shared_copy_that_a_fetch_overtook(
    redis: RedisServer, served_tokens: TokenIssuer, clock: FakeClock
) -> None:
    """``status()`` (a health check, ``key_status()``, a metrics scrape) of a
    cold worker adopts the shared copy outside the key store's fetch: a
    fetch installing the rotated set between its "newer than ours?" test
    and its install was overwritten by the older copy, bringing back a key
    that had left the set."""
    redis.flush()
    first = redis_app(served_tokens, redis.url, clock)
    assert status_of(first, served_tokens.mint()) == 200  # the first set, shared
    removed = served_tokens.current_kid
    old = served_tokens.mint()
    served_tokens.rotate(drop_old=True)
    clock.advance(1)
    second = redis_app(served_tokens, redis.url, clock)
    store = get_state(second).keys
    parse = store._parse
    overtaken: list[bool] = []

    def a_fetch_overtakes(raw: Any) -> Any:
        if not overtaken:  # between the test and the install of the shared copy
            overtaken.append(True)
            assert store.refresh() == {served_tokens.issuer: None}
        return parse(raw)

    store._parse = a_fetch_overtakes  # type: ignore[method-assign,assignment]
    with second.app_context():
        (status,) = store.status()
    assert overtaken
    assert removed not in status.kids and served_tokens.current_kid in status.kids
    assert status_of(second, old) == 401
