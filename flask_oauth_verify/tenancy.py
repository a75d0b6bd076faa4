"""Tenant data scoping for SQLAlchemy: explicit helpers, automatic scoping, write guard.

The organization (tenant) a query runs for comes only from *verified*
claims: ``g.auth.organization_id`` of the request (set by the decorators
after every check passed), or an explicit :func:`as_organization` block in
code (CLI commands, background jobs). Nothing else — no header, no query
string, no request body — can choose it.

Two ways to use it:

* explicit — :func:`org_scoped` / :func:`user_scoped` add
  ``WHERE <column> = <current value>`` to one SQLAlchemy 2.x ``select()``
  (or ``update()`` / ``delete()``) or legacy ``Query``;
* automatic — :func:`enable_tenant_scoping` installs session listeners that
  scope every ORM statement of every mapped class with the organization
  column (relationship and lazy loads, joined and selectin eager loads,
  subqueries, ORM bulk ``update()`` / ``delete()``) and guard every write.

Both fail closed: with no organization, a request gets the 401
``missing_organization_context`` response and code outside a request gets
:class:`TenantContextError`. SQLAlchemy is an optional extra: this module is
imported only when used.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import decimal
import enum
import functools
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import sqlalchemy
from flask import has_app_context, has_request_context
from flask.globals import app_ctx
from sqlalchemy import (
    Column,
    Select,
    Table,
    bindparam,
    cast,
    event,
    func,
    inspect,
    literal,
    select,
    tuple_,
    union_all,
)
from sqlalchemy.orm import (
    ColumnProperty,
    Mapper,
    ORMExecuteState,
    Query,
    RelationshipProperty,
    Session,
    aliased,
    registry,
    scoped_session,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import (
    BindParameter,
    ClauseElement,
    ColumnClause,
    ColumnElement,
)
from sqlalchemy.sql.selectable import (
    Exists,
    FromClause,
    ScalarSelect,
    SelectBase,
    TableClause,
    TextualSelect,
)
from sqlalchemy.util import immutabledict

from .context import AuthContext, _this_request, request_auth, stamp
from .errors import MissingOrganizationContext, MissingUserContext, OAuthVerifyError
from .extension import get_state
from .fifo import BoundedFifo
from .sqlshape import (
    _STATEMENTS,
    _base_table,
    _correlated,
    _correlates,
    _first_column_annotation,
    _from_name,
    _join_target_froms,
    _joinable,
    _joined_froms,
    _keyed_condition,
    _optional_froms,
    _paired,
    _plain_from,
    _refers,
    _relationship_target,
    _setup_joins,
    _surface_expressions,
    _tenant_reads,
)

#: The oldest SQLAlchemy release automatic scoping is safe with.
_MINIMUM_SQLALCHEMY = (2, 1)


def _require_sqlalchemy(version: str) -> None:
    """Refuse a SQLAlchemy release that would let scoped statements leak.

    SQLAlchemy 2.0 applies :func:`~sqlalchemy.orm.with_loader_criteria` to
    no entity named only in the ``WHERE`` of a subquery: the ``EXISTS`` of
    ``relationship.any()`` / ``has()`` and of ``exists().where(Model.x ==
    …)`` would test every organization's rows. Failing at import names the
    fix; running would leak.

    :param version: ``sqlalchemy.__version__``.
    :raises ImportError: for a release before 2.1.
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) < _MINIMUM_SQLALCHEMY:
        raise ImportError(
            f"flask_oauth_verify.tenancy needs SQLAlchemy 2.1 or later, not {version}: "
            f"SQLAlchemy 2.0 does not scope entities named only inside an EXISTS "
            f"subquery (relationship.any()/has(), exists().where(...)), which would read "
            f"every organization's rows. pip install 'flask-oauth-verify[sqlalchemy]' "
            f"(SQLAlchemy>=2.1)."
        )


_require_sqlalchemy(sqlalchemy.__version__)

__all__ = [
    "BYPASS_OPTION",
    "CrossTenantWriteError",
    "TenantContextError",
    "TenantScoping",
    "TenantScopingError",
    "as_organization",
    "current_organization_id",
    "current_user_id",
    "enable_tenant_scoping",
    "org_scoped",
    "unscoped",
    "user_scoped",
]

logger = logging.getLogger("flask_oauth_verify.tenancy")

S = TypeVar("S")

#: The execution option that lets one statement run without automatic
#: scoping; its value is the (logged) reason. Set it with :func:`unscoped`.
BYPASS_OPTION = "tenant_scoping_bypass"

#: Marks a statement scoped by :func:`org_scoped` (value: the organization and
#: the ``(table or alias, column name)`` pairs it compared), so that a Core
#: statement scoped by hand passes the automatic listener.
_SCOPED_BY_HELPER = "_oauth_verify_org_scoped"
#: Set by the listener on scoped statements: the organization every loaded
#: row must belong to (checked by the load guard).
_EXPECTED_ORG = "_oauth_verify_expected_org"
#: Our own check queries skip the listener.
_INTERNAL = "_oauth_verify_internal"
#: ``Session.info`` key: the states ``before_flush`` checked (for ``after_flush``).
_FLUSH_SEEN = "_oauth_verify_flush_seen"
#: Written rows checked per ``SELECT`` (an ``IN`` list; SQLite allowed 999
#: bound parameters per statement before 3.32).
_REFERENCES_PER_QUERY = 500
#: Given key values checked per ``SELECT`` (a ``UNION ALL`` of one-row selects:
#: SQLite allows 500 of them, and two bound parameters each).
_GIVEN_PER_QUERY = 200
#: ``Session.info`` key: (state id, key attribute) -> the value ``before_flush``
#: found this organization's (``after_flush`` does not ask again).
_FLUSH_VERIFIED = "_oauth_verify_flush_verified"
#: ``Session.info`` key: the scoping whose flush is running (for ``before_insert``).
_FLUSH_SCOPING = "_oauth_verify_flush_scoping"
#: Set on ``from_statement()`` loads: a row must carry its organization.
_FROM_STATEMENT = "_oauth_verify_from_statement"
#: ``InstanceState.info`` key: (organization, identity key) the object was
#: loaded for by a scoped statement, or inserted for by a guarded flush.
_LOADED_FOR = "_oauth_verify_loaded_for"
#: ``InstanceState.info`` key: the organization a new object was added to
#: the session for (``transient_to_pending``), if there was one.
_ADDED_FOR = "_oauth_verify_added_for"
#: ``Session.info`` key: the organization the session last worked for.
_SESSION_ORG = "_oauth_verify_session_organization"

DEFAULT_ORGANIZATION_COLUMN = "organization_id"
DEFAULT_USER_COLUMN = "user_id"


# -- errors -------------------------------------------------------------------


class TenantContextError(RuntimeError):
    """Tenant-scoped data was used outside a request with no organization.

    Inside a request the same situation is the 401
    :class:`~flask_oauth_verify.errors.MissingOrganizationContext` (or
    ``MissingUserContext``) response. Outside one, wrap the code in
    :func:`as_organization`.
    """


class TenantScopingError(RuntimeError):
    """A statement or setup that tenant scoping cannot make safe.

    Raised instead of running the statement unscoped: a Core statement on a
    tenant table, an ``INSERT … FROM SELECT`` or upsert into one, a column
    that does not exist, a mismatched configuration.
    """


class CrossTenantWriteError(OAuthVerifyError):
    """A write would insert, change or delete a row of another organization.

    Raised before anything reaches the database; inside a request it becomes
    a 403 JSON response (``"error": "cross_tenant_write"``).
    """

    code = 403
    error: ClassVar[str] = "cross_tenant_write"
    challenge_error: ClassVar[str | None] = None
    default_description: ClassVar[str] = "The request would write another organization's data."


@dataclasses.dataclass(frozen=True, slots=True)
class _Reference:
    """A way a written row names a scoped row: its columns ``keys`` (attribute
    keys) equal the ``target_keys`` of a ``target`` row (a foreign key, single
    or composite, or a many-to-one relationship's join)."""

    keys: tuple[str, ...]
    target: Mapper[Any]
    target_keys: tuple[str, ...]
    #: many-to-one relationships over exactly these columns (their objects may vouch)
    via: tuple[str, ...] = ()


# -- who are we acting for ----------------------------------------------------


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
        acting.ended = True
        # Undo the block only while it is the innermost one: a block left
        # open and finished late (a generator collected during another block)
        # must not end the block that is active now (and, ended, it no longer
        # counts when that block restores it).
        if _ACTING.get() is acting:
            try:
                _ACTING.reset(token)
            except ValueError:  # finished in another Context than it began in
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


# -- explicit helpers -----------------------------------------------------------


def _mapper_column_key(mapper: Mapper[Any], name: str) -> str | None:
    """The attribute key of ``mapper``'s column called ``name`` (key or SQL name)."""
    if name in mapper.columns:
        return name
    for key, column in mapper.columns.items():
        if getattr(column, "name", None) == name:
            return str(key)
    return None


def _entity_column(entity: Any, name: str) -> Any | None:
    """``entity``'s column ``name``: a mapped class, an alias of one, or a table."""
    if entity is None:
        return None
    info = inspect(entity, raiseerr=False)
    mapper = getattr(info, "mapper", None)
    if isinstance(mapper, Mapper):
        key = _mapper_column_key(mapper, name)
        return getattr(entity, key) if key is not None else None
    columns = getattr(entity, "c", None)
    if columns is not None and name in columns:
        return columns[name]
    return None


def _leftmost(from_clause: Any) -> Any:
    while hasattr(from_clause, "left") and hasattr(from_clause, "right"):
        from_clause = from_clause.left
    return from_clause


def _primary_column(statement: Any, name: str) -> Any:
    """The ``name`` column of the statement's primary entity (fail closed)."""
    candidates: list[Any] = []
    if isinstance(statement, Update | Delete):
        description = statement.entity_description
        candidates += [description.get("entity"), description.get("table")]
    else:
        candidates += [d.get("entity") for d in statement.column_descriptions]
        core: Any = statement.statement if isinstance(statement, Query) else statement
        candidates += [_leftmost(f) for f in core.get_final_froms()]
    for entity in candidates:
        column = _entity_column(entity, name)
        if column is not None:
            return column
    raise TenantScopingError(
        f"Cannot scope this statement: none of its entities has a column named {name!r}. "
        f"Pass column=… explicitly."
    )


def _check_statement(statement: object) -> None:
    if not isinstance(statement, Query | Select | Update | Delete):
        raise TypeError(
            f"org_scoped()/user_scoped() take a select(), update(), delete() or Query, "
            f"not {type(statement).__name__}."
        )


def _compared(column: Any) -> frozenset[tuple[Any, str]]:
    """The FROM object (table or alias) and column name ``column`` compares."""
    element = getattr(column, "__clause_element__", None)
    if callable(element):  # an ORM attribute, of a class or of an alias
        column = element()
    table, name = getattr(column, "table", None), getattr(column, "name", None)
    if table is None or not isinstance(name, str):
        return frozenset()
    return frozenset({(table, name)})


def _org_marker(
    statement: Any, organization: str, column: Any
) -> tuple[str, frozenset[tuple[Any, str]]]:
    """The organization and every FROM object :func:`org_scoped` compared on ``statement``."""
    compared = _compared(column)
    options: Mapping[str, Any] = getattr(statement, "get_execution_options", dict)()
    previous = options.get(_SCOPED_BY_HELPER)
    if isinstance(previous, tuple) and previous[0] == organization:
        compared |= previous[1]
    return organization, compared


def _add_criteria(statement: S, criterion: ColumnElement[bool], marker: Any) -> S:
    if isinstance(statement, Query):
        query: Query[Any] = statement
        if query._limit_clause is not None or query._offset_clause is not None:
            # WHERE applies before LIMIT in SQL, which is what scoping means;
            # Query only refuses filter() after limit() to catch mistakes.
            query = query.enable_assertions(False).filter(criterion).enable_assertions(True)
        else:
            query = query.filter(criterion)
        return query  # type: ignore[return-value]
    _check_statement(statement)
    scoped: Any = statement.where(criterion)  # type: ignore[attr-defined]
    if marker is not None:
        scoped = scoped.execution_options(**{_SCOPED_BY_HELPER: marker})
    return scoped  # type: ignore[no-any-return]


#: Bumped whenever a class is mapped: cached lists of tenant classes are rebuilt.
_MAPPER_GENERATION = [0]
_REGISTRY_TENANTS: dict[tuple[int, str], tuple[int, registry, tuple[tuple[Any, str], ...]]] = {}


def _mapper_added(*_args: Any) -> None:
    _MAPPER_GENERATION[0] += 1


event.listen(Mapper, "instrument_class", _mapper_added)
event.listen(Mapper, "after_configured", _mapper_added)

#: mapper -> attribute key of its organization column, for the criteria lambda
_KEYS_LOCK = threading.Lock()
_TENANT_KEYS: weakref.WeakKeyDictionary[Mapper[Any], str] = weakref.WeakKeyDictionary()


def _tenant_column(entity: Any) -> Any:
    """The organization column of ``entity`` (a mapped class or an alias of one)."""
    # ``__mapper__`` also reaches through aliases and SQLAlchemy's wrapper
    mapper = getattr(entity, "__mapper__", None) or inspect(entity).mapper
    return getattr(entity, _TENANT_KEYS[mapper])


def _criteria(cls: Any, organization: str) -> Any:
    # A lambda, so that SQLAlchemy re-targets it to aliases of ``cls``; the
    # closure variable ``organization`` becomes a bound parameter of the
    # cached statement, never a literal baked into the cache.
    return with_loader_criteria(
        cls, lambda entity: _tenant_column(entity) == organization, include_aliases=True
    )


@functools.lru_cache(maxsize=1024)
def _criteria_options(tenants: tuple[tuple[Any, str], ...], organization: str) -> tuple[Any, ...]:
    # The options are immutable: build them once per organization, not per query.
    return tuple(_criteria(cls, organization) for cls, _key in tenants)


def _register_tenants(found: tuple[tuple[Any, str], ...]) -> None:
    with _KEYS_LOCK:
        for cls, key in found:
            known = _TENANT_KEYS.setdefault(inspect(cls), key)
            if known != key:
                raise TenantScopingError(
                    f"{cls.__name__} is scoped by two columns ({known!r} and {key!r})."
                )


def _registry_tenants(reg: registry, name: str) -> tuple[tuple[Any, str], ...]:
    """Every class of ``reg`` with a column ``name``, with its attribute key."""
    key = (id(reg), name)
    cached = _REGISTRY_TENANTS.get(key)
    if cached is not None and cached[0] == _MAPPER_GENERATION[0] and cached[1] is reg:
        return cached[2]
    generation = _MAPPER_GENERATION[0]
    found = tuple(
        (m.class_, column)
        for m in sorted(reg.mappers, key=lambda m: (m.class_.__module__, m.class_.__qualname__))
        if (column := _mapper_column_key(m, name)) is not None
    )
    _register_tenants(found)
    _REGISTRY_TENANTS[key] = (generation, reg, found)
    return found


def _with_joined_criteria(statement: S, column: Any, name: str, organization: str) -> S:
    """Scope every other entity of an ORM statement too (joins, subqueries, loads).

    An ORM ``update()`` / ``delete()`` gets the criteria for its subqueries,
    and its other tenant tables (``UPDATE … FROM``) a ``WHERE`` each.
    """
    mapper = getattr(getattr(column, "parent", None), "mapper", None)
    if not isinstance(mapper, Mapper) or not isinstance(
        statement, Select | Query | Update | Delete
    ):
        return statement
    tenants = _registry_tenants(mapper.registry, name)
    scoped: Any = statement.options(*_criteria_options(tenants, organization))
    if isinstance(scoped, Update | Delete):
        tables: dict[Any, str] = {}
        for cls, key in tenants:
            tenant = inspect(cls)
            column_name = tenant.columns[key].name
            tables.update((t, column_name) for t in tenant.tables if column_name in t.c)
        scoped = _scope_extra_froms(scoped, _TenantTables(tables), organization)
    return scoped  # type: ignore[no-any-return]


