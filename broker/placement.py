"""Placement: which tower gets a new session. A core without I/O.

Theory of operation: every tower reports its load (sessions, capacity) at least once a
second; a tower not heard from within ``stale_after`` seconds (default 5) is not
chosen, nor is a draining tower or a full one; a session the tower sends video to takes
more of its capacity than one with data only (the tower weighs them: ``used``). Among
the rest, two are drawn at random and the less loaded wins ("power of two choices", as
LiveKit places rooms): nearly as even as always taking the least loaded tower, without
every broker piling onto the same one between two reports. A session placed since a
tower's last report counts against that tower until its next report, so a burst of
arrivals spreads out; once the session counts as assigned, its placement no longer does
(``assign(..., placed_under=...)``). A tower reports the sessions whose offers it has
answered; each of the broker's sessions there counts on top of those from its start (or
from its offer, once it has offered) until its offer is answered (``assign``,
``unassign``: the offer may wait its turn through many reports), then as answered until
the tower's next report, which counts it (``answered``).

A tower also answers only so many offers at once: an offer counts against its tower from
the placement of its session (its first offer is coming) or from when it is sent there,
until the tower's answer (or refusal) comes back, or the session gives up on it
(``offer_sent``, ``offer_settled``). A new session goes only to a tower
with fewer offers unanswered than the limit it is given (``unanswered_below``), so that
a burst of arrivals past what the towers can answer is refused at the door rather than
slowing every setup, and the sessions already up, on an overloaded tower. Answering
takes a tower's own work alone (a client slow to connect after its answer holds
nothing), so the count is the tower's backlog. A session already placed (moved,
repaired) is never held to the limit: its offer waits its turn on the tower's link
instead (``TowerConnection.offer_turn``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field

DEFAULT_STALE_AFTER = 5.0


@dataclass(frozen=True)
class TowerLoad:
    """One load report from a tower."""

    tower: str
    sessions: int
    capacity: int
    draining: bool = False
    # How much of the capacity the sessions take: a session with video counts as the
    # tower's video_weight. None (a tower that does not weigh): one each.
    used: int | None = None

    def __post_init__(self) -> None:
        if not self.tower:
            raise ValueError("a load report names its tower")
        if self.sessions < 0 or self.capacity < 0:
            raise ValueError(f"{self.tower}: sessions and capacity cannot be negative")
        if self.used is not None and self.used < self.sessions:
            raise ValueError(f"{self.tower}: its sessions cannot take less than one each")

    @property
    def taken(self) -> int:
        """The capacity the sessions take."""
        return self.sessions if self.used is None else self.used


@dataclass
class _Count:
    """Sessions, and how much of a tower's capacity they take."""

    sessions: int = 0
    weight: int = 0

    def add(self, weight: int, sessions: int = 1) -> None:
        self.sessions += sessions
        self.weight += sessions * weight


_NONE = _Count()


@dataclass
class _Standing:
    load: TowerLoad
    reported_at: float
    assigned: dict[str, _Count]
    placed_since_report: _Count = field(default_factory=_Count)
    answered_since_report: _Count = field(default_factory=_Count)

    # The report counts the sessions answered before it. Those whose offer is not
    # answered yet are not among them (assigned), nor those answered since, nor those
    # placed since it and not assigned yet: the four add up.

    @property
    def sessions(self) -> int:
        assigned = self.assigned.get(self.load.tower, _NONE)
        return (self.load.sessions + self.placed_since_report.sessions + assigned.sessions
                + self.answered_since_report.sessions)

    @property
    def taken(self) -> int:
        assigned = self.assigned.get(self.load.tower, _NONE)
        return (self.load.taken + self.placed_since_report.weight + assigned.weight
                + self.answered_since_report.weight)

    @property
    def share_used(self) -> float:
        return self.taken / self.load.capacity if self.load.capacity else math.inf


def _within(weight: int, load: TowerLoad) -> int:
    """A session's weight on a tower: never more than all of it (alone, a session fits;
    the tower weighs it so too)."""
    return min(weight, max(load.capacity, 1))


