"""glibc's allocator, tuned and asked to give memory back (no-ops where the C library is not glibc).
Process-wide: only `taskproxy serve` (process.py) and the encodings' loading use it. And Python's
cyclic collector, paused where a report is built."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: for building a report, in a process that
    does nothing else meanwhile (a report's own process, the CLI), never in the serving process.
    A report holds millions of objects until it is done, and each of the collector's passes walks
    them all again: on the seed organisation that was a quarter of the adoption report's time and a
    fifth of the signals' (docs/scale-runs.md), for nothing to collect. What the block leaves in
    reference cycles is collected after it (or when the process ends)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
