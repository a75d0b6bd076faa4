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

import functools
import threading
import weakref
from collections.abc import Mapping
from typing import Any, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.orm import (
    Mapper,
    ORMExecuteState,
    Query,
    Session,
    registry,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Update
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from .tenancy_context import DEFAULT_ORGANIZATION_COLUMN as DEFAULT_ORGANIZATION_COLUMN
from .tenancy_context import DEFAULT_USER_COLUMN as DEFAULT_USER_COLUMN
from .tenancy_context import (
    _configured_column,
    as_organization,
    current_organization_id,
    current_user_id,
)
from .tenancy_errors import CrossTenantWriteError, TenantContextError, TenantScopingError
from .tenancy_models import (
    _EXPECTED_ORG,
    _FROM_STATEMENT,
    _INTERNAL,
    _NOT_SET,
    _SCOPED_BY_HELPER,
    _SCOPING,
    _criteria_options,
    _mapper_column_key,
    _registry_tenants,
    logger,
)
from .tenancy_models import BYPASS_OPTION as _BYPASS_OPTION
from .tenancy_models import _require_sqlalchemy as _require_sqlalchemy
from .tenancy_models import _TenantTables as _TenantTables
from .tenancy_reads import _on_load, _ReadScoping, _switch_organization
from .tenancy_writes import (
    _scope_extra_froms,
    _stamp_late_row,
    _watch_for_nested_writes,
    _WriteGuard,
)

# The public module. The parts of tenant scoping live in modules of their own,
# each imported only through this one (or each other), never by the package:
#
# * tenancy_errors: the exceptions (public here);
# * tenancy_context: whom data is for (as_organization(), current_*_id());
# * tenancy_models: the tenant classes and tables, TenantScoping's base;
# * tenancy_compiled: the read checks of what SQLAlchemy adds as it compiles a
#   statement (joined eager loads, loader criteria, aliased classes,
#   column_property() SQL), the base of tenancy_reads' class;
# * tenancy_reads: automatic read scoping (TenantScoping's read checks, the
#   load guard);
# * tenancy_references: the reference checks of the write guard;
# * tenancy_writes: the write guard (flushes, write statements, bulk methods).
#
# Here: the explicit helpers (org_scoped(), user_scoped(), unscoped()),
# TenantScoping — put together from those parts, with the do_orm_execute
# listener that runs the read and write checks of a statement — and
# enable_tenant_scoping(). Importing tenancy_models refuses a SQLAlchemy
# release before 2.1. The other names of those modules that are used from
# here (DEFAULT_ORGANIZATION_COLUMN, DEFAULT_USER_COLUMN, _require_sqlalchemy,
# _TenantTables) are re-exported ("import x as x").

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


S = TypeVar("S")


#: The execution option that lets one statement run without automatic
#: scoping; its value is the (logged) reason. Set it with :func:`unscoped`.
BYPASS_OPTION = _BYPASS_OPTION


# -- explicit helpers -----------------------------------------------------------


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
        ``ON`` clause, subqueries, eager and lazy loads of the results) —
        by loader criteria, which apply only while this statement is the
        one executed: embedded in another (``db.paginate()``'s count, a
        subquery, a CTE, ``exists()``), only the primary entity's ``WHERE``
        stays (see docs/tenancy.rst, "Explicit helpers").
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


def _statement_kind(state: ORMExecuteState) -> str:
    names = sorted({m.class_.__name__ for m in state.all_mappers})
    return f"{type(state.statement).__name__}({', '.join(names)})"


#: Session methods wrapped on a scoped target: the legacy bulk methods fire
#: no event at all, and identity-map hits run no SQL to scope.
_GUARDED_METHODS = (
    "bulk_save_objects",
    "bulk_insert_mappings",
    "bulk_update_mappings",
    "_identity_lookup",
    "merge",
)


def _session_owner(target: Any) -> Any:
    """Where the sessions of an event target look their methods up."""
    if isinstance(target, scoped_session):
        target = target.session_factory
    if isinstance(target, sessionmaker):
        return target.class_
    return target  # a Session class or instance


class TenantScoping(_ReadScoping, _WriteGuard):
    """Automatic scoping installed on one session target.

    Made by :func:`enable_tenant_scoping`; :meth:`disable` removes it.

    :param target: what the listeners are attached to.
    :param column: the organization column name.
    :param models: which mapped classes may be scoped (``None``: all).

    .. versionadded:: 0.1.0
    """

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        super().__init__(target, column=column, models=models)
        self._saved: dict[str, Any] = {}
        #: False once disable() ran: the markers a failed flush left in a
        #: session's info (no after_flush ran to take them) count no more
        self.active = True

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
        self.active = False
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

    # -- statements

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
