"""Dashboard sessions: a signed cookie holding a key id and an expiry — never the key.

Signing is HMAC-SHA256 (stdlib). The secret is derived from the bootstrap admin key
(`TASKPROXY_ADMIN_KEY`) when it is set, so every replica and worker accepts the others' cookies and a
change of the admin key ends every session; without it, each process draws a random secret at its
first dashboard request, and a session only works on the process that issued it (and ends when
it restarts).

The cookie is HttpOnly, SameSite=Lax, scoped to /dashboard, and Secure when the request came over
https. On every page the key id is looked up again, so a revoked key's session ends at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from taskproxy.guard.auth import Principal
from taskproxy.settings import Settings
from taskproxy.storage import repo

COOKIE = "taskproxy_session"
COOKIE_PATH = "/dashboard"
LIFETIME_SECONDS = 8 * 3600
_CONTEXT = b"taskproxy dashboard session v1"
_lock = threading.Lock()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_secret(settings: Settings) -> bytes | None:
    """The signing secret derived from the admin key, or None when no admin key is configured."""
    if settings.admin_key is None:
        return None
    return hmac.new(settings.admin_key.get_secret_value().encode("utf-8", "surrogatepass"), _CONTEXT, hashlib.sha256).digest()


def secret_for(request: Request, settings: Settings) -> bytes:
    state = request.app.state
    secret: bytes | None = getattr(state, "dashboard_secret", None)
    if secret is None:
        with _lock:
            secret = getattr(state, "dashboard_secret", None)
            if secret is None:
                secret = derive_secret(settings) or secrets.token_bytes(32)
                state.dashboard_secret = secret
    return secret


def sign(secret: bytes, key_id: str, *, now: float | None = None, lifetime: float = LIFETIME_SECONDS) -> str:
    """The cookie value: base64url(JSON {k: key id, e: expiry as Unix seconds}) "." base64url(HMAC)."""
    expires = int((time.time() if now is None else now) + lifetime)
    payload = _b64(orjson.dumps({"k": key_id, "e": expires}))
    mac = hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify(secret: bytes, value: str | None, *, now: float | None = None) -> str | None:
    """The key id of a valid, unexpired cookie value; None for anything else."""
    if not value or len(value) > 512 or value.count(".") != 1:
        return None
    payload, _, mac = value.partition(".")
    expected = hmac.new(secret, payload.encode("ascii", "replace"), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(mac), expected):
            return None
        data = orjson.loads(_unb64(payload))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("k"), str) or not isinstance(data.get("e"), int):
        return None
    if data["e"] <= (time.time() if now is None else now):
        return None
    return data["k"]  # type: ignore[no-any-return]


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
