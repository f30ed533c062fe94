"""``broker ca``: status, revoke and import, through the command line."""

import re
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker.cli import main
from broker.config import Settings
from broker.pki import CertificateAuthority, generate_key_and_csr
from broker.state import prepare


def ca(capsys, state_dir, *arguments):
    status = main(["ca", "--state-dir", str(state_dir), *arguments])
    out, err = capsys.readouterr()
    return status, out, err


def sign(issuer, tower):
    _, csr = generate_key_and_csr(tower)
    return x509.load_pem_x509_certificate(issuer.sign(csr, tower))


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def prepared(state_dir):
    files, issuer = prepare(Settings(state_dir=state_dir, local_towers=0))
    return files, issuer


# Status.


def test_status_without_a_ca_says_so(capsys, state_dir):
    status, out, err = ca(capsys, state_dir, "status")
    assert status == 1
    assert out == ""
    assert "no CA" in err and str(state_dir / "ca") in err
    assert "broker ca import" in err
    # Looking makes nothing.
    assert not (state_dir / "ca" / "ca.pem").exists()
    assert not (state_dir / "ca" / "ca-key.pem").exists()


def test_status_shows_the_ca_and_the_broker_s_certificates(capsys, state_dir, prepared):
    status, out, err = ca(capsys, state_dir, "status")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("CA") and "CN=session broker development CA" in lines[0]
    assert "ECDSA P-256, signatures SHA-256" in out
    assert re.search(r"^  expires +\d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 36\d\d days\)$", out, re.M)
    assert re.search(r"^broker link +expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 36\d days\)$",
                     out, re.M)
    assert re.search(r"^https +expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in \d+ days\)$", out, re.M)
    assert "towers        0 certificate(s) issued" in out


def test_status_shows_an_rsa_ca(capsys, state_dir):
    prepare(Settings(state_dir=state_dir, local_towers=0, ca_key_type="rsa"))
    status, out, _ = ca(capsys, state_dir, "status")
    assert status == 0
    assert "RSA-2048, signatures SHA-256" in out
    assert "ECDSA" not in out


def test_status_lists_the_towers_certificates(capsys, state_dir, prepared):
    _, issuer = prepared
    first = sign(issuer, "tower-eu-1")
    second = sign(issuer, "tower-us-1")
    status, out, _ = ca(capsys, state_dir, "status")
    assert status == 0
    assert "towers        2 certificate(s) issued" in out
    for tower, certificate in (("tower-eu-1", first), ("tower-us-1", second)):
        (line,) = [line for line in out.splitlines() if tower in line]
        assert format(certificate.serial_number, "x") in line
        assert " valid " in line
        assert "UTC (in 24.0 h)" in line or "UTC (in 23.9 h)" in line


