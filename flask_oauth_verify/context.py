"""The authorization context of a request: :class:`AuthContext` on ``g.auth``.

Only this module sets ``g.auth``, and only to a frozen :class:`AuthContext`
built from claims that passed every check. The raw token is never stored in
it, so it can never show up in ``repr()`` or in logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

from flask import g, has_app_context
from werkzeug.local import LocalProxy

from .claims import claim_path
from .config import Settings
from .errors import InvalidTokenError

__all__ = ["AuthContext", "build_context", "current_auth", "get_auth"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True)
class AuthContext:
    """Who is calling, for which organization, with which scopes.

    Put on ``g.auth`` by the decorators once every check has passed. All
    fields are read-only; ``claims`` is a read-only mapping of the verified
    claims (or of the introspection response).
    """

    subject: str | None
    client_id: str | None
    scopes: frozenset[str]
    organization_id: str | None
    user_id: str | None
    service_name: str | None
    token_type: str
    issuer: str | None
    audience: tuple[str, ...]
    expires_at: int | None
    issued_at: int | None
    claims: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _EMPTY, repr=False)
    strategy: str = "jwks"
    token_id: str | None = None

    def has_scopes(self, *scopes: str, any_of: bool = False) -> bool:
        """Whether the token holds all (or, with ``any_of``, one) of ``scopes``.

        Scopes compare exactly: ``read:users-admin`` never satisfies
        ``read:users``.
        """
        if not scopes:
            return True
        if any_of:
            return not self.scopes.isdisjoint(scopes)
        return self.scopes.issuperset(scopes)


def _first_string(claims: Mapping[str, Any], paths: tuple[str, ...], field: str) -> str | None:
    for path in paths:
        value = claim_path(claims, path)
        if value is None:
            continue
        if isinstance(value, str):
            return value
        raise InvalidTokenError(reason=f"claim {path!r} ({field}) is not a string")
    return None


def _scopes(claims: Mapping[str, Any], paths: tuple[str, ...]) -> frozenset[str]:
    found: set[str] = set()
    for path in paths:
        value = claim_path(claims, path)
        if value is None:
            continue
        if isinstance(value, str):
            # RFC 6749 §3.3: scope-tokens are separated by SP only; a tab or a
            # Unicode space is part of a (malformed) token, never a separator.
            found.update(item for item in value.split(" ") if item)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            for item in value:
                # a list element with a space would smuggle two scopes in one
                if not item or " " in item:
                    raise InvalidTokenError(reason=f"claim {path!r} holds a malformed scope")
                found.add(item)
        else:
            raise InvalidTokenError(reason=f"claim {path!r} (scopes) has the wrong type")
    return frozenset(found)


def _audience(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(item for item in value if isinstance(item, str))


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


#: The string fields of the context, in the order their claims are checked.
_STRING_FIELDS = ("subject", "client_id", "token_type", "organization_id", "service_name")


def _string_fields(
    claims: Mapping[str, Any], mapping: Mapping[str, tuple[str, ...]]
) -> list[str | None]:
    """:func:`_first_string` of every string field, in one call (hot path)."""
    found: list[str | None] = []
    for field in _STRING_FIELDS:
        value: Any = None
        for path in mapping[field]:
            value = claims.get(path) if "." not in path else claim_path(claims, path)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidTokenError(reason=f"claim {path!r} ({field}) is not a string")
            break
        found.append(value)
    return found


def _acts_for_user(
    claims: Mapping[str, Any], subject: str | None, client_id: str | None, settings: Settings
) -> bool:
    if subject is None:
        return False
    if settings.user_id_rule is not None:
        return bool(settings.user_id_rule(claims))
    if settings.user_id_prefix is not None:
        return subject.startswith(settings.user_id_prefix)
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
    # Few calls on purpose: this runs for every first-seen token, where each
    # Python call is a measurable share of the cost (see docs/performance.rst).
    mapping = settings.claim_map
    subject, client_id, token_type, organization_id, service_name = _string_fields(
        claims, mapping
    )
    get = claims.get
    jti = get("jti")
    issuer = get("iss")
    aud = get("aud")
    exp = get("exp")
    iat = get("iat")
    return AuthContext(
        subject=subject,
        client_id=client_id,
        scopes=_scopes(claims, mapping["scopes"]),
        organization_id=organization_id,
        user_id=subject if _acts_for_user(claims, subject, client_id, settings) else None,
        service_name=service_name,
        token_type=token_type or "unknown",
        issuer=issuer if isinstance(issuer, str) else None,
        audience=(aud,) if isinstance(aud, str) else _audience(aud),
        expires_at=int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None,
        issued_at=int(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None,
        claims=MappingProxyType(claims if owned and type(claims) is dict else dict(claims)),
        strategy=strategy,
        token_id=jti if isinstance(jti, str) else None,
    )


def set_auth(context: AuthContext | None) -> None:
    """Put ``context`` on ``g.auth`` (the one place that does)."""
    # Same as ``g.auth = context`` without the proxy and g's Python __setattr__.
    g._get_current_object().__dict__["auth"] = context


def get_auth() -> AuthContext:
    """Return ``g.auth``.

    :raises RuntimeError: when no verification decorator ran in this request
        (or ``optional=True`` found no token).
    """
    context = g.get("auth") if has_app_context() else None
    if not isinstance(context, AuthContext):
        raise RuntimeError(
            "No verified token in this request: decorate the view with "
            "@require_token (or call verify_request()) first."
        )
    return context


def _current_auth() -> AuthContext | None:
    return cast("AuthContext | None", g.get("auth")) if has_app_context() else None


#: A proxy to ``g.auth``: the :class:`AuthContext` of the request, or ``None``.
current_auth: AuthContext = cast(AuthContext, LocalProxy(cast(Callable[[], Any], _current_auth)))
