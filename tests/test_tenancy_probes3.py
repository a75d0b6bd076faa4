"""Regression tests of the third tenant-leak red-team pass.

Statements automatic scoping must make safe although SQLAlchemy compiles a
part of them as plain Core (``with_expression()``), and claims of
docs/tenancy.rst no earlier test checked. Real SQLite databases; rows
checked as stored.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    column_property,
    deferred,
    joinedload,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
    sessionmaker,
    with_expression,
)
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import StaticPool

from flask_oauth_verify import OAuthVerify, require_organization
from flask_oauth_verify.rls import enable_row_level_security, policy_statements
from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    as_organization,
    enable_tenant_scoping,
    org_scoped,
    unscoped,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header


class ProbeBase(DeclarativeBase):
    pass


class Task(ProbeBase):
    __tablename__ = "p3_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    project_id: Mapped[int] = mapped_column(ForeignKey("p3_projects.id"))
    title: Mapped[str] = mapped_column(String(50))
    note: Mapped[Any] = query_expression()


class Project(ProbeBase):
    __tablename__ = "p3_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    tasks: Mapped[list[Task]] = relationship(order_by=Task.id)
    #: mapper-level expressions keep their ORM annotations: scoped
    task_count = column_property(
        select(func.count(Task.id)).where(Task.project_id == id).scalar_subquery()
    )
    all_tasks = deferred(select(func.count(Task.id)).scalar_subquery())
    #: filled per query by with_expression()
    extra: Mapped[Any] = query_expression()


ROWS: dict[Any, list[dict[str, Any]]] = {
    Project: [
        {"id": 1, "organization_id": "org_a", "name": "a-one"},
        {"id": 2, "organization_id": "org_b", "name": "B-SECRET"},
    ],
    Task: [
        {"id": 1, "organization_id": "org_a", "project_id": 1, "title": "a-task"},
        {"id": 2, "organization_id": "org_b", "project_id": 2, "title": "B-SECRET-TASK"},
        # org_b's task on org_a's project: never counted for org_a
        {"id": 3, "organization_id": "org_b", "project_id": 1, "title": "B-ON-A"},
    ],
}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    schema = None
    if request.param == "sqlite":
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        url = request.getfixturevalue("postgres_url")
        schema = f"ovt_p3_{uuid.uuid4().hex[:10]}"
        engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    ProbeBase.metadata.create_all(engine)
    with engine.begin() as connection:
        for model, rows in ROWS.items():
            connection.execute(insert(model), rows)
    yield engine
    if schema is not None:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def stored_titles(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, organization_id, title FROM p3_tasks"))
        return sorted(tuple(row) for row in rows)


ORIGINAL_TITLES = sorted((t["id"], t["organization_id"], t["title"]) for t in ROWS[Task])


@pytest.fixture
def maker(engine: Engine) -> Iterator[sessionmaker[OrmSession]]:
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=ProbeBase.registry)
    yield maker
    scoping.disable()


# -- with_expression(): SQLAlchemy strips its ORM annotations -------------------


def _secret_title() -> Any:
    return select(Task.title).where(Task.id == 2).scalar_subquery()


def _count_all() -> Any:
    return select(func.count(Task.id)).scalar_subquery()


def _correlated_count() -> Any:
    return select(func.count(Task.id)).where(Task.project_id == Project.id).scalar_subquery()


@pytest.mark.parametrize(
    "expression",
    [_secret_title, _count_all, _correlated_count, lambda: Task.title],
    ids=["subquery", "count", "correlated", "column-of-another-table"],
)
def test_with_expression_reading_a_tenant_table_is_refused(
    maker: sessionmaker[OrmSession], expression: Any
) -> None:
    with maker() as session, as_organization("org_a"):
        statement = select(Project).options(with_expression(Project.extra, expression()))
        with pytest.raises(TenantScopingError, match="with_expression"):
            session.scalars(statement).all()
        legacy = session.query(Project).options(with_expression(Project.extra, expression()))
        with pytest.raises(TenantScopingError, match="with_expression"):
            legacy.all()


def test_with_expression_subquery_through_org_scoped_is_scoped(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session, as_organization("org_a"):
        correlated = org_scoped(
            select(func.count(Task.id)).where(Task.project_id == Project.id),
            Task.organization_id,
        ).scalar_subquery()
        statement = select(Project).options(with_expression(Project.extra, correlated))
        assert [(p.id, p.extra) for p in session.scalars(statement)] == [(1, 1)]
        titles = org_scoped(select(func.max(Task.title)), Task.organization_id).scalar_subquery()
        statement = select(Project).options(with_expression(Project.extra, titles))
        assert [(p.id, p.extra) for p in session.scalars(statement)] == [(1, "a-task")]


def test_with_expression_on_the_entitys_own_columns_works(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session, as_organization("org_a"):
        statement = select(Project).options(with_expression(Project.extra, Project.name + "!"))
        assert [(p.id, p.extra) for p in session.scalars(statement)] == [(1, "a-one!")]
        alias = aliased(Project)
        statement = select(alias).options(with_expression(alias.extra, alias.name + "?"))
        assert [(p.id, p.extra) for p in session.scalars(statement)] == [(1, "a-one?")]


def test_with_expression_subquery_that_does_not_correlate_its_entity_is_refused(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session, as_organization("org_a"):
        # org_scoped compared tasks, but projects is read for every organization
        uncorrelated = (
            org_scoped(
                select(func.count(Project.id)).where(Task.project_id == Project.id),
                Task.organization_id,
            )
            .correlate(None)
            .scalar_subquery()
        )
        statement = select(Project).options(with_expression(Project.extra, uncorrelated))
        with pytest.raises(TenantScopingError, match="p3_projects"):
            session.scalars(statement).all()
        # an aliased entity: the subquery names the table, not the alias
        alias = aliased(Project)
        correlated = org_scoped(
            select(func.count(Task.id)).where(Task.project_id == Project.id),
            Task.organization_id,
        ).scalar_subquery()
        statement = select(alias).options(with_expression(alias.extra, correlated))
        with pytest.raises(TenantScopingError, match="p3_projects"):
            session.scalars(statement).all()


def test_with_expression_unscoped_is_the_opt_out(maker: sessionmaker[OrmSession]) -> None:
    with maker() as session, as_organization("org_a"):
        statement = select(Project).options(with_expression(Project.extra, _count_all()))
        rows = session.scalars(unscoped(statement, reason="admin report")).all()
        assert [(p.id, p.extra) for p in rows] == [(1, 3), (2, 3)]


def test_with_expression_of_a_loaded_relationship_is_judged_by_its_own_entity(
    maker: sessionmaker[OrmSession],
) -> None:
    with maker() as session, as_organization("org_a"):
        # Task's expression reading projects: not Task's own table
        for loader in (selectinload, joinedload):
            option = loader(Project.tasks).with_expression(Task.note, Project.name)
            with pytest.raises(TenantScopingError, match="p3_projects"):
                session.scalars(select(Project).options(option)).unique().all()
        option = selectinload(Project.tasks).with_expression(Task.note, Task.title + "!")
        projects = session.scalars(select(Project).options(option)).all()
        assert [[t.note for t in p.tasks] for p in projects] == [["a-task!"]]


def test_mapper_level_column_expressions_are_scoped(maker: sessionmaker[OrmSession]) -> None:
    with maker() as session, as_organization("org_a"):
        projects = session.scalars(select(Project)).all()
        assert [(p.id, p.task_count, p.all_tasks) for p in projects] == [(1, 1, 1)]
        assert session.execute(select(Project.task_count)).scalars().all() == [1]


def test_refreshes_neither_pile_up_criteria_nor_lose_them(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    """A refresh carries the options the object was loaded with; ours are not added twice."""
    statements: list[str] = []

    def record(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with maker() as session, as_organization("org_a"):
            project = session.get(Project, 1)
            assert project is not None
            options = len(inspect(project).load_options)
            for _ in range(4):
                session.commit()  # expires the object: the next access refreshes it
                statements.clear()
                assert project.task_count == 1  # org_b's task 3 on project 1 is not counted
                assert len(statements) == 1
                refreshed = statements[0]
            assert len(inspect(project).load_options) == options
            # the last refresh is the same SQL as the first one
            session.expire(project)
            statements.clear()
            assert project.name == "a-one"
            assert statements == [refreshed]
    finally:
        event.remove(engine, "before_cursor_execute", record)


# -- UPDATE … FROM, DELETE … USING, RETURNING -----------------------------------


def test_update_from_another_tenant_table_reads_only_own_rows(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    with maker() as session, as_organization("org_b"):
        # task 3 is org_b's, on org_a's project 1: org_a's name must not be copied
        session.execute(
            update(Task).where(Task.project_id == Project.id).values(title=Project.name)
        )
        session.execute(
            update(Task)
            .where(Task.project_id == Project.id, Project.name == "a-one")
            .values(title="org_a's project name guessed")
        )
        session.commit()
    expected = [row if row[0] != 2 else (2, "org_b", "B-SECRET") for row in ORIGINAL_TITLES]
    assert stored_titles(engine) == expected


def test_update_from_an_alias_of_a_tenant_table_is_scoped(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    other = aliased(Task)
    with maker() as session, as_organization("org_b"):
        # org_b's task 3 shares project 1 with org_a's task 1
        session.execute(
            update(Task)
            .where(Task.project_id == other.project_id, Task.id != other.id)
            .values(title=other.title)
        )
        session.commit()
    assert stored_titles(engine) == ORIGINAL_TITLES


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)  # DELETE … USING
def test_delete_using_another_tenant_table_is_scoped(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    with maker() as session, as_organization("org_b"):
        deleted = session.execute(
            delete(Task)
            .where(Task.project_id == Project.id, Project.name == "a-one")
            .returning(Task.id)
        )
        assert deleted.all() == []
        # the same through from_statement()
        statement = (
            update(Task)
            .where(Task.project_id == Project.id)
            .values(title=Project.name)
            .returning(Task)
        )
        tasks = session.scalars(select(Task).from_statement(statement)).all()
        assert [(t.id, t.title) for t in tasks] == [(2, "B-SECRET")]
        session.rollback()
        session.commit()
    assert stored_titles(engine) == ORIGINAL_TITLES


def test_insert_returning_a_subquery_is_scoped(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    with maker() as session, as_organization("org_b"):
        secret = select(Project.name).where(Project.id == 1).scalar_subquery()
        statement = insert(Task).values(id=9, project_id=2, title="new").returning(Task.id, secret)
        assert session.execute(statement).all() == [(9, None)]
        session.commit()
    assert (9, "org_b", "new") in stored_titles(engine)


def test_a_bound_organization_the_execution_overrides_is_refused(
    engine: Engine, maker: sessionmaker[OrmSession]
) -> None:
    """``bindparam("o", "org_a")`` looks like org_a, but ``{"o": "org_b"}`` writes org_b."""
    own: Any = bindparam("o", "org_a")
    with maker() as session, as_organization("org_a"):
        moves: list[Any] = [
            update(Task).where(Task.id == 1).values(organization_id=own),
            insert(Task).values(id=9, project_id=1, title="new", organization_id=own),
        ]
        for statement in moves:
            with pytest.raises(CrossTenantWriteError):
                session.execute(statement, {"o": "org_b"})
        # the value written when nothing overrides it is checked as before
        session.execute(update(Task).where(Task.id == 1).values(organization_id=own))
        session.commit()
    assert stored_titles(engine) == ORIGINAL_TITLES


def test_org_scoped_update_and_delete_scope_their_other_entities(engine: Engine) -> None:
    """Explicit helpers only: no automatic scoping on this session factory."""
    plain = sessionmaker(engine)
    with plain() as session, as_organization("org_b"):
        secret = select(Project.name).where(Project.id == 1).scalar_subquery()
        copied = org_scoped(update(Task).values(title=func.coalesce(secret, Task.title)))
        session.execute(copied)
        joined = update(Task).where(Task.project_id == Project.id).values(title=Project.name)
        session.execute(org_scoped(joined))
        guessed = select(Project.id).where(Project.name == "a-one")
        session.execute(org_scoped(delete(Task).where(Task.project_id.in_(guessed))))
        session.commit()
    expected = [row if row[0] != 2 else (2, "org_b", "B-SECRET") for row in ORIGINAL_TITLES]
    assert stored_titles(engine) == expected


# -- Flask-SQLAlchemy's helpers -------------------------------------------------------


class FlaskBase(DeclarativeBase):
    pass


flask_db = SQLAlchemy(model_class=FlaskBase)


class Note(flask_db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = "p3f_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    body: Mapped[str] = mapped_column(String(50))


NOTES = [
    {"id": 1, "organization_id": "org_a", "body": "a-1"},
    {"id": 2, "organization_id": "org_b", "body": "B-SECRET"},
    {"id": 3, "organization_id": "org_a", "body": "a-3"},
]


@pytest.fixture
def helpers_app(rsa_issuer: TokenIssuer) -> Iterator[Flask]:
    app = Flask("tenancy_probes3")
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

    @app.get("/get/<int:note_id>")
    @require_organization
    def get(note_id: int) -> dict[str, Any]:
        return {"body": flask_db.get_or_404(Note, note_id).body}

    @app.get("/query-get/<int:note_id>")
    @require_organization
    def query_get(note_id: int) -> dict[str, Any]:
        return {"body": Note.query.get_or_404(note_id).body}

    @app.get("/first/<int:note_id>")
    @require_organization
    def first(note_id: int) -> dict[str, Any]:
        note = flask_db.first_or_404(select(Note).where(Note.id == note_id))
        return {"body": note.body}

    @app.get("/one/<int:note_id>")
    @require_organization
    def one(note_id: int) -> dict[str, Any]:
        note = flask_db.one_or_404(select(Note).where(Note.id == note_id))
        return {"body": note.body}

    @app.get("/page")
    @require_organization
    def page() -> dict[str, Any]:
        page = flask_db.paginate(select(Note).order_by(Note.id), per_page=1)
        legacy = Note.query.order_by(Note.id).paginate(per_page=1)
        return {
            "total": page.total,
            "pages": page.pages,
            "legacy_total": legacy.total,
            "count": Note.query.count(),
            "bodies": [n.body for n in page.items],
        }

    with app.app_context():
        flask_db.create_all()
        with flask_db.engine.begin() as connection:
            connection.execute(insert(Note.__table__), NOTES)
    try:
        yield app
    finally:
        with app.app_context():
            flask_db.engine.dispose()
        scoping.disable()


@pytest.mark.filterwarnings("ignore:The Query.get\\(\\) method:sqlalchemy.exc.LegacyAPIWarning")
@pytest.mark.parametrize("path", ["/get", "/query-get", "/first", "/one"])
def test_flask_sqlalchemy_404_helpers_see_only_own_rows(
    helpers_app: Flask, rsa_issuer: TokenIssuer, path: str
) -> None:
    client = helpers_app.test_client()
    token = auth_header(rsa_issuer.mint(organization_id="org_a", subject="user_1"))
    response = client.get(f"{path}/1", headers=token)
    assert (response.status_code, response.get_json()) == (200, {"body": "a-1"})
    response = client.get(f"{path}/2", headers=token)
    assert response.status_code == 404
    assert "B-SECRET" not in response.get_data(as_text=True)


def test_flask_sqlalchemy_pagination_counts_only_own_rows(
    helpers_app: Flask, rsa_issuer: TokenIssuer
) -> None:
    client = helpers_app.test_client()
    for org, total, first_body in (("org_a", 2, "a-1"), ("org_b", 1, "B-SECRET")):
        token = auth_header(rsa_issuer.mint(organization_id=org, subject="user_1"))
        response = client.get("/page", headers=token)
        assert response.get_json() == {
            "total": total,
            "pages": total,
            "legacy_total": total,
            "count": total,
            "bodies": [first_body],
        }


# -- row-level security: a role changed by an earlier request ------------------------


@pytest.fixture
def rls_engines(postgres_url: str) -> Iterator[tuple[Engine, str]]:
    """An ordinary application role that may ``SET ROLE`` to a ``BYPASSRLS`` role."""
    suffix = uuid.uuid4().hex[:10]
    schema, role, bypass = f"ovt_p3r_{suffix}", f"ovt_p3app_{suffix}", f"ovt_p3admin_{suffix}"
    password = secrets.token_hex(16)
    search_path = {"options": f"-csearch_path={schema}"}
    admin = create_engine(postgres_url, connect_args=search_path)
    statements = [
        f'CREATE SCHEMA "{schema}"',
        f"CREATE ROLE \"{role}\" LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'",
        f'CREATE ROLE "{bypass}" NOLOGIN NOSUPERUSER BYPASSRLS',
        f'GRANT "{bypass}" TO "{role}"',
        f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}", "{bypass}"',
        "CREATE TABLE notes (id integer PRIMARY KEY, organization_id text NOT NULL)",
        *policy_statements("notes"),
        f'GRANT SELECT ON notes TO "{role}", "{bypass}"',
        "INSERT INTO notes VALUES (1, 'org_a'), (2, 'org_b')",
    ]
    with admin.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    url = make_url(postgres_url).set(username=role, password=password)
    app = create_engine(url, connect_args=search_path, pool_size=1, max_overflow=0)
    try:
        yield app, bypass
    finally:
        app.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            for name in (role, bypass):
                connection.execute(text(f'DROP OWNED BY "{name}"'))
                connection.execute(text(f'DROP ROLE "{name}"'))
        admin.dispose()


def test_rls_refuses_a_pooled_connection_whose_role_an_earlier_request_changed(
    rls_engines: tuple[Engine, str],
) -> None:
    engine, bypass = rls_engines
    maker = sessionmaker(engine)
    rls = enable_row_level_security(maker)
    try:
        with maker() as session, as_organization("org_a"):
            assert session.execute(text("SELECT id FROM notes")).scalars().all() == [1]
            # a session-level SET ROLE outlives the transaction on the pooled connection
            session.execute(text(f'SET ROLE "{bypass}"'))
            session.commit()
        with (
            maker() as session,
            as_organization("org_b"),
            pytest.raises(TenantScopingError, match="superuser or has BYPASSRLS"),
        ):
            session.execute(text("SELECT id FROM notes")).all()
    finally:
        rls.disable()


# -- many-to-many through a tenant association table ---------------------------------


class SharedBase(DeclarativeBase):
    pass


#: Which user is in which group, per organization; users and groups are shared.
memberships = Table(
    "p3_memberships",
    SharedBase.metadata,
    Column("user_id", ForeignKey("p3_users.id"), primary_key=True),
    Column("group_id", ForeignKey("p3_groups.id"), primary_key=True),
    Column("organization_id", String(20), nullable=False),
)


class Group(SharedBase):
    __tablename__ = "p3_groups"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Member(SharedBase):
    __tablename__ = "p3_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    groups: Mapped[list[Group]] = relationship(secondary=memberships, order_by=Group.id)


class Membership(SharedBase):
    """The association object: the same rows, mapped, hence scoped."""

    __table__ = memberships
    group: Mapped[Group] = relationship(overlaps="groups")


class Invoice(SharedBase):
    __tablename__ = "p3_invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    member_id: Mapped[int] = mapped_column(ForeignKey("p3_users.id"))


@pytest.fixture
def shared_maker() -> Iterator[sessionmaker[OrmSession]]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    SharedBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(Member), [{"id": 1}])
        connection.execute(
            insert(Group), [{"id": 1, "name": "a-group"}, {"id": 2, "name": "B-SECRET"}]
        )
        connection.execute(
            insert(memberships),
            [
                {"user_id": 1, "group_id": 1, "organization_id": "org_a"},
                {"user_id": 1, "group_id": 2, "organization_id": "org_b"},
            ],
        )
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=SharedBase.registry)
    yield maker
    scoping.disable()
    engine.dispose()


def test_relationship_through_a_tenant_association_table_is_refused(
    shared_maker: sessionmaker[OrmSession],
) -> None:
    with shared_maker() as session, as_organization("org_a"):
        member = session.get(Member, 1)
        assert member is not None
        statements: list[Any] = [
            select(Member).options(joinedload(Member.groups)),
            select(Member).options(selectinload(Member.groups)),
            select(Group.name).join(Member.groups),
            select(Member.id).where(Member.groups.any(Group.name == "B-SECRET")),
        ]
        for statement in statements:
            with pytest.raises(TenantScopingError, match="p3_memberships"):
                session.execute(statement).unique().all()
        with pytest.raises(TenantScopingError, match="p3_memberships"):
            [group.name for group in member.groups]  # the lazy load


def test_association_object_over_the_same_table_is_scoped(
    shared_maker: sessionmaker[OrmSession],
) -> None:
    with shared_maker() as session, as_organization("org_a"):
        user_id: Any = Membership.user_id  # type: ignore[attr-defined]  # from __table__
        names = session.scalars(select(Group.name).join(Membership.group).where(user_id == 1)).all()
        assert names == ["a-group"]
        statement = select(Group.name).join(Member.groups)
        everyone = session.scalars(unscoped(statement, reason="admin report")).all()
        assert sorted(everyone) == ["B-SECRET", "a-group"]


# -- a base class whose subclass alone has the organization column -------------------


class InheritBase(DeclarativeBase):
    pass


class Item(InheritBase):
    __tablename__ = "p3_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}  # noqa: RUF012


class SecretItem(Item):
    """Single-table inheritance: the column is on the shared table, mapped here only."""

    organization_id: Mapped[str | None] = mapped_column(String(20), nullable=True)
    __mapper_args__ = {"polymorphic_identity": "secret"}  # noqa: RUF012


def test_base_class_refused_also_when_no_result_column_names_it() -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    InheritBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(Item),
            [
                {"id": 1, "kind": "secret", "organization_id": "org_b"},
                {"id": 2, "kind": "item", "organization_id": None},
            ],
        )
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=InheritBase.registry)
    try:
        with maker() as session, as_organization("org_a"):
            for statement in (
                select(Item),
                select(func.count()).select_from(Item),  # counted org_b's secret items
                select(func.count(Item.id)),
                select(SecretItem.id).join(Item, Item.id == SecretItem.id),
            ):
                with pytest.raises(TenantScopingError, match="subclass"):
                    session.execute(statement).all()
            assert session.execute(select(SecretItem.id)).all() == []
    finally:
        scoping.disable()
        engine.dispose()
