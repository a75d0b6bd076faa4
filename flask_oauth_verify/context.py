"""The authorization context of a request: :class:`AuthContext` on ``g.auth``.

Only :func:`set_auth` here (and, written out on the hot path,
:func:`~flask_oauth_verify.verify_request` and the decorators' cache hit)
sets ``g.auth``, and only to a frozen :class:`AuthContext` built from
claims that passed every check. The
raw token is never stored in it, so it can never show up in ``repr()`` or in
logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

from flask import g, has_app_context, has_request_context, request
from werkzeug.local import LocalProxy

from .config import Settings
from .errors import InvalidTokenError
from .readonly import ReadOnlyClaims, read_only_claims

__all__ = ["AuthContext", "ContextBuilder", "build_context", "current_auth", "get_auth"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True)
class AuthContext:
    """Who is calling, for which organization, with which scopes.

    Put on ``g.auth`` by the decorators once every check has passed. All
    fields are read-only; ``claims`` is a read-only mapping of the verified
    claims (or of the introspection response). The claims named below are
    the default mapping; ``OAUTH_VERIFY_CLAIM_MAP`` and the provider
    profiles (``OAUTH_VERIFY_PROVIDER``) change them.
    """

    #: The token's subject: ``sub``.
    subject: str | None
    #: The client the token was issued to: ``client_id``, else ``azp``, else
    #: ``cid``.
    client_id: str | None
    #: The token's scopes, compared exactly: from ``scopes`` (a list),
    #: ``scope`` (a space-separated string) or ``scp`` (a list or a string).
    scopes: frozenset[str]
    #: The organization (tenant) the token acts for: ``oid``, else
    #: ``organization_id``, else ``org_id``; ``None`` when absent or one of
    #: ``OAUTH_VERIFY_NO_ORGANIZATION_VALUES``.
    organization_id: str | None
    #: The subject when the token acts for a user, else ``None`` (a
    #: client-credentials token). Decided by ``OAUTH_VERIFY_USER_ID_RULE``
    #: if set, else ``OAUTH_VERIFY_USER_ID_PREFIX`` if set, else "the subject
    #: is not the client id and ``gty`` is not ``client-credentials``".
    user_id: str | None
    #: ``custom_claims.service_name``, else ``None``.
    service_name: str | None
    #: ``custom_claims.client_type``, else ``"unknown"``.
    token_type: str
    #: The token's issuer: ``iss``.
    issuer: str | None
    #: The token's audiences: ``aud``, always a tuple.
    audience: tuple[str, ...]
    #: ``exp``, in seconds since the epoch.
    expires_at: int | None
    #: ``iat``, in seconds since the epoch.
    issued_at: int | None
    #: The full verified claims (or introspection answer), read-only all the
    #: way down: nested arrays and objects are
    #: :class:`~flask_oauth_verify.readonly.ReadOnlyList` /
    #: :class:`~flask_oauth_verify.readonly.ReadOnlyDict`.
    claims: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _EMPTY, repr=False)
    #: How the token was verified: ``"jwks"`` or ``"introspection"``
    #: (``"both"`` reports ``"jwks"``: the claims come from the verified JWT).
    strategy: str = "jwks"
    #: ``jti`` when it is a string, else ``None``.
    token_id: str | None = None

    def has_scopes(self, *scopes: str, any_of: bool = False) -> bool:
        """Whether the token holds all (or, with ``any_of``, one) of ``scopes``.

        Scopes compare exactly: ``read:users-admin`` never satisfies
        ``read:users``.

        :param scopes: the scopes to look for; none at all is always ``True``.
        :param any_of: one of ``scopes`` is enough.
        """
        if not scopes:
            return True
        if any_of:
            return not self.scopes.isdisjoint(scopes)
        return self.scopes.issuperset(scopes)


def _audience(value: Any) -> tuple[str, ...]:
    """``aud`` as a tuple; refused unless a string or a list of strings
    (RFC 7519 §4.1.3), even when the audience is not checked
    (``VERIFY_AUDIENCE = False``): ``"aud": 5`` is no audience, and an object's
    keys or a list's strings among numbers are not the token's audiences."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise InvalidTokenError(reason="claim 'aud' is not a string or a list of strings")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


#: The string fields of the context, in the order their claims are checked.
_STRING_FIELDS = ("subject", "client_id", "token_type", "organization_id", "service_name")

#: A claim path prepared once: (first name, the names below it, the path).
_Path = tuple[str, tuple[str, ...], str]


def _prepare_path(path: str) -> _Path:
    head, *rest = path.split(".")
    return head, tuple(rest), path


def _descend(value: Any, names: tuple[str, ...]) -> Any:
    """:func:`claim_path` below the first name (``value`` is not ``None``)."""
    for name in names:
        # type() first: an ABC isinstance check costs a microsecond per step.
        if value is None or (type(value) is not dict and not isinstance(value, Mapping)):
            return None
        value = value.get(name)
    return value


