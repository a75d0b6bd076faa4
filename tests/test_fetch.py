"""The fetch policy against a real HTTP server on 127.0.0.1.

Timeouts, redirects, status and content checks, size cap, circuit breaker and
the single-flight helper every fetcher of the package shares.
"""

from __future__ import annotations

import threading
import tracemalloc
import zlib
from typing import Any

import pytest

from flask_oauth_verify.config import Settings
from flask_oauth_verify.fetch import CircuitBreaker, Fetcher, FetchError, SingleFlight
from flask_oauth_verify.testing import IssuerServer, Reply, Request

from .conftest import FakeClock, free_port, in_forked_child, wait_until


def make_fetcher(clock: FakeClock | None = None, **options: Any) -> Fetcher:
    config = {
        "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
        "OAUTH_VERIFY_AUDIENCE": "api",
        "OAUTH_VERIFY_HTTP_TIMEOUT": (0.5, 0.5),
        **{f"OAUTH_VERIFY_{k}": v for k, v in options.items()},
    }
    settings = Settings.from_config(config)
    return Fetcher(settings, clock) if clock is not None else Fetcher(settings)


@pytest.fixture
def fetcher() -> Fetcher:
    return make_fetcher()


def test_json_document_is_decoded(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    issuer_server.route("/doc", Reply(200, {"keys": []}, {"ETag": '"v1"'}))
    result = fetcher.get_json(issuer_server.url + "/doc")
    assert result.status == 200
    assert result.data == {"keys": []}
    assert result.header("etag") == '"v1"'


@pytest.mark.parametrize(
    "content_type", ["application/jwk-set+json", "application/json; charset=utf-8", "text/plain"]
)
def test_json_media_types_are_accepted(
    fetcher: Fetcher, issuer_server: IssuerServer, content_type: str
) -> None:
    issuer_server.route("/doc", Reply(200, b'{"keys": []}', {"Content-Type": content_type}))
    assert fetcher.get_json(issuer_server.url + "/doc").data == {"keys": []}


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(500, {"error": "boom"}), "HTTP status 500"),
        (Reply(404, {"error": "nope"}), "HTTP status 404"),
        (Reply(202, {"keys": []}), "HTTP status 202"),
        (Reply(200, b"\x00garbage{"), "the response is not JSON"),
        (Reply(200, b'{"keys": [', {"Content-Type": "application/json"}), "not JSON"),
        (Reply(200, b"<html>login</html>", {"Content-Type": "text/html"}), "not JSON"),
        (Reply(200, b"[" * 100000, {"Content-Type": "application/json"}), "not JSON"),
        (Reply(200, b"x" * (600 * 1024)), "response larger than"),
    ],
)
def test_bad_answers_are_fetch_errors(
    fetcher: Fetcher, issuer_server: IssuerServer, reply: Reply, reason: str
) -> None:
    issuer_server.route("/doc", reply)
    with pytest.raises(FetchError) as caught:
        fetcher.get_json(issuer_server.url + "/doc")
    assert reason in caught.value.reason


def test_size_cap_is_configurable(issuer_server: IssuerServer) -> None:
    fetcher = make_fetcher(HTTP_MAX_BYTES=2048)
    issuer_server.route("/small", Reply(200, {"pad": "x" * 1000}))
    issuer_server.route("/big", Reply(200, {"pad": "x" * 3000}))
    assert fetcher.get_json(issuer_server.url + "/small").data["pad"] == "x" * 1000
    with pytest.raises(FetchError, match="larger than 2048"):
        fetcher.get_json(issuer_server.url + "/big")


