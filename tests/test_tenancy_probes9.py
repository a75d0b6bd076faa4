"""Regression tests of the tenant-leak pass after the tenancy module's split,
on SQLite and PostgreSQL.

* A ``relationship(viewonly=True)`` over ``foreign()`` columns (a lookup
  never written through) was taken for a reference: writing the column
  with any value that named no row of the organization was refused.
* A ``from_statement()`` row with ``NULL`` in the organization column was
  let through the load guard (``SELECT id, NULL AS organization_id, …``
  loaded every organization's rows).
* A refused ``populate_existing`` row had already overwritten the object
  the session held: the refusal left another organization's values in it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    ForeignKey,
    String,
    and_,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    foreign,
    joinedload,
    lazyload,
    mapped_column,
    raiseload,
    relationship,
    sessionmaker,
    with_loader_criteria,
    with_polymorphic,
)

from flask_oauth_verify.tenancy import CrossTenantWriteError, TenantScopingError, as_organization

from .tenancy_support import seeded_factory


class NinthBase(DeclarativeBase):
    pass


class Project(NinthBase):
    __tablename__ = "p9_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40))


class Task(NinthBase):
    __tablename__ = "p9_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(40))
    #: "the project named like this task": read only, no foreign key
    project_by_title: Mapped[Project | None] = relationship(
        Project, primaryjoin=lambda: foreign(Task.title) == Project.name, viewonly=True
    )


class Memo(NinthBase):
    """Names a project by its primary key, without a database foreign key:
    the viewonly relationship is still a reference (written through
    ``project_ref``)."""

    __tablename__ = "p9_memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    project_ref: Mapped[int] = mapped_column()
    project: Mapped[Project] = relationship(
        Project, primaryjoin=lambda: foreign(Memo.project_ref) == Project.id, viewonly=True
    )


SEED = [
    "INSERT INTO p9_projects (id, organization_id, name) VALUES (1, 'org_a', 'alpha')",
    "INSERT INTO p9_projects (id, organization_id, name) VALUES (2, 'org_b', 'beta')",
    "INSERT INTO p9_tasks (id, organization_id, title) VALUES (1, 'org_a', 'alpha')",
    "INSERT INTO p9_tasks (id, organization_id, title) VALUES (2, 'org_b', 'beta')",
]


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Any]]:
    tables = ("p9_projects", "p9_tasks", "p9_memos", "p9_notes", "p9_papers")
    with seeded_factory(request, NinthBase, SEED, tables) as made:
        yield made


#: a write of the lookup's column, and the (id, title) row it leaves
WRITES: dict[str, tuple[Any, tuple[int, str]]] = {
    "flush, a title naming no project": (
        lambda s: s.add(Task(id=10, title="write docs")),
        (10, "write docs"),
    ),
    "flush, a title naming their project": (
        lambda s: s.add(Task(id=11, title="beta")),
        (11, "beta"),
    ),
    "flush, a rename": (lambda s: setattr(s.get(Task, 1), "title", "renamed"), (1, "renamed")),
    "ORM insert()": (lambda s: s.execute(insert(Task).values(id=12, title="plain")), (12, "plain")),
    "ORM update()": (
        lambda s: s.execute(update(Task).where(Task.id == 1).values(title="again")),
        (1, "again"),
    ),
    "bulk_insert_mappings": (
        lambda s: s.bulk_insert_mappings(Task, [{"id": 13, "title": "b"}]),
        (13, "b"),
    ),
    "bulk_update_mappings": (
        lambda s: s.bulk_update_mappings(Task, [{"id": 1, "title": "c"}]),
        (1, "c"),
    ),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_viewonly_lookup_is_no_reference(factory: sessionmaker[Any], write: str) -> None:
    action, written = WRITES[write]
    with factory() as session, as_organization("org_a"):
        action(session)
        session.commit()
        rows = session.execute(select(Task.id, Task.title, Task.organization_id)).all()
    assert (*written, "org_a") in [tuple(row) for row in rows]


def test_the_viewonly_lookup_still_reads_own_rows_only(factory: sessionmaker[Any]) -> None:
    with factory() as session, as_organization("org_a"):
        session.add(Task(id=20, title="beta"))
        session.commit()
        task = session.get(Task, 20)
        assert task is not None and task.project_by_title is None  # org_b's "beta" is not ours
        own = session.get(Task, 1)
        assert own is not None and own.project_by_title is not None
        assert own.project_by_title.id == 1


def test_a_viewonly_relationship_by_primary_key_is_still_a_reference(
    factory: sessionmaker[Any],
) -> None:
    with factory() as session, as_organization("org_a"):
        session.add(Memo(id=1, project_ref=1))
        session.commit()
        session.add(Memo(id=2, project_ref=2))  # org_b's project
        with pytest.raises(CrossTenantWriteError):
            session.commit()
        session.rollback()
        assert session.scalars(select(Memo.project_ref)).all() == [1]


def test_a_from_statement_row_with_a_null_organization_is_refused(
    factory: sessionmaker[Any],
) -> None:
    passed_off = text("SELECT id, NULL AS organization_id, name FROM p9_projects")
    with (
        factory() as session,
        as_organization("org_a"),
        pytest.raises(TenantScopingError, match="from_statement"),
    ):
        session.scalars(select(Project).from_statement(passed_off)).all()


def test_a_refused_populate_existing_row_leaves_the_held_object_as_it_was(
    factory: sessionmaker[Any],
) -> None:
    theirs_as_ours = text(
        "SELECT p.id, q.organization_id, q.name FROM p9_projects p "
        "JOIN p9_projects q ON q.id = 2 WHERE p.id = 1"
    )
    with factory() as session, as_organization("org_a"):
        held = session.get(Project, 1)
        assert held is not None
        statement = select(Project).from_statement(theirs_as_ours)
        with pytest.raises(TenantScopingError):
            session.scalars(statement.execution_options(populate_existing=True)).all()
        assert (held.organization_id, held.name) == ("org_a", "alpha")


TASKS = Task.__table__
PROJECTS = Project.__table__


#: a "row-limited"-style relationship over a Core subquery that counts every
#: organization's tasks (a window), and one whose join condition asks
#: about another organization's project: loaded lazily they are statements
#: of their own (refused); joined eagerly, SQLAlchemy adds them at compile
_counted = aliased(Task, select(TASKS, func.count().over().label("n")).subquery())
Project.counted_tasks = relationship(
    _counted, primaryjoin=lambda: foreign(_counted.title) == Project.name, viewonly=True
)
Project.tasks_if_beta_exists = relationship(
    Task,
    primaryjoin=lambda: and_(
        foreign(Task.title) == Project.name,
        exists(select(PROJECTS.c.id).where(PROJECTS.c.name == "beta")),
    ),
    viewonly=True,
)


Project.tasks_by_name = relationship(  # a plain lookup, joinable
    Task, primaryjoin=lambda: foreign(Task.title) == Project.name, viewonly=True
)


class SoftDeleted:
    """A mixin the app's own loader criteria name (SQLAlchemy's soft-delete
    pattern)."""

    hidden: Mapped[bool] = mapped_column(default=False)


class Note(NinthBase):
    """A base class whose subclass joins, by default, a relationship over a
    subquery counting every organization's tasks."""

    __tablename__ = "p9_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(40), default="alpha")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "note"}  # noqa: RUF012


