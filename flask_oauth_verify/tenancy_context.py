"""Whom tenant-scoped data is for: an ``as_organization()`` block, else the verified request.

Public in :mod:`flask_oauth_verify.tenancy` (:func:`~flask_oauth_verify.tenancy.as_organization`,
:func:`~flask_oauth_verify.tenancy.current_organization_id`,
:func:`~flask_oauth_verify.tenancy.current_user_id`). This module imports
no SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

from flask import has_app_context, has_request_context
from flask.globals import app_ctx

from .context import AuthContext, _this_request, request_auth, stamp
from .errors import MissingOrganizationContext, MissingUserContext
from .extension import get_state
from .tenancy_errors import TenantContextError

DEFAULT_ORGANIZATION_COLUMN = "organization_id"
DEFAULT_USER_COLUMN = "user_id"


@dataclasses.dataclass(slots=True, eq=False)
class _Acting:
    """An :func:`as_organization` identity, stamped with where its block was entered.

    ``entered_in`` is the request the block was entered in; outside any
    request, the application context (a marker without one): see
    :func:`_where`. A context
    variable can outlive its block in the thread's own context: asgiref's
    ``async_to_sync`` (Flask's ``async def`` views) copies the coroutine's
    variables back into the worker thread, so a generator left suspended
    inside the block leaves the identity set for every later request of
    that thread. The identity counts only where it was entered.
    """

    organization_id: str
    user_id: str | None
    entered_in: Any
    #: the identity active when the block was entered
    outer: _Acting | None = None
    #: the block has ended (finished late, it may still be the variable's value)
    ended: bool = False


_ACTING: contextvars.ContextVar[_Acting | None] = contextvars.ContextVar(
    "oauth_verify_acting_organization", default=None
)


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, not {value!r}.")
    return value


@contextlib.contextmanager
def as_organization(organization_id: str, *, user_id: str | None = None) -> Iterator[None]:
    """Act for ``organization_id`` (and optionally ``user_id``) inside the block.

    For code that runs outside a request — CLI commands, background jobs,
    tests — and for deliberate impersonation inside one. The innermost block
    wins over ``g.auth``; the previous identity comes back when it ends. The
    value lives in a :mod:`contextvars` variable, so threads and asyncio
    tasks each have their own.

    :param organization_id: the organization to scope to.
    :param user_id: the user :func:`user_scoped` scopes to (none if omitted;
        it is never taken from ``g.auth`` inside the block).
    :raises ValueError: when an id is empty or not a string.

    .. versionadded:: 0.1.0
    """
    acting = _Acting(
        _check_id(organization_id, "organization_id"),
        None if user_id is None else _check_id(user_id, "user_id"),
        _where(),
        _ACTING.get(),
    )
    token = _ACTING.set(acting)
    try:
        yield
    finally:
        # Undo the block only while it is the innermost one: a block left
        # open and finished late (a generator collected during another block)
        # must not end the block that is active now, and is marked ended so
        # that it no longer counts when that block restores it. A block undone
        # here is not marked: a task created in it holds it in its own copy of
        # the context and keeps acting for it after the block ends.
        if _ACTING.get() is not acting:
            acting.ended = True
        else:
            try:
                _ACTING.reset(token)
            except ValueError:  # finished in another Context than it began in,
                acting.ended = True  # which may still hold it
                previous = token.old_value
                _ACTING.set(None if previous is contextvars.Token.MISSING else previous)


def _where() -> Any:
    """Where code runs, for :class:`_Acting`: the request object in a request;
    outside one, the application context object (a job, a CLI command, a
    Celery task each push their own); else a marker."""
    current = _this_request()
    if current is not None:
        return current
    if has_app_context():
        return app_ctx._get_current_object()  # type: ignore[attr-defined]
    return stamp(None)


def _acting() -> _Acting | None:
    """The innermost :func:`as_organization` identity entered where this code runs.

    One entered in another request, another application context, or
    outside any request when this code runs in one (or the other way round)
    is ignored: it was left behind in the thread's context (see
    :class:`_Acting`).
    """
    acting = _ACTING.get()
    while acting is not None and acting.ended:
        acting = acting.outer
    if acting is None or acting.entered_in is _where():
        return acting
    return None


def _verified_context() -> AuthContext | None:
    # Only the decorators put an AuthContext on g.auth, after verification;
    # request_auth() ignores one an earlier request left in a reused app context.
    return request_auth()


def _missing(kind: str) -> Exception:
    if has_request_context():
        if kind == "organization":
            return MissingOrganizationContext(reason="tenant-scoped data used without organization")
        return MissingUserContext(reason="user-scoped data used without a user")
    return TenantContextError(
        f"No {kind} to scope the data to: this code runs outside a request. "
        f"Wrap it in `with as_organization(...)`, or mark an admin statement "
        f"with unscoped(stmt, reason=...)."
    )


def current_organization_id() -> str:
    """The organization data is scoped to right now.

    :func:`as_organization` if active, else the verified
    ``g.auth.organization_id`` of the request.

    :raises MissingOrganizationContext: inside a request without one (401).
    :raises TenantContextError: outside a request without one.

    .. versionadded:: 0.1.0
    """
    acting = _acting()
    if acting is not None:
        return acting.organization_id
    context = _verified_context()
    if context is not None and context.organization_id:
        return context.organization_id
    raise _missing("organization")


def current_user_id() -> str:
    """The user data is scoped to right now (see :func:`current_organization_id`).

    :raises MissingUserContext: inside a request whose token acts for no user.
    :raises TenantContextError: outside a request without one.

    .. versionadded:: 0.1.0
    """
    acting = _acting()
    if acting is not None:
        if acting.user_id is not None:
            return acting.user_id
        raise _missing("user")
    context = _verified_context()
    if context is not None and context.user_id:
        return context.user_id
    raise _missing("user")


def _configured_column(kind: str) -> str:
    if has_app_context():
        try:
            settings = get_state().settings
        except RuntimeError:
            settings = None
        if settings is not None:
            return settings.organization_column if kind == "organization" else settings.user_column
    return DEFAULT_ORGANIZATION_COLUMN if kind == "organization" else DEFAULT_USER_COLUMN
