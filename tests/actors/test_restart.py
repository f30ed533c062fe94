"""The supervision decisions, called directly: no tasks, no clock."""

import math

import pytest

from actors import Backoff, ChildSpec, ExitKind, Restart, Strategy, SupervisorFlags
from actors._restart import RestartWindow, restart_group, should_restart


@pytest.mark.parametrize(
    ("restart", "ended", "expected"),
    [
        (Restart.PERMANENT, ExitKind.NORMAL, True),
        (Restart.PERMANENT, ExitKind.SHUTDOWN, True),
        (Restart.PERMANENT, ExitKind.CRASHED, True),
        (Restart.PERMANENT, ExitKind.KILLED, True),
        (Restart.TRANSIENT, ExitKind.NORMAL, False),
        (Restart.TRANSIENT, ExitKind.SHUTDOWN, False),
        (Restart.TRANSIENT, ExitKind.CRASHED, True),
        (Restart.TRANSIENT, ExitKind.KILLED, True),
        (Restart.TEMPORARY, ExitKind.NORMAL, False),
        (Restart.TEMPORARY, ExitKind.CRASHED, False),
        (Restart.TEMPORARY, ExitKind.KILLED, False),
    ],
)
def test_should_restart_follows_otp(restart, ended, expected):
    assert should_restart(restart, ended) is expected


def test_restart_group_per_strategy():
    order = ("a", "b", "c", "d")
    assert restart_group(Strategy.ONE_FOR_ONE, order, "b") == ("b",)
    assert restart_group(Strategy.ONE_FOR_ALL, order, "b") == order
    assert restart_group(Strategy.REST_FOR_ONE, order, "b") == ("b", "c", "d")
    assert restart_group(Strategy.REST_FOR_ONE, order, "d") == ("d",)


def test_restart_window_allows_intensity_restarts_within_period():
    window = RestartWindow(intensity=2, period=5.0)
    assert window.allow(0.0)
    assert window.allow(1.0)
    assert not window.allow(2.0)


def test_restart_window_forgets_restarts_older_than_period():
    window = RestartWindow(intensity=1, period=5.0)
    assert window.allow(0.0)
    assert window.allow(5.0)
    assert not window.allow(9.0)
    assert window.allow(15.0)


def test_restart_window_intensity_zero_allows_nothing():
    assert not RestartWindow(intensity=0, period=5.0).allow(0.0)


def test_backoff_none_by_default():
    assert Backoff().delay(1, 0.5) == 0.0
    assert Backoff().delay(10, 0.9) == 0.0


def test_backoff_grows_exponentially_and_is_capped():
    backoff = Backoff(initial=0.1, maximum=2.0, multiplier=2.0, jitter=0.0)
    assert [backoff.delay(n, 0.0) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    )
    assert backoff.delay(10_000, 0.0) == 2.0


def test_backoff_jitter_stays_within_bounds_and_cap():
    backoff = Backoff(initial=1.0, maximum=3.0, multiplier=2.0, jitter=0.5)
    assert backoff.delay(1, 0.0) == 1.0
    assert backoff.delay(1, 0.999) == pytest.approx(1.4995)
    assert backoff.delay(2, 0.999) == pytest.approx(2.999)
    assert backoff.delay(3, 0.999) == 3.0


@pytest.mark.parametrize(
    "arguments",
    [
        {"initial": -1.0},
        {"initial": 5.0, "maximum": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"reset_after": -1.0},
    ],
)
def test_backoff_rejects_invalid_settings(arguments):
    with pytest.raises(ValueError):
        Backoff(**arguments)


def test_supervisor_flags_defaults_are_otp():
    flags = SupervisorFlags()
    assert flags.strategy is Strategy.ONE_FOR_ONE
    assert (flags.intensity, flags.period) == (1, 5.0)


@pytest.mark.parametrize(
    "arguments",
    [
        {"intensity": -1},
        {"intensity": 1.5},
        {"period": 0},
        {"period": math.inf},
        {"period": math.nan},
    ],
)
def test_supervisor_flags_reject_invalid_settings(arguments):
    with pytest.raises(ValueError):
        SupervisorFlags(**arguments)


def test_supervisor_flags_reject_wrong_types():
    with pytest.raises(TypeError):
        SupervisorFlags(strategy="one_for_one")
    with pytest.raises(TypeError):
        SupervisorFlags(backoff=1.0)


@pytest.mark.parametrize("name", ["", "a/b", "tab\there", "x" * 201, None, 3])
def test_child_spec_rejects_bad_names(name):
    with pytest.raises(ValueError):
        ChildSpec(name, object)


def test_child_spec_rejects_bad_fields():
    with pytest.raises(TypeError):
        ChildSpec("a", "not callable")
    with pytest.raises(TypeError):
        ChildSpec("a", object, restart="permanent")
    with pytest.raises(ValueError):
        ChildSpec("a", object, shutdown=-1)
