"""The certificate authority, the certificates it issues, and real TLS handshakes with them."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.pki import (
    CertificateAuthority,
    CertificateError,
    certificate_expiry,
    certificate_name,
    client_ssl_context,
    generate_key_and_csr,
    generate_private_key,
    private_key_pem,
    self_signed_server_certificate,
    server_ssl_context,
    write_secret,
)

HANDSHAKE_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.create()


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def extension(certificate: x509.Certificate, kind: type) -> object:
    return certificate.extensions.get_extension_for_class(kind).value


def csr_signed_by(key, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def assert_issued_by(certificate: x509.Certificate, authority: CertificateAuthority) -> None:
    public_key = authority.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(
        certificate.signature,
        certificate.tbs_certificate_bytes,
        ec.ECDSA(certificate.signature_hash_algorithm),
    )
    assert certificate.issuer == authority.certificate.subject


# write_secret


def test_a_secret_is_written_owner_only_into_new_owner_only_directories(tmp_path):
    path = tmp_path / "state" / "keys" / "secret.pem"
    old_mask = os.umask(0)  # whatever the umask, no directory on the way is left open
    try:
        write_secret(path, b"first")
    finally:
        os.umask(old_mask)
    write_secret(path, b"second")
    assert path.read_bytes() == b"second"
    assert file_mode(path) == 0o600
    assert file_mode(path.parent) == file_mode(path.parent.parent) == 0o700
    assert sorted(path.parent.iterdir()) == [path]


# The certificate authority on disk


def test_load_or_create_creates_then_reuses_the_same_authority(tmp_path):
    directory = tmp_path / "ca"
    created = CertificateAuthority.load_or_create(directory)
    certificate_file = directory / "ca.pem"
    key_file = directory / "ca-key.pem"
    assert file_mode(certificate_file) == 0o600
    assert file_mode(key_file) == 0o600
    written_key = key_file.read_bytes()

    loaded = CertificateAuthority.load_or_create(directory)

    assert loaded.certificate_pem == created.certificate_pem == certificate_file.read_bytes()
    assert key_file.read_bytes() == written_key
    constraints = extension(loaded.certificate, x509.BasicConstraints)
    assert constraints.ca
    assert certificate_name(loaded.certificate) == "session broker development CA"


@pytest.mark.parametrize("missing", ["ca.pem", "ca-key.pem"])
def test_a_half_present_authority_is_refused(tmp_path, missing):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(CertificateError, match=missing):
        CertificateAuthority.load_or_create(tmp_path)


@pytest.mark.parametrize("garbled", ["ca.pem", "ca-key.pem"])
def test_an_unparsable_authority_file_is_refused_with_its_path(tmp_path, garbled):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / garbled).write_bytes(b"-----BEGIN NONSENSE-----\nnot base64\n")
    with pytest.raises(CertificateError, match=str(tmp_path / garbled)):
        CertificateAuthority.load_or_create(tmp_path)


def test_an_authority_key_that_does_not_match_its_certificate_is_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    write_secret(tmp_path / "ca-key.pem", private_key_pem(generate_private_key()))
    with pytest.raises(CertificateError, match="ca-key.pem"):
        CertificateAuthority.load_or_create(tmp_path)


# Signing the towers' requests


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_a_tower_request_is_signed(authority, key_type):
    key_pem, csr_pem = generate_key_and_csr("tower-1", key_type)
    before = datetime.now(timezone.utc)

    certificate_pem = authority.sign_tower_csr(
        csr_pem, "tower-1", lifetime=timedelta(hours=6), addresses=["10.0.0.7", "fd00::7"]
    )

    certificate = x509.load_pem_x509_certificate(certificate_pem)
    assert_issued_by(certificate, authority)
    tower_key = serialization.load_pem_private_key(key_pem, password=None)
    assert certificate.public_key() == tower_key.public_key()
    assert certificate_name(certificate) == "tower-1"
    alternative_names = extension(certificate, x509.SubjectAlternativeName)
    assert alternative_names.get_values_for_type(x509.DNSName) == ["tower-1"]
    assert alternative_names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::7"),
    ]
    # A tower only ever serves its end of the link: it cannot pose as a client.
    assert list(extension(certificate, x509.ExtendedKeyUsage)) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert not extension(certificate, x509.BasicConstraints).ca
    assert extension(certificate, x509.KeyUsage).key_encipherment == (key_type == "rsa")
    assert (
        extension(certificate, x509.AuthorityKeyIdentifier).key_identifier
        == extension(authority.certificate, x509.SubjectKeyIdentifier).digest
    )
    assert certificate.not_valid_before_utc <= before - timedelta(minutes=5)
    assert certificate.not_valid_before_utc >= before - timedelta(minutes=5, seconds=5)
    assert certificate_expiry(certificate_pem) - certificate.not_valid_before_utc == timedelta(
        hours=6, minutes=5
    )


def test_a_request_for_another_tower_is_refused(authority):
    _, csr_pem = generate_key_and_csr("tower-2")
    with pytest.raises(CertificateError, match="'tower-2'.*'tower-1'"):
        authority.sign_tower_csr(csr_pem, "tower-1")


def test_a_tampered_request_is_refused(authority):
    _, csr_pem = generate_key_and_csr("tower-1")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"tower-1", b"tower-9"))
    assert not tampered.is_signature_valid
    with pytest.raises(CertificateError, match="not signed by the key it carries"):
        authority.sign_tower_csr(tampered.public_bytes(serialization.Encoding.PEM), "tower-9")


@pytest.mark.parametrize(
    ("make_key", "complaint"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "1024-bit RSA"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
        (ed25519.Ed25519PrivateKey.generate, "only ECDSA P-256 and RSA"),
    ],
    ids=["rsa-1024", "p-384", "ed25519"],
)
def test_a_request_with_a_refused_key_is_refused(authority, make_key, complaint):
    with pytest.raises(CertificateError, match=complaint):
        authority.sign_tower_csr(csr_signed_by(make_key(), "tower-1"), "tower-1")


@pytest.mark.parametrize("garbage", [b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\n"])
def test_a_garbage_request_is_refused(authority, garbage):
    with pytest.raises(CertificateError, match="not a PEM certificate signing request"):
        authority.sign_tower_csr(garbage, "tower-1")


def test_a_certificate_never_outlives_its_authority():
    short_lived = CertificateAuthority.create(lifetime=timedelta(hours=1))
    _, csr_pem = generate_key_and_csr("tower-1")
    certificate_pem = short_lived.sign_tower_csr(csr_pem, "tower-1", timedelta(days=30))
    assert certificate_expiry(certificate_pem) == short_lived.certificate.not_valid_after_utc


def test_the_brokers_client_identity_is_for_client_authentication_only(authority):
    _, certificate_pem = authority.issue("broker", client_only=True)
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    assert_issued_by(certificate, authority)
    assert list(extension(certificate, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    alternative_names = extension(certificate, x509.SubjectAlternativeName)
    assert alternative_names.get_values_for_type(x509.DNSName) == ["broker"]


def test_the_development_server_certificate_names_its_hosts_and_addresses():
    _, certificate_pem = self_signed_server_certificate(("localhost", "broker.test"))
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    assert certificate.issuer == certificate.subject
    assert certificate_name(certificate) == "localhost"
    alternative_names = extension(certificate, x509.SubjectAlternativeName)
    assert alternative_names.get_values_for_type(x509.DNSName) == ["localhost", "broker.test"]
    assert alternative_names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(extension(certificate, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not extension(certificate, x509.BasicConstraints).ca


def test_a_non_certificate_has_no_expiry():
    with pytest.raises(CertificateError):
        certificate_expiry(b"not a certificate")


# Real TLS handshakes over a loopback socket pair


def write_pair(directory: Path, name: str, key_pem: bytes, certificate_pem: bytes):
    key_file = directory / f"{name}-key.pem"
    certificate_file = directory / f"{name}.pem"
    write_secret(key_file, key_pem)
    certificate_file.write_bytes(certificate_pem)
    return certificate_file, key_file


def write_authority(directory: Path, name: str, authority: CertificateAuthority) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(authority.certificate_pem)
    return path


def handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str
) -> tuple[object, object]:
    """Run a TLS handshake and one round trip; return each side's reply or exception.

    TLS 1.3 lets the client finish its handshake before the server has checked the
    client's certificate, so a refusal by the server reaches the client on its first read:
    the round trip is what makes both sides' verdicts visible.
    """
    server_socket, client_socket = socket.socketpair()
    server_socket.settimeout(HANDSHAKE_TIMEOUT)
    client_socket.settimeout(HANDSHAKE_TIMEOUT)

    def serve():
        with server_socket, server_context.wrap_socket(server_socket, server_side=True) as tls:
            request = tls.recv(4)
            tls.sendall(b"pong")
            return request

    def connect():
        with (
            client_socket,
            client_context.wrap_socket(client_socket, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"ping")
            return tls.recv(4)

    def outcome(future):
        try:
            return future.result()
        except Exception as error:
            return error

    with ThreadPoolExecutor(max_workers=2) as executor:
        server = executor.submit(serve)
        client = executor.submit(connect)
        return outcome(server), outcome(client)


@pytest.fixture(scope="module")
def tower_link(tmp_path_factory, authority):
    """Files for a tower named tower-1 and the broker's client identity, from one authority."""
    directory = tmp_path_factory.mktemp("tower-link")
    key_pem, csr_pem = generate_key_and_csr("tower-1")
    tower = write_pair(directory, "tower-1", key_pem, authority.sign_tower_csr(csr_pem, "tower-1"))
    broker = write_pair(directory, "broker", *authority.issue("broker", client_only=True))
    return {
        "directory": directory,
        "authority_file": write_authority(directory, "authority", authority),
        "tower": tower,
        "broker": broker,
    }


