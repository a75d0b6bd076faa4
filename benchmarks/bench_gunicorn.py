"""Requests per second under gunicorn (2 sync workers) on 127.0.0.1.

Serves ``gunicorn_app.py`` (one route: unprotected, this package, the
raw-crypto floor, a PyJWT decorator, Authlib, a minimal cached decorator) and
drives it with ``wrk`` (``apt-get install -y wrk``) or, when wrk is missing,
a bounded Python load generator. Every run is
bounded in time (``--duration``, whole seconds with wrk) and count (the
fresh-token pool, by default ``TOKENS_PER_SECOND`` per second of
``--duration``: wrk divides by the whole duration, so a wrk run that uses its
pool up is refused; the Python load generator stops and divides by the time
it ran). An algorithm Authlib's validator refuses leaves Authlib out.
Scenarios are interleaved over ``--rounds``; the table shows the median
requests/s of each and the median over rounds of its ratio to the
unprotected route sent the same requests in the same round (and the range of
those ratios):

* ``unprotected``            - ``/open``, sent the same requests as the
  protected routes (fresh tokens, or the one repeated token; ignored): the
  baselines of the ratios, so that a ratio shows what verifying costs rather
  than what carrying a ~0.7 KB header costs;
* ``unprotected, no Authorization header`` - ``/open`` without a token
  (shown against the fresh-token baseline);
* ``ours, fresh tokens``     - ``/ours``, a token never seen before on every request;
* ``ours, repeated token``   - ``/ours``, one token again and again (cache hits);
* ``floor as a decorator``   - ``/floor`` with fresh tokens: base64url + JSON +
  one signature verify and no check at all, the least any verifier costs
  (the reference for the fresh-token goal);
* ``PyJWT decorator``        - ``/pyjwt`` with fresh tokens;
* ``minimal cached decorator`` - ``/minimal``, one token again and again (the
  reference for the repeated-token goal);
* ``Authlib``                - ``/authlib`` with fresh tokens.

Run: ``.venv/bin/python benchmarks/bench_gunicorn.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from flask_oauth_verify.testing import TokenIssuer  # noqa: E402

AUDIENCE = "api.example.test"
ISSUER = "https://issuer.example.test"
#: Default fresh tokens per second of a run: above any rate seen on 2 cores
#: (a run that uses its pool up before the end has no true wrk rate).
TOKENS_PER_SECOND = 6000

WRK_SCRIPT = r"""
local tokens = {}
local fixed = nil
local path = "/"
local i = 0
exhausted = false  -- a global: done() reads it through thread:get()

