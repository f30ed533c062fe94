"""Scale-out and scale-in: a pure policy over towers' load, and the actor that applies it.

Every ``scale_interval`` seconds the ``scaler`` actor shows the policy what is linked
(each fresh tower's capacity, and how much of it its sessions take), which hosts are
free, and what is under way; the policy answers with decisions, which the actor carries
out and records as events:

- **provision** a free host, when fewer towers than the floor (``min_towers``, or what
  ``scale N`` set) are up or coming, or when the used share of capacity across ready
  towers has stayed above ``scale_out_threshold`` for ``scale_out_after`` seconds and
  nothing is being provisioned already;
- **drain** a provisioned tower that has had no session for ``scale_in_after`` seconds,
  when there are more towers than the floor and the others would stay under half the
  threshold; one at a time. A drained tower takes no new sessions; its sessions end or
  are repaired elsewhere;
- **decommission** a drained tower once it has no session left.

Only provisioned towers are drained; local towers (the embedded default) stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from actors import Actor, ActorError, ActorRef

from .config import Settings
from .provisioning import Answer, Decommission, HostBoard, HostState, Provision
from .towers import TowerDirectory

logger = logging.getLogger(__name__)

# Seconds a tower not reporting (local, or provisioned and ready) counts as coming back
# (since it was last seen reporting, or first looked for).
TOWER_GRACE = 30.0


@dataclass(frozen=True)
class TowerFigures:
    name: str
    # The capacity its sessions take (a session with video counts as several); 0 when
    # it has none.
    used: int
    capacity: int
    provisioned: bool  # from the inventory (may be drained), not a local tower
    draining: bool
    retiring: bool = False  # drained by the policy, to be decommissioned


@dataclass(frozen=True)
class ScaleView:
    """What the policy sees: towers with a fresh load report (and retiring towers whose
    link is gone, as empty), free hosts, and towers on their way: being provisioned, or
    provisioned or local and not reporting for less than ``TOWER_GRACE``."""

    now: float
    towers: tuple[TowerFigures, ...]
    free_hosts: tuple[str, ...]
    on_the_way: int


@dataclass(frozen=True)
class Decision:
    action: str  # "provision", "drain" or "decommission"
    host: str
    why: str


@dataclass
class ScalePolicy:
    threshold: float
    out_after: float
    in_after: float
    floor: int
    # A ceiling set by ``scale N``: towers beyond it are drained, idle or not.
    ceiling: int | None = None
    above_since: float | None = None
    idle_since: dict[str, float] = field(default_factory=dict)

    def scale_to(self, count: int) -> None:
        self.floor = count
        self.ceiling = count

    def decide(self, view: ScaleView) -> list[Decision]:
        decisions: list[Decision] = []
        serving = [tower for tower in view.towers if not tower.draining]
        capacity = sum(tower.capacity for tower in serving)
        # A tower cannot use more than all of its capacity, whatever it reports.
        used = sum(min(tower.used, tower.capacity) for tower in serving)
        used = used / capacity if capacity else 0.0
        free = list(view.free_hosts)
        self._track_idle(view)

        for tower in view.towers:
            if tower.retiring and tower.used == 0:
                decisions.append(Decision("decommission", tower.name, "drained and empty"))

        coming = len(serving) + view.on_the_way
        on_the_way = view.on_the_way
        while coming < self.floor and free:
            decisions.append(Decision(
                "provision", free.pop(0), f"{coming} of at least {self.floor} towers up or coming"
            ))
            coming += 1
            on_the_way += 1

        if used > self.threshold:
            if self.above_since is None:
                self.above_since = view.now
            sustained = view.now - self.above_since >= self.out_after
            below_ceiling = self.ceiling is None or coming < self.ceiling
            if sustained and on_the_way == 0 and free and below_ceiling:
                decisions.append(Decision(
                    "provision", free.pop(0),
                    f"{used:.0%} of capacity used for {view.now - self.above_since:.0f} s",
                ))
                self.above_since = None
        else:
            self.above_since = None

        if any(tower.retiring for tower in view.towers):
            return decisions  # one scale-in at a time
        drainable = [tower for tower in serving if tower.provisioned]
        if self.ceiling is not None and len(serving) > self.ceiling and drainable:
            victim = min(drainable, key=lambda tower: tower.used)
            decisions.append(Decision("drain", victim.name,
                                      f"{len(serving)} towers, more than {self.ceiling}"))
            return decisions
        if len(serving) <= self.floor:
            return decisions
        for tower in drainable:
            idle_since = self.idle_since.get(tower.name)
            if idle_since is None or view.now - idle_since < self.in_after:
                continue
            rest = capacity - tower.capacity
            rest_used = (
                sum(min(other.used, other.capacity) for other in serving) / rest
                if rest else 1.0
            )
            if rest_used < self.threshold / 2:
                decisions.append(Decision(
                    "drain", tower.name, f"idle for {view.now - idle_since:.0f} s"
                ))
                break
        return decisions

    def _track_idle(self, view: ScaleView) -> None:
        for tower in view.towers:
            if tower.used == 0 and not tower.draining:
                self.idle_since.setdefault(tower.name, view.now)
            else:
                self.idle_since.pop(tower.name, None)
        names = {tower.name for tower in view.towers}
        for name in list(self.idle_since):
            if name not in names:
                del self.idle_since[name]


@dataclass(frozen=True)
class ScaleTo:
    """``scale N``: keep exactly N towers (provision or drain to get there); answered
    with an ``Answer``."""

    count: int


class Scaler(Actor):
    """Applies the scale policy every ``scale_interval`` seconds."""

    runs_tasks = True

    def __init__(
        self, settings: Settings, directory: TowerDirectory, board: HostBoard
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.board = board
        self.policy = ScalePolicy(
            threshold=settings.scale_out_threshold,
            out_after=settings.scale_out_after,
            in_after=settings.scale_in_after,
            floor=min(settings.min_towers, settings.local_towers + len(board.records)),
        )
        # When each local tower was last seen reporting (or first looked for).
        self.seen_at: dict[str, float] = {}

    async def started(self) -> None:
        self.applying = trio.Lock()
        provisioning = self.system.lookup(f"{self.path.rsplit('/', 1)[0]}/provisioning")
        assert provisioning is not None
        self.provisioning: ActorRef = provisioning
        self.start_soon(self._tick)

    async def receive(self, message: object) -> Answer:
        if isinstance(message, ScaleTo):
            local, hosts = self.settings.local_towers, len(self.board.records)
            if not local <= message.count <= local + hosts:
                return Answer(False, f"the number of towers can be between {local} (the "
                              f"local towers, never drained) and {local + hosts} (every "
                              "inventory host)")
            self.policy.scale_to(message.count)
            self.board.event(f"scale: keep {message.count} towers (operator)")
            await self._apply()
            return Answer(True, f"scaling to {message.count} towers")
        raise TypeError(f"the scaler does not take {type(message).__name__}")

    async def _tick(self) -> None:
        while True:
            await self._apply()
            await trio.sleep(self.settings.scale_interval)

    def view(self) -> ScaleView:
        now = trio.current_time()
        placement = self.directory.placement
        figures = []
        for connection in self.directory:
            load = placement.load_of(connection.name)
            if load is None or not placement.is_fresh(connection.name, now):
                continue
            draining = self.directory.is_draining(connection.name)
            record = self.board.records.get(connection.name)
            provisioned = record is not None and record.state is HostState.READY
            retiring = record is not None and record.state is HostState.DRAINING
            # A session repaired there, waiting for its client's offer, counts in no
            # load: the tower is not empty while it negotiates there.
            used = max(load.taken, connection.negotiating)
            figures.append(TowerFigures(connection.name, used, load.capacity,
                                        provisioned, draining, retiring))
        seen = {figure.name for figure in figures}
        for name in self.board.in_state(HostState.DRAINING):
            if name in seen:
                continue
            if self.directory.get(name) is None:
                # Its link is gone, and with it its sessions (moved elsewhere).
                figures.append(TowerFigures(name, 0, 0, True, True, True))
            else:
                # Linked but stale: still retiring (no second scale-in meanwhile), and
                # not known to be empty.
                load = placement.load_of(name)
                used = max(1, load.taken if load else 0)
                figures.append(TowerFigures(name, used, 0, True, True, True))
        # A tower not reporting is coming for a while (the broker restarts a local agent
        # itself; a provisioned one is relinked or provisioned again), not missing: no
        # host is provisioned for a moment's gap. Unseen past the grace, it is missing:
        # the floor replaces it, and it no longer holds back a scale-out (a tower whose
        # link keeps coming back without a load report taken would hold it for good).
        expected = [*self.settings.local_tower_names, *self.board.in_state(HostState.READY)]
        # Made anew each time: a host back to ready after a while elsewhere (free, then
        # provisioned again) is looked for from now, not from when it was last seen.
        self.seen_at = {
            name: now if name in seen else self.seen_at.get(name, now) for name in expected
        }
        coming_back = [
            name for name in expected
            if name not in seen and now - self.seen_at[name] < TOWER_GRACE
        ]
        on_the_way = self.board.in_state(HostState.PROVISIONING) + coming_back
        return ScaleView(
            now, tuple(figures), tuple(self.board.in_state(HostState.FREE)), len(on_the_way)
        )

    async def _apply(self) -> None:
        # The tick and an operator's ``scale`` take turns: one view, one set of decisions.
        async with self.applying:
            for decision in self.policy.decide(self.view()):
                await self._carry_out(decision)

    async def _carry_out(self, decision: Decision) -> None:
        self.board.event(f"scale: {decision.action} {decision.host} ({decision.why})")
        if decision.action == "drain":
            try:
                self.directory.drain(decision.host)
            except LookupError as error:
                self.board.event(f"scale: drain {decision.host} refused: {error}")
                return
            self.board.set(decision.host, HostState.DRAINING)
            return
        request = Provision if decision.action == "provision" else Decommission
        try:
            answer = await self.provisioning.ask(request(decision.host))
        except ActorError as error:
            answer = Answer(False, str(error))
        if not answer.ok:
            self.board.event(f"scale: {decision.action} {decision.host} refused: {answer.text}")
