"""Every client family through a real `taskproxy serve` process: the anthropic SDK (Messages API,
stream and not, count_tokens), the openai SDK on the Responses API, chat translated by litellm to an
Anthropic-kind model, the litellm SDK as a client, and fallbacks. The provider is the fake on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from serve_helpers import ADMIN_KEY, FakeUpstream, ServerProcess, child_env, closed_port, running_server, write_config
from taskproxy.fake_provider import prompt_tokens_of

pytestmark = pytest.mark.serve

OPENAI_KEY, ANTHROPIC_KEY = "sk-openai-provider", "sk-ant-provider"
ASK = [{"role": "user", "content": "Explain the retry policy of the refund worker."}]


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder: Path = tmp_path_factory.mktemp("clients")
    v1 = f"{upstream.url}/v1"
    models = [
        {"name": "gpt-4o-mini", "base_url": v1, "api_key_env": "T_OPENAI_KEY"},
        {"name": "claude", "provider": "anthropic", "base_url": upstream.url, "api_key_env": "T_ANTHROPIC_KEY", "upstream_model": "claude-sonnet-4-5"},
        {"name": "claude-broken", "provider": "anthropic", "base_url": upstream.url, "api_key_env": "T_ANTHROPIC_KEY", "upstream_model": "fake-500"},
        {"name": "primary-down", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "fallbacks": ["gpt-4o-mini"]},
        {"name": "flaky", "base_url": v1, "upstream_model": "fake-500", "fallbacks": ["claude"]},
        {"name": "backup", "base_url": v1, "upstream_model": "gpt-4.1"},
        {"name": "same-target-down", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "upstream_model": "gpt-4.1", "fallbacks": ["backup"]},
    ]
    config = write_config(folder, upstream.url, models=models)
    env = child_env(TASKPROXY_ADMIN_KEY=ADMIN_KEY, T_OPENAI_KEY=OPENAI_KEY, T_ANTHROPIC_KEY=ANTHROPIC_KEY)
    with running_server(config, folder / "server.log", env=env) as running:
        yield running


def claude_client(server: ServerProcess, key: str, work_item: str, *, bearer: bool = False) -> anthropic.Anthropic:
    headers = {"X-Work-Item": work_item}
    if bearer:  # Claude Code with ANTHROPIC_AUTH_TOKEN sends the key as a bearer token
        return anthropic.Anthropic(base_url=server.url, auth_token=key, api_key=None, default_headers=headers, max_retries=0)
    return anthropic.Anthropic(base_url=server.url, api_key=key, default_headers=headers, max_retries=0)


def test_anthropic_sdk_messages_are_relayed_and_recorded_exactly(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key()
    message = claude_client(server, key, "CLAUDE-1").messages.create(model="claude", max_tokens=9, messages=ASK)
    assert message.content[0].text and message.usage.output_tokens == 9

    received = upstream.received[-1]
    assert received["path"] == "/v1/messages" and received["body"]["model"] == "claude-sonnet-4-5"
    assert received["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert received["headers"]["anthropic-version"]  # the SDK's, passed through
    assert "authorization" not in received["headers"] and key not in str(received["headers"]) and "x-work-item" not in received["headers"]

    item = server.work_item("CLAUDE-1", expected_requests=1)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (message.usage.input_tokens, message.usage.output_tokens)
    event = server.events("CLAUDE-1", 1)[0]
    assert (event["route"], event["provider"], event["usage_source"], event["stream"]) == ("/v1/messages", "anthropic", "provider", False)


def test_anthropic_sdk_stream_with_a_bearer_key(server: ServerProcess) -> None:
    client = claude_client(server, server.new_key(), "CLAUDE-2", bearer=True)
    with client.messages.stream(model="claude", max_tokens=7, messages=ASK) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert len(text.split()) == 7
    item = server.work_item("CLAUDE-2", expected_requests=1)
    assert (item["prompt_tokens"], item["completion_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)
    assert server.events("CLAUDE-2", 1)[0]["stream"] is True


def test_anthropic_count_tokens_is_answered_and_bills_nothing(server: ServerProcess, upstream: FakeUpstream) -> None:
    counted = claude_client(server, server.new_key(), "CLAUDE-3").messages.count_tokens(model="claude", messages=ASK)
    assert counted.input_tokens == prompt_tokens_of(upstream.received[-1]["body"])
    event = server.events("CLAUDE-3", 1)[0]
    assert (event["route"], event["total_tokens"], event["cost_usd"]) == ("/v1/messages/count_tokens", 0, 0.0)


def test_anthropic_errors_have_anthropic_shape(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key()
    before = len(upstream.received)
    with pytest.raises(anthropic.BadRequestError) as missing:
        anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0).messages.create(model="claude", max_tokens=5, messages=ASK)
    assert missing.value.body["type"] == "error" and "work item" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude_client(server, key, "CLAUDE-4").messages.create(model="claude-9", max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.AuthenticationError):
        claude_client(server, "tp-wrong", "CLAUDE-4").messages.create(model="claude", max_tokens=5, messages=ASK)
    assert len(upstream.received) == before
    with pytest.raises(anthropic.InternalServerError) as failed:  # the provider's own error, unchanged
        claude_client(server, key, "CLAUDE-4").messages.create(model="claude-broken", max_tokens=5, messages=ASK)
    assert failed.value.body == {"type": "error", "error": {"type": "api_error", "message": "fake provider failure"}}


def test_responses_api_stream_and_not_through_the_openai_sdk(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "CODEX-1"})
    whole = client.responses.create(model="gpt-4o-mini", input="Rename the config loader.", max_output_tokens=5)
    assert whole.output_text and whole.usage.output_tokens == 5
    events = list(client.responses.create(model="gpt-4o-mini", input="Rename it again.", stream=True))
    completed = [e for e in events if e.type == "response.completed"][-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == completed.output_text
    assert upstream.received[-1]["path"] == "/v1/responses" and upstream.received[-1]["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"

    item = server.work_item("CODEX-1", expected_requests=2)
    assert item["prompt_tokens"] == whole.usage.input_tokens + completed.usage.input_tokens
    assert item["completion_tokens"] == whole.usage.output_tokens + completed.usage.output_tokens
    assert {e["usage_source"] for e in server.events("CODEX-1", 2)} == {"provider"}


def test_chat_for_an_anthropic_model_is_translated_with_exact_usage(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "XLATE-1"})
    reply = client.chat.completions.create(model="claude", messages=ASK, max_tokens=6)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 6
    received = upstream.received[-1]
    assert received["path"] == "/v1/messages" and received["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert reply.usage.prompt_tokens == prompt_tokens_of(received["body"])

    chunks = list(client.chat.completions.create(model="claude", messages=ASK, max_tokens=4, stream=True))
    assert chunks and all(c.choices for c in chunks), "the usage chunk reached a client that did not ask for it"
    streamed = list(client.chat.completions.create(model="claude", messages=ASK, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    usage = streamed[-1].usage
    assert usage is not None and usage.completion_tokens == 3

    item = server.work_item("XLATE-1", expected_requests=3)
    assert item["completion_tokens"] == 6 + 4 + 3
    assert item["prompt_tokens"] == 3 * reply.usage.prompt_tokens
    assert {e["usage_source"] for e in server.events("XLATE-1", 3)} == {"provider"}


def test_translated_provider_errors_keep_their_status_in_openai_shape(server: ServerProcess) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "XLATE-2"})
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="claude-broken", messages=ASK, max_tokens=3)
    assert failed.value.body["code"] == "provider_error" and "fake provider failure" in failed.value.body["message"]
    assert server.events("XLATE-2", 1)[0]["status"] == 500


def test_litellm_sdk_as_a_client(server: ServerProcess) -> None:
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-table download at import
    import litellm

    key = server.new_key()
    via_openai = litellm.completion(model="openai/gpt-4o-mini", api_base=f"{server.url}/v1", api_key=key, messages=ASK, max_tokens=4,
                                    extra_headers={"X-Work-Item": "LITE-1"})  # fmt: skip
    via_anthropic = litellm.completion(model="anthropic/claude", api_base=server.url, api_key=key, messages=ASK, max_tokens=5,
                                       extra_headers={"X-Work-Item": "LITE-1"})  # fmt: skip
    item = server.work_item("LITE-1", expected_requests=2)
    assert item["completion_tokens"] == via_openai.usage.completion_tokens + via_anthropic.usage.completion_tokens == 9
    assert item["prompt_tokens"] == via_openai.usage.prompt_tokens + via_anthropic.usage.prompt_tokens
    assert sorted(e["route"] for e in server.events("LITE-1", 2)) == ["/v1/chat/completions", "/v1/messages"]


def test_fallbacks_are_taken_before_the_first_byte_and_every_attempt_is_recorded(server: ServerProcess) -> None:
    client = server.openai(server.new_key())
    down = client.chat.completions.create(model="primary-down", messages=ASK, extra_headers={"X-Work-Item": "FALL-1"})
    assert down.choices[0].message.content
    attempts = sorted(server.events("FALL-1", 2), key=lambda e: e["latency_ms"])
    assert [(e["model"], e["status"], e["error"]) for e in attempts] == [("primary-down", 502, "upstream_error"), ("gpt-4o-mini", 200, None)]
    assert attempts[0]["total_tokens"] == 0 and attempts[1]["total_tokens"] == down.usage.total_tokens

    streamed = list(client.chat.completions.create(model="flaky", messages=ASK, stream=True, max_tokens=2, extra_headers={"X-Work-Item": "FALL-2"}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    events = server.events("FALL-2", 2)
    assert sorted((e["model"], e["status"]) for e in events) == [("claude", 200), ("flaky", 500)]


def test_proxy_key_is_accepted_as_x_api_key_on_openai_routes_too(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
                          headers={"x-api-key": server.new_key(), "X-Work-Item": "KEY-1"}, trust_env=False)  # fmt: skip
    assert response.status_code == 200


def test_fallback_sends_its_own_upstream_model_name(server: ServerProcess, upstream: FakeUpstream) -> None:
    client = server.openai(server.new_key(), default_headers={"X-Work-Item": "FALL-3"})
    client.chat.completions.create(model="same-target-down", messages=ASK)
    assert upstream.received[-1]["body"]["model"] == "gpt-4.1"
    assert [e["attempt"] for e in sorted(server.events("FALL-3", 2), key=lambda e: e["attempt"])] == [1, 2]
    item = server.work_item("FALL-3", expected_requests=1)
    assert (item["requests"], item["attempts"]) == (1, 2)  # one client request, two attempts


def test_client_fields_never_steer_litellm(server: ServerProcess, upstream: FakeUpstream) -> None:
    """litellm takes any keyword: a body field must not redirect the provider key or fake a reply."""
    from taskproxy.fake_provider import FakeProvider
    from taskproxy.localserver import serve_in_thread

    attacker = FakeProvider()
    with serve_in_thread(attacker.app()) as elsewhere:
        client = server.openai(server.new_key(), default_headers={"X-Work-Item": "SEC-1"})
        reply = client.chat.completions.create(
            model="claude", messages=ASK, max_tokens=2,
            extra_body={"api_base": elsewhere, "base_url": elsewhere, "mock_response": "pwned", "api_key": "sk-client",
                        "fallbacks": [{"model": "openai/gpt-4o", "api_base": f"{elsewhere}/v1"}], "extra_headers": {"x-evil": "1"}},
        )  # fmt: skip
    assert attacker.received == []
    assert reply.choices[0].message.content != "pwned"
    assert upstream.received[-1]["headers"]["x-api-key"] == ANTHROPIC_KEY and "x-evil" not in upstream.received[-1]["headers"]


def test_unusual_but_valid_input_is_relayed_and_recorded(server: ServerProcess, upstream: FakeUpstream) -> None:
    key = server.new_key()
    headers = {"authorization": f"Bearer {key}", "X-Work-Item": "ODD-1", "content-type": "application/json"}
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    utf8 = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=[*headers.items(), ("x-title", "caf\xe9 \u2713".encode())], trust_env=False)
    assert utf8.status_code == 200
    assert upstream.received[-1]["headers"]["x-title"].encode("latin-1") == "caf\xe9 \u2713".encode()  # the same bytes
    # Bytes that are not UTF-8 (obsolete ISO-8859-1 text) cannot be relayed as they are: the header is
    # left out, the request still served.
    latin = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=[*headers.items(), ("x-title", "caf\xe9".encode("latin-1"))], trust_env=False)
    assert latin.status_code == 200
    assert "x-title" not in upstream.received[-1]["headers"]
    assert server.work_item("ODD-1", expected_requests=2)["requests"] == 2

    deep: dict = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    before = len(upstream.received)
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK, "tools": [deep]}, headers=headers, trust_env=False)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_request"
    assert len(upstream.received) == before

    bound = httpx.put(f"{server.url}/api/me/work-item", json={"work_item": "ODD-2"}, headers={"authorization": f"Bearer {key}"}, trust_env=False)
    assert bound.status_code == 200
    blank = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": ASK},
                       headers={"authorization": f"Bearer {key}", "X-Work-Item": ""}, trust_env=False)  # fmt: skip
    assert blank.status_code == 200
    assert server.events("ODD-2", 1)[0]["attribution_source"] == "binding"
