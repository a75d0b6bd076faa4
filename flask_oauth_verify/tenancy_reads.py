"""Automatic read scoping: which parts of a statement the loader criteria reach.

The read checks of :class:`~flask_oauth_verify.tenancy.TenantScoping`
(:class:`_ReadScoping`): ORM statements whose tenant tables no loader
criterion would reach, Core statements and their ``org_scoped()`` markers
(:func:`_core_verdict`), ``with_expression()`` SQL, association tables
between shared classes, identity-map look-ups; and, once a statement runs,
the load guard (:func:`_on_load`) and the expiry of what a session loaded
for another organization (:func:`_switch_organization`). What SQLAlchemy
adds to a statement as it compiles it (joined eager loads, loader
criteria, aliased classes, ``column_property()`` SQL) is checked by its
base, :class:`~flask_oauth_verify.tenancy_compiled._CompiledChecks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Column, Select, inspect
from sqlalchemy.orm import ColumnProperty, Mapper, ORMExecuteState, RelationshipProperty, Session
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import (
    Exists,
    FromClause,
    Join,
    ScalarSelect,
    SelectBase,
    TableClause,
)
from sqlalchemy.util import immutabledict

from .errors import MissingOrganizationContext
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
from .tenancy_compiled import _CompiledChecks, _own_parts
from .tenancy_context import current_organization_id
from .tenancy_errors import TenantContextError, TenantScopingError
from .tenancy_models import (
    _EXPECTED_ORG,
    _FROM_STATEMENT,
    _INTERNAL,
    _LOADED_FOR,
    _MAPPER_GENERATION,
    _NOT_SET,
    _SCOPED_BY_HELPER,
    _SCOPING,
    _SESSION_ORG,
    BYPASS_OPTION,
    _relationships_through_secondaries,
    _ScopingBase,
    logger,
)


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


class _ReadScoping(_CompiledChecks):
    """The read checks of :class:`~flask_oauth_verify.tenancy.TenantScoping`.

    Each refuses, with :class:`TenantScopingError`, a statement that would
    read another organization's rows; the verdicts are cached per statement
    (shape) and mapper generation.
    """

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        super().__init__(target, column=column, models=models)
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

    # -- classes and association tables

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

    # -- ORM statements: where the loader criteria reach

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
        if isinstance(statement, Select):
            missed.update(self._joined_loads_missed(statement))
        return tuple(sorted(missed))

    def _criteria_missed(
        self,
        statement: Any,
        explicit: frozenset[Any],
        implicit: frozenset[Any],
        missed: set[str],
        done: set[tuple[int, frozenset[Any]]],
        relationship_load: bool = False,
        filtered_outside: frozenset[Any] = frozenset(),
    ) -> None:
        """Add to ``missed`` the tenant tables that no loader criterion will
        reach in ``statement``'s ``SELECT`` statements, nested ones included.

        :param explicit: the tenant FROM objects of the enclosing statements
            that ``correlate()`` / ``correlate_except()`` may correlate to;
        :param implicit: those that auto-correlation takes: the immediately
            enclosing statement's, none for a subquery in ``FROM``
            (``SQLCompiler._enclosing_correlate_froms``);
        :param filtered_outside: the tenant tables ``statement`` (an aliased
            entity's subquery) merely projects, whose rows the criterion on
            the alias filters (:meth:`_filtered_outside`).
        """
        # a statement checked as an aliased entity's trusted subquery is
        # checked again where it is used otherwise
        seen = (id(statement), filtered_outside)
        if seen in done:
            return
        done.add(seen)
        froms, nested = _tenant_reads(statement, self._tenant_tables())
        reached = self._criteria_targets(statement) if isinstance(statement, Select) else {}
        for target in list(reached.values()):
            if isinstance(target, Join):  # an aliased class over a join: the other tables
                missed.update(self._untrusted_parts(target, reached))
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
                if filtered_outside and from_clause in filtered_outside:
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
                # an aliased entity's subquery: the criterion compares the
                # alias's organization column outside, which filters only
                # rows the subquery passes through one by one; whatever
                # else it reads or computes is checked like any subquery's
                self._criteria_missed(
                    inner, explicit - rendered, frozenset(), missed, done, relationship_load,
                    filtered_outside=self._filtered_outside(inner),
                )  # fmt: skip
                continue
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
                # — only the entity's own tables: an aliased class over a join
                # with another tenant table (aliased(Task, tasks.join(projects)))
                # adds no criterion for that one
                own = _own_parts(target, entity) if isinstance(target, Join) else None
                for plain in _joined_froms(target):
                    if own is None or id(plain) in own:
                        reached[id(plain)] = plain
            else:
                # joined inheritance: the other tables of the entity are
                # joined to the compared one by primary key
                for table in entity.mapper.tables:
                    reached[id(table)] = table
        return reached

    def _criteria_target(self, entity: Any) -> Any:
        """The FROM object the loader criteria of ``entity`` (a mapper or alias) compare."""
        mapper = getattr(entity, "mapper", None)
        key = self.tenant_key(mapper) if isinstance(mapper, Mapper) else None
        if key is None:
            return None
        if getattr(entity, "is_aliased_class", False):
            return entity.selectable._deannotate()
        return mapper.columns[key].table  # type: ignore[union-attr]

    # -- Core statements and SQL expressions

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

    # -- identity-map look-ups (a wrapped Session method)

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


def _switch_organization(session: Session, organization: str, scoping: _ScopingBase) -> None:
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


def _volatile_keys(mapper: Mapper[Any], scoping: _ScopingBase) -> list[str]:
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


#: an attribute the row did not load (not in the object's ``__dict__``)
_NOT_LOADED = object()


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
    value = state.dict.get(key, _NOT_LOADED)
    if value is None:  # a row of no organization: never one of this one's
        value = "a row without an organization (NULL)"
    elif value is _NOT_LOADED:
        value = "a row without its organization column" if options.get(_FROM_STATEMENT) else None
    if value is not None and value != expected:
        name = state.mapper.class_.__name__
        session = state.session
        if session is not None and state.key is not None and state.key in session.identity_map:
            # an object the session held (populate_existing): its attributes
            # were already overwritten with the refused row; forget them
            session.expire(target)
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
