"""Settings: every ``OAUTH_VERIFY_*`` key read once into a frozen object.

A missing or contradictory setting raises :class:`ConfigurationError` at
``init_app`` with a message that names the key, so a misconfigured resource
server fails at start-up instead of on the first request.

Provider profiles (:mod:`flask_oauth_verify.providers`) only fill in defaults;
every key the application sets wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .keys import PRIVATE_JWK_MEMBERS

__all__ = ["DEFAULT_CLAIM_MAP", "PREFIX", "ConfigurationError", "Settings", "UnknownSettingWarning"]

PREFIX = "OAUTH_VERIFY_"

logger = logging.getLogger("flask_oauth_verify")

#: Every key this package reads (without the prefix); another ``OAUTH_VERIFY_``
#: key is most likely a typo, which would silently leave a check off.
KNOWN_KEYS = frozenset(
    {
        "ALGORITHMS",
        "ALLOWED_CLIENT_IDS",
        "ALLOWED_JKU_HOSTS",
        "ALLOWED_TENANTS",
        "ALLOWED_TYPES",
        "ALLOW_INSECURE_HTTP",
        "AUDIENCE",
        "CIRCUIT_BREAKER_FAILURES",
        "CIRCUIT_BREAKER_RESET",
        "CLAIM_MAP",
        "DEV_ISSUER",
        "DISCOVERY_CACHE_TTL",
        "HEALTH_PROBE_INTERVAL",
        "HEALTH_REQUIRE_CACHE",
        "HEALTH_ROUTE",
        "HTTP_CA_BUNDLE",
        "HTTP_MAX_BYTES",
        "HTTP_PROXY",
        "HTTP_TIMEOUT",
        "INTROSPECTION_AUTH",
        "INTROSPECTION_BASIC_ENCODING",
        "INTROSPECTION_BODY",
        "INTROSPECTION_CACHE_TTL",
        "INTROSPECTION_CLIENT_ID",
        "INTROSPECTION_CLIENT_SECRET",
        "INTROSPECTION_ENDPOINT",
        "INTROSPECTION_NEGATIVE_CACHE_TTL",
        "INTROSPECTION_REQUIRE_AUDIENCE",
        "INTROSPECTION_TOKEN",
        "ISSUER",
        "ISSUER_CLAIMS",
        "ISSUER_PLACEHOLDER_CLAIMS",
        "JWKS",
        "JWKS_CACHE_TTL",
        "JWKS_MAX_STALENESS",
        "JWKS_MAX_TTL",
        "JWKS_MIN_TTL",
        "JWKS_REFRESH_COOLDOWN",
        "JWKS_URI",
        "JWKS_URI_FALLBACKS",
        "LEEWAY",
        "MAX_TOKEN_BYTES",
        "METRICS",
        "METRICS_CLIENT_ID_LABEL",
        "METRICS_ENDPOINT",
        "METRICS_REGISTRY",
        "NO_ORGANIZATION_VALUES",
        "ORGANIZATION_COLUMN",
        "PREFETCH_KEYS",
        "PROVIDER",
        "PROVIDER_PARAMS",
        "REALM",
        "REFUSED_CLAIMS",
        "REQUIRED_CLAIMS",
        "REQUIRED_CLAIM_VALUES",
        "REQUIRE_CLIENT_ID",
        "REQUIRE_EMAIL_VERIFIED",
        "SECURITY_HEADERS",
        "STRATEGY",
        "TOKEN_CACHE_SIZE",
        "TOKEN_LOCATIONS",
        "USER_COLUMN",
        "USER_ID_PREFIX",
        "USER_ID_RULE",
        "VERIFY_AUDIENCE",
    }
)

#: Algorithms this package can verify. HMAC and ``none`` are never accepted:
#: a resource server that verifies with public keys must not accept a MAC.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512", "ES256K",
        "EdDSA", "Ed25519",
    }
)  # fmt: skip
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})

#: Default claim mapping: ``AuthContext`` field -> claim paths tried in order
#: (dotted paths reach into nested objects). For ``scopes`` every listed
#: claim that is present contributes.
DEFAULT_CLAIM_MAP: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "subject": ("sub",),
        "client_id": ("client_id", "azp", "cid"),
        "scopes": ("scopes", "scope", "scp"),
        "organization_id": ("oid", "organization_id", "org_id"),
        "service_name": ("custom_claims.service_name",),
        "token_type": ("custom_claims.client_type",),
    }
)

DEFAULT_TYPES = (None, "jwt", "application/jwt", "at+jwt", "application/at+jwt")
#: Claims an access token presented as a Bearer token must not carry:
#:
#: * ``at_hash`` and ``c_hash`` (ID tokens): OpenID Connect defines them for
#:   ID tokens only (Core §3.1.3.6, §3.3.2.11); ``at_hash`` is the hash of
#:   the access token issued beside the ID token, so no access token can
#:   carry it. A token holding one is an ID token.
#: * ``cnf`` (a proof-of-possession token): it binds the token to a key its
#:   client must prove (RFC 7800; DPoP, RFC 9449; mutual TLS, RFC 8705),
#:   which a Bearer request cannot.
DEFAULT_REFUSED_CLAIMS = ("at_hash", "c_hash", "cnf")
STRATEGIES = ("jwks", "introspection", "auto", "both")
INTROSPECTION_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "bearer", "none")
#: How ``client_secret_basic`` writes the credentials: form-encoded first
#: (RFC 6749 §2.3.1) or as they are (RFC 7617, what some providers document).
INTROSPECTION_BASIC_ENCODINGS = ("form", "raw")
TOKEN_LOCATIONS = ("header", "query", "form")


class ConfigurationError(ValueError):
    """A setting is missing or contradicts another; the message names it."""


def _key(name: str) -> str:
    return PREFIX + name


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        if not value:  # an empty environment variable; ("",) matched nothing or everything
            raise ConfigurationError(f"{_key(name)} must not be empty.")
        return (value,)
    if isinstance(value, list | tuple | set | frozenset):
        items = tuple(value)
        if not all(isinstance(item, str) and item for item in items):
            raise ConfigurationError(f"{_key(name)} must hold non-empty strings.")
        return items
    raise ConfigurationError(f"{_key(name)} must be a string or a list of strings.")


def _as_number(
    value: Any,
    name: str,
    *,
    minimum: float = 0,
    maximum: float | None = None,
    unit: str = "",
    hint: str = "",
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{_key(name)} must be a number, not {value!r}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        # NaN passes every "<" check as False: a LEEWAY of NaN let tokens
        # expired for any length of time through (exp + NaN <= now is False),
        # an INTROSPECTION_CACHE_TTL of inf kept an answer past revocation
        # for ever. (From the environment, Flask reads NaN and Infinity as JSON.)
        raise ConfigurationError(f"{_key(name)} must be a finite number, not {value!r}.")
    if number < minimum:
        raise ConfigurationError(f"{_key(name)} must be at least {minimum}.")
    if maximum is not None and number > maximum:
        raise ConfigurationError(
            f"{_key(name)} must be at most {maximum:g}{unit}, not {value!r}{hint}."
        )
    return number


def _ttl_bounds(values: Mapping[str, Any]) -> tuple[float, float]:
    """``JWKS_MIN_TTL`` and ``JWKS_MAX_TTL``; the maximum may not be below the minimum."""
    low = _number(values, "JWKS_MIN_TTL")
    high = _number(values, "JWKS_MAX_TTL")
    if high < low:
        raise ConfigurationError(
            f"{_key('JWKS_MAX_TTL')} ({high:g} s) is below {_key('JWKS_MIN_TTL')} ({low:g} s): "
            "a key set's lifetime is kept between the two."
        )
    return low, high


#: The largest ``HTTP_TIMEOUT`` (each of connect and read), in seconds: a
#: request thread waits that long for an issuer, and a wait beyond
#: ``threading.TIMEOUT_MAX`` (about 292 years) failed every fetch.
MAX_HTTP_TIMEOUT = 300.0
#: The largest ``LEEWAY``, in seconds: clock skew is seconds, and a value
#: meant as milliseconds (30000) let tokens expired for 8 hours through.
MAX_LEEWAY = 300.0


def _as_timeout(value: Any) -> tuple[float, float]:
    def seconds(number: Any) -> float:
        return _as_number(
            number,
            "HTTP_TIMEOUT",
            minimum=0.001,
            maximum=MAX_HTTP_TIMEOUT,
            unit=" seconds (each of connect and read)",
        )

    if isinstance(value, list | tuple) and len(value) == 2:
        return seconds(value[0]), seconds(value[1])
    single = seconds(value)
    return single, single


def _is_loopback(host: str | None) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address literal.

    An address must parse as one (``127.0.0.0/8``, ``::1``): a DNS name such
    as ``127.attacker.example`` is no loopback host, whatever it starts with.
    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is not one of the
    documented forms: refused on every Python (3.13 calls it loopback, 3.12
    did not).
    """
    if not host:
        return False
    host = host.lower().strip("[]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    return address.is_loopback and not mapped


def _has_space_or_control(text: str) -> bool:
    """Whether ``text`` holds white space or a control character (a URL holds
    them percent-encoded only; ``urlsplit`` silently drops some)."""
    return not text.isprintable() or any(character.isspace() for character in text)


def _url_parts(url: Any) -> SplitResult | None:
    """``url`` split, or ``None`` when it cannot be what was meant: not a
    string, a port that is no number from 0 to 65535 (every fetch would fail),
    or space or a control character around or in it (a pasting mistake,
    which would fetch another path)."""
    if not isinstance(url, str) or _has_space_or_control(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    return parts


def check_url(url: str, name: str, *, allow_insecure_http: bool, label: str | None = None) -> str:
    """Check that ``url`` is https, or http to a loopback host (or allowed).

    :param url: the URL from the settings or from discovery metadata.
    :param name: the config key named in the error.
    :param allow_insecure_http: ``OAUTH_VERIFY_ALLOW_INSECURE_HTTP``.
    :param label: what the error names instead of the key (a URL from
        discovery metadata is no setting of the app).
    :raises ConfigurationError: when the URL is not acceptable.
    """
    shown = label or _key(name)
    parts = _url_parts(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{shown} must be an http(s) URL, not {_shown_value(url, url=True)!r}."
        )
    if parts.scheme == "https":
        return url
    if allow_insecure_http or _is_loopback(parts.hostname):
        return url
    raise ConfigurationError(
        f"{shown} uses plain http to a non-loopback host ({parts.hostname}); "
        f"use https or set {_key('ALLOW_INSECURE_HTTP')} = True."
    )


def shown_url(url: str | None, *, masked: bool = False) -> str | None:
    """``url`` fit to show, without what may hold a credential: a configured
    URL may carry one in its user-info (a password, or an API key as the
    user name) or in its query (``?api_key=...``).

    :param url: the URL; ``None`` is returned as it is, and so is a value
        that is no URL (``"static"``) but for what may be a credential in
        it (``user:pw@``, ``?key=``).
    :param masked: ``False`` (an anonymous caller: the health route): scheme,
        host, port and path only. ``True`` (the operator's command line,
        ``repr(Settings)``, error messages): also ``***`` in place of a
        user-info, a query and a fragment, so that their presence still shows.
    """
    if url is None:
        return None
    if "://" not in url or _has_space_or_control(url):  # no URL ("static"), or malformed
        return _loosely_masked(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if not masked:
        return f"{parts.scheme}://{host}{port}{parts.path}"
    user = f"{_REDACTED}@" if "@" in parts.netloc else ""
    query = f"?{_REDACTED}" if parts.query else ""
    fragment = f"#{_REDACTED}" if parts.fragment else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}{query}{fragment}"


def _loosely_masked(text: str) -> str:
    """``text`` that is no well-formed URL with what may be a credential in
    it (``user:pw@host/x``, ``host/x?api_key=...``) as ``***``; its
    characters as given otherwise (a tab stays a tab)."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "", text
    if "@" in rest:
        rest = f"{_REDACTED}@{rest.rsplit('@', 1)[1]}"
    if "?" in rest:
        rest = f"{rest.split('?', 1)[0]}?{_REDACTED}"
    return f"{scheme}{separator}{rest}"


def _shown_value(value: Any, *, url: bool = False) -> Any:
    """``value`` (a setting, or what was given for one) as messages and
    ``repr(Settings)`` show it: every URL in it through :func:`shown_url`
    (``masked``), and no secret member of a JWK, in nested mappings and
    sequences too.

    :param url: every string in ``value`` is meant as a URL (the error of a
        URL setting): a malformed one without ``://`` is masked too, where
        otherwise only strings with ``://`` are (``AUDIENCE = "api@x"``
        stays as it is).
    """
    if isinstance(value, str):
        return shown_url(value, masked=True) if url or "://" in value else value
    if isinstance(value, Mapping):
        secret = PRIVATE_JWK_MEMBERS if "kty" in value else frozenset()
        return {
            key: _REDACTED if key in secret else _shown_value(item, url=url)
            for key, item in value.items()
        }
    if isinstance(value, tuple | list | frozenset | set):
        return type(value)(_shown_value(item, url=url) for item in value)
    return value


def _claim_map(value: Any) -> Mapping[str, tuple[str, ...]]:
    merged = dict(DEFAULT_CLAIM_MAP)
    if value is None:
        return MappingProxyType(merged)
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{_key('CLAIM_MAP')} must be a mapping of field -> claims.")
    for field, claims in value.items():
        if field not in DEFAULT_CLAIM_MAP:
            raise ConfigurationError(
                f"{_key('CLAIM_MAP')} names unknown field {field!r}; "
                f"known: {', '.join(sorted(DEFAULT_CLAIM_MAP))}."
            )
        merged[field] = _as_tuple(claims, "CLAIM_MAP")
    return MappingProxyType(merged)


#: Settings that are credentials: never part of ``repr(Settings)``.
_SECRET_FIELDS = frozenset({"introspection_client_secret", "introspection_token"})
_SECRET_KEYS = frozenset({"INTROSPECTION_CLIENT_SECRET", "INTROSPECTION_TOKEN"})
_REDACTED = "***"


def _shown_raw(key: str, item: Any) -> Any:
    """A given key's value as ``repr(Settings)`` shows it: no credential.

    The value of a key that is no setting of this package is not shown at
    all: it is the app's own, or a mistyped one (``CLIENT_SECRT``)."""
    if item is not None and (key in _SECRET_KEYS or key not in KNOWN_KEYS):
        return _REDACTED
    return _shown_value(item)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The validated, immutable settings of one app.

    Build it with :meth:`from_config`. Every field but :attr:`raw` holds one
    ``OAUTH_VERIFY_*`` key documented in the configuration reference, named
    as the key in lower case except ``ISSUER`` (:attr:`issuers`),
    ``AUDIENCE`` (:attr:`audiences`), ``JWKS`` (:attr:`static_jwks`) and
    ``JWKS_URI`` (:attr:`jwks_uris`); a field's default is its key's
    default. One key has no field of its own: ``REQUIRE_EMAIL_VERIFIED``,
    which the provider profiles fold into :attr:`required_claim_values`.
    :attr:`raw` is no key: it holds every ``OAUTH_VERIFY_*`` key as given
    (without the prefix, after provider defaults).
    """

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    verify_audience: bool = True
    jwks_uris: Mapping[str, str] = dataclasses.field(default_factory=dict)
    jwks_uri_fallbacks: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    static_jwks: Mapping[str, Any] | None = None
    algorithms: tuple[str, ...] = ("RS256",)
    leeway: float = 30.0
    allowed_types: tuple[str | None, ...] = DEFAULT_TYPES
    required_claims: tuple[str, ...] = ()
    required_claim_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    claim_map: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: DEFAULT_CLAIM_MAP
    )
    #: one prefix or several; ``str.startswith`` takes either
    user_id_prefix: str | tuple[str, ...] | None = None
    user_id_rule: Callable[[Mapping[str, Any]], bool] | None = None
    #: organization claim values that name no organization (Entra's tenant of
    #: personal Microsoft accounts): ``organization_id`` is then ``None``
    no_organization_values: frozenset[str] = frozenset()
    allowed_client_ids: tuple[str, ...] = ()
    #: the token must name its client (per the ``client_id`` claim paths)
    require_client_id: bool = False
    #: claims an access token presented as a Bearer token must not carry
    #: (``at_hash``/``c_hash`` of an ID token, ``cnf`` of a proof-of-possession
    #: token): a token holding one is refused
    refused_claims: tuple[str, ...] = DEFAULT_REFUSED_CLAIMS
    #: accepted placeholder values of templated issuers; ``None`` = any tenant
    allowed_tenants: tuple[str, ...] | None = None
    issuer_placeholder_claims: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: claims bound to the issuer (Beyond Identity bi_t/bi_r), see ISSUER_CLAIMS
    issuer_claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_token_bytes: int = 16384
    token_locations: tuple[str, ...] = ("header",)
    realm: str = "api"
    # keys
    jwks_cache_ttl: float = 600.0
    jwks_min_ttl: float = 60.0
    jwks_max_ttl: float = 86400.0
    jwks_refresh_cooldown: float = 30.0
    jwks_max_staleness: float = 86400.0
    discovery_cache_ttl: float = 6 * 3600.0
    prefetch_keys: bool = False
    allowed_jku_hosts: tuple[str, ...] = ()
    # network
    http_timeout: tuple[float, float] = (2.0, 5.0)
    http_max_bytes: int = 512 * 1024
    http_ca_bundle: str | None = None
    http_proxy: str | None = None
    allow_insecure_http: bool = False
    circuit_breaker_failures: int = 5
    circuit_breaker_reset: float = 30.0
    # strategy and introspection
    strategy: str = "jwks"
    introspection_endpoint: str | None = None
    introspection_client_id: str | None = None
    introspection_client_secret: str | None = None
    introspection_auth: str = "client_secret_basic"
    introspection_token: str | None = None
    introspection_body: str = "form"
    #: ``client_secret_basic`` credentials form-encoded (``"form"``, RFC 6749
    #: §2.3.1) or sent as they are (``"raw"``, ``curl -u id:secret``)
    introspection_basic_encoding: str = "form"
    #: Refuse an introspection answer without ``aud`` (the audience is
    #: checked): for servers whose answers always carry the token's own claims.
    introspection_require_audience: bool = False
    introspection_cache_ttl: float = 0.0
    introspection_negative_cache_ttl: float = 0.0
    # performance
    token_cache_size: int = 10000
    # provider
    provider: str = "generic"
    provider_params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # tenancy
    organization_column: str = "organization_id"
    user_column: str = "user_id"
    # operations
    security_headers: bool = False
    metrics: bool = False
    metrics_client_id_label: bool = False
    health_route: str | None = None
    #: the path serving the metrics registry (``METRICS_ENDPOINT``), or None
    metrics_endpoint: str | None = None
    #: the ``prometheus_client.CollectorRegistry`` to record the metrics in,
    #: as given; ``None`` is a registry per app. Checked when ``METRICS`` is on.
    metrics_registry: object = None
    #: an unreachable cache backend makes the health check fail, not warn
    health_require_cache: bool = False
    #: seconds between two reachability probes of the introspection endpoint
    health_probe_interval: float = 30.0
    #: the development ``TokenIssuer`` of ``flask oauth-verify mint``, as
    #: given; checked at ``init_app``
    dev_issuer: object = None
    #: every ``OAUTH_VERIFY_*`` key as given (after provider defaults),
    #: for extensions that read keys of their own.
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Read and validate the ``OAUTH_VERIFY_*`` keys of ``config``.

        :param config: the Flask ``app.config`` (or any mapping).
        :raises ConfigurationError: naming the key that is missing or wrong.
        """
        from .providers import apply_profile  # providers are data, read late

        given = {k[len(PREFIX) :]: v for k, v in config.items() if k.startswith(PREFIX)}
        _warn_unknown(given)
        _warn_misspelled_prefix(config)
        values = apply_profile(given)
        settings = _build(values)
        _refuse_pinned_and_fetched_keys(given, settings)
        return settings

    def __repr__(self) -> str:
        """Every field, the credentials shown as ``'***'`` (a repr ends up in
        logs, tracebacks and debuggers): the secrets, the user-info and query
        of every URL (:func:`shown_url`), and what was given for a key that
        is no setting of this package."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _SECRET_FIELDS and value is not None:
                value = _REDACTED
            elif field.name == "raw":
                value = {key: _shown_raw(key, item) for key, item in value.items()}
            else:
                value = _shown_value(value)
            parts.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def jwks_uri_for(self, issuer: str) -> str | None:
        """The configured (not discovered) JWKS URI of ``issuer``, if any."""
        return self.jwks_uris.get(issuer)

    @property
    def introspection_longest_reuse(self) -> float:
        """The longest an introspection answer may be reused, active or not."""
        return max(self.introspection_cache_ttl, self.introspection_negative_cache_ttl)

    def jwks_uri_fallbacks_for(self, issuer: str) -> tuple[str, ...]:
        """The other locations of ``issuer``'s key set (``JWKS_URI_FALLBACKS``)."""
        return self.jwks_uri_fallbacks.get(issuer, ())


class UnknownSettingWarning(UserWarning):
    """An ``OAUTH_VERIFY_`` key that is no setting (a typo, most likely), or
    a key that looks like a setting with a misspelled prefix
    (``OAUTH_VERFY_AUDIENCE``, ``oauth_verify_audience``).

    Issued with :mod:`warnings` as well as logged, so that it shows in an app
    that has not configured logging; filter it (``warnings.filterwarnings(
    "ignore", category=UnknownSettingWarning)``) if you keep keys of your
    own under the prefix.
    """


def _warn_unknown(given: Mapping[str, Any]) -> None:
    """Warn about every ``OAUTH_VERIFY_`` key this package does not read: a
    mistyped key (``REQUIRED_CLAIM_VALUE``) is otherwise silently ignored,
    and the check it meant to turn on stays off. A warning, not an error:
    an app may keep its own keys under the prefix."""
    for name in sorted(set(given) - KNOWN_KEYS):
        close = difflib.get_close_matches(name, KNOWN_KEYS, n=1)
        hint = f"; did you mean {_key(close[0])}?" if close else ""
        message = f"{_key(name)} is not a setting of flask_oauth_verify and is ignored{hint}"
        logger.warning("%s", message)
        warnings.warn(message, UnknownSettingWarning, stacklevel=4)


def _squashed(name: str) -> str:
    """``name`` upper-cased, letters and digits only: how its spellings compare."""
    return re.sub(r"[^A-Z0-9]", "", name.upper())


#: ``(REQUIREDCLAIMVALUES, REQUIRED_CLAIM_VALUES)``..., longest first, for
#: :func:`_warn_misspelled_prefix`.
_SQUASHED_KEYS = sorted(
    ((_squashed(name), name) for name in KNOWN_KEYS), key=lambda pair: -len(pair[0])
)
_SQUASHED_PREFIX = _squashed(PREFIX)
#: How alike (:class:`difflib.SequenceMatcher` ratio) what precedes a
#: setting's name must be to ``OAUTHVERIFY``: ``OAUTHVERFY`` and
#: ``OAUTHVERIFIY`` are (0.95); ``OAUTH`` (``OAUTH_AUDIENCE``, another
#: library's key) is not (0.62).
_PREFIX_TYPO_CUTOFF = 0.8


def _warn_misspelled_prefix(config: Mapping[str, Any]) -> None:
    """Warn about every key of ``config`` that looks like a setting whose
    ``OAUTH_VERIFY_`` prefix is misspelled (``OAUTH_VERFY_AUDIENCE``,
    ``OAUTHVERIFY_AUDIENCE``, ``oauth_verify_audience``): it is not read at
    all, and the check it meant to turn on stays off. A key is compared
    upper-cased and without separators: it must end with a setting's name
    exactly, after something close to ``OAUTHVERIFY``; another library's
    key (``OAUTH_AUDIENCE``, ``JWT_DECODE_LEEWAY``) never is."""
    for key in sorted(k for k in config if isinstance(k, str) and not k.startswith(PREFIX)):
        meant = _misspelled_prefix_of(_squashed(key))
        if meant is None:
            continue
        message = (
            f"{key!r} is not read by flask_oauth_verify, whose settings start with exactly "
            f"{PREFIX!r}: did you mean {meant}?"
        )
        logger.warning("%s", message)
        warnings.warn(message, UnknownSettingWarning, stacklevel=4)


def _misspelled_prefix_of(squashed: str) -> str | None:
    """The setting that ``squashed`` (a key, see :func:`_squashed`) names
    after something like ``OAUTHVERIFY``; ``None`` if it names none."""
    for tail, name in _SQUASHED_KEYS:
        head = squashed[: -len(tail)]
        if not head or not squashed.endswith(tail):
            continue
        alike = difflib.SequenceMatcher(None, head, _SQUASHED_PREFIX).ratio()
        if alike >= _PREFIX_TYPO_CUTOFF:
            return _key(name)
    return None


def _typo_hint(given: Mapping[str, Any], name: str) -> str:
    """`` (OAUTH_VERIFY_AUDIANCE is set: did you mean this key?)`` for a missing key."""
    unknown = sorted(set(given) - KNOWN_KEYS)
    close = difflib.get_close_matches(name, unknown, n=1)
    return f" ({_key(close[0])} is set: a typo of this key?)" if close else ""


#: The default of each field that has one: a key's default is written once,
#: as its field's default in :class:`Settings`, and read from here.
_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        field.name: field.default
        for field in dataclasses.fields(Settings)
        if field.default is not dataclasses.MISSING
    }
)


