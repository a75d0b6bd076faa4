"""Operations, third pass: error rendering, logging, CLI, multi-app set-ups."""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from flask import Flask, abort, current_app
from flask_caching import Cache
from werkzeug.serving import make_server

from flask_oauth_verify import (
    InsufficientScopeError,
    InvalidTokenError,
    OAuthVerify,
    OAuthVerifyError,
    require_token,
)
from flask_oauth_verify.config import ConfigurationError
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import add_views, free_port, make_app

#: RFC 6750 §3: error_description and scope values are made of these only.
_RFC6750_VALUE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


@contextmanager
def served(app: Flask) -> Iterator[str]:
    """``app`` on a real WSGI server on 127.0.0.1; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


def _attributes(challenge: str) -> dict[str, str]:
    assert challenge.startswith("Bearer ")
    found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', challenge))
    return found


def test_a_non_ascii_description_still_gets_its_401(tokens: TokenIssuer) -> None:
    """A localised message raised by the app's own code (a claims check, a
    view) went into the header as it was: the WSGI server could not encode
    it as Latin-1 and the client got no answer at all."""
    app = make_app(tokens.config())

    @app.get("/localised")
    @require_token
    def localised() -> str:
        raise InvalidTokenError('Jeton refusé \u2013 \u65e5\u672c\u8a9e "x" \\ y')

    @app.get("/scoped")
    @require_token
    def scoped() -> str:
        raise InsufficientScopeError("Portée manquante", scopes=["lire:\u00e9t\u00e9", 'a"b\\c'])

    with served(app) as base:
        response = requests.get(base + "/localised", headers=auth_header(tokens.mint()), timeout=5)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.json()["message"].startswith("Jeton refusé \u2013")  # the body keeps it
        attributes = _attributes(response.headers["WWW-Authenticate"])
        assert attributes["error"] == "invalid_token"
        description = attributes["error_description"]
        assert _RFC6750_VALUE.fullmatch(description), description
        assert description.startswith("Jeton refuse ? ??? 'x' / y")

        response = requests.get(base + "/scoped", headers=auth_header(tokens.mint()), timeout=5)
        assert response.status_code == 403
        attributes = _attributes(response.headers["WWW-Authenticate"])
        assert attributes["error"] == "insufficient_scope"
        assert attributes["error_description"] == "Portee manquante"
        assert _RFC6750_VALUE.fullmatch(attributes["scope"]), attributes["scope"]


def test_a_challenges_realm_argument_is_reduced_to_ascii() -> None:
    challenge = InvalidTokenError().challenge("caf\u00e9 \u2603\r\n")
    assert challenge.startswith('Bearer realm="cafe ?  ", ')
    challenge.encode("ascii")


# -- secrets and tokens never leave the process in logs, output or repr ------------

_SECRET = "rs-secret-Zq81vXw"
_BEARER = "introspect-bearer-Kp07yTn"


def _intro_config(issuer: TokenIssuer, strategy: str, auth: str, **extra: Any) -> dict[str, object]:
    config = issuer.config(
        STRATEGY=strategy,
        INTROSPECTION_AUTH=auth,
        METRICS=True,
        METRICS_ENDPOINT=True,
        HEALTH_ROUTE=True,
        **extra,
    )
    if auth == "bearer":
        config["OAUTH_VERIFY_INTROSPECTION_TOKEN"] = _BEARER
    else:
        config["OAUTH_VERIFY_INTROSPECTION_CLIENT_ID"] = "resource-server"
        config["OAUTH_VERIFY_INTROSPECTION_CLIENT_SECRET"] = _SECRET
    return config


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [secret for secret in secrets if secret in text]


def test_no_token_or_credential_in_any_log_record_output_or_repr(
    served_tokens: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """A full request cycle of every strategy and client-authentication method
    (valid, expired, forged, inactive, rejected credentials), the health and
    metrics routes and the CLI, with every logger at DEBUG: no record, no
    response and no command output holds a token, an Authorization header
    value or the introspection credential; ``repr(Settings)`` shows it as
    ``'***'``."""
    issuer = served_tokens
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    tokens = [
        issuer.mint(scopes=["read:users"]),
        issuer.mint(expires_in=-600),
        issuer.mint()[:-6] + "AAAAAA",
        issuer.mint_opaque(scopes=["read:users"]),
    ]
    revoked = issuer.mint_opaque()
    issuer.revoke(revoked)
    tokens.append(revoked)
    secrets = [
        _SECRET,
        _BEARER,
        base64.b64encode(f"resource-server:{_SECRET}".encode()).decode(),
        *tokens,
        *(token.rsplit(".", 1)[-1] for token in tokens if token.count(".") == 2),
    ]
    outputs: list[str] = []
    for strategy, auth in [
        ("jwks", "client_secret_basic"),
        ("introspection", "client_secret_basic"),
        ("auto", "client_secret_post"),
        ("both", "bearer"),
    ]:
        issuer.introspection_auth = auth
        issuer.introspection_bearer = _BEARER
        issuer.introspection_credentials = ("resource-server", _SECRET)
        app = make_app(_intro_config(issuer, strategy, auth), name=f"sweep_{strategy}")
        settings = app.extensions["oauth_verify"].settings
        assert not _leaks(repr(settings), secrets), strategy
        assert "'***'" in repr(settings)
        client = app.test_client()
        for token in tokens:
            response = client.get("/read", headers=auth_header(token))
            outputs.append(response.get_data(as_text=True) + str(response.headers))
        outputs.append(client.get("/read").get_data(as_text=True))
        outputs.append(client.get("/health/token-validation").get_data(as_text=True))
        outputs.append(client.get("/metrics").get_data(as_text=True))
        runner = app.test_cli_runner()
        for args, stdin in [
            (["inspect", "-"], tokens[0]),
            (["inspect", "-"], tokens[3]),
            (["keys"], None),
            (["discover"], None),
        ]:
            outputs.append(runner.invoke(args=["oauth-verify", *args], input=stdin).output)
    # credentials the endpoint rejects: the failure is logged, not the secret
    issuer.introspection_auth = "client_secret_basic"
    issuer.introspection_credentials = ("resource-server", "another-one")
    app = make_app(_intro_config(issuer, "introspection", "client_secret_post"), name="rejected")
    response = app.test_client().get("/read", headers=auth_header(tokens[3]))
    assert response.status_code == 503
    outputs.append(response.get_data(as_text=True))

    assert len(caplog.records) > 50  # the sweep did log
    for record in caplog.records:
        text = " ".join(
            [record.getMessage(), repr(record.__dict__), record.exc_text or "", str(record.args)]
        )
        assert not _leaks(text, secrets), (record.name, record.getMessage())
    for output in outputs:
        assert not _leaks(output, secrets), output


def test_a_status_code_handler_is_not_called_for_the_librarys_errors(
    tokens: TokenIssuer,
) -> None:
    """As docs/errors.rst says: ``@app.errorhandler(401)`` handles werkzeug's
    ``Unauthorized`` (``abort(401)``); the library's errors keep their own
    response, and a handler for the class takes them."""
    app = make_app(tokens.config())

    @app.errorhandler(401)
    def by_code(error: Exception) -> tuple[dict[str, str], int]:
        return {"handled": "by code"}, 401

    @app.get("/abort")
    def aborted() -> str:
        abort(401)

    client = app.test_client()
    assert client.get("/abort").json == {"handled": "by code"}
    response = client.get("/protected", headers=auth_header(tokens.mint(expires_in=-600)))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "token_expired"
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="api", error=')

    app = make_app(tokens.config(), name="by_class")

    @app.errorhandler(InvalidTokenError)
    def by_class(error: InvalidTokenError) -> tuple[dict[str, str], int]:
        return {"handled": error.error}, 401

    response = app.test_client().get(
        "/protected", headers=auth_header(tokens.mint(expires_in=-600))
    )
    assert response.json == {"handled": "token_expired"}


def test_a_base_class_handler_registered_before_init_app_is_kept(tokens: TokenIssuer) -> None:
    """An app factory that sets up its error handlers before its extensions:
    ``init_app`` filed its own handler over the app's, which was never called."""
    app = Flask("handlers_first")
    app.config.update(TESTING=True, **tokens.config())

    @app.errorhandler(OAuthVerifyError)
    def mine(error: OAuthVerifyError) -> tuple[dict[str, str], int]:
        return {"mine": error.error}, error.status_code

    OAuthVerify().init_app(app)
    add_views(app)
    client = app.test_client()
    assert client.get("/protected").json == {"mine": "unauthorized"}
    expired = client.get("/protected", headers=auth_header(tokens.mint(expires_in=-600)))
    assert expired.json == {"mine": "token_expired"}
    # Flask files a base-class handler under its own status (401) only, as
    # docs/errors.rst says: a 403 still gets the library's response.
    denied = client.get("/read", headers=auth_header(tokens.mint(scopes=["other"])))
    assert denied.status_code == 403
    assert denied.json is not None and denied.json["error"] == "insufficient_scope"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"HEALTH_ROUTE": "/health/<check>"}, "OAUTH_VERIFY_HEALTH_ROUTE"),
        (
            {"METRICS": True, "METRICS_ENDPOINT": "/metrics/<int:n>"},
            "OAUTH_VERIFY_METRICS_ENDPOINT",
        ),
        (
            {"HEALTH_ROUTE": True, "METRICS": True, "METRICS_ENDPOINT": "/health/token-validation"},
            "OAUTH_VERIFY_METRICS_ENDPOINT and OAUTH_VERIFY_HEALTH_ROUTE",
        ),
    ],
)
def test_a_route_setting_that_cannot_work_fails_at_init_app(
    tokens: TokenIssuer, settings: dict[str, Any], named: str
) -> None:
    """A rule with a <variable> made every call of the route a 500 (the view
    takes no argument); the same path for metrics and health served one of
    them only. Both are refused at ``init_app``, naming the keys."""
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        make_app(tokens.config(**settings))


