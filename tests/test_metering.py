"""Counting, pricing and stream parsing: offline, exact where the provider is exact."""

from __future__ import annotations

import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import orjson
import pytest

from conftest import bundled_price_table
from taskproxy.metering.pricing import Price, prices_for, table_entries
from taskproxy.metering.tokens import encoding_name_for
from taskproxy.settings import ModelSettings
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.observe import openai_stream as openai_stream_observation
from taskproxy.upstream.sse import SseSplitter, is_usage_only_chunk

COUNT_OFFLINE = """
import socket
def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = no_network
socket.create_connection = no_network
from taskproxy.metering.tokens import TokenCounter
counter = TokenCounter()
print(counter.count("gpt-4o", "hello world"), counter.count("gpt-3.5-turbo", "hello world"))
"""


def test_encodings_load_from_local_files_with_no_network(tmp_path: Path) -> None:
    # An empty TIKTOKEN_CACHE_DIR (as on a locked-down server) must not make tiktoken download.
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", COUNT_OFFLINE], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2"]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o-mini", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-5", "o200k_base"), ("o3-mini", "o200k_base"),
     ("openai/gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"), ("llama3", "cl100k_base")],
)  # fmt: skip
def test_encoding_per_model_family(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


def test_prices_come_from_the_bundled_table_or_config_and_unknown_is_none() -> None:
    table = bundled_price_table()
    models = [
        ModelSettings(name="gpt-4o-mini", base_url="http://x"),
        ModelSettings(name="mine", base_url="http://x", upstream_model="gpt-4o"),
        ModelSettings(name="local", base_url="http://x", upstream_model="my-finetune-7b"),
    ]
    prices = prices_for(models, table)
    entry = table["gpt-4o-mini"]
    standard = Price(entry["input_cost_per_token"], entry["output_cost_per_token"], entry["cache_read_input_token_cost"], entry.get("cache_creation_input_token_cost"))
    assert replace(prices["gpt-4o-mini"], services=()) == standard
    assert prices["gpt-4o-mini"].for_service("priority").input == entry["input_cost_per_token_priority"]
    assert prices["gpt-4o-mini"].for_service("default") == prices["gpt-4o-mini"].for_service(None) == prices["gpt-4o-mini"]
    assert prices["mine"].input == table["gpt-4o"]["input_cost_per_token"]
    assert prices["local"] is None


def test_cached_tokens_are_billed_at_the_cached_rate() -> None:
    price = Price(input=2e-6, output=8e-6, cached_input=0.5e-6)
    assert price.nanos(prompt_tokens=1000, completion_tokens=100, cached_tokens=400) == round((600 * 2e-6 + 400 * 0.5e-6 + 100 * 8e-6) * 1e9)


def captured(*chunks: bytes) -> Capture:
    capture = Capture()
    for chunk in chunks:
        capture.add(chunk)
    return capture


def _event(data: dict | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else orjson.dumps(data)) + b"\n\n"


def test_splitter_reassembles_events_cut_anywhere_and_drops_only_the_usage_chunk() -> None:
    content = {"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    stream = _event(content) + _event(content) + _event(usage) + _event("[DONE]")
    for cut in range(1, len(stream)):
        splitter = SseSplitter()
        relayed = splitter.without_usage_only(stream[:cut]) + splitter.without_usage_only(stream[cut:])
        assert splitter.rest() == b""
        assert relayed == _event(content) + _event(content) + _event("[DONE]")
        assert not is_usage_only_chunk(relayed) and is_usage_only_chunk(_event(usage))


def test_stream_observation_reads_usage_and_text() -> None:
    chunks = [_event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}), _event({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
              _event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4},
                                                "completion_tokens_details": {"reasoning_tokens": 1}}}), _event("[DONE]")]  # fmt: skip
    joined = b"".join(chunks)
    observed = openai_stream_observation(captured(joined[:7], joined[7:]))
    assert observed.completion_text == "Hello"
    assert (observed.usage.prompt_tokens, observed.usage.completion_tokens, observed.usage.cached_tokens, observed.usage.reasoning_tokens) == (9, 2, 4, 1)
    cut_short = openai_stream_observation(captured(chunks[0], chunks[1][:10]))
    assert cut_short.usage is None and cut_short.completion_text == "Hel"


