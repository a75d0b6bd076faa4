"""Regression tests of the sixth tenant-leak pass: what the check that loader
criteria reach every ``SELECT`` must let through.

The check (``TenantScoping._check_criteria_reach``) refuses ORM statements
that read a tenant table where SQLAlchemy adds no criterion; these schemas
are scoped by SQLAlchemy and were refused by its first version: a joined
subclass whose own table repeats the organization column, and a
many-to-many association table with the column between two scoped classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    column_property,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
    with_parent,
    with_polymorphic,
)
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import StaticPool

from flask_oauth_verify.tenancy import (
    CrossTenantWriteError,
    TenantScopingError,
    _TenantTables,
    as_organization,
    enable_tenant_scoping,
)


class SixthBase(DeclarativeBase):
    pass


class Doc(SixthBase):
    __tablename__ = "p6_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "doc"}  # noqa: RUF012


class Invoice(Doc):
    """Its table repeats the organization column (a composite key's half)."""

    __tablename__ = "p6_invoices"
    id: Mapped[int] = mapped_column(ForeignKey("p6_docs.id"), primary_key=True)
    invoice_organization_id: Mapped[str] = mapped_column("organization_id", String(20))
    amount: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "invoice"}  # noqa: RUF012


project_tags = Table(
    "p6_project_tags",
    SixthBase.metadata,
    Column("project_id", ForeignKey("p6_projects.id"), primary_key=True),
    Column("tag_id", ForeignKey("p6_tags.id"), primary_key=True),
    Column("organization_id", String(20), nullable=False),
)


class Tag(SixthBase):
    __tablename__ = "p6_tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    label: Mapped[str] = mapped_column(String(50))


class Company(SixthBase):
    """Shared by every organization."""

    __tablename__ = "p6_companies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Employee(SixthBase):
    """The recommended layout: the organization column on the base table only."""

    __tablename__ = "p6_employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    company_id: Mapped[int] = mapped_column(ForeignKey("p6_companies.id"))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}  # noqa: RUF012


class Engineer(Employee):
    __tablename__ = "p6_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("p6_employees.id"), primary_key=True)
    info: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "engineer"}  # noqa: RUF012


class Board(SixthBase):
    """A column_property reading a tenant table through Table columns."""

    __tablename__ = "p6_boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    links: Mapped[int] = column_property(
        select(func.count())
        .select_from(project_tags)
        .where(project_tags.c.project_id == id)
        .scalar_subquery()
    )


class Lead(Employee):
    """A subclass whose second foreign key to the base table needs an explicit
    inherit_condition, written with ORM attributes."""

    __tablename__ = "p6_leads"
    id: Mapped[int] = mapped_column(ForeignKey("p6_employees.id"), primary_key=True)
    mentor_id: Mapped[int | None] = mapped_column(ForeignKey("p6_employees.id"))
    team: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {  # noqa: RUF012
        "polymorphic_identity": "lead",
        "inherit_condition": id == Employee.id,
    }


class Badge(SixthBase):
    """A scoped row whose key names a joined subclass's own table."""

    __tablename__ = "p6_badges"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    engineer_id: Mapped[int] = mapped_column(ForeignKey("p6_engineers.id"))


class Label(SixthBase):
    """Shared by every organization (no organization column)."""

    __tablename__ = "p6_labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


project_labels = Table(
    "p6_project_labels",
    SixthBase.metadata,
    Column("project_id", ForeignKey("p6_projects.id"), primary_key=True),
    Column("label_id", ForeignKey("p6_labels.id"), primary_key=True),
    Column("organization_id", String(20), nullable=False),
)


#: no organization column: each row belongs to its project's organization
project_topics = Table(
    "p6_project_topics",
    SixthBase.metadata,
    Column("project_id", ForeignKey("p6_projects.id"), primary_key=True),
    Column("label_id", ForeignKey("p6_labels.id"), primary_key=True),
)