def org_scoped(query_or_select: S, column: Any = None) -> S:
    """Add ``WHERE <organization column> = <current organization>`` to ``query_or_select``.

    Works on a SQLAlchemy 2.x ``select()`` (with joins, ``order_by``,
    ``limit``; for ``db.paginate()``), ``update()`` / ``delete()``, and on a
    legacy ``Query`` such as Flask-SQLAlchemy's ``Model.query`` (also after
    ``limit()``, and before ``.paginate()``). Returns a new statement.

    :param query_or_select: the statement or query to scope.
    :param column: the column to compare, e.g. ``Task.organization_id``;
        by default the column named ``OAUTH_VERIFY_ORGANIZATION_COLUMN``
        (``organization_id``) of the statement's primary (first) entity;
        in an ORM statement every other mapped class of the same registry
        with that column is then scoped too, wherever it appears (a join's
        ``ON`` clause, subqueries, eager and lazy loads of the results).
        An explicit ``column`` adds exactly one ``WHERE`` and nothing else.
    :raises MissingOrganizationContext: inside a request without an
        organization (401 ``missing_organization_context``).
    :raises TenantContextError: outside a request without an organization.
    :raises TenantScopingError: when no entity has the column.

    .. versionadded:: 0.1.0
    """
    _check_statement(query_or_select)
    organization = current_organization_id()
    if column is not None:
        marker = _org_marker(query_or_select, organization, column)
        return _add_criteria(query_or_select, column == organization, marker)
    name = _configured_column("organization")
    target = _primary_column(query_or_select, name)
    marker = _org_marker(query_or_select, organization, target)
    scoped = _add_criteria(query_or_select, target == organization, marker)
    return _with_joined_criteria(scoped, target, name, organization)


def user_scoped(query_or_select: S, column: Any = None) -> S:
    """Add ``WHERE <user column> = <current user>`` to ``query_or_select``.

    Like :func:`org_scoped` for ``g.auth.user_id`` and
    ``OAUTH_VERIFY_USER_COLUMN`` (``user_id``). Combine both for data that
    belongs to one user of one organization:
    ``user_scoped(org_scoped(select(Task)))``.

    :raises MissingUserContext: inside a request whose token acts for no
        user (401 ``missing_user_context``).
    :raises TenantContextError: outside a request without a user.
    :raises TenantScopingError: when no entity has the column.

    .. versionadded:: 0.1.0
    """
    _check_statement(query_or_select)
    user = current_user_id()
    target = (
        column
        if column is not None
        else _primary_column(query_or_select, _configured_column("user"))
    )
    return _add_criteria(query_or_select, target == user, None)


def unscoped(statement: S, *, reason: str) -> S:
    """Let ``statement`` run without automatic scoping: the logged admin opt-out.

    Sets the :data:`BYPASS_OPTION` execution option; every execution is
    logged at WARNING on ``flask_oauth_verify.tenancy`` with ``reason``.
    Only the statement itself is exempt: lazy loads it triggers later are
    scoped again, and flushes still pass the write guard.

    :param statement: a ``select()``, ``update()``, ``delete()``, ``insert()``
        or ``Query``.
    :param reason: why, for the audit log (required, non-empty).
    :raises ValueError: without a reason.

    .. versionadded:: 0.1.0
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("unscoped() needs a non-empty reason for the audit log.")
    return statement.execution_options(**{BYPASS_OPTION: reason})  # type: ignore[attr-defined, no-any-return]


# -- automatic scoping ----------------------------------------------------------


def _all_registries() -> set[registry]:
    # SQLAlchemy keeps every registry of the process here (configure_mappers
    # walks the same set); there is no public accessor.
    from sqlalchemy.orm.mapper import _all_registries as all_registries

    return set(all_registries())


def _statement_kind(state: ORMExecuteState) -> str:
    names = sorted({m.class_.__name__ for m in state.all_mappers})
    return f"{type(state.statement).__name__}({', '.join(names)})"


def _column_name_of(key: Any) -> str | None:
    if isinstance(key, str):
        return key
    for attribute in ("key", "name"):
        value = getattr(key, attribute, None)
        if isinstance(value, str):
            return value
    return None


def _literal(value: Any, overridden: Collection[str] = ()) -> Any:
    """A bound value as written; a parameter the execution overrides stays unknown."""
    if not isinstance(value, BindParameter):
        return value
    if value.callable is not None or value.key in overridden:
        # bindparam("o", "org_a") run with {"o": "org_b"} writes org_b
        return value
    return value.value


def _upsert_row(statement: Any, params: Iterable[Mapping[str, Any]]) -> list[dict[str | None, Any]]:
    """What an upsert's ``ON CONFLICT DO UPDATE SET`` (or MySQL's ``ON DUPLICATE
    KEY UPDATE``) writes, as a row keyed by column name; ``excluded.<column>``
    of the same column is the inserted value, checked with the ``VALUES`` rows.
    """
    clause = getattr(statement, "_post_values_clause", None)
    if clause is None:
        return []
    assigned = getattr(clause, "update_values_to_set", None) or getattr(clause, "update", None)
    if not assigned:
        return []
    pairs = assigned.items() if isinstance(assigned, Mapping) else assigned
    overridden = {key for row in params for key in row}
    row: dict[str | None, Any] = {}
    for key, value in pairs:
        name = _column_name_of(key)
        source = getattr(value, "table", None)
        if (
            isinstance(value, ColumnClause)
            and getattr(source, "name", None) in ("excluded", "inserted")
            and value.name == name
        ):
            continue  # the same column's inserted value
        row[name] = _literal(value, overridden)
    return [row]


def _being_written(state: Any, key: str, is_new: bool) -> Iterable[Any]:
    """What the flush writes to attribute ``key`` of ``state``: a new object's
    value, or what a persistent one's value was changed to."""
    if is_new:
        return (state.dict.get(key),)
    return state.attrs[key].history.added or ()


def _written_values(value: Any, params: list[Mapping[str, Any]]) -> list[Any]:
    """What a written value is: a ``bindparam()`` takes the execution's
    parameter of its name (per row), or its own value where one lacks it."""
    if not isinstance(value, BindParameter) or value.callable is not None:
        return [value]
    given = [row[value.key] for row in params if value.key in row]
    if len(given) < len(params) or not params:
        given.append(value.value)
    return given


def _key_converter(column: Any) -> Callable[[Any], Any]:
    """A function making a written key value what ``column`` holds (a str of
    digits for an integer key, an enum's name or value); raises when it cannot."""
    try:
        kind: Any = column.type.python_type
    except NotImplementedError:
        return lambda value: value

    def convert(value: Any) -> Any:
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            try:
                return kind[value]  # by name: what SQLAlchemy's Enum stores
            except KeyError:
                return kind(value)
        if kind is int:
            if isinstance(value, float | decimal.Decimal) and value == int(value):
                return int(value)
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            raise ValueError(f"not an integer key: {value!r}")
        if kind is decimal.Decimal and isinstance(value, int | float | str):
            return decimal.Decimal(str(value))  # raises InvalidOperation (ArithmeticError)
        if kind is float and isinstance(value, int | decimal.Decimal | str):
            return float(value)
        if kind is uuid.UUID and isinstance(value, str | bytes):
            return uuid.UUID(value) if isinstance(value, str) else uuid.UUID(bytes=value)
        if kind is str:
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            raise ValueError(f"not a string key: {value!r}")
        return value

    return convert


def _foreign(value: Any, organization: str) -> bool:
    """Whether a written organization value differs (a SQL expression always does)."""
    return isinstance(value, ClauseElement) or value != organization


def _value_rows(
    statement: Any, params: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str | None, Any]]:
    """The rows given with ``.values()``, keyed by column name.

    A ``bindparam()`` among them whose key the execution's ``params`` set is
    left as the parameter: its value is not known here.
    """
    overridden = {key for row in params for key in row}
    rows: list[dict[str | None, Any]] = []
    # ordered_values() / preserve_parameter_order fill _values in SQLAlchemy
    # 2.1 and _ordered_values (pairs) in 2.0: a release that keeps them apart
    # again must not get past the guard with them
    pairs = [*(getattr(statement, "_values", None) or {}).items()]
    pairs += getattr(statement, "_ordered_values", None) or ()
    if pairs:
        rows.append({_column_name_of(k): _literal(v, overridden) for k, v in pairs})
    for group in getattr(statement, "_multi_values", None) or ():
        for row in group:
            if not isinstance(row, Mapping):
                raise TenantScopingError(
                    "Multi-row VALUES given positionally cannot be checked by the tenant "
                    "write guard; pass one dictionary per row."
                )
            rows.append({_column_name_of(k): _literal(v, overridden) for k, v in row.items()})
    return rows


def _param_rows(state: ORMExecuteState) -> list[Mapping[str, Any]]:
    params: Any = state.parameters
    if params is None:
        return []
    if isinstance(params, Mapping):
        return [params]
    return list(params)


def _pk_keys(mapper: Mapper[Any]) -> list[str]:
    return [mapper.get_property_by_column(c).key for c in mapper.primary_key]


