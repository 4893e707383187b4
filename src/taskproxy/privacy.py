"""The privacy floor, defined once: team figures are shown only for teams of at least
`privacy.min_group_size` people (never a per-person figure through a small team: README, Privacy).

A team's **people** are the distinct owners of its keys that are not revoked and belong to a person:
every role but `service` (a service key is automation, not a person). The adoption report, `GET
/api/usage?group_by=team`, `/metrics` and the dashboard all count them with these functions. The
people without a team are a group under the floor too (`GET /api/usage?group_by=team`'s row of no
team, `/metrics`' team ""): one such person's figures would be theirs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Connection

from taskproxy.storage.models import ApiKey

NOT_PEOPLE = ("service",)
_K = ApiKey.__table__.c


_PERSONS_KEYS = (_K.revoked_at.is_(None), _K.role.not_in(NOT_PEOPLE))
_PEOPLE = (*_PERSONS_KEYS, _K.team.is_not(None))


def team_sizes(connection: Connection) -> dict[str, int]:
    """People per team (see the module docstring)."""
    query = select(_K.team, func.count(distinct(_K.owner))).where(*_PEOPLE).group_by(_K.team)
    return {team: int(count) for team, count in connection.execute(query)}


def team_size(connection: Connection, team: str) -> int:
    """One team's people (by the index on the key's team)."""
    return int(connection.execute(select(func.count(distinct(_K.owner))).where(_K.team == team, *_PEOPLE)).scalar_one())


def people_without_team(connection: Connection) -> int:
    """The people whose keys have no team: a group of their own under the floor, as a team is (their
    figures were shown whatever their number, one person's included)."""
    query = select(func.count(distinct(_K.owner))).where(*_PERSONS_KEYS, _K.team.is_(None))
    return int(connection.execute(query).scalar_one())


def shown(team_size: int, min_group_size: int) -> bool:
    return team_size >= min_group_size


def withheld(team: str | None, min_group_size: int) -> dict[str, Any]:
    """What stands in for a team's figures below the floor."""
    entry: dict[str, Any] = {"team": team} if team is not None else {}
    return {**entry, "withheld": True, "reason": f"fewer than {min_group_size} people"}