def _given(v: Mapping[str, Any], name: str) -> Any:
    """Key ``name`` as given, else the default of its field (``name`` in
    lower case); a key set to ``None`` is given (and refused where ``None``
    is no value)."""
    return v.get(name, _DEFAULTS[name.lower()])


def _number(v: Mapping[str, Any], name: str, **limits: Any) -> float:
    """A number key, its default from its field; see :func:`_as_number`."""
    return _as_number(_given(v, name), name, **limits)


def _flag(v: Mapping[str, Any], name: str) -> bool:
    """A yes/no key, its default from its field; see :func:`as_bool`."""
    return as_bool(_given(v, name), name)


def _build(v: Mapping[str, Any]) -> Settings:
    """Validate the keys group by group (each group reports its own errors,
    naming the key) and make the :class:`Settings`."""
    allow_http = _flag(v, "ALLOW_INSECURE_HTTP")
    tokens = _token_fields(v, allow_http)
    keys = _key_fields(v, tokens["issuers"], allow_http)
    return Settings(
        **tokens,
        **keys,
        **_introspection_fields(v, allow_http),
        **_claim_fields(v, tokens["issuers"], keys),
        **_operations_fields(v),
        **_network_fields(v, allow_http),
        raw=MappingProxyType(dict(v)),
    )


