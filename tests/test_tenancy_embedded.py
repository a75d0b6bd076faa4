"""An explicitly scoped statement embedded in another (``db.paginate()``'s count).

docs/tenancy.rst ("Explicit helpers", the warning): the other classes of an
``org_scoped()`` statement are scoped by loader criteria, which apply only to
the statement executed, so embedded (Flask-SQLAlchemy's ``paginate()`` counts
``select(func.count()).select_from(stmt.subquery())``) only the primary
entity's ``WHERE`` stays. The documented ways to count right: scope each
class the statement reads, or use automatic scoping. On SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from flask_oauth_verify import org_scoped
from flask_oauth_verify.tenancy import as_organization

from .tenancy_support import engine_for, scoped_database


class Base(DeclarativeBase):
    """The models of this module."""


class Member(Base):
    __tablename__ = "emb_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))


class Note(Base):
    __tablename__ = "emb_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    member_id: Mapped[int] = mapped_column(ForeignKey("emb_members.id"))
    body: Mapped[str] = mapped_column(String(100))


def seed(connection: Any) -> None:
    connection.execute(insert(Member), [{"id": 1, "organization_id": "org_a", "name": "ann"}])
    # org_b's notes point at org_a's member (a shared or forged key): a join finds them
    connection.execute(
        insert(Note),
        [
            {"id": 1, "organization_id": "org_a", "member_id": 1, "body": "a note"},
            {"id": 2, "organization_id": "org_b", "member_id": 1, "body": "B merger plan"},
            {"id": 3, "organization_id": "org_b", "member_id": 1, "body": "B merger budget"},
        ],
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    with engine_for(request, request.param) as created:
        yield created


def counted(session: Session, statement: Any) -> int:
    """What Flask-SQLAlchemy's ``paginate()`` computes as ``total``."""
    inner = statement.order_by(None).subquery()
    return int(session.execute(select(func.count()).select_from(inner)).scalar_one())


def members_with_notes(search: str) -> Any:
    return select(Member).join(Note, Note.member_id == Member.id).where(Note.body.contains(search))


def test_explicit_scoping_of_each_class_counts_only_own_rows(engine: Any) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        seed(connection)
    with Session(engine) as session, as_organization("org_a"):
        for search, rows in (("", 1), ("merger", 0)):
            statement = org_scoped(org_scoped(members_with_notes(search)), Note.organization_id)
            assert counted(session, statement) == rows
            assert len(session.scalars(statement).all()) == rows
    engine.dispose()


def test_automatic_scoping_counts_only_own_rows(engine: Any) -> None:
    factory: sessionmaker[Any]
    with (
        scoped_database(engine, Base, seed) as factory,
        factory() as session,
        as_organization("org_a"),
    ):
        for search, rows in (("", 1), ("merger", 0)):
            statement = org_scoped(members_with_notes(search))
            assert counted(session, statement) == rows
            assert counted(session, members_with_notes(search)) == rows
