"""Side-by-side cost of verifying a bearer token in one Flask request.

Builds the same route several ways and runs them interleaved in one
process, through Flask's test client:

* ``unprotected``      - the route alone (the baseline of every pair);
* ``ours, first-seen`` - this package, a token it has never seen;
* ``ours, repeated``   - this package, the same token again (cache hit);
* ``PyJWT decorator``  - a hand-written, tutorial-style PyJWT decorator
  (public key parsed once at start-up);
* ``Authlib``          - ``ResourceProtector`` + ``JWTBearerTokenValidator``
  (``authlib.oauth2.rfc9068``), key set imported per request as its
  ``get_jwks()`` documentation shows;
* ``minimal cached``   - header read, SHA-256, dict lookup, expiry check,
  ``g`` set (the least a per-process cache of verified tokens can cost);
* the raw-crypto floor: one ``cryptography`` signature verify, and
  base64url + JSON + that verify, called directly and as a decorator inside
  a request (no check at all: what any verifier pays in a request).

Each round measures every variant once in a shuffled order; the added cost
of a variant is the median over rounds of (variant - unprotected) in the
same round, and is printed as a multiple of the median raw verify of the
same run. Then: key sets of 1 and 100 keys, 1 and 10 issuers, tokens of
~0.5 KB and ~8 KB; introspection cache hit vs miss against a local server;
resident memory per 10,000 cached tokens and per cached key set.

Run: ``.venv/bin/python benchmarks/bench_verify.py`` (``--help`` for options).
Needs the ``bench`` extra (PyJWT). Nothing here is a test: no assertion on
timings, only figures printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import floor
from flask import Flask, g, jsonify
from flask.testing import FlaskClient
from floor import b64url_decode, floor_verified, jws_signature
from gunicorn_app import authlib_protector, minimal_cached, pyjwt_required

from flask_oauth_verify import OAuthVerify, require_token
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.keys import parse_key_set
from flask_oauth_verify.testing import IssuerServer, TokenIssuer

ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
AUDIENCE = "api.example.test"
ROUTE = "/api/users"

Request = Callable[[int], int]  # round index -> elapsed ns
#: Answers introspected before the own-time section measures: more than
#: every per-process bound (LOCAL_CACHE_SIZE, TOKEN_CACHE_SIZE), so each
#: measured miss also evicts, as in a busy API.
FULL_CACHES = 12_000

#: The clock of every measurement: CPU time of this thread by default, so that
#: other processes on the machine (preemption) do not show up as our cost;
#: ``--clock wall`` switches to ``perf_counter_ns``.
CLOCKS = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}
clock = CLOCKS["cpu"]


# -- timing ------------------------------------------------------------------


def timed_get(client: FlaskClient, headers: dict[str, str] | None) -> int:
    """One request through the test client; elapsed ns (checked 200)."""
    start = clock()
    response = client.get(ROUTE, headers=headers)
    elapsed = clock() - start
    if response.status_code != 200:
        raise SystemExit(
            f"benchmark route answered {response.status_code}: {response.data[:200]!r}"
        )
    return elapsed


@dataclass
class Variant:
    """One way of serving the route: a name and a request function."""

    name: str
    run: Request
    samples: list[int] = field(default_factory=list)
    kind: str = "request"  # "request" (paired with the baseline) or "raw"


def interleave(variants: list[Variant], baseline: Variant, rounds: int, warmup: int = 50) -> None:
    """Run every variant once per round, in a shuffled order."""
    everyone = [baseline, *variants]
    rng = random.Random(1234)
    for index in range(-warmup, rounds):
        order = everyone[:]
        rng.shuffle(order)
        for variant in order:
            elapsed = variant.run(index + warmup)
            if index >= 0:
                variant.samples.append(elapsed)


def added_cost(variant: Variant, baseline: Variant) -> float:
    """Median of paired differences (µs); raw variants are their own median."""
    if variant.kind == "raw":
        return statistics.median(variant.samples) / 1000
    pairs = [v - b for v, b in zip(variant.samples, baseline.samples, strict=True)]
    return statistics.median(pairs) / 1000


# -- the routes ----------------------------------------------------------------


def base_app(name: str) -> Flask:
    app = Flask(name)
    app.config["TESTING"] = True
    return app


def unprotected_app() -> Flask:
    app = base_app("unprotected")

    @app.get(ROUTE)
    def users() -> Any:
        return jsonify(organization_id=None)

    return app


def ours_app(config: dict[str, Any], name: str = "ours") -> Flask:
    app = base_app(name)
    app.config.update(config)
    OAuthVerify(app)

    @app.get(ROUTE)
    @require_token
    def users() -> Any:
        return jsonify(organization_id=g.auth.organization_id)

    with app.app_context():
        get_state(app).keys.prefetch()
    return app


def competitor_config(issuer: TokenIssuer, alg: str) -> dict[str, Any]:
    """What the other verifiers of ``gunicorn_app`` are built from."""
    return {"jwks": issuer.jwks(), "alg": alg, "audience": AUDIENCE, "issuer": issuer.issuer}


def pyjwt_app(issuer: TokenIssuer, alg: str) -> Flask:
    """The tutorial decorator: key parsed once, ``jwt.decode`` per request."""
    app = base_app("pyjwt")
    token_required = pyjwt_required(competitor_config(issuer, alg))

    @app.get(ROUTE)
    @token_required
    def users() -> Any:
        return jsonify(organization_id=g.claims.get("oid"))

    return app


def authlib_app(issuer: TokenIssuer, alg: str) -> Flask:
    """Authlib's documented resource server: the key set imported per request."""
    from authlib.integrations.flask_oauth2 import current_token

    require_oauth = authlib_protector(competitor_config(issuer, alg))
    app = base_app("authlib")

    @app.get(ROUTE)
    @require_oauth()
    def users() -> Any:
        return jsonify(organization_id=current_token.get("oid"))

    return app


