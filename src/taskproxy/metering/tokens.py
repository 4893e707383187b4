"""Offline token counting with tiktoken.

tiktoken downloads its encodings on first use, which fails on locked-down servers. litellm's
package ships `cl100k_base`, `o200k_base` and `p50k_base` under tiktoken's cache file names, so the
cache directory is pointed there (found through the installed package) before the first load.
Counting is CPU work: it runs in the writer thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from taskproxy.memory import release_freed_memory

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4", "codex-", "gpt-oss")
TOKENS_PER_MESSAGE = 3  # OpenAI's chat format: <|start|>{role}\n{content}<|end|>
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
REMEMBERED_COUNTS = 8192  # texts whose token count is kept (a few hundred KiB); forgotten all at once when full
# New text one estimate counts exactly; past it, each text's rest is estimated from windows of that
# text taken at random. What counting costs depends on the text's shape, not only its size: 2 million
# random letters without a space took tiktoken 1.47 s, so 8 MiB prompts (well under the body limit)
# kept the recording thread ~6 s each, and everyone's usage waited behind them; 256 KiB of one letter
# still takes 0.28 s, 64 KiB 10-20 ms whatever the text. The windows are random, and each text is
# estimated at its own rate, so a prompt cannot steer the estimate (billed when the provider reports no
# usage): when the rest was estimated at the rate counted so far, a prompt that began with 256 KiB of
# spaces had 2 MiB of letters after them estimated at 1.4 % of their tokens.
COUNT_EXACT_CHARS = 64 * 1024
SAMPLE_CHARS = 256 * 1024  # of windows, at most, one estimate counts beyond COUNT_EXACT_CHARS; then the highest rate seen
WINDOWS, WINDOW_CHARS = 16, 4096  # per text estimated


class CountBudget:
    """How much new text one estimate counts: exactly, then in windows; and the highest rate it saw
    (tokens per character), the rate of the rest once the windows are spent too."""

    __slots__ = ("left", "rate", "samples_left")

    def __init__(self, chars: int = COUNT_EXACT_CHARS, samples: int = SAMPLE_CHARS) -> None:
        self.left, self.samples_left = chars, samples
        self.rate = 0.0

    def spend(self, chars: int, tokens: int) -> None:
        self.left -= chars
        if chars:
            self.rate = max(self.rate, tokens / chars)


class EncodingsUnavailable(RuntimeError):
    pass


def bundled_encodings_dir() -> Path | None:
    """litellm's folder of tiktoken files, located without importing litellm."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
    return folder if folder.is_dir() else None


_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def _cache_file(folder: str | Path, name: str) -> Path:
    """tiktoken names a cached encoding by the SHA-1 of the URL it would download it from."""
    return Path(folder) / hashlib.sha1(_ENCODING_URL.format(name).encode()).hexdigest()


def _point_tiktoken_at_local_files(name: str) -> None:
    """Make tiktoken read `name` from disk: keep a cache dir that has it, else use litellm's files."""
    current = os.environ.get("TIKTOKEN_CACHE_DIR")
    if current and _cache_file(current, name).exists():
        return
    folder = bundled_encodings_dir()
    if folder is None or not _cache_file(folder, name).exists():
        raise EncodingsUnavailable(f"no local copy of the tiktoken encoding {name}; is litellm installed?")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


def encoding_name_for(model: str) -> str:
    name = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


