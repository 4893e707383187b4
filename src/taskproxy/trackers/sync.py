"""Catching up on deliveries that never arrived (`taskproxy items sync`): the proxy was down, a secret
was rotated, a webhook was deleted.

For every work item with spend since `since` and no final status (then for those a tracker made done
or closed since then, whose reopening may have been lost), the tracker's REST API is asked for its current
state, with a token from the config (`trackers.<name>.token_env`). Each answer is read by the same
parser as that tracker's webhook (the REST objects are the webhooks' objects), so the
transitions are the webhooks' own: a merged pull request is done and links the ticket its branch
names, a ticket closed as Won't Do is closed.

The answers are applied a batch at a time (`BATCH`, per tracker), each batch in one transaction, so
that a backlog larger than a tracker's hourly quota converges over runs: a tracker that rate-limits,
refuses the token or fails part-way stops the run with the batches before it applied, and says so.
A server error is asked again twice, and a short `Retry-After` waited out. Each answer is read to at
most `MAX_ANSWER_BYTES` within `ANSWER_SECONDS` (a tracker that streams forever, or a byte at a time,
cannot hold the run), must be a 2xx (a redirect is not the item), and must be about the item asked
for (a moved issue answers with its new key: that is a note, not a change to another item).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
import orjson
from sqlalchemy import and_, case, or_, select
from sqlalchemy.engine import Engine
from starlette.datastructures import Headers

from taskproxy.errors import ItemElsewhere, TrackerUnavailable, WorkItemInvalid
from taskproxy.guard.body import more_json_values_than
from taskproxy.settings import TrackersSettings
from taskproxy.storage.models import UsageDaily, WorkItem
from taskproxy.trackers.base import Delivery, ItemUpdate, Size, count
from taskproxy.trackers.github import GitHub
from taskproxy.trackers.gitlab import GitLab
from taskproxy.trackers.jira import Jira
from taskproxy.trackers.linear import Linear
from taskproxy.workitems import RESOLVED, WorkItemIds

TRACKERS = ("github", "gitlab", "jira", "linear")
BATCH = 100  # answers applied together
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # one item's answer: a few KiB in practice
MAX_ANSWER_VALUES = 200_000
ANSWER_SECONDS = 60.0  # one answer, whole: the client's timeout bounds each read only
RETRIES = 2  # a 5xx or a connection cut is asked again this many times
MAX_RETRY_AFTER_SECONDS = 10.0  # a longer wait ends the run (run it again later)
DEFAULT_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com", "linear": "https://api.linear.app/graphql"}
_GITLAB_SIZE_QUERY = (
    "query($path: ID!, $iid: String!) { project(fullPath: $path) { mergeRequest(iid: $iid) "
    "{ diffStatsSummary { additions deletions fileCount } } } }"
)
_GITHUB_ID = re.compile(r"^([^/#!]+/[^/#!]+)#(\d+)$")
_GITLAB_ID = re.compile(r"^(.+?)([#!])(\d+)$")
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*-\d+$")
_LINEAR_QUERY = ("query($id: String!) { issue(id: $id) { identifier title url createdAt updatedAt completedAt canceledAt "
                 "estimate state { type } } }")  # fmt: skip


@dataclass(frozen=True)
class Pending:
    item_id: str
    status: str
    source: str  # who registered it: a tracker's name, auto, manual, api
    sized: bool = True  # the item has lines (only asked of merged GitLab merge requests)
    recheck: bool = False  # resolved by a tracker: asked again in case its reopening was lost


def pending_items(engine: Engine, since: datetime) -> list[Pending]:
    """Items with spend since `since` (the daily rollup, by its index) and no final status; merged
    GitLab merge requests with spend and no lines yet (GitLab's hooks carry none: only its API has them);
    and, after those, the items a tracker made done or closed since `since` that have spend since: a
    reopening whose delivery was lost left them counted as completed work for good. Not a merged pull
    request (a merge is final), nor an item an admin completed after the tracker's last event; and only
    those completed in the period, so that what a run re-asks stays within what its reports read."""
    spent = select(UsageDaily.work_item).where(UsageDaily.bucket >= since.replace(hour=0, minute=0, second=0, microsecond=0)).distinct()
    w = WorkItem.__table__.c
    unsized_merge_request = and_(w.status == "done", w.id.contains("!"), w.lines_added.is_(None), w.lines_deleted.is_(None))
    # Completed by a tracker's event: its time is the completion's (an admin's completion came after the tracker's last event).
    resolved_by_a_tracker = and_(w.status.in_(RESOLVED), w.merged_at.is_(None), w.completed_at >= since, w.tracker_event_at >= w.completed_at)
    # Not a stacked pull request either: merged into another branch, it is merged for good (stacks.py).
    wanted = or_(and_(w.status.not_in(RESOLVED), w.merged_at.is_(None)), unsized_merge_request)
    query = select(w.id, w.status, w.source, ~unsized_merge_request, ~wanted).where(w.id.in_(spent), or_(wanted, resolved_by_a_tracker))
    # What is wanted first (a run the tracker's quota stops has asked it), then the latest completed.
    query = query.order_by(case((wanted, 0), else_=1), w.completed_at.desc().nulls_last(), w.id)
    with engine.connect() as connection:
        return [Pending(*row) for row in connection.execute(query)]


def tracker_of(item: Pending, configured: Iterable[str]) -> str | None:
    """The tracker that holds `item`: by who registered it, else by the form of its id."""
    usable = set(configured)
    if item.source in usable:
        return item.source
    if _GITHUB_ID.match(item.item_id):
        return "github" if "github" in usable else "gitlab" if "gitlab" in usable else None
    if _GITLAB_ID.match(item.item_id) and "/" in item.item_id:
        return "gitlab" if "gitlab" in usable else None
    if _KEY.match(item.item_id):
        found = [name for name in ("jira", "linear") if name in usable]
        return found[0] if len(found) == 1 else None  # both configured: only the item's source can tell
    return None


def _seconds(value: str | None) -> float | None:
    """A `Retry-After` in seconds (its date form is not waited for), or None."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class Fetcher:
    """Asks one tracker's REST API for an item's current state, as the update its webhook would give."""

    def __init__(self, name: str, http: httpx.Client, api: str, token: str, ids: WorkItemIds, now: datetime, points_field: str | None = None,
                 landing_branches: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.name, self._http, self._api, self._token, self._now = name, http, api.rstrip("/"), token, now
        self._points_field = points_field
        # The webhook parsers; their signing secrets are not used to read an answer.
        self._parsers: dict[str, Any] = {"github": GitHub("", ids, landing_branches), "gitlab": GitLab("", ids, landing_branches), "jira": Jira("", points_field), "linear": Linear("", 60.0)}

    def fetch(self, item_id: str) -> ItemUpdate | None:
        """None when the tracker has no such item (it is left as it is). An answer not shaped as the
        tracker documents stops the run, naming the tracker and the item."""
        try:
            return {"github": self._github, "gitlab": self._gitlab, "jira": self._jira, "linear": self._linear}[self.name](item_id)
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
            raise TrackerUnavailable(f"{self.name}: the answer for {item_id} is not shaped as {self.name}'s API documents ({exc.__class__.__name__}).") from None

    def _get(self, url: str, headers: Mapping[str, str]) -> dict | None:
        return self._answer(lambda: self._http.build_request("GET", url, headers=dict(headers)), url)

    def _answer(self, request: Callable[[], httpx.Request], url: str) -> dict | None:
        where = url.split("?")[0]
        for attempt in range(RETRIES + 1):
            try:
                status, headers, raw = self._read(request(), where)
            except httpx.TransportError as exc:
                if attempt < RETRIES:
                    time.sleep(1.0 + attempt)
                    continue
                raise TrackerUnavailable(f"{self.name}: could not reach {where} ({exc.__class__.__name__}).") from None
            if status >= 500 and attempt < RETRIES:
                time.sleep(1.0 + attempt)
                continue
            wait = _seconds(headers.get("retry-after"))
            limited = status == 429 or status == 403 and (headers.get("x-ratelimit-remaining") == "0" or wait is not None or b"rate limit" in raw[:2000].lower())
            if limited and wait is not None and wait <= MAX_RETRY_AFTER_SECONDS and attempt < RETRIES:
                time.sleep(wait)
                continue
            return self._decoded(status, headers, raw, where, limited)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, request: httpx.Request, where: str) -> tuple[int, httpx.Headers, bytes]:
        """The answer's status, headers and body, read to at most MAX_ANSWER_BYTES within ANSWER_SECONDS."""
        deadline = time.monotonic() + ANSWER_SECONDS
        response = self._http.send(request, stream=True)
        try:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise TrackerUnavailable(f"{self.name}: the answer of {where} is larger than {MAX_ANSWER_BYTES // (1024 * 1024)} MiB; stopped.")
                if time.monotonic() > deadline:
                    raise TrackerUnavailable(f"{self.name}: the answer of {where} took longer than {ANSWER_SECONDS:g} s; stopped.")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)
        finally:
            response.close()

    def _decoded(self, status: int, headers: httpx.Headers, raw: bytes, where: str, limited: bool) -> dict | None:
        if status == 404:
            return None
        if limited:
            wait = headers.get("retry-after") or headers.get("x-ratelimit-reset") or "?"
            raise TrackerUnavailable(f"{self.name}: rate limited (HTTP {status}, retry-after/reset {wait}). "
                                     "Run the sync again later, or with a narrower --since.")  # fmt: skip
        if status in (401, 403):
            raise TrackerUnavailable(f"{self.name}: the API refused the token (HTTP {status}); check trackers.{self.name}.token_env.")
        if status == 410:
            raise ItemElsewhere(f"{where} is gone (HTTP 410: deleted)")
        if 300 <= status < 400 and _an_item_elsewhere(self.name, urljoin(where, headers.get("location", "")), self._api):
            # An issue transferred to another repository, a repository renamed: this item, not the run.
            raise ItemElsewhere(f"{where} redirects (HTTP {status}) to {headers.get('location', '?')}: moved")
        if 300 <= status < 400:  # not followed: the token would go with it, and the item asked for is not what answers
            raise TrackerUnavailable(f"{self.name}: {where} redirects (HTTP {status}) to {headers.get('location', '?')}: the item moved, "
                                     f"or trackers.{self.name}.api_url is not the API's address.")  # fmt: skip
        if not 200 <= status < 300:
            raise TrackerUnavailable(f"{self.name}: the API answered HTTP {status} for {where}.")
        if more_json_values_than(raw, MAX_ANSWER_VALUES):
            raise TrackerUnavailable(f"{self.name}: the answer of {where} holds more than {MAX_ANSWER_VALUES:,} JSON values; stopped.")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TrackerUnavailable(f"{self.name}: the API's answer for {where} is not JSON (or is nested too deep).") from None
        return data if isinstance(data, dict) else None

    def _parse(self, event: str, payload: dict) -> ItemUpdate | None:
        delivery: Delivery = self._parsers[self.name].parse(Headers({"x-github-event": event}), payload, self._now)
        return delivery.updates[0] if delivery.updates else None

    def _github(self, item_id: str) -> ItemUpdate | None:
        repo, number = _GITHUB_ID.match(item_id).groups()  # type: ignore[union-attr]
        headers = {"authorization": f"Bearer {self._token}", "accept": "application/vnd.github+json", "x-github-api-version": "2022-11-28"}
        issue = self._get(f"{self._api}/repos/{repo}/issues/{number}", headers)
        if issue is None:
            return None
        if "pull_request" in issue:  # a pull request: whether it was merged is on the pull itself
            pull = self._get(f"{self._api}/repos/{repo}/pulls/{number}", headers)
            if pull is None:
                return None
            action = "closed" if pull.get("state") == "closed" else "opened"
            return self._parse("pull_request", {"action": action, "pull_request": pull, "repository": {"full_name": repo}})
        action = "closed" if issue.get("state") == "closed" else "opened"
        return self._parse("issues", {"action": action, "issue": issue, "repository": {"full_name": repo}})

    def _gitlab(self, item_id: str) -> ItemUpdate | None:
        path, mark, iid = _GITLAB_ID.match(item_id).groups()  # type: ignore[union-attr]
        kind = "merge_requests" if mark == "!" else "issues"
        found = self._get(f"{self._api}/api/v4/projects/{quote(path, safe='')}/{kind}/{iid}", {"private-token": self._token})
        if found is None:
            return None
        state = found.get("state")
        action = {"merged": "merge", "closed": "close"}.get(state, "open") if kind == "merge_requests" else ("close" if state == "closed" else "open")
        attributes = {**found, "url": found.get("web_url"), "action": action}
        update = self._parse("", {"object_kind": "merge_request" if mark == "!" else "issue", "object_attributes": attributes,
                                  "project": {"path_with_namespace": path}})  # fmt: skip
        if update is not None and kind == "merge_requests":
            update = replace(update, size=self._gitlab_size(path, iid))
        return update

    def _gitlab_size(self, path: str, iid: str) -> Size | None:
        """A merge request's lines and files: only GitLab's GraphQL API has them (`diffStatsSummary`;
        neither the REST API nor the merge request hook carries line counts)."""
        url = f"{self._api}/api/graphql"
        body = {"query": _GITLAB_SIZE_QUERY, "variables": {"path": path, "iid": iid}}
        answer = self._answer(lambda: self._http.build_request("POST", url, json=body, headers={"authorization": f"Bearer {self._token}"}), url)
        summary = ((((answer or {}).get("data") or {}).get("project") or {}).get("mergeRequest") or {}).get("diffStatsSummary")
        if not isinstance(summary, dict):
            return None  # not shown to this token, or an older GitLab: the size stays unknown
        size = Size(count(summary.get("additions")), count(summary.get("deletions")), count(summary.get("fileCount")))
        return size if size != Size() else None

    def _jira(self, item_id: str) -> ItemUpdate | None:
        token = self._token
        authorization = f"Basic {base64.b64encode(token.encode()).decode()}" if ":" in token else f"Bearer {token}"
        fields = "status,resolution,resolutiondate,statuscategorychangedate,created,updated,summary" + (f",{self._points_field}" if self._points_field else "")
        issue = self._get(f"{self._api}/rest/api/3/issue/{quote(item_id)}?fields={fields}", {"authorization": authorization, "accept": "application/json"})
        return None if issue is None else self._parse("", {"webhookEvent": "jira:issue_updated", "issue": issue})

    def _linear(self, item_id: str) -> ItemUpdate | None:
        body = {"query": _LINEAR_QUERY, "variables": {"id": item_id}}
        answer = self._answer(lambda: self._http.build_request("POST", self._api, json=body, headers={"authorization": self._token}), self._api)
        issue = ((answer or {}).get("data") or {}).get("issue")
        if not isinstance(issue, dict):
            if (answer or {}).get("errors") and "not found" not in str(answer["errors"]).lower():  # type: ignore[index]
                raise TrackerUnavailable(f"linear: the API answered errors for {item_id}: {str(answer['errors'])[:200]}; nothing was changed.")  # type: ignore[index]
            return None
        stamp = int((self._now - datetime(1970, 1, 1)).total_seconds() * 1000)  # now is naive UTC
        return self._parse("", {"type": "Issue", "action": "update", "data": issue, "url": issue.get("url"), "webhookTimestamp": stamp})


