"""The broker's certificates: a certificate authority for tower links, and TLS contexts.

Theory of operation: the broker and its towers speak mutual TLS, and the broker is the
certificate authority for those links. A tower makes its own key and a certificate
signing request on its own host (``generate_key_and_csr``), so its private key never
travels; the broker checks the request against the name it expects for that tower and
signs a short-lived certificate (``CertificateAuthority.sign_tower_csr``). The broker
issues itself a client certificate from the same authority (``CertificateAuthority.issue``)
so a tower can tell the broker from anyone else who reaches its port. Both sides trust
only that authority, never the system's store (``server_ssl_context``,
``client_ssl_context``).

The broker's public HTTPS endpoint is a separate matter: in a real deployment it carries
a certificate from a public authority; for development, ``self_signed_server_certificate``
makes one that a browser trusts once the user imports it.

Keys are ECDSA P-256 by default, RSA-2048 on request; every signature uses SHA-256.
Private keys are written with ``write_secret``: readable by their owner only, and never
seen half-written.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import ssl
import stat
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

CA_CERTIFICATE_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
MINIMUM_RSA_BITS = 2048
# Lets a certificate be used at once by a peer whose clock runs a little behind ours.
CLOCK_SKEW = timedelta(minutes=5)

_RSA_BITS = 2048
_RSA_PUBLIC_EXPONENT = 65537


# The common name of the broker's own client certificate on tower links.
BROKER_NAME = "broker"


class CertificateError(Exception):
    """A certificate signing request or certificate that is refused; the message says why."""


def _make_private_directories(directory: Path) -> None:
    # Path.mkdir(parents=True) gives its mode to the last directory only.
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def keep_private(path: Path) -> None:
    """Check that a secret the broker reuses from its state directory is a plain file of
    its own user, and make it readable by that user alone if it was not.

    Raises:
        PermissionError: it is a symbolic link or not a plain file, or another user's.
    """
    status = os.lstat(path)
    if not stat.S_ISREG(status.st_mode):
        raise PermissionError(errno.EPERM, "a secret must be a plain file, not a link",
                              str(path))
    if status.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "a secret must belong to the broker's own user",
                              str(path))
    if status.st_mode & 0o077:
        os.chmod(path, 0o600)


def write_secret(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically.

    The data goes to a temporary file (mode 0600) in the same directory, is flushed to
    disk, then renamed over ``path``: a reader sees the old content or the new, never a
    part. Missing directories on the way are created with mode 0700, each of them.

    Args:
        path: the file to write.
        data: its new content.

    Raises:
        OSError: the directory or file cannot be created or written.
    """
    path = Path(path)
    directory = path.parent
    _make_private_directories(directory)
    descriptor, temporary_name = tempfile.mkstemp(
        dir=directory, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            # mkstemp's 0600 may be narrowed further by the umask; the owner must keep
            # read and write so a later run can reuse and replace the file.
            os.fchmod(file.fileno(), 0o600)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
    # The rename itself is only durable once the directory entry reaches the disk.
    directory_descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def generate_private_key(key_type: KeyType = "ec") -> PrivateKey:
    """Generate a private key.

    Args:
        key_type: ``"ec"`` for ECDSA on P-256, ``"rsa"`` for RSA-2048.

    Returns:
        The new private key.

    Raises:
        ValueError: ``key_type`` is neither ``"ec"`` nor ``"rsa"``.
    """
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=_RSA_PUBLIC_EXPONENT, key_size=_RSA_BITS)
    raise ValueError(f"key type must be 'ec' or 'rsa', not {key_type!r}")


