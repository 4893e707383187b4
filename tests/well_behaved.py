"""A well-behaved client, run as its own process (`python well_behaved.py URL KEY ITEM STOPFILE READYFILE
ATTACKFILE`): one request after another on a kept-alive connection, each timed, until STOPFILE exists
(READYFILE appears once the first is answered; ATTACKFILE when the test starts its attack); then it
prints {"latencies", "statuses", "tokens", "attack_from"} as JSON (`attack_from`: the index of the
first request sent after ATTACKFILE appeared). Its own process, so that what the test process does
(attackers, the fake provider) does not take its interpreter, and its timings are the server's."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx


def main(url: str, key: str, item: str, stop: str, ready: str, attack: str) -> None:
    latencies, statuses, tokens = [], [], 0
    attack_from = None
    headers = {"authorization": f"Bearer {key}", "X-Work-Item": item}
    with httpx.Client(base_url=url, timeout=10, headers=headers, trust_env=False) as client:
        while not Path(stop).exists():
            if attack_from is None and Path(attack).exists():
                attack_from = len(latencies)
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)
            if response.status_code == 200:
                tokens += response.json()["usage"]["total_tokens"]
            if len(statuses) == 1:  # connected and answered: the test may start its attack
                Path(ready).touch()
            time.sleep(0.02)
    print(json.dumps({"latencies": latencies, "statuses": statuses, "tokens": tokens, "attack_from": attack_from}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
