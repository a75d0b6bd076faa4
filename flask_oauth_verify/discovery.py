"""Authorization-server metadata discovery (OpenID Connect Discovery, RFC 8414).

With no ``OAUTH_VERIFY_JWKS_URI`` the key set's URL comes from the issuer's
metadata (and, with no ``OAUTH_VERIFY_INTROSPECTION_ENDPOINT``, the
introspection endpoint too). The documents tried, in order, for issuer
``https://h/p``:

1. ``https://h/p/.well-known/openid-configuration`` (OpenID Connect
   Discovery 1.0 §4, appended);
2. ``https://h/.well-known/oauth-authorization-server/p`` (RFC 8414 §3.1,
   inserted);
3. ``https://h/.well-known/openid-configuration/p`` (RFC 8414 §5, the
   inserted form of the OpenID Connect name);
4. ``https://h/p/.well-known/oauth-authorization-server`` (the RFC 8414 name
   appended, as servers that publish it under their issuer path do: Okta's
   custom authorization servers, django-oauth-toolkit).

For an issuer without a path, (1) and (2) are tried. The next document is
tried only when one is missing or unusable (4xx, not JSON, another issuer);
a network failure, timeout or 5xx ends the attempt at once, so a down issuer
costs one request's budget, not one per document.

The metadata's ``issuer`` must equal the configured issuer exactly
(RFC 8414 §3.3, OpenID Connect Discovery §4.3: the mix-up defence); a
document that names another issuer is refused.

Metadata is cached like keys: in the shared cache, so every worker uses one
copy; for ``DISCOVERY_CACHE_TTL`` (six hours, minus a small random jitter);
after that one thread of one worker refreshes while everyone keeps using the
copy they have; a failed refresh keeps the last good copy (for at most
``JWKS_MAX_STALENESS``) and is retried after ``JWKS_REFRESH_COOLDOWN``;
errors are never cached. With no copy at all, a caller with no pacing of its
own (the introspection endpoint's search, ``paced=True``) is refused for a
second after the issuer answered with no metadata (404, not JSON, another
issuer), in every worker, without a request: a flood of opaque tokens is
not a flood of metadata requests.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .cache import SharedCache, cache_key, shared_time
from .config import ConfigurationError, Settings, check_url
from .fetch import Fetcher, FetchError, SingleFlight

__all__ = ["Discovery", "metadata_urls"]

logger = logging.getLogger("flask_oauth_verify.discovery")

_JITTER = 0.1
#: Metadata URLs remembered as accepted by the fetch policy (a few per issuer).
_ACCEPTED_URLS = 64
_RECHECK = 1.0
#: Seconds the shared record of an answered failure is kept (whole seconds:
#: Redis): about the pacing interval, whatever the clocks of the workers.
_ATTEMPT_KEEP = math.ceil(_RECHECK)


def metadata_urls(issuer: str) -> list[str]:
    """The metadata URLs tried for ``issuer``, in order.

    :param issuer: the configured issuer identifier.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    appended = urlunsplit(
        (parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", "")
    )
    inserted = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    urls = [appended, inserted]
    if path:  # else the inserted and appended forms are the same URLs
        urls.append(
            urlunsplit(
                (parts.scheme, parts.netloc, "/.well-known/openid-configuration" + path, "", "")
            )
        )
        appended_rfc8414 = path + "/.well-known/oauth-authorization-server"
        urls.append(urlunsplit((parts.scheme, parts.netloc, appended_rfc8414, "", "")))
    return urls


def _attempt_key(issuer: str) -> str:
    """The shared record of an answered failure of ``issuer`` (pacing)."""
    return cache_key("discovery-attempt", issuer)


def _try_next(exc: FetchError) -> bool:
    """Whether a failed document leaves the others worth trying."""
    if exc.status is not None and 400 <= exc.status < 500:
        return True  # not published here (404) or refused: try the next name
    return exc.reason.startswith("the response is not JSON")


@dataclasses.dataclass
class _Entry:
    metadata: Mapping[str, Any]
    fetched_at: float
    fresh_until: float


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
        self._local: dict[str, _Entry] = {}
        self._accepted_urls: set[str] = set()
        #: runs by (issuer, whether the caller has a whole budget)
        self._flights: SingleFlight[Mapping[str, Any]] = SingleFlight()
        self._lock_timeout = 2 * fetcher.budget + 2
        #: issuer -> the last discovery error of this process (for status).
        self.last_error: dict[str, str] = {}
        #: issuer -> (when, error) of this process's last discovery that the
        #: issuer answered with no metadata while none was at hand (pacing).
        self._answered: dict[str, tuple[float, FetchError]] = {}
        #: issuer -> (the time in another worker's record, when this process
        #: first read it): a record from our future paces from that reading.
        self._future: dict[str, tuple[float, float]] = {}

    def metadata(
        self, issuer: str, *, budget: float | None = None, paced: bool = False
    ) -> Mapping[str, Any]:
        """The metadata of ``issuer`` (cached; refreshed after the TTL).

        :param issuer: a configured issuer identifier.
        :param budget: the most a fetch may take, seconds, when less than the
            fetch policy's budget (what is left of a budget several issuers
            share); nothing left: no fetch, a :class:`FetchError`.
        :param paced: with no usable copy, refuse without a request for
            :data:`_RECHECK` seconds after the issuer answered with no
            metadata (here or in another worker), with that answer's error.
            For callers that do not pace their retries themselves (the key
            store does).
        :raises FetchError: when no metadata was ever obtained and the
            issuer's documents cannot be fetched now.
        """
        entry = self._local.get(issuer)
        now = self.clock()
        if entry is not None and now < entry.fresh_until:
            return entry.metadata
        flight = (issuer, budget is None)
        if entry is not None and self._usable(entry, now) and self._flights.running(flight):
            return entry.metadata  # one refresh is under way: keep using ours
        if "{" in issuer:
            raise FetchError("a templated issuer has no discovery document; set JWKS_URI")
        if paced and (entry is None or not self._usable(entry, now)):
            self._raise_if_answered(issuer, now, local_only=True)
        wait = self._lock_timeout if budget is None else max(min(budget, self._lock_timeout), 0)
        try:
            # A caller with a whole budget never joins a run started with what
            # was left of a shared one: cut short, its failure is not theirs.
            return self._flights.run(
                flight, lambda: self._refresh(issuer, budget, paced), timeout=wait
            )
        except TimeoutError:
            raise FetchError("timed out waiting for discovery") from None

    def endpoint(
        self,
        issuer: str,
        name: str,
        *,
        required: bool = True,
        budget: float | None = None,
        paced: bool = False,
    ) -> str | None:
        """A URL from the metadata (``jwks_uri``, ``introspection_endpoint``).

        :param issuer: a configured issuer identifier.
        :param name: the metadata member.
        :param required: the caller cannot do without it: metadata lacking it
            is fetched again soon. ``False`` for a member an issuer may well
            not publish (the introspection endpoint, looked for issuer by
            issuer).
        :param budget: see :meth:`metadata`.
        :param paced: see :meth:`metadata`.
        :returns: the URL, or ``None`` when the metadata has no such member.
        :raises FetchError: when the metadata cannot be had or the URL is
            not acceptable under the fetch policy (https, or http to a
            loopback host).
        """
        value = self.metadata(issuer, budget=budget, paced=paced).get(name)
        if value is None:
            if required:
                self._recheck_soon(issuer)
            return None
        if not isinstance(value, str):
            self._recheck_soon(issuer)
            raise FetchError(f"metadata member {name} is not a string")
        if value in self._accepted_urls:
            return value  # the verdict depends on the URL and fixed settings only
        try:
            check_url(
                value,
                name.upper(),
                allow_insecure_http=self.settings.allow_insecure_http,
                label=f"The discovered {name}",
            )
        except ConfigurationError as exc:
            self._recheck_soon(issuer)
            raise FetchError(str(exc)) from None
        if len(self._accepted_urls) < _ACCEPTED_URLS:
            self._accepted_urls.add(value)
        return value

    def known(self, issuer: str, name: str) -> str | None:
        """The string ``name`` of the metadata at hand in this process, if
        any, without any network call (for naming a circuit breaker, never
        for fetching: the URL is not checked against the fetch policy).
        """
        entry = self._local.get(issuer)
        value = entry.metadata.get(name) if entry is not None else None
        return value if isinstance(value, str) else None

    def refresh(self, issuer: str) -> Mapping[str, Any]:
        """Fetch the metadata of ``issuer`` now (operations: a forced refresh).

        :raises FetchError: when it cannot be fetched (the last good copy
            is kept).
        """
        now = self.clock()
        metadata = self._fetch(issuer)
        self._store(issuer, metadata, now)
        return metadata

    # -- internals ----------------------------------------------------------------

    def _recheck_soon(self, issuer: str) -> None:
        """The metadata lacks a member we need, or names an unusable URL: fetch it again soon.

        Not after ``DISCOVERY_CACHE_TTL`` (hours): an issuer that fixes its
        metadata is picked up at the next refresh, paced like a failed one
        (``JWKS_REFRESH_COOLDOWN``), also when the copy came from another
        worker.
        """
        entry = self._local.get(issuer)
        if entry is not None:
            retry = max(self.settings.jwks_refresh_cooldown, _RECHECK)
            entry.fresh_until = min(entry.fresh_until, self.clock() + retry)

    def _raise_if_answered(self, issuer: str, now: float, *, local_only: bool = False) -> None:
        """Raise the error of an answered failure within :data:`_RECHECK`
        (this process's, else, unless ``local_only``, any worker's)."""
        failures = [self._answered.get(issuer)]
        if not local_only:
            record = self.cache.get(_attempt_key(issuer))
            if isinstance(record, dict):
                at = self._attempt_time(issuer, record.get("at"), now)
                error, status = record.get("error"), record.get("status")
                if (
                    at is not None
                    and isinstance(error, str)
                    and isinstance(status, int)
                    and not isinstance(status, bool)
                ):
                    failures.append((at, FetchError(error, status=status)))
        for failure in failures:
            if failure is None:
                continue
            at, exc = failure
            # a clock stepped back before the failure ends the wait, never stretches it
            if 0 <= now - at < _RECHECK and exc.answered:
                raise FetchError(exc.reason, status=exc.status)

    def _attempt_time(self, issuer: str, value: Any, now: float) -> float | None:
        """When another worker's answered failure counts as having happened.

        A time in our future (its clock ahead of ours, up to
        :data:`~flask_oauth_verify.cache.CLOCK_SKEW`) counts as the moment
        this process first read it, at every later reading too: clamped to
        ``now`` at each, it would pace for as long as a backend keeps the
        record (one whose expiry follows the writer's clock: the skew).
        """
        at = shared_time(value, now)
        if at is None or value <= now:
            return at
        seen = self._future.get(issuer)
        if seen is None or seen[0] != value:
            seen = self._future[issuer] = (float(value), now)
        return seen[1]

    def _usable(self, entry: _Entry, now: float) -> bool:
        return now - entry.fetched_at <= self.settings.jwks_max_staleness

    def _install(self, issuer: str, metadata: Mapping[str, Any], fetched_at: float) -> _Entry:
        ttl = self.settings.discovery_cache_ttl
        jitter = random.uniform(0, _JITTER)  # noqa: S311 - spreading refreshes, not security
        entry = _Entry(metadata, fetched_at, fetched_at + ttl * (1 - jitter))
        self._local[issuer] = entry
        return entry

    def _adopt_shared(self, issuer: str, now: float) -> _Entry | None:
        """Adopt a newer copy another worker stored; return the local entry."""
        entry = self._local.get(issuer)
        shared = self.cache.get(cache_key("discovery", issuer))
        if not isinstance(shared, dict):
            return entry
        fetched_at = shared_time(shared.get("fetched_at"), now)
        metadata = shared.get("metadata")
        if fetched_at is None or not isinstance(metadata, dict):
            return entry
        if metadata.get("issuer") != issuer or now - fetched_at > self.settings.jwks_max_staleness:
            return entry
        if entry is None or fetched_at > entry.fetched_at:
            entry = self._install(issuer, metadata, fetched_at)
        return entry

    def _store(self, issuer: str, metadata: Mapping[str, Any], now: float) -> None:
        self.last_error.pop(issuer, None)
        # The pacing of an answered failure ends with the first success, in
        # every worker (one delete per fetched document: hours apart).
        self._answered.pop(issuer, None)
        self._future.pop(issuer, None)
        self.cache.delete(_attempt_key(issuer))
        keep = max(self.settings.discovery_cache_ttl, self.settings.jwks_max_staleness)
        record = {"metadata": dict(metadata), "fetched_at": now}
        self.cache.set(cache_key("discovery", issuer), record, keep)
        self._install(issuer, metadata, now)

    def _refresh(self, issuer: str, budget: float | None, paced: bool) -> Mapping[str, Any]:
        """Refresh once (this thread leads the process's single flight)."""
        started = time.monotonic()
        now = self.clock()
        entry = self._adopt_shared(issuer, now)
        if entry is not None and now < entry.fresh_until:
            return entry.metadata
        if paced and (entry is None or not self._usable(entry, now)):
            self._raise_if_answered(issuer, now)
        lock = cache_key("discovery-lock", issuer)
        if not self.cache.lock(lock, self._lock_timeout):
            # Another worker is fetching: use ours, or wait for its copy.
            if entry is not None and self._usable(entry, now):
                entry.fresh_until = now + _RECHECK
                return entry.metadata
            wait = self._lock_timeout if budget is None else max(min(budget, self._lock_timeout), 0)
            self.cache.wait_unlocked(lock, self._lock_timeout, wait=wait)
            entry = self._adopt_shared(issuer, self.clock())
            if entry is not None:
                return entry.metadata
            if not self.cache.take_abandoned(lock, self._lock_timeout):
                # Its failure, as it failed: an answer is no outage.
                self._raise_if_answered(issuer, self.clock())
                # No answer: the holder may have had only what was left of a
                # shared budget. A caller with a whole budget tries itself.
                if budget is not None or not self.cache.lock(lock, self._lock_timeout):
                    raise FetchError(
                        self.last_error.get(issuer, "discovery by another worker failed")
                    )
            # The holder died mid-fetch (its lock outlived it), or failed
            # without an answer: fetch ourselves.
            now = self.clock()
        try:
            entry = self._adopt_shared(issuer, now)
            if entry is not None and now < entry.fresh_until:
                return entry.metadata
            left = None if budget is None else budget - (time.monotonic() - started)
            try:
                metadata = self._fetch(issuer, left)
            except FetchError as exc:
                return self._failed(issuer, entry, now, exc)
            self._store(issuer, metadata, now)
            return metadata
        finally:
            self.cache.unlock(lock)

    def _failed(
        self, issuer: str, entry: _Entry | None, now: float, exc: FetchError
    ) -> Mapping[str, Any]:
        self.last_error[issuer] = exc.reason
        if entry is not None and self._usable(entry, now):
            retry = max(self.settings.jwks_refresh_cooldown, _RECHECK)
            entry.fresh_until = min(
                now + retry, entry.fetched_at + self.settings.jwks_max_staleness
            )
            logger.warning(
                "Discovery for %s failed (%s); using the last good metadata.", issuer, exc.reason
            )
            return entry.metadata
        self._local.pop(issuer, None)
        if exc.answered:
            # No metadata published (or not usable): remembered, here and for
            # the other workers, so that paced callers ask again in a second,
            # not at every request (an answer never opens the circuit). The
            # second runs from the answer, not from the start of the round: a
            # slow answer must not leave the next request a window already
            # over (the issuer asked again at once, the next issuers never).
            answered_at = self.clock()
            self._answered[issuer] = (answered_at, exc)
            record = {"at": answered_at, "error": exc.reason, "status": exc.status}
            # Kept no longer than the interval, so that a worker whose clock
            # is ahead (its "at" in the readers' future) paces them no longer.
            self.cache.set(_attempt_key(issuer), record, _ATTEMPT_KEEP)
        logger.error("Discovery for %s failed: %s", issuer, exc.reason)
        raise exc

    def _fetch(self, issuer: str, budget: float | None = None) -> Mapping[str, Any]:
        errors = []
        # The status of the last answer: a server that answered every document
        # wrongly (4xx, not JSON, another issuer) is no outage, and the error
        # says so (FetchError.answered), so that callers pace their retries.
        status: int | None = None
        # One budget for all the names tried (RFC 8414, OpenID Connect): a
        # server that answers each slowly must not multiply the request's wait.
        budget = self.fetcher.budget if budget is None else min(budget, self.fetcher.budget)
        ends = time.monotonic() + budget
        for url in metadata_urls(issuer):
            left = ends - time.monotonic()
            if left <= 0:
                errors.append(f"{url}: not tried, the discovery budget is spent")
                break
            try:
                result = self.fetcher.get_json(
                    url, headers={"Accept": "application/json"}, budget=left
                )
            except FetchError as exc:
                errors.append(f"{url}: {exc.reason}")
                if exc.inconclusive and status is not None:
                    # Cut off by what the slow answers before it left: those
                    # answers stand, so the attempt is paced like one that
                    # heard every name (a timeout here made it an outage,
                    # asked again by every request).
                    break
                status = exc.status
                if _try_next(exc):
                    continue
                break
            status = result.status
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
        raise FetchError("discovery failed: " + "; ".join(errors), status=status)