def minimal_cached_app(issuer: TokenIssuer, alg: str) -> Flask:
    """The least a cache of verified tokens can do per hit."""
    app = base_app("minimal-cached")
    cached = minimal_cached(competitor_config(issuer, alg))

    @app.get(ROUTE)
    @cached
    def users() -> Any:
        return jsonify(organization_id=g.auth.get("oid"))

    return app


def floor_app(issuer: TokenIssuer, alg: str) -> Flask:
    """The floor as a decorator (:func:`floor.floor_verified`), no check at all."""
    app = base_app("floor")

    @app.get(ROUTE)
    @floor_verified(issuer.key().public_key, alg)
    def users() -> Any:
        return jsonify(organization_id=g.auth.get("oid"))

    return app


# -- the raw-crypto floor --------------------------------------------------------


def raw_verifier(issuer: TokenIssuer, alg: str) -> Callable[[bytes, bytes], None]:
    """One ``cryptography`` verify with the issuer's public key."""
    return floor.raw_verifier(issuer.key().public_key, alg)


def raw_variants(issuer: TokenIssuer, alg: str, token: str) -> tuple[Variant, Variant]:
    verify = raw_verifier(issuer, alg)
    header, payload, signature = token.split(".")
    message = f"{header}.{payload}".encode()
    sig = jws_signature(alg, b64url_decode(signature))

    def one_verify(_index: int) -> int:
        start = clock()
        verify(message, sig)
        return clock() - start

    def parse_and_verify(_index: int) -> int:
        start = clock()
        h, p, s = token.split(".")
        json.loads(b64url_decode(h))
        json.loads(b64url_decode(p))
        verify(f"{h}.{p}".encode(), jws_signature(alg, b64url_decode(s)))
        return clock() - start

    return (
        Variant("raw: one signature verify", one_verify, kind="raw"),
        Variant("floor: base64url + JSON + one verify", parse_and_verify, kind="raw"),
    )


# -- helpers -------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fresh(client: FlaskClient, tokens: list[str]) -> Request:
    """A request with a token this client's app has not seen (one per round)."""
    headers = [bearer(t) for t in tokens]
    return lambda index: timed_get(client, headers[index])


def repeated(client: FlaskClient, token: str) -> Request:
    headers = bearer(token)
    return lambda _index: timed_get(client, headers)


def mint_many(issuer: TokenIssuer, count: int, **claims: Any) -> list[str]:
    return [issuer.mint(**typical_claims(), **claims) for _ in range(count)]


def typical_claims() -> dict[str, Any]:
    return {"scopes": ["read:users", "write:users"], "organization_id": "org_42"}


def ours_config(issuer: TokenIssuer, alg: str, **extra: Any) -> dict[str, Any]:
    return issuer.config(audience=AUDIENCE, ALGORITHMS=[alg], **extra)


