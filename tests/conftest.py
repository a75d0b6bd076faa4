"""Shared fixtures: token issuers, real servers on 127.0.0.1, a fake clock.

Services (Redis, PostgreSQL) are real. Outside CI a test that needs a missing
service is skipped; in CI (``CI=true``) it fails, so a green CI run means the
service was really exercised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.testing import IssuerServer, TokenIssuer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what needs a real server (``-m redis``, ``-m "not postgres"``):
    a test using the ``redis_server`` fixture, or a ``postgres*`` one, or run
    with a PostgreSQL backend parameter (which takes ``postgres_url`` late)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if "redis_server" in names:
            item.add_marker(pytest.mark.redis)
        if any(name.startswith("postgres") for name in names) or any(
            isinstance(value, str) and value.startswith("postgres") for value in params
        ):
            item.add_marker(pytest.mark.postgres)


def need_service(what: str) -> None:
    """Skip (locally) or fail (in CI) a test whose service is missing."""
    message = f"{what} is not available"
    if IN_CI:
        pytest.fail(message + " (CI must provide it)")
    pytest.skip(message)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, every: float = 0.001) -> bool:
    """Poll ``condition`` (state another thread or process changes) until it holds.

    Returns ``False`` once ``timeout`` seconds pass without it. The one
    polling loop of the suite: a condition checked, never a fixed sleep
    standing in for synchronisation.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
    return True


def accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class FakeClock:
    """A controllable wall clock: ``clock()`` returns the current fake time."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at the real current time."""
    return FakeClock()


@pytest.fixture(scope="session")
def rsa_issuer() -> TokenIssuer:
    """One RSA-2048 issuer for the session (key generation is slow)."""
    return TokenIssuer(issuer="https://issuer.example.test", audience="api")


@pytest.fixture
def tokens(rsa_issuer: TokenIssuer) -> TokenIssuer:
    """The session issuer, with its static configuration (no server)."""
    return rsa_issuer


@pytest.fixture
def issuer_server() -> Iterator[IssuerServer]:
    """A fresh real HTTP server on 127.0.0.1, closed after the test."""
    server = IssuerServer()
    yield server
    server.close()


@pytest.fixture
def served_tokens(issuer_server: IssuerServer) -> TokenIssuer:
    """An issuer whose discovery, JWKS and introspection are served for real."""
    issuer = TokenIssuer(audience="api")
    issuer.serve(issuer_server)
    return issuer


def add_views(app: Flask) -> None:
    """Register the small set of views the core tests call."""
    from flask import g

    from flask_oauth_verify import require_scope, require_token

    @app.get("/protected")
    @require_token
    def protected() -> dict[str, object]:
        auth = g.auth
        return {
            "subject": auth.subject,
            "organization_id": auth.organization_id,
            "scopes": sorted(auth.scopes),
            "strategy": auth.strategy,
        }

    @app.get("/read")
    @require_scope("read:users")
    def read() -> dict[str, object]:
        return {"subject": g.auth.subject}


def make_app(
    config: dict[str, object],
    *,
    cache: object | None = None,
    clock: Callable[[], float] | None = None,
    name: str = "test_app",
) -> Flask:
    """A Flask app with the extension and the core test views."""
    app = Flask(name)
    app.config.update(TESTING=True, **config)
    OAuthVerify().init_app(app, cache=cache, clock=clock)
    add_views(app)
    return app


@pytest.fixture
def app(tokens: TokenIssuer) -> Flask:
    """An app trusting the session issuer through a static key set."""
    return make_app(tokens.config(audience="api"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of :func:`app`."""
    return app.test_client()


# -- real services ------------------------------------------------------------


def guide_settings(guide: Path, marker: str) -> dict[str, Any]:
    """The ``OAUTH_VERIFY_*`` settings of the first Python block after ``marker``.

    So that a test checks what a guide tells its readers to write.
    """
    text = guide.read_text()
    start = text.index(marker)
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text[start:])
    assert block is not None, f"no Python block after {marker!r}"
    namespace: dict[str, Any] = {}
    exec(re.sub(r"(?m)^   ", "", block.group(1)), namespace)  # noqa: S102 (our own docs)
    return {k: v for k, v in namespace.items() if k.startswith("OAUTH_VERIFY_")}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server process on 127.0.0.1 that tests start and stop."""

    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop the server (as an outage would)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class RedisServer(ServerProcess):
    """A real ``redis-server`` process on 127.0.0.1 that tests can stop and start."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(  # noqa: S603
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_until(self._answers_ping, every=0.02):
            raise RuntimeError("redis-server did not start")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """FLUSHALL, as an operator (or an eviction storm) would."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(16)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis for the session (``redis-server`` must be on PATH)."""
    binary = shutil.which("redis-server")
    if binary is None:
        need_service("redis-server")
        raise AssertionError("unreachable")
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        yield server
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session Redis, running and empty."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL URL from ``OAUTH_VERIFY_TEST_POSTGRES_URL``."""
    url = os.environ.get("OAUTH_VERIFY_TEST_POSTGRES_URL")
    if not url:
        need_service("PostgreSQL (OAUTH_VERIFY_TEST_POSTGRES_URL)")
        raise AssertionError("unreachable")
    return url


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet ``http.server`` handler for the tests' own small servers."""

    def send_json(self, value: Any) -> None:
        """Answer 200 with ``value`` as JSON."""
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _forked(fork: Callable[[], int], child: Callable[[], Any]) -> Any:
    """Fork with ``fork``; the child writes what ``child()`` returns (JSON)
    to a pipe and exits; the parent returns it, or ``None`` when there was
    nothing (the child raised or timed out)."""
    read, write = os.pipe()
    pid = fork()
    if pid == 0:
        try:
            os.close(read)
            result = child()
            if result is not None:
                os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else None


def in_forked_child(work: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Fork; run ``work`` in the child (in a thread, for at most ``timeout``
    seconds); return its result, which must be JSON, or ``None`` when it
    raised or did not finish: a child that hangs fails the test, not the run.
    """

    def child() -> Any:
        result: list[Any] = []
        runner = threading.Thread(target=lambda: result.append(work()), daemon=True)
        runner.start()
        runner.join(timeout)
        return result[0] if result else None

    return _forked(os.fork, child)
