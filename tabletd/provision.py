"""First-boot provisioning: ``tabletd provision`` (issue 7; ``docs/field-guide.md``).

Theory of operation
-------------------
The engineer copies a provisioning file to the boot partition
(``/boot/firmware/tabletd-provision.toml``, strict TOML, :func:`parse_provisioning_file`):
the device id, the server's link URL and enrolment URL, the pinned CA (PEM), the grant
public key and a one-time enrolment token. On first boot ``tabletd-provision.service`` runs
:func:`provision`, which

1. validates the file (every problem at once, each naming the key) and refuses a device that
   is already provisioned (the overlay exists);
2. generates the device key **on the device** (ECDSA P-256, ``cryptography``) and a
   certificate signing request whose subject CN is the device id;
3. enrols (``docs/protocol.md`` section 7): one WebSocket over server-authenticated TLS,
   pinned to the file's CA, to the enrolment URL; sends the token and the CSR, receives the
   certificate. The key never leaves the tablet;
4. checks the certificate: CN = device id, the key is ours, issued by the pinned CA;
5. writes ``device.key``, ``device.pem`` and ``ca.pem`` beside the overlay, then **last**
   the overlay itself (``[paths] overlay``, e.g. ``/var/lib/tabletd/provisioned.toml``),
   each atomically (temp file, fsync, rename, fsync of the directory) and mode 0600. The
   overlay's existence is what "provisioned" means, so an interruption at any earlier step
   leaves a device that is plainly not provisioned, and running again starts over;
6. re-reads the configuration with the overlay merged (``tabletd.config``); if that fails
   the overlay is removed again;
7. only then deletes the provisioning file from the boot partition (it holds the token).

Run as root (the service does), the files are given to the owner of the overlay's directory
(the ``tabletd`` user owns ``/var/lib/tabletd``), so the daemon can read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from tabletd.config import Config, load_config
from tabletd.errors import ConfigError, TabletdError
from tabletd.link.grants import ID_RE, GrantKeyError, load_public_key
from tabletd.persistence import owner_when_root, write_atomically

DEFAULT_FILE = Path("/boot/firmware/tabletd-provision.toml")
FILE_FORMAT = 1
KEY_NAME = "device.key"
CERT_NAME = "device.pem"
CA_NAME = "ca.pem"

# -- the enrolment protocol (docs/protocol.md section 7) --------------------------------

ENROL_SUBPROTOCOL = Subprotocol("tabletd.enrol.v1")
ENROL_PROTOCOL = 1
ENROL_MAX_MESSAGE = 16_384
ENROL_TIMEOUT_S = 30.0
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_PEM_MAX = 8192


class ProvisionError(TabletdError, RuntimeError):
    """Provisioning cannot go on; ``problems`` each name the file and the key or step."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class EnrolmentRefused(ProvisionError):
    """The server answered ``error`` (``code`` from section 7.3)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__([f"the server refused the enrolment: {code}: {detail}"])
        self.code = code
        self.detail = detail


class EnrolMessageError(TabletdError, ValueError):
    """An enrolment message breaks section 7.2; ``code`` is the error code to answer."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class EnrolRequest:
    device_id: str
    token: str
    csr_pem: str


def encode_request(req: EnrolRequest) -> str:
    return json.dumps({"type": "enrol", "protocol": ENROL_PROTOCOL, "device_id": req.device_id,
                       "token": req.token, "csr": req.csr_pem})


def decode_request(text: str | bytes) -> EnrolRequest:
    """The server's side: a strict ``enrol`` message; raises :class:`EnrolMessageError`."""
    obj = _json_object(text)
    if obj.get("type") != "enrol":
        raise EnrolMessageError("bad_message", f"expected type 'enrol', got {obj.get('type')!r}")
    if obj.get("protocol") != ENROL_PROTOCOL or isinstance(obj.get("protocol"), bool):
        raise EnrolMessageError("bad_message", f"protocol: must be {ENROL_PROTOCOL}, got "
                                f"{obj.get('protocol')!r}")
    device_id, token, csr = obj.get("device_id"), obj.get("token"), obj.get("csr")
    if not isinstance(device_id, str) or not ID_RE.fullmatch(device_id):
        raise EnrolMessageError("bad_message", "device_id: must be 1 to 64 characters of "
                                "A-Z a-z 0-9 - _ .")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise EnrolMessageError("bad_message", "token: must be 16 to 128 characters of "
                                "A-Z a-z 0-9 - _")
    if not isinstance(csr, str) or not 0 < len(csr) <= _PEM_MAX:
        raise EnrolMessageError("bad_message", f"csr: must be a PEM string of at most "
                                f"{_PEM_MAX} characters")
    return EnrolRequest(device_id, token, csr)


