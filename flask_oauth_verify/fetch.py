"""The one fetch policy shared by key, discovery and introspection requests.

* connect/read timeouts (``OAUTH_VERIFY_HTTP_TIMEOUT``, 2 s / 5 s) and an
  overall deadline of their sum, enforced by a watchdog thread
  (:mod:`~flask_oauth_verify.deadline`), so no request waits longer than the
  budget, however slowly a server trickles its status line, headers or body;
* redirects followed only within the same origin (scheme, host, port), at
  most three; a redirect to another origin is an error;
* ``http://`` only to loopback hosts unless ``ALLOW_INSECURE_HTTP``;
* status 200 (or 304 to a conditional GET) and a JSON body only: a body
  labelled HTML, XML or anything else that is not JSON, plain text or
  octets (a login page, an error page of a proxy) is refused before it is
  read, and the body must decode as strict JSON, nested at most 64 deep;
* the body read in chunks and refused past ``OAUTH_VERIFY_HTTP_MAX_BYTES``
  (512 KiB; counted after decompression);
* a circuit breaker per origin: after ``CIRCUIT_BREAKER_FAILURES``
  consecutive outages (network errors, timeouts, 5xx, 408/429), calls fail
  at once for ``CIRCUIT_BREAKER_RESET`` seconds, then one trial call is let
  through (half-open). A wrong answer below 500 fails its call but is no
  outage, nor is a timeout of a call given only what was left of a budget
  several calls share (less than half the fetch budget): the
  earlier calls spent the rest, the server might have answered in time. The
  introspection endpoint and each key set URL named by a token
  (``jku``) get a breaker of their own (:meth:`Fetcher.breaker`), so what a
  token makes fail never closes the origin to the rest.

:class:`SingleFlight` lets concurrent callers share one call's outcome; the
key store, discovery and introspection use it so that N threads waiting for
the same document cause one request.
"""

from __future__ import annotations

import copy
import dataclasses
import email.utils
import functools
import hashlib
import http.client
import http.cookiejar
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .config import ConfigurationError, Settings, check_url
from .deadline import (
    DeadlineExpired,
    deadline,
    reset_if_forked,
    reset_in_child,
    reused_connection,
    watched_session,
)
from .errors import withheld_exc_info
from .fifo import BoundedFifo
from .strictjson import STRICT_DECODER

__all__ = ["CircuitBreaker", "FetchError", "Fetcher", "HTTPResult", "SingleFlight"]

_MAX_REDIRECTS = 3
_USER_AGENT = "flask-oauth-verify"
#: A cookie policy that accepts and returns no cookie at all.
_NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
_CHUNK = 16384
#: Arrays and objects a document may nest. Key sets, metadata and
#: introspection answers nest a few levels; a document nested hundreds deep
#: decodes, but cannot be pickled into the cache (RecursionError).
_MAX_DEPTH = 64
#: URLs remembered as allowed by :func:`check_url` (endpoints, key sets).
_CHECKED_URLS = 256
#: Circuit breakers of single URLs kept (see :meth:`Fetcher.breaker`).
_URL_BREAKERS = 1024
#: A budget given to a call below this share of the fetch budget is a cut
#: one (what is left of a budget several calls share): running out of it is
#: no outage of the server. With at least half the budget to wait, a server
#: that did not answer counts as down (a hung fallback location after a
#: slow first one must still open its circuit).
_FULL_BUDGET = 0.5

logger = logging.getLogger("flask_oauth_verify")

T = TypeVar("T")
#: Which circuit breaker guards a request (see :meth:`Fetcher.breaker`).
BreakerScope = Literal["origin", "endpoint", "token"]


class _Unguarded:
    """The circuit of a call no breaker guards: always allowed, records nothing."""

    @staticmethod
    def allow(_location: bytes | None = None) -> bool:
        """Always."""
        return True

    @staticmethod
    def record_success() -> None:
        """Nothing to record."""

    @staticmethod
    def record_answer(_location: bytes | None = None) -> None:
        """Nothing to record."""

    @staticmethod
    def record_failure(_location: bytes | None = None, _asked: int | None = None) -> None:
        """Nothing to record."""

    @staticmethod
    def record_inconclusive() -> None:
        """Nothing to record."""


