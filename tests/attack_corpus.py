"""The attack corpus: crafted tokens and headers with their documented outcome.

Each :class:`Attack` builds one request (a :class:`Probe`) from a :class:`Kit`
that holds the real issuer's keys, an attacker's keys and the URL of an
attacker-controlled server, and names the status and ``error`` code that
DESIGN.md's error table prescribes for it. ``tests/test_attacks.py`` sends
every probe through a real app whose key set is served over HTTP on
127.0.0.1 and checks the status, the JSON body and ``WWW-Authenticate``.

The corpus follows the classes of bugs verifiers have shipped: ``alg: none``,
RSA/HMAC confusion, trusted header keys (``jwk``, ``x5c``, ``jku``,
``x5u``), ignored ``crit``, JWE and nested tokens, parser differentials
(duplicate members, non-objects, lax base64), ``kid`` injection, weak keys,
ECDSA "psychic signatures", claim type confusion, partial issuer and
audience matches, scope smuggling, Unicode look-alikes and malformed
``Authorization`` headers. A handful of controls (expected 200) keep the
corpus honest: they prove the app really accepts a genuine token, so the
refusals are not an artefact of a broken setup.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from joserfc import jwe
from joserfc.jwk import ECKey, Key, RSAKey

from flask_oauth_verify.strictjson import STRICT_DECODER
from flask_oauth_verify.testing import TokenIssuer

__all__ = ["CORPUS", "DROP", "Attack", "Kit", "Probe", "b64url"]

#: Marks a claim or header member to leave out of a token.
DROP: Any = object()

#: The order of the P-256 curve (for the r = s = n signature).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64url(data: bytes | str) -> str:
    """Unpadded base64url of ``data``."""
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Probe:
    """One request to send: headers, query string, form body, path."""

    headers: tuple[tuple[str, str], ...] = ()
    query: str = ""
    form: Mapping[str, str] | None = None
    path: str = "/protected"

    @property
    def method(self) -> str:
        """POST when a form body is sent (RFC 6750 §2.2), else GET."""
        return "POST" if self.form is not None else "GET"


@dataclasses.dataclass(frozen=True)
class Attack:
    """A crafted request with the status and ``error`` code it must get.

    ``error`` is the JSON body's ``error`` member (``unauthorized`` when no
    bearer token was sent, in which case the challenge has no ``error``).
    """

    name: str
    category: str
    status: int
    error: str | None
    build: Callable[[Kit], Probe]


def _self_signed_cert(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _weak_rsa_key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc warns about the size: that is the point
        return RSAKey.import_key(private)


class Kit:
    """Keys, URLs and token builders shared by every attack.

    :param issuer: the real issuer, already serving its key set.
    :param attacker_url: base URL of a server the verifier must never call.
    :param rsa_kid: the issuer's RS256 key.
    :param ec_kid: the issuer's ES256 key.
    :param weak_kid: a 1024-bit RSA key published in the same key set.
    """

    def __init__(
        self,
        issuer: TokenIssuer,
        *,
        attacker_url: str,
        rsa_kid: str,
        ec_kid: str,
        weak_kid: str,
    ) -> None:
        self.issuer = issuer
        self.iss = issuer.issuer
        self.attacker_url = attacker_url
        self.rsa_kid = rsa_kid
        self.ec_kid = ec_kid
        self.weak_kid = weak_kid
        self.now = int(time.time())
        self.attacker_rsa = RSAKey.generate_key(2048)
        self.attacker_ec = ECKey.generate_key("P-256")
        self.attacker_kid = "attacker-key"
        attacker_private = self.attacker_rsa.private_key
        assert attacker_private is not None
        self.attacker_cert = _self_signed_cert(attacker_private)

    # -- keys ------------------------------------------------------------------

    def private(self, kid: str) -> Any:
        """The ``cryptography`` private key of the issuer's ``kid``."""
        return self.issuer.key(kid).private_key

    @property
    def rsa_public_pem(self) -> bytes:
        """The issuer's RSA public key as a SubjectPublicKeyInfo PEM."""
        public = self.private(self.rsa_kid).public_key()
        return bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    @property
    def rsa_public_pkcs1(self) -> bytes:
        """The issuer's RSA public key as a PKCS#1 PEM."""
        public = self.private(self.rsa_kid).public_key()
        return bytes(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )

    def public_jwk(self, kid: str) -> dict[str, Any]:
        """The issuer's published JWK for ``kid``."""
        for jwk in self.issuer.jwks()["keys"]:
            if jwk["kid"] == kid:
                return dict(jwk)
        raise KeyError(kid)

    def attacker_jwk(self) -> dict[str, Any]:
        """The attacker's public RSA key as a JWK."""
        jwk = self.attacker_rsa.as_dict(private=False)
        jwk.update({"kid": self.attacker_kid, "alg": "RS256", "use": "sig"})
        return dict(jwk)

    # -- building tokens -------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Valid RFC 9068 claims for this app; ``DROP`` removes one."""
        claims: dict[str, Any] = {
            "iss": self.iss,
            "sub": "user_1",
            "aud": "api",
            "iat": self.now,
            "nbf": self.now,
            "exp": self.now + 3600,
            "jti": "jti-1",
            "client_id": "client-1",
            "scope": "read:users",
            "oid": "org_1",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not DROP}

    def header(self, **overrides: Any) -> dict[str, Any]:
        """The issuer's RS256 header; ``DROP`` removes a member."""
        header: dict[str, Any] = {"alg": "RS256", "kid": self.rsa_kid, "typ": "at+jwt"}
        header.update(overrides)
        return {k: v for k, v in header.items() if v is not DROP}

    @staticmethod
    def sign_bytes(data: bytes, key: Any, alg: str) -> bytes:
        """A JWS signature of ``data`` (RFC 7518 §3) with a ``cryptography`` key.

        ``key`` is a private key, or the secret bytes for ``HS*``.
        """
        if alg.upper().startswith("HS"):
            digest = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
            return hmac.new(key, data, digest[alg[2:]]).digest()
        hashers: dict[str, Callable[[], hashes.HashAlgorithm]] = {
            "256": hashes.SHA256,
            "384": hashes.SHA384,
            "512": hashes.SHA512,
        }
        if alg.startswith("RS"):
            return bytes(key.sign(data, padding.PKCS1v15(), hashers[alg[2:]]()))
        if alg.startswith("PS"):
            hasher = hashers[alg[2:]]()
            pss = padding.PSS(mgf=padding.MGF1(hasher), salt_length=hasher.digest_size)
            return bytes(key.sign(data, pss, hasher))
        if alg.startswith("ES"):
            der = key.sign(data, ec.ECDSA(hashers[alg[2:]]()))
            r, s = decode_dss_signature(der)
            size = (key.curve.key_size + 7) // 8
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return b""  # "none" and anything unknown: no signature

    def jws(
        self,
        header: Mapping[str, Any] | bytes,
        payload: Mapping[str, Any] | bytes | str,
        *,
        key: Any = None,
        alg: str | None = None,
        signature: bytes | None = None,
    ) -> str:
        """A compact JWS with exactly these bytes, signed as asked.

        :param header: a header object, or its raw JSON bytes.
        :param payload: a claims object, or the raw payload bytes/text.
        :param key: the signing key (the issuer's RSA key by default).
        :param alg: the algorithm to sign with (the header's ``alg`` by default).
        :param signature: use these signature bytes instead of signing.
        """
        header_bytes = header if isinstance(header, bytes) else _json(header)
        if isinstance(payload, str):
            payload_bytes = payload.encode()
        elif isinstance(payload, bytes):
            payload_bytes = payload
        else:
            payload_bytes = _json(payload)
        signing_input = f"{b64url(header_bytes)}.{b64url(payload_bytes)}"
        if signature is None:
            if alg is None:
                alg = str(header["alg"]) if isinstance(header, Mapping) else "RS256"
            signature = self.sign_bytes(
                signing_input.encode(), key if key is not None else self.private(self.rsa_kid), alg
            )
        return f"{signing_input}.{b64url(signature)}"

    def token(
        self,
        claims: Mapping[str, Any] | bytes | str | None = None,
        **header_overrides: Any,
    ) -> str:
        """A token signed by the issuer's real RSA key (the valid baseline)."""
        return self.jws(
            self.header(**header_overrides), claims if claims is not None else self.claims()
        )

    def es_token(self, claims: Mapping[str, Any] | None = None, **header_overrides: Any) -> str:
        """A token signed by the issuer's real ES256 key."""
        header = self.header(**{"alg": "ES256", "kid": self.ec_kid, **header_overrides})
        return self.jws(header, claims or self.claims(), key=self.private(self.ec_kid))

    def attacker_token(
        self, claims: Mapping[str, Any] | None = None, **header_overrides: Any
    ) -> str:
        """A token signed by the attacker's RSA key."""
        header = self.header(**{"kid": self.attacker_kid, **header_overrides})
        return self.jws(header, claims or self.claims(), key=self.attacker_rsa.private_key)

    def hmac_token(self, secret: bytes, alg: str = "HS256", **header_overrides: Any) -> str:
        """A token MACed with ``secret`` (RSA/HMAC confusion)."""
        header = self.header(alg=alg, **header_overrides)
        return self.jws(header, self.claims(), key=secret, alg=alg)

    def jwe(self, plaintext: bytes | str) -> str:
        """A five-segment JWE encrypted to the issuer's RSA key."""
        protected = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": self.rsa_kid}
        key = self.issuer.key(self.rsa_kid)
        return jwe.encrypt_compact(
            protected, plaintext, key, algorithms=["RSA-OAEP-256", "A256GCM"]
        )

    # -- building requests -----------------------------------------------------

    @staticmethod
    def bearer(token: str, path: str = "/protected") -> Probe:
        """``Authorization: Bearer <token>``."""
        return Probe(headers=(("Authorization", f"Bearer {token}"),), path=path)

    @staticmethod
    def authorization(*values: str, path: str = "/protected", query: str = "") -> Probe:
        """One ``Authorization`` header per value, verbatim."""
        return Probe(headers=tuple(("Authorization", v) for v in values), path=path, query=query)


