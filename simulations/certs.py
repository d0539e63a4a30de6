"""``fedvitgan certs``: TLS certificates and hospital keys for a SuperLink deployment.

    fedvitgan certs OUT --san superlink.example.org --san 10.0.0.5 --sites 3
    fedvitgan certs OUT --site charite --site hug --site karolinska
    fedvitgan certs OUT --sites-only --site new-hospital     # add a hospital key later
    fedvitgan certs renew OUT [--san NAME ...] [--days N]    # a new SuperLink certificate, same CA

Writes, under OUT:

- ``ca.pem`` / ``ca.key``: the federation's certificate authority (keep ``ca.key`` offline);
- ``superlink.pem`` / ``superlink.key``: the SuperLink's TLS certificate, signed by the CA, whose
  subject alternative names hold every ``--san`` plus 127.0.0.1 and ::1 (the SuperLink's own
  ServerApp process dials it on loopback);
- ``sites/<name>`` / ``sites/<name>.pub``: one EC P-384 key pair per hospital in OpenSSH format
  (the private key goes to ``flower-supernode --auth-supernode-private-key``, the public key to
  ``flwr supernode register``).

Private keys are created with mode 0600 before any byte is written, with ``O_EXCL | O_NOFOLLOW``
(a file or symbolic link already at the path is never written through). Existing files are never
overwritten without ``--force`` (or, for the SuperLink's pair, ``renew``), and then only by an
atomic rename of a new file. ``--days`` is checked: 1 to 3650, and never past the CA's own expiry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.durable import atomic_write

#: Names the SuperLink certificate always carries (its own processes dial loopback).
LOOPBACK_SANS: tuple[str, ...] = ("127.0.0.1", "::1")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
SITES_DIR = "sites"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Longest certificate validity accepted by --days (the CA gets at least this long).
MAX_DAYS = 3650


class CertsError(Exception):
    """A problem the user can fix (existing files, bad names)."""


@dataclass(frozen=True)
class SiteKeyPair:
    """A hospital's SuperNode authentication key pair, both halves in OpenSSH format."""

    name: str
    private_openssh: bytes
    public_openssh: bytes


