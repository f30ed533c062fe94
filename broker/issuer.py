"""Tower certificates: signed by the broker's CA, recorded, and revocable.

The ``Issuer`` signs every tower certificate the broker hands out (at provisioning, at
each renewal over a link, and for local towers) and records it in ``ca/ledger.json`` in
the state directory: serial, tower, expiry, and whether it is revoked. A tower has one
key in use: a certificate for a new key revokes the tower's earlier ones in the same step
(a renewal over a link leaves the one it replaces to expire, since the link still runs on
it). Revoking a tower revokes every unexpired certificate it holds; a link presenting a
revoked certificate is closed, and its renewal refused. The ledger is re-read when
another process (``broker ca revoke``) changed it; each link checks it every load
interval, whatever its tower sends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from .pki import CertificateAuthority, CertificateError, KeyType, write_secret

LEDGER_FILE = "ledger.json"
# Expired certificates stay listed this long, for the record, then are dropped.
KEEP_EXPIRED = timedelta(days=7)


class LedgerDamaged(CertificateError):
    """The ledger does not parse: nothing can be decided from it until it is repaired."""


@dataclass(frozen=True)
class Issued:
    serial: str  # hexadecimal
    tower: str
    not_after: str  # ISO 8601, UTC
    revoked: bool = False

    @property
    def expires(self) -> datetime:
        return datetime.fromisoformat(self.not_after)

    def check(self) -> None:
        """Raises ValueError unless every field has its type and the expiry is a time
        with its zone."""
        if not all(isinstance(value, str) for value in (self.serial, self.tower, self.not_after)):
            raise ValueError(f"serial, tower and not_after are strings in {self!r}")
        if not isinstance(self.revoked, bool):
            raise ValueError(f"revoked is true or false in {self!r}")
        if self.expires.tzinfo is None:
            raise ValueError(f"not_after has no time zone in {self!r}")


class Issuer:
    """Signs tower certificates with ``authority`` and keeps the ledger in ``directory``."""

    def __init__(
        self,
        authority: CertificateAuthority,
        directory: Path,
        lifetime: timedelta,
        key_type: KeyType = "ec",
    ) -> None:
        self.authority = authority
        self.lifetime = lifetime
        self.key_type = key_type
        self.path = Path(directory) / LEDGER_FILE
        self._records: dict[str, Issued] = {}
        # The ledger file as last read: replaced on every write, so its inode changes
        # even where the file system's times are too coarse to.
        self._read_version: tuple[int, int] | None = None
        self._refresh()

    def sign(self, csr_pem: bytes, tower: str, addresses: Sequence[str] = (),
             replacing: int | None = None, in_use: int | None = None) -> bytes:
        """Check and sign a tower's request, and record the certificate.

        ``replacing`` is the serial of the certificate a renewal replaces: checked in the
        same step as the new one is recorded, so that a revocation in between (another
        process's) cannot be outlived by the new certificate. Without it the request is
        for a new key (provisioning, a local tower), and the tower's earlier certificates
        are revoked in that step: those of a provisioning's failed attempts, or of a key
        the host no longer has; all but ``in_use``, the serial of the one a live link
        still runs on (a retried provisioning of a tower linked meanwhile).

        Raises:
            CertificateError: the request is refused (see ``sign_tower_csr``), or the
                certificate it replaces is revoked.
            LedgerDamaged: the ledger cannot be read.
        """
        certificate = self.authority.sign_tower_csr(
            csr_pem, expected_name=tower, lifetime=self.lifetime, addresses=addresses
        )
        parsed = x509.load_pem_x509_certificate(certificate)
        with self._locked():
            if replacing is not None:
                record = self._records.get(_serial(replacing))
                if record is not None and record.revoked:
                    raise CertificateError(f"the certificate {replacing:x} it replaces is revoked")
            else:
                self._revoke_unexpired(tower, keeping=in_use)
            self._records[_serial(parsed.serial_number)] = Issued(
                _serial(parsed.serial_number), tower, parsed.not_valid_after_utc.isoformat()
            )
            self._write()
        return certificate

    def revoke(self, tower: str) -> list[str]:
        """Revoke every unexpired certificate of ``tower``; returns their serials."""
        with self._locked():
            serials = self._revoke_unexpired(tower)
            self._write()
        return serials

    def _revoke_unexpired(self, tower: str, keeping: int | None = None) -> list[str]:
        now = datetime.now(timezone.utc)
        kept = None if keeping is None else _serial(keeping)
        serials = [
            serial for serial, record in self._records.items()
            if record.tower == tower and not record.revoked and record.expires > now
            and serial != kept
        ]  # fmt: skip
        for serial in serials:
            self._records[serial] = Issued(**{**asdict(self._records[serial]), "revoked": True})
        return serials

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Read, change and write the ledger with no other process doing the same."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            self._refresh()
            read = dict(self._records)
            try:
                yield
            except BaseException:
                # Not written (a full disk, say): what is in force is still what was read.
                self._records = read
                raise
        finally:
            os.close(descriptor)

    def is_revoked(self, serial: int) -> bool:
        self._refresh()
        record = self._records.get(_serial(serial))
        return record is not None and record.revoked

    def newest(self, tower: str) -> Issued | None:
        """The certificate last issued to ``tower`` (the one it links with), if any."""
        self._refresh()
        # The ledger keeps the order of issue.
        issued = [record for record in self._records.values() if record.tower == tower]
        return issued[-1] if issued else None

    def records(self) -> list[Issued]:
        self._refresh()
        return sorted(self._records.values(), key=lambda record: (record.tower, record.expires))

    def _refresh(self) -> None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return
        version = (status.st_ino, status.st_mtime_ns)
        if version == self._read_version:
            return
        try:
            entries = json.loads(self.path.read_bytes())
            records = {entry["serial"]: Issued(**entry) for entry in entries}
            for record in records.values():
                record.check()
        except (ValueError, TypeError, KeyError) as error:
            raise LedgerDamaged(f"{self.path} is damaged: {error}") from None
        self._records = records
        self._read_version = version

    def _write(self) -> None:
        horizon = datetime.now(timezone.utc) - KEEP_EXPIRED
        self._records = {
            serial: record for serial, record in self._records.items() if record.expires > horizon
        }
        data = json.dumps([asdict(record) for record in self._records.values()], indent=1)
        write_secret(self.path, data.encode())
        status = os.stat(self.path)
        self._read_version = (status.st_ino, status.st_mtime_ns)


def _serial(number: int) -> str:
    return format(number, "x")