def _issuers(v: Mapping[str, Any]) -> tuple[str, ...]:
    """``ISSUER``: required (its URLs are checked by :func:`_check_issuers`)."""
    issuers = _as_tuple(v.get("ISSUER"), "ISSUER")
    if not issuers:
        raise ConfigurationError(
            f"{_key('ISSUER')} is required: the issuer URL(s) to trust, e.g. "
            f"'https://auth.example.com/'{_typo_hint(v, 'ISSUER')}."
        )
    return issuers


def _check_issuers(issuers: tuple[str, ...], allow_http: bool) -> None:
    """Each issuer is an http(s) URL without query or fragment."""
    for issuer in issuers:
        check_url(issuer, "ISSUER", allow_insecure_http=allow_http)
        if "?" in issuer or "#" in issuer:
            raise ConfigurationError(
                f"{_key('ISSUER')} {_shown_value(issuer, url=True)!r} has a query or "
                "fragment, which an issuer identifier never has (RFC 8414 §2, OpenID "
                "Connect Discovery §3)."
            )
        if "@" in urlsplit(issuer).netloc:
            raise ConfigurationError(
                f"{_key('ISSUER')} {_shown_value(issuer, url=True)!r} has a user name or password, "
                "which an issuer identifier never has (RFC 8414 §2)."
            )


