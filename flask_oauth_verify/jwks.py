"""The key store: fetch, share, cache and refresh each issuer's JWK Set.

Policy (see the operations guide in the docs):

* **Where keys come from**: ``OAUTH_VERIFY_JWKS`` (static, offline), else
  ``OAUTH_VERIFY_JWKS_URI``, else the issuer's discovery metadata. Keys are
  namespaced per issuer: a key of issuer A never verifies a token of B.
* **Shared copy**: the raw key set and its metadata (fetched-at, max-age,
  ETag) live in the shared cache, so N workers (or N machines on one Redis)
  share one copy; each process keeps only the parsed keys, keyed by the
  set's content hash, so a set is parsed once per process.
* **Soft TTL**: ``JWKS_CACHE_TTL`` (or the response's ``Cache-Control:
  max-age`` clamped to ``[JWKS_MIN_TTL, JWKS_MAX_TTL]``) minus a small random
  jitter. After it, one thread refreshes (guarded across workers by an
  ``add`` lock in the shared cache) while the others keep serving the keys
  they have.
* **Last known good**: a failed fetch never wipes keys; they are served until
  ``JWKS_MAX_STALENESS`` (24 h). Errors are never cached. A key missing from
  a successful fetch is no longer trusted.
* **Unknown kid**: one forced refresh, single-flight, at most one per
  ``JWKS_REFRESH_COOLDOWN`` per issuer across all workers; inside the
  cooldown the token is refused at once, without any network call.
* **Cold start with the issuer down**: :class:`UpstreamError` (503).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .cache import SharedCache, cache_key
from .config import Settings
from .discovery import Discovery
from .errors import InvalidTokenError, UpstreamError
from .fetch import FetchError, Fetcher
from .keys import KeySetError, PreparedKey, PreparedKeySet, content_hash, parse_key_set
from .verification import JWSHeader

__all__ = ["KeySetStatus", "KeyStore"]

logger = logging.getLogger("flask_oauth_verify.keys")

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_JITTER = 0.1
_PARSED_CACHE_SIZE = 64
_LOCK_TIMEOUT = 10.0
_MAX_DYNAMIC_SOURCES = 64

#: Listener signature: (event name, fields). Set by the extension.
EventSink = Callable[[str, Mapping[str, Any]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class KeySetStatus:
    """What the store knows about one issuer's keys (health check, CLI)."""

    issuer: str
    source: str | None
    kids: tuple[str, ...]
    age: float | None
    fresh: bool
    last_error: str | None
    skipped: tuple[str, ...]


@dataclasses.dataclass
class _Source:
    """The keys of one issuer (or of one allowlisted ``jku`` of an issuer)."""

    issuer: str
    jku: str | None = None
    keys: PreparedKeySet | None = None
    fetched_at: float = 0.0
    fresh_until: float = 0.0
    etag: str | None = None
    uri: str | None = None
    last_forced: float = float("-inf")
    last_error: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.issuer if self.jku is None else f"{self.issuer} jku={self.jku}"


def _max_age(headers: Mapping[str, str]) -> float | None:
    value = {k.lower(): v for k, v in headers.items()}.get("cache-control")
    if not value:
        return None
    if "no-store" in value.lower() or "no-cache" in value.lower():
        return 0.0
    match = _MAX_AGE.search(value)
    return float(match.group(1)) if match else None


