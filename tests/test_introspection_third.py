"""Third pass on introspection (RFC 7662) and the "auto" / "both" strategies."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, g, request

from flask_oauth_verify import (
    ConfigurationError,
    OAuthVerify,
    require_organization,
    require_scope,
    require_token,
    require_user,
    verify_request,
)
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import FakeClock, make_app
from .test_introspection import (
    INTROSPECT,
    Gate,
    _redis_app,
    assert_401,
    assert_503,
    hits,
    intro_config,
    one_flight,
    scripted,
    server_of,
)


@pytest.fixture
def issuer(issuer_server: IssuerServer) -> TokenIssuer:
    tokens = TokenIssuer(alg="ES256", audience="api")
    tokens.serve(issuer_server)
    return tokens


# -- a check with the app's default strategy after a weaker one ---------------


def test_the_default_strategy_is_not_satisfied_by_a_weaker_check_made_earlier(
    issuer: TokenIssuer,
) -> None:
    """An app whose default is "both": a blueprint-wide ``verify_request`` with
    the cheap "jwks" must not stand in for the view's own ``@require_token``
    (the app's "both"), or a revoked JWT would pass the revocation-sensitive
    view. A check with the same or a stronger strategy is still reused."""
    app = make_app(intro_config(issuer, STRATEGY="both"))

    @app.before_request
    def everywhere() -> None:
        if request.path.startswith("/area/"):
            verify_request(strategy="jwks")

    @app.get("/area/pay")
    @require_token
    def pay() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    @app.get("/area/stacked")
    @require_token(strategy="jwks")
    @require_scope("read:users")
    def stacked() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    @app.get("/local")
    @require_token(strategy="jwks")
    @require_scope("read:users", strategy="jwks")
    def local() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    @app.get("/area/strong-first")
    @require_token(strategy="both")
    @require_token
    def strong_first() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    client = app.test_client()
    token = issuer.mint(subject="user_p", scopes=["read:users"])
    assert client.get("/local", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 0  # kept on "jwks" by each of its decorators
    for path in ("/area/pay", "/area/stacked"):
        assert client.get(path, headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 2
    assert client.get("/area/strong-first", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 3  # "both" once: the default check reused it
    issuer.revoke(token)
    for path in ("/area/pay", "/area/stacked", "/area/strong-first"):
        assert_401(client.get(path, headers=auth_header(token)))


@pytest.mark.parametrize("default", ["jwks", "both", "auto", "introspection"])
def test_a_check_without_strategy_follows_the_route_decorator_above_it(
    issuer: TokenIssuer, default: str
) -> None:
    """``@require_scope("read:users")`` under ``@require_token(strategy=
    "introspection")``: one introspection, never a JWT check of an opaque
    token, whatever the app's default."""
    app = make_app(intro_config(issuer, STRATEGY=default))

    @app.get("/partner")
    @require_token(strategy="introspection")
    @require_scope("read:users")
    def partner() -> dict[str, Any]:
        return {"subject": g.auth.subject}

    client = app.test_client()
    token = issuer.mint_opaque(subject="user_o", scopes=["read:users"])
    response = client.get("/partner", headers=auth_header(token))
    assert response.json == {"subject": "user_o"}
    assert hits(issuer) == 1


def test_the_default_introspection_is_not_satisfied_by_an_earlier_auto(
    issuer: TokenIssuer,
) -> None:
    app = make_app(intro_config(issuer, STRATEGY="introspection"))

    @app.before_request
    def everywhere() -> None:
        verify_request(strategy="auto")  # a JWT: checked locally only

    client = app.test_client()
    token = issuer.mint(subject="user_a")
    response = client.get("/protected", headers=auth_header(token))
    assert response.json is not None and response.json["strategy"] == "introspection"
    issuer.revoke(token)
    assert_401(client.get("/protected", headers=auth_header(token)))


def test_require_organization_keeps_the_strategy_of_the_decorator_above_it(
    issuer: TokenIssuer,
) -> None:
    """``@require_organization`` refines the route's decorator: on a "jwks" app,
    under ``strategy="introspection"``, an opaque token is not checked again
    with the (impossible) default."""
    app = make_app(intro_config(issuer, STRATEGY="jwks"))

    @app.get("/tenant")
    @require_scope("read:users", strategy="introspection")
    @require_organization
    @require_user
    def tenant() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    @app.get("/tenant-alone")
    @require_organization
    def tenant_alone() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    client = app.test_client()
    opaque = issuer.mint_opaque(scopes=["read:users"], organization_id="org_9")
    response = client.get("/tenant", headers=auth_header(opaque))
    assert response.json == {"organization_id": "org_9"}
    assert hits(issuer) == 1
    jwt = issuer.mint(organization_id="org_8")
    response = client.get("/tenant-alone", headers=auth_header(jwt))
    assert response.json == {"organization_id": "org_8"}
    assert hits(issuer) == 1  # alone: the app's default, "jwks"
    assert_401(client.get("/tenant-alone", headers=auth_header(opaque)))


def test_a_class_based_views_method_decorator_is_the_check_above(issuer: TokenIssuer) -> None:
    """``@require_token(strategy="jwks")`` over ``@require_organization`` on a
    ``MethodView`` method refines like on a function view: no second check
    with the app's default ("both" here), for ``GET`` and for ``HEAD``."""
    from flask.views import MethodView, View

    app = make_app(intro_config(issuer, STRATEGY="both"))

    @app.get("/fn")
    @require_token(strategy="jwks")
    @require_organization
    def fn() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    class Tenant(MethodView):
        @require_token(strategy="jwks")
        @require_organization
        def get(self) -> dict[str, Any]:
            return {"organization_id": g.auth.organization_id}

        @require_organization  # alone: the app's default
        def post(self) -> dict[str, Any]:
            return {"organization_id": g.auth.organization_id}

    class Plain(View):
        @require_token(strategy="jwks")
        @require_organization
        def dispatch_request(self) -> dict[str, Any]:
            return {"organization_id": g.auth.organization_id}

    class Helper(View):
        """A plain View: its method named ``get`` is a helper, not the handler."""

        @require_token(strategy="jwks")
        def get(self) -> None:
            return None

        @require_organization
        def tenant(self) -> dict[str, Any]:
            return {"organization_id": g.auth.organization_id}

        def dispatch_request(self) -> dict[str, Any]:
            self.get()
            return self.tenant()

    app.add_url_rule("/mv", view_func=Tenant.as_view("mv"))
    app.add_url_rule("/view", view_func=Plain.as_view("view"))
    app.add_url_rule("/helper", view_func=Helper.as_view("helper"))
    client = app.test_client()
    token = issuer.mint(organization_id="org_7")
    issuer.revoke(token)  # only "both" or "introspection" would notice
    for path in ("/fn", "/mv", "/view"):
        response = client.get(path, headers=auth_header(token))
        assert response.json == {"organization_id": "org_7"}, path
    assert client.head("/mv", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 0
    assert_401(client.post("/mv", headers=auth_header(token)))
    assert hits(issuer) == 1
    assert_401(client.get("/helper", headers=auth_header(token)))  # the app's "both"
    assert hits(issuer) == 2


def test_an_introspection_route_never_takes_the_jwt_context_a_both_route_cached(
    issuer: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """A "both" route caches the verified JWT's context once the endpoint
    confirmed it active; an "introspection" route must be decided by the
    answer's own claims (here: narrower scope), whichever route came first."""
    issuer_server.route(
        INTROSPECT,
        Reply(200, {"active": True, "sub": "user_1", "scope": "profile", "client_id": "c"}),
    )
    app = make_app(intro_config(issuer, STRATEGY="jwks", INTROSPECTION_CACHE_TTL=30))

    @app.get("/both-read")
    @require_scope("read", strategy="both")
    def both_read() -> dict[str, Any]:
        return {"strategy": g.auth.strategy}

    @app.get("/introspected-read")
    @require_scope("read", strategy="introspection")
    def introspected_read() -> dict[str, Any]:
        return {"strategy": g.auth.strategy}

    client = app.test_client()
    token = issuer.mint(scopes=["read"])
    both = client.get("/both-read", headers=auth_header(token))
    assert (both.status_code, both.json) == (200, {"strategy": "jwks"})
    answered = client.get("/introspected-read", headers=auth_header(token))
    assert answered.status_code == 403, "the answer's scope decides, not the JWT's"
    assert client.get("/both-read", headers=auth_header(token)).status_code == 200


def _hook_calling_verify_request() -> None:
    verify_request(strategy="jwks", optional=True)


@require_token(strategy="jwks", optional=True)
def _hook_decorated_with_require_token() -> None:
    return None


@pytest.mark.parametrize("default", ["both", "introspection"])
@pytest.mark.parametrize("refinement", [require_organization, require_user])
@pytest.mark.parametrize(
    "hook",
    [_hook_calling_verify_request, _hook_decorated_with_require_token],
    ids=["verify_request", "decorated hook"],
)
def test_require_organization_alone_is_not_satisfied_by_a_weaker_hook_check(
    issuer: TokenIssuer, default: str, refinement: Callable[..., Any], hook: Callable[[], None]
) -> None:
    """Alone, ``@require_organization`` / ``@require_user`` use the app's default:
    a "jwks" check in a ``before_request`` — ``verify_request()``, or a hook
    function decorated with ``@require_token`` — is no check above them to
    refine, and must not let a revoked token through."""
    app = make_app(intro_config(issuer, STRATEGY=default))
    app.before_request(hook)

    @app.get("/alone")
    @refinement
    def alone() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    @app.get("/refined")
    @require_token(strategy="jwks")
    @refinement
    def refined() -> dict[str, Any]:
        return {"organization_id": g.auth.organization_id}

    client = app.test_client()
    token = issuer.mint(subject="user_r", organization_id="org_r")
    assert client.get("/alone", headers=auth_header(token)).json == {"organization_id": "org_r"}
    assert hits(issuer) == 1  # the app's default asked the endpoint
    assert client.get("/refined", headers=auth_header(token)).status_code == 200
    assert hits(issuer) == 1  # under the route's own "jwks" decorator: refined, not re-checked
    issuer.revoke(token)
    assert_401(client.get("/alone", headers=auth_header(token)))
    assert client.get("/refined", headers=auth_header(token)).status_code == 200  # "jwks" asked


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"iss": "https://other.example"}, 401),
        ({"scope": None, "scopes": ["read:users", "x"]}, 200),
        ({"aud": ["x", "api"]}, 200),
        ({"aud": "x"}, 401),
        ({"aud": None}, 200),
        ({"exp": "9999999999"}, 401),
        ({"iat": 1.5}, 200),
        ({"active": "true"}, 401),
        ({"active": 1}, 401),
        ({"active": None}, 401),
    ],
)
def test_answer_members_are_checked_like_claims(
    issuer: TokenIssuer, answer: dict[str, Any], status: int
) -> None:
    def body(claims: dict[str, Any]) -> dict[str, Any]:
        out = {"active": True, **claims, **answer}
        return {k: v for k, v in out.items() if v is not None}

    scripted(issuer, body)
    client = make_app(intro_config(issuer)).test_client()
    r = client.get("/protected", headers=auth_header("opaque-tok"))
    assert r.status_code == status, r.json


