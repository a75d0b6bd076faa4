"""What SQLAlchemy statements read, by their structure (tenant scoping's helpers).

Pure functions over Core and ORM statement objects, no session and no
organization: which tables and aliases a ``SELECT`` reads itself, which
statements it nests and whether they may correlate, how its joins pair rows
(foreign-key equalities, outer joins), and SQLAlchemy's own correlation
rule. :mod:`flask_oauth_verify.tenancy` judges with them whether loader
criteria reach every read of a tenant table. Several read SQLAlchemy
attributes that are not public API (``_setup_joins``,
``_memoized_select_entities``, ``_correlate``, ``_correlate_except``,
``_auto_correlate``); ``tests/test_tenancy*.py`` pin what they rely on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.orm import RelationshipProperty
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
    FunctionFilter,
    Grouping,
    Label,
    Over,
    WithinGroup,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    FromClause,
    Join,
    Lateral,
    Select,
    SelectBase,
    TableClause,
)

#: Statements nested in a statement (a scope of their own).
_STATEMENTS = (SelectBase, UpdateBase)

#: The expressions of a ``WHERE`` criterion SQLAlchemy looks for entities in
#: (untyped in SQLAlchemy).
_surface_expressions: Callable[[Any], Iterator[Any]] = sql_util.surface_expressions

#: The entity of a column expression, as SQLAlchemy finds it (untyped there).
_first_column_annotation: Callable[[Any, str], Any] = sql_util.extract_first_column_annotation

#: Comparisons that pair a row with another (``IN`` of keys: a selectin load).
_PAIRING = (operators.eq, operators.in_op)


def _base_table(from_clause: Any) -> Any:
    """The table under aliases of ``from_clause``."""
    while isinstance(from_clause, AliasedReturnsRows) and isinstance(
        from_clause.element, FromClause
    ):
        from_clause = from_clause.element
    return from_clause


def _from_name(from_clause: Any) -> str:
    """A table's name, or ``"table AS alias"`` (as :func:`_core_verdict` names them)."""
    base = _base_table(from_clause)
    name, alias = getattr(base, "name", "?"), getattr(from_clause, "name", None)
    return name if alias in (None, name) else f"{name} AS {alias}"


def _tenant_reads(
    statement: Any, tenant_tables: Mapping[Any, str]
) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """What one statement reads itself: the tenant tables and aliases of one
    (deannotated), and its nested statements, each with the subquery in
    ``FROM`` or CTE holding it (deannotated; ``None`` for a scalar,
    ``EXISTS`` or ``LATERAL`` subquery, which may correlate)."""
    froms: list[Any] = []
    nested: list[tuple[Any, Any]] = []
    stack: list[tuple[Any, Any]] = [(child, None) for child in statement.get_children()]
    seen: set[int] = set()
    while stack:
        element, holder = stack.pop()
        if id(element) in seen:
            continue
        seen.add(id(element))
        if isinstance(element, _STATEMENTS):
            nested.append((element, holder))
            continue
        if isinstance(element, FromClause):
            base = _base_table(element)
            if isinstance(base, TableClause):
                if tenant_tables.get(base) is not None:
                    froms.append(element._deannotate())
                continue
            if isinstance(element, AliasedReturnsRows) and not isinstance(element, Lateral):
                holder = element._deannotate()
        stack.extend((child, holder) for child in element.get_children())
    return froms, nested


#: Column expressions that may combine rows (an aggregate, a window): a
#: function counts as one unless :data:`_PER_ROW_FUNCTIONS` names it.
_COMBINING = (FunctionElement, Over, WithinGroup, FunctionFilter)
#: SQL functions of one row's values only (never aggregates in any database).
_PER_ROW_FUNCTIONS = frozenset(
    {
        "abs", "ceil", "ceiling", "char_length", "coalesce", "concat", "current_date",
        "current_time", "current_timestamp", "date", "date_trunc", "datetime", "floor",
        "greatest", "ifnull", "least", "length", "localtime", "localtimestamp", "lower",
        "ltrim", "now", "nullif", "replace", "round", "rtrim", "strftime", "substr",
        "substring", "trim", "upper",
    }
)  # fmt: skip


def _combines_rows(element: Any) -> bool:
    if isinstance(element, FunctionElement) and not isinstance(element, Over | WithinGroup):
        return str(getattr(element, "name", "")).lower() not in _PER_ROW_FUNCTIONS
    return isinstance(element, _COMBINING)


def _nested_statements(expression: Any) -> list[Any]:
    """The statements nested in ``expression`` (a join condition): its
    scalar, ``EXISTS`` and ``IN`` subqueries, not what is inside them."""
    found: list[Any] = []
    stack = [expression] if expression is not None else []
    while stack:
        element = stack.pop()
        if isinstance(element, _STATEMENTS):
            found.append(element)
            continue
        stack.extend(element.get_children())
    return found


