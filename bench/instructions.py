"""User-space instructions per request of a server process, counted by valgrind's callgrind.

Wall-clock figures on a shared machine drift; instructions do not. `perf stat -e instructions:u`
would read the CPU's counters, but many virtual machines (this one included) do not expose them,
so the server runs under `valgrind --tool=callgrind --instr-atstart=no`: instrumentation is
switched on once the server is up, the counters are zeroed before each window and dumped after
it. The count covers every thread of the process (the event loop, the recording thread, worker
threads) over the window: the requests, and the recording of them (the window ends 0.5 s after
the last answer, two flush intervals of the writer). Under valgrind the server runs ~50× slower,
so windows are counted in requests, not seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

WRAPPER_FLAGS = ["--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", "--compress-strings=no"]


def available() -> str | None:
    """None when callgrind can be used, else why not."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return "valgrind is not installed (Debian: apt-get install valgrind)"
    return None


class Callgrind:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder / f"callgrind-{name}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pid: int | None = None

    def wrapper(self) -> list[str]:
        return ["valgrind", *WRAPPER_FLAGS, f"--callgrind-out-file={self.folder}/out.%p"]

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, timeout=120)

    def attach(self, pid: int) -> None:
        self.pid = pid
        self._control("-i", "on")

    def count(self, run: callable, tail_seconds: float = 0.5) -> int:  # type: ignore[valid-type]
        """Instructions executed by the process while `run()` runs, plus `tail_seconds`."""
        for old in self.folder.glob("out.*.*"):
            old.unlink()
        self._control("-z")
        run()
        time.sleep(tail_seconds)
        self._control("-d")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for dump in self.folder.glob("out.*.*"):
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("summary:") or line.startswith("totals:"):
                        return int(line.split()[1])
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no dump in {self.folder}")
