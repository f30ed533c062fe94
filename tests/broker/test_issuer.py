"""The issuer: tower certificates signed, recorded in ca/ledger.json, and revoked."""

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from broker.issuer import KEEP_EXPIRED, LEDGER_FILE, Issued, Issuer, LedgerDamaged
from broker.pki import CertificateAuthority, CertificateError, generate_key_and_csr

LIFETIME = timedelta(hours=2)


@pytest.fixture(scope="module")
def authority():
    return CertificateAuthority.create()


@pytest.fixture
def issuer(authority, tmp_path):
    return Issuer(authority, tmp_path / "ca", LIFETIME)


def sign(issuer: Issuer, tower: str) -> x509.Certificate:
    _, csr = generate_key_and_csr(tower)
    return x509.load_pem_x509_certificate(issuer.sign(csr, tower))


def renew(issuer: Issuer, tower: str, current: x509.Certificate) -> x509.Certificate:
    _, csr = generate_key_and_csr(tower)
    return x509.load_pem_x509_certificate(
        issuer.sign(csr, tower, replacing=current.serial_number))


def ledger(issuer: Issuer) -> list[dict]:
    return json.loads(issuer.path.read_text())


def write_ledger(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def moment(delta: timedelta) -> str:
    return (datetime.now(timezone.utc) + delta).isoformat()


# Signing and recording.


def test_a_new_issuer_has_no_ledger_and_no_records(issuer):
    assert issuer.records() == []
    assert not issuer.path.exists()
    assert issuer.path.name == LEDGER_FILE


def test_sign_records_serial_tower_and_expiry(issuer):
    certificate = sign(issuer, "tower-1")
    serial = format(certificate.serial_number, "x")
    assert ledger(issuer) == [{
        "serial": serial,
        "tower": "tower-1",
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "revoked": False,
    }]
    (record,) = issuer.records()
    assert record == Issued(serial, "tower-1", certificate.not_valid_after_utc.isoformat())
    assert record.expires == certificate.not_valid_after_utc
    # The lifetime is the issuer's (give or take the signing moment).
    left = record.expires - datetime.now(timezone.utc)
    assert LIFETIME - timedelta(minutes=1) < left <= LIFETIME


def test_the_ledger_is_readable_by_its_owner_only(issuer):
    sign(issuer, "tower-1")
    assert stat.S_IMODE(issuer.path.stat().st_mode) == 0o600


def test_records_are_sorted_by_tower_and_expiry_and_kept_across_instances(
    authority, issuer, tmp_path
):
    sign(issuer, "tower-b")
    sign(issuer, "tower-a")
    sign(issuer, "tower-b")
    towers = [record.tower for record in issuer.records()]
    assert towers == ["tower-a", "tower-b", "tower-b"]
    again = Issuer(authority, tmp_path / "ca", LIFETIME)
    assert again.records() == issuer.records()


def test_a_request_for_another_name_is_refused_and_not_recorded(issuer):
    sign(issuer, "tower-1")
    _, csr = generate_key_and_csr("tower-2")
    with pytest.raises(CertificateError, match="tower-2"):
        issuer.sign(csr, "tower-1")
    assert [record.tower for record in issuer.records()] == ["tower-1"]
    assert len(ledger(issuer)) == 1


def test_a_request_that_is_not_pem_is_refused_and_nothing_is_written(issuer):
    with pytest.raises(CertificateError):
        issuer.sign(b"not a request", "tower-1")
    assert not issuer.path.exists()


def test_the_certificate_carries_the_addresses(issuer):
    _, csr = generate_key_and_csr("tower-1")
    certificate = x509.load_pem_x509_certificate(issuer.sign(csr, "tower-1", ["10.0.0.7"]))
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.7"
    ]


# Revocation.


def test_revoke_marks_only_that_tower_s_certificates_and_returns_their_serials(issuer):
    first = sign(issuer, "tower-1")
    second = renew(issuer, "tower-1", first)
    other = sign(issuer, "tower-2")
    serials = issuer.revoke("tower-1")
    assert sorted(serials) == sorted(
        format(certificate.serial_number, "x") for certificate in (first, second)
    )
    assert issuer.is_revoked(first.serial_number)
    assert issuer.is_revoked(second.serial_number)
    assert not issuer.is_revoked(other.serial_number)
    on_disk = {entry["serial"]: entry["revoked"] for entry in ledger(issuer)}
    assert on_disk == {
        format(first.serial_number, "x"): True,
        format(second.serial_number, "x"): True,
        format(other.serial_number, "x"): False,
    }


