"""Property tests: work-item ids and SSE framing hold for any input, not only the examples."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskproxy.errors import WorkItemInvalid
from taskproxy.guard.body import more_json_values_than
from taskproxy.jsonbytes import MAX_USAGE_KEYS_READ, last_usage_object, object_at, object_end
from taskproxy.settings import DEFAULT_BRANCH_PATTERNS, DEFAULT_ID_PATTERNS
from taskproxy.upstream.observe import anthropic_stream, openai_stream
from taskproxy.upstream.capture import Capture
from taskproxy.upstream.sse import SseSplitter, is_usage_only_chunk, iter_events
from taskproxy.workitems import MAX_ID_LENGTH, WorkItemIds

IDS = WorkItemIds(DEFAULT_ID_PATTERNS, DEFAULT_BRANCH_PATTERNS)
keys = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,9}-[0-9]{1,6}", fullmatch=True)
github = st.from_regex(r"[A-Za-z0-9_.-]{1,20}/[A-Za-z0-9_.-]{1,20}#[0-9]{1,6}", fullmatch=True)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=50).map(lambda b: b.decode("latin-1"))))
@settings(max_examples=400)
def test_normalize_accepts_only_safe_canonical_ids(raw: str) -> None:
    try:
        canonical = IDS.normalize(raw)
    except WorkItemInvalid:
        return
    assert len(canonical) <= MAX_ID_LENGTH
    assert all(32 < ord(c) < 127 for c in canonical)  # printable ASCII, no spaces: safe in logs, URLs and SQL params
    assert IDS.normalize(canonical) == canonical  # canonical forms are fixed points


@given(keys)
def test_tracker_keys_normalize_to_upper_case(key: str) -> None:
    assert IDS.normalize(key.lower()) == IDS.normalize(key) == key.upper()


@given(github)
def test_github_refs_normalize_and_match_their_urls(ref: str) -> None:
    owner_repo, number = ref.split("#")
    if owner_repo.split("/")[0] in {".", ".."} or owner_repo.split("/")[1] in {".", ".."}:
        return
    canonical = IDS.normalize(ref)
    assert canonical == ref.lower() == canonical.lower()
    assert IDS.normalize(f"https://github.com/{owner_repo}/pull/{number}") == canonical


@given(st.text(max_size=120))
def test_branch_parsing_never_raises_unexpectedly(branch: str) -> None:
    try:
        found = IDS.from_branch(branch)
    except WorkItemInvalid:
        return
    assert found is None or IDS.normalize(found) == found


# Every way SSE lets a blank line end an event: two line ends in a row, each CRLF, LF or CR.
EVENT_ENDS = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\r\r\n", b"\n\r", b"\r\n\r"]
events = st.lists(
    st.dictionaries(st.sampled_from(["choices", "usage", "id", "text"]), st.one_of(st.none(), st.text(max_size=20), st.integers(-(2**62), 2**62), st.lists(st.integers(0, 10**6), max_size=3)), max_size=4),
    max_size=8,
)


@given(events, st.lists(st.integers(min_value=1, max_value=40), max_size=20), st.sampled_from(EVENT_ENDS))
@settings(max_examples=300)
def test_splitter_returns_exactly_the_events_whatever_the_chunking(payloads: list[dict], cuts: list[int], terminator: bytes) -> None:
    stream = b"".join(b"data: " + orjson.dumps(p) + terminator for p in payloads) + b"data: [DONE]" + terminator
    splitter, out, position = SseSplitter(), [], 0
    for size in cuts:
        out.append(splitter.without_usage_only(stream[position : position + size]))
        position += size
    out.append(splitter.without_usage_only(stream[position:]))
    kept = [p for p in payloads if not is_usage_only_chunk(b"data: " + orjson.dumps(p) + terminator)]
    assert b"".join(out) + splitter.rest() == b"".join(b"data: " + orjson.dumps(p) + terminator for p in kept) + b"data: [DONE]" + terminator
    assert [orjson.loads(d) for _, d in iter_events(b"".join(out)) if d != b"[DONE]"] == kept


@given(events, st.lists(st.integers(min_value=1, max_value=40), max_size=20), st.sampled_from(EVENT_ENDS))
@settings(max_examples=300)
def test_what_the_client_gets_is_the_stream_without_the_usage_chunk_whatever_the_chunking(
    payloads: list[dict], cuts: list[int], terminator: bytes
) -> None:
    usage_only = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    event = lambda p: b"data: " + orjson.dumps(p) + terminator  # noqa: E731
    stream = b"".join(map(event, payloads)) + event(usage_only) + b"data: [DONE]" + terminator
    splitter, out, position = SseSplitter(), b"", 0
    for size in [*cuts, len(stream)]:
        out += splitter.without_usage_only(stream[position : position + size])
        position += size
    out += splitter.rest()
    assert out == b"".join(event(p) for p in payloads if not is_usage_only_chunk(event(p))) + b"data: [DONE]" + terminator


@pytest.mark.parametrize("seed", range(len(EVENT_ENDS)))
def test_an_event_larger_than_the_splitter_holds_is_passed_on_as_it_comes_and_the_usage_chunk_still_withheld(seed: int) -> None:
    """Past PASS_ON_BYTES of one event the splitter passes it on as it comes (it cannot be the usage-only
    chunk): the client never waits for more than that of what the provider sent, and what it gets is
    still the stream without the usage chunk, byte for byte, however the stream is cut (a seam inside
    the event's blank line included, for each of SSE's three line endings)."""
    import random

    from taskproxy.upstream.sse import PASS_ON_BYTES

    rng = random.Random(seed)
    end = EVENT_ENDS[seed % len(EVENT_ENDS)]
    event = lambda p: b"data: " + orjson.dumps(p) + end
    big = {"choices": [{"index": 0, "delta": {"content": "x" * (3 * PASS_ON_BYTES + rng.randrange(1000))}}]}
    usage_only = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    kept = [event({"choices": [{"index": 0, "delta": {"content": "a"}}]}), event(big), event({"choices": [{"index": 0, "delta": {}}]})]
    stream = b"".join(kept[:2]) + event(usage_only) + kept[2] + b"data: [DONE]" + end
    usage_at = len(b"".join(kept[:2]))
    splitter, out, position, emitted = SseSplitter(), [], 0, 0
    while position < len(stream):
        size = rng.choice([1, 2, 3, rng.randrange(1, 64 * 1024), rng.randrange(1, 2 * PASS_ON_BYTES)])
        out.append(splitter.without_usage_only(stream[position : position + size]))
        position, emitted = min(position + size, len(stream)), emitted + len(out[-1])
        if position <= usage_at:  # what the provider sent and the client does not have yet
            assert position - emitted <= PASS_ON_BYTES + 3, (position, emitted)
    out.append(splitter.rest())
    assert b"".join(out) == b"".join(kept) + b"data: [DONE]" + end


def test_lines_ending_in_a_bare_cr_are_held_not_joined_and_searched_at_each_chunk() -> None:
    """Every stream is relayed in whole events (2026-12-07). A held event ending in a CR was taken for
    one whose blank line's LF might come next, so each chunk of a stream of `data: …\r` lines joined
    and searched everything held: quadratic, on the event loop (a 564 KB answer took 6.4 s; found by a
    review). Such chunks are now held as they come, and the stream still comes out whole."""
    from taskproxy.upstream.sse import EventBuffer

    buffer, line = EventBuffer(), b"data: " + b"x" * 40 + b"\r"
    assert all(buffer.feed(line) == b"" for _ in range(1000))
    assert len(buffer._pieces) == 1000  # appended, never joined: the work per chunk does not grow with what is held
    assert buffer.feed(b"\r\n") == line * 1000 + b"\r\n"  # a blank line (CR, CR) ends the event: all of it at once


@pytest.mark.parametrize("end", EVENT_ENDS)
def test_the_providers_usage_is_read_whatever_line_ends_its_events_have(end: bytes) -> None:
    """A stream whose events end with `\n\r\n` (a line's LF, then a CRLF blank line) ran together as
    one event, its JSON unreadable: the usage the provider reported was lost, an estimate recorded."""
    chat = [{"choices": [{"index": 0, "delta": {"content": "hi"}}]}, {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 50}}]
    capture = Capture()
    capture.add(b"".join(b"data: " + orjson.dumps(e) + end for e in chat) + b"data: [DONE]" + end)
    usage = openai_stream(capture).usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (100, 50)
    messages = [("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 1}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 50}}),
                ("message_stop", {"type": "message_stop"})]  # fmt: skip
    capture = Capture()
    capture.add(b"".join(b"event: " + name.encode() + end[: len(end) // 2] + b"data: " + orjson.dumps(e) + end for name, e in messages))
    usage = anthropic_stream(capture).usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (1100, 50)


def test_azures_content_filter_chunk_reaches_the_client() -> None:
    """Azure OpenAI's first chunk has empty `choices`, its prompt's filter results and `"usage": null`: it
    was withheld as the usage-only chunk from a client that had not asked for usage."""
    filters = {"id": "", "choices": [], "created": 0, "model": "", "object": "", "usage": None,
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]}  # fmt: skip
    stream = b"data: " + orjson.dumps(filters) + b"\n\ndata: " + orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1}}) + b"\n\ndata: [DONE]\n\n"
    splitter = SseSplitter()
    assert splitter.without_usage_only(stream) + splitter.rest() == b"data: " + orjson.dumps(filters) + b"\n\ndata: [DONE]\n\n"


@given(st.text(max_size=50))
def test_a_usage_lookalike_inside_content_is_not_withheld(content: str) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": content + '"usage": {} "choices": []'}}], "usage": None}
    assert not is_usage_only_chunk(b"data: " + orjson.dumps(chunk) + b"\n\n")


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_stream_observation_never_raises_on_garbage(garbage: bytes) -> None:
    capture = Capture()
    capture.add(garbage)
    observed = openai_stream(capture)
    assert observed.usage is None or observed.usage.prompt_tokens >= 0


@pytest.mark.parametrize("bad", ["PROJ-1\n", "PROJ-1\x00", "\u202eproj-1", "PROJ-１", "ﬃ" * 70 + "-1", "ﬃ-1", "straße-1"])
def test_invisible_and_lookalike_characters_are_refused(bad: str) -> None:
    with pytest.raises(WorkItemInvalid):
        IDS.normalize(bad)


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200))
@settings(max_examples=400)
def test_an_id_within_the_limit_never_normalizes_past_it(raw: str) -> None:
    """Whatever a client sends that passes the length check must still fit once normalized (the
    database's column is 200 characters: a longer id would be refused there, with its batch)."""
    try:
        canonical = IDS.normalize(raw + "-1")
    except WorkItemInvalid:
        return
    assert len(canonical) <= MAX_ID_LENGTH


json_documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(alphabet=st.sampled_from(list('ab,[]{}"\\: x')), max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet=st.sampled_from(list('k,[{"\\')), max_size=4), children, max_size=4),
    max_leaves=30,
)


