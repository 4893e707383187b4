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
# New text one estimate counts exactly; past it, the rest is extrapolated at the rate counted. What
# counting costs depends on the text's shape, not only its size: 2 million random letters without a
# space took tiktoken 1.47 s, so 8 MiB prompts (well under the body limit) kept the recording thread
# ~6 s each, and everyone's usage waited behind them. 256 KiB is 12 ms of prose, 0.2 s at worst.
COUNT_EXACT_CHARS = 256 * 1024
CHARS_PER_TOKEN = 4  # the rate assumed before anything was counted (English prose in OpenAI's encodings)


class CountBudget:
    """How much new text one estimate counts exactly, and at what rate it counted (for the rest)."""

    __slots__ = ("chars", "left", "tokens")

    def __init__(self, chars: int = COUNT_EXACT_CHARS) -> None:
        self.left = chars
        self.chars = self.tokens = 0  # counted so far

    def spend(self, chars: int, tokens: int) -> None:
        self.left -= chars
        self.chars += chars
        self.tokens += tokens

    def extrapolate(self, chars: int) -> int:
        return round(chars * self.tokens / self.chars) if self.chars else -(-chars // CHARS_PER_TOKEN)


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
        With a `budget`, new text past what is left of it is extrapolated, not counted."""
        if not text:
            return 0
        name = encoding_name_for(model)
        # The text itself is not kept: its length and (per-process randomized) hash identify it.
        key = (name, len(text), hash(text))
        tokens = self._counts.get(key)
        if tokens is not None:
            return tokens
        if budget is not None and len(text) > budget.left:
            counted = max(budget.left, 0)
            sample = len(self._encoding(name).encode_ordinary(text[:counted])) if counted else 0
            budget.spend(counted, sample)
            return sample + budget.extrapolate(len(text) - counted)
        tokens = len(self._encoding(name).encode_ordinary(text))
        if budget is not None:
            budget.spend(len(text), tokens)
        if len(self._counts) >= REMEMBERED_COUNTS:
            self._counts.clear()
        self._counts[key] = tokens
        return tokens

    def count_chat(self, model: str, messages: Iterable[Any], tools: Any = None, budget: CountBudget | None = None) -> int:
        """Prompt tokens of a chat request by OpenAI's per-message rules."""
        total = REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
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


def _text_of(value: Any) -> str:
    """The text a message field carries: strings, text parts of content lists, tool calls as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") not in {"image_url", "input_image", "image", "input_audio"}:
                    parts.append(orjson.dumps(part).decode())
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return ""