# -- the corpus ----------------------------------------------------------------

INVALID = (401, "invalid_token")
EXPIRED = (401, "token_expired")
NOT_ACTIVE = (401, "token_not_active")
BAD_REQUEST = (400, "invalid_request")
NO_TOKEN = (401, "unauthorized")
SCOPE = (403, "insufficient_scope")
OK = (200, None)

CORPUS: list[Attack] = []


def _add(
    name: str, category: str, outcome: tuple[int, str | None], build: Callable[[Kit], Probe]
) -> None:
    CORPUS.append(Attack(name, category, outcome[0], outcome[1], build))


def _bearer(build: Callable[[Kit], str], path: str = "/protected") -> Callable[[Kit], Probe]:
    return lambda k: Kit.bearer(build(k), path)


def _token_with_raw_exp(raw: bytes) -> Callable[[Kit], str]:
    """A builder of signed tokens whose ``exp`` is the literal JSON text *raw*."""

    def build(k: Kit) -> str:
        return k.token(_json(k.claims(exp=DROP))[:-1] + b',"exp":' + raw + b"}")

    return build


def _swap_std_alphabet(token: str) -> str:
    head, payload, signature = token.split(".")
    return ".".join([head, payload, signature.replace("-", "+").replace("_", "/")])


def _non_canonical(token: str) -> str:
    """Flip unused trailing bits of the signature's last character."""
    head, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused = {2: 4, 3: 2}[len(signature) % 4]
    index = alphabet.index(signature[-1]) ^ ((1 << unused) - 1)
    return ".".join([head, payload, signature[:-1] + alphabet[index]])


