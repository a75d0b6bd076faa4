"""Shared models, data and views of the tenancy tests (SQLite and PostgreSQL).

Every view returns rows with their ``organization_id`` so that a test can
check that no response ever carries another organization's row. The
``/auto/...`` views rely on automatic scoping alone (no filter in the view);
the ``/explicit/...`` views use :func:`org_scoped` / :func:`user_scoped`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Blueprint, Flask, abort, g, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    ForeignKey,
    String,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
    subqueryload,
)
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import StaticPool

from flask_oauth_verify import require_token, require_user
from flask_oauth_verify.tenancy import (
    as_organization,
    enable_tenant_scoping,
    org_scoped,
    unscoped,
    user_scoped,
)
from flask_oauth_verify.testing import TokenIssuer

from .conftest import make_app


class Base(DeclarativeBase):
    """Declarative base of the tenancy test models."""


db = SQLAlchemy(model_class=Base)


class Plan(db.Model):  # type: ignore[name-defined, misc]
    """A shared catalogue row: no organization column, never scoped."""

    __tablename__ = "ovt_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Project(db.Model):  # type: ignore[name-defined, misc]
    """A tenant row."""

    __tablename__ = "ovt_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str | None] = mapped_column(String(64))
    tasks: Mapped[list[Task]] = relationship(back_populates="project", order_by="Task.id")


class Task(db.Model):  # type: ignore[name-defined, misc]
    """A tenant row that points at a project (sometimes, on purpose, of another org)."""

    __tablename__ = "ovt_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ovt_projects.id"))
    title: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str | None] = mapped_column(String(64))
    project: Mapped[Project] = relationship(back_populates="tasks")


# -- data ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectRow:
    """One project of a data set."""

    id: int
    organization_id: str
    name: str
    user_id: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """One task of a data set."""

    id: int
    organization_id: str
    project_id: int
    title: str
    user_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Rows of several organizations, including cross-organization references."""

    projects: tuple[ProjectRow, ...]
    tasks: tuple[TaskRow, ...]
    plans: tuple[str, ...] = ("free", "pro")

    def projects_of(self, org: str) -> list[ProjectRow]:
        """The organization's projects, by id."""
        return sorted((p for p in self.projects if p.organization_id == org), key=lambda p: p.id)

    def tasks_of(self, org: str) -> list[TaskRow]:
        """The organization's tasks, by id."""
        return sorted((t for t in self.tasks if t.organization_id == org), key=lambda t: t.id)

    def project(self, project_id: int) -> ProjectRow:
        """The project with ``project_id``."""
        return next(p for p in self.projects if p.id == project_id)


#: The fixed data set: org_a and org_b, org_c has nothing; task 5 is org_b's
#: task on org_a's project 1, task 6 org_a's on org_b's project 3; user_1
#: exists in both organizations.
DATA = Dataset(
    projects=(
        ProjectRow(1, "org_a", "Apollo", "user_1"),
        ProjectRow(2, "org_a", "Atlas", "user_2"),
        ProjectRow(3, "org_b", "Borealis", "user_1"),
        ProjectRow(4, "org_b", "Bravo", "user_3"),
        ProjectRow(5, "org_a", "Artemis", "user_1"),
    ),
    tasks=(
        TaskRow(1, "org_a", 1, "a1", "user_1"),
        TaskRow(2, "org_a", 1, "a2", "user_2"),
        TaskRow(3, "org_b", 3, "b1", "user_1"),
        TaskRow(4, "org_a", 2, "a3", "user_1"),
        TaskRow(5, "org_b", 1, "b-trap", "user_3"),
        TaskRow(6, "org_a", 3, "a-trap", "user_2"),
        TaskRow(7, "org_b", 4, "b2", "user_3"),
    ),
)

ORGS = ("org_a", "org_b", "org_c")


