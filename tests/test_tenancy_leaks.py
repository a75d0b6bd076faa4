"""Regression tests for leaks found by red-teaming automatic tenant scoping.

Each test drives a real SQLite database through a session with automatic
scoping on, acting for ``org_a`` against rows of ``org_b``, and checks the
stored rows afterwards with a plain, unscoped connection.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, event, func, insert, select, text
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    make_transient_to_detached,
    mapped_column,
    relationship,
    sessionmaker,
    synonym,
)
from sqlalchemy.pool import StaticPool

from flask_oauth_verify.tenancy import (
    BYPASS_OPTION,
    CrossTenantWriteError,
    TenantScoping,
    TenantScopingError,
    as_organization,
    enable_tenant_scoping,
    org_scoped,
)


class LeakBase(DeclarativeBase):
    pass


class Plan(LeakBase):
    """Shared: no organization column."""

    __tablename__ = "lk_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Project(LeakBase):
    __tablename__ = "lk_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    secret: Mapped[str] = mapped_column(String(50), default="")
    tenant = synonym("organization_id")


class Task(LeakBase):
    __tablename__ = "lk_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    project_id: Mapped[int] = mapped_column(ForeignKey("lk_projects.id"))
    title: Mapped[str | None] = mapped_column(String(50))
    done: Mapped[int] = mapped_column(default=0)
    project: Mapped[Project] = relationship()


TABLES = LeakBase.metadata.tables
PROJECTS = [
    (1, "org_a", "A-one", "a-secret"),
    (2, "org_b", "B-two", "B-SECRET-2"),
    (3, "org_b", "B-three", "B-SECRET-3"),
]
#: task 3 is org_a's task on org_b's project 3 (a cross-organization reference)
TASKS = [(1, "org_a", 1, "a-task"), (2, "org_b", 2, "b-task"), (3, "org_a", 3, "a-trap")]


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    LeakBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(TABLES["lk_plans"]), [{"id": 1, "name": "free"}])
        connection.execute(
            insert(TABLES["lk_projects"]),
            [
                dict(zip(("id", "organization_id", "name", "secret"), p, strict=True))
                for p in PROJECTS
            ],
        )
        connection.execute(
            insert(TABLES["lk_tasks"]),
            [
                dict(zip(("id", "organization_id", "project_id", "title"), t, strict=True))
                for t in TASKS
            ],
        )
    yield engine
    engine.dispose()


@pytest.fixture
def maker(engine: Engine) -> Iterator[sessionmaker[Session]]:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=LeakBase.registry)
    yield maker
    scoping.disable()


def stored(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` as stored, read without any scoping."""
    core = TABLES[table]
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(core).order_by(core.c.id))]


def stored_projects(engine: Engine) -> list[tuple[Any, ...]]:
    return stored(engine, "lk_projects")


def original_projects() -> list[tuple[Any, ...]]:
    return [tuple(p) for p in PROJECTS]


# -- F1: legacy bulk methods ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rows",
    [
        [{"id": 2, "name": "renamed-by-org_a"}],  # org_b's row, by primary key
        [{"id": 1, "name": "mine"}, {"id": 3, "name": "renamed-by-org_a"}],
        [{"id": 1, "organization_id": "org_b"}],  # moving own row away
        [{"id": 1, "organization_id": None}],
    ],
)
def test_bulk_update_mappings_cannot_touch_other_organizations(
    maker: sessionmaker[Session], engine: Engine, rows: list[dict[str, Any]]
) -> None:
    with maker() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            session.bulk_update_mappings(Project, rows)
        session.commit()
    assert stored_projects(engine) == original_projects()