def _audiences(v: Mapping[str, Any]) -> tuple[bool, tuple[str, ...]]:
    """``VERIFY_AUDIENCE`` and ``AUDIENCE`` (required unless the check is off)."""
    verify_audience = _given(v, "VERIFY_AUDIENCE")
    if not isinstance(verify_audience, bool):
        raise ConfigurationError(f"{_key('VERIFY_AUDIENCE')} must be True or False.")
    # "" (an empty environment variable) is no audience: required, unless turned off
    audiences = _as_tuple(v.get("AUDIENCE") or None, "AUDIENCE")
    if verify_audience and not audiences:
        raise ConfigurationError(
            f"{_key('AUDIENCE')} is required (the identifier of this API)"
            f"{_typo_hint(v, 'AUDIENCE')}. To turn the "
            f"audience check off, set {_key('VERIFY_AUDIENCE')} = False explicitly."
        )
    return verify_audience, audiences


def _token_locations(v: Mapping[str, Any]) -> tuple[str, ...]:
    locations = _as_tuple(_given(v, "TOKEN_LOCATIONS"), "TOKEN_LOCATIONS")
    if not locations or any(loc not in TOKEN_LOCATIONS for loc in locations):
        raise ConfigurationError(
            f"{_key('TOKEN_LOCATIONS')} must list some of {', '.join(TOKEN_LOCATIONS)}."
        )
    return locations


