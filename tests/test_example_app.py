"""The example app works end to end with its development issuer."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from example_app import create_app
from example_app.commands import banner
from flask_oauth_verify.testing import TokenIssuer, auth_header


@pytest.fixture
def example(tmp_path: Path) -> Flask:
    app = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    return app


def dev_issuer(app: Flask) -> TokenIssuer:
    issuer: TokenIssuer = app.extensions["oauth_verify_dev_issuer"]
    return issuer


def mint(app: Flask, org: str, scopes: list[str], subject: str = "user_x") -> dict[str, str]:
    token = dev_issuer(app).mint(
        subject=subject, organization_id=org, scopes=scopes, audience="example-api"
    )
    return auth_header(token)


def test_two_organizations_are_isolated(example: Flask) -> None:
    client = example.test_client()
    acme = client.get("/api/customers", headers=mint(example, "org_acme", ["customers:read"]))
    globex = client.get("/api/customers", headers=mint(example, "org_globex", ["customers:read"]))
    assert acme.status_code == globex.status_code == 200
    assert acme.json is not None and globex.json is not None
    assert {c["organization_id"] for c in acme.json["customers"]} == {"org_acme"}
    assert {c["organization_id"] for c in globex.json["customers"]} == {"org_globex"}
    acme_ids = {c["id"] for c in acme.json["customers"]}
    for customer_id in acme_ids:
        other = client.get(
            f"/api/customers/{customer_id}",
            headers=mint(example, "org_globex", ["customers:read"]),
        )
        assert other.status_code == 404


def test_scope_and_token_errors(example: Flask) -> None:
    client = example.test_client()
    assert client.get("/api/customers").status_code == 401
    few = client.get("/api/customers", headers=mint(example, "org_acme", ["projects:read"]))
    assert few.status_code == 403
    assert few.headers["X-Content-Type-Options"] == "nosniff"


def test_writes_land_in_the_callers_organization(example: Flask) -> None:
    client = example.test_client()
    headers = mint(example, "org_acme", ["customers:write", "customers:read"])
    created = client.post("/api/customers", json={"name": "New Co"}, headers=headers)
    assert created.status_code == 201
    assert created.json is not None and created.json["organization_id"] == "org_acme"
    globex = client.get("/api/customers", headers=mint(example, "org_globex", ["customers:read"]))
    assert globex.json is not None
    assert "New Co" not in {c["name"] for c in globex.json["customers"]}


def test_banner_tokens_work(example: Flask) -> None:
    text = banner(dev_issuer(example), "http://127.0.0.1:5000")
    tokens = [line.split("'")[1] for line in text.splitlines() if line.startswith("TOKEN=")]
    assert len(tokens) == 3
    client = example.test_client()
    statuses = [client.get("/api/customers", headers=auth_header(t)).status_code for t in tokens]
    assert statuses == [200, 200, 403]


def test_dev_issuer_is_absent_unless_enabled(tmp_path: Path, tokens: TokenIssuer) -> None:
    app = create_app(tokens.config(audience="example-api"), instance_path=str(tmp_path))
    assert "oauth_verify_dev_issuer" not in app.extensions
    assert app.test_client().get("/dev-issuer/jwks").status_code == 404


def test_operations_features_are_on(example: Flask) -> None:
    client = example.test_client()
    client.get("/api/customers", headers=mint(example, "org_acme", ["customers:read"]))
    client.get("/api/customers", headers=auth_header("not.a.token"))
    health = client.get("/health/token-validation")
    assert health.status_code == 200 and health.json is not None
    assert health.json["status"] == "healthy"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "token_validations_total" in metrics
    minted = example.test_cli_runner().invoke(
        args=["oauth-verify", "mint", "--sub", "user_cli", "--scope", "customers:read"]
    )
    assert minted.exit_code == 0, minted.output
    token = minted.output.strip().splitlines()[-1]
    assert client.get("/api/me", headers=auth_header(token)).status_code == 200