def tower_server_context(tower_link) -> ssl.SSLContext:
    certificate_file, key_file = tower_link["tower"]
    return server_ssl_context(
        certificate_file, key_file, client_ca_file=tower_link["authority_file"]
    )


def test_mutual_tls_between_broker_and_tower_succeeds(tower_link):
    client_context = client_ssl_context(tower_link["authority_file"], *tower_link["broker"])
    server_outcome, client_outcome = handshake(
        tower_server_context(tower_link), client_context, "tower-1"
    )
    assert (server_outcome, client_outcome) == (b"ping", b"pong")


def test_a_tower_refuses_a_client_without_a_certificate(tower_link):
    client_context = client_ssl_context(tower_link["authority_file"])
    server_outcome, client_outcome = handshake(
        tower_server_context(tower_link), client_context, "tower-1"
    )
    assert isinstance(server_outcome, ssl.SSLError)
    assert "did not return a certificate" in str(server_outcome)
    assert isinstance(client_outcome, (ssl.SSLError, ConnectionError))


def test_a_tower_refuses_a_client_certificate_from_another_authority(tower_link):
    stranger = CertificateAuthority.create("stranger CA")
    directory = tower_link["directory"]
    client_context = client_ssl_context(
        tower_link["authority_file"],
        *write_pair(directory, "impostor", *stranger.issue("broker", client_only=True)),
    )
    server_outcome, client_outcome = handshake(
        tower_server_context(tower_link), client_context, "tower-1"
    )
    assert isinstance(server_outcome, ssl.SSLCertVerificationError)
    assert isinstance(client_outcome, (ssl.SSLError, ConnectionError))


