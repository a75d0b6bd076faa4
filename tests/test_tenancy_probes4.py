"""Regression tests of the fourth tenant-leak red-team pass.

Writes that reached another organization's rows through the ORM: a bulk
``update()``/``delete()`` of a joined-inheritance subclass whose
organization column lives on the base table (SQLAlchemy added the base
table without joining it), a data-modifying CTE (out of reach of the write
guard), and SQLite's ``OR REPLACE`` (which deletes the row holding the key).
Real SQLite and PostgreSQL databases; rows checked as stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from sqlalchemy import (
    Engine,
    ForeignKey,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import StaticPool

from flask_oauth_verify.tenancy import (
    TenantScopingError,
    as_organization,
    enable_tenant_scoping,
    org_scoped,
    unscoped,
)


class ProbeBase(DeclarativeBase):
    pass


class Doc(ProbeBase):
    """The organization column on the base table, as docs/tenancy.rst recommends."""

    __tablename__ = "p4_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "doc"}  # noqa: RUF012


class Memo(Doc):
    __tablename__ = "p4_memos"
    id: Mapped[int] = mapped_column(ForeignKey("p4_docs.id"), primary_key=True)
    body: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "memo"}  # noqa: RUF012


class UrgentMemo(Memo):
    """Two levels below the table holding the organization column."""

    __tablename__ = "p4_urgent"
    id: Mapped[int] = mapped_column(ForeignKey("p4_memos.id"), primary_key=True)
    level: Mapped[int] = mapped_column()
    __mapper_args__ = {"polymorphic_identity": "urgent"}  # noqa: RUF012


class Project(ProbeBase):
    __tablename__ = "p4_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))


class Plan(ProbeBase):
    """Shared by every organization (no organization column)."""

    __tablename__ = "p4_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def table_of(model: Any) -> Table:
    """The model's table, typed as one."""
    return cast(Table, model.__table__)


DOCS = [
    (1, "org_a", "memo"),
    (2, "org_b", "memo"),
    (3, "org_a", "urgent"),
    (4, "org_b", "urgent"),
]
MEMOS = {1: "a-memo", 2: "B-SECRET", 3: "a-urgent", 4: "B-URGENT"}
PROJECTS = [(1, "org_a", "a-one"), (101, "org_b", "B-PROJECT")]


def _engine(request: pytest.FixtureRequest, dialect: str) -> Iterator[Engine]:
    schema = None
    if dialect == "sqlite":
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        url = request.getfixturevalue("postgres_url")
        schema = f"ovt_p4_{uuid.uuid4().hex[:10]}"
        engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    ProbeBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(table_of(Doc)),
            [{"id": i, "organization_id": o, "kind": k} for i, o, k in DOCS],
        )
        connection.execute(insert(table_of(Memo)), [{"id": i, "body": b} for i, b in MEMOS.items()])
        connection.execute(
            insert(table_of(UrgentMemo)), [{"id": 3, "level": 1}, {"id": 4, "level": 1}]
        )
        connection.execute(
            insert(table_of(Project)),
            [{"id": i, "organization_id": o, "name": n} for i, o, n in PROJECTS],
        )
        connection.execute(insert(table_of(Plan)), [{"id": 1, "name": "shared"}])
    yield engine
    if schema is not None:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _engine(request, request.param)


@pytest.fixture
def postgres_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _engine(request, "postgresql")


@pytest.fixture
def sqlite_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _engine(request, "sqlite")


def _scoped(engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=ProbeBase.registry)
    yield maker
    scoping.disable()


