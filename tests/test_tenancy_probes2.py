"""Regression tests of the second tenant-leak red-team pass.

Relationships loaded for one organization that a session keeps into the
next one (an ``as_organization`` block, a ``scoped_session`` not removed,
Flask-SQLAlchemy under an application context pushed for the process), and
Core table objects that are not the mapped ``Table`` but name a tenant table.
Real SQLite databases; rows checked as stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    MetaData,
    String,
    Table,
    column,
    create_engine,
    insert,
    select,
    table,
    update,
)
from sqlalchemy.ext.associationproxy import association_proxy
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    scoped_session,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from flask_oauth_verify import OAuthVerify, require_organization
from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    as_organization,
    enable_tenant_scoping,
    org_scoped,
    unscoped,
)
from flask_oauth_verify.testing import TokenIssuer


class ProbeBase(DeclarativeBase):
    pass


class Plan(ProbeBase):
    """Shared (no organization column), with a collection of tenant rows."""

    __tablename__ = "p2_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    projects: Mapped[list[Project]] = relationship(back_populates="plan", order_by="Project.id")
    project_names = association_proxy("projects", "name")


class Project(ProbeBase):
    __tablename__ = "p2_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    plan_id: Mapped[int] = mapped_column(ForeignKey("p2_plans.id"))
    plan: Mapped[Plan] = relationship(back_populates="projects")
    tasks: Mapped[list[Task]] = relationship(back_populates="project", order_by="Task.id")


class Task(ProbeBase):
    __tablename__ = "p2_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    project_id: Mapped[int] = mapped_column(ForeignKey("p2_projects.id"))
    title: Mapped[str] = mapped_column(String(50))
    project: Mapped[Project] = relationship(back_populates="tasks")


#: Unmapped, used through Core only, with the organization column.
project_members = Table(
    "p2_members",
    ProbeBase.metadata,
    Column("project_id", ForeignKey("p2_projects.id"), primary_key=True),
    Column("member", String(50), primary_key=True),
    Column("organization_id", String(20)),
)

TABLES = ProbeBase.metadata.tables
ROWS: dict[str, list[dict[str, Any]]] = {
    "p2_plans": [{"id": 1, "name": "free"}],
    "p2_projects": [
        {"id": 1, "organization_id": "org_a", "name": "A-SECRET", "plan_id": 1},
        {"id": 2, "organization_id": "org_b", "name": "B-one", "plan_id": 1},
    ],
    "p2_members": [
        {"project_id": 1, "member": "A-MEMBER", "organization_id": "org_a"},
        {"project_id": 2, "member": "b-member", "organization_id": "org_b"},
    ],
    # task 2 is org_a's task on org_b's project 2 (a cross-organization reference)
    "p2_tasks": [
        {"id": 1, "organization_id": "org_b", "project_id": 2, "title": "b-task"},
        {"id": 2, "organization_id": "org_a", "project_id": 2, "title": "A-TRAP"},
    ],
}


def sqlite_engine() -> Engine:
    return create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )


def load(engine: Engine) -> None:
    with engine.begin() as connection:
        for name, rows in ROWS.items():
            connection.execute(insert(TABLES[name]), rows)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = sqlite_engine()
    ProbeBase.metadata.create_all(engine)
    load(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def registry_session(engine: Engine) -> Iterator[scoped_session[Session]]:
    """A thread-local session, the way an app that never calls remove() uses it."""
    sessions = scoped_session(sessionmaker(engine))
    scoping = enable_tenant_scoping(sessions, models=ProbeBase.registry)
    yield sessions
    sessions.remove()
    scoping.disable()


# -- relationships loaded for another organization ----------------------------------


def test_shared_objects_tenant_collection_is_reloaded_for_the_next_organization(
    registry_session: scoped_session[Session],
) -> None:
    with as_organization("org_a"):
        plan = registry_session.scalars(select(Plan)).one()
        assert [p.name for p in plan.projects] == ["A-SECRET"]
    # the same session, still holding the plan with org_a's projects loaded
    with as_organization("org_b"):
        again = registry_session.scalars(select(Plan)).one()
        assert again is plan
        assert [p.name for p in again.projects] == ["B-one"]
    with as_organization("org_a"):
        assert registry_session.get(Plan, 1) is plan
        assert [p.name for p in plan.projects] == ["A-SECRET"]
    with as_organization("org_b"):
        # an identity-map hit runs no SQL: it is checked all the same
        cached = registry_session.get(Plan, 1)
        assert cached is not None
        assert list(cached.project_names) == ["B-one"]
    for option in (selectinload(Plan.projects), joinedload(Plan.projects)):
        with as_organization("org_a"):
            registry_session.scalars(select(Plan).options(option)).unique().one()
        with as_organization("org_b"):
            reloaded = registry_session.scalars(select(Plan).options(option)).unique().one()
            assert [p.name for p in reloaded.projects] == ["B-one"]


def test_own_objects_relationships_loaded_for_another_organization_are_reloaded(
    registry_session: scoped_session[Session],
) -> None:
    with as_organization("org_a"):
        projects = registry_session.scalars(
            unscoped(select(Project).order_by(Project.id), reason="test")
        ).all()
        b_project = projects[1]
        # loaded while acting for org_a: org_a's task on org_b's project
        assert [t.title for t in b_project.tasks] == ["A-TRAP"]
    with as_organization("org_b"):
        own = registry_session.scalars(select(Project)).one()
        assert own is b_project
        assert [t.title for t in own.tasks] == ["b-task"]


def test_unflushed_collection_changes_are_not_discarded_by_a_switch(
    registry_session: scoped_session[Session],
) -> None:
    with as_organization("org_b"):
        project = registry_session.scalars(select(Project)).one()
        project.tasks.append(Task(id=3, title="new"))
    with as_organization("org_a"), registry_session.no_autoflush:
        registry_session.scalars(select(Plan)).one()
    with as_organization("org_b"):
        registry_session.commit()
        assert [(t.title, t.organization_id) for t in project.tasks] == [
            ("b-task", "org_b"),
            ("new", "org_b"),
        ]


def stored_tasks(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        table = TABLES["p2_tasks"]
        return list(connection.execute(select(table).order_by(table.c.id)))


def test_objects_added_for_one_organization_are_not_flushed_for_the_next(
    engine: Engine, registry_session: scoped_session[Session]
) -> None:
    # a request of org_a adds rows and returns without commit or rollback
    with as_organization("org_a"):
        project = registry_session.scalars(
            unscoped(select(Project).where(Project.id == 1), reason="test")
        ).one()
        project.tasks.append(Task(id=3, title="A-CONFIDENTIAL"))
        registry_session.add(Task(id=4, project_id=1, title="A-CONFIDENTIAL-2"))
    # the next request on the same thread-local session acts for org_b
    with as_organization("org_b"):
        with pytest.raises(CrossTenantWriteError):
            registry_session.scalars(select(Project)).all()  # the autoflush
        with pytest.raises(CrossTenantWriteError):
            registry_session.commit()
        registry_session.rollback()
    assert [row[0] for row in stored_tasks(engine)] == [1, 2]
    # added and flushed for the same organization: stamped as before
    with as_organization("org_b"):
        registry_session.add(Task(id=5, project_id=2, title="b-new"))
    with as_organization("org_b"):
        registry_session.commit()
    # added outside any organization: stamped by the flush
    registry_session.add(Task(id=6, project_id=2, title="b-later"))
    with as_organization("org_b"):
        registry_session.commit()
    assert [(row[0], row[1]) for row in stored_tasks(engine)][2:] == [(5, "org_b"), (6, "org_b")]


# -- Flask-SQLAlchemy: an application context pushed for the whole process --------------


class FlaskBase(DeclarativeBase):
    pass


flask_db = SQLAlchemy(model_class=FlaskBase)


class Catalogue(flask_db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = "p2f_catalogues"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    items: Mapped[list[Item]] = relationship(back_populates="catalogue", order_by="Item.id")


class Item(flask_db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = "p2f_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    catalogue_id: Mapped[int] = mapped_column(ForeignKey("p2f_catalogues.id"))
    catalogue: Mapped[Catalogue] = relationship(back_populates="items")


@pytest.fixture
def pushed_app(rsa_issuer: TokenIssuer) -> Iterator[Flask]:
    app = Flask("tenancy_probes2")
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI="sqlite://",
        SQLALCHEMY_ENGINE_OPTIONS={
            "poolclass": StaticPool,
            "connect_args": {"check_same_thread": False},
        },
        **rsa_issuer.config(audience="api"),
    )
    OAuthVerify().init_app(app)
    flask_db.init_app(app)
    scoping = enable_tenant_scoping(flask_db)

    @app.get("/catalogues")
    @require_organization
    def catalogues() -> dict[str, Any]:
        # an ordinary view; back_populates keeps the objects in a reference
        # cycle, so they stay in the identity map after the request
        return {
            "items": [
                [item.name, item.catalogue.name]
                for catalogue in flask_db.session.scalars(select(Catalogue))
                for item in catalogue.items
            ]
        }

    context = app.app_context()
    context.push()  # "at import", as scripts and tutorials do
    try:
        flask_db.create_all()
        with flask_db.engine.begin() as connection:
            connection.execute(insert(Catalogue.__table__), [{"id": 1, "name": "main"}])
            connection.execute(
                insert(Item.__table__),
                [
                    {"id": 1, "organization_id": "org_a", "name": "A-SECRET", "catalogue_id": 1},
                    {"id": 2, "organization_id": "org_b", "name": "B-item", "catalogue_id": 1},
                ],
            )
        yield app
    finally:
        flask_db.session.remove()
        flask_db.engine.dispose()
        scoping.disable()
        context.pop()


def test_pushed_app_context_session_does_not_carry_collections_to_the_next_request(
    pushed_app: Flask, rsa_issuer: TokenIssuer
) -> None:
    client = pushed_app.test_client()
    seen: dict[str, list[object]] = {}
    for org in ("org_a", "org_b", "org_a"):
        token = rsa_issuer.mint(organization_id=org, subject="user_1")
        response = client.get("/catalogues", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        seen.setdefault(org, []).append(response.get_json()["items"])
    assert seen["org_a"] == [[["A-SECRET", "main"]], [["A-SECRET", "main"]]]
    assert seen["org_b"] == [[["B-item", "main"]]]


# -- table objects other than the mapped Table ----------------------------------------


@pytest.fixture
def maker(engine: Engine) -> Iterator[sessionmaker[Session]]:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=ProbeBase.registry)
    yield maker
    scoping.disable()


def test_lightweight_and_reflected_tables_are_tenant_tables(
    engine: Engine, maker: sessionmaker[Session]
) -> None:
    light = table("p2_projects", column("name"), column("organization_id"))
    shouting = table("P2_PROJECTS", column("name"))
    reflected = Table("p2_projects", MetaData(), autoload_with=engine)
    with maker() as session, as_organization("org_b"):
        for statement in (
            select(light.c.name),
            select(column("name")).select_from(table("p2_projects")),
            select(shouting.c.name),
            select(reflected.c.name),
        ):
            with pytest.raises(TenantScopingError):
                session.execute(statement)
        # scoped by hand, the same objects pass
        rows = session.execute(org_scoped(select(light.c.name), light.c.organization_id))
        assert rows.scalars().all() == ["B-one"]
        rows = session.execute(org_scoped(select(reflected.c.name), reflected.c.organization_id))
        assert rows.scalars().all() == ["B-one"]
        # shared tables named by a lightweight table still work
        assert session.execute(select(table("p2_plans", column("name")).c.name)).all() == [
            ("free",)
        ]


def test_flushed_expression_reading_a_lightweight_tenant_table_is_refused(
    maker: sessionmaker[Session],
) -> None:
    light = table("p2_projects", column("name"))
    with maker() as session, as_organization("org_b"):
        task = session.get(Task, 1)
        assert task is not None
        task.title = select(light.c.name).limit(1).scalar_subquery()
        with pytest.raises(TenantScopingError):
            session.flush()


# -- from_statement() of a Core statement ------------------------------------------------


def stored_names(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(select(TABLES["p2_projects"].c.name)).scalars())


def test_from_statement_of_a_core_statement_is_checked_like_one(
    engine: Engine, maker: sessionmaker[Session]
) -> None:
    projects = TABLES["p2_projects"]
    with maker() as session, as_organization("org_b"):
        for statement in (
            # column entities: no object for the load guard to check
            select(Project.name).from_statement(select(projects)),
            select(Project.name, Project.organization_id).from_statement(select(projects)),
            # a write, through a select()
            select(Project.name).from_statement(
                update(projects).values(name="PWNED").returning(projects.c.name)
            ),
        ):
            with pytest.raises(TenantScopingError):
                session.execute(statement)
        session.commit()
        # scoped by hand, or ORM statements (scoped by the criteria), pass
        scoped = org_scoped(select(projects), projects.c.organization_id)
        rows = session.execute(select(Project.name).from_statement(scoped)).all()
        assert rows == [("B-one",)]
        rows = session.execute(select(Project.name).from_statement(select(Project.name))).all()
        assert rows == [("B-one",)]
        renamed = session.execute(
            select(Project.name).from_statement(
                update(Project).values(name="B-renamed").returning(Project.name)
            )
        ).all()
        assert renamed == [("B-renamed",)]
        session.commit()
    assert stored_names(engine) == ["A-SECRET", "B-renamed"]


def test_unmapped_table_with_the_organization_column_is_a_tenant_table(
    engine: Engine, maker: sessionmaker[Session]
) -> None:
    with maker() as session, as_organization("org_b"):
        for statement in (
            select(project_members),
            select(Project.name).from_statement(select(project_members)),
        ):
            with pytest.raises(TenantScopingError):
                session.execute(statement)
        with pytest.raises(TenantScopingError):
            session.execute(insert(project_members).values(project_id=2, member="x"))
        scoped = org_scoped(select(project_members.c.member), project_members.c.organization_id)
        assert session.execute(scoped).scalars().all() == ["b-member"]