def _alg_none(alg: str) -> Callable[[Kit], str]:
    return lambda k: k.jws(k.header(alg=alg), k.claims(), signature=b"")


def _raw_header(raw: bytes) -> Callable[[Kit], str]:
    return lambda k: k.jws(raw, k.claims(), key=k.private(k.rsa_kid), alg="RS256")


def _signed_payload(raw: bytes) -> Callable[[Kit], str]:
    return lambda k: k.token(raw)


def _attacker_kid(kid: str) -> Callable[[Kit], str]:
    return lambda k: k.attacker_token(kid=kid)


def _typ_token(typ: str) -> Callable[[Kit], str]:
    return lambda k: k.token(typ=typ)


def _with_raw_member(k: Kit, name: str, raw: bytes) -> bytes:
    """The valid claims with member ``name`` spelled exactly as ``raw``."""
    return _json(k.claims(**{name: DROP}))[:-1] + f',"{name}":'.encode() + raw + b"}"


def _json_serialized(token: str) -> str:
    """The flattened JWS JSON serialization (RFC 7515 §7.2.2) of ``token``."""
    protected, payload, signature = token.split(".")
    return json.dumps({"protected": protected, "payload": payload, "signature": signature})


def _claims_over(overrides: Mapping[str, Any]) -> Callable[[Kit], str]:
    return lambda k: k.token(k.claims(**overrides))


def _der_signature(k: Kit) -> str:
    header = k.header(alg="ES256", kid=k.ec_kid)
    signing_input = f"{b64url(_json(header))}.{b64url(_json(k.claims()))}"
    der = k.private(k.ec_kid).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64url(der)}"


def _rsa_truncated(k: Kit) -> str:
    """A real RS256 signature with its first byte dropped (length check)."""
    head, payload, signature = k.token().split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    return f"{head}.{payload}.{b64url(raw[1:])}"


def _es_with_signature(k: Kit, signature: bytes) -> str:
    return k.jws(k.header(alg="ES256", kid=k.ec_kid), k.claims(), signature=signature)


def _es_tampered(k: Kit, change: Callable[[bytes], bytes]) -> str:
    head, payload, signature = k.es_token().split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    return f"{head}.{payload}.{b64url(change(raw))}"


# Controls: a genuine token must pass, or every refusal below proves nothing.
_add("control: valid RS256", "control", OK, _bearer(lambda k: k.token()))
_add("control: valid ES256", "control", OK, _bearer(lambda k: k.es_token()))
_add("control: valid scope", "control", OK, _bearer(lambda k: k.token(), "/read"))
_add(
    "control: aud list holding ours",
    "control",
    OK,
    _bearer(lambda k: k.token(k.claims(aud=["other", "api"]))),
)
_add(
    "control: exp as a float",
    "control",
    OK,
    _bearer(lambda k: k.token(k.claims(exp=k.now + 3600.5))),
)
_add(
    "control: nbf within leeway",
    "control",
    OK,
    _bearer(lambda k: k.token(k.claims(nbf=k.now + 10))),
)
_add("control: lowercase scheme", "control", OK, lambda k: Kit.authorization(f"bearer {k.token()}"))
_add("control: uppercase scheme", "control", OK, lambda k: Kit.authorization(f"BEARER {k.token()}"))

# alg none, in every casing, with and without a signature.
for _alg in ("none", "None", "NONE", "nOnE", "NoNe", "nonE"):
    _add(
        f"alg {_alg!r}, empty signature",
        "alg none",
        INVALID,
        _bearer(_alg_none(_alg)),
    )
_add(
    "alg none keeping the real signature",
    "alg none",
    INVALID,
    _bearer(lambda k: ".".join([b64url(_json(k.header(alg="none"))), *k.token().split(".")[1:]])),
)
_add(
    "alg none, no kid, no typ",
    "alg none",
    INVALID,
    _bearer(lambda k: k.jws({"alg": "none"}, k.claims(), signature=b"")),
)

# RSA/HMAC confusion: the public key as the MAC secret.
_add(
    "HS256 with the public key PEM",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pem)),
)
_add(
    "HS256 with the public key PEM, no trailing newline",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pem.strip())),
)
_add(
    "HS256 with the PKCS#1 PEM",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pkcs1)),
)
_add(
    "HS384 with the public key PEM",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pem, "HS384")),
)
_add(
    "HS512 with the public key PEM",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pem, "HS512")),
)
_add(
    "HS256 with the public JWK (JSON)",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(_json(k.public_jwk(k.rsa_kid)))),
)
_add(
    "HS256 with the JWK's n",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.public_jwk(k.rsa_kid)["n"].encode())),
)
_add(
    "hs256 lowercase with the PEM",
    "hmac confusion",
    INVALID,
    _bearer(lambda k: k.hmac_token(k.rsa_public_pem, "hs256")),
)

