"""JWK Set parsing and filtering (RFC 7517): what is trusted, what is refused."""

from __future__ import annotations

import base64
import math
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

from flask_oauth_verify.keys import KeySetError, content_hash, parse_key_set
from flask_oauth_verify.testing import TokenIssuer


def _b64(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_jwk() -> dict[str, Any]:
    key = RSAKey.generate_key(2048)
    public = key.as_dict(private=False)
    public.update({"kid": "rsa-1", "use": "sig", "alg": "RS256"})
    return public


@pytest.fixture(scope="module")
def ec_jwk() -> dict[str, Any]:
    public = ECKey.generate_key("P-256").as_dict(private=False)
    public.update({"kid": "ec-1"})
    return public


@pytest.fixture(scope="module")
def ed_jwk() -> dict[str, Any]:
    public = OKPKey.generate_key("Ed25519").as_dict(private=False)
    public.update({"kid": "ed-1"})
    return public


def _short_rsa_jwk() -> dict[str, Any]:
    # cryptography, not joserfc: joserfc warns about generating short keys.
    private = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the point of the test
    numbers = private.public_key().public_numbers()
    return {"kty": "RSA", "kid": "short", "n": _b64(numbers.n), "e": _b64(numbers.e)}


ALL = ("RS256", "PS256", "ES256", "EdDSA")


def test_a_mixed_set_is_prepared_per_key_type(
    rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any], ed_jwk: dict[str, Any]
) -> None:
    keys = parse_key_set({"keys": [rsa_jwk, ec_jwk, ed_jwk]}, ALL)
    assert keys.kids == ("rsa-1", "ec-1", "ed-1")
    assert keys.skipped == ()
    rsa_key, ec_key, ed_key = (keys.get(k) for k in keys.kids)
    assert rsa_key is not None and ec_key is not None and ed_key is not None
    # The RSA key declares RS256: it is bound to RS256 only, never to PS256.
    assert set(rsa_key.verifiers) == {"RS256"}
    assert set(ec_key.verifiers) == {"ES256"}
    assert set(ed_key.verifiers) == {"EdDSA"}
    assert rsa_key.size == 2048


def test_prepared_verifier_checks_real_signatures() -> None:
    issuer = TokenIssuer(alg="ES256")
    keys = parse_key_set(issuer.jwks(), ("ES256",))
    token = issuer.mint(scopes=["a"])
    header, payload, signature = token.split(".")
    key = keys.get(issuer.current_kid)
    assert key is not None
    verify = key.verifier("ES256")
    assert verify is not None
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert verify(f"{header}.{payload}".encode(), raw_signature)
    assert not verify(f"{header}.{payload}x".encode(), raw_signature)
    # A signature made by another key of the same type does not verify.
    other = ECKey.generate_key("P-256")
    forged = jws.serialize_compact({"alg": "ES256"}, b"x", other)
    forged_header, forged_payload, forged_sig = forged.split(".")
    raw_forged = base64.urlsafe_b64decode(forged_sig + "=" * (-len(forged_sig) % 4))
    assert not verify(f"{forged_header}.{forged_payload}".encode(), raw_forged)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"use": "enc"}, "use='enc'"),
        ({"key_ops": ["encrypt"]}, "key_ops"),
        ({"key_ops": "verify"}, "key_ops"),
        ({"alg": "RS512"}, "not allowed"),
        ({"alg": "ES256"}, "fits no allowed alg"),
        ({"kty": "XYZ"}, "fits no allowed alg"),
        ({"n": "!!!not-base64!!!"}, "unreadable"),
        ({"e": 12}, "unreadable"),
        ({"kid": 7}, "kid is not a string"),
    ],
)
def test_unfit_keys_are_skipped_with_a_reason(
    rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any], change: dict[str, Any], reason: str
) -> None:
    bad = {**rsa_jwk, **change}
    keys = parse_key_set({"keys": [bad, ec_jwk]}, ("RS256", "ES256"))
    assert keys.kids == ("ec-1",), "the good key stays usable"
    assert len(keys.skipped) == 1
    assert reason in keys.skipped[0]


def test_short_rsa_keys_are_skipped(rsa_jwk: dict[str, Any]) -> None:
    keys = parse_key_set({"keys": [_short_rsa_jwk(), rsa_jwk]}, ("RS256",))
    assert keys.kids == ("rsa-1",)
    assert "1024 bits" in keys.skipped[0]


