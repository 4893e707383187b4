"""Checks of user-given fields shared by the API and the CLI, so both refuse the same input."""

from __future__ import annotations

from typing import Any

from taskproxy.errors import InvalidRequest


def printable(value: Any, name: str, *, max_length: int = 200, required: bool = False) -> str | None:
    """A string of at most `max_length` printable characters, or None when absent and not required."""
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"'{name}' is required.", param=name)
        return None
    if not isinstance(value, str) or len(value) > max_length or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequest(f"'{name}' must be a string of at most {max_length} printable characters.", param=name)
    return value


def one_of(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}.", param=name)
    return value  # type: ignore[no-any-return]


def non_negative_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequest(f"'{name}' must be a non-negative number.", param=name)
    return value
