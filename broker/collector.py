"""Keeping Python's cyclic garbage collector off long-lived session objects.

A process holding thousands of sessions (a tower's peer connections, a broker's session
actors and signaling sockets, a load generator's browsers) pays, in every full
collection, for traversing all of them: the pause grows about 0.1 ms per session and
stalls the loop, which is how a bare aiortc server stops keeping up at 2,000-3,000
sessions. Objects that survived until now are almost all session state that lives as
long as its session, so once a second they are moved out of the collector's sight
(``gc.freeze``); collections then only look at what is new. Before each freeze, the
garbage made since the last one (the cycles of a negotiation: futures, exceptions,
frames) is collected, so that only survivors are frozen; that collection sees a second's
worth of objects, not the sessions. What a closed session leaves behind in frozen
objects (cycles between a peer connection and its transports; between a session's
actors, tasks and TLS streams) is reclaimed by one full collection once enough sessions
have closed: a pause paid per batch of closures, not per second of load, nor for each
quarter the process grows by as Python's own rule has it. The batch is a quarter of the
sessions alive, so with sessions coming and going the full collections are no more
frequent than Python's. Garbage that is no session's waits for those collections too,
so what comes and goes without sessions must not leave cycles: the broker's HTTP
connections break theirs as they end (``endpoint.py``). A full collection also once the
frozen objects doubled would bound such garbage without sessions closing, but, while
3,000 sessions arrived, its pauses in the broker (0.3-0.7 s) were enough to push setups
past their deadline: 2,112 and 2,342 of 3,000 connected, against all 3,000 without it.
"""

from __future__ import annotations

import gc

import trio

FREEZE_INTERVAL = 1.0
# A full collection once this many sessions closed, or a quarter of those alive if more.
CLOSED_BEFORE_FULL_COLLECTION = 200


class Collector:
    def __init__(self, closed_before_full: int = CLOSED_BEFORE_FULL_COLLECTION) -> None:
        self.closed_before_full = closed_before_full
        self.closed = 0
        self.alive = 0

    def opened(self) -> None:
        self.alive += 1

    def closed_one(self) -> None:
        self.alive -= 1
        self.closed += 1

    def due(self) -> bool:
        return self.closed >= max(self.closed_before_full, self.alive // 4)

    async def run(self) -> None:
        """Every second, collect what is new and freeze the survivors; collect
        everything when enough sessions closed."""
        while True:
            await trio.sleep(FREEZE_INTERVAL)
            if self.due():
                gc.unfreeze()
                self.closed = 0
            gc.collect()
            gc.freeze()