def test_a_certificate_for_a_new_key_revokes_the_tower_s_earlier_ones(issuer):
    # A provisioning's failed attempt, then the one that succeeds: the host holds the
    # second key only, and the first certificate must not link any more.
    failed_attempt = sign(issuer, "tower-1")
    renewed = renew(issuer, "tower-1", failed_attempt)
    other = sign(issuer, "tower-2")
    provisioned = sign(issuer, "tower-1")
    assert issuer.is_revoked(failed_attempt.serial_number)
    assert issuer.is_revoked(renewed.serial_number)
    assert not issuer.is_revoked(provisioned.serial_number)
    assert not issuer.is_revoked(other.serial_number)
    assert issuer.newest("tower-1").serial == format(provisioned.serial_number, "x")
    on_disk = {entry["serial"]: entry["revoked"] for entry in ledger(issuer)}
    assert on_disk == {
        format(failed_attempt.serial_number, "x"): True,
        format(renewed.serial_number, "x"): True,
        format(other.serial_number, "x"): False,
        format(provisioned.serial_number, "x"): False,
    }


def test_a_certificate_for_a_new_key_keeps_the_one_a_live_link_runs_on(issuer):
    # A retried provisioning, its tower linked meanwhile on the first attempt's
    # certificate: that link, and its sessions, stay.
    failed_attempt = sign(issuer, "tower-1")
    linked = sign(issuer, "tower-1")
    _, csr = generate_key_and_csr("tower-1")
    retried = x509.load_pem_x509_certificate(
        issuer.sign(csr, "tower-1", in_use=linked.serial_number))
    assert issuer.is_revoked(failed_attempt.serial_number)
    assert not issuer.is_revoked(linked.serial_number)
    assert not issuer.is_revoked(retried.serial_number)


def test_a_signature_whose_ledger_cannot_be_written_revokes_nothing(issuer, monkeypatch):
    earlier = sign(issuer, "tower-1")

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("broker.issuer.write_secret", full_disk)
    _, csr = generate_key_and_csr("tower-1")
    with pytest.raises(OSError):
        issuer.sign(csr, "tower-1")
    # What is in force is what the ledger says, in this process too.
    assert not issuer.is_revoked(earlier.serial_number)
    assert [record.serial for record in issuer.records()] == [
        format(earlier.serial_number, "x")]


def test_a_renewal_leaves_the_certificate_it_replaces_to_expire(issuer):
    # The link that asked for the renewal still runs on the old one.
    current = sign(issuer, "tower-1")
    renewed = renew(issuer, "tower-1", current)
    assert not issuer.is_revoked(current.serial_number)
    assert not issuer.is_revoked(renewed.serial_number)


def test_revoking_again_or_an_unknown_tower_returns_nothing(issuer):
    sign(issuer, "tower-1")
    assert len(issuer.revoke("tower-1")) == 1
    assert issuer.revoke("tower-1") == []
    assert issuer.revoke("tower-9") == []


def test_a_certificate_signed_after_a_revocation_is_not_revoked(issuer):
    assert issuer.newest("tower-1") is None
    old = sign(issuer, "tower-1")
    issuer.revoke("tower-1")
    assert issuer.newest("tower-1").revoked
    new = sign(issuer, "tower-1")
    assert issuer.is_revoked(old.serial_number)
    assert not issuer.is_revoked(new.serial_number)
    newest = issuer.newest("tower-1")
    assert (newest.serial, newest.revoked) == (format(new.serial_number, "x"), False)


def test_a_renewal_of_a_certificate_revoked_meanwhile_is_refused(authority, tmp_path):
    # The broker checked the old certificate, then `broker ca revoke` ran, then the
    # broker signs: the new certificate must not outlive the revocation.
    broker = Issuer(authority, tmp_path / "ca", LIFETIME)
    old = sign(broker, "tower-1")
    assert not broker.is_revoked(old.serial_number)
    Issuer(authority, tmp_path / "ca", LIFETIME).revoke("tower-1")
    _, csr = generate_key_and_csr("tower-1")
    with pytest.raises(CertificateError, match=f"{old.serial_number:x} it replaces is revoked"):
        broker.sign(csr, "tower-1", replacing=old.serial_number)
    assert broker.newest("tower-1").serial == format(old.serial_number, "x")
    # A renewal of a certificate still good goes through.
    current = sign(broker, "tower-1")
    broker.sign(csr, "tower-1", replacing=current.serial_number)


def test_an_unknown_serial_is_not_revoked(issuer):
    assert not issuer.is_revoked(12345)


def test_revoke_leaves_expired_certificates_alone(authority, tmp_path):
    path = tmp_path / "ca" / LEDGER_FILE
    write_ledger(path, [
        {"serial": "a1", "tower": "tower-1", "not_after": moment(-timedelta(hours=1)),
         "revoked": False},
        {"serial": "b2", "tower": "tower-1", "not_after": moment(timedelta(hours=1)),
         "revoked": False},
    ])
    issuer = Issuer(authority, tmp_path / "ca", LIFETIME)
    assert issuer.revoke("tower-1") == ["b2"]
    assert not issuer.is_revoked(0xA1)
    assert issuer.is_revoked(0xB2)


