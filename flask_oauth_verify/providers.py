"""Provider profiles: what each authorization server needs, as data.

A profile fills in defaults for ``OAUTH_VERIFY_*`` keys (endpoint paths
derived from the issuer, claim mappings, required claim values); every key
the application sets itself wins. Templates use ``str.format`` fields:
``{issuer}`` (the first configured issuer, without a trailing slash) and any
``OAUTH_VERIFY_PROVIDER_PARAMS`` entry (``{tenant}``, ``{realm}``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["PROFILES", "Profile", "apply_profile"]


@dataclasses.dataclass(frozen=True)
class Profile:
    """One provider profile.

    :param name: the value of ``OAUTH_VERIFY_PROVIDER``.
    :param defaults: ``OAUTH_VERIFY_*`` keys (without prefix) and their
        default values; string values may be templates.
    :param required_params: ``PROVIDER_PARAMS`` entries the profile needs.
    """

    name: str
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    required_params: tuple[str, ...] = ()
    description: str = ""


def _profiles(*profiles: Profile) -> Mapping[str, Profile]:
    return MappingProxyType({p.name: p for p in profiles})


PROFILES: Mapping[str, Profile] = _profiles(
    Profile("generic", description="Any RFC 8414 / OpenID Connect discovery issuer."),
    Profile(
        "scalekit",
        defaults={
            "JWKS_URI": "{issuer}/keys",
            "INTROSPECTION_ENDPOINT": "{issuer}/oauth/introspect",
            "USER_ID_PREFIX": "user_",
            "CLAIM_MAP": {"scopes": ("scopes",), "organization_id": ("oid",)},
        },
        description="Scalekit environments (M2M and user tokens).",
    ),
)


class _TemplateValues(dict[str, str]):
    def __missing__(self, key: str) -> str:
        from .config import ConfigurationError

        raise ConfigurationError(
            f"The provider profile needs OAUTH_VERIFY_PROVIDER_PARAMS[{key!r}]."
        )


def _render(value: Any, fields: _TemplateValues) -> Any:
    if isinstance(value, str) and "{" in value:
        return value.format_map(fields)
    return value


def apply_profile(given: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the profile named by ``PROVIDER`` under the keys ``given``.

    :param given: the app's ``OAUTH_VERIFY_*`` keys without the prefix.
    :returns: the merged keys; the app's own values always win.
    :raises ConfigurationError: for an unknown profile or a missing parameter.
    """
    from .config import ConfigurationError

    name = given.get("PROVIDER") or "generic"
    profile = PROFILES.get(str(name).lower())
    if profile is None:
        raise ConfigurationError(
            f"OAUTH_VERIFY_PROVIDER = {name!r} is not a known profile; "
            f"known: {', '.join(sorted(PROFILES))}."
        )
    params = dict(given.get("PROVIDER_PARAMS") or {})
    missing = [p for p in profile.required_params if p not in params]
    if missing:
        raise ConfigurationError(
            f"OAUTH_VERIFY_PROVIDER = {profile.name!r} needs "
            f"OAUTH_VERIFY_PROVIDER_PARAMS entries: {', '.join(missing)}."
        )
    issuer = given.get("ISSUER")
    first = issuer if isinstance(issuer, str) else (issuer[0] if issuer else "")
    fields = _TemplateValues({k: str(v) for k, v in params.items()})
    fields["issuer"] = str(first).rstrip("/")
    merged = {key: _render(value, fields) for key, value in profile.defaults.items()}
    merged.update(given)
    merged["PROVIDER"] = profile.name
    return merged
