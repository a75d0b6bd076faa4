"""Regression tests of the twentieth tenant-leak pass: references the write
guard's first reference check did not model, on SQLite and PostgreSQL.

* A related object built by hand (``make_transient_to_detached``,
  ``set_committed_value``) carrying this organization's value was trusted.
* A many-to-many link was checked by the ends' primary keys, while the link
  row is written with the column the secondary table refers to.
* A class without the organization column referring to tenant rows was
  checked in a flush, not in bulk statements.
* Composite foreign keys without the organization column, and many-to-one
  relationships without a database foreign key, were not checked.
* ``Numeric`` keys, PostgreSQL ``CHAR(n)`` keys and enum names were
  compared as text (own references refused, or a database error).
"""

from __future__ import annotations

import decimal
import enum
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    CHAR,
    Column,
    Enum,
    ForeignKey,
    ForeignKeyConstraint,
    Numeric,
    String,
    Table,
    insert,
    text,
    update,
)
from sqlalchemy.exc import SADeprecationWarning
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    attributes,
    foreign,
    load_only,
    make_transient_to_detached,
    mapped_column,
    relationship,
    sessionmaker,
)

from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    as_organization,
)

from .tenancy_support import seeded_factory


class EighthBase(DeclarativeBase):
    pass


class Color(enum.Enum):
    red = "R"
    blue = "B"


class Project(EighthBase):
    __tablename__ = "p8_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40), default="p")
    code: Mapped[str | None] = mapped_column(String(20), unique=True)


class Slot(EighthBase):
    """A tenant row keyed by a composite key without the organization."""

    __tablename__ = "p8_slots"
    region: Mapped[str] = mapped_column(String(10), primary_key=True)
    num: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    label: Mapped[str] = mapped_column(String(20), default="s")


class Ledger(EighthBase):
    """Tenant rows keyed by a Numeric, a CHAR(6) and an enum column."""

    __tablename__ = "p8_ledgers"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2), unique=True)
    short: Mapped[str] = mapped_column(CHAR(6), unique=True)
    color: Mapped[Color] = mapped_column(Enum(Color, name="p8_color"), unique=True)


code_links = Table(
    "p8_code_links",
    EighthBase.metadata,
    Column("task_id", ForeignKey("p8_tasks.id"), primary_key=True),
    Column("project_code", ForeignKey("p8_projects.code"), primary_key=True),
)


class Task(EighthBase):
    __tablename__ = "p8_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(40), default="t")
    project_id: Mapped[int | None] = mapped_column(ForeignKey("p8_projects.id"))
    project: Mapped[Project | None] = relationship(foreign_keys=[project_id])
    region: Mapped[str | None] = mapped_column(String(10))
    num: Mapped[int | None] = mapped_column()
    slot: Mapped[Slot | None] = relationship()
    coded: Mapped[list[Project]] = relationship(
        secondary=code_links,
        primaryjoin=lambda: Task.id == code_links.c.task_id,
        secondaryjoin=lambda: Project.code == code_links.c.project_code,
    )
    amount: Mapped[decimal.Decimal | None] = mapped_column(
        Numeric(10, 2), ForeignKey("p8_ledgers.amount")
    )
    short: Mapped[str | None] = mapped_column(CHAR(6), ForeignKey("p8_ledgers.short"))
    color: Mapped[Color | None] = mapped_column(
        Enum(Color, name="p8_color"), ForeignKey("p8_ledgers.color")
    )
    project_code: Mapped[str | None] = mapped_column(ForeignKey("p8_projects.code"))
    by_code: Mapped[Project | None] = relationship(foreign_keys=[project_code])
    __table_args__ = (ForeignKeyConstraint(["region", "num"], ["p8_slots.region", "p8_slots.num"]),)


class Note(EighthBase):
    """A many-to-one over a column without a database foreign key."""

    __tablename__ = "p8_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    project_key: Mapped[int | None] = mapped_column()
    project: Mapped[Project | None] = relationship(
        primaryjoin=lambda: foreign(Note.project_key) == Project.id
    )


class Attachment(EighthBase):
    """Shared (no organization column), but refers to a tenant row."""

    __tablename__ = "p8_attachments"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("p8_projects.id"))


SEED = [
    "INSERT INTO p8_projects (id, organization_id, name, code) VALUES "
    "(1, 'org_a', 'a1', 'A1'), (2, 'org_b', 'b-secret', 'B2')",
    "INSERT INTO p8_slots (region, num, organization_id, label) VALUES "
    "('eu', 1, 'org_a', 's'), ('eu', 2, 'org_b', 's')",
    "INSERT INTO p8_ledgers (id, organization_id, amount, short, color) VALUES "
    "(1, 'org_a', 1.00, 'ab', 'red'), (2, 'org_b', 2.00, 'cd', 'blue')",
    "INSERT INTO p8_tasks (id, organization_id, title, project_id) VALUES (1, 'org_a', 'a', 1)",
]
TABLES = ("p8_projects", "p8_tasks", "p8_notes", "p8_attachments", "p8_ledgers")


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Any]]:
    with seeded_factory(request, EighthBase, SEED, TABLES) as made:
        yield made


