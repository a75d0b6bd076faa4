"""The ``flask oauth-verify`` command group."""

from __future__ import annotations

import json

import click
from flask.cli import with_appcontext

from .extension import get_state

__all__ = ["cli"]


@click.group("oauth-verify")
def cli() -> None:
    """Inspect and operate flask_oauth_verify."""


@cli.command("keys")
@with_appcontext
def keys_command() -> None:
    """Fetch and list each issuer's key set."""
    state = get_state()
    outcome = state.keys.prefetch()
    for status in state.keys.status():
        click.echo(
            json.dumps(
                {
                    "issuer": status.issuer,
                    "source": status.source,
                    "kids": list(status.kids),
                    "age_seconds": None if status.age is None else round(status.age, 1),
                    "error": outcome.get(status.issuer) or status.last_error,
                    "skipped": list(status.skipped),
                },
                indent=2,
            )
        )
