"""The key store: fetch, share, cache and refresh each issuer's JWK Set.

Policy (the operations guide in the docs, ``keys.rst``, explains each part):

* **Where keys come from**: ``OAUTH_VERIFY_JWKS`` (static, offline), else
  ``OAUTH_VERIFY_JWKS_URI``, else the issuer's discovery metadata. Keys are
  namespaced per issuer: a key of issuer A never verifies a token of B, and
  the unverified ``iss`` is checked against the configured issuers before
  any key is looked up, so a token can never make us fetch anything else.
* **Shared copy**: the raw key set and its metadata (fetched-at, TTL, ETag,
  URL) live in the shared cache, so N workers (or N machines on one Redis)
  share one copy; each process keeps only the parsed keys, keyed by the
  set's content hash, so a set is parsed once per process.
* **Soft TTL**: ``JWKS_CACHE_TTL`` (or the response's ``Cache-Control:
  max-age``, less its ``Age``, clamped to ``[JWKS_MIN_TTL, JWKS_MAX_TTL]``)
  minus up to 10 % random jitter. After it one request of one worker
  refreshes (a single flight in the process, an ``add`` lock in the shared
  cache across processes) while every other request keeps using the keys it
  has. Conditional requests (``If-None-Match``) when the issuer sends an
  ``ETag``.
* **Last known good**: a failed fetch never wipes keys; they are served
  until ``JWKS_MAX_STALENESS`` (24 h), and the fetch is retried (by one
  worker) every ``JWKS_REFRESH_COOLDOWN``. Errors are never cached. A key
  missing from a successful fetch is no longer trusted (and the verified
  token cache is emptied).
* **Unknown kid**: one forced refresh, then the lookup is retried; the
  requests that arrive meanwhile wait for that one fetch; at most one forced
  refresh per ``JWKS_REFRESH_COOLDOWN`` per issuer across all workers;
  inside the cooldown the token is refused at once, without any network
  call.
* **Cold start with the issuer down**: :class:`UpstreamError` (503 with
  ``Retry-After``) after at most one fetch budget; concurrent requests share
  that one attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from .cache import SharedCache, cache_key, shared_time
from .config import ConfigurationError, Settings, _is_loopback, shown_url
from .deadline import reset_in_child
from .discovery import Discovery
from .errors import InvalidTokenError, UpstreamError, withheld_exc_info
from .fetch import (
    BreakerScope,
    Fetcher,
    FetchError,
    HTTPResult,
    SingleFlight,
    url_digest,
)
from .fifo import BoundedFifo
from .issuers import IssuerMatcher
from .keys import KeySetError, PreparedKey, PreparedKeySet, content_hash, parse_key_set
from .verification import JWSHeader, finite_number

__all__ = ["KeySetStatus", "KeyStore"]

logger = logging.getLogger("flask_oauth_verify.keys")

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE | re.ASCII)
_JITTER = 0.1
#: At most how long a request with an unknown kid waits for a key-set refresh
#: that another request or worker leads, while there are keys to serve.
_KID_WAIT = 1.0
#: Seconds before a worker that saw another worker fetching looks again.
_RECHECK = 1.0
#: How often a worker that stopped waiting for another worker's fetch reads
#: the shared copy (one cache read), which that fetch may have updated.
_SHARED_RECHECK = 0.2
#: ``Retry-After`` of a 503 while the circuit is closed.
_RETRY_AFTER = 5
_PARSED_CACHE_SIZE = 64
_MAX_DYNAMIC_SOURCES = 64
#: How many refused ``jku`` URLs are remembered (each for a refresh cooldown).
_REFUSED_JKU_URLS = 4096
#: The path of an issuer's own key set under it (Beyond Identity's ``jku``).
_WELL_KNOWN_JWKS = "/.well-known/jwks.json"

#: Listener signature: (event name, fields). Set by the extension.
EventSink = Callable[[str, Mapping[str, Any]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class KeySetStatus:
    """What the store knows about one issuer's keys (health check, CLI, metrics).

    :param issuer: the configured issuer (or template).
    :param source: where the keys come from: the JWKS URL, ``"static"``, or
        ``None`` before the first fetch.
    :param kids: the key ids of the usable keys.
    :param age: seconds since the keys were fetched (``None``: no keys).
    :param fresh: whether the keys are within their soft TTL.
    :param last_error: why the last refresh failed (``None``: it worked).
    :param skipped: keys of the set that were skipped, with the reason.
    :param fetched_at: when the keys were fetched (by any worker).
    :param expires_in: seconds until the soft TTL ends (negative: overdue).
    :param circuit_open: whether the circuit breaker refuses calls now.
    :param fetches: fetches this process made for the issuer.
    :param usable_keys: how many usable keys the set holds (a key without a
        ``kid``, and each of the keys that share one, count).
    """

    issuer: str
    source: str | None
    kids: tuple[str, ...]
    age: float | None
    fresh: bool
    last_error: str | None
    skipped: tuple[str, ...]
    fetched_at: float | None = None
    expires_in: float | None = None
    circuit_open: bool = False
    fetches: int = 0
    usable_keys: int = 0


@dataclasses.dataclass(eq=False)
class _Source:
    """The keys of one issuer (or of one allowlisted ``jku`` of an issuer)."""

    issuer: str
    jku: str | None = None
    keys: PreparedKeySet | None = None
    raw: Any = None
    fetched_at: float = 0.0
    ttl: float = 0.0
    #: The issuer's ``max-age`` for the set (``None``: it sent none).
    max_age: float | None = None
    fresh_until: float = 0.0
    etag: str | None = None
    uri: str | None = None
    last_forced: float = float("-inf")
    last_error: str | None = None
    #: With no keys to serve, no fetch before this time: set when the server
    #: answered with no key set (an outage is the circuit breaker's to pace).
    retry_at: float = float("-inf")
    #: When this process's last fetch for the source failed.
    failed_at: float = float("-inf")
    fetches: int = 0
    #: Until when unknown kids read the shared copy again, without waiting:
    #: set when a request stopped waiting for another worker's fetch, which
    #: may bring the kid (see ``KeyStore._recheck_shared``) ...
    recheck_shared_until: float = float("-inf")
    #: ... and when next (at most once per :data:`_SHARED_RECHECK`).
    recheck_shared_at: float = float("-inf")
    #: The name of the source in the shared cache, when not :attr:`name`
    #: (see :meth:`KeyStore.shared_name`).
    shared_as: str = ""

    @property
    def name(self) -> str:
        return self.issuer if self.jku is None else f"{self.issuer} jku={self.jku}"

    def fresh(self, now: float) -> bool:
        """Within the soft TTL: fetched at or before ``now`` (a clock stepped
        back would otherwise stretch the TTL by the step), and not yet due.
        The decorators' cache hit writes this out (``decorators._guard``)."""
        return self.fetched_at <= now < self.fresh_until

    def key(self, kind: str) -> str:
        """The shared cache key of this source's ``kind`` of record."""
        return cache_key(kind, self.shared_as or self.name)