def private_key_pem(key: PrivateKey) -> bytes:
    """Return ``key`` as unencrypted PKCS #8 PEM."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def generate_key_and_csr(name: str, key_type: KeyType = "ec") -> tuple[bytes, bytes]:
    """Make a tower's key and its certificate signing request; run on the tower's host.

    Args:
        name: the tower's name, put in the request's subject common name and as its DNS
            subject alternative name.
        key_type: ``"ec"`` (default) or ``"rsa"``.

    Returns:
        ``(key_pem, csr_pem)``: the private key, which stays on the tower, and the
        request to send to the broker.

    Raises:
        ValueError: ``name`` is empty or not a valid DNS name, or ``key_type`` is unknown.
    """
    key = private_key_pem(generate_private_key(key_type))
    return key, tower_csr_for_key(key, name)


def tower_csr_for_key(key_pem: bytes, name: str) -> bytes:
    """The certificate signing request of tower ``name`` for the key it already made.

    Raises:
        ValueError: ``name`` is not a valid DNS name, or ``key_pem`` is not a private
            key of a supported type.
    """
    _check_name(name)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError("a tower key is ECDSA or RSA")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_common_name(name))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """The authority that signs the certificates of the broker's links to its towers.

    Build one with ``create`` or ``load_or_create``.

    Args:
        certificate: the authority's own (self-signed) certificate.
        private_key: the key that certificate is for.

    Raises:
        CertificateError: the key is not the one the certificate is for.
    """

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey) -> None:
        if _public_key_der(certificate.public_key()) != _public_key_der(private_key.public_key()):
            raise CertificateError(
                f"the key of certificate authority {certificate_name(certificate)!r} "
                "is not the key its certificate is for"
            )
        self.certificate = certificate
        self._private_key = private_key

    @classmethod
    def create(
        cls,
        name: str = "session broker development CA",
        key_type: KeyType = "ec",
        lifetime: timedelta = timedelta(days=3650),
    ) -> CertificateAuthority:
        """Create a new authority with a new key and a self-signed certificate.

        Args:
            name: the common name of the authority's certificate.
            key_type: ``"ec"`` (default) or ``"rsa"``.
            lifetime: how long the authority's certificate is valid from now.

        Returns:
            The new authority, kept in memory only.

        Raises:
            ValueError: ``name`` is empty, ``key_type`` is unknown, or ``lifetime`` is not
                positive.
        """
        if not name:
            raise ValueError("a certificate authority needs a name")
        _check_lifetime(lifetime)
        key = generate_private_key(key_type)
        subject = _common_name(name)
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            # path_length=0: this authority signs end-entity certificates, never another
            # authority.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load_or_create(cls, directory: Path, key_type: KeyType = "ec") -> CertificateAuthority:
        """Load the authority kept in ``directory``, or create one and keep it there.

        The authority lives in ``directory/ca.pem`` (its certificate) and
        ``directory/ca-key.pem`` (its key), both mode 0600. When both are present they
        are reused as they are; when neither is, a new authority is created with the
        default name and lifetime and written there.

        Args:
            directory: where the authority's files are; created (mode 0700) if missing.
            key_type: the key type of a newly created authority; ignored when reusing.

        Returns:
            The authority.

        Raises:
            CertificateError: only one of the two files is present, a file cannot be
                parsed, the key does not match the certificate, the certificate is not a
                certificate authority, or it has expired. The message names the file.
            OSError: the files cannot be read or written.
        """
        directory = Path(directory)
        certificate_path = directory / CA_CERTIFICATE_FILE
        key_path = directory / CA_KEY_FILE
        certificate_exists = certificate_path.exists()
        key_exists = key_path.exists()
        if not certificate_exists and not key_exists:
            authority = cls.create(key_type=key_type)
            # Key first: a crash between the two writes leaves a key without a
            # certificate, which the next start reports instead of silently replacing.
            authority.save(directory)
            return authority
        if not (certificate_exists and key_exists):
            present, missing = (
                (certificate_path, key_path) if certificate_exists else (key_path, certificate_path)
            )
            raise CertificateError(
                f"{present} exists but {missing} does not; restore the missing file, or "
                f"remove {present} to create a new certificate authority"
            )
        keep_private(key_path)
        try:
            return cls.from_files(certificate_path, key_path)
        except CertificateError as error:
            if str(error).startswith(str(directory)):
                raise
            raise CertificateError(f"{key_path}: {error}") from None

    @classmethod
    def from_files(cls, certificate_file: Path, key_file: Path) -> CertificateAuthority:
        """An existing authority (an operator's), after checking it can sign certificates.

        Raises:
            CertificateError: a file cannot be parsed, the key is not the certificate's,
                or the certificate is not a certificate authority or has expired.
            OSError: a file cannot be read.
        """
        certificate = _load_certificate_file(Path(certificate_file))
        private_key = _load_private_key_file(Path(key_file))
        _check_authority_certificate(certificate, Path(certificate_file))
        return cls(certificate, private_key)

    def save(self, directory: Path) -> None:
        """Keep this authority in ``directory`` (as ``load_or_create`` finds it), 0600."""
        directory = Path(directory)
        write_secret(directory / CA_KEY_FILE, private_key_pem(self._private_key))
        write_secret(directory / CA_CERTIFICATE_FILE, self.certificate_pem)

    @property
    def certificate_pem(self) -> bytes:
        """The authority's certificate as PEM, for the peers that must trust it."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign_tower_csr(
        self,
        csr_pem: bytes,
        expected_name: str,
        lifetime: timedelta = timedelta(hours=24),
        addresses: Sequence[str] = (),
    ) -> bytes:
        """Check a tower's certificate signing request and issue its certificate.

        The request must be well formed, signed by the key it carries, name the tower
        ``expected_name`` as its subject common name, and carry an ECDSA P-256 key or an
        RSA key of at least 2048 bits. Extensions the request asks for are ignored: the
        certificate gets the name, addresses and usages decided here. It authenticates a
        server only (the tower's end of its link; the broker dials), so no tower can pose
        as the broker to another, and it is valid from five minutes ago (clock skew) for
        ``lifetime``, but never beyond the authority's own expiry.

        Args:
            csr_pem: the request, PEM-encoded.
            expected_name: the tower's name as the broker knows it.
            lifetime: how long the certificate is valid from now.
            addresses: IP addresses of the tower, added as subject alternative names.

        Returns:
            The tower's certificate, PEM-encoded.

        Raises:
            CertificateError: the request cannot be parsed, its signature is not valid,
                it names another tower, or its key is of a type or size refused.
            ValueError: ``expected_name`` is the broker's own name.
            ValueError: ``expected_name`` is empty or not a valid DNS name, an address is
                not an IP address, or ``lifetime`` is not positive.
        """
        _check_name(expected_name)
        if expected_name == BROKER_NAME:
            raise ValueError(f"{BROKER_NAME!r} is the broker's name; no tower may have it")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CertificateError(
                f"the certificate signing request for tower {expected_name!r} is not a PEM "
                "certificate signing request"
            ) from None
        if not csr.is_signature_valid:
            raise CertificateError(
                f"the certificate signing request for tower {expected_name!r} is not signed "
                "by the key it carries"
            )
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            raise CertificateError(
                f"the certificate signing request for tower {expected_name!r} has "
                f"{len(names)} subject common names; it must have exactly one"
            )
        requested_name = names[0].value
        if requested_name != expected_name:
            raise CertificateError(
                f"the certificate signing request is for {requested_name!r}, "
                f"but the tower is {expected_name!r}"
            )
        public_key = csr.public_key()
        _check_tower_key(public_key, expected_name)
        ip_addresses = [ipaddress.ip_address(address) for address in addresses]
        certificate = self._sign(
            public_key,
            expected_name,
            ip_addresses=ip_addresses,
            lifetime=lifetime,
            extended_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        name: str,
        *,
        client_only: bool = False,
        lifetime: timedelta = timedelta(days=365),
        key_type: KeyType = "ec",
    ) -> tuple[bytes, bytes]:
        """Generate a key here and issue its certificate, such as the broker's own identity.

        The certificate names ``name`` as its subject common name and DNS subject
        alternative name, and is valid from five minutes ago for ``lifetime`` (never
        beyond the authority's own expiry).

        Args:
            name: the holder's name.
            client_only: allow client authentication only (the broker's identity on tower
                links); otherwise both server and client authentication.
            lifetime: how long the certificate is valid from now.
            key_type: ``"ec"`` (default) or ``"rsa"``.

        Returns:
            ``(key_pem, certificate_pem)``.

        Raises:
            ValueError: ``name`` is empty or not a valid DNS name, ``key_type`` is
                unknown, or ``lifetime`` is not positive.
        """
        _check_name(name)
        key = generate_private_key(key_type)
        extended_usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if not client_only:
            extended_usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        certificate = self._sign(
            key.public_key(),
            name,
            ip_addresses=[],
            lifetime=lifetime,
            extended_usages=extended_usages,
        )
        return private_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM)

    def _sign(
        self,
        public_key: PublicKey,
        name: str,
        *,
        ip_addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
        lifetime: timedelta,
        extended_usages: Sequence[x509.ObjectIdentifier],
    ) -> x509.Certificate:
        _check_lifetime(lifetime)
        now = _now()
        # A certificate that outlives its issuer fails verification from that moment on;
        # saying so in the certificate makes its real lifetime visible to its holder.
        not_valid_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        authority_key_identifier = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        alternative_names: list[x509.GeneralName] = [x509.DNSName(name)]
        alternative_names += [x509.IPAddress(address) for address in ip_addresses]
        return (
            x509.CertificateBuilder()
            .subject_name(_common_name(name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_valid_after)
            .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_end_entity_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(extended_usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    authority_key_identifier
                ),
                critical=False,
            )
            .sign(self._private_key, hashes.SHA256())
        )


