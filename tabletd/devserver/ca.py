"""REFERENCE SERVER — development and tests only, never installed on a tablet.

The development CA: one self-signed ECDSA P-256 CA that issues the server's certificate
(serverAuth, SAN IP 127.0.0.1 and DNS localhost) and the devices' certificates (clientAuth,
subject CN = device id, as ``docs/protocol.md`` section 1 requires), plus the Ed25519 key
that signs call grants (section 3.2). Private keys are written mode 0600, never overwritten.

A production CA keeps its key offline; this one keeps it next to the store because it only
serves development, the demo and tests.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import shutil
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tabletd.devserver import DevServerError
from tabletd.link.grants import ID_RE

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
GRANT_KEY = "grant_signing.key"
GRANT_PUBLIC_KEY = "grant_public_key.txt"
DEVICES = "devices"
DEVICE_CERT = "device.pem"
DEVICE_KEY = "device.key"

CA_DAYS = 3650
LEAF_DAYS = 825


class CsrError(DevServerError, ValueError):
    """A certificate signing request that cannot be signed (unreadable, bad signature, key
    type not accepted); the message says which."""


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a protocol ``id``; raise :class:`DevServerError` if not."""
    if not ID_RE.fullmatch(device_id):
        raise DevServerError(f"device id {device_id!r}: must be 1 to 64 characters of "
                             "A-Z a-z 0-9 - _ . (docs/protocol.md section 3)")
    return device_id


def init(directory: Path) -> None:
    """Create the CA, the server identity and the grant-signing key in ``directory``.

    The directory is created if needed. Raises :class:`DevServerError` if it already holds a
    CA (refusing to overwrite keys devices may already trust).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT, GRANT_KEY, GRANT_PUBLIC_KEY):
        if (directory / name).exists():
            raise DevServerError(f"{directory / name}: already exists; not overwriting "
                                 "(use a new directory for a new CA)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tabletd development CA")])
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / CA_KEY, ca_key)
    _write_cert(directory / CA_CERT, ca_cert)

    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    server_cert = _issue(ca_key, ca_cert, server_key.public_key(), "localhost",
                         ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    _write_key(directory / SERVER_KEY, server_key)
    _write_cert(directory / SERVER_CERT, server_cert)

    grant_key = ed25519.Ed25519PrivateKey.generate()
    _write_key(directory / GRANT_KEY, grant_key)
    raw = grant_key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    (directory / GRANT_PUBLIC_KEY).write_text(base64.b64encode(raw).decode("ascii") + "\n")


def issue_device(directory: Path, device_id: str) -> tuple[Path, Path]:
    """Generate a key and a client certificate for ``device_id`` in ``DIR/devices/ID/``.

    Returns ``(key_path, cert_path)``; a copy of the CA certificate is written beside them
    (the tablet's ``[link] ca_file``). Raises :class:`DevServerError` if the device already
    has a key there, or if the CA files are missing or unreadable.
    """
    check_device_id(device_id)
    ca_key, ca_cert = _load_ca(directory)
    device_dir = directory / DEVICES / device_id
    key_path, cert_path = device_dir / DEVICE_KEY, device_dir / DEVICE_CERT
    if key_path.exists():
        raise DevServerError(f"{key_path}: already exists; not overwriting")
    device_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(ca_key, ca_cert, key.public_key(), device_id, ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    shutil.copyfile(directory / CA_CERT, device_dir / CA_CERT)
    return key_path, cert_path


def sign_csr(directory: Path, csr_pem: bytes, device_id: str) -> bytes:
    """Issue a device certificate (PEM) for a CSR generated on the tablet (enrolment).

    The certificate's CN is ``device_id`` whatever the CSR asked for, so a tablet cannot
    name itself. Raises :class:`CsrError` if the CSR is unreadable, its signature does not
    verify, or its key type is not accepted (EC or Ed25519); :class:`DevServerError` if the
    CA is unusable.
    """
    check_device_id(device_id)
    ca_key, ca_cert = _load_ca(directory)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrError(f"CSR for {device_id}: not a PEM certificate request ({exc})") \
            from exc
    if not csr.is_signature_valid:
        raise CsrError(f"CSR for {device_id}: its signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise CsrError(f"CSR for {device_id}: key type {type(public_key).__name__} "
                             "not accepted (EC or Ed25519)")
    cert = _issue(ca_key, ca_cert, public_key, device_id, ExtendedKeyUsageOID.CLIENT_AUTH)
    return cert.public_bytes(serialization.Encoding.PEM)


def csr_common_name(csr_pem: bytes) -> str | None:
    """The subject CN a CSR asks for (None if it has none); raises :class:`CsrError` if the
    CSR is unreadable."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrError(f"not a PEM certificate request ({exc})") from exc
    attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def load_grant_key(directory: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 grant-signing key; raises :class:`DevServerError` naming the file."""
    path = directory / GRANT_KEY
    key = _read_key(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DevServerError(f"{path}: not an Ed25519 private key")
    return key


def grant_public_key_b64(directory: Path) -> str:
    """The grant public key as the tablet's config wants it (32 raw bytes, base64)."""
    path = directory / GRANT_PUBLIC_KEY
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise DevServerError(f"{path}: cannot read ({exc.strerror}); run "
                             "`tabletd-devserver init` first") from exc


def device_common_name(cert: x509.Certificate) -> str | None:
    """The subject CN of a certificate, or None if it has none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# -- internals ---------------------------------------------------------------------------

_IssuablePublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
           public_key: _IssuablePublicKey, common_name: str,
           usage: x509.ObjectIdentifier, *,
           san: x509.SubjectAlternativeName | None = None) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    key = _read_key(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DevServerError(f"{key_path}: not an EC private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise DevServerError(f"{cert_path}: cannot read ({exc.strerror}); run "
                             "`tabletd-devserver init` first") from exc
    except ValueError as exc:
        raise DevServerError(f"{cert_path}: not a PEM certificate ({exc})") from exc
    return key, cert


def _read_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DevServerError(f"{path}: cannot read ({exc.strerror}); run "
                             "`tabletd-devserver init` first") from exc
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DevServerError(f"{path}: not an unencrypted PEM private key ({exc})") from exc


def create_secret_file(path: Path) -> int:
    """Open a new file for a secret (mode 0600), never replacing one; returns the fd."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise DevServerError(f"{path}: already exists; not overwriting") from exc
    except OSError as exc:
        raise DevServerError(f"{path}: cannot create ({exc.strerror})") from exc


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = create_secret_file(path)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    try:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise DevServerError(f"{path}: cannot write ({exc.strerror})") from exc
