import pytest
import trio

from actors import Actor, ChildSpec, SupervisorFlags, open_system


class Recorder(Actor):
    """Records what it receives; raises on ``"crash"``; replies with the message."""

    def __init__(self, log: list | None = None, name: str = "") -> None:
        self.log = log if log is not None else []
        self.name = name

    async def started(self) -> None:
        self.log.append((self.name, "started"))

    async def receive(self, message):
        if message == "crash":
            raise RuntimeError(f"{self.name} asked to crash")
        if message == "stop":
            self.stop()
        if message == "hang":
            await trio.sleep_forever()
        self.log.append((self.name, message))
        return message

    async def stopping(self, exit) -> None:
        self.log.append((self.name, f"stopping:{exit.kind.value}"))


def recorder(name: str, log: list, **spec_options) -> ChildSpec:
    return ChildSpec(name, lambda: Recorder(log, name), **spec_options)


@pytest.fixture
def log() -> list:
    return []


@pytest.fixture
async def system():
    async with open_system("test", flags=SupervisorFlags(intensity=100)) as system:
        yield system
