"""The example app works end to end with its development issuer."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier as BarrierType
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from example_app import create_app as _create_app
from example_app.api import NAME_RULE
from example_app.commands import banner
from example_app.dev_issuer import load_dev_issuer
from example_app.logging_setup import JSONFormatter, configure_security_log
from example_app.models import db
from flask_oauth_verify import ConfigurationError
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import free_port
from .tenancy_support import PostgresSchema

#: Every app the tests made: their engines' pooled SQLite connections are
#: closed after each test (Python 3.13 warns of one left open, and the
#: warning would fail whichever later test the collector happened to run in).
_MADE: list[Flask] = []


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """The example app's factory, the app remembered for :func:`_dispose_engines`."""
    app = _create_app(*args, **kwargs)
    _MADE.append(app)
    return app


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    while _MADE:
        with _MADE.pop().app_context():
            db.engine.dispose()


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
    tokens = [
        line.split("'")[1] for line in text.splitlines() if line.startswith(("TOKEN=", "OPAQUE="))
    ]
    assert len(tokens) == 3 + 1
    # Pasted in order, each curl line sends the variable's latest value.
    variables: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if value.startswith("'") and name.isupper():
            variables[name] = value.strip("'")
        elif '/widget/summary -H "Authorization: Bearer $' in line:
            variable = line.split("Bearer $", 1)[1].rstrip('"')
            widget = example.test_client().get(
                "/widget/summary", headers=auth_header(variables[variable])
            )
            assert widget.status_code == 200, widget.json
    client = example.test_client()
    statuses = [
        client.get("/api/customers", headers=auth_header(t)).status_code for t in tokens[:3]
    ]
    assert statuses == [200, 200, 403]
    # The whole block pastes into a shell: every line that is no command is a comment.
    bash = shutil.which("bash") or "/bin/bash"
    check = subprocess.run(  # noqa: S603 - bash -n only parses the text
        [bash, "-n"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    for line in filter(None, text.splitlines()):
        assert line.startswith(("#", "curl ")) or line.partition("=")[0].isupper(), line


def test_dev_issuer_is_absent_unless_enabled(tmp_path: Path, tokens: TokenIssuer) -> None:
    app = create_app(tokens.config(audience="example-api"), instance_path=str(tmp_path))
    assert "oauth_verify_dev_issuer" not in app.extensions
    assert app.test_client().get("/dev-issuer/jwks").status_code == 404


@pytest.fixture
def live_example(tmp_path: Path) -> Iterator[tuple[Flask, str]]:
    """The example app served for real on 127.0.0.1 (introspection calls itself)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    previous = os.environ.get("EXAMPLE_BASE_URL")
    os.environ["EXAMPLE_BASE_URL"] = base
    try:
        app = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    finally:
        if previous is None:
            os.environ.pop("EXAMPLE_BASE_URL", None)
        else:
            os.environ["EXAMPLE_BASE_URL"] = previous
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, base
    server.shutdown()


def test_opaque_tokens_are_introspected_and_revocation_is_immediate(
    live_example: tuple[Flask, str],
) -> None:
    app, base = live_example
    issuer = dev_issuer(app)
    opaque = issuer.mint_opaque(
        subject="svc", organization_id="org_globex", scopes=["reports:read"], audience="example-api"
    )
    reports = requests.get(f"{base}/api/reports", headers=auth_header(opaque), timeout=10)
    assert reports.status_code == 200
    assert reports.json()["via"] == "introspection"
    requests.post(f"{base}/dev-issuer/revoke", data={"token": opaque}, timeout=10)
    again = requests.get(f"{base}/api/reports", headers=auth_header(opaque), timeout=10)
    assert again.status_code == 401


def test_revocation_sensitive_route_checks_the_jwt_is_still_active(
    live_example: tuple[Flask, str],
) -> None:
    app, base = live_example
    headers = mint(app, "org_acme", ["customers:write", "customers:read"])
    created = requests.post(
        f"{base}/api/customers", json={"name": "Doomed"}, headers=headers, timeout=10
    )
    assert created.status_code == 201
    token = headers["Authorization"].split()[1]
    dev_issuer(app).revoke(token)
    # the JWT alone still verifies (JWKS strategy) ...
    assert requests.get(f"{base}/api/customers", headers=headers, timeout=10).status_code == 200
    # ... but the revocation-sensitive route confirms with introspection
    deleted = requests.delete(
        f"{base}/api/customers/{created.json()['id']}", headers=headers, timeout=10
    )
    assert deleted.status_code == 401


def test_operations_features_are_on(live_example: tuple[Flask, str]) -> None:
    app, base = live_example
    requests.get(
        f"{base}/api/customers", headers=mint(app, "org_acme", ["customers:read"]), timeout=10
    )
    requests.get(f"{base}/api/customers", headers=auth_header("not.a.token"), timeout=10)
    health = requests.get(f"{base}/health/token-validation", timeout=10)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "healthy"
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert 'token_validations_total{status="invalid_token"' in metrics
    minted = app.test_cli_runner().invoke(
        args=["oauth-verify", "mint", "--sub", "user_cli", "--scope", "customers:read"]
    )
    assert minted.exit_code == 0, minted.output
    token = minted.output.strip().splitlines()[-1]
    me = requests.get(f"{base}/api/me", headers=auth_header(token), timeout=10)
    assert me.status_code == 200 and me.json()["subject"] == "user_cli"


def test_cross_tenant_write_and_missing_organization(example: Flask) -> None:
    client = example.test_client()
    acme = mint(example, "org_acme", ["customers:write", "customers:read"])
    smuggled = client.post(
        "/api/customers", json={"name": "Evil", "organization_id": "org_globex"}, headers=acme
    )
    assert smuggled.status_code == 403
    assert smuggled.json is not None and smuggled.json["error"] == "cross_tenant_write"
    no_org = auth_header(
        dev_issuer(example).mint(
            subject="user_x", scopes=["customers:read"], audience="example-api"
        )
    )
    missing = client.get("/api/customers", headers=no_org)
    assert missing.status_code == 401
    assert missing.json is not None and missing.json["error"] == "missing_organization_context"
    # NO_ORGANIZATION_VALUES: an organization claim that names no organization
    personal = client.get("/api/customers", headers=mint(example, "personal", ["customers:read"]))
    assert personal.status_code == 401
    assert personal.json is not None and personal.json["error"] == "missing_organization_context"
    globex = client.get("/api/customers", headers=mint(example, "org_globex", ["customers:read"]))
    assert globex.json is not None
    assert "Evil" not in {c["name"] for c in globex.json["customers"]}


def test_projects_join_and_admin_opt_out(example: Flask) -> None:
    client = example.test_client()
    projects = client.get("/api/projects", headers=mint(example, "org_globex", ["projects:read"]))
    assert projects.json is not None
    assert {p["organization_id"] for p in projects.json["projects"]} == {"org_globex"}
    mine = client.get(
        "/api/my-projects", headers=mint(example, "org_acme", ["projects:read"], "user_alice")
    )
    assert mine.json is not None
    assert [p["user_id"] for p in mine.json["projects"]] == ["user_alice"]
    platform = dev_issuer(example).mint(
        subject="svc_platform_ops", scopes=["admin:read"], audience="example-api",
        client_id="platform-ops",
    )  # fmt: skip
    counts = client.get("/api/admin/customer-counts", headers=auth_header(platform))
    assert counts.json is not None and set(counts.json["counts"]) == {"org_acme", "org_globex"}


def test_id_settings_given_as_one_string_are_one_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``EXAMPLE_PLATFORM_CLIENT_IDS=platform-ops`` (not JSON) stayed a string,
    so ``client_id not in operators`` tested substrings: a token of client
    "ops" read every organization's counts."""
    monkeypatch.setenv("EXAMPLE_PLATFORM_CLIENT_IDS", "platform-ops")
    monkeypatch.setenv("EXAMPLE_SUSPENDED_ORGANIZATIONS", "org_acme_old")
    app = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    client = app.test_client()
    issuer = dev_issuer(app)
    for client_id, expected in (("ops", 403), ("platform", 403), ("platform-ops", 200)):
        token = issuer.mint(
            subject="svc", scopes=["admin:read"], audience="example-api", client_id=client_id
        )
        response = client.get("/api/admin/customer-counts", headers=auth_header(token))
        assert response.status_code == expected, (client_id, response.text)
    # "org_acme" is in "org_acme_old" as a substring, not as an id
    assert (
        client.get("/api/customers", headers=mint(app, "org_acme", ["customers:read"])).status_code
        == 200
    )


@pytest.mark.parametrize("value", ["org_acme,org_globex", "['org_acme']", '["org_acme",]', " "])
def test_an_id_setting_that_is_no_id_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A list written by hand was taken as one id no organization has: the
    suspension silently suspended nobody."""
    monkeypatch.setenv("EXAMPLE_SUSPENDED_ORGANIZATIONS", value)
    with pytest.raises(ConfigurationError, match="SUSPENDED_ORGANIZATIONS"):
        create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))


def test_a_numeric_id_setting_is_one_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_SUSPENDED_ORGANIZATIONS", "12345")
    app = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    assert app.config["SUSPENDED_ORGANIZATIONS"] == frozenset({"12345"})


def test_the_audit_trail_says_when_and_for_whom(
    example: Flask, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fresh_json_handlers(monkeypatch)
    configure_security_log()
    writer = mint(example, "org_acme", ["customers:write"], subject="user_w")
    smuggled = {"name": "Elsewhere", "organization_id": "org_globex" + "x" * 50_000}
    assert (
        example.test_client().post("/api/customers", json=smuggled, headers=writer).status_code
        == 403
    )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    (refusal,) = [line for line in lines if "cross-tenant" in line["message"]]
    assert refusal["path"] == "/api/customers" and refusal["method"] == "POST"
    assert refusal["subject"] == "user_w" and refusal["organization_id"] == "org_acme"
    assert refusal["timestamp"].endswith("+00:00")
    assert len(refusal["message"]) < 300, "a tenant's value is cut short in the log"


def test_a_customer_deleted_twice_is_a_404_the_second_time(
    live_example: tuple[Flask, str],
) -> None:
    """Deleted through statements: the second of two DELETEs of one customer
    (two at once, or one after the other) deletes nothing and says so."""
    app, base = live_example
    headers = mint(app, "org_acme", ["customers:read", "customers:write"])
    created = requests.post(
        f"{base}/api/customers", json={"name": "Short-lived"}, headers=headers, timeout=10
    )
    customer_id = created.json()["id"]
    url = f"{base}/api/customers/{customer_id}"
    assert requests.delete(url, headers=headers, timeout=10).status_code == 204
    again = requests.delete(url, headers=headers, timeout=10)
    assert again.status_code == 404, again.text
    assert again.json() == {"error": "not_found", "message": "No such resource."}
    # at once: the loaded object of each was deleted by both (two 204s)
    raced = requests.post(
        f"{base}/api/customers", json={"name": "Raced"}, headers=headers, timeout=10
    ).json()["id"]
    start = threading.Barrier(4)

    def delete_it() -> int:
        start.wait(timeout=10)
        url = f"{base}/api/customers/{raced}"
        return requests.delete(url, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = sorted(pool.map(lambda _n: delete_it(), range(4)))
    assert codes.count(204) == 1 and set(codes) <= {204, 404, 503}, codes


def test_a_tenants_admin_sees_no_other_organization(example: Flask) -> None:
    """admin:read in a tenant's token (or a platform-less client's) is not the
    platform operator: 403, and no organization id or count in the answer."""
    client = example.test_client()
    issuer = dev_issuer(example)
    tenant_admin = mint(example, "org_acme", ["admin:read"])
    no_org_other_client = auth_header(
        issuer.mint(subject="svc_x", scopes=["admin:read"], audience="example-api", client_id="x")
    )
    tenant_with_platform_client = auth_header(
        issuer.mint(subject="svc_y", scopes=["admin:read"], audience="example-api",
                    client_id="platform-ops", organization_id="org_acme")
    )  # fmt: skip
    for headers in (tenant_admin, no_org_other_client, tenant_with_platform_client):
        response = client.get("/api/admin/customer-counts", headers=headers)
        assert response.status_code == 403, response.text
        assert response.json is not None and response.json["error"] == "forbidden"
        assert "org_globex" not in response.text and "WWW-Authenticate" in response.headers


def test_another_organizations_id_is_a_json_404(example: Flask) -> None:
    client = example.test_client()
    acme = client.get("/api/customers", headers=mint(example, "org_acme", ["customers:read"]))
    assert acme.json is not None
    customer_id = acme.json["customers"][0]["id"]
    other = client.get(
        f"/api/customers/{customer_id}", headers=mint(example, "org_globex", ["customers:read"])
    )
    assert other.status_code == 404
    assert other.json == {"error": "not_found", "message": "No such resource."}


def test_claims_check_refuses_a_suspended_organization(tmp_path: Path) -> None:
    app = create_app(
        {"EXAMPLE_DEV_ISSUER": True, "TESTING": True, "SUSPENDED_ORGANIZATIONS": ["org_globex"]},
        instance_path=str(tmp_path),
    )
    client = app.test_client()
    suspended = client.get("/api/customers", headers=mint(app, "org_globex", ["customers:read"]))
    assert suspended.status_code == 401
    assert suspended.json is not None and suspended.json["error"] == "invalid_token"
    active = client.get("/api/customers", headers=mint(app, "org_acme", ["customers:read"]))
    assert active.status_code == 200
    # The organization as g.auth holds it, whatever claim names it: the
    # check read "oid" alone, so org_id/organization_id tokens passed.
    issuer = dev_issuer(app)
    for claim in ("org_id", "organization_id"):
        claims = issuer.claims(subject="user_x", scopes=["customers:read"], audience="example-api")
        assert "oid" not in claims
        token = issuer.mint({**claims, claim: "org_globex"})
        refused = client.get("/api/customers", headers=auth_header(token))
        assert refused.status_code == 401, (claim, refused.json)


#: Testing, but an error in a view is the 500 a client gets, not an exception.
AS_SERVED = {"EXAMPLE_DEV_ISSUER": True, "TESTING": True, "PROPAGATE_EXCEPTIONS": False}


def test_a_body_that_is_no_json_object_is_a_400_not_a_500(tmp_path: Path) -> None:
    """The never-500 rule holds for the example's own views (a JSON list or
    string body raised AttributeError, a 500 with an HTML page)."""
    app = create_app(AS_SERVED, instance_path=str(tmp_path))
    client = app.test_client()
    headers = mint(app, "org_acme", ["customers:write"])
    bodies: list[object] = [[{"name": "Listed"}], "New Co", 3]
    # names no database column takes as they are: a 500 from the driver
    bodies += [{"name": bad} for bad in ("\ud800", "a\x00b", "x" * 201, "  ", 42, None)]
    for body in bodies:
        response = client.post("/api/customers", json=body, headers=headers)
        assert response.status_code == 400, (body, response.text)
        assert response.json == {"error": "invalid_request", "message": NAME_RULE}
    nested = "[" * 5000 + "]" * 5000  # Python's parser: RecursionError, not ValueError
    response = client.post(
        "/api/customers", data=nested, content_type="application/json", headers=headers
    )
    assert response.status_code == 400, response.text
    created = client.post("/api/customers", json={"name": " " + "y" * 200}, headers=headers)
    assert created.status_code == 201 and created.json is not None
    assert created.json["name"] == "y" * 200


def test_an_organization_id_longer_than_its_column_is_a_json_400(
    tmp_path: Path, postgres_url: str
) -> None:
    """On PostgreSQL a value longer than its column is a DataError: a token
    whose organization claim has 65 characters got a 500 on every write."""
    with PostgresSchema(postgres_url) as schema:
        database = {
            "SQLALCHEMY_DATABASE_URI": postgres_url,
            "SQLALCHEMY_ENGINE_OPTIONS": schema.options(),
        }
        app = create_app({**AS_SERVED, **database}, instance_path=str(tmp_path))
        client = app.test_client()
        too_long = mint(app, "o" * 65, ["customers:write"])
        response = client.post("/api/customers", json={"name": "Long Co"}, headers=too_long)
        assert response.status_code == 400, response.text
        assert response.json == {"error": "invalid_request", "message": "A value does not fit."}
        fits = mint(app, "org_acme", ["customers:write"])
        ok = client.post("/api/customers", json={"name": "Short Co"}, headers=fits)
        assert ok.status_code == 201, ok.text
        with app.app_context():
            db.engine.dispose()


def test_an_id_past_the_database_integer_range_is_a_json_404(
    live_example: tuple[Flask, str],
) -> None:
    """SQLite integers end at 2**63 - 1: a bigger id in the URL raised
    OverflowError in the driver (a 500) on the read and the delete route."""
    app, base = live_example
    headers = mint(app, "org_acme", ["customers:read", "customers:write"])
    for method in ("GET", "DELETE"):
        response = requests.request(
            method, f"{base}/api/customers/{2**63}", headers=headers, timeout=10
        )
        assert response.status_code == 404, response.text
        assert response.json() == {"error": "not_found", "message": "No such resource."}
    last = requests.get(f"{base}/api/customers/{2**63 - 1}", headers=headers, timeout=10)
    assert last.status_code == 404, last.text


def test_unknown_paths_and_methods_answer_json(example: Flask) -> None:
    """Every answer of the API is JSON: a path no route matches and a method a
    route does not take were Werkzeug's HTML pages."""
    client = example.test_client()
    headers = mint(example, "org_acme", ["customers:read"])
    missing = client.get("/api/no-such-thing", headers=headers)
    assert missing.status_code == 404
    assert missing.json == {"error": "not_found", "message": "No such resource."}
    wrong = client.put("/api/customers", headers=headers)
    assert wrong.status_code == 405
    assert wrong.json == {"error": "method_not_allowed", "message": "Method not allowed."}
    assert "GET" in wrong.headers["Allow"] and "POST" in wrong.headers["Allow"]


