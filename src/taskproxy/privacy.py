"""The privacy floor, defined once: team figures are shown only for teams of at least
`privacy.min_group_size` people (never a per-person figure through a small team: README, Privacy).

A team's **people** are the distinct owners of its keys (case and spacing aside: `person_of`) that are
held (not revoked; a period's figures: held at its end) and belong to a person: every role but
`service` (a service key is automation, not a person). The adoption report, `GET
/api/usage?group_by=team`, `/metrics` and the dashboard all count them with these functions. The
people without a team are a group under the floor too (`GET /api/usage?group_by=team`'s row of no
team, `/metrics`' team ""): one such person's figures would be theirs.

Withholding a group is not enough when the answer also has a total: the total minus the groups shown
is the withheld groups' sum, so the groups withheld in one answer must hold at least the floor between
them. `withheld_groups` withholds the smallest groups shown too until they do (complementary
suppression).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import distinct, func, or_, select
from sqlalchemy.engine import Connection, Engine

from taskproxy.storage.models import ApiKey

NOT_PEOPLE = ("service",)
Group = TypeVar("Group", bound=Hashable)
_K = ApiKey.__table__.c


def _persons_keys(as_of: datetime | None) -> tuple[Any, ...]:
    """A person's keys held at `as_of` (None: now): created before it and not revoked by then. A
    period's figures count the people at its end, so that its answer does not change with later hires
    and revocations: the teams withheld beside a small one were chosen by today's headcounts, and two
    answers for one past period, before and after a hire, showed between them every team but the small
    one (found by a review)."""
    alive = (_K.revoked_at.is_(None),) if as_of is None else (_K.created_at < as_of, or_(_K.revoked_at.is_(None), _K.revoked_at >= as_of))
    return (*alive, _K.role.not_in(NOT_PEOPLE))


def owner_name(owner: str) -> str:
    """How a key's owner is stored: Unicode's compatibility form (NFKC), every run of whitespace one
    space, none at the ends. A name pasted with a no-break or ideographic space is the name typed
    with a space: `dana\u00a0` was another person than `dana`, so a one-person team with keys under
    both spellings counted two people, and past the floor was shown."""
    return " ".join(unicodedata.normalize("NFKC", owner).split())


def person_of(owner: str) -> str:
    """The person an owner names: its stored form (`owner_name`), case aside (Unicode's full case
    folding). Kept with each key (`api_keys.person`) and counted from there: SQL's `lower` depends on
    the database (SQLite folds ASCII alone, PostgreSQL its locale's: ASCII alone under `C`, and no
    final sigma under `C.UTF-8`), so `Zoë` and `ZOË` were two people on some databases (found by
    reviews)."""
    return owner_name(owner).casefold()


def people(owners: Iterable[str]) -> int:
    """How many people `owners` name (`person_of`)."""
    return len({person_of(owner) for owner in owners})


def team_sizes(connection: Connection, as_of: datetime | None = None) -> dict[str, int]:
    """People per team (see the module docstring), at `as_of` (None: now)."""
    query = select(_K.team, func.count(distinct(_K.person))).where(*_persons_keys(as_of), _K.team.is_not(None)).group_by(_K.team)
    return {team: int(count) for team, count in connection.execute(query)}


def team_size(connection: Connection, team: str) -> int:
    """One team's people now (by the index on the key's team)."""
    return int(connection.execute(select(func.count(distinct(_K.person))).where(_K.team == team, *_persons_keys(None))).scalar_one())


def people_without_team(connection: Connection, as_of: datetime | None = None) -> int:
    """The people whose keys have no team: a group of their own under the floor, as a team is (their
    figures were shown whatever their number, one person's included)."""
    query = select(func.count(distinct(_K.person))).where(*_persons_keys(as_of), _K.team.is_(None))
    return int(connection.execute(query).scalar_one())


def group_sizes(connection: Connection, as_of: datetime | None = None) -> dict[str | None, int]:
    """People per team, and (None) those without one, at `as_of`: what a period's answer withholds by."""
    return {**team_sizes(connection, as_of), None: people_without_team(connection, as_of)}


def sizes_at(engine: Engine, as_of: datetime | None) -> dict[str | None, int]:
    """`group_sizes`, in a connection of its own."""
    with engine.connect() as connection:
        return group_sizes(connection, as_of)


def same_person(owner: str, other: str) -> bool:
    """Two keys' owners name one person (as the people are counted: case and spacing aside)."""
    return person_of(owner) == person_of(other)


def shown(team_size: int, min_group_size: int) -> bool:
    return team_size >= min_group_size


def withheld_groups(people: Mapping[Group, int], present: Iterable[Group], min_group_size: int) -> set[Group]:
    """The groups among `present` (those with figures in one answer) whose figures that answer withholds:
    each one under the floor and, if those hold fewer than the floor between them, the smallest others
    until they do (fewest people first, then by name), so that subtracting the groups shown from a
    total leaves no group under the floor. People are summed per group: a person with keys in two
    withheld groups counts twice."""
    present = set(present)
    held = {group for group in present if not shown(people.get(group, 0), min_group_size)}
    between_them = sum(people.get(group, 0) for group in held)
    if not held or shown(between_them, min_group_size):
        return held
    for group in sorted(present - held, key=lambda group: (people.get(group, 0), "" if group is None else str(group))):
        held.add(group)
        between_them += people.get(group, 0)
        if shown(between_them, min_group_size):
            break
    return held


def withheld(team: str | None, min_group_size: int, *, people: int = 0) -> dict[str, Any]:
    """What stands in for a team's figures: below the floor, or (`people` at or above it) withheld with
    those below it by `withheld_groups`."""
    entry: dict[str, Any] = {"team": team} if team is not None else {}
    if shown(people, min_group_size):
        return {**entry, "withheld": True, "reason": f"withheld with the teams of fewer than {min_group_size} people, which a total would reveal"}
    return {**entry, "withheld": True, "reason": f"fewer than {min_group_size} people"}


class SeriesTeams:
    """The team label of usage counted in series since the process started (`/metrics`, OpenTelemetry):
    the team's name, or `small` for the groups withheld. The groups present are those whose usage this
    process has labelled, so the series of the small ones is never a group under the floor, nor any
    series less the others; a group whose usage only starts later may withhold more teams from then
    on. `sizes` returns people per group, a mapping replaced whole when a size changes."""

    def __init__(self, sizes: Callable[[], Mapping[str, int]], min_group_size: int, *, small: str) -> None:
        self._sizes, self._floor, self._small = sizes, min_group_size, small
        self._seen: set[str] = set()
        self._read: Mapping[str, int] = {}  # the sizes `_held` was worked out with
        self._held: set[str] = set()
        self._between = 0  # the people of `_held`
        self._lock = threading.Lock()  # labels are asked for by the writer's listeners' threads

    def label(self, group: str) -> str:
        sizes = self._sizes()
        with self._lock:
            if sizes is not self._read:
                self._seen.add(group)
                self._read = sizes
                self._hold(withheld_groups(sizes, self._seen, self._floor))
            elif group not in self._seen:
                self._seen.add(group)
                self._arrived(group, sizes)
            return self._small if group in self._held else group

    def _hold(self, held: set[str]) -> None:
        self._held, self._between = held, sum(self._read.get(g, 0) for g in held)

    def _arrived(self, group: str, sizes: Mapping[str, int]) -> None:
        """`group` is present too: the withheld are worked out again only when they then hold fewer than
        the floor (a company's thousands of teams arrive one by one, as their usage does). Until the
        sizes change, a team withheld stays withheld: its series does not flip."""
        people = sizes.get(group, 0)
        if not shown(people, self._floor):
            self._held.add(group)
            self._between += people
        if self._held and not shown(self._between, self._floor):
            self._hold(withheld_groups(sizes, self._seen, self._floor))
