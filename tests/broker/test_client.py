"""The Python client's own decisions, without a broker: how it waits out a busy one, and
what it leaves behind when a session cannot be handed over."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from aiortc.exceptions import InvalidStateError

from actors import bridge
from broker import client as client_module
from broker.client import (
    BUSY_ATTEMPTS,
    BUSY_WAIT_MAX,
    ApiError,
    BrokerClient,
    ClientSession,
    SessionGrant,
    start_session,
)


@pytest.mark.parametrize("retry_after, longest", [
    (None, 1.5),            # no Retry-After: a second, drawn up to half as long again
    (2, 3.0),
    (10**9, BUSY_WAIT_MAX * 1.5),  # a broker's absurd wish is capped, not waited out
])
def test_a_busy_broker_is_asked_again_after_its_retry_after_up_to_a_cap(
        retry_after, longest, monkeypatch):
    client = BrokerClient("https://127.0.0.1:9", "key", ssl_context=None)
    asked: list[float] = []

    async def busy(method, path, body=None):
        asked.append(trio.current_time())
        raise ApiError(503, "towers_busy", "busy", retry_after)

    monkeypatch.setattr(client, "_call", busy)

    async def main() -> None:
        with pytest.raises(ApiError):
            await client.create_session()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(asked) == BUSY_ATTEMPTS
    waits = [later - earlier for earlier, later in zip(asked, asked[1:])]
    floor = 1 if retry_after is None else min(retry_after, BUSY_WAIT_MAX)
    assert all(floor <= wait <= longest for wait in waits), waits


class StandInBroker:
    """The broker as ``start_session`` sees it: it grants every session, and records
    the sessions deleted."""

    ssl_context = None

    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def ice_servers(self) -> tuple:
        return ()

    async def create_session(self, application, offer, busy_attempts):
        return SessionGrant("s-1", "tower-1", "wss://127.0.0.1:9/v1/signal", "t", ())

    async def delete_session(self, session_id: str) -> None:
        self.deleted.append(session_id)

    async def new_token(self, session_id: str) -> dict:
        raise AssertionError("not asked for here")


@pytest.mark.parametrize("fails", ["the socket", "the caller"])
def test_a_session_started_but_not_handed_over_is_deleted(monkeypatch, fails):
    # The broker went on negotiating a session its client had given up on as it began.
    @asynccontextmanager
    async def no_socket(*arguments, **options):
        if fails == "the socket":
            raise ConnectionRefusedError("no signaling socket")
        yield ClientSession(arguments[0], None)

    monkeypatch.setattr(client_module, "open_session", no_socket)
    broker = StandInBroker()

    async def main() -> None:
        with pytest.raises((ConnectionRefusedError, LookupError)):
            async with start_session(broker):
                raise LookupError("the caller's own error, once it has the session")

    bridge.run(main, handle_signals=False)
    assert broker.deleted == (["s-1"] if fails == "the socket" else [])


class StandInPeer:
    """A client's peer whose echo channel is open, or closed under it by a repair."""

    def __init__(self, closed: bool) -> None:
        self.closed = closed

    async def wait_open(self) -> None:
        pass

    async def echo(self, payload: str) -> float:
        if self.closed:
            raise InvalidStateError()
        return 0.001


def test_an_echo_asked_of_a_peer_closed_by_a_repair_is_taken_by_the_next():
    # It failed with aiortc's InvalidStateError: the old peer is closed before the
    # repair's new one is made.
    session = ClientSession(SessionGrant("s-1", "tower-1", "wss://x", "t", ()), None)
    session.peer = StandInPeer(closed=True)
    seen = {}

    async def main() -> None:
        async def repair() -> None:
            await trio.sleep(0.5)
            session._take_peer(StandInPeer(closed=False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(repair)
            seen["echo"] = await session.echo("x", timeout=5)
        session.peer, session.state = StandInPeer(closed=True), "closed"
        with pytest.raises(InvalidStateError):  # the session is over: no repair comes
            await session.echo("x", timeout=5)

    bridge.run(main, handle_signals=False)
    assert seen["echo"] == 0.001