def load(session: Session, data: Dataset) -> None:
    """Replace every row with ``data`` (through a plain, unscoped session)."""
    session.execute(delete(Task.__table__))
    session.execute(delete(Project.__table__))
    session.execute(delete(Plan.__table__))
    if data.plans:
        session.execute(
            insert(Plan.__table__), [{"id": i + 1, "name": n} for i, n in enumerate(data.plans)]
        )
    if data.projects:
        session.execute(insert(Project.__table__), [dataclasses.asdict(p) for p in data.projects])
    if data.tasks:
        session.execute(insert(Task.__table__), [dataclasses.asdict(t) for t in data.tasks])
    if session.get_bind().dialect.name == "postgresql":
        # explicit ids do not advance the serial sequences
        for model in (Plan, Project, Task):
            table = model.__table__
            following = select(func.coalesce(func.max(table.c.id), 0) + 1).scalar_subquery()
            sequence = func.pg_get_serial_sequence(table.name, "id")
            session.execute(select(func.setval(sequence, following, False)))
    session.commit()


def project_dict(project: Project) -> dict[str, Any]:
    """A project as JSON."""
    return {
        "id": project.id,
        "organization_id": project.organization_id,
        "name": project.name,
        "user_id": project.user_id,
    }


def task_dict(task: Task) -> dict[str, Any]:
    """A task as JSON."""
    return {
        "id": task.id,
        "organization_id": task.organization_id,
        "project_id": task.project_id,
        "title": task.title,
        "user_id": task.user_id,
    }


# -- databases ------------------------------------------------------------------------


@dataclasses.dataclass
class Database:
    """A database for the tests: URL and engine options (one schema on PostgreSQL)."""

    backend: str
    url: str
    engine_options: dict[str, Any]
    schema: str | None = None


@dataclasses.dataclass
class PostgresSchema:
    """A private schema in the shared test database, dropped afterwards."""

    url: str
    name: str = dataclasses.field(default_factory=lambda: f"ovt_{uuid.uuid4().hex[:12]}")

    def __enter__(self) -> PostgresSchema:
        engine = create_engine(self.url)
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{self.name}"'))
        engine.dispose()
        return self

    def __exit__(self, *exc: object) -> None:
        engine = create_engine(self.url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE'))
        engine.dispose()

    def options(self) -> dict[str, Any]:
        """Engine options that put this schema first on the search path."""
        return {"connect_args": {"options": f"-csearch_path={self.name}"}}


def sqlite_database() -> Database:
    """One shared in-memory SQLite connection."""
    return Database(
        "sqlite",
        "sqlite://",
        {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}},
    )


@dataclasses.dataclass
class TenantApp:
    """A Flask app with the tenancy views, its database and its data."""

    app: Flask
    database: Database
    issuer: TokenIssuer
    data: Dataset = DATA
    tokens: dict[tuple[str | None, str], str] = dataclasses.field(default_factory=dict)

    def token(self, org: str | None, subject: str = "user_1") -> str:
        """A (cached) token of ``org`` for ``subject``."""
        key = (org, subject)
        if key not in self.tokens:
            self.tokens[key] = self.issuer.mint(organization_id=org, subject=subject)
        return self.tokens[key]

    def session(self) -> Session:
        """A plain session on the app's engine: no scoping, for set-up and checks."""
        with self.app.app_context():
            return Session(db.engine)

    def reset(self, data: Dataset | None = None) -> None:
        """Load ``data`` (the default data set when omitted)."""
        self.data = data or DATA
        with self.session() as session:
            load(session, self.data)


def build_app(issuer: TokenIssuer, database: Database) -> TenantApp:
    """An app trusting ``issuer``, with the tables created and the data loaded."""
    app = make_app(issuer.config(audience="api"), name=f"tenancy_{database.backend}")
    app.config["SQLALCHEMY_DATABASE_URI"] = database.url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = database.engine_options
    db.init_app(app)
    app.register_blueprint(auto_views)
    app.register_blueprint(explicit_views)
    with app.app_context():
        db.create_all()
    tenant_app = TenantApp(app, database, issuer)
    tenant_app.reset()
    return tenant_app


def open_app(issuer: TokenIssuer, database: Database) -> Iterator[TenantApp]:
    """Build an app for a fixture and dispose its engine afterwards."""
    tenant_app = build_app(issuer, database)
    try:
        yield tenant_app
    finally:
        with tenant_app.app.app_context():
            db.engine.dispose()