def _within(start: float, now: float, length: float) -> bool:
    """Whether ``now`` lies in the window of ``length`` seconds from ``start``
    (a clock stepped back before ``start`` ends the window, never stretches it)."""
    return 0 <= now - start < length


def _scope(source: _Source) -> BreakerScope:
    """The circuit breaker of a source's fetches: a ``jku`` (a URL a token
    chose) has its own; an issuer's key set shares its origin's."""
    return "token" if source.jku is not None else "origin"


def _budget_spent(uri: str, how: str, passed: FetchError | None) -> FetchError:
    """``uri`` had none of the fetch budget (``how``: not tried, cut off):
    the failure carries the status of the answer that spent it."""
    why = f" ({passed.reason})" if passed is not None else ""
    status = passed.status if passed is not None else None
    return FetchError(f"{shown_url(uri)}: {how}, the fetch budget is spent{why}", status=status)


def _answered(exc: FetchError | KeySetError) -> bool:
    """Whether the server answered with something that is not a key set
    (see :attr:`FetchError.answered`), rather than failed."""
    return isinstance(exc, KeySetError) or exc.answered


def _max_age(result: HTTPResult) -> float | None:
    """Seconds the response may be reused (RFC 9111 §5.2.2.1, less ``Age``)."""
    value = result.header("Cache-Control")
    if not value:
        return None
    lowered = value.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    match = _MAX_AGE.search(value)
    if match is None:
        return None
    age = result.header("Age") or ""
    # isdigit() alone takes '²' (a Latin-1 byte of a header), which float() refuses
    seconds = float(match.group(1)) - (float(age) if age.isascii() and age.isdigit() else 0.0)
    # 400 digits each are inf - inf: a TTL that is no number never ran out
    return None if math.isnan(seconds) else seconds


#: What an ``ETag`` may be to be sent back (``If-None-Match``): visible
#: characters, spaces inside (RFC 9110 §8.8.3 allows fewer; servers send more).
_ETAG = re.compile(r"[\x21-\x7e\x80-\xff][\x20-\x7e\x80-\xff]{0,1023}")


def _etag(value: Any) -> str | None:
    """An ``ETag`` that can be sent back, else ``None`` (an unconditional
    fetch). A value from the shared cache that cannot be (a foreign value,
    CR LF inside) failed every refresh of the process that adopted it, for
    good: the ETag is only replaced by a refresh that works."""
    return value if isinstance(value, str) and _ETAG.fullmatch(value) else None


def _static_sets(settings: Settings) -> dict[str, PreparedKeySet]:
    """``OAUTH_VERIFY_JWKS`` parsed: one set, or a mapping issuer -> set."""
    static = settings.static_jwks
    if static is None:
        return {}
    try:
        if isinstance(static.get("keys"), list):
            if len(settings.issuers) > 1:
                raise ConfigurationError(
                    "OAUTH_VERIFY_JWKS is one key set but OAUTH_VERIFY_ISSUER lists several "
                    "issuers; keys are never shared between issuers: give a mapping "
                    "{issuer: {'keys': [...]}}."
                )
            return {settings.issuers[0]: parse_key_set(static, settings.algorithms)}
        unknown = [issuer for issuer in static if issuer not in settings.issuers]
        if unknown:
            raise ConfigurationError(f"OAUTH_VERIFY_JWKS names unknown issuers: {unknown}.")
        return {issuer: parse_key_set(jwks, settings.algorithms) for issuer, jwks in static.items()}
    except KeySetError as exc:
        raise ConfigurationError(f"OAUTH_VERIFY_JWKS is not usable: {exc}") from None


