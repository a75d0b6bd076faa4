"""The Flask extension object and its per-app state.

State lives in ``app.extensions["oauth_verify"]``, never in module globals,
so one process can serve several apps with different settings, and one
:class:`OAuthVerify` object can be registered on several apps.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from logging import DEBUG
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flask import Flask, Response, current_app

from .bearer import is_b64token, may_name_access_token, plain_header_token
from .cache import SharedCache
from .config import Settings
from .context import AuthContext, ContextBuilder
from .deadline import retire_watchdog
from .discovery import Discovery
from .errors import AnsweredByFlask, InvalidTokenError, OAuthVerifyError, default_error_response
from .events import SecurityEvents
from .fetch import Fetcher
from .jwks import KeySetStatus, KeyStore
from .readonly import ReadOnlyClaims
from .token_cache import CachedToken, IntrospectedToken, TokenCache
from .verification import JWTVerifier, looks_like_jws

if TYPE_CHECKING:
    from .health import HealthChecker, HealthReport
    from .introspection import Introspector

__all__ = ["OAuthVerify", "get_state"]

EXTENSION_KEY = "oauth_verify"
F = TypeVar("F", bound=Callable[..., Any])
ClaimsCheck = Callable[[Mapping[str, Any]], Any]


class _AppState:
    """Everything one app needs to verify requests, built once at ``init_app``."""

    def __init__(
        self,
        extension: OAuthVerify,
        settings: Settings,
        cache: Any | None,
        clock: Callable[[], float],
    ) -> None:
        self.extension = extension
        self.settings = settings
        self.clock = clock
        self.cache = SharedCache(cache)
        self.fetcher = Fetcher(settings, clock)
        self.discovery = Discovery(settings, self.cache, self.fetcher, clock)
        self.keys = KeyStore(settings, self.cache, self.fetcher, self.discovery, clock)
        self.verifier = JWTVerifier(settings)
        self.context_builder = ContextBuilder(settings)
        self.token_cache: TokenCache[CachedToken] = TokenCache(settings.token_cache_size)
        #: Contexts of active introspection answers, while their cached answer holds.
        self.introspected: TokenCache[IntrospectedToken] = TokenCache(
            settings.token_cache_size if _caches_answers(settings) else 0
        )
        self.events = SecurityEvents()
        #: Read by the decorator's cache hit instead of ``events.enabled()``.
        self.quiet_signs = self.events.quiet_signs
        self.claims_checks: list[ClaimsCheck] = extension._claims_checks
        self._introspector: Introspector | None = None
        self._lazy_lock = threading.Lock()
        self._health: HealthChecker | None = None
        #: Whether header tokens count (``TOKEN_LOCATIONS``): the fast path
        #: (:meth:`header_context`) reads them.
        self.header_tokens = "header" in settings.token_locations
        self._max_token_bytes = settings.max_token_bytes
        self._strategy = settings.strategy
        #: ``LEEWAY``, for the cache hit that :func:`~flask_oauth_verify.decorators._guard` answers.
        self._leeway = settings.leeway
        #: the longest an introspection answer may be reused (see _introspection_hit)
        self._longest_reuse = settings.introspection_longest_reuse
        self.keys.on_keys_changed = self.token_cache.clear
        self.keys.on_event = self.events.emit

    @property
    def introspector(self) -> Introspector:
        """The RFC 7662 client (created on first use)."""
        if self._introspector is None:
            with self._lazy_lock:  # one client per app, even under a first burst
                if self._introspector is None:
                    from .introspection import Introspector

                    introspector = Introspector(
                        self.settings,
                        self.cache,
                        self.fetcher,
                        self.discovery,
                        self.verifier,
                        self.clock,
                    )
                    introspector.on_event = self.events.emit
                    self._introspector = introspector
        return self._introspector

    @property
    def health(self) -> HealthChecker:
        """The health checker (created on first use)."""
        if self._health is None:
            with self._lazy_lock:
                if self._health is None:
                    from .health import HealthChecker

                    self._health = HealthChecker(self)
        return self._health

    def authenticate(
        self,
        token: str,
        strategy: str | None = None,
        *,
        digest: bytes | None = None,
    ) -> AuthContext:
        """Verify ``token`` with ``strategy`` (the app's default when None).

        A token seen before is answered from the per-process caches
        (:mod:`flask_oauth_verify.token_cache`) while they hold.

        :param digest: the token's SHA-256, when the caller has it already.
        :raises OAuthVerifyError: when the token is refused.
        """
        if len(token) > self.settings.max_token_bytes:  # before any hashing or parsing
            raise InvalidTokenError(
                reason=f"token longer than {self.settings.max_token_bytes} bytes"
            )
        chosen = self._strategy_for(token, strategy)
        if digest is None:
            digest = hashlib.sha256(token.encode()).digest()  # the cache key: never the token
        now = self.clock()
        if chosen == "jwks":
            return self._jwt_hit(digest, now) or self._verify_jwt(token, digest, now)
        if chosen == "introspection":
            return self._introspection_hit(digest, now, answer=True) or self._introspect(
                token, digest, now
            )
        if chosen == "both":
            context = self._jwt_hit(digest, now) or self._verify_jwt(token, digest, now)
            # still active? (revocation)
            if self._introspection_hit(digest, now) is None:
                self._confirm_active(token, digest, now, context)
            return context
        raise ValueError(f"unknown strategy {chosen!r}")

    def header_context(
        self, environ: dict[str, Any], strategy: str | None = None
    ) -> AuthContext | None:
        """The context of the usual request's token, or ``None``: take the general path.

        The usual request carries ``Authorization: Bearer <token>``, no query
        token and no body (:func:`~flask_oauth_verify.bearer.plain_header_token`
        reads it from the WSGI ``environ``); its token goes to
        :meth:`plain_token_context`.

        :raises OAuthVerifyError: when the token is refused.
        """
        token = plain_header_token(environ) if self.header_tokens else None
        if token is None or len(token) > self._max_token_bytes:
            return None  # a token too long is never hashed: the general path refuses it
        return self.plain_token_context(token, strategy)

    def plain_token_context(
        self, token: str, strategy: str | None = None, digest: bytes | None = None
    ) -> AuthContext | None:
        """The context of the usual request's token, or ``None``: take the general path.

        ``token`` is what :func:`~flask_oauth_verify.bearer.plain_header_token`
        returned, no longer than ``MAX_TOKEN_BYTES``. A cache hit needs no
        other check: only tokens that passed
        :func:`~flask_oauth_verify.bearer.extract_token` are ever cached. On
        a miss, a ``b64token`` is exactly what ``extract_token`` would return,
        so it is authenticated at once, reusing the digest; anything else
        returns ``None`` (the general path names the problem).
        ``tests/test_hot_path.py`` compares both paths' answers request by
        request.

        :param digest: the SHA-256 of ``token``, when the caller has it already.
        :raises OAuthVerifyError: when the token is refused.
        """
        if digest is None:
            digest = hashlib.sha256(token.encode()).digest()  # the cache key: never the token
        chosen = strategy or self._strategy
        if chosen != "jwks" and self._strategy_for(token, chosen) != "jwks":
            context = self.cached_context(token, digest, strategy)
            if context is not None:
                return context
            return self.authenticate(token, strategy, digest=digest) if is_b64token(token) else None
        now = self.clock()
        if self.token_cache.get(digest) is not None:  # a first-seen token makes no call here
            context = self._jwt_hit(digest, now)
            if context is not None:
                return context
        # A compact JWS that verifies is a b64token (base64url segments and
        # dots), so the syntax check is needed only on a refusal, to give
        # extract_token's own answer to a token that is not one.
        try:
            return self._verify_jwt(token, digest, now)
        except OAuthVerifyError:
            if is_b64token(token):
                raise
            return None

    def cached_context(
        self, token: str, digest: bytes, strategy: str | None = None
    ) -> AuthContext | None:
        """The context of a token seen before, from the caches alone, else ``None``.

        What :meth:`authenticate` would return for ``token`` (SHA-256
        ``digest``) without verifying or introspecting anything; ``None``
        when the caches cannot answer for ``strategy``.
        """
        chosen = self._strategy_for(token, strategy)
        now = self.clock()
        if chosen == "jwks":
            return self._jwt_hit(digest, now)
        if chosen == "introspection":
            return self._introspection_hit(digest, now, answer=True)
        context = self._jwt_hit(digest, now)  # "both": both caches must answer
        if context is None or self._introspection_hit(digest, now) is None:
            return None
        return context

    def _strategy_for(self, token: str, strategy: str | None) -> str:
        """The strategy that applies to ``token``: ``auto`` decided by its shape."""
        chosen = strategy or self.settings.strategy
        if chosen == "auto":
            return "jwks" if looks_like_jws(token) else "introspection"
        return chosen

    def _jwt_hit(self, digest: bytes, now: float) -> AuthContext | None:
        """The verified-token cache's context for ``digest``, if still good.

        ``exp``, ``nbf`` and ``iat`` are re-checked on every hit, and the key that
        verified the token must still be its issuer's current key: the same
        key set object within its soft TTL is exactly what
        :meth:`KeyStore.resolve() <flask_oauth_verify.jwks.KeyStore.resolve>`
        would return it from; otherwise the key is resolved again (which
        also runs the due refresh of a process that only sees hits). An
        entry that fails is dropped.

        :raises InvalidTokenError: the key is no longer in its issuer's set.
        :raises UpstreamError: the issuer's keys cannot be had at all.
        """
        cached = self.token_cache.get(digest)
        if cached is None:
            return None
        leeway = self.settings.leeway
        if cached.expires_at + leeway > now and (
            cached.not_before is None or cached.not_before - leeway <= now
        ):
            source = cached.source
            if source.keys is cached.key_set and source.fresh(now):
                return cached.context
            try:
                if self.keys.resolve(cached.issuer, cached.header) is cached.key:
                    return cached.context
            except InvalidTokenError:  # the key left its set
                self.token_cache.discard(digest)
                raise
        self.token_cache.discard(digest)
        return None

    def _verify_jwt(self, token: str, digest: bytes, now: float) -> AuthContext:
        claims, header, issuer, (key, source, key_set) = self.verifier.verify_token(
            token, self.keys, now
        )
        if self.claims_checks:
            self.run_claims_checks(claims)  # read-only to the checks
        context = self.context_builder.build(claims, "jwks", True)
        # claims passed the checks: exp is a number, nbf and iat numbers or
        # None; a hit re-checks the later of the two (a clock stepped back
        # must refuse a token "issued in the future" as verifying it would).
        # If the key set changes meanwhile, the entry's hit check notices
        # (source.keys is no longer key_set) and resolves the key again.
        nbf = claims.get("nbf")
        iat = claims.get("iat")
        if iat is not None and (nbf is None or iat > nbf):
            nbf = iat
        entry = CachedToken(context, claims["exp"], nbf, issuer, header, key, source, key_set)
        self.token_cache.put(digest, entry)
        return context

    def _introspection_hit(
        self, digest: bytes, now: float, *, answer: bool = False
    ) -> AuthContext | None:
        """The context of a cached active introspection answer, if still good.

        :param answer: only a context built from the answer itself (an
            ``"introspection"`` route): not the verified JWT's context that an
            answer merely confirmed active (``"both"``), whose claims are the
            JWT's and whose checks were the JWT's.
        """
        cached = self.introspected.get(digest)
        if cached is None or (answer and cached.confirmed):
            return None
        # never longer than a TTL from now: a clock stepped back would stretch it
        if now < cached.reuse_until <= now + self._longest_reuse:
            events = self.events
            if events.metrics is not None or events.wants("introspection_cache_hit", DEBUG):
                self.introspector.note_cache_hit()
            return cached.context
        self.introspected.discard(digest)
        return None

    def _introspect(self, token: str, digest: bytes, now: float) -> AuthContext:
        claims, reuse_until = self.introspector.introspect_until(token, now, digest)
        self.run_claims_checks(claims)
        context = self.context_builder.build(claims, "introspection", False)
        if reuse_until is not None:
            exp = claims.get("exp")
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                reuse_until = min(reuse_until, exp + self.settings.leeway)
            self.introspected.put(digest, IntrospectedToken(context, reuse_until, False))
        return context

    def _confirm_active(self, token: str, digest: bytes, now: float, context: AuthContext) -> None:
        """``"both"``: the endpoint confirms that the verified JWT is still active.

        The request gets the JWT's context: its claims passed
        ``REQUIRED_CLAIMS``, the claim values and the ``@claims_check``
        functions, so the answer is checked only as an answer (it may be as
        short as ``{"active": true, "sub": …}``). While the answer is cached,
        the JWT's context is kept as the confirmed one.
        """
        _claims, reuse_until = self.introspector.introspect_until(token, now, digest, confirm=True)
        if reuse_until is not None:
            if context.expires_at is not None:
                reuse_until = min(reuse_until, context.expires_at + self.settings.leeway)
            self.introspected.put(digest, IntrospectedToken(context, reuse_until, True))

    def run_claims_checks(self, claims: Mapping[str, Any]) -> None:
        """Run the app's ``@claims_check`` functions on verified claims.

        A check refuses by returning ``False`` or raising an
        :class:`OAuthVerifyError` (e.g. ``InsufficientScopeError`` for 403).
        """
        # read-only for the checks, nested values too
        view = ReadOnlyClaims(claims if type(claims) is dict else dict(claims))
        for check in self.claims_checks:
            try:
                outcome = check(view)
            except OAuthVerifyError:
                raise
            except Exception as exc:
                raise InvalidTokenError(
                    reason=f"claims check {getattr(check, '__name__', check)!r} raised "
                    f"{type(exc).__name__}"
                ) from None
            if outcome is False:
                raise InvalidTokenError(
                    reason=f"claims check {getattr(check, '__name__', check)!r} refused"
                )

    def error_response(self, error: OAuthVerifyError) -> Response:
        """The default response for ``error``, with this app's realm."""
        if error.realm is None:
            error.realm = self.settings.realm
        response = default_error_response(error)
        if self.settings.security_headers:
            _add_security_headers(response)
        return response


def _caches_answers(settings: Settings) -> bool:
    """Whether active introspection answers are cached (and so their contexts)."""
    return settings.introspection_cache_ttl > 0


def _add_security_headers(response: Response) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers["Cache-Control"] = "no-store"


def get_state(app: Flask | None = None) -> _AppState:
    """The per-app state of ``app`` (the current app by default).

    :raises RuntimeError: when ``init_app`` was not called for the app.
    """
    # One context lookup: each attribute read through the proxy costs another.
    target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    state = target.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError("Call OAuthVerify.init_app(app) first.")
    return state  # type: ignore[no-any-return]


class OAuthVerify:
    """The extension: ``OAuthVerify(app, cache=cache)`` or ``init_app`` later.

    :param app: the Flask app, or ``None`` to call :meth:`init_app` later.
    :param cache: a ``flask_caching.Cache`` shared by every worker (Redis in
        production); an in-process cache when ``None``.
    """

    def __init__(self, app: Flask | None = None, *, cache: Any | None = None) -> None:
        self.cache = cache  # never self.app: one object can serve several apps
        self._claims_checks: list[ClaimsCheck] = []
        if app is not None:
            self.init_app(app)

    def init_app(
        self,
        app: Flask,
        *,
        cache: Any | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Read and validate the settings of ``app`` and register the extension.

        :param app: the Flask app.
        :param cache: overrides the cache given to the constructor.
        :param clock: wall-clock seconds; tests pass a controllable clock.
        :raises ConfigurationError: naming the missing or contradictory key.
        :raises RuntimeError: when the extension is already registered.

        .. versionadded:: 0.1.0
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("OAuthVerify is already registered on this app.")
        settings = Settings.from_config(app.config)
        state = _AppState(self, settings, cache or self.cache, clock or time.time)
        app.extensions[EXTENSION_KEY] = state
        state.cache.bind_app(app)  # reach Flask-Caching outside an app context
        _register_error_handler(app, state.error_response)
        app.register_error_handler(AnsweredByFlask, AnsweredByFlask.answer)
        _encode_claims_as_json(app)
        if settings.security_headers:
            app.after_request(_protected_response_headers)
        if "query" in settings.token_locations:
            app.after_request(_private_when_query_token)
        from .cli import cli

        app.cli.add_command(cli)
        _init_optional_features(app, state)
        if settings.prefetch_keys:
            state.keys.prefetch()
            # init_app runs in a --preload master that forks next: leave no
            # thread of ours running (the first request's fetch starts one)
            retire_watchdog()

    # -- the decorators as methods ------------------------------------------

    @overload
    def require_token(self, view: F) -> F: ...
    @overload
    def require_token(
        self, view: None = None, *, optional: bool = False, strategy: str | None = None
    ) -> Callable[[F], F]: ...

    def require_token(
        self, view: F | None = None, *, optional: bool = False, strategy: str | None = None
    ) -> F | Callable[[F], F]:
        """Same as :func:`flask_oauth_verify.require_token`: ``@oauth.require_token``
        or ``@oauth.require_token(optional=True, strategy=None)``.

        :param view: the view, when used bare; omitted with options.
        :param optional: let requests without a token through with
            ``g.auth = None`` (a token that is sent must still be valid).
        :param strategy: per-route strategy (``"jwks"``, ``"introspection"``,
            ``"auto"``, ``"both"``); the app's default when ``None``.
        :returns: the wrapped view, or a decorator that wraps one.
        :raises ValueError: for a ``strategy`` that is not one of the four.

        .. versionadded:: 0.1.0
        """
        from .decorators import require_token

        decorator = require_token(optional=optional, strategy=strategy)
        return decorator if view is None else decorator(view)

    def require_scope(
        self, *scopes: str, any_of: bool = False, strategy: str | None = None
    ) -> Callable[[F], F]:
        """Same as :func:`flask_oauth_verify.require_scope`.

        :param scopes: the scopes the token must hold (one or more).
        :param any_of: accept a token holding any one of ``scopes``.
        :param strategy: per-route strategy; the app's default when ``None``.
        :returns: a decorator that wraps a view.
        :raises ValueError: when no scope is given, a scope is not a valid
            RFC 6749 scope token, or ``strategy`` is not one of the four.

        .. versionadded:: 0.1.0
        """
        from .decorators import require_scope

        return require_scope(*scopes, any_of=any_of, strategy=strategy)

    def require_organization(self, view: F) -> F:
        """Same as :func:`flask_oauth_verify.require_organization`: verifies
        the token first (unless the route's check above did), then requires
        an organization.

        :param view: the view (sync or ``async def``).
        :returns: the wrapped view.

        .. versionadded:: 0.1.0
        """
        from .decorators import require_organization

        return require_organization(view)

    def require_user(self, view: F) -> F:
        """Same as :func:`flask_oauth_verify.require_user`: verifies the token
        first (unless the route's check above did), then requires a token
        that acts for a user.

        :param view: the view (sync or ``async def``).
        :returns: the wrapped view.

        .. versionadded:: 0.1.0
        """
        from .decorators import require_user

        return require_user(view)

    def claims_check(self, check: ClaimsCheck) -> ClaimsCheck:
        """Register a check run on every token's verified claims.

        The check receives the claims (read-only) and refuses the token by
        returning ``False`` (401 ``invalid_token``) or by raising an
        :class:`~flask_oauth_verify.errors.OAuthVerifyError` subclass, for
        example ``InsufficientScopeError`` for a 403. Checks apply to every
        app this extension object is registered on, in the order registered.

        :param check: a function ``claims -> bool | None``.
        :returns: ``check`` itself (usable as a decorator).

        .. versionadded:: 0.1.0
        """
        self._claims_checks.append(check)
        return check

    def context_for(self, claims: Mapping[str, Any], app: Flask | None = None) -> AuthContext:
        """The :class:`~flask_oauth_verify.AuthContext` the app's claim mapping
        makes of ``claims``: its ``organization_id``, ``user_id`` and scopes
        as ``g.auth`` would hold them (``CLAIM_MAP``, ``PROVIDER``,
        ``USER_ID_RULE``, ``NO_ORGANIZATION_VALUES``).

        For a :meth:`claims_check` that needs the organization or the user
        (the claim's name differs between providers)::

            @oauth.claims_check
            def organization_not_suspended(claims):
                return oauth.context_for(claims).organization_id not in SUSPENDED

        Nothing is verified or checked here: pass claims that were.

        :param claims: verified claims (or an introspection answer).
        :param app: the Flask app (the current app when ``None``).
        :returns: the context, as the decorators would build it.
        :raises InvalidTokenError: when a mapped claim has the wrong type.
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        return get_state(app).context_builder.build(claims)

    # -- operations ---------------------------------------------------------

    def prefetch_keys(self, app: Flask | None = None) -> dict[str, str | None]:
        """Warm the key cache (the shared copy when there is one).

        A failed fetch never raises: it is reported in the result.

        :param app: the Flask app (the current app when ``None``).
        :returns: issuer -> error text, ``None`` when its keys are loaded.
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        return get_state(app).keys.prefetch()

    def refresh_keys(
        self, app: Flask | None = None, issuer: str | None = None
    ) -> dict[str, str | None]:
        """Fetch the key set(s) now, ignoring the TTL and the cooldown.

        A failed fetch never raises: it is reported in the result.

        :param app: the Flask app (the current app when ``None``).
        :param issuer: one configured issuer (all when ``None``).
        :returns: issuer -> error text, ``None`` when the fetch worked.
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        return get_state(app).keys.refresh(issuer)

    def key_status(self, app: Flask | None = None) -> list[KeySetStatus]:
        """What is known about each issuer's keys: age, kids, last error.

        No call to the issuer (the shared cache may be read).

        :param app: the Flask app (the current app when ``None``).
        :returns: one :class:`~flask_oauth_verify.jwks.KeySetStatus` per key
            source (issuer).
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        return list(get_state(app).keys.status())

    def settings(self, app: Flask | None = None) -> Settings:
        """The validated settings of ``app``.

        :param app: the Flask app (the current app when ``None``).
        :returns: the settings ``init_app`` read from the app's config.
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        return get_state(app).settings

    def health(self, app: Flask | None = None) -> HealthReport:
        """Check the token-validation infrastructure of ``app`` (the current app).

        Keys available (through the normal refresh policy, never a forced
        refresh), cache backend reachable, introspection endpoint reachable
        when configured. See :mod:`flask_oauth_verify.health`.

        :param app: the Flask app (the current app when ``None``).
        :returns: the report: whether tokens can be validated now, and each
            check's status.
        :raises RuntimeError: when :meth:`init_app` was not called for the app.

        .. versionadded:: 0.1.0
        """
        target: Flask = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
        with target.app_context():  # Flask-Caching needs one
            return get_state(target).health.check()

    def metrics_registry(self, app: Flask | None = None) -> Any:
        """The ``prometheus_client`` registry of ``app``'s metrics.

        :param app: the Flask app (the current app when ``None``).
        :returns: the app's ``prometheus_client`` ``CollectorRegistry``.
        :raises RuntimeError: when :meth:`init_app` was not called for the
            app, or ``OAUTH_VERIFY_METRICS`` is off.

        .. versionadded:: 0.1.0
        """
        from .metrics import metrics_registry

        return metrics_registry(app)


def _encode_claims_as_json(app: Flask) -> None:
    """Let the app's JSON provider encode ``g.auth.claims`` as an object.

    :class:`ReadOnlyClaims` is a mapping, not a ``dict``, so Flask's provider
    would refuse ``jsonify({"claims": g.auth.claims})`` (a 500). The
    provider's ``default`` (Flask's, or one the app set) is wrapped, not
    replaced; a provider without one (orjson and the like) is left alone.
    """
    provider = app.json
    previous = getattr(provider, "default", None)
    if not callable(previous) or getattr(previous, "encodes_claims", False):
        return

    def default(value: Any) -> Any:
        if isinstance(value, ReadOnlyClaims):
            return dict(value)
        return previous(value)

    default.encodes_claims = True  # type: ignore[attr-defined]
    provider.default = default  # type: ignore[attr-defined]


def _register_error_handler(app: Flask, handler: Callable[[Any], Response]) -> None:
    """The default response for the whole :class:`OAuthVerifyError` tree.

    ``register_error_handler(OAuthVerifyError, …)`` would file it under the
    base class's own code (401) only: Flask looks handlers up by the raised
    error's status first (the blueprint's, then the app's), then among the
    handlers of no status, so a 400, 403 or 503 refusal would reach an app's
    or a blueprint's generic ``errorhandler(Exception)`` (a 500) or Flask's
    HTML page instead. So it is filed under every error status, 400 to 599
    (also those of subclasses defined after ``init_app``: a ``423`` raised
    by a claims check), and under no status; a handler the app or a
    blueprint registers for a subclass (``TokenExpired``) still wins, being
    more specific. A handler the app registered for the base class before
    ``init_app`` (an app factory that sets up its handlers first) is kept.
    Only this tree is handled: werkzeug's own ``NotFound`` and the like
    still reach the app's handlers for their status.
    """
    for code in (None, *range(400, 600)):
        app.error_handler_spec[None][code].setdefault(OAuthVerifyError, handler)


def _protected_response_headers(response: Response) -> Response:
    from flask import g

    # A protected view ran (verified, or optional without a token: g.auth is
    # set either way) or a request was refused (even by an app's own handler).
    if "auth" in g or g.get("_oauth_verify_checked") or g.get("_oauth_verify_refused"):
        _add_security_headers(response)
    return response


def _private_when_query_token(response: Response) -> Response:
    """``Cache-Control: private`` on a success to a request that carried an
    ``access_token`` query parameter (RFC 6750 §2.3: such a request has no
    ``Authorization`` header to keep a shared cache from storing the answer
    under a URL that holds the token). A ``Cache-Control`` the app set stays."""
    from flask import request

    if (
        200 <= response.status_code < 300
        and "Cache-Control" not in response.headers
        and may_name_access_token(request.environ.get("QUERY_STRING", ""))
        and "access_token" in request.args
    ):
        response.headers["Cache-Control"] = "private"
    return response


def _init_optional_features(app: Flask, state: _AppState) -> None:
    """Wire the operations features the settings turn on (metrics, health)."""
    state.events.sender = app
    dev_issuer = state.settings.dev_issuer
    if dev_issuer is not None:
        from .testing import TokenIssuer

        if not isinstance(dev_issuer, TokenIssuer):
            from .config import ConfigurationError

            raise ConfigurationError(
                "OAUTH_VERIFY_DEV_ISSUER must be a flask_oauth_verify.testing.TokenIssuer "
                "(development configurations only)."
            )
    if state.settings.metrics:
        import importlib.util

        if importlib.util.find_spec("prometheus_client") is None:
            from .config import ConfigurationError

            raise ConfigurationError(
                "OAUTH_VERIFY_METRICS needs prometheus_client: "
                "pip install 'flask-oauth-verify[metrics]'."
            )
        from .metrics import init_metrics

        init_metrics(app, state)
    if state.settings.health_route:
        from .health import register_health_route

        register_health_route(app, state, state.settings.health_route)