@pytest.mark.parametrize("strategy", ["introspection", "auto", "both"])
def test_discover_fails_when_the_strategy_has_no_introspection_endpoint(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, strategy: str
) -> None:
    """``discover`` said nothing was wrong (exit 0) for an introspection API
    whose issuer is unreachable, and asked for a JWKS URI it does not use."""
    config = _intro_config(served_tokens, strategy, "client_secret_basic")
    config.pop("OAUTH_VERIFY_JWKS_URI")
    runner = make_app(config, name=f"reachable_{strategy}").test_cli_runner()
    result = runner.invoke(args=["oauth-verify", "discover"])
    assert result.exit_code == 0, result.output
    assert "introspection_endpoint: " in result.output

    config["OAUTH_VERIFY_ISSUER"] = f"http://127.0.0.1:{free_port()}"  # nobody listens
    runner = make_app(config, name=f"unreachable_{strategy}").test_cli_runner()
    result = runner.invoke(args=["oauth-verify", "discover"])
    assert result.exit_code == 1, result.output
    assert f"No introspection endpoint, which strategy {strategy!r} needs" in result.output
    if strategy == "introspection":
        assert "jwks_uri: not found (not used: strategy 'introspection')" in result.output

    # published by no issuer, though the issuer answers
    issuer_server.route(
        "/.well-known/openid-configuration",
        Reply(200, {"issuer": served_tokens.issuer, "jwks_uri": f"{issuer_server.url}/jwks"}),
    )
    config["OAUTH_VERIFY_ISSUER"] = served_tokens.issuer
    runner = make_app(config, name=f"unpublished_{strategy}").test_cli_runner()
    result = runner.invoke(args=["oauth-verify", "discover"])
    assert result.exit_code == 1, result.output
    assert "introspection_endpoint: not published" in result.output