# Keys carried by the token itself are never trusted.
_add(
    "embedded jwk of the attacker",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(jwk=k.attacker_jwk())),
)
_add(
    "embedded jwk under the real kid",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(jwk=k.attacker_jwk(), kid=k.rsa_kid)),
)
_add(
    "embedded x5c of the attacker",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(x5c=[base64.b64encode(k.attacker_cert).decode()])),
)
_add(
    "embedded x5c under the real kid",
    "header keys",
    INVALID,
    _bearer(
        lambda k: k.attacker_token(x5c=[base64.b64encode(k.attacker_cert).decode()], kid=k.rsa_kid)
    ),
)
_add(
    "jku to the attacker's server",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(jku=f"{k.attacker_url}/jwks")),
)
_add(
    "jku to the attacker, real kid",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(jku=f"{k.attacker_url}/jwks", kid=k.rsa_kid)),
)
_add(
    "x5u to the attacker's server",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(x5u=f"{k.attacker_url}/cert.pem")),
)
_add(
    "jku and x5u on the issuer host, attacker key",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(jku=f"{k.iss}/jwks", x5u=f"{k.iss}/cert")),
)
_add(
    "iss is the attacker, keys on its server",
    "header keys",
    INVALID,
    _bearer(lambda k: k.attacker_token(k.claims(iss=k.attacker_url))),
)

# crit, b64, zip, enc: extensions we do not implement are refused.
_add(
    "crit naming a registered claim",
    "crit",
    INVALID,
    _bearer(lambda k: k.token(crit=["exp"], exp=k.now + 60)),
)
_add(
    "crit naming an unknown extension",
    "crit",
    INVALID,
    _bearer(
        lambda k: k.jws(
            {**k.header(crit=["urn:example:unknown"]), "urn:example:unknown": 1}, k.claims()
        )
    ),
)
_add("crit empty list", "crit", INVALID, _bearer(lambda k: k.token(crit=[])))
_add("crit as a string", "crit", INVALID, _bearer(lambda k: k.token(crit="b64")))
_add(
    "b64 false with crit, unencoded payload",
    "b64",
    INVALID,
    _bearer(
        lambda k: ".".join(
            [
                b64url(_json(k.header(b64=False, crit=["b64"]))),
                "payload",
                b64url(
                    k.sign_bytes(
                        (b64url(_json(k.header(b64=False, crit=["b64"]))) + ".payload").encode(),
                        k.private(k.rsa_kid),
                        "RS256",
                    )
                ),
            ]
        )
    ),
)
_add(
    "b64 false with crit, detached payload",
    "b64",
    INVALID,
    _bearer(lambda k: "{}..{}".format(*k.token(b64=False, crit=["b64"]).split(".")[::2])),
)
_add("b64 false without crit", "b64", INVALID, _bearer(lambda k: k.token(b64=False)))
_add("zip DEF", "b64", INVALID, _bearer(lambda k: k.token(zip="DEF")))
_add("enc in a JWS header", "b64", INVALID, _bearer(lambda k: k.token(enc="A256GCM")))

# JWE and nested tokens.
_add("JWE (five segments)", "jwe", INVALID, _bearer(lambda k: k.jwe(_json(k.claims()))))
_add("JWE wrapping a valid JWS", "jwe", INVALID, _bearer(lambda k: k.jwe(k.token())))
_add("fake five-segment token", "jwe", INVALID, _bearer(lambda k: k.token() + ".AAAA.BBBB"))
_add(
    "JWS whose payload is a signed JWT (cty JWT)",
    "jwe",
    INVALID,
    _bearer(lambda k: k.token(k.token(), cty="JWT")),
)
_add(
    "JWS whose payload is a JWE",
    "jwe",
    INVALID,
    _bearer(lambda k: k.token(k.jwe(_json(k.claims())), cty="JWT")),
)
# cty JWT over plain claims: a verifier that honours cty would unwrap a nested
# token, one that ignores it reads the claims; either way it is no access token.
_add("cty JWT over claims", "jwe", INVALID, _bearer(lambda k: k.token(cty="JWT")))
_add("cty application/jwt over claims", "jwe", INVALID, _bearer(lambda k: k.token(cty="jwt")))
# the same media type with parameters or surrounding space (RFC 9110 §8.3.1)


def _with_cty(cty: str) -> Callable[[Kit], str]:
    return lambda k: k.token(cty=cty)


for _cty in ("application/jwt; charset=utf-8", "application/jwt;x=1", " JWT", "JWT\t"):
    _add(f"cty {_cty!r} over claims", "jwe", INVALID, _bearer(_with_cty(_cty)))
_add(
    "JWS JSON serialization (flattened)",
    "jwe",
    BAD_REQUEST,
    _bearer(lambda k: _json_serialized(k.token())),
)
_add(
    "JWS JSON serialization, base64url-wrapped",
    "jwe",
    INVALID,
    _bearer(lambda k: b64url(_json_serialized(k.token()))),
)

# Segment counts.
_add("one segment", "segments", INVALID, _bearer(lambda k: k.token().split(".")[0]))
_add("two segments", "segments", INVALID, _bearer(lambda k: ".".join(k.token().split(".")[:2])))
_add("four segments", "segments", INVALID, _bearer(lambda k: k.token() + ".AAAA"))
_add("six segments", "segments", INVALID, _bearer(lambda k: k.token() + ".A.B.C"))
_add("only dots", "segments", INVALID, _bearer(lambda _k: ".."))
_add("trailing dot", "segments", INVALID, _bearer(lambda k: k.token() + "."))
_add(
    "empty payload",
    "segments",
    INVALID,
    _bearer(lambda k: "{}..{}".format(*k.token().split(".")[::2])),
)
_add(
    "signature stripped", "segments", INVALID, _bearer(lambda k: k.token().rsplit(".", 1)[0] + ".")
)

