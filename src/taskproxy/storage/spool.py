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
        copied = 0
        try:
            new = self._own_file()
            start = new.seek(0, 2)
            old.seek(0)
            try:
                while piece := old.read(COPY_PIECE_BYTES):  # a long outage's spool: not read whole into memory
                    new.write(piece)
                    copied += len(piece)
            except OSError:
                new.truncate(start)  # no torn line left behind
                raise
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

    def take_set_aside(self) -> list[tuple[str, dict]]:
        """The set-aside batches, (reason, batch) each; the file is emptied (the caller keeps what it must)."""
        try:
            raw = self.set_aside.read_bytes()
        except FileNotFoundError:
            return []
        self.set_aside.unlink()
        entries = []
        for line in raw.splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            batch = entry.get("batch") if "batch" in entry else {"events": [entry.get("row")]}  # older files: one event row
            if isinstance(batch, dict) and all(isinstance(row, dict) for rows in batch.values() for row in rows):
                entries.append((str(entry.get("reason", "")), batch))
        return entries

    def _files(self) -> Iterator[Path]:
        folder = self.base.parent if str(self.base.parent) else Path(".")
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(f"{self.base.stem}.*{self.base.suffix}*")):
            if path != self.set_aside and ".damaged-" not in path.name and path.is_file():
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
                total += path.stat().st_size
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
                    if not self._replay_claimed(claimed, file.read(), write, is_down):
                        return False
            except (FileNotFoundError, BlockingIOError):
                continue  # another process claimed it first
            log.info("replayed the spool left in %s", path.name)
        return True

    def _replay_claimed(self, claimed: Path, raw: bytes, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        rest = self._replay_lines(raw.splitlines(), write, is_down)
        if rest:  # the database went away again: keep the rest in this process's file, else where it is
            try:
                _append_line(self._own_file(), b"\n".join(rest) + b"\n")
            except OSError:
                return False  # the claimed file stays; replaying it again writes nothing twice (ids)
        claimed.unlink()
        return not rest

    def _replay_own(self, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        file = self._own_file()  # only this process's writer thread appends or replays it
        rest = self._replay_lines(self.own.read_bytes().splitlines(), write, is_down)
        if rest:
            # Left whole: the batches already written are skipped when it is replayed again (their ids
            # exist), and rewriting the file could fail on the disk that made us spool in the first place.
            return False
        file.truncate(0)
        return True

    def _replay_lines(self, lines: list[bytes], write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> list[bytes]:
        lines = [line for line in lines if line.strip()]
        for index, line in enumerate(lines):
            try:
                batch = orjson.loads(line)
            except orjson.JSONDecodeError:  # torn by a crash in mid-write: nothing in it can be read back
                self._keep_damaged(line, "it is not JSON")
                continue
            try:
                write(batch)
            except Exception as exc:
                if is_down(exc):
                    return lines[index:]
                # Read back, but not as a batch (a byte changed on disk, a line written by hand): kept
                # aside whole, and the rest replayed. Raised, it stopped the replay on every start, and
                # before 2026-12-06 the writer thread with it: nothing more was recorded.
                self._keep_damaged(line, f"{exc.__class__.__name__}: {str(exc)[:200]}", _records(batch))
        return []

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
        written = file.write(line)
        while written is not None and written < len(line):  # a short write: the disk is (nearly) full
            more = file.write(line[written:])
            if not more:
                raise OSError(28, "No space left on device")
            written += more
    except OSError:
        try:
            file.truncate(start)
        except OSError:  # pragma: no cover - truncating frees space; it does not need any
            log.exception("could not cut a torn spool line back")
        raise


def _records(batch: object) -> int | None:
    """How many rows a spooled batch says it holds, when it is shaped like one."""
    if not isinstance(batch, dict):
        return None
    return sum(len(rows) for key in ("events", "rejections", "audit") if isinstance(rows := batch.get(key), list))
