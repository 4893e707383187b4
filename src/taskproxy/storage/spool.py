"""The local spool: where usage waits while the database cannot be reached.

Each process appends to its own file (`<stem>.<host>-<pid>-<random><suffix>` beside the configured
path) and holds an exclusive lock on it for as long as it lives, so workers sharing one config never
write into one file, and a file can be taken over only once its owner is gone (the lock is released
when a process dies). The owner replays its own file in place; a file whose owner is gone is first
claimed by renaming it to a name no one else uses, then replayed and removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import orjson

log = logging.getLogger("taskproxy.spool")
COPY_PIECE_BYTES = 1 << 20


class Spool:
    def __init__(self, path: str | Path) -> None:
        self.base = Path(path)
        host = socket.gethostname().replace(".", "_")[:40]
        self.own = self.base.with_name(f"{self.base.stem}.{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}{self.base.suffix}")
        self.set_aside = self.base.with_name(f"{self.base.stem}.rejected{self.base.suffix}")
        self._file: IO[bytes] | None = None
        self._replayed_to = 0  # bytes at the start of this process's file already written to the database

    def _own_file(self) -> IO[bytes]:
        if self._file is None:
            # Unbuffered: a write that fails reaches the disk in part or not at all, never later.
            self._file = self.own.open("a+b", buffering=0)  # readable: a file removed while in use is written again from it
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process lives
        return self._file

    def _restore_if_removed(self) -> None:
        """This process's spool file removed while in use (a cleanup job, a hand; its folder too) is
        written again from the handle still open on it. What was spooled into it was lost with it,
        silently, before 2026-12-06: the replay reads the files the folder lists. The OSError of a
        write that fails is the caller's; the old handle stays, and with it what it holds."""
        if self._file is None:
            return
        held = os.fstat(self._file.fileno())
        try:
            there = os.stat(self.own)
            if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                return
        except FileNotFoundError:
            pass
        old = self._file
        self.own.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        try:
            new = self._own_file()
            start = new.seek(0, 2)
            old.seek(0)
            _copy_rest(old, new)  # a long outage's spool: not read whole into memory; no torn line left behind
            copied = new.tell() - start
        except OSError:
            if self._file is not None:
                self._file.close()
            self._file = old
            raise
        old.close()
        log.warning("the spool file %s was removed while in use: its %d bytes were written to it again", self.own, copied)

    def append(self, batch: dict) -> None:
        """Add one batch as one line. A write that fails (a full disk) is cut back to where it began,
        so no torn line is left behind the batches before it; the OSError is the caller's."""
        self._restore_if_removed()
        _append_line(self._own_file(), orjson.dumps(batch) + b"\n")

    def set_aside_batch(self, batch: dict, reason: str) -> None:
        """Rows the database refuses for themselves (not because it is down), with the reason."""
        with self.set_aside.open("ab", buffering=0) as file:
            _append_line(file, orjson.dumps({"reason": reason, "batch": batch}, default=repr) + b"\n")

    def replay_set_aside(self, replay: Callable[[str, dict], None]) -> None:
        """Hand each set-aside batch to `replay(reason, batch)`, a line at a time. The file is first
        claimed by renaming it (rows set aside meanwhile start a new one), and one left claimed by a run
        that was killed is replayed too. If `replay` raises (the database went away, Ctrl-C), the batch
        it was given and every one after it go back to the set-aside file before the exception is the
        caller's: before 2026-12-07 the file was read whole and removed first, and a run cut short lost
        every batch after the one it failed on."""
        for claimed in self._claimed_set_asides():
            try:
                file = claimed.open("rb")
            except FileNotFoundError:
                continue
            with file:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another run is replaying it
                for start, line in _lines(file):
                    try:
                        entry = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    batch = entry.get("batch") if "batch" in entry else {"events": [entry.get("row")]}  # older files: one event row
                    if not (isinstance(batch, dict) and all(isinstance(rows, list) and all(isinstance(row, dict) for row in rows) for rows in batch.values())):
                        continue
                    try:
                        replay(str(entry.get("reason", "")), batch)
                    except BaseException:
                        file.seek(start)
                        with self.set_aside.open("ab", buffering=0) as out:
                            _copy_rest(file, out)  # raises, leaving the claimed file whole, if the disk takes nothing
                        claimed.unlink()
                        raise
            claimed.unlink()

    def _claimed_set_asides(self) -> list[Path]:
        """Claimed set-aside files: those a run before this one left (killed), then the current file, renamed."""
        left = sorted(self.set_aside.parent.glob(f"{self.set_aside.name}.replaying-*"))
        claimed = self.set_aside.with_name(f"{self.set_aside.name}.replaying-{uuid.uuid4().hex}")
        try:
            self.set_aside.rename(claimed)
        except FileNotFoundError:
            return left
        return [*left, claimed]

    def _files(self) -> Iterator[Path]:
        folder = self.base.parent if str(self.base.parent) else Path(".")
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(f"{self.base.stem}.*{self.base.suffix}*")):
            if not path.name.startswith(self.set_aside.name) and ".damaged-" not in path.name and path.is_file():
                yield path
        if self.base.is_file():  # a spool written by an older version under the configured name itself
            yield self.base

    @staticmethod
    def _orphaned(path: Path) -> bool:
        """True if no live process holds the file's lock."""
        try:
            with path.open("rb") as file:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(file, fcntl.LOCK_UN)
                return True
        except (BlockingIOError, FileNotFoundError):
            return False

    def _waiting(self) -> Iterator[Path]:
        for path in self._files():
            if path == self.own:
                if path.stat().st_size:
                    yield path
            elif self._orphaned(path):
                yield path

    def pending(self) -> bool:
        try:
            self._restore_if_removed()
        except OSError as exc:  # the disk takes nothing now: what is spooled stays in the handle, retried
            log.error("could not write the spool file %s again (%s)", self.own, exc)
        return next(self._waiting(), None) is not None

    def size(self) -> int:
        """Bytes waiting in spool files this process could replay (its own and orphaned ones)."""
        total = 0
        for path in self._waiting():
            try:
                total += path.stat().st_size - (self._replayed_to if path == self.own else 0)
            except FileNotFoundError:
                pass
        return total

    def replay(self, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        """Write every waiting batch with `write`; False if the database went away again (the rest stays).
        `write` sets aside rows the database refuses for themselves; it raises only when the database is down."""
        for path in list(self._waiting()):
            if path == self.own:
                if not self._replay_own(write, is_down):
                    return False
                continue
            claimed = path if ".claimed-" in path.name else path.with_name(f"{path.name}.claimed-{uuid.uuid4().hex}")
            try:
                if claimed != path:
                    path.rename(claimed)  # a unique name: never onto another file
                with claimed.open("rb") as file:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process replaying it: leave it to them
                    if not self._replay_claimed(claimed, file, write, is_down):
                        return False
            except (FileNotFoundError, BlockingIOError):
                continue  # another process claimed it first
            log.info("replayed the spool left in %s", path.name)
        return True

    def _replay_claimed(self, claimed: Path, file: IO[bytes], write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        stopped = self._replay_lines(file, 0, write, is_down)
        if stopped is not None:  # the database went away again: keep the rest in this process's file, else where it is
            file.seek(stopped)
            own = self._own_file()
            try:
                _copy_rest(file, own)
            except OSError:
                return False  # the claimed file stays; replaying it again writes nothing twice (ids)
        claimed.unlink()
        return stopped is None

    def _replay_own(self, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        """Replay this process's file from where the last replay stopped: the batches before it are
        written (a replay that fails on the first batch reads one line, not the whole spool, each second
        of an outage: before 2026-12-07 each retry read the whole file into memory, ~3× its size)."""
        file = self._own_file()  # only this process's writer thread appends or replays it
        with self.own.open("rb") as reading:
            stopped = self._replay_lines(reading, self._replayed_to, write, is_down)
        if stopped is not None:
            # Left in place: rewriting the file could fail on the disk that made us spool in the first place.
            self._replayed_to = stopped
            return False
        file.truncate(0)
        self._replayed_to = 0
        return True

    def _replay_lines(self, file: IO[bytes], start: int, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> int | None:
        """Write the batches of `file` from offset `start`, a line at a time; the offset of the batch the
        database went away on, or None when all are written."""
        file.seek(start)
        for offset, line in _lines(file):
            if not line.strip():
                continue
            try:
                batch = orjson.loads(line)
            except orjson.JSONDecodeError:  # torn by a crash in mid-write: nothing in it can be read back
                self._keep_damaged(line.rstrip(b"\n"), "it is not JSON")
                continue
            try:
                write(batch)
            except Exception as exc:
                if is_down(exc):
                    return offset
                # Read back, but not as a batch (a byte changed on disk, a line written by hand): kept
                # aside whole, and the rest replayed. Raised, it stopped the replay on every start, and
                # before 2026-12-06 the writer thread with it: nothing more was recorded.
                self._keep_damaged(line.rstrip(b"\n"), f"{exc.__class__.__name__}: {str(exc)[:200]}", _records(batch))
        return None

    def _keep_damaged(self, line: bytes, why: str, records: int | None = None) -> None:
        damaged = self.base.with_name(f"{self.base.stem}.damaged-{int(time.time() * 1000)}{self.base.suffix}")
        holding = f"{records} usage records" if records is not None else f"{len(line)} bytes"
        try:
            with damaged.open("ab") as out:
                out.write(line + b"\n")
            log.error("a damaged spool line (%s; %s) was kept in %s", holding, why, damaged)
        except OSError as exc:
            log.error("a damaged spool line (%s; %s) could not be kept (%s) and was dropped", holding, why, exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.own.exists() and self.own.stat().st_size == 0:
                self.own.unlink()


def _append_line(file: IO[bytes], line: bytes) -> None:
    """Write `line` at the end of `file` whole, or cut the file back to where it was and raise."""
    start = file.seek(0, 2)
    try:
        _write_whole(file, line)
    except OSError:
        try:
            file.truncate(start)
        except OSError:  # pragma: no cover - truncating frees space; it does not need any
            log.exception("could not cut a torn spool line back")
        raise


def _lines(file: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(offset, line) from the file's position on, one line in memory at a time."""
    offset = file.tell()
    for line in iter(file.readline, b""):
        yield offset, line
        offset += len(line)


def _copy_rest(source: IO[bytes], out: IO[bytes]) -> None:
    """Append what is left of `source` to `out` in pieces (not read whole into memory), ended by a line's
    end (a torn last line stays a line of its own: the next batch appended is not glued to it). A write
    that fails, or comes up short on a full disk, is cut back, so no torn line is left, and raises."""
    start = out.seek(0, 2)
    last = b"\n"
    try:
        while piece := source.read(COPY_PIECE_BYTES):
            _write_whole(out, piece)
            last = piece[-1:]
        if last != b"\n":
            _write_whole(out, b"\n")
    except OSError:
        out.truncate(start)
        raise


def _write_whole(file: IO[bytes], data: bytes) -> None:
    """Write all of `data` (an unbuffered file takes part of it when the disk is nearly full), or raise."""
    written = file.write(data)
    while written is not None and written < len(data):
        more = file.write(data[written:])
        if not more:
            raise OSError(28, "No space left on device")
        written += more


def _records(batch: object) -> int | None:
    """How many rows a spooled batch says it holds, when it is shaped like one."""
    if not isinstance(batch, dict):
        return None
    return sum(len(rows) for key in ("events", "rejections", "audit") if isinstance(rows := batch.get(key), list))
