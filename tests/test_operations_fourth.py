"""Operations, fourth pass: the CLI on a token that is not text, credentials in
a configured URL's query, exception messages kept out of the log, bounds of
the timeout and the leeway, settings behind a misspelled prefix."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from flask_caching import Cache
from flask_sqlalchemy import SQLAlchemy

from flask_oauth_verify import OAuthVerify
from flask_oauth_verify.config import (
    MAX_HTTP_TIMEOUT,
    MAX_LEEWAY,
    ConfigurationError,
    Settings,
    UnknownSettingWarning,
)
from flask_oauth_verify.events import short_token_hash, token_validated
from flask_oauth_verify.testing import IssuerServer, TokenIssuer, auth_header

from .conftest import make_app

# -- inspect: a token that is not a bearer token's text --------------------------


@pytest.mark.parametrize(
    ("how", "raw", "kind"),
    [
        ("stdin", b"\xff\xfe.x.y", "a byte that is not UTF-8 text at position 1"),
        ("argv", b"eyJ\xe9.x.y", "a byte that is not UTF-8 text at position 4"),
        ("stdin", b"eyJhbGciOiJSUzI1NiJ9.e30.\xa0AAAA", "not UTF-8 text at position 26"),
        ("stdin", "eyJhbGciOiJSUzI1NiJ9.e30.AAAA\u00e9".encode(), "a non-ASCII character"),
        ("stdin", b"eyJhbGciOiJSUzI1NiJ9.e30.AA\x01AA", "a control character at position 28"),
    ],
)
def test_inspect_refuses_a_token_with_a_stray_byte_without_a_traceback(
    tokens: TokenIssuer, how: str, raw: bytes, kind: str
) -> None:
    """A stray byte copied with the token (Python reads it as a surrogate):
    hashing it for the ``Token sha256:`` line raised UnicodeEncodeError, and
    a strict stdin decoder UnicodeDecodeError — a traceback, not the
    documented verdict. Now the ``format`` step refuses it (exit 1), naming
    where, never printing the token."""
    app = make_app(tokens.config())
    runner = app.test_cli_runner()
    if how == "argv":
        result = runner.invoke(args=["oauth-verify", "inspect", os.fsdecode(raw)])
    else:
        result = runner.invoke(args=["oauth-verify", "inspect", "-"], input=raw + b"\n")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert "[FAIL] format" in result.output
    [verdict] = [line for line in result.output.splitlines() if line.startswith("Result:")]
    assert verdict.startswith("Result: REJECTED — The token holds ")
    assert kind in verdict
    assert "Token sha256:" in result.output
    for part in os.fsdecode(raw).split("."):
        if len(part) > 3:
            assert part not in result.output


def test_a_token_hash_never_raises_on_a_surrogate() -> None:
    assert re.fullmatch(r"[0-9a-f]{12}", short_token_hash(os.fsdecode(b"eyJ\xe9.x.y")))
    assert re.fullmatch(r"[0-9a-f]{12}", short_token_hash("\ud800"))
    assert short_token_hash("abc") == short_token_hash("abc")


# -- a credential in a configured URL's query -------------------------------------


def test_the_cli_masks_the_query_and_fragment_of_a_configured_url(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """``?api_key=...`` on JWKS_URI or INTROSPECTION_ENDPOINT: the health
    route strips the query, the CLI printed it whole (``discover``, ``keys``,
    ``keys --json``), into output that is pasted into tickets."""
    secret = "apikey-SECRET-9f3c"
    with_user = issuer_server.url.replace("http://", "http://reader:pw-Hq27@")
    config = served_tokens.config(
        JWKS_URI=f"{with_user}/jwks?api_key={secret}#frag-{secret}",
        INTROSPECTION_ENDPOINT=f"{issuer_server.url}/introspect?api_key={secret}",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
        STRATEGY="both",
    )
    runner = make_app(config).test_cli_runner()
    for args in (["discover"], ["keys"], ["keys", "--json"], ["keys", "--refresh"]):
        result = runner.invoke(args=["oauth-verify", *args])
        assert result.exit_code == 0, result.output
        assert secret not in result.output, args
        assert "pw-Hq27" not in result.output, args
        assert "reader" not in result.output, args  # a user name may be the key
        assert "://***@127.0.0.1" in result.output, args
        assert "/jwks?***#***" in result.output, args
    output = runner.invoke(args=["oauth-verify", "keys", "--json"]).output
    [entry] = json.loads(output)
    assert entry["source"] == f"{with_user.replace('reader:pw-Hq27', '***')}/jwks?***#***"
    discovered = runner.invoke(args=["oauth-verify", "discover"]).output
    assert f"{issuer_server.url}/introspect?*** (OAUTH_VERIFY_INTROSPECTION_ENDPOINT)" in (
        discovered
    )


# -- exception messages kept out of the log ---------------------------------------


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as a plain logging.Formatter writes it, traceback included."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def _classify_user(claims: Mapping[str, Any]) -> bool:
    header = request.headers["Authorization"]
    try:
        raise LookupError(f"no class for {header}")
    except LookupError as exc:
        raise ValueError(f"cannot classify {header}") from exc


def test_the_fail_closed_net_logs_type_and_frames_not_the_message(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's USER_ID_RULE that raises quoting the Authorization header:
    the safety net refused the token (401) and logged the exception with
    ``logger.exception``, message (the token) included."""
    app = make_app(tokens.config(USER_ID_RULE=_classify_user))
    token = tokens.mint()
    with caplog.at_level(logging.DEBUG):
        response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 401
    logged = _logged(caplog)
    assert "Unexpected error while verifying a token; refused." in logged
    assert token not in logged
    assert token.split(".")[1] not in logged
    # still useful: each exception's type, and where it was raised
    assert "ValueError: (message withheld)" in logged
    assert "LookupError: (message withheld)" in logged
    assert "in _classify_user" in logged
    assert "The above exception was the direct cause" in logged