class Topic(SixthBase):
    """A class mapping the association table above, without the column:
    scoping does not scope it, and the table's rows stay tenant rows."""

    __table__ = project_topics
    project: Mapped[Project] = relationship(viewonly=True)
    #: a condition along a column whose key refers elsewhere (labels)
    by_label: Mapped[Project] = relationship(
        primaryjoin="foreign(Topic.label_id) == remote(Project.id)", viewonly=True
    )


class Project(SixthBase):
    __tablename__ = "p6_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(20))
    tags: Mapped[list[Tag]] = relationship(secondary=project_tags, order_by=Tag.id)
    labels: Mapped[list[Label]] = relationship(secondary=project_labels, order_by=Label.id)
    topics: Mapped[list[Label]] = relationship(
        secondary=project_topics, order_by=Label.id, viewonly=True
    )
    topic_rows: Mapped[list[Topic]] = relationship(viewonly=True)


def table_of(model: Any) -> Table:
    """The model's table, typed as one."""
    return cast(Table, model.__table__)


@pytest.fixture
def maker() -> Iterator[sessionmaker[OrmSession]]:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    SixthBase.metadata.create_all(engine)
    with engine.begin() as connection:
        for org, ident in (("org_a", 1), ("org_b", 2)):
            connection.execute(
                insert(table_of(Doc)), [{"id": ident, "organization_id": org, "kind": "invoice"}]
            )
            connection.execute(
                insert(table_of(Invoice)),
                [{"id": ident, "organization_id": org, "amount": 10 * ident}],
            )
            connection.execute(insert(table_of(Project)), [{"id": ident, "organization_id": org}])
            label = "red" if org == "org_a" else "B-SECRET"
            connection.execute(
                insert(table_of(Tag)), [{"id": ident, "organization_id": org, "label": label}]
            )
            connection.execute(
                insert(project_tags),
                [{"project_id": ident, "tag_id": ident, "organization_id": org}],
            )
            connection.execute(insert(table_of(Label)), [{"id": ident, "name": f"label-{ident}"}])
            connection.execute(insert(table_of(Company)), [{"id": ident, "name": f"co-{ident}"}])
            connection.execute(
                insert(table_of(Employee)),
                [{"id": ident, "organization_id": org, "company_id": 1, "kind": "engineer"}],
            )
            connection.execute(insert(table_of(Engineer)), [{"id": ident, "info": f"info-{org}"}])
            connection.execute(insert(project_topics), [{"project_id": ident, "label_id": ident}])
            lead = 10 + ident
            connection.execute(
                insert(table_of(Employee)),
                [{"id": lead, "organization_id": org, "company_id": 1, "kind": "lead"}],
            )
            connection.execute(insert(table_of(Lead)), [{"id": lead, "team": f"team-{org}"}])
            connection.execute(
                insert(project_labels),
                [{"project_id": ident, "label_id": ident, "organization_id": org}],
            )
    maker = sessionmaker(engine)
    scoping = enable_tenant_scoping(maker, models=SixthBase.registry)
    yield maker
    scoping.disable()
    engine.dispose()


