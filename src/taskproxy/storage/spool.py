"""The local spool: where usage waits while the database cannot be reached.

Each process appends to its own file (`<stem>.<pid><suffix>` beside the configured path), so
workers sharing one config never interleave writes. Replaying first claims a file by renaming it,
so two processes never replay the same lines; lines not replayed (the database went away again)
go back into the replaying process's own file. Files left by a process that died are replayed by
whichever process comes next.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

log = logging.getLogger("taskproxy.spool")

_CLAIM = ".replaying-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    def __init__(self, path: str | Path) -> None:
        self.base = Path(path)
        self.own = self.base.with_name(f"{self.base.stem}.{os.getpid()}{self.base.suffix}")
        self.set_aside = self.base.with_name(f"{self.base.stem}.rejected{self.base.suffix}")

    def append(self, batch: dict) -> None:
        with self.own.open("ab") as file:
            file.write(orjson.dumps(batch) + b"\n")
            file.flush()

    def set_aside_rows(self, rows: list[dict], reason: str) -> None:
        """Rows the database refuses for themselves (not because it is down): kept for inspection."""
        with self.set_aside.open("ab") as file:
            for row in rows:
                file.write(orjson.dumps({"reason": reason, "row": row}, default=repr) + b"\n")

    def _candidates(self) -> Iterator[Path]:
        folder = self.base.parent if str(self.base.parent) else Path(".")
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(f"{self.base.stem}*")):
            name = path.name
            if path == self.set_aside or ".damaged-" in name:
                continue
            if _CLAIM in name:
                owner = name.rsplit(_CLAIM, 1)[1]
                if owner.isdigit() and _alive(int(owner)) and int(owner) != os.getpid():
                    continue  # another live process is replaying it
                yield path
            elif name == self.base.name or (name.startswith(self.base.stem + ".") and name.endswith(self.base.suffix)):
                yield path

    def size(self) -> int:
        """Bytes waiting in every spool file (this process's and any left by others)."""
        total = 0
        for path in self._candidates():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def pending(self) -> bool:
        return next(self._candidates(), None) is not None

    def replay(self, write: Callable[[dict], None], is_down: Callable[[Exception], bool]) -> bool:
        """Write every spooled batch with `write`; False if the database failed again (the rest stays)."""
        for path in list(self._candidates()):
            claimed = path.with_name(path.name.split(_CLAIM)[0] + f"{_CLAIM}{os.getpid()}")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another process claimed it first
            lines = [line for line in claimed.read_bytes().splitlines() if line.strip()]
            for index, line in enumerate(lines):
                try:
                    batch = orjson.loads(line)
                except orjson.JSONDecodeError:
                    damaged = claimed.with_name(f"{self.base.stem}.damaged-{int(time.time() * 1000)}{self.base.suffix}")
                    damaged.write_bytes(line + b"\n")
                    log.error("a damaged spool line was kept in %s", damaged)
                    continue
                try:
                    write(batch)
                except Exception as exc:
                    if not is_down(exc):
                        raise
                    with self.own.open("ab") as file:  # keep the rest, in order, for the next try
                        file.write(b"\n".join(lines[index:]) + b"\n")
                    claimed.unlink()
                    return False
            claimed.unlink()
            log.info("replayed %d spooled batches from %s", len(lines), path.name)
        return True
