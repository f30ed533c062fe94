"""The Python client's own decisions, without a broker: how it waits out a busy one."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.client import BUSY_ATTEMPTS, BUSY_WAIT_MAX, ApiError, BrokerClient


@pytest.mark.parametrize("retry_after, longest", [
    (None, 1.5),            # no Retry-After: a second, drawn up to half as long again
    (2, 3.0),
    (10**9, BUSY_WAIT_MAX * 1.5),  # a broker's absurd wish is capped, not waited out
])
def test_a_busy_broker_is_asked_again_after_its_retry_after_up_to_a_cap(
        retry_after, longest, monkeypatch):
    client = BrokerClient("https://127.0.0.1:9", "key", ssl_context=None)
    asked: list[float] = []

    async def busy(method, path, body=None):
        asked.append(trio.current_time())
        raise ApiError(503, "towers_busy", "busy", retry_after)

    monkeypatch.setattr(client, "_call", busy)

    async def main() -> None:
        with pytest.raises(ApiError):
            await client.create_session()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(asked) == BUSY_ATTEMPTS
    waits = [later - earlier for earlier, later in zip(asked, asked[1:])]
    floor = 1 if retry_after is None else min(retry_after, BUSY_WAIT_MAX)
    assert all(floor <= wait <= longest for wait in waits), waits
