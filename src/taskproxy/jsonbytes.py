"""Reading one JSON object out of a larger byte string without parsing the rest: a price table's
entry, or the usage object near the end of a provider's answer."""

from __future__ import annotations

import re
from typing import Any

import orjson

_USAGE = b'"usage"'
# A provider's usage object is a few hundred bytes (~230 Anthropic's, ~350 OpenAI's with details), and
# it comes last; an earlier one is read only when the last was cut off. So what follows `"usage": {` is
# read at most this far, for the last few keys found: a stream of keys whose objects never end costs a
# bounded scan per chunk (before 2026-12-06, every key's to the end: ~94 ms of the event loop per
# 236-byte chunk of them).
MAX_USAGE_OBJECT_BYTES = 2 * 1024
MAX_USAGE_KEYS_READ = 4
_AFTER_KEY = re.compile(rb"\s*:\s*\{")


# Where the scan jumps to: the next brace or quote; inside a string, past its closing quote (escapes
# respected). Matched in C, so a long string costs a memchr-like scan, not a Python step per byte.
_STRUCTURE = re.compile(rb'[{}"]')
_REST_OF_STRING = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.DOTALL)


def object_end(raw: bytes, start: int, stop: int | None = None) -> int:
    """The index after the JSON object that opens at `raw[start]` (strings and escapes respected);
    -1 if it does not end within `raw[:stop]`."""
    stop = len(raw) if stop is None else min(stop, len(raw))
    depth, position = 0, start
    while (found := _STRUCTURE.search(raw, position, stop)) is not None:
        position = found.end()
        byte = raw[found.start()]
        if byte == 0x22:  # quote
            string = _REST_OF_STRING.match(raw, position, stop)
            if string is None:
                return -1
            position = string.end()
        elif byte == 0x7B:  # {
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return position
    return -1


def object_at(raw: bytes, start: int, max_bytes: int | None = None) -> Any:
    """The JSON object that opens at `raw[start]`, or None if it is cut off, longer than `max_bytes`
    or not valid JSON."""
    end = object_end(raw, start, None if max_bytes is None else start + max_bytes)
    if end < 0:
        return None
    try:
        return orjson.loads(raw[start:end])
    except orjson.JSONDecodeError:
        return None


def _usage_object_start(data: bytes, key: int) -> int:
    """Where the object opens if `"usage"` at `key` is a key followed by an object (not text inside a
    string, where its quote would be escaped); else -1."""
    if key > 0 and data[key - 1] == 0x5C:  # backslash
        return -1
    after = _AFTER_KEY.match(data, key + len(_USAGE))
    return after.end() - 1 if after else -1


def has_usage_object(data: bytes) -> bool:
    """`"usage": {` in `data`. On the request path, for every chunk: found with bytes.find (memchr
    speed), the pattern checked only where the word is (a regex scan cost 4.7 ms per 256 KiB chunk)."""
    key = data.find(_USAGE)
    while key >= 0:
        if _usage_object_start(data, key) >= 0:
            return True
        key = data.find(_USAGE, key + 1)
    return False


def last_usage_object(data: bytes) -> dict | None:
    """The last complete `"usage": {...}` object in `data` (providers send usage last), or None."""
    key, read = data.rfind(_USAGE), 0
    while key >= 0 and read < MAX_USAGE_KEYS_READ:
        start = _usage_object_start(data, key)
        if start >= 0:
            if isinstance(found := object_at(data, start, MAX_USAGE_OBJECT_BYTES), dict):
                return found
            read += 1
        key = data.rfind(_USAGE, 0, key)
    return None
