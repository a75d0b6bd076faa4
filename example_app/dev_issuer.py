"""The embedded development issuer of the example app (never for production).

It keeps its signing key in the instance folder (so every worker and every
restart shares it), publishes discovery metadata and the JWK Set under
``/dev-issuer``, and mints tokens for the CLI and the start-up banner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Blueprint, Flask, Response, jsonify
from joserfc.jwk import RSAKey

from flask_oauth_verify.testing import TokenIssuer

DEV_ISSUER_PATH = "/dev-issuer"


def load_dev_issuer(instance_path: str, base_url: str) -> TokenIssuer:
    """The development issuer, with a key persisted in ``instance_path``."""
    key_file = Path(instance_path) / "dev_issuer_key.json"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    if key_file.exists():
        stored = json.loads(key_file.read_text())
        key = RSAKey.import_key(stored["key"])
        kid = stored["kid"]
    else:
        key = RSAKey.generate_key(2048)
        kid = "dev-key-1"
        key_file.write_text(json.dumps({"kid": kid, "key": key.as_dict(private=True)}))
        os.chmod(key_file, 0o600)
    issuer = TokenIssuer(issuer=base_url + DEV_ISSUER_PATH, audience="example-api")
    issuer.remove_key(issuer.current_kid)
    issuer.current_kid = issuer.add_key("RS256", kid=kid, key=key)
    return issuer


def dev_issuer_blueprint(issuer: TokenIssuer) -> Blueprint:
    """Serve the issuer's discovery document and JWK Set (for curl and tools)."""
    blueprint = Blueprint("dev_issuer", __name__, url_prefix=DEV_ISSUER_PATH)

    @blueprint.get("/.well-known/openid-configuration")
    def metadata() -> Response:
        base = issuer.issuer
        return jsonify(issuer=base, jwks_uri=f"{base}/jwks", token_endpoint=None)

    @blueprint.get("/jwks")
    def jwks() -> Response:
        return jsonify(issuer.jwks())

    return blueprint


def register(app: Flask, issuer: TokenIssuer) -> None:
    """Mount the issuer's routes and keep it where the CLI can find it."""
    app.register_blueprint(dev_issuer_blueprint(issuer))
    app.extensions["oauth_verify_dev_issuer"] = issuer
