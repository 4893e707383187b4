"""A bounded closed-loop load generator for 127.0.0.1 (asyncio + aiohttp).

`concurrency` workers each send one request, wait for the whole answer (a stream is read to its
end), and send the next. After `warmup` seconds the measured window opens: requests *started* in
it, until `duration` has passed or `max_requests` were started, are measured; the window closes
when the last of them has finished, so nothing is left in flight. Time to first byte is the first
body chunk's arrival. A request counts as successful when the status is 200 and the body is
complete (`[DONE]` at the end of a stream, a `usage` object in a JSON answer).

    python bench/loadgen.py --url http://127.0.0.1:9101/v1/chat/completions --concurrency 32 --duration 5 --stream

It always stops: every request has a timeout and the whole run a hard deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

DEFAULT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Add retries with jitter to the payment webhook client."}],
    "max_tokens": 20,
}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


async def _one(session: aiohttp.ClientSession, url: str, payload: bytes, headers: dict, stream: bool) -> tuple[bool, float, float | None, str | None]:
    start = time.perf_counter()
    ttfb = None
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            tail = b""
            async for chunk in resp.content.iter_any():
                if ttfb is None:
                    ttfb = time.perf_counter() - start
                tail = (tail + chunk)[-64:] if stream else tail + chunk
            elapsed = time.perf_counter() - start
            if resp.status != 200:
                return False, elapsed, ttfb, f"HTTP {resp.status}: {tail[:200]!r}"
            complete = tail.rstrip().endswith(b"data: [DONE]") if stream else b'"usage"' in tail
            return complete, elapsed, ttfb, None if complete else "incomplete body"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return False, time.perf_counter() - start, ttfb, f"{type(exc).__name__}: {exc}"


async def run_load(
    url: str,
    *,
    concurrency: int,
    duration: float,
    max_requests: int,
    stream: bool = False,
    body: dict | None = None,
    headers: dict | None = None,
    warmup: float = 0.5,
    request_timeout: float = 30.0,
    mark: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """One measured window. `mark()` is called when it opens and when it closes (e.g. to read CPU time)."""
    payload = json.dumps({**(body or DEFAULT_BODY), "stream": stream}).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: list[str] = []
    totals = {"ok": 0, "failed": 0}  # every request, warm-up included (what the server saw)
    state: dict[str, Any] = {"measuring": False, "started": 0, "closed": False}
    window_open = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            if state["closed"]:
                return
            measured = state["measuring"]
            if measured:
                if state["started"] >= max_requests or time.perf_counter() >= state["deadline"]:
                    return
                state["started"] += 1
            ok, elapsed, ttfb, error = await _one(session, url, payload, headers, stream)
            totals["ok" if ok else "failed"] += 1
            if measured:
                if ok:
                    latencies.append(elapsed)
                    if ttfb is not None:
                        ttfbs.append(ttfb)
                else:
                    errors.append(error or "failed")

    async def clock(workers: list[asyncio.Task]) -> None:
        await asyncio.sleep(warmup)
        state["mark_start"] = mark() if mark else None
        state["t0"] = time.perf_counter()
        state["deadline"] = state["t0"] + duration
        state["measuring"] = True
        window_open.set()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        clock_task = asyncio.create_task(clock(workers))
        try:
            # Hard bound: warm-up + window + one request timeout to drain.
            await asyncio.wait_for(asyncio.gather(clock_task, *workers), warmup + duration + request_timeout + 5)
        except asyncio.TimeoutError:
            state["closed"] = True
            for task in workers:
                task.cancel()
            errors.append("run hit its hard deadline")
        t1 = time.perf_counter()
        mark_end = mark() if mark else None

    window = t1 - state.get("t0", t1)
    count = len(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "url": url,
        "stream": stream,
        "concurrency": concurrency,
        "window_seconds": round(window, 4),
        "count": count,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "rps": round(count / window, 2) if window > 0 else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "ttfb_p50_ms": ms(percentile(ttfbs, 50)),
        "total_ok": totals["ok"],
        "total_failed": totals["failed"],
        "mark_start": state.get("mark_start"),
        "mark_end": mark_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:9101/v1/chat/completions")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=20, help="chunks the fake provider streams")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_load(args.url, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup,
                                  max_requests=args.max_requests, stream=args.stream,
                                  body={**DEFAULT_BODY, "max_tokens": args.max_tokens}, headers=headers))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