def _row_for_row(select: Any) -> Any | None:
    """The one ``FROM`` object (a table, an alias, a join) whose rows
    ``select`` passes through one by one, or ``None``: no ``GROUP BY`` /
    ``HAVING``, ``DISTINCT``, ``LIMIT`` / ``OFFSET`` / ``FETCH``, and no
    function or window among the columns (any of which may combine rows of
    every organization)."""
    if (
        not isinstance(select, Select)
        or select._group_by_clauses
        or select._having_criteria
        or select._distinct
        or select._distinct_on
        or select._limit_clause is not None
        or select._offset_clause is not None
        or select._fetch_clause is not None
    ):
        return None
    froms = select.get_final_froms()
    if len(froms) != 1:
        return None
    for column in select.selected_columns:
        if any(_combines_rows(e) for e in visitors.iterate(column)):
            return None
    return froms[0]


def _unlabeled(column: Any) -> Any:
    while isinstance(column, Label):
        column = column.element
    return column._deannotate()


def _paired(
    statement: Any,
    table: Any,
    partners: Collection[int],
    by_value: bool,
) -> bool:
    """Whether ``statement`` compares a column of ``table`` with equality to a
    column of one of ``partners`` (FROM objects by ``id()``) — or, with
    ``by_value``, to a bound value — as a conjunct of its ``WHERE`` or of a
    join's ``ON`` (under ``OR``, ``NOT``, ``CASE`` or a function an equality
    restricts nothing; nested statements are theirs to judge)."""
    criteria: list[Any] = [*statement._where_criteria]
    criteria += [join[1] for join in _setup_joins(statement)]
    joins = [f for f in getattr(statement, "_from_obj", ()) if isinstance(f, Join)]
    while joins:
        join = joins.pop()
        criteria.append(join.onclause)
        joins += [side for side in (join.left, join.right) if isinstance(side, Join)]
    for one, other in _compared_with(criteria, table, _PAIRING):
        if id(_column_of(other)) in partners and _keyed(one, other):
            return True  # a foreign key between the two: a join
        if (
            isinstance(other, BindParameter)
            # a value SQLAlchemy reads from a loaded object (with_parent(),
            # dynamic and write-only collections, contains()): the
            # relationship's whole condition, composite keys included
            and (by_value or _from_loaded_object(other))
            and getattr(one, "foreign_keys", None)
        ):
            return True
    return False


def _compared_with(
    criteria: list[Any], table: Any, comparisons: tuple[Any, ...]
) -> Iterator[tuple[Any, Any]]:
    """``(column of table, other side)`` of each required comparison (a
    conjunct of ``criteria``) by one of ``comparisons`` with a column of
    ``table`` on either side."""
    for element in _conjuncts(criteria):
        if isinstance(element, BinaryExpression) and element.operator in comparisons:
            sides = (element.left, element.right)
            for one, other in (sides, sides[::-1]):
                if _column_of(one) is table:
                    yield one, other


#: The function SQLAlchemy binds to read a relationship's key from a loaded
#: object (``RelationshipProperty._optimized_compare``, ``with_parent()``).
_OBJECT_VALUE = "RelationshipProperty._get_attr_w_warn_on_none.<locals>._go"


def _from_loaded_object(bind: Any) -> bool:
    """Whether ``bind``'s value is read from a loaded object by SQLAlchemy's
    relationship machinery (any other ``bindparam(callable_=...)`` is a
    value like any literal)."""
    return getattr(bind.callable, "__qualname__", None) == _OBJECT_VALUE


def _keyed_condition(condition: Any, table: Any) -> bool:
    """Whether a relationship's ``condition`` requires a plain equality of a
    column of ``table`` with the column its foreign key refers to."""
    return any(
        _keyed(one, other) for one, other in _compared_with([condition], table, (operators.eq,))
    )


def _conjuncts(criteria: list[Any]) -> Iterator[Any]:
    """The terms ``criteria`` all require: ``AND`` lists and parentheses opened."""
    stack = list(criteria)
    while stack:
        element = stack.pop()
        if element is None:
            continue
        if isinstance(element, Grouping):
            stack.append(element.element)
        elif isinstance(element, BooleanClauseList) and element.operator is operators.and_:
            stack.extend(element.clauses)
        else:
            yield element


def _joined_froms(from_clause: Any) -> list[Any]:
    """The FROM objects (deannotated) a FROM renders: the sides of its joins,
    not what an alias or subquery wraps."""
    found = []
    stack = [from_clause]
    while stack:
        element = stack.pop()
        if isinstance(element, Join):
            stack += [element.left, element.right]
        elif isinstance(element, FromClause):
            found.append(element._deannotate())
    return found


def _setup_joins(statement: Any) -> list[Any]:
    """The ORM joins of a ``select()``, also those made before
    ``with_only_columns()`` (which SQLAlchemy keeps apart: ``Query.exists()``)."""
    joins = list(getattr(statement, "_setup_joins", ()))
    for memoized in getattr(statement, "_memoized_select_entities", ()):
        joins += memoized._setup_joins
    return joins


def _keyed(one: Any, other: Any) -> bool:
    """Whether ``one`` (a column of the table to pair) refers by foreign key
    to ``other`` (a column of a scoped row): a comparison that names that
    very row, not any equality.

    Through aliases and along a chain of keys (a joined subclass's id
    refers to its parent's, and on to the root's). Not the other way round,
    nor two keys of one row (``followers.followed_id == Post.user_id``): a
    scoped row's own key values are whatever was written, and may name
    another organization's rows.
    """
    return bool(_referred(one) & set(getattr(other, "proxy_set", ())))


