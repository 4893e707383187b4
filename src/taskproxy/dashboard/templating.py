"""Jinja2 set up for the dashboard (`Pages`, one per app, in the lifespan's state): autoescaping always
on, undefined names are errors, the number and time filters of `format`, and the headers every
dashboard page is sent with."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse

from taskproxy.dashboard import format as fmt
from taskproxy.dashboard.fields import field_value

if TYPE_CHECKING:
    from jinja2 import Environment

HERE = Path(__file__).parent

# Nothing is loaded from anywhere but this server: no CDN, no font, no script at all.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def item_url(item_id: str) -> str:
    """The dashboard page of a work item; the id is URL-encoded (`acme/web#12` → `acme%2Fweb%2312`)."""
    return "/dashboard/items/" + quote(item_id, safe="")


def safe_link(url: str | None) -> str | None:
    """`url` if it is an http(s) link, else None: a tracker URL such as `javascript:...` is shown, never linked."""
    if not url:
        return None
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None
    return url if scheme in ("http", "https") else None


class Pages:
    """The dashboard's templates and stylesheet, one per app (in its lifespan's state). Jinja2 is imported
    and the templates set up at the first page: a replica that never serves the dashboard does not hold
    them (about 2 MiB less resident after load, docs/scale-runs.md; Jinja2's import alone allocates 4.5 MiB)."""

    def __init__(self) -> None:
        self.stylesheet = (HERE / "static" / "dashboard.css").read_bytes()

    @cached_property
    def templates(self) -> Environment:
        from jinja2 import Environment, FileSystemLoader, StrictUndefined

        env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.do"],
        )
        env.filters.update(fmt.FILTERS)
        env.filters["field"] = field_value
        env.globals.update(item_url=item_url, safe_link=safe_link, NONE=fmt.NONE)
        return env


def render(request: Request, name: str, context: dict[str, Any], *, status: int = 200, session: Any = None) -> HTMLResponse:
    pages: Pages = request.state.pages
    html = pages.templates.get_template(name).render({"request_path": request.url.path, "session": session, **context})
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
