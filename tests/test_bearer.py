"""Bearer token extraction (RFC 6750 §2, RFC 7235)."""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from flask import Flask, g
from werkzeug.serving import make_server

from flask_oauth_verify import require_token
from flask_oauth_verify.testing import TokenIssuer

from .conftest import make_app


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(client: object, tokens: TokenIssuer, scheme: str) -> None:
    app = make_app(tokens.config())
    response = app.test_client().get(
        "/protected", headers={"Authorization": f"{scheme} {tokens.mint()}"}
    )
    assert response.status_code == 200


def test_no_header_is_401_without_error_attribute(client: object, app: Flask) -> None:
    response = app.test_client().get("/protected")
    assert response.status_code == 401
    assert response.json == {
        "error": "unauthorized",
        "message": "A bearer access token is required.",
    }
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Digest x", "Token abc"])
def test_other_schemes_count_as_no_bearer_token(app: Flask, value: str) -> None:
    response = app.test_client().get("/protected", headers={"Authorization": value})
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "unauthorized"


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer    ", "Bearer a b", "Bearer a\tb"])
def test_malformed_header_is_400_invalid_request(app: Flask, value: str) -> None:
    response = app.test_client().get("/protected", headers={"Authorization": value})
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


def test_token_sent_two_ways_is_400(app: Flask, tokens: TokenIssuer) -> None:
    @app.post("/protected-post")
    @require_token
    def protected_post() -> str:
        return "ok"

    token = tokens.mint()
    client = app.test_client()
    both = client.get(
        f"/protected?access_token={token}", headers={"Authorization": f"Bearer {token}"}
    )
    assert both.status_code == 400
    form = client.post(
        "/protected-post",
        headers={"Authorization": f"Bearer {token}"},
        data={"access_token": token},
        content_type="application/x-www-form-urlencoded",
    )
    assert form.status_code == 400


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_a_form_body_is_no_token_location_on_methods_without_body_semantics(
    tokens: TokenIssuer, method: str
) -> None:
    """RFC 6750 §2.2: a form token only where the body has defined semantics
    (never GET): the body of such a request neither carries a token nor
    counts as a second one beside the header's."""
    app = make_app(tokens.config(TOKEN_LOCATIONS=["header", "form"]))

    @app.route("/any", methods=["GET", "DELETE", "OPTIONS", "POST"])
    @require_token
    def any_method() -> str:
        return g.auth.subject or ""

    client = app.test_client()
    token = tokens.mint()
    body, form_type = {"access_token": token}, "application/x-www-form-urlencoded"
    alone = client.open("/any", method=method, data=body, content_type=form_type)
    assert alone.status_code == 401
    assert 'error="' not in alone.headers["WWW-Authenticate"], "no token was sent"
    bearer = {"Authorization": f"Bearer {token}"}
    beside = client.open("/any", method=method, headers=bearer, data=body, content_type=form_type)
    assert beside.status_code == 200
    posted = client.post("/any", data=body, content_type=form_type)
    assert posted.status_code == 200, "POST: the form token counts"


def test_a_lower_case_post_is_a_post_for_form_tokens(tokens: TokenIssuer) -> None:
    """Flask routes ``post`` as POST (werkzeug's own server passes the method
    as sent): its form token counts, and beside a header token it is a
    second one (400), never a body the view reads unverified."""
    app = make_app(tokens.config(TOKEN_LOCATIONS=["header", "form"]))

    @app.post("/submit")
    @require_token
    def submit() -> str:
        return g.auth.subject or ""

    client = app.test_client()
    body = {"access_token": tokens.mint()}
    for method in ("post", "Post"):
        lower = {"REQUEST_METHOD": method}
        alone = client.post("/submit", data=body, environ_overrides=lower)
        assert (alone.status_code, alone.text) == (200, "user_1"), method
        beside = client.post(
            "/submit",
            data=body,
            headers={"Authorization": f"Bearer {tokens.mint()}"},
            environ_overrides=lower,
        )
        assert beside.status_code == 400, method