def _values(document: object) -> int:
    if isinstance(document, dict):
        return 1 + sum(_values(v) for v in document.values())
    if isinstance(document, list):
        return 1 + sum(_values(v) for v in document)
    return 1


@given(json_documents)
@settings(max_examples=400)
def test_the_json_value_budget_counts_exactly_what_decoding_would_build(document: object) -> None:
    """Commas, brackets and quotes inside strings (escaped quotes too) never miscount a body (compact
    JSON, as every SDK sends it; a spaced-out `[ ]` only ever counts more, never less)."""
    raw, exact = orjson.dumps(document), _values(document)
    assert not more_json_values_than(raw, exact) and more_json_values_than(raw, exact - 1)


@given(st.dictionaries(st.text(max_size=8), json_documents, max_size=4), st.binary(max_size=40))
@settings(max_examples=400)
def test_an_object_ends_where_its_json_ends_whatever_its_strings_hold(document: dict, after: bytes) -> None:
    """Braces, quotes and backslashes inside strings never move where an object is read to end (the
    meter reads a provider's usage object this way, as it passes)."""
    raw = orjson.dumps(document)
    for spaced in (raw, orjson.dumps(document, option=orjson.OPT_INDENT_2)):
        assert object_end(b"x" + spaced + after, 1) == 1 + len(spaced)
        assert object_end(spaced[:-1], 0) == -1  # cut off: no end
        assert object_at(spaced + after, 0, max_bytes=len(spaced)) == document
        assert object_at(spaced + after, 0, max_bytes=len(spaced) - 1) is None  # longer than allowed