class _Building:
    """An :class:`AuthContext` under construction: the same slots, no frozen guard.

    A frozen dataclass sets each of its 14 fields through
    ``object.__setattr__`` (about 2 µs per context, on every first-seen
    token); here the fields are plain slot stores, and the finished object
    becomes an :class:`AuthContext` by ``__class__`` assignment, which Python
    allows between classes of the same layout. The result is the same frozen
    object as ``AuthContext(...)`` builds (``tests/test_hot_path.py``).
    """

    __slots__ = AuthContext.__slots__  # the same names in the same order


_new_building = object.__new__


#: What a claim reader returns: the five string fields (in the order of
#: ``_STRING_FIELDS``), the scopes and the user id.
_Read = tuple[Any, Any, Any, Any, Any, frozenset[str], Any]


def _plain_scope_list(value: list[Any]) -> bool:
    """Whether a list of scopes holds only well-formed scope strings."""
    return all(type(item) is str and item and " " not in item for item in value)


def _compile_claim_reader(
    strings: tuple[tuple[str, tuple[_Path, ...]], ...],
    scopes: tuple[_Path, ...],
    user_rule: Callable[[Mapping[str, Any]], Any] | None,
    user_prefix: str | tuple[str, ...] | None,
) -> Callable[[Mapping[str, Any]], _Read | None]:
    """A function ``claims -> (string fields, scopes, user id)`` with the claim map unrolled.

    :meth:`ContextBuilder.read_in_general` loops over prepared paths with
    the checks of each step, a measurable share of a first-seen token; the
    function built here is the straight-line code one would write by hand
    for this one claim map: for each field, its claims read in order until
    one is present. Claim names enter its source only as ``repr()``
    literals. It answers only for the usual values (strings, or absent;
    scopes as a string or a list of plain scopes): for anything else it
    returns ``None``, and :meth:`ContextBuilder.build` takes the general
    form, which names the claim in its error. ``tests/test_hot_path.py``
    compares both with the mapping rules written plainly.
    """
    lines = ["def read(claims):", "    get = claims.get"]
    names = []
    for index, (_field, paths) in enumerate(strings):
        name = f"v{index}"
        names.append(name)
        lines.extend(_first_present(name, paths, "    "))
    # str.isascii() reads a flag: a non-ASCII value (rare) takes the general
    # form, which refuses what no database column or log can hold.
    unusual = " or ".join(
        f"({v} is not None and ({v}.__class__ is not str or not {v}.isascii() or '\\x00' in {v}))"
        for v in names
    )
    lines += [f"    if {unusual}:", "        return None", "    found = set()"]
    for path in scopes:
        lines.extend(_first_present("s", (path,), "    "))
        lines += [
            "    if s is not None:",
            "        if s.__class__ is str:",
            '            found.update(s.split(" "))',
            "        elif s.__class__ is list and _plain_scope_list(s):",
            "            found.update(s)",
            "        else:",
            "            return None",
        ]
    lines.append('    found.discard("")')
    subject, client = (
        names[_STRING_FIELDS.index("subject")],
        names[_STRING_FIELDS.index("client_id")],
    )
    if user_rule is not None:
        acts = "bool(_user_rule(claims))"
    elif user_prefix is not None:
        acts = f"{subject}.startswith({user_prefix!r})"
    else:  # a client-credentials token names the client as subject
        acts = f'get("gty") != "client-credentials" and {subject} != {client}'
    lines.append(f"    user = {subject} if {subject} is not None and {acts} else None")
    lines.append(f"    return ({', '.join(names)}, frozenset(found), user)")
    namespace: dict[str, Any] = {
        "_descend": _descend,
        "_plain_scope_list": _plain_scope_list,
        "_user_rule": user_rule,
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - the source above, from repr() literals
    return cast(Callable[[Mapping[str, Any]], "_Read | None"], namespace["read"])


def _first_present(name: str, paths: tuple[_Path, ...], indent: str) -> list[str]:
    """Source lines setting ``name`` to the first of ``paths`` present in ``claims``.

    Flat, one ``if {name} is None:`` per further path: nesting each path
    under the one before would refuse a claim map of 100 paths (Python's
    limit of 100 indentation levels).
    """
    lines = [] if paths else [f"{indent}{name} = None"]
    for position, (head, below, path) in enumerate(paths):
        step = indent
        if position:
            lines.append(f"{indent}if {name} is None:")
            step += "    "
        if below:  # a claim of the whole name first (namespaced claims hold dots)
            lines.append(f"{step}{name} = get({path!r})")
            lines.append(f"{step}if {name} is None and ({name} := get({head!r})) is not None:")
            lines.append(f"{step}    {name} = _descend({name}, {below!r})")
        else:
            lines.append(f"{step}{name} = get({head!r})")
    return lines


def _storable(text: str) -> bool:
    """Whether ``text`` can be stored and logged as it is: no NUL (which
    PostgreSQL's text type refuses) and valid Unicode (no unpaired
    surrogate, which JSON allows as an escape and UTF-8 cannot encode;
    RFC 7493 §2.1)."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ContextBuilder:
    """Maps verified claims to an :class:`AuthContext` for one app's settings.

    The claim map is prepared once (dotted paths split), so that building a
    context is a handful of dict reads; each app state keeps one per
    :class:`Settings`.

    :param settings: gives the claim mappings and the user rule.
    """

    def __init__(self, settings: Settings) -> None:
        mapping = settings.claim_map
        self.settings = settings
        self._strings = tuple(
            (field, tuple(_prepare_path(path) for path in mapping[field]))
            for field in _STRING_FIELDS
        )
        self._scopes = tuple(_prepare_path(path) for path in mapping["scopes"])
        self._user_rule = settings.user_id_rule
        self._user_prefix = settings.user_id_prefix
        self._no_organizations = settings.no_organization_values
        self._read = _compile_claim_reader(
            self._strings, self._scopes, self._user_rule, self._user_prefix
        )

    def build(
        self, claims: Mapping[str, Any], strategy: str = "jwks", owned: bool = False
    ) -> AuthContext:
        """Same as :func:`build_context` with this builder's settings."""
        get = claims.get
        read = self._read(claims) or self.read_in_general(claims)
        subject, client_id, token_type, organization_id, service_name, scopes, user_id = read
        if self._no_organizations and organization_id in self._no_organizations:
            organization_id = None  # e.g. Entra's tenant of personal accounts
        context: Any = _new_building(_Building)
        context.subject = subject
        context.client_id = client_id
        context.scopes = scopes
        context.organization_id = organization_id
        context.user_id = user_id
        context.service_name = service_name
        context.token_type = token_type or "unknown"
        issuer = get("iss")
        context.issuer = issuer if isinstance(issuer, str) else None
        aud = get("aud")
        context.audience = (aud,) if type(aud) is str else _audience(aud)
        exp = get("exp")
        context.expires_at = exp if type(exp) is int else _int_or_none(exp)
        iat = get("iat")
        context.issued_at = iat if type(iat) is int else _int_or_none(iat)
        # Shared by every request of a cached token: read-only all the way down
        # (a freshly parsed dict is wrapped as it is, its nested values made
        # read-only when first read).
        if owned and type(claims) is dict:
            context.claims = ReadOnlyClaims(claims)
        else:
            try:
                context.claims = read_only_claims(claims, owned)
            except RecursionError:
                raise InvalidTokenError(reason="claims nested too deeply") from None
        context.strategy = strategy
        jti = get("jti")
        context.token_id = jti if isinstance(jti, str) else None
        context.__class__ = AuthContext  # frozen from here on
        return context  # type: ignore[no-any-return]

    def read_in_general(self, claims: Mapping[str, Any]) -> _Read:
        """The string fields, the scopes and the user id of ``claims``, the general way.

        :raises InvalidTokenError: naming the first claim that is present
            with the wrong type (or a malformed scope).
        """
        get = claims.get
        found: list[Any] = []
        for field, paths in self._strings:
            value: Any = None
            for head, below, path in paths:
                if below:  # a claim of the whole name first (namespaced claims hold dots)
                    value = get(path)
                    if value is None and (value := get(head)) is not None:
                        value = _descend(value, below)
                else:
                    value = get(head)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise InvalidTokenError(reason=f"claim {path!r} ({field}) is not a string")
                if not _storable(value):
                    raise InvalidTokenError(
                        reason=f"claim {path!r} ({field}) holds NUL or an unpaired surrogate"
                    )
                break
            found.append(value)
        subject, client_id, token_type, organization_id, service_name = found
        scopes = self._scopes_of(claims)
        user_id = subject if self._acts_for_user(claims, subject, client_id) else None
        return subject, client_id, token_type, organization_id, service_name, scopes, user_id

    def _scopes_of(self, claims: Mapping[str, Any]) -> frozenset[str]:
        found: set[str] = set()
        for head, below, path in self._scopes:
            if below:  # as in build(): the whole name, then the nested path
                value = claims.get(path)
                if value is None and (value := claims.get(head)) is not None:
                    value = _descend(value, below)
            else:
                value = claims.get(head)
            if value is None:
                continue
            if isinstance(value, str):
                # RFC 6749 §3.3: scope-tokens are separated by SP only; a tab or a
                # Unicode space is part of a (malformed) token, never a separator.
                found.update(value.split(" "))
                found.discard("")
            elif isinstance(value, list):
                malformed = False
                for item in value:
                    if not isinstance(item, str):
                        raise InvalidTokenError(
                            reason=f"claim {path!r} (scopes) has the wrong type"
                        )
                    # a list element with a space would smuggle two scopes in one
                    if not item or " " in item:
                        malformed = True
                if malformed:
                    raise InvalidTokenError(reason=f"claim {path!r} holds a malformed scope")
                found.update(value)
            else:
                raise InvalidTokenError(reason=f"claim {path!r} (scopes) has the wrong type")
        return frozenset(found)

    def _acts_for_user(
        self, claims: Mapping[str, Any], subject: str | None, client_id: str | None
    ) -> bool:
        if subject is None:
            return False
        if self._user_rule is not None:
            return bool(self._user_rule(claims))
        if self._user_prefix is not None:
            return subject.startswith(self._user_prefix)
        # Generic rule: a client-credentials token names the client as subject.
        if claims.get("gty") == "client-credentials":
            return False
        return subject != client_id


def build_context(
    claims: Mapping[str, Any],
    settings: Settings,
    *,
    strategy: str = "jwks",
    owned: bool = False,
) -> AuthContext:
    """Map verified ``claims`` to an :class:`AuthContext`.

    :param claims: claims that passed every check.
    :param settings: gives the claim mappings and the user rule.
    :param strategy: ``"jwks"`` or ``"introspection"``.
    :param owned: ``claims`` is a dict that nothing else holds (the verifier's
        own parse): it is wrapped read-only without a copy.
    :raises InvalidTokenError: when a mapped claim has the wrong type.
    """
    # Apps keep one ContextBuilder per app state; this one-off helper is for
    # callers outside the hot path (the CLI, tests).
    return ContextBuilder(settings).build(claims, strategy, owned)


#: The ``g`` key naming the request whose verification ``g.auth`` holds.
#: ``g`` lives in the app context, and Flask reuses an app context that is
#: already pushed (``app.app_context().push()`` at import, a test fixture)
#: for every request of the thread: without this stamp, one request would
#: see the ``g.auth`` of the one before. It holds the request object itself
#: (compared by identity: a live object is never another request), so in such
#: a reused app context the last request stays referenced until the next one
#: replaces it or the context is popped, as its ``g.auth`` does.
REQUEST_KEY = "_oauth_verify_request"


#: The stamp of a context set outside any request (the CLI, a job, a test).
_OUTSIDE = object()


def _this_request() -> Any:
    """The current request object, or ``None`` outside a request."""
    return request._get_current_object() if has_request_context() else None  # type: ignore[attr-defined]


def stamp(current: Any) -> Any:
    """What :data:`REQUEST_KEY` holds for a context set in request ``current``
    (``None``: outside a request): the request object, or a marker."""
    return _OUTSIDE if current is None else current


def stamped_for(namespace: Mapping[str, Any], current: Any) -> bool:
    """Whether ``namespace`` (``g``'s) was stamped by request ``current``
    (``None``: outside any request)."""
    return namespace.get(REQUEST_KEY) is (_OUTSIDE if current is None else current)


def set_auth(context: AuthContext | None, namespace: dict[str, Any] | None = None) -> None:
    """Put ``context`` on ``g.auth`` for this request (verify_request writes
    the same lines itself).

    :param namespace: ``g.__dict__`` when the caller already holds it.
    """
    # Same as ``g.auth = context`` without the proxy and g's Python __setattr__.
    if namespace is None:
        namespace = g._get_current_object().__dict__
    namespace["auth"] = context
    namespace[REQUEST_KEY] = stamp(_this_request())


def request_auth() -> AuthContext | None:
    """``g.auth`` if it was set for the current request, else ``None``.

    Outside a request, only a context set outside any request counts (the
    CLI, a job, a test): never the ``g.auth`` a finished request left in a
    shared app context.
    """
    if not has_app_context():
        return None
    namespace = g._get_current_object().__dict__
    context = namespace.get("auth")
    if not isinstance(context, AuthContext):
        return None
    if not stamped_for(namespace, _this_request()):
        return None  # left behind by an earlier request of a reused app context
    return context


def get_auth() -> AuthContext:
    """Return ``g.auth``.

    :raises RuntimeError: when no verification decorator ran in this request
        (or ``optional=True`` found no token).
    """
    context = request_auth()
    if context is None:
        raise RuntimeError(
            "No verified token in this request: decorate the view with "
            "@require_token (or call verify_request()) first."
        )
    return context


def _current_auth() -> AuthContext | None:
    return request_auth()


#: A proxy to ``g.auth``: the :class:`AuthContext` of the request, or ``None``.
current_auth: AuthContext = cast(AuthContext, LocalProxy(cast(Callable[[], Any], _current_auth)))