def _rows(factory: sessionmaker[Any], sql: str) -> list[tuple[Any, ...]]:
    with factory() as session:
        return [tuple(row) for row in session.execute(text(sql))]


def _stub(cls: type, **values: Any) -> Any:
    """An object built by hand and attached as if loaded (no SELECT)."""
    obj = cls(**values)
    make_transient_to_detached(obj)
    return obj


# -- references the organization does not hold ------------------------------------------


def _relate_stub(session: Any) -> None:
    theirs = _stub(Project, id=2, organization_id="org_a")  # a lie in memory
    session.add(theirs)
    session.add(Task(project=theirs))


def _relate_committed_value(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Project, 2)
    attributes.set_committed_value(theirs, "organization_id", "org_a")
    session.add(Task(project=theirs))


def _link_by_code_stub(session: Any) -> None:
    # own id, org_b's code: the link row is written with the code
    theirs = _stub(Project, id=1, code="B2", organization_id="org_a")
    session.add(theirs)
    mine = session.get(Task, 1)
    mine.coded.append(theirs)


def _composite_by_hand(session: Any) -> None:
    session.add(Task(region="eu", num=2))


def _composite_related(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Slot, ("eu", 2), options=[load_only(Slot.label)])
    session.add(Task(slot=theirs))


def _no_database_key_related(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Project, 2, options=[load_only(Project.name)])
    session.add(Note(project=theirs))


def _no_database_key_stub(session: Any) -> None:
    theirs = _stub(Project, id=2)
    session.add(theirs)
    session.add(Note(project=theirs))


WRITES = [
    _relate_stub,
    _relate_committed_value,
    _link_by_code_stub,
    _composite_by_hand,
    _composite_related,
    _no_database_key_related,
    _no_database_key_stub,
]


@pytest.mark.parametrize("write", WRITES)
def test_references_to_rows_the_organization_does_not_hold_are_refused(
    factory: sessionmaker[Any], write: Any
) -> None:
    with factory() as session, as_organization("org_a"):
        write(session)
        with pytest.raises(CrossTenantWriteError):
            session.commit()
    assert _rows(factory, "SELECT count(*) FROM p8_tasks") == [(1,)]
    assert _rows(factory, "SELECT count(*) FROM p8_notes") == [(0,)]
    assert _rows(factory, "SELECT count(*) FROM p8_code_links") == [(0,)]


def test_own_references_of_every_kind_pass(factory: sessionmaker[Any]) -> None:
    with factory() as session, as_organization("org_a"):
        mine = session.get(Project, 1)
        task = session.get(Task, 1)
        task.coded.append(mine)
        session.add(Task(region="eu", num=1))
        session.add(Note(project=mine))
        session.add(Note(project_key=1))
        session.add(Attachment(project_id=1))
        session.commit()
    assert _rows(factory, "SELECT project_code FROM p8_code_links") == [("A1",)]
    assert _rows(factory, "SELECT count(*) FROM p8_notes WHERE project_key = 1") == [(2,)]


# -- a shared class's bulk writes -------------------------------------------------------


_SHARED_BULK: dict[str, Any] = {
    "insert-values": lambda s: s.execute(insert(Attachment).values(project_id=2)),
    "insert-rows": lambda s: s.execute(insert(Attachment), [{"project_id": 2}]),
    "update": lambda s: s.execute(update(Attachment).values(project_id=2)),
    "insert-mappings": lambda s: s.bulk_insert_mappings(Attachment, [{"project_id": 2}]),
    "save-objects": lambda s: s.bulk_save_objects([Attachment(project_id=2)]),
}


@pytest.mark.parametrize("write", list(_SHARED_BULK))
def test_a_shared_class_cannot_refer_to_another_organizations_row_in_bulk(
    factory: sessionmaker[Any], write: str
) -> None:
    with factory() as session, as_organization("org_a"):
        session.add(Attachment(id=7, project_id=1))
        session.commit()
        with pytest.raises(CrossTenantWriteError):
            _SHARED_BULK[write](session)
        session.rollback()
    assert _rows(factory, "SELECT id, project_id FROM p8_attachments") == [(7, 1)]


def test_a_bulk_write_of_a_composite_reference_is_refused(factory: sessionmaker[Any]) -> None:
    with (
        factory() as session,
        as_organization("org_a"),
        pytest.raises(TenantScopingError, match="composite reference"),
    ):
        session.execute(insert(Task), [{"region": "eu", "num": 1}])