# -- views: automatic scoping (no filter written in the view) ---------------------------

auto_views = Blueprint("auto", __name__, url_prefix="/auto")


def _rows(items: list[Any]) -> dict[str, Any]:
    return {"rows": items}


def _int_arg(name: str, default: int) -> int:
    return request.args.get(name, default, type=int) or default


@auto_views.get("/projects")
@require_token
def auto_projects() -> dict[str, Any]:
    rows = db.session.scalars(select(Project).order_by(Project.id)).all()
    return _rows([project_dict(p) for p in rows])


@auto_views.get("/projects-query")
@require_token
def auto_projects_query() -> dict[str, Any]:
    return _rows([project_dict(p) for p in Project.query.order_by(Project.id).all()])


@auto_views.get("/projects-page")
@require_token
def auto_projects_page() -> dict[str, Any]:
    page = db.paginate(
        select(Project).order_by(Project.id),
        page=_int_arg("page", 1),
        per_page=_int_arg("per_page", 2),
        error_out=False,
    )
    return {"rows": [project_dict(p) for p in page.items], "total": page.total}


@auto_views.get("/projects-query-page")
@require_token
def auto_projects_query_page() -> dict[str, Any]:
    page = Project.query.order_by(Project.id).paginate(
        page=_int_arg("page", 1), per_page=_int_arg("per_page", 2), error_out=False
    )
    return {"rows": [project_dict(p) for p in page.items], "total": page.total}


@auto_views.get("/projects-limit")
@require_token
def auto_projects_limit() -> dict[str, Any]:
    statement = (
        select(Project)
        .order_by(Project.name.desc())
        .limit(_int_arg("limit", 2))
        .offset(request.args.get("offset", 0, type=int))
    )
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@auto_views.get("/projects/<int:project_id>")
@require_token
def auto_project(project_id: int) -> dict[str, Any]:
    project = db.session.get(Project, project_id)
    if project is None:
        abort(404)
    return project_dict(project)


@auto_views.get("/projects/<int:project_id>/tasks")
@require_token
def auto_project_tasks(project_id: int) -> dict[str, Any]:
    project = db.session.get(Project, project_id)
    if project is None:
        abort(404)
    return _rows([task_dict(t) for t in project.tasks])  # a lazy load


@auto_views.get("/tasks-joined")
@require_token
def auto_tasks_joined() -> dict[str, Any]:
    statement = select(Task, Project).join(Task.project).order_by(Task.id)
    return _rows(
        [{**task_dict(t), "project": project_dict(p)} for t, p in db.session.execute(statement)]
    )


@auto_views.get("/tasks-aliased")
@require_token
def auto_tasks_aliased() -> dict[str, Any]:
    owner = aliased(Project)
    statement = select(Task, owner).join(owner, Task.project_id == owner.id).order_by(Task.id)
    return _rows(
        [{**task_dict(t), "project": project_dict(p)} for t, p in db.session.execute(statement)]
    )


@auto_views.get("/projects-outer")
@require_token
def auto_projects_outer() -> dict[str, Any]:
    statement = (
        select(Project, Task)
        .outerjoin(Task, Task.project_id == Project.id)
        .order_by(Project.id, Task.id)
    )
    return _rows(
        [
            {**project_dict(p), "task": task_dict(t) if t is not None else None}
            for p, t in db.session.execute(statement)
        ]
    )


_EAGER = {"joined": joinedload, "selectin": selectinload, "subquery": subqueryload}


@auto_views.get("/projects-eager/<strategy>")
@require_token
def auto_projects_eager(strategy: str) -> dict[str, Any]:
    statement = select(Project).options(_EAGER[strategy](Project.tasks)).order_by(Project.id)
    projects = db.session.scalars(statement).unique().all()
    return _rows([{**project_dict(p), "tasks": [task_dict(t) for t in p.tasks]} for p in projects])


@auto_views.get("/tasks-parent")
@require_token
def auto_tasks_parent() -> dict[str, Any]:
    tasks = db.session.scalars(select(Task).order_by(Task.id)).all()
    return _rows(
        [
            {**task_dict(t), "project": project_dict(t.project) if t.project else None}
            for t in tasks  # many-to-one lazy loads
        ]
    )


