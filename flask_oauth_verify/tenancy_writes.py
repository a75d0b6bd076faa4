"""The write guard: no row of another organization is inserted, changed or deleted.

:class:`_WriteGuard` checks the flush (before and after its statements),
ORM and Core ``insert()`` / ``update()`` / ``delete()`` statements, the
legacy bulk methods and ``Session.merge``; its reference checks are
:class:`~flask_oauth_verify.tenancy_references._ReferenceGuard`'s. Also
here: the rows a statement writes (:func:`_value_rows`, :func:`_upsert_row`),
the scoping of an ``UPDATE … FROM``'s other tables, the refusal of
data-modifying CTEs (:func:`_refuse_nested_writes`) and the stamping of
rows added late in a flush (:func:`_stamp_late_row`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import sqlalchemy
from sqlalchemy import event, func, inspect, select, tuple_
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Insert, Update, UpdateBase
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnClause
from sqlalchemy.sql.selectable import Exists, FromClause, ScalarSelect, SelectBase

from .errors import MissingOrganizationContext
from .sqlshape import _base_table
from .tenancy_context import current_organization_id
from .tenancy_errors import TenantContextError, TenantScopingError
from .tenancy_models import (
    _ADDED_FOR,
    _FLUSH_SCOPING,
    _FLUSH_SEEN,
    _FLUSH_VERIFIED,
    _INTERNAL,
    _LOADED_FOR,
    _NOT_SET,
    _SCOPING,
    _TENANT_KEYS,
    _all_registries,
    _criteria_options,
)
from .tenancy_reads import _switch_organization
from .tenancy_references import _pk_keys, _ReferenceGuard


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


class _WriteGuard(_ReferenceGuard):
    """The write guard of :class:`~flask_oauth_verify.tenancy.TenantScoping`.

    New rows get the current organization when unset; a write to a row of
    another organization is refused with :class:`CrossTenantWriteError`
    before it reaches the database, a write the guard cannot check with
    :class:`TenantScopingError`.
    """

    # -- write statements

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

    # -- legacy bulk methods and merge() (wrapped Session methods)

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
    if scoping is None or seen is None or id(state) in seen or not scoping.active:
        return
    key = scoping.tenant_key(mapper)
    if key is None or state.dict.get(key) is not None:
        return
    organization = current_organization_id()
    added_for = state.info.get(_ADDED_FOR)
    if added_for is None or added_for == organization:  # else on_flushed refuses it
        setattr(target, key, organization)