# Where a tracker's REST API redirects an item that moved: GitHub an issue transferred to another
# repository (by the repository's id) or a renamed repository; GitLab a moved project. (Linear's GraphQL
# answers no redirect for an item.)
_ITEM_PATHS = {
    "github": re.compile(r"/(?:repositories/\d+|repos/[^/]+/[^/]+)/(?:issues|pulls)/\d+/?$"),
    "gitlab": re.compile(r"/api/v4/projects/[^/]+/(?:issues|merge_requests)/\d+/?$"),
    "jira": re.compile(r"/rest/api/\d+/issue/[^/]+/?$"),
}


def _an_item_elsewhere(tracker: str, url: str, api: str) -> bool:
    """A redirect to another item of the tracker's own API (same scheme and host, an item's path): the
    item moved. Anything else (a sign-in page, another host, a wrong `api_url`) stops the run."""
    there, here = urlsplit(url), urlsplit(api)
    path = _ITEM_PATHS.get(tracker)
    return (there.scheme, there.netloc) == (here.scheme, here.netloc) and path is not None and path.search(there.path) is not None


def sync_items(
    engine: Engine, ids: WorkItemIds, trackers: TrackersSettings, *, since: datetime, now: datetime, only: str | None = None,
    http: httpx.Client | None = None, apply: Callable[[Delivery], None] | None = None,
) -> tuple[list[Delivery], list[str]]:  # fmt: skip
    """What each tracker says now about the pending items, as deliveries (and notes on what was skipped).
    With `apply`, each tracker's answers are handed to it a batch (`BATCH`) at a time as they come, and
    only the rest is returned; without, everything is returned, to apply after. Raises TrackerUnavailable
    when a tracker cannot answer, saying how many answers were handed to `apply` before it."""
    tokens = [name for name in TRACKERS if getattr(trackers, name).token is not None]
    if only is not None and only not in tokens:
        raise TrackerUnavailable(f"{only}: no API token: set trackers.{only}.token_env to the name of an environment variable that holds one.")
    usable = [only] if only else list(tokens)
    if not usable:
        raise TrackerUnavailable("no tracker has an API token: set trackers.<github|gitlab|jira|linear>.token_env.")
    notes: list[str] = []
    updates: dict[str, list[ItemUpdate]] = {}
    handed = 0
    client = http or httpx.Client(timeout=20.0, trust_env=True)
    try:
        fetchers: dict[str, Fetcher] = {}
        for item in pending_items(engine, since):
            name = tracker_of(item, usable)
            if name is None:
                if only is None and not item.recheck:  # a recheck is not owed: no note for each done item
                    notes.append(f"{item.item_id}: no configured tracker holds it")
                continue
            if name not in fetchers:
                fetchers[name] = _fetcher(name, trackers, client, ids, now)
            try:
                update = fetchers[name].fetch(item.item_id)
            except ItemElsewhere as moved:  # one moved or deleted item never stops the run (it did, every run, at that item)
                notes.append(f"{item.item_id}: {name}: {moved}; left as it is")
                continue
            if update is None:
                notes.append(f"{item.item_id}: {name} has no such item")
            elif _answered_for(ids, update) != item.item_id:  # a moved issue answers with its new key
                notes.append(f"{item.item_id}: {name} answered about {update.item_id} (moved?); left as it is")
            elif (update.status is not None and update.status != item.status) or (update.size is not None and not item.sized):
                updates.setdefault(name, []).append(update)
                if apply is not None and len(updates[name]) >= BATCH:
                    apply(Delivery(name, None, "sync", updates.pop(name)))
                    handed += BATCH
    except TrackerUnavailable as exc:
        if handed:
            raise TrackerUnavailable(f"{exc} {handed} answer(s) were applied before it; run the sync again to go on.") from None
        raise TrackerUnavailable(f"{exc} Nothing was changed.") from None
    finally:
        if http is None:
            client.close()
    return [Delivery(name, None, "sync", found) for name, found in updates.items()], notes


def _fetcher(name: str, trackers: TrackersSettings, client: httpx.Client, ids: WorkItemIds, now: datetime) -> Fetcher:
    settings = getattr(trackers, name)
    api = settings.api_url or DEFAULT_API.get(name)
    if not api:
        raise TrackerUnavailable(f"{name}: set trackers.{name}.api_url (your site, e.g. https://acme.atlassian.net).")
    token = settings.token.get_secret_value()
    if not (token.isascii() and token.isprintable()):
        raise TrackerUnavailable(f"{name}: the token in trackers.{name}.token_env has characters no HTTP header carries.")
    return Fetcher(name, client, api, token, ids, now, getattr(settings, "story_points_field", None), trackers.landing_branches)


def _answered_for(ids: WorkItemIds, update: ItemUpdate) -> str | None:
    try:
        return ids.normalize(update.item_id)
    except WorkItemInvalid:  # an id the answer made up is no id of this item
        return None
