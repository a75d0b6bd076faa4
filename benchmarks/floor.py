"""The raw-crypto floor every benchmark compares against.

One ``cryptography`` signature verify (:func:`raw_verifier`), and the floor
as a decorator (:func:`floor_verified`): base64url + JSON + that verify
inside a request, ``g.auth`` set, no check at all. No verifier can cost
less than the decorator does in the same request.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from flask import g, request

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def b64url_decode(segment: str) -> bytes:
    """A base64url segment without padding, decoded."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def raw_verifier(public: PublicKey, alg: str) -> Callable[[bytes, bytes], None]:
    """One ``cryptography`` verify of a JWS signature, nothing else."""
    if isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            if alg == "PS256"
            else padding.PKCS1v15()
        )
        return lambda message, signature: public.verify(signature, message, pad, hashes.SHA256())
    if isinstance(public, ec.EllipticCurvePublicKey):
        ecdsa = ec.ECDSA(hashes.SHA256())
        return lambda message, der: public.verify(der, message, ecdsa)
    return lambda message, signature: public.verify(signature, message)


def jws_signature(alg: str, raw: bytes) -> bytes:
    """The signature as ``cryptography`` takes it (DER for ECDSA)."""
    if alg.startswith("ES"):
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )
    return raw


def floor_verified(
    public: PublicKey, alg: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The floor as a decorator: base64url + JSON + one verify, ``g.auth`` set.

    What the raw floor costs when it runs inside a request, as every real
    verifier does (the code and data it touches are cold there).
    """
    verify = raw_verifier(public, alg)

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = request.environ["HTTP_AUTHORIZATION"][7:]
            header, payload, signature = token.split(".")
            json.loads(b64url_decode(header))
            claims = json.loads(b64url_decode(payload))
            verify(f"{header}.{payload}".encode(), jws_signature(alg, b64url_decode(signature)))
            g.auth = claims
            return view(*args, **kwargs)

        return wrapper

    return decorator
