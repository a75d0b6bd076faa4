"""Instructions per request, counted by valgrind: the same comparison without the noise.

``bench_verify.py`` measures time, which on a shared machine drifts by tens
of percent between runs. This script runs each variant of the same route in
its own process under ``valgrind --tool=callgrind`` and counts the machine
instructions of ``--requests`` requests through Flask's test client (only
the measured loop is counted: ``--toggle-collect`` on the ``functools.reduce``
call that drives it), with ``PYTHONHASHSEED=0``. Whole-request counts repeat
to within about 1 % from run to run.

Printed per variant: instructions per request minus the unprotected route's,
and that as a multiple of one raw ``cryptography`` signature verify counted
the same way. Instructions are not time: a request that touches more
distinct code and data waits longer for memory after Flask has cooled the
CPU caches, which ``bench_verify.py`` shows and this does not.

Run: ``.venv/bin/python benchmarks/bench_instructions.py`` (needs
``valgrind``; ``--help`` for options). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: variant -> (label, what a request sends: "fresh" tokens or one "repeated" token)
VARIANTS: dict[str, tuple[str, str]] = {
    "open": ("unprotected route (the baseline)", "repeated"),
    "raw": ("raw: one signature verify (no request)", "fresh"),
    "floor": ("floor as a decorator, in the request", "fresh"),
    "ours-fresh": ("ours, first-seen token", "fresh"),
    "ours-hit": ("ours, repeated token (cache hit)", "repeated"),
    "pyjwt": ("PyJWT decorator", "fresh"),
    "minimal": ("minimal cached decorator, hit", "repeated"),
    "authlib": ("Authlib ResourceProtector", "fresh"),
}
WARMUP = 30


def child(variant: str, alg: str, requests: int) -> None:
    """Build one variant, warm it up, then run the counted loop."""
    sys.path.insert(0, str(HERE))
    import bench_verify as bench

    from flask_oauth_verify.testing import IssuerServer, TokenIssuer

    server = IssuerServer()
    try:
        issuer = TokenIssuer(alg=alg, audience=bench.AUDIENCE)
        issuer.serve(server)
        tokens = bench.mint_many(issuer, WARMUP + requests)
        if VARIANTS[variant][1] == "repeated":
            tokens = [tokens[0]] * len(tokens)
        step = _step(bench, variant, issuer, alg, tokens)
        for index in range(WARMUP):
            step(index)
        loop = functools.partial(_run, step, range(WARMUP, WARMUP + requests))
        # Start the count from empty collector generations: where the
        # set-up left the collector's counters decided which collections
        # fell inside the loop (±20 k instructions per first-seen request).
        gc.collect()
        functools.reduce(lambda _a, _b: loop(), [0, 1])  # only this call is counted
    finally:
        server.close()


def _run(step: Callable[[int], None], indexes: range) -> None:
    for index in indexes:
        step(index)


def _step(bench: Any, variant: str, issuer: Any, alg: str, tokens: list[str]) -> Any:
    """One counted unit of ``variant``: a request, or one raw verify."""
    if variant == "raw":
        verify = bench.raw_verifier(issuer, alg)
        signed = []
        for token in tokens:
            header, payload, signature = token.split(".")
            raw_signature = bench.b64url_decode(signature)
            signed.append((f"{header}.{payload}".encode(), bench.jws_signature(alg, raw_signature)))
        return lambda index: verify(*signed[index])
    builders = {
        "open": bench.unprotected_app,
        "floor": lambda: bench.floor_app(issuer, alg),
        "ours-fresh": lambda: bench.ours_app(bench.ours_config(issuer, alg)),
        "ours-hit": lambda: bench.ours_app(bench.ours_config(issuer, alg)),
        "pyjwt": lambda: bench.pyjwt_app(issuer, alg),
        "minimal": lambda: bench.minimal_cached_app(issuer, alg),
        "authlib": lambda: bench.authlib_app(issuer, alg),
    }
    client = builders[variant]().test_client()
    headers = [bench.bearer(token) for token in tokens]

    def request(index: int) -> None:
        response = client.get(bench.ROUTE, headers=headers[index])
        if response.status_code != 200:
            raise SystemExit(f"{variant} answered {response.status_code}: {response.data[:200]!r}")

    return request


def count(variant: str, alg: str, requests: int, valgrind: str) -> float:
    """Instructions per counted unit of ``variant`` (a child under callgrind)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/callgrind.out",
            "--toggle-collect=functools_reduce",
            sys.executable,
            __file__,
            "--child",
            variant,
            "--alg",
            alg,
            "--requests",
            str(requests),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{variant}: valgrind failed\n{done.stdout}\n{done.stderr[-2000:]}")
    return int(found.group(1)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alg", default="RS256", choices=["RS256", "PS256", "ES256", "EdDSA"])
    parser.add_argument("--requests", type=int, default=100, help="counted requests per variant")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="variants counted at once"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.alg, args.requests)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind).")
    chosen = [name for name in args.variants.split(",") if name]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    names = sorted({"open", "raw", *chosen})
    # Counting instructions is not disturbed by other processes: run in parallel.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        found = pool.map(lambda name: count(name, args.alg, args.requests, valgrind), names)
        counts = dict(zip(names, found, strict=True))
    raw = counts["raw"]
    print(f"{args.alg}: instructions per request, {args.requests} requests per variant")
    print(f"  (x raw = multiple of one raw verify: {raw / 1000:.1f} k instructions)")
    width = max(len(VARIANTS[name][0]) for name in chosen) + 2
    print(f"  {'added to one Flask request':<{width}}{'k instr':>10}{'x raw':>8}")
    for name in chosen:
        label = VARIANTS[name][0]
        if name == "open":
            print(f"  {label:<{width}}{counts['open'] / 1000:>10.1f}{'':>8}  (the whole request)")
            continue
        added = counts[name] if name == "raw" else counts[name] - counts["open"]
        print(f"  {label:<{width}}{added / 1000:>10.1f}{added / raw:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
