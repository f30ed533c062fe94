"""The broker's metrics, in the Prometheus text format (version 0.0.4).

Counters are kept by the actors that see the events (``SessionCounters``); gauges are
read when scraped, from the towers' directory and the actor system's own counts, so
there is no second source of truth to drift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from actors import SystemStatistics

from .collector import Collector
from .lifecycle import FailureReason, SessionState


# How long, and how many, ended sessions are still shown.
ENDED_KEPT = 60.0
ENDED_MAX = 10_000


class SessionCounters:
    """What sessions count as they live: by state now, and totals.

    ``collector``, when given, is told of each session's start and end (it collects in
    full once enough sessions ended).
    """

    def __init__(self, collector: Collector | None = None) -> None:
        self.collector = collector
        self.by_state: Counter[SessionState] = Counter()
        self.created = 0
        self.negotiations = 0
        self.failed = 0
        self.failures: Counter[FailureReason] = Counter()
        # New sessions refused for want of a tower: no_tower, towers_busy.
        self.refused: Counter[str] = Counter()
        # Live sessions by API key: taken when a session is created, given back at its end.
        self.by_key: Counter[str] = Counter()
        # The last word of each session that ended, by id, oldest first: (when, API key,
        # its description), for ``GET /v1/sessions/{id}`` to show a while.
        self.ended: dict[str, tuple[float, str, dict[str, Any]]] = {}

    def remember_end(
        self, session_id: str, api_key: str, described: dict[str, Any], now: float
    ) -> None:
        self._forget_ended(now)
        self.ended[session_id] = (now, api_key, described)
        if len(self.ended) > ENDED_MAX:
            del self.ended[next(iter(self.ended))]

    def last_word(self, session_id: str, api_key: str, now: float) -> dict[str, Any] | None:
        """How ``api_key``'s session ended, if it did within ``ENDED_KEPT`` seconds."""
        self._forget_ended(now)
        entry = self.ended.get(session_id)
        return entry[2] if entry is not None and entry[1] == api_key else None

    def _forget_ended(self, now: float) -> None:
        while self.ended:
            oldest = next(iter(self.ended))
            if now - self.ended[oldest][0] < ENDED_KEPT:
                return
            del self.ended[oldest]

    def session_started(self, state: SessionState) -> None:
        self.created += 1
        self.by_state[state] += 1
        if self.collector is not None:
            self.collector.opened()

    def moved(self, old: SessionState, new: SessionState) -> None:
        if old is not new:
            self.by_state[old] -= 1
            self.by_state[new] += 1

    def session_ended(self, state: SessionState) -> None:
        self.by_state[state] -= 1
        if self.collector is not None:
            self.collector.closed_one()

    def negotiation_started(self) -> None:
        self.negotiations += 1

    def negotiation_failed(self, reason: FailureReason) -> None:
        self.failures[reason] += 1

    def session_failed(self) -> None:
        self.failed += 1

    def live(self) -> int:
        return sum(count for state, count in self.by_state.items() if not state.ended)


@dataclass(frozen=True)
class ProcessUsage:
    """What a process costs: the CPU seconds it has used so far, its resident bytes now."""

    cpu_seconds: float
    resident_bytes: int


def process_usage(process: psutil.Process) -> ProcessUsage:
    """``process``'s usage now (raises ``psutil.Error`` when it is gone)."""
    with process.oneshot():
        times = process.cpu_times()
        return ProcessUsage(times.user + times.system, process.memory_info().rss)


@dataclass(frozen=True)
class TowerRow:
    """A linked tower on the metrics page: its state (``ready``, ``draining``,
    ``stale``), its sessions, its agent process's usage as it last reported it (None
    before its first report, or from a tower that does not report it), and the share of
    its capacity its sessions take (a session with video counting as several)."""

    state: str
    sessions: int
    usage: ProcessUsage | None = None
    capacity_used: float = 0.0
    # Offers of this broker's sessions it has not answered yet, and of those, how many
    # wait their turn to be sent (``TowerConnection.offer_turn``).
    unanswered_offers: int = 0
    waiting_offers: int = 0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float | int]]
) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        # Exact: a counter of CPU seconds or a gauge of bytes must not lose digits.
        lines.append(f"{name}{labels} {value!r}")
    return "\n".join(lines)