def test_a_fractional_exp_caps_the_cached_answer(issuer: TokenIssuer, clock: FakeClock) -> None:
    exp = clock.now + 10.5
    scripted(issuer, lambda c: {**c, "active": True, "exp": exp})
    client = make_app(intro_config(issuer, INTROSPECTION_CACHE_TTL=300), clock=clock).test_client()
    assert client.get("/protected", headers=auth_header("tok")).status_code == 200
    clock.advance(10)
    assert client.get("/protected", headers=auth_header("tok")).status_code == 200
    assert hits(issuer) == 1
    clock.advance(0.6)  # past exp: asked again (and still within LEEWAY)
    assert client.get("/protected", headers=auth_header("tok")).status_code == 200
    assert hits(issuer) == 2
    clock.advance(30)
    assert_401(client.get("/protected", headers=auth_header("tok")), "token_expired")


def test_an_inactive_answer_is_reused_for_the_negative_ttl_only(
    issuer: TokenIssuer, clock: FakeClock
) -> None:
    client = make_app(
        intro_config(issuer, INTROSPECTION_CACHE_TTL=300, INTROSPECTION_NEGATIVE_CACHE_TTL=5),
        clock=clock,
    ).test_client()
    assert client.get("/protected", headers=auth_header("unknown")).status_code == 401
    issuer.opaque["unknown"] = issuer.claims()
    assert client.get("/protected", headers=auth_header("unknown")).status_code == 401
    assert hits(issuer) == 1
    clock.advance(5)
    assert client.get("/protected", headers=auth_header("unknown")).status_code == 200
    assert hits(issuer) == 2


