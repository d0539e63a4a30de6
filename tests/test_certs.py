"""`fedvitgan certs`: the CA, the SuperLink certificate and hospital keys (fast, no Flower processes)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from simulations import certs
from simulations.cli import main as fedvitgan


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(server_cert: Path, server_key: Path, trusted_ca: Path, server_hostname: str) -> None:
    """A TLS handshake on 127.0.0.1 with the given server certificate, verified against ``trusted_ca``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    client_ctx = ssl.create_default_context(cafile=str(trusted_ca))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                    client_ctx.wrap_socket(sock, server_hostname=server_hostname):
                pass
        finally:
            thread.join(timeout=10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    assert fedvitgan(["certs", str(out), "--san", "superlink.example.org", "--san", "10.1.2.3",
                      "--site", "charite", "--site", "hug"]) == 0
    return out


def test_superlink_certificate_verifies_against_the_ca_and_carries_the_sans(bundle: Path) -> None:
    ca = x509.load_pem_x509_certificate((bundle / certs.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((bundle / certs.SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.1.2.3", "127.0.0.1", "::1")}
    # A real handshake: the certificate is accepted for the loopback IP (what the SuperLink's own
    # processes dial) and for the requested name, with hostname checking on.
    _handshake(bundle / certs.SERVER_CERT, bundle / certs.SERVER_KEY, bundle / certs.CA_CERT, "127.0.0.1")
    _handshake(bundle / certs.SERVER_CERT, bundle / certs.SERVER_KEY, bundle / certs.CA_CERT, "superlink.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(bundle / certs.SERVER_CERT, bundle / certs.SERVER_KEY, bundle / certs.CA_CERT, "other.example.org")


def test_a_client_trusting_another_ca_rejects_the_superlink(bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.write_bundle(other, [], [])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(bundle / certs.SERVER_CERT, bundle / certs.SERVER_KEY, other / certs.CA_CERT, "127.0.0.1")


def test_private_keys_are_0600_and_public_files_0644(bundle: Path) -> None:
    for private in [certs.CA_KEY, certs.SERVER_KEY, "sites/charite", "sites/hug"]:
        assert _mode(bundle / private) == 0o600, private
    for public in [certs.CA_CERT, certs.SERVER_CERT, "sites/charite.pub", "sites/hug.pub"]:
        assert _mode(bundle / public) == 0o644, public


def test_site_keys_are_ec_p384_openssh_pairs(bundle: Path) -> None:
    for name in ("charite", "hug"):
        private_bytes = (bundle / "sites" / name).read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = load_ssh_private_key(private_bytes, password=None)
        public_text = (bundle / "sites" / f"{name}.pub").read_text()
        assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.strip().endswith(name)
        public = load_ssh_public_key(public_text.encode())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main([str(tmp_path), "--sites", "2"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(p.name for p in before) == sorted(["ca.pem", "ca.key", "superlink.pem", "superlink.key",
                                                     "site-0", "site-0.pub", "site-1", "site-1.pub"])
    capsys.readouterr()
    assert certs.main([str(tmp_path), "--sites", "2"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    (tmp_path / certs.CA_KEY).chmod(0o644)  # --force must restore private permissions
    assert certs.main([str(tmp_path), "--sites", "2", "--force"]) == 0
    assert (tmp_path / certs.CA_KEY).read_bytes() != before[tmp_path / certs.CA_KEY]
    assert _mode(tmp_path / certs.CA_KEY) == 0o600


def test_sites_only_adds_a_hospital_without_touching_the_ca(tmp_path: Path) -> None:
    assert certs.main([str(tmp_path), "--sites", "1"]) == 0
    ca = (tmp_path / certs.CA_CERT).read_bytes()
    assert certs.main([str(tmp_path), "--sites-only", "--site", "late-hospital"]) == 0
    assert (tmp_path / certs.CA_CERT).read_bytes() == ca
    assert _mode(tmp_path / "sites" / "late-hospital") == 0o600
    assert certs.main([str(tmp_path), "--sites-only", "--site", "late-hospital"]) == 1


def test_bad_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main([str(tmp_path / "a"), "--san", "not a name"]) == 1
    assert "--san" in capsys.readouterr().err
    assert certs.main([str(tmp_path / "b"), "--site", "../escape"]) == 1
    assert certs.main([str(tmp_path / "c"), "--sites-only"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        certs.main(["--help"])
    assert exit_info.value.code == 0
    assert "--san" in capsys.readouterr().out


def test_renew_reissues_the_superlink_certificate_with_the_same_ca(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert fedvitgan(["certs", str(tmp_path), "--san", "superlink.example.org", "--sites", "1"]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in (certs.CA_CERT, certs.CA_KEY, certs.SERVER_KEY,
                                                                "sites/site-0")}
    assert fedvitgan(["certs", "renew", str(tmp_path), "--days", "30"]) == 0
    assert "Restart the SuperLink" in capsys.readouterr().out
    for name in (certs.CA_CERT, certs.CA_KEY, "sites/site-0"):
        assert (tmp_path / name).read_bytes() == before[name], name  # the CA and hospital keys stay
    assert (tmp_path / certs.SERVER_KEY).read_bytes() != before[certs.SERVER_KEY]
    assert _mode(tmp_path / certs.SERVER_KEY) == 0o600
    server = x509.load_pem_x509_certificate((tmp_path / certs.SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(before[certs.CA_CERT]))
    assert 29 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 30
    assert certs.current_sans(tmp_path / certs.SERVER_CERT) == ["superlink.example.org", "127.0.0.1", "::1"]
    _handshake(tmp_path / certs.SERVER_CERT, tmp_path / certs.SERVER_KEY, tmp_path / certs.CA_CERT, "superlink.example.org")
    assert fedvitgan(["certs", "renew", str(tmp_path), "--san", "new.example.org"]) == 0
    assert certs.current_sans(tmp_path / certs.SERVER_CERT) == ["new.example.org", "127.0.0.1", "::1"]
    # Without the CA key (kept offline), or with one others can read, nothing is written.
    (tmp_path / certs.CA_KEY).chmod(0o640)
    assert fedvitgan(["certs", "renew", str(tmp_path)]) == 1
    assert "readable by others" in capsys.readouterr().err
    (tmp_path / certs.CA_KEY).unlink()
    assert fedvitgan(["certs", "renew", str(tmp_path)]) == 1
    assert "ca.key not found" in capsys.readouterr().err


def test_days_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for days in ("0", "-5", "3651"):
        assert fedvitgan(["certs", str(tmp_path / days), "--days", days]) == 1
        assert "--days" in capsys.readouterr().err
        assert not (tmp_path / days).exists() or not any((tmp_path / days).iterdir())
    assert fedvitgan(["certs", str(tmp_path / "ok"), "--days", "3650"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ok" / certs.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "ok" / certs.SERVER_CERT).read_bytes())
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    # Renewing past the CA's own expiry is refused.
    with pytest.raises(certs.CertsError, match="cannot outlive it"):
        certs.check_days(30, certs.make_ca(days=10)[1])


def test_a_key_path_taken_by_a_symlink_is_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("do not touch")
    out = tmp_path / "bundle"
    (out / "sites").mkdir(parents=True)
    (out / "sites" / "hug").symlink_to(target)  # planted before the key is written
    with pytest.raises(certs.CertsError):
        certs._write(out / "sites" / "hug", b"secret", private=True)
    assert target.read_text() == "do not touch"
    # --force replaces the link itself (an atomic rename), never the file it points to.
    certs._write(out / "sites" / "hug", b"secret", private=True, replace=True)
    assert target.read_text() == "do not touch" and not (out / "sites" / "hug").is_symlink()
    assert _mode(out / "sites" / "hug") == 0o600


def test_superlink_script_refuses_a_private_key_readable_by_others(tmp_path: Path) -> None:
    import subprocess

    from simulations.deployment import SCRIPTS_DIR

    certs.write_bundle(tmp_path, ["localhost"], [])
    (tmp_path / certs.SERVER_KEY).chmod(0o644)
    done = subprocess.run(["bash", str(SCRIPTS_DIR / "superlink.sh"), str(tmp_path), str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "superlink.key is readable by others" in done.stderr
