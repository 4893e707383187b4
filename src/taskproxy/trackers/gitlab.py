"""GitLab: merge request and issue hooks, authenticated by `X-Gitlab-Token` (GitLab sends the secret
token as it was configured, not a signature: it is compared in constant time) and identified by
`X-Gitlab-Event-UUID`.

A merge request is the item `group/subgroup/project!N`, an issue `group/subgroup/project#N` (the
project's full path, lower-cased). Merged → done (into a branch other than the project's default one →
in_progress, a stacked request, as for GitHub); closed unmerged → closed; an issue closed → done;
opened or reopened → open. A merged request whose source branch or title names a ticket
(`feature/PROJ-123-x`) is linked to it, as for GitHub. A merged revert (GitLab's revert button: title
`Revert "…"`, description `This reverts merge request !N`) is closed, not done, and marks the merge
request it undoes as rework, as for GitHub.
"""

from __future__ import annotations

import hmac
import re
from datetime import datetime
from typing import Any

from starlette.datastructures import Headers

from taskproxy.errors import InvalidSignature
from taskproxy.trackers.base import Delivery, ItemUpdate, merge_target, need, ticket_in, tracker_time, text
from taskproxy.workitems import WorkItemIds

_OPENED = {"open", "reopen"}
# What GitLab's revert button writes in the merge request's description (Commit#revert_description):
# the request it undoes, in the same project.
_REVERT_DESCRIPTION = re.compile(r"This reverts merge request !(\d+)\b")


class GitLab:
    name = "gitlab"

    def __init__(self, token: str, ids: WorkItemIds, landing_branches: tuple[str, ...] = ()) -> None:
        self._token = token.encode()
        self._ids = ids
        self._landing = landing_branches

    def verify(self, headers: Headers, raw: bytes) -> None:
        presented = headers.get("x-gitlab-token")
        if not presented:
            raise InvalidSignature("The delivery has no X-Gitlab-Token. Configure the webhook's secret token with the one taskproxy was given.")
        if not hmac.compare_digest(self._token, presented.encode("utf-8", "replace")):
            raise InvalidSignature("The delivery's X-Gitlab-Token is not the configured secret token.")

    def parse(self, headers: Headers, payload: dict[str, Any], now: datetime) -> Delivery:
        delivery = headers.get("x-gitlab-event-uuid")
        kind = payload.get("object_kind")
        attributes = payload.get("object_attributes") if isinstance(payload.get("object_attributes"), dict) else {}
        action = attributes.get("action")
        event = f"{kind}.{action}" if kind and action else str(kind or headers.get("x-gitlab-event", "unknown"))
        if kind == "merge_request" and (action in _OPENED or action in ("close", "merge")):
            return Delivery(self.name, delivery, event, [self._merge_request(payload, action)])
        if kind == "issue" and (action in _OPENED or action == "close"):
            return Delivery(self.name, delivery, event, [self._issue(payload, action)])
        return Delivery(self.name, delivery, event)

    @staticmethod
    def _item_id(payload: dict[str, Any], mark: str, number: int) -> str:
        return f"{need(payload, 'project', 'path_with_namespace', kind=str).lower()}{mark}{number}"

    def _merge_request(self, payload: dict[str, Any], action: str) -> ItemUpdate:
        request = need(payload, "object_attributes", kind=dict)
        project = payload.get("project") if isinstance(payload.get("project"), dict) else {}
        merged_into = merge_target(request.get("target_branch"), project.get("default_branch"), self._landing) if action == "merge" else None
        if merged_into is not None:  # stacked: merged into another request's branch, not the default one
            status, at = "in_progress", tracker_time(request.get("merged_at")) or tracker_time(request.get("updated_at"))
        elif action == "merge":
            status, at = "done", tracker_time(request.get("merged_at")) or tracker_time(request.get("updated_at"))
        elif action == "close":
            status, at = "closed", tracker_time(request.get("closed_at")) or tracker_time(request.get("updated_at"))
        else:
            status, at = "open", tracker_time(request.get("updated_at"))
        links: tuple[str, ...] = ()
        merged, reverts = status == "done", None
        # A fork's branch of the same name is another branch (stacks.py): only the project's own are kept.
        source, target = request.get("source_project_id"), request.get("target_project_id")
        own_branch = text(request.get("source_branch")) if isinstance(source, int) and source == target else None
        description = request.get("description")
        if merged and isinstance(description, str) and (found_revert := _REVERT_DESCRIPTION.search(description)):
            reverts = self._item_id(payload, "!", int(found_revert[1]))
        if merged or merged_into is not None:  # a revert or a reland: the registry decides (github.py)
            found = (ticket_in(self._ids, request.get("source_branch")), ticket_in(self._ids, request.get("title")))
            links = tuple(dict.fromkeys(ticket for ticket in found if ticket))
        return ItemUpdate(
            item_id=self._item_id(payload, "!", need(payload, "object_attributes", "iid", kind=int)), status=status, at=at,
            created_at=tracker_time(request.get("created_at")), title=text(request.get("title")), url=text(request.get("url")),
            links=links, merged=merged, reverts=reverts, branch=own_branch, merged_into=merged_into,
        )  # fmt: skip

    def _issue(self, payload: dict[str, Any], action: str) -> ItemUpdate:
        issue = need(payload, "object_attributes", kind=dict)
        if action == "close":
            # Moved to another project, or closed as a duplicate: closed, not work done (the issue it went to
            # is the one that completes). Moving sends the old issue nothing but this close.
            elsewhere = any(isinstance(issue.get(field), int) and not isinstance(issue.get(field), bool) for field in ("moved_to_id", "duplicated_to_id"))
            status = "closed" if elsewhere else "done"
            at = tracker_time(issue.get("closed_at")) or tracker_time(issue.get("updated_at"))
        else:
            status, at = "open", tracker_time(issue.get("updated_at"))
        return ItemUpdate(
            item_id=self._item_id(payload, "#", need(payload, "object_attributes", "iid", kind=int)), status=status, at=at,
            created_at=tracker_time(issue.get("created_at")), title=text(issue.get("title")), url=text(issue.get("url")),
        )  # fmt: skip