def _allowed_types(v: Mapping[str, Any]) -> tuple[str | None, ...]:
    """``ALLOWED_TYPES``, lower case (a ``typ`` is compared case-insensitively)."""
    types = _given(v, "ALLOWED_TYPES")
    if not isinstance(types, list | tuple) or not all(
        t is None or isinstance(t, str) for t in types
    ):
        raise ConfigurationError(f"{_key('ALLOWED_TYPES')} must list strings (or None).")
    return tuple(t.lower() if t else None for t in types)


def _token_fields(v: Mapping[str, Any], allow_http: bool) -> dict[str, Any]:
    """Token checks: who issues and receives a token, how it is signed, where
    it is found, and which claims and types it must (not) have."""
    issuers = _issuers(v)
    verify_audience, audiences = _audiences(v)
    algorithms = _algorithms(_given(v, "ALGORITHMS"))
    locations = _token_locations(v)
    _check_issuers(issuers, allow_http)
    required_values = v.get("REQUIRED_CLAIM_VALUES") or {}
    if not isinstance(required_values, Mapping):
        raise ConfigurationError(f"{_key('REQUIRED_CLAIM_VALUES')} must be a mapping.")
    allowed_types = _allowed_types(v)
    return {
        "issuers": issuers,
        "audiences": audiences,
        "verify_audience": verify_audience,
        "algorithms": algorithms,
        "leeway": _number(
            v,
            "LEEWAY",
            maximum=MAX_LEEWAY,
            unit=" seconds of clock skew",
            hint=" (a value in milliseconds?)",
        ),
        "allowed_types": allowed_types,
        "required_claims": _as_tuple(v.get("REQUIRED_CLAIMS"), "REQUIRED_CLAIMS"),
        "required_claim_values": MappingProxyType(dict(required_values)),
        "allowed_client_ids": _as_tuple(v.get("ALLOWED_CLIENT_IDS"), "ALLOWED_CLIENT_IDS"),
        "require_client_id": _flag(v, "REQUIRE_CLIENT_ID"),
        "refused_claims": _refused_claims(v.get("REFUSED_CLAIMS")),
        "max_token_bytes": int(_number(v, "MAX_TOKEN_BYTES", minimum=64)),
        "token_locations": locations,
        "realm": _realm(_given(v, "REALM")),
    }


def _key_fields(v: Mapping[str, Any], issuers: tuple[str, ...], allow_http: bool) -> dict[str, Any]:
    """Keys: where each issuer's key set comes from and how long it is kept."""
    static_jwks = _static_jwks(v.get("JWKS"))
    jwks_uris = _jwks_uris(v.get("JWKS_URI"), issuers, allow_http)
    fallbacks = _jwks_uri_fallbacks(v.get("JWKS_URI_FALLBACKS"), issuers, allow_http)
    cache_ttl = _number(v, "JWKS_CACHE_TTL", minimum=1)
    jwks_min_ttl, jwks_max_ttl = _ttl_bounds(v)
    return {
        "static_jwks": static_jwks,
        "jwks_uris": MappingProxyType(jwks_uris),
        "jwks_uri_fallbacks": MappingProxyType(fallbacks),
        "jwks_cache_ttl": cache_ttl,
        "jwks_min_ttl": jwks_min_ttl,
        "jwks_max_ttl": jwks_max_ttl,
        "jwks_refresh_cooldown": _number(v, "JWKS_REFRESH_COOLDOWN"),
        "jwks_max_staleness": _number(v, "JWKS_MAX_STALENESS"),
        "discovery_cache_ttl": _number(v, "DISCOVERY_CACHE_TTL", minimum=1),
        "prefetch_keys": _flag(v, "PREFETCH_KEYS"),
        "allowed_jku_hosts": _jku_hosts(v.get("ALLOWED_JKU_HOSTS")),
    }


