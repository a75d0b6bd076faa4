"""A bounded per-process cache of verified tokens (the repeated-token fast path).

Keyed by the SHA-256 digest of the token, never the token. An entry keeps the
:class:`AuthContext` built for the token plus what is needed to re-check it on
every hit: ``exp``/``nbf``/``iat`` (with leeway) and the key that verified it, which
must still be the current key of its issuer (checked as "the same key set
object, still within its soft TTL", else resolved again). The whole cache is
emptied when a key set changes, so a key that leaves its set stops vouching
for tokens at once. Eviction drops the oldest write when full, in O(1)
(:class:`~flask_oauth_verify.fifo.BoundedFifo`; ``TOKEN_CACHE_SIZE``, 10 000
entries by default; 0 disables the cache).

Introspected tokens have a cache of the same shape and size
(:class:`IntrospectedToken` entries): the context built from an active
answer, reused until the answer's own cache deadline (never past ``exp``),
so that a hit costs what a verified JWT's hit costs. It exists only when
introspection answers are cached (``INTROSPECTION_CACHE_TTL`` > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

from .context import AuthContext
from .fifo import BoundedFifo

__all__ = ["CachedToken", "IntrospectedToken", "TokenCache"]

E = TypeVar("E")


@dataclasses.dataclass(slots=True, eq=False)
class CachedToken:
    """A verified token's context and what a hit must re-check.

    Not frozen (a frozen dataclass costs a call per field to build, on every
    first-seen token); nothing changes an entry after it is stored.

    :param not_before: the later of ``nbf`` and ``iat`` (``None``: neither);
        a hit before it less the leeway takes the general path, which names
        the claim.
    :param source: the key source that vouched for ``key`` when the token
        was verified (:meth:`KeyStore.resolve_vouched
        <flask_oauth_verify.jwks.KeyStore.resolve_vouched>`), and
        ``key_set`` its key set then. A hit is current while
        ``source.keys is key_set`` and ``now < source.fresh_until``;
        otherwise the key is resolved again.
    """

    context: AuthContext
    expires_at: float
    not_before: float | None
    issuer: str
    header: Any
    key: Any
    source: Any = None
    key_set: Any = None


@dataclasses.dataclass(slots=True, eq=False)
class IntrospectedToken:
    """The context of an active introspection answer, and until when it holds.

    :param context: built from the answer after every check passed (for
        ``strategy="both"``: the verified JWT's context, which the answer
        confirmed).
    :param reuse_until: the cached answer's deadline, capped at ``exp`` plus
        the leeway: a hit needs ``now < reuse_until`` and nothing else
        (``nbf``/``iat`` passed once stay passed).
    :param confirmed: the context is a verified JWT's that the answer only
        confirmed active (``strategy="both"``): never an ``"introspection"``
        route's answer.
    """

    context: AuthContext
    reuse_until: float
    confirmed: bool = False


class TokenCache(Generic[E]):
    """A bounded FIFO mapping of token digest -> entry (:class:`CachedToken`,
    :class:`IntrospectedToken`).

    :param size: the maximum number of entries; 0 disables the cache.
    """

    def __init__(self, size: int) -> None:
        self._entries: BoundedFifo[bytes, E] = BoundedFifo(size)
        #: The entry for a digest, if any (the dict's own ``get``: no Python
        #: frame on the hot path; :meth:`clear` empties this same dict).
        self.get = self._entries.get

    @property
    def size(self) -> int:
        """The maximum number of entries (0: the cache is off)."""
        return self._entries.size

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, digest: bytes, entry: E) -> None:
        """Store ``entry``, evicting the oldest entry when full."""
        self._entries.put(digest, entry)

    def discard(self, digest: bytes) -> None:
        """Remove ``digest`` if present."""
        self._entries.pop(digest, None)

    def clear(self) -> None:
        """Empty the cache (a key set changed)."""
        self._entries.clear()