# -- keys compared as the database compares them ----------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        {"amount": decimal.Decimal("1")},
        {"amount": 1},
        {"amount": "1.00"},
        {"short": "ab"},
        {"color": Color.red},
        {"color": "red"},
    ],
    ids=["decimal", "int-for-numeric", "text-for-numeric", "char-unpadded", "enum", "enum-name"],
)
def test_own_keys_of_other_types_pass_and_theirs_are_refused(
    factory: sessionmaker[Any], given: dict[str, Any]
) -> None:
    with factory() as session, as_organization("org_a"):
        session.add(Task(**given))
        session.commit()
    theirs = {
        "amount": decimal.Decimal("2.00"),
        "short": "cd",
        "color": Color.blue,
    }
    name = next(iter(given))
    with factory() as session, as_organization("org_a"):
        session.add(Task(**{name: theirs[name]}))
        with pytest.raises(CrossTenantWriteError):
            session.commit()
    assert _rows(factory, "SELECT count(*) FROM p8_tasks") == [(2,)]


# -- pass twenty-one: decoys and swapped values ------------------------------------------------


_DECOYED_BULK: dict[str, Any] = {
    "insert-mappings": lambda s: s.bulk_insert_mappings(Task, [{"project_id": 2}]),
    "insert-rows": lambda s: s.execute(insert(Task), [{"project_id": 2}]),
    "update": lambda s: s.execute(update(Task).where(Task.id == 1).values(project_id=2)),
}


@pytest.mark.parametrize("write", list(_DECOYED_BULK))
def test_a_pending_object_does_not_vouch_for_a_bulk_write(
    factory: sessionmaker[Any], write: str
) -> None:
    # bulk statements write no pending object: a pending Project(id=2) is no
    # row of this organization
    with factory() as session, as_organization("org_a"), session.no_autoflush:
        session.add(Project(id=2))
        with pytest.raises(CrossTenantWriteError):
            _DECOYED_BULK[write](session)
    assert _rows(factory, "SELECT project_id FROM p8_tasks") == [(1,)]


def test_a_pending_object_left_out_of_the_flush_does_not_vouch(
    factory: sessionmaker[Any],
) -> None:
    with factory() as session, as_organization("org_a"):
        decoy = Project(id=2)
        session.add(decoy)
        task = Task(project_id=2)
        session.add(task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SADeprecationWarning)  # flush(objects)
            with pytest.raises(CrossTenantWriteError):
                session.flush([task])  # the decoy is not written
    assert _rows(factory, "SELECT count(*) FROM p8_tasks") == [(1,)]


def test_a_related_object_whose_key_values_were_swapped_does_not_vouch(
    factory: sessionmaker[Any],
) -> None:
    with factory() as session, as_organization("org_a"):
        mine = session.get(Project, 1)
        assert mine is not None
        attributes.set_committed_value(mine, "code", "B2")  # org_b's code, no history
        session.add(Task(by_code=mine))
        with pytest.raises(CrossTenantWriteError):
            session.commit()
    assert _rows(factory, "SELECT count(*) FROM p8_tasks WHERE project_code IS NOT NULL") == [(0,)]


# -- pass twenty-two: upsert SET clauses and Core writes of shared tables ----------------


def _upsert(factory: sessionmaker[Any]) -> Any:
    """The dialect's ``insert()`` (the one with ``on_conflict_do_update``)."""
    from sqlalchemy.dialects import postgresql, sqlite

    engine = factory.kw["bind"]
    return (postgresql if engine.dialect.name == "postgresql" else sqlite).insert


def test_an_upsert_set_cannot_refer_to_another_organizations_row(
    factory: sessionmaker[Any],
) -> None:
    upsert = _upsert(factory)
    with factory() as session, as_organization("org_a"):
        session.add(Attachment(id=7, project_id=1))
        session.commit()
        theirs = (
            upsert(Attachment)
            .values(id=7, project_id=1)
            .on_conflict_do_update(index_elements=[Attachment.id], set_={"project_id": 2})
        )
        with pytest.raises(CrossTenantWriteError):
            session.execute(theirs)
        session.rollback()
        own = upsert(Attachment).values(id=7, project_id=1)
        session.execute(
            own.on_conflict_do_update(
                index_elements=[Attachment.id], set_={"project_id": own.excluded.project_id}
            )
        )
        session.commit()
    assert _rows(factory, "SELECT id, project_id FROM p8_attachments") == [(7, 1)]


ATTACHMENTS: Table = Attachment.__table__  # type: ignore[assignment]

_CORE_SHARED: dict[str, Any] = {
    "insert": lambda s: s.execute(insert(ATTACHMENTS).values(project_id=2)),
    "insert-rows": lambda s: s.execute(insert(ATTACHMENTS), [{"project_id": 2}]),
    "update": lambda s: s.execute(update(ATTACHMENTS).values(project_id=2)),
}


@pytest.mark.parametrize("write", list(_CORE_SHARED))
def test_core_writes_of_a_shared_table_cannot_refer_to_another_organizations_row(
    factory: sessionmaker[Any], write: str
) -> None:
    with factory() as session, as_organization("org_a"):
        session.execute(insert(ATTACHMENTS).values(id=7, project_id=1))  # own: fine
        session.commit()
        with pytest.raises(CrossTenantWriteError):
            _CORE_SHARED[write](session)
        session.rollback()
    assert _rows(factory, "SELECT id, project_id FROM p8_attachments") == [(7, 1)]
