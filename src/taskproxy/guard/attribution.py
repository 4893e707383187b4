"""Which work item a request belongs to: the first source present wins.

header `X-Work-Item` → body `metadata.work_item` → branch `X-Git-Branch` → the key's binding.
A source that is present but malformed is an error, not a reason to look further: a typo in a
header must not silently bill the key's binding instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.datastructures import Headers

from taskproxy.errors import WorkItemInvalid, WorkItemRequired
from taskproxy.guard.auth import Principal
from taskproxy.workitems import HOW_TO_ATTACH, WorkItemIds


@dataclass(frozen=True)
class Attributed:
    work_item: str
    source: str  # header | body | branch | binding


def body_work_item(body: Any) -> Any:
    metadata = body.get("metadata") if isinstance(body, dict) else None
    return metadata.get("work_item") if isinstance(metadata, dict) else None


def strip_work_item(body: dict) -> bool:
    """Remove `metadata.work_item` (and `metadata` if it is left empty). True if the body changed."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or "work_item" not in metadata:
        return False
    rest = {k: v for k, v in metadata.items() if k != "work_item"}
    if rest:
        body["metadata"] = rest
    else:
        del body["metadata"]
    return True


_BLANK = " \t"


@dataclass(frozen=True)
class Attribution:
    ids: WorkItemIds

    def resolve(self, headers: Headers, body: Any, principal: Principal, now: datetime) -> Attributed:
        # Blank is spaces and tabs only (what HTTP trims): Python's strip() also takes NEL (\x85) and the
        # separators \x1c-\x1f, which passed a header of them as absent, or an id with them as valid.
        named = {self.ids.normalize(value) for value in headers.getlist("x-work-item") if value.strip(_BLANK)}
        if len(named) > 1:  # the first was taken, silently: which item a request is for must not be a guess
            raise WorkItemInvalid(f"The request has {len(named)} X-Work-Item headers naming different work items "
                                  f"({', '.join(sorted(named))[:200]}); send one.")  # fmt: skip
        if named:  # an empty header is as good as none (clients often send a template left blank)
            return Attributed(named.pop(), "header")
        from_body = body_work_item(body)
        if from_body is not None:
            return Attributed(self.ids.normalize(from_body), "body")
        branches = [value for value in headers.getlist("x-git-branch") if value.strip(_BLANK)]
        branch = branches[0] if branches else None
        from_branches = {found for value in branches if (found := self.ids.from_branch(value)) is not None}
        if len(from_branches) > 1:  # as for X-Work-Item: not a guess
            raise WorkItemInvalid(f"The request has {len(branches)} X-Git-Branch headers naming different work items "
                                  f"({', '.join(sorted(from_branches))[:200]}); send one.")  # fmt: skip
        if from_branches:
            return Attributed(from_branches.pop(), "branch")
        bound = principal.binding(now)
        if bound is not None:
            return Attributed(bound, "binding")
        if branch:
            raise WorkItemRequired(f"The branch {branch[:100]!r} names no work item. " + HOW_TO_ATTACH)
        raise WorkItemRequired("This request is not linked to a work item. " + HOW_TO_ATTACH)
