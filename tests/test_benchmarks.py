"""The benchmark scripts still run: every variant answers 200 and gets its row.

A smoke test, not a measurement: a handful of rounds, so the figures mean
nothing and are not checked beyond being numbers. It fails when a script
crashes, when a benchmarked route refuses its token (both scripts stop with
an error then), or when a row of the table goes missing.
(``bench_instructions.py`` needs valgrind and is not run here.)
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(  # noqa: S603 (our own scripts, fixed arguments)
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def _figures(output: str, label: str) -> tuple[float, ...]:
    """The numbers printed after ``label`` at the start of a table row."""
    match = re.search(rf"^\s+{re.escape(label)}\s+(-?[\d.]+)\s+(-?[\d.]+)", output, re.MULTILINE)
    assert match is not None, f"no row {label!r} in:\n{output}"
    figures = tuple(float(value) for value in match.groups())
    assert all(math.isfinite(value) for value in figures), (label, figures)
    return figures


def test_bench_verify_tables() -> None:
    output = _run(
        "bench_verify.py",
        "--rounds=3",
        "--algorithms=ES256",
        "--sections=algorithms,introspection-own,introspection,memory",
        "--memory-tokens=50",
    )
    for label in (
        "raw: one signature verify",
        "floor: base64url + JSON + one verify",
        "floor as a decorator, in the request",
        "ours, first-seen token",
        "ours, repeated token (cache hit)",
        "PyJWT decorator",
        "minimal cached decorator, hit",
        "Authlib ResourceProtector",
        "introspection miss, answer without HTTP",
        "introspection, cache miss",
        "introspection, cache hit",
        "JWT, verified-token cache hit",
    ):
        _figures(output, label)
    assert _figures(output, "raw: one signature verify")[1] == 1.0
    assert re.search(r"per 10,000 cached tokens RSS \+[\d.]+ MiB", output)
    assert re.search(r"parsed key set of 100 RSA-2048 key\(s\): RSS \+\d+ KiB", output)


def test_bench_verify_without_competitors() -> None:
    output = _run(
        "bench_verify.py",
        "--rounds=3",
        "--algorithms=RS256",
        "--sections=algorithms",
        "--no-competitors",
    )
    _figures(output, "ours, first-seen token")
    _figures(output, "floor as a decorator, in the request")
    for absent in ("PyJWT", "Authlib", "minimal cached decorator"):
        assert absent not in output, output


def test_bench_verify_gives_authlib_a_row_or_says_why_not() -> None:
    """Authlib's validator takes EdDSA in some versions and refuses it in
    others (joserfc's recommended set): a row with figures, or the reason."""
    output = _run("bench_verify.py", "--rounds=3", "--algorithms=EdDSA", "--sections=algorithms")
    _figures(output, "PyJWT decorator")
    if "Authlib JWTBearerTokenValidator refuses EdDSA" not in output:
        _figures(output, "Authlib ResourceProtector")


def test_bench_verify_scaling_table() -> None:
    output = _run("bench_verify.py", "--rounds=3", "--sections=scaling")
    for label in (
        "1 key, 1 issuer: first-seen",
        "100 keys: repeated",
        "10 issuers: first-seen",
        "token cache full: first-seen",
    ):
        _figures(output, label)
    assert re.search(r"^\s+\d+-byte token: first-seen\s+[\d.]+", output, re.MULTILINE)


@pytest.mark.parametrize("alg", ["RS256", "EdDSA"])
def test_bench_gunicorn_table(alg: str) -> None:
    output = _run(
        "bench_gunicorn.py",
        f"--alg={alg}",
        "--load=python",
        "--duration=0.4",
        "--rounds=1",
        "--tokens=600",
    )
    for label in (
        "unprotected, fresh tokens",
        "ours, fresh tokens",
        "ours, repeated token",
        "floor as a decorator, fresh tokens",
        "PyJWT decorator, fresh tokens",
        "minimal cached decorator, repeated token",
    ):
        requests_per_second, _ratio = _figures(output, label)
        assert requests_per_second > 0
    # Authlib 1.9's validator refuses EdDSA (not in joserfc's recommended
    # algorithms); 1.6 takes it. Either way the script says which it did.
    if f"refuses {alg}: not run" in output:
        assert alg == "EdDSA"
        assert "Authlib, fresh tokens" not in output.split("gunicorn, 2 sync workers")[1]
    else:
        _figures(output, "Authlib, fresh tokens")
