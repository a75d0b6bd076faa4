"""Probes of the decorators' own cache hit (``_guard``) and the compiled claim reader.

Each compares the answer of the fast path with the general one in a case
``tests/test_hot_path.py`` does not cover: a claim map too long to nest,
the clock around ``exp`` + leeway, a reused app context, a nested
``introspection`` check, and raw HTTP with repeated ``Authorization``
headers through a real WSGI server on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g
from werkzeug.serving import BaseWSGIServer, make_server

from flask_oauth_verify import require_scope, require_token
from flask_oauth_verify.config import Settings
from flask_oauth_verify.context import ContextBuilder, request_auth
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import FakeClock, make_app

# -- the compiled claim reader ----------------------------------------------

#: More alternative claims for one field than Python allows nested blocks.
_MANY = [f"org_{i}" if i % 2 else f"ns_{i}.org" for i in range(150)]
_SCOPES = [f"scp_{i}" if i % 2 else f"sns_{i}.scp" for i in range(120)]


def _claim_map_settings() -> Settings:
    return Settings.from_config(
        {
            "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
            "OAUTH_VERIFY_AUDIENCE": "api",
            "OAUTH_VERIFY_JWKS": {"keys": []},
            "OAUTH_VERIFY_CLAIM_MAP": {"organization_id": _MANY, "scopes": _SCOPES},
        }
    )


@pytest.mark.parametrize(
    ("claims", "organization"),
    [
        ({"sub": "u"}, None),
        ({"sub": "u", "org_149": "last"}, "last"),
        ({"sub": "u", "ns_148": {"org": "nested"}, "org_149": "later"}, "nested"),
        ({"sub": "u", "ns_148.org": "whole", "ns_148": {"org": "nested"}}, "whole"),
        ({"sub": "u", "ns_0": {"org": "first"}, "org_149": "last"}, "first"),
    ],
)
def test_a_claim_map_of_many_paths_compiles_and_reads_like_the_general_form(
    claims: dict[str, Any], organization: str | None
) -> None:
    builder = ContextBuilder(_claim_map_settings())  # an IndentationError before the fix
    claims = {**claims, "scp_101": "s1 s2", "sns_100": {"scp": ["s3"]}}
    context = builder.build(claims)
    assert context.organization_id == organization
    assert context.scopes == {"s1", "s2", "s3"}
    assert builder._read(claims) == builder.read_in_general(claims)


def test_an_app_with_a_claim_map_of_many_paths_verifies_tokens(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(audience="api", CLAIM_MAP={"organization_id": _MANY}))
    token = tokens.mint(org_149="org-9")
    for _ in range(2):  # first seen, then the wrapper's hit
        response = app.test_client().get("/protected", headers=auth_header(token))
        assert response.status_code == 200
        assert response.get_json()["organization_id"] == "org-9"


# -- the wrapper's hit against the general path -----------------------------


def _pair(tokens: TokenIssuer, clock: FakeClock, **extra: Any) -> tuple[Flask, Flask]:
    """The same app twice: ``fast`` answers hits in the wrapper, ``general`` never."""
    config = tokens.config(audience="api", **extra)
    fast = make_app(config, clock=clock, name="fast")
    general = make_app(config, clock=clock, name="general")
    get_state(general).header_tokens = False  # extract_token for every request
    return fast, general


def _answer(app: Flask, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    response = app.test_client().get(path, headers=headers)
    return response.status_code, response.get_json()


@pytest.mark.parametrize("leeway", [0, 30])
def test_a_hit_around_exp_and_the_leeway_answers_like_the_general_path(
    tokens: TokenIssuer, clock: FakeClock, leeway: int
) -> None:
    fast, general = _pair(tokens, clock, LEEWAY=leeway)
    token = tokens.mint(expires_in=100, now=clock.now)
    seen = []
    for step in (0, 99 + leeway, 1, 1):  # t0, exp+leeway-1, exp+leeway, beyond
        clock.advance(step)
        answers = [_answer(app, "/protected", auth_header(token)) for app in (fast, general)]
        assert answers[0] == answers[1], step
        seen.append(answers[0][0])
    assert seen == [200, 200, 401, 401]
    assert len(get_state(fast).token_cache) == 0, "the expired entry was dropped"


@pytest.mark.parametrize("pushed", [True, False])
def test_a_reused_app_context_never_carries_a_hit_into_the_next_request(
    tokens: TokenIssuer, clock: FakeClock, pushed: bool
) -> None:
    fast, general = _pair(tokens, clock)
    one = tokens.mint(subject="user_1", now=clock.now)
    two = tokens.mint(subject="user_2", now=clock.now)
    for app in (fast, general):

        @app.get("/who", endpoint="who")
        @require_token(optional=True)
        def who() -> dict[str, Any]:
            context = request_auth()
            return {"subject": context and context.subject, "same": context is g.get("auth")}

    sequence = [
        auth_header(one),
        auth_header(one),
        {"Authorization": "Bearer not-a-token"},
        {},
        auth_header(two),
        auth_header(one),
        {"Authorization": "Basic dXNlcjpwdw=="},
    ]
    results = []
    for app in (fast, general):
        context = app.app_context()
        if pushed:  # pushed before the requests: g is shared by all of them
            context.push()
        results.append([_answer(app, "/who", headers) for headers in sequence])
        if pushed:
            context.pop()
    assert results[0] == results[1]
    subjects = [body and body.get("subject") for _status, body in results[0]]
    assert subjects == ["user_1", "user_1", None, None, "user_2", "user_1", None]
    assert [status for status, _body in results[0]] == [200, 200, 401, 200, 200, 200, 200]


def test_an_inner_introspection_check_still_runs_under_the_wrappers_hit(
    served_tokens: TokenIssuer,
) -> None:
    names = ("INTROSPECTION_CLIENT_ID", "INTROSPECTION_CLIENT_SECRET")
    credentials = dict(zip(names, served_tokens.introspection_credentials, strict=True))
    app = make_app(served_tokens.config(audience="api", INTROSPECTION_CACHE_TTL=0, **credentials))

    @app.get("/nested")
    @require_scope("read:users")
    @require_token(strategy="introspection")
    def nested() -> dict[str, Any]:
        checked = sorted(c for c in g._oauth_verify_checked if isinstance(c, str))  # strategies
        return {"checked": checked, "strategy": g.auth.strategy}

    token = served_tokens.mint(scopes=["read:users"])
    client = app.test_client()
    assert client.get("/protected", headers=auth_header(token)).status_code == 200  # cached
    response = client.get("/nested", headers=auth_header(token))
    assert response.status_code == 200
    expected = {"checked": ["introspection", "jwks"], "strategy": "introspection"}
    assert response.get_json() == expected
    served_tokens.revoke(token)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200, "jwks hit"
    response = client.get("/nested", headers=auth_header(token))
    assert response.status_code == 401, "the outer hit does not stand in for introspection"


# -- raw HTTP through a real WSGI server ------------------------------------


@pytest.fixture
def served_pair(tokens: TokenIssuer, clock: FakeClock) -> Iterator[tuple[int, int, str]]:
    """The fast and the general app under real WSGI servers, and a cached token."""
    fast, general = _pair(tokens, clock)
    token = tokens.mint(now=clock.now)
    servers: list[BaseWSGIServer] = []
    threads = []
    for app in (fast, general):
        assert _answer(app, "/protected", auth_header(token))[0] == 200
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
    assert len(get_state(fast).token_cache) == 1
    yield servers[0].server_port, servers[1].server_port, token
    for server, thread in zip(servers, threads, strict=True):
        server.shutdown()
        server.server_close()
        thread.join()


def _raw(port: int, target: str, headers: list[str]) -> tuple[bytes, bytes]:
    """Send one raw request; return its status line and body."""
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


RAW_CASES = [
    ("/protected", ["Authorization: Bearer TOKEN"], 200),
    ("/protected", ["Authorization: Bearer TOKEN", "Authorization: Bearer TOKEN"], 400),
    ("/protected", ["Authorization: Bearer TOKEN", "Authorization: Basic dTpw"], 400),
    ("/protected", ["Authorization: Basic dTpw", "Authorization: Bearer TOKEN"], 400),
    ("/protected", ["Authorization: Bearer TOKEN", "Authorization:"], 401),
    ("/protected", ["Authorization: Bearer TOKEN", "Content-Type: text/plain"], 200),
    ("/protected", ["Authorization: Bearer TOKEN", "Content-Type:"], 200),
    ("/protected?", ["Authorization: Bearer TOKEN"], 200),
    ("/protected?access%5Ftoken=x", ["Authorization: Bearer TOKEN"], 400),
    ("/protected?%61ccess_token=TOKEN", ["Authorization: Bearer TOKEN"], 400),
    ("/protected?access_token", ["Authorization: Bearer TOKEN"], 400),
    ("/protected", ["Authorization: Bearer TOKEN "], 200),
    ("/protected", ["Authorization: Bearer\tTOKEN"], 400),  # a tab where SP belongs
]


@pytest.mark.parametrize(("target", "headers", "status"), RAW_CASES)
def test_raw_requests_to_a_real_server_get_the_general_answer_on_a_hit(
    served_pair: tuple[int, int, str], target: str, headers: list[str], status: int
) -> None:
    fast_port, general_port, token = served_pair
    headers = [header.replace("TOKEN", token) for header in headers]
    target = target.replace("TOKEN", token)
    fast = _raw(fast_port, target, headers)
    assert fast == _raw(general_port, target, headers)
    assert fast[0].split(b" ")[1] == str(status).encode(), fast
