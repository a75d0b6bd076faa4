"""Coverage-guided fuzz target for the whole verification path (atheris).

Arbitrary bytes become an ``Authorization`` header, a token, or a token
whose header or payload is the fuzzer's input signed with the real key, and
go through a real Flask request to a protected view. A finding is:

* any exception escaping the app (a 500),
* a status other than 200/400/401/403 (the key set is static, so no 503),
* a 200 for a token the real key did not sign (a forgery),
* ``g.auth`` set on a refused request.

Run for a bounded time (atheris is an optional extra:
``pip install -e ".[fuzz]"``)::

    python fuzz/fuzz_verify.py -max_total_time=60 -rss_limit_mb=2048

Without atheris the same target runs under a small built-in mutator, for CI
machines where atheris does not install::

    python fuzz/fuzz_verify.py --no-atheris -max_total_time=60
"""

from __future__ import annotations

import base64
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:  # optional extra
    atheris = None

if __name__ == "__main__" and atheris is not None and "--no-atheris" not in sys.argv:
    with atheris.instrument_imports(include=["flask_oauth_verify"]):
        import flask_oauth_verify  # noqa: F401 - instrumented for coverage
from flask import Flask, g

from flask_oauth_verify import OAuthVerify, require_scope, require_token
from flask_oauth_verify.testing import TokenIssuer

ALLOWED = {200, 400, 401, 403}
NOW = 1_750_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Target:
    """The app under test, built once, and the oracle around one request."""

    def __init__(self) -> None:
        self.issuer = TokenIssuer(issuer="https://issuer.example.test", audience="api")
        self.ec_kid = self.issuer.add_key("ES256")
        self.rsa_kid = self.issuer.current_kid
        self.seen: list[Any] = []
        app = Flask("fuzz_verify")
        app.config.update(TESTING=True, **self.issuer.config(audience="api"))
        OAuthVerify().init_app(app, clock=lambda: NOW)

        @app.route("/protected", methods=["GET", "POST"])
        @require_token
        def protected() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        @app.get("/read")
        @require_scope("read:users")
        def read() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        @app.after_request
        def record(response: Any) -> Any:
            self.seen.append(g.get("auth"))
            return response

        self.client = app.test_client()

    def claims(self) -> dict[str, Any]:
        return self.issuer.claims(now=NOW, scopes=["read:users"], organization_id="org_1")

    def sign(self, header: bytes, payload: bytes, kid: str | None = None) -> str:
        """A compact JWS over exactly these bytes, signed with the real key."""
        alg, key = ("ES256", self.ec_kid) if kid == self.ec_kid else ("RS256", self.rsa_kid)
        signing_input = f"{_b64(header)}.{_b64(payload)}"
        from joserfc.jws import JWSRegistry

        algorithm = JWSRegistry.algorithms[alg]
        signature = algorithm.sign(signing_input.encode(), self.issuer.key(key))
        return f"{signing_input}.{_b64(signature)}"

    def header(self, kid: str | None = None) -> bytes:
        alg = "ES256" if kid == self.ec_kid else "RS256"
        return json.dumps({"alg": alg, "kid": kid or self.rsa_kid, "typ": "at+jwt"}).encode()

    def build(self, data: bytes) -> tuple[list[tuple[str, str]], str, bool]:
        """Map input bytes to (headers, path, signed by the real key)."""
        if not data:
            return [], "/protected", False
        mode, rest = data[0] % 6, data[1:]
        path = "/read" if data[0] & 0x80 else "/protected"
        text = rest.decode("latin-1").replace("\r", "").replace("\n", "").replace("\0", "")
        if mode == 0:  # the raw header value
            return [("Authorization", text)], path, False
        if mode == 1:  # anything after the scheme
            return [("Authorization", "Bearer " + text)], path, False
        if mode == 2:  # arbitrary segments, base64url-encoded
            parts = rest.split(b"\xff")
            return [("Authorization", "Bearer " + ".".join(_b64(p) for p in parts))], path, False
        kid = self.ec_kid if data[0] & 0x40 else None
        if mode == 3:  # the fuzzer's payload, really signed
            token = self.sign(self.header(kid), rest, kid)
        elif mode == 4:  # the fuzzer's protected header, really signed
            token = self.sign(rest, json.dumps(self.claims()).encode(), kid)
        else:  # a valid token with the fuzzer's bytes spliced into it
            valid = self.sign(self.header(kid), json.dumps(self.claims()).encode(), kid)
            position = rest[0] % (len(valid) + 1) if rest else 0
            token = valid[:position] + text[1:] + valid[position:]
            # Spaces around the token are not part of it (RFC 7235 §2.1).
            return [("Authorization", "Bearer " + token)], path, token.strip(" ") == valid
        return [("Authorization", "Bearer " + token)], path, True

    def run(self, data: bytes) -> None:
        headers, path, signed = self.build(data)
        self.seen.clear()
        response = self.client.get(path, headers=headers)
        status = response.status_code
        if status not in ALLOWED:
            raise AssertionError(f"undocumented status {status}: {response.data[:200]!r}")
        if status == 200 and not signed:
            raise AssertionError(f"forged token accepted: {headers!r}")
        body = response.get_json(silent=True)
        if status != 200:
            if not isinstance(body, dict) or set(body) != {"error", "message"}:
                raise AssertionError(f"not the documented error body: {response.data[:200]!r}")
            if not response.headers.get("WWW-Authenticate", "").startswith("Bearer realm="):
                raise AssertionError("no RFC 6750 challenge")
        if status in (400, 401) and self.seen and self.seen[0] is not None:
            raise AssertionError("g.auth set for a refused request")


