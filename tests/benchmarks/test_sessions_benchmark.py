"""The session benchmark runs end to end and reports every figure (no timing is asserted
here: these machines are shared and noisy)."""

from . import quick_run


def test_quick_run_prints_one_json_object_with_every_figure():
    figures = quick_run("sessions")
    assert [level["concurrency"] for level in figures["levels"]] == [1, 10]
    for level in figures["levels"]:
        for path in ("broker", "floor"):
            measured = level[path]
            assert measured["samples"] == level["concurrency"] * level["rounds"], path
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                assert measured[key] > 0, (level["concurrency"], path, key)
            assert measured["p50_ms"] <= measured["p95_ms"] <= measured["p99_ms"]
        for phase in ("to_answer", "after_answer"):
            for path in ("broker", "floor"):
                assert level[phase][path]["samples"] == level[path]["samples"], (phase, path)
                assert 0 < level[phase][path]["p50_ms"] < level[path]["p99_ms"], (phase, path)
        for key in ("ratio_p50", "ratio_p95", "ratio_p99"):
            assert level[key] > 0, (level["concurrency"], key)
        assert isinstance(level["target_met"], bool)
    assert figures["cpu_ms_per_session"]["broker"] > 0
    assert figures["cpu_ms_per_session"]["floor"] > 0
    assert figures["stopped_cleanly"] == {"broker": True, "floor": True}