class KeyStore:
    """Keys for every configured issuer; implements :class:`KeyResolver`.

    :param settings: the app's settings.
    :param cache: the shared cache.
    :param fetcher: the app's fetch policy.
    :param discovery: metadata discovery, for issuers without a JWKS URI.
    :param clock: wall-clock seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        settings: Settings,
        cache: SharedCache,
        fetcher: Fetcher,
        discovery: Discovery,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.discovery = discovery
        self.clock = clock
        self.on_event: EventSink | None = None
        self.on_keys_changed: Callable[[], None] | None = None
        self._sources: dict[tuple[str, str | None], _Source] = {}
        self._guard = threading.Lock()
        self._parsed: dict[str, PreparedKeySet] = {}
        self._static: PreparedKeySet | None = None
        if settings.static_jwks is not None:
            self._static = parse_key_set(settings.static_jwks, settings.algorithms)
        self._jku_hosts = frozenset(h.lower() for h in settings.allowed_jku_hosts)
        for issuer in settings.issuers:
            self._source(issuer, None)

    # -- the hot path -------------------------------------------------------

    def resolve(self, issuer: str, header: JWSHeader) -> PreparedKey:
        """The key of ``issuer`` named by ``header`` (see the module policy).

        :raises InvalidTokenError: no such key (after at most one refresh).
        :raises UpstreamError: no keys can be had for the issuer at all.
        """
        if self._static is not None:
            return self._from_set(self._static, header, "static key set")
        source = self._source(issuer, self._jku(header))
        keys = source.keys
        if keys is None or self.clock() >= source.fresh_until:
            keys = self._current(source)
        key = keys.get(header.kid)
        if key is not None:
            return key
        if header.kid is None:
            raise InvalidTokenError(reason="token has no kid and the key set has several keys")
        keys = self._forced_refresh(source, keys)
        return self._from_set(keys, header, f"key set of {source.name}")

    @staticmethod
    def _from_set(keys: PreparedKeySet, header: JWSHeader, where: str) -> PreparedKey:
        key = keys.get(header.kid)
        if key is None:
            kid = (header.kid or "")[:64]
            raise InvalidTokenError(reason=f"kid {kid!r} is not in the {where}")
        return key

    def _jku(self, header: JWSHeader) -> str | None:
        """The allowlisted ``jku`` to take keys from, for profiles that use it.

        Only when ``ALLOWED_JKU_HOSTS`` is set (Beyond Identity); the host
        must match exactly and the URL must be https. Otherwise ``jku`` is
        ignored like every other key-carrying header.
        """
        if not self._jku_hosts:
            return None
        jku = header.raw.get("jku")
        if not isinstance(jku, str):
            raise InvalidTokenError(reason="jku is required by this profile")
        parts = urlsplit(jku)
        if parts.scheme != "https" or (parts.hostname or "").lower() not in self._jku_hosts:
            raise InvalidTokenError(reason="jku host is not allowlisted")
        if parts.port not in (None, 443) or parts.username or parts.password:
            raise InvalidTokenError(reason="jku host is not allowlisted")
        return jku

    def _source(self, issuer: str, jku: str | None) -> _Source:
        source = self._sources.get((issuer, jku))
        if source is not None:
            return source
        with self._guard:
            source = self._sources.get((issuer, jku))
            if source is None:
                if jku is not None and len(self._sources) > _MAX_DYNAMIC_SOURCES:
                    raise InvalidTokenError(reason="too many distinct jku URLs")
                source = _Source(issuer=issuer, jku=jku)
                self._sources[(issuer, jku)] = source
            return source

    # -- refresh ------------------------------------------------------------

    def _current(self, source: _Source) -> PreparedKeySet:
        """Keys after the soft TTL: adopt a newer shared copy, or refresh once."""
        now = self.clock()
        if self._adopt_shared(source, now, fresh_only=True):
            assert source.keys is not None
            return source.keys
        if source.lock.acquire(blocking=False):
            try:
                return self._refresh(source, forced=False)
            finally:
                source.lock.release()
        # Another thread is refreshing: serve what we have while it does.
        if source.keys is not None and self._usable(source, now):
            return source.keys
        with source.lock:  # cold start: wait for that one fetch
            if source.keys is not None and self._usable(source, self.clock()):
                return source.keys
            return self._refresh(source, forced=False)

    def _usable(self, source: _Source, now: float) -> bool:
        return now - source.fetched_at <= self.settings.jwks_max_staleness

    def _forced_refresh(self, source: _Source, seen: PreparedKeySet) -> PreparedKeySet:
        """One refresh for an unknown kid, rate limited per issuer."""
        started = self.clock()
        if started - source.last_forced < self.settings.jwks_refresh_cooldown:
            return seen
        with source.lock:
            if source.keys is not seen and source.keys is not None:
                return source.keys  # someone refreshed while we waited
            now = self.clock()
            if now - source.last_forced < self.settings.jwks_refresh_cooldown:
                return source.keys or seen
            source.last_forced = now
            # A newer copy fetched by another worker may already have the key.
            if self._adopt_shared(source, now, fresh_only=False, newer_only=True):
                assert source.keys is not None
                return source.keys
            cooldown_key = cache_key("jwks-forced", source.name)
            if not self.cache.add(cooldown_key, now, self.settings.jwks_refresh_cooldown or 1):
                return source.keys or seen  # another worker forced one recently
            try:
                return self._refresh(source, forced=True)
            except UpstreamError:
                return source.keys or seen

    def _adopt_shared(
        self, source: _Source, now: float, *, fresh_only: bool, newer_only: bool = False
    ) -> bool:
        record = self.cache.get(self._record_key(source))
        if not isinstance(record, dict):
            return False
        fetched_at = record.get("fetched_at", 0.0)
        ttl = record.get("ttl", self.settings.jwks_cache_ttl)
        if fresh_only and now - fetched_at >= ttl:
            return False
        if newer_only and fetched_at <= source.fetched_at:
            return False
        if now - fetched_at > self.settings.jwks_max_staleness:
            return False
        try:
            keys = self._parse(record["jwks"])
        except (KeySetError, KeyError):
            return False
        self._install(source, keys, record, now)
        return True

    def _record_key(self, source: _Source) -> str:
        return cache_key("jwks", source.name)

    def _parse(self, jwks: Any) -> PreparedKeySet:
        digest = content_hash(jwks)
        parsed = self._parsed.get(digest)
        if parsed is None:
            parsed = parse_key_set(jwks, self.settings.algorithms)
            if len(self._parsed) >= _PARSED_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[digest] = parsed
        return parsed

    def _install(
        self, source: _Source, keys: PreparedKeySet, record: Mapping[str, Any], now: float
    ) -> None:
        changed = source.keys is not None and source.keys.content_hash != keys.content_hash
        ttl = float(record.get("ttl", self.settings.jwks_cache_ttl))
        fetched_at = float(record.get("fetched_at", now))
        source.keys = keys
        source.fetched_at = fetched_at
        source.etag = record.get("etag")
        source.uri = record.get("uri")
        source.fresh_until = fetched_at + ttl * (1 - random.uniform(0, _JITTER))  # noqa: S311
        if changed and self.on_keys_changed is not None:
            self.on_keys_changed()

    def _uri(self, source: _Source) -> str:
        if source.jku is not None:
            return source.jku
        configured = self.settings.jwks_uri_for(source.issuer)
        if configured is not None:
            return configured
        uri = self.discovery.endpoint(source.issuer, "jwks_uri")
        if uri is None:
            raise FetchError("the issuer's metadata has no jwks_uri")
        return uri

    def _refresh(self, source: _Source, *, forced: bool) -> PreparedKeySet:
        """Fetch now (caller holds ``source.lock``); keep last good on failure."""
        now = self.clock()
        lock_key = cache_key("jwks-lock", source.name)
        if not forced and source.keys is not None and not self.cache.add(lock_key, now, _LOCK_TIMEOUT):
            # Another worker is fetching; serve ours until its copy lands.
            source.fresh_until = now + 1.0
            return source.keys
        try:
            record = self._fetch(source, now)
            keys = self._parse(record["jwks"])
        except (FetchError, KeySetError) as exc:
            return self._refresh_failed(source, now, str(exc))
        finally:
            if not forced:
                self.cache.delete(lock_key)
        self.cache.set(
            self._record_key(source), record, self.settings.jwks_max_staleness + record["ttl"]
        )
        self._install(source, keys, record, now)
        source.last_error = None
        self._emit("keys_refreshed", issuer=source.issuer, kids=list(keys.kids), forced=forced)
        return keys

    def _fetch(self, source: _Source, now: float) -> dict[str, Any]:
        uri = self._uri(source)
        headers = {"Accept": "application/json"}
        if source.etag and source.keys is not None and source.uri == uri:
            headers["If-None-Match"] = source.etag
        result = self.fetcher.get_json(uri, headers=headers)
        max_age = _max_age(result.headers)
        ttl = self.settings.jwks_cache_ttl if max_age is None else max_age
        ttl = min(max(ttl, self.settings.jwks_min_ttl, 1.0), self.settings.jwks_max_ttl)
        if result.status == 304 and source.keys is not None:
            record = self.cache.get(self._record_key(source))
            jwks: Any = record.get("jwks") if isinstance(record, dict) else None
            if jwks is None:
                raise FetchError("304 Not Modified but no cached key set")
        else:
            jwks = result.data
        etag = {k.lower(): v for k, v in result.headers.items()}.get("etag")
        return {"jwks": jwks, "fetched_at": now, "ttl": ttl, "etag": etag, "uri": uri}

    def _refresh_failed(self, source: _Source, now: float, reason: str) -> PreparedKeySet:
        source.last_error = reason
        self._emit("keys_refresh_failed", issuer=source.issuer, reason=reason)
        if source.keys is None:
            self._adopt_shared(source, now, fresh_only=False)
        if source.keys is not None and self._usable(source, now):
            # Retry after the cooldown, not on every request.
            source.fresh_until = now + max(self.settings.jwks_refresh_cooldown, 1.0)
            self._emit("stale_keys_served", issuer=source.issuer, age=now - source.fetched_at)
            logger.warning("Refreshing keys of %s failed (%s); serving the last good keys.", source.name, reason)
            return source.keys
        source.keys = None
        logger.error("No keys for %s: %s", source.name, reason)
        raise UpstreamError(
            reason=f"keys of {source.name} unavailable: {reason}",
            retry_after=self.fetcher.breaker(self._safe_uri(source)).retry_after(),
        )

    def _safe_uri(self, source: _Source) -> str:
        try:
            return self._uri(source)
        except FetchError:
            return source.issuer

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(event, fields)

    # -- operations API -----------------------------------------------------

    def refresh(self, issuer: str | None = None) -> None:
        """Fetch the key set of ``issuer`` (every configured issuer if None) now.

        :raises UpstreamError: when an issuer has no keys afterwards.
        """
        for name in [issuer] if issuer else list(self.settings.issuers):
            source = self._source(name, None)
            with source.lock:
                self._refresh(source, forced=True)

    def prefetch(self) -> dict[str, str | None]:
        """Warm every configured issuer's keys; never raises.

        :returns: issuer -> error text (``None`` when the keys are loaded).
        """
        outcome: dict[str, str | None] = {}
        if self._static is not None:
            return {issuer: None for issuer in self.settings.issuers}
        for issuer in self.settings.issuers:
            try:
                source = self._source(issuer, None)
                self._current(source)
                outcome[issuer] = None
            except UpstreamError as exc:
                outcome[issuer] = exc.reason
        return outcome

    def status(self) -> list[KeySetStatus]:
        """What is known about every key source, without any network call."""
        now = self.clock()
        if self._static is not None:
            return [
                KeySetStatus(issuer, "static", self._static.kids, None, True, None, self._static.skipped)
                for issuer in self.settings.issuers
            ]
        result = []
        for source in list(self._sources.values()):
            keys = source.keys
            if keys is None:
                self._adopt_shared(source, now, fresh_only=False)
                keys = source.keys
            result.append(
                KeySetStatus(
                    issuer=source.issuer,
                    source=source.uri or source.jku,
                    kids=keys.kids if keys else (),
                    age=(now - source.fetched_at) if keys else None,
                    fresh=keys is not None and now < source.fresh_until,
                    last_error=source.last_error,
                    skipped=keys.skipped if keys else (),
                )
            )
        return result

    def key_set(self, issuer: str) -> PreparedKeySet:
        """The current key set of ``issuer`` (refreshing when due).

        :raises UpstreamError: when none can be had.
        """
        if self._static is not None:
            return self._static
        source = self._source(issuer, None)
        if source.keys is not None and self.clock() < source.fresh_until:
            return source.keys
        return self._current(source)
