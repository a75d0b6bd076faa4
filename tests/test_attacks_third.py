"""Attack corpus, third pass: what the first two passes left open.

Same app, same servers, same checks as ``tests/test_attacks.py`` (status,
JSON body, ``WWW-Authenticate``, no ``g.auth``, no request to the attacker),
plus: no log record at any level carries any segment of the token sent.

The cases: Unicode look-alikes, invisible and bidi characters in ``iss``,
``aud``, ``kid`` and the scopes; ``iss`` spellings a URL parser would call
equal (trailing dot, default port, percent-encoding, case); claims of the
wrong JSON type; members named twice through ``\\u`` escapes; lone
surrogates and overlong UTF-8; signatures of the wrong length or value for
the key; odd requests (HEAD, ``Authorization`` spelt in another case,
several headers, a token in the query or the form as well).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, padding, rsa
from flask import Flask, g, request
from joserfc.jwk import RSAKey

from flask_oauth_verify import OAuthVerify, require_token
from flask_oauth_verify.keys import parse_key_set
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .attack_corpus import (
    BAD_REQUEST,
    CORPUS,
    DROP,
    INVALID,
    NO_TOKEN,
    OK,
    P256_ORDER,
    SCOPE,
    Attack,
    Kit,
    Probe,
    _json,
    b64url,
)
from .conftest import make_app
from .test_attacks import CorpusEnv, check_refusal, send
from .test_introspection import intro_config

THIRD: list[Attack] = []


def _add(name: str, outcome: tuple[int, str | None], build: Any) -> None:
    THIRD.append(Attack(name, "third", outcome[0], outcome[1], build))


def _claims(path: str = "/protected", **overrides: Any) -> Any:
    """A probe builder: the issuer's RS256 token with ``overrides`` in its claims."""

    def build(k: Kit) -> Probe:
        return Kit.bearer(k.token(k.claims(**overrides)), path)

    return build


def _raw_payload(raw: Any) -> Any:
    """A probe builder: a signed token whose payload is ``raw(kit)`` verbatim."""
    return lambda k: Kit.bearer(k.token(raw(k)))


def _signature(change: Any, es: bool = False) -> Any:
    """A probe builder: a genuine token whose signature bytes are ``change(sig, kit)``."""

    def build(k: Kit) -> Probe:
        head, payload, signature = (k.es_token() if es else k.token()).split(".")
        raw = base64.urlsafe_b64decode(signature + "==")
        return Kit.bearer(f"{head}.{payload}.{b64url(change(raw, k))}")

    return build


def _modulus(k: Kit) -> int:
    return int(k.private(k.rsa_kid).public_key().public_numbers().n)


# -- iss: one string, compared exactly; no URL normalisation ------------------
for _label, _spell in (
    ("a trailing dot on the host", lambda iss: ".:".join(iss.rsplit(":", 1))),
    ("a trailing slash and dot", lambda iss: iss + "/."),
    ("percent-encoded dots", lambda iss: iss.replace(".", "%2E")),
    ("an upper-case scheme", lambda iss: "HTTP" + iss[4:]),
    ("an empty user part", lambda iss: iss.replace("http://", "http://@")),
    ("a query", lambda iss: iss + "?"),
    ("a fragment", lambda iss: iss + "#"),
    ("localhost for 127.0.0.1", lambda iss: iss.replace("127.0.0.1", "localhost")),
    ("a zero-padded port", lambda iss: iss.replace("1:", "1:0", 1)),
    ("the host as one number", lambda iss: iss.replace("127.0.0.1", "2130706433")),
    ("the host as 127.1", lambda iss: iss.replace("127.0.0.1", "127.1")),
    ("the host as IPv4-mapped IPv6", lambda iss: iss.replace("127.0.0.1", "[::ffff:127.0.0.1]")),
    ("a backslash for the slashes", lambda iss: iss.replace("//", "\\\\")),
    ("a right-to-left mark", lambda iss: "\u200f" + iss),
    ("a BOM in front", lambda iss: "\ufeff" + iss),
    ("a zero-width joiner", lambda iss: iss + "\u200d"),
    ("a lone surrogate", lambda iss: iss + "\ud800"),
    ("a NUL", lambda iss: iss + "\x00"),
):  # fmt: skip
    _add(
        f"iss with {_label}",
        INVALID,
        lambda k, spell=_spell: Kit.bearer(k.token(k.claims(iss=spell(k.iss)))),
    )
