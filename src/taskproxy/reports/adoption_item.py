"""A work item as the adoption report reads it (`adoption.py` has the definitions): its rows, its
spend in the period and of all time, and the rules that decide, from those alone, whether a
completion counts, held, was reworked or was AI-assisted. `adoption_data.py` fills it in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from taskproxy.workitems import completed_in, completion_holds


@dataclass(slots=True)
class Item:
    id: str
    team: str | None = None  # the item's team after the fallback to the spending team
    status: str = "unverified"  # current
    created_at: datetime | None = None
    completed_at: datetime | None = None
    status_at_until: str = "unverified"
    completed_at_until: datetime | None = None  # its completion as it stood at `until` (done or closed then), else None
    # Open or in progress and fresh at `until` (work in progress then): its status once it can be judged,
    # as of `judged_at` (when it turned stale, or now if that has not come yet). None for the others.
    status_judged: str | None = None
    judged_at: datetime | None = None
    judged_stale: bool = False  # judged as it stood when it turned stale (else as of now: it has not yet)
    # In progress at `until`, with period spend: when work on it began, the later of its creation and its
    # first request (all time). A backlog ticket picked up today is as fresh as one opened today.
    started_at: datetime | None = None
    # All-time, per model: (events, answered events that are not token counts, cost in nano-USD or None,
    # total tokens) — items
    # completed in the period, or reopened after a completion in it, only.
    by_model: dict[str, tuple[int, int, int | None, int]] = field(default_factory=dict)
    # Their sums, kept as `add_usage` fills `by_model`: every scope's figures read them.
    cost: int | None = None  # known cost, nano-USD; None when no event of the item has a known price
    tokens: int = 0
    answered: bool = False  # at least one event (all time) below status 400 that is not a token count
    first_used: datetime | None = None  # its first event (all time, any status)
    first_answered: datetime | None = None  # its first answer that generated something (None: unknown, see 0019); a carried one: its merge (`absorb`)
    period_events: int = 0  # events in the period
    spend: int = 0  # their known cost, nano-USD
    spend_after_completion: int = 0  # of which after completed_at (done or closed items)
    merged_pr: bool = False  # a linked item was done, and not reworked, as of `until`
    lines: int | None = None  # lines changed (added + deleted), when the tracker said
    points: float | None = None  # story points or estimate, when the tracker said
    reworked_at: datetime | None = None  # the first rework: reverted after merge, or reopened or closed after done
    rework_reason: str | None = None
    reopened_completion: datetime | None = None  # the completion a reopening undid (reopened items only)
    # The report's verdicts for its period, decided once per item (adoption.settle) and read by the
    # overall figures and by those of the item's team.
    completed: bool = False  # completed_in the period
    delivered: bool = False  # delivered_in the period
    reworked: bool = False  # reworked_in the period
    without_outcome: str | None = None  # which spend without outcome its period spend is, if any
    without_outcome_spend: int = 0  # how much of it: all its period spend, or what came after its merged PRs
    spend_after_merge: int = 0  # a ticket with a merged PR: its period spend after the last such merge
    carries: tuple[str, ...] = ()  # a merged PR: the tickets whose usage its cost counts (shared empty for the rest)
    cycle_hours: float | None = None  # completed_at - created_at (completed items)
    # Done again after reopenings (completed in the period): each reopening before `completed_at` (a
    # change away from done) with the completion it undid (None: not dated), and its last answer (not a
    # token count) after the first of them, up to `completed_at`.
    reopenings: tuple[tuple[datetime, datetime | None], ...] = ()
    last_answer_since_reopened: datetime | None = None
    assisted: bool = False  # a verdict (adoption.settle): AI-assisted, for the period

    def assisted_since(self, since: datetime) -> bool:
        """Answered (not a token count) before the completion that counts: its first such answer no later
        than its `completed_at` (done), or than the completion its reopening undid. A request sent only
        after the work was done (tagging after the fact) does not make it assisted, nor does a free token
        count or a failed request before it. An item done again after a reopening that undid a completion
        before the period (`since`) is assisted only by an answer between that reopening and its
        completion: else reopening old work and setting it done again, with no request, counted it as a
        new AI-assisted completion (`_load_redone`); reopened and done again within the period, it is one
        completed item of the period, assisted by its work as before. (Answers
        only in raw partitions dropped before migration 0019 are not dated: then its first event of any
        kind stands in.)"""
        done = self.completed_at if self.status == "done" else self.reopened_completion
        began = self.first_answered or self.first_used
        recycled = [reopened for reopened, undid in self.reopenings if undid is None or undid < since]
        if recycled:  # an earlier period's completion done again: the work since its last such reopening counts
            return self.last_answer_since_reopened is not None and self.last_answer_since_reopened > max(recycled)
        return self.answered and began is not None and (done is None or began <= done)

    def reworked_in(self, since: datetime, until: datetime) -> bool:
        """The completion that puts the item in the period did not hold: a merged PR reverted (its one
        completion), or the reopening of a completion in the period (adoption.py, rework)."""
        if self.rework_reason == "reverted":
            return self.reworked_at is not None
        reopened = self.reopened_completion
        return reopened is not None and since <= reopened < until

    def undone_as_of(self, until: datetime) -> bool:
        """Reworked before `until` and, as of `until`, not done again since (a reverted PR never is: done
        by hand afterwards, its merge still does not hold, `merge_holds`). The completion that counts is
        the one as of `until`: one made or undone since does not change what the period's spend led to."""
        if self.reworked_at is None or self.reworked_at >= until:
            return False
        if self.rework_reason == "reverted":
            return True
        done_again = self.status_at_until == "done" and self.completed_at_until is not None and self.completed_at_until > self.reworked_at
        return not done_again

    @property
    def undone_later(self) -> bool:
        """Done at `until` by a completion of the period, undone since (reopened, closed or reverted) and
        not done again when judged (`status_judged`: `stale_after` after `until`, or now until then):
        that completion led nowhere, and neither did the spend it covered."""
        if self.status_at_until != "done" or self.status_judged is None or self.judged_at is None:
            return False
        reverted = self.rework_reason == "reverted" and self.reworked_at is not None and self.reworked_at <= self.judged_at
        return self.status_judged != "done" or reverted

    def completed_in(self, since: datetime, until: datetime) -> bool:
        """Completed in the period (adoption.py; `workitems.completed_in`)."""
        return completed_in(self.status, self.completed_at, since, until)

    def delivered_in(self, since: datetime, until: datetime) -> bool:
        """Completed in the period, or completed in it and reopened since (adoption.py, rework)."""
        reopened = self.reopened_completion
        return self.completed_in(since, until) or (reopened is not None and since <= reopened < until)

    @property
    def merge_holds(self) -> bool:
        """A merged pull request (done) whose merge stands now: not reverted, nor reopened and not done since."""
        return completion_holds(self.status, self.completed_at, self.reworked_at, self.rework_reason)

    def absorb(self, usage: Mapping[str, tuple[int, int, int | None, int]], merge: datetime) -> None:
        """Count a carried ticket's usage in this merged pull request's span of it (`adoption_data.Carry`:
        after the ticket's merged pull request before this one, up to this one's `merge`), per model, as
        this item's: the ticket is no completed item of its own, and this is the outcome that part of its
        work led to. An answer among it makes this item AI-assisted, one outside it does not (a hand-done
        pull request naming an old ticket was assisted by the work an earlier one carried). Every answer
        carried is at or before the merge, which dates it: the day and hour rollups keep no first answer."""
        carried_answer = False
        for model, (attempts, answered, cost, tokens) in usage.items():
            if attempts <= 0:
                continue
            mine = self.by_model.get(model, (0, 0, None, 0))
            known = mine[2] if cost is None else (mine[2] or 0) + cost
            self.by_model[model] = (mine[0] + attempts, mine[1] + answered, known, mine[3] + tokens)
            carried_answer = carried_answer or answered > 0
            if cost is not None:
                self.cost = (self.cost or 0) + cost
            self.tokens += tokens
        if carried_answer:
            self.answered = True
            if self.first_answered is None or merge < self.first_answered:
                self.first_answered = merge

    def add_usage(self, model: str, attempts: int, answered: int, cost: int | None, tokens: int, first_used: datetime | None,
                  first_answered: datetime | None) -> None:  # fmt: skip
        """The item's all-time usage of `model` (one call per model)."""
        self.by_model[model] = (attempts, answered, cost, tokens)
        self.answered = self.answered or answered > 0
        if first_used is not None and (self.first_used is None or first_used < self.first_used):
            self.first_used = first_used
        if first_answered is not None and (self.first_answered is None or first_answered < self.first_answered):
            self.first_answered = first_answered
        if cost is not None:
            self.cost = (self.cost or 0) + cost
        self.tokens += tokens
