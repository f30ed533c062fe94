"""``broker ca``: the certificate authority's status, revocations, and importing a CA.

    broker ca status            the CA, the broker's own certificates, every tower's
    broker ca revoke TOWER      revoke TOWER's certificates (a running broker closes its link
                                at the next load report and refuses its renewals)
    broker ca import CERT KEY   use an existing CA instead of making one; only before the
                                broker made its own, so no tower holds a certificate of
                                another CA
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from .config import ConfigError, load_settings
from .issuer import Issuer
from .pki import (
    CA_CERTIFICATE_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    CertificateError,
    certificate_expiry,
)


def run_ca_command(arguments: argparse.Namespace) -> int:
    try:
        settings = load_settings(arguments.config, state_dir=arguments.state_dir)
    except ConfigError as error:
        print(f"broker ca: {error}", file=sys.stderr)
        return 2
    directory = settings.state_dir / "ca"
    try:
        if arguments.ca_command == "import":
            return _import(directory, arguments.certificate, arguments.key)
        if not (directory / CA_CERTIFICATE_FILE).exists():
            print(f"broker ca: no CA in {directory} yet; the broker makes one on its first "
                  "start, or use 'broker ca import'", file=sys.stderr)
            return 1
        authority = CertificateAuthority.load_or_create(directory)
        lifetime = timedelta(seconds=settings.tower_certificate_lifetime)
        issuer = Issuer(authority, directory, lifetime, settings.tower_key_type)
        if arguments.ca_command == "revoke":
            serials = issuer.revoke(arguments.tower)
            if not serials:
                print(f"broker ca: {arguments.tower} holds no unexpired certificate",
                      file=sys.stderr)
                return 1
            print(f"revoked {len(serials)} certificate(s) of {arguments.tower}: "
                  + ", ".join(serials))
            return 0
        print(status(issuer, settings.state_dir))
        return 0
    except (CertificateError, OSError) as error:
        print(f"broker ca: {error}", file=sys.stderr)
        return 1


def status(issuer: Issuer, state_dir: Path) -> str:
    """The CA, the broker's certificates and every tower certificate, with expiries."""
    now = datetime.now(timezone.utc)
    certificate = issuer.authority.certificate
    key = certificate.public_key()
    key_type = f"RSA-{key.key_size}" if isinstance(key, rsa.RSAPublicKey) else "ECDSA P-256"
    lines = [
        f"CA            {certificate.subject.rfc4514_string()}",
        f"  key         {key_type}, signatures SHA-256",
        f"  expires     {_when(certificate.not_valid_after_utc, now)}",
    ]
    for label, path in (("broker link", state_dir / "broker" / "certificate.pem"),
                        ("https", state_dir / "https" / "certificate.pem")):
        if path.exists():
            lines.append(f"{label:<13} expires {_when(certificate_expiry(path.read_bytes()), now)}")
    records = issuer.records()
    lines.append(f"towers        {len(records)} certificate(s) issued")
    for record in records:
        state = "revoked" if record.revoked else (
            "expired" if record.expires <= now else "valid")
        lines.append(f"  {record.tower:<20} {record.serial:<40} {state:<8} "
                     f"expires {_when(record.expires, now)}")
    return "\n".join(lines)


def _import(directory: Path, certificate: Path, key: Path) -> int:
    if (directory / CA_CERTIFICATE_FILE).exists() or (directory / CA_KEY_FILE).exists():
        print(f"broker ca: {directory} already has a CA; towers hold its certificates. "
              "Move it away first if you mean to replace it.", file=sys.stderr)
        return 1
    authority = CertificateAuthority.from_files(certificate, key)
    authority.save(directory)
    print(f"imported {authority.certificate.subject.rfc4514_string()} into {directory}")
    return 0


def _when(moment: datetime, now: datetime) -> str:
    left = moment - now
    if left.total_seconds() <= 0:
        return f"{moment:%Y-%m-%d %H:%M} UTC (expired)"
    hours = left.total_seconds() / 3600
    span = f"{hours / 24:.0f} days" if hours >= 48 else f"{hours:.1f} h"
    return f"{moment:%Y-%m-%d %H:%M} UTC (in {span})"