_UNGUARDED = _Unguarded()


class FetchError(Exception):
    """A fetch failed; ``reason`` says how (for logs), never with a token.

    Reasons start with a stable phrase that callers may classify:
    ``timed out``, ``connection failed``, ``circuit open``, ``HTTP status``,
    ``the response is not JSON``, ``response larger than``,
    ``reading the body failed``, ``redirect to another origin refused``.

    :param reason: short description (timeout, connection refused, status).
    :param status: the HTTP status when one was received.
    :param retry_after: the server's ``Retry-After`` of a 429 or 503.
    :param oauth_error: the ``error`` code in the JSON body of a POST answered 400.
    :param inconclusive: cut off by what was left of a shared budget.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        oauth_error: str | None = None,
        inconclusive: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        #: the server's own ``Retry-After`` (whole seconds, at most
        #: :data:`MAX_RETRY_AFTER`) of a 429 or 503 answer, else ``None``
        self.retry_after = retry_after
        #: the OAuth ``error`` code (RFC 6749 §5.2) of a POST answered 400 with a
        #: JSON body, e.g. ``unsupported_token_type``, else ``None``
        self.oauth_error = oauth_error
        #: cut off by what was left of a budget several calls share, below
        #: half of a whole one: no verdict on the server
        self.inconclusive = inconclusive

    @property
    def circuit_open(self) -> bool:
        """Whether no request was sent: the origin's circuit is open."""
        return self.reason.startswith("circuit open")

    @property
    def answered(self) -> bool:
        """Whether the server answered, wrongly, rather than failed: a status
        below 500 other than 408/429 ("come back later"). Not an outage."""
        return self.status is not None and self.status < 500 and self.status not in (408, 429)


