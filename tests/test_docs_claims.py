"""Claims of the user docs (docs/*.rst), executed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header
from tests.conftest import make_app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(text: str) -> list[str]:
    """The indented literal blocks (``::`` and ``code-block``) of a page."""
    blocks: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if not line.rstrip().endswith("::") and ".. code-block:: python" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append("\n".join(body))
    return blocks


@pytest.mark.parametrize(
    "page", ["tenancy.rst", "introspection.rst", "operations.rst", "errors.rst"]
)
def test_snippet_decorators_are_imported(page: str) -> None:
    """A snippet that imports from flask_oauth_verify imports every
    ``@require_*`` decorator it uses (tenancy.rst used ``@require_user``
    without importing it: a NameError when copied)."""
    for block in _blocks((DOCS / page).read_text(encoding="utf-8")):
        imported: set[str] = set()
        for names in re.findall(r"from flask_oauth_verify import ([^\n]+)", block):
            imported.update(name.strip() for name in names.split(","))
        if not imported:
            continue
        used = set(re.findall(r"^\s*@(require_\w+)", block, flags=re.MULTILINE))
        assert used <= imported, (page, sorted(used - imported), block)


def test_health_is_unhealthy_while_the_introspection_breaker_is_open(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """operations.rst: the health check answers 503 when requests get 503.
    A probe that passed a moment before the endpoint's circuit breaker
    opened must not keep the route ``healthy`` for the probe interval."""
    app = make_app(
        served_tokens.config(
            STRATEGY="introspection",
            INTROSPECTION_CLIENT_ID="resource-server",
            INTROSPECTION_CLIENT_SECRET="rs-secret",
            CIRCUIT_BREAKER_FAILURES=2,
            HEALTH_ROUTE=True,
        )
    )
    client = app.test_client()
    first = client.get("/health/token-validation")
    assert first.status_code == 200, first.get_json()
    issuer_server.route("/introspect", Reply(503, {"error": "down"}))
    token = served_tokens.mint_opaque()
    for _ in range(2):
        assert client.get("/protected", headers=auth_header(token)).status_code == 503
    refused = client.get("/protected", headers=auth_header(token))
    assert refused.status_code == 503
    hits = issuer_server.hits["/introspect"]
    health = client.get("/health/token-validation")
    assert health.status_code == 503, health.get_json()
    assert health.get_json()["checks"]["introspection"]["error"] == "circuit breaker open"
    assert issuer_server.hits["/introspect"] == hits  # no probe while open