def _pk_identities(mapper: Mapper[Any], rows: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """The primary key of each row (all of them, or :class:`TenantScopingError`)."""
    pk_keys = _pk_keys(mapper)
    identities = []
    for row in rows:
        if not all(k in row for k in pk_keys):
            raise TenantScopingError(
                "A bulk UPDATE by primary key needs every primary key in each row."
            )
        identities.append(tuple(row[k] for k in pk_keys))
    return identities


def _expanded(mapper: Mapper[Any], row: Mapping[str, Any]) -> Mapping[str, Any]:
    """``row`` as the legacy bulk methods write it (synonyms, hybrids resolved)."""
    try:
        from sqlalchemy.orm.bulk_persistence import _expand_other_attrs
    except ImportError:
        # unchecked rows could move a row through a synonym: refuse instead
        raise TenantScopingError(
            f"The legacy bulk methods cannot be checked by tenant scoping with SQLAlchemy "
            f"{sqlalchemy.__version__} (sqlalchemy.orm.bulk_persistence._expand_other_attrs "
            f"is missing); refused. Use session.execute(insert(...)) / update(...) "
            f"instead, which are checked without it."
        ) from None
    copy = dict(row)
    _expand_other_attrs(mapper, [copy])
    return copy


def _scope_extra_froms(
    statement: Any, tenant_tables: Mapping[Any, str], organization: str, inherit: bool = True
) -> Any:
    """Scope the other tables of an ``UPDATE … FROM`` / ``DELETE … USING``.

    A column of another table in the ``WHERE`` or ``SET`` of an ORM
    ``update()`` / ``delete()`` makes that table an extra ``FROM``, which
    loader criteria (applied to the target entity and to subqueries)
    never reach: each such tenant table, or alias of one, gets its own
    ``<column> = <organization>``.
    """
    if isinstance(statement, FromStatement):  # select(X).from_statement(update(...))
        inner = _scope_extra_froms(statement.element, tenant_tables, organization, inherit)
        return _with_dml(statement, inner)
    target = getattr(statement, "table", None)
    own = target._deannotate() if target is not None else None
    values = [v for _k, v in (getattr(statement, "_ordered_values", None) or ())]
    values += list((getattr(statement, "_values", None) or {}).values())
    stack = [*statement._where_criteria, *values]
    found: dict[int, Any] = {}
    while stack:
        element = stack.pop()
        if not isinstance(element, ClauseElement) or isinstance(
            element, SelectBase | ScalarSelect | Exists
        ):
            continue  # subqueries get the loader criteria
        table = getattr(element, "table", None)
        if isinstance(element, ColumnClause) and isinstance(table, FromClause):
            plain = table._deannotate()
            name = tenant_tables.get(_base_table(plain))
            if plain is not own and name is not None and name in plain.c:
                found.setdefault(id(plain), plain.c[name] == organization)
        stack.extend(element.get_children())
    joins = _inherit_conditions(target) if inherit else []
    return statement.where(*found.values(), *joins) if found or joins else statement


def _inherit_conditions(target: Any) -> list[Any]:
    """The joins from a joined subclass's table to the parent table with its organization column.

    An ORM ``update()`` / ``delete()`` of a joined-inheritance subclass
    writes the subclass's own table. When the organization column lives on
    a parent table (the layout ``docs/tenancy.rst`` recommends), the loader
    criteria compare that parent's column, and SQLAlchemy adds the parent
    as an extra ``FROM`` without joining it: every organization's subclass
    rows would match as soon as the current one has any row. The mapper's
    inherit conditions, up to the table holding the column, join them.
    """
    annotations = getattr(target, "_annotations", None) or {}
    mapper = getattr(annotations.get("parententity"), "mapper", None)
    key = _TENANT_KEYS.get(mapper) if isinstance(mapper, Mapper) else None
    if mapper is None or key is None or key not in mapper.columns:
        return []
    holder = mapper.columns[key].table
    joins = []
    while mapper.local_table is not holder and mapper.inherit_condition is not None:
        joins.append(mapper.inherit_condition)
        mapper = mapper.inherits
    return joins


def _ctes_writing(ctes: Iterable[Any], tenant_tables: Mapping[Any, str]) -> list[str]:
    """The tenant tables an ``INSERT``/``UPDATE``/``DELETE`` among ``ctes`` writes.

    A table counts when it holds the organization column, or when the ORM
    entity written is a tenant class whose column lives on a parent table
    (a joined-inheritance subclass: its own table has no column to compare).
    """
    written: set[str] = set()
    for cte in ctes:
        inner = getattr(cte, "element", None)
        table = getattr(inner, "table", None) if isinstance(inner, UpdateBase) else None
        if table is None:
            continue
        base = _base_table(table._deannotate())
        annotations = getattr(table, "_annotations", None) or {}
        mapper = getattr(annotations.get("parententity"), "mapper", None)
        if tenant_tables.get(base) is not None or (
            isinstance(mapper, Mapper) and _TENANT_KEYS.get(mapper) is not None
        ):
            written.add(base.name)
    return sorted(written)


def _refuse_nested_writes(
    _connection: Any,
    _cursor: Any,
    _sql: str,
    _parameters: Any,
    context: Any,
    _executemany: bool,
) -> None:
    """``before_cursor_execute``: refuse a data-modifying CTE on a tenant table.

    An ``INSERT``/``UPDATE``/``DELETE`` in a ``WITH`` clause
    (``select(...).add_cte(update(...).cte())``, or a CTE of one read
    anywhere in the statement) runs as part of a statement whose top level
    the write guard and the upsert refusal see, but not the nested write.
    The compiled statement lists its CTEs (no walk of the statement: usually
    there are none); a statement automatic scoping handled carries the
    scoping in its execution options.
    """
    ctes = getattr(getattr(context, "compiled", None), "ctes", None)
    if not ctes:
        return
    scoping = context.execution_options.get(_SCOPING)
    if scoping is None:
        return
    written = _ctes_writing(ctes, scoping._tenant_tables())
    if written:
        raise TenantScopingError(
            f"A data-modifying CTE (INSERT/UPDATE/DELETE in a WITH clause) writes tenant "
            f"table(s) {', '.join(written)} out of reach of the write guard; run it as a "
            f"statement of its own, or use unscoped(..., reason=...)."
        )


#: Connections of session transactions begun under automatic scoping.
_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()
_WATCHED_LOCK = threading.Lock()


def _watch_for_nested_writes(_session: Any, _transaction: Any, connection: Any) -> None:
    """``after_begin``: listen to this connection's statements (:func:`_refuse_nested_writes`).

    The listener goes on the one ``Connection`` of the transaction, as
    :mod:`flask_oauth_verify.rls` does, never on an engine: every
    statement of every engine would pay for it, and adding it while other
    threads run statements is not safe in SQLAlchemy.
    """
    with _WATCHED_LOCK:
        if connection in _WATCHED:
            return
        _WATCHED.add(connection)
    event.listen(connection, "before_cursor_execute", _refuse_nested_writes)


def _dml_of(statement: Any) -> Any:
    """The INSERT / UPDATE / DELETE itself, also of ``select(X).from_statement(<it>)``."""
    return statement.element if isinstance(statement, FromStatement) else statement


def _with_dml(statement: Any, dml: Any) -> Any:
    """``statement`` with its DML replaced by ``dml`` (a ``FromStatement`` keeps its wrapper)."""
    if not isinstance(statement, FromStatement):
        return dml
    if dml is statement.element:
        return statement
    copy = statement._generate()
    copy.element = dml
    return copy


def _replacing(statement: Any) -> bool:
    """Whether a DML statement carries SQLite's ``OR REPLACE`` (or MySQL's ``REPLACE``) prefix.

    On a key collision the database deletes the row already there, which
    may belong to another organization, and writes this one.
    """
    prefixes = getattr(_dml_of(statement), "_prefixes", ())
    return any("REPLACE" in str(prefix).upper() for prefix, _dialect in prefixes)


class _TenantTables(dict[Any, str]):
    """The tenant tables (``Table`` -> organization column name), also found by name.

    A table object other than the mapped one — ``sqlalchemy.table("projects")``,
    a ``Table`` of another ``MetaData`` or reflected — names the same rows:
    it counts as the tenant table of that name (any schema when either has
    none; names compared case-insensitively, as SQLite does).
    """

    def __init__(self, tables: Mapping[Any, str]) -> None:
        super().__init__(tables)
        self._names: dict[str, list[tuple[str | None, str]]] = {}
        for table, column in tables.items():
            name = getattr(table, "name", None)
            if isinstance(name, str):
                self._names.setdefault(name.lower(), []).append((table.schema, column))

    def get(self, table: Any, default: Any = None) -> Any:
        found = super().get(table)
        if found is not None or not isinstance(table, TableClause):
            return default if found is None else found
        for schema, column in self._names.get(table.name.lower(), ()):
            if schema is None or table.schema is None or schema == table.schema:
                return column
        return default

    def __contains__(self, table: object) -> bool:
        return self.get(table) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class _CoreVerdict:
    """What a Core statement reads of tenant tables (see :func:`_core_verdict`)."""

    #: every tenant table read, by name
    touched: tuple[str, ...]
    #: tenant tables and aliases read with no org_scoped() comparison on them
    unscoped: tuple[str, ...]
    #: the organizations of the org_scoped() markers met (one, to pass)
    organizations: frozenset[str]


_NO_COMPARISON: frozenset[tuple[Any, str]] = frozenset()


def _marker_of(element: Any) -> tuple[str, frozenset[tuple[Any, str]]] | None:
    options = getattr(element, "_execution_options", None) or {}
    marker = options.get(_SCOPED_BY_HELPER)
    if isinstance(element, Select) and isinstance(marker, tuple) and len(marker) == 2:
        return marker
    return None


def _core_verdict(statement: Any, tenant_tables: Mapping[Any, str]) -> _CoreVerdict:
    """Walk a Core statement once: which tenant tables it reads, and through what.

    Every ``SELECT`` (the statement, a subquery, a CTE, a ``UNION`` member) is
    a scope of its own. A tenant table, or an alias of one, read in a scope
    passes only if that very FROM object was compared on its organization
    column by :func:`org_scoped` on that scope's ``SELECT``; anything else is
    read for every organization.
    """
    touched: set[str] = set()
    unscoped: set[str] = set()
    organizations: set[str] = set()
    statements = [statement]
    done: set[int] = set()
    while statements:
        current = statements.pop()
        if id(current) in done:
            continue
        done.add(id(current))
        marker = _marker_of(current)
        scope = _NO_COMPARISON
        if marker is not None:
            organizations.add(marker[0])
            scope = marker[1]
        stack = list(current.get_children())
        seen: set[int] = set()
        while stack:
            element = stack.pop()
            if id(element) in seen:
                continue
            seen.add(id(element))
            if isinstance(element, _STATEMENTS):
                statements.append(element)  # a nested statement: a scope of its own
                continue
            if isinstance(element, FromClause):
                base = _base_table(element)
                if isinstance(base, TableClause):
                    name = tenant_tables.get(base)
                    if name is not None:
                        touched.add(base.name)
                        if (element, name) not in scope:
                            alias = getattr(element, "name", base.name)
                            unscoped.add(
                                base.name if alias == base.name else f"{base.name} AS {alias}"
                            )
                    continue  # a table or an alias of one: nothing nested inside
            stack.extend(element.get_children())
    return _CoreVerdict(tuple(sorted(touched)), tuple(sorted(unscoped)), frozenset(organizations))


#: How many ORM statement shapes' verdicts :meth:`TenantScoping._check_criteria_reach` keeps.
_REACH_VERDICTS = 1024


#: The loader strategy of a ``with_expression()`` option.
_QUERY_EXPRESSION = (("query_expression", True),)


def _relationships_through_secondaries() -> Iterator[RelationshipProperty[Any]]:
    """Every mapped relationship with an association (``secondary``) table."""
    for reg in _all_registries():
        for mapper in reg.mappers:
            for prop in mapper.relationships:
                if prop.secondary is not None:
                    yield prop


#: Session methods wrapped on a scoped target: the legacy bulk methods fire
#: no event at all, and identity-map hits run no SQL to scope.
_GUARDED_METHODS = (
    "bulk_save_objects",
    "bulk_insert_mappings",
    "bulk_update_mappings",
    "_identity_lookup",
    "merge",
)
_NOT_SET: Any = object()


def _session_owner(target: Any) -> Any:
    """Where the sessions of an event target look their methods up."""
    if isinstance(target, scoped_session):
        target = target.session_factory
    if isinstance(target, sessionmaker):
        return target.class_
    return target  # a Session class or instance


class TenantScoping:
    """Automatic scoping installed on one session target.

    Made by :func:`enable_tenant_scoping`; :meth:`disable` removes it.

    :param target: what the listeners are attached to.
    :param column: the organization column name.
    :param models: which mapped classes may be scoped (``None``: all).

    .. versionadded:: 0.1.0
    """

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        self.target = target
        self.column = column
        self._models = models
        self._tenants: tuple[int, tuple[tuple[Any, str], ...]] | None = None
        self._keys: weakref.WeakKeyDictionary[Mapper[Any], str | None] = weakref.WeakKeyDictionary()
        self._tables: tuple[int, _TenantTables] | None = None
        self._refused: tuple[int, dict[Mapper[Any], str]] | None = None
        self._secondaries: tuple[int, dict[Any, Any]] | None = None
        #: statement -> (mapper generation, verdict) of Core statements checked
        self._verdicts: weakref.WeakKeyDictionary[Any, tuple[int, _CoreVerdict]] = (
            weakref.WeakKeyDictionary()
        )
        #: cache key of an ORM statement -> (mapper generation, tables no
        #: loader criterion reaches): see _check_criteria_reach
        self._reach_verdicts: BoundedFifo[Any, tuple[int, tuple[str, ...]]] = BoundedFifo(
            _REACH_VERDICTS
        )
        #: mapper -> (mapper generation, its column properties read unscoped)
        self._column_verdicts: weakref.WeakKeyDictionary[
            Mapper[Any], tuple[int, tuple[str, ...]]
        ] = weakref.WeakKeyDictionary()
        #: the reference checks' statements, built once each (see _stray_rows_query)
        self._reference_queries: BoundedFifo[tuple[Any, ...], Any] = BoundedFifo(256)
        #: mapper -> (mapper generation, its references to scoped rows)
        self._references: weakref.WeakKeyDictionary[
            Mapper[Any],
            tuple[int, tuple[tuple[_Reference, ...], tuple[tuple[str, Mapper[Any]], ...]]],
        ] = weakref.WeakKeyDictionary()
        #: models= was db.Model's registry by default, not the caller's choice
        self._implicit_models = False
        self._saved: dict[str, Any] = {}

    # -- which classes are scoped

    def _selected(self, mapper: Mapper[Any]) -> bool:
        models = self._models
        if models is None:
            return True
        if isinstance(models, registry):
            return mapper.registry is models
        if isinstance(models, type):
            return issubclass(mapper.class_, models)
        return any(issubclass(mapper.class_, model) for model in models)

    def tenant_key(self, mapper: Mapper[Any]) -> str | None:
        """The attribute key of ``mapper``'s organization column, else ``None``."""
        try:
            return self._keys[mapper]
        except KeyError:
            pass
        key = _mapper_column_key(mapper, self.column) if self._selected(mapper) else None
        self._keys[mapper] = key
        return key

    def tenant_classes(self) -> tuple[tuple[Any, str], ...]:
        """Every scoped mapped class, with the attribute key of its column.

        :raises TenantScopingError: when no mapped class has the column.
        """
        generation = _MAPPER_GENERATION[0]
        cached = self._tenants
        if cached is not None and cached[0] == generation:
            found = cached[1]
        else:
            if isinstance(self._models, registry):
                registries: Iterable[registry] = (self._models,)
            else:
                registries = _all_registries()
            mappers = {m for reg in registries for m in reg.mappers}
            ordered = sorted(mappers, key=lambda m: (m.class_.__module__, m.class_.__qualname__))
            found = tuple(
                (m.class_, key) for m in ordered if (key := self.tenant_key(m)) is not None
            )
            _register_tenants(found)
            self._tenants = (generation, found)
        if not found:
            raise TenantScopingError(
                f"enable_tenant_scoping(): no mapped class has a column named "
                f"{self.column!r}, so nothing can be scoped. Check models= and column=."
            )
        return found

    def _refused_mappers(self) -> dict[Mapper[Any], str]:
        """Mapped classes scoping cannot make safe, with why (usually none).

        * a class with the organization column that ``models`` left out only
          because it belongs to another registry than ``db.Model``'s;
        * a polymorphic base class (joined-table inheritance) without the
          column whose subclass has it on its own table: a query of the base
          loads the subclass's rows without their organization.
        """
        generation = _MAPPER_GENERATION[0]
        cached = self._refused
        if cached is not None and cached[0] == generation:
            return cached[1]
        self.tenant_classes()
        refused: dict[Mapper[Any], str] = {}
        for reg in _all_registries():
            for mapper in reg.mappers:
                key = self.tenant_key(mapper)
                if key is None:
                    if self._implicit_models and _mapper_column_key(mapper, self.column):
                        refused[mapper] = (
                            f"{mapper.class_.__name__} has the column {self.column!r} but is "
                            f"not a model of this db (another declarative base); scoping "
                            f"would skip it. Pass models= to enable_tenant_scoping()."
                        )
                    continue
                for base in mapper.iterate_to_root():
                    if base is not mapper and self.tenant_key(base) is None:
                        refused[base] = (
                            f"{base.class_.__name__} loads {mapper.class_.__name__} rows, whose "
                            f"{self.column!r} is on the subclass table only; query "
                            f"{mapper.class_.__name__} itself or put the column on the base table."
                        )
        self._refused = (generation, refused)
        return refused

    def _unscoped_secondaries(self) -> dict[Any, Any]:
        """Relationships through a tenant association table between two shared classes.

        ``User.groups`` with ``secondary=memberships`` (which has the
        organization column) and neither ``User`` nor ``Group`` scoped: loader
        criteria reach entities only, so every load, join or ``any()`` of it
        would read the association rows of every organization. Maps each such
        relationship (and its secondary table) to the relationship.
        """
        generation = _MAPPER_GENERATION[0]
        cached = self._secondaries
        if cached is not None and cached[0] == generation:
            return cached[1]
        found: dict[Any, Any] = {}
        for prop in self._tenant_associations():
            if self.tenant_key(prop.parent) is None and self.tenant_key(prop.mapper) is None:
                found[prop] = prop
                found[prop.secondary] = prop
        self._secondaries = (generation, found)
        return found

    def _tenant_associations(self) -> Iterator[RelationshipProperty[Any]]:
        """Every relationship through an association table of tenant rows."""
        tables = self._tenant_tables()
        for prop in _relationships_through_secondaries():
            if tables.get(_base_table(prop.secondary)) is not None:
                yield prop

    def _refuse_secondaries(self, state: ORMExecuteState, secondaries: dict[Any, Any]) -> None:
        """Refuse a statement that loads, joins or tests such a relationship."""
        statement: Any = state.statement
        props: list[Any] = []
        path = state.loader_strategy_path
        if path is not None:
            props += list(path.path)
        for option in getattr(statement, "_with_options", ()):
            for element in getattr(option, "context", ()):
                props += list(getattr(element.path, "path", ()))
        for join in getattr(statement, "_setup_joins", ()):
            props += [getattr(part, "property", None) for part in join[:2]]
        # columns of the secondary itself (an any(), a lazy load), not of a
        # tenant class mapped to the same table (an association object)
        for element in visitors.iterate(statement):
            if isinstance(element, ColumnClause) and element.table in secondaries:
                annotations = element._annotations
                owner = annotations.get("parententity", annotations.get("parentmapper"))
                mapper = getattr(owner, "mapper", None)
                if mapper is None or self.tenant_key(mapper) is None:
                    props.append(element.table)
        for prop in props:
            try:
                unsafe = secondaries.get(prop)
            except TypeError:  # not hashable: no relationship or table
                continue
            if unsafe is not None:
                raise TenantScopingError(
                    f"{unsafe} goes through {unsafe.secondary.name}, which has the "
                    f"organization column {self.column!r}, between two classes without it: "
                    f"loader criteria never reach a secondary table, so it would read every "
                    f"organization's rows. Map the association table as a class and go through "
                    f"it (an association object is scoped like any tenant class), or use "
                    f"unscoped(..., reason=...)."
                )

    def _refuse(self, mapper: Mapper[Any], refused: dict[Mapper[Any], str]) -> None:
        why = refused.get(mapper)
        if why is not None:
            raise TenantScopingError(why)

    def _tenant_tables(self) -> _TenantTables:
        generation = _MAPPER_GENERATION[0]
        cached = self._tables
        if cached is not None and cached[0] == generation:
            return cached[1]
        found: dict[Any, str] = {}
        for cls, key in self.tenant_classes():
            mapper = inspect(cls)
            name = mapper.columns[key].name
            for table in mapper.tables:
                if name in table.c:
                    found[table] = name
            # a joined subclass's own table below the one with the column
            # (the recommended layout): its rows are tenant rows too, scoped
            # only through the join to that table
            holder = mapper.columns[key].table
            for level in mapper.iterate_to_root():
                if level.local_table is holder:
                    break
                found.setdefault(level.local_table, name)
        mapped_tables = {t for reg in _all_registries() for m in reg.mappers for t in m.tables}
        for prop in _relationships_through_secondaries():
            if self.tenant_key(prop.parent) is None and self.tenant_key(prop.mapper) is None:
                continue
            # an association table of a scoped class, with or without the
            # column: each row belongs to its scoped side's organization (also
            # when a class maps it: that class reads it only where its rows
            # pair with scoped ones). Of a join used as the secondary, only
            # the tables no class maps (the others are their classes' own).
            if isinstance(prop.secondary, Table):
                found.setdefault(prop.secondary, self.column)
                continue
            for table in _joined_froms(prop.secondary):
                if isinstance(table, Table) and table not in mapped_tables:
                    found.setdefault(table, self.column)
        if self._implicit_models:
            # another declarative base's classes with the column, which
            # Flask-SQLAlchemy's default models= leaves out (ORM use of them
            # is refused): Core on their tables is checked alike
            for reg in _all_registries():
                for mapper in reg.mappers:
                    if self.tenant_key(mapper) is None and _mapper_column_key(mapper, self.column):
                        for table in mapper.tables:
                            if self.column in table.c:
                                found.setdefault(table, self.column)
        if self._models is None or isinstance(self._models, registry):
            # unmapped tables of the same metadata with the column (a
            # many-to-many secondary, a table used through Core only) hold
            # tenant rows too: Core statements on them are checked alike
            registries = (self._models,) if self._models is not None else _all_registries()
            regs = [r for r in registries if isinstance(r, registry)]
            mapped = {t for reg in regs for m in reg.mappers for t in m.tables}
            for reg in regs:
                for table in reg.metadata.tables.values():
                    if table not in mapped and self.column in table.c:
                        found.setdefault(table, self.column)
        tables = _TenantTables(found)
        self._tables = (generation, tables)
        return tables

    # -- set-up

    def _install(self) -> None:
        event.listen(self.target, "do_orm_execute", self.on_execute)
        event.listen(self.target, "before_flush", self.on_flush)
        event.listen(self.target, "after_flush", self.on_flushed)
        event.listen(self.target, "pending_to_persistent", self.on_inserted)
        event.listen(self.target, "transient_to_pending", self.on_added)
        event.listen(self.target, "after_begin", _watch_for_nested_writes)
        owner = _session_owner(self.target)
        for name in _GUARDED_METHODS:
            self._saved[name] = vars(owner).get(name, _NOT_SET)
            setattr(owner, name, self._guarded_method(owner, name))

    def _guarded_method(self, owner: Any, name: str) -> Any:
        if name in ("bulk_insert_mappings", "bulk_update_mappings"):
            # the mode follows the name the guard is installed under, never
            # the name of whatever the session class put there
            guard: Any = functools.partial(self._guard_mappings, name == "bulk_update_mappings")
        else:
            guard = getattr(self, "_guard" + name if name.startswith("_") else "_guard_" + name)
        if isinstance(owner, type):
            original = getattr(owner, name)

            @functools.wraps(original)
            def method(session: Session, *args: Any, **kwargs: Any) -> Any:
                return guard(original, session, *args, **kwargs)

            return method
        unbound = getattr(type(owner), name)
        session_ref = weakref.ref(owner)

        @functools.wraps(unbound)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return guard(unbound, session_ref(), *args, **kwargs)

        return bound

    def disable(self) -> None:
        """Remove the listeners from the target.

        .. versionadded:: 0.1.0
        """
        event.remove(self.target, "do_orm_execute", self.on_execute)
        event.remove(self.target, "before_flush", self.on_flush)
        event.remove(self.target, "after_flush", self.on_flushed)
        event.remove(self.target, "pending_to_persistent", self.on_inserted)
        event.remove(self.target, "transient_to_pending", self.on_added)
        event.remove(self.target, "after_begin", _watch_for_nested_writes)
        owner = _session_owner(self.target)
        for name, saved in self._saved.items():
            if saved is _NOT_SET:
                delattr(owner, name)
            else:
                setattr(owner, name, saved)
        self._saved.clear()
        with _ENABLED_LOCK:
            _ENABLED.pop(_identity(self.target), None)

    def _check_settings(self) -> None:
        if not has_app_context():
            return
        try:
            configured = get_state().settings.organization_column
        except RuntimeError:
            return
        if configured != self.column:
            raise TenantScopingError(
                f"Tenant scoping uses column {self.column!r} but this app sets "
                f"OAUTH_VERIFY_ORGANIZATION_COLUMN = {configured!r}; pass column= to "
                f"enable_tenant_scoping()."
            )

    # -- reads and bulk statements

    def on_execute(self, state: ORMExecuteState) -> Any:
        """``do_orm_execute``: scope the statement, check it, or refuse it."""
        options = state.execution_options
        if options.get(_INTERNAL):
            return None
        reason = options.get(BYPASS_OPTION)
        if reason:
            logger.warning("tenant scoping bypassed for %s: %s", _statement_kind(state), reason)
            return None
        self._check_settings()
        converted = False
        if not state.is_orm_statement:
            orm = self._as_orm_statement(state.statement)
            if orm is None:
                self._check_core_references(state)
                self._check_core(state.statement)
                return None
            # scoped below, then run as the ORM statement it now is
            state.statement, converted = orm, True
        tenants = self.tenant_classes()
        refused = self._refused_mappers()
        if refused:
            for mapper in state.all_mappers:
                self._refuse(mapper, refused)
            # also entities that are no result column: select_from(Doc), a
            # join target, a count (the refusal is rare; the walk with it)
            statement: Any = state.statement
            for element in visitors.iterate(statement):
                annotations = getattr(element, "_annotations", None) or {}
                owner = annotations.get("parententity", annotations.get("parentmapper"))
                entity = getattr(owner, "mapper", None)
                if isinstance(entity, Mapper):
                    self._refuse(entity, refused)
        secondaries = self._unscoped_secondaries()
        if secondaries:
            self._refuse_secondaries(state, secondaries)
        organization = current_organization_id()
        _switch_organization(state.session, organization, self)
        if isinstance(state.statement, FromStatement) and not state.is_column_load:
            inner: Any = state.statement.element
            if inner._propagate_attrs.get("compile_state_plugin") != "orm":
                # from_statement(<Core select/update/delete>): loader criteria
                # never reach it, and rows of column entities are not guarded.
                # (A column load is SQLAlchemy's own read, by primary key, of a
                # joined subclass's columns for an object already let through.)
                self._check_core(inner)
        self._check_query_expressions(state.statement, organization)
        if state.is_insert or state.is_update or state.is_delete:
            # read by _refuse_nested_writes (a select gets it with the load guard)
            state.update_execution_options(**{_SCOPING: self})
            if not state.is_delete:
                self._refuse_replacing(state)
        if state.is_insert:
            self._check_criteria_reach(state.statement)  # INSERT … FROM SELECT
            return self._guard_insert(state, tenants, organization)
        if state.is_update or state.is_delete:
            self._guard_dml(state, organization)
            state.statement = self._scope_extra_froms(
                state.statement, organization, inherit=not state.is_executemany
            )
            if state.is_executemany:
                # ORM bulk UPDATE by primary key ignores loader criteria.
                self._check_criteria_reach(state.statement)
                self._check_primary_keys(state, organization)
                return None
        criteria = _criteria_options(tenants, organization)
        present = getattr(state.statement, "_with_options", ())
        if present:
            # a refresh or lazy load carries the options the object was loaded
            # with: adding ours again would grow them (and the SQL) each time
            known = {id(option) for option in present}
            criteria = tuple(c for c in criteria if id(c) not in known)
        if criteria:
            state.statement = state.statement.options(*criteria)
        # on the statement SQLAlchemy runs: its cache key (memoized, needed
        # for the compiled cache anyway) keys the verdict. (A column load is
        # SQLAlchemy's own read, by primary key, of an object let through;
        # the column properties it may load are checked for every mapper.)
        if not state.is_column_load:
            self._check_criteria_reach(state.statement, state.is_relationship_load)
        for mapper in state.all_mappers:
            self._check_column_properties(mapper)
        if not (state.is_update or state.is_delete):
            # every loaded row is checked against this (see _on_load)
            guard = {_EXPECTED_ORG: organization, _SCOPING: self}
            if isinstance(state.statement, FromStatement):
                guard[_FROM_STATEMENT] = True
            state.update_execution_options(**guard)
        if converted:
            # SQLAlchemy chose the Core path before this listener ran
            return state.invoke_statement()
        return None

    def _as_orm_statement(self, statement: Any) -> Any:
        """A Core ``select()`` reading tenant tables only through ORM entities, made an ORM one.

        ``select(exists().where(Project.name == x))`` and
        ``select(Plan.projects.any(...))`` have no entity among their
        columns, so SQLAlchemy runs them as Core statements, which loader
        criteria never reach. Marked as ORM statements they get the
        criteria in each subquery, as the same subqueries do inside any ORM
        statement — provided SQLAlchemy finds the entity there: it looks at
        the subquery's ``FROM`` entities and at the top level of its
        ``WHERE`` expressions. So only when every tenant table is read in a
        ``select()`` built from ORM attributes whose ``FROM`` or ``WHERE``
        names that table's (or alias's) entity that way, and none at the
        top, is the statement converted; anything else (``func.lower(
        Project.name)`` alone, a ``Table`` column) is left to
        :meth:`_check_core`, which refuses it.

        :returns: the ORM statement, or ``None``.
        """
        if not isinstance(statement, Select) or not self._core_verdict(statement).touched:
            return None  # (the verdict is remembered per statement)
        tenant_tables = self._tenant_tables()
        subject: Any = None
        statements: list[tuple[Any, bool]] = [(statement, True)]
        done: set[int] = set()
        while statements:
            current, top = statements.pop()
            if id(current) in done:
                continue
            done.add(id(current))
            if not isinstance(current, Select):
                return None  # a UNION, a textual select, a write: not judged here
            froms, nested = _tenant_reads(current, tenant_tables)
            statements += [(inner, False) for inner, _in_from in nested]
            if not froms:
                continue
            if top or current._propagate_attrs.get("compile_state_plugin") != "orm":
                return None
            # what SQLAlchemy reads (ORMSelectCompileState._adjust_for_extra_criteria)
            entities = [f._annotations.get("parententity") for f in current._from_obj]
            entities += [
                element._annotations.get("parententity")
                for criterion in current._where_criteria
                for element in _surface_expressions(criterion)
            ]
            targets = {}
            for entity in entities:
                target = self._criteria_target(entity)
                if target is not None:
                    targets[id(target)] = entity
            for from_clause in froms:
                entity = targets.get(id(from_clause))
                if entity is None:
                    return None
                subject = subject if subject is not None else entity.mapper
        if subject is None:
            return None
        orm = statement._generate()
        orm._propagate_attrs = immutabledict(
            {"compile_state_plugin": "orm", "plugin_subject": subject}
        )
        return orm

    def _check_criteria_reach(self, statement: Any, relationship_load: bool = False) -> None:
        """Refuse an ORM statement with a ``SELECT`` the loader criteria miss.

        SQLAlchemy adds the criteria to each ``SELECT`` of an ORM statement
        for the entities it finds there (``ORMSelectCompileState.
        _adjust_for_extra_criteria``): its columns, its ``FROM`` and joins,
        and the top level of its ``WHERE`` expressions. A tenant table read
        only through anything else — ``func.lower(Project.name)`` in
        ``select(func.count()).where(...)`` or in an ``exists()``, a nested
        ``and_()`` in a Core subquery, a ``Table`` column — would be read
        for every organization. A table that a subquery correlates to an
        enclosing one is that one's to scope.

        :raises TenantScopingError: naming the tables read unscoped.
        """
        generation = _MAPPER_GENERATION[0]
        cache_key = statement._generate_cache_key()
        key = None
        if cache_key is not None:
            # which bound values come from objects is no part of the cache
            # key, and decides what pairs an association table
            from_objects = tuple(b.callable is not None for b in cache_key.bindparams)
            key = (cache_key.key, relationship_load, from_objects)
        known = self._reach_verdicts.get(key) if key is not None else None
        if known is not None and known[0] == generation:
            missed = known[1]
        else:
            missed = self._criteria_missed_by(statement, relationship_load)
            if key is not None:
                self._reach_verdicts.put(key, (generation, missed))
        if missed:
            raise TenantScopingError(
                f"Tenant table(s) {', '.join(missed)} are read in a part of this "
                f"statement that tenant scoping cannot reach (only inside a function, a "
                f"nested and_()/or_() of a Core subquery, through a Table column, or as an "
                f"aliased entity over a subquery without the organization column), so "
                f"every organization's rows would be read. Name the entity where SQLAlchemy "
                f"looks for it: among the columns (select(Project.id).where(...)), in "
                f"select_from(Project), or in a plain comparison at the top of the WHERE "
                f"(Project.name == x) - see 'Limits' in the tenancy docs."
            )

    def _criteria_missed_by(self, statement: Any, relationship_load: bool) -> tuple[str, ...]:
        """The tenant tables of ``statement`` no loader criterion will reach, by name.

        :param relationship_load: SQLAlchemy loads a relationship of objects
            the load guard already let through, by their keys.
        """
        if isinstance(statement, FromStatement):
            statement = statement.element
            if statement._propagate_attrs.get("compile_state_plugin") != "orm":
                return ()  # a Core statement: on_execute checked it as one
        missed: set[str] = set()
        outer: frozenset[Any] = frozenset()
        if isinstance(statement, Update | Delete):
            # the enclosing statement of its subqueries (an INSERT's VALUES
            # have nothing to correlate to: SQLCompiler.visit_insert)
            target = getattr(statement, "table", None)
            outer = frozenset({target._deannotate()}) if target is not None else outer
            entity = target._annotations.get("parententity") if target is not None else None
            if (
                target is not None
                and self._tenant_tables().get(_base_table(target)) is not None
                and (entity is None or self.tenant_key(entity.mapper) is None)
            ):
                # a tenant table written as a Table, or through a class scoping
                # does not scope: no criterion reaches the rows it changes
                missed.add(_from_name(target))
        self._criteria_missed(statement, outer, outer, missed, set(), relationship_load)
        return tuple(sorted(missed))

    def _criteria_missed(
        self,
        statement: Any,
        explicit: frozenset[Any],
        implicit: frozenset[Any],
        missed: set[str],
        done: set[int],
        relationship_load: bool = False,
    ) -> None:
        """Add to ``missed`` the tenant tables that no loader criterion will
        reach in ``statement``'s ``SELECT`` statements, nested ones included.

        :param explicit: the tenant FROM objects of the enclosing statements
            that ``correlate()`` / ``correlate_except()`` may correlate to;
        :param implicit: those that auto-correlation takes: the immediately
            enclosing statement's, none for a subquery in ``FROM``
            (``SQLCompiler._enclosing_correlate_froms``).
        """
        if id(statement) in done:
            return
        done.add(id(statement))
        froms, nested = _tenant_reads(statement, self._tenant_tables())
        reached = self._criteria_targets(statement) if isinstance(statement, Select) else {}
        # an entity among the columns is a FROM of its own (SQLAlchemy's
        # fallback FROM); what is correlated away is not rendered here
        candidates = frozenset(froms) | frozenset(reached.values())
        rendered = candidates
        if isinstance(statement, Insert):
            rendered = frozenset()  # its VALUES correlate to nothing (visit_insert)
        elif isinstance(statement, Select):
            rendered = frozenset(
                f for f in candidates if not _correlated(statement, f, explicit, implicit)
            )
        if isinstance(statement, Select):
            missed.update(self._unadaptable_aliases(statement, relationship_load))
        if isinstance(statement, Select) and froms:
            marker = _marker_of(statement)  # org_scoped(): the tables it compared
            compared = {id(e._deannotate()) for e, _name in marker[1]} if marker else set()
            for from_clause in froms:
                if id(from_clause) in reached or id(from_clause) in compared:
                    continue
                if from_clause not in rendered:
                    continue  # correlated: the enclosing statement's to scope
                if self._association_of_scoped_rows(
                    statement, from_clause, reached, explicit, relationship_load
                ):
                    continue
                missed.add(_from_name(from_clause))
        for inner, holder in nested:
            if holder is not None and id(holder) in reached:
                continue  # an aliased entity's subquery: the criteria apply to it
            if holder is not None:  # in FROM, a CTE: no auto-correlation, and
                # only to what the SELECT around it does not render itself
                self._criteria_missed(
                    inner, explicit - rendered, frozenset(), missed, done, relationship_load
                )
            else:
                self._criteria_missed(
                    inner, explicit | rendered, rendered, missed, done, relationship_load
                )

    def _association_of_scoped_rows(
        self,
        statement: Any,
        from_clause: Any,
        reached: Mapping[int, Any],
        enclosing: frozenset[Any],
        relationship_load: bool,
    ) -> bool:
        """Whether ``from_clause`` is an association table with the organization
        column, or a joined subclass's own table, whose rows ``statement``
        reads only paired with scoped rows.

        That is: a relationship's secondary table touching a scoped class
        (or a subclass's own table) whose foreign key is required to equal
        the key of a row the criteria reach here, or of the enclosing
        statement's (a correlated ``any()``), or of an object SQLAlchemy
        loaded (with_parent, a relationship load) — in the ``WHERE``, an
        inner join's ``ON``, a relationship join's condition, or a join
        with no ``ON`` along that key. Never through a partner on the
        optional side of an outer join.
        """
        base = _base_table(from_clause)
        # a joined subclass's own table is paired like one: Invoice.id == Doc.id
        if base not in self._scoped_secondaries() and base not in self._subclass_tables():
            return False
        optional = _optional_froms(statement)
        if optional is None:
            return False  # a FULL join: no side is sure to hold scoped rows
        # a partner on the optional side of an outer join pairs nothing: the
        # association rows survive the LEFT JOIN without it
        partner_froms = [f for f in (*reached.values(), *enclosing) if id(f) not in optional]
        partners = {id(f) for f in partner_froms}
        if _paired(statement, from_clause, partners, relationship_load):
            return True
        # join(Association.user) / join(User.memberships): the relationship's
        # own condition, required and along the association's foreign key to
        # the scoped row on the other side
        for target, onclause, _from, flags in _setup_joins(statement):
            prop = getattr(target, "property", None)
            if (
                not isinstance(prop, RelationshipProperty)
                or prop.secondary is not None
                or onclause is not None
                or flags.get("isouter")
                or flags.get("full")
            ):
                continue
            if from_clause in prop.parent.tables:  # many-to-one from the table
                other_side = _join_target_froms(target)
            elif from_clause in prop.mapper.tables:  # one-to-many to the table
                other_side = list(prop.parent.tables)
            else:
                continue
            if any(id(t) in partners for t in other_side) and _keyed_condition(
                prop.primaryjoin, from_clause
            ):
                return True
        # a join with no ON pairs by foreign keys, with the FROM it joins
        # from: to be sure which, every FROM of the statement a foreign key
        # joins to the other side must be the expected one
        froms = [f for top in statement.get_final_froms() for f in _joined_froms(top)]
        for target, onclause, _from, flags in _setup_joins(statement):
            if (
                onclause is not None
                or flags.get("full")
                or isinstance(getattr(target, "property", None), RelationshipProperty)
            ):
                continue  # a relationship join renders its own condition (above)
            if _plain_from(target) is from_clause:
                # .join(association_table): from a partner its key names
                joinable = [f for f in froms if f is not from_clause and _joinable(from_clause, f)]
                if joinable and all(
                    id(f) in partners and _refers(from_clause, f) for f in joinable
                ):
                    return True
                continue
            if flags.get("isouter"):
                continue  # an outer-joined partner pairs nothing
            for partner in _join_target_froms(target):
                # select_from(association_table).join(Partner): from it
                if id(partner) not in partners or not _refers(from_clause, partner):
                    continue
                joinable = [f for f in froms if f is not partner and _joinable(partner, f)]
                if joinable == [from_clause]:
                    return True
        return False

    def _check_column_properties(self, mapper: Mapper[Any]) -> None:
        """Refuse a mapper whose ``column_property()`` / ``deferred()`` SQL
        reads a tenant table where the loader criteria cannot reach.

        SQLAlchemy adds such an expression to the statement only when it
        compiles it (or loads the deferred attribute later), so the check of
        the statement never sees it: each mapper's expressions are judged
        once, alike (a subquery correlated to the mapper's own table is its
        entity's to scope).

        :raises TenantScopingError: naming the attribute and the tables.
        """
        generation = _MAPPER_GENERATION[0]
        known = self._column_verdicts.get(mapper)
        if known is None or known[0] != generation:
            known = (generation, self._unscoped_column_properties(mapper))
            self._column_verdicts[mapper] = known
        if known[1]:
            raise TenantScopingError(
                f"{'; '.join(known[1])}: tenant scoping cannot reach these rows, so every "
                f"organization's would be read. Build the expression from ORM attributes "
                f"(select(func.count(Task.id)).where(Task.project_id == id)), or "
                f"org_scoped() it - see 'Limits' in the tenancy docs."
            )

    def _unscoped_column_properties(self, mapper: Mapper[Any]) -> tuple[str, ...]:
        """The column properties of ``mapper`` that read tenant rows unscoped."""
        tenant_tables = self._tenant_tables()
        owner = frozenset(mapper.tables)
        found = []
        for prop in mapper.column_attrs:
            for expression in prop.columns:
                if isinstance(expression, Column) and expression.table in owner:
                    continue  # a plain column of its own table
                froms, nested = _tenant_reads(expression, tenant_tables)
                missed = {_from_name(f) for f in froms if f not in owner}
                for inner, holder in nested:
                    self._criteria_missed(
                        inner, owner, owner if holder is None else frozenset(), missed, set()
                    )
                if missed:
                    found.append(
                        f"{mapper.class_.__name__}.{prop.key} reads {', '.join(sorted(missed))}"
                    )
        return tuple(found)

    def _subclass_tables(self) -> frozenset[Any]:
        """The own tables of scoped joined-inheritance subclasses."""
        found = set()
        for cls, _key in self.tenant_classes():
            mapper = inspect(cls)
            parent = mapper.inherits
            if parent is not None and mapper.local_table is not parent.local_table:
                found.add(mapper.local_table)
        return frozenset(found)

    def _scoped_secondaries(self) -> frozenset[Any]:
        """Association tables with the organization column of relationships
        whose parent or target class is scoped: what a load through them
        returns are scoped rows (the association rows between two shared
        classes are :meth:`_unscoped_secondaries`, refused)."""
        return frozenset(
            _base_table(prop.secondary)
            for prop in self._tenant_associations()
            if self.tenant_key(prop.parent) is not None or self.tenant_key(prop.mapper) is not None
        )

    def _criteria_targets(self, select_: Select[Any]) -> dict[int, Any]:
        """The FROM objects SQLAlchemy's loader criteria will compare in
        ``select_``, by ``id()`` (none for a Core ``SELECT``)."""
        if select_._propagate_attrs.get("compile_state_plugin") != "orm":
            return {}
        # the same reads as ORMSelectCompileState: each column's entity
        # (_ColumnEntity._for_columns), the FROM and join entities, and the
        # surface of the WHERE (_adjust_for_extra_criteria)
        entities: list[Any] = [
            column._annotations.get("parententity")
            or _first_column_annotation(column, "parententity")
            for column in select_._raw_columns
        ]
        entities += [f._annotations.get("parententity") for f in select_._from_obj]
        for join in _setup_joins(select_):  # (target, onclause, from_, flags)
            for side in (join[0], join[2]):
                entities.append(getattr(side, "_annotations", {}).get("parententity"))
            entities.append(_relationship_target(join[0]))
        named_in_where = [
            element._annotations.get("parententity")
            for criterion in select_._where_criteria
            for element in _surface_expressions(criterion)
        ]
        reached: dict[int, Any] = {}
        for entity in named_in_where:
            # only the table compared: SQLAlchemy adds it as a FROM of its
            # own, not joined to a subclass table the WHERE reads
            target = self._criteria_target(entity)
            if target is not None:
                reached[id(target)] = target
        for entity in entities:
            target = self._criteria_target(entity)
            if target is None:
                continue
            reached[id(target)] = target
            if getattr(entity, "is_aliased_class", False):
                # with_polymorphic(), aliased(Subclass, flat=True): the tables
                # and aliases joined in the alias's selectable, as rendered
                # (not what an alias wraps: aliased(Project) renders no
                # "projects" a subquery could correlate to)
                for plain in _joined_froms(target):
                    reached[id(plain)] = plain
            else:
                # joined inheritance: the other tables of the entity are
                # joined to the compared one by primary key
                for table in entity.mapper.tables:
                    reached[id(table)] = table
        return reached

    def _unadaptable_aliases(self, select_: Select[Any], relationship_load: bool) -> list[str]:
        """Aliased tenant entities of ``select_`` over text or Core SQL whose
        selectable has no organization column (``aliased(User,
        text(...).columns(...).subquery())``): SQLAlchemy cannot adapt the
        criterion to them and compares the entity's table as an extra,
        cartesian FROM instead, and no criterion reaches inside. Over an ORM
        ``select()`` the criteria reach inside, but the extra FROM still
        multiplies the rows: refused too, except in SQLAlchemy's own
        relationship loads (its subquery eager load is such an alias)."""
        if select_._propagate_attrs.get("compile_state_plugin") != "orm":
            return []
        found = []
        for column in [*select_._raw_columns, *select_._from_obj]:
            entity = column._annotations.get("parententity") or _first_column_annotation(
                column, "parententity"
            )
            if not getattr(entity, "is_aliased_class", False):
                continue
            key = self.tenant_key(entity.mapper)
            if key is None:
                continue
            if entity.selectable.corresponding_column(entity.mapper.columns[key]) is not None:
                continue
            inner = getattr(entity.selectable, "element", None)
            orm_inner = (
                isinstance(inner, SelectBase)
                and not isinstance(inner, TextualSelect)
                and inner._propagate_attrs.get("compile_state_plugin") == "orm"
            )
            if not (orm_inner and relationship_load):
                found.append(f"{entity.mapper.class_.__name__} (an alias without {key})")
        return found

    def _criteria_target(self, entity: Any) -> Any:
        """The FROM object the loader criteria of ``entity`` (a mapper or alias) compare."""
        mapper = getattr(entity, "mapper", None)
        key = self.tenant_key(mapper) if isinstance(mapper, Mapper) else None
        if key is None:
            return None
        if getattr(entity, "is_aliased_class", False):
            return entity.selectable._deannotate()
        return mapper.columns[key].table  # type: ignore[union-attr]

    def _refuse_replacing(self, state: ORMExecuteState) -> None:
        """Refuse ``OR REPLACE`` on an ``INSERT``/``UPDATE`` of a tenant table."""
        if _replacing(state.statement):
            subject = self._subject(state)
            if subject is not None:
                raise TenantScopingError(
                    f"OR REPLACE on the tenant table of {subject[0].class_.__name__} deletes the "
                    f"row already holding the key, whichever organization owns it; use an "
                    f"upsert that does nothing on conflict, or unscoped(..., reason=...)."
                )

    def _check_core_references(self, state: ORMExecuteState) -> None:
        """A Core ``insert()`` / ``update()`` of a shared table whose rows refer
        to tenant rows: its written references are checked as an ORM
        statement's (a table no class maps is refused when it writes one)."""
        statement: Any = state.statement
        if not isinstance(statement, Insert | Update):
            return
        table = getattr(statement, "table", None)
        if table is None or table in self._tenant_tables():
            return  # a tenant table: _check_core refuses the statement
        mapper = self._mapper_of_table(table)
        params = _param_rows(state)
        rows: list[Mapping[Any, Any]] = [
            *_value_rows(statement, params),
            *params,
            *_upsert_row(statement, params),
        ]
        if mapper is None:
            owners = self._table_owners()
            for constraint in getattr(table, "foreign_key_constraints", ()):
                referred = [element.column.table for element in constraint.elements]
                names = {c.name for c in constraint.columns}
                if referred and referred[0] in owners and any(names & set(r) for r in rows):
                    raise TenantScopingError(
                        f"A Core write of table {table.name!r} gives {', '.join(sorted(names))}, "
                        f"a reference to tenant rows no mapped class lets the write guard "
                        f"check; write through a mapped class or use unscoped(..., reason=...)."
                    )
            return
        references = self._tenant_references(mapper)[0]
        keys = {
            name
            for reference in references
            for key in reference.keys
            for name in (key, mapper.attrs[key].columns[0].name)
        }
        if not any(row.get(name) is not None for row in rows for name in keys):
            return
        if isinstance(statement, Insert) and statement.select is not None:
            raise TenantScopingError(
                f"INSERT … FROM SELECT into {table.name!r}, whose rows refer to tenant rows, "
                f"is not checked by the write guard; use unscoped(..., reason=...)."
            )
        self._check_row_references(state.session, mapper, rows, current_organization_id(), params)

    def _mapper_of_table(self, table: Any) -> Mapper[Any] | None:
        """The topmost mapped class of ``table`` (any registry), if one maps it."""
        for reg in _all_registries():
            for mapper in reg.mappers:
                if mapper.local_table is table and (
                    mapper.inherits is None or mapper.inherits.local_table is not table
                ):
                    return mapper
        return None

    def _check_core(self, statement: Any) -> None:
        verdict = self._core_verdict(statement)
        if not verdict.touched:
            return  # text() and statements on other tables: see "Limits"
        organization = current_organization_id()
        if verdict.organizations == {organization}:
            if not verdict.unscoped:
                return
            raise TenantScopingError(
                f"org_scoped() did not compare tenant table(s) {', '.join(verdict.unscoped)} "
                f"of this Core statement (joined, aliased, or in a subquery or CTE), which "
                f"would be read for every organization. Compare each table and alias with "
                f"org_scoped(stmt, <table or alias>.c.{self.column}) on the select() that "
                f"reads it, or use the ORM entities (scoped everywhere), or "
                f"unscoped(..., reason=...)."
            )
        raise TenantScopingError(
            f"A Core statement on tenant table(s) {', '.join(verdict.touched)} cannot be "
            f"scoped automatically: use the ORM entities, org_scoped(), or "
            f"unscoped(..., reason=...)."
        )

    def _check_query_expressions(self, statement: Any, organization: str) -> None:
        """Refuse a ``with_expression()`` that reads tenant rows loader criteria miss.

        SQLAlchemy strips the ORM annotations from the expression of
        :func:`~sqlalchemy.orm.with_expression`, so loader criteria never
        reach it: it is plain Core inside an ORM statement. Columns of the
        target entity's own table are fine (its rows are scoped); a column of
        another tenant table (which adds that table to the ``FROM``) is not,
        and a subquery on a tenant table passes only when :func:`org_scoped`
        compared every tenant table it reads — the target entity's own table
        excepted when the subquery correlates to it. A column of a table the
        statement itself joins with its criteria (``join_from(User, Book)``
        with ``func.count(Book.id)``, the SQLAlchemy docs' example) is read
        from scoped rows, and passes.
        """
        reached: set[Any] | None = None  # computed for the first expression only
        for option in getattr(statement, "_with_options", ()):
            for element in getattr(option, "context", ()):
                if element.strategy != _QUERY_EXPRESSION:
                    continue
                # the entity the attribute belongs to: the last one on the
                # path (selectinload(Project.tasks).with_expression(Task.x, …))
                entity = element.path[-2] if len(element.path) >= 2 else None
                if isinstance(entity, Mapper):
                    own: set[Any] = set(entity.tables)
                else:  # an aliased class: its alias is what the query scopes
                    own = {getattr(entity, "selectable", None)} - {None}
                if len(element.path) <= 2:
                    # an entity of this statement (not one a loader option
                    # loads in a statement of its own): its joins are there
                    if reached is None:
                        reached = (
                            set(self._criteria_targets(statement).values())
                            if isinstance(statement, Select)
                            else set()
                        )
                    own |= reached
                for expression in element._extra_criteria or ():
                    refused = self._expression_reads(expression, own, organization)
                    if refused:
                        raise TenantScopingError(
                            f"with_expression() reads tenant table(s) {', '.join(refused)}, "
                            f"which loader criteria never reach (SQLAlchemy compiles the "
                            f"expression as plain Core); use a correlated subquery built "
                            f"with org_scoped(select(...), <Model>.{self.column}), or "
                            f"unscoped(..., reason=...). An object loaded with it for "
                            f"another organization is refreshed with it too: load it "
                            f"again, or use a session per organization."
                        )

    def _expression_reads(self, expression: Any, own: set[Any], organization: str) -> list[str]:
        """The tenant tables a Core ``expression`` reads for every organization."""
        tenant_tables = self._tenant_tables()
        refused: set[str] = set()
        stack = [expression]
        while stack:
            element = stack.pop()
            if isinstance(element, SelectBase | ScalarSelect | Exists):
                verdict = self._core_verdict(element)
                unscoped = set(verdict.unscoped)
                if own and _correlates(element, own):
                    unscoped -= {_from_name(t) for t in own}
                if verdict.touched and (unscoped or verdict.organizations != {organization}):
                    refused.update(unscoped or verdict.touched)
                continue
            table = getattr(element, "table", None)
            if (
                isinstance(element, ColumnClause)
                and isinstance(table, FromClause)
                and table not in own
                and tenant_tables.get(_base_table(table)) is not None
            ):
                refused.add(_from_name(table))
            stack.extend(element.get_children())
        return sorted(refused)

    def _core_verdict(self, statement: Any) -> _CoreVerdict:
        """:func:`_core_verdict`, remembered per statement object (statements are immutable)."""
        tenant_tables = self._tenant_tables()
        generation = _MAPPER_GENERATION[0]
        try:
            cached = self._verdicts.get(statement)
        except TypeError:  # not weakly referenceable: not cached
            return _core_verdict(statement, tenant_tables)
        if cached is not None and cached[0] == generation:
            return cached[1]
        verdict = _core_verdict(statement, tenant_tables)
        self._verdicts[statement] = (generation, verdict)
        return verdict

    def _subject(self, state: ORMExecuteState) -> tuple[Mapper[Any], str, str] | None:
        mapper = state.bind_mapper
        key = self.tenant_key(mapper) if mapper is not None else None
        if mapper is None or key is None:
            return None
        return mapper, key, mapper.columns[key].name

    def _guard_insert(
        self, state: ORMExecuteState, tenants: tuple[tuple[Any, str], ...], organization: str
    ) -> Any:
        # select(X).from_statement(insert(...)) is the same INSERT
        statement: Any = _dml_of(state.statement)
        param_rows = _param_rows(state)
        value_rows = _value_rows(statement, param_rows)
        rows: list[Mapping[Any, Any]] = [*value_rows, *param_rows]
        if (
            statement.select is not None
            or statement._returning
            or statement._post_values_clause is not None
            or any(isinstance(v, ClauseElement) for row in rows for v in row.values())
        ):
            # subqueries in VALUES, RETURNING and an upsert's ON CONFLICT /
            # ON DUPLICATE KEY clause, the SELECT of INSERT … FROM SELECT
            statement = statement.options(*_criteria_options(tenants, organization))
            state.statement = _with_dml(state.statement, statement)
        written = state.bind_mapper
        if written is not None and self._tenant_references(written)[0]:
            if statement.select is not None:
                raise TenantScopingError(
                    f"INSERT … FROM SELECT into {written.class_.__name__}, whose rows refer "
                    f"to tenant rows, is not checked by the write guard; insert objects or "
                    f"use unscoped(..., reason=...)."
                )
            updated = _upsert_row(statement, param_rows)  # an upsert's SET, as one more row
            self._check_row_references(
                state.session, written, [*rows, *updated], organization, param_rows
            )
        subject = self._subject(state)
        if subject is None:
            return None
        mapper, key, name = subject
        if statement.select is not None:
            raise TenantScopingError(
                f"INSERT … FROM SELECT into tenant table of {mapper.class_.__name__} is not "
                f"checked by the write guard; insert objects or use unscoped(..., reason=...)."
            )
        conflict = statement._post_values_clause
        if conflict is not None and type(conflict).__name__ != "OnConflictDoNothing":
            raise TenantScopingError(
                f"An upsert into the tenant table of {mapper.class_.__name__} could update "
                f"another organization's row; use unscoped(..., reason=...)."
            )
        missing = 0
        for row in rows:
            value = row.get(key, row.get(name))
            if value is None:
                missing += 1
            elif _foreign(value, organization):
                raise self._cross(mapper, organization, value, "insert")
        if not missing:
            return None
        if value_rows and (param_rows or len(value_rows) > 1 or missing != 1):
            raise TenantScopingError(
                f"Give {key} in every row of a multi-row INSERT into {mapper.class_.__name__}."
            )
        if param_rows:
            fill = [{key: organization} for _ in param_rows]
            return state.invoke_statement(params=fill if state.is_executemany else fill[0])
        state.statement = _with_dml(state.statement, statement.values(**{key: organization}))
        return None

    def _guard_dml(self, state: ORMExecuteState, organization: str) -> None:
        written = state.bind_mapper
        if written is None:
            return
        params = _param_rows(state)
        rows: list[Mapping[Any, Any]] = [*_value_rows(_dml_of(state.statement), params), *params]
        subject = self._subject(state)
        if subject is not None:
            mapper, key, name = subject
            for row in rows:
                for column in (key, name):
                    if column in row and _foreign(row[column], organization):
                        raise self._cross(mapper, organization, row[column], "update")
        if state.is_update:
            self._check_row_references(state.session, written, rows, organization, params)

    def _scope_extra_froms(self, statement: Any, organization: str, inherit: bool = True) -> Any:
        """:func:`_scope_extra_froms` with this scoping's tenant tables.

        :param inherit: join a joined subclass's table to the parent's with
            the organization column; not for a bulk UPDATE by primary key,
            which SQLAlchemy refuses with any extra criteria (its keys are
            checked instead, :meth:`_check_primary_keys`).
        """
        return _scope_extra_froms(statement, self._tenant_tables(), organization, inherit)

    def _check_primary_keys(self, state: ORMExecuteState, organization: str) -> None:
        subject = self._subject(state)
        if subject is None:
            return
        mapper, key, _name = subject
        self._check_identities(
            state.session, mapper, key, _pk_identities(mapper, _param_rows(state)), organization
        )

    def _check_identities(
        self,
        session: Session,
        mapper: Mapper[Any],
        key: str,
        identities: list[tuple[Any, ...]],
        organization: str,
        action: str = "update",
    ) -> None:
        """Refuse when a row with one of these primary keys belongs to another organization."""
        if not identities:
            return
        cls = mapper.class_
        pk_keys = _pk_keys(mapper)
        if len(pk_keys) == 1:
            match = getattr(cls, pk_keys[0]).in_([i[0] for i in identities])
        else:
            match = tuple_(*[getattr(cls, k) for k in pk_keys]).in_(identities)
        column = getattr(cls, key)
        with session.no_autoflush:
            foreign = session.execute(
                select(func.count())
                .select_from(cls)
                .where(match, (column != organization) | column.is_(None))
                .execution_options(**{_INTERNAL: True})
            ).scalar_one()
        if foreign:
            raise self._cross(mapper, organization, "another organization", action)

    # -- legacy bulk methods and identity-map look-ups (wrapped Session methods)

    def _check_row_values(self, mapper: Mapper[Any], row: Mapping[Any, Any]) -> None:
        """Refuse SQL expressions in a written row that read tenant tables unscoped."""
        for value in row.values():
            if isinstance(value, ClauseElement):
                self._check_expression(mapper, value)

    def _bulk_rows(
        self, mapper: Mapper[Any], rows: list[Any], organization: str, *, update: bool
    ) -> None:
        key = self.tenant_key(mapper)
        assert key is not None
        name = mapper.columns[key].name
        for row in rows:
            expanded = _expanded(mapper, row)
            present = [expanded[c] for c in {key, name} if c in expanded]
            if not present and not update:
                row[key] = organization  # stamped, like a new object in a flush
            for value in present:
                if _foreign(value, organization):
                    raise self._cross(mapper, organization, value, "update" if update else "insert")

    def _bulk_context(self) -> str:
        self._check_settings()
        return current_organization_id()

    def _guard_mappings(
        self,
        update: bool,
        original: Any,
        session: Session,
        mapper: Any,
        mappings: Any,
        *args: Any,
        **kw: Any,
    ) -> Any:
        """``bulk_insert_mappings`` / ``bulk_update_mappings`` of the current organization only.

        Inserted rows are stamped or refused; updated rows are never stamped,
        may not change the organization column, and their primary keys are
        checked in the database.
        """
        rows = list(mappings)
        target = inspect(mapper).mapper
        self._refuse(target, self._refused_mappers())
        for row in rows:
            self._check_row_values(target, row)
        key = self.tenant_key(target)
        if rows and key is None and self._tenant_references(target)[0]:
            # a shared class whose rows refer to tenant rows
            self._check_row_references(session, target, rows, self._bulk_context())
        if rows and key is not None:
            organization = self._bulk_context()
            self._bulk_rows(target, rows, organization, update=update)
            self._check_row_references(session, target, rows, organization)
            if update:
                identities = _pk_identities(target, rows)
                self._check_identities(session, target, key, identities, organization)
        return original(session, mapper, rows, *args, **kw)

    def _guard_bulk_save_objects(
        self, original: Any, session: Session, objects: Any, *args: Any, **kw: Any
    ) -> Any:
        """``Session.bulk_save_objects``: checked like a flush, updates in the database."""
        objects = list(objects)
        updates: dict[Mapper[Any], list[tuple[Any, ...]]] = {}
        written: dict[Mapper[Any], list[Mapping[str, Any]]] = {}
        organization: str | None = None
        for obj in objects:
            state = inspect(obj)
            mapper = state.mapper
            self._refuse(mapper, self._refused_mappers())
            self._check_row_values(mapper, state.dict)
            key = self.tenant_key(mapper)
            if key is None:
                if self._tenant_references(mapper)[0]:  # a shared row referring to tenant rows
                    written.setdefault(mapper, []).append(state.dict)
                continue
            if organization is None:
                organization = self._bulk_context()
            written.setdefault(mapper, []).append(state.dict)
            if state.key is None:
                value = state.dict.get(key)
                if value is None:
                    setattr(obj, key, organization)
                elif _foreign(value, organization):
                    raise self._cross(mapper, organization, value, "insert")
                continue
            for value in (state.dict.get(key, _NOT_SET), state.committed_state.get(key, _NOT_SET)):
                if value is not _NOT_SET and _foreign(value, organization):
                    raise self._cross(mapper, organization, value, "update")
            updates.setdefault(mapper, []).extend(_pk_identities(mapper, [state.dict]))
        for mapper, rows in written.items():  # one check per class, not per object
            if organization is None:
                organization = self._bulk_context()
            self._check_row_references(session, mapper, rows, organization)
        for mapper, identities in updates.items():
            key = self.tenant_key(mapper)
            assert key is not None and organization is not None
            self._check_identities(session, mapper, key, identities, organization)
        return original(session, objects, *args, **kw)

    def _guard_identity_lookup(
        self, original: Any, session: Session, mapper: Any, *args: Any, **kw: Any
    ) -> Any:
        """Identity-map look-ups (``Session.get``, many-to-one lazy loads): own rows only.

        An object of another organization that sits in the identity map (an
        :func:`as_organization` block earlier in the same session, an
        :func:`unscoped` read) counts as absent, so SQLAlchemy loads the
        primary key with the current organization's criteria instead.
        """
        options = kw.get("execution_options") or {}
        if not (options.get(BYPASS_OPTION) or options.get(_INTERNAL)):
            with contextlib.suppress(MissingOrganizationContext, TenantContextError):
                # a hit runs no SQL: relationships loaded for another
                # organization are expired first
                _switch_organization(session, current_organization_id(), self)
        found = original(session, mapper, *args, **kw)
        if found is None or not hasattr(found, "_sa_instance_state"):
            return found
        state = inspect(found)
        key = self.tenant_key(state.mapper)
        if key is None:
            return found
        if options.get(BYPASS_OPTION) or options.get(_INTERNAL):
            return found
        organization = current_organization_id()
        # the value as loaded, not as changed since (a change not yet
        # flushed proves nothing about whose row it is)
        value = state.committed_state.get(key, state.dict.get(key, _NOT_SET))
        if value is _NOT_SET or value is NO_VALUE:
            return None  # not known in memory: load it, scoped
        return found if value == organization else None

    def _guard_merge(
        self, original: Any, session: Session, instance: Any, *args: Any, **kw: Any
    ) -> Any:
        """``Session.merge``: never into an object of another organization."""
        merged = original(session, instance, *args, **kw)
        state = inspect(merged)
        key = self.tenant_key(state.mapper)
        if key is None or state.key is None:
            return merged
        organization = current_organization_id()
        history = state.attrs[key].history
        for value in (*history.unchanged, *history.deleted):
            if _foreign(value, organization):
                raise self._cross(state.mapper, organization, value, "merge")
        return merged

    @staticmethod
    def _cross(mapper: Any, organization: str, value: Any, action: str) -> CrossTenantWriteError:
        name = mapper.class_.__name__
        logger.warning(
            "refused cross-tenant %s of %s: acting for %r, row belongs to %r",
            action, name, organization, value,
        )  # fmt: skip
        return CrossTenantWriteError(
            reason=f"{action} of {name} of {value!r} while acting for {organization!r}"
        )

    # -- flush

    def _check_expression(self, mapper: Mapper[Any] | None, value: ClauseElement) -> None:
        """Refuse a written SQL expression that reads tenant rows scoping cannot reach.

        A flush and the legacy bulk methods compile the value as plain Core:
        columns of the written row's own table (``count + 1``) are fine, a
        subquery on a tenant table or a column of another tenant table is not.
        """
        tenant_tables = self._tenant_tables()
        touched = {t for t in sql_util.find_tables(value, include_crud=True) if t in tenant_tables}
        if not touched:
            return
        own = set(mapper.tables) if mapper is not None else set()
        subqueries = [e for e in visitors.iterate(value) if isinstance(e, SelectBase)]
        inside = {t for q in subqueries for t in sql_util.find_tables(q) if t in tenant_tables}
        refused = sorted(t.name for t in (touched - own) | inside)
        if refused:
            owner = mapper.class_.__name__ if mapper is not None else "a row"
            raise TenantScopingError(
                f"A SQL expression written to {owner} reads tenant table(s) "
                f"{', '.join(refused)}, which a flush or a legacy bulk method cannot scope; "
                f"compute the value with a scoped query first, or use "
                f"session.execute(update(...).values(...))."
            )

    def on_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        """``before_flush``: stamp new rows; refuse writes to other organizations."""
        acting: list[str] = []

        def organization() -> str:
            if not acting:
                self._check_settings()
                acting.append(current_organization_id())
                _switch_organization(session, acting[0], self)
            return acting[0]

        refused = self._refused_mappers()
        if refused:
            for obj in (*session.new, *session.dirty, *session.deleted):
                mapper = inspect(obj).mapper
                if self.tenant_key(mapper) is None:  # not the inheritance case
                    self._refuse(mapper, refused)
        # what after_flush need not check again (it checks what app listeners
        # registered after this one add or change)
        session.info[_FLUSH_SEEN] = {
            id(inspect(obj)) for obj in (*session.new, *session.dirty, *session.deleted)
        }
        session.info[_FLUSH_SCOPING] = self
        session.info.pop(_FLUSH_VERIFIED, None)
        self._check_references(session, list(session.new), list(session.dirty), organization)
        for obj in list(session.new):
            state = inspect(obj)
            self._check_row_values(state.mapper, state.dict)
            key = self.tenant_key(state.mapper)
            if key is None:
                continue
            value = state.dict.get(key)
            if value is None:
                added_for = state.info.get(_ADDED_FOR)
                if added_for is not None and added_for != organization():
                    # added while acting for another organization: never
                    # stamped with this one
                    raise self._cross(state.mapper, organization(), added_for, "insert")
                setattr(obj, key, organization())
            elif value != organization():
                raise self._cross(state.mapper, organization(), value, "insert")
        changed = [(obj, "update") for obj in session.dirty]
        changed += [(obj, "delete") for obj in session.deleted]
        unverified: dict[tuple[Mapper[Any], str], list[tuple[Any, ...]]] = {}
        for obj, action in changed:
            state = inspect(obj)
            for attribute in state.committed_state:
                value = state.dict.get(attribute)
                if isinstance(value, ClauseElement):
                    self._check_expression(state.mapper, value)
            key = self.tenant_key(state.mapper)
            if key is None:
                continue
            if action == "update" and not session.is_modified(obj, include_collections=False):
                continue
            history = state.attrs[key].load_history()
            for value in (*history.added, *history.unchanged, *history.deleted):
                if value != organization():
                    raise self._cross(state.mapper, organization(), value, action)
            if state.key is not None and state.info.get(_LOADED_FOR) != (organization(), state.key):
                # The in-memory value is not proof (make_transient_to_detached,
                # merge(load=False)): the flush writes by primary key only.
                unverified.setdefault((state.mapper, action), []).append(tuple(state.key[1]))
        for (mapper, action), identities in unverified.items():
            key = self.tenant_key(mapper)
            assert key is not None
            self._check_identities(session, mapper, key, identities, organization(), action)

    def on_flushed(self, session: Session, flush_context: Any) -> None:
        """``after_flush``: check the rows as the flush wrote them.

        Still inside the flush (an error rolls it back). Two things
        :meth:`on_flush` could not see are checked here:

        * what the app's own ``before_flush`` listeners registered after
          scoping was enabled added or changed: every new or changed row must
          carry the current organization (one left without it can no longer
          be stamped; set it, or register the listener before enabling
          scoping);
        * every reference of a written row to a scoped row, as written: one
          ``SELECT`` per referring class and reference compares the written
          rows with the rows referred to, in the database (its own types and
          comparisons). Only references already proven are not asked again:
          a key checked in the database before the flush with the same value,
          or taken from a related object that is new or was loaded for this
          organization by a scoped statement (an organization value in memory
          proves nothing: an object built by hand can carry any).
        """
        seen = session.info.pop(_FLUSH_SEEN, None)
        session.info.pop(_FLUSH_SCOPING, None)
        verified: dict[tuple[int, str], Any] = session.info.pop(_FLUSH_VERIFIED, None) or {}
        if seen is None:
            return
        written = [*session.new, *session.dirty]
        deleted = [obj for obj in session.deleted if id(inspect(obj)) not in seen]
        if not (written or deleted):
            return
        organization = current_organization_id()
        for obj, action in (
            *((o, "insert" if inspect(o).key is None else "update") for o in written),
            *((o, "delete") for o in deleted),
        ):
            state = inspect(obj)
            key = self.tenant_key(state.mapper)
            if key is None:
                continue
            if id(state) in seen:  # checked before the flush: only what changed since
                history = state.attrs[key].history
                values: tuple[Any, ...] = (*history.added, *history.unchanged)
            else:
                history = state.attrs[key].load_history()
                values = (*history.added, *history.unchanged, *history.deleted) or (None,)
            for value in values:
                if value != organization:
                    raise self._cross(state.mapper, organization, value, action)
        self._check_written_references(session, written, verified, organization)

    def _check_written_references(
        self,
        session: Session,
        written: list[Any],
        verified: Mapping[tuple[int, str], Any],
        organization: str,
    ) -> None:
        """The references of the rows just written must name this organization's rows."""
        unproven: dict[tuple[Mapper[Any], _Reference], list[tuple[Any, ...]]] = {}
        for obj in written:
            state = inspect(obj)
            for reference in self._tenant_references(state.mapper)[0]:
                values = tuple(state.dict.get(key) for key in reference.keys)
                if any(value is None for value in values):
                    continue  # a NULL in the key refers to nothing
                if self._proven(state, reference, values, verified, organization):
                    continue
                identity = tuple(
                    state.dict.get(state.mapper.get_property_by_column(c).key)
                    for c in state.mapper.primary_key
                )
                unproven.setdefault((state.mapper, reference), []).append(identity)
        for (mapper, reference), identities in unproven.items():
            if self._written_rows_refer_elsewhere(
                session, mapper, reference, identities, organization
            ):
                raise self._cross(
                    mapper,
                    organization,
                    f"a {reference.target.class_.__name__} it does not hold",
                    "reference",
                )

    def _proven(
        self,
        state: Any,
        reference: _Reference,
        values: tuple[Any, ...],
        verified: Mapping[tuple[int, str], Any],
        organization: str,
    ) -> bool:
        """Whether a written reference is known to name this organization's row.

        Its one key column was checked in the database before the flush with
        this very value, or a relationship over exactly these columns holds
        an object that a scoped statement loaded for this organization, the
        reference naming its primary key and the values written being its
        identity (which nothing but a reload changes: values in memory can be
        swapped, ``merge(load=False)``, ``set_committed_value()``). A new
        related object proves nothing (the flush may not write it, or write
        it elsewhere): the database is asked.
        """
        if len(reference.keys) == 1:
            before = verified.get((id(state), reference.keys[0]), _NOT_SET)
            if before is not _NOT_SET and (before is values[0] or before == values[0]):
                return True
        for relationship_key in reference.via:
            related = state.dict.get(relationship_key)
            if related is None:
                continue
            target = inspect(related)
            if (
                target.key is not None
                and self._loaded_own(target, organization)
                and reference.target_keys == tuple(_pk_keys(target.mapper))
                and tuple(target.key[1]) == values
            ):
                return True
        return False

    def _loaded_own(self, state: Any, organization: str) -> bool:
        """Whether a persistent object was loaded for this organization by a
        scoped statement under its current identity (not built by hand and
        attached, ``make_transient_to_detached()``, whatever it carries)."""
        return bool(state.info.get(_LOADED_FOR) == (organization, state.key))

    def _written_rows_refer_elsewhere(
        self,
        session: Session,
        mapper: Mapper[Any],
        reference: _Reference,
        identities: list[tuple[Any, ...]],
        organization: str,
    ) -> bool:
        """Whether one of the written rows (by primary key) refers to no row of ``organization``."""
        statement = self._stray_rows_query(mapper, reference)
        single = len(mapper.primary_key) == 1
        for start in range(0, len(identities), _REFERENCES_PER_QUERY):
            chunk = identities[start : start + _REFERENCES_PER_QUERY]
            rows = [i[0] for i in chunk] if single else chunk
            stray = session.execute(
                statement, {"written": rows, "organization": organization}
            ).scalar_one()
            if stray:
                return True
        return False

    def _stray_rows_query(self, mapper: Mapper[Any], reference: _Reference) -> Any:
        """The statement counting written rows (``:written`` primary keys) whose
        reference names no row of ``:organization``; built once per reference
        (building costs more than running it)."""
        memo_key = (_MAPPER_GENERATION[0], mapper, reference)
        statement = self._reference_queries.get(memo_key)
        if statement is not None:
            return statement
        cls = mapper.class_
        target = aliased(reference.target.class_)
        owner = getattr(target, self.tenant_key(reference.target) or "")
        pairs = [
            getattr(target, target_key) == getattr(cls, key)
            for key, target_key in zip(reference.keys, reference.target_keys, strict=True)
        ]
        held = select(1).select_from(target).where(*pairs, owner == bindparam("organization"))
        present = [getattr(cls, key).is_not(None) for key in reference.keys]
        pk = [getattr(cls, mapper.get_property_by_column(c).key) for c in mapper.primary_key]
        written: Any = bindparam("written", expanding=True)
        rows = pk[0].in_(written) if len(pk) == 1 else tuple_(*pk).in_(written)
        statement = (
            select(func.count())
            .select_from(cls)
            .where(rows, *present, ~held.exists())
            .execution_options(**{_INTERNAL: True})
        )
        self._reference_queries.put(memo_key, statement)
        return statement

    def _tenant_references(
        self, mapper: Mapper[Any]
    ) -> tuple[tuple[_Reference, ...], tuple[tuple[str, Mapper[Any]], ...]]:
        """How ``mapper``'s rows name scoped rows: its references (foreign keys,
        single or composite, and many-to-one relationships over columns without
        one), and its many-to-one relationships to scoped classes
        (``(key, target mapper)``).

        A composite key that pairs the organization column with the
        referred row's is left out: the database itself keeps it within one
        organization.
        """
        generation = _MAPPER_GENERATION[0]
        cached = self._references.get(mapper)
        if cached is not None and cached[0] == generation:
            return cached[1]
        owners = self._table_owners()
        own_tables = set(mapper.tables)
        found: dict[tuple[tuple[str, ...], Mapper[Any], tuple[str, ...]], list[str]] = {}
        for table in mapper.tables:
            for constraint in getattr(table, "foreign_key_constraints", ()):
                columns = list(constraint.columns)
                referred = [element.column for element in constraint.elements]
                target = owners.get(referred[0].table) if referred else None
                if target is None:
                    continue
                if all(c.primary_key for c in columns) and referred[0].table in own_tables:
                    continue  # a joined subclass's key to its parent's row
                try:
                    keys = tuple(mapper.get_property_by_column(c).key for c in columns)
                    target_keys = tuple(target.get_property_by_column(c).key for c in referred)
                except UnmappedColumnError:  # no object holds it
                    continue
                found.setdefault((keys, target, target_keys), [])
        relations: list[tuple[str, Mapper[Any]]] = []
        for relationship in mapper.relationships:
            target = relationship.mapper
            if relationship.direction is not MANYTOONE or self.tenant_key(target) is None:
                continue
            relations.append((relationship.key, target))
            pairs = relationship.local_remote_pairs or ()
            try:
                keys = tuple(mapper.get_property_by_column(local).key for local, _ in pairs)
                target_keys = tuple(
                    target.get_property_by_column(remote).key for _, remote in pairs
                )
            except UnmappedColumnError:
                continue
            if keys:
                found.setdefault((keys, target, target_keys), []).append(relationship.key)
        references = tuple(
            _Reference(keys, target, target_keys, tuple(via))
            for (keys, target, target_keys), via in found.items()
            if not self._same_organization(mapper, keys, target, target_keys)
        )
        result = (references, tuple(relations))
        self._references[mapper] = (generation, result)
        return result

    def _same_organization(
        self,
        mapper: Mapper[Any],
        keys: tuple[str, ...],
        target: Mapper[Any],
        target_keys: tuple[str, ...],
    ) -> bool:
        """Whether a composite reference pairs the two organization columns."""
        own, theirs = self.tenant_key(mapper), self.tenant_key(target)
        return (
            len(keys) > 1
            and own is not None
            and theirs is not None
            and (own, theirs) in zip(keys, target_keys, strict=True)
        )

    def _table_owners(self) -> dict[Any, Mapper[Any]]:
        """Each table of a scoped class -> the topmost scoped mapper of it."""
        owners: dict[Any, Mapper[Any]] = {}
        for cls, _key in self.tenant_classes():
            mapper = inspect(cls)
            table = mapper.local_table
            inherited = mapper.inherits
            if inherited is None or inherited.local_table is not table:
                owners.setdefault(table, mapper)
        return owners

    def _check_references(
        self,
        session: Session,
        new: list[Any],
        dirty: list[Any],
        organization: Callable[[], str],
    ) -> None:
        """Refuse, before the flush, rows that point at rows the organization does not hold.

        A foreign key value given by hand (``Task(project_id=3)`` from request
        input, ``comment.task_id = 5``) may name another organization's row:
        the row written would hang under it (its reads stay scoped, but the
        write proves the row exists, and blocks or, with ``ON DELETE
        CASCADE``, is deleted with that organization's row). Each such value
        of a single-column key must name a row of this organization (or one
        added in this flush): another organization's and a missing one are
        refused alike, with :class:`CrossTenantWriteError`, before anything
        is written (after it, a missing one would fail on the database's
        foreign key, telling the two apart). A SQL expression as the key is
        refused (it cannot be checked before it runs). A related object that
        is another organization's by its loaded value is refused at once, and
        so are many-to-many links to rows the organization does not hold.
        Everything else is checked by :meth:`on_flushed`; the values that
        pass here are recorded for it.
        """
        wanted: dict[tuple[Mapper[Any], str], dict[Any, Mapper[Any]]] = {}
        checked: list[tuple[int, str, Any, Mapper[Any], str]] = []
        for obj in (*new, *dirty):
            state = inspect(obj)
            references, relations = self._tenant_references(state.mapper)
            is_new = state.key is None
            for key, _target in relations:
                self._check_related(state, key, organization, is_new)
            for reference in references:
                if len(reference.keys) != 1:
                    continue  # checked after the flush
                key, target_key = reference.keys[0], reference.target_keys[0]
                for value in _being_written(state, key, is_new):
                    if value is None:
                        continue
                    if isinstance(value, ClauseElement):
                        raise self._cross(
                            state.mapper, organization(), "a SQL expression", "reference"
                        )
                    wanted.setdefault((reference.target, target_key), {})[value] = state.mapper
                    checked.append((id(state), key, value, reference.target, target_key))
        self._collect_links(session, new, dirty, organization, wanted)
        unproven = self._refuse_unheld(session, wanted, organization, in_flush=True)
        if checked:
            verified = session.info.setdefault(_FLUSH_VERIFIED, {})
            for state_id, key, value, target, target_key in checked:
                if (target, target_key, value) not in unproven:
                    verified[(state_id, key)] = value

    def _collect_links(
        self,
        session: Session,
        new: list[Any],
        dirty: list[Any],
        organization: Callable[[], str],
        wanted: dict[tuple[Mapper[Any], str], dict[Any, Mapper[Any]]],
    ) -> None:
        """Many-to-many links added or removed: both ends must be this organization's.

        SQLAlchemy writes the association rows itself, from the collection
        changes, with the values of the columns the secondary table refers
        to (not always the primary key): those values are what is checked,
        in the database (``wanted``), for every end that is not new in this
        flush. An end another organization's by its loaded value is refused
        at once.
        """
        for obj in (*new, *dirty):
            state = inspect(obj)
            for relationship in state.mapper.relationships:
                if relationship.secondary is None or relationship.viewonly:
                    continue
                history = state.attrs[relationship.key].history
                changed = [*history.added, *history.deleted]
                if not changed:
                    continue
                own_pairs = relationship.synchronize_pairs or ()
                other_pairs = relationship.secondary_synchronize_pairs or ()
                self._link_end(session, obj, own_pairs, organization, wanted)
                for end in changed:
                    self._link_end(session, end, other_pairs, organization, wanted)

    def _link_end(
        self,
        session: Session,
        obj: Any,
        pairs: Iterable[tuple[Any, Any]],
        organization: Callable[[], str],
        wanted: dict[tuple[Mapper[Any], str], dict[Any, Mapper[Any]]],
    ) -> None:
        state = inspect(obj)
        mapper = state.mapper
        key = self.tenant_key(mapper)
        if key is None:
            return  # a shared row: any organization may link to it
        value = state.dict.get(key)
        if value is not None and value != organization():
            raise self._cross(mapper, organization(), value, "link")
        if state.key is None:
            return  # new: stamped with this organization (or refused) by the flush
        owners = self._table_owners()
        for source, _secondary in pairs:
            target = owners.get(source.table, mapper)
            try:
                source_key = target.get_property_by_column(source).key
            except UnmappedColumnError:
                raise self._cross(mapper, organization(), "an unmapped key", "link") from None
            with session.no_autoflush:
                written = getattr(obj, source_key)  # loaded if expired: what the row gets
            if written is not None:
                wanted.setdefault((target, source_key), {})[written] = mapper

    def _check_row_references(
        self,
        session: Session,
        mapper: Mapper[Any],
        rows: Iterable[Mapping[Any, Any]],
        organization: str,
        params: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """:meth:`_check_references` of rows written without objects (bulk statements).

        A composite reference cannot be checked before it is written and
        there is no flush to check it after: a bulk row giving one is refused.

        :param rows: keyed by attribute key or column name, values as written.
        :param params: the execution's parameters, which a ``bindparam()``
            among the values takes its value from.
        """
        references = self._tenant_references(mapper)[0]
        if not references:
            return
        params = list(params)
        rows = list(rows)
        wanted: dict[tuple[Mapper[Any], str], dict[Any, Mapper[Any]]] = {}
        for reference in references:
            names = [{key, mapper.attrs[key].columns[0].name} for key in reference.keys]
            for row in rows:
                given = [
                    value
                    for spellings in names
                    for column in spellings
                    for value in _written_values(row.get(column), params)
                    if column in row and value is not None
                ]
                if not given:
                    continue
                if len(reference.keys) != 1:
                    raise TenantScopingError(
                        f"A bulk write of {mapper.class_.__name__} gives "
                        f"{', '.join(reference.keys)}, a composite reference to "
                        f"{reference.target.class_.__name__} the write guard cannot check "
                        f"before it is written; write objects (a flush checks it)."
                    )
                for value in given:
                    if isinstance(value, ClauseElement):
                        raise self._cross(mapper, organization, "a SQL expression", "reference")
                    wanted.setdefault((reference.target, reference.target_keys[0]), {})[value] = (
                        mapper
                    )
        self._refuse_unheld(session, wanted, lambda: organization)

    def _refuse_unheld(
        self,
        session: Session,
        wanted: dict[tuple[Mapper[Any], str], dict[Any, Mapper[Any]]],
        organization: Callable[[], str],
        *,
        in_flush: bool = False,
    ) -> set[tuple[Mapper[Any], str, Any]]:
        """Refuse when a referenced value names no row of the organization.

        :param in_flush: rows this flush is to insert count (a bulk statement
            writes no pending object: only rows in the database count).
        :returns: the values only such a pending row holds (not proven: the
            flush may not write it, so :meth:`on_flushed` asks again).
        """
        unproven: set[tuple[Mapper[Any], str, Any]] = set()
        for (target, target_key), values in wanted.items():
            missing, pending = self._rows_not_held(
                session, target, target_key, values, organization(), in_flush=in_flush
            )
            unproven.update((target, target_key, value) for value in pending)
            if missing:
                value, mapper = next(iter(missing.items()))
                raise self._cross(
                    mapper,
                    organization(),
                    f"a {target.class_.__name__}.{target_key} of {value!r} it does not hold",
                    "reference",
                )
        return unproven

    def _check_related(
        self, state: Any, key: str, organization: Callable[[], str], is_new: bool
    ) -> None:
        """An object assigned to a many-to-one relationship, another organization's
        by its loaded value, is refused at once (any other is checked after the
        flush, by the key written)."""
        for obj in _being_written(state, key, is_new):
            if obj is None:
                continue
            target = inspect(obj)
            tenant_key = self.tenant_key(target.mapper)
            value = target.dict.get(tenant_key) if tenant_key is not None else None
            if value is not None and value != organization():
                raise self._cross(state.mapper, organization(), value, "reference")

    def _unheld_keys_query(self, target: Mapper[Any], target_key: str, size: int) -> Any:
        """The statement returning the indexes of ``size`` given keys (``:v0``…)
        that name no ``target`` row of ``:organization``, typed as the column;
        built once per size (building costs more than running it)."""
        memo_key = (_MAPPER_GENERATION[0], target, target_key, size)
        statement = self._reference_queries.get(memo_key)
        if statement is not None:
            return statement
        cls = target.class_
        column = getattr(cls, target_key)
        owner = getattr(cls, self.tenant_key(target) or "")
        column_type = column.expression.type
        given = union_all(
            *(
                select(
                    literal(index).label("i"),
                    # a SQL cast too: PostgreSQL compares an enum only with its type
                    cast(bindparam(f"v{index}", type_=column_type), column_type).label("v"),
                )
                for index in range(size)
            )
        ).subquery("given")
        held = (
            select(1)
            .select_from(cls)
            .where(column == given.c.v, owner == bindparam("organization"))
        )
        statement = select(given.c.i).where(~held.exists()).execution_options(**{_INTERNAL: True})
        self._reference_queries.put(memo_key, statement)
        return statement

    def _rows_not_held(
        self,
        session: Session,
        target: Mapper[Any],
        target_key: str,
        values: dict[Any, Mapper[Any]],
        organization: str,
        *,
        in_flush: bool = False,
    ) -> tuple[dict[Any, Mapper[Any]], list[Any]]:
        """The ``values`` of ``target.target_key`` that name no row of
        ``organization``, and those only a row this flush is to insert holds.

        The database compares (its types: ``"3"`` for an integer key,
        ``Decimal("1")`` for ``1.00``, a ``CHAR`` column's padding): each value
        is bound with the column's type, after a check in Python that the
        column can hold it at all (one it cannot hold is not held; the
        database would refuse it, and an error would end the transaction).
        In a flush (``in_flush``), a new object to be inserted into the
        target's own table with the same value counts, for now.
        """
        cls = target.class_
        column = getattr(cls, target_key)
        as_key = _key_converter(column)
        keys: dict[Any, Any] = {}
        missing: dict[Any, Mapper[Any]] = {}
        for value, mapper in values.items():
            try:
                keys[value] = as_key(value)
            except (TypeError, ValueError, KeyError, ArithmeticError):
                missing[value] = mapper
        pending = []
        owner_key = self.tenant_key(target) or ""
        for obj in session.new if in_flush else ():
            state = inspect(obj)
            if (
                state.mapper.isa(target)
                and target.local_table in state.mapper.tables  # not a concrete subclass
                and state.dict.get(owner_key) in (None, organization)
            ):
                with contextlib.suppress(TypeError, ValueError, KeyError, ArithmeticError):
                    pending.append(as_key(state.dict.get(target_key)))
        asked = [(value, key) for value, key in keys.items() if key not in pending]
        only_pending = [value for value, key in keys.items() if key in pending]
        with session.no_autoflush:
            for start in range(0, len(asked), _GIVEN_PER_QUERY):
                chunk = asked[start : start + _GIVEN_PER_QUERY]
                statement = self._unheld_keys_query(target, target_key, len(chunk))
                params = {f"v{index}": key for index, (_value, key) in enumerate(chunk)}
                params["organization"] = organization
                stray = session.execute(statement, params).scalars()
                for index in stray:
                    value = chunk[index][0]
                    missing[value] = values[value]
        return missing, only_pending

    def on_added(self, session: Session, obj: Any) -> None:
        """``transient_to_pending``: remember whom a new object was added for.

        A new object is written at the next flush, which may run for another
        organization (a ``scoped_session`` not removed after a request that
        added it, an ``as_organization`` block that ended): it must not be
        stamped with that one.
        """
        state = inspect(obj)
        if self.tenant_key(state.mapper) is None:
            return
        with contextlib.suppress(MissingOrganizationContext, TenantContextError):
            state.info[_ADDED_FOR] = current_organization_id()

    def on_inserted(self, session: Session, obj: Any) -> None:
        """``pending_to_persistent``: a row this session inserted is known to be ours."""
        state = inspect(obj)
        key = self.tenant_key(state.mapper)
        if key is not None:
            state.info[_LOADED_FOR] = (state.dict.get(key), state.key)


def _stamp_late_row(mapper: Mapper[Any], _connection: Any, target: Any) -> None:
    """``before_insert`` of every mapper: stamp a new row the flush guard never saw.

    The app's own ``before_flush`` listeners registered after scoping was
    enabled (an audit log) run after :meth:`TenantScoping.on_flush`: a scoped
    row they add is stamped here, just before its INSERT, with the current
    organization, as one added in the view would have been. Every other
    check of such rows is made by :meth:`TenantScoping.on_flushed`.
    """
    state = inspect(target)
    session = state.session
    if session is None:
        return
    scoping = session.info.get(_FLUSH_SCOPING)
    seen = session.info.get(_FLUSH_SEEN)
    if scoping is None or seen is None or id(state) in seen:
        return
    key = scoping.tenant_key(mapper)
    if key is None or state.dict.get(key) is not None:
        return
    organization = current_organization_id()
    added_for = state.info.get(_ADDED_FOR)
    if added_for is None or added_for == organization:  # else on_flushed refuses it
        setattr(target, key, organization)


def _switch_organization(session: Session, organization: str, scoping: TenantScoping) -> None:
    """Forget what a session loaded for another organization.

    A loaded attribute is not reloaded by later statements: SQLAlchemy
    returns the object of its identity map as it is. A shared object (no
    organization column) whose tenant collection, or whose
    ``column_property()`` / ``deferred()`` / ``query_expression()`` over a
    tenant table (a count, a list of names), was loaded for one
    organization would show that organization's rows to the next one
    working with the same session — an ``as_organization`` block, or a
    ``scoped_session`` (or Flask-SQLAlchemy's ``db.session`` under an
    application context pushed for the whole process) not removed between
    requests. When the organization changes, every attribute without
    unflushed changes that can depend on the organization is expired, so
    that the next access or statement loads it with the current
    organization's criteria: the relationships of every object, and every
    attribute of a shared object except plain columns of its own tables
    (the same for every organization). A tenant object keeps its column
    values: they were loaded for its own organization, and identity-map
    look-ups and scoped statements no longer return it to another one.
    """
    previous = session.info.get(_SESSION_ORG)
    session.info[_SESSION_ORG] = organization
    if previous is None or previous == organization:
        return
    volatile: dict[Mapper[Any], list[str]] = {}
    for state in session.identity_map.all_states():
        obj = state.obj()
        if obj is None:
            continue
        keys = volatile.get(state.mapper)
        if keys is None:
            keys = volatile[state.mapper] = _volatile_keys(state.mapper, scoping)
        stale = [
            key for key in keys if key in state.dict and not state.attrs[key].history.has_changes()
        ]
        if stale:
            session.expire(obj, stale)


def _volatile_keys(mapper: Mapper[Any], scoping: TenantScoping) -> list[str]:
    """The attributes of ``mapper`` whose loaded value may depend on the organization."""
    shared = scoping.tenant_key(mapper) is None
    tables = set(mapper.tables)
    keys = []
    for prop in mapper.iterate_properties:
        if isinstance(prop, RelationshipProperty):
            keys.append(prop.key)
        elif shared and isinstance(prop, ColumnProperty):
            plain = all(isinstance(c, Column) and c.table in tables for c in prop.columns)
            if not plain:  # a subquery, an expression, another table's column
                keys.append(prop.key)
    return keys


#: Execution option carrying the scoping object to the load guard.
_SCOPING = "_oauth_verify_scoping"


def _on_load(target: Any, context: Any, attrs: Any = None) -> None:
    """Load guard: a row of another organization never becomes an object.

    Also remembers, per object, the organization and identity it was loaded
    for, so that the flush need not ask the database whose row it writes.
    """
    options = getattr(context, "execution_options", None) or {}
    expected = options.get(_EXPECTED_ORG)
    scoping = options.get(_SCOPING)
    if expected is None or scoping is None:
        return
    state = inspect(target)
    key = scoping.tenant_key(state.mapper)
    if key is None:
        return
    value = state.dict.get(key)
    if value is None and key not in state.dict and options.get(_FROM_STATEMENT):
        value = "a row without its organization column"
    if value is not None and value != expected:
        name = state.mapper.class_.__name__
        logger.error(
            "tenant load guard: a %s row of %r was loaded while acting for %r",
            name, value, expected,
        )  # fmt: skip
        raise TenantScopingError(
            f"A {name} row of another organization (or without its organization column) "
            f"was loaded by a statement automatic scoping cannot see (e.g. "
            f"from_statement()); refused."
        )
    if value == expected:
        state.info[_LOADED_FOR] = (expected, state.key)


_ENABLED: weakref.WeakKeyDictionary[Any, TenantScoping] = weakref.WeakKeyDictionary()
_ENABLED_LOCK = threading.Lock()
_LOAD_GUARD: list[bool] = []


def _event_target(target: Any, caller: str = "enable_tenant_scoping") -> Any:
    if isinstance(target, Session | sessionmaker | scoped_session):
        return target
    if isinstance(target, type) and issubclass(target, Session):
        return target
    session = getattr(target, "session", None)  # Flask-SQLAlchemy's db
    if isinstance(session, scoped_session):
        return session
    raise TypeError(
        f"{caller}() takes a Session, sessionmaker, scoped_session or a "
        f"Flask-SQLAlchemy db, not {type(target).__name__}."
    )


def _identity(target: Any) -> Any:
    return target.session_factory if isinstance(target, scoped_session) else target


def enable_tenant_scoping(
    target: Any, *, column: str | None = None, models: Any = None
) -> TenantScoping:
    """Scope every ORM statement and guard every flush of ``target``'s sessions.

    Installs a ``do_orm_execute`` listener that adds
    :func:`~sqlalchemy.orm.with_loader_criteria` (``<column> = <current
    organization>``) for every mapped class with the organization column —
    top-level selects, joins, subqueries, relationship lazy loads, joined and
    selectin eager loads, ``Session.get``, and ORM-enabled bulk ``update()``
    / ``delete()`` — and a ``before_flush`` write guard that gives new rows
    the current organization when unset and raises
    :class:`CrossTenantWriteError` before a row of another organization is
    inserted, changed or deleted. Objects the flush did not see loaded for
    the current organization are checked in the database first. The target's
    legacy bulk methods (``bulk_insert_mappings``, ``bulk_update_mappings``,
    ``bulk_save_objects``), which fire no event, are wrapped with the same
    checks, and identity-map look-ups (``Session.get``, many-to-one lazy
    loads) skip objects of another organization.

    With no organization (no verified ``g.auth.organization_id`` and no
    :func:`as_organization`), every ORM statement and every flush of a
    tenant row fails closed: 401 ``missing_organization_context`` inside a
    request, :class:`TenantContextError` outside one. A Core statement on a
    tenant table raises :class:`TenantScopingError`; ``text()`` is not seen
    (see the documentation's "Limits").

    :param target: a ``Session`` (class or instance), ``sessionmaker``,
        ``scoped_session``, or a Flask-SQLAlchemy ``db`` (its ``db.session``).
    :param column: the organization column name; by default the current
        app's ``OAUTH_VERIFY_ORGANIZATION_COLUMN`` (``"organization_id"``
        outside an app context). An app whose setting differs gets
        :class:`TenantScopingError` rather than unscoped data.
    :param models: restrict scoping to subclasses of a mixin or base class,
        to one ``registry``, or to an iterable of classes (default: every
        mapped class with the column — of ``db.Model``'s registry for a
        Flask-SQLAlchemy ``db``, of every registry otherwise).
    :returns: the :class:`TenantScoping`; its ``disable()`` removes it.
    :raises RuntimeError: when scoping is already enabled on ``target``.
    :raises TypeError: for an unsupported target.

    .. versionadded:: 0.1.0
    """
    event_target = _event_target(target)
    model = getattr(target, "Model", None)  # Flask-SQLAlchemy: its own models
    implicit = models is None and isinstance(getattr(model, "registry", None), registry)
    if implicit:
        models = model.registry  # type: ignore[union-attr]
    scoping = TenantScoping(
        event_target, column=column or _configured_column("organization"), models=models
    )
    scoping._implicit_models = implicit
    with _ENABLED_LOCK:
        if _identity(event_target) in _ENABLED:
            raise RuntimeError("Tenant scoping is already enabled on this target.")
        _ENABLED[_identity(event_target)] = scoping
        if not _LOAD_GUARD:
            event.listen(Mapper, "load", _on_load)
            event.listen(Mapper, "refresh", _on_load)
            event.listen(Mapper, "before_insert", _stamp_late_row)
            _LOAD_GUARD.append(True)
    scoping._install()
    return scoping
