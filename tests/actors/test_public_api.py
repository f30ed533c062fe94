"""The public surface of ``actors``: what ``__init__`` exports, and nothing private leaks."""

import actors

PUBLIC = {
    "ActorActivity",
    "Actor",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorSnapshot",
    "ActorState",
    "ActorStopped",
    "ActorSystem",
    "AskTimeout",
    "Backoff",
    "ChildSpec",
    "Codec",
    "DEFAULT_ASK_TIMEOUT",
    "DecodeError",
    "Down",
    "Exit",
    "ExitKind",
    "Failure",
    "MailboxFull",
    "Monitor",
    "Overflow",
    "Restart",
    "RestartIntensityExceeded",
    "Strategy",
    "Supervisor",
    "SupervisorFlags",
    "SupervisorInfo",
    "SupervisorRef",
    "SYSTEM_SHUTDOWN",
    "SystemStatistics",
    "Trace",
    "TracedMessage",
    "open_system",
}


def test_exports_exactly_the_public_surface():
    exported = {name for name in vars(actors) if not name.startswith("_")}
    exported -= {"bridge"}  # a submodule, imported on its own
    assert exported == PUBLIC


def test_every_export_is_documented():
    for name in PUBLIC:
        value = getattr(actors, name)
        if callable(value):
            assert value.__doc__, f"actors.{name} has no docstring"


def test_errors_share_one_base():
    for name in ("ActorCrashed", "ActorStopped", "AskTimeout", "DecodeError", "MailboxFull"):
        assert issubclass(getattr(actors, name), actors.ActorError)