def test_a_tab_after_the_bearer_scheme_is_400(app: Flask, tokens: TokenIssuer) -> None:
    """RFC 9110 §11.4: SP after the scheme; ``Bearer<TAB>token`` is a malformed
    Bearer header (400), as ``Bearer <TAB>token`` already was, not "no token"."""
    for value in (
        f"Bearer\t{tokens.mint()}",
        f"bearer\t\t{tokens.mint()}",
        f"Bearer\x0b{tokens.mint()}",
        f"Bearer\xa0{tokens.mint()}",
    ):
        response = app.test_client().get("/protected", headers={"Authorization": value})
        assert response.status_code == 400, value
        assert response.json is not None and response.json["error"] == "invalid_request"
    basic = app.test_client().get("/protected", headers={"Authorization": "Basic\tdXNlcjpw"})
    assert basic.status_code == 401, "another scheme: no bearer token"


def test_a_success_to_a_query_token_is_cache_control_private(tokens: TokenIssuer) -> None:
    """RFC 6750 §2.3: the answer to a URL holding the token is for one client."""
    app = make_app(tokens.config(TOKEN_LOCATIONS=["header", "query"]))

    @app.get("/cached")
    @require_token
    def cached() -> tuple[str, int, dict[str, str]]:
        return "ok", 200, {"Cache-Control": "no-cache"}

    client = app.test_client()
    token = tokens.mint()
    by_query = client.get(f"/protected?access_token={token}")
    assert by_query.status_code == 200
    assert by_query.headers["Cache-Control"] == "private"
    assert client.get(f"/cached?access_token={token}").headers["Cache-Control"] == "no-cache"
    by_header = client.get("/protected", headers={"Authorization": f"Bearer {token}"})
    assert by_header.status_code == 200 and "Cache-Control" not in by_header.headers
    refused = client.get("/protected?access_token=nope.nope.nope")
    assert refused.status_code == 401 and refused.headers["Cache-Control"] == "no-store"


def test_two_authorization_headers_are_400(app: Flask, tokens: TokenIssuer) -> None:
    token = tokens.mint()
    response = app.test_client().get(
        "/protected",
        headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")],
    )
    assert response.status_code == 400


def test_query_token_is_ignored_unless_enabled(tokens: TokenIssuer) -> None:
    token = tokens.mint()
    default = make_app(tokens.config())
    assert default.test_client().get(f"/protected?access_token={token}").status_code == 401
    enabled = make_app(tokens.config(TOKEN_LOCATIONS=["header", "query"]), name="q")
    assert enabled.test_client().get(f"/protected?access_token={token}").status_code == 200


def test_form_token_when_enabled(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(TOKEN_LOCATIONS=["form"]))

    @app.post("/submit")
    def submit() -> str:
        from flask_oauth_verify import verify_request

        context = verify_request()
        return context.subject or "" if context else ""

    response = app.test_client().post("/submit", data={"access_token": tokens.mint()})
    assert response.status_code == 200 and response.text == "user_1"


@pytest.mark.parametrize("token", ["abc$def", "tök.en.x", "a,b.c.d", "<script>"])
def test_characters_outside_b64token_are_invalid_token(app: Flask, token: str) -> None:
    response = app.test_client().get(
        "/protected", headers={"Authorization": f"Bearer {token}".encode().decode("latin-1")}
    )
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_token"


@pytest.mark.parametrize("second", ["Bearer {token}", "bearer {token}", "Bearer forged.token.x"])
def test_a_bearer_header_after_another_scheme_is_400(
    app: Flask, tokens: TokenIssuer, second: str
) -> None:
    """``Basic …`` then ``Bearer …``: two headers, folded by the server with ", "."""
    folded = "Basic dXNlcjpwYXNz, " + second.format(token=tokens.mint())
    client = app.test_client()
    response = client.get("/protected", environ_overrides={"HTTP_AUTHORIZATION": folded})
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


def test_a_bearer_header_after_another_scheme_is_refused_on_optional_routes(
    tokens: TokenIssuer,
) -> None:
    app = make_app(tokens.config())

    @app.get("/maybe")
    @require_token(optional=True)
    def maybe() -> dict[str, object]:
        return {"anonymous": g.auth is None}

    folded = "Basic dXNlcjpwYXNz, Bearer forged.token.x"
    response = app.test_client().get("/maybe", environ_overrides={"HTTP_AUTHORIZATION": folded})
    assert response.status_code == 400
    digest = 'Digest username="u", realm="r", nonce="n", response="x"'
    plain = app.test_client().get("/maybe", headers={"Authorization": digest})
    assert (plain.status_code, plain.json) == (200, {"anonymous": True})


