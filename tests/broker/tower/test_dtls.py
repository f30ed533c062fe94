"""The tower's shared DTLS certificate and OpenSSL context."""

from __future__ import annotations

import asyncio
import datetime
import logging

import aiortc.rtcpeerconnection
from aiortc import RTCCertificate, RTCConfiguration
from aiortc.rtcdtlstransport import SRTP_AEAD_AES_128_GCM, SRTP_AES128_CM_SHA1_80
from OpenSSL import SSL

from broker.tower import dtls
from broker.tower.dtls import (
    RENEW_BEFORE,
    SharedCertificate,
    peer_connection,
    share_certificate,
    tower_certificate,
)

PROFILES = [SRTP_AEAD_AES_128_GCM, SRTP_AES128_CM_SHA1_80]


def test_one_certificate_serves_until_a_day_before_it_expires():
    first = tower_certificate()
    assert tower_certificate() is first
    almost = first.expires - RENEW_BEFORE + datetime.timedelta(hours=1)
    renewed = tower_certificate(almost)
    assert renewed is not first
    assert renewed.getFingerprints() != first.getFingerprints()
    assert tower_certificate() is renewed


def test_the_openssl_context_is_made_once_per_srtp_profiles_and_caches_no_session():
    certificate = SharedCertificate.generateCertificate()
    context = certificate._create_ssl_context(PROFILES)
    assert certificate._create_ssl_context(PROFILES) is context
    assert certificate._create_ssl_context(PROFILES[:1]) is not context
    assert context.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_an_aiortc_without_the_attribute_is_left_alone_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(dtls, "_warned", False)

    class Elsewhere:
        pass

    with caplog.at_level(logging.WARNING, logger="broker.tower.dtls"):
        share_certificate(Elsewhere())
        share_certificate(Elsewhere())
    assert len(caplog.records) == 1
    assert "own DTLS certificate" in caplog.records[0].getMessage()


def test_a_peer_connection_gets_the_towers_certificate_without_making_one(monkeypatch):
    shared = tower_certificate()

    def refuse(cls):
        raise AssertionError("a certificate was generated")

    async def scenario():
        connection = peer_connection(RTCConfiguration([]))
        try:
            assert connection._RTCPeerConnection__certificates == [shared]
            assert aiortc.rtcpeerconnection.RTCCertificate is RTCCertificate
        finally:
            await connection.close()

    monkeypatch.setattr(RTCCertificate, "generateCertificate", classmethod(refuse))
    asyncio.run(scenario())