@dataclasses.dataclass(frozen=True, slots=True)
class HTTPResult:
    """A completed response: status, headers and the decoded JSON body."""

    status: int
    headers: Mapping[str, str]
    data: Any

    def header(self, name: str) -> str | None:
        """A response header, case-insensitively (``None`` when absent)."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


#: Locations (URLs) of one circuit whose failures in a row are counted apart.
_COUNTED_LOCATIONS = 64
#: A location that never had the half-open trial (it goes first).
_NEVER = float("-inf")
#: ``retry_after()`` of the circuit as a whole, not of one location.
_ANY_LOCATION: Any = object()


class CircuitBreaker:
    """Consecutive-failure circuit breaker (closed -> open -> half-open).

    Failures are counted in a row for the whole circuit (any answer or
    success ends the row: the origin is up) and for each location (URL) on
    its own (only that location's answer ends its row): a location that
    hangs opens the circuit even while another path of the same origin keeps
    answering 404 between its timeouts, and timeouts scattered over many
    answering locations never add up.

    The half-open trial is shared between locations in turn: a location
    yields it to another that asked for a call within the last two waits
    and had its last trial longer ago (or never). Otherwise the clients of
    a hung URL, retrying as soon as they are told to, would take every
    trial, and another URL of the same origin (a second Keycloak realm)
    would never be asked again while the hung one stays hung. A location
    yields only while the other keeps asking.

    :param failures: failures in a row that open the circuit.
    :param reset: seconds the circuit stays open before one trial call.
    :param clock: time source (seconds; only differences are used).
    """

    def __init__(
        self, failures: int, reset: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self._count = 0
        #: location (the URL's SHA-256) -> its failures in a row (bounded: a
        #: flood of forged ``jku`` URLs names a new location per request)
        self._located: BoundedFifo[bytes | None, int] = BoundedFifo(_COUNTED_LOCATIONS)
        self._opened_at: float | None = None
        #: how long the server asked us to wait (``Retry-After`` of its last
        #: 429/503), if longer than ``reset``: the circuit stays open as long
        self._asked = 0.0
        self._trial = False
        #: while the circuit is open: when each location last had the trial,
        #: and when each location was last refused (it is waiting for one)
        self._turns: BoundedFifo[bytes | None, float] = BoundedFifo(_COUNTED_LOCATIONS)
        self._waiting: BoundedFifo[bytes | None, float] = BoundedFifo(_COUNTED_LOCATIONS)
        self._lock = threading.Lock()

    @property
    def _wait(self) -> float:
        """Seconds the circuit stays open before a trial call."""
        return max(self.reset, self._asked)

    @property
    def is_open(self) -> bool:
        """Whether calls are currently refused (to every location)."""
        with self._lock:
            return self._open_locked(self._clock())

    def is_open_for(self, location: bytes | None) -> bool:
        """Whether a call to ``location`` would be refused now (the circuit is
        open, or the location yields the trial to another); claims nothing."""
        with self._lock:
            now = self._clock()
            return self._open_locked(now) or self._ahead_of(location, now) is not None

    def _open_locked(self, now: float) -> bool:
        if self._opened_at is None:
            return False
        # A clock stepped back before the opening ends the wait.
        return 0 <= now - self._opened_at < self._wait or self._trial

    def _ahead_of(self, location: bytes | None, now: float) -> float | None:
        """When the latest asking location due a trial before ``location``
        asked (``None``: none is), while the circuit is open."""
        if self._opened_at is None:
            return None
        own = self._turns.get(location, _NEVER)
        ahead = [
            asked
            for other, asked in self._waiting.items()
            if other != location
            and 0 <= now - asked < 2 * self._wait
            and self._turns.get(other, _NEVER) < own
        ]
        return max(ahead, default=None)

    def _refuse_locked(self, location: bytes | None) -> bool:
        """Refuse a call to ``location`` (noting that it waits), or let it
        through, claiming the half-open trial when the circuit is open."""
        if self._opened_at is None:
            return False
        now = self._clock()
        if self._open_locked(now) or self._ahead_of(location, now) is not None:
            self._waiting.put(location, now)
            return True
        self._trial = True
        self._turns.put(location, now)
        self._waiting.pop(location, None)
        return False

    def allow(self, location: bytes | None = None) -> bool:
        """Whether a call (to ``location``) may go out now (claims the half-open trial)."""
        with self._lock:
            return not self._refuse_locked(location)

    def retry_after(self, location: bytes | None = _ANY_LOCATION) -> int:
        """Whole seconds until the next trial call (to ``location``, when
        given) may go out, at least 1: the end of the wait, or for a location
        that yields, the moment the one ahead of it stops counting as asking."""
        with self._lock:
            if self._opened_at is None:
                return 1
            now = self._clock()
            elapsed = now - self._opened_at
            if 0 <= elapsed < self._wait:
                return max(1, int(self._wait - elapsed) + 1)
            ahead = None if location is _ANY_LOCATION else self._ahead_of(location, now)
            if ahead is None:
                return 1
            return max(1, int(ahead + 2 * self._wait - now) + 1)

    def record_success(self) -> None:
        """Close the circuit, and forget every location's failures."""
        with self._lock:
            self._count = 0
            self._located.clear()
            self._close_locked()

    def _close_locked(self) -> None:
        self._opened_at = None
        self._asked = 0.0
        self._trial = False
        self._turns.clear()
        self._waiting.clear()

    def record_answer(self, location: bytes | None = None) -> None:
        """An answer that is wrong (a 4xx, an HTML page): the server is up.

        It closes the circuit and ends the circuit's row of failures, but
        only ``location``'s own: another location of the same origin that
        keeps timing out (a key set fallback beside a quick 404) still opens
        the circuit.
        """
        with self._lock:
            self._count = 0
            self._located.pop(location, None)
            self._close_locked()

    def record_failure(self, location: bytes | None = None, asked: int | None = None) -> None:
        """Count a failure (of ``location``); open (or re-open) the circuit
        when the circuit's row, or the location's, reaches the threshold.

        :param asked: the server's ``Retry-After`` (seconds): an open circuit
            waits at least that long before its trial call.
        """
        with self._lock:
            self._asked = float(asked or 0)
            self._count += 1
            in_a_row = self._located.get(location, 0) + 1
            self._located.put(location, in_a_row)
            self._trial = False
            if self._count >= self.failures or in_a_row >= self.failures:
                self._opened_at = self._clock()

    def after_fork(self) -> None:
        """In a forked child: a lock no parent thread holds, and no trial
        call claimed (the parent thread making it does not exist here: the
        child would refuse every call of the circuit for good)."""
        self._lock = threading.Lock()
        self._trial = False

    def record_inconclusive(self) -> None:
        """A call that says nothing of the server (cut off by the caller's
        budget): no failure, no success; a half-open trial may go out again."""
        with self._lock:
            self._trial = False


class _CutOff(Exception):
    """The watchdog cut a call off at its budget (see :meth:`Fetcher.request`)."""


class _Call(Generic[T]):
    __slots__ = ("done", "error", "followers", "value")

    def __init__(self) -> None:
        # Created by the first follower (under the flight's lock): a call
        # nobody waits for, the usual case, costs no Event.
        self.done: threading.Event | None = None
        self.followers = 0
        self.value: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """At most one call per key at a time; concurrent callers share its outcome.

    The first caller for a key (the leader) runs the function; callers that
    arrive while it runs wait for it and get the same value, or a copy of the
    same exception. A caller that waits longer than ``timeout`` gets
    :class:`TimeoutError`.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call[T]] = {}
        # A child forked while a call ran would wait for (or keep serving
        # around) a leader that does not exist in it, on every request.
        reset_in_child(self, SingleFlight.reset)

    def running(self, key: Hashable) -> bool:
        """Whether a call for ``key`` is under way."""
        return key in self._calls

    def followers(self, key: Hashable) -> int:
        """How many callers wait for the call of ``key`` under way."""
        call = self._calls.get(key)
        return 0 if call is None else call.followers

    def run(self, key: Hashable, function: Callable[[], T], *, timeout: float) -> T:
        """Run ``function`` once for all concurrent callers of ``key``.

        :param key: what the call is about (an issuer, a URL).
        :param function: the call, run by the leader only.
        :param timeout: how long a follower waits for the leader.
        :raises TimeoutError: a follower waited longer than ``timeout``.
        """
        reset_if_forked()  # before this process's first call: not the parent's calls
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
            else:
                call.followers += 1
                if call.done is None:
                    call.done = threading.Event()
                done = call.done
        if not leader:
            if not done.wait(timeout):
                raise TimeoutError("the call under way did not finish in time")
            if call.error is not None:
                raise copy.copy(call.error)
            return call.value  # type: ignore[return-value]
        try:
            call.value = function()
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                if self._calls.get(key) is call:  # not forgotten by a reset meanwhile
                    del self._calls[key]
                event = call.done  # every follower of this call has made it by now
            if event is not None:
                event.set()
        return call.value

    def reset(self) -> None:
        """Forget calls under way (in a forked child, whose leaders are gone)."""
        self._lock = threading.Lock()
        self._calls = {}


#: Media types a JSON document may come with. Static hosting (object
#: stores, CDNs) often labels a ``jwks.json`` file as plain text or octets;
#: HTML (a login or error page), XML, images and the like are refused.
_JSON_TYPES = frozenset(
    {
        "application/json",
        "text/json",
        "text/plain",
        "application/octet-stream",
        "binary/octet-stream",
    }
)


#: An OAuth error code (RFC 6749 §5.2: NQSCHAR), at most 64 characters.
_OAUTH_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")


def _is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


class Fetcher:
    """Makes the outgoing requests of one app, with one policy.

    :param settings: timeouts, size cap, insecure-http and breaker settings.
    :param clock: the circuit breakers' time source.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._session = self._new_session()
        self._breakers: dict[str, CircuitBreaker] = {}
        #: breakers of single URLs (key sets named by a token's jku): bounded,
        #: apart from the origins', so a flood of URLs never evicts those
        self._url_breakers: BoundedFifo[bytes, CircuitBreaker] = BoundedFifo(_URL_BREAKERS)
        self._checked_urls: set[str] = set()
        self._lock = threading.Lock()
        #: requests that went out (not refused by a circuit), by any thread:
        #: whether a call was made in between, for callers that ask
        self.sent = 0
        # A pre-forking server (gunicorn --preload) forks after init_app:
        # pooled connections must not be shared between processes.
        reset_in_child(self, Fetcher._after_fork)

    def _new_session(self) -> requests.Session:
        session = watched_session()
        session.headers["User-Agent"] = _USER_AGENT
        # No proxy, CA bundle or netrc picked up from the environment: only
        # what the settings say (HTTP_PROXY, HTTP_CA_BUNDLE).
        session.trust_env = False
        if self.settings.http_proxy is not None:
            proxy = self.settings.http_proxy
            session.proxies = {"http": proxy, "https": proxy}
        if self.settings.http_ca_bundle is not None:
            session.verify = self.settings.http_ca_bundle
        # A verifier is stateless: a cookie one endpoint sets is never sent
        # (to it or to another port of its host) and never kept (no jar growing
        # with each answer, no Cookie header an endpoint refuses as too large).
        session.cookies.set_policy(_NO_COOKIES)
        return session

    @property
    def budget(self) -> float:
        """The most one request may take (connect + read timeout), seconds."""
        connect, read = self.settings.http_timeout
        return connect + read

    def breaker(self, url: str, *, scope: BreakerScope = "origin") -> CircuitBreaker:
        """The circuit breaker that guards a request to ``url``.

        :param scope: ``"origin"`` (keys, discovery): one per origin;
            ``"endpoint"``: ``url``'s own, for a configured endpoint that
            tokens make fail (introspection), so it never closes the origin
            to key fetching; ``"token"``: ``url``'s own, for a URL a token
            chose (``jku``), kept in a bounded store so a flood of them evicts
            only their like.
        """
        with self._lock:
            if scope == "token":
                digest = url_digest(url)
                breaker = self._url_breakers.get(digest)
                if breaker is None:
                    breaker = self._new_breaker()
                    self._url_breakers.put(digest, breaker)
                return breaker
            key = url if scope == "endpoint" else _origin(url)
            breaker = self._breakers.get(key)
            if breaker is None:
                breaker = self._breakers[key] = self._new_breaker()
            return breaker

    def _new_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(
            self.settings.circuit_breaker_failures,
            self.settings.circuit_breaker_reset,
            self._clock,
        )

    def get_json(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        breaker: BreakerScope = "origin",
        budget: float | None = None,
    ) -> HTTPResult:
        """GET ``url`` and decode a JSON body; 304 is returned with ``data=None``.

        :param breaker: which circuit breaker guards the call (see :meth:`breaker`).
        :param budget: the most the call may take, seconds, when less than
            :attr:`budget` (what is left of a budget several calls share).
        :raises FetchError: on any failure (network, status, size, JSON).
        """
        return self.request(
            "GET", url, headers=headers, accept_not_modified=True, breaker=breaker, budget=budget
        )

    def post(
        self,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        breaker: BreakerScope = "origin",
    ) -> HTTPResult:
        """POST a form or JSON body to ``url`` and decode the JSON answer.

        :param breaker: which circuit breaker guards the call (see :meth:`breaker`).
        :raises FetchError: on any failure (network, status, size, JSON).
        """
        return self.request(
            "POST", url, data=data, json_body=json_body, headers=headers, breaker=breaker
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
        accept_not_modified: bool = False,
        breaker: BreakerScope | None = "origin",
        budget: float | None = None,
    ) -> HTTPResult:
        """Send one request under the policy; see the module docstring.

        :param breaker: which circuit breaker guards the call (see
            :meth:`breaker`); ``None``: none, and the outcome is recorded
            nowhere (a health probe, which must not open the circuit that
            requests depend on).
        :param budget: the most the call may take, seconds, when less than
            :attr:`budget` (what is left of a budget several calls share).
            Cut off by it, below half of :attr:`budget`, the call
            counts neither for nor against the circuit.
        :raises FetchError: on any failure, including an open circuit.
        """
        reset_if_forked()  # the parent's pool and locks are not this process's
        circuit = self.breaker(url, scope=breaker) if breaker is not None else _UNGUARDED
        if not circuit.allow(url_digest(url)):
            raise FetchError(f"circuit open for {_origin(url)}")
        self.sent += 1
        given = self.budget if budget is None else min(budget, self.budget)
        try:
            result = self._within_budget(
                lambda: self._send(method, url, headers, data, json_body, accept_not_modified),
                given,
            )
        except _CutOff:
            if given < self.budget * _FULL_BUDGET:
                # Cut off by what the caller had left (the earlier calls of a
                # shared budget spent the rest), not by the server's slowness:
                # it might have answered within a budget of its own. No outage
                # of the origin (which key fetching shares), nor a success.
                circuit.record_inconclusive()
                raise FetchError("timed out", inconclusive=True) from None
            circuit.record_failure(url_digest(url))
            raise FetchError("timed out") from None
        except FetchError as exc:
            # An answer below 500 (a 4xx, a redirect we refuse, a 200 that is not
            # JSON) is the server up and working as designed: our request or
            # credentials are wrong. Only outages count against the circuit.
            if exc.answered:
                circuit.record_answer(url_digest(url))
            else:
                circuit.record_failure(url_digest(url), exc.retry_after)
            raise
        except Exception as exc:
            # Whatever else an answer made go wrong, here or in a library: a
            # failed call like any other (a 503 to come), never an error of
            # the caller (an introspection call's became a 401).
            circuit.record_failure(url_digest(url))
            # Not the message: it may quote the URL (a credential in its
            # query) or what was sent (the token being introspected).
            logger.error(
                "A request to %s failed unexpectedly",
                _origin(url),
                exc_info=withheld_exc_info(exc),
            )
            raise FetchError(f"request failed: {type(exc).__name__}") from None
        circuit.record_success()
        return result

    def _within_budget(self, send: Callable[[], HTTPResult], budget: float) -> HTTPResult:
        """``send()``, cut off at the budget by the watchdog.

        The socket timeouts bound each read; the watchdog bounds the whole
        exchange, so a server trickling its status line, headers or body is
        cut off too.

        :raises _CutOff: when the watchdog cut it off (a timeout of a
            socket, never shortened by ``budget``, is a :class:`FetchError`).
        """
        try:
            with deadline(budget):
                return send()
        except DeadlineExpired:
            raise _CutOff from None

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
        json_body: Mapping[str, Any] | None,
        accept_not_modified: bool,
    ) -> HTTPResult:
        connect, read = self.settings.http_timeout
        ends_at = time.monotonic() + connect + read
        sending = {"headers": dict(headers or {}), "data": data, "json": json_body}
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_scheme(current)
            response = self._open(method, current, sending, ends_at)
            with response:
                if response.is_redirect:
                    location = response.headers.get("Location", "")
                    target = urljoin(current, location)
                    origin = _origin(target)
                    # user-info in a Location is no same-origin redirect of ours;
                    # an ambiguous URL equals no origin (see _origin)
                    if (
                        origin == _INVALID
                        or origin != _origin(current)
                        or "@" in urlsplit(location).netloc
                    ):
                        raise FetchError(
                            f"redirect to another origin refused ({origin})",
                            status=response.status_code,
                        )
                    current = target
                    continue
                status = response.status_code
                if accept_not_modified and status == 304:
                    return HTTPResult(304, dict(response.headers), None)
                if status != 200:
                    raise FetchError(
                        f"HTTP status {status}",
                        status=status,
                        retry_after=_retry_after(status, response.headers.get("Retry-After")),
                        oauth_error=(
                            # what an OAuth endpoint (introspection) said; a
                            # key set or metadata GET never needs it
                            self._oauth_error(response, ends_at)
                            if status == 400 and method == "POST"
                            else None
                        ),
                    )
                content_type = response.headers.get("Content-Type")
                if not _is_json_type(content_type):
                    media = (content_type or "").split(";", 1)[0].strip()[:64]
                    raise FetchError(f"the response is not JSON (Content-Type {media})", status=200)
                body = self._read_body(response, ends_at)
                return HTTPResult(status, dict(response.headers), _decode_json(body))
        raise FetchError("too many redirects")

    def _open(
        self, method: str, url: str, sending: dict[str, Any], ends_at: float
    ) -> requests.Response:
        """Send the request and read the status line and headers.

        Sent once more, on a new connection, when a kept-alive connection was
        closed before any answer: the server closed it as we took it from the
        pool (its idle timeout racing our request), which is no outage. Every
        request here is safe to repeat (a GET, an introspection POST). A new
        connection closed unanswered is a failure at once.
        """
        connect, read = self.settings.http_timeout
        for again in (False, True):
            remaining = ends_at - time.monotonic()
            if remaining <= 0:
                raise FetchError("timed out")
            try:
                return self._session.request(
                    method,
                    url,
                    timeout=(min(connect, remaining), min(read, remaining)),
                    allow_redirects=False,
                    stream=True,
                    **sending,
                )
            except requests.Timeout:
                raise FetchError("timed out") from None
            except requests.ConnectionError as exc:
                if not again and reused_connection() and _closed_unanswered(exc):
                    continue
                raise FetchError(f"connection failed: {type(exc).__name__}") from None
            except requests.RequestException as exc:
                raise FetchError(f"request failed: {type(exc).__name__}") from None
            except Exception as exc:  # e.g. a Location requests cannot parse
                raise FetchError(f"request failed: {type(exc).__name__}") from None
        raise FetchError("connection failed: closed before answering")

    def _check_scheme(self, url: str) -> None:
        if url in self._checked_urls:
            return  # the verdict depends on the URL and fixed settings only
        try:
            check_url(url, "HTTP", allow_insecure_http=self.settings.allow_insecure_http)
        except ConfigurationError:
            raise FetchError(f"insecure or invalid URL refused ({_origin(url)})") from None
        if len(self._checked_urls) < _CHECKED_URLS:
            self._checked_urls.add(url)

    def _oauth_error(self, response: requests.Response, ends_at: float) -> str | None:
        """The ``error`` code of an OAuth error answer (RFC 6749 §5.2), if
        the body is a JSON object with a well-formed one; else ``None``."""
        if not _is_json_type(response.headers.get("Content-Type")):
            return None
        try:
            body = self._read_body(response, ends_at)
        except FetchError as exc:
            if exc.status is None:
                raise  # the body stalled or broke off: a failed call, as for a 200
            return None  # too large: an answer without a code we read
        try:
            data = _decode_json(body)
        except FetchError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str) and _OAUTH_ERROR_CODE.fullmatch(error):
            return error
        return None

    def _read_body(self, response: requests.Response, ends_at: float) -> bytes:
        limit = self.settings.http_max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"response larger than {limit} bytes", status=response.status_code)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        f"response larger than {limit} bytes", status=response.status_code
                    )
                if time.monotonic() > ends_at:
                    raise FetchError("timed out")
                chunks.append(chunk)
        except (requests.RequestException, http.client.HTTPException, ValueError) as exc:
            # ValueError: urllib3 reads a negative chunk size as a count
            raise FetchError(f"reading the body failed: {type(exc).__name__}") from None
        return b"".join(chunks)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def _after_fork(self) -> None:
        """In a forked child: a new pool, and locks no parent thread holds."""
        self._session = self._new_session()
        self._lock = threading.Lock()
        for breaker in [*self._breakers.values(), *self._url_breakers.values()]:
            breaker.after_fork()


