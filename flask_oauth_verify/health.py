"""The health check of the token-validation infrastructure.

:meth:`OAuthVerify.health() <flask_oauth_verify.OAuthVerify.health>` and, with
``OAUTH_VERIFY_HEALTH_ROUTE`` (``True`` for ``/health/token-validation``), a
route that answers 200 ``{"status": "healthy", ...}`` or 503
``{"status": "unhealthy", "error": "<why>", ...}``. Three checks:

* **keys** (strategies ``jwks``, ``auto``, ``both``): every configured issuer
  has usable keys; their age and whether they are stale (a refresh failed
  and the last good keys are served, which is still healthy). Keys are
  obtained through the key store's normal policy: fresh keys are used as
  they are, keys past their TTL are refreshed once as a request would, an
  issuer that is down is retried no more often than the refresh cooldown and
  the circuit breaker allow. The health check never forces a refresh.
  An issuer whose keys come only from each token's ``jku``
  (``ALLOWED_JKU_HOSTS`` set, no static ``JWKS`` for it: requests then
  never use a ``JWKS_URI`` or discovery) is never fetched for: its entry
  lists the ``jku`` key sets loaded so far, ``"status": "per_token"`` while
  there is none, which is no failure.
* **cache**: the Flask-Caching backend answers a set/get round trip. A cache
  outage only costs performance (a failing cache is a miss), so it is a
  warning unless ``OAUTH_VERIFY_HEALTH_REQUIRE_CACHE`` is true.
* **introspection** (when configured): the endpoint answers at all (any HTTP
  status below 500 counts as reachable). The probe is a plain ``GET`` without
  a token or credentials, made at most once per
  ``OAUTH_VERIFY_HEALTH_PROBE_INTERVAL`` seconds (30), and not at all while
  the endpoint's circuit breaker is open (then unreachable, whatever the
  last probe said).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, jsonify

from .config import shown_url
from .deadline import reset_in_child
from .errors import UpstreamError, withheld_exc_info
from .fetch import FetchError

if TYPE_CHECKING:
    from .extension import _AppState
    from .jwks import KeySetStatus

__all__ = ["HealthChecker", "HealthReport", "register_health_route"]

logger = logging.getLogger("flask_oauth_verify.health")

_KEY_STRATEGIES = ("jwks", "auto", "both")
_INTROSPECTION_STRATEGIES = ("introspection", "auto", "both")


@dataclasses.dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of a health check.

    :param healthy: whether tokens can be validated now.
    :param checks: per check (``keys``, ``cache``, ``introspection``) its
        ``status`` and details.
    :param reasons: why the check is unhealthy (empty when healthy).
    :param warnings: degradations that do not stop validation.
    """

    healthy: bool
    checks: Mapping[str, Mapping[str, Any]]
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """``"healthy"`` or ``"unhealthy"``."""
        return "healthy" if self.healthy else "unhealthy"

    @property
    def status_code(self) -> int:
        """200 when healthy, else 503."""
        return 200 if self.healthy else 503

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of the health route."""
        body: dict[str, Any] = {"status": self.status}
        if not self.healthy:
            body["error"] = "; ".join(self.reasons)
        body["checks"] = {name: dict(check) for name, check in self.checks.items()}
        if self.warnings:
            body["warnings"] = list(self.warnings)
        return body


class HealthChecker:
    """Runs the checks of one app; remembers the last introspection probe.

    :param state: the app's extension state.
    """

    def __init__(self, state: _AppState) -> None:
        self.state = state
        # validated with the other settings, at init_app
        self.require_cache = state.settings.health_require_cache
        self.probe_interval = state.settings.health_probe_interval
        #: (when, result, the endpoint probed, if one was found)
        self._probe: tuple[float, dict[str, Any], str | None] | None = None
        # held for a whole probe (an HTTP call): a child forked meanwhile
        # would wait for it forever
        self._probe_lock = threading.Lock()
        reset_in_child(self, HealthChecker._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: a probe lock no parent thread holds."""
        self._probe_lock = threading.Lock()

    def check(self) -> HealthReport:
        """Run every check (call inside an app context).

        Never raises: an unexpected failure of a check makes it unhealthy.
        """
        reasons: list[str] = []
        warnings: list[str] = []
        checks: dict[str, Mapping[str, Any]] = {}
        for name, run in (
            ("keys", self._keys),
            ("cache", self._cache),
            ("introspection", self._introspection),
        ):
            try:
                checks[name] = run(reasons, warnings)
            except Exception as exc:  # a health check never fails with a 500
                logger.error("Health check %r raised", name, exc_info=withheld_exc_info(exc))
                checks[name] = {"status": "error"}
                reasons.append(f"{name} check raised {type(exc).__name__}")
        return HealthReport(not reasons, checks, tuple(reasons), tuple(warnings))

    # -- keys -------------------------------------------------------------------

    def _keys(self, reasons: list[str], warnings: list[str]) -> Mapping[str, Any]:
        state = self.state
        if state.settings.strategy not in _KEY_STRATEGIES:
            return {"status": "not_used"}
        per_token = _per_token_issuers(state)
        errors: dict[str, str] = {}
        for issuer in state.settings.issuers:
            if issuer in per_token:
                continue  # requests never use its own key source: nothing to fetch
            try:
                # The normal path: no network while the keys are fresh, one
                # refresh when due, the cooldown and breaker when down.
                state.keys.key_set(issuer)
            except UpstreamError as exc:
                errors[issuer] = str(exc.reason)
        issuers = []
        worst = "ok"
        seen: set[str] = set()
        jku_sources: dict[str, list[KeySetStatus]] = {issuer: [] for issuer in per_token}
        for status in state.keys.status():
            if status.issuer in seen:
                if status.issuer in per_token:
                    jku_sources[status.issuer].append(status)
                continue  # the first source of an issuer is its own (not a jku)
            seen.add(status.issuer)
            if status.issuer in per_token:
                continue  # its own source, which requests never use
            entry: dict[str, Any] = {
                "issuer": status.issuer,
                "source": shown_url(status.source),
                "keys": status.usable_keys,
                "age_seconds": None if status.age is None else round(status.age, 1),
            }
            if not status.usable_keys:
                entry["status"] = "unavailable"
                why = errors.get(status.issuer) or status.last_error or "no usable key"
                entry["error"] = why
                reasons.append(f"no keys for {status.issuer}: {why}")
                worst = "unavailable"
            elif status.last_error is not None:
                entry["status"] = "stale"
                entry["error"] = status.last_error
                warnings.append(
                    f"serving the last good keys of {status.issuer}: refresh failed "
                    f"({status.last_error})"
                )
                worst = worst if worst == "unavailable" else "stale"
            else:
                entry["status"] = "ok"
            issuers.append(entry)
        for issuer in state.settings.issuers:
            if issuer in per_token:
                entry = _per_token_entry(issuer, jku_sources[issuer], warnings)
                if entry["status"] == "stale":
                    worst = worst if worst == "unavailable" else "stale"
                issuers.append(entry)
        return {"status": worst, "issuers": issuers}

    # -- cache ------------------------------------------------------------------

    def _cache(self, reasons: list[str], warnings: list[str]) -> Mapping[str, Any]:
        cache = self.state.cache
        if not cache.is_shared:
            return {"status": "ok", "backend": "in-process"}
        try:
            backend = cache.backend
        except Exception as exc:  # a Flask-Caching Cache never init_app'ed for this app
            name = "unknown"
            message = (
                f"cache backend unusable ({type(exc).__name__}: is the Flask-Caching Cache "
                "initialised for this app, cache.init_app(app)?)"
            )
        else:
            name = type(getattr(backend, "cache", backend)).__name__
            if cache.ping():
                return {"status": "ok", "backend": name}
            message = f"cache backend {name} unreachable ({cache.last_error or 'no answer'})"
        if self.require_cache:
            reasons.append(message)
        else:
            warnings.append(message + "; falling back to per-process caching")
        return {"status": "unreachable", "backend": name}

    # -- introspection --------------------------------------------------------------

    def _introspection(self, reasons: list[str], warnings: list[str]) -> Mapping[str, Any]:
        settings = self.state.settings
        if (
            settings.introspection_endpoint is None
            and settings.strategy not in _INTROSPECTION_STRATEGIES
        ):
            return {"status": "not_configured"}
        with self._probe_lock:
            now = self.state.clock()
            if self._probe is not None and now - self._probe[0] < self.probe_interval:
                _, result, url = self._probe
                if url is not None:  # a breaker opened since: requests get 503, so do we
                    result = self._open_breaker(url) or result
            else:
                result, url = self._run_probe()
                self._probe = (now, result, url)
        if result["status"] != "ok":
            reasons.append(f"introspection endpoint {result['status']}: {result.get('error')}")
        return result

    def _endpoint(self) -> str:
        settings = self.state.settings
        if settings.introspection_endpoint is not None:
            return settings.introspection_endpoint
        from .introspection import discover_endpoint  # the requests' own choice

        try:
            return discover_endpoint(self.state.discovery, settings.issuers)
        except FetchError as exc:
            raise FetchError(
                f"no introspection endpoint configured or discovered ({exc.reason})"
            ) from None

    def _open_breaker(self, url: str) -> dict[str, Any] | None:
        """The result while the endpoint's circuit breaker is open, else None."""
        if not self.state.fetcher.breaker(url, scope="endpoint").is_open:
            return None
        return {
            "status": "unreachable",
            "endpoint": shown_url(url),
            "error": "circuit breaker open",
        }

    def _run_probe(self) -> tuple[dict[str, Any], str | None]:
        try:
            url = self._endpoint()
        except FetchError as exc:
            return {"status": "unavailable", "error": exc.reason}, None
        fetcher = self.state.fetcher
        open_breaker = self._open_breaker(url)
        if open_breaker is not None:
            return open_breaker, url
        try:
            # No breaker: a probe (a GET the endpoint may well refuse with a 5xx)
            # must never open the circuit the requests' introspection calls use.
            fetcher.request("GET", url, headers={"Accept": "application/json"}, breaker=None)
        except FetchError as exc:
            if exc.status is None or exc.status >= 500:
                endpoint = shown_url(url)
                return {"status": "unreachable", "endpoint": endpoint, "error": exc.reason}, url
        return {"status": "ok", "endpoint": shown_url(url)}, url


