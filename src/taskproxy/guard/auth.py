"""Proxy keys: issuing them, and knowing who is calling without asking the database.

Keys look like `tp-<43 url-safe characters>` (256 bits). Only their SHA-256 is stored: the keys are
random, so a fast hash is enough and lookups stay cheap. Each process keeps every key's hash in
memory and reloads the table every `auth.key_refresh_seconds`; a key not in memory (created a moment
ago by another process or the CLI) costs one lookup in a worker thread, and an unknown one is
remembered as unknown for the same interval. Revocations and bindings made through another process
therefore take effect within that interval; those made through this process, at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import anyio
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers

from taskproxy.privacy import counts_as_person
from taskproxy.errors import Forbidden, InvalidApiKey, InvalidRequest, NotFound, ServiceUnavailable
from taskproxy.storage import repo
from taskproxy.storage.models import ApiKey
from taskproxy.timeutil import utcnow
from taskproxy.bodies import NewKey, parse

log = logging.getLogger("taskproxy.auth")

BOOTSTRAP_ADMIN_ID = "admin"
KEY_PREFIX = "tp-"
# What issue_key makes; anything else cannot be a key in the table, so it is refused without a lookup.
_KEY_SHAPE = re.compile(r"tp-[A-Za-z0-9_-]{43}")
MISSING_KEY_MESSAGE = (
    "No proxy key was sent. Send your taskproxy key as 'Authorization: Bearer tp-...' "
    "(the SDK's api_key) or as 'x-api-key'. An admin creates keys with 'taskproxy keys create'."
)


@dataclass(frozen=True)
class Principal:
    key_id: str
    owner: str
    team: str | None
    role: str
    bound_work_item: str | None = None
    bound_until: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def binding(self, now: datetime) -> str | None:
        if self.bound_work_item and self.bound_until and self.bound_until > now:
            return self.bound_work_item
        return None

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden(f"This route needs an admin key; the key of {self.owner!r} has the role {self.role!r}.")


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _principal(row: ApiKey) -> Principal:
    return Principal(row.id, row.owner, row.team, row.role, row.bound_work_item, row.bound_until)


def issue_key(engine: Engine, *, owner: object, team: object = None, role: object = "developer") -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and never stored. Used by the API and the CLI."""
    new = parse(NewKey, {"owner": owner, "team": team, "role": role})
    owner, team, role = new.owner, new.team, new.role
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id="key_" + uuid.uuid4().hex[:12],
        key_hash=hash_key(token),
        prefix=token[:7],
        owner=owner,
        team=team,
        role=role,
        created_at=utcnow(),
    )
    return repo.insert_key(engine, row), token


def revoke(engine: Engine, key_id: str) -> ApiKey:
    """Revoke a key by id. Used by the API and the CLI."""
    if key_id == BOOTSTRAP_ADMIN_ID:
        raise InvalidRequest("The bootstrap admin key comes from TASKPROXY_ADMIN_KEY; change that variable to replace it.")
    key = repo.revoke_key(engine, key_id, utcnow())
    if key is None:
        raise NotFound(f"No key with id {key_id[:64]!r}.")
    return key


def ensure_bootstrap_admin(engine: Engine, admin_key: str) -> None:
    """Keep a row for the TASKPROXY_ADMIN_KEY key, so its usage and binding are recorded like any key's."""
    existing = repo.get_key(engine, BOOTSTRAP_ADMIN_ID)
    digest = hash_key(admin_key)
    if existing is None:
        row = ApiKey(id=BOOTSTRAP_ADMIN_ID, key_hash=digest, prefix=admin_key[:7], owner="admin", team=None, role="admin", created_at=utcnow())
        try:
            repo.insert_key(engine, row)
        except SQLAlchemyError:  # another worker inserted it first
            pass
    elif existing.key_hash != digest or existing.revoked_at is not None:
        repo.replace_key_hash(engine, BOOTSTRAP_ADMIN_ID, digest, admin_key[:7])


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or None


def _count_person(team_owners: dict[str, set[str]], principal: Principal) -> None:
    if counts_as_person(principal.role, principal.team):
        team_owners.setdefault(principal.team, set()).add(principal.owner)  # type: ignore[arg-type]


