"""flask_oauth_verify: make a Flask API a correct, fast OAuth 2.0 resource server.

Public names; see the documentation for the full contract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ConfigurationError, Settings
from .context import AuthContext, current_auth, get_auth
from .decorators import (
    require_organization,
    require_scope,
    require_token,
    require_user,
    verify_request,
)
from .errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    MissingContextError,
    MissingOrganizationContext,
    MissingTokenError,
    MissingUserContext,
    OAuthVerifyError,
    TokenExpired,
    TokenNotActive,
    UpstreamError,
)
from .extension import OAuthVerify

if TYPE_CHECKING:  # imported lazily at run time: SQLAlchemy is optional
    from .tenancy import org_scoped, user_scoped

__version__ = "0.1.0"

# A library never configures logging; the application decides where records go.
logging.getLogger("flask_oauth_verify").addHandler(logging.NullHandler())

__all__ = [
    "AuthContext",
    "ConfigurationError",
    "InsufficientScopeError",
    "InvalidRequestError",
    "InvalidTokenError",
    "MissingContextError",
    "MissingOrganizationContext",
    "MissingTokenError",
    "MissingUserContext",
    "OAuthVerify",
    "OAuthVerifyError",
    "Settings",
    "TokenExpired",
    "TokenNotActive",
    "UpstreamError",
    "current_auth",
    "get_auth",
    "org_scoped",
    "require_organization",
    "require_scope",
    "require_token",
    "require_user",
    "user_scoped",
    "verify_request",
]


def __getattr__(name: str) -> object:
    # SQLAlchemy is an optional extra: import the scoping helpers on first use.
    if name in ("org_scoped", "user_scoped"):
        try:
            from . import tenancy
        except ImportError as missing:  # `import *` must work without the extra
            return _needs_sqlalchemy(name, missing)
        return getattr(tenancy, name)
    raise AttributeError(f"module 'flask_oauth_verify' has no attribute {name!r}")


def _needs_sqlalchemy(name: str, missing: ImportError) -> Callable[..., Any]:
    """A stand-in for a scoping helper when SQLAlchemy is not installed: it
    raises, when called, an ``ImportError`` naming the extra to install."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            f"{name}() needs SQLAlchemy 2.1 or later "
            f"(pip install 'flask-oauth-verify[sqlalchemy]'): {missing}"
        ) from missing

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable
