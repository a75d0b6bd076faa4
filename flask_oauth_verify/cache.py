"""The shared cache: Flask-Caching, with failures treated as misses.

Key sets, discovery metadata and (opt-in) introspection results live in the
Flask-Caching backend the application passes, so every worker and machine
sharing that backend (Redis in production) shares one copy. Without a cache
an in-process one is used.

A backend that fails (Redis stopped, slow, flushed) must never fail a
request: every error is a miss (or a failed write), logged as a warning at
most once every 30 seconds. Keys start with ``oauth_verify:`` and never hold
a token, only hashes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

from cachelib import SimpleCache

__all__ = ["SharedCache", "cache_key"]

logger = logging.getLogger("flask_oauth_verify.cache")

_WARN_INTERVAL = 30.0


def cache_key(kind: str, value: str) -> str:
    """``oauth_verify:<kind>:<sha256(value)>`` — never the value itself."""
    return f"oauth_verify:{kind}:{hashlib.sha256(value.encode()).hexdigest()}"


class SharedCache:
    """Failure-tolerant access to a Flask-Caching ``Cache`` (or an in-process one).

    :param cache: a ``flask_caching.Cache`` bound to the app, or ``None`` for
        a per-process cache.
    """

    def __init__(self, cache: Any | None) -> None:
        self._cache = cache
        self._local = SimpleCache(threshold=2000, default_timeout=0)
        self._last_warning = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def is_shared(self) -> bool:
        """Whether a user-supplied (possibly shared) backend is in use."""
        return self._cache is not None

    @property
    def backend(self) -> Any:
        """The object calls go to."""
        return self._cache if self._cache is not None else self._local

    def _failed(self, operation: str, exc: Exception) -> None:
        self.last_error = f"{operation}: {type(exc).__name__}"
        now = time.monotonic()
        with self._lock:
            if now - self._last_warning < _WARN_INTERVAL:
                return
            self._last_warning = now
        logger.warning(
            "Cache backend failed (%s: %s); falling back to per-process caching.",
            operation,
            type(exc).__name__,
        )

    def get(self, key: str) -> Any:
        """The stored value, or ``None`` on a miss or a backend failure."""
        try:
            value = self.backend.get(key)
        except Exception as exc:  # noqa: BLE001 - any backend failure is a miss
            self._failed("get", exc)
            return self._local.get(key)
        if value is None and self._cache is not None:
            return None
        return value

    def set(self, key: str, value: Any, timeout: float) -> bool:
        """Store ``value`` for ``timeout`` seconds; ``False`` on failure.

        The value is always kept in the per-process fallback too, so a
        backend outage does not lose what this process already knows.
        """
        seconds = max(1, int(timeout))
        if self._cache is not None:
            self._local.set(key, value, timeout=seconds)
        try:
            return bool(self.backend.set(key, value, timeout=seconds))
        except Exception as exc:  # noqa: BLE001
            self._failed("set", exc)
            return False

    def add(self, key: str, value: Any, timeout: float) -> bool:
        """Store only if absent (a lock); on failure ``True`` (act alone)."""
        try:
            return bool(self.backend.add(key, value, timeout=max(1, int(timeout))))
        except Exception as exc:  # noqa: BLE001
            self._failed("add", exc)
            return bool(self._local.add(key, value, timeout=max(1, int(timeout))))

    def delete(self, key: str) -> None:
        """Remove ``key`` (errors ignored)."""
        self._local.delete(key)
        try:
            self.backend.delete(key)
        except Exception as exc:  # noqa: BLE001
            self._failed("delete", exc)

    def ping(self) -> bool:
        """Whether the backend answers a round trip (for the health check)."""
        probe = cache_key("health", "probe")
        try:
            self.backend.set(probe, 1, timeout=5)
            return bool(self.backend.get(probe) == 1)
        except Exception as exc:  # noqa: BLE001
            self._failed("ping", exc)
            return False
