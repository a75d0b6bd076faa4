"""Which mapped classes and tables tenant scoping covers, and what its parts share.

The base of :class:`~flask_oauth_verify.tenancy.TenantScoping`
(:class:`_ScopingBase`: its settings, the tenant classes and tables, the
classes it refuses), the organization column of every tenant class and
the loader criteria comparing it, and the option and ``info`` keys the
read scoping (:mod:`.tenancy_reads`), the reference checks
(:mod:`.tenancy_references`) and the write guard (:mod:`.tenancy_writes`)
pass each other. Importing it refuses a SQLAlchemy release automatic
scoping is not safe with.
"""

from __future__ import annotations

import functools
import logging
import re
import reprlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy
from flask import has_app_context
from sqlalchemy import Table, event, inspect
from sqlalchemy.orm import Mapper, RelationshipProperty, registry, with_loader_criteria
from sqlalchemy.sql.selectable import TableClause

from .extension import get_state
from .sqlshape import _joined_froms
from .tenancy_errors import CrossTenantWriteError, TenantScopingError

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

#: Every part of tenant scoping logs as the public module.
logger = logging.getLogger("flask_oauth_verify.tenancy")

#: The execution option that lets one statement run without automatic
#: scoping; its value is the (logged) reason. Set it with
#: :func:`~flask_oauth_verify.tenancy.unscoped` (public there).
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
#: Execution option carrying the scoping object to the load guard (and to
#: the nested-write check of write statements).
_SCOPING = "_oauth_verify_scoping"
#: "No value" where ``None`` is one.
_NOT_SET: Any = object()


def _mapper_column_key(mapper: Mapper[Any], name: str) -> str | None:
    """The attribute key of ``mapper``'s column called ``name`` (key or SQL name)."""
    if name in mapper.columns:
        return name
    for key, column in mapper.columns.items():
        if getattr(column, "name", None) == name:
            return str(key)
    return None


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


def _all_registries() -> set[registry]:
    # SQLAlchemy keeps every registry of the process here (configure_mappers
    # walks the same set); there is no public accessor.
    from sqlalchemy.orm.mapper import _all_registries as all_registries

    return set(all_registries())


def _relationships_through_secondaries() -> Iterator[RelationshipProperty[Any]]:
    """Every mapped relationship with an association (``secondary``) table."""
    for reg in _all_registries():
        for mapper in reg.mappers:
            for prop in mapper.relationships:
                if prop.secondary is not None:
                    yield prop


#: ``repr()`` of a value written by a client, at most about 80 characters.
_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2  # a nested value's lengths multiply
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxfrozenset = _SHORT.maxdeque = _SHORT.maxarray = 4
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 80


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


class _ScopingBase:
    """What every part of :class:`~flask_oauth_verify.tenancy.TenantScoping`
    builds on: its settings, which mapped classes and tables are tenant ones
    (cached per mapper generation), and the classes it refuses.

    :param target: what the listeners are attached to.
    :param column: the organization column name.
    :param models: which mapped classes may be scoped (``None``: all).
    """

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        self.target = target
        self.column = column
        self._models = models
        self._tenants: tuple[int, tuple[tuple[Any, str], ...]] | None = None
        self._keys: weakref.WeakKeyDictionary[Mapper[Any], str | None] = weakref.WeakKeyDictionary()
        self._tables: tuple[int, _TenantTables] | None = None
        self._refused: tuple[int, dict[Mapper[Any], str]] | None = None
        #: models= was db.Model's registry by default, not the caller's choice
        self._implicit_models = False

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

    @staticmethod
    def _cross(mapper: Any, organization: str, value: Any, action: str) -> CrossTenantWriteError:
        name = mapper.class_.__name__
        # the value may come from a request body: cut short, so that a tenant
        # cannot write megabytes into the log with one refused write
        shown = _SHORT.repr(value)
        logger.warning(
            "refused cross-tenant %s of %s: acting for %r, row belongs to %s",
            action, name, organization, shown,
        )  # fmt: skip
        return CrossTenantWriteError(
            reason=f"{action} of {name} of {shown} while acting for {organization!r}"
        )