def test_the_production_setup_of_the_module_docstring_works(
    tmp_path: Path, served_tokens: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docstring said to set ``OAUTH_VERIFY_ISSUER`` in the environment,
    which the app never reads (a ConfigurationError: no issuer); it reads
    ``EXAMPLE_``-prefixed settings."""
    import example_app

    assert "``EXAMPLE_OAUTH_VERIFY_ISSUER``" in (example_app.__doc__ or "")
    monkeypatch.delenv("EXAMPLE_DEV_ISSUER", raising=False)
    monkeypatch.setenv("EXAMPLE_OAUTH_VERIFY_ISSUER", served_tokens.issuer)
    monkeypatch.setenv("EXAMPLE_OAUTH_VERIFY_AUDIENCE", "orders-api")
    app = create_app({"TESTING": True}, instance_path=str(tmp_path))
    assert "oauth_verify_dev_issuer" not in app.extensions
    token = served_tokens.mint(organization_id="org_acme", scopes=["customers:read"],
                               audience="orders-api")  # fmt: skip
    response = app.test_client().get("/api/customers", headers=auth_header(token))
    assert response.status_code == 200, response.text


def _fresh_json_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let configure_security_log() add fresh stderr handlers (for capsys),
    taken away again after the test."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # captureWarnings
    for name in ("flask_oauth_verify.security", "flask_oauth_verify", "py.warnings"):
        logger = logging.getLogger(name)
        others = [h for h in logger.handlers if not isinstance(h.formatter, JSONFormatter)]
        monkeypatch.setattr(logger, "handlers", others)
        monkeypatch.setattr(logger, "level", logger.level)


def test_the_tenancy_audit_trail_reaches_the_log(
    example: Flask, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin report's unscoped() read and a refused cross-tenant write
    are logged by the library at WARNING; the example printed only the
    security events, so its "audited" read left no line."""
    _fresh_json_handlers(monkeypatch)
    configure_security_log()
    client = example.test_client()
    admin = auth_header(
        dev_issuer(example).mint(subject="user_admin", scopes=["admin:read"],
                                 audience="example-api", client_id="platform-ops")
    )  # fmt: skip
    assert client.get("/api/admin/customer-counts", headers=admin).status_code == 200
    writer = mint(example, "org_acme", ["customers:write"])
    smuggled = {"name": "Elsewhere", "organization_id": "org_globex"}
    assert client.post("/api/customers", json=smuggled, headers=writer).status_code == 403
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    tenancy = [line for line in lines if line["logger"] == "flask_oauth_verify.tenancy"]
    assert any("admin report by user_admin" in line["message"] for line in tenancy), lines
    assert any("cross-tenant" in line["message"] for line in tenancy), lines
    assert all(line["level"] == "WARNING" for line in tenancy)
    validated = [line for line in lines if line.get("event") == "token_validated"]
    assert len(validated) == 2, "each security event once, not again by the package's handler"


def test_security_events_are_json_lines_without_the_token(
    example: Flask, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's security log: one JSON object per decision, never the token."""
    _fresh_json_handlers(monkeypatch)
    configure_security_log()
    configure_security_log()  # idempotent: still one line per event
    client = example.test_client()
    headers = mint(example, "org_acme", ["customers:read"], subject="user_logged")
    token = headers["Authorization"].split()[1]
    assert client.get("/api/customers", headers=headers).status_code == 200
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert client.get("/api/customers", headers=auth_header(forged)).status_code == 401
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    validated = [e for e in events if e["event"] == "token_validated"]
    failed = [e for e in events if e["event"] == "token_validation_failed"]
    assert len(validated) == len(failed) == 1, events
    assert validated[0]["subject"] == "user_logged" and validated[0]["path"] == "/api/customers"
    assert failed[0]["error"] == "invalid_token" and failed[0]["status"] == 401
    assert token not in err and forged not in err and token.split(".")[2] not in err


def test_every_process_of_one_instance_folder_shares_the_dev_issuer(tmp_path: Path) -> None:
    """Workers, CLI calls and restarts build their own app: the key and the
    opaque/revoked tokens live in the instance folder, so they all agree."""
    first = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    again = create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))
    headers = mint(first, "org_acme", ["customers:read"])
    assert again.test_client().get("/api/customers", headers=headers).status_code == 200
    opaque = dev_issuer(first).mint_opaque(subject="svc", organization_id="org_acme")
    assert dev_issuer(again).introspect(opaque)["active"] is True
    dev_issuer(again).revoke(opaque)
    assert dev_issuer(first).introspect(opaque) == {"active": False}
    printed = again.test_cli_runner().invoke(args=["example-tokens", "--base-url", "http://x"])
    assert printed.exit_code == 0, printed.output
    assert "curl -s http://x/api/customers" in printed.output


