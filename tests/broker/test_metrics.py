"""The metrics page: its families, and each tower's usage as the tower reported it."""

from __future__ import annotations

import psutil

from actors import open_system
from broker.lifecycle import SessionState
from broker.metrics import ProcessUsage, SessionCounters, TowerRow, process_usage, render


def samples(page: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in page.splitlines() if not line.startswith("#"))


async def test_towers_usage_and_the_brokers_own_are_on_the_page(autojump_clock):
    counters = SessionCounters()
    counters.session_started(SessionState.NEGOTIATING)
    towers = {
        "tower-1": TowerRow("ready", 3, ProcessUsage(12345.678901, 123_456_789), 0.125, 2, 1),
        "tower-2": TowerRow("stale", 0),  # nothing reported yet
    }
    async with open_system("broker") as system:
        page = render(counters, towers, system.statistics(), ProcessUsage(2.5, 64 * 2**20))
    found = samples(page)
    # Exact: CPU seconds and bytes keep every digit.
    assert found['broker_tower_cpu_seconds_total{tower="tower-1"}'] == "12345.678901"
    assert found['broker_tower_resident_memory_bytes{tower="tower-1"}'] == "123456789"
    assert not any('tower="tower-2"' in name for name in found if "_cpu_" in name or
                   "_memory_" in name)
    assert found['broker_tower_sessions{tower="tower-2"}'] == "0"
    assert found['broker_tower_capacity_used_ratio{tower="tower-1"}'] == "0.125"
    assert found['broker_tower_unanswered_offers{tower="tower-1"}'] == "2"
    assert found['broker_tower_waiting_offers{tower="tower-1"}'] == "1"
    assert found['broker_sessions_refused_total{reason="towers_busy"}'] == "0"
    assert found["process_cpu_seconds_total"] == "2.5"
    assert found["process_resident_memory_bytes"] == str(64 * 2**20)
    assert found["broker_sessions_created_total"] == "1"
    assert "# TYPE broker_tower_cpu_seconds_total counter" in page
    assert "# TYPE broker_tower_resident_memory_bytes gauge" in page


def test_a_process_usage_is_its_cpu_time_and_resident_memory():
    process = psutil.Process()
    usage = process_usage(process)
    times = process.cpu_times()
    assert 0 < usage.cpu_seconds <= times.user + times.system
    assert usage.resident_bytes > 2**20
