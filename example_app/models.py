"""The example's data: customers and projects, each owned by an organization."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flask_oauth_verify.tenancy import as_organization, enable_tenant_scoping


class Base(DeclarativeBase):
    """Declarative base."""


db = SQLAlchemy(model_class=Base)
#: Every ORM query of db.session is scoped to the caller's organization, and
#: every flush is guarded: forgetting a filter cannot leak another tenant's rows.
tenant_scoping = enable_tenant_scoping(db)


class Customer(db.Model):  # type: ignore[name-defined,misc]
    """A customer of one organization."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    projects: Mapped[list[Project]] = relationship(back_populates="customer")

    def to_dict(self) -> dict[str, object]:
        """JSON shape."""
        return {"id": self.id, "organization_id": self.organization_id, "name": self.name}


class Project(db.Model):  # type: ignore[name-defined,misc]
    """A project for a customer, owned by a user, within one organization."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    customer: Mapped[Customer] = relationship(back_populates="projects")

    def to_dict(self) -> dict[str, object]:
        """JSON shape."""
        return {
            "id": self.id,
            "organization_id": self.organization_id,
            "customer_id": self.customer_id,
            "user_id": self.user_id,
            "name": self.name,
        }


SEED = {
    "org_acme": (["Wile E. Coyote", "Road Runner Inc."], "user_alice"),
    "org_globex": (["Hank Scorpio", "Globex Research"], "user_bob"),
}


def seed() -> None:
    """Create the tables and two organizations of data (idempotent)."""
    db.create_all()
    # Core on the engine: an admin check at start-up, outside tenant scoping
    # (an unscoped() read here would write an audit line at every boot)
    with db.engine.connect() as connection:
        existing = connection.scalar(select(func.count()).select_from(Customer.__table__))
    if existing:
        return
    for org, (names, user) in SEED.items():
        # Outside a request there is no token: act as each organization in turn.
        with as_organization(org):
            for index, name in enumerate(names):
                customer = Customer(name=name)  # organization_id stamped on flush
                db.session.add(customer)
                db.session.flush()
                db.session.add(
                    Project(
                        customer_id=customer.id,
                        user_id=user if index == 0 else None,
                        name=f"{name} rollout",
                    )
                )
            db.session.commit()
