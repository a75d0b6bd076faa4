"""Provider profiles: what each authorization server needs, as data.

``OAUTH_VERIFY_PROVIDER = "okta"`` (plus ``ISSUER`` and ``AUDIENCE``) is all
an application writes: the profile fills in the other ``OAUTH_VERIFY_*``
keys (endpoint paths derived from the issuer, claim mappings, required claim
values, extra checks), and every key the application sets itself wins.

How a profile is merged under the app's keys (:func:`apply_profile`):

* **Templates.** String values (also inside lists and mappings) are
  ``str.format`` templates. Fields: ``{issuer}`` (the issuer without a
  trailing slash), ``{issuer_origin}`` (``scheme://host[:port]``),
  ``{issuer_host}``, the named groups of the profile's ``issuer_params``
  pattern matched against the issuer (``{realm}``, ``{tenant}`` ...), and
  every ``OAUTH_VERIFY_PROVIDER_PARAMS`` entry (which wins). Only keys the
  app does not set are rendered.
* **Per issuer.** With several issuers, ``JWKS_URI`` becomes a mapping
  ``{issuer: uri}`` rendered for each issuer (an app's own mapping merges
  into it; a URL derived from a templated issuer is left out), and
  ``JWKS_URI_FALLBACKS`` a mapping ``{issuer: (uri, ...)}``.
* **Mappings merge entry by entry.** ``CLAIM_MAP``, ``REQUIRED_CLAIM_VALUES``,
  ``ISSUER_PLACEHOLDER_CLAIMS`` and ``ISSUER_CLAIMS`` of the app are laid
  over the profile's;
  an entry set to ``None`` removes the profile's entry. Every other key is
  replaced as a whole.
* **Extra keys.** ``REQUIRE_EMAIL_VERIFIED = True`` adds
  ``{"email_verified": True}`` to the required claim values.
* **Contradictions fail at start-up.** A profile that needs a key
  (Cognito: ``ALLOWED_CLIENT_IDS``) or a parameter it cannot derive, or an
  ``AUDIENCE`` given where the profile turns the audience check off, raises
  :class:`~flask_oauth_verify.config.ConfigurationError` naming the key.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .issuers import is_template

logger = logging.getLogger("flask_oauth_verify")

__all__ = ["PROFILES", "Profile", "apply_profile", "profile_named"]

#: Keys whose mapping values merge with the profile's entry by entry.
MERGED_MAPPINGS = (
    "CLAIM_MAP",
    "REQUIRED_CLAIM_VALUES",
    "ISSUER_PLACEHOLDER_CLAIMS",
    "ISSUER_CLAIMS",
)
#: Keys rendered once per issuer (a mapping) when there are several issuers.
PER_ISSUER_KEYS = ("JWKS_URI", "JWKS_URI_FALLBACKS")


@dataclasses.dataclass(frozen=True)
class Profile:
    """One provider profile.

    :param name: the canonical value of ``OAUTH_VERIFY_PROVIDER``.
    :param defaults: ``OAUTH_VERIFY_*`` keys (without prefix) and their
        default values; strings may be templates (see the module docs).
    :param required_params: template fields the profile needs, from the
        issuer (``issuer_params``) or ``OAUTH_VERIFY_PROVIDER_PARAMS``.
    :param description: one line for the docs and error messages.
    :param issuer_params: a pattern matched at the start of the issuer; its
        named groups become template fields.
    :param issuer_must_match: when set, an issuer that does not match
        ``issuer_params`` is a configuration error with this explanation.
    :param required_keys: keys the app must set, with the reason.
    :param aliases: other accepted spellings of ``name``.
    :param issuer_doubts: (pattern, explanation) pairs: an issuer matching a
        pattern is accepted but logged as a warning, because no token of the
        provider carries such an ``iss`` (every token would be refused).
    :param opaque_tokens: for a provider without an introspection endpoint
        for access tokens, what a token that is no signed JWT is (the CLI's
        ``inspect`` says it instead of suggesting introspection).
    """

    name: str
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    required_params: tuple[str, ...] = ()
    description: str = ""
    issuer_params: str | None = None
    issuer_must_match: str | None = None
    required_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    issuer_doubts: tuple[tuple[str, str], ...] = ()
    opaque_tokens: str | None = None
    #: more template fields computed from the issuer (where a pattern cannot say)
    issuer_fields: Callable[[str], Mapping[str, str]] | None = None


# -- user rules (which tokens act for a user) ---------------------------------


def entra_acts_for_user(claims: Mapping[str, Any]) -> bool:
    """Entra ID: delegated tokens carry ``scp``; app-only tokens only ``roles``.

    ``idtyp`` (an optional claim) decides when present.
    """
    idtyp = claims.get("idtyp")
    if isinstance(idtyp, str):
        return idtyp == "user"
    return isinstance(claims.get("scp"), str) and isinstance(claims.get("sub"), str)


def keycloak_acts_for_user(claims: Mapping[str, Any]) -> bool:
    """Keycloak: service-account tokens name ``service-account-<client>``.

    The user name decides when there is one (``preferred_username``; an
    introspection answer also has ``username``). Without it (the profile
    scope removed), the ``client_id`` (``clientId`` before Keycloak 24)
    claim of the service-account mapper marks a service account: user
    tokens do not carry it. Introspection answers carry ``client_id`` for
    every token, but always with the user name.
    """
    for name in ("preferred_username", "username"):
        username = claims.get(name)
        if isinstance(username, str):
            return not username.startswith("service-account-") and isinstance(
                claims.get("sub"), str
            )
    if "client_id" in claims or "clientId" in claims:
        return False
    return isinstance(claims.get("sub"), str)


def auth0_acts_for_user(claims: Mapping[str, Any]) -> bool:
    """Auth0: a client-credentials token's subject is ``<client id>@clients``.

    The Auth0 token profile also says ``gty: client-credentials``; the RFC
    9068 profile names the client in ``client_id`` and may not.
    """
    subject = claims.get("sub")
    if not isinstance(subject, str) or subject.endswith("@clients"):
        return False
    return claims.get("gty") != "client-credentials"


def beyond_identity_acts_for_user(claims: Mapping[str, Any]) -> bool:
    """Beyond Identity: ``bi_p`` names an identity for tokens of a user."""
    principal = claims.get("bi_p")
    return isinstance(principal, str) and "/identities/" in principal


# -- the profiles ---------------------------------------------------------------

#: The common key set of the cloud that issued a token: national clouds
#: (Azure China, US Government) run token services with keys of their own.
_MICROSOFT_COMMON_KEYS = "https://{microsoft_login_host}/common/discovery/v2.0/keys"
#: Hosts of v1.0 issuers (``sts.…``) -> the login host that serves the keys.
_MICROSOFT_STS_HOSTS = {
    "sts.windows.net": "login.microsoftonline.com",
    "sts.chinacloudapi.cn": "login.chinacloudapi.cn",
}
#: Login hosts of the Microsoft clouds.
_MICROSOFT_LOGIN_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.us",
    }
)


def microsoft_login_host(issuer: str) -> dict[str, str]:
    """``{microsoft_login_host}``: the login host of the cloud ``issuer`` belongs to.

    A v2.0 issuer names it; a v1.0 issuer names its ``sts`` host, whose keys
    the cloud's login host serves. Any other host (a proxy, a test server)
    gets the global cloud's, as before national clouds were told apart.
    """
    host = (urlsplit(issuer).hostname or "").lower()
    if host in _MICROSOFT_LOGIN_HOSTS:
        return {"microsoft_login_host": host}
    return {"microsoft_login_host": _MICROSOFT_STS_HOSTS.get(host, "login.microsoftonline.com")}


#: The ``tid`` of every personal Microsoft account (the "consumers" tenant).
MICROSOFT_PERSONAL_ACCOUNTS_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"

#: For providers whose ``iss`` never ends in ``/``: ``iss`` is compared
#: exactly, so an issuer written with one refuses every token.
_NO_TRAILING_SLASH = (
    (
        r".+/$",
        "this provider's access tokens carry iss without a trailing slash; "
        "with it every token is refused",
    ),
)


def _profiles(*profiles: Profile) -> Mapping[str, Profile]:
    return MappingProxyType({p.name: p for p in profiles})


PROFILES: Mapping[str, Profile] = _profiles(
    Profile(
        "generic",
        description="Any RFC 8414 / OpenID Connect discovery issuer.",
    ),
    Profile(
        "scalekit",
        defaults={
            "JWKS_URI": "{issuer}/keys",
            # The M2M guide and the metadata name /keys; the verification
            # guide's JWKS client uses /.well-known/jwks, the API-auth
            # skill /.well-known/jwks.json.
            "JWKS_URI_FALLBACKS": ("{issuer}/.well-known/jwks", "{issuer}/.well-known/jwks.json"),
            "INTROSPECTION_ENDPOINT": "{issuer}/oauth/introspect",
            # Scalekit's user ids are usr_...; its guides' samples use user_...
            "USER_ID_PREFIX": ("usr_", "user_"),
            "CLAIM_MAP": {
                # scopes: M2M clients; permissions: the RBAC of user tokens
                "scopes": ("scopes", "scope", "permissions"),
                "organization_id": ("oid", "organization_id"),
                # The verification guide nests custom claims in custom_claims;
                # an API client's custom claims are also issued at the top level.
                "service_name": ("custom_claims.service_name", "service_name"),
                "token_type": ("custom_claims.client_type", "client_type"),
            },
        },
        description="Scalekit environments (M2M and user tokens).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "supertokens",
        defaults={
            # The issuer is <API domain><apiBasePath> ("/auth" by default).
            # Keys: the documented <API domain>/authjwt/jwks.json, falling back
            # (on 404) to the SDK's <API domain>/auth/jwt/jwks.json.
            "JWKS_URI": "{api_domain}/authjwt/jwks.json",
            "JWKS_URI_FALLBACKS": ("{api_domain}/auth/jwt/jwks.json", "{issuer}/jwt/jwks.json"),
            # <API domain>/auth/oauth/introspect with the default base path;
            # the SDK serves it under any apiBasePath, which iss ends with.
            "INTROSPECTION_ENDPOINT": "{issuer}/oauth/introspect",
            "INTROSPECTION_BODY": "json",
            "INTROSPECTION_AUTH": "none",
            "REQUIRED_CLAIMS": ("stt", "scp", "client_id"),
            # stt: 0 = session access token, 1 = OAuth2 access token, 2 = ID token
            "REQUIRED_CLAIM_VALUES": {"stt": 1},
            "CLAIM_MAP": {"scopes": ("scp",), "client_id": ("client_id",)},
        },
        # <API domain> is the issuer without the default "/auth" base path.
        issuer_params=r"(?P<api_domain>https?://.+?)(?:/auth)?/?$",
        description="SuperTokens OAuth2 provider (stt = 1 access tokens).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "voxkey",
        defaults={
            "JWKS_URI": "{domain}/oauth2/{realm}/oidc/jwks",
            "INTROSPECTION_ENDPOINT": "{domain}/oauth2/{realm}/introspect",
            # its guide: curl -u CLIENT_ID:CLIENT_SECRET (raw, not form-encoded)
            "INTROSPECTION_BASIC_ENCODING": "raw",
            "CLAIM_MAP": {"scopes": ("scope",)},
        },
        required_params=("domain", "realm"),
        issuer_params=r"(?P<domain>https?://[^/]+)/oauth2/(?P<realm>[^/]+)/?$",
        description="VoxKey realms (issuer = realm URL <domain>/oauth2/<realm>).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "beyond_identity",
        defaults={
            "INTROSPECTION_ENDPOINT": (
                "{issuer_origin}/v1/tenants/{tenant}/realms/{realm}/introspect"
            ),
            # its guide: "{client_id}:{client_secret}" base64-encoded, as they are
            "INTROSPECTION_BASIC_ENCODING": "raw",
            # Offline validation takes the key from the jku header, only from
            # the issuer's own host (auth-<region>.beyondidentity.com).
            "ALLOWED_JKU_HOSTS": ("{issuer_host}",),
            "REQUIRED_CLAIMS": ("nbf",),
            # bi_t/bi_r: required in a JWT; the realm's introspection answer
            # may omit them (its iss, checked too, names tenant and realm).
            "ISSUER_CLAIMS": {"bi_t": "{tenant}", "bi_r": "{realm}"},
            "CLAIM_MAP": {"scopes": ("scope",)},
            "USER_ID_RULE": beyond_identity_acts_for_user,
        },
        required_params=("tenant", "realm"),
        issuer_params=r"https?://[^/]+/v1/tenants/(?P<tenant>[^/]+)/realms/(?P<realm>[^/]+)(?:/|$)",
        issuer_must_match=(
            "a Beyond Identity issuer looks like https://auth-<region>.beyondidentity.com"
            "/v1/tenants/<tenant>/realms/<realm>/applications/<application>"
        ),
        aliases=("beyondidentity", "beyond-identity"),
        description="Beyond Identity (jku-based offline validation, bi_t/bi_r).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "auth0",
        defaults={
            "JWKS_URI": "{issuer}/.well-known/jwks.json",
            "CLAIM_MAP": {
                # scope only: with RBAC, scope is what this client was granted
                # (requested ∩ the user's permissions); permissions lists every
                # permission of the user, whatever the client asked for.
                "scopes": ("scope",),
                "client_id": ("azp", "client_id"),
                "organization_id": ("org_id",),
            },
            "USER_ID_RULE": auth0_acts_for_user,
        },
        description="Auth0 APIs (scope, org_id, azp).",
        opaque_tokens=(
            "Auth0 has no introspection endpoint: its access tokens for an API are signed "
            "JWTs. A client that asks for no audience gets a token for Auth0's /userinfo "
            "only (opaque or encrypted): it must request the token with this API's "
            "identifier as audience"
        ),
        issuer_doubts=(
            (
                r"https://[^/]+$",
                "Auth0 access tokens carry iss 'https://<domain>/' with a trailing "
                "slash; without it every token is refused",
            ),
        ),
    ),
    Profile(
        "okta",
        defaults={
            "JWKS_URI": "{issuer}/v1/keys",
            "INTROSPECTION_ENDPOINT": "{issuer}/v1/introspect",
            # JWTs: scp array and cid; introspection answers: scope, client_id
            "CLAIM_MAP": {"scopes": ("scp", "scope"), "client_id": ("cid", "client_id")},
        },
        issuer_params=r"https?://[^/]+/oauth2/(?P<authorization_server>[^/]+)/?$",
        issuer_must_match=(
            "Okta access tokens for your own API come from a custom authorization "
            "server, https://<okta domain>/oauth2/<id> (e.g. /oauth2/default); tokens of "
            "the org authorization server are not meant to be validated by resource servers"
        ),
        description="Okta custom authorization servers (scp, cid).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "entra_id",
        defaults={
            "JWKS_URI": _MICROSOFT_COMMON_KEYS,
            "ISSUER_PLACEHOLDER_CLAIMS": {"tenantid": "tid", "tenant_id": "tid"},
            # Access tokens always name their client (azp in v2.0, appid in
            # v1.0); ID tokens never do, and can share issuer, keys and aud.
            "REQUIRE_CLIENT_ID": True,
            "CLAIM_MAP": {
                "scopes": ("scp", "roles"),
                "client_id": ("azp", "appid"),
                "organization_id": ("tid",),
            },
            # Every personal Microsoft account's token names this one tenant:
            # it is no organization (never one tenant for unrelated people).
            "NO_ORGANIZATION_VALUES": (MICROSOFT_PERSONAL_ACCOUNTS_TENANT,),
            "USER_ID_RULE": entra_acts_for_user,
        },
        issuer_fields=microsoft_login_host,
        aliases=("entra", "entra-id", "azure_ad", "azure-ad", "azure", "microsoft"),
        description="Microsoft Entra ID (v1 and v2 tokens, multi-tenant templates).",
        opaque_tokens=(
            "Entra ID has no introspection endpoint: its access tokens for your API are "
            "signed JWTs. This token is not one of them (a refresh token, or a token for a "
            "Microsoft service)"
        ),
        issuer_doubts=(
            (
                r"https://[^/]+/(common|organizations|consumers)(/v2\.0)?/?$",
                "no token carries this iss (tokens name their tenant); for a "
                "multi-tenant API use the template "
                "https://login.microsoftonline.com/{tenantid}/v2.0 with ALLOWED_TENANTS",
            ),
            (
                r"https?://[^/]+/[^/]+/v2\.0/$",
                "v2.0 access tokens carry iss '.../{tenantid}/v2.0' without a trailing "
                "slash; with it every token is refused",
            ),
            (
                r"https?://sts\.[^/]+/[^/]+$",
                "v1.0 access tokens carry iss 'https://sts.windows.net/{tenantid}/' with a "
                "trailing slash; without it every token is refused",
            ),
        ),
    ),
    Profile(
        "keycloak",
        defaults={
            "JWKS_URI": "{issuer}/protocol/openid-connect/certs",
            "INTROSPECTION_ENDPOINT": "{issuer}/protocol/openid-connect/token/introspect",
            # Its answers are the token's own claims: no aud there means none in
            # the token (no audience mapper), which a JWT route refuses too.
            "INTROSPECTION_REQUIRE_AUDIENCE": True,
            # Keycloak signs ID tokens with the same keys; typ tells them apart.
            "REQUIRED_CLAIM_VALUES": {"typ": "Bearer"},
            "CLAIM_MAP": {"scopes": ("scope",), "client_id": ("azp", "client_id")},
            "USER_ID_RULE": keycloak_acts_for_user,
        },
        issuer_params=r"https?://[^/]+(?:/[^/]+)*/realms/(?P<realm>[^/]+)/?$",
        description="Keycloak realms (issuer <base>/realms/<realm>).",
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
    Profile(
        "cognito",
        defaults={
            "JWKS_URI": "{issuer}/.well-known/jwks.json",
            # Access tokens carry no aud: the app client is checked instead.
            "VERIFY_AUDIENCE": False,
            "REQUIRED_CLAIMS": ("client_id",),
            "REQUIRED_CLAIM_VALUES": {"token_use": "access"},
            "CLAIM_MAP": {"scopes": ("scope",), "client_id": ("client_id",)},
        },
        issuer_params=(
            r"https://cognito-idp\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/(?P<user_pool_id>[^/]+)$"
        ),
        required_keys={
            "ALLOWED_CLIENT_IDS": (
                "Cognito access tokens carry no aud claim, so the app client ids that may "
                "call this API must be listed"
            )
        },
        aliases=("aws_cognito", "aws-cognito"),
        description="AWS Cognito user pools (access tokens: client_id, token_use).",
        opaque_tokens=(
            "Cognito has no introspection endpoint: its access tokens are signed JWTs. This "
            "token is not one of them (its refresh tokens are encrypted JWTs, its ID tokens "
            "are refused for their token_use): send the access token"
        ),
        issuer_doubts=_NO_TRAILING_SLASH,
    ),
)

_ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: p.name for p in PROFILES.values() for alias in (p.name, *p.aliases)}
)


def _error(message: str) -> Exception:
    from .config import ConfigurationError

    return ConfigurationError(message)


def profile_named(name: Any) -> Profile:
    """The profile called ``name`` (case, ``-`` and ``_`` do not matter).

    :raises ConfigurationError: for an unknown name.
    """
    key = str(name).strip().lower().replace(" ", "_")
    canonical = _ALIASES.get(key) or _ALIASES.get(key.replace("-", "_"))
    if canonical is None:
        raise _error(
            f"OAUTH_VERIFY_PROVIDER = {name!r} is not a known profile; "
            f"known: {', '.join(sorted(PROFILES))}."
        )
    return PROFILES[canonical]


# -- rendering ------------------------------------------------------------------


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise _error(
            f"The provider profile needs OAUTH_VERIFY_PROVIDER_PARAMS[{key!r}] "
            "(it could not be derived from OAUTH_VERIFY_ISSUER)."
        )


def _render(value: Any, fields: _Fields) -> Any:
    if isinstance(value, str):
        return value.format_map(fields) if "{" in value else value
    if isinstance(value, list | tuple):
        return type(value)(_render(item, fields) for item in value)
    if isinstance(value, Mapping):
        return {key: _render(item, fields) for key, item in value.items()}
    return value


def _issuer_fields(
    profile: Profile, issuer: str, params: Mapping[str, Any], *, strict: bool
) -> _Fields:
    parts = urlsplit(issuer)
    fields = _Fields(
        issuer=issuer.rstrip("/"),
        issuer_origin=f"{parts.scheme}://{parts.netloc}" if parts.netloc else "",
        issuer_host=(parts.hostname or "").lower(),
    )
    if profile.issuer_params is not None:
        found = re.match(profile.issuer_params, issuer)
        if found is not None:
            fields.update({k: v for k, v in found.groupdict().items() if v is not None})
        elif (
            strict
            and profile.issuer_must_match is not None
            and not (profile.required_params and set(profile.required_params) <= set(params))
        ):
            raise _error(
                f"OAUTH_VERIFY_ISSUER {issuer!r} does not fit OAUTH_VERIFY_PROVIDER = "
                f"{profile.name!r}: {profile.issuer_must_match}."
            )
    if profile.issuer_fields is not None:
        fields.update(profile.issuer_fields(issuer))
    fields.update({str(k): str(v) for k, v in params.items()})
    return fields


def _issuers(given: Mapping[str, Any]) -> list[str]:
    issuer = given.get("ISSUER")
    if isinstance(issuer, str):
        return [issuer]
    if isinstance(issuer, list | tuple):
        return [i for i in issuer if isinstance(i, str)]
    return []


def _merge_mapping(base: Any, override: Any, key: str) -> Any:
    if not isinstance(override, Mapping):
        return override  # config validation names the key
    merged = dict(base) if isinstance(base, Mapping) else {}
    for name, value in override.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def _warn_about_doubtful_issuers(profile: Profile, issuers: list[str]) -> None:
    """Log the issuers that no token of the provider can carry (start-up only)."""
    for pattern, why in profile.issuer_doubts:
        for issuer in issuers:
            if re.match(pattern, issuer):
                logger.warning(
                    "OAUTH_VERIFY_ISSUER %r looks wrong for provider %r: %s.",
                    issuer,
                    profile.name,
                    why,
                )


def apply_profile(given: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the profile named by ``PROVIDER`` under the keys ``given``.

    :param given: the app's ``OAUTH_VERIFY_*`` keys without the prefix.
    :returns: the merged keys; the app's own values win (see the module
        docs for the entry-by-entry merge of mappings).
    :raises ConfigurationError: for an unknown profile, a missing parameter
        or key, or an issuer the profile cannot use.
    """
    profile = profile_named(given.get("PROVIDER") or "generic")
    params = given.get("PROVIDER_PARAMS") or {}
    if not isinstance(params, Mapping):
        raise _error("OAUTH_VERIFY_PROVIDER_PARAMS must be a mapping of name -> value.")
    issuers = _issuers(given)
    per_issuer = [_issuer_fields(profile, i, params, strict=True) for i in issuers]
    fields = per_issuer[0] if per_issuer else _Fields(params)
    missing = [p for p in profile.required_params if p not in fields]
    if missing and issuers:
        raise _error(
            f"OAUTH_VERIFY_PROVIDER = {profile.name!r} needs OAUTH_VERIFY_PROVIDER_PARAMS "
            f"entries: {', '.join(missing)} (they could not be derived from "
            f"OAUTH_VERIFY_ISSUER)."
        )
    _check_one_tenant(profile, given, issuers, per_issuer)
    merged: dict[str, Any] = {}
    for key, value in profile.defaults.items():
        mergeable = key in MERGED_MAPPINGS or (
            key in PER_ISSUER_KEYS and isinstance(given.get(key), Mapping)
        )
        if key in given and not mergeable:
            continue
        if not issuers:
            continue  # config validation reports the missing ISSUER
        if key in PER_ISSUER_KEYS:
            # A URL derived from a templated issuer would hold its
            # placeholders: leave it out, so that the configuration error
            # asks for the key set URL of the template.
            rendered = {
                i: _render(value, f)
                for i, f in zip(issuers, per_issuer, strict=True)
                if not (is_template(i) and "{issuer" in str(value))
            }
            if len(issuers) > 1:
                merged[key] = rendered
            elif rendered:
                merged[key] = rendered[issuers[0]]
        else:
            merged[key] = _render(value, fields)
    for key, value in given.items():
        if key in merged and (
            key in MERGED_MAPPINGS or (key in PER_ISSUER_KEYS and isinstance(merged[key], Mapping))
        ):
            merged[key] = _merge_mapping(merged[key], value, key)
        else:
            merged[key] = value
    _email_verified(merged)
    _check_one_introspection_endpoint(profile, given, issuers, per_issuer, merged)
    _check_profile_keys(profile, given, merged)
    _warn_about_doubtful_issuers(profile, issuers)
    merged["PROVIDER"] = profile.name
    merged["PROVIDER_PARAMS"] = {k: v for k, v in fields.items() if not k.startswith("issuer")}
    return merged