# base64url: strict, unpadded, URL-safe alphabet, canonical.
_add("padded header", "base64", INVALID, _bearer(lambda k: k.token().replace(".", "=.", 1)))
_add("padded signature", "base64", INVALID, _bearer(lambda k: k.token() + "=="))
_add(
    "standard alphabet in the signature",
    "base64",
    INVALID,
    _bearer(lambda k: _swap_std_alphabet(k.token())),
)
_add("impossible length (4n+1)", "base64", INVALID, _bearer(lambda k: k.token() + "A"))
_add(
    "characters outside b64token",
    "base64",
    INVALID,
    _bearer(lambda k: k.token().replace(".", ".!", 1)),
)
_add("non-canonical trailing bits", "base64", INVALID, _bearer(lambda k: _non_canonical(k.token())))

# JSON: objects only, no duplicates, no NaN.
for _label, _raw in (
    ("array", b"[]"), ("string", b'"RS256"'), ("number", b"256"), ("null", b"null"),
    ("not JSON", b"{alg:RS256}"), ("invalid UTF-8", b'{"alg":"RS256","kid":"\xff"}'),
    ("NaN member", b'{"alg":"RS256","x":NaN}'), ("deeply nested", b"[" * 3000 + b"]" * 3000),
):  # fmt: skip
    _add(
        f"header is {_label}",
        "json",
        INVALID,
        _bearer(_raw_header(_raw)),
    )
for _label, _raw in (
    ("array", b"[]"), ("string", b'"claims"'), ("number", b"42"), ("null", b"null"),
    ("invalid UTF-8", b'{"sub":"\xc3\x28"}'),
):  # fmt: skip
    _add(f"signed payload is {_label}", "json", INVALID, _bearer(_signed_payload(_raw)))
for _label, _raw_exp in (
    ("exp 1e400 (parses to infinity)", b"1e400"),
    ("exp with 5000 digits", b"1" + b"0" * 5000),
    ("exp -1e400", b"-1e400"),
):  # fmt: skip
    _add(
        f"signed payload with {_label}",
        "json",
        INVALID,
        _bearer(_token_with_raw_exp(_raw_exp)),
    )
_DEEP = b"[" * 5000 + b"]" * 5000


def _parses(document: bytes) -> bool:
    """Whether the package's JSON decoder takes ``document`` (how deep it
    goes is the interpreter's: about 1,000 levels on 3.11, 10,000 on 3.13)."""
    try:
        STRICT_DECODER.decode(document.decode())
    except RecursionError:
        return False
    return True


# Too deep for the parser: refused (401), never a 500. Deep enough only on a
# newer Python, it is a claim like any other (docs/views.rst).
_add(
    "signed payload deeply nested",
    "json",
    OK if _parses(_DEEP) else INVALID,
    _bearer(lambda k: k.token(_json(k.claims())[:-1] + b',"x":' + _DEEP + b"}")),
)
_add(
    "signed payload with a UTF-8 BOM",
    "json",
    INVALID,
    _bearer(lambda k: k.token(b"\xef\xbb\xbf" + _json(k.claims()))),
)
_add(
    "signed payload in UTF-16",
    "json",
    INVALID,
    _bearer(lambda k: k.token(json.dumps(k.claims()).encode("utf-16"))),
)
_add(
    "signed payload with trailing garbage",
    "json",
    INVALID,
    _bearer(lambda k: k.token(_json(k.claims()) + b"xyz")),
)
_add(
    "signed payload with exp Infinity",
    "json",
    INVALID,
    _bearer(lambda k: k.token(_json(k.claims(exp=DROP))[:-1] + b',"exp":Infinity}')),
)
_add(
    "duplicate alg in the header (none, RS256)",
    "json",
    INVALID,
    _bearer(
        lambda k: k.jws(
            f'{{"alg":"none","alg":"RS256","kid":"{k.rsa_kid}","typ":"at+jwt"}}'.encode(),
            k.claims(),
            alg="RS256",
        )
    ),
)
_add(
    "duplicate aud in the payload",
    "json",
    INVALID,
    _bearer(lambda k: k.token(_json(k.claims(aud="other"))[:-1] + b',"aud":"api"}')),
)
_add(
    "duplicate exp in the payload",
    "json",
    INVALID,
    _bearer(lambda k: k.token(_json(k.claims())[:-1] + f',"exp":{k.now - 10}}}'.encode())),
)
_add(
    "duplicate scope in the payload",
    "json",
    INVALID,
    _bearer(
        lambda k: k.token(_json(k.claims(scope="none"))[:-1] + b',"scope":"read:users"}'), "/read"
    ),
)

# kid injection.
for _label, _kid in (
    ("path traversal", "../../../../../../etc/passwd"), ("SQL", "' OR '1'='1' --"),
    ("NUL byte", "key\x00"), ("URL", "https://attacker.example/jwks"),
    ("shell", "$(curl attacker.example)"), ("empty", ""),
    ("huge", "k" * 600), ("very huge", "k" * 8000),
    ("huge non-ASCII", "\u00e9" * 400), ("right-to-left override", "\u202ekey"),
):  # fmt: skip
    _add(f"kid {_label}", "kid", INVALID, _bearer(_attacker_kid(_kid)))
