"""The benchmark's results as markdown, and the issue's targets checked against them."""

from __future__ import annotations

from typing import Any

TASKPROXIES = ("taskproxy-sqlite", "taskproxy-postgres")


def fmt(s: dict | None, digits: int = 2, unit: str = "") -> str:
    if not s or s.get("median") is None:
        return "–"
    f = lambda v: f"{v:.{digits}f}"  # noqa: E731
    if s["min"] == s["max"]:
        return f"{f(s['median'])}{unit}"
    return f"{f(s['median'])}{unit} ({f(s['min'])}–{f(s['max'])})"


def _check(name: str, measured: float | None, limit: float, *, at_least: bool = False, unit: str = "", digits: int = 2) -> dict[str, Any]:
    met = None if measured is None else (measured >= limit if at_least else measured <= limit)
    return {"target": name, "limit": f"{'≥' if at_least else '≤'} {limit}{unit}", "measured": None if measured is None else f"{measured:.{digits}f}{unit}",
            "met": met}  # fmt: skip


def targets_table(r: dict) -> list[dict[str, Any]]:
    """Issue 6's targets, each with the median measured for taskproxy on each database."""
    checks = []
    rows = {(row["stream"], row["concurrency"]): row["targets"] for row in r.get("rows", [])}
    instr = r.get("instructions", {})
    for tp in TASKPROXIES:
        if tp not in rows.get((False, 1), {}):
            continue
        db = tp.split("-")[1]
        median = lambda row, metric: (rows[row][tp].get(metric) or {}).get("median")  # noqa: E731
        checks.append(_check(f"{db}: added p50, non-streaming, c=1", median((False, 1), "added_p50_ms"), 1, unit=" ms"))
        checks.append(_check(f"{db}: added p99, non-streaming, c=1", median((False, 1), "added_p99_ms"), 3, unit=" ms"))
        checks.append(_check(f"{db}: added TTFB p50, stream, c=1", median((True, 1), "added_ttfb_p50_ms"), 1.5, unit=" ms"))
        for stream in (False, True):
            if "rps_vs_litellm" in rows[(stream, 32)][tp]:
                checks.append(_check(f"{db}: req/s vs LiteLLM, {'stream' if stream else 'non-streaming'}, c=32",
                                     median((stream, 32), "rps_vs_litellm"), 20, at_least=True, unit="×", digits=1))  # fmt: skip
        if tp in instr:
            checks.append(_check(f"{db}: instructions per non-streaming request (c=1)", instr[tp]["json_c1"]["per_request"] / 1e6, 2, unit=" M"))
            checks.append(_check(f"{db}: instructions per 20-chunk stream (c=1)", instr[tp]["stream_c1"]["per_request"] / 1e6, 4, unit=" M"))
        start = r.get("startup_seconds", {}).get(tp)
        if start:
            checks.append(_check(f"{db}: start to first served request", start["median"], 2, unit=" s"))
    memory = r.get("memory")
    if memory:
        runs = memory["runs"]
        label = f"{memory['requests_per_run']:,}"
        checks.append(_check(f"resident memory after a {label}-request run", runs[0]["VmRSS"], 150, unit=" MiB", digits=1))
        checks.append(_check(f"growth over a second {label}-request run", memory["growth_second_run_mib"], 5, unit=" MiB", digits=1))
    return checks


def markdown(r: dict) -> str:
    names = list(r["rows"][0]["targets"]) if r.get("rows") else []
    lines = [
        f"taskproxy benchmark ({'quick' if r['quick'] else 'full'}: {r['repetitions']} repetitions of {r['window_seconds']} s windows, "
        f"targets alternating within each repetition; median (min–max) over repetitions). {r['machine']['cpus']} CPUs shared by the "
        "load generator, the fake provider and the server; loopback; taskproxy recording on. `fake` is the provider called directly.",
        "",
        "| mode | conc | target | req/s | p50 / p99 ms | TTFB p50 ms | added p50 / p99 ms | added TTFB p50 ms | vs direct | vs LiteLLM | CPU ms/req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r.get("rows", []):
        for name in names:
            t = row["targets"][name]
            added = f"{fmt(t.get('added_p50_ms'))} / {fmt(t.get('added_p99_ms'))}" if "added_p50_ms" in t else "–"
            lines.append(
                f"| {row['mode']} | {row['concurrency']} | {name} | {fmt(t['rps'], 0)} | {fmt(t['p50_ms'])} / {fmt(t['p99_ms'])} "
                f"| {fmt(t['ttfb_p50_ms'])} | {added} | {fmt(t.get('added_ttfb_p50_ms'))} | {fmt(t.get('rps_vs_direct'), 2, '×')} "
                f"| {fmt(t.get('rps_vs_litellm'), 1, '×')} | {fmt(t['cpu_ms_per_req'], 3)} |"
            )
    instr = r.get("instructions", {})
    if "skipped" in instr:
        lines += ["", f"Instructions per request: not measured — {instr['skipped']}."]
    elif instr:
        lines += ["", f"Instructions per request ({instr['method']}; millions, requests counted in brackets):", "",
                  "| server | non-streaming c=1 | non-streaming c=32 | stream c=1 | stream c=32 |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, per in instr.items():
            if name == "method":
                continue
            cells = [f"{per[k]['per_request'] / 1e6:.2f} ({per[k]['requests']})" for k in ("json_c1", "json_c32", "stream_c1", "stream_c32")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "Start-up (spawn → first proxied request answered): " + "; ".join(
        f"{name} {fmt(s, 2, ' s')}" for name, s in r.get("startup_seconds", {}).items())]  # fmt: skip
    memory = r.get("memory")
    if memory:
        runs = memory["runs"]
        lines.append(
            f"Memory ({memory['target']}, VmRSS): {memory['before'].get('VmRSS')} MiB before; {runs[0]['VmRSS']} MiB after {runs[0]['requests']:,} "
            f"requests; {runs[1]['VmRSS']} MiB after {runs[1]['requests']:,} more (growth {memory['growth_second_run_mib']} MiB; peak {runs[1]['VmHWM']} MiB)."
        )
    for name, rec in r.get("recording", {}).items():
        lines.append(f"Recording ({name}): served {rec['served_ok']}, recorded {rec['recorded']} → {'exact' if rec['exact'] else 'MISMATCH'}.")
    for note in r.get("notes", []):
        lines.append(f"Note: {note}.")
    lines += ["", "| target (issue 6) | limit | measured | met |", "|---|---:|---:|:-:|"]
    for t in r.get("targets", []):
        lines.append(f"| {t['target']} | {t['limit']} | {t['measured'] or '–'} | {'yes' if t['met'] else 'no' if t['met'] is False else '–'} |")
    lines += ["", f"Total run time: {r['total_seconds']} s."]
    return "\n".join(lines) + "\n"