#: Defaults checked on every JWT that hold one value for all issuers.
_ONE_VALUE_FOR_ALL = ("ISSUER_CLAIMS", "ALLOWED_JKU_HOSTS")


def _check_one_tenant(
    profile: Profile, given: Mapping[str, Any], issuers: list[str], per_issuer: list[_Fields]
) -> None:
    """Issuers whose parts render these defaults differently (Beyond Identity
    applications of two realms, tenants or regions) are refused at start-up:
    rendered from the first issuer only, they refused every token of the
    others without a word."""
    for key in _ONE_VALUE_FOR_ALL:
        if key not in profile.defaults or key in given:
            continue
        values = {
            repr(_render(profile.defaults[key], f))
            for i, f in zip(issuers, per_issuer, strict=True)
            if not is_template(i)
        }
        if len(values) > 1:
            raise _error(
                f"OAUTH_VERIFY_PROVIDER = {profile.name!r}: the issuers differ in what "
                f"OAUTH_VERIFY_{key} must hold ({', '.join(sorted(values))}), and one app "
                "checks one value: list issuers of one tenant and realm (and region) only."
            )


def _check_one_introspection_endpoint(
    profile: Profile,
    given: Mapping[str, Any],
    issuers: list[str],
    per_issuer: list[_Fields],
    merged: Mapping[str, Any],
) -> None:
    """Issuers whose profile endpoints for introspection differ (Keycloak
    realms, Okta authorization servers, VoxKey realms), or a templated issuer
    (which has no endpoint of its own), while introspection is in use (a
    strategy other than ``jwks``, or introspection credentials): one app
    introspects at one endpoint, rendered from the first issuer, where the
    others' tokens are unknown (inactive: 401). Refused at start-up; an
    ``INTROSPECTION_ENDPOINT`` given is the app's choice."""
    template = profile.defaults.get("INTROSPECTION_ENDPOINT")
    if template is None or "INTROSPECTION_ENDPOINT" in given:
        return
    in_use = (
        merged.get("STRATEGY", "jwks") != "jwks"
        or merged.get("INTROSPECTION_CLIENT_ID")
        or merged.get("INTROSPECTION_TOKEN")
    )
    if not in_use:
        return
    if any(is_template(i) for i in issuers):
        raise _error(
            f"OAUTH_VERIFY_PROVIDER = {profile.name!r}: a templated OAUTH_VERIFY_ISSUER has no "
            "introspection endpoint of its own; set OAUTH_VERIFY_INTROSPECTION_ENDPOINT."
        )
    endpoints = sorted({_render(template, f) for f in per_issuer})
    if len(endpoints) > 1:
        raise _error(
            f"OAUTH_VERIFY_PROVIDER = {profile.name!r}: the issuers have different "
            f"introspection endpoints ({', '.join(endpoints)}), and one app introspects at "
            "one only (the first issuer's), which does not know the others' tokens: give "
            "each issuer its own app, or set OAUTH_VERIFY_INTROSPECTION_ENDPOINT yourself."
        )