# ----------------------------------------------------------------------------- generation
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def san_entry(value: str) -> x509.GeneralName:
    """An IP address SAN for an IP literal, a DNS-name SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        if not value or any(c.isspace() for c in value) or "/" in value or ":" in value:
            raise CertsError(f"--san {value!r} is neither an IP address nor a host name") from None
        return x509.DNSName(value)


def superlink_sans(names: Iterable[str]) -> list[str]:
    """The requested names plus the loopback addresses, each once, in order."""
    seen: list[str] = []
    for name in [*names, *LOOPBACK_SANS]:
        if name not in seen:
            seen.append(name)
    return seen


def make_ca(common_name: str = "fedvitgan federation CA", days: int = 3650
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed EC P-384 certificate authority."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str],
                     days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An EC P-384 TLS server certificate signed by the CA, valid for exactly ``sans``."""
    if not sans:
        raise CertsError("the SuperLink certificate needs at least one subject alternative name")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san_entry(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keypair(name: str) -> SiteKeyPair:
    """An EC P-384 key pair for SuperNode authentication, in OpenSSH format."""
    check_site_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SiteKeyPair(name, private, public + f" {name}\n".encode())


def check_site_name(name: str) -> None:
    """Site names become file names: letters, digits, '.', '_' and '-' only."""
    if not _SITE_NAME.match(name):
        raise CertsError(f"site name {name!r}: use letters, digits, '.', '_' and '-' (no '/' or spaces)")


# ----------------------------------------------------------------------------- writing
def check_days(days: int, ca_cert: x509.Certificate | None = None) -> None:
    """``--days``: 1 to MAX_DAYS, and (with the CA) not past the CA's own expiry."""
    if not 1 <= int(days) <= MAX_DAYS:
        raise CertsError(f"--days {days}: choose 1 to {MAX_DAYS} days")
    if ca_cert is not None:
        left = ca_cert.not_valid_after_utc - _now()
        if dt.timedelta(days=int(days)) > left:
            raise CertsError(f"--days {days}: the CA certificate expires in {left.days} days "
                             f"({ca_cert.not_valid_after_utc:%Y-%m-%d}); a certificate it signs cannot outlive it")


def _write(path: Path, data: bytes, private: bool, replace: bool = False) -> Path:
    """Write ``data`` with mode 0600 (private) or 0644, set before any byte is written.

    A new file is created with ``O_EXCL | O_NOFOLLOW``: whatever is already at ``path`` (a file, a
    symbolic link planted to redirect a key) makes it fail. ``replace``: an atomic rename of a new
    file over ``path`` (the rename replaces a link itself, never its target).
    """
    mode = 0o600 if private else 0o644
    if replace:
        return atomic_write(path, data, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError as error:
        raise CertsError(f"refusing to write {path}: something is already there (pass --force to replace it)") from error
    try:
        os.fchmod(fd, mode)  # the umask must not change what was asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def planned_files(out: Path, sites: Sequence[str], sites_only: bool = False) -> list[Path]:
    """Every file a run would write."""
    files = [] if sites_only else [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    for name in sites:
        files += [out / SITES_DIR / name, out / SITES_DIR / f"{name}.pub"]
    return files


def write_bundle(out: Path, sans: Sequence[str], sites: Sequence[str], force: bool = False,
                 sites_only: bool = False, days: int = 825) -> list[Path]:
    """Generate and write the CA, the SuperLink certificate and the site keys; returns the files."""
    for name in sites:
        check_site_name(name)
    if len(set(sites)) != len(sites):
        raise CertsError(f"site names repeat: {list(sites)}")
    existing = [p for p in planned_files(out, sites, sites_only) if p.exists()]
    if existing and not force:
        raise CertsError("refusing to overwrite existing files (pass --force to replace them): "
                         + ", ".join(str(p) for p in existing))
    check_days(days)
    written: list[Path] = []
    if not sites_only:
        ca_key, ca_cert = make_ca(days=MAX_DAYS + 1)  # outlives any certificate it signs
        server_key, server_cert = make_server_cert(ca_key, ca_cert, superlink_sans(sans), days=days)
        written += [
            _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, replace=force),
            _write(out / CA_KEY, _private_pem(ca_key), private=True, replace=force),
            _write(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False, replace=force),
            _write(out / SERVER_KEY, _private_pem(server_key), private=True, replace=force),
        ]
    for name in sites:
        pair = make_site_keypair(name)
        written += [_write(out / SITES_DIR / name, pair.private_openssh, private=True, replace=force),
                    _write(out / SITES_DIR / f"{name}.pub", pair.public_openssh, private=False, replace=force)]
    return written


def _load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CertsError(f"{path} not found: renew needs the CA that signed the SuperLink certificate "
                             f"(bring ca.key back from where it is kept offline)")
    if os.stat(key_path).st_mode & 0o077:
        raise CertsError(f"{key_path} is readable by others (mode {oct(os.stat(key_path).st_mode & 0o777)}); "
                         f"run: chmod 600 {key_path}")
    ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
            ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertsError(f"{key_path} is not the private key of {cert_path}")
    return ca_key, ca_cert


def current_sans(cert_path: Path) -> list[str]:
    """The subject alternative names of an existing certificate, as --san values."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def renew_server_cert(out: Path, sans: Sequence[str] = (), days: int = 825) -> list[Path]:
    """A new SuperLink key and certificate signed by the existing CA in ``out``; same names unless
    ``sans`` are given. Both files are replaced atomically (the key with mode 0600)."""
    ca_key, ca_cert = _load_ca(out)
    check_days(days, ca_cert)
    if not sans:
        if not (out / SERVER_CERT).is_file():
            raise CertsError(f"{out / SERVER_CERT} not found: give the SuperLink's names with --san")
        sans = current_sans(out / SERVER_CERT)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, superlink_sans(sans), days=days)
    return [_write(out / SERVER_KEY, _private_pem(server_key), private=True, replace=True),
            _write(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False, replace=True)]


# ----------------------------------------------------------------------------- CLI
def site_names(sites: int | None, names: Sequence[str] | None) -> list[str]:
    """``--site`` names as given, else ``site-0`` .. ``site-<N-1>`` for ``--sites N``."""
    if names:
        return list(names)
    return [f"site-{i}" for i in range(sites or 0)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvitgan certs",
        description="Create a CA, the SuperLink's TLS certificate and one SuperNode authentication key "
                    "pair (EC P-384, OpenSSH format) per hospital. Private keys get mode 0600.",
        epilog="Give the SuperLink host's DNS names and IPs with --san (the hospitals dial one of them); "
               "127.0.0.1 and ::1 are always added. Keep ca.key offline; give each hospital ca.pem and "
               "its own sites/<name> key only. `fedvitgan certs renew OUT` re-issues the SuperLink "
               "certificate with the same CA. See docs/deployment.md.",
    )
    parser.add_argument("out", type=Path, help="output folder (created if missing)")
    parser.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                        help="a DNS name or IP address of the SuperLink (repeatable)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--sites", type=int, metavar="N", help="N hospital key pairs named site-0 .. site-<N-1>")
    who.add_argument("--site", action="append", metavar="NAME", help="a hospital key pair named NAME (repeatable)")
    parser.add_argument("--sites-only", action="store_true",
                        help="write only hospital key pairs (keep the existing CA and SuperLink certificate)")
    parser.add_argument("--days", type=int, default=825,
                        help=f"SuperLink certificate validity in days, 1 to {MAX_DAYS} (default 825)")
    parser.add_argument("--force", action="store_true", help="overwrite existing certificates and keys")
    return parser


def build_renew_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvitgan certs renew",
        description="Re-issue the SuperLink's TLS key and certificate with the existing CA (OUT/ca.pem and "
                    "OUT/ca.key). The hospitals keep their ca.pem and keys; restart the SuperLink afterwards.",
    )
    parser.add_argument("out", type=Path, help="the folder `fedvitgan certs` wrote")
    parser.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                        help="the SuperLink's DNS names and IPs (repeatable; default: those of the current certificate)")
    parser.add_argument("--days", type=int, default=825, help=f"validity in days, 1 to {MAX_DAYS} (default 825)")
    return parser


def renew_main(argv: list[str]) -> int:
    """``fedvitgan certs renew``; returns the exit code."""
    args = build_renew_parser().parse_args(argv)
    try:
        written = renew_server_cert(args.out, args.san, args.days)
    except (CertsError, OSError, ValueError) as error:
        print(f"fedvitgan certs renew: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}  ({oct(path.stat().st_mode & 0o777)})")
    cert = x509.load_pem_x509_certificate(written[1].read_bytes())
    print(f"SuperLink certificate names: {', '.join(current_sans(written[1]))}; valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d}. Restart the SuperLink to use it.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedvitgan certs``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["renew"]:
        return renew_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.sites is not None and args.sites < 0:
        print("fedvitgan certs: --sites must be >= 0", file=sys.stderr)
        return 2
    sites = site_names(args.sites, args.site)
    if args.sites_only and not sites:
        print("fedvitgan certs: --sites-only needs --sites N or --site NAME", file=sys.stderr)
        return 2
    try:
        written = write_bundle(args.out, args.san, sites, force=args.force, sites_only=args.sites_only,
                               days=args.days)
    except (CertsError, OSError) as error:
        print(f"fedvitgan certs: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}  ({oct(path.stat().st_mode & 0o777)})")
    if not args.sites_only:
        print(f"SuperLink certificate names: {', '.join(superlink_sans(args.san))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