class LinkedNote(SoftDeleted, Note):
    __mapper_args__ = {"polymorphic_identity": "linked"}  # noqa: RUF012
    counted: Mapped[list[Any]] = relationship(
        _counted,
        primaryjoin=lambda: foreign(_counted.title) == LinkedNote.title,
        viewonly=True,
        lazy="joined",
    )


class Paper(NinthBase):
    __tablename__ = "p9_papers"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "paper"}  # noqa: RUF012


class Bill(Paper):
    __tablename__ = "p9_bills"
    id: Mapped[int] = mapped_column(ForeignKey("p9_papers.id"), primary_key=True)
    amount: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "bill"}  # noqa: RUF012


class Receipt(Paper):
    __tablename__ = "p9_receipts"
    id: Mapped[int] = mapped_column(ForeignKey("p9_papers.id"), primary_key=True)
    total: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "receipt"}  # noqa: RUF012


PAPERS, BILLS, RECEIPTS = Paper.__table__, Bill.__table__, Receipt.__table__


def _over_a_subquery(*columns: Any) -> tuple[Any, Any]:
    """An aliased ``Task`` over a Core subquery of ``TASKS`` with ``columns``."""
    subquery = select(TASKS, *columns).subquery()
    return aliased(Task, subquery), subquery


def _count_of_every_project(session: Any) -> Any:
    count = select(func.count()).select_from(PROJECTS).scalar_subquery().label("n")
    task, subquery = _over_a_subquery(count)
    return session.execute(select(task.id, subquery.c.n)).all()


