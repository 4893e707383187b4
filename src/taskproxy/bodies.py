"""The admin API's request bodies, as pydantic models: the one place their fields, limits and choices
are written. The API, the CLI and the registry validate through `parse`, and the OpenAPI document's
request schemas are generated from the same models (routes/openapi.py), so a limit changed here
changes everywhere at once.

Unknown fields are refused rather than ignored: a misspelt `budget_token` would otherwise be dropped
without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from taskproxy.errors import InvalidRequest
from taskproxy.money import MAX_BUDGET_TOKENS, MAX_BUDGET_USD
from taskproxy.privacy import owner_name
from taskproxy.workitems import ITEM_SOURCES, MAX_ID_LENGTH, SETTABLE_STATUSES

ROLES = ("developer", "service", "admin")
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters: these strings end up in logs, tables and pages


def _absent_if_empty(value: Any) -> Any:
    return None if value == "" else value


def _text(max_length: int) -> Any:
    """An optional string of printable characters; "" means absent."""
    return Annotated[Annotated[str, Field(max_length=max_length, pattern=PRINTABLE)] | None, BeforeValidator(_absent_if_empty)]


def _owner_name(owner: str) -> str:
    """Stored in one form (privacy.owner_name), so that the people counted are people, not spellings."""
    if not (name := owner_name(owner)):
        raise ValueError("the owner must name someone, not only spaces")
    if len(name) > 200:  # a compatibility form can be longer than what was typed
        raise ValueError("the owner is longer than 200 characters once written in Unicode's compatibility form (NFKC)")
    return name


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewKey(_Body):
    """POST /api/keys, `taskproxy keys create`."""

    owner: Annotated[str, Field(min_length=1, max_length=200, pattern=PRINTABLE, description="the person or service the key belongs to"),
                     AfterValidator(_owner_name)]  # fmt: skip
    team: _text(200) = None
    role: Literal[ROLES] = "developer"  # type: ignore[valid-type]


class _ItemFields(_Body):
    title: _text(500) = None
    url: _text(2000) = None
    team: _text(200) = None
    budget_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_BUDGET_TOKENS)] | None = None
    budget_usd: Annotated[StrictFloat, Field(ge=0, le=MAX_BUDGET_USD)] | None = None


class NewWorkItem(_ItemFields):
    """POST /api/work-items, `taskproxy items add`."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, description="PROJ-123, owner/repo#12 or a tracker URL")]
    status: Literal[SETTABLE_STATUSES] = "open"  # type: ignore[valid-type]
    source: Literal[ITEM_SOURCES] = "manual"  # type: ignore[valid-type]


class WorkItemChanges(_ItemFields):
    """PATCH /api/work-items/{id}: only the fields sent are changed."""

    status: Literal[SETTABLE_STATUSES] | None = None  # type: ignore[valid-type]

    def changed(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set)


class Binding(_Body):
    """PUT /api/me/work-item, `taskproxy use`."""

    work_item: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, description="PROJ-123, owner/repo#12 or a tracker URL")]


Body = TypeVar("Body", bound=_Body)


def parse(model: type[Body], data: Mapping[str, Any]) -> Body:
    """`data` as `model`, or InvalidRequest naming the first field that is wrong and why."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in error["loc"]) or "body"
        raise InvalidRequest(_message(model, name, error), param=name.split(".")[0]) from None


def _message(model: type[_Body], name: str, error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return f"'{name}' is required."
    if kind == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"'{name}' is not a field of this request; the fields are {known}."
    if kind == "string_pattern_mismatch":
        return f"'{name}' must not contain control characters."
    if kind == "model_type":
        return "The request body must be a JSON object."
    return f"'{name}': {error['msg'][0].lower()}{error['msg'][1:]}."


def request_schema(model: type[_Body]) -> dict[str, Any]:
    """The JSON Schema of a body, for the OpenAPI document."""
    return model.model_json_schema()
