"""How a simulated browser's failure is named in the report."""

from __future__ import annotations

import trio

from broker.loadtest.worker import _reason


def test_a_failure_is_named_by_its_first_clause():
    assert _reason(RuntimeError("503 no_tower: no tower is ready")) == "503 no_tower"
    assert _reason(ConnectionResetError()) == "ConnectionResetError"
    assert _reason(trio.TooSlowError()) == "timeout"


def test_a_failure_inside_a_nursery_is_named_by_what_failed():
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [OSError("refused: port")])])
    assert _reason(nested) == "refused"
    assert _reason(ExceptionGroup("nursery", [trio.TooSlowError()])) == "timeout"