#: statement -> org_a's rows
SCOPED: dict[str, tuple[Callable[[OrmSession], Any], Any]] = {
    "select(Invoice)": (lambda s: [i.amount for i in s.scalars(select(Invoice))], [10]),
    "an Invoice column": (lambda s: s.execute(select(Invoice.amount)).all(), [(10,)]),
    "count of Invoice": (lambda s: s.scalar(select(func.count(Invoice.id))), 1),
    "get(Invoice)": (lambda s: [s.get(Invoice, 1) is not None, s.get(Invoice, 2)], [True, None]),
    "lazy load through the association": (
        lambda s: [t.label for t in s.get(Project, 1).tags],  # type: ignore[union-attr]
        ["red"],
    ),
    "selectinload through the association": (
        lambda s: [
            [t.label for t in p.tags]
            for p in s.scalars(select(Project).options(selectinload(Project.tags)))
        ],
        [["red"]],
    ),
    "joinedload through the association": (
        lambda s: [
            [t.label for t in p.tags]
            for p in s.scalars(select(Project).options(joinedload(Project.tags))).unique()
        ],
        [["red"]],
    ),
    "any() through the association": (
        lambda s: s.execute(select(Project.id).where(Project.tags.any(Tag.label == "red"))).all(),
        [(1,)],
    ),
    "a join to the association table with the ON from its foreign keys": (
        lambda s: s.execute(select(Tag.label, project_tags.c.project_id).join(project_tags)).all(),
        [("red", 1)],
    ),
    "a joined subclass with its column in the WHERE": (
        lambda s: [e.id for e in s.scalars(select(Engineer).where(Engineer.info.like("info%")))],
        [1],
    ),
    "a joined subclass's column": (
        lambda s: s.scalars(select(Engineer.info)).all(),
        ["info-org_a"],
    ),
    "a count of a joined subclass": (lambda s: s.scalar(select(func.count(Engineer.id))), 1),
    "a joined subclass's column loaded after the base class": (
        lambda s: [getattr(e, "info", None) for e in s.scalars(select(Employee))],
        ["info-org_a", None],
    ),
    "an EXISTS pairing a subclass row with its base row": (
        lambda s: s.scalars(select(Doc.id).where(exists().where(Invoice.id == Doc.id))).all(),
        [1],
    ),
    "the same for a subclass table without the column": (
        lambda s: s.scalars(
            select(Employee.id).where(exists().where(Engineer.id == Employee.id))
        ).all(),
        [1],
    ),
    "a lazy load through an association table without the column": (
        lambda s: [label.name for label in s.get(Project, 1).topics],  # type: ignore[union-attr]
        ["label-1"],
    ),
    "selectinload through an association table without the column": (
        lambda s: [
            [label.name for label in p.topics]
            for p in s.scalars(select(Project).options(selectinload(Project.topics)))
        ],
        [["label-1"]],
    ),
    "any() through an association table without the column": (
        lambda s: s.scalars(select(Project.id).where(Project.topics.any(Label.id > 0))).all(),
        [1],
    ),
    "with_parent() through an association table without the column": (
        lambda s: [
            label.name
            for label in s.scalars(
                select(Label).where(with_parent(s.get(Project, 1), Project.topics))
            )
        ],
        ["label-1"],
    ),
    "a count over an outer-joined association table": (
        lambda s: s.execute(
            select(Project.id, func.count(project_topics.c.label_id))
            .outerjoin(project_topics)
            .group_by(Project.id)
        ).all(),
        [(1, 1)],
    ),
    "select_from(association table).join(Partner)": (
        lambda s: s.execute(select(Project.id).select_from(project_topics).join(Project)).all(),
        [(1,)],
    ),
    "a join along the association class's many-to-one": (
        lambda s: s.execute(select(project_topics.c.label_id).join(Topic.project)).all(),
        [(1,)],
    ),
    "a join along the scoped class's one-to-many": (
        lambda s: s.execute(
            select(Project.id, project_topics.c.label_id).join(Project.topic_rows)
        ).all(),
        [(1, 1)],
    ),
    "a subclass column load with an ORM inherit_condition": (
        lambda s: [getattr(e, "team", None) for e in s.scalars(select(Employee))],
        [None, "team-org_a"],
    ),
    "with_polymorphic": (
        lambda s: [
            getattr(d, "amount", None) for d in s.scalars(select(with_polymorphic(Doc, [Invoice])))
        ],
        [10],
    ),
    "aliased(Invoice)": (lambda s: s.scalars(select(aliased(Invoice).amount)).all(), [10]),
    "aliased(Invoice, flat=True)": (
        lambda s: s.scalars(select(aliased(Invoice, flat=True).amount)).all(),
        [10],
    ),
    "a subclass column loaded after the base class": (
        lambda s: [getattr(d, "amount", None) for d in s.scalars(select(Doc))],
        [10],
    ),
    "lazy load of a shared class through the association": (
        lambda s: [label.name for label in s.get(Project, 1).labels],  # type: ignore[union-attr]
        ["label-1"],
    ),
    "selectinload of a shared class through the association": (
        lambda s: [
            [label.name for label in p.labels]
            for p in s.scalars(select(Project).options(selectinload(Project.labels)))
        ],
        [["label-1"]],
    ),
    "any() of a shared class through the association": (
        lambda s: s.execute(
            select(Project.id).where(Project.labels.any(Label.name.like("label-%")))
        ).all(),
        [(1,)],
    ),
}


