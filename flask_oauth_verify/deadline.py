"""Wall-clock deadlines for outgoing requests, whatever the server trickles.

A socket read timeout bounds the wait for *each* read, so a server that
sends one byte a second (of its status line, its headers or its body) never
trips it; urllib3 documents this and recommends a watcher thread. Here one
daemon thread per process watches every request in flight: at a request's
deadline it shuts its sockets down, and the blocked read fails at once.

:func:`watched_session` builds a :class:`requests.Session` whose connection
pools register each connection they use with the request being watched (a
thread-local set by :func:`deadline`); requests outside a ``deadline``
block are not watched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = [
    "DeadlineExpired",
    "deadline",
    "reset_if_forked",
    "reset_in_child",
    "reused_connection",
    "watch_redis_pool",
    "watched_session",
]

logger = logging.getLogger("flask_oauth_verify")


_T = TypeVar("_T")


def reset_in_child(owner: _T, reset: Callable[[_T], None]) -> None:
    """Call ``reset(owner)`` in every process forked from this one, while
    ``owner`` lives: locks, calls under way and pooled connections of the
    parent are not the child's (gunicorn ``--preload``, ``multiprocessing``).

    A lock held by a thread of the parent at the fork stays held forever in
    the child, and a call under way has no thread left to finish it. Owners
    are reset in the order they asked; one that died is forgotten (the
    process keeps no hook per owner).
    """
    ref = weakref.ref(owner, _forget_owner)
    _CHILD_RESETS[id(ref)] = (ref, reset)


#: id of a weak reference to an owner -> (the reference, its reset), in the
#: order :func:`reset_in_child` was called. Plain dict operations, atomic
#: under the GIL: the weakref callback that removes an entry may run in any
#: thread, at any allocation, so it must take no lock.
_CHILD_RESETS: dict[int, tuple[weakref.ReferenceType[Any], Callable[[Any], None]]] = {}


def _forget_owner(ref: weakref.ReferenceType[Any]) -> None:
    _CHILD_RESETS.pop(id(ref), None)


#: The process whose owners are its own: this one, until a fork that runs no
#: ``os.register_at_fork`` hook (uWSGI forks its workers with C ``fork()``
#: and runs none unless ``--py-call-osafterfork``) leaves a child with the
#: parent's locks and pooled connections. :func:`reset_if_forked` notices.
_owners_pid = os.getpid()
#: pid -> the event of the thread resetting that process's owners.
_resetting: dict[int, threading.Event] = {}


def _reset_owners_in_child() -> None:
    global _owners_pid
    for ref, reset in list(_CHILD_RESETS.copy().values()):
        owner = ref()
        if owner is not None:
            reset(owner)
    _owners_pid = os.getpid()
    # Only this process's own entry may stay (its waiters hold their event):
    # a child must not inherit another process's, whose pid it might reuse.
    for pid in [pid for pid in _resetting if pid != _owners_pid]:
        _resetting.pop(pid, None)


os.register_at_fork(after_in_child=_reset_owners_in_child)


def reset_if_forked() -> None:
    """Reset every owner (:func:`reset_in_child`) now if this process was
    forked without the hooks: before it uses a connection or lock of the
    parent's. A parent's kept-alive connection shared by two workers gives
    each the other's answers (introspection: one caller's token judged by
    another's answer). One thread resets; the others of the process wait.
    """
    pid = os.getpid()
    if _owners_pid == pid:
        return
    mine = threading.Event()
    claimed = _resetting.setdefault(pid, mine)  # atomic under the GIL
    if claimed is not mine:
        claimed.wait()
        return
    try:
        _reset_owners_in_child()
    finally:
        mine.set()


class DeadlineExpired(Exception):
    """The request ran past its deadline and its sockets were shut down."""


class _Watch:
    """One request in flight: its deadline and the connections it uses."""

    __slots__ = ("at", "connections", "expired", "lock", "reused")

    def __init__(self, at: float) -> None:
        self.at = at
        self.connections: list[Any] = []
        self.expired = False
        self.lock = threading.Lock()
        #: whether the last request went out on a connection already open
        self.reused = False

    def add(self, connection: Any) -> None:
        with self.lock:
            if connection not in self.connections:
                self.connections.append(connection)
            expired = self.expired
        if expired:  # connected after the deadline fired: cut it too
            _shut(connection)

    def release(self, connection: Any) -> None:
        """``connection`` went back to its pool: another request may take it."""
        with self.lock, contextlib.suppress(ValueError):
            self.connections.remove(connection)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            connections = list(self.connections)
        for connection in connections:
            _shut(connection)


def _shut(connection: Any) -> None:
    sock = getattr(connection, "sock", None) or getattr(connection, "detached_sock", None)
    # TLS inside the TLS of an https:// proxy: urllib3's SSLTransport has no
    # shutdown(); the socket to the proxy under it carries both.
    while sock is not None and not hasattr(sock, "shutdown"):
        sock = getattr(sock, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


#: How often the watcher looks at the requests in flight. Deadlines fire up
#: to this late; registering a request never wakes a thread that is ticking.
_TICK = 0.1


class _Watchdog:
    """The process's watcher thread (started lazily, again after a fork).

    While requests are in flight it wakes every :data:`_TICK` seconds and
    cuts those past their deadline; with none it sleeps until one is
    registered. So a busy process pays a lock and a set insertion per
    request, not a thread wake-up.

    Its condition and its thread-local (which request of this thread is
    watched) are made by the first :func:`deadline` of each process, never
    at import or at a fork: a gevent worker of a ``--preload`` server
    imports this module in the master, forks, and only then monkey-patches
    ``threading``; made earlier, they would be OS-thread objects that every
    greenlet of the worker shares.
    """

    def __init__(self) -> None:
        #: held only for a few steps that never block or yield
        self._guard = threading.Lock()
        self._cond: threading.Condition | None = None
        #: this thread's (greenlet's) watched request: ``local.watch``
        self.local: threading.local | None = None
        self._watches: set[_Watch] = set()
        self._pid = 0
        self._idle = False
        self._thread: threading.Thread | None = None

    def watch(self, watch: _Watch) -> threading.local:
        """Watch ``watch``; the thread-local of this process (made if need be)."""
        while True:
            cond = self._cond
            if cond is None or self._pid != os.getpid():
                cond = self._start()
            with cond:
                if cond is not self._cond:  # retired meanwhile: start another
                    continue
                self._watches.add(watch)
                if self._idle:
                    self._idle = False
                    cond.notify()
                return self.local  # type: ignore[return-value]  # made with the condition

    def retire(self) -> None:
        """Stop this process's watcher thread if no request is in flight; the
        next :func:`deadline` starts another.

        For a process about to fork, such as a ``gunicorn --preload`` master
        whose ``init_app`` fetched the keys (``PREFETCH_KEYS``): it leaves no
        thread of ours running at the fork (Python 3.12+ warns of a fork of a
        process with threads, which may deadlock the child).
        """
        with self._guard:
            cond, thread = self._cond, self._thread
            if cond is None or self._pid != os.getpid():
                return
            with cond:
                if self._watches:
                    return
                self._cond = None
                self._thread = None
                cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def unwatch(self, watch: _Watch) -> None:
        cond = self._cond
        if cond is None:
            return
        with cond:
            self._watches.discard(watch)

    def current(self) -> _Watch | None:
        """The request of this thread being watched, if any."""
        local = self.local
        return None if local is None else getattr(local, "watch", None)

    def reset_after_fork(self) -> None:
        """In a forked child: no thread, no request in flight; the condition
        and the thread-local are made again by the child's first deadline
        (the parent's watcher may have held the old lock at the fork)."""
        self._guard = threading.Lock()
        self._cond = None
        self.local = None
        self._watches = set()
        self._pid = 0
        self._idle = False
        self._thread = None

    def _start(self) -> threading.Condition:
        """Make this process's condition, thread-local and watcher (once)."""
        with self._guard:
            start = self._cond is None or self._pid != os.getpid()
            if start:
                self._watches = set()
                self._idle = False
                self.local = threading.local()
                self._cond = threading.Condition()
                self._pid = os.getpid()
            cond = self._cond
        if start:  # outside the guard: starting a thread may yield (gevent)
            thread = threading.Thread(
                target=self._run, args=(cond,), name="oauth-verify-deadlines", daemon=True
            )
            with self._guard:
                if self._cond is cond:
                    self._thread = thread
            thread.start()
        return cond  # type: ignore[return-value]  # made above, or by another caller

    def _run(self, cond: threading.Condition) -> None:
        while True:
            with cond:
                if self._cond is not cond:  # retired: a later deadline starts another
                    return
                now = time.monotonic()
                due = [w for w in self._watches if w.at <= now]
                self._watches.difference_update(due)
                if not due:
                    self._idle = not self._watches
                    cond.wait(None if self._idle else _TICK)
            for watch in due:
                try:
                    watch.expire()
                except Exception:  # never let one odd socket stop the watcher
                    logger.exception("Cutting off a request at its deadline failed")


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset_after_fork)