@dataclass
class Table:
    """Rows of (label, µs, ratio-to-raw, note)."""

    title: str
    raw_us: float
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, label: str, micros: float, note: str = "") -> None:
        self.rows.append((label, micros, note))

    def print(self) -> None:
        print(f"\n{self.title}")
        print(f"  (x raw = multiple of one raw verify, {self.raw_us:.1f} µs in this run)")
        width = max(len(label) for label, _, _ in self.rows) + 2
        print(f"  {'added to one Flask request':<{width}}{'median µs':>11}{'x raw':>9}  note")
        for label, micros, note in self.rows:
            print(f"  {label:<{width}}{micros:>11.1f}{micros / self.raw_us:>9.2f}  {note}")


# -- sections -----------------------------------------------------------------


def bench_algorithm(alg: str, rounds: int, server: IssuerServer, competitors: bool = True) -> Table:
    issuer = TokenIssuer(alg=alg, audience=AUDIENCE)
    issuer.serve(server)
    tokens = mint_many(issuer, rounds + 60)
    token = tokens[0]
    ours = ours_app(ours_config(issuer, alg)).test_client()
    ours_hit = ours_app(ours_config(issuer, alg), "ours-hit").test_client()
    baseline = Variant("unprotected", repeated(unprotected_app().test_client(), token))
    raw, floor = raw_variants(issuer, alg, token)
    variants = [
        raw,
        floor,
        Variant(
            "floor as a decorator, in the request",
            fresh(floor_app(issuer, alg).test_client(), tokens),
        ),
        Variant("ours, first-seen token", fresh(ours, tokens)),
        Variant("ours, repeated token (cache hit)", repeated(ours_hit, token)),
    ]
    authlib_note = ""
    if competitors:
        others, authlib_note = competitor_variants(issuer, alg, tokens)
        variants += others
    interleave(variants, baseline, rounds)
    table = Table(
        f"{alg}: {len(token)}-byte token, {rounds} rounds "
        f"(baseline: unprotected route {statistics.median(baseline.samples) / 1000:.1f} µs)",
        added_cost(raw, baseline),
    )
    for variant in variants:
        table.add(variant.name, added_cost(variant, baseline))
    if authlib_note:
        table.add("Authlib ResourceProtector", float("nan"), authlib_note)
    return table


def competitor_variants(
    issuer: TokenIssuer, alg: str, tokens: list[str]
) -> tuple[list[Variant], str]:
    """PyJWT, the minimal cached decorator and Authlib, or why Authlib is not there."""
    variants = [
        Variant("PyJWT decorator", fresh(pyjwt_app(issuer, alg).test_client(), tokens)),
        Variant(
            "minimal cached decorator, hit",
            repeated(minimal_cached_app(issuer, alg).test_client(), tokens[0]),
        ),
    ]
    authlib = authlib_app(issuer, alg).test_client()
    if authlib.get(ROUTE, headers=bearer(tokens[0])).status_code != 200:
        return variants, (
            f"Authlib JWTBearerTokenValidator refuses {alg} (not in joserfc's recommended set)"
        )
    variants.append(Variant("Authlib ResourceProtector", fresh(authlib, tokens)))
    return variants, ""