_add("kid as an integer", "kid", INVALID, _bearer(lambda k: k.attacker_token(kid=1)))
_add("kid as a list", "kid", INVALID, _bearer(lambda k: k.attacker_token(kid=[k.rsa_kid])))
_add("kid as an object", "kid", INVALID, _bearer(lambda k: k.attacker_token(kid={"$ne": None})))
_add("kid with trailing space", "kid", INVALID, _bearer(lambda k: k.token(kid=k.rsa_kid + " ")))
_add(
    "kid traversing to the real kid",
    "kid",
    INVALID,
    _bearer(lambda k: k.token(kid=f"../{k.rsa_kid}")),
)
_add("kid null, real key", "kid", INVALID, _bearer(lambda k: k.token(kid=None)))
_add("no kid, attacker key", "kid", INVALID, _bearer(lambda k: k.attacker_token(kid=DROP)))

# Same kid, another key.
_add(
    "real RSA kid, attacker's RSA key",
    "same kid",
    INVALID,
    _bearer(lambda k: k.attacker_token(kid=k.rsa_kid)),
)
_add(
    "real EC kid, attacker's EC key",
    "same kid",
    INVALID,
    _bearer(
        lambda k: k.jws(
            k.header(alg="ES256", kid=k.ec_kid), k.claims(), key=k.attacker_ec.private_key
        )
    ),
)

# Key type / algorithm confusion.
_add(
    "ES256 header on the RSA kid",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg="ES256"), k.claims(), key=k.attacker_ec.private_key)),
)
_add(
    "RS256 header on the EC kid",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(kid=k.ec_kid), k.claims(), key=k.attacker_rsa.private_key)),
)
_add(
    "PS256 (not allowed), real key",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.token(alg="PS256")),
)
_add(
    "RS512 (not allowed), real key",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.token(alg="RS512")),
)
_add(
    "alg lowercase rs256",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg="rs256"), k.claims(), alg="RS256")),
)
_add(
    "alg with trailing space",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg="RS256 "), k.claims(), alg="RS256")),
)
_add(
    "alg missing",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg=DROP), k.claims(), alg="RS256")),
)
_add(
    "alg null",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg=None), k.claims(), alg="RS256")),
)
_add(
    "alg as a list",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg=["RS256"]), k.claims(), alg="RS256")),
)
_add(
    "alg EdDSA",
    "alg confusion",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg="EdDSA"), k.claims(), alg="RS256")),
)

