"""The app under load: a protected API trusting a local issuer, Redis-backed.

Built by gunicorn from the environment that ``run_load.py`` sets::

    gunicorn -w 4 -k gthread --threads 4 'loadtests.app:create_app()'

Short key-cache timings make the rotations of the run reach every worker
within seconds. Each response echoes the client's ``X-Expect`` header, so the
load generator can match every answer with what the request should have got
without keeping per-connection state.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, g, request
from flask_caching import Cache

from flask_oauth_verify import OAuthVerify, require_scope, require_token


def create_app() -> Flask:
    """The load-test app; configuration comes from ``LOAD_*`` variables."""
    app = Flask("loadtest")
    app.config.update(
        OAUTH_VERIFY_ISSUER=os.environ["LOAD_ISSUER"],
        OAUTH_VERIFY_AUDIENCE="api",
        OAUTH_VERIFY_JWKS_URI=os.environ["LOAD_JWKS_URI"],
        OAUTH_VERIFY_JWKS_CACHE_TTL=5,
        OAUTH_VERIFY_JWKS_MIN_TTL=1,
        OAUTH_VERIFY_JWKS_REFRESH_COOLDOWN=2,
        OAUTH_VERIFY_HTTP_TIMEOUT=(1.0, 2.0),
        CACHE_TYPE="RedisCache",
        CACHE_REDIS_URL=os.environ["LOAD_REDIS_URL"],
        CACHE_OPTIONS={"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    )
    cache = Cache(app)
    OAuthVerify(app, cache=cache)

    @app.get("/api/protected")
    @require_scope("read:users")
    def protected() -> dict[str, Any]:
        return {"subject": g.auth.subject, "organization_id": g.auth.organization_id}

    @app.get("/api/optional")
    @require_token(optional=True)
    def optional() -> dict[str, Any]:
        return {"authenticated": g.auth is not None}

    @app.after_request
    def echo_expectation(response: Response) -> Response:
        expect = request.headers.get("X-Expect")
        if expect:
            response.headers["X-Expect"] = expect
        return response

    return app
