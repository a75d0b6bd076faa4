"""The exceptions of tenant scoping, public in :mod:`flask_oauth_verify.tenancy`.

Every part of tenant scoping raises them, so they live below all of them.
Each class keeps ``flask_oauth_verify.tenancy``, the module that exports
it, as its ``__module__``: the name tracebacks, logs
(:func:`~flask_oauth_verify.errors.withheld_exc_info` groups by it) and
pickles have always carried. This module imports no SQLAlchemy.
"""

from __future__ import annotations

from typing import ClassVar

from .errors import OAuthVerifyError

#: Where the classes of this module are public.
_PUBLIC_MODULE = "flask_oauth_verify.tenancy"


class TenantContextError(RuntimeError):
    """Tenant-scoped data was used outside a request with no organization.

    Inside a request the same situation is the 401
    :class:`~flask_oauth_verify.errors.MissingOrganizationContext` (or
    ``MissingUserContext``) response. Outside one, wrap the code in
    :func:`as_organization`.
    """

    __module__ = _PUBLIC_MODULE


class TenantScopingError(RuntimeError):
    """A statement or setup that tenant scoping cannot make safe.

    Raised instead of running the statement unscoped: a Core statement on a
    tenant table, an ``INSERT … FROM SELECT`` or upsert into one, a column
    that does not exist, a mismatched configuration.
    """

    __module__ = _PUBLIC_MODULE


class CrossTenantWriteError(OAuthVerifyError):
    """A write would insert, change or delete a row of another organization.

    Raised before anything reaches the database; inside a request it becomes
    a 403 JSON response (``"error": "cross_tenant_write"``) when the flush
    runs in the view or a ``before_request`` function. Flask hands errors of
    ``after_request`` and teardown functions to no error handler: a commit
    refused there is a 500 (nothing is written). Commit in the view.
    """

    __module__ = _PUBLIC_MODULE
    code = 403
    error: ClassVar[str] = "cross_tenant_write"
    challenge_error: ClassVar[str | None] = None
    default_description: ClassVar[str] = "The request would write another organization's data."
