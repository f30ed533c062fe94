"""Operators at work, for ``benchmarks.shell``: N SSH sessions, each running ``top``.

``python -m benchmarks.shell_load PORT KEY COUNT`` opens COUNT connections to the
broker's shell with the key KEY, one after another (the shell takes 16 logging in at
once), runs ``top --interval 1`` in each and reads all it prints; prints ``ready`` once
every one has printed its first table, and stops when its standard input closes.
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh


async def operator(connection: asyncssh.SSHClientConnection, ready: asyncio.Event,
                   counter: list[int]) -> None:
    async with connection:
        process = await connection.create_process("top --interval 1")
        first = True
        while True:
            chunk = await process.stdout.read(65536)
            if not chunk:
                return
            if first:
                first = False
                counter[0] += 1
                if counter[0] == counter[1]:
                    ready.set()


async def main(port: int, key: str, count: int) -> None:
    ready = asyncio.Event()
    counter = [0, count]
    tasks = []
    for _ in range(count):
        connection = await asyncssh.connect(
            "127.0.0.1", port, username="operator", known_hosts=None, client_keys=[key])
        tasks.append(asyncio.create_task(operator(connection, ready, counter)))
    await ready.wait()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
