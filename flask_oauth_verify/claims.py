"""Reading claims: dotted paths into nested claim objects (pure helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["claim_path"]


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """Read ``path`` from ``claims``; dots reach into nested objects.

    :param claims: verified claims (or an introspection response).
    :param path: ``"scope"`` or ``"custom_claims.service_name"``.
    :returns: the value, or ``None`` when any step is absent.
    """
    if "." not in path:
        return claims.get(path)
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value