@pytest.mark.parametrize("name", ["access%5Ftoken", "access_%74oken", "%61ccess_token"])
def test_a_percent_encoded_query_parameter_name_is_still_access_token(
    app: Flask, tokens: TokenIssuer, name: str
) -> None:
    token = tokens.mint()
    both = app.test_client().get(
        f"/protected?{name}={token}", headers={"Authorization": f"Bearer {token}"}
    )
    assert both.status_code == 400  # sent two ways, however the name is spelt
    enabled = make_app(tokens.config(TOKEN_LOCATIONS=["header", "query"]), name="q")
    assert enabled.test_client().get(f"/protected?{name}={token}").status_code == 200


def test_a_form_body_over_the_apps_limit_does_not_hide_a_header_token(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Form tokens off (the default): a body too large to parse is the view's business."""
    app = make_app(tokens.config())
    app.config["MAX_CONTENT_LENGTH"] = 1024

    @app.post("/upload")
    @require_token
    def upload() -> dict[str, object]:
        return {"subject": g.auth.subject}

    body = "field=" + "x" * 20_000
    client = app.test_client()
    response = client.post(
        "/upload",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": f"Bearer {tokens.mint()}"},
    )
    assert (response.status_code, response.json) == (200, {"subject": "user_1"})
    anonymous = client.post("/upload", data=body, content_type="application/x-www-form-urlencoded")
    assert anonymous.status_code == 401
    assert anonymous.json is not None and anonymous.json["error"] == "unauthorized"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_form_body_over_the_apps_limit_with_form_tokens_on_is_400(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(TOKEN_LOCATIONS=["header", "form"]))
    app.config["MAX_CONTENT_LENGTH"] = 1024

    @app.post("/submit")
    @require_token
    def submit() -> str:
        return "ok"

    response = app.test_client().post(
        "/submit",
        data="access_token=" + "x" * 20_000,
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"
    assert "WWW-Authenticate" in response.headers


def _upload_app(tokens: TokenIssuer, locations: list[str]) -> Flask:
    app = make_app(tokens.config(TOKEN_LOCATIONS=locations))

    @app.post("/upload")
    @require_token
    def upload() -> dict[str, object]:
        return {"subject": g.auth.subject}

    return app


@pytest.mark.parametrize("locations", [["header"], ["header", "form"]])
def test_a_form_body_cut_short_does_not_refuse_a_header_token(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture, locations: list[str]
) -> None:
    """A client that hangs up mid-body (werkzeug's ClientDisconnected) sent no form token.

    With form tokens off the header decides (200); with them on the body
    cannot be read for one, a malformed request (400). Never an internal error.
    """
    app = _upload_app(tokens, locations)
    response = app.test_client().post(
        "/upload",
        headers={"Authorization": f"Bearer {tokens.mint(scopes=['read:users'])}"},
        environ_overrides={
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": "100",
            "wsgi.input": io.BytesIO(b"x=1"),
        },
    )
    if locations == ["header"]:
        assert response.status_code == 200
    else:
        assert response.json is not None
        assert (response.status_code, response.json["error"]) == (400, "invalid_request")
        assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def served_app(tokens: TokenIssuer) -> Iterator[int]:
    """The upload app under a real Werkzeug server on 127.0.0.1; yields its port."""
    server = make_server("127.0.0.1", 0, _upload_app(tokens, ["header"]), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nx=1\r\n0\r\n\r\n", b"5\r\nx=1", b""],
    ids=["bad chunk size", "truncated chunk", "no final chunk"],
)
def test_broken_chunked_framing_does_not_refuse_a_header_token(
    served_app: int, tokens: TokenIssuer, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    """The server's OSError on a broken chunked body is no token, not an internal error."""
    head = [
        "POST /upload HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: close",
        f"Authorization: Bearer {tokens.mint(scopes=['read:users'])}",
        "Content-Type: application/x-www-form-urlencoded",
        "Transfer-Encoding: chunked",
    ]
    with socket.create_connection(("127.0.0.1", served_app), timeout=10) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        connection.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    assert data.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