# ECDSA signature encodings (CVE-2022-21449 "psychic signatures" and DER).
_add("ECDSA r = s = 0", "ecdsa", INVALID, _bearer(lambda k: _es_with_signature(k, bytes(64))))
_add(
    "ECDSA r = s = n",
    "ecdsa",
    INVALID,
    _bearer(lambda k: _es_with_signature(k, P256_ORDER.to_bytes(32, "big") * 2)),
)
_add(
    "ECDSA r = 0, real s",
    "ecdsa",
    INVALID,
    _bearer(lambda k: _es_tampered(k, lambda sig: bytes(32) + sig[32:])),
)
_add("ECDSA DER-encoded signature", "ecdsa", INVALID, _bearer(_der_signature))
_add(
    "ECDSA signature with a trailing byte",
    "ecdsa",
    INVALID,
    _bearer(lambda k: _es_tampered(k, lambda sig: sig + b"\x00")),
)
_add(
    "ECDSA signature truncated",
    "ecdsa",
    INVALID,
    _bearer(lambda k: _es_tampered(k, lambda sig: sig[:-1])),
)
_add(
    "control: ECDSA high s (n - s) is a valid signature",
    "control",
    OK,
    _bearer(
        lambda k: _es_tampered(
            k,
            lambda sig: (
                sig[:32] + (P256_ORDER - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
            ),
        )
    ),
)
_add(
    "ECDSA signature of other claims",
    "ecdsa",
    INVALID,
    _bearer(
        lambda k: ".".join(
            [*k.es_token().split(".")[:2], k.es_token(k.claims(sub="admin")).split(".")[2]]
        )
    ),
)

# Weak keys in the key set.
_add(
    "RSA-1024 key published in the set",
    "weak key",
    INVALID,
    _bearer(lambda k: k.jws(k.header(kid=k.weak_kid), k.claims(), key=k.private(k.weak_kid))),
)
_add("RSA signature one byte short", "weak key", INVALID, _bearer(lambda k: _rsa_truncated(k)))

# Claim type confusion.
for _label, _outcome, _claims in (
    ("exp as a string", INVALID, {"exp": "9999999999"}),
    ("exp as a numeric string in the past", INVALID, {"exp": "1"}),
    ("exp huge (10**400)", INVALID, {"exp": 10**400}),
    ("exp 1e308", INVALID, {"exp": 1e308}),  # beyond the year 9999: would never expire
    ("exp in milliseconds", INVALID, {"exp": 1_800_000_000_000}),
    ("exp in the year 9999", OK, {"exp": 253_402_300_799}),
    ("exp negative", EXPIRED, {"exp": -1}),
    ("exp zero", EXPIRED, {"exp": 0}),
    ("exp in the past", EXPIRED, {"exp": "PAST"}),
    ("exp as true", INVALID, {"exp": True}),
    ("exp null", INVALID, {"exp": None}),
    ("exp missing", INVALID, {"exp": DROP}),
    ("exp as a list", INVALID, {"exp": ["FUTURE"]}),
    ("exp as an object", INVALID, {"exp": {"$gt": 0}}),
    ("nbf in the future", NOT_ACTIVE, {"nbf": "FUTURE"}),
    ("nbf as a string", INVALID, {"nbf": "0"}),
    ("nbf null", INVALID, {"nbf": None}),
    ("iat null", INVALID, {"iat": None}),
    ("nbf huge (10**400)", INVALID, {"nbf": 10**400}),
    ("iat in the future", INVALID, {"iat": "FUTURE"}),
    ("iat as a string", INVALID, {"iat": "now"}),
    ("iat huge negative (-10**400)", INVALID, {"iat": -(10**400)}),
    ("aud as an object", INVALID, {"aud": {"api": True}}),
    ("aud empty list", INVALID, {"aud": []}),
    ("aud nested list", INVALID, {"aud": [["api"]]}),
    ("aud list with a number", INVALID, {"aud": ["api", 1]}),
    ("aud null", INVALID, {"aud": None}),
    ("aud missing", INVALID, {"aud": DROP}),
    ("aud other case", INVALID, {"aud": "API"}),
    ("aud with trailing space", INVALID, {"aud": "api "}),
    ("aud prefix", INVALID, {"aud": "ap"}),
    ("aud superstring", INVALID, {"aud": "api.other"}),
    ("another audience", INVALID, {"aud": "other-api"}),
    ("another audience in a list", INVALID, {"aud": ["other-api", "billing"]}),
    ("iss with a trailing slash", INVALID, {"iss": "ISS/"}),
    ("iss in other case", INVALID, {"iss": "ISS-UPPER"}),
    ("iss as a list", INVALID, {"iss": ["ISS"]}),
    ("iss missing", INVALID, {"iss": DROP}),
    ("iss with a path suffix", INVALID, {"iss": "ISS/evil"}),
    ("iss as a prefix", INVALID, {"iss": "ISS-PREFIX"}),
    ("sub as a number", INVALID, {"sub": 42}),
    ("client_id as an object", INVALID, {"client_id": {"id": "client-1"}}),
    ("oid as a list", INVALID, {"oid": ["org_1", "org_2"]}),
    ("scope as a number", INVALID, {"scope": 7}),
    ("sub as a list", INVALID, {"sub": ["user_1"]}),
    ("client_id as a list", INVALID, {"client_id": ["client-1"]}),
    ("oid as a number", INVALID, {"oid": 1}),
    ("scope list with a number", INVALID, {"scope": ["read:users", 1]}),
    ("exp as false", INVALID, {"exp": False}),
    ("exp largest float", INVALID, {"exp": 1.7976931348623157e308}),  # beyond 9999
    ("iat largest float", INVALID, {"iat": 1.7976931348623157e308}),
    ("iss with a trailing space", INVALID, {"iss": "ISS "}),
    ("iss with a trailing newline", INVALID, {"iss": "ISS\n"}),
    # Keycloak: ID, refresh and logout tokens carry typ in the claims.
    ("typ claim ID (Keycloak ID token)", INVALID, {"typ": "ID"}),
    ("typ claim Refresh", INVALID, {"typ": "Refresh"}),
    ("typ claim Offline", INVALID, {"typ": "offline"}),
    ("typ claim Logout", INVALID, {"typ": "Logout"}),
    ("typ claim Bearer", OK, {"typ": "Bearer"}),
):  # fmt: skip

    def _claims_token(k: Kit, over: dict[str, Any] = _claims) -> str:
        fixed: dict[str, Any] = {}
        for name, value in over.items():
            fixed[name] = (
                {
                    "PAST": k.now - 3600,
                    "FUTURE": k.now + 3600,
                    "ISS": k.iss,
                    "ISS/": k.iss + "/",
                    "ISS-UPPER": k.iss.upper(),
                    "ISS/evil": k.iss + "/evil",
                    "ISS-PREFIX": k.iss[:-1],
                    "ISS ": k.iss + " ",
                    "ISS\n": k.iss + "\n",
                }.get(value, value)
                if isinstance(value, str)
                else value
            )
            if isinstance(value, list):
                fixed[name] = [
                    {"ISS": k.iss, "FUTURE": k.now + 3600}.get(v, v) if isinstance(v, str) else v
                    for v in value
                ]
        return k.token(k.claims(**fixed))

    _add(_label, "claims", _outcome, _bearer(_claims_token))

# typ: only access-token types.
for _typ in (
    "dpop+jwt",
    "logout+jwt",
    "secevent+jwt",
    "id_token+jwt",
    "JOSE",
    "JOSE+JSON",
    "at+jwt+evil",
    "application/jwt+evil",
    "refresh+jwt",
):
    _add(f"typ {_typ}", "typ", INVALID, _bearer(_typ_token(_typ)))
_add("typ as a number", "typ", INVALID, _bearer(lambda k: k.token(typ=1)))
_add("typ as a list", "typ", INVALID, _bearer(lambda k: k.token(typ=["at+jwt"])))

# Scopes: exact tokens only; no smuggling through other claims.
for _label, _claims2 in (
    ("scope substring", {"scope": "read:user"}),
    ("scope superstring", {"scope": "read:users-admin"}),
    ("scope with a comma", {"scope": "read:users,"}),
    ("scope upper case", {"scope": "READ:USERS"}),
    ("scope prefix only", {"scope": "read"}),
    ("scope wildcard", {"scope": "*"}),
    ("scope regex", {"scope": "read:.*"}),
    ("scope empty", {"scope": ""}),
    ("scope comma-separated", {"scope": "other,read:users"}),
    ("scope split by NBSP", {"scope": "other\u00a0read:users"}),
    ("scope split by em space", {"scope": "other\u2003read:users"}),
    ("scope split by a tab", {"scope": "other\tread:users"}),
    ("scope split by a newline", {"scope": "other\nread:users"}),
    ("scope with Cyrillic a", {"scope": "re\u0430d:users"}),
    ("scope fullwidth", {"scope": "\uff52\uff45\uff41\uff44:users"}),
    ("scope in permissions", {"scope": DROP, "permissions": ["read:users"]}),
    ("scope in roles", {"scope": DROP, "roles": ["read:users"]}),
    ("scope in custom_claims", {"scope": DROP, "custom_claims": {"scope": "read:users"}}),
    ("scope in a nested object", {"scope": {"value": "read:users"}}),
):  # fmt: skip
    _outcome2 = INVALID if isinstance(_claims2.get("scope"), dict) else SCOPE
    _add(_label, "scope", _outcome2, _bearer(_claims_over(_claims2), "/read"))
_add(
    "scope list element holding two scopes",
    "scope",
    INVALID,
    _bearer(lambda k: k.token(k.claims(scope=DROP, scopes=["other read:users"])), "/read"),
)
_add(
    "scope in the JOSE header",
    "scope",
    SCOPE,
    _bearer(lambda k: k.token(k.claims(scope="other"), scope="read:users"), "/read"),
)
_add(
    "scope in the query string",
    "scope",
    SCOPE,
    lambda k: Kit.authorization(
        f"Bearer {k.token(k.claims(scope='other'))}", path="/read", query="scope=read:users"
    ),
)

# Unicode look-alikes.
_add(
    "iss with fullwidth digits",
    "unicode",
    INVALID,
    _bearer(lambda k: k.token(k.claims(iss=k.iss.replace("127", "\uff11\uff12\uff17")))),
)
_add(
    "iss with a zero-width space",
    "unicode",
    INVALID,
    _bearer(lambda k: k.token(k.claims(iss=k.iss + "\u200b"))),
)
_add(
    "aud with Cyrillic a", "unicode", INVALID, _bearer(lambda k: k.token(k.claims(aud="\u0430pi")))
)
_add(
    "aud fullwidth",
    "unicode",
    INVALID,
    _bearer(lambda k: k.token(k.claims(aud="\uff41\uff50\uff49"))),
)
_add(
    "aud with a combining mark",
    "unicode",
    INVALID,
    _bearer(lambda k: k.token(k.claims(aud="api\u0301"))),
)
_add(
    "alg with Cyrillic S",
    "unicode",
    INVALID,
    _bearer(lambda k: k.jws(k.header(alg="R\u0405256"), k.claims(), alg="RS256")),
)
_add("typ with Cyrillic a", "unicode", INVALID, _bearer(lambda k: k.token(typ="\u0430t+jwt")))
_add(
    "kid with a Cyrillic look-alike",
    "unicode",
    INVALID,
    _bearer(lambda k: k.attacker_token(kid=k.rsa_kid.replace("e", "\u0435"))),
)

# The Authorization header itself.
_add("no Authorization header", "header", NO_TOKEN, lambda _k: Probe())
_add("empty Authorization header", "header", NO_TOKEN, lambda _k: Kit.authorization(""))
_add(
    "two Authorization headers",
    "header",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", f"Bearer {k.token()}"),
)
_add("Bearer with no token", "header", BAD_REQUEST, lambda _k: Kit.authorization("Bearer"))
_add("Bearer with only spaces", "header", BAD_REQUEST, lambda _k: Kit.authorization("Bearer    "))
_add(
    "Bearer with two tokens",
    "header",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()} {k.token()}"),
)
_add(
    "token sent in the header and the query",
    "header",
    BAD_REQUEST,
    lambda k: Kit.authorization(f"Bearer {k.token()}", query=f"access_token={k.token()}"),
)
_add(
    "token sent in the header and the form",
    "header",
    BAD_REQUEST,
    lambda k: Probe(
        headers=(("Authorization", f"Bearer {k.token()}"),), form={"access_token": k.token()}
    ),
)
_add(
    "token only in the query (not enabled)",
    "header",
    NO_TOKEN,
    lambda k: Probe(query=f"access_token={k.token()}"),
)
_add(
    "token only in the form (not enabled)",
    "header",
    NO_TOKEN,
    lambda k: Probe(form={"access_token": k.token()}),
)
_add("Basic scheme", "header", NO_TOKEN, lambda _k: Kit.authorization("Basic dXNlcjpwYXNz"))
_add(
    "Token scheme with a valid token",
    "header",
    NO_TOKEN,
    lambda k: Kit.authorization(f"Token {k.token()}"),
)
_add(
    "DPoP scheme with a valid token",
    "header",
    NO_TOKEN,
    lambda k: Kit.authorization(f"DPoP {k.token()}"),
)
_add(
    "Bearer: with a colon", "header", NO_TOKEN, lambda k: Kit.authorization(f"Bearer: {k.token()}")
)
_add("token without a scheme", "header", NO_TOKEN, lambda k: Kit.authorization(k.token()))
_add("character outside b64token", "header", INVALID, lambda _k: Kit.authorization("Bearer tok@n"))
_add(
    "Latin-1 character in the token",
    "header",
    INVALID,
    lambda _k: Kit.authorization("Bearer tok\u00e9n"),
)
_add(
    "huge header (100 kB)",
    "header",
    INVALID,
    lambda _k: Kit.authorization("Bearer " + "A" * 100_000),
)
_add(
    "huge well-formed token (20 kB payload)",
    "header",
    INVALID,
    _bearer(lambda k: k.token(k.claims(pad="x" * 20_000))),
)
