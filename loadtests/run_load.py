"""Load test: gunicorn workers under a mixed load while keys rotate and Redis restarts.

What runs, all on 127.0.0.1:

* a real issuer (:class:`~flask_oauth_verify.testing.TokenIssuer` served by
  an :class:`~flask_oauth_verify.testing.IssuerServer`) publishing its JWK Set;
* a private ``redis-server`` shared by the workers (Flask-Caching);
* ``loadtests/app.py`` under gunicorn (``gthread``: several workers, several
  threads each);
* ``wrk`` with ``loadtests/mix.lua`` (or, without wrk, a bounded Python
  client) sending a mix of valid tokens, tokens without the scope, and
  invalid or malformed ones, every request labelled with the status it must
  get;
* a chaos schedule: a new signing key is published, used, and the old one
  retired, again and again; Redis is stopped and restarted.

Figures printed at the end: requests, throughput, latency, 5xx count, valid
tokens refused after warm-up, any other mismatch, and each worker's resident
memory at the start and end of the run. The exit status is 1 when there was
a 5xx, a refused valid token, a mismatch, or a worker's memory grew by more
than ``--max-rss-growth-mb``.

Run it (about a minute)::

    .venv/bin/python loadtests/run_load.py --duration 60

Not part of the pytest suite: it is too slow, and its figures depend on the
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask_oauth_verify.testing import IssuerServer, TokenIssuer, b64url  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)  # polling a process start-up
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Redis:
    """A private redis-server that the chaos schedule stops and starts."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class TokenMix:
    """Writes the labelled request mix that wrk (or the Python client) sends."""

    def __init__(self, issuer: TokenIssuer, path: Path, forged_kids: int = 20) -> None:
        self.issuer = issuer
        self.path = path
        self.forged_kids = forged_kids
        self.lock = threading.Lock()

    def lines(self) -> list[tuple[str, str]]:
        issuer = self.issuer
        valid = [
            issuer.mint(subject=f"user_{i}", scopes=["read:users"], organization_id="org_1")
            for i in range(6)
        ]
        header, payload, signature = valid[0].split(".")
        tampered = f"{header}.{payload}.{signature[:-8]}AAAAAAAA"
        none = b64url({"alg": "none", "typ": "at+jwt"}) + f".{payload}."
        hs256 = b64url({"alg": "HS256", "kid": issuer.current_kid}) + f".{payload}.{signature[:43]}"
        mix = [("200", f"Bearer {token}") for token in valid]
        mix += [
            ("200", f"bearer {valid[1]}"),
            ("403", "Bearer " + issuer.mint(scopes=["write:users"])),
            ("401", "Bearer " + issuer.mint(scopes=["read:users"], expires_in=-3600)),
            ("401", "Bearer " + issuer.mint(scopes=["read:users"], audience="other-api")),
            ("401", f"Bearer {tampered}"),
            ("401", f"Bearer {none}"),
            ("401", f"Bearer {hs256}"),
            ("401", "Bearer not-a-jwt"),
            # random garbage of 8 KiB, and longer than MAX_TOKEN_BYTES (16 KiB)
            ("401", "Bearer " + secrets.token_urlsafe(6 * 1024)),
            ("401", "Bearer " + secrets.token_urlsafe(13 * 1024)),
            ("401", ""),
            ("401", "Basic dXNlcjpwYXNz"),
            ("400", "Bearer"),
        ]
        # a flood of forged tokens, each with a kid never seen before (until
        # the next rewrite): must cost no key fetch per request
        mix += [
            (
                "401",
                "Bearer "
                + issuer.mint(
                    scopes=["read:users"], headers={"kid": f"unknown-{uuid.uuid4().hex[:8]}"}
                ),
            )
            for _ in range(self.forged_kids)
        ]
        return mix

    def write(self) -> None:
        with self.lock:
            text = "".join(f"{expect}\t{value}\n" for expect, value in self.lines())
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.replace(self.path)  # atomic: readers see old or new

    def read(self) -> list[tuple[str, str]]:
        result = []
        for line in self.path.read_text().splitlines():
            expect, _, value = line.partition("\t")
            result.append((expect, value))
        return result