def bench_scaling(rounds: int, server: IssuerServer) -> Table:
    """Key sets of 1 and 100 keys, 1 and 10 issuers, a full token cache, 0.5/8 KB tokens (RS256)."""
    alg = "RS256"
    main = TokenIssuer(alg=alg, audience=AUDIENCE)
    main.serve(server)
    small = mint_many(main, rounds + 60)
    big = mint_many(main, rounds + 60, groups=[f"group-{i:05d}" for i in range(390)])  # ~8 KB
    # 100 keys: the signing key among 99 others, served by a second server.
    hundred = IssuerServer()
    many_keys = main.jwks()["keys"] + [
        {**TokenIssuer(alg=alg).jwks()["keys"][0], "kid": f"other-{i}"} for i in range(99)
    ]
    random.Random(7).shuffle(many_keys)
    hundred.route("/jwks", lambda _r: _reply({"keys": many_keys}))
    # 10 issuers: nine more, each with its own served key set.
    others = [TokenIssuer(alg=alg, audience=AUDIENCE) for _ in range(9)]
    other_servers = [IssuerServer() for _ in others]
    for other, other_server in zip(others, other_servers, strict=True):
        other.serve(other_server)
    issuers = [o.issuer for o in others] + [main.issuer]
    uris = {o.issuer: f"{o.issuer}/jwks" for o in others} | {main.issuer: f"{main.issuer}/jwks"}
    apps = {
        "1 key, 1 issuer": ours_config(main, alg),
        "100 keys": ours_config(main, alg, JWKS_URI=f"{hundred.url}/jwks"),
        "10 issuers": {
            **ours_config(main, alg),
            "OAUTH_VERIFY_ISSUER": issuers,
            "OAUTH_VERIFY_JWKS_URI": uris,
        },
    }
    baseline = Variant("unprotected", repeated(unprotected_app().test_client(), small[0]))
    raw, _floor = raw_variants(main, alg, small[0])
    variants = [raw]
    for label, config in apps.items():
        first = ours_app(config, label).test_client()
        hit = ours_app(config, label + " hit").test_client()
        variants.append(Variant(f"{label}: first-seen", fresh(first, small)))
        variants.append(Variant(f"{label}: repeated", repeated(hit, small[0])))
    full = full_cache_app(ours_config(main, alg), main)
    variants.append(Variant("token cache full: first-seen", fresh(full.test_client(), small)))
    big_first = ours_app(ours_config(main, alg), "big").test_client()
    big_hit = ours_app(ours_config(main, alg), "big hit").test_client()
    variants.append(Variant(f"{len(big[0])}-byte token: first-seen", fresh(big_first, big)))
    variants.append(Variant(f"{len(big[0])}-byte token: repeated", repeated(big_hit, big[0])))
    big_base = Variant("unprotected, big header", repeated(unprotected_app().test_client(), big[0]))
    _raw, big_floor = raw_variants(main, alg, big[0])
    big_floor.name = f"floor: base64url + JSON + verify, {len(big[0])} B"
    variants.append(big_floor)
    interleave([*variants, big_base], baseline, rounds)
    table = Table(
        f"Scaling, RS256 ({len(small[0])}-byte tokens unless said), ours, {rounds} rounds",
        added_cost(raw, baseline),
    )
    for variant in variants[1:]:
        if "byte token" in variant.name:
            table.add(
                variant.name, added_cost(variant, big_base), "vs unprotected with the same header"
            )
        else:
            table.add(variant.name, added_cost(variant, baseline))
    for s in [hundred, *other_servers]:
        s.close()
    return table


def full_cache_app(config: dict[str, Any], issuer: TokenIssuer) -> Flask:
    """Ours with its verified-token cache full and churned: every first-seen token evicts.

    Three times the cache's size is written first, so the cache is measured
    in its steady state, not just after it filled up.
    """
    app = ours_app(config, "full cache")
    state = get_state(app)
    with app.app_context():
        state.authenticate(issuer.mint(**typical_claims()))
    [entry] = list(state.token_cache._entries.values())
    for _ in range(3 * state.token_cache.size):
        state.token_cache.put(os.urandom(32), copy.copy(entry))
    return app


def _reply(body: Any) -> Any:
    from flask_oauth_verify.testing import Reply

    return Reply(200, body)


def introspection_setup(server: IssuerServer) -> tuple[TokenIssuer, dict[str, Any]]:
    """An issuer served by ``server`` and an introspecting app's config (answers cached)."""
    issuer = TokenIssuer(audience=AUDIENCE)
    issuer.serve(server)
    client_id, secret = issuer.introspection_credentials
    config = issuer.config(
        audience=AUDIENCE,
        STRATEGY="introspection",
        INTROSPECTION_CLIENT_ID=client_id,
        INTROSPECTION_CLIENT_SECRET=secret,
        INTROSPECTION_CACHE_TTL=300,
    )
    return issuer, config


