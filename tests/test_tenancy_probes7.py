"""Regression tests of the seventeenth tenant-leak pass.

* An upsert into a shared table whose ``ON CONFLICT`` clause reads a tenant
  table in a subquery read every organization's rows: the loader criteria
  were added to an INSERT only for ``VALUES`` / ``RETURNING`` subqueries.
* ``select(X).from_statement(<ORM insert / update>)`` got past the write
  guard's value checks (it read the wrapper, not the DML), and a legitimate
  ``from_statement(insert(...).returning(X))`` failed with AttributeError.
* An ``as_organization()`` block left open (a generator suspended inside it,
  kept alive, or carried out of an ``async def`` view by the context Flask's
  ``async_to_sync`` copies back) scoped every later request of the thread.

And of the eighteenth (Flask-SQLAlchemy idioms):

* a foreign key given by hand (``Task(project_id=<org_b's project>)``) or
  a related object of another organization hung a row under another
  organization's row: a write that proved the row exists (a missing id
  failed differently) and blocked, or with ``ON DELETE CASCADE`` lost, it;
* rows an app's own ``before_flush`` listener (registered after scoping)
  adds were neither stamped nor checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    bindparam,
    cast,
    event,
    exists,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    load_only,
    make_transient_to_detached,
    mapped_column,
    relationship,
    sessionmaker,
)

from flask_oauth_verify import OAuthVerify, require_organization
from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantContextError,
    TenantScopingError,
    as_organization,
    current_organization_id,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .tenancy_support import engine_for, scoped_database


class SeventhBase(DeclarativeBase):
    pass


class Plan(SeventhBase):
    """Shared by every organization (no organization column)."""

    __tablename__ = "p7_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Project(SeventhBase):
    __tablename__ = "p7_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40))
    score: Mapped[int] = mapped_column(default=0)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("p7_plans.id"))
    notes: Mapped[list[Note]] = relationship()  # no backref: the child never names it


class Note(SeventhBase):
    __tablename__ = "p7_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    body: Mapped[str] = mapped_column(String(40))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("p7_projects.id"))


task_tags = Table(
    "p7_task_tags",
    SeventhBase.metadata,
    Column("task_id", ForeignKey("p7_tasks.id"), primary_key=True),
    Column("tag_id", ForeignKey("p7_tags.id"), primary_key=True),
)


class Tag(SeventhBase):
    __tablename__ = "p7_tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    label: Mapped[str] = mapped_column(String(40))


class Task(SeventhBase):
    __tablename__ = "p7_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(40))
    project_id: Mapped[int] = mapped_column(ForeignKey("p7_projects.id"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("p7_tasks.id"))
    project: Mapped[Project] = relationship()
    children: Mapped[list[Task]] = relationship()  # by parent_id, no backref
    tags: Mapped[list[Tag]] = relationship(secondary=task_tags)


class AuditRow(SeventhBase):
    __tablename__ = "p7_audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str | None] = mapped_column(String(20), nullable=True)
    entity: Mapped[str] = mapped_column(String(40))


ROWS = [(1, "org_a", "a1", 10), (2, "org_b", "b-secret", 900), (3, "org_a", "a2", 20)]
TASKS = [(1, "org_a", "a-task", 1), (2, "org_b", "b-task", 2)]


def _load_rows(connection: Any) -> None:
    connection.execute(text("INSERT INTO p7_plans (id, name) VALUES (1, 'shared')"))
    connection.execute(
        text(
            "INSERT INTO p7_projects (id, organization_id, name, score, plan_id) "
            "VALUES (:i, :o, :n, :s, 1)"
        ),
        [{"i": i, "o": o, "n": n, "s": s} for i, o, n, s in ROWS],
    )
    connection.execute(
        text(
            "INSERT INTO p7_tasks (id, organization_id, title, project_id) VALUES (:i, :o, :t, :p)"
        ),
        [{"i": i, "o": o, "t": t, "p": p} for i, o, t, p in TASKS],
    )
    connection.execute(
        text("INSERT INTO p7_tags (id, organization_id, label) VALUES (1, 'org_a', 'a')")
    )
    connection.execute(
        text("INSERT INTO p7_tags (id, organization_id, label) VALUES (2, 'org_b', 'b')")
    )


ID_TABLES = ("p7_projects", "p7_tasks", "p7_tags", "p7_notes", "p7_audit")


def _seventh(request: pytest.FixtureRequest, backend: str) -> Iterator[sessionmaker[Any]]:
    with (
        engine_for(request, backend) as engine,
        scoped_database(engine, SeventhBase, _load_rows, ID_TABLES) as factory,
    ):
        yield factory


@pytest.fixture
def session_factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Any]]:
    yield from _seventh(request, "sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Any]]:
    """The same rows on SQLite and on a real PostgreSQL server (a private schema)."""
    yield from _seventh(request, request.param)


def _plan_name(factory: sessionmaker[Any]) -> str:
    with factory() as session:
        return str(session.execute(text("SELECT name FROM p7_plans WHERE id = 1")).scalar_one())


def _owner_of(factory: sessionmaker[Any], project_id: int) -> str | None:
    with factory() as session:
        owner = session.execute(
            text("SELECT organization_id FROM p7_projects WHERE id = :i"), {"i": project_id}
        ).scalar()
    return None if owner is None else str(owner)


# -- upserts into a shared table --------------------------------------------------


def test_upsert_set_subquery_reads_only_the_organizations_rows(
    session_factory: sessionmaker[Any],
) -> None:
    # Plan 1 exists: the upsert takes its ON CONFLICT branch, whose SET reads
    # the project named by id 2, org_b's; org_a holds no such row.
    count_over_50 = select(func.count(Project.id)).where(Project.score > 50)
    statement = (
        insert(Plan)
        .values(id=1, name="x")
        .on_conflict_do_update(
            index_elements=["id"],
            set_={"name": func.cast(count_over_50.scalar_subquery(), String)},
        )
    )
    with session_factory() as session, as_organization("org_a"):
        session.execute(statement)
        session.commit()
    assert _plan_name(session_factory) == "0"  # org_b's score-900 row is not counted


def test_upsert_where_subquery_reads_only_the_organizations_rows(
    session_factory: sessionmaker[Any],
) -> None:
    statement = (
        insert(Plan)
        .values(id=1, name="x")
        .on_conflict_do_update(
            index_elements=["id"],
            set_={"name": "org_b has a big project"},
            where=exists(select(Project.id).where(Project.score > 500)),
        )
    )
    with session_factory() as session, as_organization("org_a"):
        session.execute(statement)
        session.commit()
    assert _plan_name(session_factory) == "shared"


# -- select(X).from_statement(<DML>) ----------------------------------------------


@pytest.mark.parametrize("returning", ["id", "entity"])
def test_from_statement_update_cannot_move_a_row_to_another_organization(
    session_factory: sessionmaker[Any], returning: str
) -> None:
    move = (
        update(Project)
        .values(organization_id="org_b")
        .where(Project.id == 1)
        .returning(Project.id if returning == "id" else Project)
    )
    wrapped = select(Project.id if returning == "id" else Project).from_statement(move)
    with session_factory() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            session.execute(wrapped)
        session.rollback()
    assert _owner_of(session_factory, 1) == "org_a"


def test_from_statement_insert_returning_entities_works_and_fills_the_organization(
    session_factory: sessionmaker[Any],
) -> None:
    statement = select(Project).from_statement(
        insert(Project).values(id=77, name="new", plan_id=1).returning(Project)
    )
    with session_factory() as session, as_organization("org_a"):
        created = session.scalars(statement).all()
        session.commit()
        assert [(p.id, p.organization_id) for p in created] == [(77, "org_a")]
    assert _owner_of(session_factory, 77) == "org_a"


def test_from_statement_insert_into_another_organization_is_refused(
    session_factory: sessionmaker[Any],
) -> None:
    statement = select(Project).from_statement(
        insert(Project).values(id=78, name="x", organization_id="org_b").returning(Project)
    )
    with session_factory() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            session.execute(statement)
        session.rollback()
    assert _owner_of(session_factory, 78) is None


def test_from_statement_upsert_into_a_tenant_table_is_refused(
    session_factory: sessionmaker[Any],
) -> None:
    upsert = (
        insert(Project)
        .values(id=2, name="taken over", organization_id="org_a")
        .on_conflict_do_update(index_elements=["id"], set_={"name": "taken over"})
        .returning(Project)
    )
    with session_factory() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError):
            session.execute(select(Project).from_statement(upsert))
        session.rollback()
    with session_factory() as session:
        name = session.execute(text("SELECT name FROM p7_projects WHERE id = 2")).scalar()
    assert name == "b-secret"


# -- an as_organization() block left open ----------------------------------------------


ISSUER = TokenIssuer(issuer="https://issuer.example.test", audience="api")


def _token(organization: str) -> dict[str, str]:
    return auth_header(ISSUER.mint(organization_id=organization))


@pytest.fixture
def tenant_app(session_factory: sessionmaker[Any]) -> Iterator[Flask]:
    app = Flask("p7")
    app.config.update(ISSUER.config(audience="api"))
    OAuthVerify(app)
    kept: list[Any] = []

    def names_as(organization: str) -> Iterator[str]:
        with as_organization(organization), session_factory() as session:
            for project in session.scalars(select(Project).order_by(Project.id)):
                yield project.name

    async def names_as_async(organization: str) -> AsyncIterator[str]:
        with as_organization(organization), session_factory() as session:
            for project in session.scalars(select(Project).order_by(Project.id)).all():
                yield project.name

    @app.get("/peek/<organization>")
    @require_organization
    def peek(organization: str) -> Any:
        names = names_as(organization)
        first = next(names)
        kept.append(names)  # suspended inside its block, and kept alive
        return {"first": first}

    @app.get("/peek-async/<organization>")
    @require_organization
    async def peek_async(organization: str) -> Any:
        async for name in names_as_async(organization):
            return {"first": name}  # leaves the generator suspended in its block
        return {"first": None}

    @app.get("/projects")
    @require_organization
    def projects() -> Any:
        with session_factory() as session:
            names = [p.name for p in session.scalars(select(Project).order_by(Project.id))]
        return {"organization": current_organization_id(), "names": names}

    yield app
    for names in kept:
        names.close()


@pytest.mark.parametrize("route", ["/peek/org_b", "/peek-async/org_b"])
def test_a_block_left_open_does_not_scope_later_requests(tenant_app: Flask, route: str) -> None:
    client = tenant_app.test_client()
    answer = client.get(route, headers=_token("org_a"))
    assert answer.status_code == 200 and answer.json == {"first": "b-secret"}
    for organization, names in (("org_a", ["a1", "a2"]), ("org_c", [])):
        answer = client.get("/projects", headers=_token(organization))
        assert answer.json == {"organization": organization, "names": names}


def test_a_block_entered_in_a_request_does_not_count_outside_it(tenant_app: Flask) -> None:
    client = tenant_app.test_client()
    assert client.get("/peek/org_b", headers=_token("org_a")).status_code == 200
    with pytest.raises(Exception, match="outside a request"):
        current_organization_id()


def test_a_block_still_counts_inside_its_own_request_and_outside_requests(
    session_factory: sessionmaker[Any],
) -> None:
    with as_organization("org_b"):
        assert current_organization_id() == "org_b"
        with as_organization("org_a"):
            assert current_organization_id() == "org_a"
        assert current_organization_id() == "org_b"
    app = Flask("p7-inside")
    with app.test_request_context("/"), as_organization("org_b"):
        assert current_organization_id() == "org_b"


# -- references to rows of another organization ---------------------------------------


def _task_count(factory: sessionmaker[Any]) -> int:
    with factory() as session:
        return int(session.execute(text("SELECT count(*) FROM p7_tasks")).scalar_one())


@pytest.mark.parametrize("project_id", [2, 999], ids=["another-organizations", "missing"])
def test_a_new_row_cannot_name_a_row_the_organization_does_not_hold(
    any_factory: sessionmaker[Any], project_id: int
) -> None:
    # another organization's row and a missing one get the same refusal
    with any_factory() as session, as_organization("org_a"):
        session.add(Task(title="planted", project_id=project_id))
        with pytest.raises(CrossTenantWriteError) as refused:
            session.flush()
        session.rollback()
    assert "does not hold" in str(refused.value.reason)
    assert _task_count(any_factory) == len(TASKS)


def test_a_changed_reference_to_another_organizations_row_is_refused(
    session_factory: sessionmaker[Any],
) -> None:
    with session_factory() as session, as_organization("org_a"):
        task = session.get(Task, 1)
        assert task is not None
        task.parent_id = 2  # org_b's task
        with pytest.raises(CrossTenantWriteError):
            session.flush()
        session.rollback()
        task = session.get(Task, 1)
        assert task is not None
        task.project_id = 2  # org_b's project
        with pytest.raises(CrossTenantWriteError):
            session.commit()


def test_an_object_of_another_organization_cannot_be_related(
    session_factory: sessionmaker[Any],
) -> None:
    with session_factory() as session:
        with as_organization("org_b"):
            theirs = session.get(Project, 2)
        with as_organization("org_a"):
            session.add(Task(title="planted", project=theirs))
            with pytest.raises(CrossTenantWriteError):
                session.flush()
            session.rollback()
    assert _task_count(session_factory) == len(TASKS)


def test_references_to_own_and_new_rows_pass(any_factory: sessionmaker[Any]) -> None:
    with any_factory() as session, as_organization("org_a"):
        session.add(Task(title="by id", project_id=3))
        session.add(Task(title="child", project_id=1, parent_id=1))
        new_project = Project(id=40, name="new")  # a row of this very flush, named by id
        session.add_all([new_project, Task(title="on new", project_id=40)])
        session.add(Task(title="by object", project=Project(name="newer")))
        session.commit()
    assert _task_count(any_factory) == len(TASKS) + 4


_BULK_WRITES: dict[str, Any] = {
    "orm-bulk-insert": lambda s: s.execute(insert_task(), [{"title": "x", "project_id": 2}]),
    "values-insert": lambda s: s.execute(insert_task().values(title="x", project_id=2)),
    "bulk-update": lambda s: s.execute(update(Task).where(Task.id == 1).values(project_id=2)),
    "bulk-update-by-key": lambda s: s.execute(update(Task), [{"id": 1, "parent_id": 2}]),
    "legacy-bulk": lambda s: s.bulk_insert_mappings(Task, [{"title": "x", "project_id": 2}]),
}


def insert_task() -> Any:
    """An ORM ``insert(Task)`` (the generic one: the SQLite dialect's is imported above)."""
    from sqlalchemy import insert as orm_insert

    return orm_insert(Task)


@pytest.mark.parametrize("write", list(_BULK_WRITES))
def test_bulk_writes_cannot_name_rows_the_organization_does_not_hold(
    session_factory: sessionmaker[Any], write: str
) -> None:
    with session_factory() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            _BULK_WRITES[write](session)
        session.rollback()
        session.execute(insert_task().values(title="own", project_id=3))
        session.execute(update(Task).where(Task.id == 1).values(parent_id=None, project_id=3))
        session.commit()
    with session_factory() as session:
        rows = session.execute(text("SELECT id, project_id FROM p7_tasks ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [(1, 3), (2, 2), (3, 3)]


# -- rows an app's own before_flush listener adds ---------------------------------------


def test_rows_added_by_a_later_flush_listener_are_stamped_and_checked(
    session_factory: sessionmaker[Any],
) -> None:
    copies: list[str] = []

    def audit(session: Any, _context: Any, _instances: Any) -> None:
        for obj in list(session.new):
            if isinstance(obj, Task):
                session.add(AuditRow(entity=f"task:{obj.title}"))
                for organization in copies:
                    session.add(AuditRow(entity="copy", organization_id=organization))

    event.listen(session_factory, "before_flush", audit)  # after enable_tenant_scoping
    try:
        with session_factory() as session, as_organization("org_a"):
            session.add(Task(title="t", project_id=1))
            session.commit()
            copies.append("org_b")
            session.add(Task(title="u", project_id=1))
            with pytest.raises(CrossTenantWriteError):
                session.commit()
    finally:
        event.remove(session_factory, "before_flush", audit)
    with session_factory() as session:
        rows = session.execute(text("SELECT organization_id, entity FROM p7_audit")).all()
    assert [tuple(row) for row in rows] == [("org_a", "task:t")]


# -- pass nineteen: what the reference check saw only after the flush ----------------


def _count(factory: sessionmaker[Any], sql: str) -> int:
    with factory() as session:
        return int(session.execute(text(sql)).scalar_one())


def _add_to_their_project(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Project, 2)
    with as_organization("org_a"):
        theirs.notes.append(Note(body="planted"))
        session.commit()


def _add_to_their_task(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Task, 2)
    with as_organization("org_a"):
        theirs.children.append(Task(title="planted", project_id=1))
        session.commit()


def _link_their_tag(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.get(Tag, 2)
    with as_organization("org_a"):
        mine = session.get(Task, 1)
        mine.tags.append(theirs)
        session.commit()


def _link_to_their_tag_unloaded(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.scalars(select(Tag).options(load_only(Tag.label))).one()
    with as_organization("org_a"):
        mine = session.get(Task, 1)
        mine.tags.append(theirs)
        session.commit()


def _relate_unloaded(session: Any) -> None:
    with as_organization("org_b"):
        theirs = session.scalars(select(Project).options(load_only(Project.name))).one()
    with as_organization("org_a"):
        session.add(Task(title="planted", project=theirs))
        session.commit()


def _relate_detached(session: Any) -> None:
    theirs = Project(id=2)
    make_transient_to_detached(theirs)
    with as_organization("org_a"):
        session.add(theirs)
        session.add(Task(title="planted", project=theirs))
        session.commit()


@pytest.mark.parametrize(
    "write",
    [
        _add_to_their_project,
        _add_to_their_task,
        _link_their_tag,
        _link_to_their_tag_unloaded,
        _relate_unloaded,
        _relate_detached,
    ],
)
def test_keys_filled_in_by_the_flush_cannot_name_another_organizations_row(
    any_factory: sessionmaker[Any], write: Any
) -> None:
    with any_factory() as session, pytest.raises(CrossTenantWriteError):
        write(session)
    assert _count(any_factory, "SELECT count(*) FROM p7_notes") == 0
    assert _count(any_factory, "SELECT count(*) FROM p7_tasks") == len(TASKS)
    assert _count(any_factory, "SELECT count(*) FROM p7_task_tags") == 0


def test_own_collections_and_links_pass(any_factory: sessionmaker[Any]) -> None:
    with any_factory() as session, as_organization("org_a"):
        project = session.get(Project, 1)
        project.notes.append(Note(body="mine"))
        mine = session.get(Task, 1)
        mine.children.append(Task(title="child", project_id=1))
        mine.tags.append(session.get(Tag, 1))
        mine.tags.append(Tag(label="new"))
        session.commit()
    assert _count(any_factory, "SELECT count(*) FROM p7_notes WHERE project_id = 1") == 1
    assert _count(any_factory, "SELECT count(*) FROM p7_task_tags") == 2


def _flush_literal(session: Any) -> None:
    task = session.get(Task, 1)
    task.project_id = literal(2)
    session.flush()


_EXPRESSION_WRITES: dict[str, Any] = {
    "flush-literal": _flush_literal,
    "update-cast": lambda s: s.execute(
        update(Task).where(Task.id == 1).values(project_id=cast("2", Integer))
    ),
    "update-bindparam": lambda s: s.execute(
        update(Task).where(Task.id == 1).values(project_id=bindparam("pid", 1)), {"pid": 2}
    ),
}


@pytest.mark.parametrize("write", list(_EXPRESSION_WRITES))
def test_keys_written_as_sql_expressions_are_refused(
    any_factory: sessionmaker[Any], write: str
) -> None:
    with any_factory() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            _EXPRESSION_WRITES[write](session)
        session.rollback()
    assert _count(any_factory, "SELECT project_id FROM p7_tasks WHERE id = 1") == 1


@pytest.mark.parametrize("change", ["parent_id", "organization_id"])
def test_a_later_listener_changing_checked_rows_is_refused(
    session_factory: sessionmaker[Any], change: str
) -> None:
    def meddle(session: Any, _context: Any, _instances: Any) -> None:
        for obj in session.new:
            if isinstance(obj, Task):
                setattr(obj, change, 2 if change == "parent_id" else "org_b")

    event.listen(session_factory, "before_flush", meddle)
    try:
        with session_factory() as session, as_organization("org_a"):
            session.add(Task(title="t", project_id=1))
            with pytest.raises(CrossTenantWriteError):
                session.commit()
    finally:
        event.remove(session_factory, "before_flush", meddle)
    assert _count(session_factory, "SELECT count(*) FROM p7_tasks") == len(TASKS)


def test_keys_given_as_strings_name_the_rows_they_spell(
    any_factory: sessionmaker[Any],
) -> None:
    with any_factory() as session, as_organization("org_a"):
        session.add(Task(title="by string", project_id="3"))
        session.add_all([Project(id=41, name="new"), Task(title="x", project_id="41")])
        session.commit()
        session.add(Task(title="theirs", project_id="2"))
        with pytest.raises(CrossTenantWriteError):
            session.flush()


def test_bulk_save_objects_checks_references_once_per_class(
    session_factory: sessionmaker[Any],
) -> None:
    selects: list[str] = []
    engine = session_factory.kw["bind"]

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_factory() as session, as_organization("org_a"):
            session.bulk_save_objects([Task(title=f"t{i}", project_id=1) for i in range(50)])
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len([q for q in selects if "p7_projects" in q]) == 1


# -- blocks left open by jobs outside requests ------------------------------------------


def _block_left_open(organization: str, kept: list[Any]) -> None:
    def body() -> Iterator[None]:
        with as_organization(organization):
            yield
            yield

    block = body()
    next(block)  # inside the block, suspended
    kept.append(block)


def test_a_block_left_open_by_a_job_does_not_scope_the_next_job() -> None:
    app = Flask("p7-jobs")
    kept: list[Any] = []
    with app.app_context():  # job 1, its own application context
        _block_left_open("org_b", kept)
        assert current_organization_id() == "org_b"
    with app.app_context(), pytest.raises(TenantContextError):  # job 2
        current_organization_id()
    for block in kept:
        block.close()


def test_a_block_finished_late_does_not_end_the_active_block() -> None:
    kept: list[Any] = []
    _block_left_open("org_b", kept)
    with as_organization("org_c"):
        kept.pop().close()  # the left-open block finishes inside another one
        assert current_organization_id() == "org_c"
    with pytest.raises(TenantContextError):
        current_organization_id()


async def _job_seeing(started: asyncio.Event, go: asyncio.Event) -> tuple[str, str]:
    at_start = current_organization_id()
    started.set()
    await go.wait()
    return at_start, current_organization_id()


async def _task_outliving_its_block(organization: str) -> tuple[str, str]:
    started, go = asyncio.Event(), asyncio.Event()
    with as_organization(organization):
        task = asyncio.create_task(_job_seeing(started, go))
        await started.wait()
    go.set()  # the block has ended; the task goes on
    return await task


def test_a_task_created_in_a_block_keeps_it_after_the_block_ends() -> None:
    """docs/tenancy.rst: a task created in a block keeps it after the block
    ends. It fell back to the enclosing identity instead (in a request of
    org_a, a job started for org_b read and stamped org_a's rows)."""
    assert asyncio.run(_task_outliving_its_block("org_b")) == ("org_b", "org_b")
    with as_organization("org_a"):
        assert asyncio.run(_task_outliving_its_block("org_b")) == ("org_b", "org_b")
        assert current_organization_id() == "org_a"


def test_a_task_created_in_a_block_of_a_request_keeps_it() -> None:
    issuer = TokenIssuer(issuer="https://issuer.example.test", audience="api")
    app = Flask("p7-task")
    app.config.update(**issuer.config(audience="api"))
    OAuthVerify(app)

    @app.get("/act-as")
    @require_organization
    async def act_as() -> dict[str, Any]:
        seen = await _task_outliving_its_block("org_b")
        return {"job": list(seen), "view": current_organization_id()}

    token = issuer.mint(organization_id="org_a")
    answer = app.test_client().get("/act-as", headers=auth_header(token))
    assert answer.json == {"job": ["org_b", "org_b"], "view": "org_a"}