_add(
    "iss as an object",
    INVALID,
    lambda k: Kit.bearer(k.token(k.claims(iss={"value": k.iss}))),
)
_add("iss null", INVALID, _claims(iss=None))
_add("iss true", INVALID, _claims(iss=True))

# -- aud: exact strings only ---------------------------------------------------
for _label, _aud in (
    ("a zero-width space", "api\u200b"),
    ("a right-to-left override", "\u202eipa"),
    ("NFD of a look-alike", "a\u0300pi"),
    ("a NUL", "api\x00"),
    ("a lone surrogate", "api\ud800"),
    ("a list holding null", ["api", None]),
    ("a list holding an object", ["api", {"aud": "api"}]),
    ("a list holding a list", ["api", ["api"]]),
    ("a number", 1),
    ("true", True),
    ("an object naming it", {"aud": "api"}),
    ("a list of one empty string", [""]),
    ("an empty string", ""),
):  # fmt: skip
    _add(f"aud with {_label}", INVALID, _claims(aud=_aud))
_add("control: aud list naming it twice", OK, _claims(aud=["api", "api"]))

# -- scopes ---------------------------------------------------------------------
for _label, _outcome, _scope in (
    ("true", INVALID, True),
    ("false", INVALID, False),
    ("a float", INVALID, 1.0),
    ("an object", INVALID, {"read:users": True}),
    ("a list with an empty item", INVALID, ["read:users", ""]),
    ("a list with a nested list", INVALID, [["read:users"]]),
    ("a list with null", INVALID, ["read:users", None]),
    ("null", SCOPE, None),
    ("an empty list", SCOPE, []),
    ("a zero-width space", SCOPE, "read:users\u200b"),
    ("a trailing tab", SCOPE, "read:users\t"),
    ("a list item with a tab", SCOPE, ["read:users\t"]),
    ("a combining mark", SCOPE, "read:users\u0301"),
    ("a lone surrogate", SCOPE, "read:users\ud800"),
    ("fullwidth colon", SCOPE, "read\uff1ausers"),
    ("a right-to-left override", SCOPE, "\u202esresu:daer"),
):  # fmt: skip
    _add(f"scope {_label}", _outcome, _claims("/read", scope=_scope))
_add("control: scope named twice", OK, _claims("/read", scope="read:users read:users"))
_add("control: scope with doubled spaces", OK, _claims("/read", scope="  other  read:users "))
_add("control: scope list naming it twice", OK, _claims("/read", scope=["read:users"] * 2))
_add("scp as a string with a number", INVALID, _claims("/read", scope=DROP, scp=[1]))

# -- subject, client and organization of the wrong type ------------------------
for _name in ("sub", "client_id", "oid"):
    _wrong: tuple[tuple[str, Any], ...] = (("true", True), ("a float", 1.5), ("an object", {}))
    for _label, _value in _wrong:
        _add(f"{_name} as {_label}", INVALID, _claims(**{_name: _value}))
_add("control: a long sub (4 kB)", OK, lambda k: Kit.bearer(k.token(k.claims(sub="u" * 4096))))
_add("jti as an object", OK, _claims(jti={"id": 1}))  # jti is not used: a context without it

