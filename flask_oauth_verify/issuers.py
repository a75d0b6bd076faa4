"""Configured issuers, exact or templated (pure code, no I/O).

An ``OAUTH_VERIFY_ISSUER`` entry is either an exact issuer identifier or a
*template* with ``{name}`` placeholders in its path, for multi-tenant
authorization servers whose ``iss`` names the tenant::

    https://login.microsoftonline.com/{tenantid}/v2.0   (Entra ID v2)
    https://sts.windows.net/{tenantid}/                 (Entra ID v1)

A token's ``iss`` matches a template only when it matches it as a whole,
each placeholder standing for exactly one path segment made of RFC 3986
*unreserved* characters (no ``/``, no percent-encoding, never ``.`` or
``..``). Each placeholder value must then equal the token's claim of the same
name (or the claim named in ``OAUTH_VERIFY_ISSUER_PLACEHOLDER_CLAIMS``, e.g.
``tenantid`` -> ``tid``), and be in ``OAUTH_VERIFY_ALLOWED_TENANTS`` unless
that is ``"*"``. The template itself, not the concrete issuer, names the key
source: every tenant shares one JWK Set, and the number of key sources stays
the number of configured issuers whatever tokens arrive.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .claims import claim_path
from .config import ConfigurationError
from .errors import InvalidTokenError

__all__ = ["IssuerMatcher", "IssuerTemplate", "compile_template", "is_segment", "is_template"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: One path segment of RFC 3986 unreserved characters.
_SEGMENT = r"[A-Za-z0-9._~-]+"


def is_segment(value: str) -> bool:
    """Whether ``value`` can stand for a placeholder (so be an allowed tenant)."""
    return value not in (".", "..") and re.fullmatch(_SEGMENT, value) is not None


def is_template(issuer: str) -> bool:
    """Whether ``issuer`` is a template (holds a ``{`` or ``}``)."""
    return "{" in issuer or "}" in issuer


@dataclasses.dataclass(frozen=True, slots=True)
class IssuerTemplate:
    """A compiled issuer template.

    :param template: the configured text, e.g. ``https://h/{tenantid}/v2.0``.
    :param placeholders: the placeholder names, in order.
    :param pattern: the compiled full-match pattern.
    """

    template: str
    placeholders: tuple[str, ...]
    pattern: re.Pattern[str]

    def match(self, issuer: str) -> dict[str, str] | None:
        """The placeholder values if ``issuer`` matches the whole template."""
        found = self.pattern.fullmatch(issuer)
        if found is None:
            return None
        values = found.groupdict()
        if any(value in (".", "..") for value in values.values()):
            return None
        return values


def compile_template(template: str) -> IssuerTemplate:
    """Compile an issuer template (placeholders only in the URL path).

    :param template: the ``OAUTH_VERIFY_ISSUER`` entry.
    :raises ConfigurationError: when a placeholder is outside the path, is
        repeated, is not a whole path segment, or a brace is unbalanced.
    """
    parts = urlsplit(template)
    for where, text in (
        ("host", parts.netloc),
        ("query", parts.query),
        ("fragment", parts.fragment),
    ):
        if is_template(text):
            raise ConfigurationError(
                f"OAUTH_VERIFY_ISSUER template {template!r} has a placeholder in its {where}; "
                "placeholders may only stand for path segments."
            )
    names = _PLACEHOLDER.findall(template)
    if not names or is_template(_PLACEHOLDER.sub("", template)):
        raise ConfigurationError(
            f"OAUTH_VERIFY_ISSUER template {template!r} must use {{name}} placeholders "
            "with balanced braces."
        )
    if len(set(names)) != len(names):
        raise ConfigurationError(
            f"OAUTH_VERIFY_ISSUER template {template!r} repeats a placeholder."
        )
    pieces: list[str] = []
    position = 0
    for found in _PLACEHOLDER.finditer(template):
        before = template[position : found.start()]
        after = template[found.end() : found.end() + 1]
        if not before.endswith("/") or after not in ("", "/"):
            raise ConfigurationError(
                f"OAUTH_VERIFY_ISSUER template {template!r}: a placeholder must be a whole "
                "path segment (between slashes)."
            )
        pieces.append(re.escape(before))
        pieces.append(f"(?P<{found.group(1)}>{_SEGMENT})")
        position = found.end()
    pieces.append(re.escape(template[position:]))
    return IssuerTemplate(template, tuple(names), re.compile("".join(pieces)))


def _invalid(reason: str) -> InvalidTokenError:
    return InvalidTokenError(reason=reason)


class IssuerMatcher:
    """Maps a token's ``iss`` to the configured issuer it belongs to.

    :param issuers: ``OAUTH_VERIFY_ISSUER`` (exact identifiers and templates).
    :param placeholder_claims: placeholder name -> claim path, for
        placeholders whose claim has another name (``tenantid`` -> ``tid``).
    :param allowed_tenants: the accepted placeholder values; ``None``
        accepts any tenant.
    :param bound_claims: ``OAUTH_VERIFY_ISSUER_CLAIMS``, claims bound to the
        issuer (Beyond Identity ``bi_t``/``bi_r``): a JWT must carry each with
        exactly this value; an introspection answer, which comes from the
        issuer's own endpoint, is checked for those it carries.
    """

    def __init__(
        self,
        issuers: Iterable[str],
        placeholder_claims: Mapping[str, str] | None = None,
        allowed_tenants: Iterable[str] | None = None,
        bound_claims: Mapping[str, Any] | None = None,
    ) -> None:
        issuers = tuple(issuers)
        self._bound = tuple((bound_claims or {}).items())
        self.exact = frozenset(i for i in issuers if not is_template(i))
        self.templates = tuple(compile_template(i) for i in issuers if is_template(i))
        self._template_names = frozenset(t.template for t in self.templates)
        self._claims = dict(placeholder_claims or {})
        self._allowed = None if allowed_tenants is None else frozenset(allowed_tenants)

    def _allowed_values(self, values: Mapping[str, str]) -> bool:
        return self._allowed is None or all(v in self._allowed for v in values.values())

    def configured(self, issuer: str) -> str | None:
        """The configured issuer (or template) ``issuer`` belongs to, if any.

        Does not look at claims; used to map a verified token's ``iss`` (or
        a configured template itself) to its key source.
        """
        if issuer in self.exact or issuer in self._template_names:
            return issuer
        for template in self.templates:
            values = template.match(issuer)
            if values is not None and self._allowed_values(values):
                return template.template
        return None

    def check(self, payload: Mapping[str, Any], *, answer: bool = False) -> str:
        """The configured issuer of ``payload`` after every issuer rule.

        :param answer: ``payload`` is an introspection answer, not a JWT
            (issuer-bound claims it omits are not required).
        :returns: the exact issuer, or the template the ``iss`` matched.
        :raises InvalidTokenError: when ``iss`` is missing, not configured,
            names a tenant other than its tenant claim, or a tenant that is
            not allowed, or an issuer-bound claim differs.
        """
        configured = self._match(payload)
        for claim, expected in self._bound:
            value = claim_path(payload, claim)
            if value is None and answer:
                continue
            if type(value) is not type(expected) or value != expected:
                raise _invalid(f"claim {claim!r} does not name this issuer's tenant/realm")
        return configured

    def _match(self, payload: Mapping[str, Any]) -> str:
        issuer = payload.get("iss")
        if not isinstance(issuer, str):
            raise _invalid("iss is missing or not a string")
        if issuer in self.exact:
            return issuer
        for template in self.templates:
            values = template.match(issuer)
            if values is None:
                continue
            for name, value in values.items():
                claim = self._claims.get(name, name)
                if claim_path(payload, claim) != value:
                    raise _invalid(f"iss placeholder {name!r} differs from claim {claim!r}")
            if not self._allowed_values(values):
                raise _invalid("iss names a tenant that is not allowed")
            return template.template
        raise _invalid("iss is not a configured issuer")