class KeyStore:
    def __init__(self, engine: Engine, *, admin_key: str | None, refresh_seconds: float = 5.0) -> None:
        self._engine = engine
        self._admin_key = admin_key
        self._refresh_seconds = refresh_seconds
        self._by_hash: dict[str, Principal] = {}
        self._unknown: dict[str, float] = {}
        # Lookups of keys not in memory get their own few threads: a flood of made-up keys cannot
        # take the threads the rest of the app needs.
        self._lookups = anyio.CapacityLimiter(4)
        self._team_owners: dict[str, set[str]] = {}  # people with a live key, per team (the privacy floor uses it)
        # Bumped by every change made through this process (a revocation, a binding): a reload that
        # read the table before such a change is dropped, never swapped in over it.
        self._changes = 0
        self._swap = threading.Lock()

    def load(self) -> None:
        """Reload every key from the database (blocking; run it in a thread)."""
        changes = self._changes
        by_hash = {row.key_hash: _principal(row) for row in repo.list_keys(self._engine) if row.revoked_at is None}
        team_owners: dict[str, set[str]] = {}
        for principal in by_hash.values():
            _count_person(team_owners, principal)
        with self._swap:
            if changes != self._changes:  # read before a local change committed: stale, the next reload is not
                return
            # Swapped in only when changed: an unchanged copy is freed at once, rather than replacing
            # long-lived objects every few seconds among the requests' short-lived ones (heap churn).
            if by_hash != self._by_hash:
                self._by_hash = by_hash
            if team_owners != self._team_owners:
                self._team_owners = team_owners
            self._unknown.clear()


    async def authenticate(self, headers: Headers) -> Principal:
        token = presented_key(headers)
        if token is None:
            raise InvalidApiKey(MISSING_KEY_MESSAGE)
        digest = hash_key(token)
        principal = self._by_hash.get(digest)
        if principal is not None:
            return principal
        if self._admin_key is not None and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._admin_key.encode()):
            return self._by_hash.setdefault(digest, Principal(BOOTSTRAP_ADMIN_ID, "admin", None, "admin"))
        if not _KEY_SHAPE.fullmatch(token) or self._unknown.get(digest, 0.0) > time.monotonic():
            raise InvalidApiKey("The proxy key is not valid: unknown or revoked.")
        try:
            row = await anyio.to_thread.run_sync(repo.find_key_by_hash, self._engine, digest, limiter=self._lookups)
        except SQLAlchemyError:
            raise ServiceUnavailable("The key could not be checked: the database does not answer. Try again shortly.") from None
        if row is None or row.revoked_at is not None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + self._refresh_seconds
            raise InvalidApiKey("The proxy key is not valid: unknown or revoked.")
        principal = _principal(row)
        self._by_hash[digest] = principal
        self._count_person(principal)
        return principal

    def _count_person(self, principal: Principal) -> None:
        _count_person(self._team_owners, principal)

    def team_size(self, team: str | None) -> int:
        return len(self._team_owners.get(team or "", ()))

    async def issue(self, *, owner: object, team: object = None, role: object = "developer") -> tuple[ApiKey, str]:
        """Create a key (as `issue_key`); its owner counts for the team in this process at once."""
        key, token = await anyio.to_thread.run_sync(lambda: issue_key(self._engine, owner=owner, team=team, role=role))
        self._count_person(_principal(key))
        return key, token

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (as `revoke`); this process refuses it at once, and no reload brings it back."""
        key = await anyio.to_thread.run_sync(revoke, self._engine, key_id)
        self.forget(key_id)
        return key

    def forget(self, key_id: str) -> None:
        """Drop a revoked key from memory at once (call it once the revocation is committed)."""
        with self._swap:
            self._changes += 1
            self._by_hash = {h: p for h, p in self._by_hash.items() if p.key_id != key_id}

    async def bind(self, principal: Principal, work_item: str | None, ttl_hours: float) -> datetime | None:
        until = utcnow() + timedelta(hours=ttl_hours) if work_item else None
        await anyio.to_thread.run_sync(repo.set_binding, self._engine, principal.key_id, work_item, until)
        updated = replace(principal, bound_work_item=work_item, bound_until=until)
        with self._swap:
            self._changes += 1
            for digest, known in list(self._by_hash.items()):
                if known.key_id == principal.key_id:
                    self._by_hash[digest] = updated
        return until