def retire_watchdog() -> None:
    """Stop the deadline watcher thread while nothing is watched (see
    :meth:`_Watchdog.retire`); the next outgoing call starts it again."""
    _WATCHDOG.retire()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[_Watch]:
    """Watch the requests of this thread inside the block; cut them at ``seconds``.

    :raises DeadlineExpired: instead of whatever the block raised once the
        deadline fired (the read that was cut off). A block that completes
        is never turned into an error.
    """
    watch = _Watch(time.monotonic() + seconds)
    local = _WATCHDOG.watch(watch)
    previous = getattr(local, "watch", None)
    local.watch = watch
    try:
        yield watch
    except Exception:
        if watch.expired:
            raise DeadlineExpired() from None
        raise
    finally:
        _WATCHDOG.unwatch(watch)
        local.watch = previous


def _register(connection: Any) -> None:
    """Watch ``connection`` for this thread's deadline, before a request on it.

    :raises DeadlineExpired: when the deadline has fired already: a request
        retried after the cut (a kept-alive connection found closed) would
        connect afresh, out of the watcher's reach (it has passed).
    """
    watch = _WATCHDOG.current()
    if watch is not None:
        if watch.expired:
            raise DeadlineExpired()
        # a socket already open is a kept-alive connection taken from the pool
        watch.reused = getattr(connection, "sock", None) is not None
        watch.add(connection)


