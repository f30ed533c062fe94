"""A bare aiortc echo server with no broker: the floor of ``benchmarks.sessions``.

A plain asyncio program, run in a process of its own (as a tower agent is)::

    .venv/bin/python -m benchmarks.echo_floor [--port 0]

Once it listens it prints one JSON line, ``{"url": "http://127.0.0.1:<port>"}``, and
serves plain HTTP/1.1 (no TLS, no WebSocket, no actors) until SIGINT or SIGTERM:

- ``POST /peers`` with ``{"sdp": <offer>}`` answers the offer with a new
  ``RTCPeerConnection(RTCConfiguration(iceServers=[]))`` whose data channels send back
  every message they receive; ``201`` with ``{"id": ..., "sdp": <answer>}``, the answer
  carrying all of the server's candidates.
- ``DELETE /peers/{id}`` closes that peer connection; ``204``.

It lives apart from ``benchmarks.sessions`` because that module is trio code, and only
``actors.bridge`` may touch both asyncio and trio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal

import h11
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

MAX_BODY = 64 * 1024


class EchoFloor:
    """The server's peer connections, by id."""

    def __init__(self) -> None:
        self.peers: dict[str, RTCPeerConnection] = {}
        self._numbers = itertools.count(1)

    async def answer(self, offer_sdp: str) -> tuple[str, str]:
        """A new echoing peer connection for ``offer_sdp``; returns its id and answer."""
        connection = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        connection.on("datachannel", _echo_on)
        peer_id = f"p{next(self._numbers)}"
        self.peers[peer_id] = connection
        try:
            await connection.setRemoteDescription(
                RTCSessionDescription(sdp=offer_sdp, type="offer")
            )
            await connection.setLocalDescription(await connection.createAnswer())
        except BaseException:
            del self.peers[peer_id]
            await connection.close()
            raise
        return peer_id, connection.localDescription.sdp

    async def close(self, peer_id: str) -> bool:
        connection = self.peers.pop(peer_id, None)
        if connection is None:
            return False
        await connection.close()
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(peer_id) for peer_id in list(self.peers)))

    async def respond(self, method: str, target: str, body: bytes) -> tuple[int, object]:
        if target == "/peers" and method == "POST":
            try:
                offer_sdp = json.loads(body)["sdp"]
                peer_id, answer_sdp = await self.answer(offer_sdp)
            except (ValueError, KeyError, TypeError) as error:
                return 400, {"error": str(error)}
            return 201, {"id": peer_id, "sdp": answer_sdp}
        if target.startswith("/peers/") and method == "DELETE":
            if await self.close(target.removeprefix("/peers/")):
                return 204, None
            return 404, {"error": "no such peer"}
        return 404, {"error": "no such URL"}

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        return
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    status, payload = await self.respond(
                        request.method.decode(), request.target.decode(), body
                    )
                    data = b"" if payload is None else json.dumps(payload).encode()
                    headers = [("content-length", str(len(data)))]
                    if data:
                        headers.append(("content-type", "application/json"))
                    writer.write(connection.send(h11.Response(status_code=status, headers=headers)))
                    writer.write(connection.send(h11.Data(data=data)))
                    writer.write(connection.send(h11.EndOfMessage()))
                    await writer.drain()
                    if connection.our_state is not h11.DONE:
                        return
                    connection.start_next_cycle()
                else:
                    return
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()


def _echo_on(channel: RTCDataChannel) -> None:
    def echo(message: str | bytes) -> None:
        if channel.readyState == "open":
            channel.send(message)

    channel.on("message", echo)


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; prints the JSON ready line once listening."""
    floor = EchoFloor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    server = await asyncio.start_server(floor.serve_connection, host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(json.dumps({"url": f"http://{bound_host}:{bound_port}"}), flush=True)
    async with server:
        await stop.wait()
    await floor.close_all()


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.echo_floor",
        description="A bare aiortc echo server over plain HTTP, for benchmarks.sessions.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    options = parser.parse_args(arguments)
    asyncio.run(serve(options.host, options.port))


if __name__ == "__main__":
    main()