# -- JSON text: escapes, surrogates, encodings ----------------------------------
_add(
    "iss named twice, once through \\u escapes",
    INVALID,
    _raw_payload(lambda k: _json(k.claims())[:-1] + b',"\\u0069ss":"http://evil.example"}'),
)
_add(
    "aud named twice, the second escaped entirely",
    INVALID,
    _raw_payload(lambda k: _json(k.claims(aud="other"))[:-1] + b',"\\u0061\\u0075\\u0064":"api"}'),
)
_add(
    "alg named twice in the header, once escaped",
    INVALID,
    lambda k: Kit.bearer(
        k.jws(
            b'{"alg":"RS256","\\u0061lg":"none","kid":"' + k.rsa_kid.encode() + b'"}',
            k.claims(),
            alg="RS256",
        )
    ),
)
_add(
    "kid named twice in the header, once escaped",
    INVALID,
    lambda k: Kit.bearer(
        k.jws(
            b'{"alg":"RS256","kid":"'
            + k.rsa_kid.encode()
            + b'","\\u006bid":"attacker-key","typ":"at+jwt"}',
            k.claims(),
            alg="RS256",
        )
    ),
)
_add(
    "overlong UTF-8 in the payload",
    INVALID,
    _raw_payload(lambda k: _json(k.claims())[:-1] + b',"x":"\xc0\xaf"}'),
)
_add(
    "UTF-8-encoded surrogate (CESU-8) in the payload",
    INVALID,
    _raw_payload(lambda k: _json(k.claims())[:-1] + b',"x":"\xed\xa0\x80"}'),
)
_add(
    "overlong UTF-8 in the header",
    INVALID,
    lambda k: Kit.bearer(
        k.jws(b'{"alg":"RS256","kid":"\xc0\xaf","typ":"at+jwt"}', k.claims(), alg="RS256")
    ),
)
_add("kid a lone surrogate", INVALID, lambda k: Kit.bearer(k.attacker_token(kid="\udfff")))
_add(
    "kid with a zero-width space", INVALID, lambda k: Kit.bearer(k.token(kid=k.rsa_kid + "\u200b"))
)
_add(
    "kid NFKC-equal (fullwidth)",
    INVALID,
    lambda k: Kit.bearer(k.token(kid="\uff4b" + k.rsa_kid[1:])),
)
_add(
    "alg a lone surrogate",
    INVALID,
    lambda k: Kit.bearer(k.jws(k.header(alg="\ud800"), k.claims(), alg="RS256")),
)
_add("typ a lone surrogate", INVALID, lambda k: Kit.bearer(k.token(typ="at+jwt\ud800")))
_add("typ with a quote and a backslash", INVALID, lambda k: Kit.bearer(k.token(typ='"\\' * 20)))
# a mapped id no database column or log can hold: refused, not a later 500
_add("sub a lone surrogate", INVALID, _claims(sub="user_\ud800"))
_add("sub with a NUL", INVALID, _claims(sub="user_\x00"))
_add(
    "signed payload a JSON string of the claims",
    INVALID,
    _raw_payload(lambda k: _json(_json(k.claims()).decode())),
)
_add(
    "signed payload a JSON array of the claims",
    INVALID,
    _raw_payload(lambda k: _json([k.claims()])),
)
_add("signed payload true", INVALID, _raw_payload(lambda _k: b"true"))
_add("signed payload empty", INVALID, _raw_payload(lambda _k: b""))
_add(
    "control: signed payload with surrounding whitespace",
    OK,
    _raw_payload(lambda k: b" " + _json(k.claims()) + b"\n"),
)