def test_a_raising_signal_receiver_is_logged_without_its_message(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(tokens.config())
    token = tokens.mint()

    def blocklist(sender: Flask, **fields: Any) -> None:
        raise RuntimeError(f"blocklist down while checking {request.headers['Authorization']}")

    token_validated.connect(blocklist, sender=app)
    try:
        with caplog.at_level(logging.DEBUG):
            response = app.test_client().get("/protected", headers=auth_header(token))
    finally:
        token_validated.disconnect(blocklist, sender=app)
    assert response.status_code == 200
    logged = _logged(caplog)
    assert "A receiver of oauth-verify-token-validated raised" in logged
    assert token not in logged
    assert "RuntimeError: (message withheld)" in logged
    assert "in blocklist" in logged


# -- bounds of HTTP_TIMEOUT and LEEWAY ----------------------------------------------

_REQUIRED = {"OAUTH_VERIFY_ISSUER": "https://issuer.example", "OAUTH_VERIFY_AUDIENCE": "api"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HTTP_TIMEOUT", 1e10),
        ("HTTP_TIMEOUT", (2, 1e300)),
        ("HTTP_TIMEOUT", [301, 5]),
        ("HTTP_TIMEOUT", 300.5),
        ("LEEWAY", 30000),
        ("LEEWAY", 301),
    ],
)
def test_a_timeout_or_leeway_beyond_its_maximum_is_refused_at_init_app(
    tokens: TokenIssuer, key: str, value: Any
) -> None:
    """An HTTP_TIMEOUT beyond threading.TIMEOUT_MAX was accepted, then every
    fetch failed with OverflowError (503 for ever); a LEEWAY meant as
    milliseconds let tokens expired for 8 hours through."""
    app = Flask("bounds")
    app.config.update(tokens.config(**{key: value}))
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key} must be at most 300"):
        OAuthVerify().init_app(app)


def test_the_maximum_timeout_and_leeway_are_accepted() -> None:
    settings = Settings.from_config(
        {**_REQUIRED, "OAUTH_VERIFY_HTTP_TIMEOUT": (300, 300), "OAUTH_VERIFY_LEEWAY": 300}
    )
    assert settings.http_timeout == (MAX_HTTP_TIMEOUT, MAX_HTTP_TIMEOUT)
    assert settings.leeway == MAX_LEEWAY


def test_the_maximums_are_documented() -> None:
    page = (Path(__file__).parents[1] / "docs" / "configuration.rst").read_text()
    for key, maximum in (("LEEWAY", MAX_LEEWAY), ("HTTP_TIMEOUT", MAX_HTTP_TIMEOUT)):
        entry = page.split(f".. data:: OAUTH_VERIFY_{key}\n", 1)[1].split(".. data::", 1)[0]
        assert re.search(rf"at\s+most\s+``{maximum:g}``", entry), key