def self_signed_server_certificate(
    names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
    lifetime: timedelta = timedelta(days=397),
    key_type: KeyType = "ec",
) -> tuple[bytes, bytes]:
    """Make the broker's development HTTPS certificate, signed by its own key.

    The subject common name is the first name; the subject alternative names are all the
    DNS names and IP addresses. The certificate is for server authentication only and is
    not a certificate authority. Browsers trust it only once the user imports it, which
    is expected in development. The default lifetime, 397 days, is the longest browsers
    accept for a server certificate.

    Args:
        names: the DNS names the server answers to; at least one.
        addresses: the IP addresses the server answers on.
        lifetime: how long the certificate is valid from now.
        key_type: ``"ec"`` (default) or ``"rsa"``.

    Returns:
        ``(key_pem, certificate_pem)``.

    Raises:
        ValueError: no name, a name that is not a valid DNS name, an address that is not
            an IP address, an unknown ``key_type``, or a ``lifetime`` that is not positive.
    """
    if not names:
        raise ValueError("a server certificate needs at least one DNS name")
    for name in names:
        _check_name(name)
    _check_lifetime(lifetime)
    ip_addresses = [ipaddress.ip_address(address) for address in addresses]
    key = generate_private_key(key_type)
    public_key = key.public_key()
    subject = _common_name(names[0])
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternative_names += [x509.IPAddress(address) for address in ip_addresses]
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_end_entity_key_usage(public_key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return private_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM)


