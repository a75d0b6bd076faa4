"""Tenant scoping through real HTTP requests, on SQLite and the real PostgreSQL.

Every read view is called with a token of each organization (and of one
without data); the answer must be exactly that organization's rows. Writes
across organizations must be refused before they reach the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import click
import pytest
from flask import Flask, g
from sqlalchemy import ForeignKey, String, create_engine, func, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from flask_oauth_verify import (
    MissingOrganizationContext,
    MissingUserContext,
    org_scoped,
    require_organization,
    require_user,
    user_scoped,
)
from flask_oauth_verify.tenancy import (
    BYPASS_OPTION,
    CrossTenantWriteError,
    TenantContextError,
    TenantScoping,
    TenantScopingError,
    as_organization,
    current_organization_id,
    current_user_id,
    enable_tenant_scoping,
    unscoped,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app
from .tenancy_support import (
    DATA,
    ORGS,
    PAGED_PATHS,
    READ_CASES,
    Database,
    PostgresSchema,
    Project,
    ReadCase,
    Task,
    TenantApp,
    db,
    foreign_rows,
    open_app,
    sqlite_database,
)

# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    """Each test runs on SQLite and on PostgreSQL (a private schema)."""
    if request.param == "sqlite":
        yield sqlite_database()
        return
    url = request.getfixturevalue("postgres_url")
    with PostgresSchema(url) as schema:
        yield Database("postgresql", url, schema.options(), schema.name)


@pytest.fixture(scope="module")
def tenant_app(database: Database, rsa_issuer: TokenIssuer) -> Iterator[TenantApp]:
    yield from open_app(rsa_issuer, database)


@pytest.fixture
def env(tenant_app: TenantApp) -> TenantApp:
    """The app with the default data set freshly loaded, no automatic scoping."""
    tenant_app.reset()
    return tenant_app


@pytest.fixture
def auto(env: TenantApp) -> Iterator[TenantApp]:
    """The app with automatic scoping enabled on ``db``."""
    scoping = enable_tenant_scoping(db)
    yield env
    scoping.disable()


def call(
    env: TenantApp,
    method: str,
    path: str,
    org: str | None,
    *,
    json: Any = None,
    subject: str = "user_1",
    **claims: Any,
) -> tuple[int, Any]:
    """Call ``path`` with a token of ``org``; return the status and JSON body."""
    token = env.issuer.mint(organization_id=org, subject=subject, **claims)
    client = env.app.test_client()
    response = client.open(path, method=method, headers=auth_header(token), json=json)
    return response.status_code, response.get_json(silent=True)


def db_rows(env: TenantApp, model: Any) -> list[tuple[Any, ...]]:
    """Every row of ``model``'s table as stored, read without any scoping."""
    table = model.__table__
    with env.session() as session:
        return [tuple(row) for row in session.execute(select(table).order_by(table.c.id))]


# -- reads: every query style, every organization ---------------------------------------


def _read_id(case: ReadCase) -> str:
    return case.path


@pytest.mark.parametrize("case", READ_CASES, ids=_read_id)
def test_each_organization_reads_exactly_its_rows(auto: TenantApp, case: ReadCase) -> None:
    for org in ORGS:
        status, body = call(auto, "GET", case.path, org)
        assert status == 200, (org, body)
        assert foreign_rows(body, org) == []
        assert case.extract(body) == case.expect(auto.data, org), org


@pytest.mark.parametrize(
    "case", [c for c in READ_CASES if c.path.startswith("/explicit/")], ids=_read_id
)
def test_explicit_helpers_scope_without_automatic_scoping(env: TenantApp, case: ReadCase) -> None:
    for org in ORGS:
        status, body = call(env, "GET", case.path, org)
        assert status == 200, (org, body)
        assert foreign_rows(body, org) == []
        assert case.extract(body) == case.expect(env.data, org), org


def test_views_without_scoping_would_leak(env: TenantApp) -> None:
    """The control: the same automatic views, scoping off, see every organization."""
    status, body = call(env, "GET", "/auto/projects", "org_a")
    assert status == 200
    assert {row["organization_id"] for row in body["rows"]} == {"org_a", "org_b"}


