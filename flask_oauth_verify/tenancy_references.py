"""The write guard's reference checks: a written row names only its organization's rows.

:class:`_ReferenceGuard` checks what a written row refers to — foreign
keys (single or composite), many-to-one relationships, many-to-many links
— before a flush (values given by hand), after its statements (every
reference as written, unless already proven) and in bulk statements, in
the database, with statements built once each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import enum
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import bindparam, cast, func, inspect, literal, select, tuple_, union_all
from sqlalchemy.orm import Mapper, Session, aliased
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from .fifo import BoundedFifo
from .tenancy_errors import TenantScopingError
from .tenancy_models import (
    _FLUSH_VERIFIED,
    _INTERNAL,
    _LOADED_FOR,
    _MAPPER_GENERATION,
    _NOT_SET,
    _ScopingBase,
)

#: Written rows checked per ``SELECT`` (an ``IN`` list; SQLite allowed 999
#: bound parameters per statement before 3.32).
_REFERENCES_PER_QUERY = 500
#: Given key values checked per ``SELECT`` (a ``UNION ALL`` of one-row selects:
#: SQLite allows 500 of them, and two bound parameters each).
_GIVEN_PER_QUERY = 200


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


def _pk_keys(mapper: Mapper[Any]) -> list[str]:
    return [mapper.get_property_by_column(c).key for c in mapper.primary_key]


class _ReferenceGuard(_ScopingBase):
    """The reference checks of :class:`~flask_oauth_verify.tenancy.TenantScoping`.

    A reference to a row the organization does not hold (another
    organization's, or none) is refused with :class:`CrossTenantWriteError`.
    """

    def __init__(self, target: Any, *, column: str, models: Any = None) -> None:
        super().__init__(target, column=column, models=models)
        #: the reference checks' statements, built once each (see _stray_rows_query)
        self._reference_queries: BoundedFifo[tuple[Any, ...], Any] = BoundedFifo(256)
        #: mapper -> (mapper generation, its references to scoped rows)
        self._references: weakref.WeakKeyDictionary[
            Mapper[Any],
            tuple[int, tuple[tuple[_Reference, ...], tuple[tuple[str, Mapper[Any]], ...]]],
        ] = weakref.WeakKeyDictionary()

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
            pairs = relationship.local_remote_pairs or ()
            if relationship.viewonly and {remote for _, remote in pairs} != set(target.primary_key):
                # a lookup by some other column (a title naming a project),
                # never written through: no reference. One by the target's
                # primary key is one, written through its local columns.
                continue
            relations.append((relationship.key, target))
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