def gzipped(chunks: Any, level: int = 9) -> bytes:
    """The gzip encoding of the byte strings ``chunks``, compressed as they come."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    return b"".join([*(compressor.compress(chunk) for chunk in chunks), compressor.flush()])


def test_a_compressed_answer_is_decoded(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    body = gzipped([b'{"keys": []}'])
    issuer_server.route("/doc", Reply(200, body, {"Content-Encoding": "gzip"}))
    assert fetcher.get_json(issuer_server.url + "/doc").data == {"keys": []}


def test_a_decompression_bomb_is_refused_without_inflating_it(
    fetcher: Fetcher, issuer_server: IssuerServer
) -> None:
    # 64 MiB of JSON gzipped twice: under 1 KB on the wire. The size cap
    # applies to what is decoded, and the decoding must stop at the cap, not
    # inflate the whole body first (urllib3 before 2.6 did, in one read of
    # each compressed chunk: CVE-2025-66471; pyproject.toml asks for 2.6).
    inner = gzipped([b"{", *(b" " * 2**20 for _ in range(64)), b"}"])
    bomb = gzipped([inner])
    assert len(bomb) < 4096
    issuer_server.route("/doc", Reply(200, bomb, {"Content-Encoding": "gzip, gzip"}))
    tracemalloc.start()
    try:
        with pytest.raises(FetchError, match="larger than"):
            fetcher.get_json(issuer_server.url + "/doc")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the 512 KiB cap and a few chunks, not 64 MiB


def test_a_long_chain_of_content_encodings_is_refused(
    fetcher: Fetcher, issuer_server: IssuerServer
) -> None:
    body = b'{"keys": []}'
    for _ in range(8):
        body = gzipped([body])
    issuer_server.route("/doc", Reply(200, body, {"Content-Encoding": ", ".join(["gzip"] * 8)}))
    with pytest.raises(FetchError):
        fetcher.get_json(issuer_server.url + "/doc")


def test_a_hanging_server_times_out(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    issuer_server.hold("/doc")
    with pytest.raises(FetchError, match="timed out"):
        fetcher.get_json(issuer_server.url + "/doc")
    assert issuer_server.hits["/doc"] == 1


def test_a_closed_port_is_a_connection_failure(fetcher: Fetcher) -> None:
    with pytest.raises(FetchError, match="connection failed"):
        fetcher.get_json(f"http://127.0.0.1:{free_port()}/doc")


def test_plain_http_to_another_host_is_refused_without_a_request(fetcher: Fetcher) -> None:
    with pytest.raises(FetchError, match="insecure"):
        fetcher.get_json("http://keys.example.com/jwks")


def test_same_origin_redirects_are_followed(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    issuer_server.route("/old", Reply(301, b"", {"Location": "/new"}))
    issuer_server.route("/new", Reply(200, {"ok": True}))
    assert fetcher.get_json(issuer_server.url + "/old").data == {"ok": True}


def test_redirect_to_another_origin_is_refused(
    fetcher: Fetcher, issuer_server: IssuerServer
) -> None:
    with IssuerServer() as elsewhere:
        elsewhere.route("/jwks", Reply(200, {"keys": []}))
        issuer_server.route("/jwks", Reply(302, b"", {"Location": elsewhere.url + "/jwks"}))
        with pytest.raises(FetchError, match="another origin"):
            fetcher.get_json(issuer_server.url + "/jwks")
        assert elsewhere.hits["/jwks"] == 0


@pytest.mark.parametrize(
    "location",
    [
        "{elsewhere}\\@{here}/jwks",  # urllib's parser: here; requests: elsewhere
        "{elsewhere}/%5C@{here_host}/jwks",
        "http://user@{here_host}/jwks",  # user-info in a redirect
        "{elsewhere}\t/jwks",
    ],
    ids=["backslash before @", "encoded backslash", "user-info", "tab"],
)
def test_a_redirect_parsers_read_differently_is_refused(
    fetcher: Fetcher, issuer_server: IssuerServer, location: str
) -> None:
    """``Location: http://evil\\@good/`` was same-origin to the check and
    another host to the client: a token's allowlisted ``jku`` led to an
    attacker's keys through one open redirect of the allowed host."""
    with IssuerServer() as elsewhere:
        elsewhere.route("/jwks", Reply(200, {"keys": []}))
        here = issuer_server.url
        target = location.format(
            elsewhere=elsewhere.url, here=here.split("//", 1)[1], here_host=here.split("//", 1)[1]
        )
        issuer_server.route("/jwks", Reply(302, b"", {"Location": target}))
        with pytest.raises(FetchError):
            fetcher.get_json(here + "/jwks")
        assert sum(elsewhere.hits.values()) == 0


