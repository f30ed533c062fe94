"""Introspection as data: frozen snapshots of actors and supervisors."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ._exit import Failure


class ActorState(enum.Enum):
    """Where an actor is in its life.

    ``STARTING`` (its ``started`` hook runs), ``RUNNING``, ``RESTARTING`` (waiting out a
    backoff before the next start), ``STOPPING`` (asked to stop, finishing), ``STOPPED``
    (ended for good; its ref only answers ``ActorStopped`` and dead letters).
    """

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SupervisorInfo:
    strategy: str
    intensity: int
    period: float


@dataclass(frozen=True)
class ActorSnapshot:
    """One actor at one moment.

    ``uptime`` is the age of its current run (0 when not running); ``restart_in`` is how
    long until a restart waiting out its backoff begins (None when none waits); ``failures`` are its
    most recent abnormal ends, oldest first; ``children`` are set for supervisors, in
    start order (those the snapshot was asked for: ``child_count`` says how many there
    are); ``supervisor`` holds a supervisor's flags and is None for workers;
    ``traces`` is how many traces of its messages are open (``ActorRef.trace``).
    """

    path: str
    name: str
    actor_class: str
    state: ActorState
    mailbox_depth: int
    mailbox_capacity: int
    overflow: str
    messages_handled: int
    messages_dropped: int
    restarts: int
    uptime: float
    failures: tuple[Failure, ...]
    children: tuple[ActorSnapshot, ...] = ()
    child_count: int = 0
    supervisor: SupervisorInfo | None = None
    restart_in: float | None = None
    traces: int = 0

    @property
    def kind(self) -> str:
        return "actor" if self.supervisor is None else "supervisor"

    @property
    def last_failure(self) -> Failure | None:
        return self.failures[-1] if self.failures else None

    def walk(self) -> Iterator[ActorSnapshot]:
        """This snapshot and all below it that it holds (a bounded snapshot holds part
        of the tree), depth first, in start order."""
        yield self
        for child in self.children:
            yield from child.walk()


class ActorActivity(NamedTuple):
    """One live actor's counters (those of its snapshot), cheap enough to take for every
    actor of a large system at once: what ``ps`` and ``top`` sort on before they take
    the snapshots of the few they show."""

    path: str
    state: ActorState
    mailbox_depth: int
    messages_handled: int
    messages_dropped: int
    restarts: int
