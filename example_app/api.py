"""The example API: every route shows one feature of flask_oauth_verify.

No route filters by organization by hand: ``enable_tenant_scoping(db)`` (in
``models.py``) adds the caller's organization to every ORM query and guards
every write, so a forgotten filter cannot leak another tenant's rows.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, g, jsonify, request
from sqlalchemy import delete, func, select
from sqlalchemy.exc import DataError
from werkzeug.exceptions import MethodNotAllowed

from flask_oauth_verify import (
    OAuthVerifyError,
    current_auth,
    require_organization,
    require_scope,
    require_token,
    require_user,
    user_scoped,
)
from flask_oauth_verify.tenancy import unscoped

from .models import Customer, Project, db

api = Blueprint("api", __name__, url_prefix="/api")


#: The largest id the database stores (SQLite and PostgreSQL: 64-bit signed);
#: the driver cannot even send a bigger one, so such an id is a 404 unasked.
MAX_ID = 2**63 - 1


@api.app_errorhandler(404)
def not_found(_error: Exception) -> tuple[dict[str, str], int]:
    """JSON, like every other answer of the API (another tenant's id lands here,
    and so does a path no route matches)."""
    return {"error": "not_found", "message": "No such resource."}, 404


@api.app_errorhandler(DataError)
def value_does_not_fit(_error: DataError) -> tuple[dict[str, str], int]:
    """A value the database refuses (longer than its column: an organization
    id of more than 64 characters on PostgreSQL) is the client's 400."""
    db.session.rollback()
    return {"error": "invalid_request", "message": "A value does not fit."}, 400


@api.app_errorhandler(500)
def internal_error(_error: Exception) -> tuple[dict[str, str], int]:
    """JSON even for a bug: never an HTML page to an API client."""
    return {"error": "server_error", "message": "Internal server error."}, 500


@api.app_errorhandler(405)
def method_not_allowed(error: MethodNotAllowed) -> Response:
    """JSON too, with the ``Allow`` header naming the methods the route takes."""
    response = jsonify(error="method_not_allowed", message="Method not allowed.")
    response.status_code = 405
    response.headers["Allow"] = ", ".join(error.valid_methods or ())
    return response


@api.get("/me")
@require_token
def me() -> dict[str, object]:
    """Who is calling: the verified AuthContext."""
    auth = current_auth
    return {
        "subject": auth.subject,
        "client_id": auth.client_id,
        "user_id": auth.user_id,
        "organization_id": auth.organization_id,
        "scopes": sorted(auth.scopes),
        "token_type": auth.token_type,
        "service_name": auth.service_name,
        "expires_at": auth.expires_at,
        "strategy": auth.strategy,
    }


@api.get("/customers")
@require_scope("customers:read")
@require_organization
def list_customers() -> dict[str, object]:
    """This organization's customers only (scoped automatically)."""
    rows = db.session.scalars(select(Customer).order_by(Customer.id)).all()
    return {"organization_id": g.auth.organization_id, "customers": [c.to_dict() for c in rows]}


@api.get("/customers/<int:customer_id>")
@require_scope("customers:read")
@require_organization
def get_customer(customer_id: int) -> dict[str, object]:
    """One customer with its projects; another organization's id is a 404."""
    customer = db.session.get(Customer, customer_id) if customer_id <= MAX_ID else None
    if customer is None:
        abort(404)
    return {**customer.to_dict(), "projects": [p.to_dict() for p in customer.projects]}


#: What a customer's name must be (the column holds 200 characters).
NAME_RULE = "name is required: a string of 1 to 200 characters, no NUL"


def _json_object() -> dict[str, object]:
    """The request's JSON object, or ``{}``: not JSON, not an object, or
    nested too deeply for Python's parser (a ``RecursionError``, which
    ``silent=True`` does not catch)."""
    try:
        payload = request.get_json(silent=True)
    except RecursionError:
        payload = None
    return payload if isinstance(payload, dict) else {}