@auto_views.get("/projects-subquery")
@require_token
def auto_projects_subquery() -> dict[str, Any]:
    statement = select(Project).where(Project.id.in_(select(Task.project_id))).order_by(Project.id)
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@auto_views.get("/projects-exists")
@require_token
def auto_projects_exists() -> dict[str, Any]:
    statement = select(Project).where(Project.tasks.any()).order_by(Project.id)
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@auto_views.get("/counts")
@require_token
def auto_counts() -> dict[str, Any]:
    return {
        "tasks": db.session.scalar(select(func.count()).select_from(Task)),
        "projects": Project.query.count(),
        "task_names": db.session.scalar(select(func.count(Task.title))),
    }


@auto_views.get("/union")
@require_token
def auto_union() -> dict[str, Any]:
    statement = union_all(
        select(Project.organization_id, Project.name.label("label")),
        select(Task.organization_id, Task.title.label("label")),
    )
    return _rows([{"organization_id": o, "label": n} for o, n in db.session.execute(statement)])


@auto_views.get("/plans")
@require_token
def auto_plans() -> dict[str, Any]:
    return _rows([p.name for p in db.session.scalars(select(Plan).order_by(Plan.id))])


@auto_views.get("/optional-projects")
@require_token(optional=True)
def auto_optional_projects() -> dict[str, Any]:
    return _rows([project_dict(p) for p in db.session.scalars(select(Project))])


@auto_views.get("/impersonate")
@require_token
def auto_impersonate() -> dict[str, Any]:
    with as_organization("org_b"):
        rows = db.session.scalars(select(Project.organization_id)).all()
    return {"orgs": sorted(set(rows)), "token": g.auth.organization_id}


@auto_views.get("/admin/projects")
@require_token
def auto_admin_projects() -> dict[str, Any]:
    statement = unscoped(select(Project).order_by(Project.id), reason="admin report")
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@auto_views.post("/projects")
@require_token
def auto_create_project() -> tuple[dict[str, Any], int]:
    payload = request.get_json()
    project = Project(name=payload["name"], organization_id=payload.get("organization_id"))
    db.session.add(project)
    db.session.commit()
    return project_dict(project), 201


@auto_views.patch("/projects/<int:project_id>")
@require_token
def auto_update_project(project_id: int) -> dict[str, Any]:
    project = db.session.get(Project, project_id)
    if project is None:
        abort(404)
    for key, value in request.get_json().items():
        setattr(project, key, value)
    db.session.commit()
    return project_dict(project)


@auto_views.post("/projects/<int:project_id>/tasks")
@require_token
def auto_add_task(project_id: int) -> tuple[dict[str, Any], int]:
    project = db.session.get(Project, project_id)
    if project is None:
        abort(404)
    task = Task(title=request.get_json()["title"])
    project.tasks.append(task)  # the write guard stamps the organization
    db.session.commit()
    return task_dict(task), 201


@auto_views.delete("/tasks/<int:task_id>")
@require_token
def auto_delete_task(task_id: int) -> tuple[str, int]:
    task = db.session.get(Task, task_id)
    if task is None:
        abort(404)
    db.session.delete(task)
    db.session.commit()
    return "", 204


@auto_views.post("/projects/rename-all")
@require_token
def auto_rename_all() -> dict[str, Any]:
    result = db.session.execute(update(Project).values(name=request.get_json()["name"]))
    db.session.commit()
    return {"rowcount": result.rowcount}  # type: ignore[attr-defined]


@auto_views.post("/projects/move-all")
@require_token
def auto_move_all() -> dict[str, Any]:
    statement = update(Project).values(organization_id=request.get_json()["organization_id"])
    result = db.session.execute(statement)
    db.session.commit()
    return {"rowcount": result.rowcount}  # type: ignore[attr-defined]


@auto_views.post("/tasks/delete-all")
@require_token
def auto_delete_all_tasks() -> dict[str, Any]:
    result = db.session.execute(delete(Task))
    db.session.commit()
    return {"rowcount": result.rowcount}  # type: ignore[attr-defined]


