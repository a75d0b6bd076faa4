"""The watchdog behind every outgoing request's overall deadline.

End to end (servers that trickle their headers or body) in test_faults.py;
here the parts a fault test cannot see.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import tracemalloc
from typing import Any

import pytest

from flask_oauth_verify.deadline import (
    DeadlineExpired,
    deadline,
    reset_in_child,
    retire_watchdog,
    watched_session,
)
from flask_oauth_verify.testing import IssuerServer, TokenIssuer, auth_header

from .conftest import in_forked_child, make_app


def test_a_block_that_completes_is_never_an_error() -> None:
    """Even when it outlives its deadline: only a read cut off is an error."""
    with deadline(0.001) as watch:
        threading.Event().wait(0.3)  # well past the deadline and a watcher tick
    assert watch.expired


def test_a_connection_back_in_its_pool_is_out_of_reach(issuer_server: IssuerServer) -> None:
    """Once a response is read its connection returns to the pool, where
    another request may take it: a late expiry must not shut that one."""
    session = watched_session()
    try:
        with deadline(5) as watch:
            response = session.get(f"{issuer_server.url}/missing", timeout=(1, 1))
            response.close()
            assert watch.connections == []
    finally:
        session.close()


def test_a_dripping_server_is_cut_off_and_reported_as_expired() -> None:
    """A byte every 50 ms: no read times out, the deadline still ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" * 100:
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    session = watched_session()
    try:
        with pytest.raises(DeadlineExpired), deadline(0.5) as watch:
            session.get(f"http://127.0.0.1:{port}/", timeout=(1, 1))
        assert watch.expired and len(watch.connections) == 1
    finally:
        stop.set()
        server.join(5)
        listener.close()
        session.close()


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "oauth-verify-deadlines"]


def test_a_retired_watcher_leaves_no_thread_and_the_next_deadline_starts_one() -> None:
    with deadline(5):
        pass
    assert _watchers()
    retire_watchdog()
    assert _watchers() == []
    with deadline(0.001) as watch:
        threading.Event().wait(0.3)  # well past the deadline and a watcher tick
    assert watch.expired  # a watcher ran again, and fired
    assert len(_watchers()) == 1


def test_the_watcher_is_not_retired_while_a_request_is_watched() -> None:
    with deadline(0.05) as watch:
        retire_watchdog()
        threading.Event().wait(0.3)
    assert watch.expired and len(_watchers()) == 1


def test_prefetching_at_init_app_leaves_no_thread_for_a_preload_master_to_fork(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """Python 3.12+ warns of a fork while threads run (gunicorn --preload
    forks right after the app is made): the keys are fetched, no watcher is
    left, and the first request's fetch starts one again."""
    app = make_app(served_tokens.config(PREFETCH_KEYS=True))
    assert issuer_server.hits["/jwks"] == 1
    assert _watchers() == []
    served_tokens.rotate()  # a new kid: the request fetches the key set again
    response = app.test_client().get("/protected", headers=auth_header(served_tokens.mint()))
    assert response.status_code == 200, response.json
    assert issuer_server.hits["/jwks"] == 2
    assert len(_watchers()) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_a_working_watchdog() -> None:
    """The parent's watcher thread does not survive a fork; the child starts its own."""
    with deadline(5):
        pass  # the parent's watcher is running now
    pid = os.fork()
    if pid == 0:  # the child: a deadline must still fire
        try:
            with deadline(0.01) as watch:
                threading.Event().wait(0.5)
            os._exit(0 if watch.expired else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_childs_watchdog_is_made_from_threading_as_patched_after_the_fork() -> None:
    """A gevent worker of a ``--preload`` gunicorn forks, then monkey-patches
    ``threading``. The watcher's condition and thread-local were made at the
    fork, as OS-thread objects every greenlet shared: the first deadline of
    each worker failed ("cannot notify on un-acquired lock"), a failed key
    fetch, 401 for new keys for a cooldown. They are made by the child's
    first deadline, from ``threading`` as it is then."""
    with deadline(5):
        pass  # the parent's watcher is running now

    def patched_then_watched() -> list[str]:
        made: list[str] = []
        condition, local = threading.Condition, threading.local

        class PatchedCondition(condition):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any) -> None:
                made.append("condition")
                super().__init__(*args)

        class PatchedLocal(local):  # type: ignore[valid-type, misc]
            def __init__(self) -> None:
                made.append("local")
                super().__init__()

        threading.Condition, threading.local = PatchedCondition, PatchedLocal  # type: ignore[assignment, misc]
        try:
            with deadline(0.01) as watch:
                threading.Event().wait(0.5)
        finally:
            threading.Condition, threading.local = condition, local  # type: ignore[misc]
        from flask_oauth_verify.deadline import _WATCHDOG

        watcher = type(_WATCHDOG._cond).__name__  # the watcher waits on a patched condition
        return [*sorted(set(made)), watcher, "expired" if watch.expired else "not expired"]

    assert in_forked_child(patched_then_watched) == [
        "condition",
        "local",
        "PatchedCondition",
        "expired",
    ]


def test_objects_reset_in_a_child_leave_nothing_behind_when_they_die() -> None:
    """Every key store, cache, single flight and fetcher asks to be reset in a
    forked child. Each asked with a fork hook of its own, which the process
    keeps for good: an app factory called again and again (a test suite, an
    app per tenant) grew the process by about 3 KB an app, and every fork
    ran all the dead hooks."""

    class Owner:
        pass

    def reset(_owner: Owner) -> None:
        pass

    for _ in range(100):  # warm up whatever the first calls allocate
        reset_in_child(Owner(), reset)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            reset_in_child(Owner(), reset)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes kept for 5,000 dead owners"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_live_owners_are_reset_in_a_child_in_the_order_they_asked() -> None:
    class Owner:
        pass

    first, second = Owner(), Owner()
    names = {id(first): "first", id(second): "second"}
    order: list[str] = []
    reset_in_child(first, lambda owner: order.append(names[id(owner)]))
    reset_in_child(second, lambda owner: order.append(names[id(owner)]))
    seen = in_forked_child(lambda: list(order))
    assert seen == ["first", "second"]
    assert order == []  # never in the parent
