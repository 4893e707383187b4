"""The benchmark's chart as a standalone SVG: requests/s and added p50 latency per scenario, for the
provider called directly, taskproxy and the LiteLLM proxy (log scales: they differ by 100×).

    python bench/chart.py bench/results/latest.json docs/performance.svg
"""

from __future__ import annotations

import json
import math
import sys
from html import escape
from pathlib import Path

COLORS = {"fake": "#7f8c8d", "taskproxy-sqlite": "#1f77b4", "taskproxy-postgres": "#2ca02c", "litellm": "#d62728"}
LABELS = {"fake": "direct to the provider", "taskproxy-sqlite": "taskproxy (SQLite)", "taskproxy-postgres": "taskproxy (PostgreSQL)", "litellm": "LiteLLM proxy"}


def _panel(x0: float, y0: float, width: float, height: float, title: str, groups: list[str], series: dict[str, list[float | None]],
           unit: str) -> list[str]:  # fmt: skip
    values = [v for vs in series.values() for v in vs if v is not None and v > 0]
    if not values:
        return []
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    scale = lambda v: height * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))  # noqa: E731
    out = [f'<text x="{x0}" y="{y0 - 12}" font-size="14" font-weight="bold">{escape(title)}</text>']
    decade = lo
    while decade <= hi:
        y = y0 + height - scale(decade)
        out.append(f'<line x1="{x0}" x2="{x0 + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{decade:g}{unit}</text>')
        decade *= 10
    group_width = width / len(groups)
    bar = group_width * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        gx = x0 + g * group_width + group_width * 0.1
        for s, (name, vs) in enumerate(series.items()):
            v = vs[g]
            if v is None or v <= 0:
                continue
            h = scale(max(v, lo))
            x = gx + s * bar
            out.append(f'<rect x="{x:.1f}" y="{y0 + height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="{COLORS.get(name, "#999")}"/>')
            label = f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"
            out.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{y0 + height - h - 3:.1f}" font-size="9" text-anchor="middle">{label}</text>')
        out.append(f'<text x="{gx + group_width * 0.4:.1f}" y="{y0 + height + 16}" font-size="11" text-anchor="middle">{escape(group)}</text>')
    return out


def render_svg(results: dict) -> str:
    rows = results.get("rows", [])
    groups = [f"{'stream' if r['stream'] else 'JSON'}, c={r['concurrency']}" for r in rows]
    names = list(rows[0]["targets"]) if rows else []
    rps = {n: [r["targets"][n]["rps"]["median"] for r in rows] for n in names}
    added = {n: [(r["targets"][n].get("added_p50_ms") or {}).get("median") for r in rows] for n in names if n != "fake"}
    width, height = 900, 640
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" viewBox="0 0 {width} {height}">',
           '<rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    out += _panel(70, 50, 800, 200, "Requests per second (log scale; higher is better)", groups, rps, "")
    out += _panel(70, 340, 800, 200, "Added latency over direct, p50 (ms, log scale; lower is better)", groups, added, "")
    x = 70
    for name in names:
        out.append(f'<rect x="{x}" y="598" width="12" height="12" fill="{COLORS.get(name, "#999")}"/>')
        out.append(f'<text x="{x + 16}" y="608" font-size="12">{escape(LABELS.get(name, name))}</text>')
        x += 200
    machine = results.get("machine", {})
    caption = f"{machine.get('cpus')} shared CPUs, loopback, fake provider; median of {results.get('repetitions')} repetitions; bench/run.py"
    out.append(f'<text x="70" y="630" font-size="10" fill="#555">{escape(caption)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    source, target = sys.argv[1], sys.argv[2]
    Path(target).write_text(render_svg(json.loads(Path(source).read_text())))