def bench_introspection(rounds: int, server: IssuerServer) -> Table | str:
    """Introspection: cache hit vs miss, and our own time on a miss."""
    try:
        import flask_oauth_verify.introspection  # noqa: F401
    except ImportError:
        return "introspection: flask_oauth_verify.introspection is not available; skipped"
    import requests

    issuer, config = introspection_setup(server)
    opaque = [issuer.mint_opaque(**typical_claims()) for _ in range(rounds + 60)]
    miss = ours_app(config, "intro-miss").test_client()
    # Our own time, measured directly: the same miss with the endpoint's
    # answer handed over without HTTP (everything else runs as in a miss).
    no_http_app = ours_app(config, "intro-no-http")
    _answer_without_http(get_state(no_http_app).fetcher, issuer)
    no_http = no_http_app.test_client()
    hit = ours_app(config, "intro-hit").test_client()
    session = requests.Session()
    endpoint = f"{issuer.issuer}/introspect"

    def round_trip(index: int) -> int:
        start = clock()
        response = session.post(
            endpoint,
            data={"token": opaque[index], "token_type_hint": "access_token"},
            auth=issuer.introspection_credentials,
            headers={"Accept": "application/json"},
            timeout=5,
        )
        response.json()
        return clock() - start

    baseline = Variant("unprotected", repeated(unprotected_app().test_client(), opaque[0]))
    trip = Variant("one round trip to the endpoint (requests.Session)", round_trip, kind="raw")
    variants = [
        trip,
        Variant("introspection, cache miss", fresh(miss, opaque)),
        Variant(
            "introspection, cache miss, answer handed over without HTTP", fresh(no_http, opaque)
        ),
        Variant("introspection, cache hit", repeated(hit, opaque[0])),
    ]
    # the JWT floor of the same run, for the ratio column, and a JWT cache hit
    jwt_token = issuer.mint(**typical_claims())
    raw, _ = raw_variants(issuer, "RS256", jwt_token)
    variants.insert(0, raw)
    jwt_hit = ours_app(ours_config(issuer, "RS256"), "intro-jwt-hit").test_client()
    variants.append(Variant("JWT, verified-token cache hit", repeated(jwt_hit, jwt_token)))
    interleave(variants, baseline, rounds)
    table = Table(
        f"Introspection against a local IssuerServer, {rounds} rounds", added_cost(raw, baseline)
    )
    for variant in variants[1:]:
        table.add(variant.name, added_cost(variant, baseline))
    own = added_cost(variants[2], baseline) - added_cost(trip, baseline)
    table.add("our own time on a miss (miss - round trip)", own)
    return table


def bench_introspection_own(rounds: int, server: IssuerServer) -> Table:
    """Our own time on an introspection miss, alone with the unprotected route.

    The miss with the answer handed over without HTTP, interleaved with the
    baseline only (no other variant cools the caches between them), after
    ``FULL_CACHES`` other answers filled every per-process bound.
    """
    issuer, config = introspection_setup(server)
    opaque = [issuer.mint_opaque(**typical_claims()) for _ in range(rounds + 60)]
    app = ours_app(config, "intro-own")
    _answer_without_http(get_state(app).fetcher, issuer)
    # Steady state of a busy API: the caches already hold more answers than
    # the per-process bounds, so every measured miss also evicts.
    filler = app.test_client()
    for _ in range(FULL_CACHES):
        timed_get(filler, bearer(issuer.mint_opaque(**typical_claims())))
    jwt_token = issuer.mint(**typical_claims())
    raw, _ = raw_variants(issuer, "RS256", jwt_token)
    baseline = Variant("unprotected", repeated(unprotected_app().test_client(), opaque[0]))
    miss = Variant("introspection miss, answer without HTTP", fresh(app.test_client(), opaque))
    interleave([raw, miss], baseline, rounds)
    table = Table(
        f"Our own time on an introspection miss, alone, {rounds} rounds, "
        f"after {FULL_CACHES:,} other answers",
        added_cost(raw, baseline),
    )
    table.add(miss.name, added_cost(miss, baseline))
    return table


def _answer_without_http(fetcher: Any, issuer: TokenIssuer) -> None:
    """Make ``fetcher.post`` return the endpoint's answer at once (no HTTP)."""
    from flask_oauth_verify.fetch import HTTPResult

    headers = {"Content-Type": "application/json"}

    def post(_url: str, *, data: Any = None, **_ignored: Any) -> HTTPResult:
        return HTTPResult(200, headers, issuer.introspect(data["token"]))

    fetcher.post = post


# -- memory -------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(trace: bool) -> Iterator[dict[str, int]]:
    """RSS delta of the block, or (``trace``) its net traced allocations.

    Separate passes: tracemalloc's own bookkeeping would show up in RSS.
    """
    out: dict[str, int] = {}
    gc.collect()
    if trace:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if trace else rss_bytes()
    yield out
    gc.collect()
    out["delta"] = (tracemalloc.get_traced_memory()[0] if trace else rss_bytes()) - before
    if trace:
        tracemalloc.stop()


