"""The load test's arithmetic and report, from figures made up here; its coordinator
with stand-in workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from broker.loadtest import run as run_module
from broker.loadtest.run import (
    BrokerMetrics,
    CpuShares,
    LoadPlan,
    Run,
    Sampler,
    Second,
    _listener,
    local_towers,
    parse_metrics,
    percentile,
    print_report,
)
from broker.client_peer import VideoReceived
from broker.loadtest.traffic import Tally


def test_percentiles_are_nearest_rank_in_milliseconds():
    values = [index / 1000 for index in range(1, 101)]  # 1..100 ms
    assert percentile(values, 50) == pytest.approx(50)
    assert percentile(values, 99) == pytest.approx(99)
    assert percentile(values, 100) == pytest.approx(100)
    assert percentile([0.004], 99) == pytest.approx(4)
    assert percentile([], 50) is None


def test_the_plan_ramps_then_holds():
    plan = LoadPlan("https://b", "k", "c", sessions=100, rate=20, duration=30)
    assert plan.ramp == 5 and plan.end == 35


def test_a_tally_hands_over_what_it_counted_once():
    tally = Tally()
    tally.sent, tally.echoed, tally.bytes_echoed = 3, 2, 200
    tally.round_trips.append((100.0, 0.001))
    tally.add_video(VideoReceived(frames=10, packets=12, bytes=9_000, jitter=0.001),
                    VideoReceived(frames=40, packets=50, packets_lost=1, bytes=40_000,
                                  jitter=0.002))
    assert tally.take() == {"sent": 3, "unsent": 0, "echoed": 2, "bytes": 200,
                            "timeouts": 0,
                            "rtt": [(100.0, 0.001)], "late": [], "video_frames": 30,
                            "video_packets": 38,
                            "video_packets_lost": 1, "video_bytes": 31_000,
                            "video_jitter": [0.002]}
    emptied = tally.take()
    assert emptied["sent"] == emptied["video_packets"] == 0 and emptied["video_jitter"] == []


def test_the_video_report_gives_loss_bitrate_per_session_and_jitter():
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=2, rate=2, duration=3,
                    application="demo")
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=1, video_bytes=10_000, video_jitter=[0.050]),
        Second(at=1, up=2),  # the last setups: not yet steady
        Second(at=2, up=2, video_frames=60, video_bytes=100_000, video_jitter=[0.001, 0.003]),
        Second(at=3, up=2, video_frames=60, video_bytes=150_000, video_jitter=[0.002]),
        Second(at=4, up=0),
    ]
    run.totals.update({"video_frames": 130, "video_packets": 990, "video_packets_lost": 10,
                       "video_bytes": 260_000})
    report = run.report(6.0)
    video = report["video"]
    assert video["frames"] == 130 and video["frames_per_second_steady"] == 60
    assert video["packets"] == 990 and video["packets_lost"] == 10
    assert video["loss_percent"] == 1.0  # 10 of the 1,000 sent
    # 100 and 150 kB over two sessions: 400 and 600 kbit/s each.
    assert video["kbit_per_second_per_session_steady"] == 500
    assert video["jitter_ms"] == {"p50": 2.0, "p99": 50.0}
    assert [second["video_kbit_per_session"] for second in report["series"]] == [
        80.0, 0.0, 400.0, 600.0, None]


def test_a_run_without_video_reports_no_loss_rather_than_zero():
    run = Run(LoadPlan("https://127.0.0.1:9", "secret", "c"), show_progress=False)
    run.seconds = [Second(at=0, up=1)]
    video = run.report(1.0)["video"]
    assert video["packets"] == 0 and video["loss_percent"] is None
    assert video["kbit_per_second_per_session_steady"] is None
    assert video["jitter_ms"] == {"p50": None, "p99": None}


def test_a_media_run_that_received_no_video_prints_its_report(capsys):
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", application="demo")
    run = Run(plan, show_progress=False)
    run.seconds = [Second(at=0, up=1)]
    print_report(run.report(1.0))
    assert "0 RTP packets, 0 lost (-); - kbit/s per session" in capsys.readouterr().out


def test_the_report_counts_outcomes_and_uses_the_seconds_with_all_up(monkeypatch):
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=4, rate=4, duration=3)
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=0, rtt=[0.100]),   # the ramp: slow, not counted as steady
        Second(at=1, up=4),  # the last setups: not yet steady
        Second(at=2, up=4, rtt=[0.001, 0.002], echoed=4, bytes=400, towers_cpu=0.5),
        Second(at=3, up=4, rtt=[0.003], echoed=4, bytes=400, towers_cpu=0.5),
        Second(at=5, up=0),
    ]
    run.setups = [0.05, 0.06, 0.07, 0.5]
    run.repairs = [0.3, 0.4]
    run.totals.update({"requested": 5, "connected": 4, "sent": 9, "echoed": 8,
                       "sessions_repaired": 1})
    run.failed.update({"setup timeout": 1})
    report = run.report(9.0)
    assert report["plan"]["api_key"] == "(hidden)"
    assert report["sessions"]["failed_by_reason"] == {"setup timeout": 1}
    assert report["sessions"]["peak_up"] == 4
    assert report["round_trip_steady_ms"] == {"p50": 2.0, "p99": 3.0}
    assert report["round_trip_ms"]["p99"] == 100.0
    assert report["messages"]["echoed_per_second_steady"] == 4
    assert report["repairs"] == {"count": 2, "sessions": 1, "p50": 300.0, "max": 400.0}
    assert report["cpu_share_of_a_core_steady"]["towers"] == 0.5
    assert [second["rtt_p50_ms"] for second in report["series"]] == [
        100.0, None, 1.0, 3.0, None]


def test_seconds_before_the_last_late_setup_are_not_steady():
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=4, rate=4, duration=4)
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=0),
        Second(at=2, up=3, rtt=[0.500], towers_cpu=1.0),  # one setup still under way
        Second(at=3, up=4, rtt=[0.002], towers_cpu=0.5),
        Second(at=4, up=4, rtt=[0.002], towers_cpu=0.5),
    ]
    report = run.report(5.0)
    assert report["round_trip_steady_ms"] == {"p50": 2.0, "p99": 2.0}
    assert report["cpu_share_of_a_core_steady"]["towers"] == 0.5


def test_a_second_held_up_counts_its_echoes_over_the_time_it_covered():
    # The coordinator waited 1.6 s on a slow metrics page: that "second" has 1.6 s of the
    # workers' echoes, which are not 1.6 times the rate.
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=4, rate=4, duration=4)
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=0),
        Second(at=1, up=4),
        Second(at=2, up=4, echoed=200, bytes=20_000, generator_cpu=1.0),
        Second(at=3, seconds=1.6, up=4, echoed=320, bytes=32_000, generator_cpu=1.0),
        Second(at=4, seconds=0.4, up=4, echoed=80, bytes=8_000, generator_cpu=0.25),
    ]
    report = run.report(5.0)
    assert report["messages"]["echoed_per_second_steady"] == 200
    assert report["messages"]["bytes_per_second_steady"] == 20_000
    assert report["steady_seconds"] == 3.0
    # Shares of a core too, each second weighed by the time it covered.
    assert report["cpu_share_of_a_core_steady"]["generator"] == 0.9


def test_a_run_never_all_up_says_so_rather_than_averaging_the_ramp(capsys):
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=4, rate=4, duration=1)
    run = Run(plan, show_progress=False)
    run.seconds = [Second(at=0, up=1, echoed=1), Second(at=1, up=3, echoed=3)]
    report = run.report(2.0)
    assert report["steady_seconds"] == 0
    assert report["messages"]["echoed_per_second_steady"] == 0
    print_report(report)
    assert "no second had every session up" in capsys.readouterr().out


def test_cpu_shares_are_what_a_counter_moved_over_the_time_between_readings():
    shares = CpuShares()
    assert shares.share("tower", 10.0, now=100.0) is None  # nothing to compare yet
    assert shares.share("tower", 10.5, now=101.0) == pytest.approx(0.5)
    # A tower reports once a second: one reading may see two reports, the next none;
    # their mean is the tower's.
    assert shares.share("tower", 11.5, now=102.0) == pytest.approx(1.0)
    assert shares.share("tower", 11.5, now=103.0) == 0.0
    assert shares.share("tower", 12.0, now=104.0) == pytest.approx(0.5)
    # A counter that went back is a new process: what it used since it started.
    assert shares.share("tower", 0.4, now=105.0) == pytest.approx(0.4)
    assert shares.share("other", 3.0, now=105.0) is None


def test_a_metrics_page_is_read_sample_by_sample_and_what_is_not_one_is_skipped():
    page = "\n".join([
        "# HELP process_cpu_seconds_total CPU time the broker process has used.",
        "# TYPE process_cpu_seconds_total counter",
        "process_cpu_seconds_total 12.5",
        'broker_tower_cpu_seconds_total{tower="tower-1"} 3.25',
        "garbage",
        "broker_actors lots",
        "process_resident_memory_bytes NaN",
        'broker_tower_cpu_seconds_total{tower="tower-2"} +Inf',
        "",
    ])
    assert parse_metrics(page) == {
        "process_cpu_seconds_total": 12.5,
        'broker_tower_cpu_seconds_total{tower="tower-1"}': 3.25,
    }
    assert parse_metrics("") == {}


def test_a_broker_that_cannot_be_read_gives_no_figures_not_an_error():
    metrics = BrokerMetrics("https://127.0.0.1:9", "")
    assert metrics.sample() is None


def test_seconds_whose_servers_could_not_be_read_are_left_out_of_the_means():
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=2, rate=2, duration=4)
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=1),
        Second(at=1, up=2),
        Second(at=2, up=2, towers_cpu=0.5, towers_rss=100 * 2**20),
        Second(at=3, up=2, broker_cpu=None, towers_cpu=None, broker_rss=None,
               towers_rss=None),
        Second(at=4, up=2, towers_cpu=0.7, towers_rss=120 * 2**20),
    ]
    report = run.report(6.0)
    assert report["cpu_share_of_a_core_steady"]["towers"] == 0.6
    assert report["rss_mib_peak"]["towers"] == 120.0
    # None read at all: not known, rather than none used.
    assert report["cpu_share_of_a_core_steady"]["broker"] is None
    run.seconds = [Second(at=at, up=2, broker_cpu=None, towers_cpu=None, broker_rss=None,
                          towers_rss=None) for at in range(5)]
    report = run.report(6.0)
    assert report["cpu_share_of_a_core_steady"]["towers"] is None
    assert report["rss_mib_peak"] == {"broker": None, "towers": None}


def test_the_second_that_first_sees_every_session_up_is_not_steady():
    # Its "up" is counted as it closes: the last setups ran inside it.
    plan = LoadPlan("https://127.0.0.1:9", "secret", "c", sessions=4, rate=8, duration=5)
    run = Run(plan, show_progress=False)
    run.seconds = [
        Second(at=0, up=1),
        Second(at=1, up=3),
        Second(at=2, up=4, rtt=[0.500]),
        Second(at=3, up=4, rtt=[0.002]),
        Second(at=4, up=4, rtt=[0.002]),
    ]
    assert run.report(6.0)["round_trip_steady_ms"] == {"p50": 2.0, "p99": 2.0}


FAKE_WORKER = """
import json, os, sys, time
mode = sys.argv[1]
sys.stdin.readline()
if mode == "dies at once":
    os._exit(1)