def test_anthropic_stream_usage_combines_message_start_and_the_last_message_delta() -> None:
    from taskproxy.upstream.observe import anthropic_stream

    def named(name: str, data: dict) -> bytes:
        return b"event: " + name.encode() + b"\n" + _event(data)

    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}}}
    deltas = [named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}) for t in ("Hel", "lo")]
    end = named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}})
    observed = anthropic_stream(captured(named("message_start", start), *deltas, end))
    usage = observed.usage
    assert observed.completion_text == "Hello" and not observed.missing
    # input_tokens exclude the cache: taskproxy's prompt = input + cache reads + cache writes
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_creation_tokens, usage.completion_tokens) == (130, 100, 20, 42)
    cut = anthropic_stream(captured(named("message_start", start), *deltas))
    # Cut before message_delta: what message_start reported stays; only the output is missing.
    assert (cut.usage.prompt_tokens, cut.usage.cached_tokens, cut.usage.cache_creation_tokens) == (130, 100, 20)
    assert cut.missing == {"completion_tokens"} and cut.completion_text == "Hello"


def test_responses_stream_usage_comes_from_response_completed() -> None:
    from taskproxy.upstream.observe import responses_stream

    completed = {"type": "response.completed", "response": {"usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
                                                                      "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3}}}}  # fmt: skip
    delta = {"type": "response.output_text.delta", "delta": "hi"}
    observed = responses_stream(captured(_event(delta), _event(completed)))
    assert (observed.usage.prompt_tokens, observed.usage.cached_tokens, observed.usage.completion_tokens, observed.usage.reasoning_tokens) == (30, 10, 7, 3)
    assert responses_stream(captured(_event(delta))).usage is None


def test_a_responses_error_event_is_known_by_its_type_and_recorded_by_its_code() -> None:
    """`{"type": "error", "code": "server_error", ...}`: the event ends the stream (the WebSocket sends
    nothing after it), and its error is its code; it was recorded as "error", the event's own type."""
    from taskproxy.upstream.observe import is_error, responses_stream

    error = {"type": "error", "sequence_number": 2, "code": "server_error", "message": "The model failed.", "param": None}
    assert responses_stream(captured(_event({"type": "response.output_text.delta", "delta": "hi"}), _event(error))).error == "server_error"
    assert is_error(orjson.dumps(error)) and is_error(b'{"code": "server_error", "sequence_number": 2, "type": "error"}')  # type first or last
    assert not is_error(orjson.dumps({"type": "response.output_text.delta", "delta": '{"type":"error"}'}))  # escaped, in a text
    assert not is_error(orjson.dumps({"type": "response.output_item.done", "item": {"id": "x", "type": "error"}}))  # a nested object's
    assert not is_error(orjson.dumps({"type": "response.failed", "response": {"error": {"code": "server_error"}}}))


def test_cache_reads_and_writes_are_priced_at_their_own_rates() -> None:
    price = Price(input=3e-6, output=15e-6, cached_input=0.3e-6, cache_write=3.75e-6)
    # 110 prompt tokens recorded = 10 plain + 100 read from cache, plus 20 written to it
    assert price.nanos(prompt_tokens=130, completion_tokens=42, cached_tokens=100, cache_write_tokens=20) == round(
        (10 * 3e-6 + 100 * 0.3e-6 + 20 * 3.75e-6 + 42 * 15e-6) * 1e9
    )


def test_remembered_token_counts_are_the_counts_and_stay_bounded() -> None:
    from taskproxy.metering import tokens

    counter = tokens.TokenCounter()
    encoding = counter._encoding("o200k_base")
    texts = [f"Refactor the payment module, step {n}: keep the retries idempotent." for n in range(50)]
    for text in texts + texts:  # the second pass is answered from memory
        assert counter.count("gpt-4o", text) == len(encoding.encode_ordinary(text))
    assert len(counter._counts) == 50
    for n in range(tokens.REMEMBERED_COUNTS + 10):
        counter.count("gpt-4o", f"text {n}")
    assert len(counter._counts) <= tokens.REMEMBERED_COUNTS


def test_price_entries_read_one_by_one_equal_the_whole_tables() -> None:
    from taskproxy.metering.pricing import bundled_price_file, follow_aliases, table_entries

    path = bundled_price_file()
    assert path is not None, "litellm's price table is part of the install"
    raw = path.read_bytes()
    table = orjson.loads(raw)
    names = [name for name, entry in table.items() if isinstance(entry, dict)][::7] + ["gpt-4o-mini", "claude-sonnet-4-5", "no-such-model"]
    entries = table_entries(raw, names)
    assert "no-such-model" not in entries
    resolved = {name: follow_aliases(table.get(name), table.get) for name in names}
    assert entries == {name: entry for name, entry in resolved.items() if entry is not None}
    assert len(entries) >= len(names) - 3  # every real model found (a name absent from the table is not)


def test_an_aliased_model_is_priced_as_the_model_it_names() -> None:
    raw = orjson.dumps({
        "gpt-6-luna": {"input_cost_per_token": 2e-6, "output_cost_per_token": 8e-6, "litellm_provider": "openai"},
        "gpt-luna-latest": {"alias_of": "gpt-6-luna"},
        "gpt-luna-stable": {"alias_of": "gpt-luna-latest"},
        "dangling-latest": {"alias_of": "gpt-0"},
        "loop-a": {"alias_of": "loop-b"}, "loop-b": {"alias_of": "loop-a"},
    })  # fmt: skip
    names = ["gpt-luna-latest", "gpt-luna-stable", "dangling-latest", "loop-a"]
    entries = table_entries(raw, names)
    assert entries == {"gpt-luna-latest": orjson.loads(raw)["gpt-6-luna"], "gpt-luna-stable": orjson.loads(raw)["gpt-6-luna"]}
    models = [ModelSettings(name=name, provider="openai", base_url="http://127.0.0.1:9/v1") for name in names]
    prices = prices_for(models, table=orjson.loads(raw))
    assert prices["gpt-luna-stable"] == Price(input=2e-6, output=8e-6)
    assert prices["dangling-latest"] is None and prices["loop-a"] is None  # unknown, never a silent 0


def test_an_estimate_counts_a_bounded_amount_of_new_text_and_cannot_be_steered() -> None:
    """What tiktoken costs depends on the text's shape: 8 MiB of random letters took it ~6 s, and every
    usage record waited behind it. An estimate counts at most COUNT_EXACT_CHARS of new text exactly and
    SAMPLE_CHARS more in windows of each longer text, taken at random, at that text's own rate: a
    prompt that opens with 256 KiB of spaces no longer has the letters after it estimated at the
    spaces' rate (1.4 % of their tokens), and text counted before costs nothing."""
    import random
    import string

    from taskproxy.metering.tokens import COUNT_EXACT_CHARS, SAMPLE_CHARS, TokenCounter
    from taskproxy.metering.usage import estimate_prompt_tokens

    counter = TokenCounter()
    encoding = counter._encoding("o200k_base")
    given: list[int] = []

    class Watched:  # the encoding, noting how much text it is given
        def encode_ordinary(self, text: str) -> list[int]:
            given.append(len(text))
            return encoding.encode_ordinary(text)

    counter._encodings["o200k_base"] = Watched()
    counter._random.seed(1)  # where the windows fall: the same in every run
    rng = random.Random(7)
    letters = "".join(rng.choice(string.ascii_letters) for _ in range(4 << 20))
    prose = ("Counting is CPU work, and it runs in the writer thread. " * 80_000)[: 4 << 20]
    for texts in ([letters], [prose], [" " * (256 << 10), letters[: 2 << 20]]):
        exact = sum(len(encoding.encode_ordinary(text)) for text in texts)
        given.clear()
        body = {"messages": [{"role": "user", "content": text} for text in texts]}
        estimate = estimate_prompt_tokens(counter, "gpt-4o-mini", body) - estimate_prompt_tokens(TokenCounter(), "gpt-4o-mini", {"messages": [{"role": "user", "content": ""}] * len(texts)})
        assert sum(given) <= COUNT_EXACT_CHARS + SAMPLE_CHARS, given
        assert abs(estimate - exact) < 0.01 * exact, (estimate, exact)
    small = {"messages": [{"role": "user", "content": "hello there"}]}
    assert estimate_prompt_tokens(counter, "gpt-4o-mini", small) == estimate_prompt_tokens(TokenCounter(), "gpt-4o-mini", small)  # exact below the bound


@pytest.mark.parametrize("bad", ["50", 50.0, -50, 1e30, True, [50]])
def test_a_token_count_that_is_not_a_whole_number_is_not_taken_as_reported(bad: object) -> None:
    """A provider's usage with a count that is not a whole, non-negative number was read as 0 (or,
    negative, subtracted) and recorded as the provider's: now it is not believed, and the answer is
    estimated as one without usage (Anthropic's output alone, when its input was reported)."""
    from taskproxy.metering.observed import COMPLETION
    from taskproxy.upstream.observe import anthropic_stream, anthropic_usage, openai_usage

    assert openai_usage({"prompt_tokens": 10, "completion_tokens": 5}) is not None
    assert openai_usage({"prompt_tokens": 10, "completion_tokens": bad}) is None
    assert openai_usage({"prompt_tokens": bad, "completion_tokens": 5}) is None
    assert anthropic_usage({"input_tokens": bad, "output_tokens": 5}) is None
    assert anthropic_usage({"input_tokens": 10, "output_tokens": bad}) is None
    events = [("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 100, "output_tokens": 1}}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello there"}}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": bad}})]  # fmt: skip
    capture = Capture()
    capture.add(b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n" for name, event in events))
    observed = anthropic_stream(capture)
    assert observed.usage is not None and observed.usage.prompt_tokens == 100 and observed.missing == {COMPLETION}
    events[0][1]["message"]["usage"]["input_tokens"] = bad
    capture = Capture()
    capture.add(b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n" for name, event in events))
    assert anthropic_stream(capture).usage is None


def test_a_files_bytes_are_not_counted_as_prompt_text() -> None:
    """A 1.5 MB PDF sent as a file part was counted as 1.4 million prompt tokens of text (and recorded so
    whenever the provider reported no usage); the same for a document, a tool result's screenshot and a
    reasoning item's encrypted content. Their text around them still counts."""
    import base64
    import os

    from taskproxy.metering.tokens import TokenCounter
    from taskproxy.metering.usage import estimate_prompt_tokens

    blob = base64.b64encode(os.urandom(1_100_000)).decode()
    question = "Summarise the attached report in three sentences, please."
    bodies = {
        "chat file": {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                                {"type": "file", "file": {"filename": "r.pdf", "file_data": f"data:application/pdf;base64,{blob}"}}]}]},
        "responses input_file": {"input": [{"role": "user", "content": [{"type": "input_text", "text": question},
                                                                         {"type": "input_file", "filename": "r.pdf", "file_data": f"data:application/pdf;base64,{blob}"}]}]},
        "anthropic document": {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                                         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": blob}}]}]},
        "tool result screenshot": {"messages": [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "tool_result", "tool_use_id": "t1",
                                                 "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": blob}}]}]}]},
        "reasoning item": {"input": [{"role": "user", "content": question}, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob}]},
    }  # fmt: skip
    counter = TokenCounter()
    alone = estimate_prompt_tokens(counter, "gpt-4o-mini", {"messages": [{"role": "user", "content": question}]})
    for name, body in bodies.items():
        tokens = estimate_prompt_tokens(counter, "gpt-4o-mini", body)
        assert alone <= tokens < alone + 80, (name, tokens, alone)


