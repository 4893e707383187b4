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


class Spool:
    def __init__(self, path: str | Path) -> None:
        self.base = Path(path)
        host = socket.gethostname().replace(".", "_")[:40]
        self.own = self.base.with_name(f"{self.base.stem}.{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}{self.base.suffix}")
        self.set_aside = self.base.with_name(f"{self.base.stem}.rejected{self.base.suffix}")
        self._file: IO[bytes] | None = None

    def _own_file(self) -> IO[bytes]:
        if self._file is None:
            self._file = self.own.open("ab")
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process lives
        return self._file

    def append(self, batch: dict) -> None:
        file = self._own_file()
        file.write(orjson.dumps(batch) + b"\n")
        file.flush()

    def set_aside_rows(self, rows: list[dict], reason: str) -> None:
        """Rows the database refuses for themselves (not because it is down): kept for inspection."""
        with self.set_aside.open("ab") as file:
            for row in rows:
                file.write(orjson.dumps({"reason": reason, "row": row}, default=repr) + b"\n")

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
            claimed = path.with_name(f"{path.name}.claimed-{uuid.uuid4().hex}")
            try:
                path.rename(claimed)  # a unique name: never onto another file
            except FileNotFoundError:
                continue  # another process claimed it first
            rest = self._replay_lines(claimed.read_bytes().splitlines(), write, is_down)
            if rest:  # the database went away again: keep the rest, in order, in this process's file
                file = self._own_file()
                file.write(b"\n".join(rest) + b"\n")
                file.flush()
            claimed.unlink()
            if rest:
                return False
            log.info("replayed the spool left in %s", path.name)
        return True

    def _replay_own(self, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        file = self._own_file()  # only this process's writer thread appends or replays it
        rest = self._replay_lines(self.own.read_bytes().splitlines(), write, is_down)
        file.truncate(0)
        if rest:
            file.write(b"\n".join(rest) + b"\n")
        file.flush()
        return not rest

    def _replay_lines(self, lines: list[bytes], write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> list[bytes]:
        lines = [line for line in lines if line.strip()]
        for index, line in enumerate(lines):
            try:
                batch = orjson.loads(line)
            except orjson.JSONDecodeError:
                damaged = self.base.with_name(f"{self.base.stem}.damaged-{int(time.time() * 1000)}{self.base.suffix}")
                with damaged.open("ab") as out:
                    out.write(line + b"\n")
                log.error("a damaged spool line was kept in %s", damaged)
                continue
            try:
                write(batch)
            except Exception as exc:
                if not is_down(exc):
                    raise
                return lines[index:]
        return []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.own.exists() and self.own.stat().st_size == 0:
                self.own.unlink()