def test_auto_sends_only_jws_shaped_tokens_to_jwks(issuer: TokenIssuer) -> None:
    client = make_app(intro_config(issuer, STRATEGY="auto")).test_client()
    assert client.get("/protected", headers=auth_header("eyJhbGciOi.eyJ.sig")).status_code == 401
    assert hits(issuer) == 0
    issuer.opaque["abc.def.ghi"] = issuer.claims()
    assert client.get("/protected", headers=auth_header("abc.def.ghi")).status_code == 200
    assert hits(issuer) == 1


def test_the_token_is_never_logged_nor_stored_in_clear(
    issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, redis_url: str
) -> None:
    import redis

    app = _redis_app(
        "api",
        intro_config(issuer, INTROSPECTION_CACHE_TTL=30, INTROSPECTION_NEGATIVE_CACHE_TTL=30),
        redis_url,
    )
    token = issuer.mint_opaque()
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        client.get("/protected", headers=auth_header(token))
        client.get("/protected", headers=auth_header(token + "x"))
        server_of(issuer).route(INTROSPECT, Reply(500, {"token": token + "y"}))
        client.get("/protected", headers=auth_header(token + "y"))
        server_of(issuer).route(INTROSPECT, Reply(400, token + "z"))
        client.get("/protected", headers=auth_header(token + "z"))
    assert token not in caplog.text
    conn = redis.Redis.from_url(redis_url)
    keys = conn.keys("*")
    assert len(keys) >= 2  # the active and the inactive answer
    for key in keys:
        assert token.encode() not in key
        assert token.encode() not in (conn.dump(key) or b"")


