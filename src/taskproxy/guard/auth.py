"""Proxy keys: issuing them, and knowing who is calling without asking the database.

Keys look like `tp-<43 url-safe characters>` (256 bits). Only their SHA-256 is stored: the keys are
random, so a fast hash is enough and lookups stay cheap. Each process keeps every key's hash in
memory the keys it has seen lately, at most `auth.key_cache_size` (least recently used dropped
first); a key not held (new, or dropped) costs one lookup by its hash in a worker thread, and an
unknown one is remembered as unknown for a refresh interval (bounded too). Every
`auth.key_refresh_seconds` the process reads the change feed (storage/changes.py) and re-reads just the
keys that changed, so revocations and bindings made through another process take effect within that
interval, and those made through this process at once. A team's size for the privacy floor is
counted once at start and recounted for a team when one of its keys changes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cachetools import LRUCache, TTLCache
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers

from taskproxy import privacy
from taskproxy.config import PROXY_KEY_PREFIX
from taskproxy.errors import Forbidden, InvalidApiKey, InvalidRequest, NotFound, ServiceUnavailable
from taskproxy.guard.lookups import Lookups, LookupTimeout
from taskproxy.storage import repo
from taskproxy.storage.failures import RETRY_SECONDS
from taskproxy.timeutil import utcnow
from taskproxy.bodies import NewKey, parse

log = logging.getLogger("taskproxy.auth")

BOOTSTRAP_ADMIN_ID = "admin"
KEY_PREFIX = PROXY_KEY_PREFIX
# What issue_key makes; anything else cannot be a key in the table, so it is refused without a lookup.
_KEY_SHAPE = re.compile(r"tp-[A-Za-z0-9_-]{43}")
MISSING_KEY_MESSAGE = (
    "No proxy key was sent. Send your taskproxy key as 'Authorization: Bearer tp-...' "
    "(the SDK's api_key) or as 'x-api-key'. An admin creates keys with 'taskproxy keys create'."
)

NO_TEAM = ""  # where the people without a team are counted (no team is named "")


@dataclass(frozen=True, slots=True)
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
    """The key's sha256 as the table keeps it (hex)."""
    return _digest(token).hex()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _held_as(key_hash: str) -> bytes | None:
    """A stored key hash as the cache holds it (32 bytes); None for a row whose hash is not one."""
    try:
        return bytes.fromhex(key_hash)
    except (TypeError, ValueError):
        return None


def _principal(row: Row) -> Principal:
    # A team's and a role's name are shared by many keys: held once, not once per cached key.
    team = None if row.team is None else sys.intern(row.team)
    return Principal(row.id, row.owner, team, sys.intern(row.role), row.bound_work_item, row.bound_until)


def issue_key(engine: Engine, *, owner: object, team: object = None, role: object = "developer") -> tuple[Row, str]:
    """Create a key; the plaintext is returned once and never stored. Used by the API and the CLI."""
    new = parse(NewKey, {"owner": owner, "team": team, "role": role})
    owner, team, role = new.owner, new.team, new.role
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    row = {"id": "key_" + uuid.uuid4().hex[:12], "key_hash": hash_key(token), "prefix": token[:7], "owner": owner,
           "person": privacy.person_of(owner), "team": team, "role": role, "created_at": utcnow()}  # fmt: skip
    return repo.insert_key(engine, row), token


def revoke(engine: Engine, key_id: str) -> Row:
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
        row = {"id": BOOTSTRAP_ADMIN_ID, "key_hash": digest, "prefix": admin_key[:7], "owner": "admin", "person": "admin", "team": None,
               "role": "admin", "created_at": utcnow()}  # fmt: skip
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


