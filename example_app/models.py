"""The example's data: customers and projects, each owned by an organization."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Declarative base."""


db = SQLAlchemy(model_class=Base)


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
    if db.session.query(Customer).count():
        return
    for org, (names, user) in SEED.items():
        for index, name in enumerate(names):
            customer = Customer(organization_id=org, name=name)
            db.session.add(customer)
            db.session.flush()
            db.session.add(
                Project(
                    organization_id=org,
                    customer_id=customer.id,
                    user_id=user if index == 0 else None,
                    name=f"{name} rollout",
                )
            )
    db.session.commit()
