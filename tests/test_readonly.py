"""Verified claims are read-only all the way down, on a first request and on every cache hit.

The verified-token cache hands one ``AuthContext`` to every request with
the same token: a view that could change a nested claim would change what
the next request reads as verified.
"""

from __future__ import annotations

import copy
import json
import operator
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, g, jsonify

from flask_oauth_verify import require_token, verify_request
from flask_oauth_verify.config import Settings
from flask_oauth_verify.context import build_context
from flask_oauth_verify.errors import InvalidTokenError
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.readonly import ReadOnlyDict, ReadOnlyList, read_only, read_only_claims
from flask_oauth_verify.testing import TokenIssuer, auth_header

from .conftest import make_app
from .test_introspection import intro_config

NESTED: dict[str, Any] = {
    "roles": ["editor"],
    "aud": ["api", "other"],
    "custom_claims": {"service_name": "svc", "tags": ["a", {"deep": ["b"]}]},
}

MUTATIONS: dict[str, Callable[[Any], object]] = {
    "list.append": lambda c: c["roles"].append("admin"),
    "list +=": lambda c: c["roles"].__iadd__(["admin"]),
    "list item": lambda c: operator.setitem(c["roles"], 0, "admin"),
    "list del": lambda c: operator.delitem(c["aud"], 1),
    "list.extend": lambda c: c["aud"].extend(["evil"]),
    "list.sort": lambda c: c["aud"].sort(reverse=True),
    "list.clear": lambda c: c["roles"].clear(),
    "dict item": lambda c: operator.setitem(c["custom_claims"], "service_name", "admin-svc"),
    "dict.update": lambda c: c["custom_claims"].update(service_name="admin-svc"),
    "dict |=": lambda c: c["custom_claims"].__ior__({"service_name": "admin-svc"}),
    "dict.pop": lambda c: c["custom_claims"].pop("service_name"),
    "dict.setdefault": lambda c: c["custom_claims"].setdefault("plan", "gold"),
    "nested list": lambda c: c["custom_claims"]["tags"].append("x"),
    "nested dict": lambda c: operator.setitem(c["custom_claims"]["tags"][1], "deep", []),
    "deepest list": lambda c: c["custom_claims"]["tags"][1]["deep"].append("x"),
    "top level": lambda c: operator.setitem(c, "roles", ["admin"]),
}


def _claims_app(config: dict[str, Any]) -> Flask:
    """make_app() plus views that try one mutation and report the claims."""
    app = make_app(config)

    @app.get("/mutate/<name>")
    @require_token
    def mutate(name: str) -> dict[str, object]:
        try:
            MUTATIONS[name](g.auth.claims)
        except TypeError:
            return {"refused": True}
        return {"refused": False}

    @app.get("/claims")
    @require_token
    def claims() -> Any:
        seen = g.auth.claims
        return jsonify(
            roles=seen["roles"],
            aud=seen["aud"],
            custom_claims=seen["custom_claims"],
            types=[type(seen["roles"]).__name__, type(seen["custom_claims"]).__name__],
        )

    return app