_target: Target | None = None


def test_one_input(data: bytes) -> None:
    """The fuzz entry point (also called by the test suite's smoke test)."""
    global _target
    if _target is None:
        _target = Target()
    _target.run(data)


def seeds() -> list[bytes]:
    """A few starting inputs: one per mode, valid and near-valid."""
    target = _target or Target()
    claims = json.dumps(target.claims()).encode()
    return [
        b"\x00Bearer abc",
        b"\x01" + b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        b"\x02" + b'{"alg":"none"}' + b"\xff" + claims + b"\xff",
        b"\x03" + claims,
        b"\x83" + claims.replace(b"read:users", b"read:userz"),
        b"\x04" + target.header(),
        b"\x44" + target.header(target.ec_kid),
        b"\x05\x10",
        b"\x05\x30.",
    ]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif choice == 2 and buf:
            del buf[rng.randrange(len(buf))]
        elif choice == 3:
            interesting = [b'"', b"{", b"}", b"[", b"]", b",", b".", b"null", b"1e999", b"-0",
                           b'"exp":', b'"aud":[]', b"\\u0000", b"\xff", b"=", b"true"]  # fmt: skip
            position = rng.randrange(len(buf) + 1)
            buf[position:position] = rng.choice(interesting)
        elif choice == 4 and len(buf) > 2:
            start = rng.randrange(len(buf))
            buf[start:start] = buf[start : start + rng.randint(1, 32)]
    return bytes(buf)


def run_builtin(max_total_time: float, runs: int | None, seed: int = 0) -> int:
    """Mutation fuzzing without atheris; returns the number of inputs tried."""
    rng = random.Random(seed)  # noqa: S311 - fuzzing, not security
    pool = seeds()
    deadline = time.monotonic() + max_total_time
    count = 0
    while time.monotonic() < deadline and (runs is None or count < runs):
        data = _mutate(rng.choice(pool), rng)
        test_one_input(data)
        if rng.random() < 0.05 and len(pool) < 512:
            pool.append(data)
        count += 1
    return count


def _option(name: str, cast: Callable[[str], Any], default: Any) -> Any:
    for arg in sys.argv:
        if arg.startswith(f"-{name}="):
            return cast(arg.split("=", 1)[1])
    return default


def main() -> None:
    if atheris is None or "--no-atheris" in sys.argv:
        seconds = _option("max_total_time", float, 60.0)
        runs = _option("runs", int, None)
        count = run_builtin(seconds, runs)
        sys.stdout.write(f"built-in mutator: {count} inputs, no finding\n")
        return
    argv = [arg for arg in sys.argv if arg != "--no-atheris"]
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not corpora:  # start from the seeds rather than from nothing
        corpora = [tempfile.mkdtemp(prefix="fuzz_verify_")]
        argv.append(corpora[0])
    for directory in map(Path, corpora):
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            for index, seed in enumerate(seeds()):
                (directory / f"seed-{index}").write_bytes(seed)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