def _window_over_every_task(session: Any) -> Any:
    task, subquery = _over_a_subquery(func.count().over().label("n"))
    return session.execute(select(task.id, subquery.c.n)).all()


def _another_projects_name(session: Any) -> Any:
    name = select(PROJECTS.c.name).where(PROJECTS.c.id == 2).scalar_subquery().label("leak")
    task, subquery = _over_a_subquery(name)
    return session.execute(select(task.id, subquery.c.leak)).all()


def _the_trusted_subquery_used_again(session: Any) -> Any:
    task, subquery = _over_a_subquery()
    every = select(func.count()).select_from(subquery).correlate(None).scalar_subquery()
    return session.execute(select(task.id, every)).all()


def _joined_eager_load_over_a_window(session: Any) -> Any:
    statement = select(Project).options(joinedload(Project.counted_tasks))  # type: ignore[attr-defined]
    return session.scalars(statement).unique().all()


def _joined_eager_load_asking_about_theirs(session: Any) -> Any:
    relationship_ = Project.tasks_if_beta_exists  # type: ignore[attr-defined]
    statement = select(Project).options(joinedload(relationship_))
    return session.scalars(statement).unique().all()


def _joined_eager_load_of_everything(session: Any) -> Any:
    return session.scalars(select(Project).options(joinedload("*"))).unique().all()


def _a_subclass_joined_by_default(session: Any) -> Any:
    notes = with_polymorphic(Note, [LinkedNote])
    return session.scalars(select(notes)).unique().all()


def _loader_criteria_asking_about_theirs(session: Any) -> Any:
    theirs = exists(select(PROJECTS.c.id).where(PROJECTS.c.name == "beta"))
    return session.scalars(select(Task.id).options(with_loader_criteria(Task, theirs))).all()


def _loader_criteria_per_class(session: Any) -> Any:
    """A lambda that asks about theirs only for the subclass: resolved for
    the option's root class alone, the check saw ``true()``."""
    theirs = exists(select(PROJECTS.c.id).where(PROJECTS.c.name == "beta"))
    criteria = with_loader_criteria(
        Note, lambda cls: theirs if cls is LinkedNote else true(), include_aliases=True
    )
    return session.scalars(select(LinkedNote.id).options(criteria)).unique().all()


def _loader_criteria_naming_their_column(session: Any) -> Any:
    criteria = with_loader_criteria(Task, Project.name == "beta")
    return session.scalars(select(Task.id).options(criteria)).all()


def _joined_load_with_extra_criteria(session: Any) -> Any:
    theirs = exists(select(PROJECTS.c.id).where(PROJECTS.c.name == "beta"))
    loaded = joinedload(Project.tasks_by_name.and_(theirs))  # type: ignore[attr-defined]
    return session.scalars(select(Project).options(loaded)).unique().all()


#: SQLAlchemy's "relationship to aliased class" over a join with another
#: tenant table: the criterion compared the alias's own table only
_via_project = aliased(Task, TASKS.join(PROJECTS, PROJECTS.c.name == TASKS.c.title), flat=True)
Project.tasks_via_projects = relationship(
    _via_project, primaryjoin=lambda: foreign(_via_project.title) == Project.name, viewonly=True
)


