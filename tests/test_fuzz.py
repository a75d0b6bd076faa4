"""Property-based fuzzing of the whole request path (hypothesis).

Arbitrary ``Authorization`` headers, token segments, protected headers and
claim sets go through real requests to an app whose keys are served over
HTTP on 127.0.0.1. The properties:

* only the documented statuses come back (400/401/403, 503 when keys are
  unavailable), always as the JSON error body with a ``WWW-Authenticate``
  challenge; never a 500;
* 200 comes back only for a token that is genuinely valid, judged by an
  oracle written from DESIGN.md independently of the implementation;
* ``g.auth`` is never set when the token is refused as invalid.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

import pytest
from flask import Flask, g
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from flask_oauth_verify import OAuthVerify, require_scope, require_token
from flask_oauth_verify.testing import IssuerServer, TokenIssuer
from flask_oauth_verify.verification import LATEST_EXP

from .attack_corpus import DROP, Kit, b64url
from .conftest import FakeClock

LEEWAY = 30
#: Examples per property; raise it for a deeper run (OAUTH_VERIFY_FUZZ_EXAMPLES=5000).
EXAMPLES = int(os.environ.get("OAUTH_VERIFY_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOKEN_ERRORS = {"invalid_token", "token_expired", "token_not_active"}
DOCUMENTED = {
    400: {"invalid_request"},
    401: TOKEN_ERRORS | {"unauthorized"},
    403: {"insufficient_scope"},
    503: {"temporarily_unavailable"},
}


class FuzzEnv:
    """A served issuer, a fixed clock and an app recording ``g.auth``."""

    def __init__(self) -> None:
        self.server = IssuerServer()
        self.issuer = TokenIssuer(audience="api")
        rsa_kid = self.issuer.current_kid
        ec_kid = self.issuer.add_key("ES256")
        self.issuer.serve(self.server)
        self.kit = Kit(
            self.issuer, attacker_url="http://127.0.0.1:9", rsa_kid=rsa_kid, ec_kid=ec_kid,
            weak_kid="none",
        )  # fmt: skip
        self.clock = FakeClock(self.kit.now)
        self.seen_auth: list[Any] = []
        self.app = self._app()

    def _app(self) -> Flask:
        app = Flask("fuzz")
        app.config.update(TESTING=True, **self.issuer.config(audience="api", LEEWAY=LEEWAY))
        OAuthVerify().init_app(app, clock=self.clock)

        @app.route("/protected", methods=["GET", "POST"])
        @require_token
        def protected() -> dict[str, Any]:
            auth = g.auth
            return {"subject": auth.subject, "organization_id": auth.organization_id}

        @app.get("/read")
        @require_scope("read:users")
        def read() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        @app.get("/async")
        @require_token
        async def async_view() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        @app.after_request
        def record(response: Any) -> Any:
            self.seen_auth.append(g.get("auth"))
            return response

        return app

    def get(self, headers: list[tuple[str, str]], path: str = "/protected") -> TestResponse:
        self.seen_auth.clear()
        response = self.app.test_client().get(path, headers=headers)
        assert len(self.seen_auth) == 1
        return response


@pytest.fixture(scope="module")
def env() -> Iterator[FuzzEnv]:
    fuzz_env = FuzzEnv()
    yield fuzz_env
    fuzz_env.server.close()


@pytest.fixture(autouse=True)
def _no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Refusing through the fail-closed safety net would hide a bug: forbid it."""
    with caplog.at_level(logging.ERROR, logger="flask_oauth_verify"):
        yield
    assert not [r for r in caplog.records if r.exc_info], "unexpected exception while verifying"


def assert_refused(env: FuzzEnv, response: TestResponse) -> str:
    """A documented error response, without ``g.auth`` for invalid tokens."""
    assert response.status_code in DOCUMENTED, response.status_code
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == {"error", "message"}
    assert body["error"] in DOCUMENTED[response.status_code]
    assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    if response.status_code in (400, 401):
        assert env.seen_auth[0] is None
    return str(body["error"])


# -- arbitrary headers and segments ------------------------------------------------

header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=300,
)
schemes = st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", "", "Bearer"])