def test_a_text_documents_data_is_counted_as_text() -> None:
    """`data` is left out only beside `"type": "base64"`: a plain-text document's `data` is its text."""
    from taskproxy.metering.tokens import TokenCounter
    from taskproxy.metering.usage import estimate_prompt_tokens

    text = "The quarterly report says revenue grew in every region. " * 40
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
    counter = TokenCounter()
    with_it = estimate_prompt_tokens(counter, "gpt-4o-mini", {"messages": [{"role": "user", "content": [document]}]})
    without = estimate_prompt_tokens(counter, "gpt-4o-mini", {"messages": [{"role": "user", "content": [{**document, "source": {"type": "text"}}]}]})
    assert with_it - without > 400, (with_it, without)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_cache_writes_kept_for_an_hour_are_priced_at_the_hours_rate(tmp_path: Path, stream: bool) -> None:
    """Anthropic bills a cache write kept for an hour (`ttl: 1h`, which agents use for long sessions) at
    twice the input rate, a five-minute one at 1.25 times: every write was priced at the five-minute
    rate, a 1h write 37.5 % under what it cost (found by a review)."""
    from conftest import ADMIN_KEY, make_settings, start_proxy

    from taskproxy.money import usd
    from taskproxy.upstream.mock import MockProvider, MockResponse

    usage = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 130_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 30_000, "ephemeral_1h_input_tokens": 100_000}}  # fmt: skip
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "Done."}],
               "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip

    def answer(request: object) -> MockResponse:
        if not stream:
            return MockResponse.json(message)
        start = {"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}}
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 5}}
        return MockResponse.sse([f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n".encode() for e in (start, delta, {"type": "message_stop"})])

    models = [{"name": "claude", "provider": "anthropic", "base_url": "http://provider.test", "upstream_model": "claude-sonnet-4-5",
               "api_key_env": "TEST_PROVIDER_KEY"}]  # fmt: skip
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(answer)):
        ask = {"model": "claude", "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": "Go on."}]}
        response = await proxy.http.post("/v1/messages", json=ask, headers={"x-api-key": ADMIN_KEY, "x-work-item": "PROJ-9"})
        assert response.status_code == 200, response.text
        event = (await proxy.events(1, work_item="PROJ-9"))[0]
    # claude-sonnet-4-5 in litellm's table: $3/M input, $3.75/M 5-minute writes, $6/M 1-hour writes, $15/M output
    expected = round((10 * 3e-6 + 30_000 * 3.75e-6 + 100_000 * 6e-6 + 5 * 15e-6) * 1e9)
    assert (event["prompt_tokens"], event["cache_write_tokens"]) == (130_010, 130_000)
    assert event["cost_usd"] == usd(expected)


