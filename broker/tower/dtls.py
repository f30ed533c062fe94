"""One DTLS certificate, and one OpenSSL context, for all of a tower's peer connections.

aiortc gives every peer connection a certificate of its own and every DTLS transport an
OpenSSL context of its own: about 25 KiB of each session's memory (3.5 KiB for the
certificate, 21 KiB for the context), measured on this stack. WebRTC asks only that the
fingerprint in the answer be the certificate's, and a browser may use one certificate
for many connections (``RTCPeerConnection.generateCertificate``). Each session's keys
are still its own: SRTP and SCTP are keyed by each DTLS handshake. The shared context
keeps no session cache, so no DTLS session is resumed across peer connections.

The certificate is replaced a day before it expires (aiortc's last 30 days); connections
made with the previous one keep it. ``peer_connection`` also spares aiortc making a
certificate only to have it replaced: a key and a signature per session, on the way to
its answer.
"""

from __future__ import annotations

import datetime
import logging

import aiortc.rtcpeerconnection
from aiortc import RTCCertificate, RTCConfiguration, RTCPeerConnection
from aiortc.rtcdtlstransport import SRTPProtectionProfile
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

__all__ = [
    "RENEW_BEFORE", "SharedCertificate", "peer_connection", "share_certificate",
    "tower_certificate",
]

logger = logging.getLogger(__name__)

RENEW_BEFORE = datetime.timedelta(days=1)
# Where RTCPeerConnection keeps the certificates its DTLS transports are made with.
_CERTIFICATES = "_RTCPeerConnection__certificates"


class SharedCertificate(RTCCertificate):
    """A DTLS certificate that makes its OpenSSL context once, for every transport."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        super().__init__(key, cert)
        self._contexts: dict[bytes, SSL.Context] = {}

    def _create_ssl_context(self, srtp_profiles: list[SRTPProtectionProfile]) -> SSL.Context:
        profiles = b":".join(profile.openssl_profile for profile in srtp_profiles)
        context = self._contexts.get(profiles)
        if context is None:
            context = super()._create_ssl_context(srtp_profiles)
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            self._contexts[profiles] = context
        return context


_current: SharedCertificate | None = None
_warned = False


def tower_certificate(now: datetime.datetime | None = None) -> SharedCertificate:
    """This process's DTLS certificate, made on first use and a day before it expires."""
    global _current
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if _current is None or _current.expires - now < RENEW_BEFORE:
        _current = SharedCertificate.generateCertificate()
    return _current


def share_certificate(connection: RTCPeerConnection) -> None:
    """Give ``connection`` the tower's certificate; call it before any description.

    An aiortc that keeps its certificates elsewhere is warned about (once) and left
    with its own: sessions work as before, at aiortc's cost in memory.
    """
    global _warned
    if not hasattr(connection, _CERTIFICATES):
        if not _warned:
            _warned = True
            logger.warning("this aiortc keeps no %s: each session makes its own DTLS "
                           "certificate and context", _CERTIFICATES)
        return
    setattr(connection, _CERTIFICATES, [tower_certificate()])


class _Given:
    """Stands in for ``RTCCertificate`` while a peer connection is made: it hands out
    the tower's certificate instead of generating one."""

    def __init__(self, certificate: SharedCertificate) -> None:
        self.certificate = certificate

    def generateCertificate(self) -> SharedCertificate:  # noqa: N802 (aiortc's name)
        return self.certificate


def peer_connection(configuration: RTCConfiguration) -> RTCPeerConnection:
    """A new peer connection with the tower's certificate, made without one of its own."""
    certificate = tower_certificate()
    module = aiortc.rtcpeerconnection
    generator = module.RTCCertificate
    module.RTCCertificate = _Given(certificate)  # type: ignore[misc,assignment]
    try:
        connection = RTCPeerConnection(configuration)
    finally:
        module.RTCCertificate = generator  # type: ignore[misc]
    share_certificate(connection)  # whatever aiortc did with the stand-in
    return connection
