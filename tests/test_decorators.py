"""Decorators: bare and called, scopes, optional, methods, async views."""

from __future__ import annotations

from typing import Any, assert_type

import pytest
from flask import Flask, g, request

from flask_oauth_verify import (
    AuthContext,
    OAuthVerify,
    current_auth,
    get_auth,
    require_organization,
    require_scope,
    require_token,
    require_user,
    verify_request,
)
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app


@pytest.fixture
def scoped_app(tokens: TokenIssuer) -> Flask:
    app = Flask(__name__)
    app.config.update(tokens.config())
    oauth = OAuthVerify(app)

    @app.get("/all")
    @require_scope("read:users", "write:users")
    def all_scopes() -> str:
        return "ok"

    @app.get("/any")
    @require_scope("read:users", "admin", any_of=True)
    def any_scope() -> str:
        return "ok"

    @app.get("/optional")
    @require_token(optional=True)
    def optional() -> dict[str, object]:
        return {"subject": current_auth.subject if current_auth else None}

    @app.get("/called")
    @require_token()
    def called() -> str:
        return get_auth().subject or ""

    @app.get("/method")
    @oauth.require_scope("read:users")
    def method() -> str:
        return "ok"

    @app.get("/org")
    @require_organization
    def org() -> str:
        return str(g.auth.organization_id)

    @app.get("/user")
    @require_user
    def user() -> str:
        return str(g.auth.user_id)

    @app.get("/async")
    @require_scope("read:users")
    async def async_view() -> str:
        return f"async {g.auth.subject}"

    @app.get("/stacked")
    @require_token
    @require_scope("read:users")
    def stacked() -> str:
        return "ok"

    @app.get("/custom")
    def custom() -> str:
        context = verify_request(scopes=["read:users"])
        assert context is not None
        return context.subject or ""

    return app


def get(app: Flask, path: str, token: str | None) -> tuple[int, object]:
    headers = auth_header(token) if token else {}
    response = app.test_client().get(path, headers=headers)
    return response.status_code, response.json if response.is_json else response.text