def certificate_expiry(cert_pem: bytes) -> datetime:
    """Return when a PEM certificate stops being valid, as an aware UTC datetime.

    Raises:
        CertificateError: ``cert_pem`` is not a PEM certificate.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertificateError("not a PEM certificate") from None
    return certificate.not_valid_after_utc


def certificate_name(cert: x509.Certificate) -> str:
    """Return the subject common name of a certificate.

    Raises:
        CertificateError: the subject has no common name.
    """
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CertificateError(
            f"the certificate for {cert.subject.rfc4514_string()!r} has no common name"
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def check_server_identity(cert_file: Path, key_file: Path) -> None:
    """Check that a server certificate and key (PEM files) load and belong together.

    Raises:
        CertificateError: they do not; the message names the files.
    """
    try:
        server_ssl_context(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise CertificateError(
            f"cannot use {cert_file} with {key_file}: {getattr(error, 'strerror', None) or error}"
        ) from None


def server_ssl_context(
    cert_file: Path, key_file: Path, *, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """Build the TLS context of a server: TLS 1.2 or newer.

    Args:
        cert_file: the server's certificate (PEM).
        key_file: the server's private key (PEM).
        client_ca_file: when given, clients must present a certificate issued by this
            authority (mutual TLS); otherwise no client certificate is asked for.

    Returns:
        The context.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: a file is not a certificate or key, or the key does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cafile=client_ca_file)
    return context