def _next_prime(start: int) -> int:
    """The first probable prime above ``start`` (small factors sieved by gcd first)."""
    small = 3 * 5 * 7 * 11 * 13 * 17 * 19 * 23 * 29 * 31 * 37 * 41 * 43 * 47
    candidate = start + 1 + start % 2
    while math.gcd(candidate, small) != 1 or pow(2, candidate - 1, candidate) != 1:
        candidate += 2
    return candidate


def _rsa_jwk_with_modulus(n: int, kid: str) -> dict[str, Any]:
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "n": _b64(n), "e": "AQAB"}


@pytest.fixture(scope="module")
def big_prime() -> int:
    """A 2048-bit prime (half of a 4096-bit key)."""
    return rsa.generate_private_key(65537, 4096).private_numbers().p


def test_rsa_moduli_that_give_the_private_key_away_are_skipped(
    rsa_jwk: dict[str, Any], big_prime: int
) -> None:
    # With any of these moduli the private exponent follows from the public
    # key alone (n = 3·q: phi = 2·(q - 1)): anyone could sign.
    half = rsa.generate_private_key(65537, 2048).private_numbers().p  # 1024 bits
    moduli = {
        "three-times-prime": 3 * big_prime,
        "even": 2 * big_prime,
        "prime-squared": big_prime * big_prime,
        "close-primes": half * _next_prime(half),
    }
    jwks = [_rsa_jwk_with_modulus(n, kid) for kid, n in moduli.items()]
    keys = parse_key_set({"keys": [*jwks, rsa_jwk]}, ("RS256",))
    assert keys.kids == ("rsa-1",)
    assert len(keys.skipped) == len(moduli)
    assert all("anyone could sign" in reason for reason in keys.skipped), keys.skipped


def test_ordinary_rsa_moduli_pass_the_factor_checks() -> None:
    jwks = [
        _rsa_jwk_with_modulus(
            rsa.generate_private_key(65537, bits).public_key().public_numbers().n, f"k{bits}"
        )
        for bits in (2048, 3072)
    ]
    assert parse_key_set({"keys": jwks}, ("RS256",)).kids == ("k2048", "k3072")


def test_ec_key_on_another_curve_is_skipped(ec_jwk: dict[str, Any]) -> None:
    p384 = ECKey.generate_key("P-384").as_dict(private=False)
    p384["kid"] = "p384"
    keys = parse_key_set({"keys": [p384, ec_jwk]}, ("ES256",))
    assert keys.kids == ("ec-1",)
    assert keys.skipped and keys.skipped[0].startswith("p384")


def test_not_a_member_object_is_skipped(rsa_jwk: dict[str, Any]) -> None:
    keys = parse_key_set({"keys": ["nope", 3, rsa_jwk]}, ("RS256",))
    assert keys.kids == ("rsa-1",)
    assert len(keys.skipped) == 2


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth"])
def test_a_set_with_private_material_is_refused_whole(
    rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any], member: str
) -> None:
    leaked = {**rsa_jwk, member: "AQAB"}
    with pytest.raises(KeySetError, match="private"):
        parse_key_set({"keys": [ec_jwk, leaked]}, ("RS256", "ES256"))


def test_a_symmetric_key_is_private_material(ec_jwk: dict[str, Any]) -> None:
    with pytest.raises(KeySetError, match="private"):
        parse_key_set({"keys": [ec_jwk, {"kty": "oct", "k": "c2VjcmV0"}]}, ("ES256",))


def test_a_real_private_jwk_is_refused() -> None:
    private = RSAKey.generate_key(2048).as_dict(private=True)
    with pytest.raises(KeySetError):
        parse_key_set({"keys": [private]}, ("RS256",))


def test_duplicate_kids_are_refused(rsa_jwk: dict[str, Any]) -> None:
    other = RSAKey.generate_key(2048).as_dict(private=False)
    for twin in (dict(rsa_jwk), {**other, "kid": "rsa-1"}):
        with pytest.raises(KeySetError, match="duplicate kid 'rsa-1' \\(two keys for RS256\\)"):
            parse_key_set({"keys": [rsa_jwk, twin]}, ("RS256", "ES256"))


