"""How an actor ended, and what introspection keeps of its failures."""

from __future__ import annotations

import enum
import traceback
from dataclasses import dataclass, field

from ._errors import safe_repr


class ExitKind(enum.Enum):
    """How an actor's run ended.

    - ``NORMAL``: the actor stopped itself (``Actor.stop``).
    - ``SHUTDOWN``: its supervisor (or the system) stopped it in order; the detail says
      why (``SYSTEM_SHUTDOWN``, terminated, restarted, its supervisor stopping).
    - ``CRASHED``: it raised an exception.
    - ``KILLED``: it was cancelled: it missed its shutdown deadline, or someone killed it
      on purpose (``ActorRef.kill``).
    """

    NORMAL = "normal"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    KILLED = "killed"


@dataclass(frozen=True)
class Exit:
    """The reason an actor's run ended: its kind, and the error or a detail when there is one."""

    kind: ExitKind
    error: BaseException | None = None
    detail: str = ""

    @property
    def abnormal(self) -> bool:
        return self.kind in (ExitKind.CRASHED, ExitKind.KILLED)

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.kind.value}: {safe_repr(self.error)}"
        if self.detail:
            return f"{self.kind.value}: {self.detail}"
        return self.kind.value


def shutdown(reason: str) -> Exit:
    """An ordered stop, and why."""
    return Exit(ExitKind.SHUTDOWN, detail=reason)


NORMAL = Exit(ExitKind.NORMAL)
# Every actor's exit when the system itself stops: its supervisors pass it down.
SYSTEM_SHUTDOWN = shutdown("the actor system is shutting down")


@dataclass(frozen=True)
class Failure:
    """One abnormal end of an actor, kept for introspection.

    The traceback is captured without source lines when the failure happens and only
    formatted when someone reads it: a crash must not cost its supervisor's restart
    time, and the exception's frames (and their locals) are not kept alive.
    """

    time: float
    kind: ExitKind
    reason: str
    _captured: traceback.TracebackException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, exit: Exit, time: float) -> Failure:
        error = exit.error
        captured = None
        if error is not None:
            captured = traceback.TracebackException.from_exception(error, lookup_lines=False)
        return cls(time=time, kind=exit.kind, reason=str(exit), _captured=captured)

    @property
    def traceback(self) -> str:
        """The formatted traceback of the error, or "" when the end had no error."""
        if self._captured is None:
            return ""
        return "".join(self._captured.format())
