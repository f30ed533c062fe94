"""The runtime's errors. Each name says who is at fault.

- ``MailboxFull``: the receiver is overloaded and its overflow policy refuses the message.
- ``AskTimeout``: no reply came before the asker's deadline.
- ``ActorCrashed``: the receiver raised while handling this very request.
- ``ActorStopped``: the receiver is gone for good (or went while the request waited).
- ``RestartIntensityExceeded``: a supervisor gave up; it is the supervisor's own crash
  reason, seen by its parent.
- ``DecodeError``: a frame from another process is not one we accept (the peer's fault).
"""

from __future__ import annotations


def safe_repr(value: object) -> str:
    """``repr(value)``, or a stand-in when the value's own ``__repr__`` fails."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} (repr failed)>"


class ActorError(Exception):
    """Base class of every error raised by the actor runtime."""


class MailboxFull(ActorError):
    """The receiver's mailbox is at capacity and its overflow policy refuses the message."""

    def __init__(self, path: str, capacity: int) -> None:
        super().__init__(f"mailbox of {path} is full ({capacity} messages)")
        self.path = path
        self.capacity = capacity


class AskTimeout(ActorError, TimeoutError):
    """An ``ask`` got no reply within its deadline."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(f"{path} did not reply within {timeout:g} s")
        self.path = path
        self.timeout = timeout


class ActorCrashed(ActorError):
    """The receiver raised while handling the request (or while starting, for a start
    request); ``__cause__`` and ``error`` are what it raised."""

    def __init__(
        self, path: str, error: BaseException, activity: str = "handling the request"
    ) -> None:
        super().__init__(f"{path} crashed {activity}: {safe_repr(error)}")
        self.path = path
        self.error = error


class ActorStopped(ActorError):
    """The receiver is not running any more and will not be restarted."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is stopped")
        self.path = path


class RestartIntensityExceeded(ActorError):
    """A supervisor saw more restarts than its intensity allows within its period."""

    def __init__(self, path: str, intensity: int, period: float) -> None:
        super().__init__(
            f"{path} gave up: more than {intensity} restart(s) within {period:g} s"
        )
        self.path = path
        self.intensity = intensity
        self.period = period


class DecodeError(ActorError):
    """A frame could not be decoded: malformed, truncated, oversized, unknown or wrong version."""