@pytest.mark.parametrize("path", PAGED_PATHS)
def test_pagination_walks_only_own_rows(env: TenantApp, path: str) -> None:
    scoping = enable_tenant_scoping(db) if path.startswith("/auto/") else None
    try:
        for org in ORGS:
            seen: list[int] = []
            expected = [p.id for p in env.data.projects_of(org)]
            for page in range(1, 5):
                status, body = call(env, "GET", f"{path}?page={page}&per_page=2", org)
                assert status == 200
                assert foreign_rows(body, org) == []
                assert body["total"] == len(expected)
                seen += [row["id"] for row in body["rows"]]
            assert seen == expected, (path, org)
    finally:
        if scoping is not None:
            scoping.disable()


def test_get_by_primary_key_and_lazy_load(auto: TenantApp) -> None:
    for org in ORGS:
        for project in DATA.projects:
            status, body = call(auto, "GET", f"/auto/projects/{project.id}", org)
            if project.organization_id == org:
                assert (status, body["id"]) == (200, project.id)
            else:
                assert status == 404
            status, body = call(auto, "GET", f"/auto/projects/{project.id}/tasks", org)
            if project.organization_id != org:
                assert status == 404
                continue
            own = [t.id for t in DATA.tasks_of(org) if t.project_id == project.id]
            assert [row["id"] for row in body["rows"]] == own
            assert foreign_rows(body, org) == []


def test_shared_tables_are_readable_with_an_organization(auto: TenantApp) -> None:
    for org in ORGS:
        assert call(auto, "GET", "/auto/plans", org) == (200, {"rows": list(DATA.plans)})


def test_only_verified_claims_choose_the_organization(auto: TenantApp) -> None:
    token = auto.issuer.mint(organization_id="org_a")
    client = auto.app.test_client()
    response = client.get(
        "/auto/projects?organization_id=org_b",
        headers={**auth_header(token), "X-Organization-Id": "org_b", "X-Tenant": "org_b"},
    )
    assert response.status_code == 200
    assert {row["organization_id"] for row in response.get_json()["rows"]} == {"org_a"}
    forged = TokenIssuer(issuer=auto.issuer.issuer, audience="api")  # another key
    response = client.get(
        "/auto/projects", headers=auth_header(forged.mint(organization_id="org_b"))
    )
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"


# -- fail closed ---------------------------------------------------------------------


def assert_missing_organization(status: int, body: Any) -> None:
    assert status == 401
    assert body["error"] == "missing_organization_context"


@pytest.mark.parametrize(
    "path", ["/auto/projects", "/auto/projects-query", "/auto/plans", "/explicit/projects"]
)
@pytest.mark.parametrize("org", [None, ""])
def test_token_without_organization_gets_401(auto: TenantApp, path: str, org: str | None) -> None:
    token = auto.issuer.mint(organization_id=org)
    response = auto.app.test_client().get(path, headers=auth_header(token))
    assert_missing_organization(response.status_code, response.get_json())
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge


def test_writes_without_organization_get_401(auto: TenantApp) -> None:
    before = db_rows(auto, Project)
    status, body = call(auto, "POST", "/auto/projects", None, json={"name": "x"})
    assert_missing_organization(status, body)
    assert db_rows(auto, Project) == before


def test_optional_token_missing_fails_closed(auto: TenantApp) -> None:
    response = auto.app.test_client().get("/auto/optional-projects")
    assert_missing_organization(response.status_code, response.get_json())


def test_no_context_outside_a_request_raises(auto: TenantApp) -> None:
    with auto.app.app_context():
        with pytest.raises(TenantContextError, match="as_organization"):
            db.session.scalars(select(Project)).all()
        with pytest.raises(TenantContextError):
            org_scoped(select(Project))
        db.session.add(Project(name="orphan"))
        with pytest.raises(TenantContextError):
            db.session.flush()
        db.session.rollback()
    with pytest.raises(TenantContextError):
        current_organization_id()
    assert [r for r in db_rows(auto, Project) if r[2] == "orphan"] == []


def test_explicit_helper_without_organization_in_request_is_401(env: TenantApp) -> None:
    token = env.issuer.mint(organization_id=None)
    response = env.app.test_client().get("/explicit/projects", headers=auth_header(token))
    assert_missing_organization(response.status_code, response.get_json())


# -- acting as an organization outside a request ----------------------------------------


