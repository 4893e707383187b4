"""What a database error means, the one place that reads one (SQLSTATE, SQLite's error name).

Two questions are asked of it, with different care:

- **The writer's: can the batch wait?** (`database_down`) Spooling on any doubt costs nothing (a
  replay writes nothing twice), so every operational failure counts, and so does a server that takes
  no writes (a standby after a failover); only rows the database refuses for themselves are not.
- **A client's: is it worth trying again?** (`unavailable`) A 503 says the database cannot serve now
  and hides the error's traceback, so only what is the database's state, not a bug, is: a connection
  that failed or was dropped, a server shutting down, starting, full of connections or read-only, a
  pool with no connection to give, SQLite's file locked or unwritable. A missing table or a deadlock
  stays a 500 with its traceback.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# Retry-After on a 503 for a database that cannot serve now: every such refusal says it, on the model
# routes (a key or an item that could not be checked, usage that cannot be recorded) as on the admin API.
RETRY_SECONDS = 5
READ_ONLY_TRANSACTION = "25006"  # PostgreSQL's SQLSTATE for a write to a server that takes none
LOCK_NOT_AVAILABLE = "55P03"  # a lock not granted within lock_timeout
QUERY_CANCELED = "57014"  # statement_timeout, or an operator's pg_cancel_backend
CHECK_VIOLATION = "23514"
# Connection exceptions (class 08), the server shutting down or starting (57P01-57P03), too many
# connections (53300), read-only.
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300", READ_ONLY_TRANSACTION)
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_FULL", "SQLITE_IOERR")


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a database error (psycopg 3 or psycopg2), or None."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def database_down(exc: BaseException) -> bool:
    """The database cannot take the batch (spool and retry), as opposed to refusing a row. A pool with
    no connection to give within its timeout counts too: each of them waits on a database gone silent."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or sqlstate(exc) == READ_ONLY_TRANSACTION or _month_attached_meanwhile(exc))


def _month_attached_meanwhile(exc: DBAPIError) -> bool:
    """A row routed to the default partition while its month was being attached (storage/partitions.py):
    PostgreSQL then checks it against the default's new constraint and refuses it. Nothing is wrong with
    the row; written again, it goes to its month (the batch had been set aside as refused)."""
    return sqlstate(exc) == CHECK_VIOLATION and "partition constraint" in str(exc.orig)


def unavailable(exc: BaseException) -> str | None:
    """What a client is told when the database cannot serve its request now (a retry may succeed), or
    None when the error is the request's own or a bug."""
    state = sqlstate(exc)
    if state == READ_ONLY_TRANSACTION:
        return "The database takes no writes right now: it answers read-only (a standby after a failover?). Try again shortly."
    if state == QUERY_CANCELED:  # not a bug either, but a retry meets the same timeout: say which it was
        return ("The database cancelled the query: it ran past a statement_timeout (a report's is reports.statement_timeout_seconds), "
                "or an operator cancelled it.")  # fmt: skip
    if not _unavailable(exc, state):
        return None
    return f"The database cannot be reached right now ({exc.__class__.__name__}). Try again shortly."


def _unavailable(exc: BaseException, state: str | None) -> bool:
    if isinstance(exc, InterfaceError | PoolTimeout) or isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    if state is not None:
        return state.startswith("08") or state in _UNAVAILABLE_STATES
    name = getattr(exc.orig, "sqlite_errorname", None)  # SQLite's own error name (extended: SQLITE_IOERR_WRITE)
    if name is not None:
        return "_".join(name.split("_")[:2]) in _SQLITE_UNAVAILABLE
    return True  # no SQLSTATE: the connection failed before the server said anything, or a write went unanswered
