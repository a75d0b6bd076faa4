"""``flask example-tokens``: print ready-to-paste curl commands with fresh tokens."""

from __future__ import annotations

import click
from flask import Flask, current_app

from flask_oauth_verify.testing import TokenIssuer

PERSONAS = [
    ("org_acme user alice (read+write)", "user_alice", "org_acme",
     ["customers:read", "customers:write", "projects:read", "reports:read"]),
    ("org_globex service (read)", "svc_reporting", "org_globex",
     ["customers:read", "projects:read"]),
    ("org_acme user with too few scopes", "user_carol", "org_acme", ["projects:read"]),
]  # fmt: skip


def banner(issuer: TokenIssuer, base_url: str) -> str:
    """The start-up text: one curl command per persona."""
    lines = ["", "# flask_oauth_verify example API — development issuer tokens (valid 1 h):", ""]
    for title, subject, org, scopes in PERSONAS:
        token = issuer.mint(subject=subject, organization_id=org, scopes=scopes,
                            audience="example-api", client_id="example-cli")  # fmt: skip
        lines.append(f"# {title}: scopes {' '.join(scopes)}")
        lines.append(f"TOKEN='{token}'")
        lines.append(f'curl -s {base_url}/api/customers -H "Authorization: Bearer $TOKEN"')
        lines.append("")
    opaque = issuer.mint_opaque(subject="svc_billing", organization_id="org_globex",
                                scopes=["reports:read"], audience="example-api")  # fmt: skip
    lines.append("# an opaque token (introspected), then revoke it and try again: 401")
    lines.append(f"OPAQUE='{opaque}'")
    lines.append(f'curl -s {base_url}/api/reports -H "Authorization: Bearer $OPAQUE"')
    lines.append(f'curl -s -X POST {base_url}/dev-issuer/revoke -d "token=$OPAQUE"')
    lines.append(f'curl -s {base_url}/api/reports -H "Authorization: Bearer $OPAQUE"')
    lines.append("")
    lines.append(f"curl -s {base_url}/api/customers   # no token: 401")
    platform = issuer.mint(subject="svc_platform_ops", scopes=["admin:read"],
                           audience="example-api", client_id="platform-ops")  # fmt: skip
    lines.append("# the platform operator (no organization): the audited cross-tenant report")
    lines.append(f"PLATFORM='{platform}'")
    lines.append(
        f'curl -s {base_url}/api/admin/customer-counts -H "Authorization: Bearer $PLATFORM"'
    )
    lines.append(
        "# the widget blueprint (checked in before_request): a CORS preflight, then the call"
    )
    lines.append(
        f"curl -si -X OPTIONS {base_url}/widget/summary -H 'Origin: http://localhost:3000'"
        " -H 'Access-Control-Request-Method: GET'"
    )
    widget_token = issuer.mint(subject="user_alice", organization_id="org_acme",
                               scopes=["customers:read"], audience="example-api",
                               client_id="example-widget")  # fmt: skip
    lines.append(f"WIDGET_TOKEN='{widget_token}'")
    lines.append(f'curl -s {base_url}/widget/summary -H "Authorization: Bearer $WIDGET_TOKEN"')
    lines.append(f"curl -s {base_url}/health/token-validation")
    return "\n".join(lines)


def register_commands(app: Flask) -> None:
    """Add the example's CLI commands."""

    @app.cli.command("example-tokens")
    @click.option("--base-url", default="http://127.0.0.1:5000")
    def example_tokens(base_url: str) -> None:
        """Print curl commands with fresh tokens for two organizations."""
        issuer = current_app.extensions.get("oauth_verify_dev_issuer")
        if issuer is None:
            raise click.ClickException("The development issuer is off (set EXAMPLE_DEV_ISSUER=1).")
        click.echo(banner(issuer, base_url))
