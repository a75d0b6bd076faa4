"""The shared cache: Flask-Caching, with failures treated as misses.

Key sets, discovery metadata and (opt-in) introspection results live in the
Flask-Caching backend the application passes, so every worker and machine
sharing that backend (Redis in production) shares one copy. Without a cache
an in-process one is used.

A backend that fails (Redis stopped, slow, flushed) must never fail a
request: every error is a miss (or a failed write) and the process falls back
to its own in-process copy. The first failure is logged as a warning; for
the next few seconds (``BACKEND_RETRY``) the backend is not called at all, so
an outage costs at most one failed call per process every few seconds, then
the backend is tried again and its recovery is logged. Keys start with
``oauth_verify:`` and never hold a token, only hashes.

A Redis backend should be given socket timeouts (``CACHE_OPTIONS =
{"socket_timeout": 0.5, "socket_connect_timeout": 0.5}``): without them a
Redis server that hangs (instead of refusing connections) blocks the
request. A warning is logged when a Redis client without them is found.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from flask_caching import Cache

from .deadline import deadline, reset_if_forked, reset_in_child, watch_redis_pool
from .fifo import BoundedFifo
from .verification import finite_number

__all__ = [
    "BACKEND_RETRY",
    "CLOCK_SKEW",
    "LOCAL_CACHE_SIZE",
    "LocalCache",
    "SharedCache",
    "cache_key",
    "shared_time",
]

logger = logging.getLogger("flask_oauth_verify.cache")

#: Seconds a failed backend is left alone before it is tried again.
BACKEND_RETRY = 5.0
#: Entries of the per-process cache (the default backend and the fallback).
LOCAL_CACHE_SIZE = 2000
_POLL = 0.02
#: Seconds between two tries to release a lock the backend failed to release.
_RELEASE_RETRY = 0.5
#: Names the machine in a lock, so that a lock of a dead local process is seen.
_HOST = socket.gethostname()
#: Seconds one backend call may take when Redis has no ``socket_timeout``
#: (with one: twice that).
_CALL_DEADLINE = 1.0
#: Seconds another machine's clock may run ahead of this one's: a time in the
#: shared cache later than that is not believed (see :func:`shared_time`).
CLOCK_SKEW = 60.0


def cache_key(kind: str, value: str, digest: bytes | None = None) -> str:
    """``oauth_verify:<kind>:<sha256(value)>`` — never the value itself.

    :param digest: ``value``'s SHA-256, when the caller has it already.
    """
    if digest is None:
        digest = hashlib.sha256(value.encode()).digest()
    return f"oauth_verify:{kind}:{digest.hex()}"


def shared_time(value: Any, now: float) -> float | None:
    """A time another worker stored in the shared cache, if it can be believed.

    ``None`` unless ``value`` is a finite number not later than ``now`` plus
    :data:`CLOCK_SKEW` (a time up to that far ahead counts as ``now``).
    Believed, a time from the future (a foreign value under our key, a
    machine whose clock is far ahead) would mark a copy fresh, a fetch lock
    held or a cooldown running until then: for good, in every process that
    read it, even once the value is gone.
    """
    if not finite_number(value) or value > now + CLOCK_SKEW:
        return None
    return min(float(value), now)


def _seconds(timeout: float) -> int:
    # Redis wants whole seconds; never 0 (which means "forever").
    return max(1, math.ceil(timeout))


class LocalCache:
    """A bounded per-process cache with expiry: the default backend and the fallback.

    Takes the calls of a cachelib backend that :class:`SharedCache` makes
    (``get``, ``set``, ``add``, ``delete``; a timeout of 0 never expires).
    Values are stored pickled, so every ``get`` returns a copy, as from a
    shared backend. Every call costs the same however full the cache is:
    when it holds ``size`` entries, a write drops the oldest write
    (cachelib's ``SimpleCache`` sorts all its entries on every write once
    full, which made each introspection miss cost a millisecond with a few
    thousand tokens in flight).

    :param size: the maximum number of entries.
    :param clock: monotonic seconds (tests pass a controllable clock).
    """

    def __init__(
        self, size: int = LOCAL_CACHE_SIZE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        #: key -> (expiry on the clock, or 0.0 for never; the pickled value),
        #: in the order of their last write.
        self._entries: BoundedFifo[str, tuple[float, bytes]] = BoundedFifo(max(1, size))
        self._lock = threading.Lock()
        reset_in_child(self, LocalCache._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """The maximum number of entries."""
        return self._entries.size

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The value of ``key``, or ``None`` when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] and entry[0] <= self._clock():
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            return None
        # Bytes this object pickled itself, in this process: nothing untrusted.
        return pickle.loads(entry[1])  # noqa: S301

    def set(self, key: str, value: Any, timeout: float = 0) -> bool:
        """Store ``value`` for ``timeout`` seconds (0: until dropped)."""
        entry = self._entry(value, timeout)
        with self._lock:
            self._write(key, entry)
        return True

    def add(self, key: str, value: Any, timeout: float = 0) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        entry = self._entry(value, timeout)
        with self._lock:
            current = self._entries.get(key)
            if current is not None and (not current[0] or current[0] > self._clock()):
                return False
            self._write(key, entry)
        return True

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def delete_if(self, key: str, value: Any) -> bool:
        """Remove ``key`` only while it holds ``value`` (a lock still ours)."""
        with self._lock:
            entry = self._entries.get(key)
            # Bytes this object pickled itself, in this process: nothing untrusted.
            if entry is None or pickle.loads(entry[1]) != value:  # noqa: S301
                return False
            del self._entries[key]
            return True

    def _entry(self, value: Any, timeout: float) -> tuple[float, bytes]:
        expires = self._clock() + timeout if timeout > 0 else 0.0
        return expires, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def _write(self, key: str, entry: tuple[float, bytes]) -> None:
        """Store ``entry`` as the newest write (the caller holds the lock)."""
        self._entries.put(key, entry)


class SharedCache:
    """Failure-tolerant access to a Flask-Caching ``Cache`` (or an in-process one).

    :param cache: a ``flask_caching.Cache`` (initialised for the app before
        or after this object is made), a cachelib backend, or ``None`` for a
        per-process cache.
    :param app: the app whose Flask-Caching backend to use; lets the cache
        work outside an app context (start-up prefetch, CLI).
    :param retry: seconds a failed backend is left alone (``BACKEND_RETRY``).
    """

    def __init__(
        self, cache: Any | None, *, app: Any | None = None, retry: float = BACKEND_RETRY
    ) -> None:
        self._cache = cache
        self._app = app
        self._retry = retry
        self._backend: Any | None = None
        self._local = LocalCache()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._checked_options = False
        #: the longest one backend call may take (see :meth:`_call`)
        self._call_deadline = _CALL_DEADLINE
        self.last_error: str | None = None
        #: whether the last failure was of a write (see :meth:`_read_worked`)
        self._writes_refused = False
        #: each lock this process holds: lock key -> (its value, whether the
        #: backend has it rather than the per-process cache, its lifetime)
        self._held: dict[str, tuple[dict[str, Any], bool, float]] = {}
        reset_in_child(self, SharedCache._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: a lock no parent thread holds, and none of the
        parent's fetch locks. Those it took in the per-process cache were
        copied with it: left there, they would name a live process (the
        parent) and the child would wait out their lifetime for a fetch that
        is not its own."""
        self._lock = threading.Lock()
        held, self._held = self._held, {}
        pid = os.getpid()
        for key, (value, shared, timeout) in held.items():
            if value.get("pid") == pid:  # taken here: a reset that ran late
                self._held[key] = (value, shared, timeout)
            elif not shared:
                self._local.delete_if(key, value)

    def bind_app(self, app: Any) -> None:
        """Use the Flask-Caching backend registered on ``app``."""
        self._app = app
        self._backend = None

    @property
    def is_shared(self) -> bool:
        """Whether a user-supplied (possibly shared) backend is configured."""
        return self._cache is not None

    @property
    def degraded(self) -> bool:
        """Whether the backend failed recently and the local copy is used."""
        return self._cache is not None and time.monotonic() < self._down_until

    @property
    def backend(self) -> Any:
        """The object calls go to (the local cache when none is configured).

        :raises RuntimeError: when a Flask-Caching ``Cache`` is not (yet)
            initialised for the app.
        """
        if self._cache is None:
            return self._local
        if self._backend is None:
            backend = _reading_its_writes(self._resolve())
            self._check_options(backend)
            for client in _redis_clients(backend):
                watch_redis_pool(client)  # once per pool
            self._backend = backend
        return self._backend

    def _resolve(self) -> Any:
        cache = self._cache
        if not isinstance(cache, Cache):
            return cache  # a cachelib backend given directly
        registry = getattr(self._app, "extensions", {}).get("cache", {})
        backend = registry.get(cache) if isinstance(registry, dict) else None
        if backend is not None:
            return backend
        # Outside init_app order: needs an app context or ``Cache(app)``.
        return cache.cache

    def _check_options(self, backend: Any) -> None:
        options: Any = None
        for client in _redis_clients(backend):
            options = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
            break
        if not isinstance(options, dict):
            return  # no Redis client: nothing to check
        timeout = options.get("socket_timeout")
        if finite_number(timeout) and timeout > 0:
            # a whole call: connect, send, read however slowly the reply comes
            self._call_deadline = 2 * float(timeout)
        if timeout is None and not self._checked_options:
            logger.warning(
                "The Redis cache has no socket_timeout: a Redis server that hangs will block "
                "requests. Set CACHE_OPTIONS = {'socket_timeout': 0.5, "
                "'socket_connect_timeout': 0.5}."
            )
        self._checked_options = True

    def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """One call of the backend, cut off at :attr:`_call_deadline` (a Redis
        trickling its reply is cut like an HTTP server; see
        :func:`~flask_oauth_verify.deadline.watch_redis_pool`)."""
        backend = self.backend
        with deadline(self._call_deadline):
            return getattr(backend, operation)(*args, **kwargs)

    # -- failure handling -----------------------------------------------------

    def _usable(self) -> bool:
        return self._cache is not None and time.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.last_error = f"{operation}: {type(exc).__name__}"
        with self._lock:
            was_up = self._down_until == 0.0
            self._down_until = time.monotonic() + self._retry
            # Reads that work then prove no recovery: the backend answers
            # reads and refuses writes (a read-only replica, out of memory).
            self._writes_refused = operation not in _READS
        if was_up:
            logger.warning(
                "Cache backend failed (%s: %s); falling back to per-process caching, "
                "retrying the backend every %.0f s.",
                operation,
                type(exc).__name__,
                self._retry,
            )

    def _read_worked(self) -> None:
        """A read answered: a recovery, unless what failed was a write."""
        if self._down_until and not self._writes_refused:
            self._succeeded()

    def _succeeded(self) -> None:
        if self._down_until:
            with self._lock:
                recovered = self._down_until != 0.0
                self._down_until = 0.0
            if recovered:
                self.last_error = None
                logger.warning("Cache backend recovered; sharing keys with other workers again.")

    # -- the operations ---------------------------------------------------------

    def get(self, key: str) -> Any:
        """The stored value, or ``None`` on a miss or a backend failure."""
        if not self._usable():
            return self._local.get(key)
        try:
            value = self._call("get", key)
        except Exception as exc:
            self._failed("get", exc)
            return self._local.get(key)
        self._read_worked()
        return value

    def set(self, key: str, value: Any, timeout: float) -> bool:
        """Store ``value`` for ``timeout`` seconds; ``False`` on failure.

        The value is always kept in the per-process fallback too, so a
        backend outage does not lose what this process already knows.
        """
        seconds = _seconds(timeout)
        self._local.set(key, value, timeout=seconds)
        if not self._usable():
            return self._cache is None
        try:
            stored = self._call("set", key, value, timeout=seconds)
        except Exception as exc:
            self._failed("set", exc)
            return False
        if stored is False:  # a file cache on a full or read-only disk: it stored nothing
            self._failed("set", NothingStored(key))
            return False
        self._succeeded()  # True, or None from backends that answer nothing
        return True

    def add(self, key: str, value: Any, timeout: float) -> bool:
        """Store only if absent (a lock); on failure the per-process answer."""
        return self._add(key, value, timeout)[0]

    def _add(self, key: str, value: Any, timeout: float) -> tuple[bool, bool]:
        """:meth:`add`, and whether the backend (not the local copy) answered.

        A backend ``add`` that raised may still have stored ``value``
        (cachelib's Redis ``add`` is ``SETNX`` then ``EXPIRE``: the second can
        fail or time out after the first worked), so such a value is deleted
        from the backend once it answers again (:meth:`_release_later`): left
        there, a lock would hold every other worker for its whole lifetime.
        """
        seconds = _seconds(timeout)
        if self._usable():
            try:
                added = bool(self._call("add", key, value, timeout=seconds))
            except Exception as exc:
                self._failed("add", exc)
                self._release_in_background(key, value, seconds)
            else:
                self._succeeded()
                return added, True
        return bool(self._local.add(key, value, timeout=seconds)), False

    def delete(self, key: str) -> None:
        """Remove ``key`` (errors ignored)."""
        self._local.delete(key)
        if not self._usable():
            return
        try:
            self._call("delete", key)
        except Exception as exc:
            self._failed("delete", exc)

    # -- a lock shared by every worker ------------------------------------------

    def lock(self, key: str, timeout: float) -> bool:
        """Take the lock ``key`` for at most ``timeout`` seconds (``add``).

        The lock holds the real time it was taken, so a lock whose expiry was
        lost (cachelib's ``add`` is ``SETNX`` then ``EXPIRE``; a process may
        die in between) is broken once it is older than ``timeout``.
        """
        reset_if_forked()  # a forked child forgets the parent's locks first
        value = {"at": time.time(), "pid": os.getpid(), "host": _HOST}
        # The backend keeps the value past its lifetime (``at`` + ``timeout``
        # decides), so that a waiter can still see a lock that expired under
        # a holder that died, and take it over (:meth:`take_abandoned`).
        kept = 2 * timeout + 1
        added, shared = self._add(key, value, kept)
        if not added:
            if _live_lock(self.get(key), timeout):
                return False
            self.delete(key)  # expired, its holder dead (or garbage): break it, race fairly
            added, shared = self._add(key, value, kept)
            if not added and shared and self._absent(key):
                # Released between our add and our read: race once more. Still
                # refused with nothing there, the backend stores nothing (a file
                # cache on a full or read-only disk answers False): an outage.
                added, shared = self._add(key, value, kept)
                if not added and shared and self._absent(key):
                    self._failed("add", NothingStored(key))
                    added, shared = bool(self._local.add(key, value, timeout=_seconds(kept))), False
            if not added:
                return False
        self._held[key] = (value, shared, timeout)
        return True

    def _absent(self, key: str) -> bool:
        """Whether the backend holds no ``key`` (or just failed: then the
        next call takes the per-process cache)."""
        try:
            return self._call("get", key) is None
        except Exception as exc:
            self._failed("get", exc)
            return True

    def locked(self, key: str, timeout: float) -> bool:
        """Whether the lock ``key`` is held: not older than ``timeout``, and not
        by a process of this machine that has died (killed mid-fetch)."""
        return _live_lock(self.get(key), timeout)

    def take_abandoned(self, key: str, timeout: float) -> bool:
        """Take the lock ``key`` only if its holder abandoned it, after a wait.

        A holder that finished released the lock (its outcome, success or
        failure, is then shared); one that died mid-fetch left it behind,
        expired or naming a dead process of this machine. Only then does the
        waiter take over.

        :returns: whether the lock is now ours.
        """
        held = self.get(key)
        if held is None or _live_lock(held, timeout):
            return False
        return self.lock(key, timeout)

    def unlock(self, key: str) -> None:
        """Release the lock ``key`` if it is still ours (not taken over after
        it expired), where it was taken: the backend or the per-process cache.

        A lock the backend holds that cannot be released now (the backend
        failed since it was taken) is released by a thread that tries every
        :data:`_RELEASE_RETRY` seconds until the lock's lifetime is over:
        left behind, it would make every other worker wait that whole
        lifetime (twice the request budget) for a fetch that has finished.
        """
        held = self._held.pop(key, None)
        if held is None:
            self.delete(key)
            return
        value, shared, timeout = held
        if not shared:
            self._local.delete_if(key, value)
            return
        if not (self._usable() and self._release(key, value)):
            self._release_in_background(key, value, timeout)

    def _release(self, key: str, value: dict[str, Any]) -> bool:
        """Delete the backend's lock ``key`` if it holds ``value``; whether
        the backend answered (called whatever :attr:`degraded` says)."""
        try:
            ours = self._call("get", key) == value
            if ours:
                self._call("delete", key)
        except Exception as exc:
            self._failed("unlock", exc)
            return False
        if ours:
            self._succeeded()
        else:
            self._read_worked()
        return True

    def _release_in_background(self, key: str, value: Any, lifetime: float) -> None:
        """Delete ``key`` from the backend, if it holds ``value``, once the
        backend answers again (retried for ``lifetime`` seconds)."""
        threading.Thread(
            target=self._release_later,
            args=(key, value, time.monotonic() + lifetime),
            name="oauth-verify-unlock",
            daemon=True,
        ).start()

    def _release_later(self, key: str, value: dict[str, Any], until: float) -> None:
        while time.monotonic() < until:
            time.sleep(_RELEASE_RETRY)
            if self._release(key, value):
                return

    def wait_unlocked(self, key: str, timeout: float, *, wait: float) -> bool:
        """Wait up to ``wait`` seconds for the holder of the lock ``key`` to
        finish: the lock released, or taken again (a new holder, a new fetch).

        Polls the backend (every 20 ms): the holder is another process. The
        wait ends with the fetch that was under way, not with the first
        moment nobody holds the lock: a worker under load fetching again and
        again (an issuer down) would otherwise keep the waiter for ``wait``.

        :returns: whether that holder finished in time.
        """
        deadline = time.monotonic() + wait
        held = self.get(key)
        while _live_lock(held, timeout):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
            current = self.get(key)
            if current != held:
                return True
        return True

    def ping(self) -> bool:
        """Whether the backend answers a round trip (for the health check)."""
        probe = cache_key("health", "probe")
        try:
            self._call("set", probe, 1, timeout=5)
            ok = bool(self._call("get", probe) == 1)
        except Exception as exc:
            self._failed("ping", exc)
            return False
        if ok:
            self._succeeded()
        else:
            self._failed("ping", NothingStored(probe))
        return ok


