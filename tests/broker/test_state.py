"""The state directory: what the broker makes on first start, and what it takes from
the operator instead."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from broker.config import Settings
from broker.pki import (
    CertificateAuthority,
    CertificateError,
    self_signed_server_certificate,
    write_secret,
)
from broker.state import prepare, prepare_local_tower, provisioning_identity


def test_first_start_makes_everything_private_and_a_second_reuses_it(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    files, issuer = prepare(settings)
    for path in (files.https_certificate, files.https_key, files.client_key,
                 files.ca_certificate):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, issuer_again = prepare(settings)
    assert again == files
    assert issuer_again.authority.certificate == issuer.authority.certificate


def test_a_ca_replaced_since_gets_the_broker_a_client_certificate_of_its_own(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    files, _ = prepare(settings)
    # The operator moved the CA away and imported another: the towers it signs would
    # refuse a client certificate of the old one for the rest of its year.
    for name in ("ca.pem", "ca-key.pem"):
        (tmp_path / "state" / "ca" / name).unlink()
    CertificateAuthority.create("operator CA").save(tmp_path / "state" / "ca")
    files, issuer = prepare(settings)
    client = x509.load_pem_x509_certificate(files.client_certificate.read_bytes())
    client.verify_directly_issued_by(issuer.authority.certificate)


def test_a_self_signed_https_certificate_near_its_end_is_made_again(tmp_path):
    key, certificate = self_signed_server_certificate(lifetime=timedelta(days=10))
    write_secret(tmp_path / "state" / "https" / "key.pem", key)
    write_secret(tmp_path / "state" / "https" / "certificate.pem", certificate)
    files, _ = prepare(Settings(state_dir=tmp_path / "state"))
    renewed = x509.load_pem_x509_certificate(files.https_certificate.read_bytes())
    assert renewed.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(days=300)


def test_the_operators_https_certificate_is_used_as_it_is(tmp_path):
    key, certificate = self_signed_server_certificate(("broker.example",))
    write_secret(tmp_path / "https.pem", certificate)
    write_secret(tmp_path / "https-key.pem", key)
    settings = Settings(state_dir=tmp_path / "state", https_certificate=str(tmp_path / "https.pem"),
                        https_key=str(tmp_path / "https-key.pem"))
    files, _ = prepare(settings)
    assert files.https_certificate == tmp_path / "https.pem"
    assert files.https_key == tmp_path / "https-key.pem"
    assert not (tmp_path / "state" / "https").exists()


def test_an_operators_certificate_with_another_key_is_refused_naming_both(tmp_path):
    _, certificate = self_signed_server_certificate(("broker.example",))
    other_key, _ = self_signed_server_certificate(("other.example",))
    write_secret(tmp_path / "https.pem", certificate)
    write_secret(tmp_path / "https-key.pem", other_key)
    settings = Settings(state_dir=tmp_path / "state", https_certificate=str(tmp_path / "https.pem"),
                        https_key=str(tmp_path / "https-key.pem"))
    with pytest.raises(CertificateError, match="https.pem.*https-key.pem"):
        prepare(settings)


def test_a_local_towers_identity_is_its_key_and_a_recorded_certificate(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", tower_key_type="rsa")
    files, issuer = prepare(settings)
    tower = prepare_local_tower(files.directory, issuer, "tower-1", "127.0.0.1")
    pem = tower.identity.read_bytes()
    assert b"PRIVATE KEY" in pem and stat.S_IMODE(tower.identity.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
    assert certificate.public_key().key_size == 2048
    [record] = issuer.records()
    assert record.tower == "tower-1"
    assert record.serial == format(certificate.serial_number, "x")


def test_a_local_tower_started_again_revokes_its_earlier_certificate(tmp_path):
    # Its new key is the only one it has: the last start's certificate must not link.
    files, issuer = prepare(Settings(state_dir=tmp_path / "state"))
    prepare_local_tower(files.directory, issuer, "tower-1", "127.0.0.1")
    prepare_local_tower(files.directory, issuer, "tower-2", "127.0.0.1")
    prepare_local_tower(files.directory, issuer, "tower-1", "127.0.0.1")
    states = [(record.tower, record.revoked) for record in issuer.records()]
    assert sorted(states) == [("tower-1", False), ("tower-1", True), ("tower-2", False)]


def test_the_provisioning_identity_is_made_once(tmp_path):
    key = provisioning_identity(tmp_path)
    public = key.with_name("id_ed25519.pub").read_text()
    assert public.startswith("ssh-ed25519 ")
    assert provisioning_identity(tmp_path) == key
    assert key.with_name("id_ed25519.pub").read_text() == public
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n", b"two words\n"])
def test_an_api_key_file_that_is_not_one_word_is_refused(tmp_path, content):
    # An empty key let "Authorization: Bearer" with none at all through.
    settings = Settings(state_dir=tmp_path)
    prepare(settings)
    (tmp_path / "api-key").write_bytes(content)
    with pytest.raises(OSError, match="the API key must be one word"):
        prepare(settings)


def test_secrets_found_readable_by_others_are_made_private(tmp_path):
    settings = Settings(state_dir=tmp_path)
    prepare(settings)
    secrets = [tmp_path / "api-key", tmp_path / "ca" / "ca-key.pem",
               tmp_path / "https" / "key.pem", tmp_path / "broker" / "key.pem"]
    for path in secrets:
        path.chmod(0o644)
    prepare(settings)
    assert [stat.S_IMODE(path.stat().st_mode) for path in secrets] == [0o600] * len(secrets)


def test_a_secret_that_is_a_link_is_refused(tmp_path):
    settings = Settings(state_dir=tmp_path)
    prepare(settings)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "api-key").rename(elsewhere)
    (tmp_path / "api-key").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="plain file"):
        prepare(settings)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_secret_of_another_user_is_refused(tmp_path):
    settings = Settings(state_dir=tmp_path)
    prepare(settings)
    os.chown(tmp_path / "ca" / "ca-key.pem", 65534, 65534)
    with pytest.raises(PermissionError, match="broker's own user"):
        prepare(settings)
