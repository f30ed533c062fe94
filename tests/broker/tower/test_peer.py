"""The tower's peer actor, for the orders of messages a hand inside it can arrange:
a real aiortc client on the asyncio side, the actor on trio as the agent runs it."""

from __future__ import annotations

import trio
import trio.testing

from actors import ChildSpec, Restart, bridge, open_system
from broker.client_peer import new_peer
from broker.link import AddCandidate, OpenPeer, PeerAnswer
from broker.tower.peer import Peer, PeerSettings

from .test_agent import DEADLINE

EARLY = "candidate:1 1 udp 2122260223 10.9.8.7 40000 typ host"


def test_a_candidate_before_the_answer_is_added_before_the_end_of_candidates():
    """The end-of-candidates came while the answer was being sent (the link slow for a
    moment): added first, it made aiortc ignore the earlier candidate for good."""

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = (await bridge.call_asyncio(client.offer)).replace("a=end-of-candidates\r\n", "")
        answering, link_free = trio.Event(), trio.Event()

        async def send(message: object) -> None:
            if isinstance(message, PeerAnswer):
                answering.set()
                await link_free.wait()

        made: list[Peer] = []

        def make() -> Peer:
            made.append(Peer("s-1", 1, send, PeerSettings()))
            return made[-1]

        try:
            with trio.fail_after(DEADLINE):
                spec = ChildSpec("peer", make, restart=Restart.TEMPORARY)
                async with open_system("tower", children=[spec]) as system:
                    peer = system.lookup("/tower/peer")
                    await peer.tell(OpenPeer("s-1", 1, offer, "echo"))
                    await peer.tell(AddCandidate("s-1", 1, EARLY, "0", 0))
                    await answering.wait()
                    await peer.tell(AddCandidate("s-1", 1, "", "0", 0))
                    await trio.testing.wait_all_tasks_blocked()  # the peer has it queued
                    link_free.set()
                    ice = made[0].tower_peer._connection.sctp.transport.transport._connection
                    while not ice._remote_candidates_end:  # the end, once it is added
                        await trio.sleep(0.01)
                    assert ("10.9.8.7", 40000) in [
                        (candidate.host, candidate.port) for candidate in ice.remote_candidates]
        finally:
            with trio.CancelScope(shield=True):
                await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)