def test_as_organization_in_a_cli_command(auto: TenantApp) -> None:
    @auto.app.cli.command("count-projects")
    @click.argument("org")
    def count_projects(org: str) -> None:
        with as_organization(org):
            names = db.session.scalars(select(Project.name).order_by(Project.id)).all()
        click.echo(",".join(names))

    for org in ORGS:
        result = auto.app.test_cli_runner().invoke(args=["count-projects", org])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == ",".join(p.name for p in DATA.projects_of(org))


def test_as_organization_nests_restores_and_stamps_writes(auto: TenantApp) -> None:
    with auto.app.app_context():
        with as_organization("org_a"):
            assert current_organization_id() == "org_a"
            with as_organization("org_b", user_id="user_3"):
                assert current_organization_id() == "org_b"
                assert current_user_id() == "user_3"
                db.session.add(Project(name="made by job"))
                db.session.commit()
            assert current_organization_id() == "org_a"
            with pytest.raises(TenantContextError):
                current_user_id()  # the block names no user
        with pytest.raises(TenantContextError):
            current_organization_id()
    assert [r[1] for r in db_rows(auto, Project) if r[2] == "made by job"] == ["org_b"]


def test_as_organization_does_not_leak_into_other_threads(auto: TenantApp) -> None:
    outcome: dict[str, object] = {}
    done = threading.Event()

    def worker() -> None:
        try:
            with auto.app.app_context():
                db.session.scalars(select(Project)).all()
            outcome["result"] = "read"
        except TenantContextError as exc:
            outcome["result"] = exc
        finally:
            done.set()

    with as_organization("org_a"):
        thread = threading.Thread(target=worker)
        thread.start()
        assert done.wait(30)
        thread.join()
    assert isinstance(outcome["result"], TenantContextError)


def test_as_organization_inside_a_request_wins(auto: TenantApp) -> None:
    assert call(auto, "GET", "/auto/impersonate", "org_a") == (
        200,
        {"orgs": ["org_b"], "token": "org_a"},
    )


@pytest.mark.parametrize("value", ["", None, 5])
def test_as_organization_rejects_empty_ids(value: Any) -> None:
    with pytest.raises(ValueError, match="non-empty"), as_organization(value):
        pass


# -- writes ------------------------------------------------------------------------------


def test_create_stamps_the_callers_organization(auto: TenantApp) -> None:
    for org in ("org_a", "org_b"):
        status, body = call(auto, "POST", "/auto/projects", org, json={"name": f"new {org}"})
        assert (status, body["organization_id"]) == (201, org)
    stored = {r[2]: r[1] for r in db_rows(auto, Project)}
    assert stored["new org_a"] == "org_a" and stored["new org_b"] == "org_b"


def test_child_appended_through_relationship_is_stamped(auto: TenantApp) -> None:
    status, body = call(auto, "POST", "/auto/projects/1/tasks", "org_a", json={"title": "t"})
    assert (status, body["organization_id"], body["project_id"]) == (201, "org_a", 1)
    status, _body = call(auto, "POST", "/auto/projects/1/tasks", "org_b", json={"title": "t"})
    assert status == 404


def assert_refused(status: int, body: Any) -> None:
    assert status == 403
    assert body["error"] == "cross_tenant_write"


def test_create_for_another_organization_is_refused(auto: TenantApp) -> None:
    before = db_rows(auto, Project)
    status, body = call(
        auto, "POST", "/auto/projects", "org_a", json={"name": "x", "organization_id": "org_b"}
    )
    assert_refused(status, body)
    assert db_rows(auto, Project) == before


def test_update_and_delete_of_another_organizations_row_are_not_found(auto: TenantApp) -> None:
    before = (db_rows(auto, Project), db_rows(auto, Task))
    assert call(auto, "PATCH", "/auto/projects/3", "org_a", json={"name": "x"})[0] == 404
    assert call(auto, "DELETE", "/auto/tasks/3", "org_a")[0] == 404
    assert (db_rows(auto, Project), db_rows(auto, Task)) == before
    assert call(auto, "DELETE", "/auto/tasks/1", "org_a")[0] == 204
    assert [r[0] for r in db_rows(auto, Task)] == [2, 3, 4, 5, 6, 7]


