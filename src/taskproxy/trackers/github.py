"""GitHub: `pull_request` and `issues` events, signed in X-Hub-Signature-256, identified by X-GitHub-Delivery.

A PR or issue is the item `owner/repo#N`. Merged → done (merged into a branch other than the repository's
default one → in_progress: a stacked pull request, whose work lands with that branch's), closed unmerged → closed; an issue closed
as `completed` (or with no reason) → done, as `not_planned` or `duplicate` → closed. A merged PR whose branch or title names a ticket
(`feature/PROJ-123-x`) is linked to it. A PR's size is its `additions`, `deletions` and `changed_files`;
a merged revert (`Reverts owner/repo#N`) names the PR it undoes.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from starlette.datastructures import Headers

from taskproxy.trackers.base import Delivery, ItemUpdate, Size, check_hmac_sha256, count, merge_target, need, ticket_in, tracker_time, text
from taskproxy.workitems import WorkItemIds

_OPENED = {"opened", "reopened", "ready_for_review", "converted_to_draft"}
# What GitHub's "Revert" button writes: branch `revert-<n>-<branch>`, title `Revert "<title>"`, body `Reverts owner/repo#<n>`.
_REVERT_BODY = re.compile(r"^Reverts ([\w.-]+/[\w.-]+)#(\d+)\b", re.MULTILINE)
_REVERT_BRANCH = re.compile(r"^revert-(\d+)-")


def reverted_pull(repo: str, branch: Any, title: Any, body: Any) -> str | None:
    """The pull request a merged revert undoes: named in the body (`Reverts owner/repo#N`), else by the
    branch GitHub made for it (`revert-N-…`) when the title says it is a revert."""
    if isinstance(body, str) and (match := _REVERT_BODY.search(body)) and match[1].lower() == repo.lower():
        # GitHub's button names the same repository: a body naming another one marks nothing (it would let
        # anyone mark another team's pull request as reverted, rework against its spend).
        return f"{match[1]}#{match[2]}"
    # The branch is GitHub's own evidence; its title may have been edited ("Revert PAY-60 retries").
    if isinstance(branch, str) and isinstance(title, str) and title.startswith("Revert") and (match := _REVERT_BRANCH.match(branch)):
        return f"{repo}#{match[1]}"
    return None


def _field(payload: dict[str, Any], *path: str) -> Any:
    for name in path:
        payload = payload.get(name) if isinstance(payload, dict) else None  # type: ignore[assignment]
    return payload


def _default_branch(payload: dict[str, Any], pr: dict[str, Any]) -> Any:
    """The repository's default branch: the webhook's `repository`, else the REST object's base repository
    (`items sync` asks the REST API, whose pull request has no `repository` of its own)."""
    return _field(payload, "repository", "default_branch") or _field(pr, "base", "repo", "default_branch")


def _own_branch(repo: str, pr: dict[str, Any], branch: Any) -> str | None:
    """The pull request's source branch if it is one of the repository's own: a fork's `release/1.x` is
    another branch, and work stacked on the repository's own must not land with it (stacks.py)."""
    head_repo = _field(pr, "head", "repo", "full_name")
    return text(branch) if isinstance(head_repo, str) and head_repo.lower() == repo.lower() else None


class GitHub:
    name = "github"

    def __init__(self, secret: str, ids: WorkItemIds, landing_branches: tuple[str, ...] = ()) -> None:
        self._secret = secret
        self._ids = ids
        self._landing = landing_branches

    def verify(self, headers: Headers, raw: bytes) -> None:
        check_hmac_sha256(self._secret, raw, headers.get("x-hub-signature-256"), prefix="sha256=")

    def parse(self, headers: Headers, payload: dict[str, Any], now: datetime) -> Delivery:
        event = headers.get("x-github-event", "")
        delivery = headers.get("x-github-delivery")
        action = payload.get("action")
        if event == "pull_request" and (action in _OPENED or action == "closed"):
            return Delivery(self.name, delivery, f"{event}.{action}", [self._pull_request(payload, action)])
        if event == "issues" and (action in _OPENED or action == "closed"):
            return Delivery(self.name, delivery, f"{event}.{action}", [self._issue(payload, action)])
        return Delivery(self.name, delivery, f"{event}.{action}" if action else event)

    @staticmethod
    def _item_id(payload: dict[str, Any], number: Any) -> str:
        return f"{need(payload, 'repository', 'full_name', kind=str)}#{number}"

    def _pull_request(self, payload: dict[str, Any], action: str) -> ItemUpdate:
        pr = need(payload, "pull_request", kind=dict)
        merged = action == "closed" and pr.get("merged") is True
        branch = _field(pr, "head", "ref")
        merged_into = merge_target(_field(pr, "base", "ref"), _default_branch(payload, pr), self._landing) if merged else None
        if merged_into is not None:  # stacked: merged into another pull request's branch, not the default one
            status, at, merged = "in_progress", tracker_time(pr.get("merged_at")), False
        elif action == "closed":
            status, at = ("done", tracker_time(pr.get("merged_at"))) if merged else ("closed", tracker_time(pr.get("closed_at")))
        else:
            status, at = "open", tracker_time(pr.get("updated_at"))
        links: tuple[str, ...] = ()
        repo = need(payload, "repository", "full_name", kind=str)
        # What a merged revert undoes, if it says. Whether it is a revert (closed, linking no ticket, what it
        # undoes rework) or a reland (the work again) the registry decides, from what it undoes
        # (reverts.revert_or_reland): a title can be edited.
        reverts = reverted_pull(repo, branch, pr.get("title"), pr.get("body")) if merged else None
        if merged or merged_into is not None:
            links = tuple(dict.fromkeys(found for found in (ticket_in(self._ids, branch), ticket_in(self._ids, pr.get("title"))) if found))
        size = Size(count(pr.get("additions")), count(pr.get("deletions")), count(pr.get("changed_files")))
        return ItemUpdate(
            item_id=self._item_id(payload, need(payload, "pull_request", "number", kind=int)), status=status, at=at,
            created_at=tracker_time(pr.get("created_at")), title=text(pr.get("title")), url=text(pr.get("html_url")), links=links,
            merged=merged, size=size if size != Size() else None, reverts=reverts, branch=_own_branch(repo, pr, branch), merged_into=merged_into,
        )  # fmt: skip

    def _issue(self, payload: dict[str, Any], action: str) -> ItemUpdate:
        issue = need(payload, "issue", kind=dict)
        if action == "closed":
            status = "done" if issue.get("state_reason") in (None, "completed") else "closed"  # not_planned, duplicate
            at = tracker_time(issue.get("closed_at"))
        else:
            status, at = "open", tracker_time(issue.get("updated_at"))
        return ItemUpdate(
            item_id=self._item_id(payload, need(payload, "issue", "number", kind=int)), status=status, at=at,
            created_at=tracker_time(issue.get("created_at")), title=text(issue.get("title")), url=text(issue.get("html_url")),
        )  # fmt: skip