@dataclasses.dataclass
class Chaos:
    """Key rotations (publish, use, retire) and Redis restarts on a schedule."""

    issuer: TokenIssuer
    mix: TokenMix
    redis: Redis
    rotate_every: float
    publish_lead: float
    retire_after: float
    redis_every: float
    redis_down: float
    rotations: int = 0
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    log: list[str] = dataclasses.field(default_factory=list)

    def start(self) -> list[threading.Thread]:
        """Run the three schedules (rotation, Redis, fresh tokens) independently."""
        loops = [
            (self.rotate_every, self._rotate),
            (self.redis_every, self._restart_redis),
            (5.0, self.mix.write),  # fresh unknown kids, fresh tokens
        ]
        threads = [
            threading.Thread(target=self._every, args=(period, action), daemon=True)
            for period, action in loops
        ]
        for thread in threads:
            thread.start()
        return threads

    def _every(self, period: float, action: Callable[[], None]) -> None:
        while not self.stop.wait(period):
            action()

    def _note(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _rotate(self) -> None:
        old = self.issuer.current_kid
        new = self.issuer.add_key("RS256")  # published now, used later (RFC 7517 practice)
        self._note(f"published {new}")
        if self.stop.wait(self.publish_lead):
            return
        self.issuer.current_kid = new
        self.mix.write()
        self._note(f"signing with {new}")
        if self.stop.wait(self.retire_after):
            return
        self.issuer.remove_key(old)
        self.rotations += 1
        self._note(f"retired {old}")

    def _restart_redis(self) -> None:
        self.redis.stop()
        self._note("redis stopped")
        self.stop.wait(self.redis_down)
        self.redis.start()
        self.redis.restarts += 1
        self._note("redis started")


def worker_pids(master: int) -> list[int]:
    path = Path(f"/proc/{master}/task/{master}/children")
    with contextlib.suppress(OSError):
        return [int(pid) for pid in path.read_text().split()]
    return []


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class MemorySampler(threading.Thread):
    """Samples each worker's resident memory every second."""

    def __init__(self, master: int) -> None:
        super().__init__(daemon=True)
        self.master = master
        self.samples: dict[int, list[int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for pid in worker_pids(self.master):
                self.samples.setdefault(pid, []).append(rss_kb(pid))


@contextlib.contextmanager
def gunicorn(port: int, env: dict[str, str], args: argparse.Namespace, log: Path) -> Iterator[int]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        str(args.workers),
        "-k",
        args.worker_class,
        "--threads",
        # gunicorn turns a sync worker with threads into gthread
        str(args.threads if args.worker_class == "gthread" else 1),
        "-b",
        f"127.0.0.1:{port}",
        "--pythonpath",
        str(ROOT),
        "--timeout",
        "30",
        # gunicorn answers a header line over 8190 bytes itself (431, without
        # X-Expect): let the oversized tokens of the mix reach the extension
        "--limit-request-field_size",
        "32768",
        "--log-level",
        "warning",
        "loadtests.app:create_app()",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)  # noqa: S603
        try:
            wait_for_port(port)
            deadline = time.monotonic() + 20
            while len(worker_pids(process.pid)) < args.workers and time.monotonic() < deadline:
                time.sleep(0.1)  # polling the workers' start-up
            yield process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def one_request(port: int, expect: str, value: str, timeout: float = 30.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"X-Expect": expect}
    if value:
        headers["Authorization"] = value
    try:
        connection.request("GET", "/api/protected", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def wait_ready(port: int, workers: int, timeout: float = 120.0) -> None:
    """Until every worker has imported the app and answers (the boot is slow
    on a busy machine: each worker imports Flask, cryptography, joserfc)."""
    deadline = time.monotonic() + timeout
    answered = 0
    while answered < 4 * workers:
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not become ready")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if one_request(port, "401", "", timeout=timeout) == 401:
                answered += 1


def warm_up(port: int, mix: TokenMix, rounds: int) -> Counter[str]:
    """Every line of the mix, several times, on fresh connections (all workers)."""
    problems: Counter[str] = Counter()
    for _ in range(rounds):
        for expect, value in mix.read():
            status = one_request(port, expect, value)
            if str(status) != expect:
                problems[f"expected {expect}, got {status}"] += 1
    return problems


def run_wrk(port: int, args: argparse.Namespace, tokens: Path) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(ROOT / "loadtests" / "mix.lua"),
        f"http://127.0.0.1:{port}",
    ]
    env = {**os.environ, "LOAD_TOKENS": str(tokens)}
    done = subprocess.run(  # noqa: S603
        command, env=env, capture_output=True, text=True, timeout=args.duration + 60, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["tool"] = "wrk"
    return result


def run_python_client(port: int, args: argparse.Namespace, mix: TokenMix) -> dict[str, Any]:
    """A bounded load generator for machines without wrk."""
    deadline = time.monotonic() + args.duration
    counts: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        items = mix.read()
        local: Counter[str] = Counter()
        local_latencies: list[float] = []
        sent = 0
        while time.monotonic() < deadline and sent < args.max_requests // args.connections:
            if sent % 200 == 0:
                items = mix.read()
            expect, value = items[(sent + index) % len(items)]
            headers = {"X-Expect": expect}
            if value:
                headers["Authorization"] = value
            started = time.monotonic()
            try:
                connection.request("GET", "/api/protected", headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                local["socket_errors"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            local_latencies.append(time.monotonic() - started)
            local["responses"] += 1
            if status >= 500:
                local["server_errors"] += 1
            if str(status) != expect:
                local["mismatches"] += 1
                if expect == "200":
                    local["valid_refused"] += 1
            sent += 1
        with lock:
            counts.update(local)
            latencies.extend(local_latencies)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()

    def percentile(p: float) -> int:
        return int(latencies[int(p * (len(latencies) - 1))] * 1e6) if latencies else 0

    return {
        "tool": "python",
        "requests": counts["responses"],
        "duration_us": int((time.monotonic() - started) * 1e6),
        "socket_errors": counts["socket_errors"],
        "responses": counts["responses"],
        "mismatches": counts["mismatches"],
        "valid_refused": counts["valid_refused"],
        "server_errors": counts["server_errors"],
        "unmatched": 0,
        "latency_p50_us": percentile(0.50),
        "latency_p99_us": percentile(0.99),
        "latency_max_us": percentile(1.0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (gthread)")
    parser.add_argument("--worker-class", choices=["gthread", "sync"], default="gthread")
    parser.add_argument(
        "--forged-kids", type=int, default=20, help="forged unknown-kid tokens in the mix"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument(
        "--max-requests", type=int, default=2_000_000, help="cap for the Python client"
    )
    parser.add_argument("--rotate-every", type=float, default=20.0)
    parser.add_argument("--redis-every", type=float, default=15.0)
    parser.add_argument("--redis-down", type=float, default=3.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="oauth_verify_load_") as tmp:
        directory = Path(tmp)
        redis = Redis(directory)
        redis.start()
        server = IssuerServer()
        issuer = TokenIssuer(audience="api")
        issuer.serve(server)
        mix = TokenMix(issuer, directory / "tokens.txt", args.forged_kids)
        mix.write()
        port = free_port()
        env = {
            **os.environ,
            "LOAD_ISSUER": issuer.issuer,
            "LOAD_JWKS_URI": f"{server.url}/jwks",
            "LOAD_REDIS_URL": redis.url,
        }
        chaos = Chaos(
            issuer,
            mix,
            redis,
            rotate_every=args.rotate_every,
            publish_lead=8.0,
            retire_after=6.0,
            redis_every=args.redis_every,
            redis_down=args.redis_down,
        )
        log = directory / "gunicorn.log"
        try:
            with gunicorn(port, env, args, log) as master:
                wait_ready(port, args.workers)
                warm = warm_up(port, mix, rounds=4)
                sampler = MemorySampler(master)
                start_rss = {pid: rss_kb(pid) for pid in worker_pids(master)}
                sampler.start()
                chaos_threads = chaos.start()
                use_wrk = shutil.which("wrk") is not None and not args.python_client
                if use_wrk:
                    result = run_wrk(port, args, directory / "tokens.txt")
                else:
                    result = run_python_client(port, args, mix)
                chaos.stop.set()
                for thread in chaos_threads:
                    thread.join(timeout=30)
                sampler.stop.set()
                sampler.join(timeout=5)
                end_rss = {pid: rss_kb(pid) for pid in worker_pids(master)}
                jwks_fetches = server.hits["/jwks"]
        finally:
            chaos.stop.set()
            server.close()
            redis.stop()
        report = build_report(
            result,
            warm,
            start_rss,
            end_rss,
            sampler.samples,
            chaos,
            redis.restarts,
            jwks_fetches,
            args,
        )
        print_report(report, chaos.log)
        if not report["passed"]:
            sys.stdout.write("--- gunicorn log (tail) ---\n")
            sys.stdout.write("\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")
        return 0 if report["passed"] else 1


def build_report(
    result: dict[str, Any],
    warm: Counter[str],
    start_rss: dict[int, int],
    end_rss: dict[int, int],
    samples: dict[int, list[int]],
    chaos: Chaos,
    redis_restarts: int,
    jwks_fetches: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    seconds = result["duration_us"] / 1e6 or 1.0
    workers = []
    for pid, start in sorted(start_rss.items()):
        end = end_rss.get(pid, 0)
        peak = max([*samples.get(pid, [start]), start, end])
        workers.append(
            {
                "pid": pid,
                "start_mb": start / 1024,
                "end_mb": end / 1024,
                "peak_mb": peak / 1024,
                "growth_mb": (end - start) / 1024,
            }
        )
    replaced = sorted(set(end_rss) - set(start_rss))
    growth_ok = all(w["growth_mb"] <= args.max_rss_growth_mb for w in workers) and not replaced
    passed = (
        result["server_errors"] == 0
        and result["valid_refused"] == 0
        and result["mismatches"] == 0
        and result["unmatched"] == 0
        and result["socket_errors"] == 0
        and not warm
        and growth_ok
    )
    return {
        **result,
        "requests_per_second": result["requests"] / seconds,
        "warm_up_problems": dict(warm),
        "workers": workers,
        "workers_replaced": replaced,
        "key_rotations": chaos.rotations,
        "redis_restarts": redis_restarts,
        "jwks_fetches": jwks_fetches,
        "passed": passed,
    }


def print_report(report: dict[str, Any], events: list[str]) -> None:
    out = sys.stdout
    out.write("=== load test ===\n")
    out.write(f"generator            {report['tool']}\n")
    out.write(
        f"requests             {report['requests']} in {report['duration_us'] / 1e6:.1f} s "
        f"({report['requests_per_second']:.0f}/s)\n"
    )
    out.write(
        f"latency p50/p99/max  {report['latency_p50_us'] / 1000:.1f} / "
        f"{report['latency_p99_us'] / 1000:.1f} / {report['latency_max_us'] / 1000:.1f} ms\n"
    )
    out.write(f"5xx responses        {report['server_errors']}\n")
    out.write(f"valid tokens refused {report['valid_refused']}\n")
    out.write(f"other mismatches     {report['mismatches'] - report['valid_refused']}\n")
    out.write(f"socket errors        {report['socket_errors']}\n")
    out.write(f"warm-up problems     {report['warm_up_problems'] or 'none'}\n")
    out.write(
        f"key rotations        {report['key_rotations']} (JWKS fetched "
        f"{report['jwks_fetches']} times)\n"
    )
    out.write(f"redis restarts       {report['redis_restarts']}\n")
    for worker in report["workers"]:
        out.write(
            f"worker {worker['pid']:>7}       RSS {worker['start_mb']:.1f} -> "
            f"{worker['end_mb']:.1f} MB (peak {worker['peak_mb']:.1f}, "
            f"growth {worker['growth_mb']:+.1f})\n"
        )
    if report["workers_replaced"]:
        out.write(f"workers replaced     {report['workers_replaced']}\n")
    out.write("chaos                " + "; ".join(events) + "\n")
    out.write(f"result               {'PASS' if report['passed'] else 'FAIL'}\n")
    out.write(json.dumps({k: v for k, v in report.items() if k != "workers"}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