def _closed_unanswered(exc: requests.ConnectionError) -> bool:
    """Whether the connection was closed (or reset) before any answer."""
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.ProtocolError) and len(reason.args) > 1:
        reason = reason.args[1]
    # http.client.RemoteDisconnected (closed before the status line) is one
    return isinstance(reason, ConnectionResetError | BrokenPipeError)


#: The longest ``Retry-After`` of a server passed on to our clients (seconds).
MAX_RETRY_AFTER = 300


def _retry_after(status: int, value: str | None) -> int | None:
    """A 429 or 503 answer's ``Retry-After`` (RFC 9110 §10.2.3: seconds or an
    HTTP date) as whole seconds from now, 1 to :data:`MAX_RETRY_AFTER`;
    ``None`` for another status or a value that is neither."""
    if status not in (429, 503) or not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0") or "0"
        seconds = MAX_RETRY_AFTER if len(digits) > 6 else int(digits)  # no huge int()
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = math.ceil(when.timestamp() - time.time())
    return min(max(seconds, 1), MAX_RETRY_AFTER)


def url_digest(url: str) -> bytes:
    """What a bounded memory of token-chosen URLs keys on (the ``jku``
    breakers here, the key store's refused URLs): 32 bytes, however long the
    URL (a flood of 10 KiB ``jku`` URLs kept thousands of them whole)."""
    return hashlib.sha256(url.encode()).digest()


