"""Deliveries shaped like the trackers' documented webhook payloads (trimmed of fields taskproxy ignores
only where they are long lists of URLs), and how each tracker signs them."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any

import orjson

GITHUB_SECRET, JIRA_SECRET, LINEAR_SECRET, GITLAB_TOKEN = "gh-secret-1", "jira-secret-2", "linear-secret-3", "gl-token-4"

_REPO = {"id": 1296269, "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5", "name": "Web-App", "full_name": "Acme/Web-App", "private": True,
         "owner": {"login": "Acme", "id": 1, "type": "Organization"}, "html_url": "https://github.com/Acme/Web-App", "default_branch": "main"}  # fmt: skip
_USER = {"login": "octocat", "id": 1, "type": "User"}


def github_pull_request(action: str, number: int, *, merged: bool = False, branch: str = "feature/x", title: str = "Add retries") -> dict[str, Any]:
    closed = action == "closed"
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "url": f"https://api.github.com/repos/Acme/Web-App/pulls/{number}", "id": 1000 + number, "node_id": "PR_kw",
            "html_url": f"https://github.com/Acme/Web-App/pull/{number}", "number": number, "state": "closed" if closed else "open",
            "locked": False, "title": title, "user": _USER, "body": "Fixes the thing.", "created_at": "2026-11-02T09:00:00Z",
            "updated_at": "2026-11-05T10:00:00Z", "closed_at": "2026-11-05T10:00:00Z" if closed else None,
            "merged_at": "2026-11-05T10:00:00Z" if merged else None, "merge_commit_sha": "e5bd3914e2e596debea16f433f57875b5b90bcd6" if merged else None,
            "draft": False, "head": {"label": f"Acme:{branch}", "ref": branch, "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e", "repo": _REPO},
            "base": {"label": "Acme:main", "ref": "main", "sha": "9049f1265b7d61be4a8904a9a27120d2064dab3b", "repo": _REPO},
            "merged": merged, "comments": 0, "commits": 3, "additions": 100, "deletions": 3, "changed_files": 5,
        },
        "repository": _REPO,
        "sender": _USER,
    }  # fmt: skip


def github_issue(action: str, number: int, *, state_reason: str | None = None) -> dict[str, Any]:
    closed = action == "closed"
    return {
        "action": action,
        "issue": {
            "url": f"https://api.github.com/repos/Acme/Web-App/issues/{number}", "id": 2000 + number, "number": number,
            "html_url": f"https://github.com/Acme/Web-App/issues/{number}", "title": "Login fails on Safari", "user": _USER,
            "state": "closed" if closed else "open", "state_reason": state_reason, "created_at": "2026-11-01T08:00:00Z",
            "updated_at": "2026-11-03T08:00:00Z", "closed_at": "2026-11-03T08:00:00Z" if closed else None, "body": "Steps to reproduce...",
        },
        "repository": _REPO,
        "sender": _USER,
    }  # fmt: skip


def github_headers(body: bytes, event: str, *, delivery: str | None = None, secret: str = GITHUB_SECRET) -> dict[str, str]:
    return {
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        "User-Agent": "GitHub-Hookshot/044aadd", "Content-Type": "application/json",
    }  # fmt: skip


def jira_issue(event: str, key: str, *, category: str, resolution: str | None = None) -> dict[str, Any]:
    names = {"new": "To Do", "indeterminate": "In Progress", "done": "Done"}
    return {
        "timestamp": 1795322400000,
        "webhookEvent": event,
        "issue_event_type_name": "issue_generic" if event == "jira:issue_updated" else "issue_created",
        "user": {"self": "https://acme.atlassian.net/rest/api/2/user?accountId=557058:c9eb", "accountId": "557058:c9eb", "displayName": "Dana"},
        "issue": {
            "id": "10042", "self": "https://acme.atlassian.net/rest/api/2/issue/10042", "key": key,
            "fields": {
                "summary": "Refund retries", "issuetype": {"id": "10001", "name": "Story"},
                "project": {"id": "10000", "key": key.split("-")[0], "name": "Payments"},
                "status": {"self": "https://acme.atlassian.net/rest/api/2/status/10001", "name": names[category], "id": "10001",
                           "statusCategory": {"id": 3, "key": category, "colorName": "green", "name": names[category]}},
                "resolution": {"id": "10000", "name": resolution} if resolution else None,
                "resolutiondate": "2026-11-06T12:30:00.000+0000" if category == "done" else None,
                "created": "2026-11-01T09:15:00.000+0000", "updated": "2026-11-06T12:30:00.000+0000",
            },
        },
        "changelog": {"id": "10100", "items": [{"field": "status", "fieldtype": "jira", "from": "3", "fromString": "In Progress", "to": "10001", "toString": names[category]}]},
    }  # fmt: skip


def jira_headers(body: bytes, *, delivery: str | None = None, secret: str = JIRA_SECRET) -> dict[str, str]:
    return {
        "X-Atlassian-Webhook-Identifier": delivery or str(uuid.uuid4()),
        "X-Hub-Signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        "Content-Type": "application/json", "User-Agent": "Atlassian Webhook HTTP Client",
    }  # fmt: skip


def linear_issue(action: str, identifier: str, *, state_type: str, timestamp_ms: int | None = None) -> dict[str, Any]:
    now_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return {
        "action": action,
        "actor": {"id": "2e6eea91-1111-0000-0000-000000000000", "type": "user", "name": "Dana"},
        "createdAt": "2026-11-07T10:00:00.000Z",
        "data": {
            "id": "2174add1-f7c8-44e3-bbf3-2d60b5ea8bc9", "createdAt": "2026-11-01T10:00:00.000Z", "updatedAt": "2026-11-07T10:00:00.000Z",
            "number": int(identifier.split("-")[1]), "title": "Retry webhooks", "priority": 2, "identifier": identifier,
            "url": f"https://linear.app/acme/issue/{identifier}/retry-webhooks",
            "state": {"id": "8708b274-82d1-4a4e-b8d5-3f7f1b8b6e6f", "name": state_type.title(), "type": state_type, "color": "#5e6ad2"},
            "team": {"id": "72b2a2dc-6f4f-4423-9d34-24b5bd10634a", "key": identifier.split("-")[0], "name": "Engineering"},
            "completedAt": "2026-11-07T10:00:00.000Z" if state_type == "completed" else None,
            "canceledAt": "2026-11-07T10:00:00.000Z" if state_type == "canceled" else None,
        },
        "type": "Issue",
        "url": f"https://linear.app/acme/issue/{identifier}/retry-webhooks",
        "organizationId": "0c1e9e1d-0000-0000-0000-000000000000",
        "webhookTimestamp": now_ms,
        "webhookId": "000042e3-d123-4980-b49f-8e140eef9329",
    }  # fmt: skip


def linear_headers(body: bytes, *, delivery: str | None = None, secret: str = LINEAR_SECRET) -> dict[str, str]:
    return {
        "Linear-Delivery": delivery or str(uuid.uuid4()), "Linear-Event": "Issue",
        "Linear-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(), "Content-Type": "application/json",
    }  # fmt: skip


# GitLab's merge request and issue events (docs: user/project/integrations/webhook_events), in a subgroup.
_GITLAB_PROJECT = {"id": 15, "name": "Billing API", "description": "", "web_url": "https://gitlab.example.com/Acme/Platform/billing-api",
                   "git_ssh_url": "git@gitlab.example.com:Acme/Platform/billing-api.git", "namespace": "Platform", "visibility_level": 0,
                   "path_with_namespace": "Acme/Platform/billing-api", "default_branch": "main"}  # fmt: skip
_GITLAB_USER = {"id": 1, "name": "Administrator", "username": "root", "email": "admin@example.com"}


def gitlab_merge_request(action: str, iid: int, *, branch: str = "feature/x", title: str = "Retry failed charges") -> dict[str, Any]:
    state = {"open": "opened", "reopen": "opened", "update": "opened", "close": "closed", "merge": "merged"}[action]
    url = f"https://gitlab.example.com/Acme/Platform/billing-api/-/merge_requests/{iid}"
    attributes = {"id": 90 + iid, "iid": iid, "target_branch": "main", "source_branch": branch, "source_project_id": 15, "author_id": 1,
                  "title": title, "created_at": "2026-11-02 09:00:00 UTC", "updated_at": "2026-11-05 10:00:00 UTC", "state": state,
                  "merge_status": "can_be_merged", "target_project_id": 15, "description": "", "url": url, "action": action,
                  "merge_commit_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7" if action == "merge" else None}  # fmt: skip
    return {"object_kind": "merge_request", "event_type": "merge_request", "user": _GITLAB_USER, "project": _GITLAB_PROJECT,
            "object_attributes": attributes, "labels": [], "changes": {}, "repository": {"name": "Billing API", "url": _GITLAB_PROJECT["git_ssh_url"]}}  # fmt: skip


def gitlab_issue(action: str, iid: int) -> dict[str, Any]:
    state = "closed" if action == "close" else "opened"
    attributes = {"id": 300 + iid, "iid": iid, "title": "Refunds time out", "project_id": 15, "created_at": "2026-11-01T08:00:00Z",
                  "updated_at": "2026-11-06T12:00:00Z", "closed_at": "2026-11-06T12:00:00Z" if state == "closed" else None, "state": state,
                  "url": f"https://gitlab.example.com/Acme/Platform/billing-api/-/issues/{iid}", "action": action}  # fmt: skip
    return {"object_kind": "issue", "event_type": "issue", "user": _GITLAB_USER, "project": _GITLAB_PROJECT, "object_attributes": attributes,
            "labels": [], "changes": {}}  # fmt: skip


def gitlab_headers(event: str, *, delivery: str | None = None, token: str = GITLAB_TOKEN) -> dict[str, str]:
    return {"content-type": "application/json", "x-gitlab-event": event, "x-gitlab-token": token, "x-gitlab-instance": "https://gitlab.example.com",
            "x-gitlab-event-uuid": delivery or str(uuid.uuid4()), "x-gitlab-webhook-uuid": "3a5b1e4c-9d84-4d6b-a8c0-2f6f1c7f3a10"}  # fmt: skip


def dumps(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)
