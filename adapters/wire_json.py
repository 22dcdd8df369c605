"""JSON from clients, parsed defensively: bounded nesting, and every failure a ValueError with its reason."""

from __future__ import annotations

import json
from typing import Any

# No message of either protocol nests this deep; deeper JSON is refused before anything walks it recursively.
MAX_JSON_DEPTH = 32


class NotJson(ValueError):
    """Text that is not JSON (or not UTF-8, or an integer too long to convert)."""


class TooDeep(ValueError):
    """JSON that nests deeper than MAX_JSON_DEPTH levels."""


def load_json(raw: str | bytes) -> Any:
    """The JSON value of `raw`; NotJson or TooDeep when it is not usable."""
    try:
        value = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's stack
        raise TooDeep(f"nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise NotJson("is not JSON") from None
    if _nests_deeper(value, MAX_JSON_DEPTH):
        raise TooDeep(f"nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _nests_deeper(value: object, limit: int) -> bool:
    """Whether parsed JSON has more than `limit` levels of objects and arrays (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth == limit:
                    return True
                pending.append((child, depth + 1))
    return False