def test_the_last_usage_object_is_read_and_an_earlier_one_when_the_last_is_cut_off() -> None:
    first, last = {"prompt_tokens": 3, "completion_tokens": 1}, {"prompt_tokens": 3, "completion_tokens": 9, "note": "}{\\\"usage\": {"}
    events = [b'data: {"choices": [], "usage": ' + orjson.dumps(usage) + b"}\n\n" for usage in (first, last)]
    assert last_usage_object(b"".join(events)) == last
    assert last_usage_object(events[0] + events[1][:-8]) == first
    assert last_usage_object(b'{"usage": {"x": "\\"usage\\": {}"}}') == {"x": '"usage": {}'}  # the quoted one is text
    junk = b'data: {"choices": [{}], "usage": {"note": "uuuu\n\n'
    assert last_usage_object(events[0] + junk * 3) == first  # three keys that never end, then the real one
    assert last_usage_object(events[0] + junk * MAX_USAGE_KEYS_READ) is None  # past a few, not read further back


@pytest.mark.parametrize("end", [b"\r\n\r\n", b"\n\r\n", b"\r\r\n"])
def test_an_event_whose_blank_lines_cr_and_lf_come_apart_is_passed_on_when_the_lf_comes(end: bytes) -> None:
    """A CR last in a read may be the first half of a blank line's CRLF, so the event waits for the next
    byte; once that byte came, the event was still held (until the next event ended)."""
    event = b'data: {"a": 1}' + end
    splitter = SseSplitter()
    assert splitter.without_usage_only(event[:-1]) == b""
    assert splitter.without_usage_only(event[-1:]) == event