EXPECTED = {
    "roles": ["editor"],
    "aud": ["api", "other"],
    "custom_claims": {"service_name": "svc", "tags": ["a", {"deep": ["b"]}]},
    "types": ["ReadOnlyList", "ReadOnlyDict"],
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_no_view_can_change_the_claims_a_later_request_reads(
    tokens: TokenIssuer, name: str
) -> None:
    app = _claims_app(tokens.config(audience="api"))
    client = app.test_client()
    headers = auth_header(tokens.mint(**NESTED))
    for _ in range(2):  # the first request (a miss), then a cache hit
        response = client.get(f"/mutate/{name}", headers=headers)
        assert (response.status_code, response.json) == (200, {"refused": True})
        claims = client.get("/claims", headers=headers)
        assert (claims.status_code, claims.json) == (200, EXPECTED)


def test_introspected_claims_are_read_only_too(served_tokens: TokenIssuer) -> None:
    issuer = served_tokens
    app = _claims_app(intro_config(issuer))
    client = app.test_client()
    headers = auth_header(issuer.mint_opaque(**NESTED))
    for name in ("list.append", "dict item", "deepest list"):
        response = client.get(f"/mutate/{name}", headers=headers)
        assert (response.status_code, response.json) == (200, {"refused": True})
        claims = client.get("/claims", headers=headers)
        assert (claims.status_code, claims.json) == (200, EXPECTED)


def test_read_only_values_read_like_lists_and_dicts() -> None:
    frozen = read_only({"roles": ["editor"], "nested": {"a": [1, 2]}})
    roles, nested = frozen["roles"], frozen["nested"]
    assert isinstance(roles, list) and isinstance(nested, dict)
    assert roles == ["editor"] and nested == {"a": [1, 2]}
    assert roles + ["viewer"] == ["editor", "viewer"]  # noqa: RUF005 - what is tested
    assert nested | {"b": 3} == {"a": [1, 2], "b": 3}
    assert json.loads(json.dumps(frozen)) == {"roles": ["editor"], "nested": {"a": [1, 2]}}


@pytest.mark.parametrize(
    "copier",
    [copy.copy, copy.deepcopy, lambda v: pickle.loads(pickle.dumps(v))],  # noqa: S301 - our own bytes
)
def test_a_copy_is_plain_and_mutable(copier: Callable[[Any], Any]) -> None:
    frozen = read_only({"roles": ["editor"]})
    copied = copier(frozen)
    assert type(copied) is dict
    copied["plan"] = "gold"
    roles = copier(frozen["roles"])
    assert type(roles) is list
    roles.append("viewer")
    assert frozen == {"roles": ["editor"]}


def test_claims_not_owned_are_copied_not_changed() -> None:
    given = {"sub": "user_1", "roles": ["editor"], "custom": {"k": ["v"]}}
    view = read_only_claims(given)
    assert type(given["roles"]) is list and type(given["custom"]) is dict
    assert type(view["roles"]) is ReadOnlyList and type(view["custom"]) is ReadOnlyDict
    given["roles"].append("admin")  # the caller's own dict stays the caller's
    assert view["roles"] == ["editor"]


def test_a_flat_owned_token_is_wrapped_without_a_copy() -> None:
    owned = {"sub": "user_1", "exp": 1, "scope": "read"}
    view = read_only_claims(owned, owned=True)
    assert view == owned
    with pytest.raises(TypeError):
        view["sub"] = "other"  # type: ignore[index]


def test_claims_nested_beyond_the_recursion_limit_are_refused_not_an_error() -> None:
    deep: Any = "leaf"
    for _ in range(20_000):
        deep = [deep]
    settings = Settings.from_config(
        {"OAUTH_VERIFY_ISSUER": "https://issuer.example", "OAUTH_VERIFY_AUDIENCE": "api"}
    )
    with pytest.raises(InvalidTokenError) as refused:
        build_context({"sub": "user_1", "deep": deep}, settings)
    assert refused.value.reason == "claims nested too deeply"


def test_claims_checks_get_read_only_claims(tokens: TokenIssuer) -> None:
    config = tokens.config(audience="api")
    app = make_app(config)
    attempts: list[str] = []

    @get_state(app).extension.claims_check
    def tamper(claims: Any) -> bool:
        try:
            claims["roles"].append("admin")
        except TypeError:
            attempts.append("refused")
        return True

    client = app.test_client()
    headers = auth_header(tokens.mint(**NESTED))
    assert client.get("/protected", headers=headers).status_code == 200
    assert attempts == ["refused"]
    with app.test_request_context(headers=headers):
        context = verify_request()
        assert context is not None and context.claims["roles"] == ["editor"]


def test_each_nested_value_is_made_read_only_once_and_shared(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(audience="api"))
    seen: list[Any] = []

    @app.get("/roles")
    @require_token
    def roles() -> dict[str, object]:
        seen.append(g.auth.claims["roles"])
        copied = dict(g.auth.claims)
        assert type(copied) is dict and type(copied["roles"]) is ReadOnlyList
        return {"roles": copied["roles"]}

    client = app.test_client()
    headers = auth_header(tokens.mint(**NESTED))
    for _ in range(3):
        assert client.get("/roles", headers=headers).json == {"roles": ["editor"]}
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]


