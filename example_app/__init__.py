"""A runnable multi-tenant API protected by flask_oauth_verify.

``./scripts/example`` runs it with an embedded development issuer and SQLite.
In production, set ``EXAMPLE_OAUTH_VERIFY_ISSUER`` and
``EXAMPLE_OAUTH_VERIFY_AUDIENCE`` (and ``EXAMPLE_OAUTH_VERIFY_PROVIDER``) in
the environment instead — every ``EXAMPLE_``-prefixed variable is a setting,
its prefix removed — and leave ``EXAMPLE_DEV_ISSUER`` unset: the development
issuer then does not exist at all. With it set beside an issuer, a
``JWKS_URI`` or a ``JWKS`` of your own, the app refuses to start (its key
would be trusted for that issuer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from flask_caching import Cache

from flask_oauth_verify import ConfigurationError, OAuthVerify

from . import dev_issuer
from .api import api
from .locking import file_lock
from .logging_setup import configure_security_log
from .models import db, seed
from .widget import widget

cache = Cache()
oauth = OAuthVerify()


@oauth.claims_check
def organization_not_suspended(claims: Mapping[str, Any]) -> bool:
    """A rule no setting expresses: tokens of a suspended organization are 401.

    ``SUSPENDED_ORGANIZATIONS`` (``EXAMPLE_SUSPENDED_ORGANIZATIONS='["org_x"]'``
    in the environment) lists them. The check sees verified claims only, and
    its outcome is cached with the token, so it depends on the claims alone.
    The organization is read as ``g.auth`` will hold it (``oid``, ``org_id``,
    ``organization_id`` or the provider's own claim), never from one claim
    name: a token naming its organization in another claim would pass.
    """
    organization = oauth.context_for(claims).organization_id
    return organization not in current_app.config.get("SUSPENDED_ORGANIZATIONS", ())


def _id_set(name: str, value: object) -> frozenset[str]:
    """A setting listing ids, as a set: a list (``EXAMPLE_X='["a", "b"]'``) or
    one id (``EXAMPLE_X=a``, ``EXAMPLE_X=12345``). A plain string kept as it
    was made ``in`` a substring test ("ops" in "platform-ops"), and one that
    looks like a list (``a,b``, ``['a']``) would name no id at all: a
    suspension that silently suspends nobody. Refused at start-up."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset):
        raise ConfigurationError(f"{name} must be a list of ids, not {type(value).__name__}.")
    ids = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    for one in ids:
        if not isinstance(one, str) or not one or _NOT_ONE_ID.search(one):
            raise ConfigurationError(
                f"{name}: {one!r} is not one id; give a JSON list, "
                f'e.g. {name}=\'["org_a", "org_b"]\'.'
            )
    return frozenset(ids)


#: Characters no single id holds: a list written by hand (``a,b``, ``['a']``).
_NOT_ONE_ID = re.compile(r"""[\s,\[\]"']""")


def create_app(config: dict[str, Any] | None = None, *, instance_path: str | None = None) -> Flask:
    """The app factory.

    :param config: overrides (tests pass their own issuer settings).
    :param instance_path: where the SQLite file and the dev issuer key live.
    """
    app = Flask(__name__, instance_relative_config=True, instance_path=instance_path)
    base_url = os.environ.get("EXAMPLE_BASE_URL", "http://127.0.0.1:5000")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ.get(
            "DATABASE_URL", f"sqlite:///{os.path.join(app.instance_path, 'example.sqlite3')}"
        ),
        CACHE_TYPE=os.environ.get("CACHE_TYPE", "SimpleCache"),
        CACHE_REDIS_URL=os.environ.get("CACHE_REDIS_URL"),
        OAUTH_VERIFY_AUDIENCE="example-api",
        OAUTH_VERIFY_SECURITY_HEADERS=True,
        OAUTH_VERIFY_HEALTH_ROUTE=True,
        OAUTH_VERIFY_METRICS=True,
        OAUTH_VERIFY_METRICS_ENDPOINT="/metrics",
        OAUTH_VERIFY_PREFETCH_KEYS=True,
        # An organization claim value that names no organization (as Entra's
        # tenant of personal accounts): such a token gets 401 on tenant routes.
        OAUTH_VERIFY_NO_ORGANIZATION_VALUES=["personal"],
    )
    app.config.from_prefixed_env("EXAMPLE")  # e.g. EXAMPLE_OAUTH_VERIFY_ISSUER=...
    if config:
        app.config.update(config)
    os.makedirs(app.instance_path, exist_ok=True)

    issuer = None
    if _dev_issuer_enabled(app):
        _refuse_other_key_sources(app)
        issuer = dev_issuer.load_dev_issuer(app.instance_path, base_url)
        app.config.setdefault("OAUTH_VERIFY_ISSUER", issuer.issuer)
        app.config.setdefault("OAUTH_VERIFY_JWKS", issuer.jwks())
        app.config.setdefault("OAUTH_VERIFY_DEV_ISSUER", issuer)  # `flask oauth-verify mint`
        client_id, secret = dev_issuer.INTROSPECTION_CLIENT
        app.config.setdefault("OAUTH_VERIFY_INTROSPECTION_ENDPOINT", f"{issuer.issuer}/introspect")
        app.config.setdefault("OAUTH_VERIFY_INTROSPECTION_CLIENT_ID", client_id)
        app.config.setdefault("OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET", secret)
        dev_issuer.register(app, issuer)

    for name, default in (
        ("SUSPENDED_ORGANIZATIONS", ()),
        ("PLATFORM_CLIENT_IDS", ("platform-ops",)),
    ):
        app.config[name] = _id_set(name, app.config.get(name, default))
    if not app.testing:
        configure_security_log()
    cache.init_app(app)
    db.init_app(app)
    oauth.init_app(app, cache=cache)
    app.register_blueprint(api)
    app.register_blueprint(widget)
    # Gunicorn workers run the factory at once: one creates the tables and
    # seeds, the others then find the data (one instance folder, one host).
    with app.app_context(), file_lock(Path(app.instance_path, "seed.lock")):
        seed()
    from .commands import register_commands

    register_commands(app)
    return app


def _dev_issuer_enabled(app: Flask) -> bool:
    flag = os.environ.get("EXAMPLE_DEV_ISSUER", "")
    return bool(app.config.get("EXAMPLE_DEV_ISSUER")) or flag.lower() in ("1", "true", "yes")


#: Settings that name an issuer or its keys: with the development issuer on,
#: its key would be trusted for whatever issuer they name.
_KEY_SOURCES = (
    "OAUTH_VERIFY_ISSUER",
    "OAUTH_VERIFY_JWKS_URI",
    "OAUTH_VERIFY_JWKS",
)


def _refuse_other_key_sources(app: Flask) -> None:
    """Refuse to start with the development issuer beside a real one.

    The development issuer's key set is a static ``OAUTH_VERIFY_JWKS``, which
    takes precedence over ``JWKS_URI`` and discovery: beside a configured
    issuer, a token the development key signed with that issuer's ``iss``
    would be accepted.

    :raises ConfigurationError: naming the settings to unset.
    """
    configured = [name for name in _KEY_SOURCES if app.config.get(name)]
    if configured:
        raise ConfigurationError(
            f"EXAMPLE_DEV_ISSUER is on and {', '.join(configured)} is set: the development "
            "issuer's key would be trusted for that issuer. Unset EXAMPLE_DEV_ISSUER to use "
            "a real issuer (production), or unset those settings to use the development one."
        )
