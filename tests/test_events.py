"""Security events: one structured record per decision, never the token."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from joserfc import jwt
from joserfc.jwk import OctKey
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_oauth_verify import events as events_module
from flask_oauth_verify import require_organization
from flask_oauth_verify.events import (
    SECURITY_LOGGER,
    keys_refresh_failed,
    security_event,
    short_token_hash,
    token_validated,
    token_validation_failed,
)
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header, b64url

from .conftest import FakeClock, make_app


class JSONFormatter(logging.Formatter):
    """What an application's JSON log formatter does with ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"message": record.getMessage(), **record.security})  # type: ignore[attr-defined]


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of the security logger (DEBUG and up) during the test."""
    captured: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    logger = logging.getLogger(SECURITY_LOGGER)
    handler = Collect(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield captured
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def add_org_view(app: Flask) -> None:
    @app.get("/org")
    @require_organization
    def org() -> str:
        return "ok"


def assert_no_token(record: logging.LogRecord, token: str) -> None:
    """Neither the message, the args, the extra fields nor the JSON line hold it."""
    rendered = [
        record.getMessage(),
        repr(record.__dict__),
        JSONFormatter().format(record),
        logging.Formatter("%(message)s %(security)s").format(record),
    ]
    for signature_or_token in (token, token.rsplit(".", 1)[-1]):
        for text in rendered:
            assert signature_or_token not in text


def only(records: list[logging.LogRecord], event: str) -> logging.LogRecord:
    matching = [r for r in records if getattr(r, "event", None) == event]
    assert len(matching) == 1, [getattr(r, "event", None) for r in records]
    return matching[0]


def hs256_token(tokens: TokenIssuer) -> str:
    return jwt.encode(
        {"alg": "HS256", "kid": tokens.current_kid},
        tokens.claims(),
        OctKey.import_key("a-shared-secret-that-is-long-enough-32b"),
        algorithms=["HS256"],
    )


#: A payload nested past any Python's parser depth limit (its C stack guard included).
DEEP = b'{"iss": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def rejection_cases(tokens: TokenIssuer, clock: FakeClock) -> list[tuple[str, str, str, str]]:
    """(token, event, error, words the reason must contain) per rejection kind."""
    now = clock()
    good = tokens.mint(now=now)
    head, payload, signature = good.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    stranger = TokenIssuer(issuer=tokens.issuer)  # same iss, key not published
    return [
        (tokens.mint(now=now - 7200, expires_in=60), "token_validation_failed",
         "token_expired", "exp is in the past"),
        (tokens.mint(now=now + 3600), "token_validation_failed",
         "token_not_active", "nbf is in the future"),
        (tokens.mint(now=now, audience="another-api"), "token_validation_failed",
         "invalid_token", "aud"),
        (tokens.mint(now=now, iss="https://evil.example"), "token_validation_failed",
         "invalid_token", "iss is not a configured issuer"),
        (tampered, "token_validation_failed", "invalid_token", "signature does not verify"),
        (stranger.mint(now=now), "token_validation_failed", "invalid_token", "kid"),
        (hs256_token(tokens), "token_validation_failed", "invalid_token", "alg 'HS256'"),
        ("not-a-jwt", "token_validation_failed", "invalid_token", "three segments"),
        (f"{head}.{b64url(DEEP)}.{signature}", "token_validation_failed", "invalid_token",
         "payload nests too deeply"),
    ]  # fmt: skip


def test_each_rejection_is_logged_with_its_precise_reason_and_no_token(
    tokens: TokenIssuer, clock: FakeClock, records: list[logging.LogRecord]
) -> None:
    app = make_app(tokens.config(MAX_TOKEN_BYTES=300_000), clock=clock)
    client = app.test_client()
    for token, event, error, words in rejection_cases(tokens, clock):
        records.clear()
        response = client.get("/protected", headers=auth_header(token))
        assert response.status_code == 401
        assert response.json is not None and response.json["error"] == error
        record = only(records, event)
        assert record.levelno == logging.WARNING
        assert record.error == error  # type: ignore[attr-defined]
        assert record.status == 401  # type: ignore[attr-defined]
        assert words in record.reason, (error, record.reason)  # type: ignore[attr-defined]
        assert words in record.getMessage()
        assert record.token_hash == short_token_hash(token)  # type: ignore[attr-defined]
        assert record.path == "/protected"  # type: ignore[attr-defined]
        assert_no_token(record, token)


def test_missing_token_malformed_request_scope_and_context_records(
    tokens: TokenIssuer, clock: FakeClock, records: list[logging.LogRecord]
) -> None:
    app = make_app(tokens.config(), clock=clock)
    add_org_view(app)
    client = app.test_client()

    assert client.get("/protected").status_code == 401
    missing = only(records, "missing_token")
    assert missing.reason == "no bearer token in the request"  # type: ignore[attr-defined]
    assert missing.levelno == logging.INFO

    records.clear()
    assert client.get("/protected", headers={"Authorization": "Bearer "}).status_code == 400
    malformed = only(records, "token_validation_failed")
    assert malformed.error == "invalid_request"  # type: ignore[attr-defined]
    assert "without a token" in malformed.reason  # type: ignore[attr-defined]

    records.clear()
    token = tokens.mint(scopes=["write:users"], organization_id="org_7", now=clock())
    assert client.get("/read", headers=auth_header(token)).status_code == 403
    scope = only(records, "insufficient_scope")
    assert scope.required_scopes == ["read:users"]  # type: ignore[attr-defined]
    assert scope.scopes == ["write:users"]  # type: ignore[attr-defined]
    assert scope.subject == "user_1"  # type: ignore[attr-defined]
    assert scope.organization_id == "org_7"  # type: ignore[attr-defined]
    assert "read:users" in scope.reason  # type: ignore[attr-defined]
    assert_no_token(scope, token)

    records.clear()
    no_org = tokens.mint(now=clock())
    assert client.get("/org", headers=auth_header(no_org)).status_code == 401
    context = only(records, "missing_context")
    assert context.error == "missing_organization_context"  # type: ignore[attr-defined]
    assert_no_token(context, no_org)


def test_validated_record_has_who_what_where(
    tokens: TokenIssuer, clock: FakeClock, records: list[logging.LogRecord]
) -> None:
    app = make_app(tokens.config(), clock=clock)
    token = tokens.mint(
        now=clock(), scopes=["read:users"], organization_id="org_1", client_id="svc-7"
    )
    response = app.test_client().get(
        "/protected", headers={**auth_header(token), "User-Agent": "billing-job/2.1"}
    )
    assert response.status_code == 200
    record = only(records, "token_validated")
    fields = record.security  # type: ignore[attr-defined]
    claims = jwt.decode(token, tokens.key()).claims
    assert fields["subject"] == "user_1"
    assert fields["client_id"] == "svc-7"
    assert fields["organization_id"] == "org_1"
    assert fields["kid"] == tokens.current_kid
    assert fields["jti"] == claims["jti"]
    assert fields["token_hash"] == short_token_hash(token)
    assert fields["ip"] == "127.0.0.1"
    assert fields["user_agent"] == "billing-job/2.1"
    assert (fields["method"], fields["path"]) == ("GET", "/protected")
    assert fields["timestamp"].endswith("+00:00")
    # the JSON line a formatter prints is the record as it is
    line = json.loads(JSONFormatter().format(record))
    assert line["event"] == "token_validated" and line["subject"] == "user_1"
    assert_no_token(record, token)


def test_client_ip_respects_proxy_fix(
    tokens: TokenIssuer, clock: FakeClock, records: list[logging.LogRecord]
) -> None:
    app = make_app(tokens.config(), clock=clock)
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    app.test_client().get("/protected", headers=forwarded)
    assert only(records, "missing_token").ip == "127.0.0.1"  # type: ignore[attr-defined]

    records.clear()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    app.test_client().get("/protected", headers=forwarded)
    assert only(records, "missing_token").ip == "203.0.113.9"  # type: ignore[attr-defined]


def test_signals_carry_the_same_records_per_app(tokens: TokenIssuer, clock: FakeClock) -> None:
    first = make_app(tokens.config(), clock=clock, name="first")
    second = make_app(tokens.config(), clock=clock, name="second")
    failed: list[dict[str, Any]] = []
    everything: list[tuple[str, str]] = []
    validated: list[dict[str, Any]] = []

    def on_failed(sender: Flask, record: dict[str, Any]) -> None:
        failed.append(record)

    def on_any(sender: Flask, event: str, record: dict[str, Any]) -> None:
        everything.append((sender.name, event))

    def on_validated(sender: Flask, record: dict[str, Any]) -> None:
        validated.append(record)

    token = tokens.mint(now=clock() - 7200, expires_in=60)
    good = tokens.mint(now=clock())
    with (
        token_validation_failed.connected_to(on_failed, first),
        security_event.connected_to(on_any),
        token_validated.connected_to(on_validated, first),
    ):
        first.test_client().get("/protected", headers=auth_header(token))
        second.test_client().get("/protected", headers=auth_header(token))
        first.test_client().get("/protected", headers=auth_header(good))
    assert len(failed) == 1  # only the first app's
    assert failed[0]["error"] == "token_expired"
    assert failed[0]["reason"] == "exp is in the past"
    assert token not in json.dumps(failed[0])
    assert everything == [
        ("first", "token_validation_failed"),
        ("second", "token_validation_failed"),
        ("first", "token_validated"),
    ]
    assert validated[0]["subject"] == "user_1"


def test_key_events_logged_and_signalled(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    records: list[logging.LogRecord],
) -> None:
    app = make_app(served_tokens.config(), clock=clock)
    client = app.test_client()
    token = served_tokens.mint(now=clock(), expires_in=7 * 86400)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    refreshed = only(records, "keys_refreshed")
    assert refreshed.issuer == served_tokens.issuer  # type: ignore[attr-defined]
    assert refreshed.kids == [served_tokens.current_kid]  # type: ignore[attr-defined]

    records.clear()
    heard: list[dict[str, Any]] = []

    def on_refresh_failed(sender: Flask, record: dict[str, Any]) -> None:
        heard.append(record)

    issuer_server.route("/jwks", Reply(500, {"error": "down"}))
    clock.advance(3600)  # past the key set's TTL: the refresh fails, last good keys serve
    with keys_refresh_failed.connected_to(on_refresh_failed, app):
        assert client.get("/protected", headers=auth_header(token)).status_code == 200
    failure = only(records, "keys_refresh_failed")
    assert failure.levelno == logging.WARNING
    assert "500" in failure.reason  # type: ignore[attr-defined]
    stale = only(records, "stale_keys_served")
    assert stale.age >= 3600  # type: ignore[attr-defined]
    assert heard and heard[0]["issuer"] == served_tokens.issuer


def test_introspection_failure_is_an_error_record(
    served_tokens: TokenIssuer,
    issuer_server: IssuerServer,
    clock: FakeClock,
    records: list[logging.LogRecord],
) -> None:
    config = served_tokens.config(
        STRATEGY="introspection",
        INTROSPECTION_ENDPOINT=f"{issuer_server.url}/introspect",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
    )
    app = make_app(config, clock=clock)
    issuer_server.route("/introspect", Reply(502, "bad gateway"))
    token = served_tokens.mint_opaque()
    response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 503
    failed = only(records, "introspection_failed")
    assert failed.levelno == logging.ERROR
    assert "502" in failed.reason  # type: ignore[attr-defined]
    refusal = only(records, "token_validation_failed")
    assert refusal.levelno == logging.ERROR
    assert refusal.error == "temporarily_unavailable"  # type: ignore[attr-defined]
    for record in (failed, refusal):
        assert_no_token(record, token)


def test_nothing_is_built_when_logging_and_signals_are_off(
    tokens: TokenIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tokens.config(), clock=clock)
    logger = logging.getLogger(SECURITY_LOGGER)
    monkeypatch.setattr(logger, "disabled", True)

    def explode() -> dict[str, Any]:
        raise AssertionError("a record was built although nobody listens")

    monkeypatch.setattr(events_module, "_request_fields", explode)
    client = app.test_client()
    token = tokens.mint(now=clock())
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert client.get("/protected").status_code == 401
    expired = tokens.mint(now=clock() - 7200, expires_in=60)
    assert client.get("/protected", headers=auth_header(expired)).status_code == 401


def test_a_receiver_that_raises_changes_no_answer(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that fails (the documented blocklist, its Redis down) is
    logged and ignored: a valid token still gets 200, a bad one 401, never
    a 500, and the other receivers still run."""
    app = make_app(tokens.config())
    seen: list[str] = []

    def broken(_sender: Any, **_fields: Any) -> None:
        raise ConnectionError("blocklist store down")

    def recorder(_sender: Any, **fields: Any) -> None:
        seen.append(fields["event"])

    with (
        token_validated.connected_to(broken, app),
        token_validation_failed.connected_to(broken, app),
        security_event.connected_to(broken, app),
        security_event.connected_to(recorder, app),
    ):
        client = app.test_client()
        assert client.get("/protected", headers=auth_header(tokens.mint())).status_code == 200
        refused = client.get("/protected", headers=auth_header(tokens.mint() + "x"))
        assert refused.status_code == 401
    assert seen == ["token_validated", "token_validation_failed"]
    assert any("raised; ignored" in r.getMessage() for r in caplog.records)


