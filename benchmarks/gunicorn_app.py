"""The app served by ``bench_gunicorn.py``: one route, protected five ways.

Configured from the JSON file named by ``BENCH_CONFIG`` (issuer, audience,
algorithm, public JWK Set), so every gunicorn worker builds the same app:

* ``/open``     - unprotected;
* ``/ours``     - ``@require_token`` of this package (static key set);
* ``/pyjwt``    - a hand-written PyJWT decorator (key parsed once);
* ``/authlib``  - Authlib ``ResourceProtector`` + ``JWTBearerTokenValidator``
  (key set imported per request, as its documentation shows);
* ``/floor``    - the raw-crypto floor as a decorator (``floor.py``):
  base64url + JSON + one signature verify, no check at all;
* ``/minimal``  - the least a cache of verified tokens can do per hit:
  header read, SHA-256, dict lookup, expiry check, ``g`` set (PyJWT on a miss).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jwt as pyjwt
from flask import Flask, g, jsonify, request
from floor import floor_verified

from flask_oauth_verify import OAuthVerify, require_token


def pyjwt_required(config: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A tutorial-style PyJWT decorator (key parsed once, ``jwt.decode`` per request)."""
    public_key = pyjwt.PyJWK(config["jwks"]["keys"][0]).key

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return jsonify(error="unauthorized"), 401
            try:
                g.claims = pyjwt.decode(
                    auth[7:],
                    public_key,
                    algorithms=[config["alg"]],
                    audience=config["audience"],
                    issuer=config["issuer"],
                )
            except pyjwt.InvalidTokenError:
                return jsonify(error="invalid_token"), 401
            return view(*args, **kwargs)

        return wrapper

    return decorator


def minimal_cached(config: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The least a per-process cache of verified tokens can do per hit."""
    public_key = pyjwt.PyJWK(config["jwks"]["keys"][0]).key
    cache: dict[bytes, tuple[float, dict[str, Any]]] = {}

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = request.headers.get("Authorization", "")[7:]
            digest = hashlib.sha256(token.encode()).digest()
            entry = cache.get(digest)
            if entry is None or entry[0] <= time.time():
                claims = pyjwt.decode(
                    token,
                    public_key,
                    algorithms=[config["alg"]],
                    audience=config["audience"],
                    issuer=config["issuer"],
                )
                entry = cache[digest] = (claims["exp"], claims)
            g.auth = entry[1]
            return view(*args, **kwargs)

        return wrapper

    return decorator


def authlib_protector(config: dict[str, Any]) -> Any:
    """Authlib's ``ResourceProtector`` with the key set imported per request."""
    from authlib.integrations.flask_oauth2 import ResourceProtector
    from authlib.oauth2.rfc9068 import JWTBearerTokenValidator

    # Authlib 1.9 warns on every request that import_any_key is deprecated;
    # silence the output (the warning machinery still runs, as in any app).
    warnings.filterwarnings("ignore", module="authlib")
    warnings.filterwarnings("ignore", message=".*import_key_set.*")
    jwks = config["jwks"]

    class Validator(JWTBearerTokenValidator):  # type: ignore[misc]
        def get_jwks(self) -> dict[str, Any]:
            return jwks

    protector = ResourceProtector()
    protector.register_token_validator(Validator(config["issuer"], config["audience"]))
    return protector


def create_app() -> Flask:
    """Build the benchmark app from ``$BENCH_CONFIG``."""
    config = json.loads(Path(os.environ["BENCH_CONFIG"]).read_text())
    app = Flask("bench")
    app.config.update(
        OAUTH_VERIFY_ISSUER=config["issuer"],
        OAUTH_VERIFY_AUDIENCE=config["audience"],
        OAUTH_VERIFY_ALGORITHMS=[config["alg"]],
        OAUTH_VERIFY_JWKS=config["jwks"],
    )
    OAuthVerify(app)
    require_pyjwt = pyjwt_required(config)
    authlib = authlib_protector(config)
    require_minimal_cache = minimal_cached(config)
    require_floor = floor_verified(pyjwt.PyJWK(config["jwks"]["keys"][0]).key, config["alg"])
    from authlib.integrations.flask_oauth2 import current_token

    @app.get("/open")
    def open_route() -> Any:
        return jsonify(organization_id=None)

    @app.get("/ours")
    @require_token
    def ours() -> Any:
        return jsonify(organization_id=g.auth.organization_id)

    @app.get("/pyjwt")
    @require_pyjwt
    def with_pyjwt() -> Any:
        return jsonify(organization_id=g.claims.get("oid"))

    @app.get("/floor")
    @require_floor
    def with_floor() -> Any:
        return jsonify(organization_id=g.auth.get("oid"))

    @app.get("/minimal")
    @require_minimal_cache
    def with_minimal_cache() -> Any:
        return jsonify(organization_id=g.auth.get("oid"))

    @app.get("/authlib")
    @authlib()
    def with_authlib() -> Any:
        return jsonify(organization_id=current_token.get("oid"))

    return app