class TokenCounter:
    """Loads each encoding once, on first use (thread-safe), from files on disk only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encodings: dict[str, Any] = {}
        self._counts: dict[tuple[str, int, int], int] = {}
        self._random = random.Random()  # where estimates sample long texts: not predictable by who sends them

    def _encoding(self, name: str) -> Any:
        encoding = self._encodings.get(name)
        if encoding is not None:
            return encoding
        with self._lock:
            if name not in self._encodings:
                _point_tiktoken_at_local_files(name)
                import tiktoken

                encoding = tiktoken.get_encoding(name)
                # tiktoken keeps the ranks as a Python dict only to pickle the encoding; its Rust core
                # holds its own copy. Dropping the dict saves ~27 MiB for o200k_base (measured).
                encoding._mergeable_ranks = None
                self._encodings[name] = encoding
            return self._encodings[name]

    def warm(self, models: Iterable[str]) -> None:
        """Load the encodings these models use now (each ~50 MiB: only those needed)."""
        for name in sorted({encoding_name_for(model) for model in models}):
            self._encoding(name)
        release_freed_memory()

    def count(self, model: str, text: str, budget: CountBudget | None = None) -> int:
        """Tokens of `text`. Counts are remembered: agents resend the same system prompt and history
        with every request, and each tiktoken call releases and retakes the GIL, which under load
        waits behind the event loop (measured: the recording thread fell behind at ~1,700 req/s).
        With a `budget`, new text past what is left of it is estimated (`_estimate`), not counted."""
        if not text:
            return 0
        name = encoding_name_for(model)
        # The text itself is not kept: its length and (per-process randomized) hash identify it.
        key = (name, len(text), hash(text))
        tokens = self._counts.get(key)
        if tokens is not None:
            return tokens
        if budget is not None and len(text) > budget.left:
            tokens = self._estimate(self._encoding(name), text, budget)
        else:
            tokens = len(self._encoding(name).encode_ordinary(text))
            if budget is not None:
                budget.spend(len(text), tokens)
        if len(self._counts) >= REMEMBERED_COUNTS:
            self._counts.clear()
        self._counts[key] = tokens
        return tokens

    def _estimate(self, encoding: Any, text: str, budget: CountBudget) -> int:
        """`text` past the budget: what is left of it counted exactly, the rest from random windows of
        the rest (at this text's own rate), or, once the windows are spent, at the highest rate seen."""
        counted = max(budget.left, 0)
        tokens = len(encoding.encode_ordinary(text[:counted])) if counted else 0
        budget.spend(counted, tokens)
        rest = len(text) - counted
        if rest <= min(WINDOWS * WINDOW_CHARS, budget.samples_left):  # no longer than its windows: counted
            budget.samples_left -= rest
            whole = len(encoding.encode_ordinary(text[counted:]))
            budget.rate = max(budget.rate, whole / rest)
            return tokens + whole
        windows = min(WINDOWS, budget.samples_left // WINDOW_CHARS)
        if windows == 0:
            rate = budget.rate if budget.rate else 1.0  # nothing counted yet: a token a character, the most text holds
            return tokens + round(rest * rate)
        # One window in each of `windows` equal stretches of the rest, at random within it: unbiased, and
        # a text made of long runs of one kind or another is read in every part of it.
        stretch = rest // windows
        starts = [counted + n * stretch + self._random.randrange(max(stretch - WINDOW_CHARS, 0) + 1) for n in range(windows)]
        sampled = sum(len(encoding.encode_ordinary(text[start : start + WINDOW_CHARS])) for start in starts)
        budget.samples_left -= windows * WINDOW_CHARS
        rate = sampled / (windows * WINDOW_CHARS)
        budget.rate = max(budget.rate, rate)
        return tokens + round(rest * rate)

    def count_chat(self, model: str, messages: Iterable[Any], tools: Any = None, budget: CountBudget | None = None) -> int:
        """Prompt tokens of a chat request by OpenAI's per-message rules."""
        total = REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key in BINARY_KEYS:  # a Responses API reasoning item's encrypted_content
                    continue
                total += self.count(model, _text_of(value), budget)
                if key == "name":
                    total += TOKENS_PER_NAME
        if tools:
            total += self.count(model, orjson.dumps(tools).decode(), budget)
        return total

    def count_inputs(self, model: str, value: Any, budget: CountBudget | None = None) -> int:
        """Tokens of a completion prompt or embedding input: text, list of texts, or token arrays."""
        if isinstance(value, str):
            return self.count(model, value, budget)
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return len(value)
            return sum(self.count_inputs(model, v, budget) for v in value)
        return 0


# What a request carries that is not text to count: a file's or an image's bytes (base64, in a data
# URL or a `data`/`file_data` field, however deep: a tool result's screenshot), a reasoning item's
# encrypted content. Counted as text, a 1.5 MB PDF was 1.4 million prompt tokens, recorded whenever
# the provider reported no usage (2026-12-06); a model's provider counts them by its own rules.
BINARY_KEYS = frozenset({"file_data", "encrypted_content"})  # and `data` beside `"type": "base64"` (a text document's `data` is text)
NOT_TEXT_PARTS = frozenset({"image_url", "input_image", "image", "input_audio"})


def _text_of(value: Any) -> str:
    """The text a message field carries: strings, text parts of content lists, tool calls and other
    parts as JSON without their binary payloads."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif not isinstance(kind := part.get("type"), str) or kind not in NOT_TEXT_PARTS:  # `{"type": {}}` is unhashable
                    parts.append(orjson.dumps(_without_binary(part)).decode())
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    if isinstance(value, dict):
        return orjson.dumps(_without_binary(value)).decode()
    return ""


def _without_binary(value: Any) -> Any:
    """(A body nested too deep for this fails its count, as for orjson: the event is recorded without
    the estimate, metering/usage.py.)"""
    if isinstance(value, dict):
        base64 = value.get("type") == "base64"
        return {k: "" if isinstance(v, str) and (k in BINARY_KEYS or k == "data" and base64) else _without_binary(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_binary(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value[:200]:
        return ""
    return value
