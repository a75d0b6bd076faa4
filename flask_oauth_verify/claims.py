"""Reading claims: dotted paths into nested claim objects (pure helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["claim_path"]


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """Read ``path`` from ``claims``; dots reach into nested objects.

    A claim named ``path`` itself comes first: namespaced claims such as
    ``https://example.com/org`` (Auth0) hold dots in their name.

    :param claims: verified claims (or an introspection response).
    :param path: ``"scope"``, ``"custom_claims.service_name"`` or
        ``"https://example.com/org"``.
    :returns: the value, or ``None`` when any step is absent.
    """
    value: Any = claims.get(path)
    if value is not None or "." not in path:
        return value
    value = claims
    for part in path.split("."):
        # type() first: an ABC isinstance check costs a microsecond per step.
        if value is None or (type(value) is not dict and not isinstance(value, Mapping)):
            return None
        value = value.get(part)
    return value