def test_keys_that_share_a_kid_but_no_algorithm_are_told_apart_by_alg(
    rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any], ed_jwk: dict[str, Any]
) -> None:
    """RFC 7517 §4.5: keys of different kty may share a kid."""
    ec_twin = {**ec_jwk, "kid": "rsa-1"}
    ps_twin = {**RSAKey.generate_key(2048).as_dict(private=False), "kid": "rsa-1", "alg": "PS256"}
    keys = parse_key_set({"keys": [rsa_jwk, ec_twin, ps_twin, ed_jwk]}, ALL)
    assert keys.kids == ("ed-1", "rsa-1")
    assert len(keys.keys) == 4
    by_alg = {alg: keys.get("rsa-1", alg) for alg in ("RS256", "ES256", "PS256")}
    assert [key.kty if key else None for key in by_alg.values()] == ["RSA", "EC", "RSA"]
    assert by_alg["RS256"] is not by_alg["PS256"]
    assert all(key is not None and key.verifier(alg) for alg, key in by_alg.items())
    # An algorithm none of them takes finds one whose verifier refuses it.
    other = keys.get("rsa-1", "EdDSA")
    assert other is not None and other.verifier("EdDSA") is None
    assert keys.get(None) is None
    # Without the EC algorithm allowed, the EC key is skipped: no sharing.
    rsa_only = parse_key_set({"keys": [rsa_jwk, ec_twin]}, ("RS256",))
    assert rsa_only.shared_kids == {} and rsa_only.get("rsa-1") is not None


@pytest.mark.parametrize(
    "twin",
    [{"use": "enc"}, {"key_ops": ["encrypt"]}, {"alg": "RSA-OAEP"}],
    ids=["use-enc", "key_ops-encrypt", "alg-not-allowed"],
)
def test_a_kid_shared_with_a_key_that_is_not_used_is_no_clash(
    rsa_jwk: dict[str, Any], twin: dict[str, Any]
) -> None:
    """RFC 7517 §4.5: an encryption key may share the signing key's kid."""
    for order in ([rsa_jwk, {**rsa_jwk, **twin}], [{**rsa_jwk, **twin}, rsa_jwk]):
        keys = parse_key_set({"keys": order}, ("RS256",))
        key = keys.get("rsa-1")
        assert key is not None and key.verifier("RS256") is not None
        assert len(keys.keys) == 1 and len(keys.skipped) == 1


@pytest.mark.parametrize(
    "document", [None, [], "keys", {"keys": "x"}, {"keys": {}}, {"key": []}, {"keys": [{1}]}]
)
def test_documents_that_are_not_a_jwk_set_are_refused(document: Any) -> None:
    with pytest.raises(KeySetError):
        parse_key_set(document, ("RS256",))


def test_lookup_by_kid_and_without_kid(rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any]) -> None:
    one = parse_key_set({"keys": [rsa_jwk]}, ("RS256",))
    assert one.get(None) is one.get("rsa-1")
    assert one.get("other") is None
    two = parse_key_set({"keys": [rsa_jwk, ec_jwk]}, ("RS256", "ES256"))
    assert two.get(None) is None, "without a kid, several keys are ambiguous"


def test_content_hash_ignores_member_order(rsa_jwk: dict[str, Any]) -> None:
    reordered = dict(reversed(list(rsa_jwk.items())))
    assert content_hash({"keys": [rsa_jwk]}) == content_hash({"keys": [reordered]})
    assert content_hash({"keys": [rsa_jwk]}) != content_hash({"keys": []})
    keys = parse_key_set({"keys": [rsa_jwk]}, ("RS256",))
    assert keys.content_hash == content_hash({"keys": [reordered]})


def test_an_empty_set_parses_to_no_keys() -> None:
    keys = parse_key_set({"keys": []}, ("RS256",))
    assert keys.kids == ()
    assert keys.get("x") is None


def test_an_rsa_modulus_beyond_openssl_s_limit_is_skipped_before_its_checks(
    rsa_jwk: dict[str, Any],
) -> None:
    huge = _rsa_jwk_with_modulus((1 << 200_000) | 1, "huge")  # the checks would take seconds
    keys = parse_key_set({"keys": [huge, rsa_jwk]}, ("RS256",))
    assert keys.kids == ("rsa-1",)
    assert "> 16384" in keys.skipped[0]


def test_the_thumbprint_is_rfc_7638s_whatever_other_members_the_key_has() -> None:
    """RFC 7638 §3.1's example key, with the members a key set carries
    (``kid``, ``alg``, ``use``): the thumbprint hashes the required members
    only. Hashing the whole public JWK gave another value for any real key."""
    example = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "use": "sig",
        "kid": "2011-04-29",
    }
    (key,) = parse_key_set({"keys": [example]}, ("RS256",)).keys
    assert key.thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