# -- settings behind a misspelled prefix ----------------------------------------------

_MISSPELLED = [
    ("OAUTH_VERFY_REQUIRED_CLAIM_VALUES", "OAUTH_VERIFY_REQUIRED_CLAIM_VALUES"),
    ("OAUTH_VERIFIY_REQUIRED_CLAIMS", "OAUTH_VERIFY_REQUIRED_CLAIMS"),
    ("OAUTHVERIFY_AUDIENCE", "OAUTH_VERIFY_AUDIENCE"),
    ("OAUTH_VERIFYALLOWED_CLIENT_IDS", "OAUTH_VERIFY_ALLOWED_CLIENT_IDS"),
    ("oauth_verify_required_claims", "OAUTH_VERIFY_REQUIRED_CLAIMS"),
    ("Oauth_Verify_Leeway", "OAUTH_VERIFY_LEEWAY"),
    ("OAUTH-VERIFY-VERIFY-AUDIENCE", "OAUTH_VERIFY_VERIFY_AUDIENCE"),
]

#: Keys of other libraries and of apps, none a typo of a setting here.
_UNRELATED = {
    "CACHE_TYPE": "SimpleCache",
    "CACHE_DEFAULT_TIMEOUT": 300,
    "CACHE_KEY_PREFIX": "app:",
    "CACHE_REDIS_URL": "redis://localhost:6379/0",
    "CACHE_THRESHOLD": 500,
    "CACHE_NO_NULL_WARNING": True,
    "CACHE_IGNORE_ERRORS": False,
    "CACHE_OPTIONS": {},
    "SQLALCHEMY_DATABASE_URI": "sqlite://",
    "SQLALCHEMY_ENGINE_OPTIONS": {},
    "SQLALCHEMY_RECORD_QUERIES": False,
    "OAUTH_ISSUER": "https://other.example",
    "OAUTH_AUDIENCE": "other",
    "OAUTH_VERIFIER": "x",
    "AUTH0_AUDIENCE": "x",
    "JWT_DECODE_LEEWAY": 10,
    "JWT_DECODE_AUDIENCE": "x",
    "VERIFY_AUDIENCE": True,
    "ISSUER": "x",
    "REALM": "x",
}


def test_a_setting_behind_a_misspelled_prefix_is_warned_about(
    tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """``OAUTH_VERFY_REQUIRED_CLAIM_VALUES`` (and other spellings of the
    prefix) was silently ignored: the check it meant stayed off. Flask's,
    Flask-Caching's and Flask-SQLAlchemy's keys, and other libraries', are
    not warned about."""
    app = Flask("misspelled")
    app.config.update(TESTING=True, **tokens.config(), **_UNRELATED)
    app.config.update({typo: ["sub"] for typo, _meant in _MISSPELLED})
    Cache(app)
    SQLAlchemy(app)  # adds its own defaults (SQLALCHEMY_BINDS, ...)
    assert "SQLALCHEMY_BINDS" in app.config
    with (
        caplog.at_level(logging.WARNING, logger="flask_oauth_verify"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        OAuthVerify().init_app(app)
    warned = [str(w.message) for w in caught if issubclass(w.category, UnknownSettingWarning)]
    assert len(warned) == len(_MISSPELLED), warned
    logged = [r.getMessage() for r in caplog.records]
    assert sorted(logged) == sorted(warned)
    for typo, meant in _MISSPELLED:
        [message] = [m for m in warned if m.startswith(repr(typo))]
        assert f"did you mean {meant}?" in message
        assert "start with exactly 'OAUTH_VERIFY_'" in message


def test_an_exception_class_with_odd_attributes_is_still_logged_without_its_message() -> None:
    from flask_oauth_verify.errors import withheld_exc_info

    class Odd(Exception):
        pass

    Odd.__module__ = ["not", "a", "string"]  # type: ignore[assignment]
    try:
        raise Odd("Bearer eyJ-secret")
    except Odd as exc:
        kind, stand_in, _traceback = withheld_exc_info(exc)
    assert "eyJ-secret" not in str(stand_in)
    assert kind.__name__ == "Odd"
