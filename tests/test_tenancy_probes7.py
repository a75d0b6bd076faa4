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
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import ForeignKey, String, create_engine, exists, func, select, text, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from flask_oauth_verify import OAuthVerify, require_organization
from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    as_organization,
    current_organization_id,
    enable_tenant_scoping,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header


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


ROWS = [(1, "org_a", "a1", 10), (2, "org_b", "b-secret", 900), (3, "org_a", "a2", 20)]


@pytest.fixture
def session_factory() -> Iterator[sessionmaker[Any]]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    SeventhBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO p7_plans (id, name) VALUES (1, 'shared')"))
        connection.execute(
            text(
                "INSERT INTO p7_projects (id, organization_id, name, score, plan_id) "
                "VALUES (:i, :o, :n, :s, 1)"
            ),
            [{"i": i, "o": o, "n": n, "s": s} for i, o, n, s in ROWS],
        )
    factory = sessionmaker(engine)
    scoping = enable_tenant_scoping(factory, models=SeventhBase)
    yield factory
    scoping.disable()
    engine.dispose()


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