function init(args)
  path = args[1]
  if args[2] == "fixed" then
    fixed = args[3]
  elseif args[2] == "file" then
    for line in io.lines(args[3]) do tokens[#tokens + 1] = line end
  end
end

function request()
  if #tokens > 0 then
    i = i + 1
    if i >= #tokens then
      i = #tokens
      exhausted = true
    end
    return wrk.format("GET", path, {["Authorization"] = "Bearer " .. tokens[i]})
  elseif fixed then
    return wrk.format("GET", path, {["Authorization"] = "Bearer " .. fixed})
  end
  return wrk.format("GET", path)
end

function response(status, headers, body)
  if exhausted then wrk.thread:stop() end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    if thread:get("exhausted") then print("token pool used up") end
  end
end
"""


# -- tokens -------------------------------------------------------------------


def _mint_chunk(args: tuple[dict[str, Any], str, str, int]) -> list[str]:
    from joserfc import jwt
    from joserfc.jwk import JWKRegistry

    private, alg, kid, count = args
    key = JWKRegistry.import_key(private)
    header = {"alg": alg, "kid": kid, "typ": "at+jwt"}
    tokens = []
    for _ in range(count):
        tokens.append(jwt.encode(header, _sample_claims(), key, algorithms=[alg]))
    return tokens


def mint(issuer: TokenIssuer, alg: str, count: int) -> list[str]:
    """``count`` distinct tokens, signed in parallel (RSA signing is slow)."""
    private = issuer.key().as_dict(private=True)
    procs = os.cpu_count() or 1
    chunks = [(private, alg, issuer.current_kid, count // procs + 1) for _ in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        tokens = [t for chunk in pool.map(_mint_chunk, chunks) for t in chunk]
    return tokens[:count]


# -- gunicorn -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gunicorn(config_path: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    env = {**os.environ, "BENCH_CONFIG": str(config_path)}
    process = subprocess.Popen(
        [
            str(gunicorn),
            "--workers", str(workers),
            "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}",
            "--chdir", str(HERE),
            "--log-level", "warning",
            "gunicorn_app:create_app()",
        ],
        env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if get(port, "/open", None) == 200:
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("gunicorn did not start within 30 s")


def get(port: int, path: str, token: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# -- load generators ----------------------------------------------------------------


def run_wrk(
    port: int, path: str, tokens: list[str] | None, fixed: str | None, args: argparse.Namespace
) -> tuple[float, int, int]:
    """(requests/s, requests, non-2xx) of one bounded wrk run.

    wrk divides by the whole ``--duration`` even when the script stopped it
    early, so a run whose token pool ran out has no true rate: it is refused.
    """
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "bench.lua")
        script.write_text(WRK_SCRIPT)
        extra = ["none"]
        if tokens is not None:
            token_file = Path(tmp, "tokens.txt")
            token_file.write_text("\n".join(tokens) + "\n")
            extra = ["file", str(token_file)]
        elif fixed is not None:
            extra = ["fixed", fixed]
        command = [
            "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration:.0f}s", "--timeout", "10s",
            "-s", str(script), f"http://127.0.0.1:{port}{path}", "--", path, *extra,
        ]  # fmt: skip
        out = subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=args.duration + 60
        ).stdout
    if "token pool used up" in out:
        raise SystemExit(
            f"{path}: the pool of {len(tokens or [])} fresh tokens ran out before "
            f"{args.duration} s, so wrk's rate would be capped at tokens / duration; "
            "rerun with a larger --tokens"
        )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        print(f"    wrk: {errors.group(0)}")
    return rps, total, int(bad.group(1)) if bad else 0


def run_python(
    port: int, path: str, tokens: list[str] | None, fixed: str | None, args: argparse.Namespace
) -> tuple[float, int, int]:
    """A bounded stand-in for wrk: ``connections`` threads, one request each at a time."""
    lock = threading.Lock()
    pool = iter(tokens) if tokens is not None else None
    counts = {"done": 0, "bad": 0}
    deadline = time.monotonic() + args.duration

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                token = next(pool, None) if pool is not None else fixed
            if pool is not None and token is None:
                return
            status = get(port, path, token)
            with lock:
                counts["done"] += 1
                counts["bad"] += status != 200

    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return counts["done"] / elapsed, counts["done"], counts["bad"]


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alg", default="RS256", choices=["RS256", "PS256", "ES256", "EdDSA"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"fresh tokens per run (default: {TOKENS_PER_SECOND} per s of --duration)",
    )
    parser.add_argument("--load", choices=["auto", "wrk", "python"], default="auto")
    args = parser.parse_args(argv)
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk") is not None)
    load = run_wrk if use_wrk else run_python
    if use_wrk:
        args.duration = float(max(1, round(args.duration)))  # wrk runs whole seconds
    if args.tokens is None:
        args.tokens = math.ceil(args.duration * TOKENS_PER_SECOND)

    issuer = TokenIssuer(ISSUER, alg=args.alg, audience=AUDIENCE)
    print(f"minting {args.tokens * args.rounds} fresh {args.alg} tokens ...", flush=True)
    fresh = mint(issuer, args.alg, args.tokens * args.rounds)
    shared = fresh[: args.tokens]  # PyJWT and Authlib cache nothing: reuse is fair
    repeated = issuer.mint(claims=json.loads(json.dumps(_sample_claims())))
    scenarios: dict[str, tuple[str, list[str] | None, str | None]] = {
        # The baselines get the same requests as the protected routes (a
        # bearer token they ignore): the ratios show what verifying costs,
        # not what sending and parsing a ~0.7 KB header costs.
        "unprotected, fresh tokens": ("/open", shared, None),
        "unprotected, repeated token": ("/open", None, repeated),
        "unprotected, no Authorization header": ("/open", None, None),
        "ours, fresh tokens": ("/ours", None, None),  # a new slice per round
        "ours, repeated token": ("/ours", None, repeated),
        "floor as a decorator, fresh tokens": ("/floor", shared, None),
        "PyJWT decorator, fresh tokens": ("/pyjwt", shared, None),
        "minimal cached decorator, repeated token": ("/minimal", None, repeated),
        "Authlib, fresh tokens": ("/authlib", shared, None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp, "config.json")
        config_path.write_text(
            json.dumps(
                {"issuer": ISSUER, "audience": AUDIENCE, "alg": args.alg, "jwks": issuer.jwks()}
            )
        )
        port = free_port()
        server = start_gunicorn(config_path, port, args.workers)
        try:
            for path in ("/open", "/ours", "/floor", "/pyjwt", "/authlib", "/minimal"):
                for _ in range(4):  # every worker imports and warms up
                    status = get(port, path, None if path == "/open" else repeated)
                    if path == "/authlib" and status == 401:
                        # Its validator takes only joserfc's recommended algorithms.
                        print(f"  Authlib's JWTBearerTokenValidator refuses {args.alg}: not run")
                        del scenarios["Authlib, fresh tokens"]
                        break
                    if status != 200:
                        raise SystemExit(f"{path} answered {status} during warm-up")
            results: dict[str, list[float]] = {name: [] for name in scenarios}
            rng = random.Random(5)
            for round_index in range(args.rounds):
                order = list(scenarios)
                rng.shuffle(order)
                for name in order:
                    path, tokens, fixed = scenarios[name]
                    if name == "ours, fresh tokens":
                        start = round_index * args.tokens
                        tokens = fresh[start : start + args.tokens]
                    rps, total, bad = load(port, path, tokens, fixed, args)
                    # Only the Python load generator gets here with its pool used up.
                    used_up = tokens is not None and total >= len(tokens)
                    note = "  (token pool used up: stopped early)" if used_up else ""
                    print(f"  round {round_index + 1}: {name:42s} {rps:8.1f} req/s "
                          f"({total} requests, {bad} non-200){note}", flush=True)  # fmt: skip
                    if bad:
                        raise SystemExit(f"{name}: {bad} requests were refused")
                    results[name].append(rps)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    print(
        f"\ngunicorn, {args.workers} sync workers, {args.alg}, load: "
        f"{'wrk -t1 -c' + str(args.connections) if use_wrk else 'python threads'}, "
        f"{args.rounds} rounds of {args.duration} s"
    )
    print("  ratio: median over rounds of (route / the unprotected route sent the same")
    print("  requests in the same round: fresh tokens, or the one repeated token)")
    print(f"  {'route':44s}{'median req/s':>14}{'ratio':>8}{'range':>14}")
    for name, values in results.items():
        base = results[_baseline(name, scenarios[name][2])]
        ratios = [value / same_round for value, same_round in zip(values, base, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"  {name:44s}{statistics.median(values):>14.1f}"
            f"{statistics.median(ratios):>8.2f}{spread:>14}"
        )
    return 0


def _baseline(name: str, fixed: str | None) -> str:
    """The unprotected scenario that got the same requests as ``name``."""
    if fixed is not None:
        return "unprotected, repeated token"
    return "unprotected, fresh tokens"


def _sample_claims() -> dict[str, Any]:
    """Typical access-token claims, a new ``jti`` each call."""
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user_1",
        "client_id": "client-1",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
        "scope": "read:users write:users",
        "oid": "org_42",
    }


if __name__ == "__main__":
    raise SystemExit(main())
