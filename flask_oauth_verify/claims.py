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
        # type() first: an ABC isinstance check costs a microsecond per step.
        if value is None or (type(value) is not dict and not isinstance(value, Mapping)):
            return None
        value = value.get(part)
    return value
