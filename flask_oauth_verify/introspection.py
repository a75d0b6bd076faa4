"""OAuth 2.0 Token Introspection client (RFC 7662).

For opaque (reference) tokens, and for JWTs on routes where revocation must
take effect at once (``strategy="both"``), the authorization server is asked
whether the token is active:

* ``POST`` to ``INTROSPECTION_ENDPOINT`` (else the ``introspection_endpoint``
  of the issuer's discovery metadata) with ``token=…&token_type_hint=
  access_token`` as a form (RFC 7662 §2.1), or ``{"token": …}`` as JSON for
  the providers that want that (``INTROSPECTION_BODY = "json"``);
* the resource server authenticates with ``client_secret_basic`` (default;
  the credentials form-encoded first as RFC 6749 §2.3.1 says, or as they
  are with ``INTROSPECTION_BASIC_ENCODING = "raw"``),
  ``client_secret_post``, a bearer token (``INTROSPECTION_AUTH = "bearer"``)
  or not at all (``"none"``), through Authlib's client-authentication
  helpers (:class:`authlib.oauth2.auth.ClientAuth`,
  :func:`authlib.oauth2.rfc6750.add_bearer_token`);
* the request goes through the app's one fetch policy
  (:class:`~flask_oauth_verify.fetch.Fetcher`: timeouts, size cap, redirects,
  circuit breaker); the endpoint has a circuit breaker of its own, so
  tokens that make it fail (anyone can send opaque tokens) never close the
  origin to key fetching.

The answer is handled strictly: only the JSON boolean ``true`` in ``active``
makes a token active (``"true"``, ``1`` or a missing member are inactive).
``iss``, ``aud``, ``exp``, ``nbf``, ``iat``, ``token_type`` and
``token_use`` are checked like JWT claims when present; ``exp`` and ``aud``
are optional (RFC 7662 §2.2) unless listed in ``REQUIRED_CLAIMS``.

Every failure to get an answer — timeout, refused or dropped connection,
5xx, a body that is not a JSON object, 401/403 (our credentials are wrong),
any other 4xx (our request is wrong), an open circuit, no endpoint — is an
:class:`~flask_oauth_verify.errors.UpstreamError` (503 with ``Retry-After``)
and an ERROR log record that says which: a misconfigured resource server
must never look like a client with a bad token.

Results are cached only when ``INTROSPECTION_CACHE_TTL`` > 0, under the
SHA-256 of the token and a hash of who was asked (the endpoint, or the
issuers it is discovered from, and our client id), for at most
``min(TTL, exp - now)``; inactive answers only when
``INTROSPECTION_NEGATIVE_CACHE_TTL`` > 0. Concurrent requests for
the same token in one process share one call (single flight).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote

from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6750 import add_bearer_token

from .bearer import is_b64token
from .cache import SharedCache, cache_key, shared_time
from .config import Settings
from .discovery import Discovery
from .errors import InvalidTokenError, UpstreamError
from .fetch import Fetcher, FetchError, SingleFlight
from .fifo import BoundedFifo
from .issuers import is_template
from .verification import JWTVerifier, finite_number, unsecured_jws

__all__ = ["ACCESS_TOKEN_TYPES", "Introspector", "discover_endpoint"]

logger = logging.getLogger("flask_oauth_verify.introspection")

EventSink = Callable[[str, Mapping[str, Any]], None]

#: ``token_type`` values (compared case-insensitively) that an access token
#: presented as a bearer token may carry. A refresh token, an ID token or a
#: sender-constrained (``DPoP``) token is refused.
ACCESS_TOKEN_TYPES = frozenset(
    {"bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token"}
)
#: ``token_use`` values (ORY Hydra, Cognito style) that mean an access token.
_ACCESS_TOKEN_USES = frozenset({"access_token", "access"})

#: The answer of an endpoint that will not introspect this kind of token
#: (``400`` with ``unsupported_token_type``, RFC 7009's code, which
#: oidc-provider sends for any token shaped like a JWT): a decision on the
#: token, which is refused like an inactive one, not an outage.
_NOT_INTROSPECTED: Mapping[str, Any] = MappingProxyType(
    {"active": False, "error": "unsupported_token_type"}
)

#: Seconds clients are told to wait after a failure that a retry may cure.
_RETRY_TRANSIENT = 5
#: ... and after one that needs an operator (credentials, endpoint URL).
_RETRY_MISCONFIGURED = 30
#: Minimum seconds between two ERROR records for the same kind of failure
#: when the circuit is open (one record per failed call otherwise).
_LOG_INTERVAL = 10.0


class _Failure(NamedTuple):
    """Why no answer could be had: ``kind`` for metrics, ``detail`` for logs."""

    kind: str
    detail: str
    retry_after: int


def _classify(exc: FetchError) -> tuple[str, str, int]:
    """Map a fetch failure to ``(kind, what to tell the operator, retry_after)``."""
    status = exc.status
    reason = exc.reason
    if status in (401, 403):
        return (
            "credentials_rejected",
            f"the endpoint refused our client authentication (HTTP {status}); check "
            "OAUTH_VERIFY_INTROSPECTION_AUTH, _CLIENT_ID, _CLIENT_SECRET / _TOKEN",
            _RETRY_MISCONFIGURED,
        )
    if status in (408, 429):
        # The server is up but busy (rate limit, request timeout): transient;
        # its own Retry-After, when it sent one, is what our clients wait.
        retry = max(exc.retry_after or 0, _RETRY_TRANSIENT)
        return "rate_limited", f"the endpoint is busy (HTTP {status})", retry
    if status is not None and 400 <= status < 500:
        return (
            "request_rejected",
            f"the endpoint rejected our request (HTTP {status}); check "
            "OAUTH_VERIFY_INTROSPECTION_ENDPOINT and OAUTH_VERIFY_INTROSPECTION_BODY",
            _RETRY_MISCONFIGURED,
        )
    if reason.startswith(("redirect", "too many redirects", "insecure")):
        return (
            "redirect_refused",
            f"{reason}; point OAUTH_VERIFY_INTROSPECTION_ENDPOINT at the final URL",
            _RETRY_MISCONFIGURED,
        )
    if status is not None and status >= 500:
        retry = max(exc.retry_after or 0, _RETRY_TRANSIENT)
        return "server_error", f"the endpoint failed (HTTP {status})", retry
    if reason.startswith("the response is not JSON ("):
        return "invalid_response", f"the endpoint's answer is {reason[16:]}", _RETRY_TRANSIENT
    if reason.startswith("the response is not JSON"):
        return "invalid_response", "the endpoint answered with a non-JSON body", _RETRY_TRANSIENT
    if reason.startswith("response larger than"):
        return (
            "invalid_response",
            f"the endpoint's answer is too large ({reason}: OAUTH_VERIFY_HTTP_MAX_BYTES)",
            _RETRY_TRANSIENT,
        )
    if reason.startswith("timed out"):
        return "timeout", "the endpoint did not answer in time (HTTP_TIMEOUT)", _RETRY_TRANSIENT
    if reason.startswith("circuit open"):
        return "circuit_open", f"not calling the endpoint: {reason}", _RETRY_TRANSIENT
    if reason.startswith(("connection failed", "reading the body failed")):
        return "unreachable", f"the endpoint is unreachable ({reason})", _RETRY_TRANSIENT
    return "fetch_failed", reason, _RETRY_TRANSIENT


class Introspector:
    """Asks the authorization server whether a token is active (RFC 7662).

    One per app, created by the extension on first use.

    :param settings: the app's settings (``INTROSPECTION_*`` keys).
    :param cache: the shared cache (results, when caching is on).
    :param fetcher: the app's fetch policy, shared with key fetching.
    :param discovery: finds ``introspection_endpoint`` when not configured.
    :param verifier: checks the response's claims like a JWT's.
    :param clock: wall-clock seconds (tests pass a fake clock).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        settings: Settings,
        cache: SharedCache,
        fetcher: Fetcher,
        discovery: Discovery,
        verifier: JWTVerifier,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.discovery = discovery
        self.verifier = verifier
        self.clock = clock
        #: A templated issuer limited to ALLOWED_TENANTS: an answer must name
        #: its issuer (so its tenant); without ``iss`` any tenant got through.
        self._answer_needs_iss = settings.allowed_tenants is not None and any(
            is_template(issuer) for issuer in settings.issuers
        )
        #: Receives security events ``(name, fields)``; set by the extension.
        self.on_event: EventSink | None = None
        #: Per-process copies of cached answers: key -> (until, response).
        self._memo: BoundedFifo[str, tuple[float, Mapping[str, Any]]] = BoundedFifo(
            settings.token_cache_size
        )
        #: No answer is reused longer than this from now (a clock stepped back).
        self._longest_ttl = settings.introspection_longest_reuse
        self._flights: SingleFlight[tuple[Mapping[str, Any] | None, _Failure | None]] = (
            SingleFlight()
        )
        self._last_logged: dict[str, float] = {}
        self._auth_by_url: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self._kind = "introspection:" + answer_scope(settings)
        connect, read = settings.http_timeout
        # A follower waits for the leader's call: discovery plus the POST,
        # each bounded by the fetch policy's overall deadline.
        self._follower_wait = 2 * (connect + read) + 1.0

    # -- the public call ------------------------------------------------------

    def introspect(self, token: str, now: float) -> Mapping[str, Any]:
        """Return the claims of the active ``token``'s introspection response.

        :param token: the access token from the request (never logged).
        :param now: the current time, seconds since the epoch.
        :raises InvalidTokenError: (or a subclass) when the token is inactive
            or the response's claims fail a check.
        :raises UpstreamError: when the endpoint gives no usable answer.
        """
        return self.introspect_until(token, now)[0]

    def introspect_until(
        self, token: str, now: float, digest: bytes | None = None, *, confirm: bool = False
    ) -> tuple[Mapping[str, Any], float | None]:
        """:meth:`introspect`, plus until when this process may reuse the answer.

        :param digest: the token's SHA-256, when the caller has it already.
        :param confirm: the answer only confirms that a verified JWT is still
            active (``strategy="both"``): it is checked as an answer
            (``active``, and ``iss``, ``aud``, ``exp``, ``nbf``, ``iat`` and the
            token type when present) but not for ``REQUIRED_CLAIMS``,
            ``REQUIRED_CLAIM_VALUES`` or ``ALLOWED_CLIENT_IDS``, which the
            JWT's claims passed: a minimal answer such as VoxKey's is enough.

        :returns: the checked claims, and the deadline of the cached answer
            (``None`` when it is not cached: caching off, or a concurrent
            call's answer this process did not keep).
        """
        if len(token) > self.settings.max_token_bytes:
            raise InvalidTokenError(
                reason=f"token longer than {self.settings.max_token_bytes} bytes"
            )
        if not confirm and unsecured_jws(token):  # ("both" verified the JWT first)
            # Never an access token, and some servers answer it with an error
            # (Keycloak: 400 invalid_request), which would read as an outage.
            raise InvalidTokenError(reason="an unsecured JWT (alg none or no alg)")
        key = cache_key(self._kind, token, digest)
        response = self._cached(key, now)
        if response is None:
            response = self._single_flight(key, token, now)
        else:
            self._emit("introspection_cache_hit", {})
        checked = self._check(response, now, extra=not confirm)
        remembered = self._memo.get(key)
        return checked, remembered[0] if remembered is not None else None

    def note_cache_hit(self) -> None:
        """Count an answer served from the per-process context cache."""
        self._emit("introspection_cache_hit", {})

    # -- checks -----------------------------------------------------------------

    def _check(
        self, response: Mapping[str, Any], now: float, *, extra: bool = True
    ) -> Mapping[str, Any]:
        """Apply RFC 7662 §2.2 strictly, then the JWT claim checks (without the
        configured extra ones unless ``extra``)."""
        active = response.get("active")
        if active is not True:
            if response is _NOT_INTROSPECTED:
                raise InvalidTokenError(
                    reason="introspection: the endpoint does not introspect this kind of "
                    "token (unsupported_token_type)"
                )
            if active is None or active is False:
                raise InvalidTokenError(reason="introspection: the token is not active")
            # "true", 1, ... : a sloppy or hostile answer is never "active".
            raise InvalidTokenError(reason="introspection: 'active' is not the JSON boolean true")
        if "iss" in response or (extra and self._answer_needs_iss):
            # exact match against the configured issuers, as for a JWT (a
            # "both" answer confirms a JWT whose iss named the tenant)
            self.verifier.unverified_issuer(response, answer=True)
        self._check_token_type(response)
        # RFC 7662 makes aud optional; a server that answers with the token's
        # own claims (Keycloak) leaves it out only when the token has none.
        require_audience = extra and self.settings.introspection_require_audience
        self.verifier.check_claims(
            response, now, require_exp=False, require_audience=require_audience, extra=extra
        )
        return response

    @staticmethod
    def _check_token_type(response: Mapping[str, Any]) -> None:
        token_type = response.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() not in ACCESS_TOKEN_TYPES
        ):
            raise InvalidTokenError(
                reason=f"introspection: token_type {str(token_type)[:40]!r} is not an access token"
            )
        token_use = response.get("token_use")
        if token_use is not None and (
            not isinstance(token_use, str) or token_use.lower() not in _ACCESS_TOKEN_USES
        ):
            raise InvalidTokenError(
                reason=f"introspection: token_use {str(token_use)[:40]!r} is not an access token"
            )

    # -- caching ------------------------------------------------------------------

    @property
    def caching(self) -> bool:
        """Whether any result (active or inactive) is cached."""
        return (
            self.settings.introspection_cache_ttl > 0
            or self.settings.introspection_negative_cache_ttl > 0
        )

    def _cached(self, key: str, now: float) -> Mapping[str, Any] | None:
        if not self.caching:
            return None
        remembered = self._memo.get(key)
        if remembered is not None:
            # This process's copy of a cached answer, with the same deadline:
            # a hit skips the shared backend's round trip and unpickling,
            # and never outlives what the shared cache would allow.
            # (never longer than a TTL from now: a clock stepped back would stretch it)
            if now < remembered[0] <= now + self._longest_ttl:
                return remembered[1]
            self._memo.pop(key, None)
        if not self._answers_in_cache():
            return None
        entry = self.cache.get(key)
        if not isinstance(entry, dict):
            return None
        until = entry.get("until")
        at = shared_time(entry.get("at"), now)  # a time from the future is not believed
        response = entry.get("response")
        if not finite_number(until) or at is None or not isinstance(response, dict):
            return None
        # Another app sharing the backend (same endpoint and client) may
        # cache for longer: reuse its answer only for our own TTL, counted
        # from the call that produced it (and never from a future "at").
        ttl = self._ttl_for(response)
        if now >= until:
            # The backend's own expiry runs on the real clock; ours decides.
            self.cache.delete(key)
            return None
        until = min(until, at + ttl, now + ttl)
        if now >= until:
            return None  # over for us, not for the app that stored it
        self._remember(key, until, response)
        return response

    def _answers_in_cache(self) -> bool:
        """Whether answers go to the cache as well as to this process's memo.

        Without a shared backend only this process would read them, and its
        memo holds them already, unless ``TOKEN_CACHE_SIZE`` is 0 (no memo).
        """
        return self.cache.is_shared or self._memo.size <= 0

    def _remember(self, key: str, until: float, response: Mapping[str, Any]) -> None:
        """Keep a cached answer in this process until ``until`` (bounded FIFO)."""
        self._memo.put(key, (until, response))

    def _ttl_for(self, response: Mapping[str, Any]) -> float:
        """How long this app may reuse ``response`` (active or inactive)."""
        if response.get("active") is True:
            return self.settings.introspection_cache_ttl
        return self.settings.introspection_negative_cache_ttl

    def _store(self, key: str, response: Mapping[str, Any], now: float) -> None:
        if response.get("active") is True:
            ttl = self.settings.introspection_cache_ttl
            exp = response.get("exp")
            if finite_number(exp):
                # Never remember an answer past the token's own expiry.
                ttl = min(ttl, exp - now)
            elif "exp" in response:
                return  # refused by the checks: nothing worth keeping
            stored: Mapping[str, Any] = response
        else:
            ttl = self.settings.introspection_negative_cache_ttl
            stored = {"active": False}
        if ttl <= 0:
            return
        if self._answers_in_cache():
            entry = {"until": now + ttl, "at": now, "response": dict(stored)}
            self.cache.set(key, entry, ttl)
        self._remember(key, now + ttl, dict(stored))

    # -- single flight ------------------------------------------------------------

    def _single_flight(self, key: str, token: str, now: float) -> Mapping[str, Any]:
        led: list[bool] = []  # set by the call when this request is the leader

        def call() -> tuple[Mapping[str, Any] | None, _Failure | None]:
            led.append(True)
            response, failure = self._call(token)
            if response is not None:
                active = response.get("active") is True
                self._emit("introspection_request", {"outcome": "active" if active else "inactive"})
                if self.caching:
                    self._store(key, response, now)
            return response, failure

        if self._flights.running(key):
            self._emit("introspection_coalesced", {})
        try:
            response, failure = self._flights.run(key, call, timeout=self._follower_wait)
        except TimeoutError:
            raise self._upstream(
                _Failure(
                    "timeout",
                    "a concurrent introspection call of the same token did not finish",
                    _RETRY_TRANSIENT,
                ),
                log=False,
            ) from None
        if response is None:
            # Only the leader logs: one outage, one error record.
            raise self._upstream(failure or _Failure("internal", "no outcome", 1), log=bool(led))
        return response

    # -- the HTTP call ------------------------------------------------------------

    def _call(self, token: str) -> tuple[Mapping[str, Any] | None, _Failure | None]:
        """POST the token; return ``(response, None)`` or ``(None, failure)``."""
        try:
            url = self._endpoint()
        except _Misconfigured as exc:
            return None, exc.failure
        try:
            headers, auth_params = self._prepared_auth(url)
        except _Misconfigured as exc:
            return None, exc.failure
        try:
            if self.settings.introspection_body == "json":
                result = self.fetcher.post(
                    url,
                    json_body={"token": token, **auth_params},
                    headers=headers,
                    breaker="endpoint",
                )
            else:
                form = {"token": token, "token_type_hint": "access_token", **auth_params}
                result = self.fetcher.post(url, data=form, headers=headers, breaker="endpoint")
        except FetchError as exc:
            if exc.status == 400 and exc.oauth_error == "unsupported_token_type":
                return _NOT_INTROSPECTED, None
            kind, detail, retry = _classify(exc)
            if kind == "circuit_open":
                retry = self.fetcher.breaker(url, scope="endpoint").retry_after()
            return None, _Failure(kind, detail, retry)
        data = result.data
        if not isinstance(data, dict):
            return None, _Failure(
                "invalid_response", "the endpoint's JSON answer is not an object", _RETRY_TRANSIENT
            )
        error = data.get("error")
        if "active" not in data and isinstance(error, str):
            # An OAuth error response (RFC 6749 §5.2) sent with 200: our
            # request was refused, which is not the client's token's fault.
            return None, _Failure(
                "request_rejected",
                f"the endpoint answered the error {error[:40]!r} (with HTTP {result.status}); "
                "check OAUTH_VERIFY_INTROSPECTION_AUTH, _CLIENT_ID, _CLIENT_SECRET and "
                "OAUTH_VERIFY_INTROSPECTION_ENDPOINT",
                _RETRY_MISCONFIGURED,
            )
        return data, None

    def _endpoint(self) -> str:
        """The introspection endpoint: configured, else from discovery
        (:func:`discover_endpoint`).

        :raises _Misconfigured: when it cannot be had.
        """
        configured = self.settings.introspection_endpoint
        if configured is not None:
            return configured
        try:
            return discover_endpoint(self.discovery, self.settings.issuers)
        except FetchError as exc:
            raise _Misconfigured(
                _Failure(
                    "no_endpoint",
                    "no introspection endpoint: set OAUTH_VERIFY_INTROSPECTION_ENDPOINT or "
                    f"publish introspection_endpoint in discovery ({exc.reason})",
                    _RETRY_TRANSIENT,
                )
            ) from None

    def _prepared_auth(self, url: str) -> tuple[dict[str, str], dict[str, str]]:
        """:meth:`_client_auth` of ``url`` plus ``Accept``, prepared once per URL.

        The credentials are fixed settings, so the headers and body
        parameters are too; each call gets its own copies.
        """
        prepared = self._auth_by_url.get(url)
        if prepared is None:
            headers, params = self._client_auth(url)
            headers["Accept"] = "application/json"
            prepared = (headers, params)
            if len(self._auth_by_url) < 16:  # the endpoint, or a few discovered ones
                self._auth_by_url[url] = prepared
        return dict(prepared[0]), dict(prepared[1])

    def _client_auth(self, url: str) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and body parameters that authenticate us (RFC 7662 §2.1)."""
        settings = self.settings
        method = settings.introspection_auth
        headers: dict[str, str] = {}
        if method == "bearer":
            if not settings.introspection_token:
                raise _Misconfigured(_needs("OAUTH_VERIFY_INTROSPECTION_TOKEN", method))
            if not is_b64token(settings.introspection_token):
                # a newline (from a secrets file), a space, a non-ASCII character:
                # no Authorization header can carry it (RFC 6750 §2.1)
                raise _Misconfigured(
                    _needs("an OAUTH_VERIFY_INTROSPECTION_TOKEN of b64token characters", method)
                )
            _uri, headers, _body = add_bearer_token(settings.introspection_token, url, headers, "")
            return dict(headers), {}
        client_id = settings.introspection_client_id
        secret = settings.introspection_client_secret
        if method == "none":
            if not client_id:
                return headers, {}
            auth = ClientAuth(client_id, None, "none")
        elif not client_id or not secret:
            raise _Misconfigured(
                _needs("OAUTH_VERIFY_INTROSPECTION_CLIENT_ID and _CLIENT_SECRET", method)
            )
        elif method == "client_secret_basic" and settings.introspection_basic_encoding == "raw":
            # "<id>:<secret>" as they are (RFC 7617 §2), as VoxKey (curl -u)
            # and Beyond Identity document it; a ':' in the id is refused at
            # init_app. UTF-8 (RFC 7617 §2.1, and what curl sends): Authlib's
            # encoder takes latin-1 and raises on anything beyond it.
            basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")
            return {"Authorization": f"Basic {basic}"}, {}
        elif method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-encode both before the Basic encoding
            # (Authlib's encoder does not, its server decodes).
            auth = ClientAuth(quote(client_id, safe=""), quote(secret, safe=""), method)
        else:
            auth = ClientAuth(client_id, secret, method)
        _uri, headers, body = auth.prepare("POST", url, headers, "")
        params = dict(parse_qsl(body or "", keep_blank_values=True))
        return dict(headers), params

    # -- failures -----------------------------------------------------------------

    def _upstream(self, failure: _Failure, *, log: bool) -> UpstreamError:
        if log and self._should_log(failure.kind):
            logger.error(
                "Token introspection failed (%s): %s. Answering 503; this is not a "
                "problem with the client's token.",
                failure.kind,
                failure.detail,
            )
        if log:
            self._emit("introspection_failed", {"kind": failure.kind, "reason": failure.detail})
        return UpstreamError(
            reason=f"introspection {failure.kind}: {failure.detail}",
            retry_after=failure.retry_after,
        )

    def _should_log(self, kind: str) -> bool:
        if kind != "circuit_open":
            return True
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < _LOG_INTERVAL:
            return False
        self._last_logged[kind] = now
        return True

    def _emit(self, event: str, fields: Mapping[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event, fields)


def answer_scope(settings: Settings) -> str:
    """A hash of who answers: the endpoint (or the issuers it is discovered
    from), our client authentication method and client id (with ``bearer``,
    a hash of the bearer credential, which names the client there).

    Part of the cache key of an answer: apps that share a cache backend but
    ask different authorization servers (or ask as different clients, which
    servers may answer differently) never reuse each other's answers. An
    answer that lacks ``iss`` (RFC 7662 §2.2 makes it optional) would
    otherwise let a token of one server pass at an API of another.
    """
    client = settings.introspection_client_id or ""
    if settings.introspection_auth == "bearer" and settings.introspection_token:
        credential = hashlib.sha256(settings.introspection_token.encode()).hexdigest()
        client = f"{client}\nbearer {credential}"  # a hash of a hash: never the credential
    who = "\n".join(
        (
            settings.introspection_endpoint or "",
            *settings.issuers,
            settings.introspection_auth,
            client,
        )
    )
    return hashlib.sha256(who.encode()).hexdigest()[:16]


def discover_endpoint(discovery: Discovery, issuers: Iterable[str]) -> str:
    """The ``introspection_endpoint`` of the first issuer whose metadata has one.

    An issuer that answers but publishes no metadata (404, not JSON) is
    passed over; one in an outage (timeout, 5xx) or whose endpoint the fetch
    policy refuses is not: the endpoint would be its own, and its tokens,
    with our client credentials, must not go to the next issuer's.

    The whole search shares one fetch budget (issuers whose metadata is at
    hand cost none): issuers that each answer slowly must not multiply the
    request's wait. An issuer that answered with no metadata is not asked
    again for a second (:meth:`Discovery.metadata`, ``paced``): opaque
    tokens arrive at the request rate, and nothing else paces this search.

    :raises FetchError: naming what each issuer tried lacked.
    """
    reasons = []
    ends = time.monotonic() + discovery.fetcher.budget
    for issuer in issuers:
        try:
            found = discovery.endpoint(
                issuer,
                "introspection_endpoint",
                required=False,
                budget=ends - time.monotonic(),
                paced=True,
            )
        except FetchError as exc:
            reasons.append(f"{issuer}: {exc.reason}")
            if exc.answered or "{" in issuer:
                continue  # publishes no metadata (templated: none at all)
            break
        if found is not None:
            return found
        reasons.append(f"{issuer}: metadata has no introspection_endpoint")
    raise FetchError("; ".join(reasons) or "no issuer")


class _Misconfigured(Exception):
    """The call cannot be made at all (no endpoint, missing credentials)."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


def _needs(what: str, method: str) -> _Failure:
    return _Failure(
        "misconfigured",
        f"OAUTH_VERIFY_INTROSPECTION_AUTH = {method!r} needs {what}",
        _RETRY_MISCONFIGURED,
    )