def test_moving_a_row_to_another_organization_is_refused(auto: TenantApp) -> None:
    before = db_rows(auto, Project)
    status, body = call(
        auto, "PATCH", "/auto/projects/1", "org_a", json={"organization_id": "org_b"}
    )
    assert_refused(status, body)
    move = {"organization_id": "org_b"}
    status, body = call(auto, "POST", "/auto/projects/move-all", "org_a", json=move)
    assert_refused(status, body)
    assert db_rows(auto, Project) == before


def test_bulk_update_and_delete_touch_only_own_rows(auto: TenantApp) -> None:
    status, body = call(auto, "POST", "/auto/projects/rename-all", "org_a", json={"name": "Z"})
    assert (status, body["rowcount"]) == (200, len(DATA.projects_of("org_a")))
    names = {r[0]: r[2] for r in db_rows(auto, Project)}
    assert names == {p.id: ("Z" if p.organization_id == "org_a" else p.name) for p in DATA.projects}
    status, body = call(auto, "POST", "/auto/tasks/delete-all", "org_b")
    assert (status, body["rowcount"]) == (200, len(DATA.tasks_of("org_b")))
    assert [r[1] for r in db_rows(auto, Task)] == ["org_a"] * len(DATA.tasks_of("org_a"))


def test_bulk_update_by_primary_key_is_checked(auto: TenantApp) -> None:
    before = db_rows(auto, Task)
    rows = [{"id": 1, "title": "mine"}, {"id": 3, "title": "theirs"}]
    status, body = call(auto, "POST", "/auto/tasks/bulk-update", "org_a", json=rows)
    assert_refused(status, body)
    assert db_rows(auto, Task) == before
    rows = [{"id": 1, "title": "mine"}, {"id": 2, "title": "also mine"}]
    assert call(auto, "POST", "/auto/tasks/bulk-update", "org_a", json=rows)[0] == 200
    assert [r[3] for r in db_rows(auto, Task)][:2] == ["mine", "also mine"]
    rows = [{"id": 1, "organization_id": "org_b"}]
    assert_refused(*call(auto, "POST", "/auto/tasks/bulk-update", "org_a", json=rows))


def test_bulk_insert_is_stamped_or_refused(auto: TenantApp) -> None:
    rows = [{"project_id": 1, "title": "n1"}, {"project_id": 2, "title": "n2"}]
    status, body = call(auto, "POST", "/auto/tasks/bulk-insert", "org_a", json=rows)
    assert status == 201
    assert [r["organization_id"] for r in body["rows"]] == ["org_a", "org_a"]
    before = db_rows(auto, Task)
    rows = [
        {"project_id": 1, "title": "n3"},
        {"project_id": 3, "title": "x", "organization_id": "org_b"},
    ]
    assert_refused(*call(auto, "POST", "/auto/tasks/bulk-insert", "org_a", json=rows))
    assert db_rows(auto, Task) == before


def test_legacy_bulk_methods_are_guarded(auto: TenantApp) -> None:
    before = db_rows(auto, Task)
    for rows in ([{"id": 3, "title": "theirs"}], [{"id": 1, "organization_id": "org_b"}]):
        status, body = call(auto, "POST", "/auto/tasks/legacy-bulk-update", "org_a", json=rows)
        assert_refused(status, body)
    rows = [{"id": 20, "project_id": 3, "title": "planted", "organization_id": "org_b"}]
    assert_refused(*call(auto, "POST", "/auto/tasks/legacy-bulk-insert", "org_a", json=rows))
    assert db_rows(auto, Task) == before
    rows = [{"id": 1, "title": "mine"}]
    assert call(auto, "POST", "/auto/tasks/legacy-bulk-update", "org_a", json=rows)[0] == 200
    rows = [{"id": 20, "project_id": 1, "title": "stamped"}]
    assert call(auto, "POST", "/auto/tasks/legacy-bulk-insert", "org_a", json=rows)[0] == 201
    stored = {r[0]: r for r in db_rows(auto, Task)}
    assert (stored[1][3], stored[20][1]) == ("mine", "org_a")