def _email_verified(merged: dict[str, Any]) -> None:
    from .config import as_bool

    if as_bool(merged.get("REQUIRE_EMAIL_VERIFIED", False), "REQUIRE_EMAIL_VERIFIED"):
        values = merged.get("REQUIRED_CLAIM_VALUES") or {}
        if isinstance(values, Mapping):
            merged["REQUIRED_CLAIM_VALUES"] = {**values, "email_verified": True}


def _check_profile_keys(
    profile: Profile, given: Mapping[str, Any], merged: Mapping[str, Any]
) -> None:
    for key, why in profile.required_keys.items():
        if not merged.get(key):
            raise _error(
                f"OAUTH_VERIFY_PROVIDER = {profile.name!r} needs OAUTH_VERIFY_{key}: {why}."
            )
    if (
        profile.defaults.get("VERIFY_AUDIENCE") is False
        and given.get("AUDIENCE")
        and "VERIFY_AUDIENCE" not in given
    ):
        raise _error(
            f"OAUTH_VERIFY_AUDIENCE is set, but OAUTH_VERIFY_PROVIDER = {profile.name!r} "
            "turns the audience check off (its access tokens carry no aud). Remove "
            "OAUTH_VERIFY_AUDIENCE, or set OAUTH_VERIFY_VERIFY_AUDIENCE = True to check it anyway."
        )
