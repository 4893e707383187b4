"""Each process's key cache: a revocation is never undone by a reload that read the table before it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from taskproxy.errors import InvalidApiKey
from taskproxy.guard import auth
from taskproxy.guard.auth import KeyStore, issue_key, revoke
from taskproxy.storage.db import make_engine, prepare_schema

pytestmark = pytest.mark.anyio


async def test_a_reload_that_read_before_a_revocation_never_brings_the_key_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    prepare_schema(engine)
    key, token = issue_key(engine, owner="dana", team="payments")
    keys = KeyStore(engine, admin_key=None)
    keys.load()
    bearer = Headers({"authorization": f"Bearer {token}"})
    assert (await keys.authenticate(bearer)).key_id == key.id

    read, resume = threading.Event(), threading.Event()
    list_keys = auth.repo.list_keys

    def slow_read(engine):  # type: ignore[no-untyped-def]
        rows = list_keys(engine)  # the table as it is before the revocation commits ...
        read.set()
        resume.wait(5)  # ... and the reload is slow to swap it in
        return rows

    monkeypatch.setattr(auth.repo, "list_keys", slow_read)
    reload = threading.Thread(target=keys.load)
    reload.start()
    assert read.wait(5)
    revoke(engine, key.id)  # what DELETE /api/keys/{id} does: commit, then drop it from memory
    keys.forget(key.id)
    resume.set()
    reload.join(5)
    with pytest.raises(InvalidApiKey):
        await keys.authenticate(bearer)
    monkeypatch.setattr(auth.repo, "list_keys", list_keys)
    keys.load()  # the next reload reads the revocation itself
    with pytest.raises(InvalidApiKey):
        await keys.authenticate(bearer)
    engine.dispose()
