"""Reports over a whole period run in a process of their own, not in the one that serves requests.

On an organisation's scale a period is most of its work: the adoption report over 30 days of the seed
organisation (bench/seed_org.py) holds 939 MiB at its peak and the signals 2.4 GiB, for 34 and 68 s,
mostly Python. In the serving process that memory stays after the report (588 and 776 MiB were still
held, glibc trimmed), and the report takes the GIL from the event loop while it runs. So each report
runs in a child process forked from multiprocessing's fork server, which has the report modules
imported: it starts in milliseconds, opens its own connection, hands back only what the route sends
(the encoded answer, or the figures a page shows) and gives all its memory back when it exits. A
child killed on its way (the kernel's OOM killer, an operator) fails that report alone, with a 503;
a client that hangs up stops its child, which cancels its query; the query of a child killed outright
is ended by PostgreSQL, which checks every second that the report's process is still there; at most
`REPORTS_AT_ONCE` run at a time, the rest wait.

A database a child cannot open (SQLite in memory) runs the reports in a worker thread, as before. So
does a report whose process cannot start (the fork server needs a writable temporary directory for
its socket): the next report tries again, since a thread keeps the report's memory in the serving
process; a warning says when reports fall back, and when they run in processes again.
"""

from __future__ import annotations

import asyncio

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

import anyio
from sqlalchemy.engine import Engine

from taskproxy.errors import ServiceUnavailable
from taskproxy.storage.db import ReportSession
from taskproxy.memory import collector_paused

log = logging.getLogger("taskproxy.reports")

REPORTS_AT_ONCE = 2  # children computing at once, per serving process; more requests wait their turn
STOP_WAIT_SECONDS = 5.0  # at shutdown, for the children stopped to cancel their queries and end
CLIENT_CHECK_MS = 1000  # PostgreSQL checks this often that a report's process is alive while its query runs
# Imported once by the fork server, so a child starts with them.
PRELOADED = ["taskproxy.reports.runner", "taskproxy.reports.adoption", "taskproxy.reports.signals", "taskproxy.reports.snapshots", "taskproxy.dashboard.data"]


