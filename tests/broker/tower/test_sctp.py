"""The tower's SACKs in the packet of its reply, against a real aiortc client."""

from __future__ import annotations

from types import SimpleNamespace

from aiortc.rtcsctptransport import DataChunk, SackChunk, parse_packet

from broker.tower.sctp import packet

from .test_application import run, session

# Long enough that no ping joins the packets a test counts.
QUIET = {"heartbeat_interval": 30.0, "heartbeat_timeout": 60.0}


def _record_datagrams(peer) -> list[list[str]]:
    """The chunk types of each SCTP packet the tower's peer sends from now on."""
    dtls = peer._connection.sctp.transport
    send, sent = dtls._send_data, []

    async def recording(data: bytes) -> None:
        sent.append([type(chunk).__name__ for chunk in parse_packet(data)[3]])
        await send(data)

    dtls._send_data = recording
    return sent


def test_an_echo_is_one_datagram_with_the_sack_first():
    async def scenario():
        async with session(**QUIET) as (client, peer, _):
            sent = _record_datagrams(peer)
            for count in range(1, 6):
                client.echo.send(f"message {count}")
                await client.wait_for_echoes(count)
            assert sent == [["SackChunk", "DataChunk"]] * 5
            # The client took the SACK: nothing it sent is waiting to be acknowledged.
            assert not client.connection.sctp._sent_queue

    run(scenario)


def test_a_reply_too_large_to_share_a_packet_goes_after_a_sack_of_its_own():
    message = b"z" * 2000  # two fragments each way; the first a full packet

    async def scenario():
        async with session(**QUIET) as (client, peer, _):
            sent = _record_datagrams(peer)
            client.echo.send(message)
            await client.wait_for_echoes(1)
            assert client.echoed == [message]
            # One SACK for each fragment that came, then the two of the echo.
            assert sent == [["SackChunk"], ["SackChunk"], ["DataChunk"], ["DataChunk"]]
            assert not client.connection.sctp._sent_queue

    run(scenario)


def test_a_message_with_nothing_to_reply_is_acknowledged_alone():
    async def scenario():
        async with session(**QUIET) as (client, peer, _):
            sent = _record_datagrams(peer)
            heartbeat = next(channel for channel in client.connection.sctp._data_channels.values()
                             if channel.label == "heartbeat")
            heartbeat.send("pong 0")  # a pong the tower did not ask for: it only notes it
            client.echo.send("after it")
            await client.wait_for_echoes(1)
            assert sent == [["SackChunk"], ["SackChunk", "DataChunk"]]

    run(scenario)


def test_a_packet_of_several_chunks_reads_back_as_sent():
    association = SimpleNamespace(_local_port=5000, _remote_port=5000,
                                  _remote_verification_tag=0x12345678)
    sack = SackChunk()
    sack.cumulative_tsn, sack.advertised_rwnd, sack.gaps = 41, 131072, [(2, 3)]
    data = DataChunk(flags=3)
    data.tsn, data.stream_id, data.protocol, data.user_data = 9, 1, 51, b"odd length"
    # parse_packet checks the CRC32c and each chunk's length and padding.
    source, destination, tag, chunks = parse_packet(packet(association, sack, data))
    assert (source, destination, tag) == (5000, 5000, 0x12345678)
    assert [bytes(chunk) for chunk in chunks] == [bytes(sack), bytes(data)]
