"""Decorators and :func:`verify_request`, the Flask glue of verification.

``verify_request()`` is the public building block: read the token, verify
it, set ``g.auth``, check scopes. The decorators are wrappers over it (that
answer the usual cache hit themselves, :func:`_guard`) and work on sync and
``async def`` views alike.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any, Literal, TypeVar, cast, overload

from flask import current_app, g, request
from flask.views import MethodView

from .bearer import extract_token, may_name_access_token, plain_header_token
from .config import STRATEGIES
from .context import REQUEST_KEY, AuthContext, set_auth, stamped_for
from .errors import (
    AnsweredByFlask,
    InsufficientScopeError,
    InvalidTokenError,
    MissingOrganizationContext,
    MissingTokenError,
    MissingUserContext,
    OAuthVerifyError,
    withheld_exc_info,
)
from .extension import EXTENSION_KEY, get_state
from .verification import looks_like_jws

__all__ = [
    "require_organization",
    "require_scope",
    "require_token",
    "require_user",
    "verify_request",
]

F = TypeVar("F", bound=Callable[..., Any])
_logger = logging.getLogger("flask_oauth_verify")
_sha256 = hashlib.sha256
_INFO = logging.INFO


#: The ``strategy`` of ``@require_organization`` / ``@require_user``: they
#: refine the route's own decorator, so any check that decorator made counts
#: (``@require_scope(..., strategy="introspection")`` above
#: ``@require_organization``); alone, they verify with the app's default, and
#: a check of a ``before_request`` counts only as it would for ``@require_token``.
_ANY_EARLIER = "any earlier"


#: Strategies that ask the authorization server whether the token was revoked.
_SEES_REVOCATION = frozenset({"introspection", "both"})


def _already_verified(
    strategy: str | None, request_g: dict[str, Any], default: str
) -> AuthContext | None:
    """The context verified earlier in this request, if it satisfies ``strategy``.

    A check without a strategy (``None``) takes the strategy of an earlier
    one (``@require_scope("x")`` under ``@require_token(strategy=
    "introspection")``), unless the app's ``default`` asks whether the token
    was revoked and no earlier check did: ``verify_request(strategy="jwks")``
    in a ``before_request`` must not stand in for the ``"both"`` of the app's
    ``@require_token``.

    Only of *this* request: an app context pushed before the requests is
    reused by each of them, ``g`` with it (see :data:`REQUEST_KEY`).
    """
    done: set[str] | None = request_g.get("_oauth_verify_checked")
    if not done or not stamped_for(request_g, request._get_current_object()):  # type: ignore[attr-defined]
        return None
    context = request_g.get("auth")
    if strategy is None or (strategy is _ANY_EARLIER and not _checked_by_route(done)):
        reuse = default not in _SEES_REVOCATION or not done.isdisjoint(_SEES_REVOCATION)
    else:
        reuse = strategy is _ANY_EARLIER or strategy in done or "both" in done
    if reuse:
        return context if isinstance(context, AuthContext) else None
    return None


@overload
def verify_request(
    *,
    scopes: Iterable[str] | str = (),
    any_of: bool = False,
    optional: Literal[False] = False,
    strategy: str | None = None,
) -> AuthContext: ...
@overload
def verify_request(
    *,
    scopes: Iterable[str] | str = (),
    any_of: bool = False,
    optional: bool,
    strategy: str | None = None,
) -> AuthContext | None: ...
def verify_request(
    *,
    scopes: Iterable[str] | str = (),
    any_of: bool = False,
    optional: bool = False,
    strategy: str | None = None,
) -> AuthContext | None:
    """Verify the current request's bearer token and set ``g.auth``.

    Verifies at most once per request (a second call with the same strategy,
    after ``"both"``, or without a strategy reuses the result, except that an
    app whose default is ``"introspection"`` or ``"both"`` asks the endpoint
    when no earlier check did), then checks ``scopes``.

    :param scopes: scopes the token must hold (all, or one with ``any_of``);
        a single string is one scope.
    :param any_of: accept a token holding any one of ``scopes``.
    :param optional: without a token, set ``g.auth = None`` and return
        ``None`` instead of refusing. A token that is sent is still verified.
    :param strategy: ``"jwks"``, ``"introspection"``, ``"auto"`` or
        ``"both"``; the app's ``OAUTH_VERIFY_STRATEGY`` when ``None``.
    :returns: the :class:`AuthContext`, or ``None`` (optional, no token).
    :raises OAuthVerifyError: the documented 400/401/403/503 errors.
    """
    return _verify_request(_scope_tuple(scopes), any_of, optional, strategy)


def _scope_tuple(scopes: Iterable[str] | str) -> tuple[str, ...]:
    """``scopes`` as a tuple of valid scopes (a lone string is one scope, never
    its characters)."""
    wanted = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    _check_scopes(wanted)
    return wanted


#: RFC 6749 §3.3 scope-token: printable ASCII but space, ``"`` and ``\``.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _check_scopes(scopes: tuple[str, ...]) -> None:
    """Refuse, when the view is decorated, a scope no token can carry (it
    would also break the ``WWW-Authenticate`` header that names it)."""
    if not all(isinstance(s, str) and _SCOPE_TOKEN.fullmatch(s) for s in scopes):
        raise ValueError(
            "Scopes are non-empty strings without spaces, of RFC 6749 scope "
            "characters (printable ASCII, no '\"' or '\\')."
        )


def _verify_request(
    scopes: tuple[str, ...], any_of: bool, optional: bool, strategy: str | None
) -> AuthContext | None:
    """:func:`verify_request` with positional arguments (what the decorators call)."""
    state = current_app._get_current_object().extensions.get(EXTENSION_KEY) or get_state()  # type: ignore[attr-defined]
    # g's namespace dict: one proxy lookup for the whole call, and no Python-level
    # __setattr__/get per access (each is a measurable share of a cache hit).
    request_g: dict[str, Any] = g._get_current_object().__dict__
    return _check_request(state, request_g, None, None, None, scopes, any_of, optional, strategy)


def _check_request(
    state: Any,
    request_g: dict[str, Any],
    current: Any,
    plain: str | None,
    digest: bytes | None,
    scopes: tuple[str, ...],
    any_of: bool,
    optional: bool,
    strategy: str | None,
) -> AuthContext | None:
    """:func:`_verify_request` once the app state and ``g`` are known.

    Every request of a protected view that :func:`_guard` does not answer
    runs this, so it is written flat: the app state read directly,
    ``g.auth`` written out rather than through :func:`set_auth`.

    :param current: the request object, when the caller has it already.
    :param plain: the request's :func:`~flask_oauth_verify.bearer.plain_header_token`
        (no longer than ``MAX_TOKEN_BYTES``), when the caller has it already,
        and ``digest`` its SHA-256.
    """
    context = (
        _already_verified(strategy, request_g, state.settings.strategy)
        if "_oauth_verify_checked" in request_g
        else None
    )
    token: str | None = plain
    if context is None:
        if strategy is _ANY_EARLIER:
            strategy = None  # nothing earlier: the app's default
        events = state.events
        started = perf_counter() if events.metrics is not None else 0.0  # metrics only
        try:
            if current is None:
                current = request._get_current_object()  # type: ignore[attr-defined]
            context = (
                state.header_context(current.environ, strategy)
                if plain is None
                else state.plain_token_context(plain, strategy, digest)
            )
            if context is None:
                token = extract_token(current, state.settings)
                if token is None:
                    if optional:
                        set_auth(None, request_g)
                        return None
                    if _answered_by_flask(current):
                        raise _FlaskAnswers
                    raise MissingTokenError(reason="no bearer token in the request")
                context = state.authenticate(token, strategy)
        except OAuthVerifyError as exc:
            events.failed(exc, token or _header_token(state), strategy=strategy, started=started)
            raise
        except _FlaskAnswers:
            raise AnsweredByFlask(current_app.make_default_options_response()) from None
        except Exception as exc:  # fail closed, never a 500
            # A bug or an input nobody anticipated: refuse the token (never let
            # it through, never answer 500) and log loudly, without the token:
            # the exception's type and frames, not its message (an app's
            # USER_ID_RULE may raise quoting the Authorization header).
            _logger.error(
                "Unexpected error while verifying a token; refused.",
                exc_info=withheld_exc_info(exc),
            )
            refusal = InvalidTokenError(reason=f"internal error: {type(exc).__name__}")
            events.failed(
                refusal, token or _header_token(state), strategy=strategy, started=started
            )
            raise refusal from None
        request_g["auth"] = context  # set_auth(), written out: every check passed
        done = request_g.get("_oauth_verify_checked")
        if done is not None and stamped_for(request_g, current):
            done.add(strategy or state.settings.strategy)
        else:  # the first check of this request
            request_g["_oauth_verify_checked"] = {strategy or state.settings.strategy}
            request_g[REQUEST_KEY] = current  # stamp(), inlined: in a request
        if events.enabled():
            events.validated(
                context, token or _header_token(state), strategy=strategy, started=started
            )
    if not scopes:
        return context
    if not context.has_scopes(*scopes, any_of=any_of):
        error = InsufficientScopeError(
            scopes=scopes,
            reason=f"token lacks {'any' if any_of else 'all'} of {list(scopes)}",
        )
        state.events.failed(error, None)
        raise error
    return context


class _FlaskAnswers(Exception):
    """Raised inside :func:`_check_request` for a request :func:`_answered_by_flask`."""


def _answered_by_flask(current: Any) -> bool:
    """Whether Flask answers ``current`` itself, no view running: an ``OPTIONS``
    request to a route with automatic ``OPTIONS`` (a CORS preflight, which
    browsers send without credentials).

    A decorated view never sees such a request; a ``before_request`` calling
    :func:`verify_request` does, and answers it as Flask would (its
    ``after_request`` functions, e.g. Flask-CORS's, still run) instead of
    refusing it with 401 or letting the rest of the hook run without a
    verified token. On a route without automatic ``OPTIONS`` (one that lists
    ``OPTIONS`` itself) the view runs, so such a request needs a token like
    any other.
    """
    return current.method == "OPTIONS" and bool(
        getattr(current.url_rule, "provide_automatic_options", False)
    )


def _header_token(state: Any) -> str | None:
    """The plain header's token, for an event record (which logs only its hash)."""
    if not state.header_tokens:
        return None
    return plain_header_token(request._get_current_object().environ)  # type: ignore[attr-defined]


def _check_strategy(strategy: str | None) -> None:
    """Refuse a mistyped per-route strategy when the view is decorated."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}.")


def _wrap(view: F, check: Callable[[], Any]) -> F:
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return await view(*args, **kwargs)

        return cast(F, async_wrapper)

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def _mark_route_check(request_g: dict[str, Any], wrapper: Callable[..., Any]) -> None:
    """Record that ``wrapper`` (a ``@require_token`` / ``@require_scope``) checked.

    The wrapper goes beside the strategies of the request's checks (a
    function, never a strategy name): the "check above" that
    ``@require_organization`` / ``@require_user`` refine, when it belongs to
    the view being dispatched (:func:`_checked_by_route`) — not to a decorated
    ``before_request`` function.
    """
    done = request_g.get("_oauth_verify_checked")
    if done is not None:
        done.add(wrapper)


def _checked_by_route(done: set[Any]) -> bool:
    """Whether a decorator of the view being dispatched is among the checks ``done``.

    The view registered for the request's endpoint is the outermost wrapper;
    ``functools.wraps`` links each to the one inside (``__wrapped__``).
    """
    wrappers = [entry for entry in done if not isinstance(entry, str)]
    if not wrappers:
        return False
    view = current_app.view_functions.get(request.endpoint)  # type: ignore[arg-type]
    return any(
        _in_chain(entry, wrappers) for entry in (view, *_class_view_handlers(view, request.method))
    )


def _class_view_handlers(view: Any, method: str) -> tuple[Any, ...]:
    """What a class-based view (``View.as_view``) runs for ``method``, whose
    own decorators count as the route's: its ``dispatch_request``, and for a
    ``MethodView`` that dispatches as ``MethodView`` does, the method handler
    (``get`` for ``HEAD`` without ``head``). A method of a ``View`` that
    happens to be named ``get`` is a helper, not the handler. Nothing for a
    function view."""
    view_class = getattr(view, "view_class", None)
    if not isinstance(view_class, type):
        return ()
    dispatch = getattr(view_class, "dispatch_request", None)
    if not issubclass(view_class, MethodView) or dispatch is not MethodView.dispatch_request:
        return (dispatch,)
    name = method.lower()
    handler = getattr(view_class, name, None)
    if handler is None and name == "head":
        handler = getattr(view_class, "get", None)
    return (handler,)


def _in_chain(view: Any, wrappers: list[Any]) -> bool:
    """Whether ``view`` or a function it wraps (``__wrapped__``) is one of ``wrappers``."""
    for _ in range(64):  # a chain of decorators, never a cycle
        if view is None:
            return False
        if any(view is wrapper for wrapper in wrappers):
            return True
        view = getattr(view, "__wrapped__", None)
    return False


def _guard(
    view: F, scopes: tuple[str, ...], any_of: bool, optional: bool, strategy: str | None
) -> F:
    """``view`` behind :func:`_verify_request`, the usual cache hit answered in the wrapper.

    A hit is a few dictionary reads, so each Python call on its way is a
    measurable share of it (``docs/performance.rst``). For the usual request
    (a plain ``Authorization: Bearer`` header, the ``jwks`` strategy or
    ``auto`` with a JWT, no check earlier in this request, no event to
    emit), the wrapper itself does what :func:`_check_request` and
    ``_AppState.plain_token_context`` would do for a cached token: an entry
    still current (within ``exp``/``nbf``, its key set unchanged and fresh)
    whose scopes suffice sets ``g.auth`` at once. Anything else takes
    :func:`_check_request`, handed the token and digest already computed;
    an error on the way takes :func:`_verify_request`, which decides every
    case. ``tests/test_hot_path.py`` compares both paths. ``async def``
    views take :func:`_verify_request` only.
    """
    check = functools.partial(_verify_request, scopes, any_of, optional, strategy)
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            _mark_route_check(g._get_current_object().__dict__, async_wrapper)
            return await view(*args, **kwargs)

        return cast(F, async_wrapper)

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = plain = digest = None
        answered = False
        try:
            state = current_app._get_current_object().extensions[EXTENSION_KEY]  # type: ignore[attr-defined]
            request_g: dict[str, Any] = g._get_current_object().__dict__
            current = request._get_current_object()  # type: ignore[attr-defined]
            environ = current.environ
            value = environ.get("HTTP_AUTHORIZATION")
            chosen = strategy or state._strategy
            # plain_header_token(), inlined, for a JWT of the jwks (or auto) strategy
            if (
                value is not None
                and "_oauth_verify_checked" not in request_g
                and (chosen == "jwks" or (chosen == "auto" and looks_like_jws(value[7:])))
                and state.header_tokens
                and value.startswith(("Bearer ", "bearer "))
                and len(value) - 7 <= state._max_token_bytes
                and not environ.get("CONTENT_TYPE")
                and not ((query := environ.get("QUERY_STRING")) and may_name_access_token(query))
            ):
                plain = value[7:]
                digest = _sha256(plain.encode()).digest()  # the cache key: never the token
                cached = state.token_cache.get(digest)
                if cached is not None:
                    now = state.clock()
                    leeway = state._leeway
                    source = cached.source
                    if (
                        cached.expires_at + leeway > now
                        and (cached.not_before is None or cached.not_before - leeway <= now)
                        and source.keys is cached.key_set
                        and source.fetched_at <= now < source.fresh_until  # _Source.fresh()
                        and (
                            not scopes
                            or (
                                not cached.context.scopes.isdisjoint(scopes)
                                if any_of
                                else cached.context.scopes.issuperset(scopes)
                            )
                        )
                        # not state.events.enabled(), from three dicts (no call)
                        and (quiet := state.quiet_signs)[0].get(_INFO) is False
                        and not quiet[1]
                        and not quiet[2]
                    ):
                        request_g["auth"] = cached.context
                        request_g["_oauth_verify_checked"] = {chosen, wrapper}
                        request_g[REQUEST_KEY] = current  # stamp(current), inlined
                        answered = True
        except Exception:  # the general path below decides (and names) every case
            state = None
        if state is None:
            check()
            _mark_route_check(g._get_current_object().__dict__, wrapper)
        elif not answered:  # never inside the try: the view's own errors are its own
            _check_request(
                state, request_g, current, plain, digest, scopes, any_of, optional, strategy
            )
            done = request_g.get("_oauth_verify_checked")  # _mark_route_check(), inlined
            if done is not None:
                done.add(wrapper)
        return view(*args, **kwargs)

    return cast(F, wrapper)  # at decoration time: no cost per request


@overload
def require_token(view: F) -> F: ...
@overload
def require_token(
    view: None = None, *, optional: bool = False, strategy: str | None = None
) -> Callable[[F], F]: ...


def require_token(
    view: F | None = None, *, optional: bool = False, strategy: str | None = None
) -> F | Callable[[F], F]:
    """Require a valid bearer token: ``@require_token`` or ``@require_token(...)``.

    Before the view runs, the request's token is verified (once per request:
    a check made earlier in the same request is reused, see
    :func:`verify_request`) and ``g.auth`` is set to its
    :class:`~flask_oauth_verify.AuthContext`. Works on sync and
    ``async def`` views.

    :param view: the view, when used bare (``@require_token``); omitted when
        called with options (``@require_token(optional=True)``).
    :param optional: let requests without a token through with
        ``g.auth = None`` (a token that is sent must still be valid).
    :param strategy: per-route strategy, ``"jwks"``, ``"introspection"``,
        ``"auto"`` or ``"both"`` (e.g. ``"introspection"`` or ``"both"`` for
        revocation-sensitive routes); the app's ``OAUTH_VERIFY_STRATEGY``
        when ``None``.
    :returns: the wrapped view (bare use), or a decorator that wraps one.
        The wrapped view runs with ``g.auth`` set; instead of running it, it
        raises an :class:`~flask_oauth_verify.errors.OAuthVerifyError`
        subclass, which the extension answers (401 ``MissingTokenError``,
        ``InvalidTokenError``, ``TokenExpired``; 400
        ``InvalidRequestError``; 503 ``UpstreamError``; ...).
    :raises ValueError: at decoration time, for a ``strategy`` that is not
        one of the four.
    """
    _check_strategy(strategy)

    def decorator(inner: F) -> F:
        return _guard(inner, (), False, optional, strategy)

    if view is not None:
        return decorator(view)
    return decorator


def require_scope(
    *scopes: str, any_of: bool = False, strategy: str | None = None
) -> Callable[[F], F]:
    """Require a valid token holding all (or, with ``any_of``, one) of ``scopes``.

    Validates the token first if that has not happened yet in this request
    (as :func:`require_token` does, setting ``g.auth``); 403
    ``insufficient_scope`` (naming the scopes) when a scope is missing.
    Scopes compare exactly. There is no ``optional``: a scope needs a token
    (use :func:`require_token` with ``optional=True`` and
    :meth:`AuthContext.has_scopes() <flask_oauth_verify.AuthContext.has_scopes>`
    in the view for a route open to anonymous callers).

    :param scopes: the scopes the token must hold, one or more, each an
        RFC 6749 scope token (``"read:users"``).
    :param any_of: accept a token holding any one of ``scopes`` instead of
        all of them.
    :param strategy: per-route strategy, ``"jwks"``, ``"introspection"``,
        ``"auto"`` or ``"both"``; the app's ``OAUTH_VERIFY_STRATEGY`` when
        ``None``.
    :returns: a decorator; the view it wraps runs with ``g.auth`` set, or
        raises :class:`~flask_oauth_verify.errors.InsufficientScopeError`
        (403) or another :class:`~flask_oauth_verify.errors.OAuthVerifyError`
        (the token's own refusal) instead of running.
    :raises ValueError: at decoration time, when no scope is given, a scope
        is not a non-empty string of RFC 6749 scope characters (no spaces,
        ``"`` or ``\\``), or ``strategy`` is not one of the four.
    """
    _check_strategy(strategy)
    if not scopes:
        raise ValueError("require_scope() needs at least one scope.")
    _check_scopes(scopes)

    def decorator(view: F) -> F:
        return _guard(view, scopes, any_of, False, strategy)

    return decorator


def _organization_check() -> None:
    context = _verify_request((), False, False, _ANY_EARLIER)  # verify_request(), no scopes
    if context is None or not context.organization_id:
        raise _with_event(MissingOrganizationContext(reason="token has no organization"))


def _user_check() -> None:
    context = _verify_request((), False, False, _ANY_EARLIER)  # verify_request(), no scopes
    if context is None or not context.user_id:
        raise _with_event(MissingUserContext(reason="token does not act for a user"))


def _with_event(error: OAuthVerifyError) -> OAuthVerifyError:
    get_state().events.failed(error, None)
    return error


def require_organization(view: F) -> F:
    """Require a valid token that names an organization.

    Verifies the token first, unless a check of the route above it (a
    ``@require_token`` / ``@require_scope``) already did in this request,
    whatever its strategy; alone, with the app's default strategy. Then the
    view runs with ``g.auth`` set and ``g.auth.organization_id`` not empty.

    :param view: the view (sync or ``async def``).
    :returns: the wrapped view, which raises
        :class:`~flask_oauth_verify.errors.MissingOrganizationContext` (401
        ``missing_organization_context``) for a token without an
        organization, or the token's own refusal
        (:class:`~flask_oauth_verify.errors.OAuthVerifyError`), instead of
        running.
    """
    return _wrap(view, _organization_check)


def require_user(view: F) -> F:
    """Require a valid token that acts for a user.

    Verifies the token first, as :func:`require_organization` does (the
    route's check above it counts); the view then runs with ``g.auth.user_id``
    set. A client-credentials token acts for no user.

    :param view: the view (sync or ``async def``).
    :returns: the wrapped view; instead of running, it raises
        :class:`~flask_oauth_verify.errors.MissingUserContext` (401
        ``missing_user_context``) or the token's own refusal.
    """
    return _wrap(view, _user_check)