# -- "both": the answer confirms the JWT, whose claims the request gets ---------


def minimal_answers(issuer: TokenIssuer) -> None:
    """Answer like VoxKey's documented example: no ``aud``, no custom claims."""
    answer = {"active": True, "sub": "user_v", "client_id": "client-1", "scope": "read:users"}
    server_of(issuer).route(INTROSPECT, Reply(200, answer))


@pytest.mark.parametrize(
    "config",
    [
        {"REQUIRED_CLAIMS": ["exp", "aud", "tenant"]},
        {"REQUIRED_CLAIM_VALUES": {"tenant": "t1"}},
        {"ALLOWED_CLIENT_IDS": ["client-1"]},
        {"CLAIMS_CHECK": True},
    ],
)
def test_both_accepts_a_minimal_answer_for_a_jwt_that_passed_the_configured_checks(
    issuer: TokenIssuer, clock: FakeClock, config: dict[str, Any]
) -> None:
    minimal_answers(issuer)
    with_check = config.pop("CLAIMS_CHECK", False)
    app = make_app(
        intro_config(issuer, STRATEGY="both", INTROSPECTION_CACHE_TTL=60, **config), clock=clock
    )
    if with_check:
        get_state(app).claims_checks.append(lambda claims: claims.get("tenant") == "t1")
    client = app.test_client()
    token = issuer.mint(subject="user_v", tenant="t1", scopes=["read:users", "write:users"])
    for _ in range(2):  # the second from the caches
        response = client.get("/protected", headers=auth_header(token))
        assert response.status_code == 200, response.json
        assert response.json is not None
        # the JWT's claims, not the answer's
        assert response.json["scopes"] == ["read:users", "write:users"]
        assert response.json["strategy"] == "jwks"
    assert hits(issuer) == 1
    # the configured checks still refuse a JWT that fails them, without a call
    assert_401(client.get("/protected", headers=auth_header(issuer.mint(tenant="t2", aud=None))))
    assert hits(issuer) == 1