def test_bulk_update_mappings_of_own_rows_still_work(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        session.bulk_update_mappings(Project, [{"id": 1, "name": "renamed"}])
        session.bulk_update_mappings(Plan, [{"id": 1, "name": "paid"}])
        session.commit()
    assert stored_projects(engine)[0] == (1, "org_a", "renamed", "a-secret")
    assert stored(engine, "lk_plans") == [(1, "paid")]


def test_bulk_insert_mappings_is_stamped_or_refused(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            session.bulk_insert_mappings(
                Project,
                [{"id": 7, "organization_id": "org_b", "name": "planted-in-org_b"}],
            )
        session.bulk_insert_mappings(Project, [{"id": 8, "name": "stamped"}])
        session.commit()
    assert stored_projects(engine)[3:] == [(8, "org_a", "stamped", "")]


def test_bulk_save_objects_is_checked_like_a_flush(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        taken = Project(id=3, organization_id="org_a", name="took-over", secret="")
        make_transient_to_detached(taken)
        with pytest.raises(CrossTenantWriteError):
            session.bulk_save_objects([taken], update_changed_only=False)
        with pytest.raises(CrossTenantWriteError):
            session.bulk_save_objects([Project(id=9, organization_id="org_b", name="planted")])
        own = Project(id=1, organization_id="org_a", name="renamed", secret="s")
        make_transient_to_detached(own)
        session.bulk_save_objects([own, Project(id=10, name="new")], update_changed_only=False)
        session.commit()
    assert stored_projects(engine) == [
        (1, "org_a", "renamed", "s"),
        *original_projects()[1:],
        (10, "org_a", "new", ""),
    ]


def test_bulk_methods_need_an_organization(maker: sessionmaker[Session]) -> None:
    with maker() as session, pytest.raises(Exception, match="as_organization"):
        session.bulk_update_mappings(Project, [{"id": 1, "name": "x"}])


def test_disable_restores_the_bulk_methods(engine: Engine) -> None:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=LeakBase.registry)
    scoping.disable()
    assert "bulk_update_mappings" not in vars(maker.class_)
    with maker() as session:
        session.bulk_update_mappings(Project, [{"id": 2, "name": "admin"}])
        session.commit()
    assert stored_projects(engine)[1][2] == "admin"


def test_bulk_methods_are_guarded_on_a_session_instance(engine: Engine) -> None:
    session = Session(engine)
    scoping: TenantScoping = enable_tenant_scoping(session, models=LeakBase.registry)
    try:
        with as_organization("org_a"), pytest.raises(CrossTenantWriteError):
            session.bulk_update_mappings(Project, [{"id": 2, "name": "x"}])
    finally:
        scoping.disable()
        session.close()
    assert "bulk_update_mappings" not in vars(session)
    assert stored_projects(engine) == original_projects()


def _logged(method: Any) -> Any:
    """A decorator written without functools.wraps: the wrapper is called "wrapper"."""

    def wrapper(self: Session, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    return wrapper


class WrappingSession(Session):
    bulk_insert_mappings = _logged(Session.bulk_insert_mappings)
    bulk_update_mappings = _logged(Session.bulk_update_mappings)


def test_bulk_mappings_are_guarded_by_the_name_they_are_called_by(engine: Engine) -> None:
    maker = sessionmaker(engine, class_=WrappingSession)
    scoping = enable_tenant_scoping(maker, models=LeakBase.registry)
    try:
        with maker() as session, as_organization("org_a"):
            with pytest.raises(CrossTenantWriteError):
                session.bulk_update_mappings(Project, [{"id": 2, "name": "taken by org_a"}])
            session.bulk_insert_mappings(Project, [{"id": 4, "name": "new", "secret": ""}])
            session.commit()
    finally:
        scoping.disable()
    assert stored_projects(engine) == [*original_projects(), (4, "org_a", "new", "")]


def test_bulk_mappings_fail_closed_without_sqlalchemys_row_expansion(
    maker: sessionmaker[Session], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the private helper that resolves synonyms, rows cannot be checked."""
    import sqlalchemy

    # as if a SQLAlchemy release had moved it: SQLAlchemy itself still works
    moved = types.ModuleType("sqlalchemy.orm.bulk_persistence")
    monkeypatch.setitem(sys.modules, "sqlalchemy.orm.bulk_persistence", moved)
    with maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError, match=re.escape(sqlalchemy.__version__)):
            session.bulk_update_mappings(Project, [{"id": 1, "tenant": "org_b"}])
        with pytest.raises(TenantScopingError, match="_expand_other_attrs"):
            session.bulk_insert_mappings(Project, [{"id": 4, "name": "x", "tenant": "org_b"}])
        session.commit()
    assert stored_projects(engine) == original_projects()


# -- F2: SQL expressions inside INSERTs and flushes --------------------------------------------


def test_subquery_in_insert_values_is_scoped(maker: sessionmaker[Session], engine: Engine) -> None:
    with maker() as session, as_organization("org_a"):
        for project_id in (1, 2):
            secret = select(Project.secret).where(Project.id == project_id).scalar_subquery()
            session.execute(insert(Task).values(id=50 + project_id, project_id=1, title=secret))
        session.commit()
    assert stored(engine, "lk_tasks")[3:] == [
        (51, "org_a", 1, "a-secret", 0),
        (52, "org_a", 1, None, 0),  # org_b's project 2 is not visible
    ]


def test_insert_from_select_into_a_shared_table_is_scoped(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        session.execute(
            insert(Plan).from_select(["id", "name"], select(Project.id + 100, Project.secret))
        )
        session.commit()
    assert stored(engine, "lk_plans") == [(1, "free"), (101, "a-secret")]


@pytest.mark.parametrize("new", [False, True])
def test_flushed_attribute_with_a_tenant_subquery_is_refused(
    maker: sessionmaker[Session], engine: Engine, new: bool
) -> None:
    with maker() as session, as_organization("org_a"):
        secret = select(Project.secret).where(Project.id == 3).scalar_subquery()
        if new:
            session.add(Task(id=60, project_id=1, title=secret))
        else:
            task = session.get(Task, 1)
            assert task is not None
            task.title = secret
        with pytest.raises(TenantScopingError, match="lk_projects"):
            session.flush()
        session.rollback()
    assert stored(engine, "lk_tasks") == [(*t, 0) for t in TASKS]


def test_flushed_expressions_on_the_rows_own_table_still_work(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        task = session.get(Task, 1)
        assert task is not None
        task.done = Task.done + 1
        plan = session.get(Plan, 1)
        assert plan is not None
        plan.name = select(Plan.name).where(Plan.id == 1).scalar_subquery()
        session.commit()
    assert stored(engine, "lk_tasks")[0] == (1, "org_a", 1, "a-task", 1)


def test_legacy_bulk_rows_with_a_tenant_subquery_are_refused(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    secret = select(Project.secret).where(Project.id == 2).scalar_subquery()
    with maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="lk_projects"):
            session.bulk_update_mappings(Plan, [{"id": 1, "name": secret}])
        with pytest.raises(TenantScopingError, match="lk_projects"):
            session.bulk_insert_mappings(Plan, [{"id": 2, "name": secret}])
        session.commit()
    assert stored(engine, "lk_plans") == [(1, "free")]


# -- F5: the identity map ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning")  # Query.get()
def test_identity_map_never_returns_another_organizations_object(
    maker: sessionmaker[Session],
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            kept = [session.get(Project, 2), session.get(Project, 3)]
            assert [p.organization_id for p in kept if p is not None] == ["org_b", "org_b"]
        with as_organization("org_a"):
            assert session.get(Project, 2) is None
            with pytest.raises(NoResultFound):
                session.get_one(Project, 2)
            assert session.query(Project).get(2) is None
            # a many-to-one whose target sits in the identity map: no SQL shortcut
            task = session.get(Task, 3)
            assert task is not None and task.project is None
            assert session.get(Project, 1) is not None  # own objects still come back
            admin = session.get(Project, 2, execution_options={BYPASS_OPTION: "test"})
            assert admin is kept[0]


def test_identity_map_judges_an_object_by_its_loaded_organization(
    maker: sessionmaker[Session],
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            theirs = session.get(Project, 2)
            assert theirs is not None
            theirs.organization_id = "org_a"  # in memory only, never flushed
        with as_organization("org_a"):
            with session.no_autoflush:
                assert session.get(Project, 2) is None
                task = session.get(Task, 2, execution_options={BYPASS_OPTION: "test"})
                assert task is not None and task.project is None  # many-to-one too
            with pytest.raises(CrossTenantWriteError):
                session.get(Project, 2)  # the autoflush refuses the move
            session.rollback()
        with as_organization("org_a"):
            mine = session.get(Project, 1)
            assert mine is not None
            mine.organization_id = "org_b"  # not flushed: still org_a's row
            with session.no_autoflush:
                assert session.get(Project, 1) is mine


def test_merge_into_another_organizations_object_is_refused(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            kept = session.get(Project, 2)
        with as_organization("org_a"), pytest.raises(CrossTenantWriteError):
            session.merge(Project(id=2, name="merged"))
        assert kept is not None
        session.rollback()
    assert stored_projects(engine) == original_projects()


# -- F7: load guard ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM lk_projects",
        "SELECT id, name, secret FROM lk_projects",  # leaves the organization out
        # a NULL in its place: every organization's rows loaded as of none
        "SELECT id, NULL AS organization_id, name, secret FROM lk_projects",
    ],
)
def test_from_statement_rows_must_carry_their_organization(
    maker: sessionmaker[Session], sql: str
) -> None:
    with maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="from_statement"):
            session.scalars(select(Project).from_statement(text(sql))).all()
        own = text("SELECT id, organization_id, name, secret FROM lk_projects WHERE id = 1")
        assert [p.id for p in session.scalars(select(Project).from_statement(own))] == [1]


# -- F8: the flush trusts no forged in-memory organization ---------------------------------------


@pytest.mark.parametrize("action", ["delete", "update"])
def test_forged_detached_object_cannot_write_another_organizations_row(
    maker: sessionmaker[Session], engine: Engine, action: str
) -> None:
    with maker() as session, as_organization("org_a"):
        forged = Project(id=3, organization_id="org_a", name="x", secret="")
        make_transient_to_detached(forged)
        session.add(forged)
        if action == "delete":
            session.delete(forged)
        else:
            forged.name = "renamed-by-org_a"
        with pytest.raises(CrossTenantWriteError):
            session.flush()
        session.rollback()
    assert stored_projects(engine) == original_projects()


def test_loaded_and_inserted_objects_are_written_without_a_check_query(
    maker: sessionmaker[Session], engine: Engine
) -> None:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with maker() as session, as_organization("org_a"):
            project = session.get(Project, 1)
            assert project is not None
            created = Project(id=11, name="new")
            session.add(created)
            session.flush()
            statements.clear()
            project.name = "renamed"
            created.name = "renamed too"
            session.flush()
            assert all(s.startswith("UPDATE") for s in statements), statements
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with maker() as session, as_organization("org_a"):
        detached = Project(id=1, organization_id="org_a", name="from a form", secret="")
        make_transient_to_detached(detached)
        session.add(detached)
        detached.name = "from a form!"
        session.commit()  # checked in the database, and it is org_a's row
    assert stored_projects(engine)[0] == (1, "org_a", "from a form!", "a-secret")


# -- F6: org_scoped() marks only the tables it compared -------------------------------------------


def test_org_scoped_core_statement_must_scope_every_tenant_table(
    maker: sessionmaker[Session],
) -> None:
    projects, tasks = TABLES["lk_projects"], TABLES["lk_tasks"]
    joined = select(projects.c.name, tasks.c.title, tasks.c.organization_id).join(
        tasks, tasks.c.project_id == projects.c.id
    )
    count_all = select(func.count()).select_from(tasks).correlate(None).scalar_subquery()
    with maker() as session, as_organization("org_a"):
        for statement in (org_scoped(joined), org_scoped(select(projects.c.name, count_all))):
            with pytest.raises(TenantScopingError, match="lk_tasks"):
                session.execute(statement)
        both = org_scoped(org_scoped(joined), tasks.c.organization_id)
        assert session.execute(both).all() == [("A-one", "a-task", "org_a")]
        alone = org_scoped(select(projects.c.id).order_by(projects.c.id))
        assert session.scalars(alone).all() == [1]


def test_org_scoped_core_statement_must_scope_every_alias(
    maker: sessionmaker[Session],
) -> None:
    projects = TABLES["lk_projects"]
    p2 = projects.alias("p2")
    others = select(projects.c.name, p2.c.secret).join(p2, p2.c.id != projects.c.id)
    with maker() as session, as_organization("org_a"):
        for statement in (
            org_scoped(others),  # the alias resolves to the table it aliases
            org_scoped(others, projects.c.organization_id),
            org_scoped(select(p2.c.secret), projects.c.organization_id),  # alias only
            org_scoped(select(projects.c.secret), projects.c.name),  # not the column
        ):
            with pytest.raises(TenantScopingError, match="did not compare"):
                session.execute(statement)
        same = select(projects.c.name, p2.c.secret).join(p2, p2.c.id == projects.c.id)
        both = org_scoped(org_scoped(same), p2.c.organization_id)
        assert session.execute(both).all() == [("A-one", "a-secret")]


def test_org_scoped_subqueries_and_ctes_pass_when_scoped_themselves(
    maker: sessionmaker[Session],
) -> None:
    projects, tasks = TABLES["lk_projects"], TABLES["lk_tasks"]
    with as_organization("org_b"):
        theirs = org_scoped(select(tasks.c.project_id)).scalar_subquery()
    with maker() as session, as_organization("org_a"):
        mine = org_scoped(select(tasks.c.project_id)).scalar_subquery()
        statement = org_scoped(select(projects.c.name).where(projects.c.id.in_(mine)))
        assert session.execute(statement).all() == [("A-one",)]
        cte = org_scoped(select(projects.c.id, projects.c.secret)).cte("c")
        joined = select(projects.c.name, cte.c.secret).join(cte, cte.c.id == projects.c.id)
        assert session.execute(org_scoped(joined)).all() == [("A-one", "a-secret")]
        unscoped_cte = select(projects.c.id, projects.c.secret).cte("u")
        refused = [
            select(projects.c.name).where(projects.c.id.in_(select(tasks.c.project_id))),
            select(projects.c.name, unscoped_cte.c.secret).join(
                unscoped_cte, unscoped_cte.c.id != projects.c.id
            ),
        ]
        for statement in refused:
            with pytest.raises(TenantScopingError, match="did not compare"):
                session.execute(org_scoped(statement))
        with pytest.raises(TenantScopingError, match="cannot be scoped"):
            session.execute(org_scoped(select(projects.c.name).where(projects.c.id.in_(theirs))))


def test_org_scoped_core_verdict_is_per_organization(maker: sessionmaker[Session]) -> None:
    """The verdict is remembered per statement; the organization is checked every time."""
    projects = TABLES["lk_projects"]
    with maker() as session:
        with as_organization("org_a"):
            statement = org_scoped(select(projects.c.secret))
            assert session.scalars(statement).all() == ["a-secret"]
            assert session.scalars(statement).all() == ["a-secret"]
        with as_organization("org_b"), pytest.raises(TenantScopingError, match="cannot be"):
            session.execute(statement)


# -- joined-table inheritance, the column on the subclass table only --------------------------


class InheritBase(DeclarativeBase):
    pass


class Doc(InheritBase):
    __tablename__ = "lk_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    title: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "doc"}  # noqa: RUF012


class TenantDoc(Doc):
    __tablename__ = "lk_tenant_docs"
    id: Mapped[int] = mapped_column(ForeignKey("lk_docs.id"), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "tdoc"}  # noqa: RUF012


def test_base_class_of_a_subclass_only_tenant_column_is_refused(engine: Engine) -> None:
    InheritBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                TenantDoc(id=1, title="A doc", organization_id="org_a"),
                TenantDoc(id=2, title="org_b secret title", organization_id="org_b"),
            ]
        )
        session.commit()
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=InheritBase.registry)
    try:
        with maker() as session, as_organization("org_a"):
            assert [d.id for d in session.scalars(select(TenantDoc))] == [1]
            with pytest.raises(TenantScopingError, match="subclass table"):
                session.scalars(select(Doc)).all()
            with pytest.raises(TenantScopingError, match="subclass table"):
                session.get(Doc, 2)
    finally:
        scoping.disable()
