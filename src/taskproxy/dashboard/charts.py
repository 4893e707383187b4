"""Charts as inline SVG: no script, no external asset, readable without colour (every bar carries its
value in a tooltip, and each chart sits next to a table of the same figures).

Every piece of text put in the SVG is escaped here; the result is `Markup` for the templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

BAR = "#2f5f98"
GRID = "#d5d9de"
INK = "#333a42"
MUTED = "#6b7580"


@dataclass(frozen=True)
class Point:
    label: str  # under the bar
    value: float | None  # None: no figure for this slot (drawn as a dash, not as zero)
    note: str = ""  # extra words for the tooltip, e.g. "4 completed items"


def _ticks(top: float) -> int:
    """Intervals on the y axis: round steps for a top of 1, 2, 2.5 or 5 × 10^n."""
    mantissa = top / 10 ** math.floor(math.log10(top))
    return 4 if round(mantissa, 6) == 2 else 5


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n at or above `value` (for the top of the y axis)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10**exponent
        if top >= value * (1 - 1e-12):
            return float(top)
    return float(10 ** (exponent + 1))  # pragma: no cover


def bar_chart(
    points: Sequence[Point],
    *,
    chart_id: str,
    title: str,
    description: str,
    fmt: Callable[[float | None], str],
    width: int = 960,
    height: int = 260,
) -> Markup:
    values = [p.value for p in points if p.value is not None]
    y_max = nice_ceiling(max(values)) if values and max(values) > 0 else 1.0
    intervals = _ticks(y_max)
    ticks = [y_max * i / intervals for i in range(intervals + 1)]
    # Room for the longest tick label (about 7.5 units a character at font size 12).
    left, right, top, bottom = int(16 + 7.5 * max(len(fmt(t)) for t in ticks)), 12, 14, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(points), 1)
    bar_w = max(min(slot * 0.64, 56), 2)
    every = max(1, math.ceil(len(points) / 12))  # at most ~12 x labels

    def y(value: float) -> float:
        return top + plot_h - (value / y_max) * plot_h

    cid = escape(chart_id)
    parts = [
        (
            f'<svg class="chart" id="{cid}" viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-labelledby="{cid}-title {cid}-desc" preserveAspectRatio="xMidYMid meet">'
        ),
        f'<title id="{cid}-title">{escape(title)}</title>',
        f'<desc id="{cid}-desc">{escape(description)}</desc>',
    ]
    for tick in ticks:
        ty = y(tick)
        parts.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{width - right}" y2="{ty:.1f}" stroke="{GRID}" stroke-width="1"/>')
        parts.append(
            f'<text x="{left - 8}" y="{ty + 4:.1f}" text-anchor="end" font-size="12" fill="{MUTED}">{escape(fmt(tick))}</text>'
        )
    for index, point in enumerate(points):
        cx = left + slot * index + slot / 2
        tooltip = f"{point.label}: {fmt(point.value) if point.value is not None else 'no data'}"
        if point.note:
            tooltip += f" ({point.note})"
        if point.value is None:
            parts.append(
                f'<text x="{cx:.1f}" y="{top + plot_h - 4:.1f}" text-anchor="middle" font-size="12" fill="{MUTED}">'
                f"<title>{escape(tooltip)}</title>–</text>"
            )
        else:
            bar_top = y(point.value)
            bar_h = max(top + plot_h - bar_top, 1 if point.value > 0 else 0)
            parts.append(
                f'<rect class="bar" x="{cx - bar_w / 2:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
                f'fill="{BAR}" data-value="{point.value!r}"><title>{escape(tooltip)}</title></rect>'
            )
        if index % every == 0:
            parts.append(
                f'<text x="{cx:.1f}" y="{height - bottom + 18}" text-anchor="middle" font-size="12" fill="{INK}">{escape(point.label)}</text>'
            )
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="{INK}" stroke-width="1"/>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
