"""The per-process cache: the default backend and the fallback of a shared one.

Bounded, with expiry, and every call costs the same however full it is (no
sort or scan on write, unlike cachelib's ``SimpleCache``).
"""

from __future__ import annotations

import concurrent.futures

from flask_oauth_verify.cache import LOCAL_CACHE_SIZE, LocalCache, SharedCache

from .conftest import FakeClock


def test_values_are_copies(clock: FakeClock) -> None:
    local = LocalCache(clock=clock)
    stored = {"keys": [{"kid": "a"}]}
    local.set("k", stored, timeout=60)
    stored["keys"].append({"kid": "mutated after set"})
    got = local.get("k")
    assert got == {"keys": [{"kid": "a"}]}
    got["keys"].clear()
    assert local.get("k") == {"keys": [{"kid": "a"}]}


def test_entries_expire_on_the_clock(clock: FakeClock) -> None:
    local = LocalCache(clock=clock)
    local.set("short", 1, timeout=5)
    local.set("forever", 2, timeout=0)
    clock.advance(4.9)
    assert local.get("short") == 1
    clock.advance(0.1)
    assert local.get("short") is None
    assert len(local) == 1, "an expired entry is dropped when read"
    clock.advance(10**9)
    assert local.get("forever") == 2


def test_add_only_when_absent_or_expired(clock: FakeClock) -> None:
    local = LocalCache(clock=clock)
    assert local.add("lock", "first", timeout=10)
    assert not local.add("lock", "second", timeout=10)
    assert local.get("lock") == "first"
    clock.advance(10)
    assert local.add("lock", "third", timeout=10), "an expired entry does not hold the key"
    assert local.get("lock") == "third"
    assert local.delete("lock")
    assert not local.delete("lock")
    assert local.add("lock", "fourth", timeout=10)


def test_bounded_the_oldest_write_goes_first(clock: FakeClock) -> None:
    local = LocalCache(size=3, clock=clock)
    for key in "abc":
        local.set(key, key, timeout=60)
    local.set("a", "a again", timeout=60)  # a rewrite is the newest write
    local.set("d", "d", timeout=60)
    assert local.get("b") is None, "b was the oldest write"
    assert [local.get(k) for k in "acd"] == ["a again", "c", "d"]
    for index in range(10 * 3):
        local.set(f"token-{index}", index, timeout=60)
    assert len(local) == 3
    assert [local.get(f"token-{i}") for i in (27, 28, 29)] == [27, 28, 29]


def test_concurrent_writers_keep_the_bound(clock: FakeClock) -> None:
    local = LocalCache(size=50, clock=clock)

    def write(worker: int) -> None:
        for index in range(500):
            local.set(f"{worker}-{index}", index, timeout=60)
            local.add(f"lock-{index % 7}", worker, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert len(local) == 50


def test_shared_cache_without_a_backend_stays_bounded() -> None:
    operations = 3 * LOCAL_CACHE_SIZE
    shared = SharedCache(None)
    for index in range(operations):
        assert shared.set(f"oauth_verify:introspection:{index}", {"active": True}, 300)
    last = f"oauth_verify:introspection:{operations - 1}"
    assert shared.get(last) == {"active": True}
    assert shared.get("oauth_verify:introspection:0") is None
    assert len(shared.backend) == LOCAL_CACHE_SIZE