def _referred(column: Any, depth: int = 8) -> set[Any]:
    """The columns ``column``'s foreign keys lead to, along chains of keys
    (not ``column`` itself). Only single-column keys: one column of a
    composite key (``(organization_id, user_id)``) names no row by itself."""
    found: set[Any] = set()
    frontier = list(getattr(column, "proxy_set", ()))
    for _ in range(depth):
        following = []
        for current in frontier:
            for key in getattr(current, "foreign_keys", ()):
                if key.constraint is not None and len(key.constraint.columns) != 1:
                    continue
                if key.column not in found:
                    found.add(key.column)
                    following.append(key.column)
        if not following:
            break
        frontier = following
    return found


def _optional_froms(statement: Any) -> set[int] | None:
    """The FROM objects (by ``id()``) on the optional side of the outer joins
    of ``statement``; ``None`` when it has a FULL join."""
    optional: set[int] = set()
    for target, _onclause, _from, flags in _setup_joins(statement):
        if flags.get("full"):
            return None
        if flags.get("isouter"):
            optional.update(id(f) for f in _join_target_froms(target))
    stack = [f for f in getattr(statement, "_from_obj", ()) if isinstance(f, Join)]
    while stack:
        join = stack.pop()
        if join.full:
            return None
        if join.isouter:
            optional.update(id(f) for f in _joined_froms(join.right))
        stack += [side for side in (join.left, join.right) if isinstance(side, Join)]
    return optional


def _join_target_froms(target: Any) -> list[Any]:
    """The FROM objects (deannotated) a ``join()`` target brings in."""
    entity = getattr(target, "_annotations", {}).get("parententity") or _relationship_target(target)
    if entity is not None:
        if getattr(entity, "is_aliased_class", False):
            return _joined_froms(entity.selectable)
        return list(entity.mapper.tables)
    return _joined_froms(target) if isinstance(target, FromClause) else []


def _relationship_target(attribute: Any) -> Any:
    """The entity a relationship attribute joins to (``of_type()`` included), else ``None``."""
    prop = getattr(attribute, "property", None)
    if not isinstance(prop, RelationshipProperty):
        return None
    of_type = getattr(attribute, "_of_type", None)
    return inspect(of_type) if of_type is not None else prop.entity


def _plain_from(element: Any) -> Any:
    """``element`` (deannotated) when it is a FROM object, else ``None``."""
    return element._deannotate() if isinstance(element, FromClause) else None


def _joinable(left: Any, right: Any) -> bool:
    """Whether a foreign key joins ``left`` and ``right`` (what a join with no ON uses)."""
    try:
        sql_util.join_condition(left, right)
    except sa_exc.ArgumentError:  # no foreign key between them, or more than one
        return False
    return True


def _refers(table: Any, other: Any) -> bool:
    """Whether a single-column foreign key of ``table`` itself names a column
    of ``other`` (through aliases; no chain: a join with no ``ON`` uses the
    keys between the two tables only, so a chain would vouch for a join
    SQLAlchemy makes along ``other``'s own key)."""
    targets = set()
    for column in getattr(other, "columns", ()):
        targets |= set(getattr(column, "proxy_set", ()))
    for column in getattr(table, "columns", ()):
        for key in getattr(column, "foreign_keys", ()):
            if key.constraint is not None and len(key.constraint.columns) != 1:
                continue
            if key.column in targets:
                return True
    return False


def _column_of(element: Any) -> Any:
    """The FROM object (deannotated) of a column, else ``None``."""
    table = getattr(element, "table", None) if isinstance(element, ColumnClause) else None
    return table._deannotate() if isinstance(table, FromClause) else None


def _correlated(
    select_: Any, from_clause: Any, explicit: frozenset[Any], implicit: frozenset[Any]
) -> bool:
    """Whether ``select_`` correlates ``from_clause`` (deannotated) to an
    enclosing statement, by SQLAlchemy's rule (``SelectState._correlate_froms``):
    ``correlate(t)`` / ``correlate_except(t)`` to any enclosing statement
    that reads it; auto-correlation only to the immediately enclosing one,
    and only when ``select_`` would keep a FROM of its own."""
    if (
        select_._correlate
        and from_clause in explicit
        and any(f._deannotate() is from_clause for f in select_._correlate)
    ):
        return True
    if (
        select_._correlate_except is not None
        and from_clause in explicit
        and all(f._deannotate() is not from_clause for f in select_._correlate_except)
    ):
        return True
    return bool(
        select_._auto_correlate and from_clause in implicit and len(select_.get_final_froms()) > 1
    )


def _correlates(expression: Any, tables: set[Any]) -> bool:
    """Whether every ``SELECT`` in ``expression`` correlates ``tables`` to the enclosing query."""
    for element in visitors.iterate(expression):
        if isinstance(element, Select) and not (
            (element._auto_correlate and element._correlate_except is None)
            or tables <= set(element._correlate)
        ):
            return False
    return True
