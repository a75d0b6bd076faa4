"""Key sets (RFC 7517) parsed once into ready-to-use verifiers.

Pure code: a JWK Set dict in, a :class:`PreparedKeySet` out. joserfc imports
and validates every key; for each key and each allowed algorithm we then
prepare a verifier bound to the key's ``cryptography`` public key, so that the
hot path does one dict lookup and one signature check, with no per-request
key import.

Filtering (a key that fails is skipped and the reason recorded):

* ``use`` must be ``sig`` or absent, ``key_ops`` (when present) must allow
  ``verify``;
* ``kty``/``crv`` must be supported and bound to an allowed algorithm
  (RSA -> RS*/PS*, EC P-256 -> ES256, ..., OKP Ed25519 -> EdDSA);
* a key's own ``alg``, when present, must be one of the allowed algorithms
  and the only one it is used with;
* RSA moduli shorter than 2048 bits are refused;
* an Ed25519/Ed448 public key of small order (or not canonically encoded)
  is refused: with it, a signature made without any private key verifies
  for a good share of messages (OpenSSL does not check the key's order);
* an ``x5c`` chain, when present, must start with a certificate of the
  very key the other members give (RFC 7517 §4.7: a key that says two
  different things is refused, whichever of them was meant).

A set that carries private key material, or two keys with the same ``kid``
that an allowed algorithm fits both of, is refused as a whole
(:class:`KeySetError`): such a set is a misconfiguration, and guessing which
key was meant would be unsafe. Keys that share a ``kid`` but no algorithm
(an RSA and an EC key, as RFC 7517 §4.5 allows) are told apart by the
token's ``alg``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

__all__ = ["KeySetError", "PreparedKey", "PreparedKeySet", "parse_key_set"]

MIN_RSA_BITS = 2048
#: OpenSSL's own limit (OPENSSL_RSA_MAX_MODULUS_BITS): a larger modulus is no
#: key anyone uses, and checking it costs seconds.
MAX_RSA_BITS = 16384
#: The secret members of a JWK (RFC 7518 §6.2.2, §6.3.2, §6.4.1): a key set
#: holding one is refused, and repr(Settings) never shows one.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
#: Public key members in base64url (RFC 7518 §6.2.1, §6.3.1; RFC 8037 §2).
_BASE64URL_MEMBERS = ("n", "e", "x", "y")

Verify = Callable[[bytes, bytes], bool]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "ES256K": "secp256k1"}
_EC_SIZES = {"P-256": 32, "P-384": 48, "P-521": 66, "secp256k1": 32}
_ED25519_P = 2**255 - 19
_ED25519_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
_ED448_P = 2**448 - 2**224 - 1
#: The field prime of each Edwards curve (RFC 8032 §5) and the ``y`` of its
#: points of small order: the identity (1), the point of order 2 (p - 1),
#: those of order 4 (0) and, on Ed25519 (cofactor 8), of order 8 (±y8).
_SMALL_ORDER_Y = {
    "Ed25519": (
        _ED25519_P,
        frozenset({0, 1, _ED25519_P - 1, _ED25519_Y8, _ED25519_P - _ED25519_Y8}),
    ),
    "Ed448": (_ED448_P, frozenset({0, 1, _ED448_P - 1})),
}


class KeySetError(ValueError):
    """The key set as a whole is unusable (private keys, duplicate kids, garbage)."""


def _rsa_verifier(public: rsa.RSAPublicKey, alg: str) -> Verify:
    hash_cls = _HASHES[alg[2:]]
    pad: padding.AsymmetricPadding
    if alg.startswith("PS"):
        # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash.
        pad = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=padding.PSS.DIGEST_LENGTH)
    else:
        pad = padding.PKCS1v15()
    size = (public.key_size + 7) // 8
    algorithm = hash_cls()

    def verify(message: bytes, signature: bytes) -> bool:
        if len(signature) != size:
            return False
        try:
            public.verify(signature, message, pad, algorithm)
        except InvalidSignature:
            return False
        return True

    return verify


def _ec_verifier(public: ec.EllipticCurvePublicKey, alg: str, crv: str) -> Verify:
    half = _EC_SIZES[crv]
    ecdsa = ec.ECDSA(_HASHES[alg[2:5]]())

    def verify(message: bytes, signature: bytes) -> bool:
        # RFC 7518 §3.4: the JWS signature is R || S, each exactly `half`
        # octets. A DER-encoded signature has another length and is refused.
        if len(signature) != 2 * half:
            return False
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        if r == 0 or s == 0:
            return False
        try:
            public.verify(encode_dss_signature(r, s), message, ecdsa)
        except InvalidSignature:
            return False
        return True

    return verify


def _check_edwards_key(public: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> None:
    """Refuse a small-order or non-canonical Ed25519/Ed448 public key.

    ``A`` of small order makes ``[k]A`` take a handful of values whatever the
    message, so ``R`` one of the small-order points and ``S = 0`` verify for
    one message in eight or better: anyone could sign. The key set, not a
    token, would have to carry such a key; it is refused like a short RSA key.
    """
    crv = "Ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else "Ed448"
    raw = public.public_bytes_raw()
    prime, small = _SMALL_ORDER_Y[crv]
    y = int.from_bytes(raw, "little") & ~(1 << (8 * len(raw) - 1))  # the top bit: x's sign
    if y >= prime:
        raise ValueError(f"{crv} key not canonically encoded")
    if y in small:
        raise ValueError(f"{crv} key of small order")


def _eddsa_verifier(public: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> Verify:
    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class PreparedKey:
    """One usable public key with a verifier per algorithm it may be used with."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    size: int
    thumbprint: str
    verifiers: Mapping[str, Verify]
    public_jwk: Mapping[str, Any]

    def verifier(self, alg: str) -> Verify | None:
        """The verifier for ``alg``, or ``None`` if the key is not bound to it."""
        return self.verifiers.get(alg)