# -- signatures of the wrong length or value for the key ------------------------
_add("RS256 signature with a leading zero byte", INVALID, _signature(lambda s, _k: b"\x00" + s))
_add("RS256 signature with a trailing byte", INVALID, _signature(lambda s, _k: s + b"\x00"))
_add(
    "RS256 signature equal to the modulus",
    INVALID,
    _signature(lambda s, k: _modulus(k).to_bytes(len(s), "big")),
)
_add(
    "RS256 signature above the modulus",
    INVALID,
    _signature(lambda s, k: (_modulus(k) + 1).to_bytes(len(s), "big")),
)
_add("RS256 signature all ones", INVALID, _signature(lambda s, _k: b"\xff" * len(s)))
_add("RS256 signature of one", INVALID, _signature(lambda s, _k: (1).to_bytes(len(s), "big")))
_add("RS256 signature twice", INVALID, _signature(lambda s, _k: s + s))
_add("RS256 signature empty", INVALID, _signature(lambda _s, _k: b""))
_add(
    "ES256 r = n + r (r beyond the order)",
    INVALID,
    _signature(
        lambda s, _k: (
            (int.from_bytes(s[:32], "big") + P256_ORDER).to_bytes(33, "big")[-32:] + s[32:]
        ),
        es=True,
    ),
)
_add(
    "ES256 s = n",
    INVALID,
    _signature(lambda s, _k: s[:32] + P256_ORDER.to_bytes(32, "big"), es=True),
)
_add(
    "ES256 signature as ES384's length",
    INVALID,
    _signature(lambda s, _k: bytes(16) + s[:32] + bytes(16) + s[32:], es=True),
)
_add(
    "ES256 signature with r and s swapped",
    INVALID,
    _signature(lambda s, _k: s[32:] + s[:32], es=True),
)

# -- the request itself ---------------------------------------------------------
_add(
    "authorization header in lower case, bad token",
    INVALID,
    lambda k: Probe(headers=(("authorization", f"Bearer {k.attacker_token()}"),)),
)
_add(
    "two headers, one spelt in lower case",
    BAD_REQUEST,
    lambda k: Probe(
        headers=(("Authorization", f"Bearer {k.token()}"), ("authorization", f"Bearer {k.token()}"))
    ),
)
_add(
    "Basic header, then a Bearer header",
    BAD_REQUEST,
    lambda k: Kit.authorization("Basic dXNlcjpwYXNz", f"Bearer {k.token()}"),
)
_add(
    "Bearer header, then a Basic header",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", "Basic dXNlcjpwYXNz"),
)
for _label, _header_outcome, _value in (
    ("Bearer with a tab before the token", BAD_REQUEST, "Bearer\t{t}"),
    ("Bearer with a trailing comma", INVALID, "Bearer {t},"),
    ("Bearer with a leading comma", INVALID, "Bearer ,{t}"),
    ("Bearer with a NBSP before the token", BAD_REQUEST, "Bearer\u00a0{t}"),
    ("Bearer token quoted", INVALID, 'Bearer "{t}"'),
    ("Bearer token=value form", INVALID, "Bearer token={t}x"),
    # White space around the credentials is SP and HTAB only (RFC 9110 §5.6.3).
    ("control: a tab and spaces around the header", OK, "\t Bearer {t} \t"),
    ("a vertical tab after the token", INVALID, "Bearer {t}\x0b"),
    ("a form feed after the token", INVALID, "Bearer {t}\x0c"),
    ("a NBSP after the token", INVALID, "Bearer {t}\u00a0"),
    ("a unit separator before the scheme", NO_TOKEN, "\x1fBearer {t}"),
    ("a NEL before the scheme", NO_TOKEN, "\x85Bearer {t}"),
):  # fmt: skip
    _add(_label, _header_outcome, lambda k, v=_value: Kit.authorization(v.format(t=k.token())))
_add(
    "header token and an empty query token",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", query="access_token="),
)
_add(
    "header token and a percent-encoded query name",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", query=f"%61ccess_token={k.token()}"),
)
_add(
    "header token and the query token twice",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", query="access_token=a&access_token=b"),
)
_add(
    "header token and a form token with another token",
    BAD_REQUEST,
    lambda k: Probe(
        headers=(("Authorization", f"Bearer {k.token()}"),),
        form={"access_token": k.attacker_token()},
    ),
)
_add(
    "huge header line (1 MB)",
    INVALID,
    lambda _k: Kit.authorization("Bearer " + "A" * 1_000_000),
)
_add(
    "huge header line of dots",
    INVALID,
    lambda _k: Kit.authorization("Bearer " + "." * 50_000),
)