def _network_fields(v: Mapping[str, Any], allow_http: bool) -> dict[str, Any]:
    """Network: how the issuer is fetched from (timeouts, sizes, circuit breaker)."""
    return {
        "http_timeout": _as_timeout(_given(v, "HTTP_TIMEOUT")),
        "http_max_bytes": int(_number(v, "HTTP_MAX_BYTES", minimum=1024)),
        "http_ca_bundle": _ca_bundle(v.get("HTTP_CA_BUNDLE")),
        "http_proxy": _proxy(v.get("HTTP_PROXY")),
        "allow_insecure_http": allow_http,
        "circuit_breaker_failures": int(_number(v, "CIRCUIT_BREAKER_FAILURES", minimum=1)),
        "circuit_breaker_reset": _number(v, "CIRCUIT_BREAKER_RESET"),
    }


def _ca_bundle(value: Any) -> str | None:
    """``HTTP_CA_BUNDLE``: a PEM file (or a directory prepared with
    ``c_rehash``) of the certificate authorities to trust instead of the
    default bundle, for an issuer behind a private CA."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not os.path.exists(value):
        raise ConfigurationError(
            f"{_key('HTTP_CA_BUNDLE')} must be the path of a PEM file or directory of "
            f"CA certificates that exists, not {value!r}."
        )
    return os.fspath(value)


def _proxy(value: Any) -> str | None:
    """``HTTP_PROXY``: the HTTP proxy every outgoing request goes through
    (``https`` URLs through a ``CONNECT`` tunnel, so TLS stays end to end)."""
    if value is None:
        return None
    parts = _url_parts(value)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # not the value: a proxy URL may carry a password
        raise ConfigurationError(
            f"{_key('HTTP_PROXY')} must be an http:// or https:// proxy URL "
            "(e.g. 'http://proxy.internal:3128')."
        )
    return str(value)


def _introspection_fields(v: Mapping[str, Any], allow_http: bool) -> dict[str, Any]:
    """Strategy and introspection: the endpoint, how to authenticate to it,
    what to send and how long to reuse an answer."""
    strategy = _given(v, "STRATEGY")
    if strategy not in STRATEGIES:
        raise ConfigurationError(
            f"{_key('STRATEGY')} must be one of {', '.join(STRATEGIES)}, not {strategy!r}."
        )
    auth = _given(v, "INTROSPECTION_AUTH")
    if auth not in INTROSPECTION_AUTH_METHODS:
        raise ConfigurationError(
            f"{_key('INTROSPECTION_AUTH')} must be one of {', '.join(INTROSPECTION_AUTH_METHODS)}."
        )
    body = _given(v, "INTROSPECTION_BODY")
    if body not in ("form", "json"):
        raise ConfigurationError(f"{_key('INTROSPECTION_BODY')} must be 'form' or 'json'.")
    endpoint = v.get("INTROSPECTION_ENDPOINT")
    if endpoint is not None:
        check_url(endpoint, "INTROSPECTION_ENDPOINT", allow_insecure_http=allow_http)
    _check_introspection_credentials(v, strategy, auth)
    return {
        "strategy": strategy,
        "introspection_endpoint": endpoint,
        "introspection_auth": auth,
        "introspection_body": body,
        "introspection_basic_encoding": _introspection_basic_encoding(v, auth),
        "introspection_client_id": _optional_text(v, "INTROSPECTION_CLIENT_ID"),
        "introspection_client_secret": _optional_text(v, "INTROSPECTION_CLIENT_SECRET"),
        "introspection_token": _optional_text(v, "INTROSPECTION_TOKEN"),
        "introspection_require_audience": _flag(v, "INTROSPECTION_REQUIRE_AUDIENCE"),
        "introspection_cache_ttl": _number(v, "INTROSPECTION_CACHE_TTL"),
        "introspection_negative_cache_ttl": _number(v, "INTROSPECTION_NEGATIVE_CACHE_TTL"),
    }


def _claim_fields(
    v: Mapping[str, Any], issuers: tuple[str, ...], keys: Mapping[str, Any]
) -> dict[str, Any]:
    """Tenancy and claims: how claims map to the context, templated issuers'
    tenants, claims bound to the issuer, and the columns tenancy scopes on."""
    user_rule = v.get("USER_ID_RULE")
    if user_rule is not None and not callable(user_rule):
        raise ConfigurationError(f"{_key('USER_ID_RULE')} must be a callable(claims) -> bool.")
    tenants, placeholder_claims = _issuer_templates(
        v, issuers, keys["jwks_uris"], keys["static_jwks"]
    )
    return {
        "claim_map": _claim_map(v.get("CLAIM_MAP")),
        "user_id_prefix": _user_id_prefix(v.get("USER_ID_PREFIX")),
        "user_id_rule": user_rule,
        "no_organization_values": frozenset(
            _as_tuple(v.get("NO_ORGANIZATION_VALUES"), "NO_ORGANIZATION_VALUES")
        ),
        "allowed_tenants": tenants,
        "issuer_placeholder_claims": MappingProxyType(placeholder_claims),
        "issuer_claims": MappingProxyType(_issuer_claims(v.get("ISSUER_CLAIMS"))),
        "organization_column": _column(_given(v, "ORGANIZATION_COLUMN"), "ORGANIZATION_COLUMN"),
        "user_column": _column(_given(v, "USER_COLUMN"), "USER_COLUMN"),
    }


def _operations_fields(v: Mapping[str, Any]) -> dict[str, Any]:
    """Operations: provider, token cache, headers, metrics and health check."""
    health = route_setting(v.get("HEALTH_ROUTE"), "HEALTH_ROUTE", "/health/token-validation")
    metrics = _flag(v, "METRICS")
    # Read by the health checker, which is made on first use: checked here so
    # that a wrong value fails at start-up, not in a request (a 500).
    require_cache = _flag(v, "HEALTH_REQUIRE_CACHE")
    probe_interval = _number(v, "HEALTH_PROBE_INTERVAL")
    # "off" or "" (from the environment) is no route, as documented
    metrics_route = route_setting(v.get("METRICS_ENDPOINT"), "METRICS_ENDPOINT", "/metrics")
    if metrics_route is not None and not metrics:
        raise ConfigurationError(
            f"{_key('METRICS_ENDPOINT')} is set but {_key('METRICS')} is not: set "
            f"{_key('METRICS')} = True to record and serve metrics."
        )
    if metrics_route is not None and metrics_route == health:
        raise ConfigurationError(
            f"{_key('METRICS_ENDPOINT')} and {_key('HEALTH_ROUTE')} are both {metrics_route!r}: "
            "one route would hide the other; give each its own path."
        )
    return {
        "token_cache_size": int(_number(v, "TOKEN_CACHE_SIZE")),
        "provider": str(_given(v, "PROVIDER")),
        "provider_params": MappingProxyType(dict(v.get("PROVIDER_PARAMS") or {})),
        "security_headers": _flag(v, "SECURITY_HEADERS"),
        "metrics": metrics,
        "metrics_client_id_label": _flag(v, "METRICS_CLIENT_ID_LABEL"),
        "metrics_endpoint": metrics_route,
        # the registry and the development issuer are checked at init_app,
        # the registry only when METRICS is on (as they always were)
        "metrics_registry": v.get("METRICS_REGISTRY"),
        "health_route": health,
        "health_require_cache": require_cache,
        "health_probe_interval": probe_interval,
        "dev_issuer": v.get("DEV_ISSUER"),
    }


def _refused_claims(value: Any) -> tuple[str, ...]:
    """``REFUSED_CLAIMS``: ``None`` is the key left unset (the default), as
    for the other keys; only ``[]`` turns the check off."""
    if value is None:
        return DEFAULT_REFUSED_CLAIMS
    return _as_tuple(value, "REFUSED_CLAIMS")


def _optional_text(v: Mapping[str, Any], name: str) -> str | None:
    """A credential or identifier sent to the issuer: text, or ``None``."""
    value = v.get(name)
    if value is not None and not isinstance(value, str):
        # never echo the value: it may be a secret
        raise ConfigurationError(f"{_key(name)} must be a string.")
    return value


def _column(value: Any, name: str) -> str:
    """``ORGANIZATION_COLUMN`` / ``USER_COLUMN``: a column name (``str(None)``
    would have scoped every query on a column called ``None``)."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{_key(name)} must be a column name, not {value!r}.")
    return value


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _jku_hosts(value: Any) -> tuple[str, ...]:
    """``ALLOWED_JKU_HOSTS``: host names, compared exactly with a ``jku``'s
    host; a URL or ``host:port`` could never match, leaving the profile's
    every token refused."""
    hosts = _as_tuple(value, "ALLOWED_JKU_HOSTS")
    for host in hosts:
        if not (_is_ip(host) or _HOST.fullmatch(host)):
            raise ConfigurationError(
                f"{_key('ALLOWED_JKU_HOSTS')} must list host names (keys.example.com), "
                f"not {host!r}."
            )
    return hosts


