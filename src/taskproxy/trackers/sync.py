"""Catching up on deliveries that never arrived (`taskproxy items sync`): the proxy was down, a secret
was rotated, a webhook was deleted.

For every work item with spend since `since` and no final status, the tracker's REST API is asked for
its current state, with a token from the config (`trackers.<name>.token_env`). Each answer is read by
the same parser as that tracker's webhook (the REST objects are the webhooks' objects), so the
transitions are the webhooks' own: a merged pull request is done and links the ticket its branch
names, a ticket closed as Won't Do is closed. Everything is asked first and applied after, in one
transaction: a tracker that rate-limits, refuses the token or fails part-way changes nothing, and
says why.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Engine
from starlette.datastructures import Headers

from taskproxy.errors import TrackerUnavailable
from taskproxy.settings import TrackersSettings
from taskproxy.storage.models import UsageDaily, WorkItem
from taskproxy.trackers.base import Delivery, ItemUpdate, Size, count
from taskproxy.trackers.github import GitHub
from taskproxy.trackers.gitlab import GitLab
from taskproxy.trackers.jira import Jira
from taskproxy.trackers.linear import Linear
from taskproxy.workitems import RESOLVED, WorkItemIds

TRACKERS = ("github", "gitlab", "jira", "linear")
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


def pending_items(engine: Engine, since: datetime) -> list[Pending]:
    """Items with spend since `since` (the daily rollup, by its index) and no final status; and merged
    GitLab merge requests with spend and no lines yet (GitLab's hooks carry none: only its API has them)."""
    spent = select(UsageDaily.work_item).where(UsageDaily.bucket >= since.replace(hour=0, minute=0, second=0, microsecond=0)).distinct()
    w = WorkItem.__table__.c
    unsized_merge_request = and_(w.status == "done", w.id.contains("!"), w.lines_added.is_(None), w.lines_deleted.is_(None))
    query = select(w.id, w.status, w.source, ~unsized_merge_request).where(w.id.in_(spent), or_(w.status.not_in(RESOLVED), unsized_merge_request))
    with engine.connect() as connection:
        return [Pending(*row) for row in connection.execute(query.order_by(w.id))]


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


class Fetcher:
    """Asks one tracker's REST API for an item's current state, as the update its webhook would give."""

    def __init__(self, name: str, http: httpx.Client, api: str, token: str, ids: WorkItemIds, now: datetime, points_field: str | None = None) -> None:
        self.name, self._http, self._api, self._token, self._now = name, http, api.rstrip("/"), token, now
        self._points_field = points_field
        # The webhook parsers; their signing secrets are not used to read an answer.
        self._parsers: dict[str, Any] = {"github": GitHub("", ids), "gitlab": GitLab("", ids), "jira": Jira("", points_field), "linear": Linear("", 60.0)}

    def fetch(self, item_id: str) -> ItemUpdate | None:
        """None when the tracker has no such item (it is left as it is)."""
        return {"github": self._github, "gitlab": self._gitlab, "jira": self._jira, "linear": self._linear}[self.name](item_id)

    def _get(self, url: str, headers: Mapping[str, str]) -> dict | None:
        return self._answer(lambda: self._http.get(url, headers=dict(headers)), url)

    def _answer(self, send: Callable[[], httpx.Response], url: str) -> dict | None:
        try:
            response = send()
        except httpx.HTTPError as exc:
            raise TrackerUnavailable(f"{self.name}: could not reach {url.split('?')[0]} ({exc.__class__.__name__}).") from None
        if response.status_code == 404:
            return None
        if response.status_code == 429 or (response.status_code == 403 and response.headers.get("x-ratelimit-remaining") == "0"):
            wait = response.headers.get("retry-after") or response.headers.get("x-ratelimit-reset") or "?"
            raise TrackerUnavailable(f"{self.name}: rate limited (HTTP {response.status_code}, retry-after/reset {wait}); nothing was changed. "
                                     "Run the sync again later, or with a narrower --since.")  # fmt: skip
        if response.status_code in (401, 403):
            raise TrackerUnavailable(f"{self.name}: the API refused the token (HTTP {response.status_code}); check trackers.{self.name}.token_env.")
        if response.status_code >= 400:
            raise TrackerUnavailable(f"{self.name}: the API answered HTTP {response.status_code} for {url.split('?')[0]}; nothing was changed.")
        try:
            data = response.json()
        except ValueError:
            raise TrackerUnavailable(f"{self.name}: the API's answer for {url.split('?')[0]} is not JSON; nothing was changed.") from None
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
        answer = self._answer(lambda: self._http.post(url, json=body, headers={"authorization": f"Bearer {self._token}"}), url)
        summary = ((((answer or {}).get("data") or {}).get("project") or {}).get("mergeRequest") or {}).get("diffStatsSummary")
        if not isinstance(summary, dict):
            return None  # not shown to this token, or an older GitLab: the size stays unknown
        size = Size(count(summary.get("additions")), count(summary.get("deletions")), count(summary.get("fileCount")))
        return size if size != Size() else None

    def _jira(self, item_id: str) -> ItemUpdate | None:
        token = self._token
        authorization = f"Basic {base64.b64encode(token.encode()).decode()}" if ":" in token else f"Bearer {token}"
        fields = "status,resolution,resolutiondate,created,updated,summary" + (f",{self._points_field}" if self._points_field else "")
        issue = self._get(f"{self._api}/rest/api/3/issue/{quote(item_id)}?fields={fields}", {"authorization": authorization, "accept": "application/json"})
        return None if issue is None else self._parse("", {"webhookEvent": "jira:issue_updated", "issue": issue})

    def _linear(self, item_id: str) -> ItemUpdate | None:
        body = {"query": _LINEAR_QUERY, "variables": {"id": item_id}}
        answer = self._answer(lambda: self._http.post(self._api, json=body, headers={"authorization": self._token}), self._api)
        issue = ((answer or {}).get("data") or {}).get("issue")
        if not isinstance(issue, dict):
            if (answer or {}).get("errors") and "not found" not in str(answer["errors"]).lower():  # type: ignore[index]
                raise TrackerUnavailable(f"linear: the API answered errors for {item_id}: {str(answer['errors'])[:200]}; nothing was changed.")  # type: ignore[index]
            return None
        stamp = int((self._now - datetime(1970, 1, 1)).total_seconds() * 1000)  # now is naive UTC
        return self._parse("", {"type": "Issue", "action": "update", "data": issue, "url": issue.get("url"), "webhookTimestamp": stamp})


def sync_items(
    engine: Engine, ids: WorkItemIds, trackers: TrackersSettings, *, since: datetime, now: datetime, only: str | None = None,
    http: httpx.Client | None = None,
) -> tuple[list[Delivery], list[str]]:  # fmt: skip
    """What each tracker says now about the pending items, as deliveries to apply (and notes on what
    was skipped). Raises TrackerUnavailable, before anything is applied, when a tracker cannot answer."""
    tokens = [name for name in TRACKERS if getattr(trackers, name).token is not None]
    if only is not None and only not in tokens:
        raise TrackerUnavailable(f"{only}: no API token: set trackers.{only}.token_env to the name of an environment variable that holds one.")
    usable = [only] if only else list(tokens)
    if not usable:
        raise TrackerUnavailable("no tracker has an API token: set trackers.<github|gitlab|jira|linear>.token_env.")
    notes: list[str] = []
    updates: dict[str, list[ItemUpdate]] = {}
    client = http or httpx.Client(timeout=20.0, trust_env=True)
    try:
        fetchers: dict[str, Fetcher] = {}
        for item in pending_items(engine, since):
            name = tracker_of(item, usable)
            if name is None:
                if only is None:
                    notes.append(f"{item.item_id}: no configured tracker holds it")
                continue
            if name not in fetchers:
                settings = getattr(trackers, name)
                api = settings.api_url or DEFAULT_API.get(name)
                if not api:
                    raise TrackerUnavailable(f"{name}: set trackers.{name}.api_url (your site, e.g. https://acme.atlassian.net).")
                fetchers[name] = Fetcher(name, client, api, settings.token.get_secret_value(), ids, now, getattr(settings, "story_points_field", None))
            update = fetchers[name].fetch(item.item_id)
            if update is None:
                notes.append(f"{item.item_id}: {name} has no such item")
            elif (update.status is not None and update.status != item.status) or (update.size is not None and not item.sized):
                updates.setdefault(name, []).append(update)
    finally:
        if http is None:
            client.close()
    return [Delivery(name, None, "sync", found) for name, found in updates.items()], notes
