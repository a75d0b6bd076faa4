"""Prometheus metrics of token validation (optional extra ``prometheus_client``).

Turned on with ``OAUTH_VERIFY_METRICS = True``; this module (and
``prometheus_client``) is imported only then. Each app gets its own
:class:`~prometheus_client.CollectorRegistry` unless
``OAUTH_VERIFY_METRICS_REGISTRY`` names one (for example
``prometheus_client.REGISTRY`` to be served by an existing exporter), so two
apps in one process never collide. ``OAUTH_VERIFY_METRICS_ENDPOINT`` (a path,
or ``True`` for ``/metrics``) adds a route that serves the registry.

========================================  ============================================
metric                                    labels
========================================  ============================================
``token_validations_total``               ``status`` (``valid`` or the error code),
                                          ``strategy``, ``token_type``
                                          (+ ``client_id`` with
                                          ``METRICS_CLIENT_ID_LABEL``)
``token_validation_duration_seconds``     histogram, 0.1 ms .. 0.5 s
``token_authorization_denials_total``     ``error`` (``insufficient_scope``,
                                          ``missing_*_context``)
``token_key_fetches_total``               ``issuer``, ``outcome`` (``success``,
                                          ``failure``)
``token_stale_keys_served_total``         ``issuer``
``token_key_set_age_seconds``             ``issuer`` (gauge, read at scrape time)
``token_key_set_keys``                    ``issuer`` (gauge, read at scrape time)
``token_introspections_total``            ``outcome`` (``active``, ``inactive``,
                                          or the failure kind)
``token_introspection_cache_hits_total``
========================================  ============================================

Only verified values become labels: a refused token counts with
``token_type="unknown"`` and an empty ``client_id``, so a client cannot
create series at will.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import ConfigurationError, Settings
from .context import AuthContext
from .errors import OAuthVerifyError
from .verification import looks_like_jws

if TYPE_CHECKING:
    from .extension import _AppState
    from .jwks import KeySetStatus

__all__ = ["DURATION_BUCKETS", "Metrics", "init_metrics", "metrics_registry"]

#: Histogram buckets of ``token_validation_duration_seconds``: a cached
#: token takes microseconds, a signature check ~0.1-1 ms, a key fetch or an
#: introspection call tens to hundreds of milliseconds.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
)  # fmt: skip

_DENIALS = frozenset({"insufficient_scope", "missing_organization_context", "missing_user_context"})
_INTROSPECTION_OUTCOMES = frozenset({"active", "inactive"})
_MAX_LABEL = 64


def _bounded(value: Any) -> str:
    """A label value from a verified claim, capped in length and encodable:
    an unpaired surrogate (valid in JSON, not in UTF-8) is written as an
    escape, or every later scrape of the registry would fail."""
    if value is None:
        return ""
    text = str(value)[:_MAX_LABEL]
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:_MAX_LABEL]


class _KeySetCollector(Collector):
    """Reads the key sets' age and size at scrape time (no network call)."""

    def __init__(self, status: Callable[[], list[KeySetStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "token_key_set_age_seconds",
            "Seconds since the key set in use was fetched.",
            labels=["issuer"],
        )
        size = GaugeMetricFamily(
            "token_key_set_keys", "Usable keys in the key set in use.", labels=["issuer"]
        )
        seen: set[str] = set()
        for status in self._status():
            if status.issuer in seen:
                continue  # an allowlisted jku source of the same issuer
            seen.add(status.issuer)
            size.add_metric([status.issuer], status.usable_keys)
            if status.age is not None:
                age.add_metric([status.issuer], status.age)
        yield age
        yield size


class Metrics:
    """The metrics of one app, fed by its :class:`~.events.SecurityEvents`.

    :param settings: the app's settings (strategy, client-id label).
    :param registry: where the metrics are registered.
    :param key_status: returns the key store's status (for the gauges).
    :raises ValueError: when ``registry`` already holds these metrics.
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        key_status: Callable[[], list[KeySetStatus]],
    ) -> None:
        self.registry = registry
        self._default_strategy = settings.strategy
        self._client_label = settings.metrics_client_id_label
        labels = ["status", "strategy", "token_type"]
        if self._client_label:
            labels.append("client_id")
        self.validations = Counter(
            "token_validations_total",
            "Token validations by outcome (valid, or the error code).",
            labels,
            registry=registry,
        )
        self.duration = Histogram(
            "token_validation_duration_seconds",
            "Time to validate a token (cache hits, signature checks, fetches).",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.denials = Counter(
            "token_authorization_denials_total",
            "Valid tokens refused for a missing scope, organization or user.",
            ["error"],
            registry=registry,
        )
        self.key_fetches = Counter(
            "token_key_fetches_total",
            "Key set fetches by issuer and outcome.",
            ["issuer", "outcome"],
            registry=registry,
        )
        self.stale_keys = Counter(
            "token_stale_keys_served_total",
            "Times the last good keys were used because a refresh failed.",
            ["issuer"],
            registry=registry,
        )
        self.introspections = Counter(
            "token_introspections_total",
            "Introspection calls by outcome (active, inactive, or the failure kind).",
            ["outcome"],
            registry=registry,
        )
        self.introspection_cache_hits = Counter(
            "token_introspection_cache_hits_total",
            "Introspection answers served from the cache.",
            registry=registry,
        )
        self._collector = _KeySetCollector(key_status)
        registry.register(self._collector)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def _strategy(self, requested: str | None, token: str | None) -> str:
        strategy = requested or self._default_strategy
        if strategy == "auto" and token is not None:
            return "jwks" if looks_like_jws(token) else "introspection"
        return strategy

    def _count(self, labels: tuple[str, ...]) -> None:
        child = self._children.get(labels)
        if child is None:
            with self._lock:
                child = self._children.setdefault(labels, self.validations.labels(*labels))
        child.inc()

    def validated(
        self, context: AuthContext, strategy: str | None, token: str | None, duration: float | None
    ) -> None:
        """Count a token that passed every check.

        :param context: the verified context (gives the token type and client).
        :param strategy: the strategy requested (``None``: the app's default).
        :param token: the token (its shape resolves the ``auto`` strategy).
        :param duration: seconds the validation took, when measured.
        """
        labels: tuple[str, ...] = (
            "valid",
            self._strategy(strategy, token),
            _bounded(context.token_type),
        )
        if self._client_label:
            labels += (_bounded(context.client_id),)
        self._count(labels)
        if duration is not None:
            self.duration.observe(duration)

    def refused(
        self,
        error: OAuthVerifyError,
        strategy: str | None,
        token: str | None,
        duration: float | None,
    ) -> None:
        """Count a refusal: a failed validation, or a denial of a valid token.

        :param error: the refusal.
        :param strategy: the strategy requested (``None``: the app's default).
        :param token: the token, if one was read.
        :param duration: seconds the validation took, when measured.
        """
        if error.error in _DENIALS:
            self.denials.labels(error.error).inc()
            if token is None:
                return  # a decorator's denial: the validation was counted already
            # Denied while being validated (a claims check's 403): a valid
            # token, denied, counted like a scope denial after validation.
            status = "valid"
        else:
            status = "missing_token" if error.error == "unauthorized" else error.error
        labels: tuple[str, ...] = (status, self._strategy(strategy, token), "unknown")
        if self._client_label:
            labels += ("",)
        self._count(labels)
        if duration is not None and token is not None:
            self.duration.observe(duration)

    def observe_event(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count a key or introspection event (see :mod:`.events`).

        :param event: the event name.
        :param fields: its fields (``issuer``, ``outcome``, ``kind``).
        """
        if event == "keys_refreshed":
            self.key_fetches.labels(_bounded(fields.get("issuer")), "success").inc()
        elif event == "keys_refresh_failed":
            self.key_fetches.labels(_bounded(fields.get("issuer")), "failure").inc()
        elif event == "stale_keys_served":
            self.stale_keys.labels(_bounded(fields.get("issuer"))).inc()
        elif event == "introspection_request":
            outcome = fields.get("outcome")
            self.introspections.labels(
                outcome if outcome in _INTROSPECTION_OUTCOMES else "other"
            ).inc()
        elif event == "introspection_failed":
            self.introspections.labels(_bounded(fields.get("kind") or "error")).inc()
        elif event == "introspection_cache_hit":
            self.introspection_cache_hits.inc()


def _registry(given: object) -> CollectorRegistry:
    if given is None:
        return CollectorRegistry()
    if not isinstance(given, CollectorRegistry):
        raise ConfigurationError(
            "OAUTH_VERIFY_METRICS_REGISTRY must be a prometheus_client.CollectorRegistry."
        )
    return given


def init_metrics(app: Flask, state: _AppState) -> Metrics:
    """Create the app's metrics, attach them to its events, add the endpoint.

    :param app: the Flask app.
    :param state: its extension state.
    :raises ConfigurationError: for a bad ``METRICS_*`` key, or when the
        registry already holds these metrics (another app registered them).
    """
    registry = _registry(state.settings.metrics_registry)
    endpoint = state.settings.metrics_endpoint  # checked by Settings.from_config
    try:
        metrics = Metrics(state.settings, registry, state.keys.status)
    except ValueError as exc:
        raise ConfigurationError(
            f"OAUTH_VERIFY_METRICS: the registry already holds these metrics ({exc}); "
            "give each app its own OAUTH_VERIFY_METRICS_REGISTRY (the default)."
        ) from None
    state.events.metrics = metrics
    if endpoint is not None:
        app.add_url_rule(
            endpoint,
            "oauth_verify_metrics",
            lambda: _serve(metrics),
            methods=["GET"],
        )
    return metrics


def _serve(metrics: Metrics) -> Response:
    registry = metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several worker processes: aggregate their counters and histograms,
        # and add this worker's view of the key sets.
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(metrics._collector)
    response = Response(_generate_latest(registry), mimetype=None)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response


def metrics_registry(app: Flask | None = None) -> CollectorRegistry:
    """The registry holding the app's metrics (the current app by default).

    :raises RuntimeError: when ``OAUTH_VERIFY_METRICS`` is off for the app.
    """
    from .extension import get_state

    metrics = get_state(app).events.metrics
    if metrics is None:
        raise RuntimeError("OAUTH_VERIFY_METRICS is off for this app.")
    return metrics.registry
