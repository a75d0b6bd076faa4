"""PostgreSQL row-level security driven by the verified organization.

Runs against the real PostgreSQL (``OAUTH_VERIFY_TEST_POSTGRES_URL``; fails
in CI when missing). The application connects as a freshly created
non-superuser role — superusers and ``BYPASSRLS`` roles are never subject to
policies — in a private schema; both are dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, request
from sqlalchemy import Engine, String, create_engine, event, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from flask_oauth_verify import require_token
from flask_oauth_verify.rls import (
    DEFAULT_SETTING,
    _before_cursor_execute,
    enable_row_level_security,
    policy_statements,
    set_rls_organization,
)
from flask_oauth_verify.tenancy import (
    TenantScopingError,
    as_organization,
    enable_tenant_scoping,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app


class RlsBase(DeclarativeBase):
    pass


class Doc(RlsBase):
    """A tenant table protected by a row-level security policy."""

    __tablename__ = "rls_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(String(200))


ROWS = [(1, "org_a", "a1"), (2, "org_b", "b1"), (3, "org_a", "a2"), (4, "org_b", "b2")]


def ids_of(org: str) -> list[int]:
    return [row[0] for row in ROWS if row[1] == org]


@dataclasses.dataclass
class RlsDatabase:
    """The admin engine (superuser) and the application's engine (ordinary role)."""

    admin: Engine
    app_engine: Engine
    schema: str
    role: str


@pytest.fixture(scope="module")
def rls_database(postgres_url: str) -> Iterator[RlsDatabase]:
    schema = f"ovt_rls_{uuid.uuid4().hex[:10]}"
    role = f"ovt_app_{uuid.uuid4().hex[:10]}"
    password = secrets.token_hex(16)
    search_path = {"options": f"-csearch_path={schema}"}
    admin = create_engine(postgres_url, connect_args=search_path)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        connection.execute(
            text(f"CREATE ROLE \"{role}\" LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'")
        )
        connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
    RlsBase.metadata.create_all(admin)
    with admin.begin() as connection:
        for statement in policy_statements(Doc.__table__):
            connection.execute(text(statement))
        connection.execute(
            text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{schema}".rls_docs TO "{role}"')
        )
        connection.execute(
            text("INSERT INTO rls_docs (id, organization_id, body) VALUES (:i, :o, :b)"),
            [{"i": i, "o": o, "b": b} for i, o, b in ROWS],
        )
    url = make_url(postgres_url).set(username=role, password=password)
    app_engine = create_engine(url, connect_args=search_path, pool_size=1, max_overflow=0)
    try:
        yield RlsDatabase(admin, app_engine, schema, role)
    finally:
        app_engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.fixture
def rls_maker(rls_database: RlsDatabase) -> Iterator[sessionmaker[Session]]:
    maker = sessionmaker(rls_database.app_engine)
    rls = enable_row_level_security(maker)
    yield maker
    rls.disable()


def reset_rows(rls_database: RlsDatabase) -> None:
    with rls_database.admin.begin() as connection:
        connection.execute(text("DELETE FROM rls_docs"))
        connection.execute(
            text("INSERT INTO rls_docs (id, organization_id, body) VALUES (:i, :o, :b)"),
            [{"i": i, "o": o, "b": b} for i, o, b in ROWS],
        )


@pytest.fixture
def rls_app(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase, tokens: TokenIssuer
) -> Flask:
    reset_rows(rls_database)
    app = make_app(tokens.config(audience="api"), name="rls")

    @app.get("/docs-text")
    @require_token
    def docs_text() -> dict[str, Any]:
        with rls_maker() as session:
            rows = session.execute(text("SELECT id, organization_id FROM rls_docs ORDER BY id"))
            return {"rows": [{"id": i, "organization_id": o} for i, o in rows]}

    @app.get("/docs-orm")
    @require_token
    def docs_orm() -> dict[str, Any]:
        with rls_maker() as session:
            docs = session.scalars(select(Doc).order_by(Doc.id))
            return {"rows": [{"id": d.id, "organization_id": d.organization_id} for d in docs]}

    @app.post("/docs-text")
    @require_token
    def insert_text() -> dict[str, Any]:
        payload = request.get_json()
        with rls_maker() as session:
            session.execute(
                text("INSERT INTO rls_docs (id, organization_id, body) VALUES (:i, :o, 'x')"),
                {"i": payload["id"], "o": payload["organization_id"]},
            )
            session.commit()
        return {"ok": True}

    @app.post("/docs-text/rename-all")
    @require_token
    def rename_text() -> dict[str, Any]:
        with rls_maker() as session:
            result = session.execute(text("UPDATE rls_docs SET body = 'renamed'"))
            session.commit()
        return {"rowcount": result.rowcount}  # type: ignore[attr-defined]

    return app


