"""Read scoping at compile time: what SQLAlchemy adds to a statement as it compiles it.

The checks of :class:`~flask_oauth_verify.tenancy.TenantScoping`'s read
scoping (:class:`_CompiledChecks`, the base of
:class:`~flask_oauth_verify.tenancy_reads._ReadScoping`) on SQL that the
statement as written does not show: joined eager loads (``joinedload()``,
``lazy="joined"``, wildcards, ``.and_()`` criteria) and the relationships'
join conditions, the app's own ``with_loader_criteria()``, aliased classes
over joins (:func:`_own_parts`), subqueries and text, and
``column_property()`` / ``deferred()`` SQL.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import Column, Select, inspect
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.orm.util import LoaderCriteriaOption
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BooleanClauseList, ColumnClause, Grouping
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    FromClause,
    Join,
    SelectBase,
    TextualSelect,
)

from .sqlshape import (
    _STATEMENTS,
    _base_table,
    _first_column_annotation,
    _from_name,
    _joined_froms,
    _nested_statements,
    _row_for_row,
    _tenant_reads,
    _unlabeled,
)
from .tenancy_errors import TenantScopingError
from .tenancy_models import _MAPPER_GENERATION, _all_registries, _ScopingBase


def _top_wildcard(path: Any) -> bool:
    """Whether a loader option's path is a wildcard on the statement's
    entities (``raiseload("*")``, ``Load(X).lazyload("*")``)."""
    if not path or not isinstance(path[-1], str) or not path[-1].startswith("relationship:"):
        return False
    return len(path) == 1 or (len(path) == 2 and isinstance(path[0], Mapper))


def _own_tables(entity: Any) -> set[Any]:
    """The tables an aliased entity maps: its class's, and those of the
    subclasses a ``with_polymorphic()`` loads."""
    mappers = getattr(entity, "with_polymorphic_mappers", None) or [entity.mapper]
    return {table for mapper in mappers for table in mapper.tables}


def _conjuncts(condition: Any) -> list[Any]:
    """The top-level ``AND`` terms of ``condition`` (itself when it is none)."""
    if isinstance(condition, BooleanClauseList) and condition.operator is operators.and_:
        return [c for clause in condition.clauses for c in _conjuncts(clause)]
    if isinstance(condition, Grouping):
        return _conjuncts(condition.element)
    return [condition]


def _own_parts(join: Any, entity: Any) -> set[int]:
    """The parts (by ``id()``) of an aliased entity's join that hold only the
    entity's own rows: each of its own tables once, each joined to the rest
    by a primary-key equality (an inheritance join). Its table joined again
    (a self-join), or a table of it joined on anything else
    (``docs.outerjoin(invoices, docs.kind == "invoice")``), pairs its rows
    with rows of every organization."""
    own = _own_tables(entity)
    parts: set[int] = set()
    seen: set[Any] = set()

    def paired(node: Any) -> bool:
        """Whether the ON clause's top-level AND terms equate every primary
        key column of the table joined on the right with a primary key
        column of a part already trusted on the left."""
        right = node.right
        if isinstance(right, Join) or node.onclause is None:
            return False
        keys = {column.key for column in _base_table(right).primary_key}
        covered: set[str] = set()
        for conjunct in _conjuncts(node.onclause):
            if getattr(conjunct, "operator", None) is not operators.eq:
                continue
            for mine, theirs in ((conjunct.left, conjunct.right), (conjunct.right, conjunct.left)):
                if (
                    isinstance(mine, ColumnClause)
                    and isinstance(theirs, ColumnClause)
                    and mine.table is not None
                    and mine.table._deannotate() is right._deannotate()
                    and mine.key in keys
                    and theirs.primary_key
                    and theirs.table is not None
                    and id(theirs.table._deannotate()) in parts
                ):
                    covered.add(mine.key)
        return bool(keys) and covered == keys

    def visit(node: Any, trusted: bool) -> None:
        if isinstance(node, Join):
            visit(node.left, trusted)
            visit(node.right, trusted and paired(node))
            return
        base = _base_table(node)
        if trusted and base in own and base not in seen:
            seen.add(base)
            parts.add(id(node._deannotate()))

    visit(join, True)
    return parts


def _relationship_ends(relationship: RelationshipProperty[Any]) -> frozenset[Any]:
    """The tables a relationship's join condition joins: its parent's, its
    target's and its secondary table's (deannotated)."""
    ends = _joined_froms(relationship.parent.local_table) + _joined_froms(relationship.target)
    if relationship.secondary is not None:
        ends += _joined_froms(relationship.secondary)
    return frozenset(ends)


class _CompiledChecks(_ScopingBase):
    """The compile-time checks of :class:`~flask_oauth_verify.tenancy.TenantScoping`.

    Each finds the tenant tables that SQL added by SQLAlchemy when it
    compiles a statement (or loads an attribute later) would read where no
    loader criterion reaches; the verdicts are cached per relationship or
    mapper and mapper generation.
    """

    #: :meth:`~flask_oauth_verify.tenancy_reads._ReadScoping._criteria_missed`:
    #: the check of the subqueries met here, as of any statement's
    _criteria_missed: Callable[..., None]

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        super().__init__(target, column=column, models=models)
        #: mapper -> (mapper generation, its column properties read unscoped)
        self._column_verdicts: weakref.WeakKeyDictionary[
            Mapper[Any], tuple[int, tuple[str, ...]]
        ] = weakref.WeakKeyDictionary()
        #: relationship -> (mapper generation, tenant tables its joined eager
        #: load would read unscoped): see _joined_loads_missed
        self._joined_verdicts: weakref.WeakKeyDictionary[
            RelationshipProperty[Any], tuple[int, tuple[str, ...]]
        ] = weakref.WeakKeyDictionary()

    # -- joined eager loads, loader criteria and aliased classes over joins

    def _joined_loads_missed(self, statement: Select[Any]) -> set[str]:
        """The tenant tables the joined eager loads of ``statement`` would read
        where no criterion reaches, and the subqueries of the app's own
        ``with_loader_criteria()``. SQLAlchemy adds both when it compiles the
        statement (``joinedload()``, ``lazy="joined"``, also ``"*"`` and on a
        subclass), out of sight of the statement as written; a lazy or
        ``selectin`` load is a statement of its own, checked as one."""
        entities = [  # those loaded as whole objects: a column loads no relationship
            inspect(d["entity"]).mapper
            for d in statement.column_descriptions
            if d.get("entity") is not None and d.get("expr") is d["entity"]
        ]
        joined: set[RelationshipProperty[Any]] = set()
        not_joined: set[Any] = set()  # the entities' own relationships an option loads otherwise
        everything: list[Mapper[Any]] = []  # mappers whose every relationship is joined
        missed: set[str] = set()
        for option in statement._with_options:
            if isinstance(option, LoaderCriteriaOption):
                missed.update(self._loader_criteria_missed(option))
            elements = getattr(option, "context", ()) or (option,)
            for element in elements:
                path: Any = getattr(element, "path", ())
                path = getattr(path, "natural_path", path)
                if ("lazy", "joined") not in (getattr(element, "strategy", None) or ()):
                    if getattr(element, "strategy", None) and len(path) == 3:
                        not_joined.add(path[1])  # lazyload(X.y) / raiseload(X.y): not joined
                    elif getattr(element, "strategy", None) and _top_wildcard(path):
                        not_joined.add("*")  # raiseload("*"): the entities join nothing
                    continue
                along = [p for p in path if isinstance(p, RelationshipProperty)]
                joined.update(along)
                extra = getattr(element, "_extra_criteria", ())  # joinedload(X.y.and_(...))
                if extra and along:
                    ends = _relationship_ends(along[-1])
                    for criterion in extra:
                        missed.update(self._condition_missed(criterion, ends))
                if path and isinstance(path[-1], str) and path[-1].startswith("relationship:"):
                    # a wildcard ("*"): every relationship of where it stands
                    mappers = [p for p in path if isinstance(p, Mapper)]
                    everything += mappers[-1:] or entities
        stack = [*(r.mapper for r in joined), *everything]
        for mapper in {m for entity in entities for m in entity.self_and_descendants}:
            wildcard = any(mapper.isa(m) for m in everything)
            for relationship in mapper.relationships:
                if wildcard or (
                    relationship.lazy == "joined"
                    and relationship not in not_joined
                    and "*" not in not_joined
                ):
                    joined.add(relationship)
                    stack.append(relationship.mapper)
        seen: set[Mapper[Any]] = set()
        while stack:  # lazy="joined" defaults, and theirs in turn, subclasses too
            for mapper in stack.pop().self_and_descendants:
                if mapper in seen:
                    continue
                seen.add(mapper)
                wildcard = any(mapper.isa(m) for m in everything)
                for relationship in mapper.relationships:
                    if relationship.lazy == "joined" or wildcard:
                        joined.add(relationship)
                        stack.append(relationship.mapper)
        for relationship in joined:
            missed.update(self._relationship_missed(relationship))
        return missed

    def _loader_criteria_missed(self, option: LoaderCriteriaOption) -> set[str]:
        """The tenant tables an app's loader criteria read unscoped (a
        ``with_loader_criteria(Task, exists(<Core select>))``, or another
        entity's column), for every mapped class it applies to: the root's
        subclasses (a mixin's classes) or the entity's descendants, the lambda
        form resolved for each."""
        criteria: Any = option.where_criteria
        if option.root_entity is not None:
            root = option.root_entity
            mappers = {m for reg in _all_registries() for m in reg.mappers}
            classes: list[Any] = [m.class_ for m in mappers if issubclass(m.class_, root)]
        elif option.entity is not None:
            entity = option.entity
            if getattr(entity, "is_aliased_class", False):  # an alias: its own selectable
                classes = [entity.entity]
            else:
                classes = [m.class_ for m in entity.mapper.self_and_descendants]
        else:
            return set()
        missed: set[str] = set()
        for cls in classes:
            resolved = criteria
            if hasattr(criteria, "_resolve_with_args"):  # the lambda form
                resolved = criteria._resolve_with_args(cls)
            ends = frozenset(_joined_froms(inspect(cls).selectable))
            missed.update(self._condition_missed(resolved, ends))
        return missed

    def _untrusted_parts(self, join: Any, trusted: Collection[int]) -> set[str]:
        """The tenant tables of an aliased class's ``join`` outside ``trusted``
        (``id()`` of the parts :func:`_own_parts` found): read unscoped."""
        tables = self._tenant_tables()
        return {
            _from_name(part)
            for part in _joined_froms(join)
            if id(part) not in trusted and tables.get(_base_table(part)) is not None
        }

    def _condition_missed(self, condition: Any, ends: frozenset[Any]) -> set[str]:
        """The tenant tables a condition SQLAlchemy adds at compile time (a
        relationship's join, its ``.and_()``, loader criteria) reads where no
        criterion reaches: in its subqueries, or as columns of tenant tables
        other than ``ends`` (the tables it joins or filters, scoped there)."""
        missed: set[str] = set()
        for inner in _nested_statements(condition):
            self._criteria_missed(inner, ends, ends, missed, set())
        tenant_tables = self._tenant_tables()
        names = {id(end) for end in ends}
        stack = [condition] if condition is not None else []
        while stack:
            element = stack.pop()
            if isinstance(element, _STATEMENTS):
                continue
            table = getattr(element, "table", None)
            if (
                isinstance(element, ColumnClause)
                and isinstance(table, FromClause)
                and id(table._deannotate()) not in names
                and tenant_tables.get(_base_table(table)) is not None
            ):
                missed.add(_from_name(table))
            stack.extend(element.get_children())
        return missed

    def _relationship_missed(self, relationship: RelationshipProperty[Any]) -> tuple[str, ...]:
        """The tenant tables a join along ``relationship`` reads unscoped: in
        its target's selectable (an aliased class over a subquery: the
        "row-limited relationship") and in subqueries of its join condition."""
        generation = _MAPPER_GENERATION[0]
        known = self._joined_verdicts.get(relationship)
        if known is not None and known[0] == generation:
            return known[1]
        missed: set[str] = set()
        entity = relationship.entity
        selectable = entity.selectable if entity.is_aliased_class else None
        if isinstance(selectable, Join):  # aliased(X, <join>, flat=True)
            missed.update(self._untrusted_parts(selectable, _own_parts(selectable, entity)))
        if isinstance(selectable, AliasedReturnsRows) and isinstance(
            selectable.element, SelectBase
        ):
            inner = selectable.element
            self._criteria_missed(
                inner, frozenset(), frozenset(), missed, set(),
                filtered_outside=self._filtered_outside(inner),
            )  # fmt: skip
        ends = _relationship_ends(relationship)
        for condition in (relationship.primaryjoin, relationship.secondaryjoin):
            missed.update(self._condition_missed(condition, ends))
        verdict = tuple(sorted(missed))
        self._joined_verdicts[relationship] = (generation, verdict)
        return verdict

    # -- aliased entities over subqueries and text

    def _filtered_outside(self, inner: Any) -> frozenset[Any]:
        """The tenant tables of an aliased entity's subquery ``inner`` whose
        rows the criterion compared on the alias filters, outside: those of a
        ``SELECT`` that passes the rows of one table (or of a scoped class's
        own inheritance join, as ``aliased(Invoice)`` renders it) through one
        by one, the organization column among them as it is. Anything that
        combines rows first — a join of other tables, ``GROUP BY``, a window,
        ``DISTINCT``, ``LIMIT`` — works on every organization's rows before
        that filter, and is checked as any subquery (usually refused)."""
        source = _row_for_row(inner)
        if source is None:
            return frozenset()
        tables = self._tenant_tables()
        if isinstance(source, Join):
            mapped = [
                inspect(cls)
                for cls, _key in self.tenant_classes()
                if inspect(cls).selectable is source
            ]
            if not mapped:
                return frozenset()
            own = mapped[0].columns[self.tenant_key(mapped[0]) or ""]
            parts = frozenset(
                part for part in _joined_froms(source) if tables.get(_base_table(part)) is not None
            )
        else:
            name = tables.get(_base_table(source))
            own = source.c.get(name) if name is not None else None
            parts = frozenset({source})
            if own is None or any(
                column.key == name and _unlabeled(column) is not own._deannotate()
                for column in inner.selected_columns
            ):
                return frozenset()  # adapt_on_names would compare that one
        if not any(_unlabeled(column) is own._deannotate() for column in inner.selected_columns):
            return frozenset()
        return frozenset(part._deannotate() for part in parts)

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

    # -- column_property() and deferred() SQL

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
