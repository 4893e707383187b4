"""glibc's allocator, tuned and asked to give memory back (no-ops where the C library is not glibc).
Process-wide: only `taskproxy serve` (process.py) and the encodings' loading use it."""

from __future__ import annotations

import ctypes

MALLOC_ARENAS = 2
MMAP_THRESHOLD = 64 * 1024
_M_ARENA_MAX = -8  # mallopt's parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (present only in glibc)
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(arenas: int = MALLOC_ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Cap glibc's malloc arenas, and give blocks of `mmap_threshold` bytes and more mappings of their
    own (returned to the system when freed, whatever lives beside them). Call before the process
    starts threads. False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them unless asked)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