def _realm(value: Any) -> str:
    """``REALM``: it goes into every ``WWW-Authenticate`` header, which must
    encode as Latin-1; printable ASCII keeps it readable everywhere."""
    if not isinstance(value, str) or not value or not all(" " <= c <= "~" for c in value):
        raise ConfigurationError(
            f"{_key('REALM')} must be a non-empty string of printable ASCII characters."
        )
    return value


def route_setting(value: Any, name: str, default: str) -> str | None:
    """A route setting: a path starting with ``/``, ``True`` for ``default``,
    ``None`` or ``False`` for no route; as text from the environment, the
    yes/no spellings mean the same (``"off"`` or ``""`` is no route).

    :param name: the key without its prefix, for the error.
    :raises ConfigurationError: for any other value (Flask would refuse a
        rule without the leading ``/`` with an error naming no key).
    """
    if isinstance(value, str) and not value.startswith("/"):
        spelling = value.strip().lower()
        value = True if spelling in _TRUE else None if spelling in _FALSE else value
    if value is None or value is False:
        return None
    if value is True:
        return default
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigurationError(f"{_key(name)} must be a path starting with '/' (or True).")
    if "<" in value or ">" in value:  # a rule variable: the view would get an argument, a 500
        raise ConfigurationError(f"{_key(name)} must be a fixed path, without a <variable> part.")
    return value


#: The spellings of a yes/no setting read from the environment as text.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def as_bool(value: Any, name: str) -> bool:
    """A yes/no setting: ``True``/``False``, 0/1, or their usual spellings as
    text (``"false"``, ``"0"``, ``"no"``, ``"off"``, ...), never Python's
    truthiness (``bool("false")`` is ``True``).

    :param name: the key without its prefix, for the error.
    :raises ConfigurationError: for any other value.
    """
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigurationError(f"{_key(name)} must be True or False, not {value!r}.")


def _user_id_prefix(value: Any) -> str | tuple[str, ...] | None:
    """``USER_ID_PREFIX``: one prefix, or a list of them (any one marks a user)."""
    prefixes = _as_tuple(value or None, "USER_ID_PREFIX")
    if not prefixes:  # None, "" or []: the generic rule
        return None
    return prefixes[0] if len(prefixes) == 1 else prefixes


def _algorithms(value: Any) -> tuple[str, ...]:
    algorithms = _as_tuple(value, "ALGORITHMS")
    if not algorithms:
        raise ConfigurationError(f"{_key('ALGORITHMS')} must name at least one algorithm.")
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigurationError(f"{_key('ALGORITHMS')} must never contain 'none'.")
        if alg in HMAC_ALGORITHMS:
            raise ConfigurationError(
                f"{_key('ALGORITHMS')} contains {alg}: HMAC algorithms cannot be verified "
                "with a public key set (JWKS); they are refused."
            )
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ConfigurationError(f"{_key('ALGORITHMS')} contains unsupported {alg!r}.")
    return algorithms


def _is_jwk_set(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("keys"), list)


def _static_jwks(value: Any) -> Mapping[str, Any] | None:
    """``JWKS``: one JWK Set, or a mapping ``{issuer: JWK Set}`` for several issuers."""
    if value is None:
        return None
    if _is_jwk_set(value) or (
        isinstance(value, Mapping) and value and all(_is_jwk_set(s) for s in value.values())
    ):
        jwks: Mapping[str, Any] = value
        return jwks
    raise ConfigurationError(
        f"{_key('JWKS')} must be a JWK Set {{'keys': [...]}} or a mapping "
        "{issuer: {'keys': [...]}}."
    )


def _refuse_pinned_and_fetched_keys(given: Mapping[str, Any], settings: Settings) -> None:
    """An issuer whose key set the app both gives (``JWKS``) and locates.

    ``JWKS`` wins, so the app's ``JWKS_URI`` would be ignored without a word
    (a profile's URL is not the app's: pinning its keys is fine).
    """
    static = settings.static_jwks
    if static is None:
        return
    pinned = set(settings.issuers) if _is_jwk_set(static) else set(static)
    for name in ("JWKS_URI", "JWKS_URI_FALLBACKS"):
        value = given.get(name)
        if not value:
            continue
        if isinstance(value, Mapping):  # an empty entry turns a profile's value off
            located = {issuer for issuer, where in value.items() if where}
        else:
            located = {settings.issuers[0]}
        both = sorted(pinned & located)
        if both:
            raise ConfigurationError(
                f"{_key('JWKS')} and {_key(name)} both give the key set of "
                f"{', '.join(_shown_value(i, url=True) for i in both)}; the static set would "
                f"be used and {_key(name)} ignored: set one of them."
            )


