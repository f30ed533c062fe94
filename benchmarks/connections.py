"""Benchmark: the broker's memory as HTTPS connections come and go with no session.

How it is measured: the embedded broker (one tower) is started, then a client opens
HTTPS connections one after another, each asking ``GET /healthz``, in two ways side by
side: closed at once (each connection lives a few milliseconds), and kept alive 200 at
a time for over a second, past the broker's once-a-second freeze of what survives
(``broker/collector.py``), then closed. The broker's resident memory is read after a
warm-up and after each way; the figure is its growth per connection. A connection that
left cycles behind would show in the second way only, at about 21 KiB each: the
freeze keeps them until sessions close, and here none do.

Run from the project root::

    .venv/bin/python -m benchmarks.connections                 # 6,000 of each
    .venv/bin/python -m benchmarks.connections --connections 20000
    .venv/bin/python -m benchmarks.connections --quick --json
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from ._report import print_rows
from .loadtest import start_broker
from .sessions import stop_server

OPEN_AT_ONCE = 200
# Longer than the broker's freeze interval (1 s): kept-alive connections get frozen.
HELD = 1.2
# Longer than the broker's keep-alive (5 s): what the client left open is closed by then.
SETTLE = 6.0


def connect(address: tuple[str, int], context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(address, timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection = context.wrap_socket(raw, server_hostname=address[0])
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    if not connection.recv(4096).startswith(b"HTTP/1.1 200"):
        raise RuntimeError("the broker did not answer GET /healthz with 200")
    return connection


def come_and_go(address, context, connections: int, held: bool) -> None:
    """``connections`` connections, each closed at once or held past a freeze."""
    open_now: list[ssl.SSLSocket] = []
    for _ in range(connections):
        connection = connect(address, context)
        if not held:
            connection.close()
            continue
        open_now.append(connection)
        if len(open_now) == OPEN_AT_ONCE:
            time.sleep(HELD)
            for connection in open_now:
                connection.close()
            open_now.clear()
    for connection in open_now:
        connection.close()
    time.sleep(SETTLE)


def measure(connections: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="connections-") as directory:
        broker = start_broker(Path(directory), 1)
        try:
            announced = broker.announced
            url = urlsplit(announced["url"])
            address = (url.hostname, url.port)
            context = ssl.create_default_context(cafile=announced["certificate"])
            process = psutil.Process(broker.process.pid)

            def mib() -> float:
                return process.memory_info().rss / 2**20

            time.sleep(3)  # the tower links
            # Warm-up: the allocator's working set for connections held 200 at a time.
            come_and_go(address, context, min(connections, 1000), held=True)
            rss = {"warm": mib()}
            figures = {}
            for name, held in (("closed at once", False), ("held past a freeze", True)):
                before = mib()
                come_and_go(address, context, connections, held)
                rss[name] = mib()
                figures[name] = round((rss[name] - before) * 1024 / connections, 2)
        finally:
            stop_server(broker)
    return {"connections": connections, "rss_mib": {k: round(v, 1) for k, v in rss.items()},
            "kib_per_connection": figures}


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.connections",
        description="The broker's memory per HTTPS connection, with no session closing.",
    )
    parser.add_argument("--connections", type=int, default=6000, help="of each kind")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--quick", action="store_true", help="400 of each, for a smoke test")
    options = parser.parse_args(arguments)
    results = measure(400 if options.quick else options.connections)
    if options.json:
        print(json.dumps(results))
        return
    print(f"{results['connections']} HTTPS connections of each kind, no session; "
          f"the broker at {results['rss_mib']['warm']} MiB after a warm-up")
    print_rows(
        ["connections", "KiB per connection", "broker MiB after"],
        [[name, f"{kib:.2f}", f"{results['rss_mib'][name]:.1f}"]
         for name, kib in results["kib_per_connection"].items()],
    )


if __name__ == "__main__":
    main()