def test_tenant_model_of_another_registry_is_refused_not_skipped(auto: TenantApp) -> None:
    """``enable_tenant_scoping(db)`` scopes ``db.Model``'s classes; others fail closed."""
    with auto.app.app_context(), as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="another declarative base"):
            db.session.execute(select(Invoice))
        db.session.add(Invoice(id=1, organization_id="org_b"))
        with pytest.raises(TenantScopingError, match="another declarative base"):
            db.session.flush()
        db.session.rollback()
        assert [p.id for p in db.session.scalars(select(Project))] == [1, 2, 5]
        # Core on its table is refused like Core on any tenant table
        with pytest.raises(TenantScopingError, match="Core statement"):
            db.session.execute(select(Invoice.__table__.c.id))


def test_explicit_update_is_scoped(env: TenantApp) -> None:
    status, body = call(env, "POST", "/explicit/projects/rename-all", "org_b", json={"name": "Q"})
    assert (status, body["rowcount"]) == (200, len(DATA.projects_of("org_b")))
    names = {r[0]: r[2] for r in db_rows(env, Project)}
    assert names == {p.id: ("Q" if p.organization_id == "org_b" else p.name) for p in DATA.projects}


# -- admin opt-out ------------------------------------------------------------------------


def test_unscoped_statement_is_logged_and_sees_everything(
    auto: TenantApp, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_oauth_verify.tenancy"):
        status, body = call(auto, "GET", "/auto/admin/projects", "org_a")
    assert status == 200
    assert [row["id"] for row in body["rows"]] == [p.id for p in DATA.projects]
    messages = [r.getMessage() for r in caplog.records]
    assert any("bypassed" in m and "admin report" in m for m in messages), messages


def test_unscoped_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        unscoped(select(Project), reason=" ")


def test_objects_read_unscoped_cannot_be_written_in_another_context(auto: TenantApp) -> None:
    with auto.app.app_context(), as_organization("org_a"):
        theirs = db.session.scalars(
            unscoped(select(Project).where(Project.id == 3), reason="support ticket")
        ).one()
        theirs.name = "changed"
        with pytest.raises(CrossTenantWriteError):
            db.session.flush()
        db.session.rollback()
        theirs = db.session.scalars(unscoped(select(Task).where(Task.id == 3), reason="x")).one()
        db.session.delete(theirs)
        with pytest.raises(CrossTenantWriteError):
            db.session.flush()
        db.session.rollback()
        # a lazy load from an unscoped object is scoped again
        project = db.session.scalars(
            unscoped(select(Project).where(Project.id == 1), reason="x")
        ).one()
        assert [t.id for t in project.tasks] == [1, 2]
    with auto.app.app_context(), as_organization("org_b"):
        task = db.session.scalars(unscoped(select(Task).where(Task.id == 3), reason="x")).one()
        db.session.delete(task)
        db.session.commit()  # acting for the row's own organization works
    assert 3 not in [r[0] for r in db_rows(auto, Task)]


# -- what automatic scoping refuses or cannot see ---------------------------------------


def test_core_statements_on_tenant_tables_are_refused(auto: TenantApp) -> None:
    table = Project.__table__
    with auto.app.app_context(), as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="Core statement"):
            db.session.execute(select(table)).all()
        with pytest.raises(TenantScopingError, match="Core statement"):
            db.session.execute(update(table).values(name="x"))
        with pytest.raises(TenantScopingError, match="INSERT"):
            db.session.execute(
                insert(Task).from_select(
                    ["organization_id", "project_id", "title"],
                    select(Task.organization_id, Task.project_id, Task.title),
                )
            )
        rows = db.session.execute(org_scoped(select(table))).all()
        assert {row.organization_id for row in rows} == {"org_a"}
        # text() is not seen: the documented limit row-level security closes
        seen = db.session.execute(text("SELECT organization_id FROM ovt_projects")).all()
        assert {row[0] for row in seen} == {"org_a", "org_b"}


def test_from_statement_rows_are_checked_on_load(auto: TenantApp) -> None:
    with auto.app.app_context(), as_organization("org_a"):
        statement = select(Project).from_statement(text("SELECT * FROM ovt_projects ORDER BY id"))
        with pytest.raises(TenantScopingError, match="another organization"):
            db.session.scalars(statement).all()
        db.session.rollback()
        own = select(Project).from_statement(
            text("SELECT * FROM ovt_projects WHERE organization_id = 'org_a'")
        )
        assert {p.organization_id for p in db.session.scalars(own)} == {"org_a"}