def test_a_prompt_over_a_long_context_threshold_is_billed_at_that_tiers_rates() -> None:
    """OpenAI's GPT-5.4 and later double their rates for a prompt over 272k tokens, Gemini's Pro models
    over 200k, Claude Haiku 5.5 over 100k: the whole request is billed at the tier's rates. Every such
    request was billed at the base rates (half of what GPT-5.5 charged). Checked against every entry of
    litellm's table that has a tier."""
    table = bundled_price_table()
    tiered = {name: entry for name, entry in table.items() if isinstance(entry, dict) and "input_cost_per_token_above_272k_tokens" in entry
              and entry.get("input_cost_per_token") is not None}  # fmt: skip
    assert len(tiered) > 20
    models = [ModelSettings(name=name, provider="openai", base_url="http://x", upstream_model=name) for name in tiered]
    prices = prices_for(models, table)
    for name, entry in tiered.items():
        price = prices[name]
        assert price is not None, name
        below = price.nanos(prompt_tokens=272_000, completion_tokens=1_000)
        assert below == round((272_000 * entry["input_cost_per_token"] + 1_000 * entry.get("output_cost_per_token", 0)) * 1e9), name
        output_above = entry.get("output_cost_per_token_above_272k_tokens", entry.get("output_cost_per_token", 0))
        above = price.nanos(prompt_tokens=272_001, completion_tokens=1_000)
        assert above == round((272_001 * entry["input_cost_per_token_above_272k_tokens"] + 1_000 * output_above) * 1e9), name
    gpt = prices["gpt-5.5"]
    assert gpt is not None
    # 300k prompt tokens of which 100k cached, 1,000 out: $10/M, $1/M cached, $45/M out above 272k ($5, $0.5, $30 below).
    assert gpt.nanos(prompt_tokens=300_000, completion_tokens=1_000, cached_tokens=100_000) == round((200_000 * 1e-5 + 100_000 * 1e-6 + 1_000 * 4.5e-5) * 1e9)
    # A flex request over 272k on a model whose table names no flex long-context rates: OpenAI raises flex
    # as it raises standard (twice the input, 1.5 times the output); it was billed at the flat flex rates.
    pro = table["gpt-5.5-pro"]
    assert "input_cost_per_token_above_272k_tokens_flex" not in pro
    flex = prices["gpt-5.5-pro"].for_service("flex")  # type: ignore[union-attr]
    assert flex.nanos(300_000, 1_000) == round((300_000 * pro["input_cost_per_token_flex"] * 2 + 1_000 * pro["output_cost_per_token_flex"] * 1.5) * 1e9)
    haiku = prices_for([ModelSettings(name="haiku", provider="anthropic", base_url="http://x", upstream_model="claude-haiku-5-5")], table)["haiku"]
    assert haiku is not None and haiku.nanos(100_001, 0) == round(100_001 * table["claude-haiku-5-5"]["input_cost_per_token_above_100k_tokens"] * 1e9)