@pytest.fixture
def maker(engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    yield from _scoped(engine)


@pytest.fixture
def postgres_maker(postgres_engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    yield from _scoped(postgres_engine)


@pytest.fixture
def sqlite_maker(sqlite_engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    yield from _scoped(sqlite_engine)


def stored(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(text(sql)))


def memos(engine: Engine) -> list[tuple[Any, ...]]:
    return stored(
        engine,
        "SELECT d.id, d.organization_id, m.body FROM p4_docs d LEFT JOIN p4_memos m ON m.id = d.id",
    )


def projects(engine: Engine) -> list[tuple[Any, ...]]:
    return stored(engine, "SELECT id, organization_id, name FROM p4_projects")


ORIGINAL_MEMOS = sorted((i, o, MEMOS[i]) for i, o, _k in DOCS)


# -- bulk update()/delete() of a joined-inheritance subclass -------------------


def test_bulk_update_of_a_joined_subclass_writes_only_own_rows(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        result: Any = session.execute(update(Memo).values(body="written by a"))
        assert result.rowcount == 2
        session.commit()
    expected = sorted((i, o, "written by a" if o == "org_a" else b) for i, o, b in ORIGINAL_MEMOS)
    assert memos(engine) == expected


def test_bulk_update_two_levels_below_the_organization_column_writes_only_own_rows(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        result: Any = session.execute(update(UrgentMemo).values(level=9))
        assert result.rowcount == 1
        session.commit()
    assert stored(engine, "SELECT id, level FROM p4_urgent") == [(3, 9), (4, 1)]


def test_bulk_update_returning_of_a_joined_subclass_reads_only_own_rows(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        rows = session.execute(update(Memo).values(body=Memo.body).returning(Memo.id, Memo.body))
        assert sorted(tuple(r) for r in rows) == [(1, "a-memo"), (3, "a-urgent")]
        session.rollback()
    assert memos(engine) == ORIGINAL_MEMOS


def test_bulk_delete_of_a_joined_subclass_deletes_only_own_rows(
    maker: sessionmaker[OrmSession], engine: Engine
) -> None:
    with maker() as session, as_organization("org_a"):
        statement = delete(Memo).where(Memo.id == 1).execution_options(synchronize_session=False)
        if engine.dialect.name == "sqlite":  # no DELETE … USING: refused, nothing deleted
            with pytest.raises(Exception, match=r"(?i)delete"):
                session.execute(statement)
            session.rollback()
            assert memos(engine) == ORIGINAL_MEMOS
            return
        everything = delete(Memo).execution_options(synchronize_session=False)
        session.execute(everything.where(Memo.id.in_([1, 2])))
        session.commit()
    assert memos(engine) == [(1, "org_a", None), *ORIGINAL_MEMOS[1:]]


def test_org_scoped_bulk_update_of_a_joined_subclass_writes_only_own_rows(
    engine: Engine,
) -> None:
    """org_scoped() alone (no automatic scoping) joins the base table too."""
    with OrmSession(engine) as session, as_organization("org_a"):
        result: Any = session.execute(org_scoped(update(Memo).values(body="written by a")))
        assert result.rowcount == 2
        session.commit()
    expected = sorted((i, o, "written by a" if o == "org_a" else b) for i, o, b in ORIGINAL_MEMOS)
    assert memos(engine) == expected


# -- data-modifying CTEs ----------------------------------------------------------


def _moving() -> Any:
    return update(Project).values(organization_id="org_b").returning(Project.id).cte("moved")


def _planting() -> Any:
    values = {"id": 500, "name": "planted", "organization_id": "org_b"}
    return insert(Project).values(**values).returning(Project.id).cte("planted")


NESTED_WRITES: dict[str, Callable[[], Any]] = {
    "add_cte update": lambda: select(Plan.id).add_cte(_moving()),
    "add_cte insert": lambda: select(Plan.id).add_cte(_planting()),
    "cte read in FROM": lambda: select(_moving().c.id),
    "cte read in a subquery": lambda: select(Plan.id).where(Plan.id.in_(select(_moving().c.id))),
    "update with add_cte": lambda: update(Plan).add_cte(_moving()).values(name="x"),
    "delete cte": lambda: select(Plan.id).add_cte(
        delete(Project).returning(Project.id).cte("gone")
    ),
    "joined subclass": lambda: select(Plan.id).add_cte(
        update(Memo).values(body="x").returning(Memo.id).cte("memos")
    ),
    "core table": lambda: select(table_of(Plan).c.id).add_cte(
        update(table_of(Project)).values(name="x").returning(table_of(Project).c.id).cte()
    ),
}


def test_a_data_modifying_cte_on_a_shared_table_or_unscoped_runs(
    postgres_maker: sessionmaker[OrmSession], postgres_engine: Engine
) -> None:
    """PostgreSQL only: SQLite has no data-modifying CTEs."""
    maker, engine = postgres_maker, postgres_engine
    renamed = update(Plan).values(name="renamed").returning(Plan.id).cte("renamed")
    with maker() as session, as_organization("org_a"):
        names = session.scalars(select(Project.name).add_cte(renamed)).all()
        assert names == ["a-one"]  # the select itself is still scoped
        moved = unscoped(select(Plan.id).add_cte(_moving()), reason="test: a migration")
        session.execute(moved)
        session.commit()
    assert stored(engine, "SELECT name FROM p4_plans") == [("renamed",)]
    assert projects(engine) == [(1, "org_b", "a-one"), (101, "org_b", "B-PROJECT")]


# -- OR REPLACE -------------------------------------------------------------------

REPLACING: dict[str, Callable[[], Any]] = {
    "insert or replace": lambda: insert(Project).prefix_with("OR REPLACE").values(id=101, name="a"),
    "update or replace": lambda: (
        update(Project).prefix_with("OR REPLACE").where(Project.id == 1).values(id=101)
    ),
    "lower case": lambda: insert(Project).prefix_with("or replace").values(id=101, name="a"),
}


#: every write the guard cannot check, with what the refusal names
REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    **{name: (build, r"CTE|Core statement") for name, build in NESTED_WRITES.items()},
    **{name: (build, "OR REPLACE") for name, build in REPLACING.items()},
}


# SQLAlchemy warns while compiling the subclass's CTE (its parent is not
# joined) before the refusal, which comes at execution.
@pytest.mark.filterwarnings("ignore:UPDATE statement has a cartesian product")
@pytest.mark.parametrize(("build", "named"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_write_out_of_the_guards_sight_is_refused(
    maker: sessionmaker[OrmSession], engine: Engine, build: Callable[[], Any], named: str
) -> None:
    with maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError, match=named):
            session.execute(build())
        session.rollback()
    assert projects(engine) == sorted(PROJECTS)
    assert stored(engine, "SELECT name FROM p4_plans") == [("shared",)]
    assert memos(engine) == ORIGINAL_MEMOS


def test_or_ignore_and_or_replace_on_a_shared_table_still_run(
    sqlite_maker: sessionmaker[OrmSession], sqlite_engine: Engine
) -> None:
    """SQLite only: OR IGNORE / OR REPLACE are its own."""
    maker, engine = sqlite_maker, sqlite_engine
    with maker() as session, as_organization("org_a"):
        session.execute(insert(Project).prefix_with("OR IGNORE").values(id=101, name="a"))
        session.execute(insert(Plan).prefix_with("OR REPLACE").values(id=1, name="replaced"))
        session.commit()
    assert projects(engine) == sorted(PROJECTS)  # the collision is ignored, B's row kept
    assert stored(engine, "SELECT name FROM p4_plans") == [("replaced",)]


def test_or_replace_through_from_statement_is_refused(
    sqlite_maker: sessionmaker[OrmSession], sqlite_engine: Engine
) -> None:
    replacing = insert(Project).prefix_with("OR REPLACE").values(id=101, name="a")
    statement = select(Project).from_statement(replacing.returning(Project))
    with sqlite_maker() as session, as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="OR REPLACE"):
            session.execute(statement)
        session.rollback()
    assert projects(sqlite_engine) == sorted(PROJECTS)
