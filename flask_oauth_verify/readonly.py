"""Read-only claims, all the way down.

``g.auth.claims`` is shared: the verified-token cache hands the same
:class:`~flask_oauth_verify.context.AuthContext` to every request with that
token. A view that changed a nested value (``claims["roles"].append(...)``)
would change what every later request reads as verified. So the nested JSON
arrays and objects of a context's claims (:class:`ReadOnlyClaims`) are
:class:`ReadOnlyList` and :class:`ReadOnlyDict`: a ``list`` and a ``dict``
in every respect a reader cares about (equality, ``isinstance``, JSON
encoding, ``+``, ``|``), whose mutating methods raise :class:`TypeError`.
A copy (``list(x)``, ``dict(x)``, :func:`copy.copy`, :func:`copy.deepcopy`)
is an ordinary, mutable one.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from .errors import InvalidTokenError

__all__ = ["ReadOnlyClaims", "ReadOnlyDict", "ReadOnlyList", "read_only", "read_only_claims"]

#: Values that need no conversion.
_ATOMS = frozenset((str, int, float, bool, type(None)))
_SEQUENCES = (list, tuple)


def _refuse(self: object, *_args: object, **_kwargs: object) -> NoReturn:
    """Refused: raises :class:`TypeError` (verified claims are read-only; copy them first)."""
    raise TypeError(f"verified claims are read-only ({type(self).__name__}); copy them first")


class ReadOnlyList(list[Any]):
    """A JSON array of verified claims: a ``list`` that cannot be changed.

    Made by :func:`read_only` (calling the class, like ``__init__`` on one,
    would fill it anew, and is refused).
    """

    __slots__ = ()
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __init__ = __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __reduce__(self) -> tuple[type[list[Any]], tuple[list[Any]]]:
        """Copies and pickles are plain lists."""
        return list, (list(self),)

    def __copy__(self) -> list[Any]:
        """A plain, mutable list."""
        return list(self)


class ReadOnlyDict(dict[str, Any]):
    """A JSON object of verified claims: a ``dict`` that cannot be changed.

    Made by :func:`read_only` (calling the class, like ``__init__`` on one,
    would fill it anew, and is refused).
    """

    __slots__ = ()
    pop = popitem = clear = update = setdefault = _refuse
    __init__ = __setitem__ = __delitem__ = __ior__ = _refuse

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        """Copies and pickles are plain dicts."""
        return dict, (dict(self),)

    def __copy__(self) -> dict[str, Any]:
        """A plain, mutable dict."""
        return dict(self)


#: Values a reader can be given as they are.
_SETTLED = _ATOMS | {ReadOnlyList, ReadOnlyDict}


#: Deeper values are refused (``RecursionError``): no JSON parser hands over
#: more, and a cycle (a mapping holding itself) must end.
_MAX_DEPTH = 10_000


def _shell(value: Any) -> Any:
    """An empty read-only container for ``value``, or ``value`` itself (no container)."""
    if isinstance(value, _SEQUENCES):
        return list.__new__(ReadOnlyList)
    if isinstance(value, Mapping):
        return dict.__new__(ReadOnlyDict)
    return value


def read_only(value: Any) -> Any:
    """``value`` with every nested list and mapping made read-only.

    Lists and tuples become :class:`ReadOnlyList`, mappings
    :class:`ReadOnlyDict`; anything else is returned as is. Iterative, so
    any depth a JSON parser accepts is converted here too (a value read in
    a view never fails where verifying the token succeeded).

    :raises RecursionError: for values nested more than 10,000 deep (or
        holding themselves).
    """
    root = _shell(value)
    if root is value:
        return value
    pending = [(value, root, 1)]
    while pending:
        source, made, depth = pending.pop()
        if depth > _MAX_DEPTH:
            raise RecursionError("value nested too deeply")
        if made.__class__ is ReadOnlyList:
            if _ATOMS.issuperset(map(type, source)):  # the usual array: scopes, aud, roles
                list.extend(made, source)
                continue
            items = []
            for item in source:
                child = _shell(item)
                if child is not item:
                    pending.append((item, child, depth + 1))
                items.append(child)
            list.extend(made, items)
        else:
            for key, item in source.items():
                child = _shell(item)
                if child is not item:
                    pending.append((item, child, depth + 1))
                dict.__setitem__(made, key, child)
    return root


class ReadOnlyClaims(Mapping[str, Any]):
    """The verified claims of a token: a read-only mapping, nested values included.

    A nested array or object is made read-only (:func:`read_only`) when it
    is first read, so a request that never reads it pays nothing for it;
    every later read, by any request sharing the context, gets that same
    read-only value. ``dict(claims)`` is an ordinary dict of those values.
    """

    __slots__ = ("_claims",)

    def __init__(self, claims: dict[str, Any]) -> None:
        self._claims = claims

    def __getitem__(self, name: str) -> Any:
        value = self._claims[name]
        if value.__class__ in _SETTLED:
            return value
        try:
            value = read_only(value)
        except RecursionError:  # an issuer's absurd nesting: refused, not a 500
            raise InvalidTokenError(reason="claims nested too deeply") from None
        self._claims[name] = value  # same key: a dict being iterated elsewhere is unharmed
        return value

    def get(self, name: str, default: Any = None) -> Any:
        """The claim ``name`` (read-only), or ``default`` when it is absent."""
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in self._claims

    def __iter__(self) -> Iterator[str]:
        return iter(self._claims)

    def __len__(self) -> int:
        return len(self._claims)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._claims)

    def copy(self) -> dict[str, Any]:
        """A plain, mutable dict of the claims (nested values stay read-only)."""
        return dict(self)

    def __or__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self, **other}

    def __ror__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self}

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        """Copies and pickles are plain dicts."""
        return dict, (dict(self),)


def read_only_claims(claims: Mapping[str, Any], owned: bool = False) -> ReadOnlyClaims:
    """A read-only view of ``claims``, nested arrays and objects included.

    :param owned: ``claims`` is a ``dict`` nobody else holds (freshly
        parsed): it is wrapped as it is, and each nested value is made
        read-only when first read. Otherwise the nested values are copied
        read-only at once (the caller keeps its own).
    :raises RecursionError: for claims nested deeper than Python's
        recursion limit allows.
    """
    if owned and type(claims) is dict:
        return ReadOnlyClaims(claims)
    return ReadOnlyClaims(
        {
            name: value if type(value) in _ATOMS else read_only(value)
            for name, value in claims.items()
        }
    )