def _per_token_issuers(state: _AppState) -> frozenset[str]:
    """The configured issuers whose keys come only from each token's ``jku``.

    As requests find keys (:meth:`KeyStore.resolve_vouched
    <flask_oauth_verify.jwks.KeyStore.resolve_vouched>`): a static ``JWKS``
    of the issuer first, else, with ``ALLOWED_JKU_HOSTS``, only the key set
    at the token's allow-listed ``jku``, never a ``JWKS_URI`` or discovery.
    Checking those would report an outage of a key source no request uses
    (503 from the route while every token validates).
    """
    settings = state.settings
    if not settings.allowed_jku_hosts:
        return frozenset()
    static = {status.issuer for status in state.keys.status() if status.source == "static"}
    return frozenset(issuer for issuer in settings.issuers if issuer not in static)


def _per_token_entry(
    issuer: str, sources: list[KeySetStatus], warnings: list[str]
) -> dict[str, Any]:
    """The keys entry of an issuer whose keys come from each token's ``jku``.

    Lists the ``jku`` key sets loaded so far; those that never served keys
    are left out (anyone can name a path of the allow-listed host in a
    forged token, and none of those may make the check fail). No keys
    loaded yet is ``"per_token"``, not a failure: the first token fetches
    its key set.
    """
    loaded = [status for status in sources if status.usable_keys]
    entry: dict[str, Any] = {
        "issuer": issuer,
        "source": "jku",
        "keys": sum(status.usable_keys for status in loaded),
        "age_seconds": None,
        "jku": [],
    }
    if not loaded:
        entry["status"] = "per_token"
        entry["note"] = "keys come from each token's allow-listed jku; none fetched yet"
        return entry
    entry["age_seconds"] = round(min(status.age or 0.0 for status in loaded), 1)
    entry["status"] = "ok"
    for status in loaded:
        item: dict[str, Any] = {
            "source": shown_url(status.source),
            "keys": status.usable_keys,
            "age_seconds": None if status.age is None else round(status.age, 1),
            "status": "ok" if status.last_error is None else "stale",
        }
        if status.last_error is not None:
            item["error"] = status.last_error
            entry["status"] = "stale"
            warnings.append(
                f"serving the last good keys of {issuer} from jku {shown_url(status.source)}: "
                f"refresh failed ({status.last_error})"
            )
        entry["jku"].append(item)
    return entry


def register_health_route(app: Flask, state: _AppState, rule: str) -> None:
    """Add the health route ``rule`` to ``app`` (``GET``, no token needed).

    :param app: the Flask app.
    :param state: its extension state (holds the checker).
    :param rule: the URL rule, e.g. ``/health/token-validation``.
    """

    checker = state.health  # created now, at init_app

    def token_validation_health() -> Response:
        report = checker.check()
        response = jsonify(report.as_dict())
        response.status_code = report.status_code
        response.headers["Cache-Control"] = "no-store"
        return response

    app.add_url_rule(rule, "oauth_verify_health", token_validation_health, methods=["GET"])