@pytest.mark.anyio
async def test_a_long_prompt_is_recorded_at_the_long_context_rate(tmp_path: Path) -> None:
    """Through the proxy: GPT-5.5 answering a 300k-token prompt (100k of it cached) is recorded at the
    rates above 272k."""
    from conftest import ADMIN_KEY, make_settings, start_proxy

    from taskproxy.money import usd
    from taskproxy.upstream.mock import MockProvider, MockResponse

    usage = {"prompt_tokens": 300_000, "completion_tokens": 1_000, "total_tokens": 301_000, "prompt_tokens_details": {"cached_tokens": 100_000}}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-5.5", "usage": usage,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."}, "finish_reason": "stop"}]}  # fmt: skip
    models = [{"name": "gpt-5.5", "provider": "openai", "base_url": "http://provider.test/v1", "api_key_env": "TEST_PROVIDER_KEY"}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(lambda request: MockResponse.json(answer))):
        ask = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "Go on."}]}
        response = await proxy.http.post("/v1/chat/completions", json=ask, headers={"authorization": f"Bearer {ADMIN_KEY}", "x-work-item": "PROJ-9"})
        assert response.status_code == 200, response.text
        event = (await proxy.events(1, work_item="PROJ-9"))[0]
    assert event["cost_usd"] == usd(round((200_000 * 1e-5 + 100_000 * 1e-6 + 1_000 * 4.5e-5) * 1e9))