@pytest.mark.parametrize(("read", "rows"), list(SCOPED.values()), ids=list(SCOPED))
def test_schemas_sqlalchemy_scopes_are_not_refused(
    maker: sessionmaker[OrmSession], read: Callable[[OrmSession], Any], rows: Any
) -> None:
    with maker() as session, as_organization("org_a"):
        assert read(session) == rows


#: association rows read beside a scoped entity but not paired with it
UNPAIRED: dict[str, Callable[[], Any]] = {
    "association columns": lambda: select(
        Project.id, project_tags.c.project_id, project_tags.c.tag_id
    ),
    "a count of association rows": lambda: select(func.count(project_tags.c.tag_id)).where(
        Project.id == 1
    ),
    "an EXISTS over association rows": lambda: select(Project.id).where(
        exists(select(project_tags.c.tag_id).where(project_tags.c.tag_id == 2))
    ),
}


@pytest.mark.parametrize("build", list(UNPAIRED.values()), ids=list(UNPAIRED))
def test_association_rows_not_paired_with_scoped_rows_are_refused(
    maker: sessionmaker[OrmSession], build: Callable[[], Any]
) -> None:
    refused = pytest.raises(TenantScopingError, match="cannot reach")
    with maker() as session, as_organization("org_a"), refused:
        session.execute(build()).all()


#: reads of a joined subclass's own table (no organization column) that
#: SQLAlchemy does not join to the base table's criterion
SUBCLASS_TABLE_READS: dict[str, Callable[[], Any]] = {
    "EXISTS of a subclass column": lambda: select(exists().where(Engineer.info == "info-org_b")),
    "a count with the subclass only in the WHERE": lambda: select(func.count()).where(
        Engineer.info == "info-org_b"
    ),
    "a shared class by another organization's subclass rows": lambda: select(Company.name).where(
        exists().where(Engineer.info == "info-org_b", Engineer.company_id == Company.id)
    ),
    "Core on the subclass table": lambda: select(func.count()).select_from(table_of(Engineer)),
}


@pytest.mark.parametrize(
    "build", list(SUBCLASS_TABLE_READS.values()), ids=list(SUBCLASS_TABLE_READS)
)
def test_a_joined_subclass_table_read_apart_from_its_base_is_refused(
    maker: sessionmaker[OrmSession], build: Callable[[], Any]
) -> None:
    """The subclass table holds tenant rows though it has no organization
    column: read where the base table's criterion does not join it, every
    organization's rows answered."""
    with maker() as session, as_organization("org_a"), pytest.raises(TenantScopingError):
        session.execute(build()).all()


def test_an_aliased_entity_over_sql_without_the_organization_column_is_refused(
    maker: sessionmaker[OrmSession],
) -> None:
    """SQLAlchemy cannot adapt the criterion to such an alias: it compares the
    entity's table as an extra FROM (text: every organization's rows; an ORM
    subquery: each row repeated once per row of the organization)."""
    textual = text("SELECT id, label FROM p6_tags").columns(Tag.id, Tag.label).subquery()
    orm_subquery = select(Tag.id, Tag.label).subquery()
    with maker() as session, as_organization("org_a"):
        for selectable in (textual, orm_subquery):
            with pytest.raises(TenantScopingError, match="alias without organization_id"):
                session.scalars(select(aliased(Tag, selectable))).all()
        with_column = select(Tag.id, Tag.label, Tag.organization_id).subquery()
        assert [t.label for t in session.scalars(select(aliased(Tag, with_column)))] == ["red"]


