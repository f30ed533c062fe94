"""A session that must not notice anything: ``python -m tests.e2e.steady_client URL KEY CERT``.

It opens one session, prints ``connected`` once it echoes, then echoes every 50 ms until
its stdin closes, and prints a JSON summary: echoes done, echoes that failed, the
negotiations it went through and every state it was told.
"""

from __future__ import annotations

import json
import sys

import trio

from actors import bridge
from broker.client import BrokerClient, open_session, trusting


async def main(url: str, api_key: str, certificate: str) -> None:
    context = trusting(certificate)
    client = BrokerClient(url, api_key, context)
    grant = await client.create_session()
    summary = {"id": grant.id, "echoes": 0, "failed_echoes": 0}
    async with open_session(grant, context) as session:
        await session.wait_state("connected")
        await session.echo("first")
        print("connected", grant.id, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_end_of_input, nursery.cancel_scope)
            while True:
                try:
                    await session.echo("steady", timeout=2)
                    summary["echoes"] += 1
                except trio.TooSlowError:
                    summary["failed_echoes"] += 1
                await trio.sleep(0.05)
        summary["negotiation"] = session.negotiation
        summary["states"] = [f["state"] for f in session.frames if f.get("type") == "state"]
    # As a page leaving does: its session ends now, not once its repairs run out.
    await client.delete_session(grant.id)
    print(json.dumps(summary), flush=True)


async def _until_end_of_input(scope: trio.CancelScope) -> None:
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
    scope.cancel()


if __name__ == "__main__":
    bridge.run(main, *sys.argv[1:4])