def test_an_open_circuit_is_not_reported_as_a_failed_refresh_per_request(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issuer down, no keys: each refused request is one security event; the
    refreshes the open circuit never sent are not reported as failures (they
    were: three log records per request, and a fetch-failure count of every
    request instead of the fetches made)."""
    issuer_server.route("/jwks", Reply(500, "down"))
    app = make_app(served_tokens.config(CIRCUIT_BREAKER_FAILURES=2))
    failed: list[dict[str, Any]] = []

    def count(_sender: Any, record: dict[str, Any]) -> None:
        failed.append(record)

    with keys_refresh_failed.connected_to(count, app):
        client = app.test_client()
        for _ in range(10):
            response = client.get("/protected", headers=auth_header(served_tokens.mint()))
            assert response.status_code == 503
    assert issuer_server.hits["/jwks"] == 2
    assert len(failed) == 2  # one per fetch made
    no_keys = [r for r in caplog.records if r.getMessage().startswith("No keys for")]
    assert len(no_keys) == 2


def test_a_claim_cannot_forge_a_log_line(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Claims of a verified token go into the plain-text message escaped."""
    caplog.set_level(logging.INFO, logger=SECURITY_LOGGER)
    app = make_app(tokens.config())
    forged = "user_1\nWARNING token_validated: admin login\x1b[2K"
    token = tokens.mint(subject=forged)
    assert app.test_client().get("/protected", headers=auth_header(token)).status_code == 200
    [line] = [r.getMessage() for r in caplog.records if "token_validated" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line
    assert "user_1\\nWARNING" in line
