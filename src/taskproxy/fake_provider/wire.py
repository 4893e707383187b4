"""What every API of the fake provider shares: its words, its deterministic 'tokenizer', and how it
writes JSON, server-sent events and the tool calls an agent's loop expects."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

WORDS = "the proxy counted these tokens against a real work item so the spend can be read as value".split()


STORED_RESPONSES = 1000


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def prompt_tokens_of(body: dict) -> int:
    """The fake's own deterministic 'tokenizer': words of every string in the prompt, plus 7."""
    def words(value: Any) -> int:
        if isinstance(value, str):
            return len(value.split())
        if isinstance(value, list):
            return sum(words(v) for v in value)
        if isinstance(value, dict):
            return sum(words(v) for v in value.values())
        return 0

    return 7 + sum(words(body.get(k)) for k in ("messages", "prompt", "input", "system", "instructions"))


HUGE_PROMPT = 3_000_000_000
OVERLOADED_CACHE_READ = 20_143


def function_call(tools: object, number: int) -> dict:
    """A call of the agent's shell tool (Codex's `exec_command`, else `shell`, else the first function)."""
    names = [t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"] if isinstance(tools, list) else []
    if "exec_command" in names:
        name, arguments = "exec_command", {"cmd": "echo taskproxy"}
    elif "shell" in names or not names:
        name, arguments = "shell", {"command": ["echo", "taskproxy"]}
    else:
        name, arguments = names[0], {}
    return {"type": "function_call", "id": f"fc_fake_{number}", "call_id": f"call_fake_{number}", "name": name,
            "arguments": orjson.dumps(arguments).decode(), "status": "completed"}  # fmt: skip


def has_tool_result(messages: object) -> bool:
    """The conversation's last message answers a tool call (Anthropic's tool_result, OpenAI's function_call_output)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    last = messages[-1]
    content = last.get("content")
    return last.get("type") == "function_call_output" or (
        isinstance(content, list) and any(isinstance(block, dict) and block.get("type") == "tool_result" for block in content))


def reply_words(count: object) -> list[str]:
    n = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 12
    return [WORDS[i % len(WORDS)] for i in range(n)]


def named_event(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\n" + sse(data)
