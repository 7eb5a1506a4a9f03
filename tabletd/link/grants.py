"""Signed call grants (``docs/protocol.md`` section 3.2) and the server-to-boot clock mapping.

Theory of operation
-------------------
The server signs a :class:`GrantBody` with Ed25519 over :func:`canonical_grant_bytes`. The
tablet, once the message codec has parsed a ``grant`` message, hands the body and the base64
signature to :meth:`GrantVerifier.verify` together with the current :class:`ClockMapping` (made
from the hello/welcome exchange, protocol section 2) and ``now`` on CLOCK_BOOTTIME. The
verifier either raises :class:`GrantRefused` carrying a section 4 error code, or records the
nonce durably in the :class:`NonceStore` and returns a :class:`tabletd.session.Grant` whose
bounds are on the boot clock, mapped on the side that ends the call earlier (BRIEF invariants
2 and 5). Nothing here reads a clock; the only I/O is the nonce store's file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tabletd.errors import TabletdError
from tabletd.persistence import write_atomically
from tabletd.session import Grant

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

#: The domain-separation prefix of the canonical encoding (protocol section 3.2).
CANONICAL_PREFIX = b"tabletd-grant-v1\n"
#: Longest accepted span from ``issued_at_ms`` to ``not_after_ms`` (protocol section 3.2).
MAX_GRANT_SPAN_MS = 7 * 24 * 3600 * 1000
MAX_DURATION_S = 7200
#: Default bound on the round trip of the hello/welcome exchange (protocol section 2).
DEFAULT_MAX_RTT_MS = 2000
#: Default bound on the replay set; see :class:`NonceStore`.
MAX_NONCES = 10_000
NONCE_FILE = "grant-nonces.json"

_MAX_JSON_INT = 2**53 - 1
_ED25519_SIGNATURE_LEN = 64
_ED25519_PUBLIC_KEY_LEN = 32
#: An id (protocol section 3): grant and session ids, device ids, event ids.
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_NONCE = re.compile(r"[A-Za-z0-9_-]{22,64}", re.ASCII)
_STORE_FORMAT = 1

RefusalCode = Literal[
    "bad_signature", "foreign_device", "expired", "replayed", "no_clock", "bad_message",
    "refused",
]


@dataclass(frozen=True)
class GrantBody:
    """The signed body of a ``grant`` message, as the server sent it (server times, ms)."""

    grant_id: str
    device_id: str
    contact_label: str
    not_before_ms: int
    not_after_ms: int
    max_duration_s: int
    nonce: str
    issued_at_ms: int


_INT_FIELDS = frozenset(
    {"not_before_ms", "not_after_ms", "max_duration_s", "issued_at_ms"}
)


class GrantRefused(TabletdError, ValueError):
    """The tablet refuses a grant: the peer misbehaved (or the tablet's policy says no).

    ``code`` is the protocol section 4 error code to put in the ``error`` message, ``detail``
    a human-readable explanation (at most a few hundred characters; never the secret key).
    """

    def __init__(self, code: RefusalCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: RefusalCode = code
        self.detail = detail


class GrantKeyError(TabletdError, ValueError):
    """The configured grant public key (``[link] grant_public_key``) is not usable."""


class NonceStoreError(TabletdError, ValueError):
    """The replay-set file is unreadable or corrupt.

    The store refuses to start empty instead, because forgetting accepted nonces would let a
    recorded grant be replayed (BRIEF invariant 5). The caller decides: typically refuse every
    grant (and raise a fault) until an engineer has looked at the file named in the message.
    """


# ---- canonical encoding and signing ------------------------------------------------------


def _body_dict(body: GrantBody) -> dict[str, Any]:
    return {f.name: getattr(body, f.name) for f in fields(body)}


def _type_problem(body: GrantBody) -> str | None:
    """Which member has a type a grant body cannot have, or None."""
    for name, value in _body_dict(body).items():
        want = int if name in _INT_FIELDS else str
        # exact types: a bool is an int to Python but "true" in JSON, and subclasses may
        # serialise differently from what the server signed.
        if type(value) is not want:
            return f"grant.{name}: expected {want.__name__}, got {type(value).__name__}"
    return None


def canonical_grant_bytes(body: GrantBody) -> bytes:
    """The exact bytes signed by the server (protocol section 3.2, "Canonical encoding").

    ``tabletd-grant-v1`` and a line feed, then the body as compact JSON with sorted member
    names and non-ASCII characters left as they are, in UTF-8.

    Raises :class:`TypeError` when a member has the wrong type (``bool`` is not an integer
    here) and :class:`UnicodeEncodeError` (a :class:`ValueError`) when a string holds a lone
    surrogate: such a body has no canonical encoding.
    """
    problem = _type_problem(body)
    if problem is not None:
        raise TypeError(problem)
    text = json.dumps(_body_dict(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return CANONICAL_PREFIX + text.encode("utf-8")


def sign_grant(body: GrantBody, key: Ed25519PrivateKey) -> str:
    """The ``signature`` member for ``body``: Ed25519 over its canonical bytes, base64 with
    padding (RFC 4648 section 4). For the reference server and tests; tablets never sign."""
    return base64.b64encode(key.sign(canonical_grant_bytes(body))).decode("ascii")


def _strict_b64decode(text: object) -> bytes | None:
    """Decode RFC 4648 section 4 base64 with padding; None unless ``text`` is exactly the
    canonical encoding of some bytes (no white space, no other alphabet, no stray bits)."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def load_public_key(b64: str) -> Ed25519PublicKey:
    """The grant-verification key from its configured form: 32 raw bytes in base64 with
    padding (white space around it is ignored, none inside).

    Raises :class:`GrantKeyError` saying what is wrong (not base64, wrong length, ...).
    """
    if not isinstance(b64, str):
        raise GrantKeyError(f"grant public key: expected a base64 string, got {type(b64).__name__}")
    raw = _strict_b64decode(b64.strip())
    if raw is None:
        raise GrantKeyError(
            "grant public key: not valid base64 (RFC 4648 alphabet, with '=' padding)")
    if len(raw) != _ED25519_PUBLIC_KEY_LEN:
        raise GrantKeyError(
            f"grant public key: {len(raw)} bytes after base64 decoding, an Ed25519 public key "
            f"is {_ED25519_PUBLIC_KEY_LEN} raw bytes (not PEM or DER)")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:  # pragma: no cover - every 32-byte string loads today
        raise GrantKeyError(f"grant public key: not an Ed25519 key: {exc}") from exc


# ---- clock mapping -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClockMapping:
    """Server time (ms since the epoch) to CLOCK_BOOTTIME (ns), from one hello/welcome exchange.

    The server read ``server_ms`` at some boot instant in ``[t0_ns, t1_ns]`` (protocol
    section 2). Each conversion takes the end of the uncertainty that ends a call *earlier*
    (BRIEF invariant 2). Integer arithmetic only; a millisecond is exactly 10^6 ns.
    """

    server_ms: int
    t0_ns: int  # boot clock just before sending hello
    t1_ns: int  # boot clock on receiving welcome

    @classmethod
    def from_exchange(cls, t0_ns: int, t1_ns: int, server_ms: int,
                      max_rtt_ms: int = DEFAULT_MAX_RTT_MS) -> ClockMapping | None:
        """The mapping, or None when ``t1_ns < t0_ns`` or the round trip took longer than
        ``max_rtt_ms``: the caller then has no clock, and every grant is refused
        (``no_clock``) until a later exchange succeeds."""
        if t1_ns < t0_ns or t1_ns - t0_ns > max_rtt_ms * NS_PER_MS:
            return None
        return cls(server_ms=server_ms, t0_ns=t0_ns, t1_ns=t1_ns)

    @property
    def rtt_ns(self) -> int:
        return self.t1_ns - self.t0_ns

    def not_after_boot_ns(self, ms: int) -> int:
        """An *end* bound: the earliest boot instant server time ``ms`` may be, X - S + t0."""
        return (ms - self.server_ms) * NS_PER_MS + self.t0_ns

    def not_before_boot_ns(self, ms: int) -> int:
        """A *start* bound: the latest boot instant server time ``ms`` may be, X - S + t1."""
        return (ms - self.server_ms) * NS_PER_MS + self.t1_ns

    def server_now_ms_earliest(self, now_boot_ns: int) -> int:
        """The earliest the server clock can read at boot instant ``now_boot_ns`` (floored to
        the millisecond): S + (now - t1). Pass it to :meth:`NonceStore.prune`, so that a nonce
        is forgotten only once its grant has expired whatever the true offset."""
        return self.server_ms + (now_boot_ns - self.t1_ns) // NS_PER_MS


# ---- the replay set ------------------------------------------------------------------------


class NonceStore:
    """The persisted set of accepted grant nonces, each with its grant's ``not_after_ms``.

    Lives in ``grant-nonces.json`` in the state directory, loaded by the constructor. Every
    change is written atomically (temporary file, fsync, rename, fsync of the directory), so
    after :meth:`add` returns the nonce survives a crash or power loss (BRIEF invariant 5).
    The whole set is rewritten on each change; grants arrive a few times a day, and at the
    bound the file is about 1 MB.

    Bounded at ``max_nonces`` (default :data:`MAX_NONCES`, 10,000). At the bound the store
    never forgets a nonce whose grant may still be live: :meth:`add` raises
    :class:`GrantRefused` with code ``refused`` and the caller answers the grant with it.
    Space comes back only through :meth:`prune`, which the caller should run on every new
    clock mapping and periodically (:class:`GrantVerifier` also prunes when it finds the store
    full).

    Raises :class:`NonceStoreError`, naming the file, when the file exists but cannot be
    read or parsed. A missing file is an empty set (first start).
    """

    def __init__(self, state_dir: Path, max_nonces: int = MAX_NONCES) -> None:
        if max_nonces < 1:
            raise ValueError("max_nonces must be at least 1")
        self.path = state_dir / NONCE_FILE
        self.max_nonces = max_nonces
        self._nonces: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise NonceStoreError(f"{self.path}: cannot read the grant replay set: "
                                  f"{exc.strerror}") from exc
        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are
            raise NonceStoreError(f"{self.path}: grant replay set is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != _STORE_FORMAT:
            raise NonceStoreError(f"{self.path}: grant replay set has an unknown format")
        nonces = doc.get("nonces")
        if not isinstance(nonces, dict):
            raise NonceStoreError(f"{self.path}: grant replay set: 'nonces' is not an object")
        for nonce, not_after in nonces.items():
            if type(not_after) is not int:
                raise NonceStoreError(
                    f"{self.path}: grant replay set: nonce {nonce[:64]!r} has not_after_ms "
                    f"{not_after!r}, not an integer")
        return dict(nonces)

    def _write(self, nonces: dict[str, int]) -> None:
        body = json.dumps({"format": _STORE_FORMAT, "nonces": nonces}, sort_keys=True,
                          separators=(",", ":"))
        write_atomically(self.path, body.encode("utf-8"))

    def __len__(self) -> int:
        return len(self._nonces)

    @property
    def full(self) -> bool:
        return len(self._nonces) >= self.max_nonces

    def seen(self, nonce: str) -> bool:
        """Whether ``nonce`` was accepted and has not been pruned since."""
        return nonce in self._nonces

    def add(self, nonce: str, not_after_ms: int) -> None:
        """Record an accepted nonce; durable on disk before this returns.

        Raises :class:`GrantRefused` (``refused``) when the store is full, and
        :class:`OSError` when the file cannot be written; in both cases the set is unchanged
        and the grant must be refused. Raises :class:`ValueError` if ``nonce`` is already
        recorded (check :meth:`seen` first).
        """
        if nonce in self._nonces:
            raise ValueError(f"nonce {nonce!r} is already recorded")  # the caller's bug
        if self.full:
            raise GrantRefused("refused", f"grant replay set full ({self.max_nonces} unexpired "
                                          "nonces); try again after older grants expire")
        updated = dict(self._nonces)
        updated[nonce] = not_after_ms
        self._write(updated)
        self._nonces = updated

    def prune(self, server_now_ms_earliest: int) -> int:
        """Forget the nonces whose grant's ``not_after_ms`` has passed, i.e. is at or before
        ``server_now_ms_earliest`` (from :meth:`ClockMapping.server_now_ms_earliest`). Returns
        how many were forgotten. Raises :class:`OSError` if the smaller set cannot be written
        (the nonces are forgotten in memory anyway: keeping them on disk is harmless)."""
        kept = {n: t for n, t in self._nonces.items() if t > server_now_ms_earliest}
        removed = len(self._nonces) - len(kept)
        if removed:
            self._nonces = kept
            self._write(kept)
        return removed


# ---- verification --------------------------------------------------------------------------


def _format_problem(body: GrantBody) -> str | None:
    """The first member out of the bounds of protocol sections 3 and 3.2, or None."""
    if not ID_RE.fullmatch(body.grant_id):
        return "grant.grant_id: not an id (1-64 of A-Z a-z 0-9 - _ .)"
    if len(body.contact_label) > 64:
        return "grant.contact_label: longer than 64 characters"
    if not _NONCE.fullmatch(body.nonce):
        return "grant.nonce: not 22-64 characters of base64url without padding"
    for name in sorted(_INT_FIELDS):
        value = getattr(body, name)
        if not 0 <= value <= _MAX_JSON_INT:
            return f"grant.{name}: {value} is outside [0, 2^53 - 1]"
    if not 1 <= body.max_duration_s <= MAX_DURATION_S:
        return f"grant.max_duration_s: {body.max_duration_s} is outside 1-{MAX_DURATION_S}"
    if body.not_after_ms <= body.not_before_ms:
        return "grant.not_after_ms: not after not_before_ms"
    if body.not_after_ms - body.issued_at_ms > MAX_GRANT_SPAN_MS:
        return "grant.not_after_ms: more than 7 days after issued_at_ms"
    return None


class GrantVerifier:
    """Decides whether this tablet accepts a grant (protocol section 3.2; BRIEF invariant 5).

    ``public_key`` is the server's grant key (see :func:`load_public_key`), ``device_id`` this
    tablet's id, ``nonces`` the persisted replay set.
    """

    def __init__(self, public_key: Ed25519PublicKey, device_id: str,
                 nonces: NonceStore) -> None:
        self.public_key = public_key
        self.device_id = device_id
        self.nonces = nonces

    def verify(self, body: GrantBody, signature_b64: str, mapping: ClockMapping | None,
               now_boot_ns: int) -> Grant:
        """Check a grant and, if it is accepted, record its nonce durably and return it mapped
        to the boot clock, ready for :class:`tabletd.session.GrantReceived`.

        Checks, in this order, each failure raising :class:`GrantRefused` with its code:

        1. the body has the member types of a grant at all (``bad_message``): without them
           it has no canonical encoding to check a signature against;
        2. the signature is canonical base64 of 64 bytes and verifies (``bad_signature``);
        3. ``device_id`` is this tablet's (``foreign_device``);
        4. a clock mapping exists (``no_clock``);
        5. the members are within their bounds, ``not_after_ms > not_before_ms``,
           ``max_duration_s`` in 1-7200, ``not_after_ms - issued_at_ms`` at most 7 days
           (``bad_message``);
        6. the mapped ``not_after`` (earliest end) is after ``now_boot_ns`` (``expired``);
        7. the nonce is unseen (``replayed``);
        8. the nonce is recorded durably (``refused`` if the replay set is full even after
           pruning, or cannot be written).

        A grant whose ``not_before`` is still in the future IS accepted: the call is
        scheduled, and the session machine refuses a ``start`` before ``not_before_ns``
        (reported as a ``call_start_refused`` event, reason ``too_early``). The returned bounds are
        ``not_before_ns = X - S + t1`` (latest) and ``not_after_ns = X - S + t0`` (earliest),
        so the mapped window is never longer than the server's (invariant 2). If the server
        window is shorter than the round trip the mapped window is empty; it is returned as
        is and the session machine refuses it.

        The caller handles protocol section 3.3's idempotency *before* calling this: a grant
        identical to one already accepted must be ignored, not verified again (its nonce is
        recorded, so it would be refused as ``replayed``).
        """
        problem = _type_problem(body)
        if problem is not None:
            raise GrantRefused("bad_message", problem)
        try:
            signed = canonical_grant_bytes(body)
        except UnicodeEncodeError:
            raise GrantRefused("bad_message", "grant: a string is not encodable in UTF-8 "
                                              "(lone surrogate)") from None

        signature = _strict_b64decode(signature_b64)
        if signature is None:
            raise GrantRefused("bad_signature", "signature is not base64 with padding")
        if len(signature) != _ED25519_SIGNATURE_LEN:
            raise GrantRefused("bad_signature",
                               f"signature is {len(signature)} bytes, Ed25519 needs 64")
        try:
            self.public_key.verify(signature, signed)
        except InvalidSignature:
            raise GrantRefused("bad_signature", "signature does not verify") from None

        if body.device_id != self.device_id:
            raise GrantRefused("foreign_device",
                               f"grant is for device {body.device_id[:64]!r}, not this one")

        if mapping is None:
            raise GrantRefused("no_clock", "no server time mapping yet")

        problem = _format_problem(body)
        if problem is not None:
            raise GrantRefused("bad_message", problem)

        not_after_ns = mapping.not_after_boot_ns(body.not_after_ms)
        if not_after_ns <= now_boot_ns:
            raise GrantRefused("expired", "the grant's not_after has passed")

        if self.nonces.seen(body.nonce):
            raise GrantRefused("replayed", "the grant's nonce was already used")

        self._record_nonce(body, mapping, now_boot_ns)
        return Grant(
            session_id=body.grant_id,
            device_id=body.device_id,
            contact_label=body.contact_label,
            not_before_ns=mapping.not_before_boot_ns(body.not_before_ms),
            not_after_ns=not_after_ns,
            max_duration_ns=body.max_duration_s * NS_PER_S,
        )

    def _record_nonce(self, body: GrantBody, mapping: ClockMapping, now_boot_ns: int) -> None:
        try:
            if self.nonces.full:
                self.nonces.prune(mapping.server_now_ms_earliest(now_boot_ns))
            self.nonces.add(body.nonce, body.not_after_ms)
        except OSError as exc:
            # Not durable means not accepted: a replay after a crash must stay refusable.
            raise GrantRefused("refused", f"cannot record the grant's nonce: "
                                          f"{exc.strerror or exc}") from exc
