"""Reading one JSON object out of a larger byte string without parsing the rest: a price table's
entry, or the usage object near the end of a provider's answer."""

from __future__ import annotations

import re
from typing import Any

import orjson

# `"usage": {` as a key, not inside a string (a quote inside a JSON string is escaped).
_USAGE_KEY = re.compile(rb'(?<!\\)"usage"\s*:\s*\{')


def object_end(raw: bytes, start: int) -> int:
    """The index after the JSON object that opens at `raw[start]` (strings and escapes respected);
    -1 if it does not end within `raw`."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(raw)):
        byte = raw[index]
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:  # {
            depth += 1
        elif byte == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return index + 1
    return -1


def object_at(raw: bytes, start: int) -> Any:
    """The JSON object that opens at `raw[start]`, or None if it is cut off or not valid JSON."""
    end = object_end(raw, start)
    if end < 0:
        return None
    try:
        return orjson.loads(raw[start:end])
    except orjson.JSONDecodeError:
        return None


def has_usage_object(data: bytes) -> bool:
    return _USAGE_KEY.search(data) is not None


def last_usage_object(data: bytes) -> dict | None:
    """The last complete `"usage": {...}` object in `data` (providers send usage last), or None."""
    for match in reversed(list(_USAGE_KEY.finditer(data))):
        found = object_at(data, match.end() - 1)
        if isinstance(found, dict):
            return found
    return None