def test_association_rows_without_the_column_read_on_their_own_are_refused(
    maker: sessionmaker[OrmSession],
) -> None:
    """Each row of an association table of a scoped class belongs to its
    project's organization, column or not: read or deleted through the
    session on its own, every organization's rows were reached."""
    with maker() as session, as_organization("org_a"):
        for statement in (
            select(project_topics.c.project_id),
            delete(project_topics).where(project_topics.c.label_id == 2),
        ):
            with pytest.raises(TenantScopingError):
                session.execute(statement)


def test_a_bulk_update_by_primary_key_of_a_joined_subclass(
    maker: sessionmaker[OrmSession],
) -> None:
    """SQLAlchemy refuses any extra criteria in a bulk UPDATE by primary key:
    the join to the parent table is not added there, the keys are checked."""
    with maker() as session, as_organization("org_a"):
        session.execute(update(Engineer), [{"id": 1, "info": "renamed"}])
        assert session.scalars(select(Engineer.info)).all() == ["renamed"]
        with pytest.raises(CrossTenantWriteError):
            session.execute(update(Engineer), [{"id": 2, "info": "PWNED"}])


#: association rows paired with nothing scoped, though a comparison names a
#: scoped table: a partner on the optional side of an outer join, a join with
#: no ON from a shared class, an ON comparing a column that is no foreign key
UNSURE_PAIRINGS: dict[str, Callable[[], Any]] = {
    "the partner outer-joined": lambda: (
        select(Label.name, project_topics.c.project_id)
        .outerjoin(project_topics, project_topics.c.label_id == Label.id)
        .outerjoin(Project, Project.id == project_topics.c.project_id)
    ),
    "joined from a shared class": lambda: (
        select(project_topics.c.project_id)
        .select_from(Label)
        .join(project_topics)
        .where(Project.id == 1)
    ),
    "a keyed equality under OR": lambda: (
        select(Label.name, project_topics.c.project_id)
        .join(project_topics, project_topics.c.label_id == Label.id)
        .join(Project, or_(Project.id == project_topics.c.project_id, Project.id > 0))
    ),
    "a DELETE of association rows by a keyed equality under OR": lambda: delete(
        project_topics
    ).where(
        exists(
            select(Project.id).where(or_(Project.id == project_topics.c.project_id, Project.id > 0))
        )
    ),
    "a value bound by a callable of one's own": lambda: select(
        project_topics.c.project_id, Project.id
    ).where(project_topics.c.project_id == bindparam("p", callable_=lambda: 2)),
    "the class mapping the association table": lambda: select(Topic),
    "a subclass table joined by a scoped row's own key (no ON)": lambda: select(
        Badge.id, table_of(Engineer).c.info
    ).join(table_of(Engineer)),
    "a relationship join along a key that refers elsewhere": lambda: select(
        project_topics.c.label_id
    ).join(Topic.by_label),
    "a DELETE through that class": lambda: delete(Topic).where(project_topics.c.label_id == 2),
    "an ON that is no foreign key": lambda: (
        select(Label.name, project_topics.c.project_id)
        .join(project_topics, project_topics.c.label_id == Label.id)
        .join(Project, Project.id == project_topics.c.label_id)
    ),
}


@pytest.mark.parametrize("build", list(UNSURE_PAIRINGS.values()), ids=list(UNSURE_PAIRINGS))
def test_association_rows_not_surely_paired_are_refused(
    maker: sessionmaker[OrmSession], build: Callable[[], Any]
) -> None:
    with maker() as session, as_organization("org_a"), pytest.raises(TenantScopingError):
        session.execute(build()).all()


def test_a_column_property_reading_tenant_rows_unscoped_refuses_its_class(
    maker: sessionmaker[OrmSession],
) -> None:
    """SQLAlchemy adds the property's SQL only when it compiles (or loads it
    deferred): judged per class, any statement loading the class is refused."""
    with maker() as session, as_organization("org_a"):
        for statement in (select(Board), select(Board.id)):
            with pytest.raises(TenantScopingError, match=r"Board\.links"):
                session.execute(statement).all()
        with pytest.raises(TenantScopingError, match=r"Board\.links"):
            session.get(Board, 1)