@pytest.mark.anyio
@pytest.mark.parametrize("tier", ["priority", "flex", "default"])
@pytest.mark.parametrize("route", ["chat", "chat-stream", "chat-large", "responses", "responses-large"])
async def test_a_request_served_in_a_processing_tier_is_billed_at_its_rates(tmp_path: Path, tier: str, route: str) -> None:
    """OpenAI bills a request it served as `priority` at about twice the standard rates and as `flex`
    at half, and says which in the answer's `service_tier` (Codex's fast mode asks for priority).
    Every answer was billed at the standard rates."""
    from conftest import ADMIN_KEY, make_settings, start_proxy

    from taskproxy.money import usd
    from taskproxy.upstream.mock import MockProvider, MockResponse

    chat_usage = {"prompt_tokens": 10_000, "completion_tokens": 2_000, "total_tokens": 12_000, "prompt_tokens_details": {"cached_tokens": 4_000}}
    message = {"role": "assistant", "content": "Done."}
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-5",  # in OpenAI's order
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": chat_usage, "service_tier": tier}  # fmt: skip
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-5", "service_tier": tier,
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "Done.", "annotations": []}]}],
                "usage": {"input_tokens": 10_000, "input_tokens_details": {"cached_tokens": 4_000}, "output_tokens": 2_000,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12_000}}  # fmt: skip

    def answer(request: object) -> MockResponse:
        if route == "responses":
            return MockResponse.json(response)
        if route == "responses-large":
            # As OpenAI orders it: the tier, then the echoed tools (Codex sends tens of KiB), the usage and the
            # request's own metadata, which may name any tier: the kept tail holds no tier to trust.
            tools = [{"type": "function", "name": f"tool_{n}", "description": "x" * 200, "parameters": {"type": "object"}} for n in range(300)]
            usage = response["usage"]
            rest = {k: v for k, v in response.items() if k != "usage"}
            return MockResponse.json({**rest, "tools": tools, "usage": usage, "metadata": {"service_tier": "flex"}})
        if route == "chat":
            return MockResponse.json(chat)
        if route == "chat-large":  # too large to keep whole: its tier is read beside its usage, at its end
            return MockResponse.json({**chat, "choices": [{"index": 0, "message": {**message, "content": "word " * 40_000}, "finish_reason": "stop"}]})
        chunks = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5", "service_tier": tier,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Done."}, "finish_reason": None}]},
                  {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5", "service_tier": tier,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5", "service_tier": tier, "choices": [],
                   "usage": chat_usage}]  # fmt: skip
        return MockResponse.sse([f"data: {orjson.dumps(c).decode()}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"])

    models = [{"name": "gpt-5", "provider": "openai", "base_url": "http://provider.test/v1", "api_key_env": "TEST_PROVIDER_KEY"}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(answer)):
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "x-work-item": "PROJ-9"}
        if route.startswith("responses"):
            sent = await proxy.http.post("/v1/responses", json={"model": "gpt-5", "input": "Go on.", "service_tier": tier}, headers=headers)
        else:
            ask = {"model": "gpt-5", "messages": [{"role": "user", "content": "Go on."}], "stream": route == "chat-stream", "service_tier": tier}
            sent = await proxy.http.post("/v1/chat/completions", json=ask, headers=headers)
        assert sent.status_code == 200, sent.text
        await sent.aread()
        event = (await proxy.events(1, work_item="PROJ-9"))[0]
    rates = {"priority": (2.5e-6, 2.5e-7, 2e-5), "flex": (6.25e-7, 6.25e-8, 5e-6), "default": (1.25e-6, 1.25e-7, 1e-5)}[tier]  # gpt-5's table
    assert event["cost_usd"] == usd(round((6_000 * rates[0] + 4_000 * rates[1] + 2_000 * rates[2]) * 1e9)), event