_NO_SHARED_KIDS: Mapping[str, Mapping[str, PreparedKey]] = MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class PreparedKeySet:
    """A parsed key set: keys by ``kid``, plus what was skipped and why."""

    by_kid: Mapping[str, PreparedKey]
    keys: tuple[PreparedKey, ...]
    skipped: tuple[str, ...]
    content_hash: str
    #: kids that keys of disjoint algorithms share (RFC 7517 §4.5 allows it,
    #: e.g. an RSA and an EC key), each by algorithm; never in ``by_kid``
    shared_kids: Mapping[str, Mapping[str, PreparedKey]] = dataclasses.field(
        default_factory=lambda: _NO_SHARED_KIDS
    )

    def get(self, kid: str | None, alg: str | None = None) -> PreparedKey | None:
        """The key for ``kid``; without a ``kid``, the only key if there is one.

        A kid several keys share gives the key bound to ``alg`` (any of them
        when none is: its verifier then refuses ``alg``, like a lone key's).
        """
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is None and kid in self.shared_kids:
                sharing = self.shared_kids[kid]
                return sharing.get(alg or "") or next(iter(sharing.values()))
            return key
        if len(self.keys) == 1:
            return self.keys[0]
        return None

    @property
    def kids(self) -> tuple[str, ...]:
        """The key ids in the set."""
        return (*self.by_kid, *self.shared_kids)


def content_hash(jwks: Mapping[str, Any]) -> str:
    """A stable SHA-256 of a key set, used to share parsed sets across fetches."""
    canonical = json.dumps(jwks, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _algorithms_for(jwk: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    result = []
    for alg in allowed:
        if alg.startswith(("RS", "PS")):
            fits = kty == "RSA"
        elif alg in _EC_CURVES:
            fits = kty == "EC" and crv == _EC_CURVES[alg]
        elif alg == "EdDSA":
            fits = kty == "OKP" and crv in ("Ed25519", "Ed448")
        else:  # "Ed25519" (RFC 9864 fully-specified name)
            fits = kty == "OKP" and crv == "Ed25519"
        if fits:
            result.append(alg)
    declared = jwk.get("alg")
    if declared is not None:
        return [alg for alg in result if alg == declared]
    return result


def _small_primes_product(limit: int) -> int:
    """The product of every prime below ``limit`` (a sieve; computed once)."""
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, limit, i)))
    return math.prod(i for i in range(limit) if sieve[i])