def _storable(text: str) -> bool:
    """Whether a name fits its column and every database takes it: not
    empty, at most 200 characters, no NUL, no unpaired surrogate."""
    if not 0 < len(text) <= 200 or "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@api.post("/customers")
@require_scope("customers:write")
@require_organization
def create_customer() -> tuple[dict[str, object], int]:
    """Create a customer; the write guard stamps (or refuses) the organization."""
    payload = _json_object()
    name = payload.get("name")
    if not isinstance(name, str) or not _storable(name := name.strip()):
        return {"error": "invalid_request", "message": NAME_RULE}, 400
    customer = Customer(name=name)
    if "organization_id" in payload:  # a client trying another tenant gets a 403
        customer.organization_id = str(payload["organization_id"])
    db.session.add(customer)
    db.session.commit()
    return customer.to_dict(), 201


@api.delete("/customers/<int:customer_id>")
@require_scope("customers:write", strategy="both")
@require_organization
def delete_customer(customer_id: int) -> tuple[str, int]:
    """Revocation-sensitive: the JWT is verified, then confirmed active."""
    if customer_id > MAX_ID:
        abort(404)
    # Statements, scoped and guarded like any: a DELETE racing another for
    # the same customer deletes nothing and answers 404, not a second 204.
    db.session.execute(delete(Project).where(Project.customer_id == customer_id))
    deleted = db.session.execute(delete(Customer).where(Customer.id == customer_id))
    if not getattr(deleted, "rowcount", 0):
        db.session.rollback()
        abort(404)
    db.session.commit()
    return "", 204


@api.get("/projects")
@require_scope("projects:read")
@require_organization
def list_projects() -> dict[str, object]:
    """This organization's projects, joined with their customers."""
    rows = db.session.execute(
        select(Project, Customer.name).join(Project.customer).order_by(Project.id)
    ).all()
    return {"projects": [{**p.to_dict(), "customer": name} for p, name in rows]}


@api.get("/my-projects")
@require_user
@require_scope("projects:read")
def my_projects() -> dict[str, object]:
    """Projects owned by the calling user (explicit user_scoped helper)."""
    rows = db.session.scalars(user_scoped(select(Project))).all()
    return {"user_id": g.auth.user_id, "projects": [p.to_dict() for p in rows]}


@api.get("/reports")
@require_scope("reports:read", strategy="auto")
@require_organization
def reports() -> dict[str, object]:
    """Accepts JWTs (verified locally) and opaque tokens (introspected)."""
    count = db.session.scalar(select(func.count(Customer.id)))
    return {"organization_id": g.auth.organization_id, "customers": count, "via": g.auth.strategy}


class PlatformOnly(OAuthVerifyError):
    """403: a cross-organization read asked for with a tenant's token."""

    code = 403
    error = "forbidden"
    challenge_error = None  # no RFC 6750 error fits: the token is fine, the caller is not
    default_description = "Only the platform operator's token reads across organizations."


@api.get("/admin/customer-counts")
@require_scope("admin:read")
def customer_counts() -> dict[str, object]:
    """An audited cross-tenant read: the opt-out is explicit and logged.

    Only for the platform operator's own token: ``admin:read``, no
    organization, and a client listed in ``PLATFORM_CLIENT_IDS`` (default
    ``["platform-ops"]``). A tenant's administrator holding ``admin:read`` is
    still one organization and sees nothing of the others: 403.
    """
    operators = current_app.config["PLATFORM_CLIENT_IDS"]  # a frozenset (create_app)
    if g.auth.organization_id is not None or g.auth.client_id not in operators:
        raise PlatformOnly(reason="a tenant's or unknown client's token on a platform route")
    rows = db.session.execute(
        unscoped(
            select(Customer.organization_id, func.count(Customer.id)).group_by(
                Customer.organization_id
            ),
            reason=f"admin report by {g.auth.subject}",
        )
    ).all()
    return {"counts": {org: count for org, count in rows}}