def _tokens(probe: Probe) -> list[str]:
    """Every token-looking value the probe sends."""
    values = [value for _name, value in probe.headers]
    values.append(probe.query)
    values.extend((probe.form or {}).values())
    found: list[str] = []
    for value in values:
        for part in value.replace(",", " ").replace("=", " ").replace("&", " ").split():
            if len(part) >= 16:
                found.append(part)
    return found


def _segments(tokens: list[str]) -> set[str]:
    """The parts of ``tokens`` no log may carry (segments of 16 characters and more)."""
    segments = set()
    for token in tokens:
        segments.add(token)
        segments.update(s for s in token.split(".") if len(s) >= 16)
    return segments


@pytest.fixture(scope="module")
def env() -> Iterator[CorpusEnv]:
    corpus_env = CorpusEnv()
    yield corpus_env
    corpus_env.close()


def _check_logs(records: list[logging.LogRecord], probe: Probe) -> None:
    """No record (its message or any attribute) carries a segment of the token."""
    segments = _segments(_tokens(probe))
    for record in records:
        text = record.getMessage() + " " + " ".join(str(v) for v in vars(record).values())
        if any(s in text for s in segments):  # never print the segment itself
            pytest.fail(f"log record {record.name} carries a token segment")


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_first_corpus_logs_no_token_segment(
    env: CorpusEnv, case: Attack, caplog: pytest.LogCaptureFixture
) -> None:
    """The first passes' corpus, every log level: no record carries the token."""
    probe = case.build(env.kit)
    with caplog.at_level(logging.DEBUG):
        response = send(env.app.test_client(), probe)
    assert response.status_code == case.status
    _check_logs(caplog.records, probe)


@pytest.mark.parametrize("case", THIRD, ids=[c.name for c in THIRD])
def test_attack_third(env: CorpusEnv, case: Attack, caplog: pytest.LogCaptureFixture) -> None:
    probe = case.build(env.kit)
    env.seen_auth.clear()
    with caplog.at_level(logging.DEBUG):
        response = send(env.app.test_client(), probe)
    assert not [r for r in caplog.records if r.exc_info], "unexpected exception"
    assert response.status_code == case.status, (case.name, response.get_json())
    assert len(env.seen_auth) == 1
    if case.status == 200:
        assert env.seen_auth[0] is not None
    else:
        check_refusal(response, case)
        assert env.seen_auth[0] is None or case.status == 403
    _check_logs(caplog.records, probe)
    assert sum(env.attacker.hits.values()) == 0
    assert set(env.server.hits) <= {"/jwks"}


def test_head_request_is_refused_like_get(env: CorpusEnv) -> None:
    """HEAD runs the GET view: the same 401 and challenge, no body."""
    client = env.app.test_client()
    response = client.head("/protected", headers=auth_header(env.kit.attacker_token()))
    assert response.status_code == 401
    assert response.www_authenticate.parameters.get("error") == "invalid_token"
    assert response.data == b""
    response = client.head("/protected", headers=auth_header(env.kit.token()))
    assert response.status_code == 200


# -- EdDSA key sets holding a key of small order --------------------------------

_ED25519_P = 2**255 - 19
_ED25519_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
#: The y of each Ed25519 point of small order, and two non-canonical spellings
#: (p and p + 1 read as 0 and 1).
_SMALL_ORDER_Y = {
    "identity": 1,
    "order 2": _ED25519_P - 1,
    "order 4": 0,
    "order 8": _ED25519_Y8,
    "order 8, negated": _ED25519_P - _ED25519_Y8,
    "identity, y = p + 1": _ED25519_P + 1,
    "order 4, y = p": _ED25519_P,
}


