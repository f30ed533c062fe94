"""The tower's SACKs in the packet of its reply, against a real aiortc client."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from aiortc.rtcsctptransport import DataChunk, RTCSctpTransport, SackChunk, parse_packet

from broker.tower.sctp import packet, track_received_tsns

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


# TSNs received: aiortc's bookkeeping, at a constant cost a chunk.


def _fresh(last: int) -> RTCSctpTransport:
    sctp = RTCSctpTransport.__new__(RTCSctpTransport)  # the bookkeeping alone
    sctp._last_received_tsn = last
    sctp._sack_duplicates = []
    sctp._sack_misordered = set()
    return sctp


@pytest.mark.parametrize("seed", range(40))
def test_tsns_are_marked_received_exactly_as_aiortc_marks_them(seed):
    chooser = random.Random(seed)
    start = 1000
    tsns = [start + offset for offset in range(1, 200)]
    chooser.shuffle(tsns)
    tsns += chooser.choices(tsns, k=60) + [start, start - 5]  # duplicates, and old ones
    chooser.shuffle(tsns)
    theirs, ours = _fresh(start), _fresh(start)
    track_received_tsns(ours)
    for number, tsn in enumerate(tsns):
        assert ours._mark_received(tsn) == theirs._mark_received(tsn), tsn
        assert ours._last_received_tsn == theirs._last_received_tsn
        assert ours._sack_misordered == theirs._sack_misordered
        assert ours._sack_duplicates == theirs._sack_duplicates
        if number % 25 == 0:  # a SACK went out
            ours._sack_duplicates.clear()
            theirs._sack_duplicates.clear()
    assert ours._last_received_tsn == start + 199 and not ours._sack_misordered


def test_tsns_past_the_end_of_the_tsn_space_are_taken_in_serial_order():
    # aiortc sorts the TSNs held past a gap as numbers, so past 2**32 - 1 it looks for
    # the next one at 0's end and stops there: an association whose TSNs wrap stalls.
    sctp = _fresh(2**32 - 3)
    track_received_tsns(sctp)
    for tsn in (1, 0, 2**32 - 1):
        assert not sctp._mark_received(tsn)
    assert sctp._last_received_tsn == 2**32 - 3
    assert not sctp._mark_received(2**32 - 2)
    assert sctp._last_received_tsn == 1 and not sctp._sack_misordered
    assert sctp._mark_received(0)  # a duplicate now


def test_a_tsn_past_a_gap_costs_no_more_with_many_held():
    # A client that never sends one TSN and sends on past it: each chunk used to go
    # through all those before it. Counted, not timed: the TSNs looked at per chunk.
    sctp = _fresh(0)
    track_received_tsns(sctp)
    looked_at = CountingSet()
    sctp._sack_misordered = looked_at
    for tsn in range(2, 5002):
        sctp._mark_received(tsn)
    assert len(sctp._sack_misordered) == 5000
    assert looked_at.iterations == 0
    sctp._mark_received(1)  # the missing one comes: everything held is taken at once
    assert sctp._last_received_tsn == 5001 and not sctp._sack_misordered


class CountingSet(set):
    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()