@FUZZ
@given(values=st.lists(st.tuples(schemes, header_text), min_size=0, max_size=3))
def test_arbitrary_authorization_headers(env: FuzzEnv, values: list[tuple[str, str]]) -> None:
    headers = [("Authorization", scheme + text) for scheme, text in values]
    response = env.get(headers)
    assert response.status_code in (400, 401)
    assert_refused(env, response)


b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@st.composite
def segments(draw: st.DrawFn, env_kit: Kit) -> str:
    kind = draw(st.sampled_from(["text", "bytes", "json", "header", "payload", "signature"]))
    if kind == "text":
        return draw(st.text(alphabet=b64_alphabet + "=+/", max_size=80))
    if kind == "bytes":
        return b64url(draw(st.binary(max_size=300)))
    if kind == "json":
        return b64url(json.dumps(draw(json_values)))
    token = env_kit.token().split(".")
    return {"header": token[0], "payload": token[1], "signature": token[2]}[kind]


@FUZZ
@given(data=st.data(), count=st.integers(min_value=1, max_value=6))
def test_arbitrary_segments(env: FuzzEnv, data: st.DataObject, count: int) -> None:
    parts = [data.draw(segments(env.kit)) for _ in range(count)]
    token = ".".join(parts)
    if parts == env.kit.token().split("."):
        return  # reassembled the genuine token: nothing to refuse
    response = env.get([("Authorization", f"Bearer {token}")])
    assert response.status_code in (400, 401)
    assert_refused(env, response)


# -- protected headers signed with the real key ------------------------------------

REFUSED_MEMBERS = {"crit", "b64", "enc", "zip"}
extra_members = st.dictionaries(
    st.sampled_from(
        ["crit", "b64", "enc", "zip", "jku", "x5u", "jwk", "x5c", "cty", "x5t", "nonce", "foo"]
    ),
    json_values,
    max_size=3,
)
typs = st.sampled_from(
    [DROP, "at+jwt", "AT+JWT", "application/at+jwt", "JWT", "jwt", "dpop+jwt", "JOSE", 1, None]
)


@FUZZ
@given(extra=extra_members, typ=typs)
def test_signed_protected_headers(env: FuzzEnv, extra: dict[str, Any], typ: Any) -> None:
    header = {**env.kit.header(typ=typ), **extra}
    token = env.kit.jws({k: v for k, v in header.items() if v is not DROP}, env.kit.claims())
    response = env.get([("Authorization", f"Bearer {token}")])
    acceptable_typ = typ is DROP or (  # "typ": null is present, and no string
        isinstance(typ, str) and typ.lower() in ("at+jwt", "application/at+jwt", "jwt")
    )
    if acceptable_typ and not REFUSED_MEMBERS & set(extra):
        assert response.status_code == 200, response.get_json()
        assert env.seen_auth[0] is not None
    else:
        assert response.status_code == 401
        assert assert_refused(env, response) == "invalid_token"


# -- claim sets signed with the real key -------------------------------------------


def _is_number(value: Any) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_scope_value(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(item, str) and item and " " not in item for item in value
    )


def oracle(claims: dict[str, Any], iss: str, now: float) -> set[str]:
    """The error codes DESIGN.md allows for ``claims``; empty means valid."""
    errors: set[str] = set()
    if claims.get("iss") != iss or not isinstance(claims.get("iss"), str):
        errors.add("invalid_token")
    exp = claims.get("exp")
    if not _is_number(exp):
        errors.add("invalid_token")
    elif exp + LEEWAY <= now:
        errors.add("token_expired")
    elif exp > LATEST_EXP:  # beyond the year 9999: never expiring, refused
        errors.add("invalid_token")
    # nbf and iat are optional, but one that is present (null included) must
    # be a finite number.
    if "nbf" in claims:
        nbf = claims["nbf"]
        if not _is_number(nbf):
            errors.add("invalid_token")
        elif nbf - LEEWAY > now:
            errors.add("token_not_active")
    if "iat" in claims:
        iat = claims["iat"]
        if not _is_number(iat) or iat - LEEWAY > now:
            errors.add("invalid_token")
    aud = claims.get("aud")
    if not (
        aud == "api"
        or (isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud) and "api" in aud)
    ):
        errors.add("invalid_token")
    for name in ("sub", "client_id", "oid"):
        if name in claims and claims[name] is not None and not isinstance(claims[name], str):
            errors.add("invalid_token")
    for name in ("scope", "scp"):
        if claims.get(name) is not None and not _is_scope_value(claims[name]):
            errors.add("invalid_token")
    return errors