def reused_connection() -> bool:
    """Whether the last request of this thread's :func:`deadline` block went
    out on a kept-alive connection (one the server may have closed since)."""
    watch = _WATCHDOG.current()
    return watch is not None and watch.reused


def _release(connection: Any) -> None:
    watch = _WATCHDOG.current()
    if watch is not None:
        watch.release(connection)


class _RedisSocket:
    """A redis-py connection as the watcher sees one: its socket as ``sock``."""

    __slots__ = ("connection",)

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @property
    def sock(self) -> Any:
        return getattr(self.connection, "_sock", None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RedisSocket) and other.connection is self.connection

    __hash__ = None  # type: ignore[assignment]


def _watch_connects(connection: Any) -> None:
    """Watch a redis-py connection from its connect on, handshake included;
    once the deadline has fired, refuse to connect again.

    redis-py retries a command that failed on a closed connection, ten
    times, backing off up to 1 s, and a connect that failed likewise: a
    :class:`DeadlineExpired` raised instead is not retried.
    """
    for name in ("connect", "connect_check_health"):  # redis-py 8 reconnects by the latter
        method = getattr(connection, name, None)
        if method is not None:
            setattr(connection, name, _watched_connect(connection, method))
    connection._watched = True


def _watched_connect(connection: Any, method: Callable[..., Any]) -> Callable[..., Any]:
    def watched(*args: Any, **kwargs: Any) -> Any:
        watch = _WATCHDOG.current()
        if watch is not None:
            if watch.expired:
                raise DeadlineExpired()
            watch.add(_RedisSocket(connection))
        return method(*args, **kwargs)

    return watched


