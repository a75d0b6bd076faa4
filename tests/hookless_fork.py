"""Run as a script by tests/test_concurrency.py: a "uWSGI master" that
serves one request, forks a worker with C ``fork()`` (no
``os.register_at_fork`` hook runs, as in uWSGI without
``--py-call-osafterfork``), lets the worker serve one request, then serves
one more itself. Prints the three statuses as JSON.

A process of its own, with no thread but the library's watchdog: a C fork
of the test runner, whose other threads may hold any lock at that moment
(logging's, the import lock), can deadlock the child for reasons of its own.

Usage: ``python tests/hookless_fork.py <introspection endpoint URL>``
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

from flask import Flask

from flask_oauth_verify import OAuthVerify, require_token


def _status(app: Flask, token: str) -> int:
    response = app.test_client().get("/", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def main(endpoint: str) -> None:
    app = Flask("uwsgi-master")
    app.config.update(
        OAUTH_VERIFY_ISSUER="https://issuer.example.test",
        OAUTH_VERIFY_AUDIENCE="api",
        OAUTH_VERIFY_JWKS={"keys": []},
        OAUTH_VERIFY_STRATEGY="introspection",
        OAUTH_VERIFY_INTROSPECTION_ENDPOINT=endpoint,
        OAUTH_VERIFY_INTROSPECTION_CLIENT_ID="rs",
        OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET="secret",
    )
    OAuthVerify(app)
    app.add_url_rule("/", "index", require_token(lambda: "ok"))
    master = _status(app, "opaque-token-of-the-master-0001")  # pools a connection
    read, write = os.pipe()
    pid = ctypes.PyDLL(None).fork()  # PyDLL: the GIL stays held, as in uWSGI's master
    if pid == 0:
        try:
            signal.alarm(20)  # a worker that hangs ends (and fails the test)
            os.write(write, str(_status(app, "opaque-token-of-a-worker-0001")).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        worker = int(pipe.read() or 0)
    os.waitpid(pid, 0)
    master_again = _status(app, "opaque-token-of-the-master-0002")
    print(json.dumps([master, worker, master_again]))


if __name__ == "__main__":
    main(sys.argv[1])
