"""A crash in one actor never cancels or delays its siblings, at scale."""

import trio

from actors import Actor, ChildSpec, Supervisor, SupervisorFlags

ACTORS = 10_000
CRASHING = 100
ROUNDS = 5


class Counter(Actor):
    mailbox_capacity = ROUNDS * 2 + 2

    def __init__(self, seen: list) -> None:
        self.seen = seen

    async def receive(self, message):
        if message == "crash":
            raise RuntimeError("crash on purpose")
        self.seen.append(message)
        return len(self.seen)


async def test_ten_thousand_siblings_are_untouched_by_a_hundred_crashing(autojump_clock, system):
    seen = [[] for _ in range(ACTORS)]
    flags = SupervisorFlags(intensity=CRASHING * ROUNDS, period=60)
    group = await system.spawn(ChildSpec("group", lambda: Supervisor((), flags)))
    refs = [
        await group.start_child(ChildSpec(f"c{index}", lambda index=index: Counter(seen[index])))
        for index in range(ACTORS)
    ]
    crashing = set(range(0, ACTORS, ACTORS // CRASHING))
    for round_number in range(ROUNDS):
        for index, ref in enumerate(refs):
            if index in crashing:
                await ref.tell("crash")
            await ref.tell(round_number)
        await trio.sleep(0)
    for ref in refs:
        await ref.ask("done", timeout=60)

    for index, messages in enumerate(seen):
        if index in crashing:
            continue
        assert messages == [*range(ROUNDS), "done"], f"actor {index} saw {messages}"
    for index in crashing:
        snapshot = refs[index].snapshot()
        assert snapshot.restarts == ROUNDS
        # Messages queued behind a crash are handled by the next incarnation.
        assert seen[index] == [*range(ROUNDS), "done"]
    assert group.alive
    assert sum(child.restarts for child in group.which_children()) == CRASHING * ROUNDS
