"""Proxied requests the proxy must refuse before the provider, each with the status and code it gets:
one list for the in-process tests (test_proxy_openai.py) and the real server's (test_serve_process.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

ASK = [{"role": "user", "content": "Refactor the refund handler."}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": ASK, **extra}


@dataclass(frozen=True)
class Refused:
    headers: dict[str, str]  # besides the key
    status: int
    code: str
    json: Any = None
    content: bytes | None = None  # sent as is, instead of `json`

    def request(self) -> dict[str, Any]:
        """httpx's arguments for the body."""
        return {"content": self.content} if self.content is not None else {"json": self.json}


REFUSED = [
    pytest.param(Refused({}, 400, "work_item_required", chat()), id="no-work-item"),
    pytest.param(Refused({"X-Git-Branch": "main"}, 400, "work_item_required", chat()), id="branch-without-item"),
    pytest.param(Refused({"X-Work-Item": "not a ticket"}, 400, "work_item_invalid", chat()), id="not-a-ticket"),
    pytest.param(Refused({"X-Work-Item": "1; DROP TABLE usage_events;--"}, 400, "work_item_invalid", chat()), id="sql-ish-item"),
    pytest.param(Refused({"X-Work-Item": "../../etc/passwd"}, 400, "work_item_invalid", chat()), id="path-traversal-header"),
    pytest.param(Refused({}, 400, "work_item_invalid", chat(metadata={"work_item": "PROJ-1\u0000"})), id="control-char-in-body-item"),
    pytest.param(Refused({}, 400, "work_item_invalid", chat(metadata={"work_item": "P" * 201 + "-1"})), id="overlong-item"),
    pytest.param(Refused({}, 400, "work_item_invalid", chat(metadata={"work_item": 123})), id="item-as-number"),
    pytest.param(Refused({"X-Work-Item": "BAD-5"}, 404, "model_not_found", chat(model="gpt-9-unknown")), id="unknown-model"),
    pytest.param(Refused({"X-Work-Item": "BAD-2"}, 400, "invalid_request", chat(messages="hello")), id="messages-as-string"),
    pytest.param(Refused({"X-Work-Item": "BAD-3"}, 400, "invalid_request", {"model": "gpt-4o-mini"}), id="no-messages"),
    pytest.param(Refused({"X-Work-Item": "BAD-3"}, 400, "invalid_request", chat(model=42)), id="model-as-number"),
    pytest.param(Refused({"X-Work-Item": "BAD-7"}, 400, "invalid_request", chat(stream="yes")), id="stream-as-string"),
    pytest.param(Refused({"X-Work-Item": "BAD-4"}, 400, "invalid_request", ["not", "an", "object"]), id="array-body"),
    pytest.param(Refused({"X-Work-Item": "BAD-1"}, 400, "invalid_request", content=b'{"model": "gpt-4o-mini", "messages": ['), id="malformed-json"),
    pytest.param(Refused({"X-Work-Item": "BAD-6"}, 400, "invalid_request", content=b""), id="empty-body"),
]