def test_a_claims_check_is_shared_by_every_app_of_the_extension(tokens: TokenIssuer) -> None:
    """As docs/views.rst says: checks belong to the extension object; one
    registered once, reading ``current_app.config``, serves each app with
    that app's own settings."""
    oauth = OAuthVerify()

    @oauth.claims_check
    def organization_allowed(claims: Mapping[str, Any]) -> bool:
        return claims.get("oid") in current_app.config["ALLOWED_ORGANIZATIONS"]

    apps = []
    for name, allowed in [("app_a", ["org_a"]), ("app_b", ["org_b"])]:
        app = Flask(name)
        app.config.update(tokens.config(), ALLOWED_ORGANIZATIONS=allowed)
        oauth.init_app(app)
        add_views(app)
        apps.append(app)
    app_a, app_b = (app.test_client() for app in apps)
    token_a = auth_header(tokens.mint(organization_id="org_a"))
    assert app_a.get("/protected", headers=token_a).status_code == 200
    assert app_b.get("/protected", headers=token_a).status_code == 401
    token_b = auth_header(tokens.mint(organization_id="org_b"))
    assert app_b.get("/protected", headers=token_b).status_code == 200
    assert app_a.get("/protected", headers=token_b).status_code == 401


def test_the_cli_never_prints_a_password_of_a_configured_url(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """A JWKS URI or introspection endpoint may carry a credential in its
    user-info (requests sends it as Basic auth); ``discover`` and ``keys``
    printed it as configured."""
    password = "url-pass-Hq27"
    with_password = issuer_server.url.replace("http://", f"http://reader:{password}@")
    config = served_tokens.config(
        JWKS_URI=f"{with_password}/jwks",
        INTROSPECTION_ENDPOINT=f"{with_password}/introspect",
    )
    runner = make_app(config).test_cli_runner()
    for args in (["discover"], ["keys"], ["keys", "--json"], ["keys", "--refresh"]):
        result = runner.invoke(args=["oauth-verify", *args])
        assert result.exit_code == 0, result.output
        assert password not in result.output, args
        assert "reader" not in result.output, args  # a user name may be the key
        assert "://***@127.0.0.1" in result.output, args


@pytest.mark.parametrize("require_cache", [False, True])
def test_a_cache_never_initialised_for_the_app_is_a_cache_problem_in_health(
    served_tokens: TokenIssuer, require_cache: bool
) -> None:
    """``oauth.init_app(app, cache=cache)`` without ``cache.init_app(app)``:
    requests work (per-process caching), but the health check raised inside
    (KeyError) and answered 503 whatever HEALTH_REQUIRE_CACHE said."""
    cache = Cache()  # never init_app'ed on this app
    app = Flask(f"uninitialised_cache_{require_cache}")
    app.config.update(
        TESTING=True,
        **served_tokens.config(HEALTH_ROUTE=True, HEALTH_REQUIRE_CACHE=require_cache),
    )
    OAuthVerify().init_app(app, cache=cache)
    add_views(app)
    client = app.test_client()
    assert client.get("/protected", headers=auth_header(served_tokens.mint())).status_code == 200
    response = client.get("/health/token-validation")
    body = response.json
    assert body is not None
    assert body["checks"]["cache"]["status"] == "unreachable"
    said = body.get("error", "") if require_cache else " ".join(body.get("warnings", []))
    assert "cache.init_app(app)" in said, body
    assert response.status_code == (503 if require_cache else 200), body
