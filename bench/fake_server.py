"""Serve taskproxy's fake provider as its own process, for the benchmark (bench/run.py).

    python bench/fake_server.py --port 9101

It answers at once; `max_tokens` in a request sets the number of streamed chunks. uvloop and
httptools, access log off, so the fake costs as little as it can on a shared machine.
"""

from __future__ import annotations

import argparse

import uvicorn

from taskproxy.fake_provider import FakeProvider


class _Forgetful(list):
    """FakeProvider keeps every request it receives; in a benchmark that is a memory leak. Keep none."""

    def append(self, item):  # type: ignore[no-untyped-def]
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--flood-bytes", type=int, default=300 * 1024 * 1024, help="the size of a fake-flood answer")
    parser.add_argument("--flood-piece-bytes", type=int, default=256 * 1024, help="the size of each of its pieces")
    parser.add_argument("--flood-delay", type=float, default=0.0, help="seconds between its pieces")
    args = parser.parse_args()
    fake = FakeProvider(received=_Forgetful(), flood_bytes=args.flood_bytes, flood_piece_bytes=args.flood_piece_bytes, flood_delay=args.flood_delay)
    uvicorn.run(fake.app(), host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
