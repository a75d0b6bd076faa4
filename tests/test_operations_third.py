"""Operations, third pass: error rendering, logging, CLI, multi-app set-ups."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from flask import Flask
from werkzeug.serving import make_server

from flask_oauth_verify import InsufficientScopeError, InvalidTokenError, require_token
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app

#: RFC 6750 §3: error_description and scope values are made of these only.
_RFC6750_VALUE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


@contextmanager
def served(app: Flask) -> Iterator[str]:
    """``app`` on a real WSGI server on 127.0.0.1; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


def _attributes(challenge: str) -> dict[str, str]:
    assert challenge.startswith("Bearer ")
    found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', challenge))
    return found


def test_a_non_ascii_description_still_gets_its_401(tokens: TokenIssuer) -> None:
    """A localised message raised by the app's own code (a claims check, a
    view) went into the header as it was: the WSGI server could not encode
    it as Latin-1 and the client got no answer at all."""
    app = make_app(tokens.config())

    @app.get("/localised")
    @require_token
    def localised() -> str:
        raise InvalidTokenError('Jeton refusé \u2013 \u65e5\u672c\u8a9e "x" \\ y')

    @app.get("/scoped")
    @require_token
    def scoped() -> str:
        raise InsufficientScopeError("Portée manquante", scopes=["lire:\u00e9t\u00e9", 'a"b\\c'])

    with served(app) as base:
        response = requests.get(base + "/localised", headers=auth_header(tokens.mint()), timeout=5)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.json()["message"].startswith("Jeton refusé \u2013")  # the body keeps it
        attributes = _attributes(response.headers["WWW-Authenticate"])
        assert attributes["error"] == "invalid_token"
        description = attributes["error_description"]
        assert _RFC6750_VALUE.fullmatch(description), description
        assert description.startswith("Jeton refuse ? ??? 'x' / y")

        response = requests.get(base + "/scoped", headers=auth_header(tokens.mint()), timeout=5)
        assert response.status_code == 403
        attributes = _attributes(response.headers["WWW-Authenticate"])
        assert attributes["error"] == "insufficient_scope"
        assert attributes["error_description"] == "Portee manquante"
        assert _RFC6750_VALUE.fullmatch(attributes["scope"]), attributes["scope"]


def test_a_challenges_realm_argument_is_reduced_to_ascii() -> None:
    challenge = InvalidTokenError().challenge("caf\u00e9 \u2603\r\n")
    assert challenge.startswith('Bearer realm="cafe ?  ", ')
    challenge.encode("ascii")