def get_rows(app: Flask, tokens: TokenIssuer, path: str, org: str | None) -> list[Any]:
    response = app.test_client().get(path, headers=auth_header(tokens.mint(organization_id=org)))
    assert response.status_code == 200
    return [row["id"] for row in response.get_json()["rows"]]


def stored(rls_database: RlsDatabase) -> list[tuple[Any, ...]]:
    with rls_database.admin.connect() as connection:
        result = connection.execute(text("SELECT * FROM rls_docs ORDER BY id"))
        return [tuple(row) for row in result]


def test_the_application_role_is_subject_to_policies(rls_database: RlsDatabase) -> None:
    with rls_database.app_engine.connect() as connection:
        row = connection.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).one()
        assert tuple(row) == (False, False)
        forced = connection.execute(
            text(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                "WHERE oid = 'rls_docs'::regclass"
            )
        ).one()
        assert tuple(forced) == (True, True)


@pytest.mark.parametrize("path", ["/docs-text", "/docs-orm"])
def test_raw_sql_sees_only_the_tokens_organization(
    rls_app: Flask, tokens: TokenIssuer, path: str
) -> None:
    for org in ("org_a", "org_b", "org_c"):
        assert get_rows(rls_app, tokens, path, org) == ids_of(org)
    assert get_rows(rls_app, tokens, path, None) == []  # no organization: no rows


def test_raw_sql_writes_are_confined(
    rls_app: Flask, tokens: TokenIssuer, rls_database: RlsDatabase
) -> None:
    client = rls_app.test_client()
    token = auth_header(tokens.mint(organization_id="org_a"))
    response = client.post("/docs-text/rename-all", headers=token)
    assert response.get_json() == {"rowcount": len(ids_of("org_a"))}
    assert [r[2] == "renamed" for r in stored(rls_database)] == [r[1] == "org_a" for r in ROWS]
    before = stored(rls_database)
    with pytest.raises(ProgrammingError, match="row-level security"):
        client.post("/docs-text", headers=token, json={"id": 9, "organization_id": "org_b"})
    assert stored(rls_database) == before
    assert (
        client.post(
            "/docs-text", headers=token, json={"id": 9, "organization_id": "org_a"}
        ).status_code
        == 200
    )
    assert stored(rls_database)[-1][:2] == (9, "org_a")