def report(second, final=False, requested=5):
    print(json.dumps({
        "final": final, "elapsed": second, "requested": requested, "connected": requested,
        "up": 0 if final else requested, "failed": {}, "lost": {},
        "setup": [0.01] * 5 if second == 0 else [], "repairs": [], "cpu": 0.01 * second,
        "sent": 5, "unsent": 0, "echoed": 5, "bytes": 500, "timeouts": 0,
        "rtt": [[time.monotonic() - 0.01, 0.001]] * 5, "late": [0.001] * 5,
        "video_frames": 0, "video_packets": 0, "video_packets_lost": 0, "video_bytes": 0,
        "video_jitter": []}), flush=True)
for second in range(4):
    if second == 1 and mode == "dies":
        os._exit(1)
    if second == 1 and mode == "crashes":  # its last words, then a traceback
        report(second, final=True, requested=2)
        sys.exit(1)
    if second == 1 and mode == "hangs":
        time.sleep(600)
    report(second)
    time.sleep(1)
report(4, final=True)
"""


def stand_in_workers(tmp_path, monkeypatch, *modes: str) -> None:
    """Runs start ``FAKE_WORKER``s in these modes (5 sessions each), in process groups
    of their own as the real ones; ``run.started_workers`` are their processes."""
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)

    def start_workers(self):
        workers = []
        for number, mode in enumerate(modes):
            worker = subprocess.Popen([sys.executable, str(script), mode],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, process_group=0)
            worker.stdin.write("{}\n")
            worker.stdin.flush()
            workers.append(worker)
            self.planned[number] = 5
        self.started_workers = workers
        return workers

    monkeypatch.setattr(Run, "_start_workers", start_workers)


def test_a_worker_that_dies_or_hangs_is_reported_and_its_sessions_are_lost(
        tmp_path, monkeypatch, capsys):
    stand_in_workers(tmp_path, monkeypatch, "runs", "dies", "hangs", "dies at once", "crashes")
    monkeypatch.setattr(run_module, "WORKER_SILENCE", 2.0)
    plan = LoadPlan("http://127.0.0.1:9", "secret", "c", sessions=25, rate=25,
                    duration=3, workers=5, floor=True)
    run = Run(plan, show_progress=False)
    report = run.execute()
    assert report["workers"]["failed"] == {"1": "ended without its final report",
                                           "2": "said nothing for 2 s",
                                           "3": "ended without its final report",
                                           "4": "exited with status 1"}
    # Those up count as lost; those a worker had not set up yet (all of the one that
    # died at once, 3 of the one that crashed), as failed: every session planned is
    # accounted for.
    sessions = report["sessions"]
    assert sessions["lost_by_state"] == {"with its worker": 10}
    assert sessions["failed_by_reason"] == {"with its worker": 8}
    assert sessions["requested"] == 25 and sessions["connected"] == 17
    assert report["series"][-1]["up"] == 0
    assert all(worker.returncode is not None for worker in run.started_workers)
    print_report(report)
    assert "4 of 5 failed (their sessions count as failed or lost" in capsys.readouterr().out


def test_a_second_ctrl_c_kills_the_workers_rather_than_waiting_for_them(
        tmp_path, monkeypatch):
    stand_in_workers(tmp_path, monkeypatch, "hangs", "hangs")

    def until(condition) -> None:
        while not condition():
            time.sleep(0.05)

    def press_ctrl_c_twice() -> None:
        until(lambda: len(getattr(run, "latest", {})) == 2)  # both reported, then hang
        os.kill(os.getpid(), signal.SIGINT)
        until(lambda: run.interrupted_at is not None)  # the first one taken
        os.kill(os.getpid(), signal.SIGINT)

    plan = LoadPlan("http://127.0.0.1:9", "secret", "c", sessions=10, rate=10,
                    duration=600, workers=2, floor=True)
    run = Run(plan, show_progress=False)
    presser = threading.Thread(target=press_ctrl_c_twice)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run.execute()  # the first waits for the workers (30 s); the second does not
    finally:
        presser.join()
    # Killed, not left to hang (they would sleep for 10 minutes).
    assert [worker.wait(timeout=10) for worker in run.started_workers] == [-9, -9]


def test_a_worker_that_does_not_stop_is_killed_and_said_so(tmp_path, monkeypatch):
    stand_in_workers(tmp_path, monkeypatch, "hangs")
    for name, seconds in (("WIND_DOWN", 1.0), ("STOP_GRACE", 0.5), ("WORKER_EXIT", 0.5)):
        monkeypatch.setattr(run_module, name, seconds)
    plan = LoadPlan("http://127.0.0.1:9", "secret", "c", sessions=5, rate=5,
                    duration=1, workers=1, floor=True)
    run = Run(plan, show_progress=False)
    report = run.execute()
    # (Reading its pipe's end once killed, the coordinator used to call it "ended
    # without its final report".)
    assert report["workers"]["failed"] == {"0": "killed: it did not stop"}


class SlowServers:
    def sample(self):
        time.sleep(5)
        return (0.1, 0.2, 3, 4)


def test_a_slow_metrics_page_never_holds_up_the_run():
    sampler = Sampler(SlowServers())
    started = time.monotonic()
    assert sampler.take() is None  # nothing read yet: no figures, and no wait
    sampler.stop()
    assert time.monotonic() - started < 3


def test_only_a_url_on_this_machine_names_a_local_process():
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        assert _listener(f"https://127.0.0.1:{port}").pid == os.getpid()
        # A remote broker on the same port number is not a process here to kill.
        assert _listener(f"https://192.0.2.7:{port}") is None
        assert local_towers(f"https://192.0.2.7:{port}") == []


def test_the_largest_message_asked_for_is_the_largest_a_tower_takes():
    from broker.tower.application import MAX_MESSAGE_SIZE

    assert run_module.MAX_MESSAGE_SIZE == MAX_MESSAGE_SIZE


def test_chaos_kills_a_tower_and_says_how_many_sessions_it_had(monkeypatch, capsys):
    # The repairs and losses were whole-run counts, with nothing to check them against.
    tower = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(run_module, "local_towers", lambda url: [
            (psutil.Process(tower.pid), ["broker", "tower", "--name", "tower-1"])])
        monkeypatch.setattr(BrokerMetrics, "_page", lambda self: "\n".join([
            'broker_tower_sessions{tower="tower-1"} 7',
            'broker_tower_sessions{tower="tower-2"} 6']))
        plan = LoadPlan("https://127.0.0.1:9", "secret", "", sessions=4, rate=4,
                        duration=3, kill_tower_at=2.0)
        run = Run(plan, show_progress=False)
        run._chaos_if_due(1.0)
        assert run.chaos is None
        run._chaos_if_due(2.04)
        assert tower.wait(10) == -signal.SIGKILL
        assert run.chaos == {"at": 2.0, "killed": "tower-1", "pid": tower.pid,
                             "sessions_on_it": 7}
        run.seconds = [Second(at=0, up=4)]
        run.repairs, run.totals["sessions_repaired"] = [0.5, 0.7, 0.9], 2
        print_report(run.report(5.0))
        out = capsys.readouterr().out
        assert "repairs      3 of 2 session(s)  p50 700.0 ms  max 900.0 ms" in out
        assert "chaos        tower-1 killed at 2 s, with 7 sessions on it" in out
    finally:
        tower.kill()
        tower.wait()


def test_a_round_trip_counts_in_the_second_its_message_was_sent():
    # A timeout is known 5 s after its message went out: it was filed under the second
    # it was reported in, and those of the steady seconds' last 5 s fell out of them.
    run = Run(LoadPlan("https://127.0.0.1:9", "secret", "", sessions=4, rate=4, duration=9),
              show_progress=False)
    began = run.last_close = 1000.0
    run._next_second(began)
    for close in (1001.0, 1002.5, 1003.5, 1009.0):  # the second at 1 held up 1.5 s
        run.last_close = close
        run._next_second(began)
    figures = {"rtt": [[1000.2, 0.001], [1001.1, 5.0], [1002.49, 0.002], [1009.5, 0.003]],
               **{key: 0 for key in ("sent", "unsent", "echoed", "bytes", "timeouts",
                                     "video_frames", "video_packets", "video_packets_lost",
                                     "video_bytes")},
               "setup": [], "repairs": [], "video_jitter": [], "late": [], "cpu": 0.0}
    run._take(0, figures, run.current)
    assert [(second.at, second.rtt) for second in run.timeline] == [
        (0, [0.001]), (1, [5.0, 0.002]), (2, []), (4, []), (9, [0.003])]
    assert run.heard_rtt == [0.001, 5.0, 0.002, 0.003]


def test_a_page_without_tower_figures_leaves_their_memory_unknown(monkeypatch):
    # It read as 0 bytes, and the benchmark's memory per session as 0 KiB.
    monkeypatch.setattr(BrokerMetrics, "_page", lambda self: "\n".join([
        "process_cpu_seconds_total 12.5", "process_resident_memory_bytes 1048576"]))
    _, towers_cpu, broker_rss, towers_rss = BrokerMetrics("https://127.0.0.1:9", "").sample()
    assert (towers_cpu, broker_rss, towers_rss) == (None, 1048576, None)


def test_a_run_whose_workers_cannot_all_start_leaves_nothing_running(monkeypatch):
    # The sampler's thread and the workers started before the failure ran on.
    started = []
    popen = subprocess.Popen

    def recorded(*arguments, **options):
        started.append(popen(*arguments, **options))
        return started[-1]

    monkeypatch.setattr(run_module.subprocess, "Popen", recorded)
    plan = LoadPlan("http://127.0.0.1:9", "secret", "", sessions=4, workers=2, floor=True,
                    generator_cpus=(os.cpu_count() + 64,))  # no such CPU
    run = Run(plan, show_progress=False)
    with pytest.raises(ValueError):
        run.execute()
    assert len(started) == 1 and started[0].returncode is not None
    assert not run.sampler.thread.is_alive()


@pytest.mark.parametrize(("busiest", "late", "behind"), [
    (0.5, 0.002, False), (0.95, 0.002, True), (0.5, 0.2, True)])
def test_the_report_says_when_the_load_generator_was_the_limit(busiest, late, behind, capsys):
    run = Run(LoadPlan("https://127.0.0.1:9", "secret", "", sessions=4, rate=4, duration=3),
              show_progress=False)
    run.seconds = [Second(at=at, up=4, busiest_worker_cpu=busiest, late=[0.001] * 9 + [late])
                   for at in range(6)]
    report = run.report(9.0)
    workers = report["workers"]
    assert workers["busiest_cpu_share_steady"] == busiest
    assert workers["send_late_ms_steady"] == {"p50": 1.0, "p99": late * 1000}
    assert workers["behind"] is behind
    print_report(report)
    assert ("the load generator was the limit" in capsys.readouterr().out) is behind