#: The primes below 2**12 multiplied: one gcd (about 20 µs per key, once per
#: key-set parse) finds a modulus with a small factor.
_SMALL_PRIMES = _small_primes_product(1 << 12)


def _check_rsa_size(jwk: Mapping[str, Any]) -> None:
    """Refuse a short or trivially factored RSA modulus before import.

    joserfc would only warn about a short one. A modulus that is even, has
    a prime factor below 4096 (``n = 3·q``, published by a broken key
    generator), or is a square or the product of two nearly equal primes
    gives away the private key: anyone could sign with it, as with a
    small-order Edwards key. (A prime modulus is not tested for: that costs
    tens of milliseconds per key in Python.)
    """
    n = jwk.get("n")
    if jwk.get("kty") != "RSA" or not isinstance(n, str):
        return
    try:
        modulus = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("unreadable key: bad modulus") from None
    value = int.from_bytes(modulus, "big")
    bits = value.bit_length()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits (< {MIN_RSA_BITS})")
    if bits > MAX_RSA_BITS:  # before the checks below, whose cost grows with it
        raise ValueError(f"RSA key of {bits} bits (> {MAX_RSA_BITS})")
    if math.gcd(value, _SMALL_PRIMES) != 1:
        raise ValueError("RSA modulus with a small prime factor: anyone could sign")
    if _fermat_factors(value):
        raise ValueError("RSA modulus of two (nearly) equal primes: anyone could sign")


def _fermat_factors(n: int) -> bool:
    """Whether odd ``n`` is a square or the product of two primes so close
    that the first step of Fermat's method splits it (p and q closer than about 2·n^(1/4))."""
    root = math.isqrt(n)
    if root * root == n:
        return True
    gap = (root + 1) ** 2 - n  # n = a**2 - b**2 = (a - b)(a + b) when gap is b**2
    return math.isqrt(gap) ** 2 == gap


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _check_x5c(x5c: Any, public: Any) -> None:
    """Refuse a key whose first ``x5c`` certificate holds another key."""
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
        raise ValueError("x5c is not a list of certificates")
    try:
        der = base64.b64decode(x5c[0], validate=True)  # RFC 7517 §4.7: base64, not base64url
        certified = x509.load_der_x509_certificate(der).public_key()
        matches = _spki(certified) == _spki(public)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("x5c is not a certificate") from None
    if not matches:
        raise ValueError("x5c certifies another key")