@auto_views.post("/tasks/bulk-update")
@require_token
def auto_bulk_update_tasks() -> dict[str, Any]:
    try:
        db.session.execute(update(Task), request.get_json())
    except StaleDataError:
        abort(404)  # a primary key that does not exist (SQLAlchemy's own check)
    db.session.commit()
    return {"ok": True}


@auto_views.post("/tasks/bulk-insert")
@require_token
def auto_bulk_insert_tasks() -> tuple[dict[str, Any], int]:
    rows = db.session.execute(insert(Task).returning(Task), request.get_json()).scalars()
    created = [task_dict(t) for t in rows]
    db.session.commit()
    return _rows(created), 201


@auto_views.post("/tasks/legacy-bulk-update")
@require_token
def auto_legacy_bulk_update_tasks() -> dict[str, Any]:
    """The pre-2.0 API: ``Session.bulk_update_mappings`` fires no session event."""
    db.session.bulk_update_mappings(Task, request.get_json())
    db.session.commit()
    return {"ok": True}


@auto_views.post("/tasks/legacy-bulk-insert")
@require_token
def auto_legacy_bulk_insert_tasks() -> tuple[dict[str, Any], int]:
    db.session.bulk_insert_mappings(Task, request.get_json())
    db.session.commit()
    return {"ok": True}, 201


# -- views: explicit helpers -------------------------------------------------------------

explicit_views = Blueprint("explicit", __name__, url_prefix="/explicit")


@explicit_views.get("/projects")
@require_token
def explicit_projects() -> dict[str, Any]:
    statement = org_scoped(select(Project).order_by(Project.id))
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@explicit_views.get("/projects-column")
@require_token
def explicit_projects_column() -> dict[str, Any]:
    statement = org_scoped(select(Project).order_by(Project.id), Project.organization_id)
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@explicit_views.get("/projects-query")
@require_token
def explicit_projects_query() -> dict[str, Any]:
    query = org_scoped(Project.query).order_by(Project.id)
    return _rows([project_dict(p) for p in query.all()])


@explicit_views.get("/projects-query-limit")
@require_token
def explicit_projects_query_limit() -> dict[str, Any]:
    query = org_scoped(Project.query.order_by(Project.id).limit(_int_arg("limit", 2)))
    return _rows([project_dict(p) for p in query.all()])


@explicit_views.get("/projects-limit")
@require_token
def explicit_projects_limit() -> dict[str, Any]:
    statement = org_scoped(
        select(Project)
        .order_by(Project.name.desc())
        .limit(_int_arg("limit", 2))
        .offset(request.args.get("offset", 0, type=int))
    )
    return _rows([project_dict(p) for p in db.session.scalars(statement)])


@explicit_views.get("/projects-page")
@require_token
def explicit_projects_page() -> dict[str, Any]:
    page = db.paginate(
        org_scoped(select(Project).order_by(Project.id)),
        page=_int_arg("page", 1),
        per_page=_int_arg("per_page", 2),
        error_out=False,
    )
    return {"rows": [project_dict(p) for p in page.items], "total": page.total}


@explicit_views.get("/projects-query-page")
@require_token
def explicit_projects_query_page() -> dict[str, Any]:
    page = (
        org_scoped(Project.query)
        .order_by(Project.id)
        .paginate(page=_int_arg("page", 1), per_page=_int_arg("per_page", 2), error_out=False)
    )
    return {"rows": [project_dict(p) for p in page.items], "total": page.total}


@explicit_views.get("/tasks-joined")
@require_token
def explicit_tasks_joined() -> dict[str, Any]:
    statement = org_scoped(select(Task, Project).join(Task.project).order_by(Task.id))
    return _rows(
        [{**task_dict(t), "project": project_dict(p)} for t, p in db.session.execute(statement)]
    )


@explicit_views.get("/projects-eager")
@require_token
def explicit_projects_eager() -> dict[str, Any]:
    statement = org_scoped(
        select(Project).options(selectinload(Project.tasks)).order_by(Project.id)
    )
    projects = db.session.scalars(statement).all()
    return _rows([{**project_dict(p), "tasks": [task_dict(t) for t in p.tasks]} for p in projects])


