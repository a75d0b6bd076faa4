"""PostgreSQL row-level security: let the database enforce tenant scoping too.

Automatic scoping (:mod:`flask_oauth_verify.tenancy`) sees ORM statements
only. Row-level security (RLS) closes the rest — ``text()``, Core
statements, a forgotten session — inside PostgreSQL itself: each
transaction carries the current organization in a transaction-local setting
(``SELECT set_config('app.current_organization', …, true)``, the function
form of ``SET LOCAL``), and a policy on each tenant table compares the row's
organization column with it::

    CREATE POLICY tenant_isolation ON projects
      USING (organization_id = NULLIF(current_setting('app.current_organization', true), ''))
      WITH CHECK (organization_id = NULLIF(current_setting('app.current_organization', true), ''));

The value comes from the same place as automatic scoping: an active
:func:`~flask_oauth_verify.tenancy.as_organization` block, else the verified
``g.auth.organization_id``. With neither, the setting is the empty string,
which matches no row: the database fails closed too.

Superusers and roles with ``BYPASSRLS`` are never subject to policies, and a
table's owner only with ``FORCE ROW LEVEL SECURITY``: connect the
application as an ordinary role.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

from sqlalchemy import event, func, literal_column, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from .errors import MissingContextError
from .tenancy import (
    TenantContextError,
    TenantScopingError,
    _event_target,
    _identity,
    current_organization_id,
)

__all__ = [
    "DEFAULT_SETTING",
    "RowLevelSecurity",
    "enable_row_level_security",
    "policy_statements",
    "set_rls_organization",
]

#: The PostgreSQL setting that carries the organization.
DEFAULT_SETTING = "app.current_organization"

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_SQL_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*$")
#: ``connection.info`` key: the organization set, and the Core transaction it
#: was set in (weakly).
_INFO_KEY = "oauth_verify_rls_organization"
_ENABLED_LOCK = threading.RLock()


def _check_setting(setting: str) -> str:
    # custom settings need a dotted name; it is also put into policy SQL
    if not isinstance(setting, str) or not _SETTING_NAME.match(setting):
        raise ValueError(f"{setting!r} is not a custom PostgreSQL setting name like 'app.x'.")
    return setting


def _current_or_empty() -> str:
    try:
        return current_organization_id()
    except (MissingContextError, TenantContextError):
        return ""  # matches no row: the database refuses too


def set_rls_organization(
    connection: Any, organization_id: str | None = None, *, setting: str = DEFAULT_SETTING
) -> str:
    """Set ``setting`` for the current transaction only (``SET LOCAL``).

    Runs ``SELECT set_config(setting, value, true)``: the value is a bound
    parameter, never spliced into SQL, and PostgreSQL drops it at ``COMMIT``
    or ``ROLLBACK``, so a pooled connection never carries it to the next
    transaction. Use it on a Core ``Connection`` inside ``engine.begin()``.

    :param connection: a SQLAlchemy ``Connection`` or ``Session`` on PostgreSQL.
    :param organization_id: the value; by default the current organization
        (:func:`~flask_oauth_verify.tenancy.current_organization_id`), or
        ``""`` — which matches no row — when there is none.
    :param setting: the setting the policies read.
    :returns: the value set.

    .. versionadded:: 0.1.0
    """
    _check_setting(setting)
    value = _current_or_empty() if organization_id is None else organization_id
    connection.execute(select(func.set_config(setting, value, True)))
    return value


def policy_statements(
    table: Any,
    *,
    column: str = "organization_id",
    setting: str = DEFAULT_SETTING,
    cast: str | None = None,
    force: bool = True,
    name: str = "tenant_isolation",
) -> list[str]:
    """The DDL that turns on RLS for ``table``: for a migration, or tests.

    :param table: a SQLAlchemy ``Table`` (schema-qualified when it has one)
        or a table name.
    :param column: the organization column.
    :param setting: the setting :func:`set_rls_organization` sets.
    :param cast: a SQL type to cast the setting to, e.g. ``"uuid"``.
    :param force: add ``FORCE ROW LEVEL SECURITY`` so the owner is bound too.
    :param name: the policy name.
    :returns: ``ALTER TABLE … ENABLE/FORCE ROW LEVEL SECURITY`` and
        ``CREATE POLICY`` statements.

    .. versionadded:: 0.1.0
    """
    _check_setting(setting)
    if cast is not None and not _SQL_TYPE.match(cast):
        raise ValueError(f"{cast!r} is not a SQL type name.")
    preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
    target = preparer.format_table(table) if hasattr(table, "c") else preparer.quote(table)
    value = f"NULLIF(current_setting('{setting}', true), '')"
    if cast is not None:
        value = f"({value})::{cast}"
    check = f"{preparer.quote(column)} = {value}"
    statements = [f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY"]
    if force:
        statements.append(f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY")
    statements.append(
        f"CREATE POLICY {preparer.quote(name)} ON {target} USING ({check}) WITH CHECK ({check})"
    )
    return statements


class RowLevelSecurity:
    """Keeps the RLS setting of a session target's transactions current.

    Made by :func:`enable_row_level_security`; :meth:`disable` removes it.

    .. versionadded:: 0.1.0
    """

    def __init__(self, target: Any, *, setting: str, allow_bypass_role: bool = False) -> None:
        self.target = target
        self.setting = _check_setting(setting)
        self.allow_bypass_role = allow_bypass_role

    def _refuse_role(self, role: str) -> None:
        raise TenantScopingError(
            f"Row-level security is enabled, but the database role {role!r} is a "
            f"superuser or has BYPASSRLS: PostgreSQL applies no policy to it, so SQL "
            f"the ORM does not scope would read and write every organization. Connect "
            f"the application as an ordinary role (NOSUPERUSER NOBYPASSRLS), or pass "
            f"allow_bypass_role=True to enable_row_level_security() for an admin engine."
        )

    def _sync(self, connection: Any, *, check_role: bool = False) -> None:
        value = _current_or_empty()
        # set_config(..., true) lasts as long as the Core transaction: a
        # COMMIT or ROLLBACK (and the autobegin after it) makes it unknown
        transaction = connection.get_transaction()
        state = (value, None if transaction is None else weakref.ref(transaction))
        if check_role or connection.info.get(_INFO_KEY) != state:
            # recorded first: set_config() itself passes through the listener
            connection.info[_INFO_KEY] = state
            try:
                if check_role and not self.allow_bypass_role:
                    # the role, in the same round trip: a session-level SET
                    # ROLE of an earlier transaction outlives it on the
                    # pooled connection
                    _check_setting(self.setting)
                    row = connection.execute(
                        select(func.set_config(self.setting, value, True), *_ROLE_COLUMNS)
                    ).one()
                    if row[2]:
                        self._refuse_role(str(row[1]))
                else:
                    set_rls_organization(connection, value, setting=self.setting)
            except BaseException:
                connection.info.pop(_INFO_KEY, None)
                raise

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """Each new transaction starts with the current organization.

        The connection is remembered for as long as it lives, so that every
        statement on it — ORM, ``text()``, ``session.connection().execute()``,
        a flush — first re-sets the value if the organization changed.
        """
        if connection.dialect.name != "postgresql":
            raise TenantScopingError(
                "Row-level security needs PostgreSQL, not " + connection.dialect.name
            )
        connection.info.pop(_INFO_KEY, None)  # a fresh transaction has no setting
        with _ENABLED_LOCK:
            watched = connection in _CONNECTIONS
            _CONNECTIONS[connection] = self
        if not watched:
            _watch(connection)
        self._sync(connection, check_role=True)

    def _install(self) -> None:
        event.listen(self.target, "after_begin", self.after_begin)

    def disable(self) -> None:
        """Remove the listeners.

        New transactions of the target no longer get the setting; statements
        on connections of transactions already begun no longer re-set it.
        Nothing is left on the engines.

        .. versionadded:: 0.1.0
        """
        event.remove(self.target, "after_begin", self.after_begin)
        with _ENABLED_LOCK:
            _ENABLED.pop(_identity(self.target), None)
            for connection in [c for c, rls in _CONNECTIONS.items() if rls is self]:
                del _CONNECTIONS[connection]


#: The role and whether PostgreSQL applies no policy to it, read with the
#: setting at the start of every transaction.
_ROLE_COLUMNS: tuple[Any, ...] = (
    literal_column("current_user"),
    literal_column(
        "(SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user)"
    ),
)

#: Connections of session transactions begun under row-level security.
_CONNECTIONS: weakref.WeakKeyDictionary[Any, RowLevelSecurity] = weakref.WeakKeyDictionary()


#: Statements that read no rows: not worth a set_config(), and one before
#: ROLLBACK TO SAVEPOINT would be undone by it at once.
_TRANSACTION_CONTROL = ("SAVEPOINT ", "RELEASE SAVEPOINT ", "ROLLBACK TO SAVEPOINT ")


def _before_cursor_execute(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
    rls = _CONNECTIONS.get(connection)
    if rls is None:
        return
    if statement.startswith(_TRANSACTION_CONTROL):
        if statement.startswith("ROLLBACK TO SAVEPOINT "):
            # it undoes a set_config() since the savepoint: the value is unknown
            connection.info.pop(_INFO_KEY, None)
        return
    rls._sync(connection)


def _watch(connection: Any) -> None:
    """Listen to the statements of this one ``Connection``, not of its engine.

    Adding a listener to an engine while other threads run statements on it
    is not safe in SQLAlchemy, and it would outlive
    :meth:`RowLevelSecurity.disable`. The connection belongs to the session
    whose transaction just began, in this thread; the listener goes with it.
    ``before_cursor_execute`` also sees ``exec_driver_sql()``, which
    ``before_execute`` misses.
    """
    event.listen(connection, "before_cursor_execute", _before_cursor_execute)


_ENABLED: weakref.WeakKeyDictionary[Any, RowLevelSecurity] = weakref.WeakKeyDictionary()


def enable_row_level_security(
    target: Any, *, setting: str = DEFAULT_SETTING, allow_bypass_role: bool = False
) -> RowLevelSecurity:
    """Set ``setting`` from the current organization in every transaction of ``target``.

    At the start of each transaction (``after_begin``), and again before any
    statement on that connection — ORM, ``text()``,
    ``session.connection().execute()``, a flush — if the organization
    changed since (an :func:`~flask_oauth_verify.tenancy.as_organization`
    block inside an open transaction) or a ``ROLLBACK TO SAVEPOINT`` undid
    the setting, runs :func:`set_rls_organization` on the transaction's
    connection. Pair it with :func:`policy_statements` on
    each tenant table and with
    :func:`~flask_oauth_verify.tenancy.enable_tenant_scoping`: the ORM
    scopes what it can see, PostgreSQL everything else.

    :param target: a ``Session`` (class or instance), ``sessionmaker``,
        ``scoped_session``, or a Flask-SQLAlchemy ``db``.
    :param setting: the setting the policies read.
    :param allow_bypass_role: let transactions begin when the connection's
        role is a superuser or has ``BYPASSRLS`` (policies never apply to
        it). By default such a transaction raises
        :class:`~flask_oauth_verify.tenancy.TenantScopingError` instead of
        running with row-level security silently off; the role is checked
        at the start of every transaction, with the setting (one statement),
        so a session-level ``SET ROLE`` an earlier transaction left on a
        pooled connection is caught too.
    :returns: the :class:`RowLevelSecurity`; its ``disable()`` removes it.
    :raises RuntimeError: when already enabled on ``target``.

    .. versionadded:: 0.1.0
    """
    event_target = _event_target(target, "enable_row_level_security")
    rls = RowLevelSecurity(event_target, setting=setting, allow_bypass_role=allow_bypass_role)
    with _ENABLED_LOCK:
        if _identity(event_target) in _ENABLED:
            raise RuntimeError("Row-level security is already enabled on this target.")
        _ENABLED[_identity(event_target)] = rls
    rls._install()
    return rls
