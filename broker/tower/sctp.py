"""A tower's acknowledgements ride in the packet of its reply.

aiortc acknowledges each SCTP packet carrying data with a SACK in a datagram of its own,
sent as soon as the packet is handled, and sends the application's reply (an echo) in
a second datagram, later on the loop. Sending a datagram is the largest single cost a
tower pays per message: at 1,000 echo sessions, py-spy found ``sendto`` about a third
of the tower's work outside its selector.

RFC 9260 (section 6) lets a receiver bundle its SACK with outbound DATA, control chunks
first. ``bundle_acknowledgements`` does that for one association: when handling a packet
left data queued to send, the SACK waits while the queue is flushed at once, and goes
out in front of the first DATA chunk, provided the two fit the largest packet aiortc
makes itself. Otherwise it goes alone, as before. An echo costs one datagram, not two,
and the client one datagram fewer to read.

``track_received_tsns`` keeps what aiortc keeps of the TSNs received, at a constant
cost a chunk: aiortc sorts and filters every TSN received past a gap for each chunk
that arrives, so a client that never sent one TSN and kept sending past it made each
of its chunks cost more than the last (3 ms each at 30,000), on the loop every session
of the tower shares.
"""

from __future__ import annotations

from struct import pack

from aiortc.rtcsctptransport import (
    SCTP_MAX_PACKET_LENGTH,
    Chunk,
    DataChunk,
    RTCSctpTransport,
    SackChunk,
    tsn_plus_one,
)
from aiortc.utils import uint32_gt, uint32_gte
from google_crc32c import value as crc32c

__all__ = ["bundle_acknowledgements", "packet", "received_already", "track_received_tsns"]


def packet(sctp: RTCSctpTransport, *chunks: Chunk) -> bytes:
    """An SCTP packet of the association carrying ``chunks`` in that order."""
    header = pack("!HHL", sctp._local_port, sctp._remote_port, sctp._remote_verification_tag)
    body = b"".join(bytes(chunk) for chunk in chunks)
    return header + pack("<L", crc32c(header + b"\x00\x00\x00\x00" + body)) + body


def bundle_acknowledgements(sctp: RTCSctpTransport) -> None:
    """Have ``sctp`` send each SACK with the data its packet's handling queued."""
    send_chunk, send_sack = sctp._send_chunk, sctp._send_sack
    holding = False
    held: SackChunk | None = None

    async def chunk_after_held_sack(chunk: Chunk) -> None:
        nonlocal held
        if holding and isinstance(chunk, SackChunk):
            held = chunk
            return
        if held is not None:
            sack, held = held, None
            if isinstance(chunk, DataChunk):
                both = packet(sctp, sack, chunk)
                if len(both) <= SCTP_MAX_PACKET_LENGTH:
                    await sctp.transport._send_data(both)
                    return
            await send_chunk(sack)
        await send_chunk(chunk)

    async def sack_with_reply() -> None:
        nonlocal holding, held
        if not (
            sctp._data_channel_queue
            and not sctp._outbound_queue
            and sctp._association_state == RTCSctpTransport.State.ESTABLISHED
        ):
            await send_sack()
            return
        holding = True
        try:
            await send_sack()  # builds the SACK, which chunk_after_held_sack keeps
        finally:
            holding = False
        try:
            # On the receive path, as aiortc's own flush after a SACK is.
            await sctp._data_channel_flush()
        finally:
            unsent, held = held, None
        if unsent is not None:  # the window was full, or the data too large to share
            await send_chunk(unsent)

    sctp._send_chunk = chunk_after_held_sack
    sctp._send_sack = sack_with_reply


def received_already(sctp: RTCSctpTransport, tsn: int) -> bool:
    """Whether a DATA chunk of ``tsn`` would be a duplicate: received before."""
    return uint32_gte(sctp._last_received_tsn, tsn) or tsn in sctp._sack_misordered


def track_received_tsns(sctp: RTCSctpTransport) -> None:
    """Have ``sctp`` mark each DATA chunk's TSN received as aiortc does (the same
    cumulative TSN, TSNs past a gap and duplicates, the same answer), without going
    through every TSN past a gap for each chunk."""

    def mark_received(tsn: int) -> bool:
        misordered = sctp._sack_misordered
        if received_already(sctp, tsn):
            sctp._sack_duplicates.append(tsn)
            return True
        if tsn != tsn_plus_one(sctp._last_received_tsn):
            misordered.add(tsn)  # past a gap
        else:
            sctp._last_received_tsn = tsn
            while (following := tsn_plus_one(sctp._last_received_tsn)) in misordered:
                misordered.discard(following)
                sctp._last_received_tsn = following
        last = sctp._last_received_tsn
        if sctp._sack_duplicates:
            sctp._sack_duplicates = [
                duplicate for duplicate in sctp._sack_duplicates if uint32_gt(duplicate, last)]
        return False

    sctp._mark_received = mark_received