def test_the_setting_is_transaction_local(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    with rls_maker() as session, as_organization("org_b"):
        setting = session.scalar(text(f"SELECT current_setting('{DEFAULT_SETTING}', true)"))
        assert setting == "org_b"
        session.commit()
    # the pool has one connection: the next user of it must not inherit org_b
    with rls_database.app_engine.connect() as connection:
        after = connection.scalar(text(f"SELECT current_setting('{DEFAULT_SETTING}', true)"))
        assert after in ("", None)
        assert connection.execute(text("SELECT id FROM rls_docs")).all() == []


def test_switching_organization_inside_a_transaction(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    reset_rows(rls_database)
    query = text("SELECT id FROM rls_docs ORDER BY id")
    with rls_maker() as session:
        with as_organization("org_a"):
            assert session.scalars(query).all() == ids_of("org_a")
        with as_organization("org_b"):
            assert session.scalars(query).all() == ids_of("org_b")
            session.add(Doc(id=10, organization_id="org_b", body="new"))
            session.flush()
        assert session.scalars(query).all() == []  # no organization any more
        session.rollback()


def test_session_connection_follows_the_organization(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    """``session.connection().execute()`` after an ``as_organization`` block."""
    reset_rows(rls_database)
    query = text("SELECT id FROM rls_docs ORDER BY id")
    with rls_maker() as session, as_organization("org_a"):
        with as_organization("org_b"):
            assert session.scalars(query).all() == ids_of("org_b")
        assert session.connection().execute(query).scalars().all() == ids_of("org_a")
        with as_organization("org_b"):
            raw = session.connection().exec_driver_sql("SELECT id FROM rls_docs ORDER BY id")
            assert raw.scalars().all() == ids_of("org_b")


def test_rollback_to_savepoint_does_not_keep_a_stale_setting(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    """A savepoint per organization: ROLLBACK TO SAVEPOINT undoes set_config()."""
    reset_rows(rls_database)
    query = text("SELECT id FROM rls_docs ORDER BY id")
    setting = text(f"SELECT current_setting('{DEFAULT_SETTING}', true)")
    with rls_maker() as session:
        for org in ("org_b", "org_a"):
            with as_organization(org):
                savepoint = session.begin_nested()
                assert session.scalars(query).all() == ids_of(org)
                savepoint.rollback()  # this organization's step failed
        with as_organization("org_a"):
            assert session.scalar(setting) == "org_a"
            assert session.scalars(query).all() == ids_of("org_a")
        with as_organization("org_b"):
            assert session.connection().execute(query).scalars().all() == ids_of("org_b")
    with rls_maker() as session, as_organization("org_a"):
        savepoint = session.begin_nested()
        assert session.scalars(query).all() == ids_of("org_a")  # SAVEPOINT at org_a
        with as_organization("org_b"):
            assert session.scalars(query).all() == ids_of("org_b")
            savepoint.rollback()  # undoes set_config(): the setting is org_a again
            assert session.scalar(setting) == "org_b"
            assert session.scalars(query).all() == ids_of("org_b")


def test_rollback_to_savepoint_written_as_text_is_seen(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    reset_rows(rls_database)
    query = text("SELECT id FROM rls_docs ORDER BY id")
    with rls_maker() as session, as_organization("org_a"):
        session.execute(text("SAVEPOINT step"))  # taken at org_a
        with as_organization("org_b"):
            assert session.scalars(query).all() == ids_of("org_b")
            session.execute(text("ROLLBACK TO SAVEPOINT step"))  # the setting is org_a again
            assert session.scalars(query).all() == ids_of("org_b")


def test_row_level_security_never_listens_on_the_engine(rls_database: RlsDatabase) -> None:
    """Nothing is added to a shared engine at run time, so disable() leaves nothing behind.

    (SQLAlchemy's listener lists are not safe to change while other threads
    run statements on the engine.)
    """
    reset_rows(rls_database)
    engine = create_engine(
        rls_database.app_engine.url,
        connect_args={"options": f"-csearch_path={rls_database.schema}"},
    )
    query = text("SELECT id FROM rls_docs ORDER BY id")
    try:
        with engine.connect() as connection:
            maker = sessionmaker(connection)  # the connection outlives the sessions
            rls = enable_row_level_security(maker)
            try:
                with as_organization("org_a"):
                    with maker() as session:
                        assert session.scalars(query).all() == ids_of("org_a")
                        session.commit()
                    # the session's transaction ended; the next one is set again
                    assert connection.execute(query).scalars().all() == ids_of("org_a")
                    connection.rollback()
                    with maker() as session, as_organization("org_b"):
                        assert session.scalars(query).all() == ids_of("org_b")
                assert not event.contains(engine, "before_cursor_execute", _before_cursor_execute)
            finally:
                rls.disable()
            with maker() as session, as_organization("org_a"):
                assert session.scalars(query).all() == []  # disabled: no setting
    finally:
        engine.dispose()


def test_core_connection_with_explicit_setting(rls_database: RlsDatabase) -> None:
    reset_rows(rls_database)
    with rls_database.app_engine.begin() as connection:
        assert set_rls_organization(connection, "org_b") == "org_b"
        rows = connection.execute(text("SELECT id FROM rls_docs ORDER BY id")).scalars().all()
        assert rows == ids_of("org_b")
    with rls_database.app_engine.begin() as connection, as_organization("org_a"):
        set_rls_organization(connection)
        rows = connection.execute(text("SELECT id FROM rls_docs ORDER BY id")).scalars().all()
        assert rows == ids_of("org_a")
    with rls_database.app_engine.begin() as connection:
        assert set_rls_organization(connection) == ""  # no context: nothing matches
        assert connection.execute(text("SELECT id FROM rls_docs")).all() == []


def test_superuser_bypasses_policies(rls_database: RlsDatabase) -> None:
    """Why the application must not connect as a superuser."""
    reset_rows(rls_database)
    with rls_database.admin.begin() as connection:
        set_rls_organization(connection, "org_a")
        assert len(connection.execute(text("SELECT id FROM rls_docs")).all()) == len(ROWS)


def test_a_role_policies_never_apply_to_is_refused(rls_database: RlsDatabase) -> None:
    """RLS on a superuser (or BYPASSRLS) connection would silently do nothing."""
    reset_rows(rls_database)
    maker = sessionmaker(rls_database.admin)
    rls = enable_row_level_security(maker)
    try:
        with maker() as session, as_organization("org_a"):
            with pytest.raises(TenantScopingError, match="superuser or has BYPASSRLS"):
                session.execute(text("SELECT id FROM rls_docs"))
            session.rollback()
            # every transaction, not only the first one of the connection
            with pytest.raises(TenantScopingError, match="superuser or has BYPASSRLS"):
                session.execute(select(Doc.id))
    finally:
        rls.disable()
    # an admin engine says so explicitly, and then sees every organization
    rls = enable_row_level_security(maker, allow_bypass_role=True)
    try:
        with maker() as session, as_organization("org_a"):
            assert len(session.execute(text("SELECT id FROM rls_docs")).all()) == len(ROWS)
    finally:
        rls.disable()


def test_rls_and_automatic_scoping_together(
    rls_maker: sessionmaker[Session], rls_database: RlsDatabase
) -> None:
    reset_rows(rls_database)
    scoping = enable_tenant_scoping(rls_maker, models=[Doc])
    try:
        with rls_maker() as session, as_organization("org_b"):
            assert session.scalars(select(Doc.id).order_by(Doc.id)).all() == ids_of("org_b")
            upsert = pg_insert(Doc).values(id=1, organization_id="org_b", body="x")
            with pytest.raises(TenantScopingError, match="upsert"):
                session.execute(
                    upsert.on_conflict_do_update(index_elements=["id"], set_={"body": "x"})
                )
            ignored = pg_insert(Doc).values(id=1, organization_id="org_b", body="x")
            session.execute(ignored.on_conflict_do_nothing())
            session.commit()
        assert stored(rls_database)[0] == (1, "org_a", "a1")
    finally:
        scoping.disable()


def test_enable_twice_is_an_error(rls_maker: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_row_level_security(rls_maker)


def test_rls_needs_postgresql() -> None:
    engine = create_engine("sqlite://")
    maker = sessionmaker(engine)
    rls = enable_row_level_security(maker)
    try:
        with maker() as session, pytest.raises(TenantScopingError, match="PostgreSQL"):
            session.execute(text("SELECT 1"))
    finally:
        rls.disable()
        engine.dispose()


def test_policy_statements() -> None:
    statements = policy_statements(Doc.__table__, cast="text", name="iso")
    assert statements[0] == "ALTER TABLE rls_docs ENABLE ROW LEVEL SECURITY"
    assert statements[1] == "ALTER TABLE rls_docs FORCE ROW LEVEL SECURITY"
    assert "NULLIF(current_setting('app.current_organization', true), '')" in statements[2]
    assert statements[2].startswith("CREATE POLICY iso ON rls_docs USING (organization_id = (")
    assert len(policy_statements("docs", force=False)) == 2
    for bad in ("nodot", "app.x'; DROP TABLE t; --", ""):
        with pytest.raises(ValueError, match="setting"):
            policy_statements("docs", setting=bad)
    with pytest.raises(ValueError, match="type"):
        policy_statements("docs", cast="uuid); DROP TABLE t")
