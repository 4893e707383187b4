"""Dashboard sessions: a signed cookie holding a key id and when it was signed — never the key.

The cookie is signed by itsdangerous (HMAC-SHA256, with a timestamp checked against the session's
lifetime). The secret is derived from the bootstrap admin key (`TASKPROXY_ADMIN_KEY`) when it is set,
so every replica and worker accepts the others' cookies and a change of the admin key ends every
session; without it, each process draws a random secret when it starts, and a session only works on
the process that issued it (and ends when it restarts).

The cookie is HttpOnly, SameSite=Lax, scoped to /dashboard, and Secure when the request came over
https. On every page the key id is looked up again, so a revoked key's session ends at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import BadSignature, TimestampSigner
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.guard.auth import Principal
from taskproxy.settings import Settings
from taskproxy.storage import repo

COOKIE = "taskproxy_session"
COOKIE_PATH = "/dashboard"
LIFETIME_SECONDS = 8 * 3600
_SALT = b"taskproxy dashboard session v1"
MAX_COOKIE_CHARS = 512


class _Signer(TimestampSigner):
    def __init__(self, secret: bytes, clock: Callable[[], float]) -> None:
        super().__init__(secret, salt=_SALT, digest_method=hashlib.sha256)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class SessionSigner:
    """Signs a key id into a cookie value and reads it back while it is fresh; one per app."""

    def __init__(self, secret: bytes, *, lifetime: float = LIFETIME_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self._signer = _Signer(secret, clock)
        self.lifetime = lifetime

    @classmethod
    def for_settings(cls, settings: Settings) -> SessionSigner:
        """Signed with the admin key when there is one (shared by replicas), else a random secret."""
        secret = settings.admin_key.get_secret_value().encode("utf-8", "surrogatepass") if settings.admin_key else secrets.token_bytes(32)
        return cls(secret)

    def sign(self, key_id: str) -> str:
        return self._signer.sign(key_id).decode("ascii")

    def verify(self, value: str | None) -> str | None:
        """The key id of a valid, unexpired cookie value; None for anything else."""
        if not value or len(value) > MAX_COOKIE_CHARS or not value.isascii():
            return None
        try:
            return self._signer.unsign(value, max_age=self.lifetime).decode("utf-8")
        except (BadSignature, UnicodeDecodeError):  # SignatureExpired is a BadSignature
            return None


@dataclass(frozen=True)
class Session:
    principal: Principal
    prefix: str  # the key's first characters, to recognise it


def load_principal(engine, key_id: str) -> Session | None:  # type: ignore[no-untyped-def]
    """The key behind a session, read again from the database (blocking): None if revoked or gone."""
    row = repo.get_key(engine, key_id)
    if row is None or row.revoked_at is not None:
        return None
    return Session(Principal(row.id, row.owner, row.team, row.role, row.bound_work_item, row.bound_until), row.prefix)


def set_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        COOKIE, value, max_age=LIFETIME_SECONDS, path=COOKIE_PATH, httponly=True, samesite="lax", secure=request.url.scheme == "https"
    )


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax", secure=request.url.scheme == "https")