def test_status_reads_the_configuration_file(capsys, tmp_path, prepared, state_dir):
    config = tmp_path / "broker.toml"
    config.write_text(f'state_dir = "{state_dir}"\n')
    status = main(["ca", "--config", str(config), "status"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert "ECDSA P-256" in out


def test_a_bad_configuration_exits_2(capsys, tmp_path, state_dir):
    config = tmp_path / "broker.toml"
    config.write_text("ca_key_type = 'dsa'\n")
    status = main(["ca", "--state-dir", str(state_dir), "--config", str(config), "status"])
    _, err = capsys.readouterr()
    assert status == 2
    assert err.startswith("broker ca: ") and "ca_key_type" in err


def test_ca_without_a_subcommand_prints_help_and_exits_2(capsys, state_dir):
    status, out, err = ca(capsys, state_dir)
    assert status == 2
    assert "usage" in err


def test_a_damaged_ledger_is_reported_not_a_traceback(capsys, state_dir, prepared):
    (state_dir / "ca" / "ledger.json").write_text("{")
    status, out, err = ca(capsys, state_dir, "status")
    assert status == 1
    assert "ledger.json" in err and "damaged" in err


# Revoke.


def test_revoke_revokes_and_status_shows_it(capsys, state_dir, prepared):
    _, issuer = prepared
    revoked = sign(issuer, "tower-eu-1")
    kept = sign(issuer, "tower-us-1")
    status, out, err = ca(capsys, state_dir, "revoke", "tower-eu-1")
    assert status == 0, err
    serial = format(revoked.serial_number, "x")
    assert out.strip() == f"revoked 1 certificate(s) of tower-eu-1: {serial}"
    # The running broker's issuer sees it (the ledger changed on disk).
    assert issuer.is_revoked(revoked.serial_number)
    assert not issuer.is_revoked(kept.serial_number)
    status, out, _ = ca(capsys, state_dir, "status")
    (line,) = [line for line in out.splitlines() if "tower-eu-1" in line]
    assert " revoked " in line
    (line,) = [line for line in out.splitlines() if "tower-us-1" in line]
    assert " valid " in line


def test_revoke_of_an_unknown_tower_exits_1(capsys, state_dir, prepared):
    status, out, err = ca(capsys, state_dir, "revoke", "tower-nowhere")
    assert status == 1
    assert out == ""
    assert "tower-nowhere holds no unexpired certificate" in err


def test_revoking_twice_exits_1_the_second_time(capsys, state_dir, prepared):
    sign(prepared[1], "tower-eu-1")
    assert ca(capsys, state_dir, "revoke", "tower-eu-1")[0] == 0
    status, _, err = ca(capsys, state_dir, "revoke", "tower-eu-1")
    assert status == 1
    assert "holds no unexpired certificate" in err


def test_revoke_without_a_ca_exits_1(capsys, state_dir):
    status, _, err = ca(capsys, state_dir, "revoke", "tower-eu-1")
    assert status == 1
    assert "no CA" in err


# Import.


@pytest.fixture(scope="module")
def operator_ca(tmp_path_factory):
    authority = CertificateAuthority.create("operator CA", lifetime=timedelta(days=400))
    directory = tmp_path_factory.mktemp("operator-ca")
    authority.save(directory)
    return authority, directory / "ca.pem", directory / "ca-key.pem"


def test_import_a_ca_into_a_fresh_state_directory(capsys, state_dir, operator_ca):
    authority, certificate, key = operator_ca
    status, out, err = ca(capsys, state_dir, "import", str(certificate), str(key))
    assert status == 0, err
    assert "CN=operator CA" in out and str(state_dir / "ca") in out
    _, issuer = prepare(Settings(state_dir=state_dir, local_towers=0))
    assert issuer.authority.certificate == authority.certificate
    assert (state_dir / "ca" / "ca.pem").read_bytes() == authority.certificate_pem
    # The broker's own link certificate is signed by the imported CA.
    client = x509.load_pem_x509_certificate((state_dir / "broker" / "certificate.pem")
                                            .read_bytes())
    assert client.issuer == authority.certificate.subject
    status, out, _ = ca(capsys, state_dir, "status")
    assert status == 0 and "CN=operator CA" in out


def test_import_refuses_when_a_ca_exists(capsys, state_dir, prepared, operator_ca):
    _, certificate, key = operator_ca
    before = (state_dir / "ca" / "ca.pem").read_bytes()
    status, out, err = ca(capsys, state_dir, "import", str(certificate), str(key))
    assert status == 1
    assert out == ""
    assert "already has a CA" in err
    assert (state_dir / "ca" / "ca.pem").read_bytes() == before


def test_import_refuses_when_only_the_ca_key_exists(capsys, state_dir, operator_ca):
    _, certificate, key = operator_ca
    (state_dir / "ca").mkdir(parents=True)
    (state_dir / "ca" / "ca-key.pem").write_bytes(b"left over")
    status, _, err = ca(capsys, state_dir, "import", str(certificate), str(key))
    assert status == 1 and "already has a CA" in err


def test_import_refuses_a_certificate_that_is_not_a_ca(capsys, tmp_path, state_dir, operator_ca):
    authority, _, _ = operator_ca
    key, certificate = authority.issue("not-a-ca")
    (tmp_path / "leaf.pem").write_bytes(certificate)
    (tmp_path / "leaf-key.pem").write_bytes(key)
    status, out, err = ca(capsys, state_dir, "import", str(tmp_path / "leaf.pem"),
                          str(tmp_path / "leaf-key.pem"))
    assert status == 1
    assert out == ""
    assert "not the certificate of a certificate authority" in err
    assert "leaf.pem" in err
    assert not (state_dir / "ca" / "ca.pem").exists()


def _authority_certificate(tmp_path, key, *, signer=None, key_cert_sign=True) -> tuple:
    """A CA certificate for ``key`` (signed by ``signer``, a (key, name) pair, or by itself)
    and the files of it and its key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd CA")])
    signing_key, issuer = signer or (key, name)
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(signing_key, hashes.SHA256())
    )
    (tmp_path / "odd.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "odd-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp_path / "odd.pem", tmp_path / "odd-key.pem"


@pytest.mark.parametrize("kind, refused", [
    ("intermediate", "is not self-signed: give the root certificate authority"),
    ("no keyCertSign", "may not sign certificates"),
    ("RSA-1024", "has a 1024-bit RSA key; at least 2048 bits are required"),
])
def test_import_refuses_a_ca_no_tower_could_trust(capsys, tmp_path, state_dir, kind, refused):
    # Each of these was imported, and every link failed at its TLS handshake after.
    if kind == "intermediate":
        root = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
        files = _authority_certificate(tmp_path, ec.generate_private_key(ec.SECP256R1()),
                                       signer=(root, root_name))
    elif kind == "no keyCertSign":
        files = _authority_certificate(tmp_path, ec.generate_private_key(ec.SECP256R1()),
                                       key_cert_sign=False)
    else:
        files = _authority_certificate(tmp_path, rsa.generate_private_key(65537, 1024))
    status, out, err = ca(capsys, state_dir, "import", *map(str, files))
    assert (status, out) == (1, "")
    assert refused in err and "odd.pem" in err
    assert not (state_dir / "ca" / "ca.pem").exists()


def test_import_refuses_a_key_that_is_not_the_certificate_s(capsys, tmp_path, state_dir,
                                                            operator_ca):
    _, certificate, _ = operator_ca
    CertificateAuthority.create("another CA").save(tmp_path / "other")
    status, out, err = ca(capsys, state_dir, "import", str(certificate),
                          str(tmp_path / "other" / "ca-key.pem"))
    assert status == 1
    assert out == ""
    assert "is not the key its certificate is for" in err
    assert not (state_dir / "ca" / "ca.pem").exists()
    assert not (state_dir / "ca" / "ca-key.pem").exists()


def test_import_refuses_files_that_are_not_pem(capsys, tmp_path, state_dir, operator_ca):
    _, certificate, key = operator_ca
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    status, _, err = ca(capsys, state_dir, "import", str(junk), str(key))
    assert status == 1 and "junk.pem is not a PEM certificate" in err
    status, _, err = ca(capsys, state_dir, "import", str(certificate), str(junk))
    assert status == 1 and "junk.pem is not an unencrypted PEM private key" in err
    status, _, err = ca(capsys, state_dir, "import", str(tmp_path / "missing.pem"), str(key))
    assert status == 1 and "missing.pem" in err
    assert not (state_dir / "ca" / "ca.pem").exists()


def test_status_with_a_ca_certificate_but_no_key_exits_1_naming_both(capsys, state_dir,
                                                                      prepared):
    (state_dir / "ca" / "ca-key.pem").unlink()
    status, out, err = ca(capsys, state_dir, "status")
    assert status == 1
    assert out == ""
    assert "ca.pem exists but" in err and "ca-key.pem does not" in err
    # Nothing was made in its place.
    assert not (state_dir / "ca" / "ca-key.pem").exists()
