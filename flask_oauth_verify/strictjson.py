"""One strict JSON decoder for tokens and for what the issuer sends.

Strict where parsers differ: a member named twice (``{"active": false,
"active": true}``) is refused rather than resolved last-one-wins, and the
non-JSON constants ``NaN``/``Infinity`` Python's parser accepts are refused.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["STRICT_DECODER"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: One decoder for every document: ``json.loads()`` with hooks builds a new
#: one per call.
STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
