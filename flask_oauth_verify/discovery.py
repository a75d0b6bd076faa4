"""Authorization-server metadata discovery (OpenID Connect Discovery, RFC 8414).

With no ``OAUTH_VERIFY_JWKS_URI`` the key set's URL comes from the issuer's
metadata. The documents tried, in order, for issuer ``https://h/p``:

1. ``https://h/p/.well-known/openid-configuration`` (OpenID Connect, appended);
2. ``https://h/.well-known/oauth-authorization-server/p`` (RFC 8414 §3,
   inserted);
3. ``https://h/.well-known/openid-configuration/p`` (RFC 8414 §5, the
   inserted form of the OpenID Connect name).

The metadata's ``issuer`` must equal the configured issuer exactly
(RFC 8414 §3.3, the mix-up defence); a document that names another issuer is
refused. Metadata is cached in the shared cache (``DISCOVERY_CACHE_TTL``,
six hours by default); a failed refresh keeps the last good copy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .cache import SharedCache, cache_key
from .config import ConfigurationError, Settings, check_url
from .fetch import FetchError, Fetcher

__all__ = ["Discovery", "metadata_urls"]

logger = logging.getLogger("flask_oauth_verify.discovery")


def metadata_urls(issuer: str) -> list[str]:
    """The metadata URLs tried for ``issuer``, in order."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    appended = urlunsplit(
        (parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", "")
    )
    inserted = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    urls = [appended, inserted]
    if path:
        urls.append(
            urlunsplit(
                (parts.scheme, parts.netloc, "/.well-known/openid-configuration" + path, "", "")
            )
        )
    return urls


@dataclasses.dataclass
class _Cached:
    metadata: Mapping[str, Any]
    fetched_at: float


class Discovery:
    """Finds and caches each issuer's metadata.

    :param settings: the app's settings.
    :param cache: the shared cache.
    :param fetcher: the app's fetch policy.
    :param clock: wall-clock seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        settings: Settings,
        cache: SharedCache,
        fetcher: Fetcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.clock = clock
        self._local: dict[str, _Cached] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.last_error: dict[str, str] = {}

    def _lock(self, issuer: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(issuer, threading.Lock())

    def metadata(self, issuer: str) -> Mapping[str, Any]:
        """The metadata of ``issuer`` (cached; refreshed after the TTL).

        :raises FetchError: when no metadata was ever obtained and the
            issuer's documents cannot be fetched now.
        """
        now = self.clock()
        ttl = self.settings.discovery_cache_ttl
        local = self._local.get(issuer)
        if local is not None and now - local.fetched_at < ttl:
            return local.metadata
        with self._lock(issuer):
            local = self._local.get(issuer)
            if local is not None and now - local.fetched_at < ttl:
                return local.metadata
            shared = self.cache.get(cache_key("discovery", issuer))
            if isinstance(shared, dict) and now - shared.get("fetched_at", 0) < ttl:
                cached = _Cached(shared["metadata"], shared["fetched_at"])
                self._local[issuer] = cached
                return cached.metadata
            try:
                metadata = self._fetch(issuer)
            except FetchError as exc:
                self.last_error[issuer] = exc.reason
                stale = local or (
                    _Cached(shared["metadata"], shared["fetched_at"])
                    if isinstance(shared, dict)
                    else None
                )
                if stale is not None and now - stale.fetched_at < self.settings.jwks_max_staleness:
                    logger.warning("Discovery for %s failed (%s); using the last metadata.", issuer, exc.reason)
                    return stale.metadata
                raise
            self.last_error.pop(issuer, None)
            record = {"metadata": metadata, "fetched_at": now}
            self.cache.set(cache_key("discovery", issuer), record, self.settings.jwks_max_staleness)
            self._local[issuer] = _Cached(metadata, now)
            return metadata

    def _fetch(self, issuer: str) -> Mapping[str, Any]:
        errors = []
        for url in metadata_urls(issuer):
            try:
                result = self.fetcher.get_json(url)
            except FetchError as exc:
                errors.append(f"{url}: {exc.reason}")
                continue
            data = result.data
            if not isinstance(data, dict):
                errors.append(f"{url}: not a JSON object")
                continue
            if data.get("issuer") != issuer:
                # RFC 8414 §3.3: the issuer must be identical; anything else
                # is an attempted mix-up (or a misconfiguration).
                errors.append(f"{url}: metadata names another issuer")
                continue
            return data
        raise FetchError("discovery failed: " + "; ".join(errors))

    def endpoint(self, issuer: str, name: str) -> str | None:
        """A URL from the metadata (``jwks_uri``, ``introspection_endpoint``).

        :raises FetchError: when the metadata cannot be had or the URL is
            not acceptable under the fetch policy.
        """
        value = self.metadata(issuer).get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise FetchError(f"metadata member {name} is not a string")
        try:
            return check_url(value, name.upper(), allow_insecure_http=self.settings.allow_insecure_http)
        except ConfigurationError as exc:
            raise FetchError(str(exc)) from None