def _an_alias_over_a_join_with_theirs(session: Any) -> Any:
    return session.scalars(select(_via_project.title)).all()


def _an_alias_over_a_self_join(session: Any) -> Any:
    """Its own table joined again: the criterion compared the first only."""
    other = TASKS.alias("other")
    itself = aliased(Task, TASKS.join(other, other.c.title == "beta"), flat=True)
    return session.scalars(select(itself.id)).all()


def _a_relationship_to_an_alias_over_a_join(session: Any) -> Any:
    loaded = joinedload(Project.tasks_via_projects)  # type: ignore[attr-defined]
    return session.scalars(select(Project).options(loaded)).unique().all()


def _an_organization_written_in(session: Any) -> Any:
    passed_off = select(
        TASKS.c.id, literal("org_a").label("organization_id"), TASKS.c.title
    ).subquery()
    task = aliased(Task, passed_off, adapt_on_names=True)
    return session.scalars(select(task.title)).all()


@pytest.mark.parametrize(
    "read",
    [_count_of_every_project, _window_over_every_task, _another_projects_name,
     _an_organization_written_in, _the_trusted_subquery_used_again,
     _joined_eager_load_over_a_window, _joined_eager_load_asking_about_theirs,
     _joined_eager_load_of_everything, _a_subclass_joined_by_default,
     _loader_criteria_asking_about_theirs, _loader_criteria_per_class,
     _loader_criteria_naming_their_column, _joined_load_with_extra_criteria,
     _an_alias_over_a_join_with_theirs, _a_relationship_to_an_alias_over_a_join,
     _an_alias_over_a_self_join],
)  # fmt: skip
def test_an_aliased_entity_over_a_core_subquery_computes_nothing_across_organizations(
    factory: sessionmaker[Any], read: Any
) -> None:
    """The criterion on an aliased entity's organization column filters the
    rows its subquery passes through: whatever the subquery computed before
    (another table's values, a count, a window, an organization written in)
    covered every organization, and was returned."""
    with (
        factory() as session,
        as_organization("org_a"),
        pytest.raises(TenantScopingError, match="p9_"),
    ):
        read(session)


def test_an_aliased_entity_over_a_plain_core_subquery_is_scoped(
    factory: sessionmaker[Any],
) -> None:
    task, _subquery = _over_a_subquery()
    filtered = aliased(Task, select(TASKS).where(TASKS.c.title != "x").subquery())
    lowered, lowered_subquery = _over_a_subquery(func.upper(TASKS.c.title).label("loud"))
    with factory() as session, as_organization("org_a"):
        assert session.scalars(select(task.title)).all() == ["alpha"]
        assert session.scalars(select(filtered.id)).all() == [1]
        rows = session.execute(select(lowered.id, lowered_subquery.c.loud)).all()
        assert [tuple(row) for row in rows] == [(1, "ALPHA")]  # a per-row function