def test_redirect_loops_stop(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    issuer_server.route("/loop", Reply(302, b"", {"Location": "/loop"}))
    with pytest.raises(FetchError, match="too many redirects"):
        fetcher.get_json(issuer_server.url + "/loop")
    assert issuer_server.hits["/loop"] == 4


def test_not_modified_is_returned_to_conditional_gets(
    fetcher: Fetcher, issuer_server: IssuerServer
) -> None:
    def conditional(request: Request) -> Reply:
        if request.headers.get("If-None-Match") == '"v1"':
            return Reply(304, b"", {"ETag": '"v1"'})
        return Reply(200, {"keys": []}, {"ETag": '"v1"'})

    issuer_server.route("/jwks", conditional)
    url = issuer_server.url + "/jwks"
    assert fetcher.get_json(url).status == 200
    result = fetcher.get_json(url, headers={"If-None-Match": '"v1"'})
    assert (result.status, result.data) == (304, None)


# -- circuit breaker ------------------------------------------------------------


def test_breaker_opens_then_lets_one_trial_through() -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(failures=2, reset=30, clock=clock)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    assert breaker.retry_after() == 31
    clock.advance(20)
    assert breaker.retry_after() == 11
    clock.advance(10)
    assert breaker.allow(), "half-open: one trial call"
    assert not breaker.allow(), "only one trial at a time"
    breaker.record_failure()
    assert breaker.is_open, "a failed trial re-opens the circuit"
    clock.advance(30)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow() and breaker.allow()
    assert breaker.retry_after() == 1


def test_a_clock_stepped_back_ends_the_breakers_wait() -> None:
    """The app's clock is the wall clock: stepped back (NTP, a resumed VM)
    while the circuit is open, it kept refusing every call for the size of
    the step (503 with a Retry-After of minutes, no trial call)."""
    clock = FakeClock(10_000.0)
    breaker = CircuitBreaker(failures=1, reset=30, clock=clock)
    breaker.record_failure()
    assert breaker.is_open and breaker.retry_after() == 31
    clock.advance(-600)
    assert not breaker.is_open
    assert breaker.retry_after() == 1
    assert breaker.allow(), "the trial call goes out"
    breaker.record_failure()
    assert breaker.is_open and breaker.retry_after() == 31, "re-opened from the new time"


def test_a_location_that_keeps_failing_opens_the_circuit_between_answers() -> None:
    """Answers end the circuit's row of failures (the origin is up), but
    only their own location's: a key set fallback that hangs beside a quick
    404 of the same origin still opens the circuit, while failures scattered
    over many locations that answer never add up."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(failures=2, reset=30, clock=clock)
    hung, wrong = b"fallback", b"misspelled"
    breaker.record_failure(hung)
    breaker.record_answer(wrong)
    assert not breaker.is_open
    breaker.record_failure(hung)
    assert breaker.is_open, "the 404 between the two timeouts cleared the first"
    clock.advance(30)
    assert breaker.allow(), "half-open: one trial call"
    breaker.record_answer(wrong)
    assert breaker.allow() and breaker.allow(), "an answered trial closes the circuit"
    breaker.record_failure(hung)
    assert breaker.is_open, "the hung location's row goes on"
    breaker.record_success()
    for number in range(10):  # one failure each, many answering locations
        breaker.record_failure(b"jku-%d" % number)
        breaker.record_answer(b"other-%d" % number)
    assert not breaker.is_open
    breaker.record_failure(hung)
    breaker.record_answer(hung)  # its own answer ends its row
    breaker.record_failure(hung)
    assert not breaker.is_open


def test_a_location_whose_trial_failed_lets_a_waiting_one_try_next() -> None:
    """Two realms of one server share the origin's circuit. The clients of
    the hung one, retrying as soon as told, took every half-open trial: the
    working realm's URL was never asked again while the other stayed hung."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(failures=2, reset=30, clock=clock)
    hung, working = b"realm-a/certs", b"realm-b/certs"
    breaker.record_failure(hung)
    breaker.record_failure(hung)
    clock.advance(30)
    assert breaker.allow(hung), "nobody else waits: the hung URL has the trial"
    assert not breaker.allow(working), "one trial at a time"
    breaker.record_failure(hung)
    assert not breaker.allow(working), "re-opened: the wait starts again"
    clock.advance(30)
    assert not breaker.allow(hung), "its trial failed: the waiting URL goes first"
    assert breaker.allow(working)
    breaker.record_success()
    assert breaker.allow(hung), "closed for every location"


def test_a_location_yields_its_trial_only_while_the_other_keeps_asking() -> None:
    """A URL refused once and never asked for again does not keep the hung
    URL from its trial for more than two waits after it asked; meanwhile the
    hung URL is told (is_open_for, retry_after) when it may try again."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(failures=1, reset=30, clock=clock)
    hung, gone = b"realm-a/certs", b"realm-b/certs"
    breaker.record_failure(hung)
    clock.advance(30)
    assert breaker.allow(hung)
    breaker.record_failure(hung)
    assert not breaker.allow(gone)
    clock.advance(30)
    assert not breaker.is_open, "the circuit's wait is over"
    assert breaker.is_open_for(hung) and not breaker.is_open_for(gone)
    assert breaker.retry_after(hung) == 31 and breaker.retry_after(gone) == 1
    assert not breaker.allow(hung)
    clock.advance(29)
    assert not breaker.allow(hung)
    assert breaker.retry_after(hung) == 2
    clock.advance(1)
    assert not breaker.is_open_for(hung)
    assert breaker.allow(hung), "two waits after the other URL asked, the trial is its again"
    breaker.record_failure(hung)
    clock.advance(30)
    assert breaker.allow(hung), "nobody else asked during this wait"


def test_locations_whose_trials_failed_take_the_next_ones_in_turn() -> None:
    """Both realms had a failed trial (the working one a short blip): the
    hung one, whose clients ask on every request, took every trial after."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(failures=1, reset=10, clock=clock)
    hung, blip = b"realm-a/certs", b"realm-b/certs"
    breaker.record_failure(hung)
    clock.advance(10)
    assert breaker.allow(blip), "never tried: nobody is ahead of it"
    breaker.record_failure(blip)
    order = []
    for _ in range(6):
        clock.advance(5)
        assert not breaker.allow(hung) and not breaker.allow(blip), "both wait"
        clock.advance(5)
        first, second = (hung, blip) if breaker.is_open_for(blip) else (blip, hung)
        assert breaker.is_open_for(second), "its turn is not yet"
        assert not breaker.allow(second)
        assert breaker.allow(first)
        order.append(first)
        breaker.record_failure(first)
    assert order == [hung, blip] * 3
    clock.advance(10)
    assert breaker.allow(hung)
    breaker.record_success()
    assert breaker.allow(blip) and breaker.allow(blip), "closed for every location"


def test_a_child_forked_during_a_trial_call_makes_its_own() -> None:
    """The child inherited the parent's claimed half-open trial with no
    thread left to finish it: every call of the circuit was refused for good
    (a worker answering 503 until restarted)."""
    clock = FakeClock()
    fetcher = make_fetcher(clock, CIRCUIT_BREAKER_FAILURES=1, CIRCUIT_BREAKER_RESET=30)
    breaker = fetcher.breaker("https://issuer.example.test/jwks")
    breaker.record_failure()
    clock.advance(31)
    assert breaker.allow(), "the parent's trial call"
    assert not breaker.allow()
    assert in_forked_child(lambda: [breaker.allow(), breaker.allow()]) == [True, False]


def test_fetcher_stops_calling_a_failing_origin(issuer_server: IssuerServer) -> None:
    clock = FakeClock()
    fetcher = make_fetcher(clock, CIRCUIT_BREAKER_FAILURES=3, CIRCUIT_BREAKER_RESET=30)
    issuer_server.route("/doc", Reply(503, {"error": "down"}))
    url = issuer_server.url + "/doc"
    for _ in range(3):
        with pytest.raises(FetchError, match="HTTP status 503"):
            fetcher.get_json(url)
    for _ in range(5):
        with pytest.raises(FetchError, match="circuit open"):
            fetcher.get_json(url)
    assert issuer_server.hits["/doc"] == 3, "an open circuit makes no request"
    # Another path of the same origin shares the circuit.
    with pytest.raises(FetchError, match="circuit open"):
        fetcher.get_json(issuer_server.url + "/other")
    issuer_server.route("/doc", Reply(200, {"ok": True}))
    clock.advance(31)
    assert fetcher.get_json(url).data == {"ok": True}
    assert not fetcher.breaker(url).is_open


def test_client_errors_do_not_open_the_circuit(issuer_server: IssuerServer) -> None:
    fetcher = make_fetcher(CIRCUIT_BREAKER_FAILURES=2)
    url = issuer_server.url + "/missing"
    for _ in range(4):
        with pytest.raises(FetchError, match="404"):
            fetcher.get_json(url)
    assert issuer_server.hits["/missing"] == 4


# -- single flight ---------------------------------------------------------------


def test_single_flight_shares_one_call() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []
    results: list[int] = []

    def slow() -> int:
        calls.append(1)
        started.set()
        release.wait(10)
        return 42

    leader = threading.Thread(target=lambda: results.append(flight.run("k", slow, timeout=10)))
    leader.start()
    assert started.wait(10)
    assert flight.running("k")
    followers = [
        threading.Thread(target=lambda: results.append(flight.run("k", slow, timeout=10)))
        for _ in range(5)
    ]
    for thread in followers:
        thread.start()
    assert wait_until(lambda: flight.followers("k") == 5)
    release.set()
    for thread in [leader, *followers]:
        thread.join(10)
    assert results == [42] * 6
    assert len(calls) == 1
    assert not flight.running("k")


def test_single_flight_followers_get_the_leaders_error() -> None:
    flight: SingleFlight[int] = SingleFlight()
    entered = threading.Event()
    release = threading.Event()
    errors: list[FetchError] = []

    def failing() -> int:
        entered.set()
        release.wait(10)
        raise FetchError("timed out")

    def call() -> None:
        try:
            flight.run("k", failing, timeout=10)
        except FetchError as exc:
            errors.append(exc)

    leader = threading.Thread(target=call)
    leader.start()
    assert entered.wait(10)
    follower = threading.Thread(target=call)
    follower.start()
    assert wait_until(lambda: flight.followers("k") == 1)
    release.set()
    leader.join(10)
    follower.join(10)
    assert [e.reason for e in errors] == ["timed out", "timed out"]
    assert errors[0] is not errors[1], "each caller raises its own exception object"


def test_single_flight_follower_timeout() -> None:
    flight: SingleFlight[int] = SingleFlight()
    entered = threading.Event()
    release = threading.Event()

    def stuck() -> int:
        entered.set()
        release.wait(10)
        return 1

    leader = threading.Thread(target=lambda: flight.run("k", stuck, timeout=10))
    leader.start()
    assert entered.wait(10)
    with pytest.raises(TimeoutError):
        flight.run("k", stuck, timeout=0.01)
    release.set()
    leader.join(10)


def test_cookies_are_neither_kept_nor_sent(fetcher: Fetcher, issuer_server: IssuerServer) -> None:
    """A verifier is stateless: a cookie an endpoint sets never reaches it (or
    another endpoint of its host) again, and the jar never grows."""
    issuer_server.route(
        "/jwks", Reply(200, {"keys": []}, {"Set-Cookie": "session=SET-BY-KEY-SERVER; Path=/"})
    )
    issuer_server.route("/introspect", Reply(200, {"active": False}))
    fetcher.get_json(issuer_server.url + "/jwks")
    fetcher.post(issuer_server.url + "/introspect", data={"token": "t"})
    fetcher.get_json(issuer_server.url + "/jwks")
    assert [r.headers.get("Cookie") for r in issuer_server.requests] == [None, None, None]
    assert len(fetcher._session.cookies) == 0