class Placement:
    """Chooses towers for new sessions from the towers' load reports.

    Args:
        stale_after: seconds after its last report a tower stops being chosen.
        chooser: the source of randomness (a seeded ``random.Random`` in tests).
    """

    def __init__(
        self, *, stale_after: float = DEFAULT_STALE_AFTER, chooser: random.Random | None = None
    ) -> None:
        if not stale_after > 0:
            raise ValueError("stale_after must be > 0 seconds")
        self.stale_after = stale_after
        self._chooser = chooser or random.Random()
        self._towers: dict[str, _Standing] = {}
        self._assigned: dict[str, _Count] = {}
        self._unanswered: dict[str, int] = {}

    def report(self, load: TowerLoad, now: float) -> None:
        """Record a tower's load as of ``now``; it replaces what was known before."""
        self._towers[load.tower] = _Standing(load, now, self._assigned)

    def assign(self, tower: str, weight: int = 1, *, placed_under: float | None = None) -> None:
        """One of this broker's sessions negotiates with ``tower`` now, taking ``weight``
        of its capacity, and the tower has not answered its offer yet (until
        ``unassign``). ``placed_under``: ``choose`` placed it there under the report of
        that time (``reported_at``), and it counts as placed no more, unless a report has
        come since, which ended that count (and holds others' placements)."""
        self._assigned.setdefault(tower, _Count()).add(weight)
        standing = self._towers.get(tower)
        if (placed_under is not None and standing is not None
                and standing.reported_at == placed_under
                and standing.placed_since_report.sessions > 0):
            placed_count = standing.placed_since_report
            placed_count.add(min(_within(weight, standing.load), placed_count.weight), -1)

    def answered(self, tower: str, weight: int = 1) -> None:
        """``tower`` answered that session's offer: it counts until the tower's next
        report, which counts its peer."""
        standing = self._towers.get(tower)
        if standing is not None:
            standing.answered_since_report.add(weight)

    def unassign(self, tower: str, weight: int = 1) -> None:
        """That session's offer was answered (``answered`` follows) or refused, or its
        negotiation there ended, or the session did."""
        assigned = self._assigned.get(tower)
        if assigned is None:
            return
        assigned.add(weight, sessions=-1)
        if assigned.sessions <= 0:
            del self._assigned[tower]

    def offer_sent(self, tower: str) -> None:
        """One of this broker's sessions sent ``tower`` an offer (until ``offer_settled``)."""
        self._unanswered[tower] = self._unanswered.get(tower, 0) + 1

    def offer_settled(self, tower: str) -> None:
        """``tower`` answered or refused that offer, or its session gave up on it."""
        left = self._unanswered.get(tower, 0) - 1
        if left > 0:
            self._unanswered[tower] = left
        else:
            self._unanswered.pop(tower, None)

    def unanswered(self, tower: str) -> int:
        """How many offers of this broker's sessions ``tower`` has not answered yet."""
        return self._unanswered.get(tower, 0)

    def forget(self, tower: str) -> None:
        """The tower is gone (down, decommissioned): never choose it again until it reports."""
        self._towers.pop(tower, None)

    def load_of(self, tower: str) -> TowerLoad | None:
        """The tower's last report, counting sessions placed on it since."""
        standing = self._towers.get(tower)
        if standing is None:
            return None
        load = standing.load
        return TowerLoad(load.tower, standing.sessions, load.capacity, load.draining,
                         standing.taken)

    def reported_at(self, tower: str) -> float | None:
        """When the tower last reported, or None if it never did (or was forgotten)."""
        standing = self._towers.get(tower)
        return None if standing is None else standing.reported_at

    def is_fresh(self, tower: str, now: float) -> bool:
        """Whether the tower reported within ``stale_after`` seconds of ``now``."""
        standing = self._towers.get(tower)
        return standing is not None and now - standing.reported_at < self.stale_after

    def ready(
        self, now: float, exclude: Collection[str] = (), weight: int = 1,
        unanswered_below: int | None = None,
    ) -> list[str]:
        """Towers that may take a session of ``weight`` now: fresh, not draining, with
        room for it, not excluded, and (with ``unanswered_below``) with fewer offers
        unanswered than that."""
        return [
            name
            for name, standing in self._towers.items()
            if name not in exclude
            and self.is_fresh(name, now)
            and not standing.load.draining
            and standing.taken + _within(weight, standing.load) <= standing.load.capacity
            and (unanswered_below is None or self.unanswered(name) < unanswered_below)
        ]

    def choose(
        self, now: float, exclude: Collection[str] = (), weight: int = 1,
        unanswered_below: int | None = None,
    ) -> str | None:
        """Place one session taking ``weight`` of a tower's capacity: the less loaded of
        two ready towers drawn at random.

        ``exclude`` names towers the session must not go to (e.g. the one it is being
        repaired away from); ``unanswered_below`` leaves out towers with that many offers
        unanswered or more. Returns None when no tower is ready. The chosen tower's count
        goes up by one session of ``weight`` until its next report.
        """
        candidates = self.ready(now, exclude, weight, unanswered_below)
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            first, second = self._chooser.sample(candidates, 2)
            first_share = self._towers[first].share_used
            second_share = self._towers[second].share_used
            chosen = first if first_share <= second_share else second
        standing = self._towers[chosen]
        standing.placed_since_report.add(_within(weight, standing.load))
        return chosen

    def used_share(self, now: float) -> float:
        """Capacity taken over capacity across fresh, non-draining towers (0 when there
        are none)."""
        fresh = [
            standing
            for name, standing in self._towers.items()
            if self.is_fresh(name, now) and not standing.load.draining
        ]
        capacity = sum(standing.load.capacity for standing in fresh)
        return sum(standing.taken for standing in fresh) / capacity if capacity else 0.0
