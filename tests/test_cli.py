"""The ``flask oauth-verify`` commands, through Flask's CLI runner."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from joserfc import jwt
from joserfc.jwk import OctKey

from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header, b64url

from .conftest import FakeClock, free_port, make_app


def run(app: Flask, *args: str, stdin: str | None = None) -> Result:
    result = app.test_cli_runner().invoke(args=["oauth-verify", *args], input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def inspect(app: Flask, token: str, *extra: str) -> Result:
    """Pass the token on standard input, as the docs recommend."""
    result = run(app, "inspect", *extra, "-", stdin=token + "\n")
    assert token not in result.output
    signature = token.rsplit(".", 1)[-1]
    if len(signature) >= 16:
        assert signature not in result.output  # nor its signature
    return result


def verdict(result: Result) -> str:
    [line] = [line for line in result.output.splitlines() if line.startswith("Result:")]
    return line


# -- inspect ----------------------------------------------------------------------


def test_inspect_a_valid_token_step_by_step(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(), clock=clock)
    token = tokens.mint(now=clock(), scopes=["read:users"], organization_id="org_1")
    result = inspect(app, token, "--scope", "read:users")
    assert result.exit_code == 0, result.output
    assert verdict(result) == "Result: VALID — this token would be accepted."
    for step in ("format", "header", "iss", "key", "signature", "exp", "aud", "scopes"):
        assert f"[PASS] {step}" in result.output, step
    assert "RSA, 2048 bits" in result.output
    assert 'organization_id="org_1"' in result.output
    # also accepted as an argument (and with a "Bearer " prefix on stdin)
    assert run(app, "inspect", token).exit_code == 0
    assert run(app, "inspect", stdin=f"Bearer {token}\n").exit_code == 0


def _alg_none(tokens: TokenIssuer, clock: FakeClock) -> str:
    return f"{b64url({'alg': 'none', 'typ': 'at+jwt'})}.{b64url(tokens.claims(now=clock()))}."


def _hs256(tokens: TokenIssuer, clock: FakeClock) -> str:
    key = OctKey.import_key("a-shared-secret-that-is-long-enough-32b")
    return jwt.encode({"alg": "HS256"}, tokens.claims(now=clock()), key, algorithms=["HS256"])


def _tampered(tokens: TokenIssuer, clock: FakeClock) -> str:
    head, _payload, signature = tokens.mint(now=clock()).split(".")
    forged = b64url(tokens.claims(now=clock(), subject="admin"))
    return f"{head}.{forged}.{signature}"


BAD_TOKENS: list[tuple[str, Any, str]] = [
    (
        "expired",
        lambda t, c: t.mint(now=c() - 7200, expires_in=3600),
        "The token expired at {stamp} UTC (60 min ago) (leeway 30 s).",
    ),
    (
        "not yet valid",
        lambda t, c: t.mint(now=c() + 600),
        "The token is not valid before {later} UTC (in 10 min) (leeway 30 s): it was minted "
        "for later, or the issuer's clock is ahead of this server's.",
    ),
    (
        "wrong audience",
        lambda t, c: t.mint(now=c(), audience="billing-api"),
        'The token is for audience "billing-api", but this API is api (OAUTH_VERIFY_AUDIENCE): '
        "it was issued for a different API.",
    ),
    (
        "no audience",
        lambda t, c: t.mint(t.claims(now=c(), aud=None)),
        "The token has no aud claim; this API is api.",
    ),
    (
        "no exp",
        lambda t, c: t.mint({k: v for k, v in t.claims(now=c()).items() if k != "exp"}),
        "The token has no numeric exp claim; access tokens must expire.",
    ),
    (
        "foreign issuer",
        lambda t, c: t.mint(now=c(), iss="https://login.other.example"),
        'iss "https://login.other.example" is not a trusted issuer; this API trusts '
        "https://issuer.example.test",
    ),
    (
        "unknown kid",
        lambda t, c: t.mint(now=c(), headers={"kid": "rotated-away"}),
        'No key with kid "rotated-away" in the key set of https://issuer.example.test',
    ),
    (
        "tampered payload",
        _tampered,
        "The signature does not verify with key",
    ),
    ("hmac", _hs256, "The token is signed with HS256, an HMAC (shared-secret) algorithm"),
    ("alg none", _alg_none, "alg is 'none': the token is unsigned"),
    (
        "id token",
        lambda t, c: t.mint(now=c(), typ="id_token+jwt"),
        'typ "id_token+jwt" is not an access-token type',
    ),
    (
        "jwe",
        lambda t, c: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
        "The token has five segments: it is an encrypted JWT (JWE).",
    ),
    (
        "opaque",
        lambda t, c: "2YotnFZFEjr1zCsicMWpAA",
        "The token is not a JWT and strategy 'jwks' verifies JWTs locally.",
    ),
    (
        "garbage header",
        lambda t, c: "eyJub3QganNvbg.e30.c2ln",
        "The header is not base64url-encoded JSON.",
    ),
]


@pytest.mark.parametrize(
    ("provider", "said"),
    [
        ("cognito", "Cognito has no introspection endpoint"),
        ("auth0", "asks for no audience"),
        ("entra_id", "Entra ID has no introspection endpoint"),
        ("generic", "An opaque token needs introspection"),
    ],
)
def test_inspect_does_not_suggest_introspection_a_provider_does_not_have(
    tokens: TokenIssuer, clock: FakeClock, provider: str, said: str
) -> None:
    """A Cognito refresh token: following the introspection hint failed at start-up."""
    issuers = {
        "cognito": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
        "auth0": "https://tenant.eu.auth0.com/",
        "entra_id": "https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0",
        "generic": tokens.issuer,
    }
    config = tokens.config(
        PROVIDER=provider, ISSUER=issuers[provider], ALLOWED_CLIENT_IDS=["app-client"]
    )
    if provider == "cognito":
        del config["OAUTH_VERIFY_AUDIENCE"]
    app = make_app(config, clock=clock)
    result = inspect(app, "2YotnFZFEjr1zCsicMWpAA")
    assert result.exit_code == 1
    assert said in verdict(result)
    assert ("needs introspection" in verdict(result)) == (provider == "generic")
    # Cognito's refresh tokens are encrypted JWTs (five segments)
    jwe = inspect(app, "eyJjdHkiOiJKV1QiLCJlbmMiOiJBMjU2R0NNIiwiYWxnIjoiUlNBLU9BRVAifQ.a.b.c.d")
    assert "encrypted JWT (JWE)" in verdict(jwe)
    assert (said in verdict(jwe)) == (provider != "generic")
    if provider != "generic":  # asked to introspect: no endpoint to find, no network call
        asked = inspect(app, "2YotnFZFEjr1zCsicMWpAA", "--strategy", "introspection")
        assert said in verdict(asked) and "[FAIL] introspect" in asked.output


@pytest.mark.parametrize(("kind", "make", "sentence"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_inspect_explains_each_kind_of_bad_token(
    tokens: TokenIssuer, clock: FakeClock, kind: str, make: Any, sentence: str
) -> None:
    clock.now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    app = make_app(tokens.config(), clock=clock)
    token = make(tokens, clock)
    result = inspect(app, token)
    assert result.exit_code == 1, result.output
    expected = sentence.format(stamp="2023-11-14 21:13:20", later="2023-11-14 22:23:20")
    assert verdict(result).startswith(f"Result: REJECTED — {expected}"), result.output
    assert "[FAIL]" in result.output


@pytest.mark.parametrize(
    ("claim", "value", "sentence"),
    [
        ("exp", 1_700_003_600_000, "The exp claim 1700003600000 lies beyond the year 9999"),
        ("iat", 10**20, "The token claims to be issued at 100000000000000000000 (seconds"),
        ("nbf", 10**20, "The token is not valid before 100000000000000000000 (seconds"),
        ("exp", -(10**20), "The token expired at -100000000000000000000 (seconds"),
    ],
    ids=["exp in milliseconds", "iat beyond any date", "nbf beyond any date", "exp before"],
)
def test_inspect_explains_times_beyond_any_date(
    tokens: TokenIssuer, clock: FakeClock, claim: str, value: int, sentence: str
) -> None:
    """A datetime cannot show them: the command crashed with a traceback."""
    clock.now = 1_700_000_000.0
    app = make_app(tokens.config(), clock=clock)
    payload = tokens.claims(now=clock())
    payload[claim] = value
    result = inspect(app, tokens.mint(payload))
    assert result.exit_code == 1, result.output
    assert verdict(result).startswith(f"Result: REJECTED — {sentence}"), result.output
    assert "Traceback" not in result.output


def test_inspect_explains_a_missing_scope(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(), clock=clock)
    token = tokens.mint(now=clock(), scopes=["read:users"])
    result = inspect(app, token, "--scope", "read:users", "--scope", "write:users")
    assert result.exit_code == 1
    assert verdict(result) == (
        "Result: REJECTED — The view needs all of read:users write:users; the token lacks "
        "write:users (it has: read:users). Answer: 403 insufficient_scope."
    )
    either = inspect(app, token, "--any-scope", "--scope", "admin", "--scope", "read:users")
    assert either.exit_code == 0


def test_inspect_lists_every_failing_claim(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(), clock=clock)
    token = tokens.mint(now=clock() - 7200, expires_in=60, audience="other")
    result = inspect(app, token)
    assert "[FAIL] exp" in result.output
    assert "[FAIL] aud" in result.output
    assert "[PASS] signature" in result.output


def test_inspect_when_the_key_set_cannot_be_fetched(tokens: TokenIssuer, clock: FakeClock) -> None:
    config = tokens.config(JWKS_URI=f"http://127.0.0.1:{free_port()}/jwks")
    config.pop("OAUTH_VERIFY_JWKS")
    result = inspect(make_app(config, clock=clock), tokens.mint(now=clock()))
    assert result.exit_code == 1
    assert "The key set of https://issuer.example.test cannot be fetched" in verdict(result)
    assert "503 temporarily_unavailable" in verdict(result)


def test_inspect_opaque_tokens_by_introspection(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(
        STRATEGY="auto",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
    )
    app = make_app(config, clock=clock)
    token = served_tokens.mint_opaque(scopes=["read:users"])
    result = inspect(app, token, "--scope", "read:users")
    assert result.exit_code == 0, result.output
    assert "[PASS] introspect" in result.output

    served_tokens.revoke(token)
    result = inspect(app, token)
    assert result.exit_code == 1
    assert "the token is not active: revoked, expired, or never issued" in verdict(result)

    issuer_server.route("/introspect", Reply(500, "down"))
    result = inspect(app, served_tokens.mint_opaque())
    assert "a problem of this server, not of the token" in verdict(result)


def test_inspect_needs_a_token(app: Flask) -> None:
    result = run(app, "inspect", stdin="\n")
    assert result.exit_code == 2
    assert "No token given" in result.output


# -- keys ------------------------------------------------------------------------


def test_keys_lists_the_static_key_set(tokens: TokenIssuer) -> None:
    result = run(make_app(tokens.config()), "keys")
    assert result.exit_code == 0, result.output
    assert "source: static key set (OAUTH_VERIFY_JWKS)" in result.output
    assert f'kid "{tokens.current_kid}": RSA, 2048 bits, algorithms RS256' in result.output


def test_keys_fetches_and_lists_as_json(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    served_tokens.add_key("ES256", kid="ec-1")
    app = make_app(served_tokens.config(ALGORITHMS=["RS256", "ES256"]), clock=clock)
    result = run(app, "keys", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["source"] == f"{issuer_server.url}/jwks"
    assert entry["age_seconds"] == 0 and entry["fresh"] is True and entry["error"] is None
    keys = {k["kid"]: k for k in entry["keys"]}
    assert keys["ec-1"]["kty"] == "EC" and keys["ec-1"]["crv"] == "P-256"
    assert keys["ec-1"]["algorithms"] == ["ES256"] and keys["ec-1"]["size"] == 256
    assert keys[served_tokens.current_kid]["algorithms"] == ["RS256"]

    text = run(app, "keys")
    assert f"source: {issuer_server.url}/jwks (fetched 0 s ago, fresh)" in text.output
    assert issuer_server.hits["/jwks"] == 1  # listing again uses the fresh copy
    assert run(app, "keys", "--refresh").exit_code == 0
    assert issuer_server.hits["/jwks"] == 2


def test_keys_reports_an_unreachable_issuer(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    issuer_server.route("/jwks", Reply(500, "down"))
    result = run(make_app(served_tokens.config()), "keys")
    assert result.exit_code == 1
    assert "error: keys of" in result.output and "HTTP status 500" in result.output
    assert "no usable keys" in result.output


# -- discover --------------------------------------------------------------------


def test_discover_shows_the_resolved_endpoints(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    config = served_tokens.config()
    config.pop("OAUTH_VERIFY_JWKS_URI")
    result = run(make_app(config), "discover")
    assert result.exit_code == 0, result.output
    base = issuer_server.url
    assert f"Issuer {base}" in result.output
    tried = f"metadata: found (tried in order: {base}/.well-known/openid-configuration"
    assert tried in result.output
    assert f"jwks_uri: {base}/jwks (discovered)" in result.output
    assert f"introspection_endpoint: {base}/introspect (discovered)" in result.output
    assert f"token_endpoint: {base}/token" in result.output


@pytest.mark.parametrize("strategy", ["jwks", "auto"])
def test_discover_fails_on_discovered_endpoints_the_fetch_policy_refuses(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, strategy: str
) -> None:
    """A Keycloak behind a TLS proxy that publishes http:// URLs: every request
    was 503, and ``discover`` listed them as found and exited 0."""
    metadata = {
        **served_tokens.metadata(),
        "jwks_uri": "http://keycloak.internal:8080/certs",
        "introspection_endpoint": "ftp://keycloak.internal/introspect",
    }
    issuer_server.route("/.well-known/openid-configuration", Reply(200, metadata))
    client_id, secret = served_tokens.introspection_credentials
    credentials = {"INTROSPECTION_CLIENT_ID": client_id, "INTROSPECTION_CLIENT_SECRET": secret}
    config = served_tokens.config(STRATEGY=strategy, **credentials)
    config.pop("OAUTH_VERIFY_JWKS_URI")
    result = run(make_app(config), "discover")
    assert result.exit_code == 1, result.output
    assert (
        "jwks_uri: http://keycloak.internal:8080/certs (discovered) — REFUSED: The discovered "
        "jwks_uri uses plain http to a non-loopback host (keycloak.internal)"
    ) in result.output
    assert (
        "(discovered) — REFUSED: The discovered introspection_endpoint must be an http(s) URL"
        in (result.output)
    )


def test_discover_without_metadata(tokens: TokenIssuer) -> None:
    config = tokens.config(JWKS_URI=f"http://127.0.0.1:{free_port()}/keys")
    config.pop("OAUTH_VERIFY_JWKS")
    config["OAUTH_VERIFY_ISSUER"] = f"http://127.0.0.1:{free_port()}"
    result = run(make_app(config), "discover")
    assert result.exit_code == 0  # the configured JWKS URI does not need discovery
    assert "metadata: not available (discovery failed:" in result.output
    assert "(OAUTH_VERIFY_JWKS_URI)" in result.output

    config.pop("OAUTH_VERIFY_JWKS_URI")
    result = run(make_app(config, name="no-jwks"), "discover")
    assert result.exit_code == 1
    assert "jwks_uri: NOT FOUND" in result.output


def test_discover_and_keys_escape_what_the_issuer_publishes(
    served_tokens: TokenIssuer, issuer_server: IssuerServer
) -> None:
    """Issuer metadata and key sets are outside input: a terminal escape or a
    newline in them must not reach the operator's terminal as such."""
    forged = "\r\x1b[2Kjwks_uri: https://trusted.example/jwks (discovered)\n"
    metadata = {**served_tokens.metadata(), "token_endpoint": forged}
    metadata["revocation_endpoint"] = "https://x.example/\x1b]0;pwned\x07"
    issuer_server.route("/.well-known/openid-configuration", Reply(200, metadata))
    keys = served_tokens.jwks()["keys"] + [{"kty": "RSA", "kid": "bad\x1b[31m", "n": "AQAB"}]
    issuer_server.route("/jwks", Reply(200, {"keys": keys}))
    config = served_tokens.config()
    config.pop("OAUTH_VERIFY_JWKS_URI")
    app = make_app(config)
    for command in ("discover", "keys"):
        result = run(app, command)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\r" not in result.output, command
    result = run(app, "discover")
    assert "token_endpoint: \\r\\x1b[2Kjwks_uri:" in result.output
    assert sum(line.startswith("  jwks_uri:") for line in result.output.splitlines()) == 1