def test_the_claims_read_like_the_read_only_mapping_they_were() -> None:
    """``copy()``, ``|`` and ``reversed()`` worked on the MappingProxyType the
    claims were; a ``@claims_check`` using them refused every token."""
    claims = read_only_claims({"sub": "user_1", "roles": ["editor"]}, owned=True)
    copied = claims.copy()
    assert type(copied) is dict and copied == {"sub": "user_1", "roles": ["editor"]}
    copied["sub"] = "other"
    assert claims["sub"] == "user_1"
    assert claims | {"plan": "gold"} == {"sub": "user_1", "roles": ["editor"], "plan": "gold"}
    assert {"plan": "gold"} | claims == {"plan": "gold", "sub": "user_1", "roles": ["editor"]}
    assert list(reversed(claims)) == ["roles", "sub"]


@pytest.mark.parametrize("kind", [ReadOnlyList, ReadOnlyDict])
def test_init_cannot_refill_a_shared_value(kind: type) -> None:
    frozen = read_only({"roles": ["editor"], "custom": {"k": "v"}})
    value = frozen["roles"] if kind is ReadOnlyList else frozen["custom"]
    with pytest.raises(TypeError, match="read-only"):
        value.__init__(["admin"] if kind is ReadOnlyList else {"k": "admin"})
    assert frozen == {"roles": ["editor"], "custom": {"k": "v"}}


def test_a_claim_nested_beyond_the_recursion_limit_is_refused_when_read() -> None:
    """A parsed token's nested values are made read-only when first read."""
    deep: Any = "leaf"
    for _ in range(20_000):
        deep = [deep]
    claims = read_only_claims({"sub": "user_1", "deep": deep}, owned=True)
    assert claims["sub"] == "user_1"
    with pytest.raises(InvalidTokenError) as refused:
        claims["deep"]
    assert refused.value.reason == "claims nested too deeply"


def test_a_claim_as_deep_as_the_parser_takes_is_read_in_the_view(tokens: TokenIssuer) -> None:
    """Verification accepted it: reading it (and encoding the claims as JSON)
    in the view must not turn into a 401 half-way through the view."""
    deep: Any = "leaf"
    for _ in range(500):
        deep = [deep]
    app = make_app(tokens.config(audience="api"))

    @app.get("/deep")
    @require_token
    def read_deep() -> Any:
        claims = g.auth.claims
        assert claims["deep"] == deep and dict(claims)["deep"] == deep
        return jsonify({"claims": claims})

    response = app.test_client().get("/deep", headers=auth_header(tokens.mint(deep=deep)))
    assert response.status_code == 200
    assert response.json is not None and response.json["claims"]["deep"] == deep


def test_the_claims_mapping_encodes_as_json_and_a_custom_default_still_applies(
    tokens: TokenIssuer,
) -> None:
    app = Flask("claims_json")

    class Money:
        pass

    previous = app.json.default  # type: ignore[attr-defined]

    def default(value: Any) -> Any:
        return "money" if isinstance(value, Money) else previous(value)

    app.json.default = default  # type: ignore[attr-defined]
    app.config.update(tokens.config(audience="api"))
    from flask_oauth_verify import OAuthVerify

    OAuthVerify(app)

    @app.get("/claims")
    @require_token
    def claims() -> Any:
        return {"claims": g.auth.claims, "price": Money()}

    response = app.test_client().get("/claims", headers=auth_header(tokens.mint(roles=["a"])))
    assert response.status_code == 200 and response.json is not None
    assert response.json["claims"]["roles"] == ["a"] and response.json["price"] == "money"