def test_the_budget_meter_counts_at_the_tier_asked_for() -> None:
    """OpenAI's stream says which tier served it outside its usage object, which the request path's
    meter reads: it counted a priority request against its budgets at the standard rates (half)."""
    from datetime import datetime

    from taskproxy.metering.attempts import Attempts, Caller
    from taskproxy.metering.tokens import TokenCounter
    from taskproxy.upstream.observe import openai_usage

    price = prices_for([ModelSettings(name="gpt-5", provider="openai", base_url="http://x")], bundled_price_table())["gpt-5"]
    assert price is not None
    charged: list[int] = []
    attempts = Attempts(sink=None, counter=TokenCounter(), prices={"gpt-5": price}, charge=lambda item, team, ts, tokens, nanos: charged.append(nanos),
                        register_unknown_items=False, store_prompts=False)  # type: ignore[arg-type]  # fmt: skip
    model = ModelSettings(name="gpt-5", provider="openai", base_url="http://x")
    attempt = attempts.begin(Caller("k", "dana", None, "PROJ-1", "header"), ts=datetime(2026, 12, 7), started=0.0, body={"service_tier": "priority"},
                             user_agent=None, route="/v1/chat/completions", usage_of=openai_usage, model=model, stream=True, number=1)  # fmt: skip
    attempt.meter.saw(b'data: {"service_tier":"priority","choices":[],"usage":{"prompt_tokens":10000,"completion_tokens":2000,"total_tokens":12000}}\n\n')
    assert sum(charged) == price.for_service("priority").nanos(10_000, 2_000) == round((10_000 * 2.5e-6 + 2_000 * 2e-5) * 1e9)