def test_example_tokens_refuses_without_the_dev_issuer(
    tmp_path: Path, tokens: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXAMPLE_DEV_ISSUER", raising=False)
    app = create_app(
        {**tokens.config(audience="example-api"), "TESTING": True}, instance_path=str(tmp_path)
    )
    refused = app.test_cli_runner().invoke(args=["example-tokens"])
    assert refused.exit_code != 0
    assert "EXAMPLE_DEV_ISSUER=1" in refused.output


def test_the_widget_blueprint_checks_in_before_request_and_answers_preflights(
    example: Flask,
) -> None:
    client = example.test_client()
    origin = {"Origin": "http://localhost:3000"}
    preflight = client.options(
        "/widget/summary", headers={**origin, "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "GET" in preflight.headers["Allow"]
    anonymous = client.get("/widget/summary", headers=origin)
    assert anonymous.status_code == 401
    assert anonymous.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "WWW-Authenticate" in anonymous.headers
    few = client.get("/widget/summary", headers=mint(example, "org_acme", ["projects:read"]))
    assert few.status_code == 403
    acme = client.get("/widget/summary", headers=mint(example, "org_acme", ["customers:read"]))
    globex = client.get("/widget/summary", headers=mint(example, "org_globex", ["customers:read"]))
    listed = client.get("/api/customers", headers=mint(example, "org_acme", ["customers:read"]))
    assert acme.json is not None and globex.json is not None and listed.json is not None
    assert acme.json == {"organization_id": "org_acme", "customers": len(listed.json["customers"])}
    assert globex.json["organization_id"] == "org_globex"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("OAUTH_VERIFY_ISSUER", "https://issuer.example.com"),
        ("OAUTH_VERIFY_JWKS_URI", "https://issuer.example.com/jwks"),
        ("OAUTH_VERIFY_JWKS", '{"keys": []}'),
    ],
)
def test_the_dev_issuer_never_runs_beside_a_real_issuer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    """Its static key set would be trusted for the real issuer: a token the
    development key signed with the real ``iss`` would be accepted."""
    monkeypatch.setenv("EXAMPLE_" + setting, value)
    with pytest.raises(ConfigurationError, match=setting):
        create_app({"EXAMPLE_DEV_ISSUER": True, "TESTING": True}, instance_path=str(tmp_path))


# -- several worker processes on one instance folder (gunicorn without --preload)

_SPAWN = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
_PROCESSES = 4


def _start_together(target: Callable[..., None], *args: Any) -> None:
    """Run ``target(barrier, index, *args)`` in real processes released at once."""
    barrier = _SPAWN.Barrier(_PROCESSES, timeout=60)
    processes = [
        _SPAWN.Process(target=target, args=(barrier, index, *args)) for index in range(_PROCESSES)
    ]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(90)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0] * _PROCESSES