def test_the_broker_refuses_a_tower_certified_for_another_name(tower_link):
    client_context = client_ssl_context(tower_link["authority_file"], *tower_link["broker"])
    server_outcome, client_outcome = handshake(
        tower_server_context(tower_link), client_context, "tower-2"
    )
    assert isinstance(client_outcome, ssl.SSLCertVerificationError)
    assert "tower-2" in str(client_outcome)
    assert isinstance(server_outcome, (ssl.SSLError, ConnectionError))


def test_the_broker_trusts_only_the_towers_authority(tower_link):
    client_context = client_ssl_context(tower_link["authority_file"])
    assert client_context.cert_store_stats()["x509_ca"] == 1
    assert client_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context.check_hostname
    server_context = tower_server_context(tower_link)
    assert server_context.verify_mode == ssl.CERT_REQUIRED
    assert server_context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_client_that_imports_the_development_certificate_trusts_it(tmp_path):
    key_pem, certificate_pem = self_signed_server_certificate()
    certificate_file, key_file = write_pair(tmp_path, "https", key_pem, certificate_pem)
    server_context = server_ssl_context(certificate_file, key_file)
    assert server_context.verify_mode == ssl.CERT_NONE
    client_context = client_ssl_context(certificate_file)
    for host in ("localhost", "127.0.0.1"):
        assert handshake(server_context, client_context, host) == (b"ping", b"pong")


def test_no_tower_may_be_named_as_the_broker(authority):
    _key, csr = generate_key_and_csr("broker")
    with pytest.raises(ValueError, match="broker's name"):
        authority.sign_tower_csr(csr, expected_name="broker")
