"""The bounded FIFO behind every per-process cache, alone and in the app.

Bounded, the oldest write goes first, a rewrite is the newest write.
Introspection answers beyond the bound: ``tests/test_introspection.py``.
That a write costs the same however full the cache is, is measured in
``benchmarks/bench_verify.py``'s scaling table, not asserted here.
"""

from __future__ import annotations

import concurrent.futures
import hashlib

from flask_oauth_verify.extension import get_state
from flask_oauth_verify.fifo import BoundedFifo
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app


def test_the_oldest_write_goes_first() -> None:
    fifo: BoundedFifo[str, int] = BoundedFifo(3)
    for index, key in enumerate("abc"):
        fifo.put(key, index)
    fifo.put("a", 10)  # a rewrite is the newest write
    fifo.put("d", 3)
    assert list(fifo.items()) == [("c", 2), ("a", 10), ("d", 3)]
    for index in range(1000):
        fifo.put(f"k{index}", index)
    assert list(fifo) == ["k997", "k998", "k999"]


def test_size_zero_keeps_nothing() -> None:
    fifo: BoundedFifo[str, int] = BoundedFifo(0)
    fifo.put("a", 1)
    assert len(fifo) == 0
    assert fifo.get("a") is None


def test_concurrent_writers_keep_the_bound() -> None:
    fifo: BoundedFifo[str, int] = BoundedFifo(64)

    def write(worker: int) -> None:
        for index in range(2000):
            fifo.put(f"{worker}-{index}", index)
            fifo.put(f"shared-{index % 5}", worker)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert len(fifo) == 64


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def test_the_verified_token_cache_keeps_the_newest_tokens(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(audience="api", TOKEN_CACHE_SIZE=3))
    client = app.test_client()
    minted = [tokens.mint() for _ in range(7)]
    for token in minted:
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    cache = get_state(app).token_cache
    assert len(cache) == 3
    assert [cache.get(_digest(t)) is not None for t in minted] == [False] * 4 + [True] * 3
    # An evicted token is simply verified again, and becomes the newest entry.
    assert client.get("/protected", headers=auth_header(minted[0])).status_code == 200
    assert cache.get(_digest(minted[0])) is not None
    assert cache.get(_digest(minted[4])) is None
