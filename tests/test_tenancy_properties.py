"""Properties: for any data and any query, no response carries another organization's row.

Hypothesis generates organizations, projects and tasks (tasks sometimes
point at another organization's project), then calls the scoped views
through real HTTP requests with tokens of every organization. Each answer
must be exactly the caller's rows; each write must leave every other
organization's rows untouched. Runs on SQLite and on the real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_oauth_verify.tenancy import enable_tenant_scoping
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .tenancy_support import (
    PAGED_PATHS,
    READ_CASES,
    Database,
    Dataset,
    PostgresSchema,
    Project,
    ProjectRow,
    ReadCase,
    Task,
    TaskRow,
    TenantApp,
    db,
    foreign_rows,
    open_app,
    sqlite_database,
)

ORGANIZATIONS = ("org_a", "org_b", "org_c", "org_d")
USERS = ("user_1", "user_2", "user_3")
NAMES = st.text(alphabet="abcxyz -", min_size=1, max_size=8)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    """Rows of two to four organizations, with cross-organization references."""
    orgs = draw(st.lists(st.sampled_from(ORGANIZATIONS), min_size=2, max_size=4, unique=True))
    project_orgs = draw(st.lists(st.sampled_from(orgs), max_size=8))
    projects = tuple(
        ProjectRow(i + 1, org, draw(NAMES), draw(st.sampled_from(USERS)))
        for i, org in enumerate(project_orgs)
    )
    tasks: tuple[TaskRow, ...] = ()
    if projects:
        task_specs = draw(
            st.lists(st.tuples(st.sampled_from(orgs), st.integers(1, len(projects))), max_size=12)
        )
        tasks = tuple(
            TaskRow(i + 1, org, project_id, draw(NAMES), draw(st.sampled_from(USERS)))
            for i, (org, project_id) in enumerate(task_specs)
        )
    return Dataset(projects=projects, tasks=tasks)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    if request.param == "sqlite":
        yield sqlite_database()
        return
    url = request.getfixturevalue("postgres_url")
    with PostgresSchema(url) as schema:
        yield Database("postgresql", url, schema.options(), schema.name)


@pytest.fixture(scope="module")
def prop_app(database: Database, rsa_issuer: TokenIssuer) -> Iterator[TenantApp]:
    yield from open_app(rsa_issuer, database)


def request_json(
    app: TenantApp, method: str, path: str, org: str, user: str = "user_1", json: Any = None
) -> tuple[int, Any]:
    token = app.token(org, user)
    response = app.app.test_client().open(
        path, method=method, headers=auth_header(token), json=json
    )
    return response.status_code, response.get_json(silent=True)


def check_read(app: TenantApp, case: ReadCase, org: str) -> None:
    status, body = request_json(app, "GET", case.path, org)
    assert status == 200, (case.path, org, body)
    assert foreign_rows(body, org) == [], (case.path, org)
    assert case.extract(body) == case.expect(app.data, org), (case.path, org)


def check_pages(app: TenantApp, path: str, org: str, per_page: int) -> None:
    expected = [p.id for p in app.data.projects_of(org)]
    seen: list[int] = []
    for page in range(1, len(expected) // per_page + 2):
        status, body = request_json(app, "GET", f"{path}?page={page}&per_page={per_page}", org)
        assert status == 200
        assert foreign_rows(body, org) == []
        assert body["total"] == len(expected)
        seen += [row["id"] for row in body["rows"]]
    assert seen == expected, (path, org)


def check_by_id(app: TenantApp, org: str) -> None:
    for project in app.data.projects:
        status, body = request_json(app, "GET", f"/auto/projects/{project.id}/tasks", org)
        if project.organization_id != org:
            assert status == 404, (project, org)
            continue
        assert status == 200
        assert foreign_rows(body, org) == []
        own = [t.id for t in app.data.tasks_of(org) if t.project_id == project.id]
        assert [row["id"] for row in body["rows"]] == own


def check_my_tasks(app: TenantApp, org: str, user: str) -> None:
    status, body = request_json(app, "GET", "/explicit/my-tasks", org, user=user)
    assert status == 200
    assert foreign_rows(body, org) == []
    expected = [t.id for t in app.data.tasks_of(org) if t.user_id == user]
    assert [row["id"] for row in body["rows"]] == expected


READS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.sampled_from(READ_CASES)),
        st.tuples(st.just("pages"), st.sampled_from(PAGED_PATHS)),
        st.tuples(st.just("by_id"), st.none()),
        st.tuples(st.just("my_tasks"), st.sampled_from(USERS)),
    ),
    min_size=1,
    max_size=4,
)


def reads_are_clean(
    prop_app: TenantApp, data: Dataset, reads: list[tuple[str, Any]], per_page: int
) -> None:
    """Every read, by every organization, returns exactly its rows."""
    prop_app.reset(data)
    scoping = enable_tenant_scoping(db)
    try:
        for org in ORGANIZATIONS:  # includes organizations without any row
            for kind, arg in reads:
                if kind == "read":
                    check_read(prop_app, arg, org)
                elif kind == "pages":
                    check_pages(prop_app, arg, org, per_page)
                elif kind == "by_id":
                    check_by_id(prop_app, org)
                else:
                    check_my_tasks(prop_app, org, arg)
    finally:
        scoping.disable()


def property_settings(prop_app: TenantApp, sqlite: int, postgresql: int) -> settings:
    """Fewer examples on PostgreSQL, no deadline (real I/O)."""
    return settings(
        max_examples=sqlite if prop_app.database.backend == "sqlite" else postgresql,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],
    )


# Shrinking a failure replays many HTTP requests: allow it the time.
pytestmark = pytest.mark.timeout(900)


def test_no_read_ever_returns_another_organizations_row(prop_app: TenantApp) -> None:
    @property_settings(prop_app, sqlite=40, postgresql=15)
    @given(data=datasets(), reads=READS, per_page=st.integers(1, 3))
    def prop(data: Dataset, reads: list[tuple[str, Any]], per_page: int) -> None:
        reads_are_clean(prop_app, data, reads, per_page)

    prop()


def test_explicit_helpers_never_return_another_organizations_row(prop_app: TenantApp) -> None:
    """Without automatic scoping, the explicit helpers alone keep answers clean."""
    explicit = [case for case in READ_CASES if case.path.startswith("/explicit/")]

    @property_settings(prop_app, sqlite=30, postgresql=10)
    @given(data=datasets(), reads=st.lists(st.sampled_from(explicit), min_size=1, max_size=4))
    def prop(data: Dataset, reads: list[ReadCase]) -> None:
        prop_app.reset(data)
        for org in ORGANIZATIONS:
            for case in reads:
                check_read(prop_app, case, org)

    prop()


# -- writes ------------------------------------------------------------------------------

WRITES = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from((None, *ORGANIZATIONS))),
        st.tuples(st.just("rename"), st.integers(1, 9)),
        st.tuples(st.just("move"), st.tuples(st.integers(1, 9), st.sampled_from(ORGANIZATIONS))),
        st.tuples(st.just("delete_task"), st.integers(1, 13)),
        st.tuples(st.just("bulk_update"), st.lists(st.integers(1, 13), min_size=1, max_size=3)),
        st.tuples(st.just("rename_all"), st.none()),
        st.tuples(st.just("move_all"), st.sampled_from(ORGANIZATIONS)),
    ),
    min_size=1,
    max_size=5,
)


def rows_not_of(app: TenantApp, org: str) -> list[tuple[Any, ...]]:
    """Every stored row of every other organization."""
    found: list[tuple[Any, ...]] = []
    with app.session() as session:
        for model in (Project, Task):
            table = model.__table__
            result = session.execute(table.select().order_by(table.c.id))
            found += [(model.__name__, *row) for row in result if row.organization_id != org]
    return found


def perform(app: TenantApp, org: str, kind: str, arg: Any) -> int:
    if kind == "create":
        body = {"name": "new", **({"organization_id": arg} if arg else {})}
        return request_json(app, "POST", "/auto/projects", org, json=body)[0]
    if kind == "rename":
        return request_json(app, "PATCH", f"/auto/projects/{arg}", org, json={"name": "r"})[0]
    if kind == "move":
        project_id, target = arg
        move = {"organization_id": target}
        return request_json(app, "PATCH", f"/auto/projects/{project_id}", org, json=move)[0]
    if kind == "delete_task":
        return request_json(app, "DELETE", f"/auto/tasks/{arg}", org)[0]
    if kind == "bulk_update":
        rows = [{"id": i, "title": "bulk"} for i in dict.fromkeys(arg)]
        return request_json(app, "POST", "/auto/tasks/bulk-update", org, json=rows)[0]
    if kind == "rename_all":
        return request_json(app, "POST", "/auto/projects/rename-all", org, json={"name": "z"})[0]
    move = {"organization_id": arg}
    return request_json(app, "POST", "/auto/projects/move-all", org, json=move)[0]


def writes_are_confined(
    prop_app: TenantApp, data: Dataset, org: str, writes: list[tuple[str, Any]]
) -> None:
    """No write by ``org`` changes a row of any other organization."""
    prop_app.reset(data)
    others = rows_not_of(prop_app, org)
    scoping = enable_tenant_scoping(db)
    try:
        for kind, arg in writes:
            status = perform(prop_app, org, kind, arg)
            assert status in (200, 201, 204, 403, 404), (kind, arg, status)
            assert rows_not_of(prop_app, org) == others, (kind, arg)
    finally:
        scoping.disable()


def test_no_write_ever_touches_another_organizations_row(prop_app: TenantApp) -> None:
    @property_settings(prop_app, sqlite=50, postgresql=20)
    @given(data=datasets(), org=st.sampled_from(ORGANIZATIONS), writes=WRITES)
    def prop(data: Dataset, org: str, writes: list[tuple[str, Any]]) -> None:
        writes_are_confined(prop_app, data, org, writes)

    prop()