def _edwards(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


def _forged_ed25519_token(issuer: TokenIssuer, kid: str, public: bytes) -> str:
    """A token that OpenSSL verifies with the small-order ``public``, made
    without any private key: R a small-order point, S = 0, and a ``jti``
    tried until ``[k]A = -R`` (one message in eight or better)."""
    key = ed25519.Ed25519PublicKey.from_public_bytes(public)
    points = [_edwards(y % _ED25519_P, sign) for y in _SMALL_ORDER_Y.values() for sign in (0, 1)]
    header = {"alg": "EdDSA", "kid": kid, "typ": "at+jwt"}
    for attempt in range(2000):
        claims = issuer.claims(jti=f"forged-{attempt}")
        signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode()
        for point in points:
            signature = point + bytes(32)
            try:
                key.verify(signature, signing_input)
            except Exception:  # noqa: S112 - InvalidSignature: try the next R
                continue
            return f"{signing_input.decode()}.{b64url(signature)}"
    raise AssertionError("no forgery found")  # pragma: no cover


@pytest.mark.parametrize("label", list(_SMALL_ORDER_Y))
def test_ed25519_key_of_small_order_is_skipped(label: str) -> None:
    """A key set holding a small-order Ed25519 key: the key is skipped (with
    its reason), a signature made without any private key is refused, and
    the genuine key of the same set keeps working."""
    server = IssuerServer()
    try:
        issuer = TokenIssuer(audience="api", alg="EdDSA")
        issuer.serve(server)
        kid = "small-order"
        public = _edwards(_SMALL_ORDER_Y[label])
        jwks = {
            "keys": [
                *issuer.jwks()["keys"],
                {"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64url(public)},
            ]
        }
        server.route("/jwks", Reply(200, jwks))
        app = Flask("small_order")
        app.config.update(TESTING=True, **issuer.config(audience="api"))
        OAuthVerify(app)

        @app.get("/protected")
        @require_token
        def protected() -> dict[str, Any]:
            return {"subject": g.auth.subject}

        client = app.test_client()
        response = client.get(
            "/protected", headers=auth_header(_forged_ed25519_token(issuer, kid, public))
        )
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_token"
        assert client.get("/protected", headers=auth_header(issuer.mint())).status_code == 200
        status = OAuthVerify.key_status(app.extensions["oauth_verify"].extension, app)
        assert any(kid in reason for entry in status for reason in entry.skipped)
    finally:
        server.close()


def test_ed448_key_of_small_order_is_skipped() -> None:
    ed448_p = 2**448 - 2**224 - 1
    genuine = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
    keys = [{"kty": "OKP", "crv": "Ed448", "kid": "genuine", "x": b64url(genuine)}]
    for name, y in (("identity", 1), ("order 2", ed448_p - 1), ("order 4", 0), ("y = p", ed448_p)):
        keys.append(
            {"kty": "OKP", "crv": "Ed448", "kid": name, "x": b64url(y.to_bytes(57, "little"))}
        )
    parsed = parse_key_set({"keys": keys}, ("EdDSA",))
    assert parsed.kids == ("genuine",)
    assert len(parsed.skipped) == 4


# -- aud of the wrong type when the audience is not checked ---------------------

_MALFORMED_AUD: tuple[Any, ...] = (5, True, 1.5, {"api": 1}, ["api", 3], [["api"]], [None])


@pytest.mark.parametrize("strategy", ["jwks", "introspection"])
@pytest.mark.parametrize("aud", _MALFORMED_AUD, ids=repr)
def test_malformed_aud_is_refused_when_not_verified(
    served_tokens: TokenIssuer, strategy: str, aud: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``VERIFY_AUDIENCE = False`` (Cognito access tokens have no ``aud``) skips
    the membership check, not the type: ``"aud": 5`` is refused with a 401
    (it reached the fail-closed net with a traceback), and an object's keys
    or the strings of a mixed list never become ``g.auth.audience``."""
    app = make_app(
        intro_config(served_tokens, STRATEGY=strategy, AUDIENCE=None, VERIFY_AUDIENCE=False)
    )
    token = (
        served_tokens.mint(audience=aud)
        if strategy == "jwks"
        else served_tokens.mint_opaque(audience=aud)
    )
    with caplog.at_level(logging.ERROR, logger="flask_oauth_verify"):
        response = app.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"
    assert not [r for r in caplog.records if r.exc_info], "refused by the fail-closed net"


@pytest.mark.parametrize("strategy", ["jwks", "introspection"])
def test_well_formed_aud_is_kept_when_not_verified(
    served_tokens: TokenIssuer, strategy: str
) -> None:
    app = make_app(
        intro_config(served_tokens, STRATEGY=strategy, AUDIENCE=None, VERIFY_AUDIENCE=False)
    )

    @app.get("/audience")
    @require_token
    def audience() -> dict[str, Any]:
        return {"audience": list(g.auth.audience)}

    mint = served_tokens.mint if strategy == "jwks" else served_tokens.mint_opaque
    client = app.test_client()
    for aud, expected in (("other", ["other"]), (["a", "b"], ["a", "b"]), ([], [])):
        response = client.get("/audience", headers=auth_header(mint(audience=aud)))
        assert response.status_code == 200
        assert response.get_json()["audience"] == expected


# -- the view still reads the raw body of a form POST ---------------------------


@pytest.mark.parametrize("locations", [["header"], ["header", "form"]])
def test_form_body_stays_readable_raw(tokens: TokenIssuer, locations: list[str]) -> None:
    """Looking for a form token (RFC 6750 §2.2, or a token sent two ways)
    parses the form; the view's ``request.get_data()`` (a webhook's signature
    check) must still see the body, not ``b""``."""
    app = make_app(tokens.config(audience="api", TOKEN_LOCATIONS=locations))

    @app.post("/hook")
    @require_token
    def hook() -> dict[str, Any]:
        return {"raw": request.get_data(as_text=True), "form": request.form.to_dict()}

    client = app.test_client()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/hook", data="a=1&b=2", headers={**form, **auth_header(tokens.mint())})
    assert response.status_code == 200
    assert response.get_json() == {"raw": "a=1&b=2", "form": {"a": "1", "b": "2"}}
    if "form" in locations:
        body = f"a=1&access_token={tokens.mint()}"
        response = client.post("/hook", data=body, headers=form)
        assert response.status_code == 200
        assert response.get_json()["raw"] == body


# -- PS256 salt and MGF, EdDSA, non-ASCII kids ----------------------------------


def _signed_with(issuer: TokenIssuer, kid: str, alg: str, sign: Any) -> str:
    """A token of ``issuer``'s claims whose signature is ``sign(signing_input)``."""
    header = {"alg": alg, "kid": kid, "typ": "at+jwt"}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(issuer.claims()))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def test_ps256_takes_only_the_rfc_7518_salt_and_mgf(issuer_server: IssuerServer) -> None:
    """RFC 7518 §3.5: MGF1 with the same hash and a salt as long as the hash.
    Another salt length or MGF hash, or a PKCS#1 v1.5 signature under a PS
    header (and the reverse), is refused."""
    issuer = TokenIssuer(audience="api", alg="PS256")
    kid = issuer.current_kid
    issuer.serve(issuer_server)
    app = make_app(issuer.config(audience="api", ALGORITHMS=["PS256", "RS256"]))
    private = issuer.key(kid).private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    sha256 = hashes.SHA256()

    def pss(salt: Any, mgf: Any = hashes.SHA256) -> Any:
        scheme = padding.PSS(mgf=padding.MGF1(mgf()), salt_length=salt)
        return lambda data: private.sign(data, scheme, sha256)

    def pkcs1(data: bytes) -> bytes:
        return bytes(private.sign(data, padding.PKCS1v15(), sha256))

    client = app.test_client()
    cases = [
        ("PS256", pss(32), 200),
        ("PS256", pss(padding.PSS.MAX_LENGTH), 401),
        ("PS256", pss(0), 401),
        ("PS256", pss(20), 401),
        ("PS256", pss(64), 401),
        ("PS256", pss(32, hashes.SHA1), 401),
        ("PS256", pkcs1, 401),
        ("RS256", pss(32), 401),
        ("RS256", pkcs1, 401),  # the key's own alg is PS256
    ]
    for alg, sign, status in cases:
        response = client.get(
            "/protected", headers=auth_header(_signed_with(issuer, kid, alg, sign))
        )
        assert response.status_code == status, (alg, status)


def test_eddsa_signatures_are_canonical_and_exact(issuer_server: IssuerServer) -> None:
    """Ed25519: S + L (a second spelling of S), a signature a byte short or
    long, and an empty one are refused; the genuine one passes."""
    issuer = TokenIssuer(audience="api", alg="EdDSA")
    issuer.serve(issuer_server)
    app = make_app(issuer.config(audience="api"))
    order = 2**252 + 27742317777372353535851937790883648493
    head, payload, signature = issuer.mint().split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    s_plus_l = (int.from_bytes(raw[32:], "little") + order).to_bytes(32, "little")
    client = app.test_client()
    for changed, status in (
        (raw, 200),
        (raw[:32] + s_plus_l, 401),
        (raw[:-1], 401),
        (raw + b"\x00", 401),
        (b"", 401),
    ):
        token = f"{head}.{payload}.{b64url(changed)}"
        assert client.get("/protected", headers=auth_header(token)).status_code == status


def test_non_ascii_kid_matches_only_exactly(issuer_server: IssuerServer) -> None:
    """A kid is compared as given: its NFD, NFKC look-alike or a zero-width
    variant names no key (and the real key never verifies another's token)."""
    issuer = TokenIssuer(audience="api")
    kid = issuer.add_key("RS256", kid="cl\u00e9-\u2460")  # é precomposed, circled one
    issuer.current_kid = kid
    issuer.serve(issuer_server)
    app = make_app(issuer.config(audience="api"))
    client = app.test_client()
    assert client.get("/protected", headers=auth_header(issuer.mint())).status_code == 200
    for other in ("cle\u0301-\u2460", "cl\u00e9-1", "cl\u00e9\u200b-\u2460", "CL\u00c9-\u2460"):
        token = issuer.mint(headers={"kid": other})
        response = client.get("/protected", headers=auth_header(token))
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_token"


def _cube_root_ceil(value: int) -> int:
    root = 1 << ((value.bit_length() + 2) // 3)  # at least the cube root
    while root**3 > value:  # Newton's method from above
        root = (2 * root + value // (root * root)) // 3
    while root**3 < value:
        root += 1
    return root


def test_rsa_e3_key_refuses_a_bleichenbacher_forgery(issuer_server: IssuerServer) -> None:
    """A key set may hold an RSA key with e = 3 (valid; Bleichenbacher 2006):
    a "signature" whose cube starts like a PKCS#1 v1.5 block for the token,
    garbage after the hash, is refused; the genuine signature passes."""
    issuer = TokenIssuer(audience="api")
    private = rsa.generate_private_key(public_exponent=3, key_size=2048)
    kid = issuer.add_key("RS256", kid="e3", key=RSAKey.import_key(private))
    issuer.current_kid = kid
    issuer.serve(issuer_server)
    app = make_app(issuer.config(audience="api"))
    client = app.test_client()
    assert client.get("/protected", headers=auth_header(issuer.mint())).status_code == 200
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420")
    header = b64url(_json({"alg": "RS256", "kid": kid, "typ": "at+jwt"}))
    signing_input = f"{header}.{b64url(_json(issuer.claims()))}"
    digest = hashlib.sha256(signing_input.encode()).digest()
    for padding_bytes in (1, 8):  # 00 01 FF.. 00 DigestInfo hash, then garbage
        prefix = b"\x00\x01" + b"\xff" * padding_bytes + b"\x00" + digest_info + digest
        block = int.from_bytes(prefix + b"\xff" * (256 - len(prefix)), "big")
        forged = _cube_root_ceil(int.from_bytes(prefix + bytes(256 - len(prefix)), "big"))
        assert forged**3 <= block and (forged**3).to_bytes(256, "big").startswith(prefix)
        token = f"{signing_input}.{b64url(forged.to_bytes(256, 'big'))}"
        assert client.get("/protected", headers=auth_header(token)).status_code == 401
