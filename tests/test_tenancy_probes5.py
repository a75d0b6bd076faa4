"""Regression tests of the fifth tenant-leak red-team pass.

A shared object's aggregate over a tenant table (``column_property()``,
``deferred()``, ``query_expression()``) kept the value of the organization
that loaded it after the session switched organization; SQLAlchemy 2.0 left
the ``EXISTS`` of ``relationship.any()`` / ``exists().where(...)`` unscoped
and kept ``ordered_values()`` where the write guard did not look; and
``select(exists().where(Model.x == ...))`` was refused as a Core statement.
Real SQLite and PostgreSQL databases.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import sqlalchemy.orm.bulk_persistence
from sqlalchemy import (
    Engine,
    ForeignKey,
    String,
    Table,
    and_,
    create_engine,
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
    column_property,
    mapped_column,
    query_expression,
    relationship,
    sessionmaker,
    with_expression,
)
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import StaticPool

from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    _require_sqlalchemy,
    as_organization,
    enable_tenant_scoping,
    org_scoped,
)


class ProbeBase(DeclarativeBase):
    pass


class Project(ProbeBase):
    __tablename__ = "p5_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    plan_id: Mapped[int] = mapped_column(ForeignKey("p5_plans.id"))
    plan: Mapped[Plan] = relationship(back_populates="projects")
    tasks: Mapped[list[Task]] = relationship(back_populates="project")


class Task(ProbeBase):
    __tablename__ = "p5_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(50))
    project_id: Mapped[int] = mapped_column(ForeignKey("p5_projects.id"))
    project: Mapped[Project] = relationship(back_populates="tasks")


def _of_plan(aggregate: Any, plan_id: Any) -> Any:
    """A correlated subquery of ``aggregate`` over the plan's projects."""
    return (
        select(aggregate)
        .where(Project.plan_id == plan_id)
        .correlate_except(Project)
        .scalar_subquery()
    )


class Plan(ProbeBase):
    """Shared by every organization (no organization column), with tenant aggregates."""

    __tablename__ = "p5_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    projects: Mapped[list[Project]] = relationship(back_populates="plan", order_by=Project.id)
    project_count: Mapped[int] = column_property(_of_plan(func.count(Project.id), id))
    top_project: Mapped[str | None] = column_property(
        _of_plan(func.max(Project.name), id), deferred=True
    )
    annotated: Mapped[str | None] = query_expression()


def table_of(model: Any) -> Table:
    """The model's table, typed as one."""
    return cast(Table, model.__table__)


SECRET = "B-SECRET"
# org_a: project 1; org_b: projects 2 and 3; org_b's task on org_a's project 1
PROJECTS = [(1, "org_a", "a-one"), (2, "org_b", "B-SECRET-1"), (3, "org_b", "B-SECRET-2")]
TASKS = [(1, "org_b", "B-SECRET-task", 1), (2, "org_a", "a-task", 1)]


def _engine(request: pytest.FixtureRequest, dialect: str) -> Iterator[Engine]:
    schema = None
    if dialect == "sqlite":
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        url = request.getfixturevalue("postgres_url")
        schema = f"ovt_p5_{uuid.uuid4().hex[:10]}"
        engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    ProbeBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(table_of(Plan)), [{"id": 1, "name": "shared"}])
        connection.execute(
            insert(table_of(Project)),
            [{"id": i, "organization_id": o, "name": n, "plan_id": 1} for i, o, n in PROJECTS],
        )
        connection.execute(
            insert(table_of(Task)),
            [{"id": i, "organization_id": o, "title": t, "project_id": p} for i, o, t, p in TASKS],
        )
    yield engine
    if schema is not None:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _engine(request, request.param)


@pytest.fixture
def maker(engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=ProbeBase.registry)
    yield maker
    scoping.disable()


def stored(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(text(sql)))


def _top_name_for_org() -> Any:
    """A ``with_expression()`` subquery scoped by hand (allowed by automatic scoping)."""
    names = select(func.max(Project.name)).where(Project.plan_id == Plan.id)
    return org_scoped(names, Project.organization_id).scalar_subquery()


# -- a shared object's aggregates after an organization switch ------------------


def _plan_as_seen(plan: Plan) -> tuple[Any, ...]:
    return (plan.project_count, plan.top_project, plan.annotated, [p.name for p in plan.projects])