def _revoke_and_mint(barrier: BarrierType, index: int, folder: str, issued: list[str]) -> None:
    issuer = load_dev_issuer(folder, "http://127.0.0.1:5000")
    barrier.wait()
    minted = []
    for token in issued[index::_PROCESSES]:
        issuer.revoke(token)
        minted.append(issuer.mint_opaque(subject=f"svc_{index}", organization_id="org_acme"))
    Path(folder, f"minted-{index}.json").write_text(json.dumps(minted))


def test_processes_revoking_and_minting_at_once_lose_nothing(tmp_path: Path) -> None:
    """Each worker has its own issuer object: the state file is updated under
    a lock shared by processes, and never through a shared temporary name."""
    issuer = load_dev_issuer(str(tmp_path), "http://127.0.0.1:5000")
    issued = [issuer.mint_opaque(subject="svc", organization_id="org_acme") for _ in range(120)]
    _start_together(_revoke_and_mint, str(tmp_path), issued)
    minted = [
        token
        for index in range(_PROCESSES)
        for token in json.loads((tmp_path / f"minted-{index}.json").read_text())
    ]
    assert len(minted) == len(issued)
    assert [t for t in issued if issuer.introspect(t)["active"]] == []
    assert [t for t in minted if not issuer.introspect(t)["active"]] == []
    assert list(tmp_path.glob("*.tmp")) == []


