"""Work-item ids: turning what a client sends into one canonical id, or refusing it.

Accepted forms: Jira/Linear keys (`proj-123` → `PROJ-123`), GitHub `Owner/Repo#12`
(→ `owner/repo#12`), GitLab `Group/Sub/Project!7` (merge request) and `group/sub/project#7` (issue),
and the trackers' URLs for them. The canonical id must then fully match one of
the configured patterns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from urllib.parse import unquote, urlsplit

from taskproxy.errors import WorkItemInvalid

MAX_ID_LENGTH = 200

# A work item's status, as the registry and every report read it.
ITEM_STATUSES = ("open", "in_progress", "done", "closed", "unverified")
SETTABLE_STATUSES = ("open", "in_progress", "done", "closed")  # by the API and the CLI; "unverified" is the proxy's own
IN_PROGRESS = ("open", "in_progress")  # not finished: work in progress, or stale once old (reports.stale_after_days)
RESOLVED = ("done", "closed")  # finished: done is completed work, closed is not (duplicates, won't do)
# How a work item is linked to another (`work_item_links.kind`): a ticket to the pull request merged for
# it (its spend led to finished work), and a pull request to the merged revert of it that arrived first.
MERGED_PR = "merged_pr"
REVERTED_BY = "reverted_by"
COMPLETED = "done"  # the status of completed work: what every report counts as an outcome
ITEM_SOURCES = ("jira", "github", "gitlab", "linear", "manual")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_GITHUB_PATH = re.compile(r"^/([^/]+)/([^/]+)/(?:pull|issues)/(\d+)(?:/.*)?$")
_JIRA_PATH = re.compile(r"^/browse/([A-Za-z][A-Za-z0-9_]*-\d+)/?$")
_LINEAR_PATH = re.compile(r"^/[^/]+/issue/([A-Za-z][A-Za-z0-9_]*-\d+)(?:/.*)?$")
_GITHUB_REF = re.compile(r"^([^/#\s]+)/([^/#\s]+)#(\d+)$")
# GitLab: a project's full path (group/subgroup/project), then #N for an issue or !N for a merge request.
_GITLAB_REF = re.compile(r"^([^#!\s]+(?:/[^/#!\s]+)+)([#!])(\d+)$")
_GITLAB_PATH = re.compile(r"^/(.+?)/-/(merge_requests|issues)/(\d+)(?:/.*)?$")

HOW_TO_ATTACH = (
    "Attach a work item: send the header 'X-Work-Item: PROJ-123' (or owner/repo#123, or a tracker URL), "
    'or put "metadata": {"work_item": "PROJ-123"} in the body, or send X-Git-Branch with a branch '
    "named after the item, or bind one to your key with 'taskproxy use PROJ-123'."
)


_PROJECT = re.compile(r"^(.+?)[-#!]\d+$")


def project_of(item_id: str) -> str | None:
    """The tracker project an item id names, casefolded: a Jira or Linear key's project (`PROJ` of
    `PROJ-12`), a GitHub or GitLab repository (`acme/web` of `acme/web#12`, `group/app!3`); None for
    an id of another shape."""
    found = _PROJECT.match(item_id)
    return None if found is None else found.group(1).casefold()


def team_of_project(item_id: str, teams: Mapping[str, str]) -> str | None:
    """The team `work_items.teams` gives the item's project (keys casefolded by the settings), or None."""
    project = project_of(item_id) if teams else None
    return None if project is None else teams.get(project)


def completed_in(status: str, completed_at: datetime | None, since: datetime, until: datetime) -> bool:
    """Completed in the period [since, until): status done and `completed_at` in it (a closed item is
    not completed). `repo.completed_ids` says the same in SQL."""
    return status == COMPLETED and completed_at is not None and since <= completed_at < until


def completion_holds(status: str, completed_at: datetime | None, reworked_at: datetime | None, rework_reason: str | None) -> bool:
    """A done item whose completion stands now: not reverted (a reverted merge never stands again, even
    set done by hand), nor reopened and not done since."""
    if status != COMPLETED:
        return False
    if reworked_at is None:
        return True
    return rework_reason != "reverted" and completed_at is not None and completed_at > reworked_at


def changed_lines(added: int | None, deleted: int | None) -> int | None:
    """An item's size in lines: added + deleted, either known; None when the tracker said neither."""
    return None if added is None and deleted is None else (added or 0) + (deleted or 0)