def _jwks_uri_fallbacks(
    value: Any, issuers: tuple[str, ...], allow_http: bool
) -> dict[str, tuple[str, ...]]:
    """Per issuer: a key set is never looked for at another issuer's URLs."""
    name = "JWKS_URI_FALLBACKS"
    if value is None or (isinstance(value, list | tuple) and not value):
        return {}  # none: also how an app turns a profile's fallbacks off
    if not isinstance(value, Mapping):
        if len(issuers) > 1:
            raise ConfigurationError(
                f"{_key(name)} is one list but {_key('ISSUER')} lists several issuers; "
                "give a mapping {issuer: [url, ...]}."
            )
        value = {issuers[0]: value} if issuers else {}
    unknown = [iss for iss in value if iss not in issuers]
    if unknown:
        raise ConfigurationError(
            f"{_key(name)} names issuers not in {_key('ISSUER')}: "
            f"{_shown_value(unknown, url=True)}."
        )
    return {
        iss: tuple(
            check_url(uri, name, allow_insecure_http=allow_http) for uri in _as_tuple(uris, name)
        )
        for iss, uris in value.items()
    }


def _jwks_uris(value: Any, issuers: tuple[str, ...], allow_http: bool) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        if len(issuers) > 1:
            raise ConfigurationError(
                f"{_key('JWKS_URI')} is one URL but {_key('ISSUER')} lists several issuers; "
                "give a mapping {issuer: jwks_uri} or let discovery find each."
            )
        return {issuers[0]: check_url(value, "JWKS_URI", allow_insecure_http=allow_http)}
    if isinstance(value, Mapping):
        unknown = [iss for iss in value if iss not in issuers]
        if unknown:
            raise ConfigurationError(
                f"{_key('JWKS_URI')} names issuers not in {_key('ISSUER')}: "
                f"{_shown_value(unknown, url=True)}."
            )
        return {
            iss: check_url(uri, "JWKS_URI", allow_insecure_http=allow_http)
            for iss, uri in value.items()
        }
    raise ConfigurationError(f"{_key('JWKS_URI')} must be a URL or a mapping issuer -> URL.")


def _issuer_templates(
    v: Mapping[str, Any],
    issuers: tuple[str, ...],
    jwks_uris: Mapping[str, str],
    static_jwks: Any,
) -> tuple[tuple[str, ...] | None, dict[str, str]]:
    """Validate templated issuers; return (allowed tenants, placeholder claims)."""
    from .issuers import compile_template, is_segment, is_template

    claims = v.get("ISSUER_PLACEHOLDER_CLAIMS") or {}
    if not isinstance(claims, Mapping) or not all(
        isinstance(k, str) and isinstance(c, str) and c for k, c in claims.items()
    ):
        raise ConfigurationError(
            f"{_key('ISSUER_PLACEHOLDER_CLAIMS')} must map placeholder names to claim names."
        )
    raw = v.get("ALLOWED_TENANTS")
    tenants = None if raw is None or raw == "*" else _as_tuple(raw, "ALLOWED_TENANTS")
    for uri in jwks_uris.values():
        if is_template(uri):
            raise ConfigurationError(
                f"{_key('JWKS_URI')} must not hold placeholders: {_shown_value(uri, url=True)!r}."
            )
    templates = [compile_template(i) for i in issuers if is_template(i)]
    for template in templates:
        if static_jwks is None and template.template not in jwks_uris:
            raise ConfigurationError(
                f"{_key('ISSUER')} template {_shown_value(template.template, url=True)!r} needs "
                f"{_key('JWKS_URI')} "
                "(the key set shared by every tenant); discovery cannot be used for a template."
            )
    if templates and raw is None:
        raise ConfigurationError(
            f"A templated {_key('ISSUER')} needs {_key('ALLOWED_TENANTS')}: a list of the "
            "tenant ids to accept, or '*' to accept a token of any tenant."
        )
    for tenant in (tenants or ()) if templates else ():
        # An entry no iss can hold (["*"], "a,b" from the environment, a
        # '/') matched no token: every token was refused without a word.
        if not is_segment(tenant):
            raise ConfigurationError(
                f"{_key('ALLOWED_TENANTS')} entry {tenant[:64]!r} can never match a tenant: "
                "each entry is one path segment of letters, digits and '-._~' "
                "(to accept every tenant, write '*' alone, not in a list)."
            )
    return tenants, dict(claims)


def _issuer_claims(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ConfigurationError(f"{_key('ISSUER_CLAIMS')} must map claim names to values.")
    return {k: v for k, v in value.items() if v is not None}


def _introspection_basic_encoding(v: Mapping[str, Any], auth: str) -> str:
    """``INTROSPECTION_BASIC_ENCODING``: ``"form"`` or ``"raw"``.

    Raw HTTP Basic credentials are ``<id>:<secret>`` as they are (RFC 7617
    §2): the first ``:`` ends the user-id, so a client id holding one cannot
    be sent raw (the server would read another id and secret). Refused here,
    when HTTP Basic is the method, rather than failing every introspection.
    """
    encoding = v.get("INTROSPECTION_BASIC_ENCODING", "form")
    if encoding not in INTROSPECTION_BASIC_ENCODINGS:
        raise ConfigurationError(
            f"{_key('INTROSPECTION_BASIC_ENCODING')} must be 'form' (RFC 6749 §2.3.1) "
            f"or 'raw', not {encoding!r}."
        )
    client_id = v.get("INTROSPECTION_CLIENT_ID")
    if (
        encoding == "raw"
        and auth == "client_secret_basic"
        and isinstance(client_id, str)
        and ":" in client_id
    ):
        raise ConfigurationError(
            f"{_key('INTROSPECTION_BASIC_ENCODING')} = 'raw' cannot send "
            f"{_key('INTROSPECTION_CLIENT_ID')}: it holds a ':', which ends the user-id of "
            "raw HTTP Basic credentials (RFC 7617 §2). Use 'form' if the server decodes "
            f"form-encoded credentials, or {_key('INTROSPECTION_AUTH')} = 'client_secret_post'."
        )
    return str(encoding)


def _check_introspection_credentials(v: Mapping[str, Any], strategy: str, auth: str) -> None:
    if strategy not in ("introspection", "auto", "both"):
        return
    if auth in ("client_secret_basic", "client_secret_post"):
        if not v.get("INTROSPECTION_CLIENT_ID") or not v.get("INTROSPECTION_CLIENT_SECRET"):
            raise ConfigurationError(
                f"{_key('STRATEGY')} = {strategy!r} with {_key('INTROSPECTION_AUTH')} = {auth!r} "
                f"needs {_key('INTROSPECTION_CLIENT_ID')} and "
                f"{_key('INTROSPECTION_CLIENT_SECRET')}."
            )
    elif auth == "bearer" and not v.get("INTROSPECTION_TOKEN"):
        raise ConfigurationError(
            f"{_key('INTROSPECTION_AUTH')} = 'bearer' needs {_key('INTROSPECTION_TOKEN')}."
        )