@pytest.mark.parametrize(
    ("member", "error"),
    [
        ({"active": False}, "invalid_token"),
        ({"iss": "https://other.example.test"}, "invalid_token"),
        ({"aud": "another-api"}, "invalid_token"),
        ({"exp": 1}, "token_expired"),
        ({"token_type": "refresh_token"}, "invalid_token"),
    ],
)
def test_both_still_checks_what_the_answer_does_carry(
    issuer: TokenIssuer, member: dict[str, Any], error: str
) -> None:
    answer = {"active": True, "sub": "user_v", **member}
    server_of(issuer).route(INTROSPECT, Reply(200, answer))
    client = make_app(intro_config(issuer, STRATEGY="both")).test_client()
    assert_401(client.get("/protected", headers=auth_header(issuer.mint())), error)


# -- the endpoint discovered from several issuers --------------------------------


@pytest.mark.parametrize("status", [500, 503, 404])
def test_an_issuer_whose_discovery_is_down_does_not_hand_its_tokens_to_the_next(
    issuer: TokenIssuer, status: int
) -> None:
    """ISSUER = [A, B], the endpoint discovered ("the first that publishes
    one"). While A's metadata cannot be had (an outage), A's tokens — and our
    client credentials — must not go to B's endpoint, whose "inactive" would
    be a 401 (and cached as one) where a 503 is due. An A that answers, but
    publishes no metadata (404), is passed over as before."""
    with IssuerServer() as first:
        for path in (
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
        ):
            first.route(path, Reply(status, {"error": "x"}))
        config = intro_config(issuer, HEALTH_ROUTE=True)
        config["OAUTH_VERIFY_ISSUER"] = [first.url, issuer.issuer]
        del config["OAUTH_VERIFY_JWKS_URI"]
        client = make_app(config).test_client()
        response = client.get("/protected", headers=auth_header(issuer.mint_opaque()))
        # the health check names the endpoint the requests use
        health = client.get("/health/token-validation").get_json()["checks"]["introspection"]
        if status == 404:
            assert response.status_code == 200
            assert health["endpoint"] == f"{issuer.issuer}/introspect"
        else:
            assert_503(response)
            assert health["status"] == "unavailable"
            assert hits(issuer) == 0


# -- the request on the wire -------------------------------------------------------


