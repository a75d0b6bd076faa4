"""A browser widget's API: one check for the whole blueprint, and CORS.

``verify_request()`` in ``before_request`` checks every request of the
blueprint before any view runs (the views need no decorator). A browser on
the widget's origin first sends a CORS preflight, an ``OPTIONS`` request
without credentials: Flask answers it itself (automatic ``OPTIONS``), and
``verify_request()`` lets that answer through; ``after_request`` adds the
CORS headers to every answer, refusals included, so the browser can read
their JSON.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g
from sqlalchemy import func, select

from flask_oauth_verify import verify_request

from .models import Customer, db

widget = Blueprint("widget", __name__, url_prefix="/widget")

#: The origin the widget is served from (``EXAMPLE_WIDGET_ORIGIN`` overrides).
DEFAULT_ORIGIN = "http://localhost:3000"


@widget.before_request
def check_token() -> None:
    """Every request of the blueprint: a valid token with ``customers:read``."""
    verify_request(scopes=["customers:read"])


@widget.after_request
def allow_the_widget(response: Response) -> Response:
    """CORS for the widget's origin (what Flask-CORS would add)."""
    response.headers["Access-Control-Allow-Origin"] = current_app.config.get(
        "WIDGET_ORIGIN", DEFAULT_ORIGIN
    )
    response.headers["Access-Control-Allow-Headers"] = "Authorization"
    response.headers["Vary"] = "Origin"
    return response


@widget.get("/summary")
def summary() -> dict[str, object]:
    """The caller's organization at a glance (tenant scoping filters the count)."""
    count = db.session.scalar(select(func.count(Customer.id)))
    return {"organization_id": g.auth.organization_id, "customers": count}