@explicit_views.get("/projects-core")
@require_token
def explicit_projects_core() -> dict[str, Any]:
    table = Project.__table__
    statement = org_scoped(select(table).order_by(table.c.id))
    return _rows([dict(row._mapping) for row in db.session.execute(statement)])


@explicit_views.get("/my-tasks")
@require_user
def explicit_my_tasks() -> dict[str, Any]:
    statement = user_scoped(org_scoped(select(Task).order_by(Task.id)))
    return _rows([task_dict(t) for t in db.session.scalars(statement)])


@explicit_views.get("/user-scoped")
@require_token
def explicit_user_scoped() -> dict[str, Any]:
    return _rows([task_dict(t) for t in db.session.scalars(user_scoped(select(Task)))])


@explicit_views.post("/projects/rename-all")
@require_token
def explicit_rename_all() -> dict[str, Any]:
    statement = org_scoped(update(Project).values(name=request.get_json()["name"]))
    result = db.session.execute(statement)
    db.session.commit()
    return {"rowcount": result.rowcount}  # type: ignore[attr-defined]


# -- what each read view must return ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadCase:
    """A read view, how to read its answer, and what it must be for an organization."""

    path: str
    extract: Any  # Callable[[dict], object]
    expect: Any  # Callable[[Dataset, str], object]


def _ids(body: dict[str, Any]) -> list[int]:
    return [row["id"] for row in body["rows"]]


def _pairs(body: dict[str, Any], key: str) -> list[tuple[int, int | None]]:
    return [(row["id"], row[key]["id"] if row[key] else None) for row in body["rows"]]


def _own_tasks_of(data: Dataset, org: str, project_id: int) -> list[int]:
    return [t.id for t in data.tasks_of(org) if t.project_id == project_id]


def _joined(data: Dataset, org: str) -> list[tuple[int, int | None]]:
    own = {p.id for p in data.projects_of(org)}
    return [(t.id, t.project_id) for t in data.tasks_of(org) if t.project_id in own]


def _outer(data: Dataset, org: str) -> list[tuple[int, int | None]]:
    pairs: list[tuple[int, int | None]] = []
    for project in data.projects_of(org):
        tasks = _own_tasks_of(data, org, project.id)
        pairs += [(project.id, t) for t in tasks] if tasks else [(project.id, None)]
    return pairs


def _eager(data: Dataset, org: str) -> list[tuple[int, list[int]]]:
    return [(p.id, _own_tasks_of(data, org, p.id)) for p in data.projects_of(org)]


def _parent(data: Dataset, org: str) -> list[tuple[int, int | None]]:
    own = {p.id for p in data.projects_of(org)}
    return [(t.id, t.project_id if t.project_id in own else None) for t in data.tasks_of(org)]


def _with_tasks(data: Dataset, org: str) -> list[int]:
    return [p.id for p in data.projects_of(org) if _own_tasks_of(data, org, p.id)]


def _limit(data: Dataset, org: str) -> list[int]:
    ordered = sorted(data.projects_of(org), key=lambda p: p.name, reverse=True)
    return [p.id for p in ordered[1:3]]


def _query_limit(data: Dataset, org: str) -> list[int]:
    return [p.id for p in data.projects_of(org)][:2]


def _counts(data: Dataset, org: str) -> list[int]:
    tasks = len(data.tasks_of(org))
    return [tasks, len(data.projects_of(org)), tasks]


def _labels(data: Dataset, org: str) -> list[str]:
    return sorted([p.name for p in data.projects_of(org)] + [t.title for t in data.tasks_of(org)])