#: Characters no URL we follow may hold: parsers disagree on where the
#: host ends around them (``https://evil\\@good/`` is ``good`` to urllib's
#: parser and ``evil`` to the one requests connects with).
_AMBIGUOUS = frozenset("\\\t\r\n ")
_INVALID = "invalid-url"


@functools.lru_cache(maxsize=256)
def _origin(url: str) -> str:
    """``scheme://host:port`` of ``url``, as the HTTP client will connect to it.

    ``"invalid-url"`` when the URL cannot be parsed, holds a character
    parsers read differently, or when :func:`urllib.parse.urlsplit` and
    urllib3's parser (which requests connects with) disagree on the host or
    port; a redirect to such a URL is refused (see :meth:`Fetcher._send`).
    """
    if _AMBIGUOUS.intersection(url):
        return _INVALID
    try:
        parts = urlsplit(url)
        port = parts.port
        connected = urllib3.util.parse_url(url)
    except (ValueError, urllib3.exceptions.LocationParseError):
        return _INVALID
    host = (connected.host or "").strip("[]").lower()
    if host != (parts.hostname or "") or (connected.port or None) != (port or None):
        return _INVALID
    return f"{parts.scheme}://{parts.hostname}:{port or ''}"


def _decode_json(body: bytes) -> Any:
    """The body as strict JSON: a member named twice (which parsers resolve
    differently), ``NaN`` or nesting deeper than :data:`_MAX_DEPTH` make it
    "not JSON"."""
    try:
        data = STRICT_DECODER.decode(body.decode(json.detect_encoding(body)))
        too_deep = _too_deep(data)
    except (ValueError, UnicodeDecodeError):
        raise FetchError("the response is not JSON", status=200) from None
    except RecursionError:  # past the parser's own limit
        too_deep = True
    if too_deep:
        raise FetchError(
            f"the response is not JSON (nested deeper than {_MAX_DEPTH} levels)", status=200
        )
    return data


def _too_deep(data: Any) -> bool:
    """Whether arrays and objects nest deeper than :data:`_MAX_DEPTH` (no recursion)."""
    pending: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, dict | list) else []
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                if depth >= _MAX_DEPTH:
                    return True
                pending.append((child, depth + 1))
    return False