class KeyStore:
    def __init__(self, engine: Engine, *, admin_key: str | None, refresh_seconds: float = 5.0, capacity: int = 20_000) -> None:
        self._engine = engine
        self._admin_key = admin_key
        # By the key's sha256 as 32 bytes, not the 64-character hex the table keeps: 20,000 keys held
        # 7.7 MiB instead of 8.3 (measured on the seed).
        self._by_hash: LRUCache[bytes, Principal] = LRUCache(capacity)
        self._unknown: TTLCache[bytes, bool] = TTLCache(max(1, capacity // 4), ttl=refresh_seconds)
        self._lock = threading.Lock()  # used from the event loop and from worker threads
        self._lookups = Lookups("key")  # keys not in memory (guard/lookups.py)
        self._team_sizes: dict[str, int] = {}  # people with a live key, per team (the privacy floor uses it)

    def __len__(self) -> int:
        return len(self._by_hash) + len(self._unknown)

    def close(self) -> None:
        self._lookups.close()

    def warm(self) -> None:
        """Count each team's people, and hold the newest keys (blocking; run it in a thread)."""
        with self._engine.connect() as connection:
            sizes = privacy.team_sizes(connection)
            sizes[NO_TEAM] = privacy.people_without_team(connection)
        held = [(row.key_hash, _principal(row)) for row in repo.newest_live_keys(self._engine, int(self._by_hash.maxsize))]
        with self._lock:
            self._team_sizes = sizes
            for key_hash, principal in reversed(held):
                if (digest := _held_as(key_hash)) is not None:
                    self._by_hash[digest] = principal

    def refresh(self, changed: set[str]) -> int:
        """Re-read the keys the change feed names (blocking): revoked ones are dropped, bindings updated,
        the teams they belong to recounted. Returns how many keys were re-read."""
        if not changed:
            return 0
        rows = repo.keys_by_id(self._engine, changed)
        teams = {row.team for row in rows if row.team is not None}
        with self._engine.connect() as connection:
            sizes = {team: privacy.team_size(connection, team) for team in teams}
            if any(row.team is None for row in rows):
                sizes[NO_TEAM] = privacy.people_without_team(connection)
        with self._lock:
            for row in rows:
                digest = _held_as(row.key_hash)
                if digest is None:
                    continue
                self._unknown.pop(digest, None)
                if digest in self._by_hash:
                    if row.revoked_at is None:
                        self._by_hash[digest] = _principal(row)
                    else:
                        del self._by_hash[digest]
            if any(self._team_sizes.get(team) != size for team, size in sizes.items()):
                self._team_sizes = {**self._team_sizes, **sizes}  # replaced, never changed: see `team_sizes`
        return len(rows)

    def forget_all(self) -> None:
        with self._lock:
            self._by_hash.clear()
            self._unknown.clear()

    async def authenticate(self, headers: Headers) -> Principal:
        token = presented_key(headers)
        if token is None:
            raise InvalidApiKey(MISSING_KEY_MESSAGE)
        digest = _digest(token)
        with self._lock:
            principal = self._by_hash.get(digest)
            unknown = digest in self._unknown
        if principal is not None:
            return principal
        if self._admin_key is not None and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._admin_key.encode()):
            return Principal(BOOTSTRAP_ADMIN_ID, "admin", None, "admin")
        if not _KEY_SHAPE.fullmatch(token) or unknown:
            raise InvalidApiKey("The proxy key is not valid: unknown or revoked.")
        try:
            row = await self._lookups.run(repo.find_key_by_hash, self._engine, digest.hex())
        except (SQLAlchemyError, LookupTimeout):
            raise ServiceUnavailable("The key could not be checked: the database does not answer. Try again shortly.", retry_after=RETRY_SECONDS) from None
        with self._lock:
            if row is None or row.revoked_at is not None:
                self._unknown[digest] = True
                raise InvalidApiKey("The proxy key is not valid: unknown or revoked.")
            principal = self._by_hash[digest] = _principal(row)
        return principal

    def team_sizes(self) -> Mapping[str, int]:
        """People per team (NO_TEAM: the people without one). Replaced whole when a size changes, so a
        caller may keep what it read and know it is unchanged by its identity."""
        return self._team_sizes

    # Blocking: the routes run these in their lanes' threads (routes/lanes.py), never the event loop's.
    def issue(self, *, owner: object, team: object = None, role: object = "developer") -> tuple[Row, str]:
        """Create a key (as `issue_key`); its owner counts for the team in this process at once."""
        key, token = issue_key(self._engine, owner=owner, team=team, role=role)
        self.refresh({key.id})  # its team's size counts it at once
        return key, token

    def revoke(self, key_id: str) -> Row:
        """Revoke a key (as `revoke`); this process refuses it at once, and no refresh brings it back."""
        key = revoke(self._engine, key_id)
        self.forget(key_id)
        return key

    def forget(self, key_id: str) -> None:
        """Drop a revoked key from memory at once (call it once the revocation is committed)."""
        self.refresh({key_id})

    def bind(self, principal: Principal, work_item: str | None, ttl_hours: float) -> datetime | None:
        until = utcnow() + timedelta(hours=ttl_hours) if work_item else None
        repo.set_binding(self._engine, principal.key_id, work_item, until)
        self.refresh({principal.key_id})
        return until