def test_a_revocation_by_another_issuer_on_the_same_directory_is_seen(authority, tmp_path):
    broker = Issuer(authority, tmp_path / "ca", LIFETIME)
    certificate = sign(broker, "tower-1")
    assert not broker.is_revoked(certificate.serial_number)
    before = broker.path.stat().st_mtime_ns
    command = Issuer(authority, tmp_path / "ca", LIFETIME)  # `broker ca revoke`
    assert command.revoke("tower-1") == [format(certificate.serial_number, "x")]
    # Whatever the file system's time granularity, the change shows in the mtime.
    os.utime(command.path, ns=(before + 10_000_000, before + 10_000_000))
    assert broker.is_revoked(certificate.serial_number)
    assert broker.records()[0].revoked


def test_a_revocation_by_another_process_survives_the_broker_s_next_signature(
    authority, tmp_path
):
    broker = Issuer(authority, tmp_path / "ca", LIFETIME)
    revoked = sign(broker, "tower-1")
    before = broker.path.stat().st_mtime_ns
    Issuer(authority, tmp_path / "ca", LIFETIME).revoke("tower-1")
    os.utime(broker.path, ns=(before + 10_000_000, before + 10_000_000))
    renewed = sign(broker, "tower-2")
    third = Issuer(authority, tmp_path / "ca", LIFETIME)
    assert third.is_revoked(revoked.serial_number)
    assert not third.is_revoked(renewed.serial_number)


def test_a_revocation_within_the_same_mtime_tick_is_not_lost(authority, tmp_path):
    broker = Issuer(authority, tmp_path / "ca", LIFETIME)
    revoked = sign(broker, "tower-1")
    before = broker.path.stat().st_mtime_ns
    Issuer(authority, tmp_path / "ca", LIFETIME).revoke("tower-1")
    os.utime(broker.path, ns=(before, before))  # a file system with coarse timestamps
    assert broker.is_revoked(revoked.serial_number)


# A damaged ledger.


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe garbage",
    b"null",
    b'{"serial": "a1"}',
    b"[1, 2]",
    b'[{"serial": "a1", "tower": "tower-1"}]',
    b'[{"serial": "a1", "tower": "t", "not_after": "2030-01-01T00:00:00+00:00", "x": 1}]',
])
def test_a_damaged_ledger_is_refused_naming_the_file(authority, tmp_path, content):
    path = tmp_path / "ca" / LEDGER_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    # Its own kind: a tower renewing meanwhile is not to blame (tried again later).
    with pytest.raises(LedgerDamaged) as caught:
        Issuer(authority, tmp_path / "ca", LIFETIME)
    assert str(path) in str(caught.value)
    assert "damaged" in str(caught.value)


def test_a_ledger_damaged_while_running_is_refused_on_the_next_read(authority, issuer):
    sign(issuer, "tower-1")
    before = issuer.path.stat().st_mtime_ns
    issuer.path.write_text("[")
    os.utime(issuer.path, ns=(before + 10_000_000, before + 10_000_000))
    with pytest.raises(CertificateError, match=str(issuer.path)):
        issuer.is_revoked(1)


@pytest.mark.parametrize("not_after", ["next tuesday", "2030-01-01T00:00:00"])
def test_a_ledger_with_a_bad_expiry_is_refused_naming_the_file(authority, tmp_path, not_after):
    path = tmp_path / "ca" / LEDGER_FILE
    write_ledger(path, [{"serial": "a1", "tower": "tower-1", "not_after": not_after}])
    with pytest.raises(CertificateError, match=str(path)):
        Issuer(authority, tmp_path / "ca", LIFETIME).revoke("tower-1")


# Pruning.


def test_certificates_expired_longer_than_keep_expired_are_dropped_on_write(authority, tmp_path):
    path = tmp_path / "ca" / LEDGER_FILE
    write_ledger(path, [
        {"serial": "a1", "tower": "tower-1",
         "not_after": moment(-KEEP_EXPIRED - timedelta(hours=1)), "revoked": True},
        {"serial": "b2", "tower": "tower-1",
         "not_after": moment(-KEEP_EXPIRED + timedelta(hours=1)), "revoked": False},
        {"serial": "c3", "tower": "tower-2", "not_after": moment(timedelta(hours=1)),
         "revoked": False},
    ])
    issuer = Issuer(authority, tmp_path / "ca", LIFETIME)
    # Reading alone keeps everything.
    assert [record.serial for record in issuer.records()] == ["a1", "b2", "c3"]
    fresh = sign(issuer, "tower-3")
    serials = [entry["serial"] for entry in ledger(issuer)]
    assert sorted(serials) == sorted(["b2", "c3", format(fresh.serial_number, "x")])
    assert "a1" not in {record.serial for record in issuer.records()}