#: Operations that only read (their success proves no recovery from refused writes).
_READS = frozenset({"get"})


class NothingStored(Exception):
    """The backend answered a write without storing it."""


def _reading_its_writes(backend: Any) -> Any:
    """``backend``, or a copy of it that reads where it writes.

    cachelib's ``RedisSentinelCache`` reads from a replica, which may not
    have a write yet (replication lags; a resyncing replica has nothing):
    a lock just taken looked free, so two workers fetched at once, and the
    health probe's own value looked lost (the cache reported unreachable).
    The copy shares the app's clients and pools; the app's own cache keeps
    reading from its replicas.
    """
    read = getattr(backend, "_read_client", None)
    write = getattr(backend, "_write_client", None)
    if read is None or write is None or read is write:
        return backend
    ours = copy.copy(backend)
    ours._read_client = write
    return ours


def _redis_clients(backend: Any) -> list[Any]:
    """The redis-py clients of a cachelib ``RedisCache`` (none for others)."""
    clients = (getattr(backend, "_write_client", None), getattr(backend, "_read_client", None))
    return [client for client in clients if client is not None]


def _live_lock(held: Any, timeout: float) -> bool:
    """Whether a lock value names a holder that may still be working."""
    now = time.time()
    at = shared_time(held.get("at"), now) if isinstance(held, dict) else None
    if at is None or now - at > timeout:
        return False
    pid = held.get("pid")
    if held.get("host") != _HOST or not isinstance(pid, int) or pid == os.getpid():
        return True  # another machine's process (or ours): trust the expiry
    return _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # no process: kill() would signal a process group instead
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
