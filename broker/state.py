"""The broker's state directory: credentials made on first start and reused after.

    <state dir>/                    0700
      api-key                       the API key for creating sessions
      https/certificate.pem, key.pem    self-signed, for localhost and 127.0.0.1 (unless
                                    the operator supplies https_certificate/https_key)
      ca/ca.pem, ca-key.pem         the CA that signs tower certificates
      ca/ledger.json                every tower certificate issued, and revocations
      broker/certificate.pem, key.pem   the broker's client identity on tower links
      towers/<name>/identity.pem, ca.pem   a local tower's key + certificate, and the CA
      provisioning/id_ed25519       the broker's SSH identity for provisioning hosts
      provisioning/known_hosts      host keys pinned on first use (where allowed)

Every file is written 0600. Local towers' certificates are short-lived and made anew at
every start (and renewed over the link); everything else is kept.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .config import Settings
from .issuer import Issuer
from .pki import (
    BROKER_NAME,
    CertificateAuthority,
    CertificateError,
    certificate_expiry,
    check_server_identity,
    generate_key_and_csr,
    keep_private,
    self_signed_server_certificate,
    write_secret,
)
from .shell.server import ShellFiles
from .shell.ssh import ensure_host_key, ensure_operator_key, read_public_keys
from .towers import TowerFiles


# The broker's own certificates (its client one, its self-signed HTTPS one) are made
# again this long before they expire.
RENEWAL_MARGIN = timedelta(days=30)


def _valid_for(certificate: Path, margin: timedelta,
               issuer: x509.Certificate | None = None) -> bool:
    """Whether the certificate in the file is good for ``margin`` longer (and issued by
    ``issuer``, if given: a CA imported since makes it useless)."""
    try:
        data = certificate.read_bytes()
        expiry = certificate_expiry(data)
        if issuer is not None:
            x509.load_pem_x509_certificate(data).verify_directly_issued_by(issuer)
    except (OSError, CertificateError, ValueError, TypeError, InvalidSignature):
        return False
    return expiry - datetime.now(timezone.utc) > margin


@dataclass(frozen=True)
class BrokerFiles:
    directory: Path
    api_key: str
    https_certificate: Path
    https_key: Path
    ca_certificate: Path
    client_certificate: Path
    client_key: Path


def _read_or_make(path: Path, make: Callable[[], bytes]) -> bytes:
    if path.exists() or path.is_symlink():
        keep_private(path)
        return path.read_bytes()
    data = make()
    write_secret(path, data)
    return data


def prepare(settings: Settings) -> tuple[BrokerFiles, Issuer]:
    """Make (or reuse) everything the broker needs in its state directory.

    Raises:
        CertificateError: the CA's files, or the operator's HTTPS certificate and key,
            cannot be used (the message names the file).
    """
    directory = settings.state_dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_key = _read_or_make(
        directory / "api-key", lambda: ("bk_" + secrets.token_urlsafe(24)).encode()
    ).decode(errors="replace").strip()
    if api_key.split() != [api_key] or not api_key.isprintable():
        # An empty key would let "Authorization: Bearer" with none through.
        raise OSError(errno.EINVAL, "the API key must be one word; remove the file to "
                      "have a new one made", str(directory / "api-key"))
    https = directory / "https"
    https_certificate, https_key = https / "certificate.pem", https / "key.pem"
    if settings.https_certificate:
        https_certificate = Path(settings.https_certificate).expanduser()
        https_key = Path(settings.https_key).expanduser()
        check_server_identity(https_certificate, https_key)
    elif not _valid_for(https_certificate, RENEWAL_MARGIN) or not https_key.exists():
        key, certificate = self_signed_server_certificate()
        write_secret(https_key, key)
        write_secret(https_certificate, certificate)
    else:
        keep_private(https_key)
    authority = CertificateAuthority.load_or_create(directory / "ca", settings.ca_key_type)
    client = directory / "broker"
    if not _valid_for(client / "certificate.pem", RENEWAL_MARGIN,
                      authority.certificate) or not (
        client / "key.pem"
    ).exists():
        key, certificate = authority.issue(BROKER_NAME, client_only=True)
        write_secret(client / "key.pem", key)
        write_secret(client / "certificate.pem", certificate)
    else:
        keep_private(client / "key.pem")
    files = BrokerFiles(
        directory=directory,
        api_key=api_key,
        https_certificate=https_certificate,
        https_key=https_key,
        ca_certificate=directory / "ca" / "ca.pem",
        client_certificate=client / "certificate.pem",
        client_key=client / "key.pem",
    )
    lifetime = timedelta(seconds=settings.tower_certificate_lifetime)
    return files, Issuer(authority, directory / "ca", lifetime, settings.tower_key_type)


def prepare_local_tower(directory: Path, issuer: Issuer, name: str, address: str) -> TowerFiles:
    """A local tower's key (made for it, as a remote tower makes its own) and certificate."""
    tower = directory / "towers" / name
    key, csr = generate_key_and_csr(name, issuer.key_type)
    certificate = issuer.sign(csr, name, addresses=[address])
    write_secret(tower / "identity.pem", key + certificate)
    write_secret(tower / "ca.pem", issuer.authority.certificate_pem)
    return TowerFiles(tower / "identity.pem", tower / "ca.pem")


def provisioning_identity(directory: Path) -> Path:
    """The broker's SSH key for provisioning hosts (made once); its ``.pub`` beside it."""
    key = directory / "provisioning" / "id_ed25519"
    ensure_host_key(key)
    return key


def prepare_shell(directory: Path) -> tuple[ShellFiles, str]:
    """The shell's host key and the ``broker shell`` key (made once); returns the files
    and the operator key's public half."""
    shell = directory / "shell"
    files = ShellFiles(
        host_key=shell / "host-key",
        operator_key=shell / "operator-key",
        known_hosts=shell / "known_hosts",
        port_file=shell / "port",
    )
    ensure_host_key(files.host_key)
    return files, ensure_operator_key(files.operator_key)


def user_public_keys() -> list[str]:
    """The user's own public keys, authorized for the embedded default's shell."""
    home = Path.home() / ".ssh"
    return read_public_keys(sorted(home.glob("*.pub")) + [home / "authorized_keys"])