def test_a_shared_objects_aggregates_are_reloaded_after_an_organization_switch(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            plan = session.get(Plan, 1)
            assert plan is not None
            assert _plan_as_seen(plan) == (2, "B-SECRET-2", None, ["B-SECRET-1", "B-SECRET-2"])
            again = session.scalars(
                select(Plan).options(with_expression(Plan.annotated, _top_name_for_org()))
            ).one()
            assert again is plan and plan.annotated == "B-SECRET-2"
        with as_organization("org_a"):
            found = session.get(Plan, 1)  # an identity-map hit: no SQL
            assert found is plan
            state = sqlalchemy.inspect(plan)
            # plain columns of the shared table stay loaded: the same for everyone
            assert "name" not in state.unloaded
            assert {"project_count", "top_project", "annotated", "projects"} <= state.unloaded
            reloaded = session.scalars(select(Plan)).one()
            assert reloaded is plan
            # reloaded for org_a; the query expression, not asked for, is gone
            assert _plan_as_seen(plan) == (1, "a-one", None, ["a-one"])


def test_refreshing_an_object_loaded_with_another_organizations_expression_is_refused(
    maker: sessionmaker[OrmSession],
) -> None:
    """SQLAlchemy refreshes with the options of the load: never org_b's subquery for org_a."""
    with maker() as session:
        with as_organization("org_b"):
            plan = session.scalars(
                select(Plan).options(with_expression(Plan.annotated, _top_name_for_org()))
            ).one()
            assert plan.annotated == "B-SECRET-2"
        with as_organization("org_a"):
            assert session.get(Plan, 1) is plan
            with pytest.raises(TenantScopingError, match="another organization"):
                _plan_as_seen(plan)


def test_a_select_after_an_organization_switch_reloads_a_shared_objects_aggregates(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            plan = session.scalars(select(Plan)).one()
            assert (plan.project_count, plan.top_project) == (2, "B-SECRET-2")
        with as_organization("org_a"):
            again = session.scalars(select(Plan)).one()
            assert again is plan
            assert (again.project_count, again.top_project) == (1, "a-one")
            annotated = session.scalars(
                select(Plan).options(with_expression(Plan.annotated, _top_name_for_org()))
            ).one()
            assert annotated.annotated == "a-one"


def test_tenant_objects_of_the_previous_organization_are_not_returned(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            theirs = session.get(Project, 2)
            assert theirs is not None and theirs.name == "B-SECRET-1"
            assert [t.title for t in session.scalars(select(Task))] == ["B-SECRET-task"]
        with as_organization("org_a"):
            assert session.get(Project, 2) is None
            assert session.scalars(select(Project.name)).all() == ["a-one"]
            assert [p.name for p in session.scalars(select(Project))] == ["a-one"]
            own = session.get(Project, 1)
            assert own is not None
            assert [t.title for t in own.tasks] == ["a-task"]


def test_unflushed_changes_of_a_shared_object_survive_an_organization_switch(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    with maker() as session:
        with as_organization("org_b"):
            plan = session.get(Plan, 1)
            assert plan is not None and plan.project_count == 2
            plan.name = "renamed"
        with as_organization("org_a"), session.no_autoflush:
            assert session.get(Plan, 1) is plan
            assert plan.name == "renamed"
            assert plan.project_count == 1
            session.commit()
    assert stored(engine, "SELECT name FROM p5_plans") == [("renamed",)]


# -- SQLAlchemy versions, ordered values, the legacy bulk methods ---------------


@pytest.mark.parametrize("version", ["2.0.58", "2.0.0", "1.4.54", "2.0.0b4", "garbage"])
def test_a_sqlalchemy_release_before_2_1_is_refused(version: str) -> None:
    with pytest.raises(ImportError, match=r"SQLAlchemy 2\.1 or later"):
        _require_sqlalchemy(version)


@pytest.mark.parametrize("version", ["2.1.0", "2.1.9", "2.1.0b1", "2.2.0", "3.0.0"])
def test_sqlalchemy_2_1_and_later_are_accepted(version: str) -> None:
    _require_sqlalchemy(version)


def test_importing_tenancy_with_sqlalchemy_2_0_fails() -> None:
    """At import, in a fresh interpreter: nothing runs unscoped on SQLAlchemy 2.0."""
    code = (
        "import sqlalchemy\nsqlalchemy.__version__ = '2.0.58'\nimport flask_oauth_verify.tenancy\n"
    )
    ran = subprocess.run(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode != 0
    assert "ImportError: flask_oauth_verify.tenancy needs SQLAlchemy 2.1 or later" in ran.stderr
    helper = (
        "import sqlalchemy\nsqlalchemy.__version__ = '2.0.58'\n"
        "from flask_oauth_verify import org_scoped\norg_scoped(None)\n"
    )
    ran = subprocess.run(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", helper], capture_output=True, text=True, timeout=60, check=False
    )
    assert "org_scoped() needs SQLAlchemy 2.1 or later" in ran.stderr
    assert "not 2.0.58" in ran.stderr, "the helper's error names the release found"


ORDERED_WRITES: dict[str, Callable[[OrmSession], Any]] = {
    "ordered_values()": lambda session: session.execute(
        update(Project).where(Project.id == 1).ordered_values((Project.organization_id, "org_b"))
    ),
    "preserve_parameter_order": lambda session: (
        session.query(Project)
        .filter(Project.id == 1)
        .update(
            [(Project.organization_id, "org_b")],  # type: ignore[arg-type]
            update_args={"preserve_parameter_order": True},
        )
    ),
}


@pytest.mark.parametrize("write", list(ORDERED_WRITES.values()), ids=list(ORDERED_WRITES))
def test_ordered_values_to_another_organization_are_refused(
    maker: sessionmaker[OrmSession], engine: Engine, write: Callable[[OrmSession], Any]
) -> None:
    with maker() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            write(session)
        session.rollback()
    assert stored(engine, "SELECT id, organization_id FROM p5_projects") == [
        (i, o) for i, o, _n in PROJECTS
    ]


def test_values_kept_in_order_apart_from_values_are_checked(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    """SQLAlchemy 2.0 keeps ``ordered_values()`` in ``_ordered_values``, not ``_values``."""
    statement = update(Project).where(Project.id == 1)
    statement._ordered_values = [(Project.organization_id, "org_b")]  # type: ignore[attr-defined]
    with maker() as session, as_organization("org_a"):
        with pytest.raises(CrossTenantWriteError):
            session.execute(statement)
        session.rollback()
    assert stored(engine, "SELECT organization_id FROM p5_projects WHERE id = 1") == [("org_a",)]


def test_bulk_methods_without_sqlalchemys_helper_are_refused_naming_the_way_out(
    maker: sessionmaker[OrmSession], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(sqlalchemy.orm.bulk_persistence, "_expand_other_attrs")
    with maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError) as refused:
            session.bulk_insert_mappings(Project, [{"id": 9, "name": "n", "plan_id": 1}])
        session.rollback()
    message = str(refused.value)
    assert "session.execute(insert(...))" in message
    assert "2.0 or 2.1" not in message
    assert len(stored(engine, "SELECT id FROM p5_projects")) == len(PROJECTS)


# -- the "does it exist" idiom ------------------------------------------------------

PA = aliased(Project)

#: select(<EXISTS of ORM attributes>): (statement, org_a's answer)
EXISTS_IDIOMS: dict[str, tuple[Callable[[], Any], bool]] = {
    "exists() of B's": (lambda: select(exists().where(Project.name == "B-SECRET-1")), False),
    "exists() of own": (lambda: select(exists().where(Project.name == "a-one")), True),
    "not exists() of B's": (lambda: select(~exists().where(Project.name == "B-SECRET-1")), True),
    "exists() like": (lambda: select(exists().where(Project.name.like("B-S%"))), False),
    "exists() of an alias": (lambda: select(exists().where(PA.name == "B-SECRET-1")), False),
    "exists() of own alias": (lambda: select(exists().where(PA.name == "a-one")), True),
    "any() of B's": (lambda: select(Plan.projects.any(Project.name == "B-SECRET-1")), False),
    "any() of own": (lambda: select(Plan.projects.any(Project.name == "a-one")), True),
    "any()": (lambda: select(Plan.projects.any()), True),
    "task exists() of B's": (lambda: select(exists().where(Task.title == "B-SECRET-task")), False),
    "nested exists()": (
        lambda: select(
            exists().where(Project.name == "a-one", exists().where(Task.project_id == Project.id))
        ),
        True,
    ),
}


@pytest.mark.parametrize(("build", "answer"), list(EXISTS_IDIOMS.values()), ids=list(EXISTS_IDIOMS))
def test_the_exists_idiom_is_scoped(
    maker: sessionmaker[OrmSession], build: Callable[[], Any], answer: bool
) -> None:
    with maker() as session, as_organization("org_a"):
        assert session.scalar(build()) is answer


def test_the_exists_idiom_answers_per_organization(maker: sessionmaker[OrmSession]) -> None:
    question = select(exists().where(Project.name == "B-SECRET-1"))
    with maker() as session:
        with as_organization("org_a"):
            assert session.scalar(question) is False
        with as_organization("org_b"):
            assert session.scalar(question) is True


#: spellings whose tenant table SQLAlchemy would not scope: still refused
EXISTS_REFUSED: dict[str, Callable[[], Any]] = {
    "inside a function": lambda: select(exists().where(func.lower(Project.name) == "b-secret-1")),
    "a Table column": lambda: select(exists().where(table_of(Project).c.name == "B-SECRET-1")),
    "a Table alias": lambda: select(
        exists().where(Project.name == table_of(Project).alias("p2").c.name)
    ),
    "any() correlated to a tenant table": lambda: select(
        Project.tasks.any(Task.title == "B-SECRET-task")
    ),
    "has()": lambda: select(Project.plan.has(Plan.name == "shared")),
}


@pytest.mark.parametrize("build", list(EXISTS_REFUSED.values()), ids=list(EXISTS_REFUSED))
def test_an_exists_that_scoping_cannot_reach_is_still_refused(
    maker: sessionmaker[OrmSession], build: Callable[[], Any]
) -> None:
    refused = pytest.raises(TenantScopingError, match="Core statement")
    with maker() as session, as_organization("org_a"), refused:
        session.scalar(build())


# -- ORM statements where SQLAlchemy's loader criteria cannot reach -----------------

_SUB = select(literal(1).label("x")).where(func.lower(Project.name) == "b-secret-1")
_CORRELATED_IN_FROM = (
    select(Plan.id.label("pid"))
    .where(func.lower(Project.name) == "b-secret-1")
    .correlate(Project)
    .subquery()
)

#: ORM statements reading a tenant table where SQLAlchemy adds no criterion
#: (only inside a function, a Core subquery, a has() correlated to a tenant
#: table, a derived table or CTE without the entity): each read every
#: organization's rows before
UNREACHED: dict[str, Callable[[], Any]] = {
    "count of a function": lambda: select(func.count()).where(
        func.lower(Project.name) == "b-secret-1"
    ),
    "exists() of a function": lambda: select(Plan.id).where(
        exists().where(func.lower(Project.name) == "b-secret-1")
    ),
    "exists() of nested and_/or_": lambda: select(Plan.id).where(
        exists().where(and_(Project.name == "B-SECRET-1", or_(Project.id > 1, Project.id < 0)))
    ),
    "scalar count of a function": lambda: select(
        Plan.id,
        select(func.count()).where(func.lower(Project.name) == "b-secret-1").scalar_subquery(),
    ),
    "has() correlated to a tenant table": lambda: select(Plan.id).where(
        Project.plan.has(Plan.id == 1)
    ),
    "exists() of a function under the same entity": lambda: select(Project.id).where(
        exists().where(func.lower(Project.name) == "b-secret-1")
    ),
    "scalar count under the same entity": lambda: select(
        Project.id,
        select(func.count()).where(func.lower(Project.name).like("b-secret%")).scalar_subquery(),
    ),
    "HAVING": lambda: (
        select(Project.plan_id)
        .group_by(Project.plan_id)
        .having(exists().where(func.lower(Project.name) == "b-secret-1"))
    ),
    "two levels down": lambda: select(Project.id).where(
        exists().where(
            Plan.id == Project.plan_id,
            exists().where(func.lower(Project.name) == "b-secret-1"),
        )
    ),
    "UPDATE by another organization's rows": lambda: (
        update(Project)
        .where(exists().where(func.lower(Project.name) == "b-secret-1"))
        .values(name="PWNED")
    ),
    "a subquery below one that correlates the table away": lambda: select(Project.id).where(
        exists(
            select(Task.id)
            .where(Task.project_id == Project.id)
            .where(exists(select(Plan.id).where(func.lower(Project.name) == "b-secret-1")))
        )
    ),
    "INSERT VALUES from a subquery": lambda: insert(Project).values(
        id=9,
        plan_id=1,
        name=select(func.max(Plan.name))
        .where(func.lower(Project.name).like("b-secret%"))
        .scalar_subquery(),
    ),
    "correlate() from a FROM subquery to a table its SELECT renders": lambda: select(
        Project.id
    ).where(exists(select(Project.id).join(_CORRELATED_IN_FROM, true()))),
    "a derived table": lambda: select(Project.id, _SUB.subquery().c.x),
    "a CTE": lambda: select(Project.id, _SUB.cte().c.x),
}


@pytest.mark.parametrize("build", list(UNREACHED.values()), ids=list(UNREACHED))
def test_an_orm_statement_the_criteria_cannot_reach_is_refused(
    engine: Engine, maker: sessionmaker[OrmSession], build: Callable[[], Any]
) -> None:
    refused = pytest.raises(TenantScopingError, match="cannot reach")
    with maker() as session, as_organization("org_a"), refused:
        session.execute(build()).all()
    assert stored(engine, "SELECT id, organization_id, name FROM p5_projects") == PROJECTS


#: the same questions spelled where SQLAlchemy finds the entity: (statement,
#: org_a's rows)
REACHED: dict[str, tuple[Callable[[], Any], list[tuple[Any, ...]]]] = {
    "count of the entity's column": (lambda: select(func.count(Project.id)), [(1,)]),
    "count with select_from": (
        lambda: (
            select(func.count())
            .select_from(Project)
            .where(func.lower(Project.name) == "b-secret-1")
        ),
        [(0,)],
    ),
    "the entity among the columns": (
        lambda: select(Project.id).where(func.lower(Project.name) == "a-one"),
        [(1,)],
    ),
    "exists() with the entity's column": (
        lambda: (
            select(Plan.id)
            .where(select(Project.id).where(func.lower(Project.name) == "b-secret-1").exists())
            .order_by(Plan.id)
        ),
        [],
    ),
    "a correlated exists()": (
        lambda: select(Project.id).where(exists().where(Plan.id == Project.plan_id)),
        [(1,)],
    ),
    "a relationship join filtered through a function": (
        lambda: (
            select(Task.title)
            .join(Task.project)
            .where(func.lower(Project.name) == "a-one")
            .order_by(Task.id)
        ),
        [("a-task",)],
    ),
    "a relationship join to an alias filtered through a function": (
        lambda: (
            select(Task.title)
            .join(Task.project.of_type(PA))
            .where(func.lower(PA.name).like("b-secret%"))
        ),
        [],
    ),
    "join_from the other side": (
        lambda: select(Project.name).join_from(Task, Project, Task.project_id == Project.id),
        [("a-one",)],
    ),
    "an exists() correlated through two tables": (
        lambda: select(Project.id).where(
            exists().where(Task.project_id == Project.id, func.lower(Task.title) == "a-task")
        ),
        [(1,)],
    ),
    "a derived table of the entity": (
        lambda: select(Project.id).join(
            sub := select(Project.id).where(func.lower(Project.name) != "x").subquery(),
            Project.id == sub.c.id,
        ),
        [(1,)],
    ),
}


@pytest.mark.parametrize(("build", "rows"), list(REACHED.values()), ids=list(REACHED))
def test_the_same_questions_spelled_where_the_criteria_reach_are_scoped(
    maker: sessionmaker[OrmSession], build: Callable[[], Any], rows: list[tuple[Any, ...]]
) -> None:
    with maker() as session, as_organization("org_a"):
        assert [tuple(row) for row in session.execute(build()).all()] == rows


def test_a_legacy_query_exists_of_a_relationship_join_is_scoped(
    maker: sessionmaker[OrmSession],
) -> None:
    """``Query.exists()`` keeps the joins made before its ``with_only_columns()``
    apart (``_memoized_select_entities``): they are joins SQLAlchemy scopes."""
    with maker() as session, as_organization("org_a"):
        query = session.query(Task).join(Task.project)
        own = query.filter(func.lower(Project.name) == "a-one").exists()
        other = query.filter(func.lower(Project.name).like("b-secret%")).exists()
        assert session.query(own).scalar() is True
        assert session.query(other).scalar() is False


def test_with_expression_over_a_table_the_statement_joins_with_its_criteria(
    maker: sessionmaker[OrmSession],
) -> None:
    """The SQLAlchemy docs' own example (a count over a joined entity): the
    join carries the criteria, so the expression reads scoped rows."""
    statement = (
        select(Plan)
        .join(Plan.projects)
        .group_by(Plan.id)
        .order_by(Plan.id)
        .options(with_expression(Plan.annotated, func.count(Project.id)))
    )
    with maker() as session, as_organization("org_b"):
        counted: list[tuple[int, Any]] = [(p.id, p.annotated) for p in session.scalars(statement)]
        assert counted == [(1, 2)]