def test_a_refused_value_is_logged_cut_short(
    factory: sessionmaker[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A client chooses the refused organization value (a request body): it
    was logged whole, so one refused write put megabytes into the log."""
    huge = "org_b" + "x" * 100_000
    with (
        caplog.at_level(logging.WARNING, "flask_oauth_verify.tenancy"),
        factory() as session,
        as_organization("org_a"),
    ):
        session.add(Task(id=30, title="t", organization_id=huge))
        with pytest.raises(CrossTenantWriteError) as refused:
            session.commit()
    reason = str(refused.value.reason)
    assert "org_bxxx" in reason and len(reason) < 300
    (record,) = [r for r in caplog.records if "cross-tenant" in r.getMessage()]
    assert "org_bxxx" in record.getMessage() and len(record.getMessage()) < 300


def test_loader_criteria_on_a_mixin_work(factory: sessionmaker[Any]) -> None:
    """The check of the app's own loader criteria inspected the option's
    root class, here an unmapped mixin: every such query raised (a 500)."""
    criteria = with_loader_criteria(
        SoftDeleted, lambda cls: cls.hidden.is_(False), include_aliases=True
    )
    with factory() as session, as_organization("org_a"):
        session.add(LinkedNote(id=1, title="zzz"))
        session.commit()
        rows = session.scalars(select(LinkedNote.id).options(criteria)).all()
        # the joined-by-default relationship loaded otherwise: not refused
        held = session.scalars(
            select(LinkedNote).options(lazyload(LinkedNote.counted), criteria)
        ).all()
    assert rows == [1] and [note.id for note in held] == [1]


def test_a_nested_refused_value_is_logged_cut_short(
    factory: sessionmaker[Any], caplog: pytest.LogCaptureFixture
) -> None:
    nested: Any = "x" * 1000
    for _ in range(5):
        nested = [nested] * 6  # reprlib's per-level limits multiply
    with (
        caplog.at_level(logging.WARNING, "flask_oauth_verify.tenancy"),
        factory() as session,
        as_organization("org_a"),
    ):
        session.add(Task(id=31, title="t", organization_id=nested))
        with pytest.raises(CrossTenantWriteError):
            session.commit()
    (record,) = [r for r in caplog.records if "cross-tenant" in r.getMessage()]
    assert len(record.getMessage()) < 400


def test_a_wildcard_on_a_polymorphic_entity_reaches_its_subclasses(
    factory: sessionmaker[Any],
) -> None:
    notes = with_polymorphic(Note, [LinkedNote])
    statement = select(notes).options(joinedload("*"))
    with (
        factory() as session,
        as_organization("org_a"),
        pytest.raises(TenantScopingError, match="p9_tasks"),
    ):
        session.scalars(statement).unique().all()


def test_a_wildcard_that_loads_nothing_joined_is_not_refused(factory: sessionmaker[Any]) -> None:
    """``raiseload("*")`` joins nothing: the entity's ``lazy="joined"``
    relationship that would read every organization is not loaded at all."""
    with factory() as session, as_organization("org_a"):
        session.add(LinkedNote(id=2, title="zzz"))
        session.commit()
        statement = select(LinkedNote).options(raiseload("*"))
        assert [note.id for note in session.scalars(statement)] == [2]


@pytest.mark.parametrize(
    ("condition", "safe"),
    [
        (PAPERS.c.id == BILLS.c.id, True),
        (and_(PAPERS.c.id == BILLS.c.id, BILLS.c.amount > 0), True),
        (or_(PAPERS.c.id == BILLS.c.id, true()), False),  # an OR widens it to every bill
        (PAPERS.c.kind == "bill", False),  # no key pairs the rows
        # a key pair about another table: every bill joined
        (and_(PAPERS.c.id == PAPERS.c.id, PAPERS.c.kind == "bill"), False),
    ],
)
def test_a_hierarchy_joined_by_its_key_only_is_trusted(
    factory: sessionmaker[Any], condition: Any, safe: bool
) -> None:
    papers = with_polymorphic(Paper, [Bill], selectable=PAPERS.outerjoin(BILLS, condition))
    statement = select(papers.id, papers.Bill.amount)
    with factory() as session, as_organization("org_a"):
        if safe:
            assert session.execute(statement).all() == []
        else:
            with pytest.raises(TenantScopingError, match="p9_bills"):
                session.execute(statement).all()


def test_a_key_pair_about_another_table_trusts_nothing(factory: sessionmaker[Any]) -> None:
    """The ON clause of the receipts join pairs papers with bills: every
    receipt of every organization is joined to each paper."""
    joined = PAPERS.outerjoin(BILLS, PAPERS.c.id == BILLS.c.id).outerjoin(
        RECEIPTS, PAPERS.c.id == BILLS.c.id
    )
    papers = with_polymorphic(Paper, [Bill, Receipt], selectable=joined)
    with (
        factory() as session,
        as_organization("org_a"),
        pytest.raises(TenantScopingError, match="p9_receipts"),
    ):
        session.execute(select(papers.id, papers.Receipt.total)).all()
