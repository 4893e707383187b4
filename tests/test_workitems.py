"""Work-item ids: normalization of every accepted form, refusal of everything else."""

from __future__ import annotations

import pytest

from taskproxy.errors import WorkItemInvalid
from taskproxy.settings import DEFAULT_BRANCH_PATTERNS, DEFAULT_ID_PATTERNS
from taskproxy.workitems import WorkItemIds

IDS = WorkItemIds(DEFAULT_ID_PATTERNS, DEFAULT_BRANCH_PATTERNS)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("PROJ-123", "PROJ-123"),
        ("proj-123", "PROJ-123"),
        ("  eng-7 ", "ENG-7"),
        ("Owner/Repo#12", "owner/repo#12"),
        ("acme/web.site#3", "acme/web.site#3"),
        ("https://github.com/Acme/Web/pull/12", "acme/web#12"),
        ("https://github.com/acme/web/issues/9", "acme/web#9"),
        ("https://github.com/acme/web/pull/12/files", "acme/web#12"),
        ("https://acme.atlassian.net/browse/PROJ-1", "PROJ-1"),
        ("https://jira.example.com/browse/ops-42", "OPS-42"),
        ("https://linear.app/acme/issue/ENG-7/retry-webhooks", "ENG-7"),
        ("Acme/Platform/Billing-API!8", "acme/platform/billing-api!8"),
        ("a/b/c#1", "a/b/c#1"),
        ("group/project!3", "group/project!3"),
        ("https://gitlab.example.com/Acme/Platform/billing-api/-/merge_requests/8", "acme/platform/billing-api!8"),
        ("https://gitlab.com/group/project/-/issues/4/designs", "group/project#4"),
    ],
)
def test_accepted_forms_normalize(raw: str, canonical: str) -> None:
    assert IDS.normalize(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "PROJ", "123", "PROJ-", "not a ticket", "'; DROP TABLE usage_events;--", "../../etc/passwd", "PROJ-1\n", "PROJ-1\x00",
     "PROJ-1\x1b[31m", "https://example.com/whatever", "https://github.com/acme/web", "a!1", "/a/b#1", "a//b#1", "https://gitlab.com/group/-/issues", "P" * 199 + "-1", 7, None, ["PROJ-1"]],
)  # fmt: skip
def test_everything_else_is_refused(raw: object) -> None:
    with pytest.raises(WorkItemInvalid):
        IDS.normalize(raw)


@pytest.mark.parametrize(
    ("branch", "found"),
    [("feature/PROJ-123-retry", "PROJ-123"), ("fix/eng-7", "ENG-7"), ("eng-7-login", "ENG-7"), ("main", None), ("release", None),
     ("dependabot/npm_and_yarn/lodash-4.17.21", None),
     # GitHub's revert button names its branch revert-<pull request>-<the reverted branch>: the item is the branch's
     ("revert-12-feature/PROJ-8-retry", "PROJ-8"), ("revert-3-fix/eng-7", "ENG-7"), ("revert-12-main", None)],
)  # fmt: skip
def test_branch_names(branch: str, found: str | None) -> None:
    assert IDS.from_branch(branch) == found


def test_a_branch_names_the_first_id_of_a_known_project_where_it_names_several() -> None:
    """`fix/py-3-compat-PROJ-8` took `PY-3`, an item nobody tracks; with `work_items.teams` naming the
    projects, a branch's id of a known project wins over one found earlier. None known: the first."""
    known = WorkItemIds(IDS.patterns, IDS.branch_patterns, projects=frozenset({"proj", "acme/web"}))
    assert known.from_branch("fix/py-3-compat-PROJ-8") == "PROJ-8"
    assert known.from_branch("fix/py-3-compat") == "PY-3"  # as before: no known project named
    assert IDS.from_branch("fix/py-3-compat-PROJ-8") == "PY-3"  # no projects configured: the first, as before


def test_configured_patterns_replace_the_defaults() -> None:
    only_ops = WorkItemIds([r"OPS-[0-9]+"], [r"(?i)(ops-[0-9]+)"])
    assert only_ops.normalize("ops-5") == "OPS-5"
    with pytest.raises(WorkItemInvalid):
        only_ops.normalize("PROJ-5")
    assert only_ops.from_branch("feature/ops-9-x") == "OPS-9"