def encode_enrolled(device_id: str, cert_pem: str) -> str:
    return json.dumps({"type": "enrolled", "device_id": device_id, "certificate": cert_pem})


def encode_enrol_error(code: str, detail: str) -> str:
    return json.dumps({"type": "error", "code": code, "detail": detail[:1024]})


def decode_reply(text: str | bytes, device_id: str) -> str:
    """The tablet's side: the certificate PEM of an ``enrolled`` for ``device_id``.

    Raises :class:`EnrolmentRefused` for an ``error``, :class:`ProvisionError` for anything
    else that breaks section 7.2."""
    try:
        obj = _json_object(text)
    except EnrolMessageError as exc:
        raise ProvisionError([f"enrolment: the server's answer is invalid: {exc.detail}"]) \
            from exc
    if obj.get("type") == "error":
        code, detail = obj.get("code"), obj.get("detail")
        if not isinstance(code, str) or not isinstance(detail, str):
            raise ProvisionError(["enrolment: the server's 'error' lacks a code or a detail"])
        raise EnrolmentRefused(code, detail)
    if obj.get("type") != "enrolled":
        raise ProvisionError([f"enrolment: expected 'enrolled' or 'error' from the server, got "
                              f"type {obj.get('type')!r}"])
    cert = obj.get("certificate")
    if obj.get("device_id") != device_id or not isinstance(cert, str):
        raise ProvisionError([f"enrolment: the server's 'enrolled' must carry device_id "
                              f"{device_id!r} and a certificate string"])
    return cert