# -- explicit helpers ------------------------------------------------------------------------


def test_user_scoped_returns_the_users_rows_of_the_organization(env: TenantApp) -> None:
    for org in ("org_a", "org_b"):
        for user in ("user_1", "user_2", "user_3"):
            status, body = call(env, "GET", "/explicit/my-tasks", org, subject=user)
            assert status == 200
            expected = [t.id for t in DATA.tasks_of(org) if t.user_id == user]
            assert [row["id"] for row in body["rows"]] == expected
            assert {row["user_id"] for row in body["rows"]} <= {user}


def test_helpers_take_the_documented_keyword_names(env: TenantApp) -> None:
    """DESIGN.md: ``org_scoped(query_or_select, column=None)``, ``user_scoped(...)``."""
    with env.app.app_context(), as_organization("org_b", user_id="user_3"):
        own = org_scoped(query_or_select=select(Task), column=Task.organization_id)
        mine = user_scoped(query_or_select=own, column=Task.user_id)
        rows = db.session.scalars(mine.order_by(Task.id)).all()
    expected = [t.id for t in DATA.tasks_of("org_b") if t.user_id == "user_3"]
    assert expected and [t.id for t in rows] == expected


def test_user_scoped_without_user_is_401(env: TenantApp) -> None:
    # a client-credentials token: the subject is the client, no user
    status, body = call(env, "GET", "/explicit/user-scoped", "org_a", subject="client-1")
    assert status == 401
    assert body["error"] == "missing_user_context"


def test_org_scoped_fails_closed_on_a_statement_without_the_column(env: TenantApp) -> None:
    from .tenancy_support import Plan

    with env.app.app_context(), as_organization("org_a"):
        with pytest.raises(TenantScopingError, match="organization_id"):
            org_scoped(select(Plan))
        with pytest.raises(TypeError):
            org_scoped(text("SELECT 1"))


def test_org_scoped_uses_the_configured_column_name(rsa_issuer: TokenIssuer) -> None:
    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        tenant: Mapped[str] = mapped_column(String(20))

    app = make_app(rsa_issuer.config(audience="api", ORGANIZATION_COLUMN="tenant"))
    with app.app_context(), as_organization("t1"):
        statement = org_scoped(select(Note))
        assert "notes.tenant = :tenant_1" in str(statement)
        params = statement.compile().params
        assert params["tenant_1"] == "t1"
        assert set(params.values()) == {"t1"}


# -- automatic scoping set-up -----------------------------------------------------------------


class MixinBase(DeclarativeBase):
    pass


class TenantMixin:
    organization_id: Mapped[str] = mapped_column(String(20))


class Invoice(TenantMixin, MixinBase):
    __tablename__ = "mx_invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    lines: Mapped[list[InvoiceLine]] = relationship(order_by="InvoiceLine.id")


class InvoiceLine(TenantMixin, MixinBase):
    __tablename__ = "mx_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("mx_invoices.id"))


class AuditEntry(MixinBase):
    """Has the column but is deliberately left out by ``models=TenantMixin``."""

    __tablename__ = "mx_audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))


@pytest.fixture
def mixin_maker() -> Iterator[sessionmaker[Session]]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    MixinBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Invoice(id=1, organization_id="a"),
                Invoice(id=2, organization_id="b"),
                InvoiceLine(id=1, invoice_id=1, organization_id="a"),
                InvoiceLine(id=2, invoice_id=1, organization_id="b"),
                AuditEntry(id=1, organization_id="a"),
                AuditEntry(id=2, organization_id="b"),
            ]
        )
        session.commit()
    yield sessionmaker(engine)
    engine.dispose()


def test_models_restricts_scoping_to_a_mixin(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    try:
        assert {cls for cls, _key in scoping.tenant_classes()} == {Invoice, InvoiceLine}
        with mixin_maker() as session, as_organization("a"):
            assert session.scalars(select(Invoice.id)).all() == [1]
            assert [line.id for line in session.get(Invoice, 1).lines] == [1]  # type: ignore[union-attr]
            assert session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)).all() == [1, 2]
    finally:
        scoping.disable()