def test_all_scopes_required(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/all", tokens.mint(scopes=["read:users", "write:users"]))[0] == 200
    status, body = get(scoped_app, "/all", tokens.mint(scopes=["read:users"]))
    assert status == 403 and isinstance(body, dict) and body["error"] == "insufficient_scope"


def test_any_of(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/any", tokens.mint(scopes=["admin"]))[0] == 200
    assert get(scoped_app, "/any", tokens.mint(scopes=["other"]))[0] == 403


@pytest.mark.parametrize(
    "scopes", [["read:users-admin"], ["read:user"], ["READ:USERS"], ["read:users:x"], []]
)
def test_scope_match_is_exact(scoped_app: Flask, tokens: TokenIssuer, scopes: list[str]) -> None:
    assert get(scoped_app, "/method", tokens.mint(scopes=scopes))[0] == 403


def test_scopes_from_list_string_and_scp(scoped_app: Flask, tokens: TokenIssuer) -> None:
    for claims in (
        {"scopes": ["read:users"]},
        {"scope": "x read:users"},
        {"scp": ["read:users"]},
        {"scp": "read:users"},
    ):
        token = tokens.mint(tokens.claims(**claims))
        assert get(scoped_app, "/method", token)[0] == 200, claims


def test_scope_smuggled_in_a_list_element_with_spaces_is_refused(
    scoped_app: Flask, tokens: TokenIssuer
) -> None:
    claims = tokens.claims()
    claims["scopes"] = ["x read:users"]
    token = tokens.mint(claims)
    assert get(scoped_app, "/method", token)[0] == 401


def test_403_names_the_scopes(scoped_app: Flask, tokens: TokenIssuer) -> None:
    response = scoped_app.test_client().get("/all", headers=auth_header(tokens.mint(scopes=[])))
    assert 'scope="read:users write:users"' in response.headers["WWW-Authenticate"]


def test_optional_without_token_and_with_bad_token(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/optional", None) == (200, {"subject": None})
    assert get(scoped_app, "/optional", tokens.mint()) == (200, {"subject": "user_1"})
    assert get(scoped_app, "/optional", "bad.token.here")[0] == 401


def test_called_form_and_custom_decorator(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/called", tokens.mint()) == (200, "user_1")
    assert get(scoped_app, "/custom", tokens.mint(scopes=["read:users"])) == (200, "user_1")
    assert get(scoped_app, "/custom", tokens.mint(scopes=[]))[0] == 403


def test_organization_and_user_context(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/org", tokens.mint(organization_id="org_9")) == (200, "org_9")
    status, body = get(scoped_app, "/org", tokens.mint())
    assert status == 401 and isinstance(body, dict)
    assert body["error"] == "missing_organization_context"
    assert get(scoped_app, "/user", tokens.mint(subject="alice")) == (200, "alice")
    machine = tokens.mint(subject="client-1")  # subject == client_id: a service token
    status, body = get(scoped_app, "/user", machine)
    assert status == 401 and isinstance(body, dict) and body["error"] == "missing_user_context"


@pytest.mark.parametrize(
    "value", ["org\x00_1", "org_1\x00", "org_1\ud800", "\udfff"], ids=["nul", "nul-end", "hi", "lo"]
)
@pytest.mark.parametrize("field", ["organization_id", "subject", "client_id"])
def test_a_mapped_claim_no_column_or_log_can_hold_makes_the_token_invalid(
    scoped_app: Flask, tokens: TokenIssuer, field: str, value: str
) -> None:
    """NUL (refused by PostgreSQL's text) or an unpaired surrogate (JSON allows
    the escape; UTF-8 cannot encode it) in an organization, user or client id
    would fail later, in a scoped query or a metrics scrape: refused now."""
    hostile: dict[str, Any] = {"organization_id": "org_1", field: value}
    status, body = get(scoped_app, "/org", tokens.mint(**hostile))
    assert status == 401 and isinstance(body, dict) and body["error"] == "invalid_token"
    valid: dict[str, Any] = {"organization_id": "org_1", field: "caf\u00e9 \U0001f600"}
    unicode = tokens.mint(**valid)
    assert get(scoped_app, "/org", unicode)[0] == 200, "valid Unicode is kept"


def test_async_view(scoped_app: Flask, tokens: TokenIssuer) -> None:
    assert get(scoped_app, "/async", tokens.mint(scopes=["read:users"])) == (200, "async user_1")
    assert get(scoped_app, "/async", tokens.mint(scopes=[]))[0] == 403
    assert get(scoped_app, "/async", None)[0] == 401


def test_stacked_decorators_verify_once_and_check_scope(
    scoped_app: Flask, tokens: TokenIssuer
) -> None:
    assert get(scoped_app, "/stacked", tokens.mint(scopes=["read:users"]))[0] == 200
    assert get(scoped_app, "/stacked", tokens.mint(scopes=[]))[0] == 403


def test_get_auth_without_decorator_raises(scoped_app: Flask) -> None:
    with (
        scoped_app.test_request_context("/"),
        pytest.raises(RuntimeError, match="No verified token"),
    ):
        get_auth()


def test_g_auth_not_set_for_refused_token(scoped_app: Flask, tokens: TokenIssuer) -> None:
    seen: list[object] = []

    @scoped_app.teardown_request
    def capture(_exc: BaseException | None) -> None:
        seen.append(g.get("auth"))

    get(scoped_app, "/method", tokens.mint(expires_in=-3600))
    assert seen == [None]


def test_auth_context_is_immutable_and_has_no_token(scoped_app: Flask, tokens: TokenIssuer) -> None:
    token = tokens.mint(scopes=["read:users"])

    @scoped_app.get("/repr")
    @require_token
    def show() -> str:
        context = g.auth
        with pytest.raises(AttributeError):
            context.subject = "x"
        with pytest.raises(TypeError):
            context.claims["sub"] = "x"  # type: ignore[index,unused-ignore]
        return repr(context)

    status, text = get(scoped_app, "/repr", token)
    assert status == 200 and isinstance(text, str)
    assert token not in text and token.split(".")[2] not in text


def test_require_scope_needs_scopes() -> None:
    with pytest.raises(ValueError, match="at least one scope"):
        require_scope()
    with pytest.raises(ValueError, match="without spaces"):
        require_scope("a b")


def test_mistyped_strategy_fails_when_decorating() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        require_token(strategy="jwk")
    with pytest.raises(ValueError, match="strategy must be one of"):
        require_scope("a", strategy="introspect")


def test_verify_request_takes_a_lone_string_as_one_scope(tokens: TokenIssuer) -> None:
    """``scopes="admin"`` is the scope ``admin``, never the scopes a, d, m, i, n."""
    app = make_app(tokens.config())

    @app.get("/admin")
    def admin() -> str:
        verify_request(scopes="admin", any_of=True)
        return "ok"

    assert get(app, "/admin", tokens.mint(scopes=["admin"]))[0] == 200
    status, body = get(app, "/admin", tokens.mint(scopes=["a"]))
    assert status == 403 and isinstance(body, dict) and body["error"] == "insufficient_scope"


def test_verify_request_is_typed_none_only_when_optional(tokens: TokenIssuer) -> None:
    """mypy (in CI) checks the assert_type lines: a required check returns an
    AuthContext a strict user can read without a None check."""
    app = make_app(tokens.config())
    with app.test_request_context(headers=auth_header(tokens.mint(sub="user_1"))):
        context = verify_request()
        assert_type(context, AuthContext)
        assert context.subject == "user_1"
    with app.test_request_context():
        maybe = verify_request(optional=True)
        assert_type(maybe, AuthContext | None)
        assert maybe is None and g.auth is None


@pytest.mark.parametrize("scopes", [[""], ["read users"], [3], ["读取:users"], ['a"b'], ["a\\b"]])
def test_verify_request_refuses_malformed_scopes(tokens: TokenIssuer, scopes: object) -> None:
    app = make_app(tokens.config())
    context = app.test_request_context(headers=auth_header(tokens.mint()))
    with context, pytest.raises(ValueError, match="Scopes"):
        verify_request(scopes=scopes)  # type: ignore[call-overload]


def test_a_reused_app_context_never_carries_auth_into_the_next_request(
    tokens: TokenIssuer,
) -> None:
    """``app.app_context().push()`` at import: Flask reuses that context, and
    ``g`` with it, for every request of the thread. The verification of one
    request must not serve the next one."""
    from flask_oauth_verify import (
        MissingOrganizationContext,
        current_auth,
        get_auth,
        require_organization,
    )
    from flask_oauth_verify.tenancy import current_organization_id

    app = make_app(tokens.config())

    @app.get("/org")
    @require_organization
    def org() -> dict[str, object]:
        return {"organization_id": g.auth.organization_id}

    @app.get("/whoami")
    def whoami() -> dict[str, object]:  # not decorated: reads what this request verified
        auth = current_auth._get_current_object()  # type: ignore[attr-defined]
        try:
            get_auth()
            raised = False
        except RuntimeError:
            raised = True
        try:  # what automatic tenant scoping would filter by
            organization: str | None = current_organization_id()
        except MissingOrganizationContext:  # fails closed: 401 in a request
            organization = None
        return {
            "auth": None if auth is None else auth.subject,
            "get_auth_raised": raised,
            "organization": organization,
        }

    outer = app.app_context()
    outer.push()
    try:
        client = app.test_client()
        token = tokens.mint(organization_id="org_a")
        first = client.get("/org", headers=auth_header(token))
        assert (first.status_code, first.json) == (200, {"organization_id": "org_a"})
        anonymous = client.get("/org")
        assert anonymous.status_code == 401
        assert anonymous.json is not None and anonymous.json["error"] == "unauthorized"
        assert client.get("/whoami").json == {
            "auth": None,
            "get_auth_raised": True,
            "organization": None,
        }
        # A stale marker must not stop the next request's own verification either.
        other = tokens.mint(organization_id="org_b")
        assert client.get("/org", headers=auth_header(other)).json == {"organization_id": "org_b"}
    finally:
        outer.pop()


@pytest.mark.parametrize("scope", ["读取:users", "read\tusers", 'say"hi'])
def test_require_scope_refuses_a_scope_no_token_can_carry(scope: str) -> None:
    """RFC 6749 scope-tokens are printable ASCII: anything else would also
    break the WWW-Authenticate header of every 403 (Latin-1 only)."""
    from flask_oauth_verify import require_scope

    with pytest.raises(ValueError, match="RFC 6749"):
        require_scope(scope)


def test_a_claim_name_holding_dots_maps_whole_before_as_a_path(tokens: TokenIssuer) -> None:
    """Namespaced claims (Auth0's ``https://example.com/org``) hold dots: the
    claim of that exact name is read first, then the path into nested objects
    (the views page's own CLAIM_MAP example found no organization)."""
    app = make_app(
        tokens.config(
            CLAIM_MAP={
                "organization_id": ["https://example.com/org", "org_id"],
                "scopes": ["scp", "roles"],
            },
            REQUIRED_CLAIMS=["https://example.com/org"],
        )
    )

    @app.get("/mapped")
    @require_organization
    def mapped() -> dict[str, object]:
        return {"org": g.auth.organization_id, "scopes": sorted(g.auth.scopes)}

    client = app.test_client()
    namespaced: dict[str, Any] = {"https://example.com/org": "org_ns"}
    token = tokens.mint(scp=["a"], roles=["r"], **namespaced)
    response = client.get("/mapped", headers=auth_header(token))
    assert response.status_code == 200, response.json
    assert response.json == {"org": "org_ns", "scopes": ["a", "r"]}
    # A nested object still answers a dotted path when no claim has that name.
    nested = make_app(tokens.config(CLAIM_MAP={"organization_id": ["custom_claims.org"]}))
    nested.add_url_rule("/mapped", view_func=mapped)
    token = tokens.mint(custom_claims={"org": "org_nested"})
    response = nested.test_client().get("/mapped", headers=auth_header(token))
    assert response.json == {"org": "org_nested", "scopes": []}


@pytest.mark.parametrize("trapped", [False, True])
def test_verify_request_in_a_hook_lets_flask_answer_its_automatic_options(
    tokens: TokenIssuer, trapped: bool
) -> None:
    """A CORS preflight comes without credentials; Flask answers an automatic
    ``OPTIONS`` itself, so a ``before_request`` check lets Flask's answer (and
    the ``after_request`` functions, e.g. Flask-CORS's) through. Everything
    else still needs a token, and no later hook code runs without one.

    Also with ``TRAP_HTTP_EXCEPTIONS`` and a generic handler: the answer was
    a bare ``abort(response)``, which Flask then hands to the error handlers
    (a 500)."""
    app = make_app({**tokens.config(), "TRAP_HTTP_EXCEPTIONS": trapped})
    reached: list[str] = []

    @app.errorhandler(Exception)
    def generic(_error: Exception) -> tuple[str, int]:
        return "generic handler", 500

    @app.before_request
    def check() -> None:
        verify_request()
        reached.append(request.method)  # hook code after the check

    @app.after_request
    def cors(response: Any) -> Any:
        response.headers["Access-Control-Allow-Origin"] = "https://app.example"
        return response

    @app.get("/items")
    def items() -> dict[str, str]:
        return {"organization_id": str(g.auth.organization_id)}

    @app.route("/own-options", methods=["GET", "OPTIONS"])
    def own_options() -> dict[str, str]:
        return {"secret": "the view runs for OPTIONS"}

    client = app.test_client()
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    answer = client.options("/items", headers=preflight)
    assert answer.status_code == 200
    assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert answer.data == b""
    assert reached == []
    for refused in (
        client.options("/own-options", headers=preflight),  # its view would run
        client.options("/nowhere", headers=preflight),
        client.get("/items"),
    ):
        assert refused.status_code == 401
        assert refused.json is not None and refused.json["error"] == "unauthorized"
        assert "WWW-Authenticate" in refused.headers
    assert reached == []
    token = tokens.mint(organization_id="org_a")
    assert client.get("/items", headers=auth_header(token)).json == {"organization_id": "org_a"}
    assert reached == ["GET"]