READ_CASES: tuple[ReadCase, ...] = (
    ReadCase("/auto/projects", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
    ReadCase("/auto/projects-query", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
    ReadCase("/auto/projects-limit?limit=2&offset=1", _ids, _limit),
    ReadCase("/auto/tasks-joined", lambda b: _pairs(b, "project"), _joined),
    ReadCase("/auto/tasks-aliased", lambda b: _pairs(b, "project"), _joined),
    ReadCase("/auto/projects-outer", lambda b: _pairs(b, "task"), _outer),
    *(
        ReadCase(
            f"/auto/projects-eager/{strategy}",
            lambda b: [(r["id"], [t["id"] for t in r["tasks"]]) for r in b["rows"]],
            _eager,
        )
        for strategy in ("joined", "selectin", "subquery")
    ),
    ReadCase("/auto/tasks-parent", lambda b: _pairs(b, "project"), _parent),
    ReadCase("/auto/projects-subquery", _ids, _with_tasks),
    ReadCase("/auto/projects-exists", _ids, _with_tasks),
    ReadCase("/auto/counts", lambda b: [b["tasks"], b["projects"], b["task_names"]], _counts),
    ReadCase("/auto/union", lambda b: sorted(r["label"] for r in b["rows"]), _labels),
    ReadCase("/explicit/projects", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
    ReadCase("/explicit/projects-column", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
    ReadCase("/explicit/projects-query", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
    ReadCase("/explicit/projects-query-limit?limit=2", _ids, _query_limit),
    ReadCase("/explicit/projects-limit?limit=2&offset=1", _ids, _limit),
    ReadCase("/explicit/tasks-joined", lambda b: _pairs(b, "project"), _joined),
    ReadCase(
        "/explicit/projects-eager",
        lambda b: [(r["id"], [t["id"] for t in r["tasks"]]) for r in b["rows"]],
        _eager,
    ),
    ReadCase("/explicit/projects-core", _ids, lambda d, o: [p.id for p in d.projects_of(o)]),
)

#: Paginated views: every page together must be the organization's projects.
PAGED_PATHS = (
    "/auto/projects-page",
    "/auto/projects-query-page",
    "/explicit/projects-page",
    "/explicit/projects-query-page",
)


def foreign_rows(body: Any, org: str) -> list[Any]:
    """Every object in a JSON answer whose ``organization_id`` is not ``org``."""
    found: list[Any] = []
    if isinstance(body, dict):
        if "organization_id" in body and body["organization_id"] != org:
            found.append(body)
        for value in body.values():
            found += foreign_rows(value, org)
    elif isinstance(body, list):
        for value in body:
            found += foreign_rows(value, org)
    return found


@contextlib.contextmanager
def scoped_database(
    engine: Any, base: Any, seed: Callable[[Any], None], id_tables: Iterable[str] = ()
) -> Iterator[sessionmaker[Any]]:
    """A session factory with automatic scoping over ``base``'s tables, seeded.

    :param seed: writes the rows (given a connection in a transaction).
    :param id_tables: tables whose ``id`` sequence starts after the seeded
        ids on PostgreSQL (SQLite continues after the largest id by itself).
    """
    base.metadata.create_all(engine)
    with engine.begin() as connection:
        seed(connection)
        if engine.dialect.name == "postgresql":
            for table in id_tables:
                connection.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)")
                )
    factory = sessionmaker(engine)
    scoping = enable_tenant_scoping(factory, models=base)
    try:
        yield factory
    finally:
        scoping.disable()
        engine.dispose()


@contextlib.contextmanager
def engine_for(request: Any, backend: str) -> Iterator[Any]:
    """An engine on one shared in-memory SQLite connection, or on a private
    schema of the test PostgreSQL server (``postgres_url`` fixture)."""
    if backend == "sqlite":
        yield create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        return
    with PostgresSchema(request.getfixturevalue("postgres_url")) as schema:
        yield create_engine(schema.url, **schema.options())


@contextlib.contextmanager
def seeded_factory(
    request: Any, base: Any, statements: Iterable[str], id_tables: Iterable[str] = ()
) -> Iterator[sessionmaker[Any]]:
    """:func:`scoped_database` on the backend of a fixture parametrized with
    ``"sqlite"`` / ``"postgresql"``, seeded by SQL ``statements``."""

    def seed(connection: Any) -> None:
        for statement in statements:
            connection.execute(text(statement))

    with (
        engine_for(request, request.param) as engine,
        scoped_database(engine, base, seed, id_tables) as factory,
    ):
        yield factory
