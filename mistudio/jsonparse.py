"""The one JSON parser every route, config and Hub file goes through (no Django here).

`json_loads` refuses what the standard library would accept but our code cannot use safely:
nesting deeper than MAX_DEPTH (`[` × 100,000 would otherwise raise RecursionError somewhere
later), NaN/Infinity and numbers that overflow a float (`1e400`), with a ValueError whose text
says which.
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64  # a config, a template export or a request body nests a few levels


class JSONRefused(ValueError):  # noqa: N818 - raised as ValueError by callers' except clauses
    """Text that parses as JSON but that we refuse (too deep, non-finite numbers)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str) -> float:
    raise JSONRefused(f"{name} is not a JSON number")


def _depth_check(value: object, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise JSONRefused(f"it nests deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def json_loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> object:
    """`raw` parsed; ValueError (JSONRefused for the cases above) when it is not JSON we use."""
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_constant)
    except RecursionError:
        raise JSONRefused(f"it nests deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    _depth_check(value, max_depth)
    return value