def _time_values(now: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.just(DROP),
        st.integers(min_value=now - 7200, max_value=now + 7200),
        st.floats(min_value=now - 7200, max_value=now + 7200),
        st.sampled_from([now - LEEWAY, now + LEEWAY, now - LEEWAY - 1, now + LEEWAY + 1]),
        st.sampled_from([10**400, -(10**400), 1e308, 0, -1, True, "1", None]),
        json_values,
    )


@st.composite
def claim_sets(draw: st.DrawFn, kit: Kit) -> dict[str, Any]:
    now = kit.now
    pick = {
        "iss": st.sampled_from([kit.iss, DROP, kit.iss + "/", kit.iss.upper(), "https://evil"])
        | json_values,
        "aud": st.sampled_from(["api", ["api"], ["x", "api"], "API", [], "other", DROP, ["api", 1]])
        | json_values,
        "exp": _time_values(now),
        "nbf": _time_values(now),
        "iat": _time_values(now),
        "sub": st.sampled_from(["user_1", DROP]) | json_values,
        "client_id": st.sampled_from(["client-1", DROP]) | json_values,
        "oid": st.sampled_from(["org_1", DROP]) | json_values,
        "scope": st.sampled_from(["read:users", "a b", DROP]) | json_values,
        "scp": st.sampled_from([DROP, ["read:users"], "x"]) | json_values,
    }
    valid_bias = draw(st.booleans())
    claims: dict[str, Any] = {}
    for name, strategy in pick.items():
        if valid_bias and draw(st.integers(0, 3)) > 0:
            baseline = kit.claims().get(name, DROP)
            value = baseline
        else:
            value = draw(strategy)
        if value is not DROP:
            claims[name] = value
    return claims


@FUZZ
@given(data=st.data(), path=st.sampled_from(["/protected", "/async"]))
def test_claim_sets(env: FuzzEnv, data: st.DataObject, path: str) -> None:
    claims = data.draw(claim_sets(env.kit))
    token = env.kit.token(claims)
    response = env.get([("Authorization", f"Bearer {token}")], path)
    allowed = oracle(claims, env.kit.iss, env.clock())
    event(f"status {response.status_code}")
    if not allowed:
        assert response.status_code == 200, (claims, response.get_json())
        assert response.get_json()["subject"] == claims.get("sub")
        assert env.seen_auth[0] is not None
    else:
        assert response.status_code == 401, (claims, response.get_json())
        assert assert_refused(env, response) in allowed, (claims, allowed)


scope_words = st.sampled_from(
    ["read:users", "read:user", "read:users-admin", "READ:USERS", "write:users", "read", "*",
     "read:users,", "\u0440ead:users", ""]
)  # fmt: skip
separators = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u2003", ",", "+"])


@FUZZ
@given(words=st.lists(st.tuples(scope_words, separators), max_size=5))
def test_scope_strings(env: FuzzEnv, words: list[tuple[str, str]]) -> None:
    scope = "".join(word + sep for word, sep in words).strip(" ")
    token = env.kit.token(env.kit.claims(scope=scope))
    response = env.get([("Authorization", f"Bearer {token}")], "/read")
    # RFC 6749 §3.3: scope-tokens are separated by SP (0x20) and nothing else.
    if "read:users" in scope.split(" "):
        assert response.status_code == 200
    else:
        assert response.status_code == 403, (scope, response.get_json())
        assert assert_refused(env, response) == "insufficient_scope"
        assert 'scope="read:users"' in response.headers["WWW-Authenticate"]


def test_atheris_target_runs_without_atheris() -> None:
    """The fuzz/ target stays runnable: seeds plus mutations, no finding."""
    path = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_verify.py"
    spec = importlib.util.spec_from_file_location("fuzz_verify", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for seed in module.seeds():
        module.test_one_input(seed)
    assert module.run_builtin(max_total_time=60, runs=200, seed=1) == 200
    # The oracle is live: a genuine token presented as unsigned input is a finding.
    target = module.Target()
    token = target.sign(target.header(), json.dumps(target.claims()).encode())
    with pytest.raises(AssertionError, match="forged token accepted"):
        target.run(b"\x01" + token.encode())