def client_ssl_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Build the TLS context of a client that trusts one authority: TLS 1.2 or newer.

    The server's certificate must be issued by the authority in ``ca_file`` (the system's
    trusted authorities are not consulted) and name the host the client connects to.

    Args:
        ca_file: the authority to trust (PEM).
        cert_file: the client's own certificate (PEM), for mutual TLS; when ``key_file``
            is not given, the key must be in this file too.
        key_file: the client's private key (PEM).

    Returns:
        The context.

    Raises:
        ValueError: ``key_file`` is given without ``cert_file``.
        OSError: a file cannot be read.
        ssl.SSLError: a file is not a certificate or key, or the key does not match.
    """
    if key_file is not None and cert_file is None:
        raise ValueError("a client key needs its certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _check_name(name: str) -> None:
    if not name:
        raise ValueError("a certificate needs a name")
    if not name.isascii():
        raise ValueError(f"{name!r} is not a DNS name; encode it as IDNA (xn--) first")


def _check_lifetime(lifetime: timedelta) -> None:
    if lifetime <= timedelta(0):
        raise ValueError(f"a certificate lifetime must be positive, not {lifetime}")


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _end_entity_key_usage(public_key: PublicKey) -> x509.KeyUsage:
    # TLS 1.2's RSA key exchange encrypts the premaster secret to an RSA key.
    return _key_usage(
        digital_signature=True, key_encipherment=isinstance(public_key, rsa.RSAPublicKey)
    )


def _check_tower_key(public_key: object, tower: str) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return
        raise CertificateError(
            f"the certificate signing request for tower {tower!r} has an ECDSA key on "
            f"{public_key.curve.name}; only P-256 (secp256r1) is accepted"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= MINIMUM_RSA_BITS:
            return
        raise CertificateError(
            f"the certificate signing request for tower {tower!r} has a {public_key.key_size}"
            f"-bit RSA key; at least {MINIMUM_RSA_BITS} bits are required"
        )
    raise CertificateError(
        f"the certificate signing request for tower {tower!r} has a "
        f"{type(public_key).__name__}; only ECDSA P-256 and RSA keys are accepted"
    )


def _public_key_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_certificate_file(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None


def _load_private_key_file(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        # TypeError: the key is encrypted, and no password is ever given.
        raise CertificateError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(
            f"{path} holds a {type(key).__name__}; only ECDSA and RSA keys are supported"
        )
    return key


def _check_authority_certificate(certificate: x509.Certificate, path: Path) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise CertificateError(f"{path} is not the certificate of a certificate authority")
    try:
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise CertificateError(
            f"{path} has no subject key identifier, which the certificates it signs refer to"
        ) from None
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{path} may not sign certificates (its key usage has no "
                               "keyCertSign)")
    try:
        # Towers and NGINX trust this one certificate alone: it must be a root.
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{path} is not self-signed: give the root certificate "
                               "authority, not an intermediate one") from None
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MINIMUM_RSA_BITS:
        raise CertificateError(f"{path} has a {key.key_size}-bit RSA key; at least "
                               f"{MINIMUM_RSA_BITS} bits are required")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise CertificateError(f"{path} has a {type(key).__name__}; only ECDSA and RSA "
                               "keys are accepted")
    expiry = certificate.not_valid_after_utc
    if expiry <= _now():
        raise CertificateError(
            f"{path} expired on {expiry:%Y-%m-%d %H:%M} UTC; remove it and "
            f"{path.with_name(CA_KEY_FILE).name} to create a new certificate authority, "
            "then sign the towers' certificates again"
        )