@pytest.mark.parametrize("body", ["form", "json"])
def test_a_token_and_credentials_with_form_special_characters_arrive_intact(
    issuer: TokenIssuer, body: str
) -> None:
    """``+``, ``/``, ``=`` and ``~`` are b64token characters; ``&``, ``=``,
    ``%``, ``+`` and a space in the client secret must survive the body
    encoding of ``client_secret_post``."""
    issuer.introspection_credentials = ("rs&id=1 +", "s%e&c=r+e t/é")
    issuer.introspection_auth = "client_secret_post"
    token = "ab+cd/ef~gh=="
    issuer.opaque[token] = issuer.claims(subject="user_w")
    client = make_app(
        intro_config(issuer, INTROSPECTION_AUTH="client_secret_post", INTROSPECTION_BODY=body)
    ).test_client()
    response = client.get("/protected", headers=auth_header(token))
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["subject"] == "user_w"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"nbf": 4102444800}, "token_not_active"),
        ({"exp": 1.5}, "token_expired"),
        ({"exp": None}, "invalid_token"),
        ({"scope": 7}, "invalid_token"),
        ({"sub": 12345}, "invalid_token"),
    ],
)
def test_answer_members_of_the_wrong_kind_are_refused(
    issuer: TokenIssuer, answer: dict[str, Any], error: str
) -> None:
    scripted(issuer, lambda c: {**c, "active": True, **answer})
    client = make_app(intro_config(issuer)).test_client()
    assert_401(client.get("/protected", headers=auth_header("opaque-tok")), error)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(
            200,
            b"eyJhbGciOiJSUzI1NiJ9.eyJhY3RpdmUiOnRydWV9.c2ln",
            {"Content-Type": "application/token-introspection+jwt"},
        ),
        Reply(200, {"active": True, "pad": "x" * 2_000_000}),
        Reply(200, [{"active": True}]),
        Reply(200, "true"),
    ],
)
def test_answers_that_are_not_a_json_object_are_a_503(
    issuer: TokenIssuer, reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9701's JWT answer is never asked for (``Accept: application/json``):
    one sent anyway is no answer we can read. So is one past the size cap,
    and the log says which kind of failure it was, as documented."""
    server_of(issuer).route(INTROSPECT, reply)
    client = make_app(intro_config(issuer)).test_client()
    with caplog.at_level(logging.ERROR, logger="flask_oauth_verify.introspection"):
        assert_503(client.get("/protected", headers=auth_header("opaque-tok")))
    assert "Token introspection failed (invalid_response)" in caplog.text


# -- concurrency ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["both", "auto"])
def test_concurrent_requests_with_one_token_make_one_call_under_both_and_auto(
    issuer: TokenIssuer, strategy: str
) -> None:
    gate = Gate(issuer)
    server = server_of(issuer)
    server.route(INTROSPECT, gate)
    app = make_app(intro_config(issuer, STRATEGY=strategy))
    token = issuer.mint(subject="user_c") if strategy == "both" else issuer.mint_opaque()
    results = one_flight(app, server, gate, token, 5)
    assert [status for status, _body in results] == [200] * 5


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["LEEWAY", "INTROSPECTION_CACHE_TTL", "INTROSPECTION_NEGATIVE_CACHE_TTL", "HTTP_TIMEOUT"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400])
def test_a_number_setting_must_be_finite(issuer: TokenIssuer, key: str, value: float) -> None:
    """NaN compares False with everything: a LEEWAY of NaN accepted a token
    expired an hour before (``exp + NaN <= now`` is False). Flask's
    ``from_prefixed_env`` reads ``NaN`` and ``Infinity`` as JSON numbers."""
    with pytest.raises(ConfigurationError, match=f"OAUTH_VERIFY_{key} must be a finite number"):
        make_app(intro_config(issuer, **{key: value}))


def test_a_nan_leeway_read_from_the_environment_is_refused(
    issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_OAUTH_VERIFY_LEEWAY", "NaN")
    app = Flask("env")
    app.config.update(intro_config(issuer))
    app.config.from_prefixed_env()
    assert math.isnan(app.config["OAUTH_VERIFY_LEEWAY"])
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_LEEWAY"):
        OAuthVerify(app)


@pytest.mark.parametrize("bearer", ["tok\n", "tok\r\nX-Injected: 1", "t\u20acst", "two words"])
def test_an_introspection_token_no_header_can_carry_is_named_as_misconfigured(
    issuer: TokenIssuer, bearer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A newline left by a secrets file, say: 503 and a log that names the
    setting (it was the undocumented kind ``fetch_failed``: InvalidHeader)."""
    app = make_app(intro_config(issuer, INTROSPECTION_AUTH="bearer", INTROSPECTION_TOKEN=bearer))
    with caplog.at_level(logging.ERROR, logger="flask_oauth_verify.introspection"):
        assert_503(app.test_client().get("/protected", headers=auth_header("opaque-tok")))
    assert "Token introspection failed (misconfigured)" in caplog.text
    assert "OAUTH_VERIFY_INTROSPECTION_TOKEN" in caplog.text
    assert hits(issuer) == 0