def render(
    counters: SessionCounters,
    towers: dict[str, TowerRow],
    actors: SystemStatistics,
    process: ProcessUsage,
) -> str:
    """The metrics page.

    Args:
        counters: the sessions' counters.
        towers: each linked tower, by name.
        actors: the actor system's counts.
        process: the broker process's own usage.
    """
    tower_states = Counter(row.state for row in towers.values())
    reported = [(f'{{tower="{_escape(name)}"}}', row.usage)
                for name, row in sorted(towers.items()) if row.usage is not None]
    families = [
        _family(
            "broker_sessions", "gauge", "Live sessions by state.",
            ((f'{{state="{state.value}"}}', counters.by_state[state]) for state in SessionState
             if not state.ended),
        ),
        _family("broker_sessions_created_total", "counter", "Sessions created.",
                [("", counters.created)]),
        _family("broker_sessions_failed_total", "counter", "Sessions that failed for good.",
                [("", counters.failed)]),
        _family(
            "broker_sessions_refused_total", "counter",
            "New sessions refused for want of a tower, by reason.",
            ((f'{{reason="{reason}"}}', counters.refused[reason])
             for reason in ("no_tower", "towers_busy")),
        ),
        _family("broker_negotiations_total", "counter", "Negotiations started.",
                [("", counters.negotiations)]),
        _family(
            "broker_negotiation_failures_total", "counter", "Negotiations that failed, by reason.",
            ((f'{{reason="{reason.value}"}}', counters.failures[reason])
             for reason in FailureReason),
        ),
        _family(
            "broker_towers", "gauge", "Linked towers by state.",
            ((f'{{state="{state}"}}', tower_states[state])
             for state in ("ready", "draining", "stale")),
        ),
        _family(
            "broker_tower_sessions", "gauge", "Sessions each tower reported.",
            ((f'{{tower="{_escape(name)}"}}', row.sessions)
             for name, row in sorted(towers.items())),
        ),
        _family(
            "broker_tower_capacity_used_ratio", "gauge",
            "The share of each tower's capacity its sessions take (a session with video "
            "counts as video_weight sessions).",
            ((f'{{tower="{_escape(name)}"}}', row.capacity_used)
             for name, row in sorted(towers.items())),
        ),
        _family(
            "broker_tower_unanswered_offers", "gauge",
            "Offers each tower has not answered yet.",
            ((f'{{tower="{_escape(name)}"}}', row.unanswered_offers)
             for name, row in sorted(towers.items())),
        ),
        _family(
            "broker_tower_waiting_offers", "gauge",
            "Offers waiting their turn to be sent to each tower.",
            ((f'{{tower="{_escape(name)}"}}', row.waiting_offers)
             for name, row in sorted(towers.items())),
        ),
        _family(
            "broker_tower_cpu_seconds_total", "counter",
            "CPU time each tower's agent process has used, as it last reported.",
            ((labels, usage.cpu_seconds) for labels, usage in reported),
        ),
        _family(
            "broker_tower_resident_memory_bytes", "gauge",
            "Resident memory of each tower's agent process, as it last reported.",
            ((labels, usage.resident_bytes) for labels, usage in reported),
        ),
        _family("broker_actor_restarts_total", "counter",
                "Actor restarts since the broker started.",
                [("", actors.restarts)]),
        _family("broker_actors", "gauge", "Actors alive.", [("", actors.actors)]),
        _family("broker_mailbox_depth_max", "gauge", "The deepest mailbox.",
                [("", actors.mailbox_depth_max)]),
        _family("broker_mailbox_depth_total", "gauge", "Messages waiting in all mailboxes.",
                [("", actors.mailbox_depth_total)]),
        _family("process_cpu_seconds_total", "counter",
                "CPU time the broker process has used.", [("", process.cpu_seconds)]),
        _family("process_resident_memory_bytes", "gauge",
                "Resident memory of the broker process.", [("", process.resident_bytes)]),
    ]
    return "\n".join(families) + "\n"