def _fill_token_cache(
    issuer: TokenIssuer, tokens: list[str], *, trace: bool, keep: list[Any]
) -> tuple[int, int]:
    """(entries, bytes) of a fresh app's token cache filled with ``tokens``."""
    app = ours_app(ours_config(issuer, "EdDSA"), f"memory-{trace}")
    keep.append(app)
    state = get_state(app)
    with app.app_context():
        state.authenticate(tokens[0])
        state.token_cache.clear()
        with measured(trace) as delta:
            for token in tokens:
                state.authenticate(token)
    return len(state.token_cache), delta["delta"]


def bench_memory(count: int) -> list[str]:
    """Memory per parsed key set and per cached token (run first: RSS only grows)."""
    lines = []
    keep: list[Any] = []  # nothing measured is freed, so no pass reuses another's memory
    key_sets = {}
    for size in (1, 100):
        keys = [TokenIssuer(alg="RS256").jwks()["keys"][0] for _ in range(size)]
        key_sets[size] = {"keys": [{**k, "kid": f"k{i}"} for i, k in enumerate(keys)]}
    figures: dict[tuple[int, bool], float] = {}
    for trace in (False, True):
        for size, jwks in key_sets.items():
            repeat = 200 if size == 1 else 10
            with measured(trace) as delta:
                for _ in range(repeat):
                    keep.append(parse_key_set(jwks, ("RS256",)))
            figures[size, trace] = delta["delta"] / repeat / 1024
    for size in key_sets:
        lines.append(
            f"parsed key set of {size} RSA-2048 key(s): RSS +{figures[size, False]:.0f} KiB, "
            f"traced +{figures[size, True]:.0f} KiB per cached set"
        )
    issuer = TokenIssuer(alg="EdDSA", audience=AUDIENCE)  # cheap to mint; entry size is alg-free
    tokens = mint_many(issuer, count)
    entries, rss = _fill_token_cache(issuer, tokens, trace=False, keep=keep)
    _entries, traced = _fill_token_cache(issuer, tokens, trace=True, keep=keep)
    per = entries / 10_000
    lines.insert(
        0,
        f"token cache ({entries} entries, {len(tokens[0])}-byte tokens): per 10,000 cached "
        f"tokens RSS +{rss / per / 2**20:.1f} MiB; traced allocations "
        f"+{traced / per / 2**20:.1f} MiB ({traced / entries:.0f} B per token)",
    )
    return lines


# -- main ---------------------------------------------------------------------


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    python = platform.python_version()
    return f"{os.cpu_count()} CPUs ({model}), Python {python}, {platform.platform()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="paired rounds per table")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument(
        "--sections",
        default="algorithms,scaling,introspection,introspection-own,memory",
        help="comma-separated: algorithms, scaling, introspection, introspection-own, memory",
    )
    parser.add_argument("--memory-tokens", type=int, default=10_000)
    parser.add_argument(
        "--no-competitors",
        action="store_true",
        help="algorithms: leave PyJWT, Authlib and the minimal decorator out of the rounds "
        "(what running them in between costs the other variants)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (default); wall: perf_counter",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    sections = set(args.sections.split(","))
    print(f"machine: {machine()}")
    print(f"clock: {args.clock} ({'thread CPU time' if args.clock == 'cpu' else 'perf_counter'})")
    server = IssuerServer()
    try:
        if "memory" in sections:  # first: freed memory is not given back to the OS
            print("\nMemory")
            for line in bench_memory(args.memory_tokens):
                print(f"  {line}")
        if "algorithms" in sections:
            for alg in args.algorithms.split(","):
                bench_algorithm(
                    alg, args.rounds, IssuerServer(), competitors=not args.no_competitors
                ).print()
        if "scaling" in sections:
            bench_scaling(args.rounds, server).print()
        if "introspection-own" in sections:
            bench_introspection_own(args.rounds, IssuerServer()).print()
        if "introspection" in sections:
            result = bench_introspection(args.rounds, IssuerServer())
            print(result if isinstance(result, str) else "", end="")
            if isinstance(result, Table):
                result.print()
    finally:
        server.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
