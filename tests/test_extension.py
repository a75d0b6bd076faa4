"""The extension object: per-app state, two apps in one process, caches."""

from __future__ import annotations

import subprocess
import sys

from flask import Flask
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify, require_token
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import TokenIssuer, auth_header


def test_two_apps_with_different_settings_share_one_extension(tokens: TokenIssuer) -> None:
    other = TokenIssuer(issuer="https://other.example.test", audience="billing")
    oauth = OAuthVerify()
    apps = []
    for issuer, audience in ((tokens, "api"), (other, "billing")):
        app = Flask(f"app_{audience}")
        app.config.update(issuer.config(audience=audience))
        oauth.init_app(app)

        @app.get("/")
        @oauth.require_token
        def index() -> str:
            return "ok"

        apps.append(app)
    first, second = (app.test_client() for app in apps)
    assert first.get("/", headers=auth_header(tokens.mint())).status_code == 200
    assert second.get("/", headers=auth_header(other.mint())).status_code == 200
    assert first.get("/", headers=auth_header(other.mint())).status_code == 401
    assert second.get("/", headers=auth_header(tokens.mint())).status_code == 401
    assert get_state(apps[0]) is not get_state(apps[1])


def test_state_is_missing_without_init_app() -> None:
    app = Flask(__name__)

    @app.get("/")
    @require_token
    def index() -> str:
        return "ok"

    import pytest

    with app.test_request_context("/"), pytest.raises(RuntimeError, match="init_app"):
        get_state()


def test_keys_are_stored_through_the_flask_caching_cache(served_tokens: TokenIssuer) -> None:
    app = Flask(__name__)
    app.config.update(served_tokens.config(), CACHE_TYPE="SimpleCache")
    cache = Cache(app)
    OAuthVerify(app, cache=cache)

    @app.get("/")
    @require_token
    def index() -> str:
        return "ok"

    assert app.test_client().get("/", headers=auth_header(served_tokens.mint())).status_code == 200
    with app.app_context():
        stored = [key for key in cache.cache._cache if str(key).startswith("oauth_verify:jwks:")]
    assert stored, "the key set is kept in the Flask-Caching backend"


def test_repeated_token_uses_the_verified_token_cache(tokens: TokenIssuer) -> None:
    app = Flask(__name__)
    app.config.update(tokens.config())
    OAuthVerify(app)

    @app.get("/")
    @require_token
    def index() -> str:
        return "ok"

    token = tokens.mint()
    client = app.test_client()
    assert client.get("/", headers=auth_header(token)).status_code == 200
    state = get_state(app)
    assert len(state.token_cache) == 1
    assert client.get("/", headers=auth_header(token)).status_code == 200
    assert len(state.token_cache) == 1


def test_cached_token_still_expires(tokens: TokenIssuer) -> None:
    from .conftest import FakeClock

    clock = FakeClock()
    app = Flask(__name__)
    app.config.update(tokens.config(LEEWAY=0))
    OAuthVerify().init_app(app, clock=clock)

    @app.get("/")
    @require_token
    def index() -> str:
        return "ok"

    token = tokens.mint(tokens.claims(now=clock.now, expires_in=60))
    client = app.test_client()
    assert client.get("/", headers=auth_header(token)).status_code == 200
    clock.advance(61)
    response = client.get("/", headers=auth_header(token))
    assert response.status_code == 401 and response.json is not None
    assert response.json["error"] == "token_expired"


WITHOUT_SQLALCHEMY = """
import sys
sys.modules["sqlalchemy"] = None  # as if the [sqlalchemy] extra were not installed
from flask_oauth_verify import *
assert OAuthVerify and require_organization
try:
    org_scoped(None)
except ImportError as error:
    print(error)
"""


def test_star_import_works_without_the_sqlalchemy_extra() -> None:
    """``__all__`` names the scoping helpers; without SQLAlchemy ``import *``
    must still work, and calling a helper names the extra to install."""
    done = subprocess.run(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", WITHOUT_SQLALCHEMY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "org_scoped() needs SQLAlchemy" in done.stdout
    assert "flask-oauth-verify[sqlalchemy]" in done.stdout


def test_context_for_maps_claims_as_g_auth_would(tokens: TokenIssuer) -> None:
    """A claims check reads the organization through the app's mapping:
    whichever claim carries it, as ``g.auth`` will hold it."""
    import pytest

    from flask_oauth_verify import InvalidTokenError

    app = Flask(__name__)
    app.config.update(tokens.config(CLAIM_MAP={"organization_id": ["tenant.id"]}))
    oauth = OAuthVerify(app)
    seen: list[object] = []

    @oauth.claims_check
    def record(claims: object) -> bool:
        seen.append(oauth.context_for(claims).organization_id)  # type: ignore[arg-type]
        return True

    @app.get("/org")
    @require_token
    def org() -> dict[str, object]:
        from flask import g

        return {"organization_id": g.auth.organization_id}

    response = app.test_client().get(
        "/org", headers=auth_header(tokens.mint(tenant={"id": "org_t"}, oid="org_other"))
    )
    assert response.json == {"organization_id": "org_t"}
    assert seen == ["org_t"]
    with app.app_context():
        assert oauth.context_for({"tenant": {"id": "org_x"}, "sub": "u"}).organization_id == "org_x"
    assert oauth.context_for({"sub": "u"}, app).organization_id is None
    with pytest.raises(InvalidTokenError):
        oauth.context_for({"tenant": {"id": 42}}, app)