def _json_object(text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        raise EnrolMessageError("bad_message", "binary frames are not part of enrolment")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise EnrolMessageError("bad_message", f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise EnrolMessageError("bad_message", "not a JSON object")
    return obj


# -- the provisioning file ---------------------------------------------------------------


@dataclass(frozen=True)
class ProvisioningFile:
    """``tabletd-provision.toml``: what the engineer gives the tablet (field guide)."""

    device_id: str
    url: str  # the link, [link] url
    enrol_url: str  # the enrolment endpoint (protocol section 7)
    ca_pem: str  # the pinned CA, [link] ca_file's content
    grant_public_key: str  # [link] grant_public_key
    token: str  # one-time enrolment token


_FILE_KEYS: dict[str, dict[str, str]] = {
    "device": {"id": "device_id"},
    "server": {"url": "url", "enrol_url": "enrol_url", "ca": "ca_pem",
               "grant_public_key": "grant_public_key"},
    "enrolment": {"token": "token"},
}


def parse_provisioning_file(text: str, source: str) -> ProvisioningFile:
    """Parse and check a provisioning file; raises :class:`ProvisionError` listing every
    problem, each naming the file and the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError([f"{source}: not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    values: dict[str, str] = {}
    if raw.get("format") != FILE_FORMAT or isinstance(raw.get("format"), bool):
        problems.append(f"{source}: format = {raw.get('format')!r}: must be {FILE_FORMAT} "
                        "(the provisioning file format this tabletd reads)")
    for name, table in raw.items():
        if name == "format":
            continue
        if name not in _FILE_KEYS:
            problems.append(f"{source}: [{name}]: unknown section (known: "
                            f"{', '.join(sorted(_FILE_KEYS))})")
        elif not isinstance(table, dict):
            problems.append(f"{source}: [{name}] must be a table")
        else:
            for key in table:
                if key not in _FILE_KEYS[name]:
                    problems.append(f"{source}: [{name}] {key}: unknown key (known: "
                                    f"{', '.join(sorted(_FILE_KEYS[name]))})")
    for name, keys in _FILE_KEYS.items():
        table = raw.get(name)
        for key, attr in keys.items():
            value = table.get(key) if isinstance(table, dict) else None
            if value is None:
                problems.append(f"{source}: [{name}] {key}: required key is missing")
            elif not isinstance(value, str):
                problems.append(f"{source}: [{name}] {key} = {value!r}: must be a string")
            else:
                values[attr] = value.strip() if attr != "ca_pem" else value
    if not problems:
        problems += _check_values(values, source)
    if problems:
        raise ProvisionError(problems)
    return ProvisioningFile(**values)


def _check_values(v: dict[str, str], source: str) -> list[str]:
    problems: list[str] = []
    if not ID_RE.fullmatch(v["device_id"]):
        problems.append(f"{source}: [device] id = {v['device_id']!r}: must be 1 to 64 "
                        "characters of A-Z a-z 0-9 - _ .")
    for key in ("url", "enrol_url"):
        if not v[key].startswith("wss://") or len(v[key]) <= len("wss://"):
            problems.append(f"{source}: [server] {key} = {v[key]!r}: must be a wss:// URL")
    try:
        ca = x509.load_pem_x509_certificate(v["ca_pem"].encode())
    except ValueError as exc:
        problems.append(f"{source}: [server] ca: not a PEM certificate ({exc})")
    else:
        if not _is_ca(ca):
            problems.append(f"{source}: [server] ca: this certificate is not a CA "
                            "(basicConstraints CA:TRUE missing)")
    try:
        load_public_key(v["grant_public_key"])
    except GrantKeyError as exc:
        problems.append(f"{source}: [server] grant_public_key: {exc}")
    if not TOKEN_RE.fullmatch(v["token"]):
        problems.append(f"{source}: [enrolment] token: must be 16 to 128 characters of "
                        "A-Z a-z 0-9 - _ (as `tabletd-devserver token` prints it)")
    return problems


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def read_provisioning_file(path: Path) -> ProvisioningFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProvisionError([f"{path}: no provisioning file (copy tabletd-provision.toml to "
                              "the boot partition; see docs/field-guide.md)"]) from exc
    except OSError as exc:
        raise ProvisionError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ProvisionError([f"{path}: not UTF-8 text: {exc}"]) from exc
    return parse_provisioning_file(text, str(path))


# -- the device's key, the CSR, enrolment ---------------------------------------------------


def make_key_and_csr(device_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new ECDSA P-256 key, generated here, and a CSR (PEM) with subject CN = device id."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


async def enrol(pf: ProvisioningFile, csr_pem: str, *,
                timeout_s: float = ENROL_TIMEOUT_S) -> str:
    """Section 7: send the token and CSR over server-authenticated TLS pinned to the file's
    CA; return the certificate PEM. Raises :class:`EnrolmentRefused` or
    :class:`ProvisionError` (naming the URL and what failed)."""
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pf.ca_pem)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    where = f"enrolment at {pf.enrol_url}"
    try:
        async with asyncio.timeout(timeout_s), connect(
            pf.enrol_url, ssl=tls, subprotocols=[ENROL_SUBPROTOCOL], proxy=None,
            max_size=ENROL_MAX_MESSAGE, open_timeout=timeout_s, close_timeout=2,
        ) as ws:
            if ws.subprotocol != ENROL_SUBPROTOCOL:
                raise ProvisionError([f"{where}: the server chose subprotocol "
                                      f"{ws.subprotocol!r}, not {ENROL_SUBPROTOCOL}"])
            await ws.send(encode_request(EnrolRequest(pf.device_id, pf.token, csr_pem)))
            return decode_reply(await ws.recv(), pf.device_id)
    except ssl.SSLCertVerificationError as exc:
        raise ProvisionError([f"{where}: the server's certificate does not verify against "
                              f"[server] ca ({exc.verify_message}); if it says 'not yet "
                              "valid', the tablet's clock is wrong: wait for time sync"]) \
            from exc
    except TimeoutError as exc:
        raise ProvisionError([f"{where}: no answer within {timeout_s:g} s"]) from exc
    except ConnectionClosed as exc:
        raise ProvisionError([f"{where}: the server closed the connection without answering "
                              f"({exc})"]) from exc
    except InvalidStatus as exc:
        raise ProvisionError([f"{where}: the server refused the WebSocket handshake "
                              f"(HTTP {exc.response.status_code}): is this the enrolment "
                              "endpoint?"]) from exc
    except (OSError, WebSocketException) as exc:
        raise ProvisionError([f"{where}: cannot connect: {exc}"]) from exc


def check_certificate(cert_pem: str, pf: ProvisioningFile,
                      key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The issued certificate is for this device, this key, from the pinned CA."""
    where = f"the certificate from {pf.enrol_url}"
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise ProvisionError([f"{where}: not a PEM certificate ({exc})"]) from exc
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != pf.device_id:
        raise ProvisionError([f"{where}: its subject CN is not {pf.device_id!r}"])
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise ProvisionError([f"{where}: it certifies another key than the one generated "
                              "on this tablet"])
    ca = x509.load_pem_x509_certificate(pf.ca_pem.encode())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProvisionError([f"{where}: not issued by [server] ca "
                              f"({str(exc) or 'its signature does not verify'})"]) from exc
    return cert


# -- provision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    device_id: str
    overlay: Path
    key: Path
    cert: Path
    ca: Path
    removed_file: bool


def overlay_text(pf: ProvisioningFile, ca: Path, cert: Path, key: Path) -> str:
    """The overlay: only what provisioning owns (``tabletd.config.OVERLAY_KEYS``)."""
    return (
        "# Written by `tabletd provision`: this device's identity and server.\n"
        "# Its existence means \"provisioned\"; delete it (and run provisioning again) to\n"
        "# give the tablet a new identity.\n"
        "[device]\n"
        f"id = {json.dumps(pf.device_id)}\n"
        "\n[link]\n"
        f"url = {json.dumps(pf.url)}\n"
        f"ca_file = {json.dumps(str(ca))}\n"
        f"cert_file = {json.dumps(str(cert))}\n"
        f"key_file = {json.dumps(str(key))}\n"
        f"grant_public_key = {json.dumps(pf.grant_public_key)}\n"
    )


def provision(cfg: Config, file: Path = DEFAULT_FILE) -> Provisioned:
    """The whole first-boot provisioning (module docstring). Raises :class:`ProvisionError`.

    ``cfg`` is the main configuration (``[paths] overlay`` says where the identity goes).
    """
    if not cfg.paths.overlay:
        raise ProvisionError([f"{cfg.source}: [paths] overlay is empty: this configuration "
                              "has nowhere to keep a provisioned identity"])
    overlay = Path(cfg.paths.overlay)
    if overlay.exists():
        raise ProvisionError([
            f"{overlay}: this tablet is already provisioned (device {cfg.device.id}); "
            f"not provisioning again. Delete {file} from the boot partition; to give the "
            f"tablet a new identity, first delete {overlay} (this forgets its key)"])
    pf = read_provisioning_file(file)
    directory = overlay.parent
    if not directory.is_dir():
        raise ProvisionError([f"{directory}: no such directory (the data partition, "
                              "[paths] overlay's directory, must be mounted)"])
    key, csr_pem = make_key_and_csr(pf.device_id)
    cert_pem = asyncio.run(enrol(pf, csr_pem))
    check_certificate(cert_pem, pf, key)
    paths = {name: directory / name for name in (KEY_NAME, CERT_NAME, CA_NAME)}
    owner = owner_when_root(directory)
    try:
        _write(paths[KEY_NAME], key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), owner)
        _write(paths[CERT_NAME], cert_pem.encode("ascii"), owner)
        _write(paths[CA_NAME], pf.ca_pem.encode("ascii"), owner)
        _write(overlay, overlay_text(pf, paths[CA_NAME], paths[CERT_NAME],
                                     paths[KEY_NAME]).encode("utf-8"), owner)
    except OSError as exc:
        with contextlib.suppress(OSError):
            overlay.unlink()
        raise ProvisionError([f"{directory}: cannot write the identity: {exc}"]) from exc
    try:
        merged = load_config(cfg.source)
    except ConfigError as exc:
        overlay.unlink()
        raise ProvisionError([f"{overlay}: removed again: the configuration with it is "
                              "invalid:", *exc.problems]) from exc
    if merged.device.id != pf.device_id or merged.link.url != pf.url:
        overlay.unlink()
        raise ProvisionError([f"{overlay}: removed again: {cfg.source} does not read it "
                              f"([paths] overlay must name {overlay})"])
    return Provisioned(pf.device_id, overlay, paths[KEY_NAME], paths[CERT_NAME],
                       paths[CA_NAME], removed_file=_remove_file(file))


def _remove_file(path: Path) -> bool:
    """Delete the provisioning file (its token is spent) and sync its directory."""
    try:
        path.unlink()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def _write(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    write_atomically(path, data)  # mode 0600, atomic
    if owner is not None:
        os.chown(path, *owner)