def _from_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower()
    except ValueError:  # `https://[::1/browse/PAY-1`: an unclosed or invalid IPv6 host is no tracker's URL
        return None
    path = unquote(parts.path)
    if host in {"github.com", "www.github.com"} and (match := _GITHUB_PATH.match(path)):
        return f"{match[1]}/{match[2]}#{match[3]}"
    if match := _GITLAB_PATH.match(path):  # gitlab.com and self-hosted GitLab share /-/merge_requests/N
        return f"{match[1]}{'!' if match[2] == 'merge_requests' else '#'}{match[3]}"
    if host == "linear.app" and (match := _LINEAR_PATH.match(path)):
        return match[1]
    if match := _JIRA_PATH.match(path):  # Jira Cloud and self-hosted Jira share /browse/KEY
        return match[1]
    return None


def _non_ascii(text: str) -> list[str]:
    return [c for c in text if not c.isascii()]


_GITHUB_REVERT_BRANCH = re.compile(r"^(?:revert-\d+-)+(?=.)")  # GitHub's revert button: revert-<pull request>-<the reverted branch>, a revert of a revert twice


@dataclass(frozen=True)
class WorkItemIds:
    """Normalizes and validates ids against the configured patterns. `projects`: the tracker projects
    the config names (`work_items.teams`' keys, casefolded), whose ids a branch naming several prefers."""

    patterns: Sequence[str]
    branch_patterns: Sequence[str] = ()
    projects: frozenset[str] = frozenset()

    @cached_property
    def _compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p) for p in self.patterns)

    @cached_property
    def _compiled_branch(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p) for p in self.branch_patterns)

    def normalize(self, raw: object) -> str:
        """The canonical id for `raw`, or `WorkItemInvalid` saying what is wrong."""
        if not isinstance(raw, str):
            raise WorkItemInvalid("The work item must be a string such as 'PROJ-123'.")
        if len(raw) > MAX_ID_LENGTH:
            raise WorkItemInvalid(f"The work item is longer than {MAX_ID_LENGTH} characters.")
        if _CONTROL.search(raw):
            raise WorkItemInvalid("The work item contains control characters.")
        value = raw.strip()
        if not value:
            raise WorkItemInvalid("The work item is empty. " + HOW_TO_ATTACH)
        if value.lower().startswith(("http://", "https://")):
            from_url = _from_url(value)
            if from_url is None:
                raise WorkItemInvalid(
                    "The work item URL is not a GitHub issue or pull request, a Jira /browse/ link "
                    "or a Linear issue link."
                )
            value = from_url
        if match := _GITHUB_REF.match(value):
            canonical = f"{match[1].lower()}/{match[2].lower()}#{match[3]}"
        elif match := _GITLAB_REF.match(value):
            canonical = f"{match[1].lower()}{match[2]}{match[3]}"
        else:
            canonical = value.upper()
        if not value.isascii() and _non_ascii(canonical) != _non_ascii(value):
            # 'ﬃ'.upper() is 'FFI': such a form would bill an id the client never wrote (and grow past the limit).
            raise WorkItemInvalid("The work item has characters that change when it is normalized (such as ligatures); write it in plain ASCII.")
        if len(canonical) > MAX_ID_LENGTH:  # checked again: normalizing can lengthen an id
            raise WorkItemInvalid(f"The work item is longer than {MAX_ID_LENGTH} characters once normalized.")
        if not any(p.fullmatch(canonical) for p in self._compiled):
            shown = raw.strip() if len(raw.strip()) <= 60 else raw.strip()[:57] + "..."
            raise WorkItemInvalid(
                f"'{shown}' is not a work item id this proxy accepts: use a tracker key such as PROJ-123, "
                "a GitHub reference such as owner/repo#123, or a link to either."
            )
        return canonical

    def from_branch(self, branch: str) -> str | None:
        """The id named in a git branch (`feature/PROJ-123-retry` → `PROJ-123`), if any pattern finds one:
        of those it names, the first of a known project (`projects`), else the first. A GitHub revert
        branch (`revert-12-feature/PROJ-8-retry`) names the reverted branch's item, not `REVERT-12`."""
        if len(branch) > 255 or _CONTROL.search(branch):
            raise WorkItemInvalid("The X-Git-Branch header is longer than 255 characters or has control characters.")
        branch = _GITHUB_REVERT_BRANCH.sub("", branch, count=1)
        first: str | None = None
        for pattern in self._compiled_branch:
            for match in pattern.finditer(branch):
                raw = match.groupdict().get("id") or (match.group(1) if pattern.groups else match.group(0))
                if first is not None:  # only looking for a known project's now: a later id that is not one is passed over
                    try:
                        found = self.normalize(raw)
                    except WorkItemInvalid:
                        continue
                else:
                    found = first = self.normalize(raw)
                if not self.projects or project_of(found) in self.projects:
                    return found
        return first
