"""The embedded development issuer of the example app (never for production).

It keeps its signing key and its opaque/revoked tokens in the instance folder
(so every worker, every CLI call and every restart agree), publishes
discovery metadata and the JWK Set under ``/dev-issuer``, answers RFC 7662
introspection and RFC 7009 revocation there, and mints tokens for the CLI
and the start-up banner.

Introspection is a real HTTP call from the API to these routes, so the
development server must be threaded (``flask run`` is), and a gunicorn worker
needs more threads than the requests it introspects at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from joserfc.jwk import RSAKey

from flask_oauth_verify.testing import TokenIssuer

from .locking import create_private_file_once, file_lock, write_private_file

DEV_ISSUER_PATH = "/dev-issuer"
#: Credentials the API uses to call the development introspection endpoint.
INTROSPECTION_CLIENT = ("example-api", "dev-introspection-secret")


class DevIssuer(TokenIssuer):
    """A :class:`TokenIssuer` whose opaque and revoked tokens live in a file."""

    def __init__(self, issuer: str, state_file: Path) -> None:
        super().__init__(issuer=issuer, audience="example-api")
        self.state_file = state_file
        self.introspection_credentials = INTROSPECTION_CLIENT
        self._lock_file = state_file.with_name(state_file.name + ".lock")

    def _load(self) -> dict[str, Any]:
        # Writers replace the file in one step: this reads an old or a new
        # version, never a half-written one, and needs no lock.
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return {"opaque": {}, "revoked": []}
        loaded: dict[str, Any] = json.loads(text)
        return loaded

    @contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """Load, let the caller change, and save the state, one process at a time.

        Every gunicorn worker has its own issuer object: without the file lock
        two workers both load, each adds its revocation, and the second save
        drops the first one's.
        """
        with file_lock(self._lock_file):
            state = self._load()
            yield state
            write_private_file(self.state_file, json.dumps(state))

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def mint_opaque(self, **options: Any) -> str:
        """An opaque token, remembered (by hash) in the state file."""
        token = super().mint_opaque(**options)
        with self._update() as state:
            state["opaque"][self._digest(token)] = self.opaque.pop(token)
        return token

    def revoke(self, token: str) -> None:
        """Revoke an opaque token or a JWT (RFC 7009)."""
        digest = self._digest(token)
        with self._update() as state:
            state["opaque"].pop(digest, None)
            if digest not in state["revoked"]:
                state["revoked"].append(digest)

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 answer, consulting the shared state file."""
        state = self._load()
        digest = self._digest(token)
        if digest in state["revoked"]:
            return {"active": False}
        claims = state["opaque"].get(digest)
        if claims is not None:
            self.opaque[token] = claims
        try:
            return super().introspect(token)
        finally:
            self.opaque.pop(token, None)


def load_dev_issuer(instance_path: str, base_url: str) -> DevIssuer:
    """The development issuer, with a key persisted in ``instance_path``.

    On a fresh instance folder every gunicorn worker starts at once: each may
    generate a key, one file wins, and all of them sign with the key in it.
    """
    folder = Path(instance_path)
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "dev_issuer_key.json"
    if not key_file.exists():
        generated = RSAKey.generate_key(2048)
        create_private_file_once(
            key_file, json.dumps({"kid": "dev-key-1", "key": generated.as_dict(private=True)})
        )
    stored = json.loads(key_file.read_text())
    key = RSAKey.import_key(stored["key"])
    kid = stored["kid"]
    issuer = DevIssuer(base_url + DEV_ISSUER_PATH, folder / "dev_issuer_tokens.json")
    issuer.remove_key(issuer.current_kid)
    issuer.current_kid = issuer.add_key("RS256", kid=kid, key=key)
    return issuer


def dev_issuer_blueprint(issuer: DevIssuer) -> Blueprint:
    """Discovery, JWK Set, introspection and revocation of the dev issuer."""
    blueprint = Blueprint("dev_issuer", __name__, url_prefix=DEV_ISSUER_PATH)

    @blueprint.get("/.well-known/openid-configuration")
    def metadata() -> Response:
        base = issuer.issuer
        return jsonify(
            issuer=base,
            jwks_uri=f"{base}/jwks",
            introspection_endpoint=f"{base}/introspect",
            revocation_endpoint=f"{base}/revoke",
        )

    @blueprint.get("/jwks")
    def jwks() -> Response:
        return jsonify(issuer.jwks())

    @blueprint.post("/introspect")
    def introspect() -> tuple[Response, int]:
        auth = request.authorization
        if auth is None or (auth.username, auth.password) != INTROSPECTION_CLIENT:
            return jsonify(error="invalid_client"), 401
        token = request.form.get("token", "")
        return jsonify(issuer.introspect(token) if token else {"active": False}), 200

    @blueprint.post("/revoke")
    def revoke() -> tuple[str, int]:
        token = request.form.get("token", "")
        if token:
            issuer.revoke(token)
        return "", 200  # RFC 7009 §2.2: 200 whether or not the token was known

    return blueprint


def register(app: Flask, issuer: DevIssuer) -> None:
    """Mount the issuer's routes and keep it where the CLI can find it."""
    app.register_blueprint(dev_issuer_blueprint(issuer))
    app.extensions["oauth_verify_dev_issuer"] = issuer