@pytest.mark.anyio
@pytest.mark.parametrize(("said", "asked", "factor"), [({"speed": "fast", "inference_geo": "us"}, {}, 2.0 * 1.1), ({"inference_geo": "global"}, {}, 1.0),
                                                         ({}, {"speed": "fast"}, 2.0), ({"speed": "standard"}, {"speed": "fast"}, 1.0)])  # fmt: skip
async def test_anthropics_fast_mode_and_us_inference_are_billed_at_their_multiples(tmp_path: Path, said: dict, asked: dict, factor: float) -> None:
    """Claude's fast mode costs a multiple of the standard price, and inference kept in the US another
    (litellm's table: `provider_specific_entry` {"fast": 2.0, "us": 1.1}); the usage says which were
    applied (`speed`, `inference_geo`), else the request's `speed`. Both were billed at the plain rates."""
    from conftest import ADMIN_KEY, make_settings, start_proxy

    from taskproxy.money import usd
    from taskproxy.upstream.mock import MockProvider, MockResponse

    entry = bundled_price_table()["claude-opus-5"]
    assert entry["provider_specific_entry"] == {"us": 1.1, "fast": 2.0}
    usage = {"input_tokens": 1_000, "output_tokens": 100, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, **said}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-5", "content": [{"type": "text", "text": "Done."}],
               "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip
    models = [{"name": "opus", "provider": "anthropic", "base_url": "http://provider.test", "upstream_model": "claude-opus-5", "api_key_env": "TEST_PROVIDER_KEY"}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(lambda request: MockResponse.json(message))):
        ask = {"model": "opus", "max_tokens": 50, "messages": [{"role": "user", "content": "Go on."}], **asked}
        response = await proxy.http.post("/v1/messages", json=ask, headers={"x-api-key": ADMIN_KEY, "x-work-item": "PROJ-9"})
        assert response.status_code == 200, response.text
        event = (await proxy.events(1, work_item="PROJ-9"))[0]
    plain = round((1_000 * entry["input_cost_per_token"] + 100 * entry["output_cost_per_token"]) * 1e9)
    assert event["cost_usd"] == usd(round(plain * factor))


@pytest.mark.anyio
async def test_a_stream_that_says_its_speed_and_region_in_its_last_usage_is_billed_at_them(tmp_path: Path) -> None:
    """Streamed, the surcharges may come with `message_delta`'s usage rather than `message_start`'s: the
    delta's counts were kept, its `speed` and `inference_geo` dropped (found by a review)."""
    from conftest import ADMIN_KEY, make_settings, start_proxy

    from taskproxy.money import usd
    from taskproxy.upstream.mock import MockProvider, MockResponse

    entry = bundled_price_table()["claude-opus-5"]
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-5", "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1_000, "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 100, "speed": "fast", "inference_geo": "us"}}  # fmt: skip
    events = [f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n".encode() for e in (start, delta, {"type": "message_stop"})]
    models = [{"name": "opus", "provider": "anthropic", "base_url": "http://provider.test", "upstream_model": "claude-opus-5", "api_key_env": "TEST_PROVIDER_KEY"}]
    async for proxy in start_proxy(make_settings(tmp_path, models=models), MockProvider(lambda request: MockResponse.sse(events))):
        ask = {"model": "opus", "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "Go on."}]}
        response = await proxy.http.post("/v1/messages", json=ask, headers={"x-api-key": ADMIN_KEY, "x-work-item": "PROJ-9"})
        assert response.status_code == 200, response.text
        event = (await proxy.events(1, work_item="PROJ-9"))[0]
    assert event["cost_usd"] == usd(round(round((1_000 * entry["input_cost_per_token"] + 100 * entry["output_cost_per_token"]) * 1e9) * 2.2))
