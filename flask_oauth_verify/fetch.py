"""The one fetch policy shared by key, discovery and introspection requests.

* connect/read timeouts (``OAUTH_VERIFY_HTTP_TIMEOUT``) and an overall
  deadline, so no request waits longer than the configured budget;
* redirects followed only within the same origin (scheme, host, port), at
  most three; a redirect to another host is an error;
* ``http://`` only to loopback hosts unless ``ALLOW_INSECURE_HTTP``;
* the body read in chunks and refused past ``OAUTH_VERIFY_HTTP_MAX_BYTES``;
* a circuit breaker per origin: after ``CIRCUIT_BREAKER_FAILURES``
  consecutive failures, calls fail at once for ``CIRCUIT_BREAKER_RESET``
  seconds, then one trial call is let through (half-open).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from .config import ConfigurationError, Settings, check_url

__all__ = ["CircuitBreaker", "FetchError", "Fetcher", "HTTPResult"]

_MAX_REDIRECTS = 3
_USER_AGENT = "flask-oauth-verify"


class FetchError(Exception):
    """A fetch failed; ``reason`` says how (for logs), never with a token.

    :param reason: short description (timeout, connection refused, status).
    :param status: the HTTP status when one was received.
    """

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True)
class HTTPResult:
    """A completed response: status, headers and the decoded JSON body."""

    status: int
    headers: Mapping[str, str]
    data: Any


class CircuitBreaker:
    """Consecutive-failure circuit breaker (closed -> open -> half-open).

    :param failures: failures in a row that open the circuit.
    :param reset: seconds the circuit stays open before one trial call.
    :param clock: time source (monotonic seconds).
    """

    def __init__(
        self, failures: int, reset: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether calls are currently refused."""
        with self._lock:
            return self._refuse_locked(claim_trial=False)

    def _refuse_locked(self, *, claim_trial: bool) -> bool:
        if self._opened_at is None:
            return False
        if self._clock() - self._opened_at < self.reset:
            return True
        if self._trial:
            return True  # one trial call is already under way
        if claim_trial:
            self._trial = True
        return False

    def allow(self) -> bool:
        """Whether a call may go out now (claims the half-open trial)."""
        with self._lock:
            return not self._refuse_locked(claim_trial=True)

    def retry_after(self) -> int:
        """Seconds until the next trial call may go out."""
        with self._lock:
            if self._opened_at is None:
                return 1
            return max(1, int(self.reset - (self._clock() - self._opened_at)) + 1)

    def record_success(self) -> None:
        """Close the circuit."""
        with self._lock:
            self._count = 0
            self._opened_at = None
            self._trial = False

    def record_failure(self) -> None:
        """Count a failure; open (or re-open) the circuit past the threshold."""
        with self._lock:
            self._count += 1
            self._trial = False
            if self._count >= self.failures:
                self._opened_at = self._clock()


class Fetcher:
    """Makes the outgoing requests of one app, with one policy.

    :param settings: timeouts, size cap, insecure-http and breaker settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session = requests.Session()
        self._session.headers["User-Agent"] = _USER_AGENT
        self._session.trust_env = False  # no proxies/netrc picked up implicitly
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def breaker(self, url: str) -> CircuitBreaker:
        """The circuit breaker of ``url``'s origin."""
        origin = _origin(url)
        with self._lock:
            breaker = self._breakers.get(origin)
            if breaker is None:
                breaker = CircuitBreaker(
                    self.settings.circuit_breaker_failures, self.settings.circuit_breaker_reset
                )
                self._breakers[origin] = breaker
            return breaker

    def get_json(self, url: str, *, headers: Mapping[str, str] | None = None) -> HTTPResult:
        """GET ``url`` and decode a JSON body; 304 is returned with ``data=None``.

        :raises FetchError: on any failure (network, status, size, JSON).
        """
        return self.request("GET", url, headers=headers, accept_not_modified=True)

    def post(
        self,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HTTPResult:
        """POST a form or JSON body to ``url`` and decode the JSON answer.

        :raises FetchError: on any failure (network, status, size, JSON).
        """
        return self.request("POST", url, data=data, json_body=json_body, headers=headers)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
        accept_not_modified: bool = False,
    ) -> HTTPResult:
        """Send one request under the policy; see the module docstring.

        :raises FetchError: on any failure, including an open circuit.
        """
        breaker = self.breaker(url)
        if not breaker.allow():
            raise FetchError(f"circuit open for {_origin(url)}")
        try:
            result = self._send(method, url, headers, data, json_body, accept_not_modified)
        except FetchError as exc:
            # 4xx answers are the server working as designed (our request or
            # credentials are wrong); only outages count against the circuit.
            if exc.status is not None and 400 <= exc.status < 500:
                breaker.record_success()
            else:
                breaker.record_failure()
            raise
        breaker.record_success()
        return result

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
        deadline = time.monotonic() + connect + read
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_scheme(current)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timed out")
            try:
                response = self._session.request(
                    method,
                    current,
                    headers=dict(headers or {}),
                    data=data,
                    json=json_body,
                    timeout=(min(connect, remaining), min(read, remaining)),
                    allow_redirects=False,
                    stream=True,
                )
            except requests.Timeout:
                raise FetchError("timed out") from None
            except requests.ConnectionError as exc:
                raise FetchError(f"connection failed: {type(exc).__name__}") from None
            except requests.RequestException as exc:
                raise FetchError(f"request failed: {type(exc).__name__}") from None
            with response:
                if response.is_redirect:
                    target = urljoin(current, response.headers.get("Location", ""))
                    if _origin(target) != _origin(current):
                        raise FetchError(
                            f"redirect to another origin refused ({_origin(target)})",
                            status=response.status_code,
                        )
                    current = target
                    continue
                if accept_not_modified and response.status_code == 304:
                    return HTTPResult(304, dict(response.headers), None)
                body = self._read_body(response, deadline)
                status = response.status_code
                if status != 200:
                    raise FetchError(f"HTTP status {status}", status=status)
                return HTTPResult(status, dict(response.headers), _decode_json(body))
        raise FetchError("too many redirects")

    def _check_scheme(self, url: str) -> None:
        try:
            check_url(url, "HTTP", allow_insecure_http=self.settings.allow_insecure_http)
        except ConfigurationError:
            raise FetchError(f"insecure or invalid URL refused ({_origin(url)})") from None

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        limit = self.settings.http_max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"response larger than {limit} bytes", status=response.status_code)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=16384):
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        f"response larger than {limit} bytes", status=response.status_code
                    )
                if time.monotonic() > deadline:
                    raise FetchError("timed out")
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise FetchError(f"reading the body failed: {type(exc).__name__}") from None
        return b"".join(chunks)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError("the response is not JSON", status=200) from None