def _load_key(barrier: BarrierType, index: int, folder: str) -> None:
    barrier.wait()
    issuer = load_dev_issuer(folder, "http://127.0.0.1:5000")
    Path(folder, f"jwks-{index}.json").write_text(json.dumps(issuer.jwks()))


def test_processes_starting_on_a_fresh_instance_folder_share_one_key(tmp_path: Path) -> None:
    """Without ``--preload`` every worker loads the issuer at once: one key
    file is created, whole and private from the start, and all sign with it."""
    folder = tmp_path / "instance"
    _start_together(_load_key, str(folder))
    seen = {Path(folder, f"jwks-{i}.json").read_text() for i in range(_PROCESSES)}
    assert len(seen) == 1
    stored = json.loads((folder / "dev_issuer_key.json").read_text())
    assert json.loads(seen.pop())["keys"][0]["n"] == stored["key"]["n"]
    assert stat.S_IMODE((folder / "dev_issuer_key.json").stat().st_mode) == 0o600
    assert list(folder.glob("*.tmp")) == []


def _start_app(barrier: BarrierType, index: int, folder: str) -> None:
    os.environ.pop("EXAMPLE_DEV_ISSUER", None)
    config = {**TokenIssuer().config(audience="example-api"), "TESTING": True}
    barrier.wait()
    create_app(config, instance_path=folder)


def test_processes_starting_on_a_fresh_database_seed_it_once(tmp_path: Path) -> None:
    """Every worker runs the factory, which creates the tables and seeds them:
    one process does, the others find the data (and none fails to start)."""
    folder = tmp_path / "instance"
    _start_together(_start_app, str(folder))
    with contextlib.closing(sqlite3.connect(folder / "example.sqlite3")) as connection:
        rows = connection.execute(
            "SELECT organization_id, count(*) FROM customers GROUP BY organization_id"
        ).fetchall()
    assert dict(rows) == {"org_acme": 2, "org_globex": 2}