# -- mint ------------------------------------------------------------------------


def test_mint_is_refused_without_a_development_issuer(app: Flask) -> None:
    result = run(app, "mint")
    assert result.exit_code == 2
    assert "Refusing to mint: this app declares no development issuer" in result.output


def test_mint_with_the_development_issuer(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app({**tokens.config(), "OAUTH_VERIFY_DEV_ISSUER": tokens}, clock=clock)
    result = app.test_cli_runner().invoke(
        args=[
            "oauth-verify", "mint", "--sub", "user_42", "--scope", "read:users",
            "--org", "org_9", "--claim", 'custom_claims={"client_type": "m2m"}',
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert "." in token and "minted by" in result.stderr
    claims = jwt.decode(token, tokens.key()).claims
    assert claims["sub"] == "user_42" and claims["oid"] == "org_9"
    assert claims["custom_claims"] == {"client_type": "m2m"}
    assert claims["iat"] == int(clock())
    checked = inspect(app, token, "--scope", "read:users")
    assert checked.exit_code == 0, checked.output


def test_a_persistent_development_issuer_is_one_key_across_processes(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The CLI process mints, the server process verifies: both build the
    issuer from the key file (built at import without it, each process had
    its own key and the minted token was refused)."""
    key_file = tmp_path / "instance" / "dev-issuer-key.json"  # folder made too

    def dev_app(name: str) -> Flask:
        issuer = TokenIssuer.persistent(key_file, "https://dev-issuer.local")
        config = {**issuer.config(), "OAUTH_VERIFY_DEV_ISSUER": issuer}
        return make_app(config, clock=clock, name=name)

    minting, serving = dev_app("cli"), dev_app("server")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    result = minting.test_cli_runner().invoke(args=["oauth-verify", "mint", "--sub", "u1"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    response = serving.test_client().get("/protected", headers=auth_header(token))
    assert response.status_code == 200, response.json

    key_file.write_text(json.dumps({"alg": "ES256", "key": {}}))
    with pytest.raises(ValueError, match="holds no RS256 key"):
        TokenIssuer.persistent(key_file)


def test_a_persistent_issuer_without_hard_links_still_shares_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without hard links the key file is created
    exclusively instead: still owner-only, still one key for every process."""

    def no_hard_links(source: object, target: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    key_file = tmp_path / "dev-issuer-key.json"
    first = TokenIssuer.persistent(key_file, "https://dev-issuer.local")
    second = TokenIssuer.persistent(key_file, "https://dev-issuer.local")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert first.current_kid == second.current_kid
    assert jwt.decode(first.mint(subject="u1"), second.key()).claims["sub"] == "u1"
    assert [p.name for p in tmp_path.iterdir()] == ["dev-issuer-key.json"]  # no drafts left


def test_a_bad_development_issuer_fails_at_init(tokens: TokenIssuer) -> None:
    from flask_oauth_verify import ConfigurationError

    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_DEV_ISSUER"):
        make_app({**tokens.config(), "OAUTH_VERIFY_DEV_ISSUER": "yes please"})


def _segment(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def test_inspect_never_prints_a_tokens_control_characters(
    tokens: TokenIssuer, clock: FakeClock
) -> None:
    """A forged alg with terminal escapes could overwrite the verdict line."""
    app = make_app(tokens.config(), clock=clock)
    forged = "HS256\r\x1b[2K\x1b[1AResult: VALID\x1b[8m"
    header = _segment(json.dumps({"alg": forged, "typ": "JWT"}))
    token = f"{header}.{_segment(json.dumps({'sub': 'x'}))}.c2lnbmF0dXJl"
    result = inspect(app, token)
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\r" not in result.output
    assert verdict(result).startswith("Result: REJECTED")


def test_inspect_refuses_deeply_nested_json_with_a_sentence(
    tokens: TokenIssuer, clock: FakeClock
) -> None:
    app = make_app(tokens.config(), clock=clock)
    token = f"{_segment('[' * 5000)}.{_segment('{}')}.c2lnbmF0dXJl"
    result = inspect(app, token)
    assert result.exit_code == 1, result.output
    assert verdict(result).startswith("Result: REJECTED")


def test_mint_claims_are_claims_whatever_their_name(tokens: TokenIssuer, clock: FakeClock) -> None:
    """``--claim subject=…``, ``kid=…``, ``typ=…`` or ``headers=…`` name claims,
    never arguments of ``TokenIssuer.mint`` (they crashed it, or changed the
    token's header)."""
    app = make_app({**tokens.config(), "OAUTH_VERIFY_DEV_ISSUER": tokens}, clock=clock)
    extra = ["subject=x", "kid=nope", "typ=JWT", 'headers={"x5u": "https://evil"}', "now=1"]
    args = ["oauth-verify", "mint", "--sub", "user_42"]
    for claim in extra:
        args += ["--claim", claim]
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    decoded = jwt.decode(token, tokens.key())
    assert decoded.claims["sub"] == "user_42"
    for name in ("subject", "kid", "typ", "headers", "now"):
        assert name in decoded.claims
    assert "x5u" not in decoded.header and decoded.header["kid"] == tokens.current_kid