def test_tenant_tables_tolerate_a_join_as_a_key() -> None:
    """A relationship whose secondary is a join put the join among the tenant
    tables, and reading its name failed every statement of the session."""
    joined = table_of(Project).join(project_topics)
    tables = _TenantTables({joined: "organization_id", table_of(Project): "organization_id"})
    assert tables.get(table_of(Project)) == "organization_id"


def test_which_equalities_join_rows_by_their_foreign_keys() -> None:
    """A comparison pairs a row with a scoped row when the row's column refers
    to the scoped row's by foreign key: directly or along a chain of keys (a
    grandchild's id, its parent's, the root's). Not the other way round, nor
    two keys of one row (the Mega-Tutorial's ``followers.c.followed_id ==
    Post.user_id``): a scoped row's key values may name another
    organization's rows."""
    from sqlalchemy import ForeignKeyConstraint, Integer, MetaData, UniqueConstraint

    from flask_oauth_verify.sqlshape import _keyed

    meta = MetaData()
    root = Table("k_root", meta, Column("id", Integer, primary_key=True))
    child = Table("k_child", meta, Column("id", ForeignKey("k_root.id"), primary_key=True))
    grandchild = Table("k_grand", meta, Column("id", ForeignKey("k_child.id"), primary_key=True))
    Table("k_user", meta, Column("id", Integer, primary_key=True))  # a tenant table
    Table("k_shared", meta, Column("id", Integer, primary_key=True))  # a shared table
    link = Table(
        "k_link",
        meta,
        Column("user_id", ForeignKey("k_user.id")),
        Column("shared_id", ForeignKey("k_shared.id")),
    )
    post = Table(
        "k_post",
        meta,
        Column("user_id", ForeignKey("k_user.id")),
        Column("shared_id", ForeignKey("k_shared.id")),
    )
    assert _keyed(child.c.id, root.c.id)
    assert _keyed(grandchild.c.id, root.c.id), "along the chain of keys"
    assert _keyed(grandchild.c.id, child.alias("c2").c.id), "through an alias"
    assert not _keyed(root.c.id, grandchild.c.id), "the scoped row's key refers to the other"
    assert not _keyed(link.c.user_id, post.c.user_id), "two keys of one tenant row"
    assert not _keyed(link.c.shared_id, post.c.shared_id), "two keys of a shared row"
    assert not _keyed(link.c.user_id, root.c.id), "no key between them"
    # half of a composite key (organization, id) names no row by itself
    member = Table(
        "k_member",
        meta,
        Column("organization_id", Integer),
        Column("id", Integer),
        UniqueConstraint("organization_id", "id"),
    )
    composite = [
        Table(
            name,
            meta,
            Column("organization_id", Integer),
            Column("member_id", Integer),
            ForeignKeyConstraint(
                ["organization_id", "member_id"], ["k_member.organization_id", "k_member.id"]
            ),
        )
        for name in ("k_group_link", "k_note")
    ]
    assert not _keyed(composite[0].c.member_id, member.c.id)
    assert not _keyed(composite[0].c.member_id, composite[1].c.member_id)


def test_a_join_with_no_on_is_vouched_for_only_by_direct_keys() -> None:
    """A join with no ON uses the keys between its two tables: a chain of keys
    (a grandchild's id to its parent's to the root's) does not tell which, and
    once vouched for the root's own key to the grandchild (another
    organization's row, if the root row says so)."""
    from sqlalchemy import Integer, MetaData

    from flask_oauth_verify.sqlshape import _refers

    meta = MetaData()
    root = Table(
        "r_root",
        meta,
        Column("id", Integer, primary_key=True),
        Column("lead_id", ForeignKey("r_grand.id")),
    )
    child = Table("r_child", meta, Column("id", ForeignKey("r_root.id"), primary_key=True))
    grand = Table("r_grand", meta, Column("id", ForeignKey("r_child.id"), primary_key=True))
    assert _refers(child, root)
    assert _refers(root, grand), "the root's own key names the grandchild"
    assert not _refers(grand, root), "only along a chain: no key of the grandchild names the root"
    assert not _refers(grand, root.alias("r2"))