def _prepare(jwk: Mapping[str, Any], allowed: tuple[str, ...]) -> PreparedKey:
    """Import one public JWK; raise ValueError with the reason it is skipped."""
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use={use!r}")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("key_ops does not allow verify")
    declared = jwk.get("alg")
    if declared is not None and declared not in allowed:
        raise ValueError(f"alg {declared!r} not allowed")
    algs = _algorithms_for(jwk, allowed)
    if not algs:
        raise ValueError(f"kty {jwk.get('kty')!r} / crv {jwk.get('crv')!r} fits no allowed alg")
    _check_rsa_size(jwk)
    # Base64url has no padding (RFC 7515 §2), but Java's Base64.getUrlEncoder()
    # pads: older SuperTokens cores, among others, publish n ending in '='.
    # The key is the same either way; joserfc refuses the padded form.
    jwk = {
        name: value.rstrip("=") if name in _BASE64URL_MEMBERS and isinstance(value, str) else value
        for name, value in jwk.items()
    }
    try:
        key = JWKRegistry.import_key(dict(jwk))
        public = key.public_key
        rfc7638 = key.thumbprint  # of the required members only (RFC 7638 §3.2)
        thumbprint = rfc7638()
    except (JoseError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"unreadable key: {type(exc).__name__}") from None
    if "x5c" in jwk:
        _check_x5c(jwk["x5c"], public)
    verifiers: dict[str, Verify] = {}
    size = 0
    crv = jwk.get("crv")
    if isinstance(public, rsa.RSAPublicKey):
        size = public.key_size
        if size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {size} bits (< {MIN_RSA_BITS})")
        for alg in algs:
            verifiers[alg] = _rsa_verifier(public, alg)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        size = public.key_size
        for alg in algs:
            verifiers[alg] = _ec_verifier(public, alg, str(crv))
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        _check_edwards_key(public)
        size = 256 if crv == "Ed25519" else 456
        for alg in algs:
            verifiers[alg] = _eddsa_verifier(public)
    else:  # pragma: no cover - filtered by _algorithms_for
        raise ValueError("unsupported key type")
    kid = jwk.get("kid")
    return PreparedKey(
        kid=kid,
        kty=str(jwk.get("kty")),
        crv=crv,
        alg=declared,
        size=size,
        thumbprint=thumbprint,
        verifiers=verifiers,
        public_jwk=dict(jwk),
    )


def parse_key_set(jwks: Any, algorithms: tuple[str, ...]) -> PreparedKeySet:
    """Parse and filter a JWK Set.

    :param jwks: the decoded JSON document ``{"keys": [...]}``.
    :param algorithms: the allowed algorithms (``OAUTH_VERIFY_ALGORITHMS``).
    :raises KeySetError: when the set is not a JWK Set, carries private
        material or gives two usable keys the same ``kid``.
    """
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise KeySetError("not a JWK Set (no 'keys' list)")
    try:
        digest = content_hash(jwks)
    except (TypeError, ValueError):
        raise KeySetError("the key set is not plain JSON") from None
    by_kid: dict[str, PreparedKey] = {}
    sharing: dict[str, list[PreparedKey]] = {}
    keys: list[PreparedKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, Mapping):
            skipped.append(f"#{index}: not an object")
            continue
        if PRIVATE_JWK_MEMBERS & set(jwk):
            raise KeySetError(f"key #{index} carries private key material")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"#{index}: kid is not a string")
            continue
        try:
            prepared = _prepare(jwk, algorithms)
        except ValueError as exc:
            skipped.append(f"{kid or '#' + str(index)}: {exc}")
            continue
        # Only usable keys can clash: RFC 7517 §4.5 lets an encryption key
        # (or a key of an algorithm not allowed here) share a signing key's kid.
        if kid is not None:
            sharing.setdefault(kid, []).append(prepared)
        keys.append(prepared)
    for kid, group in sharing.items():
        if len(group) == 1:
            by_kid[kid] = group[0]
    return PreparedKeySet(
        by_kid=by_kid,
        keys=tuple(keys),
        skipped=tuple(skipped),
        content_hash=digest,
        shared_kids=_shared_kids(sharing),
    )


def _shared_kids(
    sharing: Mapping[str, list[PreparedKey]],
) -> Mapping[str, Mapping[str, PreparedKey]]:
    """The kids several usable keys share, each by algorithm.

    The token's ``alg`` tells such keys apart only when no algorithm fits two
    of them (an RSA and an EC key, say); otherwise the kid is ambiguous and
    the whole set is refused.
    """
    shared: dict[str, Mapping[str, PreparedKey]] = {}
    for kid, group in sharing.items():
        if len(group) < 2:
            continue
        by_alg: dict[str, PreparedKey] = {}
        for key in group:
            for alg in key.verifiers:
                if alg in by_alg:
                    raise KeySetError(f"duplicate kid {kid!r} (two keys for {alg})")
                by_alg[alg] = key
        shared[kid] = MappingProxyType(by_alg)
    return MappingProxyType(shared) if shared else _NO_SHARED_KIDS