def test_a_class_mapped_later_is_scoped_too(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    try:
        with mixin_maker() as session, as_organization("a"):
            assert session.scalars(select(Invoice.id)).all() == [1]

        class LateBase(DeclarativeBase):
            pass

        class Receipt(TenantMixin, LateBase):
            __tablename__ = "mx_receipts"
            id: Mapped[int] = mapped_column(primary_key=True)

        engine = mixin_maker.kw["bind"]
        LateBase.metadata.create_all(engine)
        with Session(engine) as plain:
            plain.add_all([Receipt(id=1, organization_id="a"), Receipt(id=2, organization_id="b")])
            plain.commit()
        with mixin_maker() as session, as_organization("b"):
            assert session.scalars(select(Receipt.id)).all() == [2]
    finally:
        scoping.disable()


def test_enable_twice_and_disable(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_tenant_scoping(mixin_maker)
    scoping.disable()
    with mixin_maker() as session:
        assert len(session.scalars(select(Invoice)).all()) == 2  # no context needed any more
    enable_tenant_scoping(mixin_maker).disable()


def test_enable_rejects_unknown_targets() -> None:
    with pytest.raises(TypeError, match="sessionmaker"):
        enable_tenant_scoping(object())


def test_a_column_no_model_has_is_an_error(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker, column="tenant_key", models=TenantMixin)
    try:
        with (
            mixin_maker() as session,
            as_organization("a"),
            pytest.raises(TenantScopingError, match="tenant_key"),
        ):
            session.scalars(select(Invoice)).all()
    finally:
        scoping.disable()


def test_column_must_match_the_apps_setting(
    mixin_maker: sessionmaker[Session], rsa_issuer: TokenIssuer
) -> None:
    scoping = enable_tenant_scoping(mixin_maker)
    app = make_app(rsa_issuer.config(audience="api", ORGANIZATION_COLUMN="tenant"))
    try:
        with (
            app.app_context(),
            mixin_maker() as session,
            as_organization("a"),
            pytest.raises(TenantScopingError, match="OAUTH_VERIFY_ORGANIZATION_COLUMN"),
        ):
            session.scalars(select(Invoice)).all()
    finally:
        scoping.disable()


def test_upsert_into_a_tenant_table_is_refused(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    try:
        with mixin_maker() as session, as_organization("a"):
            upsert = sqlite_insert(Invoice).values(id=2, organization_id="a")
            with pytest.raises(TenantScopingError, match="upsert"):
                session.execute(upsert.on_conflict_do_update(index_elements=["id"], set_={"id": 2}))
            ignore = sqlite_insert(Invoice).values(id=2, organization_id="a")
            session.execute(ignore.on_conflict_do_nothing())
            session.commit()
        with Session(mixin_maker.kw["bind"]) as plain:
            assert plain.get(Invoice, 2).organization_id == "b"  # type: ignore[union-attr]
    finally:
        scoping.disable()


def test_same_statement_shape_alternating_organizations(mixin_maker: sessionmaker[Session]) -> None:
    """The compiled-statement cache must never bake one organization in."""
    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    try:
        for _round in range(5):
            for org, invoices, lines in (("a", [1], [1]), ("b", [2], [2])):
                with mixin_maker() as session, as_organization(org):
                    assert session.scalars(select(Invoice.id)).all() == invoices
                    got = session.scalars(select(InvoiceLine.id).join(Invoice, isouter=True))
                    assert got.all() == lines
                    count = session.scalar(select(func.count()).select_from(InvoiceLine))
                    assert count == 1
    finally:
        scoping.disable()


def test_expired_attributes_need_a_context_too(mixin_maker: sessionmaker[Session]) -> None:
    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    try:
        with mixin_maker() as session:
            with as_organization("a"):
                invoice = session.scalars(select(Invoice)).one()
                session.commit()  # expires the object
            with pytest.raises(TenantContextError):
                _ = invoice.organization_id
    finally:
        scoping.disable()


def test_bypass_option_constant_is_the_execution_option() -> None:
    statement = unscoped(select(Invoice), reason="nightly export")
    assert statement.get_execution_options()[BYPASS_OPTION] == "nightly export"


def test_helpers_are_exported_lazily() -> None:
    from flask_oauth_verify import tenancy

    assert (org_scoped, user_scoped) == (tenancy.org_scoped, tenancy.user_scoped)
    assert isinstance(TenantScoping, type)


# -- decorators -------------------------------------------------------------------------------


@pytest.fixture
def decorated_app(tokens: TokenIssuer) -> Flask:
    app = make_app(tokens.config(audience="api"), name="decorated")

    @app.get("/org")
    @require_organization
    def org_view() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    @app.get("/user")
    @require_user
    def user_view() -> dict[str, Any]:
        return {"user_id": g.auth.user_id}

    @app.get("/async-org")
    @require_organization
    async def async_org_view() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    return app


@pytest.mark.parametrize("path", ["/org", "/async-org"])
def test_require_organization(decorated_app: Flask, tokens: TokenIssuer, path: str) -> None:
    client = decorated_app.test_client()
    ok = client.get(path, headers=auth_header(tokens.mint(organization_id="org_a")))
    assert (ok.status_code, ok.get_json()) == (200, {"organization_id": "org_a"})
    missing = client.get(path, headers=auth_header(tokens.mint()))
    assert missing.status_code == 401
    assert missing.get_json() == {
        "error": "missing_organization_context",
        "message": MissingOrganizationContext.default_description,
    }
    assert 'error="invalid_token"' in missing.headers["WWW-Authenticate"]
    assert client.get(path).status_code == 401  # no token at all


def test_require_user(decorated_app: Flask, tokens: TokenIssuer) -> None:
    client = decorated_app.test_client()
    ok = client.get("/user", headers=auth_header(tokens.mint(subject="alice")))
    assert (ok.status_code, ok.get_json()) == (200, {"user_id": "alice"})
    service = tokens.mint(subject="client-1")  # subject == client_id: no user
    missing = client.get("/user", headers=auth_header(service))
    assert missing.status_code == 401
    assert missing.get_json() == {
        "error": "missing_user_context",
        "message": MissingUserContext.default_description,
    }
    assert missing.headers["WWW-Authenticate"].startswith('Bearer realm="')


class InheritBase(DeclarativeBase):
    pass


class Item(InheritBase):
    __tablename__ = "inh_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}  # noqa: RUF012


class Book(Item):
    """Joined-table inheritance: the organization column is on the base table."""

    __tablename__ = "inh_books"
    id: Mapped[int] = mapped_column(ForeignKey("inh_items.id"), primary_key=True)
    title: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "book"}  # noqa: RUF012


class Pen(Item):
    """Single-table inheritance."""

    __mapper_args__ = {"polymorphic_identity": "pen"}  # noqa: RUF012


def test_inheritance_hierarchies_are_scoped() -> None:
    engine = create_engine("sqlite://")
    InheritBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Book(organization_id="a", title="ba"),
                Book(organization_id="b", title="bb"),
                Pen(organization_id="a"),
                Pen(organization_id="b"),
            ]
        )
        session.commit()
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=InheritBase.registry)
    try:
        with maker() as session, as_organization("a"):
            for model, kinds in ((Item, ["book", "pen"]), (Book, ["book"]), (Pen, ["pen"])):
                rows = session.scalars(select(model).order_by(Item.id)).all()
                assert [(r.kind, r.organization_id) for r in rows] == [(k, "a") for k in kinds]
            session.add(Book(title="new"))
            session.flush()
            assert session.scalars(select(Book.organization_id)).all() == ["a", "a"]
    finally:
        scoping.disable()
        engine.dispose()


def test_a_failed_flush_leaves_nothing_behind_once_scoping_is_disabled(
    mixin_maker: sessionmaker[Session],
) -> None:
    """A flush that fails in the database never reaches ``after_flush``, so
    its markers stayed in ``session.info``; after ``disable()`` the global
    ``before_insert`` stamp still read them and asked for an organization
    (TenantContextError) on the session's next insert."""
    from sqlalchemy.exc import IntegrityError

    scoping = enable_tenant_scoping(mixin_maker, models=TenantMixin)
    with mixin_maker() as session:
        try:
            with as_organization("a"):
                session.add(Invoice(id=1))  # the id is taken: the INSERT fails
                with pytest.raises(IntegrityError):
                    session.flush()
                session.rollback()
        finally:
            scoping.disable()
        session.add(Invoice(id=60))  # no organization, and no scoping any more
        with pytest.raises(IntegrityError):  # the database's NOT NULL, nothing of ours
            session.flush()