class KeyStore:
    """Keys for every configured issuer; implements :class:`KeyResolver`.

    :param settings: the app's settings.
    :param cache: the shared cache.
    :param fetcher: the app's fetch policy.
    :param discovery: metadata discovery, for issuers without a JWKS URI.
    :param clock: wall-clock seconds (tests pass a fake clock).
    :raises ConfigurationError: when the static key set is unusable.
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
        #: held from the "is it newer than ours?" test to the install of a
        #: key set: a shared copy read before a fetch installed a newer set
        #: must not replace it (``status()`` adopts outside the fetch)
        self._installing = threading.RLock()
        reset_in_child(self, KeyStore._after_fork)
        self._flights: SingleFlight[PreparedKeySet] = SingleFlight()
        self._parsed: dict[str, PreparedKeySet] = {}
        self._static = _static_sets(settings)
        self._static_sources = {
            issuer: _Source(issuer=issuer, keys=keys, fresh_until=float("inf"))
            for issuer, keys in self._static.items()
        }
        self._jku_hosts = frozenset(h.lower() for h in settings.allowed_jku_hosts)
        self._issuers = IssuerMatcher(
            settings.issuers, settings.issuer_placeholder_claims, settings.allowed_tenants
        )
        # A fetch may need discovery first: two budgets, plus parsing.
        self._wait = 2 * fetcher.budget + 2
        self._cooldown = settings.jwks_refresh_cooldown
        #: jku URLs whose fetch failed while they had never served keys ->
        #: (when, whether the host answered): refused again, without a
        #: fetch, for a cooldown
        #: (keyed by the URL's SHA-256: a token's jku may be 16 KiB long)
        self._refused_jku: BoundedFifo[bytes, tuple[float, bool]] = BoundedFifo(_REFUSED_JKU_URLS)
        #: issuer -> (when, whether the host answered) of its last failed
        #: fetch of a ``jku`` never seen to serve keys: any other new ``jku``
        #: of the issuer is refused without a fetch for a cooldown (each
        #: forged token naming a new path of the allowlisted host cost a
        #: fetch, and the request waited for it)
        self._failed_new_jku: BoundedFifo[str, tuple[float, bool]] = BoundedFifo(_REFUSED_JKU_URLS)
        #: issuers with a fetch of such a new ``jku`` under way (under the
        #: guard): concurrent forged tokens do not each start one
        self._new_jku_fetching: set[str] = set()
        for issuer in settings.issuers:
            if issuer not in self._static:
                self._source(issuer, None)

    def _after_fork(self) -> None:
        """In a forked child: guards no parent thread holds, and no new
        ``jku`` fetch under way (the thread making it does not exist here)."""
        self._guard = threading.Lock()
        self._installing = threading.RLock()
        self._new_jku_fetching = set()

    # -- the hot path -------------------------------------------------------

    def resolve(self, issuer: str, header: JWSHeader) -> PreparedKey:
        """The key of ``issuer`` named by ``header`` (see the module policy).

        :raises InvalidTokenError: no such key (after at most one refresh).
        :raises UpstreamError: no keys can be had for the issuer at all.
        """
        return self.resolve_vouched(issuer, header)[0]

    def resolve_vouched(
        self, issuer: str, header: JWSHeader
    ) -> tuple[PreparedKey, _Source, PreparedKeySet]:
        """:meth:`resolve`, plus the key source and the key set that gave the key.

        For the verified-token cache: while ``source.keys`` stays that same
        set object and ``now < source.fresh_until``, :meth:`resolve` would
        return the same key without any other work, so a cache hit checks
        just that (and resolves again otherwise, which also drives the
        soft-TTL refresh of a process that only sees hits). A static set is
        a source that is always fresh.

        :raises InvalidTokenError: no such key (after at most one refresh).
        :raises UpstreamError: no keys can be had for the issuer at all.
        """
        if self._static:
            static = self._static_sources.get(issuer)
            if static is not None:
                fixed = self._static[issuer]
                return self._from_set(fixed, header, "static key set"), static, fixed
        # The usual case, an exact issuer without jku, is one dict lookup.
        source = None if self._jku_hosts else self._sources.get((issuer, None))
        if source is None:
            source = self._source(issuer, self._jku(header))
        keys = source.keys  # read once: a refresh may swap it at any time
        if keys is None or not source.fresh(self.clock()):
            keys = self._current(source)
        kid = header.kid
        key = keys.by_kid.get(kid) if kid is not None else keys.get(None)
        if key is not None:
            return key, source, keys
        if kid is None:
            raise InvalidTokenError(reason="token has no kid and the key set has several keys")
        if kid not in keys.shared_kids:  # a shared kid is known: no refresh
            keys = self._refresh_for_kid(source, keys, kid)
        return self._from_set(keys, header, f"key set of {source.name}"), source, keys

    @staticmethod
    def _from_set(keys: PreparedKeySet, header: JWSHeader, where: str) -> PreparedKey:
        key = keys.get(header.kid, header.alg)
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
        if not jku.isascii():
            # a URI is ASCII (RFC 3986); a lone surrogate cannot even be encoded
            raise InvalidTokenError(reason="jku is not a URL")
        try:
            parts = urlsplit(jku)
            port = parts.port
        except ValueError:
            raise InvalidTokenError(reason="jku is not a URL") from None
        host = (parts.hostname or "").lower()
        if host not in self._jku_hosts or parts.username or parts.password or parts.fragment:
            raise InvalidTokenError(reason="jku host is not allowlisted")
        if parts.scheme == "https" and port in (None, 443):
            return jku
        # Test emulators only: plain http to an allowlisted loopback host, and
        # only with ALLOW_INSECURE_HTTP; production stays https on port 443.
        if parts.scheme == "http" and self.settings.allow_insecure_http and _is_loopback(host):
            return jku
        raise InvalidTokenError(reason="jku is not an https URL of an allowlisted host")

    def _source(self, issuer: str, jku: str | None) -> _Source:
        source = self._sources.get((issuer, jku))
        if source is not None:
            return source
        if jku is not None:
            self._check_refused_jku(jku, self.clock())
        # A concrete issuer of a templated ISSUER shares the template's
        # source; an issuer that is not configured never gets one (and so
        # never causes a fetch), which keeps the number of sources bounded.
        configured = self._issuers.configured(issuer)
        if configured is None:
            raise InvalidTokenError(reason="iss is not a configured issuer")
        issuer = configured
        source = self._sources.get((issuer, jku))
        if source is not None:
            return source
        with self._guard:
            source = self._sources.get((issuer, jku))
            if source is None:
                if jku is not None and len(self._sources) > _MAX_DYNAMIC_SOURCES:
                    self._drop_failed_jku_sources()
                    if len(self._sources) > _MAX_DYNAMIC_SOURCES:
                        raise InvalidTokenError(reason="too many distinct jku URLs")
                source = _Source(issuer=issuer, jku=jku)
                if jku is None:
                    source.shared_as = self.shared_name(issuer)
                self._sources[(issuer, jku)] = source
            return source

    def shared_name(self, issuer: str) -> str:
        """The name under which the key set of configured ``issuer`` is shared
        with other workers (its record, its fetch lock, its cooldown markers).

        The issuer alone when its keys are discovered (the same for every app
        of the issuer); with a configured ``JWKS_URI``, the issuer and that
        URL: two apps of one issuer on one cache may configure different URLs
        (Entra's ``…/keys?appid=…``), and each must neither wait for the
        other's fetch nor take its cooldown for its own.
        """
        configured = self.settings.jwks_uri_for(issuer)
        return f"{issuer} jwks_uri={configured}" if configured else issuer

    def shared_key(self, kind: str, issuer: str) -> str:
        """The shared cache key of ``kind`` (``"jwks"``, ``"jwks-lock"``…) for
        configured ``issuer`` (see :meth:`shared_name`)."""
        return cache_key(kind, self.shared_name(issuer))

    def _check_refused_jku(self, jku: str, now: float) -> None:
        """Refuse, without a fetch, a ``jku`` (never seen to serve keys) whose
        fetch failed within the cooldown, the way it failed then."""
        refused = self._refused_jku.get(url_digest(jku))
        if refused is not None and now - refused[0] < self._cooldown:
            raise self._jku_refusal(refused[1], refused[0])

    def _expected_jku(self, source: _Source) -> bool:
        """Whether ``source``'s ``jku`` is one its issuer's own tokens name,
        never paced: the well-known key set of an issuer of the source
        (Beyond Identity's ``<issuer>/.well-known/jwks.json``; for a templated
        ``ISSUER``, of an issuer of a tenant ``ALLOWED_TENANTS`` lists) or a configured
        ``JWKS_URI`` or fallback. A flood of forged paths must not keep the
        real one from being fetched."""
        jku = str(source.jku)
        if jku.endswith(_WELL_KNOWN_JWKS):
            issuer = jku[: -len(_WELL_KNOWN_JWKS)]
            if issuer == source.issuer:
                return True
            # a template's: only among the tenants ALLOWED_TENANTS lists (with
            # any tenant, forged tokens would name a new "own" key set each)
            if (
                self.settings.allowed_tenants is not None
                and self._issuers.configured(issuer) == source.issuer
            ):
                return True
        return jku in (
            self.settings.jwks_uri_for(source.issuer),
            *self.settings.jwks_uri_fallbacks_for(source.issuer),
        )

    @contextlib.contextmanager
    def _paced_fetch(self, source: _Source, now: float) -> Iterator[None]:
        """Around the fetch of a new ``jku`` that is not :meth:`_expected_jku`:
        refused without a fetch while another such fetch of the issuer is
        under way or failed within the cooldown (:meth:`_pace_new_jku`)."""
        issuer = source.issuer
        with self._guard:
            if issuer in self._new_jku_fetching:
                raise InvalidTokenError(
                    reason="jku not fetched: another new jku of this issuer is being fetched"
                )
            self._pace_new_jku(issuer, now)
            self._new_jku_fetching.add(issuer)
        try:
            yield
        finally:
            with self._guard:
                self._new_jku_fetching.discard(issuer)

    def _pace_new_jku(self, issuer: str, now: float) -> None:
        """Refuse, without a fetch, a ``jku`` never seen before while another
        new ``jku`` of ``issuer`` failed within the cooldown: at most one
        failed fetch per cooldown, however many paths forged tokens name."""
        failed = self._failed_new_jku.get(issuer)
        if failed is not None and 0 <= now - failed[0] < self._cooldown:
            raise self._jku_refusal(failed[1], failed[0], paced=True)

    def _jku_refusal(self, answered: bool, at: float, *, paced: bool = False) -> Exception:
        """401 when the host answered with no key set (the token names none);
        503 when it did not answer (it may be down)."""
        if answered:
            if paced:
                return InvalidTokenError(
                    reason="jku not fetched: a new jku of this issuer failed within the cooldown"
                )
            return InvalidTokenError(reason="jku does not serve a key set")
        retry = max(1, math.ceil(at + self._cooldown - self.clock()))
        return UpstreamError(
            reason="the key set at the token's jku is unreachable", retry_after=retry
        )

    def _drop_failed_jku_sources(self) -> None:
        """Forget ``jku`` sources that never yielded keys (caller holds the guard).

        Anyone can put any path of an allowlisted host in a ``jku``; such
        sources fail to fetch and must not crowd out the real ones.
        """
        for name, source in list(self._sources.items()):
            if (
                source.jku is not None
                and source.keys is None
                and not self._flights.running(source.name)
            ):
                del self._sources[name]

    # -- when a refresh is due or a kid is unknown ------------------------------

    def _current(self, source: _Source) -> PreparedKeySet:
        """Keys after the soft TTL (or none yet): refresh once, serve meanwhile."""
        keys = source.keys
        if (
            keys is not None
            and self._usable(source, self.clock())
            and self._flights.running(source.name)
        ):
            return keys  # one refresh is under way in this process: keep serving
        return self._run(source, "due")

    def _refresh_for_kid(self, source: _Source, seen: PreparedKeySet, kid: str) -> PreparedKeySet:
        """One refresh for an unknown kid, rate limited per issuer.

        None within the cooldown after a fetch failed (a due refresh of this
        very request, maybe): the issuer is not asked again at once, and
        the request does not wait out a second timeout. With keys to serve,
        a request waits for a refresh another request (or worker) leads for
        :data:`_KID_WAIT` at most: unknown kids, which anyone can send, must
        not hold every worker thread for a hung issuer's whole timeout.
        """
        keys = seen
        if _within(source.failed_at, self.clock(), self._cooldown):
            return keys
        for _ in range(2):
            if not self._flights.running(source.name) and _within(
                source.last_forced, self.clock(), self._cooldown
            ):
                # inside the cooldown: no network call (after giving up on
                # another worker's fetch, a read of its shared copy now and then)
                self._recheck_shared(source)
                return source.keys or keys
            led: list[bool] = []
            keys = self._run(source, "forced", kid, led, patience=self._kid_patience(source))
            if led or keys.get(kid) is not None:
                return keys
            if self._flights.running(source.name):
                return keys  # gave up waiting: the refresh is still under way
            # We joined a refresh started by another request; if that one was
            # not forced (a due refresh), one forced refresh is still allowed.
        return keys

    def _recheck_shared(self, source: _Source) -> None:
        """Adopt another worker's newer copy, if this worker stopped waiting
        for its fetch lately (at most one cache read per :data:`_SHARED_RECHECK`)."""
        now = self.clock()
        if now < source.recheck_shared_at or now >= source.recheck_shared_until:
            return
        source.recheck_shared_at = now + _SHARED_RECHECK
        self._adopt_shared(source, now)

    def _kid_patience(self, source: _Source) -> float:
        """How long a request with an unknown kid waits for another's refresh."""
        if source.keys is not None and self._usable(source, self.clock()):
            return min(_KID_WAIT, self._wait)
        return self._wait  # nothing to serve meanwhile: wait for the outcome

    def _run(
        self,
        source: _Source,
        mode: str,
        kid: str | None = None,
        led: list[bool] | None = None,
        patience: float | None = None,
    ) -> PreparedKeySet:
        """Refresh in a single flight: concurrent callers share its outcome.

        :param patience: how long a caller that joins waits (by default the
            longest a refresh can take).
        """

        def lead() -> PreparedKeySet:
            if led is not None:
                led.append(True)
            return self._refresh(source, mode, kid)

        try:
            return self._flights.run(source.name, lead, timeout=patience or self._wait)
        except TimeoutError:
            return self._keys_or_raise(source, self.clock(), "timed out waiting for a refresh")

    def _refresh(self, source: _Source, mode: str, kid: str | None) -> PreparedKeySet:
        """Lead one refresh. ``mode``: ``due``, ``forced`` (unknown kid), ``manual``."""
        now = self.clock()
        try:
            return self._refresh_locked(source, mode, kid, now)
        except (UpstreamError, InvalidTokenError):
            raise
        except Exception as exc:
            # A bug or a cache backend oddity must fail closed, never as a 500.
            logger.error(
                "Refreshing the keys of %s raised", source.name, exc_info=withheld_exc_info(exc)
            )
            return self._failed(source, now, f"internal error: {type(exc).__name__}")

    def _refresh_locked(
        self, source: _Source, mode: str, kid: str | None, now: float
    ) -> PreparedKeySet:
        if (
            mode != "manual"
            and source.keys is None
            and now < source.retry_at <= now + max(self._cooldown, _RECHECK)  # not stretched
        ):
            # A fetch failed a moment ago and there is nothing to serve: refuse
            # at once, so that a flood of requests is not a flood of fetches
            # (an answer that is no key set does not open the circuit).
            return self._keys_or_raise(source, now)
        if mode == "forced":
            if _within(source.last_forced, now, self._cooldown):
                return self._keys_or_raise(source, now)
            source.last_forced = now
        # Another worker may have stored a copy that already does.
        if self._adopt_shared(source, now) and self._enough(source, now, mode, kid):
            return self._keys_or_raise(source, now)
        lock = source.key("jwks-lock")
        if not self.cache.lock(lock, self._wait):
            return self._while_other_fetches(source, now, mode)
        try:
            # Double-check: the previous holder may have just stored its copy.
            if self._adopt_shared(source, now) and self._enough(source, now, mode, kid):
                return self._keys_or_raise(source, now)
            if mode == "forced" and self._forced_elsewhere(source, now):
                return self._keys_or_raise(source, now)
            if mode == "due" and self._failed_elsewhere(source, now):
                return self._keys_or_raise(source, now)
            return self._fetch_and_install(source, now, mode)
        finally:
            self.cache.unlock(lock)

    def _enough(self, source: _Source, now: float, mode: str, kid: str | None) -> bool:
        """Whether the adopted shared copy makes our own fetch unnecessary."""
        if source.keys is None:
            return False
        if mode == "due":
            return source.fresh(now)
        if mode == "forced":
            return source.keys.get(kid) is not None
        return False

    def _while_other_fetches(self, source: _Source, now: float, mode: str) -> PreparedKeySet:
        """Another worker holds the fetch lock: serve ours, or wait for its copy."""
        if mode == "due" and source.keys is not None and self._usable(source, now):
            source.fresh_until = max(source.fresh_until, now + _RECHECK)
            return source.keys
        lock = source.key("jwks-lock")
        patience = self._kid_patience(source) if mode == "forced" else self._wait
        finished = self.cache.wait_unlocked(lock, self._wait, wait=patience)
        if not finished and patience < self._wait:
            # An unknown kid: serve ours and refuse it rather than hold the
            # worker while another worker's fetch hangs (see _refresh_for_kid).
            # No more waiting for the cooldown (ours, set by the caller), but
            # that fetch may bring the kid: look at its shared copy meanwhile.
            gave_up = self.clock()
            source.recheck_shared_at = gave_up + _SHARED_RECHECK
            source.recheck_shared_until = now + self._cooldown
            return self._keys_or_raise(source, gave_up)
        if self._adopt_shared(source, self.clock()) or not (
            self.cache.take_abandoned(lock, self._wait) or self._take_vanished(source, lock)
        ):
            if mode == "forced" and self._forced_mark(source, now) is None:
                # No worker forced a fetch (the holder's refresh was due, or
                # its open circuit refused it): ours is not used up either.
                source.last_forced = now - self._cooldown + _RECHECK
            return self._keys_or_raise(source, now, self._shared_error(source))
        # The holder died mid-fetch (its lock outlived it), or every trace of
        # its fetch vanished with the cache: fetch ourselves.
        try:
            return self._fetch_and_install(source, self.clock(), mode)
        finally:
            self.cache.unlock(lock)

    def _take_vanished(self, source: _Source, lock: str) -> bool:
        """Take the fetch lock when the fetch we waited for left no trace: no
        lock, no shared copy, no record of an attempt (a holder writes one
        when its fetch ends, worked or failed). The cache was flushed or
        restarted empty while we waited; answering 503 "another worker's
        fetch produced no keys" would blame a fetch that may well have worked.
        """
        if self.cache.get(lock) is not None:
            return False
        if self.cache.get(source.key("jwks-attempt")) is not None:
            return False
        return self.cache.lock(lock, self._wait)

    def _forced_elsewhere(self, source: _Source, now: float) -> bool:
        """Whether any worker forced a refresh within the cooldown (else claim it)."""
        at = self._forced_mark(source, now)
        if at is not None:
            # That worker's cooldown, not a new one from now: ours (set by
            # the caller) would refuse the new kid for up to twice the
            # cooldown, after that worker's refresh had already learnt it.
            source.last_forced = at
            return True
        self.cache.set(source.key("jwks-forced"), {"at": now}, self._cooldown + 60)
        return False

    def _forced_mark(self, source: _Source, now: float) -> float | None:
        """When a worker last forced a refresh of ``source``, if within the cooldown."""
        marker = self.cache.get(source.key("jwks-forced"))
        at = shared_time(marker.get("at"), now) if isinstance(marker, dict) else None
        return at if at is not None and now - at < self._cooldown else None

    def _failed_elsewhere(self, source: _Source, now: float) -> bool:
        """Whether another worker's refresh failed so recently that we wait too.

        With keys to serve, a due refresh waits the cooldown; with none (cold,
        or past the staleness bound) a fetch waits :data:`_RECHECK` after an
        answer that was no key set, so that the workers together fetch at
        most once a second from such an issuer (it never opens the circuit).
        """
        warm = source.keys is not None and self._usable(source, now)
        if not warm and source.keys is not None:
            return False
        attempt = self.cache.get(source.key("jwks-attempt"))
        if not isinstance(attempt, dict) or not attempt.get("error"):
            return False
        at = shared_time(attempt.get("at"), now)
        retry = max(self._cooldown, _RECHECK) if warm else _RECHECK
        if at is None or now - at >= retry:
            return False
        if not warm:
            if not attempt.get("answered"):
                return False
            source.last_error = str(attempt["error"])
            source.retry_at = max(source.retry_at, at + retry)
            return True
        source.last_error = str(attempt["error"])
        source.fresh_until = max(
            source.fresh_until, min(at + retry, source.fetched_at + self._max_staleness)
        )
        return True

    def _shared_error(self, source: _Source) -> str:
        attempt = self.cache.get(source.key("jwks-attempt"))
        if isinstance(attempt, dict) and attempt.get("error"):
            return f"another worker's fetch failed: {attempt['error']}"
        return "another worker's fetch produced no keys"

    # -- fetching -----------------------------------------------------------------

    def _fetch_and_install(self, source: _Source, now: float, mode: str) -> PreparedKeySet:
        unproven = source.jku is not None and source.keys is None
        if unproven:
            self._check_refused_jku(str(source.jku), now)
            if not self._expected_jku(source):
                with self._paced_fetch(source, now):
                    return self._fetch_then_install(source, now, mode, unproven)
        return self._fetch_then_install(source, now, mode, unproven)

    def _fetch_then_install(
        self, source: _Source, now: float, mode: str, unproven: bool
    ) -> PreparedKeySet:
        source.fetches += 1
        sent = self.fetcher.sent
        try:
            record = self._fetch(source, now)
            keys = self._parse(record["jwks"])
        except (FetchError, KeySetError) as exc:
            if unproven:
                # A URL chosen by the token that never served keys: remember the
                # failure for a cooldown (no second fetch), share nothing.
                source.last_error = str(exc)
                answered = _answered(exc)
                self._refused_jku.put(url_digest(str(source.jku)), (now, answered))
                self._failed_new_jku.put(source.issuer, (now, answered))
                raise self._jku_refusal(answered, now) from None
            if isinstance(exc, FetchError) and exc.circuit_open:
                if mode == "forced" and self.fetcher.sent == sent:
                    # No call at all (none to discovery, none to a location
                    # tried before the one whose circuit refused, in any thread).
                    self._give_back_forced(source, now)
                return self._refused_by_circuit(source, now, str(exc))
            # The cooldown runs from the failure, not from the start of a fetch
            # that may have taken the whole budget (a hung issuer).
            return self._failed(source, self.clock(), str(exc), answered=_answered(exc))
        keep = self._max_staleness + record["ttl"]
        self.cache.set(source.key("jwks"), record, keep)
        self.cache.set(source.key("jwks-attempt"), {"at": now, "error": None}, keep)
        source.last_error = None
        with self._installing:
            self._install(source, keys, record)
        if not keys.keys:
            logger.warning(
                "The key set of %s has no usable key (skipped: %s).",
                source.name,
                "; ".join(keys.skipped) or "none",
            )
        self._emit(
            "keys_refreshed",
            issuer=source.issuer,
            kids=list(keys.kids),
            forced=mode == "forced",
            trigger=mode,
        )
        return keys

    def _fetch(self, source: _Source, now: float) -> dict[str, Any]:
        candidates = self._candidate_uris(source)  # discovery, if any: a budget of its own
        # One budget for every location tried (JWKS_URI, then its fallbacks):
        # locations that each answer slowly must not multiply the request's
        # wait, nor outlive the fetch lock (two budgets: discovery, this).
        ends = time.monotonic() + self.fetcher.budget
        passed: FetchError | None = None  # why the last location tried was passed over
        for uri in candidates[:-1]:
            # Documented and SDK paths differ for some providers: an answer that
            # is not a key set (a 404, a login page, an error document; not an
            # outage) moves on to the next known location.
            try:
                record = self._fetch_from(source, uri, now, ends, passed)
            except FetchError as exc:
                if not _answered(exc):
                    raise
                passed = exc
                continue
            jwks = record["jwks"]
            if isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list):
                return record
            passed = FetchError(f"{shown_url(uri)}: not a JWK Set", status=200)
        return self._fetch_from(source, candidates[-1], now, ends, passed)

    def _candidate_uris(self, source: _Source) -> list[str]:
        """The key set URL, then ``JWKS_URI_FALLBACKS`` (last working first)."""
        primary = self._uri(source)
        fallbacks = self.settings.jwks_uri_fallbacks_for(source.issuer)
        if source.jku is not None or not fallbacks:
            return [primary]
        known = [primary, *fallbacks]
        if source.uri in known:
            known.remove(source.uri)
            known.insert(0, source.uri)
        return list(dict.fromkeys(known))

    def _fetch_from(
        self,
        source: _Source,
        uri: str,
        now: float,
        ends: float,
        passed: FetchError | None = None,
    ) -> dict[str, Any]:
        """Fetch the key set at ``uri`` within what is left of the budget.

        :param ends: when the budget of the whole fetch ends (monotonic).
        :param passed: why the location tried before was passed over.
        :raises FetchError: also when nothing is left of the budget, or the
            call is cut off by what was left: with the status of the answer
            that spent it, so that an issuer that answers every location
            slowly with no key set is paced like one that answers at once
            (see :meth:`_failed`).
        """
        left = ends - time.monotonic()
        if left <= 0:
            raise _budget_spent(uri, "not tried", passed)
        headers = {"Accept": "application/jwk-set+json, application/json"}
        conditional = bool(source.etag and source.raw is not None and source.uri == uri)
        if conditional:
            headers["If-None-Match"] = str(source.etag)
        try:
            result = self.fetcher.get_json(
                uri, headers=headers, breaker=_scope(source), budget=left
            )
        except FetchError as exc:
            if exc.inconclusive and passed is not None:
                # Cut off by what the slow answer before it left: that answer
                # stands, as when nothing was left to try (else an outage that
                # no circuit opens for, fetched again by every request).
                raise _budget_spent(uri, "cut off", passed) from None
            raise
        max_age = _max_age(result)
        if result.status == 304:
            if not conditional:
                raise FetchError("304 Not Modified to an unconditional request")
            jwks, etag = source.raw, result.header("ETag") or source.etag
            if not result.header("Cache-Control"):
                # RFC 9111 §4.3.4: a 304 updates the fields it carries only;
                # without Cache-Control the 200's max-age still holds.
                max_age = source.max_age
        else:
            jwks, etag = result.data, result.header("ETag")
        return {
            "jwks": jwks,
            "fetched_at": now,
            "ttl": self._ttl(max_age),
            "max_age": max_age,
            "etag": etag,
            "uri": uri,
        }

    def _ttl(self, max_age: float | None) -> float:
        """This app's soft TTL for a key set the issuer gave ``max_age``.

        ``JWKS_MIN_TTL`` bounds what the issuer asks for; ``JWKS_CACHE_TTL``
        is the app's own choice, which only ``JWKS_MAX_TTL`` caps (raised to
        the minimum, a 30 s TTL kept a removed key for 60 s).
        """
        if max_age is None:
            return min(self.settings.jwks_cache_ttl, self.settings.jwks_max_ttl)
        return self._clamp(max_age)

    def _own_ttl(self, record: Mapping[str, Any]) -> float | None:
        """This app's soft TTL for a shared ``record``, whichever app stored it.

        Apps on one cache may set different ``JWKS_CACHE_TTL`` or bounds: the
        record's ``ttl`` is its storer's, so the TTL comes from the issuer's
        ``max-age`` the record keeps. A record without one (stored by an
        older version) keeps its ``ttl`` within this app's bounds. ``None``:
        no number, not adoptable.
        """
        if "max_age" in record:
            max_age = record["max_age"]
            if max_age is None:
                return self._ttl(None)
            if isinstance(max_age, int | float) and not isinstance(max_age, bool):
                # NaN is no number; an int beyond the float range (10**400)
                # compares fine with the bounds but cannot become a float
                return None if max_age != max_age else self._ttl(max_age)
            return None
        ttl = record.get("ttl")
        return self._clamp(ttl) if finite_number(ttl) else None

    def _clamp(self, ttl: float) -> float:
        return max(min(max(ttl, self.settings.jwks_min_ttl), self.settings.jwks_max_ttl), 1.0)

    def _known_uri(self, source: _Source) -> str:
        """The URL the key set comes (or would come) from, without any network
        call: the last one fetched, the token's ``jku``, the configured
        ``JWKS_URI``, the ``jwks_uri`` of metadata at hand; else the issuer."""
        known = source.uri or source.jku or self.settings.jwks_uri_for(source.issuer)
        return known or self.discovery.known(source.issuer, "jwks_uri") or source.issuer

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

    def _parse(self, jwks: Any) -> PreparedKeySet:
        """The prepared key set of ``jwks``, parsed once per distinct content.

        :raises KeySetError: when ``jwks`` is no usable JWK Set, also when it
            is not plain JSON (a foreign value in the shared cache).
        """
        try:
            digest = content_hash(jwks) if isinstance(jwks, Mapping) else None
        except (TypeError, ValueError, RecursionError):
            raise KeySetError("the key set is not plain JSON") from None
        parsed = self._parsed.get(digest) if digest is not None else None
        if parsed is None:
            parsed = parse_key_set(jwks, self.settings.algorithms)
            if len(self._parsed) >= _PARSED_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[parsed.content_hash] = parsed
        return parsed

    def _failed(
        self, source: _Source, now: float, reason: str, *, answered: bool = False
    ) -> PreparedKeySet:
        """A refresh failed: keep the last good keys while allowed, else 503.

        :param answered: the server answered, with no key set (a 4xx, an HTML
            page, a set that cannot be used). That never opens the circuit,
            so with no keys to serve the next fetch waits :data:`_RECHECK`
            (in every worker): a flood of requests is not a flood of fetches.
        """
        source.last_error = reason
        source.failed_at = now
        attempt = {"at": now, "error": reason, "answered": answered}
        self.cache.set(source.key("jwks-attempt"), attempt, self._max_staleness)
        self._emit("keys_refresh_failed", issuer=source.issuer, reason=reason)
        if source.keys is not None and self._usable(source, now):
            retry = max(self._cooldown, _RECHECK)
            bound = source.fetched_at + self._max_staleness
            source.fresh_until = max(source.fresh_until, min(now + retry, bound))
            age = now - source.fetched_at
            self._emit("stale_keys_served", issuer=source.issuer, age=age)
            logger.warning(
                "Refreshing the keys of %s failed (%s); serving the last good keys "
                "(%.0f s old), retrying in %.0f s.",
                source.name,
                reason,
                age,
                retry,
            )
            return source.keys
        source.keys = None
        if answered:
            source.retry_at = now + _RECHECK
        logger.error("No keys for %s: %s", source.name, reason)
        raise self._unavailable(source, reason)

    def _give_back_forced(self, source: _Source, now: float) -> None:
        """A forced refresh the circuit refused made no call: the next one is
        allowed as soon as the circuit lets a call through (a new kid asks
        again then, and so keeps its place for the half-open trial), not
        after the whole cooldown, and other workers, whose circuits may be
        closed, are not held back by a shared mark of a fetch never made."""
        wait = self._circuit_retry_after(source) or _RECHECK
        source.last_forced = now - self._cooldown + min(wait, self._cooldown)
        self.cache.delete(source.key("jwks-forced"))

    def _refused_by_circuit(self, source: _Source, now: float, reason: str) -> PreparedKeySet:
        """No fetch was made (the circuit is open): serve what we have, else 503.

        Not a failed refresh: no event, no metric, no shared marker, no log
        line per request — the failures that opened the circuit were each
        reported, and a request flood must not multiply them.
        """
        if source.keys is not None and self._usable(source, now):
            retry = max(self._cooldown, _RECHECK)
            bound = source.fetched_at + self._max_staleness
            source.fresh_until = max(source.fresh_until, min(now + retry, bound))
            return source.keys
        last = f"{source.last_error}; " if source.last_error else ""
        raise self._unavailable(source, last + reason)

    def _keys_or_raise(
        self, source: _Source, now: float, reason: str | None = None
    ) -> PreparedKeySet:
        if source.keys is not None and self._usable(source, now):
            return source.keys
        raise self._unavailable(source, reason or source.last_error or "no key set")

    def _unavailable(self, source: _Source, reason: str) -> UpstreamError:
        return UpstreamError(
            reason=f"keys of {source.name} unavailable: {reason}",
            retry_after=self._circuit_retry_after(source) or _RETRY_AFTER,
        )

    def _circuit_retry_after(self, source: _Source) -> int | None:
        """Seconds until the circuits that refuse the key set's locations let
        a call through (the longest of them), ``None`` when none refuses."""
        # Before the first fetch worked, ``source.uri`` is empty: the breaker
        # is the key set URL's (configured or discovered: often another host
        # than the issuer's, Google, Entra, a CDN), the issuer's only when
        # that URL is not known yet (discovery failed: its breaker is the one).
        # The fallback locations' circuits too (from the settings alone, no
        # discovery): the one that refused may be a fallback's.
        locations = [self._known_uri(source)]
        if source.jku is None:
            locations += self.settings.jwks_uri_fallbacks_for(source.issuer)
        scope = _scope(source)
        waits = [
            breaker.retry_after(location)
            for breaker, location in (
                (self.fetcher.breaker(uri, scope=scope), url_digest(uri)) for uri in locations
            )
            if breaker.is_open_for(location)
        ]
        return max(waits, default=None)

    # -- the shared copy ----------------------------------------------------------

    def _adopt_shared(self, source: _Source, now: float) -> bool:
        """Adopt a copy another worker stored, when newer than ours."""
        record = self.cache.get(source.key("jwks"))
        if not isinstance(record, dict):
            return False
        fetched_at = shared_time(record.get("fetched_at"), now)
        ttl = self._own_ttl(record)
        if fetched_at is None or ttl is None:
            return False
        if source.keys is not None and fetched_at < source.fetched_at:
            return False  # ours is newer
        if now - fetched_at > self._max_staleness:
            return False
        if not self._our_source(source, record.get("uri")):
            return False
        try:
            keys = self._parse(record.get("jwks"))
        except KeySetError:
            return False
        with self._installing:
            if source.keys is not None and fetched_at < source.fetched_at:
                return False  # ours is newer (perhaps installed since the read)
            if keys is source.keys and fetched_at == source.fetched_at:
                return False  # the very copy we have (clocks may tick coarsely)
            self._install(source, keys, {**record, "fetched_at": fetched_at, "ttl": ttl})
        return True

    def _our_source(self, source: _Source, uri: Any) -> bool:
        """Whether a shared record's key set came from where ours would.

        The shared copy is keyed by issuer: another app on the same cache may
        configure another ``JWKS_URI`` for the same issuer (Entra's
        ``…/keys?appid=…`` beside the common keys). With a configured URL,
        only a copy fetched from it (or a fallback) is ours; a discovered one
        is the same for every app of the issuer.
        """
        if source.jku is not None:
            return True  # keyed by the jku itself
        configured = self.settings.jwks_uri_for(source.issuer)
        if not configured:
            return True
        return uri in (configured, *self.settings.jwks_uri_fallbacks_for(source.issuer))

    def _install(self, source: _Source, keys: PreparedKeySet, record: Mapping[str, Any]) -> None:
        old = source.keys
        fetched_at = float(record["fetched_at"])
        ttl = float(record["ttl"])
        jitter = random.uniform(0, _JITTER)  # noqa: S311 - spreading refreshes, not security
        source.keys = keys
        source.raw = record.get("jwks")
        source.fetched_at = fetched_at
        source.ttl = ttl
        max_age = record.get("max_age")
        source.max_age = max_age if isinstance(max_age, float | int) else None
        source.etag = _etag(record.get("etag"))
        uri = record.get("uri")  # a foreign value may be anything: the URL names a breaker
        source.uri = uri if isinstance(uri, str) else None
        source.fresh_until = min(fetched_at + ttl * (1 - jitter), fetched_at + self._max_staleness)
        if old is not None and old.content_hash != keys.content_hash:
            added = sorted(set(keys.kids) - set(old.kids))
            removed = sorted(set(old.kids) - set(keys.kids))
            logger.info(
                "The key set of %s changed: added %s, removed %s.", source.name, added, removed
            )
            self._emit("keys_changed", issuer=source.issuer, added=added, removed=removed)
            # Tokens verified with a key that left the set must not stay valid.
            if self.on_keys_changed is not None:
                self.on_keys_changed()

    @property
    def _max_staleness(self) -> float:
        return self.settings.jwks_max_staleness

    def _usable(self, source: _Source, now: float) -> bool:
        return now - source.fetched_at <= self._max_staleness

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, fields)
            except Exception as exc:  # a listener must not break key handling
                logger.error("Event listener for %s raised", event, exc_info=withheld_exc_info(exc))

    # -- operations API -----------------------------------------------------

    def _configured(self, issuer: str | None) -> list[str]:
        if issuer is None:
            return list(self.settings.issuers)
        if issuer not in self.settings.issuers:
            raise ValueError(f"{issuer!r} is not a configured issuer")
        return [issuer]

    def refresh(self, issuer: str | None = None) -> dict[str, str | None]:
        """Fetch the key set of ``issuer`` (every configured issuer if None) now.

        Ignores the soft TTL and the unknown-kid cooldown (an operator asked),
        but still shares the fetch with other workers. Discovery metadata is
        refreshed first for issuers without a configured JWKS URI. Never
        raises for an unreachable issuer.

        :returns: issuer -> error text (``None`` when the keys were fetched).
        :raises ValueError: for an issuer that is not configured.
        """
        outcome: dict[str, str | None] = {}
        for name in self._configured(issuer):
            if name in self._static:
                outcome[name] = None
                continue
            if self.settings.jwks_uri_for(name) is None and "{" not in name:
                try:
                    self.discovery.refresh(name)
                except FetchError as exc:
                    logger.warning("Refreshing the metadata of %s failed: %s", name, exc.reason)
            source = self._source(name, None)
            try:
                self._run(source, "manual")
            except UpstreamError as exc:
                outcome[name] = exc.reason
                continue
            outcome[name] = source.last_error
        return outcome

    def prefetch(self) -> dict[str, str | None]:
        """Warm every configured issuer's keys; never raises.

        :returns: issuer -> error text (``None`` when the keys are loaded).
        """
        outcome: dict[str, str | None] = {}
        for issuer in self.settings.issuers:
            try:
                self.key_set(issuer)
                outcome[issuer] = None
            except UpstreamError as exc:
                outcome[issuer] = exc.reason
            except Exception as exc:  # start-up must never crash on the issuer
                logger.error(
                    "Prefetching the keys of %s raised", issuer, exc_info=withheld_exc_info(exc)
                )
                outcome[issuer] = f"internal error: {type(exc).__name__}"
        for issuer, error in outcome.items():
            if error is not None:
                logger.warning("Prefetching the keys of %s failed: %s", issuer, error)
        return outcome

    def key_set(self, issuer: str) -> PreparedKeySet:
        """The current key set of ``issuer`` (refreshing when due).

        :raises UpstreamError: when none can be had.
        """
        static = self._static.get(issuer)
        if static is not None:
            return static
        source = self._source(issuer, None)
        if source.keys is not None and source.fresh(self.clock()):
            return source.keys
        return self._current(source)

    def status(self) -> list[KeySetStatus]:
        """What is known about every key source, without any call to the issuer."""
        now = self.clock()
        result = [
            KeySetStatus(
                issuer,
                "static",
                keys.kids,
                None,
                True,
                None,
                keys.skipped,
                usable_keys=len(keys.keys),
            )
            for issuer, keys in self._static.items()
        ]
        for source in list(self._sources.values()):
            if source.keys is None:
                self._adopt_shared(source, now)
            keys = source.keys
            uri = source.uri or source.jku or self.settings.jwks_uri_for(source.issuer)
            result.append(
                KeySetStatus(
                    issuer=source.issuer,
                    source=uri,
                    kids=keys.kids if keys else (),
                    age=(now - source.fetched_at) if keys else None,
                    fresh=keys is not None and now < source.fresh_until,
                    last_error=source.last_error,
                    skipped=keys.skipped if keys else (),
                    fetched_at=source.fetched_at if keys else None,
                    expires_in=(source.fresh_until - now) if keys else None,
                    circuit_open=self.fetcher.breaker(
                        uri or source.issuer, scope=_scope(source)
                    ).is_open_for(url_digest(uri or source.issuer)),
                    fetches=source.fetches,
                    usable_keys=len(keys.keys) if keys else 0,
                )
            )
        return result