GROUP_SIZES = st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 7), min_size=1)


@given(GROUP_SIZES, st.integers(1, 6))
def test_the_groups_withheld_hold_the_floor_between_them_or_are_all(people: dict[str, int], floor: int) -> None:
    """Whatever the sizes, a total less the groups shown is a group at the floor, or nothing is shown."""
    from taskproxy.privacy import withheld_groups

    held = withheld_groups(people, people, floor)
    assert {g for g, n in people.items() if n < floor} <= held
    assert not held or sum(people[g] for g in held) >= floor or held == set(people)


@given(GROUP_SIZES, st.integers(1, 6), st.data())
def test_a_series_of_the_small_teams_holds_the_floor_as_teams_arrive(people: dict[str, int], floor: int, data: st.DataObject) -> None:
    """Teams' usage arriving one by one (and sizes changing): at every moment, the teams labelled small
    among those seen hold the floor between them, or every team seen is."""
    from taskproxy.privacy import SeriesTeams

    sizes = {"now": dict(people)}
    series = SeriesTeams(lambda: sizes["now"], floor, small="small")
    seen: set[str] = set()
    for _ in range(data.draw(st.integers(1, 20))):
        if data.draw(st.booleans()):
            group = data.draw(st.sampled_from(sorted(people)))
            sizes["now"] = {**sizes["now"], group: data.draw(st.integers(0, 7))}  # replaced whole, as KeyStore does
        group = data.draw(st.sampled_from(sorted(people)))
        seen.add(group)
        series.label(group)
        now = sizes["now"]
        small = {g for g in seen if series.label(g) == "small"}
        assert {g for g in seen if now[g] < floor} <= small
        assert not small or sum(now[g] for g in small) >= floor or small == seen


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(min_value=1, max_value=3_000), st.sampled_from([b"\n", b"\r\n", b"\r"])), min_size=1, max_size=6),
    st.lists(st.integers(min_value=1, max_value=4_000), min_size=1, max_size=40),
)
@example(sizes=[(3, b"\n"), (3, b"\r"), (5, b"\n")], cuts=[21])  # a chunk from an event's start: one ended by CR CR, one by LF LF
def test_the_capture_keeps_the_start_of_the_last_event_however_the_stream_is_cut(sizes: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """What reads a terminal event too large for the tail (a `response.failed` echoing tens of KiB of
    instructions) finds its start: the first bytes of the last event, whatever chunks the stream came in
    and whatever line ends each event has (the SSE spec allows them mixed: a chunk holding an event
    ended by CR CR and then one ended by LF LF was kept whole as the second's start; found by a review)."""
    events = [b"event: e" + str(n).encode() + newline + b"data: " + b"x" * size + newline + newline for n, (size, newline) in enumerate(sizes)]
    stream = b"".join(events)
    capture, position = Capture(), 0
    for cut in cuts:
        capture.add(stream[position : position + cut])
        position += cut
    capture.add(stream[position:])
    last = events[-1][:2048].rstrip(b"\r\n")  # a line end of its own may stay with it
    assert capture.event_head.rstrip(b"\r\n") == last