def child_database_url(engine: Engine) -> str | None:
    """The URL another process opens the same database with; None when it cannot (SQLite in memory)."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    return url.render_as_string(hide_password=False)


def _compute(
    pipe: Connection, database_url: str, session: ReportSession, function: Callable[..., Any], kwargs: dict[str, Any], encode: Callable[[Any], Any] | None
) -> None:
    """In the child: run the report on an engine of its own and send back ("ok", answer, "") or ("error",
    exc, its traceback).
    Stopped by SIGTERM (the client hung up, the server is stopping, an operator), it first cancels its
    query, which the database would otherwise run to the end for nobody, outside `REPORTS_AT_ONCE`."""
    from taskproxy.storage.db import make_engine, query_canceller

    # Killed outright (the OOM killer, SIGKILL), the child cannot cancel its query: the server then
    # ends it within CLIENT_CHECK_MS of the child's death.
    engine = make_engine(database_url, client_check_ms=CLIENT_CHECK_MS, report=session)
    cancel_queries = query_canceller(engine)
    if cancel_queries is not None:  # else SIGTERM's default: the process ends at once

        def stop(signum: int, _frame: object) -> None:
            signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM (the server's shutdown sends two) waits for this one
            cancel_queries()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # ends as SIGTERM would have, which the serving process reports

        signal.signal(signal.SIGTERM, stop)
    try:
        with collector_paused():  # this process builds the report and ends
            answer = function(engine, **kwargs)
        message: tuple[str, Any, str] = ("ok", answer if encode is None else encode(answer), "")
    except Exception as exc:  # noqa: BLE001  (sent to the serving process, which answers the request with it)
        message = ("error", _portable(exc), traceback.format_exc())  # the serving process logs the traceback
    finally:
        engine.dispose()
    try:
        pipe.send(message)
    except Exception as exc:  # noqa: BLE001  (an answer that cannot be pickled: a description goes instead)
        pipe.send(("error", RuntimeError(f"The report's process could not send back its answer ({exc.__class__.__name__}: {exc})."), ""))
    finally:
        pipe.close()


def _portable(error: Exception) -> Exception:
    """`error` if the serving process can rebuild it, else a RuntimeError that says what it was. (An
    exception is pickled as its class and `args`; one whose constructor wants more fails only when
    unpickled, in the serving process, as a TypeError that would hide it.)"""
    try:
        pickle.loads(ForkingPickler.dumps(error))
    except Exception as problem:  # noqa: BLE001
        return RuntimeError(f"{error.__class__.__name__}: {error} (it could not be sent back as it was: {problem.__class__.__name__}: {problem})")
    return error


def _ended_by(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class ReportRunner:
    """Runs `function(engine, **kwargs)` in a child process and returns what it returned (or `encode`
    of it, computed in the child). `session`: what the child's transactions set for themselves
    (storage/db.ReportSession); a report run in a worker thread uses the serving engine as it is."""

    def __init__(self, engine: Engine, *, at_once: int = REPORTS_AT_ONCE, session: ReportSession = ReportSession()) -> None:  # noqa: B008  (frozen)
        self._engine = engine
        self._url = child_database_url(engine)
        self._session = session
        self._limiter = anyio.CapacityLimiter(at_once)
        self._context: BaseContext | None = None
        self._running: set[BaseProcess] = set()
        self._running_lock = threading.Lock()  # close() reads the set from a worker thread while runs end on the loop
        self._in_threads = False  # the last report could not start a process: said once, until one can

    def _start(self, starting: _Starting, *args: Any) -> tuple[BaseProcess, Connection]:
        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOADED)  # type: ignore[attr-defined]
        receiving, sending = self._context.Pipe(duplex=False)
        try:
            process = self._context.Process(target=_compute, args=(sending, *args), name="taskproxy-report", daemon=True)  # type: ignore[attr-defined]
            process.start()
            with self._running_lock:  # counted at once: close() waits for it, abandoned or not
                self._running.add(process)
            starting.started(process, receiving)
        except BaseException:
            receiving.close()
            raise
        finally:
            sending.close()  # the child holds the other end: its exit ends the parent's read
        return process, receiving

    async def _in_thread(self, function: Callable[..., Any], encode: Callable[[Any], Any] | None, kwargs: dict[str, Any]) -> Any:
        answer = await anyio.to_thread.run_sync(lambda: function(self._engine, **kwargs))
        return answer if encode is None else encode(answer)

    async def run(self, function: Callable[..., Any], *, encode: Callable[[Any], Any] | None = None, **kwargs: Any) -> Any:
        if self._url is None:
            return await self._in_thread(function, encode, kwargs)
        async with self._limiter:
            starting = _Starting()
            try:
                process, receiving = await anyio.to_thread.run_sync(self._start, starting, self._url, self._session, function, kwargs, encode)
            except asyncio.CancelledError:  # the client left while the process was starting: it is stopped once it has
                starting.abandon()
                raise
            except OSError as exc:  # no fork server (no writable temporary directory for its socket, no fork, a full disk)
                if not self._in_threads:
                    log.warning("a report cannot run in a process of its own (%s); reports run in a worker thread until one can", exc)
                    self._in_threads = True
                # The next report tries again (multiprocessing restarts a fork server that is not running):
                # the cause may pass, and a thread holds on to the report's memory in the serving process.
                return await self._in_thread(function, encode, kwargs)
            if self._in_threads:
                log.warning("reports run in a process of their own again")
                self._in_threads = False
            with self._running_lock:
                self._running = {running for running in self._running if running is process or running.is_alive()}  # (is_alive reaps those stopped)
            try:
                kind, payload, where = await anyio.to_thread.run_sync(_receive, receiving, abandon_on_cancel=True)
            except EOFError:
                await anyio.to_thread.run_sync(process.join)
                log.error("a report's process ended before it answered (%s)", _ended_by(process))
                raise ServiceUnavailable(
                    f"The report's process ended before it finished ({_ended_by(process)}; out of memory, or stopped). "
                    "Try again, or ask for a shorter period."
                ) from None
            finally:
                if process.is_alive():  # the client hung up, or the server is stopping: the work is not wanted
                    process.terminate()  # and it stays in _running until it has ended (close() waits for it)
                else:
                    with self._running_lock:
                        self._running.discard(process)
                # Closing the pipe while a thread may still read it would be unsafe: the read ends when the
                # child does, and the pipe is closed with it.
        if kind == "error":
            if where:  # added here: some libraries' errors (SQLAlchemy's) drop their notes when pickled
                payload.add_note(f"in the report's process:\n{where}")
            raise payload
        return payload

    def close(self, wait_seconds: float = STOP_WAIT_SECONDS) -> None:
        """Stop the children still computing (the server is stopping), and wait for them to end (blocking):
        a child that claimed a snapshot just before it was stopped must be gone before the process lets
        go of its claims, or the claim it made would be held, by nobody, until it runs out."""
        with self._running_lock:
            stopping = [process for process in self._running if process.is_alive()]
        for process in stopping:
            process.terminate()
        deadline = time.monotonic() + wait_seconds
        for process in stopping:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # its query would not cancel: the server ends it when the connection goes
                process.kill()
                process.join(1.0)
        with self._running_lock:
            self._running.clear()


class _Starting:
    """A report process being started in a worker thread, for a request that may be cancelled meanwhile:
    a process started for a request already gone was never stopped nor counted (abandoned requests left
    report processes computing for nobody, more at once than `REPORTS_AT_ONCE`). Whichever of the
    two sides comes second stops it: the thread notes the process then looks for the abandonment, the
    request notes the abandonment then looks for the process (under the GIL, one sees the other)."""

    def __init__(self) -> None:
        self.process: BaseProcess | None = None
        self.receiving: Connection | None = None
        self.abandoned = False

    def started(self, process: BaseProcess, receiving: Connection) -> None:
        self.process, self.receiving = process, receiving
        if self.abandoned:
            self._stop()

    def abandon(self) -> None:
        self.abandoned = True
        if self.process is not None:
            self._stop()

    def _stop(self) -> None:
        assert self.process is not None and self.receiving is not None
        self.process.terminate()
        self.receiving.close()  # nobody will read its answer


def _receive(pipe: Connection) -> tuple[str, Any, str]:
    try:
        return pipe.recv()  # type: ignore[no-any-return]
    finally:
        pipe.close()