def watch_redis_pool(client: Any) -> None:
    """Let :func:`deadline` cut off the commands of a redis-py ``client``.

    A socket timeout bounds each read, so a Redis that trickles its replies
    a byte at a time holds a command (or the handshake of a connection) for
    as long as the reply lasts: minutes for a key set. The connections of
    the client's pool are watched inside a ``deadline`` block like an HTTP
    request's. Anything without a redis-py connection pool is left alone.
    """
    pool: Any = getattr(client, "connection_pool", None)
    names = ("make_connection", "get_connection", "release")
    if any(getattr(pool, name, None) is None for name in names) or getattr(pool, "_watched", False):
        return
    make_connection, get_connection, release = (getattr(pool, name) for name in names)

    def watched_make_connection(*args: Any, **kwargs: Any) -> Any:
        connection = make_connection(*args, **kwargs)
        _watch_connects(connection)
        return connection

    def watched_get_connection(*args: Any, **kwargs: Any) -> Any:
        connection = get_connection(*args, **kwargs)
        if not getattr(connection, "_watched", False):  # made before the pool was watched
            _watch_connects(connection)
        _register(_RedisSocket(connection))
        return connection

    def watched_release(connection: Any) -> None:
        _release(_RedisSocket(connection))
        release(connection)

    pool.make_connection = watched_make_connection
    pool.get_connection = watched_get_connection
    pool.release = watched_release
    pool._watched = True


class _KeepsSocket:
    """Connection mix-in: its socket stays within the watcher's reach after
    ``http.client`` lets go of it.

    For an answer that closes the connection (``Connection: close``,
    HTTP/1.0), ``HTTPConnection.getresponse()`` calls :meth:`close`, which
    sets ``sock`` to ``None`` while the response goes on reading its body
    from that socket: a body trickled a byte at a time was out of reach of
    the deadline. Shutting the kept socket down later is safe: once really
    closed, a Python socket no longer holds its descriptor (``OSError``).
    """

    detached_sock: socket.socket | None = None

    def _new_conn(self) -> socket.socket:
        """Connect; a connection made after the deadline fired (which found
        no socket to shut then) is closed at once."""
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        watch = _WATCHDOG.current()
        if watch is not None and watch.expired:
            sock.close()
            raise DeadlineExpired()
        return sock

    def close(self) -> None:
        if self.sock is not None:  # type: ignore[attr-defined]
            self.detached_sock = self.sock  # type: ignore[attr-defined]
        super().close()  # type: ignore[misc]


class _KeepsSocketHTTPConnection(_KeepsSocket, HTTPConnection):
    pass


class _KeepsSocketHTTPSConnection(_KeepsSocket, HTTPSConnection):
    pass


class _Watched:
    """Pool mix-in: a connection is watched while a request uses it."""

    def _prepare_proxy(self, conn: Any) -> Any:
        # The CONNECT to an https URL through a proxy, and the TLS handshake
        # inside the tunnel, happen here, before _make_request.
        _register(conn)
        return super()._prepare_proxy(conn)  # type: ignore[misc]

    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        _register(conn)
        return super()._make_request(conn, *args, **kwargs)  # type: ignore[misc]

    def _put_conn(self, conn: Any) -> None:
        _release(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPPool(_Watched, HTTPConnectionPool):
    ConnectionCls = _KeepsSocketHTTPConnection


class _WatchedHTTPSPool(_Watched, HTTPSConnectionPool):
    ConnectionCls = _KeepsSocketHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """Through a proxy (``HTTP_PROXY``) too, every connection is watched:
        a proxy that trickles is cut off at the deadline like a server."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


def watched_session() -> requests.Session:
    """A session whose connections :func:`deadline` can cut off."""
    session = requests.Session()
    adapter = _WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
